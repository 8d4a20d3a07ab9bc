from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TargetScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TARGET_SCOPE_UNSPECIFIED: _ClassVar[TargetScope]
    FLEET: _ClassVar[TargetScope]
    GROUP: _ClassVar[TargetScope]
    CANARY: _ClassVar[TargetScope]
TARGET_SCOPE_UNSPECIFIED: TargetScope
FLEET: TargetScope
GROUP: TargetScope
CANARY: TargetScope

class LearningSpec(_message.Message):
    __slots__ = ("model", "base_version", "scope", "group", "canary_percent", "trainable", "epochs", "batch_size", "lr", "optimizer", "buffer", "server_lr", "staleness_exponent", "max_staleness", "clip_norm", "trim", "int8_threshold", "max_accuracy_drop", "validation_blob", "min_examples", "train_seconds", "server_optimizer", "server_momentum", "server_beta1", "server_beta2", "server_tau", "proximal_mu", "min_interval", "max_wait", "min_updates", "aggregator", "dp_noise_multiplier", "dp_delta", "dp_max_epsilon")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    SERVER_LR_FIELD_NUMBER: _ClassVar[int]
    STALENESS_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    TRIM_FIELD_NUMBER: _ClassVar[int]
    INT8_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_BLOB_FIELD_NUMBER: _ClassVar[int]
    MIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SERVER_MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SERVER_BETA1_FIELD_NUMBER: _ClassVar[int]
    SERVER_BETA2_FIELD_NUMBER: _ClassVar[int]
    SERVER_TAU_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    MIN_UPDATES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    DP_MAX_EPSILON_FIELD_NUMBER: _ClassVar[int]
    model: str
    base_version: int
    scope: TargetScope
    group: str
    canary_percent: float
    trainable: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    buffer: int
    server_lr: float
    staleness_exponent: float
    max_staleness: int
    clip_norm: float
    trim: float
    int8_threshold: int
    max_accuracy_drop: float
    validation_blob: str
    min_examples: int
    train_seconds: float
    server_optimizer: str
    server_momentum: float
    server_beta1: float
    server_beta2: float
    server_tau: float
    proximal_mu: float
    min_interval: float
    max_wait: float
    min_updates: int
    aggregator: str
    dp_noise_multiplier: float
    dp_delta: float
    dp_max_epsilon: float
    def __init__(self, model: _Optional[str] = ..., base_version: _Optional[int] = ..., scope: _Optional[_Union[TargetScope, str]] = ..., group: _Optional[str] = ..., canary_percent: _Optional[float] = ..., trainable: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., optimizer: _Optional[str] = ..., buffer: _Optional[int] = ..., server_lr: _Optional[float] = ..., staleness_exponent: _Optional[float] = ..., max_staleness: _Optional[int] = ..., clip_norm: _Optional[float] = ..., trim: _Optional[float] = ..., int8_threshold: _Optional[int] = ..., max_accuracy_drop: _Optional[float] = ..., validation_blob: _Optional[str] = ..., min_examples: _Optional[int] = ..., train_seconds: _Optional[float] = ..., server_optimizer: _Optional[str] = ..., server_momentum: _Optional[float] = ..., server_beta1: _Optional[float] = ..., server_beta2: _Optional[float] = ..., server_tau: _Optional[float] = ..., proximal_mu: _Optional[float] = ..., min_interval: _Optional[float] = ..., max_wait: _Optional[float] = ..., min_updates: _Optional[int] = ..., aggregator: _Optional[str] = ..., dp_noise_multiplier: _Optional[float] = ..., dp_delta: _Optional[float] = ..., dp_max_epsilon: _Optional[float] = ...) -> None: ...

class StartLearningRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: LearningSpec
    def __init__(self, spec: _Optional[_Union[LearningSpec, _Mapping]] = ...) -> None: ...

class StopLearningRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    def __init__(self, task_id: _Optional[int] = ...) -> None: ...

class LearningStatusRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    def __init__(self, task_id: _Optional[int] = ...) -> None: ...

