"""The throw-away lab CA: files, names, and real TLS handshakes that verify against it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from clearip.relay.labkit.labca import make_lab_certificates


def _names(cert_file: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(alt.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}
    return dns, ips


def test_files_names_and_key_permissions(tmp_path: Path) -> None:
    certs = make_lab_certificates(tmp_path / "lab", ("emulator.lab", "192.0.2.7", "2001:db8::7"))
    assert certs.ca_file.parent == tmp_path / "lab"
    assert stat.S_IMODE(certs.key_file.stat().st_mode) == 0o600
    assert len(list((tmp_path / "lab").iterdir())) == 3  # the CA key is never written
    dns, ips = _names(certs.cert_file)
    assert dns == {"localhost", "emulator.lab"}
    assert ips == {"127.0.0.1", "::1", "192.0.2.7", "2001:db8::7"}
    ca = x509.load_pem_x509_certificate(certs.ca_file.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
    assert cert.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 8


def test_each_call_makes_a_new_ca(tmp_path: Path) -> None:
    first = make_lab_certificates(tmp_path).ca_file.read_bytes()
    assert make_lab_certificates(tmp_path).ca_file.read_bytes() != first


async def _handshake(certs_dir: Path, host: str, server_name: str | None) -> str:
    """Serve with the lab certificate on ``host`` and connect, verifying against the lab CA."""
    certs = make_lab_certificates(certs_dir)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert_file, certs.key_file)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, host, 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=client_ctx, server_hostname=server_name
        )
        writer.write(b"hello\n")
        line = await reader.readline()
        writer.close()
        return line.decode().strip()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("host", "server_name"),
    [("127.0.0.1", "localhost"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1")],
)
def test_clients_verify_the_certificate_against_the_lab_ca(
    tmp_path: Path, host: str, server_name: str
) -> None:
    if ":" in host:
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind((host, 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this host")
    assert asyncio.run(_handshake(tmp_path, host, server_name)) == "hello"


def test_a_name_not_in_the_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        asyncio.run(_handshake(tmp_path, "127.0.0.1", "not-the-lab.example"))
