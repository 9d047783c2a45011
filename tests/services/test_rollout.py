"""Rollout engine (plain functions) and the rollout service over real gRPC on 127.0.0.1:0."""

from __future__ import annotations

import grpc
import pytest
import torch
from sampling_check import assert_samples_follow_the_processed_distribution

from covrl.client import ClientError, RolloutClient
from covrl.engines.base import SamplingParams, processed_logprobs
from covrl.engines.transformers_engine import TransformersEngine
from covrl.models import tiny_causal_lm


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _learner_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [T, V]
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------- engine


def test_logprobs_match_a_learner_forward_pass_fp32(engine, tokenizer):
    prompts = [_ids(tokenizer, "hello world"), _ids(tokenizer, "a"), _ids(tokenizer, "12+7=")]  # left padded
    for temperature in (1.0, 0.6):
        results = engine.generate(prompts, SamplingParams(n=3, temperature=temperature, max_new_tokens=24, seed=1))
        for r in results:
            for s in r.samples:
                assert len(s.token_ids) == len(s.logprobs) > 0
                want = _learner_logprobs(engine.model, r.prompt_token_ids, s.token_ids, temperature)
                torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine, tokenizer):
    prompts = [_ids(tokenizer, "abc"), _ids(tokenizer, "xy")]
    p = SamplingParams(n=2, max_new_tokens=16, seed=7)
    a = engine.generate(prompts, p)
    b = engine.generate(prompts, p)
    c = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=16, seed=8))
    toks = lambda rs: [s.token_ids for r in rs for s in r.samples]  # noqa: E731
    assert toks(a) == toks(b)
    assert toks(a) != toks(c)


def test_top_k_top_p_logprobs_are_of_the_processed_distribution():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    lp = processed_logprobs(logits, temperature=0.8, top_k=5)
    assert (torch.isfinite(lp).sum(-1) == 5).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4))
    lp = processed_logprobs(logits, temperature=1.0, top_p=0.5)
    kept = torch.isfinite(lp)
    probs = torch.softmax(logits, -1)
    assert (probs[kept].sum() / 4) >= 0.5 - 1e-6  # at least top_p mass kept per row (on average)
    for row in range(4):  # kept tokens are exactly the most likely ones
        assert probs[row][kept[row]].min() >= probs[row][~kept[row]].max()
    torch.testing.assert_close(processed_logprobs(logits, 0.7), torch.log_softmax(logits / 0.7, -1))


def test_sampling_respects_top_k(engine, tokenizer):
    r = engine.generate([_ids(tokenizer, "q")], SamplingParams(n=4, top_k=1, max_new_tokens=8, seed=3))[0]
    assert len({tuple(s.token_ids) for s in r.samples}) == 1  # top_k=1 is greedy
    assert all(abs(x) < 1e-6 for s in r.samples for x in s.logprobs)  # log 1 under the processed distribution


def test_samples_follow_the_distribution_their_logprobs_describe(tokenizer):
    model = tiny_causal_lm(len(tokenizer), seed=0)
    with torch.no_grad():  # a peaked next-token distribution, so temperatures are told apart
        model.lm_head.weight.mul_(15)
    engine = TransformersEngine(model, tokenizer, max_batch_size=64)
    assert_samples_follow_the_processed_distribution(engine, model, _ids(tokenizer, "12+7="))


def test_stop_tokens_and_stop_strings_end_samples(engine, tokenizer):
    prompt = _ids(tokenizer, "go")
    free = engine.generate([prompt], SamplingParams(max_new_tokens=20, seed=5))[0].samples[0]
    stop_id = free.token_ids[3]
    s = engine.generate([prompt], SamplingParams(max_new_tokens=20, seed=5, stop_token_ids=(stop_id,)))[0].samples[0]
    assert s.finish_reason == "stop" and s.token_ids[-1] == stop_id and len(s.token_ids) <= 4
    stop = tokenizer.decode(free.token_ids[4:6])
    s = engine.generate([prompt], SamplingParams(max_new_tokens=20, seed=5, stop=(stop,)))[0].samples[0]
    assert s.finish_reason == "stop" and stop in s.text and len(s.token_ids) <= 6
    assert free.finish_reason in ("length", "stop")


def test_engine_weight_update_is_validated_and_versions_increase(engine, tokenizer):
    new = tiny_causal_lm(len(tokenizer), seed=9).state_dict()
    assert engine.update_weights(new, 0) == 1
    assert engine.update_weights(new, 5) == 5
    with pytest.raises(ValueError, match="not newer"):
        engine.update_weights(new, 5)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights({"model.norm.weight": torch.ones(3)}, 6)
    other = tiny_causal_lm(len(tokenizer), seed=10).state_dict()
    bad = {**other, "model.norm.weight": torch.full_like(new["model.norm.weight"], float("inf"))}
    with pytest.raises(ValueError, match=r"tensors\['model.norm.weight'\]: contains NaN or inf"):
        engine.update_weights(bad, 6)  # checked before anything is copied
    assert engine.weight_version == 5
    assert torch.equal(engine.model.get_parameter("model.layers.0.mlp.up_proj.weight"),
                       new["model.layers.0.mlp.up_proj.weight"])


