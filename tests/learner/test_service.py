"""LearnerServicer in-process on 127.0.0.1:0, with an in-process rollout server to push to."""

import math
import os

import grpc
import pytest
import torch

from covrl.client import ClientError, LearnerClient, RolloutClient, SamplingParams, Trajectory
from covrl.engines.transformers_engine import TransformersEngine
from covrl.learner import LearnerConfig, LearnerCore
from covrl.models import save_tiny_model
from covrl.services.common import ServerConfig, start_server
from covrl.services.launch import start
from covrl.services.rollout import RolloutServicer, rollout_binding

TEMP = 0.9


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def rollout(model_dir):
    engine = TransformersEngine(model_path=model_dir)
    srv = start_server([rollout_binding(RolloutServicer(engine))], ServerConfig())
    client = RolloutClient(srv.address)
    yield srv, client, engine
    client.close()
    srv.stop(0)


@pytest.fixture(scope="module")
def learner(model_dir, tmp_path_factory):
    cfg = {"learner": {"model": model_dir, "lr": 1e-2, "temperature": TEMP, "entropy_coef": 0.05,
                       "loss_mode": "ppo"},
           "checkpoint_dir": str(tmp_path_factory.mktemp("ck"))}
    srv = start("learner", cfg)
    client = LearnerClient(srv.address, max_attempts=1)
    yield srv, client
    client.close()
    srv.stop(0)


def _trajs(rollout_client, n=2, seed=0):
    res = rollout_client.generate([[5, 20, 30, 40], [7, 8, 9]], SamplingParams(n=n, temperature=TEMP,
                                                                              max_new_tokens=6, seed=seed))
    return [Trajectory.from_sample(r, s, reward=float(j % 2)) for r in res for j, s in enumerate(r.samples)]


def test_engine_logprobs_match_learner_within_1e4(rollout, model_dir):
    _, rc, _ = rollout
    trajs = _trajs(rc, n=3)
    core = LearnerCore(LearnerConfig(model=model_dir, temperature=TEMP, micro_batch_size=4))
    lps, _ = core.logprobs([dict(prompt_ids=t.prompt_token_ids, completion_ids=t.completion_token_ids)
                            for t in trajs])
    err = max(abs(a - b) for t, lp in zip(trajs, lps, strict=True)
              for a, b in zip(t.behavior_logprobs, lp, strict=True))
    assert err < 1e-4


