"""What the agent's HTTP listeners and the control plane's dashboard share: aiohttp's server
logger without tracebacks for what clients send, and the TLS context from the listeners' files."""

from __future__ import annotations

import logging
import ssl
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from edge_agent.settings import parse_address


class ClientErrorLogger(logging.LoggerAdapter):  # type: ignore[type-arg]  # generic at runtime only in 3.11
    """aiohttp's server logger, with a request that does not parse as HTTP (aiohttp answers
    400, or drains the unread rest of a body already answered) logged as one warning line:
    what a client sends is not an error of this process and must not flood the log with
    tracebacks. Any other failure keeps its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        cause = exc_info if isinstance(exc_info, BaseException) else None
        while cause is not None and not isinstance(cause, HttpProcessingError):
            cause = cause.__cause__  # a payload error raised from the parser's
        if cause is not None:
            self.logger.warning(f"{msg}: %s", *args, str(cause).replace("\n", " ")[:300])
        else:
            self.logger.error(msg, *args, exc_info=exc_info, **kwargs)


def ssl_context(cert: Any, key: Any, client_ca: Any) -> ssl.SSLContext:
    """The gRPC listeners' TLS settings for HTTPS: the same certificate and key, and with a
    client CA, mTLS (a client certificate from it required)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def serve(
    app: web.Application,
    address: str,
    key: str,
    idle_seconds: float,
    grace: float = 60.0,  # aiohttp's own default
    tls: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on HOST:PORT (the setting or flag `key` names it, for errors); returns the
    runner (to stop it: requests in progress get up to `grace` seconds, as on the gRPC
    listeners) and the bound port."""
    host, port = parse_address(address, key)
    runner = web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=idle_seconds,
        handle_signals=False,
        logger=ClientErrorLogger(),
        # Compressed bodies are refused (the agent's front end; a login form is never
        # compressed), so never inflated either: not even the unread rest that aiohttp drains
        # after a refusal.
        auto_decompress=False,
        shutdown_timeout=grace,
    )
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), port, ssl_context=tls, reuse_address=True)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1]) if sockets else port
