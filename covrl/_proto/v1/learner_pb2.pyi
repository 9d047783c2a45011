from covrl._proto.v1 import rollout_pb2 as _rollout_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Trajectory(_message.Message):
    __slots__ = ("prompt_token_ids", "completion_token_ids", "behavior_logprobs", "reward", "weight_version", "group_id", "finish_reason")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOR_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    completion_token_ids: _containers.RepeatedScalarFieldContainer[int]
    behavior_logprobs: _containers.RepeatedScalarFieldContainer[float]
    reward: float
    weight_version: int
    group_id: str
    finish_reason: _rollout_pb2.FinishReason
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., completion_token_ids: _Optional[_Iterable[int]] = ..., behavior_logprobs: _Optional[_Iterable[float]] = ..., reward: _Optional[float] = ..., weight_version: _Optional[int] = ..., group_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_rollout_pb2.FinishReason, str]] = ...) -> None: ...

class SubmitRolloutsRequest(_message.Message):
    __slots__ = ("trajectories",)
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    trajectories: _containers.RepeatedCompositeFieldContainer[Trajectory]
    def __init__(self, trajectories: _Optional[_Iterable[_Union[Trajectory, _Mapping]]] = ...) -> None: ...

class SubmitRolloutsResponse(_message.Message):
    __slots__ = ("accepted", "buffered_trajectories", "buffered_groups", "weight_version")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    buffered_trajectories: int
    buffered_groups: int
    weight_version: int
    def __init__(self, accepted: _Optional[int] = ..., buffered_trajectories: _Optional[int] = ..., buffered_groups: _Optional[int] = ..., weight_version: _Optional[int] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("recompute_old_logprobs", "max_trajectories", "skip_push", "loss_overrides")
    class LossOverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RECOMPUTE_OLD_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    SKIP_PUSH_FIELD_NUMBER: _ClassVar[int]
    LOSS_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    recompute_old_logprobs: bool
    max_trajectories: int
    skip_push: bool
    loss_overrides: _containers.ScalarMap[str, float]
    def __init__(self, recompute_old_logprobs: _Optional[bool] = ..., max_trajectories: _Optional[int] = ..., skip_push: _Optional[bool] = ..., loss_overrides: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PushResult(_message.Message):
    __slots__ = ("address", "ok", "error", "elapsed_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    ok: bool
    error: str
    elapsed_s: float
    def __init__(self, address: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("step", "weight_version", "loss", "entropy", "cov_logp_adv", "clip_frac", "approx_kl", "reward_mean", "grad_norm", "learning_rate", "num_trajectories", "num_tokens", "step_s", "metrics", "pushes")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    COV_LOGP_ADV_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRAC_FIELD_NUMBER: _ClassVar[int]
    APPROX_KL_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    step: int
    weight_version: int
    loss: float
    entropy: float
    cov_logp_adv: float
    clip_frac: float
    approx_kl: float
    reward_mean: float
    grad_norm: float
    learning_rate: float
    num_trajectories: int
    num_tokens: int
    step_s: float
    metrics: _containers.ScalarMap[str, float]
    pushes: _containers.RepeatedCompositeFieldContainer[PushResult]
    def __init__(self, step: _Optional[int] = ..., weight_version: _Optional[int] = ..., loss: _Optional[float] = ..., entropy: _Optional[float] = ..., cov_logp_adv: _Optional[float] = ..., clip_frac: _Optional[float] = ..., approx_kl: _Optional[float] = ..., reward_mean: _Optional[float] = ..., grad_norm: _Optional[float] = ..., learning_rate: _Optional[float] = ..., num_trajectories: _Optional[int] = ..., num_tokens: _Optional[int] = ..., step_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., pushes: _Optional[_Iterable[_Union[PushResult, _Mapping]]] = ...) -> None: ...

class GetWeightsRequest(_message.Message):
    __slots__ = ("chunk_size_bytes", "dtype")
    CHUNK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    chunk_size_bytes: int
    dtype: str
    def __init__(self, chunk_size_bytes: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class RegisterRolloutServerRequest(_message.Message):
    __slots__ = ("address", "use_tls", "root_certificates_pem", "token", "push_now")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    USE_TLS_FIELD_NUMBER: _ClassVar[int]
    ROOT_CERTIFICATES_PEM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PUSH_NOW_FIELD_NUMBER: _ClassVar[int]
    address: str
    use_tls: bool
    root_certificates_pem: bytes
    token: str
    push_now: bool
    def __init__(self, address: _Optional[str] = ..., use_tls: _Optional[bool] = ..., root_certificates_pem: _Optional[bytes] = ..., token: _Optional[str] = ..., push_now: _Optional[bool] = ...) -> None: ...

class RegisterRolloutServerResponse(_message.Message):
    __slots__ = ("num_servers", "weight_version", "push")
    NUM_SERVERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    num_servers: int
    weight_version: int
    push: PushResult
    def __init__(self, num_servers: _Optional[int] = ..., weight_version: _Optional[int] = ..., push: _Optional[_Union[PushResult, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("path", "step", "weight_version", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    weight_version: int
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ..., weight_version: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("include_history",)
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    include_history: bool
    def __init__(self, include_history: _Optional[bool] = ...) -> None: ...

class MetricsEvent(_message.Message):
    __slots__ = ("step", "weight_version", "unix_time_s", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    step: int
    weight_version: int
    unix_time_s: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., weight_version: _Optional[int] = ..., unix_time_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetLearnerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLearnerInfoResponse(_message.Message):
    __slots__ = ("model", "tokenizer", "chat_template", "vocab_size", "max_model_len_tokens", "weight_version", "step", "dtype", "config_json")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    model: str
    tokenizer: str
    chat_template: str
    vocab_size: int
    max_model_len_tokens: int
    weight_version: int
    step: int
    dtype: str
    config_json: str
    def __init__(self, model: _Optional[str] = ..., tokenizer: _Optional[str] = ..., chat_template: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_model_len_tokens: _Optional[int] = ..., weight_version: _Optional[int] = ..., step: _Optional[int] = ..., dtype: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...
