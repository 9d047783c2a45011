"""Rollout engine on vLLM (GPU). UNVERIFIED: vLLM cannot be installed or run where covrl was
built (no GPU); this follows vLLM's documented offline API and is covered by tests that skip
without vllm.

- Sampling: ``vllm.LLM.generate`` with ``logprobs=0`` (the log-prob of each sampled token)
  and ``logprobs_mode="processed_logprobs"``, so the log-probs are those of the distribution
  actually sampled from (after temperature / top-k / top-p), like the transformers engine.
  vLLM versions without ``logprobs_mode`` return raw log-probs (before temperature): the
  engine refuses to start on them unless ``allow_raw_logprobs=True``.
- Weights: ``LLM.collective_rpc`` runs ``model.load_weights`` on every worker with HF-named
  tensors (vLLM maps them onto its fused layers), under the same lock generation takes, then
  resets the prefix cache so no KV computed by the old weights is reused.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping

import torch

from covrl.engines.base import PromptResult, Sample, SamplingParams, StaleWeightVersion


def _load_weights_on_worker(worker, weights):
    """Runs inside each vLLM worker (via collective_rpc): load HF-named tensors into the model."""
    model = worker.model_runner.model
    device = next(model.parameters()).device
    model.load_weights(weights=[(name, t.to(device)) for name, t in weights])
    return True


class VLLMEngine:
    """vLLM-backed engine. ``model_path``: HF directory or name; extra ``llm_kwargs`` go to ``vllm.LLM``."""

    name = "vllm"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str = "bfloat16",
        max_batch_size: int = 256,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        allow_raw_logprobs: bool = False,
        llm_kwargs: dict | None = None,
        model_name: str | None = None,
        **_ignored,
    ):
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                "engine.kind=vllm needs vLLM on a GPU host: pip install 'covrl[vllm]' (or use kind=transformers)"
            ) from e
        from transformers import AutoConfig, AutoModelForCausalLM

        self._vllm = vllm
        self.model_name = model_name or os.fspath(model_path)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        kwargs = dict(
            model=os.fspath(model_path), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_batch_size, **(llm_kwargs or {}),
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.processed_logprobs = True
        try:
            self.llm = vllm.LLM(logprobs_mode="processed_logprobs", **kwargs)
        except TypeError:  # vLLM without logprobs_mode
            if not allow_raw_logprobs:
                raise RuntimeError(
                    "engine: this vLLM has no logprobs_mode='processed_logprobs'; its log-probs would be raw "
                    "(before temperature). Upgrade vLLM or set allow_raw_logprobs: true"
                ) from None
            self.llm = vllm.LLM(**kwargs)
            self.processed_logprobs = False
        self.tokenizer = self.llm.get_tokenizer()
        hf_config = AutoConfig.from_pretrained(os.fspath(model_path))
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(hf_config)
        self._specs = {n: (DTYPE[dtype], tuple(p.shape)) for n, p in meta.named_parameters(remove_duplicate=False)}
        self._vocab_size = int(hf_config.vocab_size)
        self._max_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._lock = threading.Lock()
        self._version = 0

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def info(self) -> dict:
        return {
            "model": self.model_name, "weight_version": self._version, "engine": self.name, "device": "cuda",
            "dtype": self.dtype, "vocab_size": self._vocab_size, "max_model_len_tokens": self._max_len,
        }

    def parameter_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return dict(self._specs)

    def update_weights(self, tensors: Mapping[str, torch.Tensor], version: int = 0) -> int:
        for name, t in tensors.items():
            spec = self._specs.get(name)
            if spec is None:
                raise ValueError(f"tensors[{name!r}]: not a parameter of the model")
            if tuple(t.shape) != spec[1]:
                raise ValueError(f"tensors[{name!r}].shape: expected {list(spec[1])}, got {list(t.shape)}")
        weights = [(n, t.to(DTYPE[self.dtype])) for n, t in tensors.items()]
        with self._lock:
            new = self._version + 1 if version == 0 else int(version)
            if new <= self._version:
                raise StaleWeightVersion(f"weight_version: {new} is not newer than the current {self._version}")
            self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
            self.llm.reset_prefix_cache()
            self._version = new
            return new

    def _sampling(self, params: SamplingParams, seed: int | None):
        return self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None, stop_token_ids=list(params.stop_token_ids) or None,
            include_stop_str_in_output=True, seed=seed, logprobs=0,
        )

    def generate_iter(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[PromptResult]:
        params.validate()
        per_batch = max(1, self.max_batch_size // params.n)
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start : start + per_batch]
            # One seed per prompt (seed + index) so prompts do not share a random stream.
            sps = [self._sampling(params, None if params.seed is None else params.seed + start + j)
                   for j in range(len(chunk))]
            with self._lock:
                version = self._version
                outs = self.llm.generate([{"prompt_token_ids": p} for p in chunk], sps, use_tqdm=False)
            for j, out in enumerate(outs):
                samples = []
                for o in out.outputs:
                    ids = list(o.token_ids)
                    lps = [float(step[tok].logprob) for step, tok in zip(o.logprobs or [], ids, strict=True)]
                    reason = "length" if o.finish_reason == "length" else "stop"
                    samples.append(Sample(token_ids=ids, logprobs=lps, finish_reason=reason, text=o.text))
                yield PromptResult(prompt_index=start + j, prompt_token_ids=list(chunk[j]), samples=samples,
                                   weight_version=version)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[PromptResult]:
        return list(self.generate_iter(prompts, params))


DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
