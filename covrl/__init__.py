"""covrl: reinforcement learning for reasoning LLMs without entropy collapse.

Public ops (compiled CPU/CUDA kernels with a plain-PyTorch fallback):

- :func:`covrl.policy_loss`: PPO / Clip-Cov / KL-Cov policy loss on per-token log-probs.
- :func:`covrl.logprob_entropy`: logits -> per-token log-prob and entropy.

``covrl.kernel_info()`` says which compiled kernels this install has.
"""

from covrl._ext import kernel_info
from covrl.ops import Selection, compute_selection, logprob_entropy, policy_loss, policy_loss_selected

__version__ = "0.1.0"

__all__ = ["kernel_info", "logprob_entropy", "policy_loss", "__version__"]
__all__ += ["Selection", "compute_selection", "policy_loss_selected"]
