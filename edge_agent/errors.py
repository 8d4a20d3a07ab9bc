"""The one exception tree of edge-agent; rpc/status.py is the one place that puts it on the wire.

    EdgeAgentError                  INTERNAL (never shown as-is to a client)
    ├── InvalidArgument             INVALID_ARGUMENT: the request itself is wrong
    │   └── ReleaseRejected         a fleet release failed a check (`reason`: a short label)
    ├── NotFound                    NOT_FOUND: no such model or version
    ├── AlreadyExists               ALREADY_EXISTS: e.g. a shared memory region registered twice
    ├── Unavailable                 UNAVAILABLE: exists but cannot serve now (retryable)
    │   └── QueueFull               UNAVAILABLE: the model's bounded queue is full (retry later)
    ├── Unauthenticated             UNAUTHENTICATED: no or unknown credentials
    ├── PermissionDenied            PERMISSION_DENIED: valid credentials, wrong role
    ├── FailedPrecondition          FAILED_PRECONDITION: valid, but not in the current state
    ├── ResourceExhausted           RESOURCE_EXHAUSTED: a rate or size limit (retry later)
    │   └── DiskFull                the device's disk cannot take the bytes (`needed`, `free`)
    ├── Aborted                     ABORTED: superseded by a newer call (a device's new poll)
    ├── DeadlineExceeded            DEADLINE_EXCEEDED: its deadline passed before it ran
    ├── ExecutionError              INTERNAL: ONNX Runtime failed on a request that passed checks
    ├── ModelLoadError              a model version could not be loaded (kept as its reason)
    └── ConfigError                 the daemon's own configuration is invalid (exit code 78)

Foreign exceptions are translated at the boundary where they occur into the most specific class
here (``raise ... from exc``); anything else reaching the API becomes INTERNAL with a generic
message and a logged traceback.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import grpc


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    log_each = True  # rpc/status.py logs each failed call (request.failed)


class InvalidArgument(EdgeAgentError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ReleaseRejected(InvalidArgument):
    """A release or one of its files failed a check (fleet/release.py, sync/); `reason` labels
    edge_agent_sync_failures_total and the report sent to the control plane."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AlreadyExists(EdgeAgentError):
    """It exists already (a shared memory region registered twice)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(EdgeAgentError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(EdgeAgentError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(EdgeAgentError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(EdgeAgentError):
    code = grpc.StatusCode.UNAVAILABLE


class Retiring(Unavailable):
    """A version being swapped out refused a request that reached it late (a caller on another
    thread, between finding the version and queueing): the caller asks again, and finds the
    new one."""


class QueueFull(Unavailable):
    """Admission refused: the queue of the request's priority level is full. Counted (the
    model's statistics and metrics), not logged one by one: under overload they come by the
    thousand per second, and each line would cost the event loop more than the refusal."""

    log_each = False


class FailedPrecondition(EdgeAgentError):
    """The request is well-formed but the system's state refuses it (e.g. nothing to roll back
    to)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(EdgeAgentError):
    """A per-caller rate or a size limit refused the call. Counted, not logged one by one: a
    flood of them must not flood the log too."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    log_each = False


class DiskFull(ResourceExhausted):
    """A write found the filesystem full (ENOSPC, EDQUOT) or a check found too little room;
    retried once space is free (the sync's `disk_full`). Logged: an operator must hear of it."""

    log_each = True

    def __init__(self, path: Path, needed: int, what: str) -> None:
        try:
            self.free = shutil.disk_usage(path).free
        except OSError:
            self.free = 0
        self.needed = needed
        super().__init__(f"disk full: {what} needs {needed} bytes, {self.free} are free on {path}")

    @staticmethod
    def caused(exc: BaseException) -> bool:
        """The exception, or one it came from, is a full filesystem."""
        while exc is not None:
            if isinstance(exc, DiskFull) or (
                isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            ):
                return True
            exc = exc.__cause__  # type: ignore[assignment]
        return False


class Aborted(EdgeAgentError):
    """The call was superseded (a device's newer long-poll replaces its older one)."""

    code = grpc.StatusCode.ABORTED
    log_each = False


class DeadlineExceeded(EdgeAgentError):
    """The request's deadline (gRPC, `timeout` parameter or queue policy) passed in the queue;
    it was not executed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ExecutionError(EdgeAgentError):
    """ONNX Runtime failed while running a request that passed our checks; its message is kept."""


class ModelLoadError(EdgeAgentError):
    """A model version failed to load; the message is the reason shown in RepositoryIndex."""

    code = grpc.StatusCode.UNAVAILABLE


class ConfigError(EdgeAgentError):
    """Invalid daemon configuration: reported at start with a clear message and exit code 78."""

    code = grpc.StatusCode.FAILED_PRECONDITION
