"""TLS and mTLS on the listeners (and certificate reload on SIGHUP), and the control listener:
model load / unload refused on the inference listener, a bearer token on the control listener."""

from __future__ import annotations

import datetime
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ROOT, Daemon, wait_for

SAFE = {"EDGE_AGENT_CONTROL_ON_INFERENCE_LISTENER": "false"}  # the default, not the tests' one


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test-ca"))
        .issuer_name(_name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(tmp / "ca", ca_key, ca)

    def leaf(name: str, server: bool) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        _write(tmp / name, key, builder.sign(ca_key, hashes.SHA256()))

    leaf("server", True)
    leaf("client", False)
    return {
        "ca": tmp / "ca.crt",
        "cert": tmp / "server.crt",
        "key": tmp / "server.key",
        "client_cert": tmp / "client.crt",
        "client_key": tmp / "client.key",
    }


def ready(url: str, **tls: str) -> bool:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(url, **tls) as client:  # type: ignore[arg-type]
            return bool(client.is_server_ready(client_timeout=5))
    except InferenceServerException:
        return False


def test_tls_refuses_plaintext_and_mtls_refuses_clients_without_a_certificate(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    pki = make_pki(tmp_path)
    tls = start_daemon(
        "--model-repository",
        str(ROOT / "models"),
        "--execution-providers",
        "cpu",
        "--tls-cert",
        str(pki["cert"]),
        "--tls-key",
        str(pki["key"]),
    ).wait_started()
    assert not ready(tls.url)  # plaintext against TLS
    assert ready(tls.url, ssl=True, root_certificates=str(pki["ca"]))

    mtls = start_daemon(
        "--model-repository",
        str(ROOT / "models"),
        "--execution-providers",
        "cpu",
        "--tls-cert",
        str(pki["cert"]),
        "--tls-key",
        str(pki["key"]),
        "--tls-client-ca",
        str(pki["ca"]),
    ).wait_started()
    assert not ready(mtls.url)
    assert not ready(mtls.url, ssl=True, root_certificates=str(pki["ca"]))  # no client cert
    assert ready(
        mtls.url,
        ssl=True,
        root_certificates=str(pki["ca"]),
        private_key=str(pki["client_key"]),
        certificate_chain=str(pki["client_cert"]),
    )
    # The control listener is TLS too.
    assert not ready(mtls.control_url, ssl=True, root_certificates=str(pki["ca"]))


def server_serial(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_sighup_reloads_the_certificate(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    (tmp_path / "old").mkdir()
    pki = make_pki(tmp_path / "old")
    daemon = start_daemon(
        "--model-repository",
        str(ROOT / "models"),
        "--execution-providers",
        "cpu",
        "--tls-cert",
        str(pki["cert"]),
        "--tls-key",
        str(pki["key"]),
    ).wait_started()
    assert daemon.port is not None
    before = server_serial(daemon.port, pki["ca"])
    (tmp_path / "new").mkdir()
    new = make_pki(tmp_path / "new")
    pki["cert"].write_bytes(new["cert"].read_bytes())
    pki["key"].write_bytes(new["key"].read_bytes())
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.named("tls.reloaded"), "the certificate reload")
    assert wait_for(lambda: server_serial(daemon.port, new["ca"]) != before, "the new certificate")


def guarded_daemon(
    tmp_path: Path, start_daemon: Callable[..., Daemon], *extra: str
) -> tuple[Daemon, Path]:
    """The default listeners (control RPCs off the inference listener), control token s3cret."""
    token = tmp_path / "control.token"
    token.write_text("s3cret\n")
    daemon = start_daemon(
        "--model-repository",
        str(ROOT / "models"),
        "--execution-providers",
        "cpu",
        "--control-token-file",
        str(token),
        *extra,
        env=SAFE,
    ).wait_started()
    return daemon, token


def test_control_rpcs_live_on_the_control_listener_behind_a_token(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    daemon, _ = guarded_daemon(tmp_path, start_daemon)

    def load(url: str, headers: dict[str, str] | None = None) -> str:
        with grpcclient.InferenceServerClient(url) as client:
            try:
                client.load_model("digits", headers=headers)
                return "OK"
            except InferenceServerException as exc:
                return str(exc.status())

    assert load(daemon.url) == "StatusCode.PERMISSION_DENIED"
    assert load(daemon.control_url) == "StatusCode.UNAUTHENTICATED"
    assert (
        load(daemon.control_url, {"authorization": "Bearer wrong"}) == "StatusCode.UNAUTHENTICATED"
    )
    # explicit load/unload needs the explicit mode; here the call got through the gate:
    assert load(daemon.control_url, {"authorization": "Bearer s3cret"}) == "StatusCode.UNAVAILABLE"
    with grpcclient.InferenceServerClient(daemon.url) as client:  # inference is untouched
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
        assert client.infer("digits", [tensor]).as_numpy("label").shape == (1,)


def test_explicit_mode_loads_through_the_control_listener(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    daemon, token = guarded_daemon(tmp_path, start_daemon, "--model-control-mode", "explicit")

    def models(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_agent",
                "models",
                "load",
                "--model",
                "digits",
                "--url",
                daemon.control_url,
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = models()
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    done = models("--token-file", str(token))
    assert done.returncode == 0, done.stderr
    assert ready(daemon.url)


def test_a_control_listener_off_loopback_needs_credentials(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "serve",
            "--control-address",
            "0.0.0.0:0",
            "--model-repository",
            str(ROOT / "models"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78 and "control_token_file or tls_client_ca" in done.stderr


@pytest.mark.parametrize("missing", ["--tls-key", "--tls-cert"])
def test_tls_needs_both_files(tmp_path: Path, missing: str) -> None:
    pki = make_pki(tmp_path)
    args = {"--tls-cert": str(pki["cert"]), "--tls-key": str(pki["key"])}
    args.pop(missing)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "serve",
            *[x for kv in args.items() for x in kv],
            "--model-repository",
            str(ROOT / "models"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78 and "give both or neither" in done.stderr
