"""WeightRelay and RolloutFleet.publish_relayed: the learner's weight stream forwarded to rollout servers."""

from __future__ import annotations

import itertools
import threading
import time

import grpc
import pytest
import torch

from covrl._proto.v1 import learner_pb2_grpc, rollout_pb2
from covrl.client import LearnerClient, RolloutClient
from covrl.client.channel import ClientError
from covrl.engines.transformers_engine import TransformersEngine
from covrl.learner import LearnerConfig, LearnerCore
from covrl.models import char_tokenizer, tiny_causal_lm
from covrl.services.common import ServerConfig, ServiceBinding, start_server
from covrl.services.learner import LearnerServicer
from covrl.services.rollout import RolloutServicer, rollout_binding
from covrl.services.tensors import iter_encoded_chunks
from covrl.trainer.fleet import RolloutFleet, Server
from covrl.trainer.relay import RelayAborted, WeightRelay

torch.set_num_threads(1)


def encoded(version=4, n=3):
    tensors = {f"t{i}": torch.arange(6, dtype=torch.float32) + i for i in range(n)}
    return list(iter_encoded_chunks(tensors, version, chunk_bytes=8))  # several chunks per tensor


def test_every_reader_gets_the_whole_stream_whenever_it_starts():
    chunks, relay, seen = encoded(), WeightRelay(), []
    early = []
    t = threading.Thread(target=lambda: early.extend(relay.reader()))
    t.start()  # waits for chunks
    assert relay.feed(iter(chunks), seen.append) == 4
    t.join(10)
    assert seen == [4] and early == chunks and list(relay.reader()) == chunks  # a late reader starts at 0


@pytest.mark.parametrize("cut", ["error", "no last chunk", "empty"])
def test_a_broken_learner_stream_aborts_the_readers_before_the_last_chunk(cut):
    chunks, relay = encoded(), WeightRelay()

    def source():
        yield from ([] if cut == "empty" else chunks[:-1])
        if cut == "error":
            raise ClientError("GetWeights", grpc.StatusCode.UNAVAILABLE, "learner gone")

    got = []

    def read():
        with pytest.raises(RelayAborted, match="weight stream from the learner failed"):
            for raw in relay.reader():
                got.append(raw)

    t = threading.Thread(target=read)
    t.start()
    with pytest.raises((ClientError, RuntimeError)):
        relay.feed(source(), lambda v: None)
    t.join(10)
    assert relay.failed and not t.is_alive()
    assert all(not rollout_pb2.TensorChunk.FromString(r).last for r in got) and len(got) < len(chunks)


# ---------------------------------------------------------------------------- real servers


@pytest.fixture
def services():
    tok = char_tokenizer()
    engines = [TransformersEngine(tiny_causal_lm(len(tok), seed=0), tok) for _ in range(2)]
    rollouts = [start_server([rollout_binding(RolloutServicer(e))], ServerConfig(max_message_bytes=1 << 20))
                for e in engines]
    core = LearnerCore(LearnerConfig(lr=1e-3), model=tiny_causal_lm(len(tok), seed=7))
    core.weight_version = 3
    learner = start_server([ServiceBinding("covrl.v1.LearnerService", LearnerServicer({}, core=core),
                                           learner_pb2_grpc.add_LearnerServiceServicer_to_server)])
    clients = [RolloutClient(s.address, timeout_s=30, max_attempts=1) for s in rollouts]
    fleet = RolloutFleet([Server(i, c, healthy=True, reason="") for i, c in enumerate(clients)],
                         admit=lambda s, v: v, grace_s=1.0, report=lambda line: None)
    fleet.set_target(0)
    lc = LearnerClient(learner.address, timeout_s=30)
    yield fleet, lc, engines, rollouts, core
    fleet.close()
    lc.close()
    for s in [*rollouts, learner]:
        s.stop(0)


def test_relayed_publish_gives_every_server_the_learners_weights(services):
    fleet, lc, engines, _, core = services
    assert fleet.publish_relayed(WeightRelay(), lc.stream_weights(chunk_bytes=4096), timeout_s=30,
                                 probe_timeout_s=5) == 3
    want = dict(core.policy.named_parameters())
    for e in engines:
        assert e.weight_version == 3
        for name, p in e.model.named_parameters():
            assert torch.equal(p, want[name]), name
    assert len(fleet.healthy) == 2 and fleet.target_version == 3