class GlobalVersion(_message.Message):
    __slots__ = ("version", "accuracy", "accepted", "released_version", "updates", "at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    accuracy: float
    accepted: bool
    released_version: int
    updates: int
    at: float
    def __init__(self, version: _Optional[int] = ..., accuracy: _Optional[float] = ..., accepted: _Optional[bool] = ..., released_version: _Optional[int] = ..., updates: _Optional[int] = ..., at: _Optional[float] = ...) -> None: ...

class LearningTask(_message.Message):
    __slots__ = ("id", "spec", "state", "global_version", "base_accuracy", "updates_received", "updates_applied", "dropped_stale", "clipped", "refused", "duplicates", "bytes_up", "versions", "devices", "buffered", "fp32_bytes_up", "progress", "active_devices", "dp_epsilon", "train_seconds", "paused_seconds", "notice", "best_accuracy")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    UPDATES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_FIELD_NUMBER: _ClassVar[int]
    FP32_BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    BEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    id: int
    spec: LearningSpec
    state: str
    global_version: int
    base_accuracy: float
    updates_received: int
    updates_applied: int
    dropped_stale: int
    clipped: int
    refused: int
    duplicates: int
    bytes_up: int
    versions: _containers.RepeatedCompositeFieldContainer[GlobalVersion]
    devices: int
    buffered: int
    fp32_bytes_up: int
    progress: str
    active_devices: int
    dp_epsilon: float
    train_seconds: float
    paused_seconds: float
    notice: str
    best_accuracy: float
    def __init__(self, id: _Optional[int] = ..., spec: _Optional[_Union[LearningSpec, _Mapping]] = ..., state: _Optional[str] = ..., global_version: _Optional[int] = ..., base_accuracy: _Optional[float] = ..., updates_received: _Optional[int] = ..., updates_applied: _Optional[int] = ..., dropped_stale: _Optional[int] = ..., clipped: _Optional[int] = ..., refused: _Optional[int] = ..., duplicates: _Optional[int] = ..., bytes_up: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[GlobalVersion, _Mapping]]] = ..., devices: _Optional[int] = ..., buffered: _Optional[int] = ..., fp32_bytes_up: _Optional[int] = ..., progress: _Optional[str] = ..., active_devices: _Optional[int] = ..., dp_epsilon: _Optional[float] = ..., train_seconds: _Optional[float] = ..., paused_seconds: _Optional[float] = ..., notice: _Optional[str] = ..., best_accuracy: _Optional[float] = ...) -> None: ...

class LearningStatusResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[LearningTask]
    def __init__(self, tasks: _Optional[_Iterable[_Union[LearningTask, _Mapping]]] = ...) -> None: ...

class LearningAssignment(_message.Message):
    __slots__ = ("task_id", "model", "base_version", "global_version", "global_weights", "trainable", "epochs", "batch_size", "lr", "optimizer", "int8_threshold", "min_examples", "train_seconds", "round", "proximal_mu", "min_interval")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    INT8_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    model: str
    base_version: int
    global_version: int
    global_weights: BlobRef
    trainable: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    int8_threshold: int
    min_examples: int
    train_seconds: float
    round: int
    proximal_mu: float
    min_interval: float
    def __init__(self, task_id: _Optional[int] = ..., model: _Optional[str] = ..., base_version: _Optional[int] = ..., global_version: _Optional[int] = ..., global_weights: _Optional[_Union[BlobRef, _Mapping]] = ..., trainable: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., optimizer: _Optional[str] = ..., int8_threshold: _Optional[int] = ..., min_examples: _Optional[int] = ..., train_seconds: _Optional[float] = ..., round: _Optional[int] = ..., proximal_mu: _Optional[float] = ..., min_interval: _Optional[float] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("task_id", "update_id", "base_global_version", "examples", "size", "sha256", "data", "train_seconds", "paused_seconds")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    update_id: str
    base_global_version: int
    examples: int
    size: int
    sha256: str
    data: bytes
    train_seconds: float
    paused_seconds: float
    def __init__(self, task_id: _Optional[int] = ..., update_id: _Optional[str] = ..., base_global_version: _Optional[int] = ..., examples: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ..., train_seconds: _Optional[float] = ..., paused_seconds: _Optional[float] = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("state", "global_version")
    STATE_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    state: str
    global_version: int
    def __init__(self, state: _Optional[str] = ..., global_version: _Optional[int] = ...) -> None: ...

class MissingBlobsRequest(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class MissingBlobsResponse(_message.Message):
    __slots__ = ("missing",)
    MISSING_FIELD_NUMBER: _ClassVar[int]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, missing: _Optional[_Iterable[str]] = ...) -> None: ...

class UploadBlobRequest(_message.Message):
    __slots__ = ("digest", "size", "data")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    data: bytes
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadBlobResponse(_message.Message):
    __slots__ = ("digest", "size")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class SetTargetRequest(_message.Message):
    __slots__ = ("model", "version", "scope", "group", "canary_percent", "analysis")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    scope: TargetScope
    group: str
    canary_percent: float
    analysis: CanaryAnalysis
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., scope: _Optional[_Union[TargetScope, str]] = ..., group: _Optional[str] = ..., canary_percent: _Optional[float] = ..., analysis: _Optional[_Union[CanaryAnalysis, _Mapping]] = ...) -> None: ...

class CanaryAnalysis(_message.Message):
    __slots__ = ("disabled", "max_error_rate_increase", "max_p99_ratio", "max_memory_ratio", "min_requests", "bake_seconds", "stages")
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_INCREASE_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BAKE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    disabled: bool
    max_error_rate_increase: float
    max_p99_ratio: float
    max_memory_ratio: float
    min_requests: int
    bake_seconds: float
    stages: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, disabled: _Optional[bool] = ..., max_error_rate_increase: _Optional[float] = ..., max_p99_ratio: _Optional[float] = ..., max_memory_ratio: _Optional[float] = ..., min_requests: _Optional[int] = ..., bake_seconds: _Optional[float] = ..., stages: _Optional[_Iterable[float]] = ...) -> None: ...

