"""Fixtures: real servers on 127.0.0.1:0 (never a fixed port), stopped after each test."""

from __future__ import annotations

import os

import pytest
import torch
from svc_fakes import FakeVerifier

from covrl.engines.transformers_engine import TransformersEngine
from covrl.models import char_tokenizer, tiny_causal_lm
from covrl.services.common import ServerConfig, start_server
from covrl.services.reward import RewardServicer, reward_binding
from covrl.services.rollout import RolloutServicer, rollout_binding

# Tiny models: one thread is fastest and fair to the other processes on a small CI box.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _restore_environment():
    """The environment as it was before the module: vLLM sets LD_PRELOAD, LOCAL_WORLD_SIZE,
    VLLM_WORKER_MULTIPROC_METHOD and more in the process that creates an engine, and the
    services that later tests start as subprocesses must not inherit them."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def engine(tokenizer):
    return TransformersEngine(tiny_causal_lm(len(tokenizer), seed=0), tokenizer, max_batch_size=8)


@pytest.fixture
def rollout_server(engine):
    srv = start_server([rollout_binding(RolloutServicer(engine))], ServerConfig(max_message_bytes=1 * 2**20))
    yield srv
    srv.stop(0)


@pytest.fixture
def reward_server():
    srv = start_server([reward_binding(RewardServicer(FakeVerifier()))], ServerConfig(max_message_bytes=64 * 1024))
    yield srv
    srv.stop(0)