def test_a_learner_failure_mid_stream_marks_no_server_down_and_keeps_the_target(services):
    fleet, lc, engines, _, _ = services
    before = {n: p.clone() for n, p in engines[0].model.named_parameters()}

    def cut():
        yield from itertools.islice(lc.stream_weights(chunk_bytes=4096), 5)
        raise ClientError("GetWeights", grpc.StatusCode.UNAVAILABLE, "learner gone")

    with pytest.raises(ClientError, match="learner gone"):
        fleet.publish_relayed(WeightRelay(), cut(), timeout_s=30, probe_timeout_s=5)
    assert len(fleet.healthy) == 2 and fleet.target_version == 0
    assert all(e.weight_version == 0 for e in engines)
    assert all(torch.equal(p, before[n]) for n, p in engines[0].model.named_parameters())


def test_a_server_that_is_gone_is_marked_down_and_the_other_still_updates(services):
    fleet, lc, engines, rollouts, _ = services
    rollouts[1].stop(0)
    fleet.publish_relayed(WeightRelay(), lc.stream_weights(chunk_bytes=4096), timeout_s=30, probe_timeout_s=5)
    assert [s.index for s in fleet.healthy] == [0] and engines[0].weight_version == 3
    assert "weight push of version 3 failed" in fleet.servers[1].reason


# ------------------------------------------------------------- calls that outlive their deadline


class Stuck:
    """A rollout client whose pushes and generates do not return, deadline or not, until
    ``release`` is set; then they fail late. GetInfo goes to the real server."""

    max_attempts, max_backoff_s = 1, 0.0

    def __init__(self, inner):
        self.inner, self.address, self.release, self.entered = inner, inner.address, threading.Event(), 0

    def _hang(self, name):
        self.entered += 1
        self.release.wait(60)
        raise ClientError(name, grpc.StatusCode.DEADLINE_EXCEEDED, "returned long after its deadline")

    def update_weights_encoded(self, chunks, *, timeout_s=None):
        self._hang("UpdateWeights")

    def generate(self, prompts, sampling=None, *, prompt_ids=None, timeout_s=None):
        self._hang("Generate")

    def get_info(self, *a, **kw):
        return self.inner.get_info(*a, **kw)

    def close(self):
        self.release.set()
        self.inner.close()


@pytest.fixture
def stuck(services, monkeypatch):
    """``services`` with server 1's client replaced by :class:`Stuck`; budgets without slack."""
    import covrl.trainer.fleet as fleet_mod

    monkeypatch.setattr(fleet_mod, "BUDGET_SLACK_S", 0.5)
    fleet = services[0]
    client = fleet.servers[1].client = Stuck(fleet.servers[1].client)
    yield (*services, client)
    client.release.set()


def test_a_push_that_outlives_its_deadlines_marks_the_server_down_without_stalling_the_publish(stuck):
    fleet, lc, engines, _, _, client = stuck
    t0 = time.monotonic()
    assert fleet.publish_relayed(WeightRelay(), lc.stream_weights(chunk_bytes=4096), timeout_s=1,
                                 probe_timeout_s=1) == 3
    took = time.monotonic() - t0
    assert client.entered == 1 and 2.0 <= took < 20, took  # budget 1 + 1 + 0.5 s, not the 60 s the call hangs
    assert [s.index for s in fleet.healthy] == [0] and engines[0].weight_version == 3
    assert "did not return within its deadlines (2s)" in fleet.servers[1].reason


def test_the_late_failure_of_a_left_behind_push_does_not_take_down_the_readmitted_server(stuck):
    fleet, lc, _, _, _, client = stuck
    fleet.publish_relayed(WeightRelay(), lc.stream_weights(chunk_bytes=4096), timeout_s=1, probe_timeout_s=1)
    srv = fleet.servers[1]
    assert not srv.healthy
    fleet._admit = lambda s, target: target  # it comes back at the fleet's version
    fleet._admit_one(srv)
    assert srv.healthy
    client.release.set()  # the left-behind push now fails, long after its deadline
    time.sleep(0.5)
    assert srv.healthy and len(fleet.healthy) == 2, srv.reason


def test_a_generate_that_outlives_its_deadlines_is_resent_to_a_healthy_server(stuck):
    from covrl.client import SamplingParams

    fleet, _, _, _, _, client = stuck
    t0 = time.monotonic()
    out = fleet.generate([[5, 6, 7], [8, 9, 10]], lambda si: SamplingParams(n=2, max_new_tokens=3, seed=si),
                         timeout_s=1)
    assert time.monotonic() - t0 < 20  # budget 1 + 0.5 s, not the 60 s the call hangs
    assert client.entered == 1 and fleet.resent_shards == 1
    assert sorted(i for idx, _ in out for i in idx) == [0, 1] and all(len(r) == 1 for _, r in out)
    assert "did not return within its deadlines" in fleet.servers[1].reason and len(fleet.healthy) == 1
