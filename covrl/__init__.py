"""covrl: reinforcement learning for reasoning LLMs without entropy collapse.

Public ops (compiled CPU/CUDA kernels with a plain-PyTorch fallback):

- :func:`covrl.policy_loss`: PPO / Clip-Cov / KL-Cov policy loss on per-token log-probs.
- :func:`covrl.logprob_entropy`: logits -> per-token log-prob and entropy.
- :func:`covrl.fused_policy_loss`: logits -> policy loss (+ token-mean entropy), two passes.

``covrl.kernel_info()`` says which compiled kernels this install has.

Map of the package (each subpackage's docstring maps its own modules):

- ``ops/``          the public ops: argument checks, selection, policy loss, logits ops
- ``reference.py``  plain-PyTorch reference of every op: the spec the kernels are tested against
- ``_ext.py``       loads the compiled extension ``covrl._C``; which kernels it has
- ``learner/``      LearnerCore: one policy-gradient step, FSDP2, checkpoints
- ``advantages.py`` advantage estimators (grpo, drgrpo, rloo, reinforce_pp) in a registry
- ``trainer/``      the RL loop that drives the three services; local services, eval, resume
- ``config.py``     the trainer's typed config: dataclasses, YAML, dotted overrides; ``config_renames.py`` old key names
- ``data.py``       prompts and ground truths: JSONL / Parquet files and built-in tasks
- ``diagnostics.py`` the paper's diagnostics (R-H fit, predicted entropy change) and the controller
- ``client/``       the client SDK: one client per service over a shared channel layer
- ``services/``     the three gRPC servers and their launcher
- ``engines/``      rollout engines: transformers and vLLM
- ``rewards/``      reward verification: tasks and the worker-pool verifier
- ``experiments/``  reproducible experiments (the entropy study)
- ``models.py``     tiny in-memory models for tests; ``demo_model.py`` the embedded demo model
- ``logging_utils.py`` metrics.jsonl, TensorBoard, progress bar; ``plot.py`` a run's figures
- ``malloc.py``       the service processes keep freed memory (glibc ``mallopt``) instead of faulting it in anew
- ``cli.py``        the ``covrl`` command
- ``_proto/``       generated protobuf / gRPC code (``make protos``)
"""

from covrl._ext import kernel_info
from covrl.ops import (
    Selection,
    compute_selection,
    fused_policy_loss,
    logprob_entropy,
    policy_loss,
    policy_loss_selected,
)

__version__ = "0.1.0"

__all__ = [
    "Selection",
    "compute_selection",
    "fused_policy_loss",
    "kernel_info",
    "logprob_entropy",
    "policy_loss",
    "policy_loss_selected",
    "__version__",
]
