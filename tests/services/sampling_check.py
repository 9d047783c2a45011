"""Does an engine sample from the distribution whose log-probs it reports?

Log-prob parity tests compare the reported numbers with a recomputation, so they cannot see a
sampler that draws from another distribution (say, the wrong temperature, or top-k applied
after the draw). This draws many first tokens of one prompt and runs a chi-square
goodness-of-fit test against the exact processed distribution of the model's next-token logits.
The draws are seeded, so a test built on it gives the same statistic every run.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from covrl.engines.base import SamplingParams, processed_logprobs


def first_token_counts(engine, prompt: list[int], params: SamplingParams, draws: int) -> Counter:
    """Counts of the first sampled token over ``draws`` samples (``params.n`` per copy of the prompt)."""
    copies = -(-draws // params.n)
    results = engine.generate([prompt] * copies, SamplingParams(**{**params.__dict__, "max_new_tokens": 1}))
    return Counter(s.token_ids[0] for r in results for s in r.samples)


def exact_probs(model, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """The processed next-token distribution (temperature, top-k, top-p) of an HF model, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1:].float()
    return processed_logprobs(logits, params.temperature, params.top_k, params.top_p)[0].double().exp()


def chi_square(counts: Counter, probs: torch.Tensor, min_expected: float = 10.0) -> tuple[float, int, int]:
    """(statistic, degrees of freedom, draws outside the support).

    Tokens are taken from most to least likely and pooled into bins until each bin expects at
    least ``min_expected`` draws (the tail joins the last bin). Tokens of probability zero are
    outside the support: a correct sampler never draws them, so the caller checks that count.
    """
    total = sum(counts.values())
    order = torch.argsort(probs, descending=True).tolist()
    support = [t for t in order if probs[t] > 0]
    outside = sum(c for t, c in counts.items() if probs[t] <= 0)
    bins: list[tuple[float, int]] = []
    exp_acc, obs_acc = 0.0, 0
    for t in support:
        exp_acc += float(probs[t]) * total
        obs_acc += counts.get(t, 0)
        if exp_acc >= min_expected:
            bins.append((exp_acc, obs_acc))
            exp_acc, obs_acc = 0.0, 0
    if exp_acc or obs_acc:
        if bins:
            e, o = bins.pop()
            bins.append((e + exp_acc, o + obs_acc))
        else:
            bins.append((exp_acc, obs_acc))
    stat = sum((o - e) ** 2 / e for e, o in bins)
    return stat, max(len(bins) - 1, 1), outside


def critical_value(dof: int, z: float = 3.719) -> float:
    """Chi-square quantile by Wilson-Hilferty; z = 3.719 is the upper 1e-4 tail of a normal."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_samples_follow_the_processed_distribution(engine, model, prompt: list[int], draws: int = 1024) -> None:
    """Plain temperature, then temperature + top-k + top-p: the draws fit the exact distribution
    (chi-square under its 1e-4 quantile), none falls outside its support, and the same draws
    are rejected against the T=1 distribution (so the check can tell temperatures apart)."""
    for seed, (top_k, top_p) in enumerate([(0, 1.0), (8, 0.9)]):
        params = SamplingParams(n=16, temperature=0.7, top_k=top_k, top_p=top_p, seed=seed)
        counts = first_token_counts(engine, prompt, params, draws)
        assert sum(counts.values()) >= draws
        stat, dof, outside = chi_square(counts, exact_probs(model, prompt, params))
        assert outside == 0, f"{params}: {outside} draws outside the support"
        assert stat < critical_value(dof), f"{params}: chi-square {stat:.1f} on {dof} dof"
        t1 = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
        stat, dof, _ = chi_square(counts, exact_probs(model, prompt, t1))
        assert stat > critical_value(dof), f"{params}: the draws also fit T=1 (chi-square {stat:.1f}, {dof} dof)"
