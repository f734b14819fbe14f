"""Certificates for the TLS tests, made by ``trustme`` once per session (none are checked in).

``make_certs(directory)`` (test_tls.py's session fixture ``tls_certs``) writes
PEM files into a temporary directory:

- ``ca``: the CA the server's and the good client's certificates are signed by;
- ``server_cert``/``server_key``: for ``localhost`` and ``127.0.0.1``;
- ``server2_cert``/``server2_key``: the same names and CA, another serial
  (what a certificate renewal installs; the reload tests swap it in);
- ``wrong_ca``: an unrelated CA;
- ``client``: a client certificate and its key in one file, signed by ``ca``;
- ``wrong_client``: the same, signed by ``wrong_ca``;
- ``expired_server_cert``/``expired_server_key`` and ``expired_client``:
  signed by ``ca``, valid for one day that ended yesterday;
- ``not_a_cert``: a file that holds no certificate.

The module holds no tests.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import ssl
from pathlib import Path
from typing import Any

import trustme

import fastnet
from fastnet.tls import client_context, server_context

CLIENT_NAME = "fastnet-test-client"


@dataclasses.dataclass(frozen=True)
class TLSCerts:
    """Paths of the session's PEM files, and the serial numbers tests compare."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    server_serial: str
    server2_cert: Path
    server2_key: Path
    server2_serial: str
    wrong_ca: Path
    client: Path
    client_serial: str
    wrong_client: Path
    expired_server_cert: Path
    expired_server_key: Path
    expired_client: Path
    not_a_cert: Path

    def server_context(self, *, mtls: bool = False, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """A server context with the good certificate; with ``mtls``, clients need one from ca."""
        return server_context(
            self.server_cert, self.server_key, ca=self.ca if mtls else None, alpn=alpn
        )

    def client_context(
        self, *, cert: Path | None = None, alpn: tuple[str, ...] = ()
    ) -> ssl.SSLContext:
        """A client context trusting ``ca`` (and presenting ``cert``, key in the same file)."""
        return client_context(ca=self.ca, cert=cert, alpn=alpn)

    def copy_server_files(self, dest: Path) -> tuple[Path, Path]:
        """Copies of the server's certificate and key in ``dest`` (tests may overwrite them)."""
        cert, key = dest / "server.pem", dest / "server.key"
        shutil.copyfile(self.server_cert, cert)
        shutil.copyfile(self.server_key, key)
        return cert, key


def _serial(cert_pem: bytes) -> str:
    # The serial as ssl's getpeercert() spells it: upper-case hex, no leading
    # zero digits beyond an even count (OpenSSL's i2a_ASN1_INTEGER).
    from cryptography import x509

    number = x509.load_pem_x509_certificate(cert_pem).serial_number
    text = f"{number:X}"
    return text if len(text) % 2 == 0 else "0" + text


def make_certs(directory: Path) -> TLSCerts:
    """Make every certificate the TLS tests use, as PEM files in ``directory``."""
    ca = trustme.CA(organization_name="fastnet test CA")
    wrong_ca = trustme.CA(organization_name="fastnet unrelated CA")
    now = datetime.datetime.now(datetime.timezone.utc)
    yesterday = now - datetime.timedelta(days=1)
    before = now - datetime.timedelta(days=2)

    def write(name: str, *blobs: trustme.Blob) -> Path:
        path = directory / name
        path.write_bytes(b"".join(blob.bytes() for blob in blobs))
        return path

    server = ca.issue_cert("localhost", "127.0.0.1")
    server2 = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.fastnet.test", common_name=CLIENT_NAME)
    wrong_client = wrong_ca.issue_cert("client.fastnet.test", common_name=CLIENT_NAME)
    expired_server = ca.issue_cert("localhost", "127.0.0.1", not_before=before, not_after=yesterday)
    expired_client = ca.issue_cert(
        "client.fastnet.test", common_name=CLIENT_NAME, not_before=before, not_after=yesterday
    )
    not_a_cert = directory / "not-a-cert.pem"
    not_a_cert.write_text("this is a README, not a certificate\n")
    certs = TLSCerts(
        dir=directory,
        ca=write("ca.pem", ca.cert_pem),
        server_cert=write("server.pem", *server.cert_chain_pems),
        server_key=write("server.key", server.private_key_pem),
        server_serial=_serial(server.cert_chain_pems[0].bytes()),
        server2_cert=write("server2.pem", *server2.cert_chain_pems),
        server2_key=write("server2.key", server2.private_key_pem),
        server2_serial=_serial(server2.cert_chain_pems[0].bytes()),
        wrong_ca=write("wrong-ca.pem", wrong_ca.cert_pem),
        client=write("client.pem", client.private_key_and_cert_chain_pem),
        client_serial=_serial(client.cert_chain_pems[0].bytes()),
        wrong_client=write("wrong-client.pem", wrong_client.private_key_and_cert_chain_pem),
        expired_server_cert=write("expired-server.pem", *expired_server.cert_chain_pems),
        expired_server_key=write("expired-server.key", expired_server.private_key_pem),
        expired_client=write("expired-client.pem", expired_client.private_key_and_cert_chain_pem),
        not_a_cert=not_a_cert,
    )
    assert certs.server_serial != certs.server2_serial
    return certs


async def tls_connect(port: int | None, ctx: ssl.SSLContext, **kwargs: Any) -> fastnet.Connection:
    """A TLS client connection to 127.0.0.1:``port``, the certificate checked for ``localhost``."""
    assert port is not None
    return await fastnet.connect("127.0.0.1", port, ssl=ctx, server_hostname="localhost", **kwargs)
