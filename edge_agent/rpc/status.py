"""The one place where exceptions become gRPC statuses, and the one handler wrapper that puts
them on the wire: every servicer method (the agent's asyncio and sync listeners, the control
plane's) answers through `answers` / `answers_sync`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from edge_agent.errors import EdgeAgentError, InvalidArgument
from edge_agent.observability.logging import get_logger
from edge_agent.rpc.wire import Malformed

log = get_logger(__name__)

S = TypeVar("S")
R = TypeVar("R")


def to_status(exc: BaseException, **context: object) -> tuple[grpc.StatusCode, str]:
    """Our errors keep their code and message; anything else is INTERNAL, logged with traceback."""
    if isinstance(exc, EdgeAgentError) and type(exc) is not EdgeAgentError:
        if exc.log_each:
            log.warning("request.failed", code=exc.code.name, error=str(exc), **context)
        return exc.code, str(exc)
    log.error("request.failed", code="INTERNAL", exc_info=exc, **context)
    return grpc.StatusCode.INTERNAL, "internal error (see the agent's log)"


def parsed(request: Any) -> None:
    """Raise InvalidArgument for a request whose bytes did not parse (rpc/wire.py)."""
    if isinstance(request, Malformed):
        raise InvalidArgument(request.reason)


def call_fields(rpc: str, request: Any) -> dict[str, object]:
    """What a failed call's log line carries: the method, and the model and request id when
    the request names them."""
    fields: dict[str, object] = {"rpc": rpc}
    model = getattr(request, "model_name", None) or getattr(request, "name", None)
    if isinstance(model, str) and model:
        fields["model"] = model
    request_id = getattr(request, "id", None)
    if isinstance(request_id, str) and request_id:
        fields["request_id"] = request_id
    return fields


def answers(
    method: Callable[[S, Any, Any], Awaitable[R]],
) -> Callable[[S, Any, Any], Awaitable[R]]:
    """An asyncio servicer method whose failures answer with their status and message."""

    @functools.wraps(method)
    async def wrapped(self: S, request: Any, context: Any) -> R:
        try:
            parsed(request)
            return await method(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message = to_status(exc, **call_fields(method.__name__, request))
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises") from exc

    return wrapped


def answers_sync(method: Callable[[S, Any, Any], R]) -> Callable[[S, Any, Any], R]:
    """`answers` for a method of gRPC's synchronous server (its abort does not await)."""

    @functools.wraps(method)
    def wrapped(self: S, request: Any, context: grpc.ServicerContext) -> R:
        try:
            parsed(request)
            return method(self, request, context)
        except Exception as exc:
            code, message = to_status(exc, **call_fields(method.__name__, request))
            context.abort(code, message)
            raise AssertionError("unreachable: abort raises") from exc

    return wrapped
