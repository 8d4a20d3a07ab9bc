"""`edge-agent control-plane serve`'s defaults, defined once: the settings dataclasses
(server.py, shared.py) and the command line's flags (cli.py) both read them.

Standard library only, so that the command line can show them in --help without importing
gRPC or a database driver.
"""

from __future__ import annotations

ADDRESS = "0.0.0.0:8010"
# A rollout pauses itself once more than this share of its devices report a failed install.
MAX_FAILURE_SHARE = 0.2

# Connections. Every device holds one long-poll almost all the time: a replica's call cap is
# about its fleet size (a held poll is a coroutine and a few KiB).
MAX_CONNECTIONS = 4096  # in total, before it is lowered to fit the file descriptor limit
MAX_CONNECTIONS_PER_PEER = 256  # devices behind one NAT share an address
MAX_CONCURRENT_RPCS = 20_000
# Devices poll with a call outstanding almost all the time, so a short idle timeout costs them
# nothing and frees what idle clients hold.
IDLE_SECONDS = 120.0
# A replica under a reconnecting fleet may take seconds to run a connection's first call: a
# first-call deadline of 10 s (the agent's) closed good connections then.
FIRST_REQUEST_SECONDS = 30.0

# What one caller may cost.
DEVICE_RATE = 20.0  # calls per second per device (a download is one call per blob)
DEVICE_BURST = 200
PUBLISHER_RATE = 100.0  # scripts polling FleetStatus included
PUBLISHER_BURST = 1000
MAX_BLOB_BYTES = 8 << 30
UPLOAD_SECONDS = 3600.0  # one whole blob upload
UPLOAD_IDLE_SECONDS = 60.0  # between two messages of an upload
