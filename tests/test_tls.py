"""TLS in the node (``--tls-cert``/``--tls-key``): wss:// and https:// with real clients.

The test makes its own certificate authority and a server certificate for
127.0.0.1 (with ``cryptography``), starts a node on them and talks to it
with clients that trust that CA only: the ``websockets`` library for
wss://, Python's ssl module for the probes and for what must be refused.
The node speaks TLS 1.2 and 1.3 only, with ECDHE key exchange and AEAD
ciphers only, and issues session tickets.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    HOST,
    REPO,
    HTTPResponse,
    NodeProcess,
    _finish,
    _parse_head,
    clean_env,
    proto_client,
    start_node,
    unique,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.typing import Origin

pytestmark = pytest.mark.timeout(60)


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the node's certificate, issued by the CA, for 127.0.0.1
    key: Path  # its private key
    other_key: Path  # a key that is not the certificate's


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certs(directory: Path) -> Certs:
    """A CA and an RSA server certificate it signed, for 127.0.0.1 and localhost.

    RSA rather than ECDSA so that the suites a node must refuse include
    plain-RSA key exchange (no forward secrecy), which needs an RSA key.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fastws test CA"))
        .issuer_name(_name("fastws test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(HOST))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    certs = Certs(
        directory / "ca.pem", directory / "cert.pem", directory / "key.pem", directory / "other.pem"
    )
    certs.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key.write_bytes(_pem_key(key))
    certs.other_key.write_bytes(_pem_key(rsa.generate_private_key(65537, 2048)))
    return certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


def client_context(
    certs: Certs,
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A client context that trusts the test CA only, optionally limited."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


def tls_socket(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLSocket:
    """A TLS connection to the node, handshake done (or SSLError / OSError raised)."""
    raw = socket.create_connection((HOST, port), timeout=5)
    try:
        return context.wrap_socket(raw, server_hostname=HOST, session=session)
    except BaseException:
        raw.close()
        raise


def https_get(sock: ssl.SSLSocket, path: str) -> HTTPResponse:
    """GET over an open TLS connection; the server's response read to its end."""
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode("ascii")
    )
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = _parse_head(head)
    return _finish(status, headers, body)


def get(port: int, path: str, context: ssl.SSLContext) -> HTTPResponse:
    with tls_socket(port, context) as sock:
        return https_get(sock, path)


@pytest.fixture(scope="module")
def tls_node(certs: Certs) -> Iterator[NodeProcess]:
    node = start_node(args=["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)], wait=False)
    context = client_context(certs)
    try:
        node.wait_ready(lambda: get(node.port, "/healthz", context).status == 200)
        yield node
    finally:
        node.stop()
        node.cleanup_files()


def wss_url(node: NodeProcess) -> str:
    return f"wss://{HOST}:{node.port}/ws"


async def test_wss_carries_the_channel_protocol(tls_node: NodeProcess, certs: Certs) -> None:
    ch = unique("tls")
    context = client_context(certs)
    async with (
        proto_client(wss_url(tls_node), ssl=context) as subscriber,
        proto_client(wss_url(tls_node), ssl=context) as publisher,
    ):
        await subscriber.sub(ch)
        assert await publisher.pub(ch, {"over": "tls"}) == 1
        assert await subscriber.next_pub(ch) == {"ch": ch, "seq": 1, "data": {"over": "tls"}}
        # A burst, coalesced by the node into large writes through the TLS transport.
        big = "x" * 30000
        for n in range(2, 42):
            await publisher.send({"op": "pub", "ch": ch, "data": [n, big]})
        for n in range(2, 42):
            assert await subscriber.next_pub(ch) == {"ch": ch, "seq": n, "data": [n, big]}
        tls = subscriber.ws.transport.get_extra_info("ssl_object")
        assert tls.version() == "TLSv1.3"


async def test_the_origin_check_knows_the_https_default_port(
    tls_node: NodeProcess, certs: Certs
) -> None:
    """A page of the node's own site, as a browser would send it, is let in over TLS."""
    own = Origin(f"https://{HOST}:{tls_node.port}")
    async with connect(wss_url(tls_node), ssl=client_context(certs), origin=own) as ws:
        assert "welcome" in await ws.recv()


def test_the_http_endpoints_are_served_over_tls(tls_node: NodeProcess, certs: Certs) -> None:
    context = client_context(certs)
    assert get(tls_node.port, "/healthz", context).status == 200
    assert get(tls_node.port, "/readyz", context).status == 200
    metrics = get(tls_node.port, "/metrics", context)
    assert metrics.status == 200 and b"fastws_connections_open" in metrics.body
    assert get(tls_node.port, "/fastws.js", context).status == 200
    assert get(tls_node.port, "/nothing-here", context).status == 404


def test_plain_http_gets_no_answer_from_a_tls_port(tls_node: NodeProcess) -> None:
    with socket.create_connection((HOST, tls_node.port), timeout=5) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer


@pytest.mark.parametrize(
    ("version", "ciphers"),
    [
        (ssl.TLSVersion.TLSv1_3, None),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES256-GCM-SHA384"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-CHACHA20-POLY1305"),
    ],
)
def test_tls_1_2_and_1_3_with_ecdhe_and_aead_are_accepted(
    tls_node: NodeProcess, certs: Certs, version: ssl.TLSVersion, ciphers: str | None
) -> None:
    context = client_context(certs, minimum=version, maximum=version, ciphers=ciphers)
    with tls_socket(tls_node.port, context) as sock:
        cipher, protocol, _ = sock.cipher()
        assert protocol == version.name.replace("_", ".")  # TLSv1_3: "TLSv1.3"
        if ciphers is not None:
            assert cipher == ciphers
        assert https_get(sock, "/healthz").status == 200


def test_the_node_offers_only_ecdhe_with_aead_for_tls_1_2(
    tls_node: NodeProcess, certs: Certs
) -> None:
    """Whatever a TLS 1.2 client lists first, what it gets is ECDHE with an AEAD cipher."""
    every = "ALL:@SECLEVEL=0"
    context = client_context(certs, maximum=ssl.TLSVersion.TLSv1_2, ciphers=every)
    with tls_socket(tls_node.port, context) as sock:
        cipher, protocol, _ = sock.cipher()
    assert protocol == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), cipher


@pytest.fixture(scope="module")
def permissive_port(certs: Certs) -> Iterator[int]:
    """A TLS server that accepts anything its OpenSSL can do, to show that the
    clients refused by the node are not refused by their own side."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(certs.cert, certs.key)
    listener = socket.create_server((HOST, 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5)
            with contextlib.suppress(OSError), context.wrap_socket(raw, server_side=True):
                pass
            raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    ("what", "version", "ciphers"),
    [
        ("TLS 1.1", ssl.TLSVersion.TLSv1_1, "ALL:@SECLEVEL=0"),
        ("TLS 1.0", ssl.TLSVersion.TLSv1, "ALL:@SECLEVEL=0"),
        ("CBC, not AEAD", ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384"),
        ("RSA key exchange, no forward secrecy", ssl.TLSVersion.TLSv1_2, "AES128-GCM-SHA256"),
    ],
)
def test_old_protocols_and_weak_suites_are_refused_in_the_handshake(
    tls_node: NodeProcess,
    certs: Certs,
    permissive_port: int,
    what: str,
    version: ssl.TLSVersion,
    ciphers: str,
) -> None:
    context = client_context(certs, minimum=version, maximum=version, ciphers=ciphers)
    with tls_socket(permissive_port, context) as sock:  # this client can connect...
        assert sock.version() == version.name.replace("_", "."), sock.version()
    # ...but not to the node.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_socket(tls_node.port, context).close()
        pytest.fail(f"{what}: the handshake succeeded")
    # The node goes on serving everyone else.
    assert get(tls_node.port, "/healthz", client_context(certs)).status == 200


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_session_ticket_resumes_the_session(
    tls_node: NodeProcess, certs: Certs, version: ssl.TLSVersion
) -> None:
    context = client_context(certs, minimum=version, maximum=version)
    with tls_socket(tls_node.port, context) as first:
        # TLS 1.3 tickets come after the handshake: read the response first.
        assert https_get(first, "/healthz").status == 200
        session = first.session
        assert first.session_reused is False
    assert session is not None and session.has_ticket
    with tls_socket(tls_node.port, context, session) as second:
        assert second.session_reused is True
        assert https_get(second, "/healthz").status == 200


def test_a_connection_that_never_starts_its_handshake_is_dropped(
    node_factory: Callable[..., NodeProcess], certs: Certs
) -> None:
    node = node_factory(
        args=["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)],
        env={"FASTWS_HANDSHAKE_TIMEOUT": "0.5"},
        wait=False,
    )
    node.wait_port_open()
    with socket.create_connection((HOST, node.port), timeout=5) as silent:
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert silent.recv(1024) == b""  # EOF, nothing sent
        waited = time.monotonic() - started
    assert 0.3 < waited < 3.0, waited
    assert get(node.port, "/healthz", client_context(certs)).status == 200


def test_a_key_that_is_not_the_certificates_stops_the_node_at_start(certs: Certs) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastws",
            "serve",
            "--tls-cert",
            str(certs.cert),
            "--tls-key",
            str(certs.other_key),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=clean_env(),
    )
    assert result.returncode == 2
    assert "tls_cert" in result.stderr and str(certs.cert) in result.stderr, result.stderr
