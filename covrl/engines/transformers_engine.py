"""Rollout engine on a Hugging Face causal LM (CPU or GPU).

Sampling is covrl's own batched decode loop (left padding, KV cache) rather than
``model.generate``, so the log-prob returned for each sampled token is exactly the one of
the distribution it was drawn from (:func:`covrl.engines.base.processed_logprobs`). With
top_k=0 and top_p=1 it equals ``log_softmax(logits / T)`` of a plain forward pass over
prompt + completion, which is what the learner computes (the tests check 1e-4 in fp32).

Weights are swapped in place under the same lock generation holds, so a batch is always
sampled by one weight version, and versions only increase.

Generation is interruptible: ``generate_iter(..., should_stop=fn)`` calls ``fn()`` between
decode steps and raises :class:`GenerationCancelled` when it returns true (the rollout
server passes "the call was cancelled or the server is stopping", so a stop finishes
within its grace period even in the middle of a long batch).
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Iterator, Mapping

import torch

from covrl.engines.base import (
    PromptResult,
    Sample,
    SamplingParams,
    StaleWeightVersion,
    all_finite,
    processed_logprobs,
)


class GenerationCancelled(RuntimeError):
    """``should_stop()`` returned true between two decode steps: the batch was abandoned."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    """Batched sampling with a ``transformers`` causal LM.

    ``model`` / ``tokenizer``: objects, or give ``model_path`` to load both with
    ``from_pretrained``. ``max_batch_size`` bounds the rows (prompts x n) decoded together.
    """

    name = "transformers"

    def __init__(
        self,
        model=None,
        tokenizer=None,
        *,
        model_path: str | os.PathLike | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 64,
        attn_implementation: str | None = "sdpa",
        model_name: str | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"engine.dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        if max_batch_size < 1:
            raise ValueError(f"engine.max_batch_size: expected >= 1, got {max_batch_size}")
        if model is None:
            if model_path is None:
                raise ValueError("engine.model_path: give a model path (or a model object)")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            kwargs = {"dtype": DTYPES[dtype]}
            if attn_implementation:
                kwargs["attn_implementation"] = attn_implementation
            model = AutoModelForCausalLM.from_pretrained(os.fspath(model_path), **kwargs)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(os.fspath(model_path))
        if tokenizer is None:
            raise ValueError("tokenizer: required with a model object")
        self.model = model.to(device=device, dtype=DTYPES[dtype]).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.model_name = model_name or (os.fspath(model_path) if model_path else type(model).__name__)
        cfg = self.model.config
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = getattr(self.model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list | tuple) else ([eos] if eos is not None else []))
        self._vocab_size = int(cfg.vocab_size)
        self._max_len = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        self._lock = threading.Lock()
        self._version = 0
        # transformers >= 5.x names the KV cache argument `cache`, older ones `past_key_values`.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    # ------------------------------------------------------------------ info

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
            "model": self.model_name,
            "weight_version": self._version,
            "engine": self.name,
            "device": str(self.device),
            "dtype": self.dtype,
            "vocab_size": self._vocab_size,
            "max_model_len_tokens": self._max_len,
        }

    def parameter_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {n: (p.dtype, tuple(p.shape)) for n, p in self._params.items()}

    # ------------------------------------------------------------------ weights

    def update_weights(self, tensors: Mapping[str, torch.Tensor], version: int = 0) -> int:
        """Copy ``tensors`` into the model under the generation lock; return the new version."""
        for name, t in tensors.items():  # validate everything before touching the model
            p = self._params.get(name)
            if p is None:
                raise ValueError(f"tensors[{name!r}]: not a parameter of the model")
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"tensors[{name!r}].shape: expected {list(p.shape)}, got {list(t.shape)}")
            if t.is_floating_point() and not all_finite(t):
                raise ValueError(f"tensors[{name!r}]: contains NaN or inf")
        with self._lock:
            new = self._version + 1 if version == 0 else int(version)
            if new <= self._version:
                raise StaleWeightVersion(f"weight_version: {new} is not newer than the current {self._version}")
            with torch.no_grad():
                for name, t in tensors.items():
                    p = self._params[name]
                    p.copy_(t.to(device=p.device, dtype=p.dtype, non_blocking=True))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._version = new
            return new

    # ------------------------------------------------------------------ sampling

    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 should_stop: Callable[[], bool] | None = None) -> list[PromptResult]:
        return sorted(self.generate_iter(prompts, params, should_stop=should_stop), key=lambda r: r.prompt_index)

    def generate_iter(self, prompts: list[list[int]], params: SamplingParams, *,
                      should_stop: Callable[[], bool] | None = None) -> Iterator[PromptResult]:
        """Yield PromptResults in prompt order, one decode batch (<= max_batch_size rows) at a time.

        ``should_stop()`` is checked between decode steps; when true, :class:`GenerationCancelled`.
        """
        params.validate()
        gen = torch.Generator(device=self.device)
        if params.seed is not None:
            gen.manual_seed(int(params.seed))
        else:
            gen.seed()
        per_batch = max(1, self.max_batch_size // params.n)
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start : start + per_batch]
            rows = [p for p in chunk for _ in range(params.n)]
            with self._lock:
                version = self._version
                samples = self._decode(rows, params, gen, should_stop)
            for j, prompt in enumerate(chunk):
                yield PromptResult(
                    prompt_index=start + j,
                    prompt_token_ids=list(prompt),
                    samples=samples[j * params.n : (j + 1) * params.n],
                    weight_version=version,
                )

    @staticmethod
    def _cache_of(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    @torch.no_grad()
    def _decode(self, rows: list[list[int]], params: SamplingParams, gen: torch.Generator,
                should_stop: Callable[[], bool] | None = None) -> list[Sample]:
        B, L = len(rows), max(len(r) for r in rows)
        dev = self.device
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            input_ids[i, L - len(r) :] = torch.tensor(r, dtype=torch.long)
            attn[i, L - len(r) :] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, L]
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        past, logits = self._cache_of(out), out.logits[:, -1, :]  # [B, V]
        stop_ids = torch.tensor(sorted(self.eos_ids | set(params.stop_token_ids)), dtype=torch.long, device=dev)
        stop_tail = max((len(s) for s in params.stop), default=0) + 8

        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        finish = ["length"] * B
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        last_pos = pos[:, -1:]  # [B, 1]
        for step in range(params.max_new_tokens):
            if should_stop is not None and should_stop():
                raise GenerationCancelled(f"generation stopped after {step} of {params.max_new_tokens} decode steps")
            lp = processed_logprobs(logits, params.temperature, params.top_k, params.top_p)  # [B, V] fp32
            nxt = torch.multinomial(lp.exp(), 1, generator=gen)  # [B, 1]
            tok_lp = lp.gather(-1, nxt).squeeze(-1)  # [B]
            nxt = nxt.squeeze(-1)
            hit_stop = torch.isin(nxt, stop_ids) & ~done
            nxt_l, lp_l, active = nxt.tolist(), tok_lp.tolist(), (~done).tolist()
            for i in range(B):
                if active[i]:
                    tokens[i].append(nxt_l[i])
                    logps[i].append(lp_l[i])
            newly_done = hit_stop
            if params.stop:
                extra = torch.zeros_like(done)
                for i in range(B):
                    if active[i] and not bool(hit_stop[i]):
                        tail = self.tokenizer.decode(tokens[i][-stop_tail:], skip_special_tokens=False)
                        if any(s in tail for s in params.stop):
                            extra[i] = True
                newly_done = newly_done | extra
            for i in newly_done.nonzero().flatten().tolist():
                finish[i] = "stop"
            done = done | newly_done
            if bool(done.all()) or step == params.max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
            last_pos = last_pos + 1
            feed = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)[:, None]
            out = self.model(
                input_ids=feed, attention_mask=attn, position_ids=last_pos, use_cache=True, **{self._cache_kw: past}
            )
            past, logits = self._cache_of(out), out.logits[:, -1, :]
        return [
            Sample(
                token_ids=tokens[i],
                logprobs=logps[i],
                finish_reason=finish[i],
                text=self.tokenizer.decode(tokens[i], skip_special_tokens=True),
            )
            for i in range(B)
        ]
