"""Reward verification for RL on reasoning tasks.

- :class:`Verifier`: scores :class:`RewardItem` batches in a worker-process pool with per-item
  deadlines and an LRU cache; returns :class:`RewardResult` per item, in order.
- :data:`TASKS`: name -> pure ``(completion, ground_truth, metadata) -> (reward, detail)``
  ("math", "arithmetic", "countdown", "format").
- :func:`score_one`: one item in-process (no deadline), with the ``format_weight`` composition.

Rules, deadlines and caching are described in docs/rewards.md.

- ``tasks.py``     the pure scoring functions per task
- ``verifier.py``  the Verifier: worker pool, deadlines, cache
- ``_worker.py``   one worker process's loop; ``_preload.py`` warms the fork server
"""

from covrl.rewards.tasks import TASKS, InvalidAnswer, score_one
from covrl.rewards.verifier import STATUSES, VERIFIER_VERSION, RewardItem, RewardResult, Verifier

__all__ = [
    "TASKS",
    "STATUSES",
    "VERIFIER_VERSION",
    "InvalidAnswer",
    "RewardItem",
    "RewardResult",
    "Verifier",
    "score_one",
]
