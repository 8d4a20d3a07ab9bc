"""The pure parts of the weight sync, without a server: the release format and its checks,
signatures, resumable chunk-verified downloads, the control plane's rollout rules and blob store.
(Modules importing the inference stubs, like sync/syncer.py, stay out of this process.)"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import modelgen
from edge_agent.common.device_blobs import MAX_CORRUPT_CHUNKS, BandwidthLimit, DeviceBlobs
from edge_agent.controlplane.blobs import FileBlobStore
from edge_agent.controlplane.database import PostgresDatabase
from edge_agent.controlplane.registry import (
    CANARY,
    FLEET,
    GROUP,
    MIGRATIONS,
    Report,
    SqliteRegistry,
    SqlRegistry,
    UpdateRow,
    VersionRow,
    canary_cohort,
    migrate,
    revision,
)
from edge_agent.controlplane.s3 import S3BlobStore, parse_s3_url
from edge_agent.errors import Aborted, ConfigError, InvalidArgument, ReleaseRejected
from edge_agent.fleet import signing
from edge_agent.fleet.release import (
    build_release,
    check_directory,
    check_file_name,
    check_fresh,
    check_graph_contract,
    parse_release,
    variant_dir,
)

CHUNK = 1024


# -- the release format ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("releases")
    for seed in (1, 2):
        build_release(modelgen.mlp(tmp / f"m{seed}.onnx", seed), "mlp", seed, tmp / f"v{seed}")
    return tmp / "v1", tmp / "v2"


def load(directory: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((directory / "release.json").read_text())  # type: ignore[no-any-return]


def test_large_initializers_are_files_named_by_content(releases: tuple[Path, Path]) -> None:
    v1, v2 = releases
    r1, r2 = (parse_release((d / "release.json").read_bytes()) for d in releases)
    for release, directory in ((r1, v1), (r2, v2)):
        for entry in release.files:
            data = (directory / entry.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry.sha256 and len(data) == entry.size
            if entry.path != "model.onnx":
                assert entry.path == f"{entry.sha256}.bin"
        check_directory(release, directory)
    # A new last layer changes that file and the graph (it names the file); nothing else.
    changed = {f.sha256 for f in r2.files} - {f.sha256 for f in r1.files}
    assert len(changed) == 2
    assert {t.name for t in r1.tensors} == {"w0", "w1", "w2"}


@pytest.mark.parametrize(
    "path", ["../outside.bin", "a/b.bin", ".hidden", "/etc/passwd", "", "release.json", "a\0b"]
)
def test_a_file_outside_the_release_is_refused(releases: tuple[Path, Path], path: str) -> None:
    data = load(releases[0])
    data["files"][0]["path"] = path
    with pytest.raises(ReleaseRejected) as refused:
        parse_release(json.dumps(data).encode())
    assert refused.value.reason == "path"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=2),
        lambda d: d.update(version=0),
        lambda d: d.update(version="3"),
        lambda d: d.update(model="../x"),
        lambda d: d["files"].append(d["files"][0]),
        lambda d: d.update(files=[f for f in d["files"] if f["path"] != "model.onnx"]),
        lambda d: d["files"][0].update(sha256="0" * 63),
        lambda d: d["tensors"][0].update(shape=[-1]),
        lambda d: d.pop("expires"),
    ],
)
def test_malformed_release_json_is_refused(releases: tuple[Path, Path], mutate: object) -> None:
    data = load(releases[0])
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ReleaseRejected):
        parse_release(json.dumps(data).encode())


def test_not_json_is_refused() -> None:
    with pytest.raises(ReleaseRejected) as refused:
        parse_release(b"not json")
    assert refused.value.reason == "format"


def test_expired(releases: tuple[Path, Path]) -> None:
    release = parse_release((releases[0] / "release.json").read_bytes())
    check_fresh(release, now=release.expires - 1)
    with pytest.raises(ReleaseRejected) as expired:
        check_fresh(release, now=release.expires)
    assert expired.value.reason == "expired"


def test_graph_contract(releases: tuple[Path, Path], tmp_path: Path) -> None:
    v1, v2 = releases
    r1 = parse_release((v1 / "release.json").read_bytes())
    # v2's graph names v2's last-layer file, which v1 does not have.
    with pytest.raises(ReleaseRejected) as mixed:
        check_graph_contract(r1, v2 / "model.onnx")
    assert mixed.value.reason == "contract"
    for field, value in (("dtype", "FLOAT16"), ("shape", [10, 256]), ("name", "renamed")):
        data = load(v1)
        data["tensors"][-1][field] = value
        with pytest.raises(ReleaseRejected) as wrong:
            check_graph_contract(parse_release(json.dumps(data).encode()), v1 / "model.onnx")
        assert wrong.value.reason == "contract", field
    # The directory must hold exactly the listed files, each with its digest.
    copy = tmp_path / "copy"
    shutil.copytree(v1, copy)
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(ReleaseRejected, match="differ"):
        check_directory(r1, copy)
    (copy / "extra.bin").unlink()
    weights = next(p for p in copy.iterdir() if p.suffix == ".bin")
    weights.write_bytes(b"\0" * weights.stat().st_size)
    with pytest.raises(ReleaseRejected) as tampered:
        check_directory(r1, copy)
    assert tampered.value.reason == "digest"


def test_signatures(releases: tuple[Path, Path], tmp_path: Path) -> None:
    v1, _ = releases
    signing.generate_keypair(tmp_path / "a.pem", tmp_path / "a.pub")
    signing.generate_keypair(tmp_path / "b.pem", tmp_path / "b.pub")
    assert (tmp_path / "a.pem").stat().st_mode & 0o777 == 0o600
    signature = signing.sign_directory(v1, tmp_path / "a.pem")
    copy = tmp_path / "elsewhere"
    shutil.copytree(v1, copy)
    keys = [tmp_path / "b.pub", tmp_path / "a.pub"]
    assert signing.verify_directory(copy, signature, keys) == tmp_path / "a.pub"
    with pytest.raises(ReleaseRejected) as unknown:
        signing.verify_directory(copy, signature, [tmp_path / "b.pub"])
    assert unknown.value.reason == "signature"
    data = load(copy)
    data["expires"] += 1e9  # a longer life is a change like any other
    (copy / "release.json").write_text(json.dumps(data))
    with pytest.raises(ReleaseRejected, match="signature"):
        signing.verify_directory(copy, signature, keys)
    with pytest.raises(ReleaseRejected):
        signing.verify_directory(v1, b"garbage", keys)


def test_the_signed_file_list_is_checked_before_any_file(
    releases: tuple[Path, Path], tmp_path: Path
) -> None:
    """signed_files verifies the bundle alone (no file needed: a device checks it before any
    download); check_signed holds release.json's bytes and file table to that signed list."""
    v1, _ = releases
    signing.generate_keypair(tmp_path / "a.pem", tmp_path / "a.pub")
    signing.generate_keypair(tmp_path / "b.pem", tmp_path / "b.pub")
    signature = signing.sign_directory(v1, tmp_path / "a.pem")
    release_json = (v1 / "release.json").read_bytes()
    release = parse_release(release_json)
    files = {f.path: f.sha256 for f in release.files}
    signed = signing.signed_files(signature, [tmp_path / "b.pub", tmp_path / "a.pub"])
    signing.check_signed(signed, release_json, files)  # the release as signed: accepted
    with pytest.raises(ReleaseRejected, match="signature"):
        signing.signed_files(signature, [tmp_path / "b.pub"])  # an untrusted key
    with pytest.raises(ReleaseRejected, match="signature"):
        signing.signed_files(b"garbage", [tmp_path / "a.pub"])
    data = load(v1)
    data["expires"] += 1e9  # another release.json under the same signature
    with pytest.raises(ReleaseRejected, match="does not cover"):
        signing.check_signed(signed, json.dumps(data).encode(), files)
    first = next(iter(files))
    with pytest.raises(ReleaseRejected, match="does not cover"):  # a file swapped in the table
        signing.check_signed(signed, release_json, {**files, first: "0" * 64})
    with pytest.raises(ReleaseRejected, match="does not cover"):  # a file left out
        signing.check_signed(signed, release_json, {k: v for k, v in files.items() if k != first})


