"""Security defaults: a request names resources, never paths or arbitrary addresses; no server
listens beyond loopback unprotected; no string field of any RPC makes a server touch a file
outside its configured directories (issue 13)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import grpc
import pytest
import torch

from covrl._proto.v1 import learner_pb2
from covrl.services import common, fuzz
from covrl.services.common import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ServerConfig,
    address_allowed,
    start_server,
)
from covrl.services.fuzz_targets import path_strings, snapshot, start_targets, valid_seeds
from covrl.services.learner import CHECKPOINT_NAME, LearnerServicer, checkpoint_path

BAD_NAMES = ["/abs", "/tmp/x", "../x", "..", ".", "a/b", "a\\b", "x\x00y", "x" * 129, "What is 2+2?",
             "\\boxed{9**9**9**9}", "4/", "nan/", ".hidden", "a..b", " lead", "trail ", "C:x", "~x", "-rf", "é"]
GOOD_NAMES = ["4", "nan", "step_12", "run-1.final", "A" * 128]


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    t = start_targets(str(tmp_path_factory.mktemp("sec")))
    yield t
    t.stop()


# --------------------------------------------------------------------------- checkpoint names


def test_checkpoint_name_resolves_under_checkpoint_dir_only(tmp_path):
    root = os.path.realpath(tmp_path)
    for name in BAD_NAMES:
        with pytest.raises(InvalidArgument) as e:
            checkpoint_path(str(tmp_path), name, 3)
        assert e.value.field == "path", name
    for name in GOOD_NAMES:
        assert checkpoint_path(str(tmp_path), name, 3) == os.path.join(root, name)
    assert checkpoint_path(str(tmp_path), "", 7) == os.path.join(root, "step_7")
    with pytest.raises(FailedPrecondition, match="checkpoint_dir"):
        checkpoint_path("", "x", 0)
    (tmp_path / "escape").symlink_to(tmp_path.parent)  # a link planted inside checkpoint_dir
    with pytest.raises(InvalidArgument, match="outside the checkpoint directory"):
        checkpoint_path(str(tmp_path), "escape", 0)


def test_checkpoint_rpc_rejects_paths_and_writes_names_under_its_dir(targets):
    stub = targets.channels["learner"]
    call = stub.unary_unary("/covrl.v1.LearnerService/Checkpoint",
                            request_serializer=learner_pb2.CheckpointRequest.SerializeToString,
                            response_deserializer=learner_pb2.CheckpointResponse.FromString)
    before = snapshot(targets.root)
    for name in BAD_NAMES + [os.path.join(targets.outside, "ck"), "../outside/ck"]:
        with pytest.raises(grpc.RpcError) as e:
            call(learner_pb2.CheckpointRequest(path=name), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.value.details())
        assert e.value.details().startswith("path: "), e.value.details()
    resp = call(learner_pb2.CheckpointRequest(path="named_ok"), timeout=60)
    assert resp.path == os.path.join(os.path.realpath(targets.checkpoint_dir), "named_ok") and resp.size_bytes > 0
    assert snapshot(targets.root) == before  # nothing outside checkpoint_dir changed
    assert all(CHECKPOINT_NAME.fullmatch(n) for n in os.listdir(targets.checkpoint_dir))


# --------------------------------------------------------------------------- registration


def test_address_allow_list():
    for ok in ("127.0.0.1:5", "127.3.4.5:1", "localhost:50051", "[::1]:9"):
        assert address_allowed(ok, None) == ok
    for denied in ("10.0.0.1:5", "0.0.0.0:1", "evil.example:443", "[::]:5", "[fe80::1]:5"):
        with pytest.raises(PermissionDenied) as e:
            address_allowed(denied, None)
        assert e.value.field == "address"
    for bad in ("", "host", "host:", ":5", "a:b:c", "host:0", "host:99999", "[zz::1]:5", "a b:5", "http://x:1",
                "x" * 400, "unix:/tmp/s"):
        with pytest.raises(InvalidArgument):
            address_allowed(bad, None)
    allow = ["10.0.0.0/24", "hostB", "hostc:50051", "192.168.1.7", "[fd00::1]:7"]
    for ok in ("10.0.0.7:1", "hostb:9", "HOSTB:9", "hostc:50051", "192.168.1.7:2", "[fd00::1]:7"):
        assert address_allowed(ok, allow) == ok
    for denied in ("10.0.1.1:5", "hostc:50052", "hostd:1", "192.168.1.8:2", "[fd00::1]:8", "127.0.0.1:5"):
        with pytest.raises(PermissionDenied):
            address_allowed(denied, allow)


def test_register_rollout_server_only_allowed_addresses(targets):
    call = targets.channels["learner"].unary_unary(
        "/covrl.v1.LearnerService/RegisterRolloutServer",
        request_serializer=learner_pb2.RegisterRolloutServerRequest.SerializeToString,
        response_deserializer=learner_pb2.RegisterRolloutServerResponse.FromString)
    for address, code in (("10.1.2.3:50051", grpc.StatusCode.PERMISSION_DENIED),
                          ("evil.example:443", grpc.StatusCode.PERMISSION_DENIED),
                          ("not an address", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            call(learner_pb2.RegisterRolloutServerRequest(address=address, token="t", push_now=True), timeout=30)
        assert e.value.code() == code and e.value.details().startswith("address: "), e.value.details()
    ok = call(learner_pb2.RegisterRolloutServerRequest(address=targets.servers["rollout"].address), timeout=30)
    assert ok.num_servers == 1


class _Core:
    """What LearnerServicer's push path reads from a LearnerCore: a version and named tensors."""

    world_size = 1

    def __init__(self, params, version=1):
        self.params = params
        self.weight_version = version
        self.step = version

    def named_tensors(self):
        yield from self.params.items()


