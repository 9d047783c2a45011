"""The ``digit-sum`` task: token ids (:data:`VOCAB`), prompts, SFT data and the 1 / 0 reward."""

from __future__ import annotations

import itertools
import math

import torch

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT0 = 4  # token of digit d is DIGIT0 + d
VOCAB = DIGIT0 + 10


class DigitSum:
    """Prompt ``N``; correct response: ``K`` digits 1–9 summing to ``N``, then EOS.

    ``holdout_every = m > 0`` holds out every m-th ``N`` (``N = target_min + m-1, + 2m-1, ...``):
    :attr:`targets` (training and SFT) excludes them, :attr:`heldout` lists them.
    """

    def __init__(self, digits: int, target_min: int, target_max: int, holdout_every: int = 0):
        self.k = digits
        every = list(range(target_min, target_max + 1))
        m = holdout_every
        self.heldout = [n for i, n in enumerate(every) if m > 0 and i % m == m - 1]
        self.targets = [n for n in every if n not in self.heldout]
        self.answers = {n: [] for n in every}
        for combo in itertools.product(range(1, 10), repeat=digits):
            s = sum(combo)
            if s in self.answers:
                self.answers[s].append(combo)
        self.prompt_len = 4
        self.response_len = digits + 1

    def prompts(self, targets: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 4]
        return torch.stack([torch.full_like(targets, BOS), DIGIT0 + targets // 10, DIGIT0 + targets % 10,
                            torch.full_like(targets, SEP)], dim=1)

    def sft_batch(self, n: int, g: torch.Generator) -> torch.Tensor:  # [n, P + R]
        ti = torch.randint(len(self.targets), (n,), generator=g)
        rows = []
        for i in ti.tolist():
            t = self.targets[i]
            ans = self.answers[t][int(torch.randint(len(self.answers[t]), (1,), generator=g))]
            rows.append([BOS, DIGIT0 + t // 10, DIGIT0 + t % 10, SEP, *[DIGIT0 + d for d in ans], EOS])
        return torch.tensor(rows)

    def reward(self, targets: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:  # [B], [B, R] -> [B]
        d = responses[:, : self.k] - DIGIT0
        ok_digits = ((d >= 1) & (d <= 9)).all(1)
        return (ok_digits & (d.sum(1) == targets) & (responses[:, self.k] == EOS)).float()

    def answer_tokens(self, n: int) -> torch.Tensor:  # [n_N, K + 1]: every correct response to N
        return torch.tensor([[DIGIT0 + d for d in a] + [EOS] for a in self.answers[n]])

    def max_entropy_per_token(self, reward: float) -> float:
        """Largest token-mean entropy (nats) of a policy whose expected reward is ``reward``.

        Over policies whose responses have a correct answer's length (``K + 1`` tokens), prompts
        uniform over :attr:`targets`: per prompt the best is ``reward`` spread uniformly over the
        ``n_N`` correct responses and ``1 - reward`` uniformly over the other ``V^(K+1) - n_N``
        sequences, sequence entropy ``h(r) + r log n_N + (1 - r) log(V^(K+1) - n_N)``; the
        token mean divides by ``K + 1``. At ``reward = 1`` it is ``mean_N log(n_N) / (K + 1)``.
        """
        r = min(max(float(reward), 0.0), 1.0)
        hb = -sum(p * math.log(p) for p in (r, 1 - r) if p > 0)
        total = VOCAB ** (self.k + 1)
        hs = [hb + (r * math.log(len(self.answers[n])) if r > 0 else 0.0)
              + ((1 - r) * math.log(total - len(self.answers[n])) if r < 1 else 0.0) for n in self.targets]
        return sum(hs) / len(hs) / (self.k + 1)

    def probe_states(self, depth: int) -> list[torch.Tensor]:  # per depth d: [len(targets) * 9^d, P + d]
        """Every state at depths 0..``depth`` of every training prompt (prefixes of digits 1-9), as
        prompt + prefix ids, one tensor per depth (absolute positions: no padding)."""
        out = []
        prompts = self.prompts(torch.tensor(self.targets))
        for d in range(depth + 1):
            pref = list(itertools.product(range(1, 10), repeat=d))
            ids = [torch.cat([p, torch.tensor([DIGIT0 + x for x in q], dtype=p.dtype)]) for p in prompts for q in pref]
            out.append(torch.stack(ids))
        return out
