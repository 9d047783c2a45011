"""A run across real network hosts: each service in its own network namespace (root + ``ip netns``).

Five namespaces (two rollout hosts, reward, learner, trainer) on a bridge in a sixth,
10.213.77.0/24, all created and deleted by the test (processes killed first, even on
failure). The services listen on their namespace's address with TLS (a CA and a server
certificate made here) and a shared token. The test starts a long run of the tiny model,
cuts rollout host 2's link mid-run (``ip link set ... down``) and checks that its shard
goes to host 1, that the run goes on with 1/2 rollout servers and that host 2 is
re-admitted once the link is back and serves steps again. Then it stops the run with
SIGTERM, so no step of the check depends on how fast a step is (a 10-step run could end
before the re-admission on a slow machine). Last, a client without the token, or trusting
another CA, is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from trainer_helpers import tiny_cfg

from covrl.logging_utils import read_metrics

pytestmark = pytest.mark.slow

NET = "10.213.77"
HOSTS = {"ro1": 11, "ro2": 12, "rew": 13, "lrn": 14, "trn": 15}
PORT = 50051
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"covrl-probe-{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "ip netns add is not permitted here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return "needs the cryptography package (test certificates)"
    return None


_SKIP = _can_netns()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


class Network:
    """The namespaces, veth pairs and bridge of the test; :meth:`close` removes all of it."""

    def __init__(self):
        tag = secrets.token_hex(3)
        self.hub = f"covrl-{tag}-hub"
        self.ns = {h: f"covrl-{tag}-{h}" for h in HOSTS}
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []
        sh("ip", "netns", "add", self.hub)
        self.made.append(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for h, last in HOSTS.items():
            ns = self.ns[h]
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # both ends are made in the hub namespace, then one moves to the host's
            sh("ip", "-n", self.hub, "link", "add", f"v-{h}", "type", "veth", "peer", "name", f"p-{h}")
            sh("ip", "-n", self.hub, "link", "set", f"p-{h}", "netns", ns)
            sh("ip", "-n", ns, "link", "set", f"p-{h}", "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{NET}.{last}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", self.hub, "link", "set", f"v-{h}", "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", f"v-{h}", "up")

    def link(self, host: str, up: bool) -> None:
        sh("ip", "-n", self.hub, "link", "set", f"v-{host}", "up" if up else "down")

    def run(self, host: str, cmd: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            p = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *cmd], stdout=log, stderr=subprocess.STDOUT,
                                 cwd=ROOT, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        for ns in reversed(self.made):
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in out:  # anything still inside
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def network():
    net = Network()
    try:
        yield net
    finally:
        net.close()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(ns in left for ns in net.made)


def make_ca(common_name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def write_certs(d) -> dict[str, str]:
    """ca.pem (the run's CA), server.pem / server.key (every IP of the test network), other-ca.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key, ca = make_ca("covrl test CA")
    _, other = make_ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.IPAddress(ipaddress.ip_address(f"{NET}.{n}")) for n in HOSTS.values()]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "covrl test server")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: str(d / f"{n}") for n in ("ca.pem", "other-ca.pem", "server.pem", "server.key")}
    pem = serialization.Encoding.PEM
    for n, data in (("ca.pem", ca.public_bytes(pem)), ("other-ca.pem", other.public_bytes(pem)),
                    ("server.pem", cert.public_bytes(pem)),
                    ("server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))):
        with open(paths[n], "wb") as f:
            f.write(data)
    return paths


def _stacks(p: subprocess.Popen | None, lines: list[str], logs=()) -> str:
    """What a stuck trainer waits for: its last lines, then every thread's stack (the CLI dumps
    them on SIGUSR1, into the same pipe), then the tail of each service's log."""
    n = len(lines)
    if p is not None and p.poll() is None:
        os.kill(p.pid, signal.SIGUSR1)  # ip netns exec execs: this is the trainer
        time.sleep(2)
    out = "".join(lines[max(0, n - 30):n]) + "--- trainer stacks (SIGUSR1) ---\n" + "".join(lines[n:])
    for log in logs:
        with contextlib.suppress(OSError):
            out += f"--- {log} (tail) ---\n" + "".join(open(log).readlines()[-15:])
    return out


def _wait_line(lines: list[str], text: str, p: subprocess.Popen | None, timeout_s: float, logs=()) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in list(lines):
            if text in line:
                return line
        if p is not None and p.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no line with {text!r} within {timeout_s}s; last lines:\n" + _stacks(p, lines, logs))


def test_run_across_network_namespaces_with_tls_token_and_a_cut_link(tmp_path, network, tiny_model_dir):
    from covrl.services.learner import _SERVICE_KEYS
    from covrl.trainer import service_configs

    certs = write_certs(tmp_path)
    token = secrets.token_hex(16)
    env = {**os.environ, "COVRL_TOKEN": token, "OMP_NUM_THREADS": "1"}
    addr = {h: f"{NET}.{n}:{PORT}" for h, n in HOSTS.items()}
    steps = 5000  # never reached: the test stops the run once host 2 is back (a step is ~0.1 s)
    run = tmp_path / "run"
    cfg = tiny_cfg(run, **{"steps": steps, "model.path": tiny_model_dir, "rollout.timeout_s": 6,
                           "failover.push_timeout_s": 4, "failover.probe_timeout_s": 1,
                           "failover.rollout_grace_s": 120})
    configs = service_configs(cfg, tiny_model_dir, str(tmp_path / "learner-run"))
    server = {"tls_cert_path": certs["server.pem"], "tls_key_path": certs["server.key"], "token": token,
              "grace_s": 1.0}
    learner_cfg = dict(configs["learner"])
    if "allowed_rollout_addresses" in _SERVICE_KEYS:  # the learner pushes only where its config allows
        learner_cfg["allowed_rollout_addresses"] = [f"{NET}.0/24"]
    procs = {}
    for h, kind in (("ro1", "rollout"), ("ro2", "rollout"), ("rew", "reward"), ("lrn", "learner")):
        c = {**(learner_cfg if kind == "learner" else configs[kind]), "server": server}
        path = tmp_path / f"{h}.yaml"
        path.write_text(yaml.safe_dump(c))
        procs[h] = network.run(h, [sys.executable, "-m", "covrl.services", kind, "--host", addr[h].split(":")[0],
                                   "--port", str(PORT), "--config", str(path)], str(tmp_path / f"{h}.log"), env)

    cmd = [sys.executable, "-m", "covrl.cli", "train", "--config", "configs/tiny.yaml", f"steps={steps}",
           f"logging.run_dir={run}", f"model.path={tiny_model_dir}", "eval.final=false", "checkpoint.final=false",
           f"services.rollout={addr['ro1']},{addr['ro2']}", f"services.reward={addr['rew']}",
           f"services.learner={addr['lrn']}", f"services.tls_ca={certs['ca.pem']}", "services.connect_timeout_s=240",
           "rollout.timeout_s=6", "failover.push_timeout_s=4", "failover.probe_timeout_s=1",
           "failover.rollout_grace_s=120"]
    trainer = subprocess.Popen(["ip", "netns", "exec", network.ns["trn"], *cmd], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    network.procs.append(trainer)
    lines: list[str] = []

    def read():
        for line in trainer.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()

    logs = [tmp_path / f"{h}.log" for h in procs]
    _wait_line(lines, "2/2 healthy", trainer, 300, logs)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or len(read_metrics(str(run))) < 2:
        assert trainer.poll() is None and time.monotonic() < deadline, _stacks(trainer, lines, logs)
        time.sleep(0.1)
    network.link("ro2", up=False)  # rollout host 2 drops off the network mid-run
    _wait_line(lines, f"1/2 healthy (lost {addr['ro2']}", trainer, 120, logs)
    network.link("ro2", up=True)
    _wait_line(lines, f"2/2 healthy (admitted {addr['ro2']}", trainer, 120, logs)
    # the run goes on with both servers: a step at 1/2 healthy, then a later one at 2/2
    def back_to_two(rows) -> bool:
        ones = [i for i, r in enumerate(rows) if r["rollout/servers_healthy"] == 1]
        return bool(ones) and any(r["rollout/servers_healthy"] == 2 for r in rows[ones[0] + 1:])

    deadline = time.monotonic() + 120
    while not back_to_two(read_metrics(str(run))):
        assert trainer.poll() is None and time.monotonic() < deadline, _stacks(trainer, lines, logs)
        time.sleep(0.1)
    trainer.send_signal(signal.SIGTERM)  # ip netns exec passes it on to the trainer (it execs)
    assert trainer.wait(timeout=120) == 128 + signal.SIGTERM, "".join(lines[-40:])

    rows = read_metrics(str(run))
    n = len(rows)
    assert 3 <= n < steps
    assert [r["step"] for r in rows] == list(range(1, n + 1))  # each step once, none lost
    assert [r["weight_version"] for r in rows] == list(range(1, n + 1))
    assert back_to_two(rows)
    # the two first admissions at the start count too; host 2's return adds one
    assert rows[-1]["failover/readmissions"] > rows[0]["failover/readmissions"]

    # Refused: no token; the right token but another CA.
    probe = (
        "import sys, grpc\n"
        "from covrl.client import RolloutClient\n"
        "def code(**kw):\n"
        "    try:\n"
        f"        RolloutClient('{addr['ro1']}', max_attempts=1, **kw).get_info(timeout_s=10)\n"
        "        return 'OK'\n"
        "    except Exception as e:\n"
        "        return e.code.name\n"
        f"print(code(root_certificates='{certs['ca.pem']}'))\n"
        f"print(code(root_certificates='{certs['other-ca.pem']}', token='{token}'))\n"
        f"print(code(root_certificates='{certs['ca.pem']}', token='{token}'))\n")
    out = subprocess.run(["ip", "netns", "exec", network.ns["trn"], sys.executable, "-c", probe], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["UNAUTHENTICATED", "UNAVAILABLE", "OK"], out.stdout + out.stderr
