from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RewardStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REWARD_STATUS_UNSPECIFIED: _ClassVar[RewardStatus]
    REWARD_STATUS_OK: _ClassVar[RewardStatus]
    REWARD_STATUS_TIMEOUT: _ClassVar[RewardStatus]
    REWARD_STATUS_ERROR: _ClassVar[RewardStatus]
    REWARD_STATUS_INVALID: _ClassVar[RewardStatus]
    REWARD_STATUS_UNKNOWN_TASK: _ClassVar[RewardStatus]
REWARD_STATUS_UNSPECIFIED: RewardStatus
REWARD_STATUS_OK: RewardStatus
REWARD_STATUS_TIMEOUT: RewardStatus
REWARD_STATUS_ERROR: RewardStatus
REWARD_STATUS_INVALID: RewardStatus
REWARD_STATUS_UNKNOWN_TASK: RewardStatus

class RewardItem(_message.Message):
    __slots__ = ("task", "prompt", "completion", "ground_truth", "metadata_json", "deadline_s", "item_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    task: str
    prompt: str
    completion: str
    ground_truth: str
    metadata_json: str
    deadline_s: float
    item_id: str
    def __init__(self, task: _Optional[str] = ..., prompt: _Optional[str] = ..., completion: _Optional[str] = ..., ground_truth: _Optional[str] = ..., metadata_json: _Optional[str] = ..., deadline_s: _Optional[float] = ..., item_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RewardItem]
    def __init__(self, items: _Optional[_Iterable[_Union[RewardItem, _Mapping]]] = ...) -> None: ...

class RewardResult(_message.Message):
    __slots__ = ("reward", "status", "detail", "cached", "item_id")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    reward: float
    status: RewardStatus
    detail: str
    cached: bool
    item_id: str
    def __init__(self, reward: _Optional[float] = ..., status: _Optional[_Union[RewardStatus, str]] = ..., detail: _Optional[str] = ..., cached: _Optional[bool] = ..., item_id: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "verifier_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RewardResult]
    verifier_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[RewardResult, _Mapping]]] = ..., verifier_version: _Optional[str] = ...) -> None: ...