# -- downloads ------------------------------------------------------------------------------------


class FakeServer:
    """Serves `blob` from an offset in pieces; faults on request."""

    def __init__(self, blob: bytes, piece: int = 700) -> None:
        self.blob = blob
        self.piece = piece
        self.calls: list[int] = []
        self.corrupt_at: set[int] = set()  # byte offsets corrupted on their first send
        self.truncate_first_at: int | None = None
        self.extra = b""
        self.cancelled = 0
        self.sent = 0

    def fetch(self, digest: str, offset: int) -> Iterator[bytes]:
        self.calls.append(offset)
        server = self

        class Pieces:
            def __iter__(self) -> Iterator[bytes]:
                data = bytearray(server.blob[offset:] + server.extra)
                for at in sorted(server.corrupt_at):
                    if at >= offset:
                        data[at - offset] ^= 0xFF
                        server.corrupt_at.discard(at)
                end = len(data)
                if server.truncate_first_at is not None:
                    end, server.truncate_first_at = server.truncate_first_at - offset, None
                for start in range(0, end, server.piece):
                    piece = bytes(data[start : min(start + server.piece, end)])
                    server.sent += len(piece)
                    yield piece

            def cancel(self) -> None:
                server.cancelled += 1

        return Pieces()  # type: ignore[return-value]