@pytest.fixture
def token_rollout():
    from covrl.engines.transformers_engine import TransformersEngine
    from covrl.models import char_tokenizer, tiny_causal_lm
    from covrl.services.rollout import RolloutServicer, rollout_binding

    tok = char_tokenizer()
    engine = TransformersEngine(tiny_causal_lm(len(tok), seed=0), tok)
    srv = start_server([rollout_binding(RolloutServicer(engine))], ServerConfig(token="rt"))
    yield srv, {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    srv.stop(0)


def _register(config, params, address, version, **req):
    servicer = LearnerServicer(config, core=_Core(params, version))
    from covrl._proto.v1 import learner_pb2_grpc
    from covrl.services.common import ServiceBinding

    srv = start_server([ServiceBinding("covrl.v1.LearnerService", servicer,
                                       learner_pb2_grpc.add_LearnerServiceServicer_to_server)])
    try:
        stub = learner_pb2_grpc.LearnerServiceStub(grpc.insecure_channel(srv.address))
        return stub.RegisterRolloutServer(
            learner_pb2.RegisterRolloutServerRequest(address=address, push_now=True, **req), timeout=60).push
    finally:
        srv.stop(0)


def test_push_uses_the_configured_token_over_the_requests(token_rollout):
    srv, params = token_rollout
    auth = {"rollout_auth": {"token": "rt"}}
    assert _register(auth, params, srv.address, 1, token="wrong").ok  # the config wins
    assert _register({}, params, srv.address, 2, token="rt").ok  # no rollout_auth: the request's token
    push = _register({}, params, srv.address, 3)
    assert not push.ok and "UNAUTHENTICATED" in push.error
    # rollout_auth.use_tls cannot be turned off by a request: a TLS handshake against this
    # plaintext server fails, whatever use_tls the request says.
    push = _register({"rollout_auth": {"use_tls": True, "token": "rt"}}, params, srv.address, 3, use_tls=False)
    assert not push.ok and "UNAVAILABLE" in push.error, push.error


def test_configured_rollout_servers_keep_their_credentials():
    """A server from the learner's own rollout_servers: registering it needs no allow-list
    entry, and a request cannot swap its credentials (say, drop its token or TLS)."""
    servicer = LearnerServicer({"rollout_servers": [{"address": "10.9.9.9:50051", "token": "cfg"}]},
                               core=_Core({"w": torch.zeros(1)}, version=0))
    before = servicer._servers["10.9.9.9:50051"]
    resp = servicer.RegisterRolloutServer(
        learner_pb2.RegisterRolloutServerRequest(address="10.9.9.9:50051", token="other"), None)
    assert resp.num_servers == 1 and servicer._servers["10.9.9.9:50051"] is before
    assert before.client._metadata == (("authorization", "Bearer cfg"),)
    servicer.close()


def test_rollout_auth_and_allow_list_config_errors(tmp_path):
    core = _Core({"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="rollout_auth: unknown keys"):
        LearnerServicer({"rollout_auth": {"tokn": "x"}}, core=core)
    with pytest.raises(ValueError, match="rollout_auth.root_certificates_path"):
        LearnerServicer({"rollout_auth": {"root_certificates_path": str(tmp_path / "missing.pem")}}, core=core)
    with pytest.raises(ValueError, match=r"allowed_rollout_addresses\[1\]"):
        LearnerServicer({"allowed_rollout_addresses": ["10.0.0.0/8", "10.0.0.0/99"]}, core=core)
    with pytest.raises(ValueError, match="allowed_rollout_addresses"):
        LearnerServicer({"allowed_rollout_addresses": "10.0.0.0/8"}, core=core)


# --------------------------------------------------------------------------- listening


def test_non_loopback_bind_needs_tls_token_or_insecure():
    for host in ("0.0.0.0", "::", "10.0.0.1", "myhost"):
        with pytest.raises(ValueError, match="server.host.*--insecure"):
            ServerConfig(host=host).validate()
    ServerConfig(host="0.0.0.0", token="t").validate()
    ServerConfig(host="0.0.0.0", tls_cert_path="c.pem", tls_key_path="k.pem").validate()
    ServerConfig(host="0.0.0.0", insecure=True).validate()
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        ServerConfig(host=host).validate()
    with pytest.raises(ValueError, match="server.insecure"):
        ServerConfig.from_dict({"insecure": "yes"})


def test_insecure_logs_a_warning_and_refuses_without_it(monkeypatch, caplog):
    """127.0.0.1 played as a non-loopback address: nothing listens beyond loopback in the test."""
    from svc_fakes import FakeVerifier

    from covrl.services.reward import RewardServicer, reward_binding

    monkeypatch.setattr(common, "is_loopback_host", lambda host: False)
    binding = [reward_binding(RewardServicer(FakeVerifier()))]
    with pytest.raises(ValueError, match="--insecure"):
        start_server(binding, ServerConfig())
    with caplog.at_level(logging.WARNING, logger="covrl.services"):
        srv = start_server(binding, ServerConfig(insecure=True))
    srv.stop(0)
    assert any("insecure" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_cli_refuses_a_non_loopback_host_and_takes_insecure():
    # 192.0.2.1 (TEST-NET-1) is never bound: the config check comes first.
    p = subprocess.run([sys.executable, "-m", "covrl.services", "reward", "--host", "192.0.2.1", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--insecure" in p.stderr, p.stderr[-1500:]
    from covrl.cli import build_parser

    assert build_parser().parse_args(["serve", "reward", "--insecure"]).insecure is True
    from covrl.services.__main__ import main  # noqa: F401 - the flag exists on the service launcher too

    assert "--insecure" in subprocess.run([sys.executable, "-m", "covrl.services", "--help"], capture_output=True,
                                          text=True, timeout=60).stdout


# --------------------------------------------------------------------------- every string field


def _string_fields(desc, prefix=(), seen=()):
    """Paths (tuples of field descriptors) to every string / bytes field reachable from ``desc``."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    out = []
    for f in desc.fields:
        path = (*prefix, f)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            if f.message_type.fields_by_name["key"].type == FD.TYPE_STRING:
                out.append(path)
        elif f.message_type is not None:
            if f.message_type.full_name not in seen:
                out += _string_fields(f.message_type, path, (*seen, desc.full_name))
        elif f.type in (FD.TYPE_STRING, FD.TYPE_BYTES):
            out.append(path)
    return out


def _set_path(msg, path, value):
    from google.protobuf.descriptor import FieldDescriptor as FD

    *parents, leaf = path
    for f in parents:
        if f.is_repeated:
            items = getattr(msg, f.name)
            msg = items[0] if len(items) else items.add()
        else:
            msg = getattr(msg, f.name)
    if leaf.message_type is not None:  # a map<string, ...>: the value as a key
        getattr(msg, leaf.name)[value] = 0.1
        return
    v = value.encode("utf-8", "surrogateescape") if leaf.type == FD.TYPE_BYTES else value
    if leaf.is_repeated:
        getattr(msg, leaf.name)[:] = [v]
    else:
        setattr(msg, leaf.name, v)


def test_no_string_field_of_any_rpc_touches_a_file_outside_its_dirs(targets, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.join(targets.root, "cwd"))
    sentinel = str(tmp_path / "sentinel")  # a directory outside everything the servers know
    values = [*path_strings(targets), sentinel, sentinel + "/x", "../" * 12 + sentinel.lstrip("/"),
              "../../../../../../../../tmp/covrl-sec-probe", "evil/../../x", "~/covrl-sec-probe",
              "file://" + sentinel, "x\x00y"]
    seeds = valid_seeds(targets)
    before = snapshot(targets.root)
    tested, bad = set(), []
    for ch in targets.channels.values():
        for m in fuzz.discover(ch):
            if m.path not in seeds:
                continue
            for path in _string_fields(m.input):
                tested.add(f"{m.input.name}." + ".".join(f.name for f in path))
                for value in values:
                    seed = seeds[m.path][0]
                    msgs = [m.cls.FromString(x.SerializeToString()) for x in (seed if m.client_streaming else [seed])]
                    _set_path(msgs[0], path, value)
                    out = fuzz.call(ch, m, [x.SerializeToString() for x in msgs], timeout_s=30)
                    if out.violation:
                        bad.append((m.path, tested and path[-1].name, value[:60], out.violation))
    assert not bad, bad[:10]
    # The audit covers every string field of the three contracts (and finds new ones by itself).
    assert {"CheckpointRequest.path", "RegisterRolloutServerRequest.address", "RegisterRolloutServerRequest.token",
            "RegisterRolloutServerRequest.root_certificates_pem", "GetWeightsRequest.dtype",
            "TrainRequest.loss_overrides", "SubmitRolloutsRequest.trajectories.group_id",
            "GenerateRequest.prompts.text", "GenerateRequest.prompts.prompt_id",
            "GenerateRequest.prompts.chat.messages.role", "GenerateRequest.prompts.chat.messages.content",
            "GenerateRequest.sampling.stop", "TensorChunk.name", "TensorChunk.dtype", "TensorChunk.data",
            "ScoreRequest.items.task", "ScoreRequest.items.metadata_json", "ScoreRequest.items.ground_truth",
            "ScoreRequest.items.completion", "ScoreRequest.items.prompt", "ScoreRequest.items.item_id"} <= tested
    assert snapshot(targets.root) == before
    assert not os.path.exists(sentinel) and not os.path.exists("/tmp/covrl-sec-probe")
    assert not os.listdir(os.path.join(targets.root, "cwd"))
    assert all(CHECKPOINT_NAME.fullmatch(n) for n in os.listdir(targets.checkpoint_dir))
    assert set(targets.alive().values()) == {"SERVING"}


def test_undecodable_request_bytes_are_invalid_argument_naming_the_message(targets):
    for ch in targets.channels.values():
        for m in fuzz.discover(ch):
            payload = [b"\x0a\xff\xff\xff\xff\x0f"]  # a length-delimited field longer than the message
            out = fuzz.call(ch, m, payload, timeout_s=10)
            assert out.code == grpc.StatusCode.INVALID_ARGUMENT, (m.path, out.code, out.details)
            assert out.details.startswith(f"{m.input.name}: "), out.details
