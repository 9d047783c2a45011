"""Short fuzz of every RPC of the three servers through reflection (the full run: benchmarks/bench_fuzz.py).

About 1,000 random, mutated and garbled requests, spread evenly over every method the servers
list (covrl's three services and the health service), against real servers with tiny models
on 127.0.0.1:0, from a working directory that must stay empty. Goals (issue 13): no UNKNOWN /
INTERNAL answer, no crash, every INVALID_ARGUMENT names a request field, nothing written
outside the learner's checkpoint_dir.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from covrl.services import fuzz
from covrl.services.fuzz_targets import fuzz_session

COVRL_RPCS = {f"/covrl.v1.RolloutService/{m}" for m in ("Generate", "GenerateStream", "UpdateWeights", "GetInfo")} | {
    "/covrl.v1.RewardService/Score"} | {
    f"/covrl.v1.LearnerService/{m}" for m in ("SubmitRollouts", "Train", "GetWeights", "RegisterRolloutServer",
                                            "Checkpoint", "GetMetrics", "GetInfo")}

torch.set_num_threads(1)


def test_names_its_field():
    from covrl._proto.v1 import rollout_pb2

    d = rollout_pb2.GenerateRequest.DESCRIPTOR
    assert fuzz.names_its_field("prompts[2].token_ids.ids: ids must be in [0, 5)", d)
    assert fuzz.names_its_field("sampling.n: too many", d)
    assert fuzz.names_its_field("GenerateRequest: not a valid message", d)
    assert not fuzz.names_its_field("ids must be in [0, 5)", d)
    assert not fuzz.names_its_field("prompt.tokens: no such field", d)
    assert not fuzz.names_its_field("", d)


@pytest.mark.slow
def test_fuzz_every_rpc_short(tmp_path):
    res = fuzz_session(str(tmp_path), n_requests=1000, seed=13)
    rep = res.report
    assert rep.requests == 1000
    assert COVRL_RPCS <= set(rep.counts), sorted(rep.counts)
    assert not rep.violations, rep.violations[:10]
    assert res.fs_changes == [] and res.bad_checkpoints == []
    assert set(res.health.values()) == {"SERVING"}, res.health
    codes = rep.codes()
    assert codes[grpc.StatusCode.UNKNOWN.name] == codes[grpc.StatusCode.INTERNAL.name] == 0
    # The requests reach past the first checks: every covrl RPC both accepted and rejected some.
    for path in COVRL_RPCS - {"/covrl.v1.LearnerService/GetMetrics"}:  # GetMetrics streams until the deadline
        assert rep.counts[path]["OK"] > 0 and sum(rep.counts[path].values()) > rep.counts[path]["OK"], \
            (path, dict(rep.counts[path]))
    assert set(rep.kinds) == {"random", "mutated", "garbled", "empty", "valid"}


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_regressions_found_by_the_fuzz():
    """Bugs the 10,000-request run (seed 1) found, each once INTERNAL."""
    from covrl._proto.v1 import reward_pb2, rollout_pb2
    from covrl.services.common import InvalidArgument
    from covrl.services.reward import RewardLimits, parse_score_request
    from covrl.services.rollout import parse_sampling

    deep = reward_pb2.RewardItem(task="math", metadata_json="[" * 100000)
    with pytest.raises(InvalidArgument) as e:
        parse_score_request(reward_pb2.ScoreRequest(items=[deep]), RewardLimits())
    assert e.value.field == "items[0].metadata_json"
    with pytest.raises(InvalidArgument) as e:  # logits / 1e-45 is inf: the sampler failed
        parse_sampling(rollout_pb2.SamplingParams(temperature=1e-45, max_new_tokens=4))
    assert e.value.field == "sampling.temperature"
    assert parse_sampling(rollout_pb2.SamplingParams(temperature=1e-3, max_new_tokens=4)).temperature > 0