def chunks_of(blob: bytes) -> list[str]:
    return [hashlib.sha256(blob[i : i + CHUNK]).hexdigest() for i in range(0, len(blob), CHUNK)]


BLOB = bytes(range(256)) * 20  # 5120 bytes: 5 chunks


def download(store: DeviceBlobs, server: FakeServer, blob: bytes = BLOB) -> Path:
    return store.download(
        hashlib.sha256(blob).hexdigest(),
        len(blob),
        CHUNK,
        chunks_of(blob),
        server.fetch,
        lambda n: None,
        BandwidthLimit(0),
    )


def test_download_verifies_and_moves_into_the_store(tmp_path: Path) -> None:
    store = DeviceBlobs(tmp_path)
    server = FakeServer(BLOB)
    path = download(store, server)
    assert path.read_bytes() == BLOB and store.has(hashlib.sha256(BLOB).hexdigest())
    assert server.calls == [0] and not list(store.partial.iterdir())


def test_a_corrupt_chunk_is_refetched_alone(tmp_path: Path) -> None:
    store = DeviceBlobs(tmp_path)
    server = FakeServer(BLOB)
    server.corrupt_at = {3 * CHUNK + 5}
    assert download(store, server).read_bytes() == BLOB
    assert server.calls == [0, 3 * CHUNK]  # resumed at the bad chunk, not at 0


def test_chunks_that_keep_failing_reject_the_blob(tmp_path: Path) -> None:
    store = DeviceBlobs(tmp_path)
    server = FakeServer(BLOB)

    def always_bad(digest: str, offset: int) -> Iterator[bytes]:
        server.corrupt_at = {offset}
        return server.fetch(digest, offset)

    with pytest.raises(ReleaseRejected) as bad:
        store.download(
            hashlib.sha256(BLOB).hexdigest(),
            len(BLOB),
            CHUNK,
            chunks_of(BLOB),
            always_bad,
            lambda n: None,
            BandwidthLimit(0),
        )
    assert bad.value.reason == "digest" and len(server.calls) == MAX_CORRUPT_CHUNKS + 1


def test_a_server_sending_too_much_is_cut_off(tmp_path: Path) -> None:
    store = DeviceBlobs(tmp_path)
    server = FakeServer(BLOB, piece=CHUNK)
    server.extra = b"x" * 100 * CHUNK
    assert download(store, server).read_bytes() == BLOB
    assert server.cancelled == 1 and server.sent <= len(BLOB) + CHUNK


