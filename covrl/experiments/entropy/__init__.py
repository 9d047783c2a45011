"""The entropy-mechanism study: ``covrl experiment entropy [--steps N --seed S --out DIR]``.

Reproduces, in minutes on 2 CPU cores, the four claims of Cui et al. 2025 ("The Entropy
Mechanism of RL for Reasoning LMs") and tests an entropy controller on top:

1. under GRPO the policy entropy collapses early;
2. the reward then follows ``R = -a * exp(H) + b`` (ceiling ``-a + b``);
3. ``Cov(log pi, A)`` tracks the entropy change;
4. Clip-Cov and KL-Cov keep entropy up without hurting reward;
5. (beyond the paper) KL-Cov + :class:`covrl.diagnostics.EntropyController` holds entropy at a
   chosen target.

Setup (why it is built this way, and what came out, is in docs/entropy_study.md):

* **Task** ``digit-sum``: the prompt is a number ``N``; a correct response is ``K`` digits 1–9
  that sum to ``N``, then EOS. Verifiable (reward 1 / 0) and deliberately diverse: most ``N``
  have tens of valid answers, so a policy can be right *and* uncertain, which is the setting
  where entropy collapse is a loss (diversity) rather than a gain (fewer mistakes).
* **Model**: a tiny pre-LN causal transformer in plain PyTorch (no HF overhead on CPU).
* **SFT warm-up**: cross-entropy on uniformly random valid answers, for a short budget, so
  the starting policy has high entropy and makes mistakes (the last digit needs arithmetic).
* **RL**: per step, ``prompts_per_step`` prompts × ``group_size`` samples at temperature 1;
  GRPO group-normalised advantages (``covrl.advantages``, estimator ``grpo``); the rollout batch is
  split into ``minibatches`` optimiser steps (so later ones are off-policy and PPO clipping /
  the KL-Cov penalty act), each accumulated over ``micro_batches``. Every loss is
  :func:`covrl.policy_loss` (token-mean): ``ppo`` for GRPO and Clip-Higher, ``clip_cov``,
  ``kl_cov``. Same seed, same prompts per step and same budget for every method.
* **Selection scope**: ``micro`` (each ``policy_loss`` call selects within its micro-batch, as
  verl does) or ``global`` (``covrl.compute_selection`` once per mini-batch, sliced per
  micro-batch with ``.rows``); the other scope is also run for Clip-Cov and KL-Cov.

Deviations from the paper's recipe, on purpose: the selection fractions are 100x the paper's
2e-4 (a mini-batch here has ~500 response tokens, where 2e-4 rounds to one token); no KL to a
reference policy and no entropy bonus (as in the paper's runs); a toy task and model instead of
Qwen2.5 on math.

Per step we log: reward, exact token-mean entropy over the response tokens (from the logits,
:func:`covrl.logprob_entropy`) of the batch before the update and of the same batch after it,
the batch ``Cov(log pi, A)`` (the ``policy_loss`` metric ``"cov"``, one no-grad call on the whole
rollout batch before the update), clip / selection fractions, KL, and the controller output.

Modules:

- :mod:`~covrl.experiments.entropy.config`: :class:`Config` (every flag) and the :data:`METHODS` table.
- :mod:`~covrl.experiments.entropy.task`: the ``digit-sum`` task: tokens, prompts, SFT data, reward.
- :mod:`~covrl.experiments.entropy.model`: the tiny transformer, SFT warm-up, sampling, log-prob / entropy.
- :mod:`~covrl.experiments.entropy.run`: the RL loop per method and the whole run (SFT, then every method).
- :mod:`~covrl.experiments.entropy.analysis`: per-run numbers, the R–H fit, the targets.
- :mod:`~covrl.experiments.entropy.report`: the figures and ``report.md``.
- :mod:`~covrl.experiments.entropy.cli`: ``build_parser`` and ``main`` (run, analyse, write the artefacts).
- ``__main__``: ``python -m covrl.experiments.entropy``, the same as ``covrl experiment entropy``.
"""

from covrl.experiments.entropy.analysis import BLOCKS, END_WINDOW, analyse
from covrl.experiments.entropy.cli import build_parser, main
from covrl.experiments.entropy.config import METHODS, Config
from covrl.experiments.entropy.model import (
    Block,
    TinyLM,
    build_model,
    exact_accuracy,
    response_logprob_entropy,
    sample,
    sft,
    state_logprobs,
)
from covrl.experiments.entropy.report import FIGURES, summary_rows, write_figures, write_report
from covrl.experiments.entropy.run import group_advantages, run_all, run_method, run_specs
from covrl.experiments.entropy.task import BOS, DIGIT0, EOS, PAD, SEP, VOCAB, DigitSum
from covrl.experiments.entropy.theory import lemma1_states, tabular

__all__ = [
    "BLOCKS", "BOS", "DIGIT0", "END_WINDOW", "EOS", "FIGURES", "METHODS", "PAD", "SEP", "VOCAB",
    "Block", "Config", "DigitSum", "TinyLM",
    "analyse", "build_model", "build_parser", "exact_accuracy", "group_advantages", "lemma1_states", "main",
    "response_logprob_entropy", "run_all", "run_method", "run_specs", "sample", "sft", "state_logprobs",
    "summary_rows", "tabular", "write_figures", "write_report",
]
