"""TLS: sound contexts from certificate files, and what a connection's TLS session holds.

- ``server_context(cert, key, ca=..., alpn=...)``: TLS 1.2 at least, the
  chain and its key, and with ``ca`` a client certificate signed by it is
  *required* (mTLS). ``client_context(...)`` is its counterpart for
  ``fastnet.connect(..., ssl=...)``.
- ``TLSInfo``: what ``Connection.tls`` returns on a TLS connection (version,
  cipher, ALPN protocol, the peer's certificate).
- ``TLSFiles``: the files a server context was built from, so that
  ``Server.reload_tls()`` (SIGHUP under ``fastnet serve``) can build a new one
  and keep the old one when the new files are bad.

A bad file is reported as ``TLSConfigError`` naming the file, not as
OpenSSL's "[SSL] PEM lib (_ssl.c:3900)", which says neither which file nor
what is wrong with it.

Strategy: nothing of TLS runs per frame here. The record layer is the
event loop's (asyncio's ``SSLProtocol`` or uvloop's); fastnet's protocol
sits above it as a ``BufferedProtocol``, so decrypted bytes still land in
the decoder's own window (CPython >= 3.11 and uvloop call ``get_buffer``
behind TLS), and the transport strategy joins writes on TLS transports so
that a length field and its payload share one record.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Sequence
from typing import Any

from .errors import FastnetError

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "TLSConfigError",
    "TLSFiles",
    "TLSInfo",
    "client_context",
    "server_context",
    "tls_info",
]

# Seconds a TLS handshake may take; it holds a connection slot meanwhile
# (asyncio's own default is 60 s, which lets a client that connects and
# sends nothing hold a slot for a minute).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# Seconds a closing TLS connection may take to flush its last replies, send
# close_notify and see the peer's answer (or its EOF) before it is aborted:
# the TLS counterpart of the plain lingering close, with the same bound
# (supervisor.CLOSE_LINGER; asyncio's default is 30 s too).
DEFAULT_SHUTDOWN_TIMEOUT = 30.0

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = b"PRIVATE KEY-----"  # BEGIN PRIVATE KEY, BEGIN RSA/EC/ENCRYPTED PRIVATE KEY


class TLSConfigError(FastnetError, ValueError):
    """A certificate, key or CA file cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """The files (and options) a server context is built from; ``load()`` builds it."""

    cert: str
    key: str | None = None
    ca: str | None = None
    alpn: tuple[str, ...] = ()

    def load(self) -> ssl.SSLContext:
        """A new server context from the files as they are now.

        Raises:
            TLSConfigError: a file is missing, unreadable or not what it should be.
        """
        return server_context(self.cert, self.key, ca=self.ca, alpn=self.alpn)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSConfigError(f"{what} {path}: {exc.strerror or exc}") from None


def _check_key(cert: str, key: str | None) -> None:
    # The key is in ``key``, or in ``cert`` when no key file is given.
    if key is None:
        if _PEM_KEY not in _read(cert, "certificate file"):
            raise TLSConfigError(
                f"certificate file {cert}: no private key in it (give the key file too)"
            )
    elif _PEM_KEY not in _read(key, "key file"):
        raise TLSConfigError(f"key file {key}: no PEM private key in it")


def _check_certificates(path: str, what: str) -> None:
    # OpenSSL names neither the file nor the fault; look first.
    if _PEM_CERTIFICATE not in _read(path, what):
        raise TLSConfigError(f"{what} {path}: no PEM certificate in it")


def server_context(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str] | None = None,
    *,
    ca: str | os.PathLike[str] | None = None,
    alpn: Sequence[str] = (),
    password: str | None = None,
) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, ``cert``'s chain with ``key``, mTLS with ``ca``.

    Args:
        cert: PEM file with the certificate, then its intermediates.
        key: PEM file with the private key; None if ``cert`` holds it too.
        ca: PEM file of the CA(s) client certificates must be signed by;
            given, every client must present one (mTLS).
        alpn: protocols offered in ALPN, in order of preference.
        password: for an encrypted key.

    Raises:
        TLSConfigError: a file is missing, unreadable or not a certificate
            or key; the message names the file.
    """
    cert = os.fspath(cert)
    key = None if key is None else os.fspath(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _check_certificates(cert, "certificate file")
    _check_key(cert, key)
    try:
        ctx.load_cert_chain(cert, key, password=password)
    except ssl.SSLError as exc:
        if key is None:
            where = f"certificate file {cert}"
        else:
            where = f"certificate file {cert} with key file {key}"
        raise TLSConfigError(f"{where}: {_reason(exc)}") from None
    if ca is not None:
        ca = os.fspath(ca)
        _check_certificates(ca, "CA file")
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"CA file {ca}: {_reason(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_context(
    *,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    alpn: Sequence[str] = (),
    verify: bool = True,
) -> ssl.SSLContext:
    """A client context: TLS 1.2 or later, the server verified against ``ca``.

    Args:
        ca: PEM file of the CA(s) to trust; None trusts the system's store.
        cert, key: a client certificate (mTLS).
        alpn: protocols offered in ALPN.
        verify: False skips verifying the server (benchmarks against a
            self-signed certificate; never in production).

    Raises:
        TLSConfigError: a file is missing or not a certificate or key.
    """
    if ca is not None:
        ca = os.fspath(ca)
        _check_certificates(ca, "CA file")
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"CA file {ca}: {_reason(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is None and key is not None:
        raise TLSConfigError(f"key file {os.fspath(key)} given without a certificate (cert=)")
    if cert is not None:
        cert = os.fspath(cert)
        key = None if key is None else os.fspath(key)
        _check_certificates(cert, "certificate file")
        _check_key(cert, key)
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"certificate file {cert}: {_reason(exc)}") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        text = exc.reason.replace("_", " ").lower()
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the key does not match the certificate"
        return text
    return str(exc)


@dataclasses.dataclass(frozen=True)
class TLSInfo:
    """The TLS session of a connection (``Connection.tls``)."""

    version: str | None
    """The protocol version, e.g. ``"TLSv1.3"``."""
    cipher: str | None
    """The cipher suite's name."""
    alpn_protocol: str | None
    """The protocol agreed by ALPN, or None."""
    peer_cert: dict[str, Any] | None
    """The peer's certificate as ``SSLSocket.getpeercert()`` parses it; None if
    the peer sent none (or it was not verified: parsing needs verification)."""
    peer_cert_der: bytes | None
    """The peer's certificate in DER, or None if the peer sent none."""


def tls_info(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> TLSInfo | None:
    """The ``TLSInfo`` of a transport's ``ssl_object`` extra; None without one."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    der = ssl_object.getpeercert(binary_form=True)
    parsed = ssl_object.getpeercert() if der else None
    return TLSInfo(
        version=ssl_object.version(),
        cipher=cipher[0] if cipher else None,
        alpn_protocol=ssl_object.selected_alpn_protocol(),
        peer_cert=parsed or None,
        peer_cert_der=der or None,
    )
