"""The entropy-mechanism study: ``covrl experiment entropy [--seeds 0,1,2 --out DIR]``.

Checks, in minutes on 2 CPU cores, each claim of Cui et al. 2025 ("The Entropy Mechanism of
RL for Reasoning LMs", arXiv 2505.22617) in the paper's own terms, one verdict each:

1. Theorems 1 / 2 on a tabular softmax: exact ``dH(s)`` vs ``-eta Cov(log pi, pi A)`` (vanilla
   PG) and ``-eta Cov(log pi, A)`` (natural PG) (:mod:`~covrl.experiments.entropy.theory`);
2. Lemma 1 on the transformer: exact ``dH(s)`` at every probe state vs ``-Cov(log pi, dz)``;
3. Figure 8: on-policy GRPO (one update per batch: the surrogate's gradient is the plain PG),
   per-prompt group covariance of (length-normalised log-prob, A) vs the same-batch ``dH``;
4. Figure 12: final entropy against ``kl_coef`` and the Clip-Cov fraction (dose series);
5. collapse: GRPO's entropy loss; KL-Cov / Clip-Cov against GRPO and against the task's
   maximum entropy at the reward reached (:meth:`DigitSum.max_entropy_per_token`);
6. ``R = -a exp(H) + b`` on held-out exact accuracy (a harder task, every m-th ``N`` held out).

Plus (beyond the paper) KL-Cov + :class:`covrl.diagnostics.EntropyController` on the first seed.

Setup (why it is built this way, and what came out: docs/entropy_study.md):

* **Task** ``digit-sum``: the prompt is a number ``N``; a correct response is ``K`` digits 1-9
  that sum to ``N``, then EOS. Verifiable and diverse: most ``N`` have tens of valid answers.
* **Model**: a tiny pre-LN causal transformer in plain PyTorch; an SFT warm-up per seed on
  uniformly random valid answers (training ``N`` only).
* **RL**: per step ``prompts_per_step`` prompts x ``group_size`` samples at temperature 1; GRPO
  advantages (``covrl.advantages``); ``minibatches`` Adam steps per batch, each accumulated over
  ``micro_batches``; every loss is :func:`covrl.policy_loss` (token-mean): ``ppo`` for GRPO,
  ``clip_cov`` with the reference recipe's PPO clip 1/1, ``kl_cov``. Per seed, every run has
  the same SFT weights, prompts and sampling stream at each step.
* Every run logs the learner's live same-batch diagnostics
  (:func:`covrl.learner.diagnostics.same_batch_metrics`): the exact entropy change of the step's
  own tokens and its Lemma-1 and ``-eta Cov`` predictions.

Deviations from the paper's recipe, on purpose: selection fractions far above the paper's
(2e-3 for KL-Cov at 7B, 2e-4 for KL-Cov at 32B and for Clip-Cov), because a mini-batch here has
~500 response tokens; no KL to a reference policy and no entropy bonus (as in the paper's runs);
a toy task and model instead of Qwen2.5 on math.

Modules:

- :mod:`~covrl.experiments.entropy.config`: :class:`Config` (every flag) and the :data:`METHODS` table.
- :mod:`~covrl.experiments.entropy.task`: ``digit-sum``: tokens, prompts, held-out split, SFT data,
  reward, probe states, max entropy at a reward.
- :mod:`~covrl.experiments.entropy.model`: the tiny transformer, SFT, sampling, log-prob / entropy,
  full next-token distributions, exact accuracy.
- :mod:`~covrl.experiments.entropy.theory`: claims 1 and 2, exactly.
- :mod:`~covrl.experiments.entropy.run`: the RL loop, the run list (:func:`run_specs`), the whole study.
- :mod:`~covrl.experiments.entropy.analysis`: per-run numbers and one verdict per claim.
- :mod:`~covrl.experiments.entropy.report`: the figures and ``report.md``.
- :mod:`~covrl.experiments.entropy.cli`: ``build_parser`` and ``main`` (run or ``--reanalyse``, write the artefacts).
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
