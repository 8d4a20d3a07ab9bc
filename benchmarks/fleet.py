"""Fleet simulator: how many devices one control plane (and two) holds, and how fast a release
reaches them all (BENCHMARKS.md "Fleet scale").

    .venv/bin/python benchmarks/fleet.py --devices 10000 [--backend sqlite|scale]
        [--replicas 1|2] [--rest-seconds 20] [--out FILE.json]

Each simulated device is a coroutine speaking the real device protocol over grpc.aio (many per
process, 100 per HTTP/2 connection, as a NAT'd site would): WatchDesiredState long-polls (30 s
wait) carrying its reports, GetManifest on a change, GetBlob streams for the blobs it lacks with
every chunk checked against the manifest's chunk digest and the whole against the blob digest,
then "serving" in its next report. It does not verify signatures or run models (the agent's own
tests do).

Steps, against real control-plane processes (SQLite + directory, or PostgreSQL + SeaweedFS,
started here from tests/services.py):
1. enroll N devices (EnrollDevices, bulk); publish the wide MLP v1 (80 MB): the devices start
   with it installed (its blobs known to them), so that the update is what moves;
2. at rest (devices started spread over 10 s, each answered once and holding its next poll):
   for REST seconds a probe device polls with an unknown revision (answered at once):
   round-trip p50/p99; control-plane CPU and resident memory;
3. a one-layer update of the wide MLP (v2: only its last matrix changes, ~160 KB): seconds from
   the start of publishing (what `edge-agent publish` does: split, sign, upload what is missing,
   register and target) until every device serves it;
4. a full install of a small model (the shipped digits, 20 KB) to every device, the same;
5. a bad canary: a third version of the wide MLP to 5% of the devices, where it answers 10x
   slower (the serving-health model: each device serves REQUESTS_PER_S requests a second of
   the version it runs, at its version's latency, a share of them failing, and reports the
   counts on every long-poll as an agent does): seconds from the first canary device serving
   it to the rollout rolled back, and the control plane's CPU meanwhile;
6. database size; every gRPC error a device saw, by code.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks import charts, models  # noqa: E402
from benchmarks.progress import step  # noqa: E402
from benchmarks.run import free_port, wait_port  # noqa: E402
from benchmarks.sync import publish, with_last_layer  # noqa: E402
from edge_agent._proto import fleet_pb2 as pb  # noqa: E402
from edge_agent._proto import fleet_pb2_grpc as pb_grpc  # noqa: E402
from edge_agent.fleet import auth, signing  # noqa: E402
from edge_agent.scheduling.stats import LATENCY_BUCKETS_MS  # noqa: E402

EA = [sys.executable, "-m", "edge_agent"]
PER_CHANNEL = 100
SPREAD_S = 10.0  # devices start spread over this long
STEPS = 5  # the numbered steps of the module docstring that measure (6 only reads sizes)
# Each channel its own TCP connection (gRPC would share one between channels to one address).
DETAILS: list[str] = []  # the first errors the devices saw, for the report
T0 = time.monotonic()
# FLEET_LOGS=DIR keeps the control planes' logs; FLEET_LOG_LEVEL=info makes them talk.
WAIT_MS = 30_000
REQUESTS_PER_S = 10.0  # what each simulated device serves
LATENCY_MS = 2.0  # a version's latency on a device, unless SERVING says otherwise
# (model, version) -> (latency in ms, failing share): how a version serves on the devices.
SERVING: dict[tuple[str, int], tuple[float, float]] = {}


class Device:
    def __init__(self, device_id: str, token: str, have: set[str], serving: dict[str, int]):
        self.id = device_id
        self.meta = auth.metadata(token, device_id)
        self.have = set(have)
        self.serving = dict(serving)
        self.reached: dict[tuple[str, int], float] = {}
        self.errors: Counter[str] = Counter()
        self.bytes = 0
        self.answered = 0  # long-polls answered
        self.boot = f"sim-{random.getrandbits(48):012x}"
        self.started = self.last = time.monotonic()
        self.counters: dict[tuple[str, int], list[int]] = {}  # requests, failures, bucket

    def health(self) -> pb.DeviceHealth:
        """Requests served since the last report, at the running version's latency, added to
        the cumulative counters an agent reports."""
        now = time.monotonic()
        elapsed, self.last = now - self.last, now
        health = pb.DeviceHealth(
            boot=self.boot, uptime_seconds=now - self.started, rss_bytes=200 << 20,
            disk_free_bytes=8 << 30, load1=0.3,
        )  # fmt: skip
        for model, version in sorted(self.serving.items()):
            latency, failing = SERVING.get((model, version), (LATENCY_MS, 0.0))
            bucket = bisect.bisect_left(LATENCY_BUCKETS_MS, latency)
            counts = self.counters.setdefault((model, version), [0, 0, bucket])
            served = int(REQUESTS_PER_S * elapsed)
            counts[0] += served
            counts[1] += int(served * failing)
            buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
            buckets[counts[2]] = counts[0]
            health.versions.add(
                model=model, version=version, provider="CPUExecutionProvider",
                requests=counts[0], failures=counts[1], latency_us=int(counts[0] * latency * 1000),
                compute_us=int(counts[0] * latency * 500), latency_buckets=buckets,
            )  # fmt: skip
        return health

    def reports(self) -> list[pb.ModelReport]:
        return [
            pb.ModelReport(
                model=m,
                installed_version=v,
                serving_version=v,
                target_version=v,
                state="serving",
            )
            for m, v in sorted(self.serving.items())
        ]

    async def run(self, stub: Any, stop: asyncio.Event, spread: float = 0.0) -> None:
        # A fleet at rest is not in step: devices start (and so time out) spread over `spread`.
        await asyncio.sleep(random.uniform(0, spread))
        revision = ""
        while not stop.is_set():
            try:
                request = pb.WatchRequest(
                    known_revision=revision,
                    wait_ms=WAIT_MS,
                    reports=self.reports(),
                    health=self.health(),
                )
                state = await stub.WatchDesiredState(
                    request, metadata=self.meta, timeout=WAIT_MS / 1000 + 30
                )
                self.answered += 1
                for target in state.models:
                    if self.serving.get(target.model) != target.version:
                        await self.install(stub, target.model, target.version)
                revision = state.revision
            except grpc.aio.AioRpcError as exc:
                if stop.is_set():
                    return
                self.errors[exc.code().name] += 1
                if len(DETAILS) < 40:
                    DETAILS.append(
                        f"{time.monotonic() - T0:.1f}s {exc.code().name}: {exc.details()}"
                    )
                revision = ""
                await asyncio.sleep(random.uniform(0.5, 2.0))  # an agent backs off, jittered
            except asyncio.CancelledError:
                return

    async def install(self, stub: Any, model: str, version: int) -> None:
        manifest = await stub.GetManifest(
            pb.GetManifestRequest(model=model, version=version), metadata=self.meta, timeout=30
        )
        for blob in manifest.blobs:
            if blob.digest in self.have:
                continue
            whole = hashlib.sha256()
            index, buffer = 0, bytearray()
            async for piece in stub.GetBlob(
                pb.GetBlobRequest(digest=blob.digest, offset=0), metadata=self.meta, timeout=120
            ):
                buffer += piece.data
                while len(buffer) >= blob.chunk_size or (
                    buffer and self.bytes_after(blob, index, buffer)
                ):
                    take = min(len(buffer), blob.chunk_size)
                    chunk = bytes(buffer[:take])
                    if hashlib.sha256(chunk).hexdigest() != blob.chunk_digests[index]:
                        raise RuntimeError(f"{self.id}: chunk {index} of {blob.digest} is corrupt")
                    whole.update(chunk)
                    del buffer[:take]
                    index += 1
                self.bytes += len(piece.data)
            if whole.hexdigest() != blob.digest or index != len(blob.chunk_digests):
                raise RuntimeError(f"{self.id}: blob {blob.digest} is incomplete or corrupt")
            self.have.add(blob.digest)
        self.health()  # what it served until now was the old version's
        self.serving[model] = version
        self.reached[(model, version)] = time.monotonic()

    @staticmethod
    def bytes_after(blob: Any, index: int, buffer: bytearray) -> bool:
        """The last chunk is short: complete once the blob's remaining bytes are all here."""
        remaining = blob.size - index * blob.chunk_size
        return 0 < remaining <= blob.chunk_size and len(buffer) >= remaining


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_control_plane(
    work: Path, name: str, extra: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = open(Path(os.environ.get("FLEET_LOGS", work)) / f"{name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *EA, "control-plane", "serve", "--data-dir", str(work / name),
            "--address", f"127.0.0.1:{port}",
            "--log-level", os.environ.get("FLEET_LOG_LEVEL", "warning"),
            # A simulated site: every device behind one address, many per connection.
            "--device-rate", "1000",
            "--publisher-rate", "10000", *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )  # fmt: skip
    wait_port(port, proc, 60)  # type: ignore[arg-type]
    return proc, port


async def wait_all(
    devices: list[Device], key: tuple[str, int], limit: float, start: float
) -> float | None:
    """Seconds from `start` until every device reached `key` (None past the limit)."""
    while time.monotonic() - start < limit:
        if all(key in d.reached for d in devices):
            return max(d.reached[key] for d in devices) - start
        await asyncio.sleep(0.05)
    return None


def arrivals(devices: list[Device], key: tuple[str, int], start: float) -> list[list[float]]:
    """[seconds since `start`, share of devices serving `key` by then], for the chart."""
    seconds = [d.reached[key] - start for d in devices if key in d.reached]
    return charts.sample_curve(seconds, len(devices))


async def simulate(args: argparse.Namespace, work: Path, env: dict[str, str], cp_args: list[str],
                   replicas: int) -> dict[str, Any]:  # fmt: skip
    procs = []
    first, port = start_control_plane(work, "cp1", cp_args, env)
    procs.append((first, port))
    token_file = work / "cp1" / "publisher.token"
    for i in range(2, replicas + 1):
        procs.append(
            start_control_plane(
                work, f"cp{i}", [*cp_args, "--publisher-token-file", str(token_file)], env
            )
        )
    publisher = auth.metadata(auth.read_token(token_file))
    key, pub = work / "k.pem", work / "k.pub"
    signing.generate_keypair(key, pub)
    result: dict[str, Any] = {"devices": args.devices, "replicas": replicas}
    try:
        # 1. enroll, and v1 of the wide MLP, which the devices start with.
        step(1, STEPS, f"enrolling {args.devices:,} devices, publishing the 80 MB model")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FleetServiceStub(channel)
            tokens: dict[str, str] = {}
            ids = [f"sim-{i:06d}" for i in range(args.devices)] + ["probe"]
            for at in range(0, len(ids), 5000):
                answer = await stub.EnrollDevices(
                    pb.EnrollDevicesRequest(
                        devices=[pb.DeviceEnrollment(device_id=d) for d in ids[at : at + 5000]]
                    ),
                    metadata=publisher,
                    timeout=120,
                )
                tokens.update({t.device_id: t.token for t in answer.tokens})
        wide = models.wide_mlp(work / "wide.onnx")
        v1_dir = work / "wide-1"
        publish(wide, "wide", 1, v1_dir, key, port, publisher)
        have = {
            hashlib.sha256(p.read_bytes()).hexdigest() for p in v1_dir.rglob("*") if p.is_file()
        }
        devices = [Device(d, tokens[d], have, {"wide": 1}) for d in ids[:-1]]
        stop = asyncio.Event()
        channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{procs[i % replicas][1]}",
                options=[
                    ("grpc.max_receive_message_length", 4 << 20),
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
            for i in range(max(1, (len(devices) + PER_CHANNEL - 1) // PER_CHANNEL))
        ]
        stubs = [pb_grpc.FleetServiceStub(c) for c in channels]
        spread = SPREAD_S
        tasks = [
            asyncio.create_task(d.run(stubs[i // PER_CHANNEL], stop, spread))
            for i, d in enumerate(devices)
        ]
        # Every device connected, had its first answer and asked again (then it waits): rest.
        started = time.monotonic()
        while any(d.answered == 0 for d in devices) and time.monotonic() - started < 600:
            await asyncio.sleep(0.5)
        result["connected_seconds"] = round(time.monotonic() - started, 1)
        await asyncio.sleep(2.0)

        # 2. at rest.
        step(2, STEPS, f"{args.devices:,} devices connected; {args.rest_seconds:g} s at rest")
        probe = Device("probe", tokens["probe"], have, {"wide": 1})
        cpu0 = [cpu_seconds(p.pid) for p, _ in procs]
        t0 = time.monotonic()
        rtts = []
        probe_stub = stubs[0]
        while time.monotonic() - t0 < args.rest_seconds:
            begun = time.perf_counter()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await probe_stub.WatchDesiredState(
                    pb.WatchRequest(wait_ms=0, reports=probe.reports()),
                    metadata=probe.meta,
                    timeout=30,
                )
                rtts.append((time.perf_counter() - begun) * 1000)
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
        cpu = [(cpu_seconds(p.pid) - c) / elapsed for (p, _), c in zip(procs, cpu0, strict=True)]
        rtts.sort()
        result["rest"] = {
            "poll_rtt_ms_p50": round(statistics.median(rtts), 2) if rtts else None,
            "poll_rtt_ms_p99": round(rtts[int(len(rtts) * 0.99) - 1], 2) if rtts else None,
            "probes": len(rtts),
            "cpu_share_per_replica": [round(c, 3) for c in cpu],
            "rss_mib_per_replica": [round(rss_mib(p.pid), 1) for p, _ in procs],
            "errors_so_far": dict(sum((d.errors for d in devices), Counter())),
        }
        total_rss = sum(rss_mib(p.pid) for p, _ in procs)
        result["rest"]["rss_mib_per_1000_devices"] = round(total_rss / args.devices * 1000, 1)

        # 3. one-layer update of the wide MLP.
        step(3, STEPS, "one-layer update to every device")
        v2 = with_last_layer(wide, work / "wide2.onnx", 2)
        before = sum(d.bytes for d in devices)
        # Off the loop: the devices keep running while the release uploads and registers.
        begun = time.monotonic()
        await asyncio.to_thread(publish, v2, "wide", 2, work / "wide-2", key, port, publisher)
        result["one_layer_publish_seconds"] = round(time.monotonic() - begun, 2)
        update = await wait_all(devices, ("wide", 2), args.limit, begun)
        result["one_layer_update"] = {
            "seconds_to_all": None if update is None else round(update, 2),
            "reached": sum(("wide", 2) in d.reached for d in devices),
            "mib_moved": round((sum(d.bytes for d in devices) - before) / 2**20, 1),
            "curve": arrivals(devices, ("wide", 2), begun),
        }
        # 4. full install of a small model.
        step(4, STEPS, "full install of a small model to every device")
        digits = ROOT / "models" / "digits" / "1" / "model.onnx"
        before = sum(d.bytes for d in devices)
        begun = time.monotonic()
        await asyncio.to_thread(
            publish, digits, "digits", 1, work / "digits-1", key, port, publisher
        )
        full = await wait_all(devices, ("digits", 1), args.limit, begun)
        result["full_install_small"] = {
            "seconds_to_all": None if full is None else round(full, 2),
            "reached": sum(("digits", 1) in d.reached for d in devices),
            "mib_moved": round((sum(d.bytes for d in devices) - before) / 2**20, 1),
            "curve": arrivals(devices, ("digits", 1), begun),
        }
        # 5. a bad canary, judged on the devices' health and rolled back.
        step(5, STEPS, "a bad canary, until it is rolled back")
        result["bad_canary"] = await bad_canary(wide, work, key, port, publisher, devices, procs)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        result["errors"] = dict(sum((d.errors for d in devices), Counter()))
        result["error_examples"] = DETAILS
        result["rss_mib_after"] = [round(rss_mib(p.pid), 1) for p, _ in procs]
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return result


async def bad_canary(
    wide: Path, work: Path, key: Path, port: int, publisher: Any, devices: list[Device],
    procs: list[tuple[subprocess.Popen[str], int]],
) -> dict[str, Any]:  # fmt: skip
    """Wide v3 to 5% of the devices, 10x slower there: how soon the canary analysis rolls it
    back, and what the control plane spends meanwhile."""
    SERVING[("wide", 3)] = (10 * LATENCY_MS, 0.0)
    v3 = with_last_layer(wide, work / "wide3.onnx", 3)
    target = pb.SetTargetRequest(model="wide", version=3, scope=pb.CANARY, canary_percent=5)
    cpu0 = [cpu_seconds(p.pid) for p, _ in procs]
    begun = time.monotonic()
    await asyncio.to_thread(publish, v3, "wide", 3, work / "wide-3", key, port, publisher, target)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FleetServiceStub(channel)
        rolled_back: float | None = None
        verdict = ""
        while time.monotonic() - begun < 300:
            status = await stub.FleetStatus(
                pb.FleetStatusRequest(page_size=1), metadata=publisher, timeout=60
            )
            rollout = next((r for r in status.rollouts if r.version == 3), None)
            if rollout is not None and rollout.state == "rolled_back":
                rolled_back, verdict = time.monotonic(), rollout.reason
                break
            await asyncio.sleep(0.5)
    reached = [d.reached[("wide", 3)] for d in devices if ("wide", 3) in d.reached]
    elapsed = time.monotonic() - begun
    first = min(reached) if reached else None
    return {
        "canary_devices": len(reached),
        "seconds_publish_to_first_canary_serving": (
            None if first is None else round(first - begun, 2)
        ),
        "seconds_first_canary_serving_to_rolled_back": (
            None if rolled_back is None or first is None else round(rolled_back - first, 2)
        ),
        "reason": verdict,
        "cpu_share_per_replica": [
            round((cpu_seconds(p.pid) - c) / elapsed, 3)
            for (p, _), c in zip(procs, cpu0, strict=True)
        ],
    }


def database_size(args: argparse.Namespace, work: Path, database: str) -> int:
    if not database:
        return sum(p.stat().st_size for p in (work / "cp1").glob("registry.sqlite*"))
    import psycopg

    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--backend", choices=("sqlite", "scale"), default="sqlite")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--rest-seconds", type=float, default=20.0)
    parser.add_argument("--limit", type=float, default=300.0, help="give up a rollout after")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--chart", type=Path, default=charts.IMAGES / "fleet_convergence.png",
        help="where the convergence chart goes (of this run and those of --plot-only)",
    )  # fmt: skip
    parser.add_argument(
        "--plot-only", type=Path, nargs="+", metavar="RESULTS.json",
        help="draw the chart from saved runs (--out files) without measuring",
    )  # fmt: skip
    args = parser.parse_args()
    if args.plot_only:
        runs = [json.loads(path.read_text()) for path in args.plot_only]
        print(charts.fleet_convergence(runs, args.chart))
        return
    if args.replicas > 1 and args.backend != "scale":
        parser.error("several replicas need --backend scale (PostgreSQL + S3)")
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ea-fleet-")))
        env: dict[str, str] = {}
        cp_args: list[str] = []
        database = ""
        if args.backend == "scale":
            import services

            pg = stack.enter_context(services.postgres())
            s3 = stack.enter_context(services.seaweedfs(work / "s3"))
            database = pg.new_database()
            env = s3.env()
            cp_args = ["--database", database, "--blob-store", s3.new_url()]
        result = asyncio.run(simulate(args, work, env, cp_args, args.replicas))
        result["backend"] = args.backend
        result["database_bytes"] = database_size(args, work, database)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(charts.fleet_convergence([result], args.chart), file=sys.stderr)


if __name__ == "__main__":
    main()