# ----------------------------------------------------------------------------- service


@pytest.fixture
def client(rollout_server):
    with RolloutClient(rollout_server.address, timeout_s=30, max_attempts=2) as c:
        yield c


def test_generate_token_text_and_chat_prompts(client, engine, tokenizer):
    prompts = [_ids(tokenizer, "12+"), "2+2=", [{"role": "user", "content": "hi"}]]
    res = client.generate(prompts, SamplingParams(n=2, max_new_tokens=6, seed=0), prompt_ids=["a", "b", "c"])
    assert [r.prompt_index for r in res] == [0, 1, 2] and [r.prompt_id for r in res] == ["a", "b", "c"]
    assert res[1].prompt_token_ids == _ids(tokenizer, "2+2=")
    assert res[2].prompt_token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    for r in res:
        assert r.weight_version == 0 and len(r.samples) == 2
        for s in r.samples:
            assert len(s.token_ids) == len(s.logprobs) and s.finish_reason in ("stop", "length")
    # same engine in-process gives the same samples for the same seed
    local = engine.generate([r.prompt_token_ids for r in res], SamplingParams(n=2, max_new_tokens=6, seed=0))
    assert [s.token_ids for r in local for s in r.samples] == [s.token_ids for r in res for s in r.samples]


def test_generate_stream_yields_every_prompt(client, tokenizer):
    got = list(client.generate_stream([_ids(tokenizer, t) for t in "abcdefghij"], SamplingParams(max_new_tokens=3)))
    assert sorted(r.prompt_index for r in got) == list(range(10))


def test_update_weights_swaps_atomically_and_changes_logprobs(client, engine, tokenizer):
    prompt = _ids(tokenizer, "fixed")
    completion = _ids(tokenizer, " completion")
    before = _learner_logprobs(engine.model, prompt, completion, 1.0)
    new = tiny_causal_lm(len(tokenizer), seed=4).state_dict()
    out = client.update_weights(new, version=3, chunk_bytes=5000)  # many chunks per tensor
    assert out.weight_version == 3 and out.num_tensors == len(new)
    assert client.get_info().weight_version == 3
    after = _learner_logprobs(engine.model, prompt, completion, 1.0)
    want = _learner_logprobs(tiny_causal_lm(len(tokenizer), seed=4), prompt, completion, 1.0)
    torch.testing.assert_close(after, want)
    assert not torch.allclose(before, after)
    res = client.generate([prompt], SamplingParams(max_new_tokens=3))
    assert res[0].weight_version == 3
    # bf16 on the wire into an fp32 model: accepted and cast
    assert client.update_weights(new, dtype=torch.bfloat16).weight_version == 4


def _state(engine):
    return {k: v.clone() for k, v in engine.model.state_dict().items()}


def _assert_unchanged(client, engine, before, version=0):
    assert client.get_info().weight_version == version  # and the server keeps serving
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_broken_update_stream_keeps_old_weights(client, engine, tokenizer):
    before = _state(engine)
    new = tiny_causal_lm(len(tokenizer), seed=4).state_dict()

    def dies_midway():
        for i, (k, v) in enumerate(new.items()):
            if i == len(new) // 2:
                raise RuntimeError("learner crashed")
            yield k, v

    with pytest.raises(ClientError) as e:
        client.update_weights(dies_midway())
    assert e.value.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    _assert_unchanged(client, engine, before)


