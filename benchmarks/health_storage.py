"""What fleet health costs the control plane's database at 10,000 devices (README: Fleet health):

    .venv/bin/python benchmarks/health_storage.py [--devices 10000]

Writes, through the registry's own write path, a full day of device-hours and of fleet minutes
and a month of fleet hours for DEVICES devices serving one model in one group into a fresh
SQLite registry, and prints its size and the row counts (then the time of the two reads the
canary judgement and the dashboard's device page make).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.controlplane.health import BUCKETS, Bucket, Counters, Pending, Sample
from edge_agent.controlplane.registry import SqliteRegistry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "registry.sqlite"
        registry = SqliteRegistry(path)
        empty = path.stat().st_size
        now = time.time()
        hour0 = int(now // 3600 * 3600)
        served = Counters(1000, 10, 2, 900_000, 500_000, tuple([40] * BUCKETS))
        devices = [f"device-{d:05d}" for d in range(args.devices)]
        began = time.perf_counter()
        for hour in range(24):
            pending = Pending()
            for device in devices:
                bucket = Bucket()
                bucket.add(served, 200 << 20, 10 << 30)
                pending.devices[(device, hour0 - hour * 3600)] = bucket
            for minute in range(60):
                bucket = Bucket()
                bucket.add(served, 200 << 20)
                pending.minutes[("mlp", 1, "", hour0 - hour * 3600 + minute * 60)] = bucket
            registry.write_pending(pending)
        for hour in range(720):
            pending = Pending()
            bucket = Bucket()
            bucket.add(served, 200 << 20)
            pending.hours[("mlp", 1, "", hour0 - hour * 3600)] = bucket
            registry.write_pending(pending)
        sample = Sample("boot", now, 1000.0, 200 << 20, 10 << 30, 0.5, {("mlp", 1): served})
        waiting = {device: (sample, "") for device in devices}
        registry.write_health(waiting)  # every device's last report
        wrote = time.perf_counter() - began
        registry.database.execute("VACUUM")
        size = path.stat().st_size - empty
        rows = {
            table: registry.database.execute(f"SELECT COUNT(*) AS n FROM {table}").first()["n"]
            for table in ("health_minutes", "health_hours", "device_hours", "device_health")
        }
        began = time.perf_counter()
        registry.version_health("mlp", 1, now - 3600)
        window_ms = (time.perf_counter() - began) * 1000
        began = time.perf_counter()
        registry.device_series(devices[:1000], now - 86400)
        page_ms = (time.perf_counter() - began) * 1000
        registry.close()
    print(json.dumps({
        "devices": args.devices, "bytes": size, "rows": rows, "write_seconds": round(wrote, 1),
        "canary_window_query_ms": round(window_ms, 2),
        "device_page_query_ms": round(page_ms, 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
