"""VLLMEngine: a clear error without vLLM; on a GPU host with vLLM, log-prob parity and weight swap."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_without_vllm_the_error_says_how_to_get_it():
    from covrl.engines import make_engine

    with pytest.raises(ImportError, match="covrl\\[vllm\\]"):
        make_engine({"kind": "vllm", "model_path": "/nonexistent"})


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vllm and a CUDA device")
def test_vllm_logprobs_match_hf_and_weights_swap(tmp_path):
    from transformers import AutoModelForCausalLM

    from covrl.engines import SamplingParams, make_engine
    from covrl.models import save_tiny_model, tiny_causal_lm

    path = save_tiny_model(tmp_path / "m", seed=0)
    eng = make_engine({"kind": "vllm", "model_path": path, "dtype": "float32", "gpu_memory_utilization": 0.2,
                       "llm_kwargs": {"enforce_eager": True}})
    hf = AutoModelForCausalLM.from_pretrained(path).cuda()
    prompt = [10, 11, 12]
    r = eng.generate([prompt], SamplingParams(n=2, temperature=0.7, max_new_tokens=16, seed=0))[0]
    for s in r.samples:
        ids = torch.tensor([prompt + s.token_ids], device="cuda")
        with torch.no_grad():
            logits = hf(ids).logits[0, len(prompt) - 1 : -1].float()
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(s.token_ids, device="cuda")[:, None])
        torch.testing.assert_close(torch.tensor(s.logprobs), want.squeeze(-1).cpu(), atol=2e-3, rtol=0)
    new = tiny_causal_lm(seed=5).state_dict()
    assert eng.update_weights(new, 0) == 1
    r2 = eng.generate([prompt], SamplingParams(n=1, temperature=0.7, max_new_tokens=16, seed=0))[0]
    assert r2.weight_version == 1
    assert r2.samples[0].token_ids != r.samples[0].token_ids or r2.samples[0].logprobs != r.samples[0].logprobs
