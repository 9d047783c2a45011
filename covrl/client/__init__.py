"""Python SDK for the covrl services: :class:`RolloutClient`, :class:`RewardClient`, :class:`LearnerClient`.

Typed dataclasses in and out, a deadline on every call (``timeout_s``), retries with
exponential backoff on UNAVAILABLE (``max_attempts``), optional TLS and shared token::

    with RolloutClient("127.0.0.1:50051") as rollout:
        results = rollout.generate([[5, 6, 7], "2+2=", [{"role": "user", "content": "hi"}]],
                                   SamplingParams(n=4, temperature=1.0, max_new_tokens=64))
        rollout.update_weights(model.state_dict(), version=3)

Errors come out as :class:`ClientError` with the gRPC ``code`` and the server's message.

Modules:

- :mod:`covrl.client.channel`: channel, TLS, token, deadlines and retry shared by the clients; ClientError.
- :mod:`covrl.client.rollout`: RolloutClient, its result types and prompt / sampling / result conversions.
- :mod:`covrl.client.reward`: RewardClient with ScoreItem, RewardResult, ScoreResult.
- :mod:`covrl.client.learner`: LearnerClient with Trajectory and the train / weights / checkpoint results.
"""

from covrl.client.channel import ClientError
from covrl.client.learner import (
    CheckpointResult,
    LearnerClient,
    MetricsEvent,
    PushResult,
    RegisterResult,
    SubmitResult,
    TrainResult,
    Trajectory,
)
from covrl.client.reward import STATUS_FROM_PROTO as STATUS_FROM_PROTO  # importable here as before
from covrl.client.reward import RewardClient, RewardResult, ScoreItem, ScoreResult
from covrl.client.rollout import FINISH_FROM_PROTO as FINISH_FROM_PROTO  # importable here as before
from covrl.client.rollout import FINISH_TO_PROTO as FINISH_TO_PROTO  # importable here as before
from covrl.client.rollout import RolloutClient, RolloutInfo, UpdateWeightsResult
from covrl.engines.base import PromptResult, Sample, SamplingParams

__all__ = [
    "CheckpointResult",
    "ClientError",
    "LearnerClient",
    "MetricsEvent",
    "PromptResult",
    "PushResult",
    "RegisterResult",
    "RewardClient",
    "RewardResult",
    "RolloutClient",
    "RolloutInfo",
    "Sample",
    "SamplingParams",
    "ScoreItem",
    "ScoreResult",
    "SubmitResult",
    "TrainResult",
    "Trajectory",
    "UpdateWeightsResult",
]
