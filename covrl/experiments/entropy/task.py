"""The ``digit-sum`` task: token ids (:data:`VOCAB`), prompts, SFT data and the 1 / 0 reward."""

from __future__ import annotations

import itertools

import torch

PAD, BOS, SEP, EOS = 0, 1, 2, 3
DIGIT0 = 4  # token of digit d is DIGIT0 + d
VOCAB = DIGIT0 + 10


class DigitSum:
    """Prompt ``N``; correct response: ``K`` digits 1–9 summing to ``N``, then EOS."""

    def __init__(self, digits: int, target_min: int, target_max: int):
        self.k = digits
        self.targets = list(range(target_min, target_max + 1))
        self.answers = {n: [] for n in self.targets}
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
