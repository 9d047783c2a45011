"""examples/custom_trajectories.py runs as documented against in-process learner and rollout
servers on a tiny model (no download), and the learner's trajectory checks it relies on hold."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from covrl.models import save_tiny_model
from covrl.services.common import ServerConfig, start_server
from covrl.services.learner import build_learner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)


def _example():
    spec = importlib.util.spec_from_file_location("custom_trajectories",
                                                  os.path.join(ROOT, "examples", "custom_trajectories.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def servers(model_dir, tmp_path):
    from covrl.engines.transformers_engine import TransformersEngine
    from covrl.services.rollout import RolloutServicer, rollout_binding

    learner = start_server(build_learner({"learner": {"model": model_dir, "device": "cpu", "lr": 1e-3},
                                          "checkpoint_dir": str(tmp_path / "ckpt")}), ServerConfig())
    rollout = start_server([rollout_binding(RolloutServicer(TransformersEngine(model_path=model_dir)))],
                           ServerConfig(max_message_bytes=64 * 2**20))
    yield learner, rollout
    learner.stop(0)
    rollout.stop(0)


def test_example_trains_and_pushes(servers, capsys):
    learner, rollout = servers
    from covrl.client import LearnerClient, RolloutClient

    assert _example().main(["--learner", learner.address, "--push-to", rollout.address, "--steps", "2",
                            "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "step 2:" in out and f"pushed to {rollout.address}: ok" in out
    with RolloutClient(rollout.address) as rc:
        assert rc.get_info().weight_version == 2  # the rollout server holds the trained weights
    with LearnerClient(learner.address) as lc:
        info = lc.get_info()
        assert info.step == 2 and info.chat_template and info.config["lr"] == 1e-3


def _traj(**kw):
    from covrl.client import Trajectory

    base = dict(prompt_token_ids=[5, 6, 7], completion_token_ids=[8, 9], behavior_logprobs=[-1.0, -2.0],
                reward=1.0, group_id="g")
    base.update(kw)
    return Trajectory(**base)


def test_placeholder_logprobs_are_rejected(servers):
    from covrl.client import ClientError, LearnerClient

    with LearnerClient(servers[0].address, max_attempts=1) as lc:
        with pytest.raises(ClientError, match="looks like placeholders") as e:
            lc.submit_rollouts([_traj(behavior_logprobs=[0.0, 0.0], group_id=g) for g in "aab"])
        assert e.value.code.name == "INVALID_ARGUMENT"
        # one real log-prob in the batch: accepted (a confident sampler can give 0.0 on some tokens)
        lc.submit_rollouts([_traj(behavior_logprobs=[0.0, 0.0]), _traj(behavior_logprobs=[0.0, -0.5])])


def test_placeholder_logprobs_accepted_when_the_learner_recomputes(model_dir):
    from covrl.learner import LearnerConfig, LearnerCore, Trajectory

    core = LearnerCore(LearnerConfig(model=model_dir, device="cpu", recompute_old_logprobs=True))
    t = Trajectory(prompt_ids=[5, 6], completion_ids=[7, 8], logprobs=[0.0, 0.0], reward=1.0, group_id="g")
    assert core.submit([t, t]) == 2


def test_finish_reason_is_validated(servers):
    import grpc

    from covrl._proto.v1 import learner_pb2, learner_pb2_grpc
    from covrl.client import LearnerClient

    with LearnerClient(servers[0].address, max_attempts=1) as lc, \
            pytest.raises(ValueError, match="finish_reason must be one of stop, length .*got 'eos'"):
        lc.submit_rollouts([_traj(finish_reason="eos")])
    raw = learner_pb2.Trajectory(prompt_token_ids=[5, 6], completion_token_ids=[7], behavior_logprobs=[-1.0],
                                 reward=1.0, group_id="g")  # finish_reason left UNSPECIFIED
    with grpc.insecure_channel(servers[0].address) as ch, pytest.raises(grpc.RpcError) as e:
        learner_pb2_grpc.LearnerServiceStub(ch).SubmitRollouts(
            learner_pb2.SubmitRolloutsRequest(trajectories=[raw]), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "trajectories[0].finish_reason" in e.value.details() and "one of stop, length" in e.value.details()


def test_one_member_group_warns(model_dir, caplog):
    from covrl.learner import LearnerConfig, LearnerCore, Trajectory

    core = LearnerCore(LearnerConfig(model=model_dir, device="cpu"))
    mk = lambda g, r: Trajectory(prompt_ids=[5, 6], completion_ids=[7, 8], logprobs=[-1.0, -1.5],  # noqa: E731
                                 reward=r, group_id=g)
    core.submit([mk("a", 1.0), mk("a", 0.0), mk("lonely", 1.0)])
    with caplog.at_level("WARNING", logger="covrl.learner"):
        m = core.train_step()
    assert m["singleton_groups"] == 1.0
    assert "1 group(s) of this step have one trajectory (e.g. group_id 'lonely')" in caplog.text