def test_a_truncated_transfer_resumes_where_it_stopped(tmp_path: Path) -> None:
    store = DeviceBlobs(tmp_path)
    server = FakeServer(BLOB)
    server.truncate_first_at = 2 * CHUNK + 300
    assert download(store, server).read_bytes() == BLOB
    assert server.calls == [0, 2 * CHUNK]


def test_a_stream_that_ends_without_data_is_a_transfer_failure(tmp_path: Path) -> None:
    store = DeviceBlobs(tmp_path)
    server = FakeServer(BLOB)
    server.truncate_first_at = 0
    with pytest.raises(ReleaseRejected) as cut:
        download(store, server)
    assert cut.value.reason == "transfer"
    assert download(store, server).read_bytes() == BLOB  # and it converges afterwards


def test_a_partial_file_survives_a_restart(tmp_path: Path) -> None:
    digest = hashlib.sha256(BLOB).hexdigest()
    DeviceBlobs(tmp_path)  # a previous run made the directories
    part = tmp_path / "partial" / f"{digest}.part"
    part.write_bytes(BLOB[: 2 * CHUNK] + b"garbage")  # two good chunks, then a torn write
    server = FakeServer(BLOB)
    received: list[int] = []
    store = DeviceBlobs(tmp_path)
    store.download(
        digest, len(BLOB), CHUNK, chunks_of(BLOB), server.fetch, received.append, BandwidthLimit(0)
    )
    assert server.calls == [2 * CHUNK] and sum(received) == len(BLOB) - 2 * CHUNK
    # A partial whose first chunk went bad (a power cut before the data reached the disk).
    part.write_bytes(b"\0" * CHUNK + BLOB[CHUNK : 3 * CHUNK])
    store.discard([digest])
    server.calls.clear()
    assert download(store, server).read_bytes() == BLOB and server.calls == [0]


def test_a_chunk_table_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReleaseRejected) as bad:
        DeviceBlobs(tmp_path).download(
            "0" * 64,
            len(BLOB),
            CHUNK,
            chunks_of(BLOB)[:-1],
            FakeServer(BLOB).fetch,
            lambda n: None,
            BandwidthLimit(0),
        )
    assert bad.value.reason == "format"


def test_whole_digest_is_checked(tmp_path: Path) -> None:
    store = DeviceBlobs(tmp_path)
    with pytest.raises(ReleaseRejected) as bad:
        store.download(
            "f" * 64,
            len(BLOB),
            CHUNK,
            chunks_of(BLOB),
            FakeServer(BLOB).fetch,
            lambda n: None,
            BandwidthLimit(0),
        )
    assert bad.value.reason == "digest" and not list(store.partial.iterdir())


def test_bandwidth_limit_sleeps_to_the_rate() -> None:
    slept: list[float] = []
    limit = BandwidthLimit(1000, sleep=slept.append)
    limit.spend(500)
    limit.spend(500)
    assert slept and 0.4 < slept[-1] <= 1.0
    unlimited: list[float] = []
    BandwidthLimit(0, sleep=unlimited.append).spend(10**9)
    assert not unlimited


# -- the control plane's rules --------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlRegistry]:
    """The registry's rules hold on both databases (PostgreSQL: a fresh database each)."""
    if request.param == "postgresql":
        pg, _ = request.getfixturevalue("scale_services")
        reg: SqlRegistry = SqlRegistry(PostgresDatabase(pg.new_database()))
    else:
        reg = SqliteRegistry(tmp_path / "r.sqlite")
    for version in (1, 2, 3):
        reg.add_release("m", version, b"{}", b"sig", set())
    for device, group in (("a", "lab"), ("b", "lab"), ("c", ""), ("d", "")):
        reg.add_device(device, group, "hash")
    yield reg
    reg.close()


def test_canary_cohort_is_stable_and_rounded_up() -> None:
    devices = [f"d{i}" for i in range(10)]
    cohort = canary_cohort("m", 2, devices, 25)
    assert len(cohort) == 3 and cohort == canary_cohort("m", 2, list(reversed(devices)), 25)
    assert len(canary_cohort("m", 2, devices[:3], 50)) == 2
    assert canary_cohort("m", 2, devices, 100) == sorted(devices)


