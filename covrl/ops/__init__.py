"""Public op API.

Each op validates its arguments (errors name the argument), then runs the compiled kernel
when ``covrl._C`` has one for the tensors' device, else the plain-PyTorch reference in
``covrl/reference.py``.

- ``checks``     argument validation shared by the ops
- ``selection``  :class:`Selection`, :func:`compute_selection`: Clip-Cov / KL-Cov selection over a mini-batch
- ``policy``     :func:`policy_loss`, :func:`policy_loss_selected` and their op registration
- ``logits``     :func:`logprob_entropy`, :func:`fused_policy_loss` and their op registration
"""

from covrl.ops.checks import _WARNED_FRACTION
from covrl.ops.logits import fused_policy_loss, logprob_entropy
from covrl.ops.policy import METRIC_NAMES, policy_loss, policy_loss_selected
from covrl.ops.selection import Selection, _kth_smallest_key, compute_selection

__all__ = [
    "METRIC_NAMES",
    "Selection",
    "_WARNED_FRACTION",
    "_kth_smallest_key",
    "compute_selection",
    "fused_policy_loss",
    "logprob_entropy",
    "policy_loss",
    "policy_loss_selected",
]
