"""The one place where exceptions become gRPC statuses."""

from __future__ import annotations

import grpc

from edge_agent.errors import EdgeAgentError
from edge_agent.observability.logging import get_logger

log = get_logger(__name__)


def to_status(exc: BaseException, **context: object) -> tuple[grpc.StatusCode, str]:
    """Our errors keep their code and message; anything else is INTERNAL, logged with traceback."""
    if isinstance(exc, EdgeAgentError) and type(exc) is not EdgeAgentError:
        if exc.log_each:
            log.warning("request.failed", code=exc.code.name, error=str(exc), **context)
        return exc.code, str(exc)
    log.error("request.failed", code="INTERNAL", exc_info=exc, **context)
    return grpc.StatusCode.INTERNAL, "internal error (see the agent's log)"