def test_desired_state_by_scope(registry: SqlRegistry) -> None:
    assert registry.desired("a") == {}
    registry.set_target("m", 1, FLEET, "", 0)
    assert all(registry.desired(d) == {"m": 1} for d in "abcd")
    registry.set_target("m", 2, GROUP, "lab", 0)
    assert [registry.desired(d)["m"] for d in "abcd"] == [2, 2, 1, 1]
    canary = registry.set_target("m", 3, CANARY, "", 50)
    assert len(canary.devices) == 2
    for d in "abcd":
        assert registry.desired(d)["m"] == (3 if d in canary.devices else 2 if d in "ab" else 1)
    assert registry.desired("unknown") == {}
    with pytest.raises(Exception, match="no release"):
        registry.set_target("m", 9, FLEET, "", 0)
    with pytest.raises(InvalidArgument):
        registry.set_target("m", 1, CANARY, "", 0)


def test_pause_resume_rollback(registry: SqlRegistry) -> None:
    registry.set_target("m", 1, FLEET, "", 0)
    registry.set_target("m", 2, FLEET, "", 0)
    registry.record("a", [Report("m", 2, 2, 2, "serving", "")], 0.0)
    before = revision(registry.desired("b"))
    assert registry.control("m", "pause").state == "paused"
    # Paused: whoever runs it keeps it; nobody new gets it.
    assert registry.desired("a") == {"m": 2} and registry.desired("b") == {"m": 1}
    assert revision(registry.desired("b")) != before
    assert registry.control("m", "resume").state == "active"
    assert registry.desired("b") == {"m": 2}
    assert registry.control("m", "rollback").state == "rolled_back"
    assert registry.desired("a") == {"m": 1}
    assert registry.control("m", "rollback").version == 1  # the next one back
    assert registry.desired("a") == {}


def test_auto_pause_above_the_failure_share(registry: SqlRegistry) -> None:
    rollout = registry.set_target("m", 2, FLEET, "", 0)
    assert len(rollout.devices) == 4
    registry.record("a", [Report("m", 1, 1, 2, "failed", "signature: bad")], 1.0)
    assert registry.auto_pause(0.25) == []  # 1 of 4 is not more than 25%
    registry.record("b", [Report("m", 1, 1, 2, "failed", "digest: bad")], 2.0)
    (paused,) = registry.auto_pause(0.25)
    assert paused.state == "paused" and paused.failed == 2 and "2 of 4" in paused.reason
    # The failure stays counted after the device goes back to its old version...
    registry.record("a", [Report("m", 1, 1, 1, "serving", "")], 3.0)
    assert registry.rollouts()[-1].failed == 2
    # ...until it installs the version after all.
    registry.record("a", [Report("m", 2, 2, 2, "serving", "")], 4.0)
    assert registry.rollouts()[-1].failed == 1
    devices = {d.device_id: d for d in registry.devices()}
    assert devices["b"].last_error == "m v2: digest: bad" and devices["a"].last_seen == 4.0


def test_a_release_is_immutable(registry: SqlRegistry) -> None:
    registry.add_release("m", 1, b"{}", b"sig", set())  # identical: fine
    with pytest.raises(Exception, match="immutable"):
        registry.add_release("m", 1, b"{ }", b"sig", set())


