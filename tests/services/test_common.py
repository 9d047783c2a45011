"""Server plumbing: health, reflection, token auth, TLS, error mapping, SIGTERM via the launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from svc_fakes import FakeVerifier

from covrl.client import ClientError, RewardClient, ScoreItem
from covrl.services.common import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServerConfig,
    Unavailable,
    start_server,
    status_for,
)
from covrl.services.reward import RewardServicer, reward_binding

ITEM = ScoreItem("exact", "p", "1", "1")


def test_status_for_is_the_one_mapping():
    assert status_for(InvalidArgument("items[3].task", "empty")) == (
        grpc.StatusCode.INVALID_ARGUMENT, "items[3].task: empty")
    assert status_for(ResourceExhausted("x", "big"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(FailedPrecondition("x", "old"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for(Unavailable("", "loading"))[0] == grpc.StatusCode.UNAVAILABLE
    code, msg = status_for(KeyError("boom"))
    assert code == grpc.StatusCode.INTERNAL and "KeyError" in msg


def test_server_config_validation():
    with pytest.raises(ValueError, match="server: unknown keys"):
        ServerConfig.from_dict({"hostname": "x"})
    with pytest.raises(ValueError, match="tls_key_path"):
        ServerConfig.from_dict({"tls_cert_path": "a.pem"})
    with pytest.raises(ValueError, match="server.port"):
        ServerConfig.from_dict({"port": 70000})
    assert ServerConfig().host == "127.0.0.1"


def test_health_and_reflection(reward_server):
    ch = grpc.insecure_channel(reward_server.address)
    health = health_pb2_grpc.HealthStub(ch)
    for name in ("", "covrl.v1.RewardService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"covrl.v1.RewardService", "grpc.health.v1.Health"} <= names
    resp = next(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="covrl.v1.RewardService")]), timeout=5))
    assert resp.file_descriptor_response.file_descriptor_proto  # the contract is discoverable


def test_token_auth_rejects_and_accepts():
    srv = start_server([reward_binding(RewardServicer(FakeVerifier()))], ServerConfig(token="s3cret"))
    try:
        for token in (None, "wrong"):
            with pytest.raises(ClientError) as e:
                RewardClient(srv.address, token=token, max_attempts=1).score([ITEM])
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert RewardClient(srv.address, token="s3cret").score([ITEM]).results[0].reward == 1.0
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.address))  # probes need no token
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop(0)


def _self_signed(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    r = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {r.stderr[-200:]!r}")
    return key, cert


def test_tls_with_token(tmp_path):
    if not _which("openssl"):
        pytest.skip("openssl not installed")
    key, cert = _self_signed(tmp_path)
    cfg = ServerConfig(tls_cert_path=str(cert), tls_key_path=str(key), token="t")
    srv = start_server([reward_binding(RewardServicer(FakeVerifier()))], cfg)
    try:
        ok = RewardClient(f"localhost:{srv.port}", root_certificates=str(cert), token="t", timeout_s=20)
        assert ok.score([ITEM]).results[0].status == "ok"
        with pytest.raises(ClientError) as e:  # plaintext client against a TLS server
            RewardClient(f"localhost:{srv.port}", token="t", max_attempts=1, timeout_s=5).score([ITEM])
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        srv.stop(0)


def _which(cmd):
    import shutil

    return shutil.which(cmd)


def test_launcher_serves_from_config_and_stops_on_sigterm(tmp_path):
    from covrl.models import save_tiny_model

    model = save_tiny_model(tmp_path / "m")
    cfg = tmp_path / "rollout.yaml"
    cfg.write_text(f"server:\n  grace_s: 1.0\nengine:\n  kind: transformers\n  model_path: {model}\n"
                   "  attn_implementation: eager\nlimits:\n  max_new_tokens: 64\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "covrl.services", "rollout", "--port", "0", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        address = line.strip().rsplit(" ", 1)[-1]
        from covrl.client import RolloutClient, SamplingParams

        with RolloutClient(address, timeout_s=60) as c:
            assert c.get_info().engine == "transformers"
            with pytest.raises(ClientError) as e:
                c.generate([[5]], SamplingParams(max_new_tokens=65))
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_launcher_rejects_bad_config():
    from covrl.services.launch import start

    with pytest.raises(ValueError, match="engine"):
        start("rollout", {})
    with pytest.raises(ValueError, match="unknown sections"):
        start("reward", {"verfier": {}})
    with pytest.raises(ValueError, match="service"):
        start("nope", {})


def test_restart_on_same_port_refuses_a_second_server(reward_server):
    with pytest.raises(OSError):
        start_server([reward_binding(RewardServicer(FakeVerifier()))], ServerConfig(port=reward_server.port))
    assert RewardClient(reward_server.address).score([ITEM]).results[0].reward == 1.0