class RegisterReleaseRequest(_message.Message):
    __slots__ = ("release_json", "signature", "activate", "target", "variant_signatures")
    class VariantSignaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    RELEASE_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    VARIANT_SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    release_json: bytes
    signature: bytes
    activate: bool
    target: SetTargetRequest
    variant_signatures: _containers.ScalarMap[str, bytes]
    def __init__(self, release_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., activate: _Optional[bool] = ..., target: _Optional[_Union[SetTargetRequest, _Mapping]] = ..., variant_signatures: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class RegisterReleaseResponse(_message.Message):
    __slots__ = ("model", "version", "rollout")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    rollout: RolloutStatus
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., rollout: _Optional[_Union[RolloutStatus, _Mapping]] = ...) -> None: ...

class ControlRolloutRequest(_message.Message):
    __slots__ = ("model", "action")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[ControlRolloutRequest.Action]
        PAUSE: _ClassVar[ControlRolloutRequest.Action]
        RESUME: _ClassVar[ControlRolloutRequest.Action]
        ROLLBACK: _ClassVar[ControlRolloutRequest.Action]
    ACTION_UNSPECIFIED: ControlRolloutRequest.Action
    PAUSE: ControlRolloutRequest.Action
    RESUME: ControlRolloutRequest.Action
    ROLLBACK: ControlRolloutRequest.Action
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    action: ControlRolloutRequest.Action
    def __init__(self, model: _Optional[str] = ..., action: _Optional[_Union[ControlRolloutRequest.Action, str]] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("id", "model", "version", "scope", "group", "canary_percent", "state", "reason", "devices", "failed", "device_count", "device_states", "analysis", "verdict")
    class DeviceStatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_STATES_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    id: int
    model: str
    version: int
    scope: TargetScope
    group: str
    canary_percent: float
    state: str
    reason: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    failed: int
    device_count: int
    device_states: _containers.ScalarMap[str, int]
    analysis: CanaryAnalysis
    verdict: CanaryVerdict
    def __init__(self, id: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., scope: _Optional[_Union[TargetScope, str]] = ..., group: _Optional[str] = ..., canary_percent: _Optional[float] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., failed: _Optional[int] = ..., device_count: _Optional[int] = ..., device_states: _Optional[_Mapping[str, int]] = ..., analysis: _Optional[_Union[CanaryAnalysis, _Mapping]] = ..., verdict: _Optional[_Union[CanaryVerdict, _Mapping]] = ...) -> None: ...

class CohortHealth(_message.Message):
    __slots__ = ("version", "requests", "failures", "error_rate", "p99_ms", "mean_rss_bytes", "reports")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    requests: int
    failures: int
    error_rate: float
    p99_ms: float
    mean_rss_bytes: float
    reports: int
    def __init__(self, version: _Optional[int] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., error_rate: _Optional[float] = ..., p99_ms: _Optional[float] = ..., mean_rss_bytes: _Optional[float] = ..., reports: _Optional[int] = ...) -> None: ...

class CanaryVerdict(_message.Message):
    __slots__ = ("verdict", "reason", "canary", "baseline", "judged_at", "stage")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    JUDGED_AT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    verdict: str
    reason: str
    canary: CohortHealth
    baseline: CohortHealth
    judged_at: float
    stage: int
    def __init__(self, verdict: _Optional[str] = ..., reason: _Optional[str] = ..., canary: _Optional[_Union[CohortHealth, _Mapping]] = ..., baseline: _Optional[_Union[CohortHealth, _Mapping]] = ..., judged_at: _Optional[float] = ..., stage: _Optional[int] = ...) -> None: ...

class ModelReport(_message.Message):
    __slots__ = ("model", "installed_version", "serving_version", "target_version", "state", "error", "variant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    installed_version: int
    serving_version: int
    target_version: int
    state: str
    error: str
    variant: str
    def __init__(self, model: _Optional[str] = ..., installed_version: _Optional[int] = ..., serving_version: _Optional[int] = ..., target_version: _Optional[int] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("known_revision", "wait_ms", "reports", "agent_version", "health")
    KNOWN_REVISION_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    known_revision: str
    wait_ms: int
    reports: _containers.RepeatedCompositeFieldContainer[ModelReport]
    agent_version: str
    health: DeviceHealth
    def __init__(self, known_revision: _Optional[str] = ..., wait_ms: _Optional[int] = ..., reports: _Optional[_Iterable[_Union[ModelReport, _Mapping]]] = ..., agent_version: _Optional[str] = ..., health: _Optional[_Union[DeviceHealth, _Mapping]] = ...) -> None: ...

class DeviceHealth(_message.Message):
    __slots__ = ("boot", "uptime_seconds", "rss_bytes", "disk_free_bytes", "load1", "versions")
    BOOT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    boot: str
    uptime_seconds: float
    rss_bytes: int
    disk_free_bytes: int
    load1: float
    versions: _containers.RepeatedCompositeFieldContainer[VersionHealth]
    def __init__(self, boot: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., rss_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., load1: _Optional[float] = ..., versions: _Optional[_Iterable[_Union[VersionHealth, _Mapping]]] = ...) -> None: ...

class VersionHealth(_message.Message):
    __slots__ = ("model", "version", "provider", "requests", "failures", "rejections", "latency_us", "compute_us", "latency_buckets")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    provider: str
    requests: int
    failures: int
    rejections: int
    latency_us: int
    compute_us: int
    latency_buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., provider: _Optional[str] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., rejections: _Optional[int] = ..., latency_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., latency_buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelTarget(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("revision", "models", "learning")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_FIELD_NUMBER: _ClassVar[int]
    revision: str
    models: _containers.RepeatedCompositeFieldContainer[ModelTarget]
    learning: _containers.RepeatedCompositeFieldContainer[LearningAssignment]
    def __init__(self, revision: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelTarget, _Mapping]]] = ..., learning: _Optional[_Iterable[_Union[LearningAssignment, _Mapping]]] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ("digest", "size", "chunk_size", "chunk_digests")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size: int
    chunk_size: int
    chunk_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digest: _Optional[str] = ..., size: _Optional[int] = ..., chunk_size: _Optional[int] = ..., chunk_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("release_json", "signature", "blobs", "variant_signatures")
    class VariantSignaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    RELEASE_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    release_json: bytes
    signature: bytes
    blobs: _containers.RepeatedCompositeFieldContainer[BlobRef]
    variant_signatures: _containers.ScalarMap[str, bytes]
    def __init__(self, release_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., blobs: _Optional[_Iterable[_Union[BlobRef, _Mapping]]] = ..., variant_signatures: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class GetBlobRequest(_message.Message):
    __slots__ = ("digest", "offset")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class FleetStatusRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "rollout_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    rollout_id: int
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., rollout_id: _Optional[int] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("device_id", "group", "last_seen", "last_error", "models", "desired")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    group: str
    last_seen: float
    last_error: str
    models: _containers.RepeatedCompositeFieldContainer[ModelReport]
    desired: _containers.RepeatedCompositeFieldContainer[ModelTarget]
    def __init__(self, device_id: _Optional[str] = ..., group: _Optional[str] = ..., last_seen: _Optional[float] = ..., last_error: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelReport, _Mapping]]] = ..., desired: _Optional[_Iterable[_Union[ModelTarget, _Mapping]]] = ...) -> None: ...

class FleetStatusResponse(_message.Message):
    __slots__ = ("devices", "rollouts", "next_page_token")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutStatus]
    next_page_token: str
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ..., rollouts: _Optional[_Iterable[_Union[RolloutStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeviceEnrollment(_message.Message):
    __slots__ = ("device_id", "group")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    group: str
    def __init__(self, device_id: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class EnrollDevicesRequest(_message.Message):
    __slots__ = ("devices", "rotate")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ROTATE_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceEnrollment]
    rotate: bool
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceEnrollment, _Mapping]]] = ..., rotate: _Optional[bool] = ...) -> None: ...

class DeviceToken(_message.Message):
    __slots__ = ("device_id", "token")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    token: str
    def __init__(self, device_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class EnrollDevicesResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[DeviceToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[DeviceToken, _Mapping]]] = ...) -> None: ...

class RevokeDeviceRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class RevokeDeviceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
