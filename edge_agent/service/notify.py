"""The systemd notify protocol (sd_notify(3)) over $NOTIFY_SOCKET, without a dependency: one
datagram per message, `KEY=VALUE` lines. Outside systemd (no NOTIFY_SOCKET) every call is a
no-op.

The watchdog interval comes from $WATCHDOG_USEC (when $WATCHDOG_PID is unset or ours); the agent
sends WATCHDOG=1 from a task on its serving event loop at half that interval, so a stuck loop
misses it and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from edge_agent.observability.logging import get_logger

log = get_logger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address: str | None = env.get("NOTIFY_SOCKET") or None
        if self._address is not None and self._address.startswith("@"):
            self._address = "\0" + self._address[1:]  # abstract namespace
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._socket: socket.socket | None = None
        self._stopping = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str) -> None:
        """E.g. send(READY="1", STATUS="serving 3 models"). Failures are logged, never raised:
        the service manager going away must not take serving down."""
        if self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            log.warning("systemd.notify_failed", error=str(exc), fields=sorted(fields))

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def reloading(self) -> None:
        # systemd >= 253 wants the monotonic time with RELOADING=1 (Type=notify-reload).
        self.send(
            RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        )

    def stopping(self, status: str) -> None:
        """Once: the signal handler and the shutdown both say it, systemd needs it once."""
        if not self._stopping:
            self._stopping = True
            self.send(STOPPING="1", STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
