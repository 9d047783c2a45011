"""A learner given by address keeps its own config: the trainer names each setting that differs."""

import pytest
import torch

from covrl.config import load_config
from covrl.models import save_tiny_model
from covrl.services.common import ServerConfig, start_server
from covrl.services.learner import build_learner
from covrl.trainer.local_services import service_configs
from covrl.trainer.remote import check_remote_learner, differing_settings

torch.set_num_threads(1)


def test_differing_settings_names_trainer_keys():
    wanted = {"lr": 2e-5, "max_grad_norm": 1.0, "clip_high": 0.28, "temperature": 0.7, "model": "/a", "seed": 3}
    remote = {"lr": 1e-5, "max_grad_norm": 1.0, "clip_high": 0.2, "temperature": 1.0, "model": "/b", "seed": 3}
    assert differing_settings(wanted, remote) == [
        "learner.lr=2e-05 (the remote learner uses 1e-05)", "algo.clip_high=0.28 (the remote learner uses 0.2)",
        "rollout.temperature=0.7 (the remote learner uses 1.0)"]


@pytest.fixture
def remote_learner(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    srv = start_server(build_learner({"learner": {"model": model, "device": "cpu", "lr": 1e-5}}), ServerConfig())
    yield srv, model
    srv.stop(0)


def test_remote_learner_settings_are_warned(remote_learner, tmp_path):
    from transformers import AutoTokenizer

    from covrl.client import LearnerClient

    srv, model = remote_learner
    cfg = load_config(None, ["learner.lr=2e-5", f"model.path={model}"])
    said = []
    with LearnerClient(srv.address) as lc:
        wanted = service_configs(cfg, model, str(tmp_path))["learner"]["learner"]
        out = check_remote_learner(cfg, lc, wanted, AutoTokenizer.from_pretrained(model), said.append)
    assert out == said and len(said) == 1
    assert f"the learner at {srv.address} runs with its own config" in said[0]
    assert "learner.lr=2e-05 (the remote learner uses 1e-05)" in said[0]


def test_measure_entropy_change_reaches_a_local_learner(tmp_path):
    """learner.measure_entropy_change (the same-batch dH forward) is the trainer's to switch off."""
    for value in (True, False):
        cfg = load_config(None, [f"learner.measure_entropy_change={str(value).lower()}"])
        learner = service_configs(cfg, "/m", str(tmp_path))["learner"]["learner"]
        assert learner["measure_entropy_change"] is value
    assert differing_settings({"measure_entropy_change": False}, {"measure_entropy_change": True}) == [
        "learner.measure_entropy_change=False (the remote learner uses True)"]