def test_bad_input_gets_the_right_status_and_server_keeps_serving(learner, rollout):
    _, lc = learner
    _, rc, _ = rollout
    good = _trajs(rc)[0]
    cases = [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "trajectories"),
        ([Trajectory(good.prompt_token_ids, good.completion_token_ids, good.behavior_logprobs[:-1], 1.0)],
         grpc.StatusCode.INVALID_ARGUMENT, "trajectories[0].behavior_logprobs: must have one entry"),
        ([Trajectory(good.prompt_token_ids, good.completion_token_ids,
                     [math.nan] + good.behavior_logprobs[1:], 1.0)],
         grpc.StatusCode.INVALID_ARGUMENT, r"behavior_logprobs[0]"),
        ([Trajectory(good.prompt_token_ids, [10**6], [-1.0], 1.0)],
         grpc.StatusCode.INVALID_ARGUMENT, "completion_token_ids[0]"),
        ([Trajectory([], good.completion_token_ids, good.behavior_logprobs, 1.0)],
         grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids"),
    ]
    for trajs, code, needle in cases:
        with pytest.raises(ClientError) as e:
            lc.submit_rollouts(trajs)
        assert e.value.code == code and needle in e.value.details, e.value.details
    with pytest.raises(ClientError) as e:
        lc.train()
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ClientError) as e:
        lc.register_rollout_server("not an address")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert lc.submit_rollouts([good]).accepted == 1
    from covrl._proto.v1 import learner_pb2

    with pytest.raises(grpc.RpcError) as e:
        lc.stub.Train(learner_pb2.TrainRequest(skip_push=True, loss_overrides={"lr": 1.0}), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "loss_overrides" in e.value.details()
    resp = lc.stub.Train(learner_pb2.TrainRequest(skip_push=True, loss_overrides={"entropy_coef": 0.1}), timeout=60)
    assert resp.weight_version == 1


def test_train_pushes_weights_and_streams_metrics(learner, rollout):
    srv, lc = learner
    _, rc, engine = rollout
    reg = lc.register_rollout_server(rc.address, push_now=True)  # the learner trained once already
    assert reg.num_servers == 1 and reg.push.ok, reg.push
    v0 = rc.get_info().weight_version
    assert v0 == reg.weight_version == 1
    sub = lc.submit_rollouts(_trajs(rc, n=2))
    assert sub.buffered_trajectories == 4 and sub.buffered_groups == 2
    res = lc.train(recompute_old_logprobs=True)
    assert res.weight_version > 0 and res.num_trajectories == 4
    assert abs(res.metrics["approx_kl"]) < 1e-4  # engine log-probs == learner log-probs
    assert [p.ok for p in res.pushes] == [True], res.pushes
    assert rc.get_info().weight_version == res.weight_version > v0
    version, weights = lc.get_weights(chunk_bytes=1000)
    assert version == res.weight_version
    for name, p in engine.model.named_parameters():
        torch.testing.assert_close(weights[name], p.detach())
    half_version, half = lc.get_weights(dtype="bfloat16")  # cast in the learner's snapshot
    assert half_version == version and set(half) == set(weights)
    for name, t in half.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, weights[name].bfloat16()), name
    ck = lc.checkpoint()
    assert ck.weight_version == res.weight_version and ck.size_bytes > 0
    ck2 = lc.checkpoint("explicit")  # a name under checkpoint_dir (paths: tests/services/test_security.py)
    assert ck2.path == os.path.join(os.path.dirname(ck.path), "explicit")


def test_metrics_stream_replays_history(learner):
    _, lc = learner
    it = lc.metrics(include_history=True, timeout_s=5.0)
    ev = next(it)
    assert ev.step >= 1 and "entropy" in ev.metrics and "cov" in ev.metrics


def test_example_config_is_valid():
    import pathlib

    import yaml

    from covrl.services.learner import _SERVICE_KEYS

    path = pathlib.Path(__file__).parents[2] / "services" / "learner" / "config.example.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) <= _SERVICE_KEYS
    LearnerConfig.from_dict(cfg["learner"])


def test_push_dtype_sends_the_snapshot_cast_once(model_dir, tmp_path):
    """``push_dtype: bfloat16``: the learner's own pushes carry bf16 values (cast as the snapshot is taken)."""
    engine = TransformersEngine(model_path=model_dir)
    rsrv = start_server([rollout_binding(RolloutServicer(engine))], ServerConfig())
    cfg = {"learner": {"model": model_dir, "lr": 1e-2}, "checkpoint_dir": str(tmp_path / "ck"),
           "push_dtype": "bfloat16"}
    lsrv = start("learner", cfg)
    try:
        with LearnerClient(lsrv.address, max_attempts=1) as lc:
            lc.submit_rollouts([Trajectory(prompt_token_ids=[5, 6, 7], completion_token_ids=[8, 9],
                                           behavior_logprobs=[-1.0, -1.0], reward=r, group_id="g")
                                for r in (0.0, 1.0)])
            lc.train(skip_push=True)
            reg = lc.register_rollout_server(rsrv.address, push_now=True)
            assert reg.push.ok, reg.push
            _, full = lc.get_weights()
        for name, p in engine.model.named_parameters():
            assert torch.equal(p.detach(), full[name].bfloat16().float()), name  # bf16 values, fp32 engine
        assert any(not torch.equal(full[n], full[n].bfloat16().float()) for n in full)  # the cast really rounds
    finally:
        lsrv.stop(0)
        rsrv.stop(0)
