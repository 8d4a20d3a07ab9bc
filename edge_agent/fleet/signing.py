"""Release signatures: the OpenSSF Model Signing format (`model-signing`), key-based, P-256.

`sign_directory` signs every file of a release directory (release.json included) and returns the
signature bundle (a sigstore bundle; JSON). Devices and the control plane check a bundle before
any file moves: `signed_files` verifies it against the trusted keys and returns the file list it
vouches for, `check_signed` holds release.json to it, and each file is then checked against its
digest as it arrives (sync/, fleet/release.check_directory). `verify_directory` is the stock
whole-directory verification (what the `model_signing` CLI does); the tests use it to show that
our bundles verify with it.

Why this format and not our own: measured on the 2-core dev VM, `model-signing` adds ~70 MB of
installed packages (sigstore, pydantic, ...), imports in 0.3 s and verifies a 60 MB release in
0.02 s after hashing; none of that rules it out on a device that already carries ONNX Runtime, and
an existing, documented format lets anyone check a release with the stock `model_signing` CLI.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent.errors import ReleaseRejected
from edge_agent.fleet.release import RELEASE_JSON


def generate_keypair(private_key: Path, public_key: Path) -> None:
    """A new P-256 key pair as PEM files; the private one is created with mode 0600."""
    key = ec.generate_private_key(ec.SECP256R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_bytes)
    public_key.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def sign_directory(directory: Path, private_key: Path) -> bytes:
    from model_signing import signing  # heavy import, only where signing happens

    with tempfile.TemporaryDirectory() as scratch:
        bundle = Path(scratch) / "release.sig"
        # model_signing ships py.typed but leaves Config() unannotated.
        config = signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
            private_key=private_key
        )
        config.sign(directory, bundle)
        return bundle.read_bytes()


def signed_files(signature: bytes, trusted_keys: Sequence[Path]) -> dict[str, str]:
    """The file list a signature vouches for (path -> sha256), once the signature verifies
    against a trusted key; no file is needed. This is what lets a device (and the control plane)
    check a release before a byte of its blobs moves: release.json's digest must be in it, and
    release.json's file table must match it (`check_signed`). Raises ReleaseRejected."""
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    def files(bundle: Path, key: Path) -> dict[str, str]:
        parsed = sign_sigstore_pb.Signature.read(bundle)
        manifest = sign_ec_key.Verifier(Path(key)).verify(parsed)
        listed = {}
        for item in manifest.resource_descriptors():
            if item.digest.algorithm != "sha256":
                raise ValueError(f"digest algorithm {item.digest.algorithm}")
            listed[str(item.identifier)] = str(item.digest.digest_hex)
        return listed

    return _with_any_key(signature, trusted_keys, files)


def check_signed(signed: Mapping[str, str], release_json: bytes, files: Mapping[str, str]) -> None:
    """The signed file list covers exactly release.json (these bytes) and `files` (path ->
    sha256: the variant's files as release.json lists them)."""
    expected = {**files, RELEASE_JSON: hashlib.sha256(release_json).hexdigest()}
    if dict(signed) != expected:
        differ = sorted(set(signed.items()) ^ set(expected.items()))[:4]
        raise ReleaseRejected(
            "signature", f"the signature does not cover this release's files: {differ}"
        )


def verify_directory(directory: Path, signature: bytes, trusted_keys: Sequence[Path]) -> Path:
    """Returns the key that verified; raises ReleaseRejected("signature") when none does."""
    from model_signing import verifying

    def verified(bundle: Path, key: Path) -> Path:
        config = verifying.Config().use_elliptic_key_verifier(  # type: ignore[no-untyped-call]
            public_key=key
        )
        config.verify(directory, bundle)
        return key

    return _with_any_key(signature, trusted_keys, verified)


T = TypeVar("T")


def _with_any_key(
    signature: bytes, trusted_keys: Sequence[Path], verify: Callable[[Path, Path], T]
) -> T:
    """`verify(bundle file, key)` with the first trusted key it succeeds with; ReleaseRejected
    with every key's reason when none does."""
    if not trusted_keys:
        raise ReleaseRejected("signature", "no trusted keys configured")
    errors = []
    with tempfile.TemporaryDirectory() as scratch:
        bundle = Path(scratch) / "release.sig"
        bundle.write_bytes(signature)
        for key in trusted_keys:
            try:
                return verify(bundle, Path(key))
            except Exception as exc:  # model_signing raises ValueError and assorted others
                errors.append(f"{Path(key).name}: {str(exc)[:200]}")
    raise ReleaseRejected(
        "signature", "signature not valid for any trusted key: " + "; ".join(errors)
    )
