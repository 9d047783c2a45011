"""Held-out evaluation: unbiased pass@k, and pass@1 / pass@k of a trainer's current policy."""

from __future__ import annotations

import math
import sys
import time


def pass_at_k(correct: list[list[bool]], k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) averaged over prompts; ``correct[i]`` holds n >= k samples."""
    vals = []
    for c in correct:
        n, m = len(c), sum(c)
        if n < k:
            raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
        vals.append(1.0 if n - m < k else 1.0 - math.comb(n - m, k) / math.comb(n, k))
    return sum(vals) / len(vals) if vals else float("nan")


def evaluate(tr, step: int) -> dict:
    """pass@1 and pass@k on the held-out split (k samples per prompt at eval.temperature).

    ``tr`` is a :class:`~covrl.trainer.loop.Trainer` with its services started.
    """
    e = tr.cfg.eval
    examples = tr.dataset.eval[: e.max_prompts] if e.max_prompts else tr.dataset.eval
    if not examples:
        return {}
    t0 = time.monotonic()
    print(f"[covrl] eval: generating {e.k} samples for each of {len(examples)} held-out prompts "
          f"({len(examples) * e.k} completions) ...", file=sys.stderr, flush=True)
    batch = tr.generate(examples, step, n=e.k, temperature=e.temperature, salt=1)
    print(f"[covrl] eval: generated in {time.monotonic() - t0:.0f}s; scoring", file=sys.stderr, flush=True)
    tr.score(batch.rollouts)
    groups: dict[str, list[bool]] = {}
    for ro in batch.rollouts:
        groups.setdefault(ro.group_id, []).append(ro.reward >= 0.999)
    correct = list(groups.values())
    out = {"pass@1": pass_at_k(correct, 1), f"pass@{e.k}": pass_at_k(correct, e.k),
           "reward_mean": sum(ro.reward for ro in batch.rollouts) / max(len(batch.rollouts), 1),
           "n_prompts": len(examples), "time_s": time.monotonic() - t0}
    return out
