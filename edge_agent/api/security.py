"""Who may call what: TLS / mTLS credentials for the listeners (reloadable on SIGHUP) and the
gate between the inference listener and the control listener.

Control RPCs (RepositoryModelLoad / Unload: they change what the agent serves) are served on the
control listener (`control_address`, loopback by default). There, with `control_token_file` set,
every call needs `authorization: Bearer <token>` (UNAUTHENTICATED otherwise); with
`tls_client_ca` the TLS handshake already refused clients without a certificate from that CA.
On the inference listener the control RPCs answer PERMISSION_DENIED unless
`control_on_inference_listener` is set (their handlers are replaced when the server is built:
no interceptor sits on the inference path).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from edge_agent.errors import ConfigError, PermissionDenied
from edge_agent.fleet import auth
from edge_agent.observability.logging import get_logger
from edge_agent.settings import Settings

log = get_logger(__name__)

CONTROL_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from exc


class ServerTls:
    """The listeners' TLS credentials from tls_cert / tls_key / tls_client_ca. `reload()` (SIGHUP)
    re-reads the files; new connections get the new certificate, open ones keep theirs."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._current = self._configuration()
        self._generation = 0

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        key = _read(self._settings.tls_key, "tls_key")
        cert = _read(self._settings.tls_cert, "tls_cert")
        assert key is not None and cert is not None
        ca = _read(self._settings.tls_client_ca, "tls_client_ca")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for one listener (gRPC does not share them between servers)."""
        served = {"generation": self._generation}

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before each handshake: the new configuration once after a reload.
            if served["generation"] == self._generation:
                return None
            served["generation"] = self._generation
            return self._current

        return grpc.dynamic_ssl_server_credentials(
            self._current,
            fetch,
            require_client_authentication=self._settings.tls_client_ca is not None,
        )

    def reload(self, settings: Settings) -> None:
        self._settings = settings
        try:
            self._current = self._configuration()
            self._generation += 1
            log.info("tls.reloaded", cert=str(settings.tls_cert))
        except ConfigError as exc:
            log.error("tls.reload_failed", error=str(exc))


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def control_denied(setting: str) -> PermissionDenied:
    """The answer to a control RPC on an inference listener (gRPC or HTTP); `setting` names the
    control listener's address setting."""
    return PermissionDenied(
        f"model load / unload is served on the control listener ({setting}), "
        "not on the inference listener"
    )


def control_elsewhere() -> grpc.RpcMethodHandler:
    """The handler of a control RPC on the asyncio inference listener."""
    denied = control_denied("control_address")
    return _deny(denied.code, str(denied))


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


# grpc ships no type information here (mypy sees Any).
class ControlGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """On the control listener: a bearer token, when one is configured, for every call."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if self._token is not None:
            presented, _ = auth.bearer(details.invocation_metadata)
            if not auth.same(presented, self._token):
                return _deny(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "the control listener needs 'authorization: Bearer <token>'",
                )
        return await continuation(details)
