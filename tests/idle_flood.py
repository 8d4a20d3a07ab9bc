"""An idle-connection attacker for the connection-hygiene tests (tests/test_hardening.py).

    python tests/idle_flood.py HOST PORT COUNT SOURCE_ADDRESS

Opens COUNT TCP connections from SOURCE_ADDRESS (a loopback address such as 127.0.0.2, so that
the server sees another peer than the test's own clients), completes the HTTP/2 handshake
(preface, SETTINGS, SETTINGS ACK), answers every PING and never sends a call. Connections the
server closes are not reopened. Every half second it prints one JSON line: {"open": N,
"opened": M}. Runs until killed (SIGTERM).
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING = 4, 6
ACK = 1


def frame(kind: int, flags: int, payload: bytes = b"", stream: int = 0) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def main() -> None:
    host, port, count, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    selector = selectors.DefaultSelector()
    buffers: dict[socket.socket, bytes] = {}
    opened = 0
    for _ in range(count):
        try:
            sock = socket.create_connection((host, port), timeout=5, source_address=(source, 0))
        except OSError:
            continue
        sock.sendall(PREFACE + frame(SETTINGS, 0))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
        opened += 1
    last = 0.0
    while True:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
                sock.close()
                buffers.pop(sock, None)
                continue
            buffer = buffers[sock] + data
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags, payload = buffer[3], buffer[4], buffer[9 : 9 + length]
                buffer = buffer[9 + length :]
                try:
                    if kind == SETTINGS and not flags & ACK:
                        sock.send(frame(SETTINGS, ACK))
                    elif kind == PING and not flags & ACK:
                        sock.send(frame(PING, ACK, payload))
                except OSError:
                    pass
            buffers[sock] = buffer
        if time.monotonic() - last >= 0.5:
            last = time.monotonic()
            print(json.dumps({"open": len(buffers), "opened": opened}), flush=True)


if __name__ == "__main__":
    main()
