"""Client SDK: retry across a server restart, deadlines, and LearnerClient against a stub learner."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from svc_fakes import FakeVerifier

from covrl._proto.v1 import learner_pb2, learner_pb2_grpc
from covrl.client import ClientError, LearnerClient, RewardClient, ScoreItem, Trajectory
from covrl.engines.base import PromptResult, Sample
from covrl.services.common import ServerConfig, ServiceBinding, start_server, unary
from covrl.services.reward import RewardServicer, reward_binding
from covrl.services.tensors import iter_tensor_chunks

ITEM = ScoreItem("exact", "p", "1", "1")


def _reward_server(port=0):
    return start_server([reward_binding(RewardServicer(FakeVerifier()))], ServerConfig(port=port))


def test_client_retries_across_a_server_restart():
    srv = _reward_server()
    port = srv.port
    client = RewardClient(srv.address, max_attempts=12, backoff_s=0.05, max_backoff_s=0.5, timeout_s=10)
    assert client.score([ITEM]).results[0].reward == 1.0
    srv.stop(0)
    restarted = []

    def restart():
        time.sleep(0.6)
        restarted.append(_reward_server(port))

    t = threading.Thread(target=restart)
    t.start()
    try:
        assert client.score([ITEM]).results[0].reward == 1.0  # fails UNAVAILABLE first, then retries
        t.join()
        assert restarted
    finally:
        t.join()
        for s in restarted:
            s.stop(0)


def test_no_retry_budget_surfaces_unavailable():
    srv = _reward_server()
    address = srv.address
    srv.stop(0)
    with pytest.raises(ClientError) as e:
        RewardClient(address, max_attempts=2, backoff_s=0.01, timeout_s=2).score([ITEM])
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


# ----------------------------------------------------------------------------- learner client


class StubLearner(learner_pb2_grpc.LearnerServiceServicer):
    """Just enough of a learner to check the client's conversions both ways."""

    def __init__(self):
        self.trajectories = []
        self.registered = []
        self.weights = {"w": torch.arange(10, dtype=torch.float32).reshape(2, 5), "b": torch.ones(3).bfloat16()}

    @unary
    def SubmitRollouts(self, request, context):
        self.trajectories.extend(request.trajectories)
        return learner_pb2.SubmitRolloutsResponse(accepted=len(request.trajectories),
                                                  buffered_trajectories=len(self.trajectories), buffered_groups=1)

    @unary
    def Train(self, request, context):
        return learner_pb2.TrainResponse(
            step=1, weight_version=1, loss=0.5, entropy=2.0, cov_logp_adv=-0.1, num_tokens=7,
            metrics={"entropy": 2.0, "cov_logp_adv": -0.1, "recompute": float(request.recompute_old_logprobs)},
            pushes=[learner_pb2.PushResult(address=a, ok=True) for a in self.registered],
        )

    def GetWeights(self, request, context):
        yield from iter_tensor_chunks(self.weights, 1, chunk_bytes=request.chunk_size_bytes or 8)

    @unary
    def RegisterRolloutServer(self, request, context):
        self.registered.append(request.address)
        return learner_pb2.RegisterRolloutServerResponse(num_servers=len(self.registered))

    @unary
    def Checkpoint(self, request, context):
        return learner_pb2.CheckpointResponse(path=request.path or "/ckpt", step=1, size_bytes=10)

    def GetMetrics(self, request, context):
        for step in (1, 2):
            yield learner_pb2.MetricsEvent(step=step, metrics={"entropy": 1.0 / step})


@pytest.fixture
def learner():
    stub = StubLearner()
    srv = start_server([ServiceBinding("covrl.v1.LearnerService", stub,
                                       learner_pb2_grpc.add_LearnerServiceServicer_to_server)])
    yield stub, LearnerClient(srv.address, timeout_s=10)
    srv.stop(0)


def test_learner_client_round_trips(learner):
    stub, client = learner
    result = PromptResult(prompt_index=2, prompt_token_ids=[1, 2], weight_version=4,
                          samples=[Sample(token_ids=[5, 6], logprobs=[-0.5, -1.0], finish_reason="length")])
    traj = Trajectory.from_sample(result, result.samples[0], reward=1.0)
    sub = client.submit_rollouts([traj, traj])
    assert (sub.accepted, sub.buffered_trajectories) == (2, 2)
    got = stub.trajectories[0]
    assert list(got.behavior_logprobs) == [-0.5, -1.0] and got.group_id == "2" and got.weight_version == 4
    assert got.finish_reason == 2  # FINISH_REASON_LENGTH
    assert client.register_rollout_server("127.0.0.1:1").num_servers == 1
    tr = client.train(recompute_old_logprobs=True)
    assert (tr.entropy, tr.cov_logp_adv, tr.num_tokens) == (2.0, -0.1, 7)
    assert tr.metrics["recompute"] == 1.0 and tr.pushes[0].address == "127.0.0.1:1" and tr.pushes[0].ok
    version, weights = client.get_weights()
    assert version == 1 and set(weights) == {"w", "b"}
    for k, v in stub.weights.items():
        assert torch.equal(weights[k], v)
    assert client.checkpoint().path == "/ckpt"
    assert [e.step for e in client.metrics()] == [1, 2]
