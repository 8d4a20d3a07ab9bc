"""Bearer tokens for the fleet protocol.

The publisher token lives in the control plane's data dir (mode 0600); device tokens are stored
only as sha256 hashes. Every comparison is constant-time (`hmac.compare_digest`); no token is ever
logged. Credentials travel as call metadata: `authorization: Bearer <token>` and, for a device,
`x-device-id: <id>`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from edge_agent.errors import ConfigError

AUTHORIZATION = "authorization"
DEVICE_ID = "x-device-id"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def write_secret(path: Path, token: str) -> None:
    """Create `path` with mode 0600 (never readable by others, even for a moment). An existing
    file is never overwritten: it may hold another credential (FileExistsError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)


def read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"token file {path}: {exc.strerror or exc}") from exc
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def metadata(token: str, device_id: str | None = None) -> Sequence[tuple[str, str]]:
    items = [(AUTHORIZATION, f"Bearer {token}")]
    if device_id is not None:
        items.append((DEVICE_ID, device_id))
    return tuple(items)


def bearer_token(value: str | bytes) -> str:
    """The token of an Authorization value `Bearer TOKEN` (the scheme in any case, RFC 6750);
    "" when the value is anything else. Every listener (gRPC metadata, HTTP headers) reads its
    credentials through this one function."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def bearer(invocation_metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[str, str]:
    """(token, device id) from call metadata; empty strings when absent."""
    token = device = ""
    for key, value in invocation_metadata or ():
        if key == AUTHORIZATION:
            token = bearer_token(value)
        elif key == DEVICE_ID:
            device = value.decode(errors="replace") if isinstance(value, bytes) else value
    return token, device
