"""services/*/config.example.yaml run as written on a CPU machine, and a service config mistake
is one line naming the file and the key, with exit code 2.

The examples name the demo model (``model_path: demo``); here only that value is swapped for
a tiny model saved to a temporary directory, so the test needs no download.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from covrl.models import save_tiny_model
from covrl.services.launch import ServiceConfigError, check_config, load_config, start

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_KEY = {"rollout": ("engine", "model_path"), "learner": ("learner", "model")}


def example(name: str) -> str:
    return os.path.join(ROOT, "services", name, "config.example.yaml")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("name", ["rollout", "reward", "learner"])
def test_example_config_runs_on_cpu(name, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the example (checkpoint_dir) land here
    cfg = load_config(example(name))
    if name in MODEL_KEY:
        section, key = MODEL_KEY[name]
        assert cfg[section][key] == "demo", "the example must name the demo model so it runs as written"
        assert cfg[section]["device"] == "cpu"
        cfg[section][key] = tiny_model
    running = start(name, check_config(name, cfg), "127.0.0.1", 0)
    try:
        import grpc

        with grpc.insecure_channel(running.address) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def _run(name: str, config: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "covrl.services", name, "--config", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("name, config, expect", [
    ("reward", {"verifier": {"workrs": 2}}, "verifier.workrs: unknown key (did you mean verifier.workers?)"),
    ("learner", {"learner": {"model": "demo", "lrr": 1e-5}}, "learner.lrr: unknown key (did you mean learner.lr?)"),
    ("rollout", {"engine": {"model_path": "demo", "devce": "cpu"}},
     "engine.devce: unknown key (did you mean engine.device?)"),
    ("rollout", {"servr": {}, "engine": {}}, "servr: unknown key (did you mean server?)"),
    ("rollout", {"engine": {"model_path": "/models/policy"}}, "engine.model_path: no such directory: /models/policy"),
    ("learner", {"learner": {"model": "/models/policy"}}, "learner.model: no such directory: /models/policy"),
    ("reward", {"server": {"max_workers": 0}}, "server.max_workers: expected >= 1"),
])
def test_config_mistake_is_one_line_exit_2(name, config, expect, tmp_path):
    proc = _run(name, config, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert expect in lines[0]
    assert str(tmp_path / f"{name}.yaml") in lines[0]  # names the file


def test_missing_config_file_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "covrl.services", "reward", "--config", str(tmp_path / "no.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"covrl reward: config error: config file not found: {tmp_path / 'no.yaml'}"


def test_check_config_resolves_model_paths(tiny_model):
    cfg = check_config("learner", {"learner": {"model": tiny_model}})
    assert cfg["learner"]["model"] == tiny_model
    with pytest.raises(ServiceConfigError, match=r"learner\.model: no such directory: \./nothing-here"):
        check_config("learner", {"learner": {"model": "./nothing-here"}})
    with pytest.raises(ServiceConfigError, match="learner: section required"):
        check_config("learner", {})


def test_readme_network_command_runs_as_written(tmp_path):
    """README: ``python -m covrl.services reward --config ... --host 0.0.0.0 --port P --token-env COVRL_TOKEN``
    listens beyond loopback behind the token; without a token that command is refused, one line,
    exit 2. Traffic goes to 127.0.0.1 only."""
    import re
    import signal

    from covrl.client import ClientError, RewardClient, ScoreItem

    cmd = [sys.executable, "-m", "covrl.services", "reward", "--config", example("reward"),
           "--host", "0.0.0.0", "--port", "0"]
    env = {k: v for k, v in os.environ.items() if k != "COVRL_TOKEN"}
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert refused.returncode == 2
    assert "server.host: '0.0.0.0' is not a loopback address" in refused.stderr
    proc = subprocess.Popen(cmd + ["--token-env", "COVRL_TOKEN"], cwd=ROOT, env={**env, "COVRL_TOKEN": "s3cret"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for _ in range(200):  # bounded: the service prints its address once it serves
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"serving on [^:]+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "the reward service did not start"
        item = ScoreItem(task="arithmetic", prompt="2+2=", completion="\\boxed{4}", ground_truth="4")
        with RewardClient(f"127.0.0.1:{port}", token="s3cret") as ok:
            assert ok.score([item], timeout_s=60).results[0].reward == 1.0
        with RewardClient(f"127.0.0.1:{port}", max_attempts=1) as anonymous, pytest.raises(ClientError) as e:
            anonymous.score([item], timeout_s=30)
        assert e.value.code.name == "UNAUTHENTICATED"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_sigusr1_prints_every_threads_stack_and_the_service_keeps_serving():
    """``kill -USR1 PID`` on a service: its stacks in the log (what a stuck one waits for), and it
    goes on answering. Traffic to 127.0.0.1 only."""
    import re
    import signal

    from covrl.client import RewardClient, ScoreItem

    proc = subprocess.Popen([sys.executable, "-m", "covrl.services", "reward", "--config", example("reward"),
                             "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for _ in range(200):  # bounded: the service prints its address once it serves
            m = re.search(r"serving on [^:]+:(\d+)", proc.stdout.readline())
            if m:
                port = int(m.group(1))
                break
        assert port, "the reward service did not start"
        proc.send_signal(signal.SIGUSR1)
        seen = []
        for _ in range(400):
            seen.append(proc.stdout.readline())
            if "Current thread" in seen[-1]:
                break
        assert any("Current thread" in s for s in seen), "".join(seen)
        assert any(re.match(r"Thread 0x[0-9a-f]+", s) for s in seen), "".join(seen)  # the others too
        item = ScoreItem(task="arithmetic", prompt="2+2=", completion="\\boxed{4}", ground_truth="4")
        with RewardClient(f"127.0.0.1:{port}") as client:
            assert client.score([item], timeout_s=60).results[0].reward == 1.0
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
