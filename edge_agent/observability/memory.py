"""The process's resident memory and its peak over an interval (Linux /proc).

The peak over an interval: writing "5" to /proc/self/clear_refs resets the kernel's high-water
mark (VmHWM, Linux >= 4.0), which is then read at the end. Where that is refused, the lifetime
peak (getrusage) is reported instead and `resettable` says so.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def reset_peak() -> bool:
    """Start a new peak interval; False where the kernel refuses (then peaks are lifetime)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024
