"""structlog, configured once: JSON lines to stdout when it is not a TTY (journald), a console
renderer on a TTY. Per-request context travels in contextvars; stdlib loggers (grpc, asyncio) are
routed through the same processors so every line has one format."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


_METHOD_LEVELS = {**_LEVELS, "warn": 30, "exception": 40, "fatal": 50, "msg": 20}
_threshold = {"level": _LEVELS["info"]}


def _by_level(
    _: object, method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """The level filter, read at each call so that set_log_level (SIGHUP) applies to loggers
    already bound and cached."""
    if _METHOD_LEVELS.get(method, 100) < _threshold["level"]:
        raise structlog.DropEvent
    return event_dict


def set_log_level(level: str) -> None:
    _threshold["level"] = _LEVELS[level]
    logging.getLogger().setLevel(max(_LEVELS[level], logging.WARNING))


class _PeerGone(logging.Filter):
    """grpc's asyncio server logs an error with a traceback (ExecuteBatchError) when it cannot
    send an answer because the peer is gone (a device killed mid-download, a client cancelled):
    an ordinary end of a call on a fleet. Said once, at info, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name.startswith("grpc") and type(exc).__name__ == "ExecuteBatchError":
            message = record.getMessage()
            method = message[message.find("[") + 1 : message.rfind("]")] if "[" in message else ""
            get_logger("grpc").info("call.peer_gone", method=method)
            return False
        return True


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    _threshold["level"] = _LEVELS[level]
    structlog.configure(
        processors=[
            _by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS["debug"]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    handler.addFilter(_PeerGone())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.WARNING))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
