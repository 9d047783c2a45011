"""Same-batch entropy diagnostics of one learner step (Cui et al. 2025, arXiv 2505.22617).

After the update, one extra no-grad forward over the step's own sequences gives the exact
entropy of the same response tokens under the new weights (``LearnerConfig.measure_entropy_change``).
From the before/after log-probs and entropies of those tokens:

* ``entropy_delta`` (observed): ``H_after - H_before``, token mean over the response tokens,
  both exact from the logits, on the same sequences (no resampling noise).
* ``entropy_delta_lemma1`` (predicted, Lemma 1, no fitted constant):
  ``dH(s) ~= -Cov_{a~pi(.|s)}(log pi(a|s), dz(a))``. ``dz`` and ``d log pi`` differ by a constant
  per state, so the covariance is ``E_pi[(log pi + H(s)) * d log pi]`` minus
  ``E_pi[log pi + H(s)] * E_pi[d log pi]``, and the second term is 0 (``E_pi[log pi] = -H(s)``).
  With the response token ``a_t`` drawn from ``pi(.|s_t)`` the per-token estimate is
  ``(log pi(a_t|s_t) + H(s_t)) * (log pi_after(a_t|s_t) - log pi(a_t|s_t))``: one sample per
  state, exact ``H(s_t)`` and exact change of the sampled token's log-prob. Assumes on-policy
  tokens (behaviour = pre-update policy); off-policy tokens bias it.
* ``entropy_delta_cov`` (predicted, Theorem 2 with Eq. 10's estimator, the paper's form
  ``-eta * Cov(log pi, A)``): ``Cov`` is ``cov``, the batch token-wise centred product; ``eta``
  (``entropy_step_size``) is the step the update really took along the advantages, measured on
  this step's tokens: the least-squares slope of ``d log pi`` on the centred advantages
  (under natural PG on a tabular softmax ``d log pi(a|s) = eta * (A - E_pi A)`` exactly).
  It is measured from the update, not fitted on entropy changes.

Cost: one no-grad forward of the batch after the update (measured in the demo on 2 CPU cores:
7-10 s against 10-12 s for the rest of the step's training, benchmarks/results/demo_step_diagnostics_cpu.md), plus, when ``mini_batch_size`` splits the batch and no scoring pass runs anyway, one
before the update so that ``H_before`` and ``cov`` are the pre-update policy's (not a mix of
pre- and mid-update weights). ``measure_entropy_change=False`` turns both off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from covrl import reference
from covrl.learner.policy import scoring_pass

if TYPE_CHECKING:
    from covrl.learner.core import LearnerCore
    from covrl.learner.step import StepTensors


def entropy_change(core: LearnerCore, s: StepTensors) -> dict[str, float]:
    """The extra forward after the update, then :func:`same_batch_metrics` (every rank runs it)."""
    lp_after, ent_after = scoring_pass(core, s.batch, s.n, s.c_max)  # [N, C] each
    return same_batch_metrics(s.meas_lp, s.meas_ent, lp_after, ent_after, s.adv, s.resp_mask)


def same_batch_metrics(lp0: torch.Tensor, ent0: torch.Tensor, lp1: torch.Tensor, ent1: torch.Tensor,
                       adv: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Observed and predicted same-batch entropy change (module docstring) from before/after [N, C] tensors.

    ``adv`` is [N] (one advantage per sequence) or [N, C]; ``mask`` [N, C] marks response tokens.
    """
    m = mask.to(torch.float64)
    n_tok = float(m.sum().clamp_min(1.0))
    lp0, ent0, lp1, ent1 = (t.to(torch.float64) for t in (lp0, ent0, lp1, ent1))
    a = adv.to(torch.float64)
    a = a[:, None].expand_as(lp0) if a.dim() == 1 else a
    dlp = torch.where(mask, lp1 - lp0, 0.0)  # [N, C] change of the sampled tokens' log-probs
    h0 = float((ent0 * m).sum()) / n_tok
    h1 = float((ent1 * m).sum()) / n_tok
    lemma1 = -float(((lp0 + ent0) * dlp * m).sum()) / n_tok
    cov = float((reference.centred_covariance(lp0.float(), a.float(), mask).double() * m).sum()) / n_tok
    a_c = torch.where(mask, a - float((a * m).sum()) / n_tok, 0.0)
    saa = float((a_c * a_c).sum())
    eta = float((dlp * a_c).sum()) / saa if saa > 0 else float("nan")
    return {
        "entropy_after": h1,
        "entropy_delta": h1 - h0,
        "entropy_delta_lemma1": lemma1,
        "entropy_step_size": eta,
        "entropy_delta_cov": -eta * cov if saa > 0 else float("nan"),
    }
