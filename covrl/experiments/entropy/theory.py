"""The paper's exact statements, checked exactly: Theorems 1 / 2 on a tabular softmax, Lemma 1 per state.

* :func:`tabular` (claim 1): a tabular softmax policy over ``states`` x ``actions`` with fixed
  rewards, ``A = r - E_pi r`` per state (exact, no sampling). Vanilla PG on ``J = sum_s E_pi r``
  moves the logits by ``dz = eta * pi * A`` (the exact gradient), natural PG by ``dz = eta * A``.
  Per step and per state the exact ``dH(s)`` is compared with Theorem 1
  ``-eta * Cov_pi(log pi, pi * A)`` and Theorem 2 ``-eta * Cov_pi(log pi, A)``.
* :func:`lemma1_states` (claim 2): full next-token distributions at a set of states before and
  after an update of the transformer; exact ``dH(s)`` against Lemma 1
  ``-Cov_{a~pi(.|s)}(log pi(a|s), dz(a))`` with ``dz`` the actual change of the logits
  (``d log pi`` differs from ``dz`` by a constant per state, which the covariance ignores).
"""

from __future__ import annotations

import torch

from covrl.diagnostics import pearson


def _entropy(logp: torch.Tensor) -> torch.Tensor:  # [S, V] -> [S]
    return -(logp.exp() * logp).sum(-1)


def _cov_pi(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # Cov_{a~p}(x, y) per row
    xc = x - (p * x).sum(-1, keepdim=True)
    yc = y - (p * y).sum(-1, keepdim=True)
    return (p * xc * yc).sum(-1)


def lemma1_states(logp0: torch.Tensor, logp1: torch.Tensor) -> dict:
    """Exact per-state ``dH`` vs Lemma 1 from before / after log-softmax ``[S, V]``.

    Returns the Pearson across states, the sums over states of predicted and observed ``dH``,
    their ratio, and the per-state arrays (lists)."""
    p0 = logp0.exp()
    obs = _entropy(logp1) - _entropy(logp0)  # [S]
    pred = -_cov_pi(p0, logp0, logp1 - logp0)  # [S]
    so, sp = float(obs.sum()), float(pred.sum())
    return {"pearson": pearson(pred, obs), "obs": so, "pred": sp, "ratio": sp / so if so != 0 else float("nan"),
            "obs_states": obs.tolist(), "pred_states": pred.tolist()}


def tabular(states: int = 64, actions: int = 10, steps: int = 100, eta_pg: float = 2.0, eta_npg: float = 0.05,
            seed: int = 0) -> dict:
    """Theorems 1 (vanilla PG) and 2 (natural PG) on a tabular softmax, exact per state and step.

    Per update rule: the per-step Pearson across states of predicted vs exact ``dH(s)`` (list), and
    the per-step state-mean ``dH`` observed / predicted (lists; their Pearson across steps too)."""
    g = torch.Generator().manual_seed(seed)
    z0 = 2.0 * torch.randn(states, actions, generator=g, dtype=torch.float64)
    r = torch.rand(states, actions, generator=g, dtype=torch.float64)
    out = {"states": states, "actions": actions, "steps": steps}
    for name, eta in (("theorem1_pg", eta_pg), ("theorem2_npg", eta_npg)):
        z = z0.clone()
        per_step, obs, pred = [], [], []
        for _ in range(steps):
            logp = torch.log_softmax(z, -1)
            p = logp.exp()
            adv = r - (p * r).sum(-1, keepdim=True)
            drive = p * adv if name == "theorem1_pg" else adv  # dz = eta * drive
            pr = -eta * _cov_pi(p, logp, drive)  # [S]
            z = z + eta * drive
            ob = _entropy(torch.log_softmax(z, -1)) - _entropy(logp)  # [S]
            per_step.append(pearson(pr, ob))
            obs.append(float(ob.mean()))
            pred.append(float(pr.mean()))
        out[name] = {"eta": eta, "pearson_per_step": per_step, "obs": obs, "pred": pred,
                     "pearson_over_steps": pearson(pred, obs),
                     "h_start": float(_entropy(torch.log_softmax(z0, -1)).mean()),
                     "h_end": float(_entropy(torch.log_softmax(z, -1)).mean())}
    return out
