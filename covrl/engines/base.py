"""Plain types every rollout engine speaks (shared by the rollout service and the client SDK).

An engine turns token-id prompts into samples with the log-prob of every sampled token
under the distribution it actually sampled from, and swaps in new weights atomically.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Protocol

import torch

FINISH_REASONS = ("stop", "length")


def all_finite(t: torch.Tensor, block: int = 1 << 22) -> bool:
    """True when no element is NaN or +-Inf.

    Fast path: any NaN/Inf makes the sum NaN/Inf, and a plain sum is ~10x faster than
    ``isfinite`` on CPU. Only when the sum is not finite (a bad value, or a finite overflow)
    does the exact blockwise ``isfinite`` decide.
    """
    if math.isfinite(float(t.sum())):
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(block))


class StaleWeightVersion(ValueError):
    """An update asked for a weight version that is not newer than the current one."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample (mirrors ``covrl.v1.SamplingParams``)."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0  # > 0; log-probs are taken under logits / temperature
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 disables
    top_k: int = 0  # keep the top_k tokens; 0 disables
    max_new_tokens: int = 128  # generated tokens per sample, > 0
    stop: tuple[str, ...] = ()  # stop strings (kept in the output)
    stop_token_ids: tuple[int, ...] = ()  # extra stop token ids besides EOS (kept in the output)
    seed: int | None = None  # same seed + request + weights -> same samples

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the field when a setting is out of range; return self."""
        if self.n < 1:
            raise ValueError(f"sampling.n: expected >= 1, got {self.n}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"sampling.temperature: expected a finite value > 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"sampling.top_p: expected 0 < top_p <= 1, got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k: expected >= 0 (0 disables), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop: stop strings must not be empty")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"sampling.seed: expected >= 0, got {self.seed}")
        return self


@dataclasses.dataclass
class Sample:
    """One sampled completion."""

    token_ids: list[int]  # [T]
    logprobs: list[float]  # [T] log pi(token_t | prefix) under the processed distribution
    finish_reason: str  # "stop" | "length"
    text: str = ""


@dataclasses.dataclass
class PromptResult:
    """All samples of one prompt."""

    prompt_index: int
    prompt_token_ids: list[int]
    samples: list[Sample]
    weight_version: int
    prompt_id: str = ""


class Engine(Protocol):
    """What the rollout service needs from an engine."""

    name: str  # "transformers" | "vllm"
    model_name: str
    tokenizer: object

    @property
    def weight_version(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_model_len(self) -> int: ...

    def generate_iter(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[PromptResult]:
        """Yield one PromptResult per prompt (``prompt_index`` = position in ``prompts``)."""

    def parameter_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """name -> (dtype, shape) of every parameter ``update_weights`` accepts."""

    def update_weights(self, tensors: Mapping[str, torch.Tensor], version: int) -> int:
        """Swap in ``tensors`` atomically; ``version`` must be newer (0 = current + 1). Returns it."""

    def info(self) -> dict: ...


def processed_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the distribution actually sampled from, in float32.

    ``logits / temperature``, then top-k, then top-p (keep the smallest set of most likely
    tokens whose mass reaches ``top_p``); removed tokens get -inf and the rest are
    renormalised. With top_k=0 and top_p=1 this is exactly ``log_softmax(logits / T)``,
    what a learner computes for the same weights.
    """
    x = logits.float() / temperature  # [B, V]
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.log_softmax(x, dim=-1)