@pytest.mark.parametrize(
    "tensors, version, code, needle",
    [
        ({}, 0, grpc.StatusCode.INVALID_ARGUMENT, "no tensors"),
        ({"model.norm.weight": torch.full((64,), float("nan"))}, 0, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        ({"model.norm.weight": torch.ones(65)}, 0, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        ({"model.nope": torch.ones(64)}, 0, grpc.StatusCode.INVALID_ARGUMENT, "model.nope"),
        ({"model.norm.weight": torch.ones(64, dtype=torch.int64)}, 0, grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ],
)
def test_bad_weight_updates_are_rejected(client, engine, tensors, version, code, needle):
    before = _state(engine)
    with pytest.raises(ClientError) as e:
        client.update_weights(tensors, version=version)
    assert e.value.code == code and needle in e.value.details
    _assert_unchanged(client, engine, before)


def test_raw_bad_chunks_are_rejected(rollout_server, engine):
    from covrl._proto.v1 import rollout_pb2, rollout_pb2_grpc

    stub = rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(rollout_server.address))
    before = _state(engine)
    good = torch.ones(64).numpy().tobytes()
    cases = {
        "dtype": [rollout_pb2.TensorChunk(name="model.norm.weight", dtype="float33", shape=[64], data=good)],
        "incomplete": [rollout_pb2.TensorChunk(name="model.norm.weight", dtype="float32", shape=[64], data=good[:100],
                                               last=True)],
        "last": [rollout_pb2.TensorChunk(name="model.norm.weight", dtype="float32", shape=[64], data=good)],  # cut short
        "after the one marked last": [
            rollout_pb2.TensorChunk(name="model.norm.weight", dtype="float32", shape=[64], data=good[:128], last=True),
            rollout_pb2.TensorChunk(name="model.norm.weight", dtype="float32", shape=[64], offset_bytes=128,
                                    data=good[128:], last=True),
        ],
        "offset_bytes": [
            rollout_pb2.TensorChunk(name="model.norm.weight", dtype="float32", shape=[64], data=good[:128]),
            rollout_pb2.TensorChunk(name="model.norm.weight", dtype="float32", shape=[64], offset_bytes=64,
                                    data=good[128:]),
        ],
        "weight_version": [
            rollout_pb2.TensorChunk(name="model.norm.weight", dtype="float32", shape=[64], data=good[:128],
                                    weight_version=2),
            rollout_pb2.TensorChunk(name="model.norm.weight", dtype="float32", shape=[64], offset_bytes=128,
                                    data=good[128:], weight_version=3),
        ],
    }
    for needle, chunks in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            stub.UpdateWeights(iter(chunks), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
        assert needle in e.value.details(), (needle, e.value.details())
    client = RolloutClient(rollout_server.address)
    _assert_unchanged(client, engine, before)
    assert client.update_weights({"model.norm.weight": torch.ones(64)}, version=2).weight_version == 2
    with pytest.raises(ClientError) as e:  # versions only increase
        client.update_weights({"model.norm.weight": torch.ones(64)}, version=2)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    "prompts, sampling, code, field",
    [
        ([], SamplingParams(max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompts"),
        ([[]], SamplingParams(max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompts[0]"),
        ([[5, 100000]], SamplingParams(max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompts[0].token_ids"),
        ([[5], [-1]], SamplingParams(max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompts[1].token_ids"),
        ([""], SamplingParams(max_new_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompts[0].text"),
        ([[5]], SamplingParams(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_new_tokens"),
        ([[5]], SamplingParams(max_new_tokens=4, temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT,
         "sampling.temperature"),
        ([[5]], SamplingParams(max_new_tokens=4, temperature=0.0), grpc.StatusCode.INVALID_ARGUMENT,
         "sampling.temperature"),
        ([[5]], SamplingParams(max_new_tokens=4, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
        ([[5]], SamplingParams(max_new_tokens=4, top_k=-2), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_k"),
        ([[5]], SamplingParams(max_new_tokens=4, stop=("",)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop"),
        ([[5]], SamplingParams(max_new_tokens=4, stop_token_ids=(10**6,)), grpc.StatusCode.INVALID_ARGUMENT,
         "sampling.stop_token_ids"),
        ([[5] * 500], SamplingParams(max_new_tokens=100), grpc.StatusCode.INVALID_ARGUMENT, "prompts[0]"),
        (["a" * 1_200_000], SamplingParams(max_new_tokens=1), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),  # > 1 MiB
    ],
)
def test_bad_generate_requests_get_status_and_server_keeps_serving(client, prompts, sampling, code, field):
    for call in (client.generate, lambda *a: list(client.generate_stream(*a))):
        with pytest.raises(ClientError) as e:
            call(prompts, sampling)
        assert e.value.code == code, e.value
        assert field in e.value.details
    assert client.generate([[5, 6]], SamplingParams(max_new_tokens=2))[0].samples


def test_prompt_without_input_and_missing_sampling(rollout_server):
    from covrl._proto.v1 import rollout_pb2, rollout_pb2_grpc

    stub = rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(rollout_server.address))
    for req, field in [
        (rollout_pb2.GenerateRequest(prompts=[rollout_pb2.Prompt()], sampling=rollout_pb2.SamplingParams(max_new_tokens=2)),
         "prompts[0]"),
        (rollout_pb2.GenerateRequest(prompts=[rollout_pb2.Prompt(text="a")]), "sampling"),
        (rollout_pb2.GenerateRequest(prompts=[rollout_pb2.Prompt(chat=rollout_pb2.ChatMessages())],
                                     sampling=rollout_pb2.SamplingParams(max_new_tokens=2)), "prompts[0].chat.messages"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)


def test_get_info_lists_parameters(client, engine):
    info = client.get_info(include_parameters=True)
    assert info.engine == "transformers" and info.vocab_size == engine.vocab_size and info.dtype == "float32"
    assert info.parameters["model.norm.weight"] == ("float32", (64,))


def test_a_service_closes_only_the_engine_it_built(engine, monkeypatch):
    """Server stop closes an engine built from the service's config (vLLM: its engine process and
    /dev/shm weight file); a caller's engine is left alone."""
    from covrl.services import rollout as R

    class Closable:
        def __init__(self, inner):
            self.inner, self.closed = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def close(self):
            self.closed += 1

    shared = Closable(engine)
    R.RolloutServicer(shared).close()
    assert shared.closed == 0
    built = Closable(engine)
    monkeypatch.setattr("covrl.engines.make_engine", lambda cfg: built)
    (binding,) = R.build_rollout({"engine": {"kind": "transformers"}})
    binding.servicer.close()
    assert built.closed == 1