@pytest.fixture(params=["directory", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A blob store and its local spool directory: the embedded one, and S3 (SeaweedFS)."""
    if request.param == "s3":
        _, s3 = request.getfixturevalue("scale_services")
        with pytest.MonkeyPatch.context() as patch:
            for name, value in s3.env().items():
                patch.setenv(name, value)
            yield S3BlobStore(s3.new_url(), tmp_path / "spool"), tmp_path / "spool"
    else:
        yield FileBlobStore(tmp_path), tmp_path / "tmp"


def test_blob_store_writes_whole_checked_blobs(blob_store: tuple[Any, Path]) -> None:
    store, spool = blob_store
    digest = hashlib.sha256(BLOB).hexdigest()
    writer = store.writer(digest, len(BLOB))
    writer.write(BLOB[:100])
    assert not store.exists(digest)  # nothing visible before the commit
    writer.write(BLOB[100:])
    assert writer.commit() == [hashlib.sha256(BLOB).hexdigest()]  # one chunk (< 1 MiB)
    assert store.exists(digest) and store.size(digest) == len(BLOB)
    with store.open(digest) as f:  # reads at an offset (a download resumed elsewhere)
        f.seek(100)
        assert f.read(50) == BLOB[100:150]
        assert f.read() == BLOB[150:]
        assert f.read(10) == b""
    wrong = store.writer("0" * 64, len(BLOB))
    wrong.write(BLOB)
    with pytest.raises(InvalidArgument, match="digest"):
        wrong.commit()
    assert not store.exists("0" * 64)
    too_much = store.writer(digest, 10)
    with pytest.raises(InvalidArgument, match="more than"):
        too_much.write(BLOB)
    too_much.abort()
    short = store.writer(hashlib.sha256(b"x" * 20).hexdigest(), 20)
    short.write(b"x" * 10)
    with pytest.raises(InvalidArgument, match="declared"):
        short.commit()
    assert not list(spool.iterdir())  # nothing left behind


def test_s3_urls_are_checked() -> None:
    assert parse_s3_url("s3://b/p/q?endpoint=http://h:1") == (
        "b",
        "p/q/",
        "http://h:1",
        "us-east-1",
    )
    assert parse_s3_url("s3://b") == ("b", "", "", "us-east-1")
    for bad in (
        "http://b/p",
        "s3:///p",
        "s3://key:secret@b/p",
        "s3://b/p?endpoint=ftp://h",
        "s3://b/p?token=1",
    ):
        with pytest.raises(ConfigError):
            parse_s3_url(bad)


def test_a_poll_that_brings_nothing_new_writes_nothing(registry: SqlRegistry) -> None:
    report = Report("m", 1, 1, 1, "serving", "")
    assert registry.record("a", [report], 1.0) == [report]
    history = registry.database.execute("SELECT COUNT(*) FROM history").fetchone()
    assert registry.record("a", [report], 2.0) == []  # the same again: no write at all
    assert registry.database.execute("SELECT COUNT(*) FROM history").fetchone() == history
    assert {d.device_id: d.last_seen for d in registry.devices()}["a"] == 1.0
    registry.touch({"a": 5.0, "b": 6.0})  # last seen: written in batches
    registry.touch({"a": 3.0})  # never moves back
    seen = {d.device_id: d.last_seen for d in registry.devices()}
    assert seen["a"] == 5.0 and seen["b"] == 6.0


def test_the_schema_is_versioned(registry: SqlRegistry) -> None:
    assert registry.schema_version == len(MIGRATIONS)
    assert migrate(registry.database) == len(MIGRATIONS)  # again: nothing to do
    count = registry.database.execute("SELECT COUNT(*) FROM schema_version").fetchone()
    assert count == (len(MIGRATIONS),)
    registry.database.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 1,))
    with pytest.raises(ConfigError, match="newer than this control plane"):
        migrate(registry.database)


def test_a_release_with_variants(tmp_path: Path) -> None:
    shipped = modelgen.ROOT / "models" / "digits"
    out = tmp_path / "release"
    variants = {
        "int8": shipped / "variants" / "int8.onnx",
        "fp16": shipped / "variants" / "fp16.onnx",
    }
    release = build_release(shipped / "1" / "model.onnx", "digits", 3, out, variants=variants)
    assert release.variant_names() == ["fp32", "fp16", "int8"]
    parsed = parse_release((out / "release.json").read_bytes())
    assert parsed == release
    signing.generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    for name in release.variant_names():
        directory = variant_dir(out, name)
        chosen = parsed.select(name)
        assert chosen.variant == name
        assert (directory / "release.json").read_bytes() == (out / "release.json").read_bytes()
        check_directory(chosen, directory)  # exactly this variant's files, contract included
        signature = signing.sign_directory(directory, tmp_path / "k.pem")
        assert signing.verify_directory(directory, signature, [tmp_path / "k.pub"])
    int8 = parsed.select("int8")
    assert int8.size < release.size / 2
    assert {f.sha256 for f in int8.files} <= {f.sha256 for f in release.all_files()}
    with pytest.raises(ReleaseRejected):
        check_directory(parsed.select("fp16"), variant_dir(out, "int8"))
    with pytest.raises(ValueError):
        int8.to_json()
    with pytest.raises(ReleaseRejected):
        build_release(
            shipped / "1" / "model.onnx",
            "digits",
            3,
            tmp_path / "x",
            variants={"fp32": variants["int8"]},
        )


def test_a_release_carries_the_model_files(tmp_path: Path) -> None:
    """config.pbtxt, golden.npz and warmup/<name> are signed files of the release; every variant
    gets the config and warmup files, only the default one the golden check."""
    shipped = modelgen.ROOT / "models" / "digits"
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "x.bin").write_bytes(b"\0" * 256)
    (tmp_path / "golden.npz").write_bytes(b"golden")
    extras = {
        "config.pbtxt": shipped / "config.pbtxt",
        "golden.npz": tmp_path / "golden.npz",
        "warmup/x.bin": tmp_path / "warmup" / "x.bin",
    }
    out = tmp_path / "release"
    release = build_release(
        shipped / "1" / "model.onnx",
        "digits",
        1,
        out,
        variants={"int8": shipped / "variants" / "int8.onnx"},
        extras=extras,
    )
    default = {f.path for f in release.files}
    assert {"config.pbtxt", "golden.npz", "warmup/x.bin"} <= default
    int8 = {f.path for f in release.select("int8").files}
    assert "config.pbtxt" in int8 and "warmup/x.bin" in int8 and "golden.npz" not in int8
    assert (out / "config.pbtxt").read_bytes() == (shipped / "config.pbtxt").read_bytes()
    signing.generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    signature = signing.sign_directory(out, tmp_path / "k.pem")
    check_directory(release, out)
    assert signing.verify_directory(out, signature, [tmp_path / "k.pub"])
    (out / "warmup" / "x.bin").write_bytes(b"\1" * 256)  # the signature covers warmup/ too
    with pytest.raises(ReleaseRejected):
        signing.verify_directory(out, signature, [tmp_path / "k.pub"])
    with pytest.raises(ReleaseRejected):
        check_directory(release, out)
    (out / "warmup" / "x.bin").write_bytes(b"\0" * 256)
    (out / "warmup" / "extra.bin").write_bytes(b"")  # a file the release does not list
    with pytest.raises(ReleaseRejected, match="differ"):
        check_directory(release, out)


@pytest.mark.parametrize(
    "name", ["warmup", "warmup/", "warmup/../x", "warmup/a/b", "other/x", "/x", "release.json"]
)
def test_only_plain_names_and_warmup_files(name: str) -> None:
    with pytest.raises(ReleaseRejected):
        check_file_name(name)


def test_an_empty_blob_downloads(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"").hexdigest()
    path = DeviceBlobs(tmp_path).download(
        digest, 0, CHUNK, [], FakeServer(b"").fetch, lambda n: None, BandwidthLimit(0)
    )
    assert path.read_bytes() == b""


def test_an_aggregation_is_decided_once(registry: SqlRegistry) -> None:
    """Two replicas aggregating the same buffered updates: the second is refused whole."""
    task = registry.add_task("m", 1, b"spec", b"val", {"w": [2]}, ["a", "b"], 0.5, "d0")
    for update_id in ("u1", "u2"):
        assert registry.add_update(task, UpdateRow(update_id, "a", 0, 10, "dx"), "buffered", 1.0)
    candidate = VersionRow(1, "d1", 0.6, True, 0, 2, 2.0)
    registry.advance(task, ["u1", "u2"], candidate, {"applied": 2})
    with pytest.raises(Aborted, match="aggregated already"):
        registry.advance(task, ["u1", "u2"], candidate, {"applied": 2})
    (row,) = registry.tasks(task)
    assert row.round == 1 and row.global_version == 1 and row.counters["applied"] == 2
    assert [v.version for v in registry.versions(task)] == [0, 1]
