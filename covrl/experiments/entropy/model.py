"""The tiny pre-LN causal transformer, its SFT warm-up, sampling and response log-prob / entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import covrl
from covrl.experiments.entropy.config import Config
from covrl.experiments.entropy.task import EOS, VOCAB, DigitSum


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):  # [B, T, D]
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D/H]
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):  # [B, T] -> logits [B, T, V]
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def build_model(cfg: Config, task: DigitSum, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(VOCAB, cfg.d_model, cfg.n_layers, cfg.n_heads, task.prompt_len + task.response_len)


def sft(cfg: Config, task: DigitSum, seed: int = 0, steps: int | None = None) -> dict:
    """Supervised warm-up (``steps``, default ``cfg.sft_steps``) on random valid answers of the
    training targets; returns the model's state dict."""
    model = build_model(cfg, task, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.sft_lr)
    g = torch.Generator().manual_seed(seed)
    p = task.prompt_len
    for _ in range(cfg.sft_steps if steps is None else steps):
        ids = task.sft_batch(cfg.sft_batch, g)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits[:, p - 1:].reshape(-1, VOCAB), ids[:, p:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.state_dict()


@torch.no_grad()
def sample(model: TinyLM, prompts: torch.Tensor, n_new: int, g: torch.Generator):
    """Temperature-1 sampling of ``n_new`` tokens.

    Returns ``(responses [B, R], mask [B, R], log_prob [B, R], entropy [B, R])``; the mask
    stops after the first EOS. The last forward pass already holds the logits of every response
    position, so the behaviour log-probs and the exact entropies come from it for free.
    """
    seq = prompts
    for _ in range(n_new):
        logits = model(seq)  # [B, T, V]
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=g)
        seq = torch.cat([seq, nxt], dim=1)
    resp = seq[:, prompts.shape[1]:]
    log_prob, entropy = covrl.logprob_entropy(logits[:, prompts.shape[1] - 1:], resp)
    ended_before = torch.cumsum((resp == EOS).long(), dim=1) - (resp == EOS).long()
    mask = (ended_before == 0).float()
    return resp, mask, log_prob, entropy


def response_logprob_entropy(model, prompts, responses):
    """Per-token log-prob and exact entropy of the response tokens: ``[B, R]`` each."""
    ids = torch.cat([prompts, responses], dim=1)
    logits = model(ids[:, :-1])[:, prompts.shape[1] - 1:]  # [B, R, V]
    return covrl.logprob_entropy(logits, responses)


@torch.no_grad()
def state_logprobs(model, states: list[torch.Tensor]) -> torch.Tensor:
    """Full next-token log-softmax at the last position of every state: ``[S, V]`` (float64)."""
    return torch.cat([torch.log_softmax(model(ids)[:, -1].double(), -1) for ids in states])


@torch.no_grad()
def exact_accuracy(model, task: DigitSum, targets: list[int]) -> float:
    """Expected accuracy of temperature-1 sampling, exactly: ``mean_N sum_{correct y} pi(y | N)``
    (one forward over every correct response of every ``N``; no sampling noise)."""
    accs = []
    for n in targets:
        resp = task.answer_tokens(n)  # [n_N, K + 1]
        prompts = task.prompts(torch.full((len(resp),), n))
        lp, _ = response_logprob_entropy(model, prompts, resp)
        accs.append(float(lp.double().sum(1).exp().sum()))
    return sum(accs) / len(accs)
