"""Reward servicer over a fake verifier (the covrl.rewards.Verifier contract) and the real one."""

from __future__ import annotations

import grpc
import pytest

from covrl.client import ClientError, RewardClient, ScoreItem
from covrl.services.common import start_server
from covrl.services.reward import RewardServicer, reward_binding


@pytest.fixture
def client(reward_server):
    with RewardClient(reward_server.address, timeout_s=30, max_attempts=2) as c:
        yield c


def test_score_happy_path_keeps_order_ids_and_metadata(client):
    items = [
        ScoreItem("exact", "p", " 42 ", "42", metadata={"numbers": [1, 2]}, item_id="a"),
        ScoreItem("exact", "p", "41", "42", deadline_s=1.5, item_id="b"),
        {"task": "nope", "prompt": "p", "completion": "c", "ground_truth": "g"},
    ]
    out = client.score(items)
    assert out.verifier_version == "fake/1"
    assert [r.reward for r in out.results] == [1.0, 0.0, 0.0]
    assert [r.status for r in out.results] == ["ok", "ok", "unknown_task"]
    assert [r.item_id for r in out.results] == ["a", "b", ""]
    assert out.results[0].detail == repr({"numbers": [1, 2]})  # JSON metadata arrives as a dict


@pytest.mark.parametrize(
    "items, code, field",
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "items"),
        ([ScoreItem("", "p", "c", "g")], grpc.StatusCode.INVALID_ARGUMENT, "items[0].task"),
        ([ScoreItem("exact", "p", "c", "g", deadline_s=-1.0)], grpc.StatusCode.INVALID_ARGUMENT, "items[0].deadline_s"),
        ([ScoreItem("exact", "p", "c", "g", deadline_s=float("nan"))], grpc.StatusCode.INVALID_ARGUMENT,
         "items[0].deadline_s"),
        ([ScoreItem("exact", "p", "c", "g", deadline_s=1e9)], grpc.StatusCode.INVALID_ARGUMENT, "items[0].deadline_s"),
        ([ScoreItem("exact", "p", "x" * 100_000, "g")], grpc.StatusCode.RESOURCE_EXHAUSTED, ""),  # > 64 KiB limit
    ],
)
def test_bad_score_requests_get_status_and_server_keeps_serving(client, items, code, field):
    with pytest.raises(ClientError) as e:
        client.score(items)
    assert e.value.code == code and field in e.value.details
    assert client.score([ScoreItem("exact", "p", "1", "1")]).results[0].reward == 1.0


def test_bad_metadata_json(reward_server):
    from covrl._proto.v1 import reward_pb2, reward_pb2_grpc

    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(reward_server.address))
    for meta in ("{not json", "[1, 2]"):
        req = reward_pb2.ScoreRequest(items=[reward_pb2.RewardItem(task="exact", completion="1", metadata_json=meta)])
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("items[0].metadata_json")


def test_too_many_items_is_resource_exhausted():
    from svc_fakes import FakeVerifier

    from covrl.services.reward import RewardLimits

    srv = start_server([reward_binding(RewardServicer(FakeVerifier(), RewardLimits(max_items_per_request=2)))])
    try:
        with pytest.raises(ClientError) as e:
            RewardClient(srv.address).score([ScoreItem("exact", "", "1", "1")] * 3)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "items" in e.value.details
    finally:
        srv.stop(0)


def test_stop_closes_the_verifier():
    from svc_fakes import FakeVerifier

    v = FakeVerifier()
    start_server([reward_binding(RewardServicer(v))]).stop(0)
    assert v.closed


def test_real_verifier_scores_and_cuts_a_bomb_at_its_deadline():
    rewards = pytest.importorskip("covrl.rewards")
    srv = start_server([reward_binding(RewardServicer(rewards.Verifier(workers=1, default_deadline_s=5.0)))])
    try:
        with RewardClient(srv.address, timeout_s=60) as c:
            out = c.score([
                ScoreItem("math", "", "so the answer is \\boxed{\\frac{1}{2}}", "0.5"),
                ScoreItem("arithmetic", "", "9**9**9**9", "1", deadline_s=0.5),
                ScoreItem("math", "", "\\boxed{3}", "4"),
                ScoreItem("no_such_task", "", "x", "y"),
            ])
        assert out.verifier_version == rewards.Verifier.__init__.__globals__["VERIFIER_VERSION"]
        assert out.results[0].status == "ok" and out.results[0].reward == 1.0
        assert out.results[1].status in ("timeout", "invalid", "ok")  # never hangs the batch
        assert out.results[2].status == "ok" and out.results[2].reward == 0.0
        assert out.results[3].status == "unknown_task"
    finally:
        srv.stop(0)


def test_closed_verifier_is_unavailable(client, reward_server):
    servicer = reward_server.bindings[0].servicer
    servicer.close()
    with pytest.raises(ClientError) as e:
        RewardClient(reward_server.address, max_attempts=1).score([ScoreItem("exact", "", "1", "1")])
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_example_configs_parse():
    import pathlib

    import yaml

    from covrl.services.common import ServerConfig
    from covrl.services.reward import RewardLimits
    from covrl.services.rollout import RolloutLimits

    root = pathlib.Path(__file__).resolve().parents[2] / "services"
    for name in ("rollout", "reward", "learner"):
        cfg = yaml.safe_load((root / name / "config.example.yaml").read_text())
        assert ServerConfig.from_dict(cfg["server"]).host == "127.0.0.1"
    RolloutLimits.from_dict(yaml.safe_load((root / "rollout" / "config.example.yaml").read_text())["limits"])
    RewardLimits.from_dict(yaml.safe_load((root / "reward" / "config.example.yaml").read_text())["limits"])
