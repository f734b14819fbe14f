"""The PROXY protocol, versions 1 and 2: a sans-IO parser of the header a proxy sends first.

A load balancer such as HAProxy that relays TCP connections to a server hides
the client: the server's peer is the proxy. With the PROXY protocol (HAProxy's
``doc/proxy-protocol.txt``) the proxy starts every connection with a header
naming the client's and the frontend's addresses (version 1: one text line;
version 2: a binary block with optional TLVs: ALPN, SNI, a unique id, the
client's TLS details, a CRC32C). The server reads that header before anything
else, and the connection then goes on as if the client had connected directly.

This module does no I/O and imports nothing from asyncio: ``ProxyParser``
takes bytes and returns a ``ProxyHeader``, None (more bytes needed) or raises
``ProxyHeaderError``; it tells the I/O layer how many bytes it may read so
that not one byte past the header is taken from the socket (the bytes after
it belong to TLS or to the framed protocol, read by the transport). The
server's reading side is ``fastnet._proxy_io``; ``encode`` builds headers
(tests, fuzzing, and clients that speak through a proxy of their own).

Strategy: the parser buffers the header only (at most 107 bytes for version
1, ``16 + max_v2_length`` for version 2) and rejects a header as soon as a
byte shows it is not one: a wrong signature byte, version, command or family
at once, an announced version 2 length over the limit from the fixed 16-byte
part, a version 1 line without CRLF in its first 107 bytes. Version 1 is
parsed when its CRLF arrives, version 2 when its announced length has. Each
byte is looked at a bounded number of times, so parsing is O(header) however
the bytes are split (the CRC32C, when present, is one more pass).

Reading byte-exact (``need``, ``limit``, ``header_length``):

- version 2 announces its length: read 16 bytes, then exactly the length;
- version 1 ends at its CRLF, which the reader cannot see coming: it peeks
  at the socket (``recv(limit, MSG_PEEK)``), asks ``header_length(peeked)``
  how many of those bytes are the header's (through the CRLF at most), and
  reads exactly those; a reader that cannot peek reads ``need`` bytes at a
  time, a number certain to be within the header.

Never guess: a connection on a listener that expects the PROXY protocol must
start with a valid header; anything else is an error (the spec's rule,
which keeps a client from passing itself off as a proxy on a shared port).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections.abc import Iterable
from functools import cached_property
from typing import Any

from .errors import FastnetError

__all__ = [
    "ACCEPT_MODES",
    "CAUSES",
    "DEFAULT_MAX_V2_LENGTH",
    "DEFAULT_PROXY_HEADER_TIMEOUT",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyParser",
    "ProxySSL",
    "ProxySettings",
    "crc32c",
    "encode",
    "parse",
]

# --------------------------------------------------------------------- wire

V1_PREFIX = b"PROXY "
# The longest version 1 line, CRLF included: "PROXY UNKNOWN" and two full
# IPv6 addresses and ports (the spec's worst case). No CRLF in 107 bytes: invalid.
V1_MAX_LENGTH = 107
# The shortest: "PROXY UNKNOWN\r\n".
V1_MIN_LENGTH = 15
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Signature, version and command, family and transport, length.
V2_FIXED_LENGTH = 16
# The most address and TLV bytes a version 2 header may announce (its length
# field allows 65,535). The addresses take 216 at most (Unix); HAProxy's
# TLVs (ALPN, SNI, a unique id of 128 bytes at most, the TLS block with a
# certificate's CN, a CRC) add a few hundred: 4 KiB leaves ample room. A
# guess, not from the spec; dnsdist's default limit is 512.
DEFAULT_MAX_V2_LENGTH = 4096
# At least 3 s, the spec says, to cover a TCP retransmission of the header.
DEFAULT_PROXY_HEADER_TIMEOUT = 3.0

ACCEPT_MODES = ("v1", "v2", "any")

# The TLV types of the spec (section 2.2) and the SSL block's sub-types.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
# The SSL block's ``client`` bits.
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
# "an opaque byte sequence of up to 128 bytes" (section 2.2.5).
MAX_UNIQUE_ID = 128

_COMMANDS = {0: "LOCAL", 1: "PROXY"}
_FAMILIES = {0: "UNSPEC", 1: "INET", 2: "INET6", 3: "UNIX"}
_TRANSPORTS = {0: "UNSPEC", 1: "STREAM", 2: "DGRAM"}
_COMMAND_CODES = {name: code for code, name in _COMMANDS.items()}
_FAMILY_CODES = {name: code for code, name in _FAMILIES.items()}
_TRANSPORT_CODES = {name: code for code, name in _TRANSPORTS.items()}
# Size of the address block by family (the spec's union proxy_addr): two
# addresses and two ports for IPv4 and IPv6, two 108-byte paths for Unix.
_ADDRESS_LENGTHS = {0: 0, 1: 12, 2: 36, 3: 216}
_UNIX_PATH = 108
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")

# The ``cause`` of a ProxyHeaderError (and the label of the
# fastnet_proxy_header_errors_total metric): a small, fixed set.
CAUSES = (
    "bad_signature",  # the first bytes are neither "PROXY " nor the version 2 signature
    "unknown_version",  # version 2 signature, version nibble not 2
    "unknown_command",  # command nibble not LOCAL (0) or PROXY (1)
    "unknown_family",  # family or transport nibble unassigned; v1 protocol not TCP4/TCP6/UNKNOWN
    "oversized",  # no CRLF in 107 bytes (v1); announced length over the limit (v2)
    "malformed",  # anything else that does not match the spec: addresses, ports, TLVs
    "bad_crc",  # the CRC32C TLV does not match the header
    "truncated",  # the connection ended (or broke) inside the header
)


class ProxyHeaderError(FastnetError, ValueError):
    """Raised by ``ProxyParser`` for bytes that are not a valid PROXY header.

    Attributes:
        cause: why, one of ``CAUSES``: ``bad_signature``, ``unknown_version``,
            ``unknown_command``, ``unknown_family``, ``oversized``,
            ``malformed``, ``bad_crc``, ``truncated``.
    """

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


# ------------------------------------------------------------------- CRC32C


def _crc32c_table() -> tuple[int, ...]:
    # The reflected Castagnoli polynomial 0x1EDC6F41 (RFC 4960, Appendix B).
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC32C (Castagnoli) of ``data``, continuing from ``crc``; pure Python, one table.

    ``crc32c(b"123456789") == 0xE3069283``. A few microseconds per hundred
    bytes: fine for a header once per connection, not for bulk data.
    """
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------- values

# An address in a header: (host, port) for IPv4 and IPv6 (host as the
# ipaddress module writes it), the path for Unix sockets (trailing NULs
# removed, bytes decoded as UTF-8 with surrogateescape: lossless).
Address = tuple[str, int] | str


@dataclasses.dataclass(frozen=True)
class ProxySSL:
    """The ``PP2_TYPE_SSL`` TLV: how the client reached the proxy over TLS.

    Attributes:
        client: the bit field (``PP2_CLIENT_SSL`` 1, ``PP2_CLIENT_CERT_CONN``
            2, ``PP2_CLIENT_CERT_SESS`` 4).
        verify: 0 when the client presented a certificate and it verified.
        tlvs: the sub-TLVs, ``(type, value)`` in wire order.
    """

    client: int
    verify: int
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def _text(self, kind: int) -> str | None:
        for type_, value in self.tlvs:
            if type_ == kind:
                return value.decode("utf-8", "replace")
        return None

    @property
    def tls(self) -> bool:
        """The client connected over TLS."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def client_cert(self) -> bool:
        """The client presented a certificate (on this connection or its TLS session)."""
        return bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))

    @property
    def verified(self) -> bool:
        """The client presented a certificate and the proxy verified it."""
        return self.client_cert and self.verify == 0

    @property
    def version(self) -> str | None:
        """The TLS version, e.g. ``TLSv1.3``."""
        return self._text(PP2_SUBTYPE_SSL_VERSION)

    @property
    def cn(self) -> str | None:
        """The Common Name of the client certificate's subject."""
        return self._text(PP2_SUBTYPE_SSL_CN)

    @property
    def cipher(self) -> str | None:
        """The cipher's name, e.g. ``ECDHE-RSA-AES128-GCM-SHA256``."""
        return self._text(PP2_SUBTYPE_SSL_CIPHER)

    @property
    def sig_alg(self) -> str | None:
        """The algorithm that signed the proxy's certificate, e.g. ``RSA-SHA256``."""
        return self._text(PP2_SUBTYPE_SSL_SIG_ALG)

    @property
    def key_alg(self) -> str | None:
        """The algorithm of the proxy certificate's key, e.g. ``RSA2048``."""
        return self._text(PP2_SUBTYPE_SSL_KEY_ALG)


@dataclasses.dataclass(frozen=True)
class ProxyHeader:
    """A PROXY protocol header, as parsed; ``conn.proxy`` on a server that reads them.

    Attributes:
        version: 1 or 2.
        command: ``PROXY`` (relayed on behalf of a client) or ``LOCAL`` (the
            proxy's own connection, such as a health check; version 2 only).
        family: ``INET``, ``INET6``, ``UNIX`` or ``UNSPEC`` (version 1's
            ``UNKNOWN``).
        transport: ``STREAM``, ``DGRAM`` or ``UNSPEC``.
        source: the client's address: ``(host, port)``, a Unix path, or None
            (``UNSPEC``).
        destination: the address the client connected to (the proxy's
            frontend), in the same form.
        tlvs: version 2's TLVs, ``(type, value)`` in wire order (unknown
            types too); the properties below read the registered ones.
        unknown_rest: what followed ``UNKNOWN`` on a version 1 line (the
            spec says to ignore it; kept so the header re-encodes as received).
        proxy_address: the address of the proxy that sent the header (the
            connection's TCP peer); set by the server, None from the parser;
            not compared.

    A header names the client only with the ``PROXY`` command and a known
    family: ``peer`` is then ``source``, and None otherwise (the connection's
    own addresses apply: the spec's rule for ``LOCAL`` and ``UNSPEC``).
    """

    version: int
    command: str
    family: str
    transport: str
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    unknown_rest: bytes = b""
    proxy_address: Any = dataclasses.field(default=None, compare=False)

    @property
    def peer(self) -> Address | None:
        """The client's address when the header gives one (``PROXY`` command), else None."""
        if self.command != "PROXY" or self.family == "UNSPEC":
            return None
        return self.source

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind``, or None."""
        for type_, value in self.tlvs:
            if type_ == kind:
                return value
        return None

    @property
    def alpn(self) -> bytes | None:
        """``PP2_TYPE_ALPN``: the protocol the client negotiated with the proxy (e.g. b"h2")."""
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        """``PP2_TYPE_AUTHORITY``: the host name the client asked for (TLS SNI)."""
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8", "replace")

    @property
    def crc32c(self) -> int | None:
        """``PP2_TYPE_CRC32C``: the header's checksum (verified by the parser), or None."""
        value = self.tlv(PP2_TYPE_CRC32C)
        return None if value is None else int.from_bytes(value, "big")

    @property
    def unique_id(self) -> bytes | None:
        """``PP2_TYPE_UNIQUE_ID``: the proxy's id of the connection (up to 128 bytes)."""
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        """``PP2_TYPE_NETNS``: the network namespace the proxy accepted the client in."""
        value = self.tlv(PP2_TYPE_NETNS)
        return None if value is None else value.decode("ascii", "replace")

    @cached_property
    def ssl(self) -> ProxySSL | None:
        """``PP2_TYPE_SSL``: the client's TLS connection to the proxy, or None."""
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else _parse_ssl(value)


# ------------------------------------------------------------------ parsing


def _error(cause: str, message: str) -> ProxyHeaderError:
    return ProxyHeaderError(cause, message)


class ProxyParser:
    """Parses one PROXY header from bytes fed in any pieces (sans-IO).

    Args:
        accept: ``"v1"``, ``"v2"`` or ``"any"`` (either, told apart by their
            first byte): what the listener is configured for. Never a guess
            whether a header is there: it must be.
        max_v2_length: the most address and TLV bytes a version 2 header may
            announce (``oversized`` beyond).

    ``feed(data)`` returns the ``ProxyHeader`` once complete, None while more
    is needed, and raises ``ProxyHeaderError`` as soon as the bytes cannot be
    a header (the same error again on any later call). Bytes fed past the
    header's end are kept in ``rest``. ``eof()`` reports the end of the
    stream: ``truncated`` unless the header was complete.

    For a reader that must not take a byte past the header from its socket:
    ``need`` is a number of bytes certain to be the header's (read at most
    that many without peeking); ``limit`` the most the header can still
    take (the size to peek); ``header_length(peeked)`` how many of the bytes
    next on the stream are the header's.
    """

    __slots__ = ("_accept", "_buf", "_error", "_header", "_max_v2", "_total", "_version", "rest")

    def __init__(self, accept: str = "any", *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> None:
        if accept not in ACCEPT_MODES:
            raise ValueError(f"accept must be one of {', '.join(ACCEPT_MODES)}, not {accept!r}")
        if not 0 <= max_v2_length <= 0xFFFF:
            raise ValueError(f"max_v2_length must be within 0..65535, got {max_v2_length}")
        self._accept = accept
        self._max_v2 = max_v2_length
        self._buf = bytearray()
        self._version = 0  # 0 until the signature tells
        self._total = 0  # a version 2 header's full length, once its fixed part is in
        self._header: ProxyHeader | None = None
        self._error: ProxyHeaderError | None = None
        self.rest = b""

    @property
    def received(self) -> int:
        """Bytes of the header received so far (the whole header once complete)."""
        return len(self._buf)

    @property
    def header(self) -> ProxyHeader | None:
        """The header, once complete."""
        return self._header

    def _candidate(self, buf: bytes | bytearray) -> int:
        # The version the bytes so far point to: 2 for a CR first (or
        # when only v2 is accepted), 1 otherwise; mismatches are found by feed.
        if self._version:
            return self._version
        if self._accept == "v2" or (self._accept == "any" and buf[:1] == b"\r"):
            return 2
        return 1

    @property
    def need(self) -> int:
        """Bytes certainly part of the header still to come (0 once complete or failed).

        A version 1 line's end cannot be known in advance: this is then a
        lower bound (at least 1), so a reader without ``MSG_PEEK`` takes the
        line in small reads. Only bytes of an invalid header can be taken
        past its end (the connection is closed anyway).
        """
        if self._header is not None or self._error is not None:
            return 0
        buf = self._buf
        n = len(buf)
        if self._accept == "any" and not n:
            return V1_MIN_LENGTH  # the shorter of the two shortest headers
        if self._candidate(buf) == 2:
            return V2_FIXED_LENGTH - n if n < V2_FIXED_LENGTH else self._total - n
        return max(V1_MIN_LENGTH - n, 1 if buf.endswith(b"\r") else 2)

    @property
    def limit(self) -> int:
        """The most bytes the header can still take (0 once complete or failed)."""
        if self._header is not None or self._error is not None:
            return 0
        n = len(self._buf)
        v2_most = V2_FIXED_LENGTH + self._max_v2
        if self._version == 2 and n >= V2_FIXED_LENGTH:
            return self._total - n
        if self._version == 1 or (n and self._candidate(self._buf) == 1):
            return V1_MAX_LENGTH - n
        if self._accept == "any" and not n:
            return max(V1_MAX_LENGTH, v2_most)
        return v2_most - n

    def header_length(self, data: bytes | bytearray | memoryview) -> int:
        """How many of ``data``, the bytes next on the stream, belong to the header.

        At least 1 for non-empty ``data`` while the header is incomplete;
        never a byte past the end of a valid header.
        """
        if self._header is not None or self._error is not None or not data:
            return 0
        buf = self._buf
        n = len(buf)
        size = len(data)
        joined = bytes(buf) + bytes(data[: self.limit])
        if self._candidate(joined) == 2:
            if len(joined) < V2_FIXED_LENGTH:
                return size
            length = int.from_bytes(joined[14:16], "big")
            total = V2_FIXED_LENGTH + min(length, self._max_v2)
            return max(1, min(total - n, size))
        end = joined.find(b"\r\n", max(n - 1, 0))
        if end >= 0:
            return max(1, min(end + 2, V1_MAX_LENGTH) - n)
        return min(size, V1_MAX_LENGTH - n)

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        """Add bytes; return the header once complete, None while more are needed.

        Raises:
            ProxyHeaderError: the bytes are not a valid header (``cause`` says
                why); raised again by every later call.
            RuntimeError: the header was already complete.
        """
        if self._error is not None:
            raise self._error
        if self._header is not None:
            raise RuntimeError("the PROXY header is complete; the bytes after it are the stream's")
        start = len(self._buf)
        self._buf += data
        try:
            return self._advance(start)
        except ProxyHeaderError as exc:
            self._error = exc
            raise

    def eof(self) -> None:
        """The stream ended: fine after a complete header.

        Raises:
            ProxyHeaderError: ``truncated``: the stream ended before the
                header's end (``received`` tells whether any byte came).
        """
        if self._error is not None:
            raise self._error
        if self._header is None:
            self._error = _error(
                "truncated", f"the stream ended after {len(self._buf)} bytes of a PROXY header"
            )
            raise self._error

    def _advance(self, start: int) -> ProxyHeader | None:
        buf = self._buf
        if not self._version:
            self._detect()
            if not self._version:
                return None
            start = 0
        if self._version == 1:
            end = buf.find(b"\r\n", max(start - 1, 0))
            if end < 0 or end + 2 > V1_MAX_LENGTH:
                if len(buf) >= V1_MAX_LENGTH:
                    raise _error("oversized", f"no CRLF in the first {V1_MAX_LENGTH} bytes")
                return None
            header = _parse_v1(bytes(buf[:end]))
            self._finish(end + 2, header)
            return header
        if not self._total and not self._check_v2_fixed():
            return None
        if len(buf) < self._total:
            return None
        header = _parse_v2(bytes(buf[: self._total]))
        self._finish(self._total, header)
        return header

    def _finish(self, length: int, header: ProxyHeader) -> None:
        self.rest = bytes(self._buf[length:])
        del self._buf[length:]
        self._header = header

    def _detect(self) -> None:
        # Compare the bytes so far with the signatures the listener accepts.
        buf = self._buf
        head = bytes(buf[: len(V2_SIGNATURE)])
        if self._accept != "v1" and V2_SIGNATURE.startswith(head):
            if len(head) == len(V2_SIGNATURE):
                self._version = 2
            return
        head = head[: len(V1_PREFIX)]
        if self._accept != "v2" and V1_PREFIX.startswith(head):
            if len(head) == len(V1_PREFIX):
                self._version = 1
            return
        wanted = {"v1": '"PROXY "', "v2": "the version 2 signature"}.get(
            self._accept, '"PROXY " or the version 2 signature'
        )
        raise _error("bad_signature", f"expected {wanted}, got {bytes(buf[:16])!r}")

    def _check_v2_fixed(self) -> bool:
        # Bytes 13 to 16, each checked as soon as it is in. True once the
        # total length is known.
        buf = self._buf
        n = len(buf)
        if n > 12:
            version, command = buf[12] >> 4, buf[12] & 0x0F
            if version != 2:
                raise _error("unknown_version", f"version {version} (0x{buf[12]:02x}); expected 2")
            if command not in _COMMANDS:
                raise _error("unknown_command", f"command {command} (0x{buf[12]:02x})")
        if n > 13:
            family, transport = buf[13] >> 4, buf[13] & 0x0F
            if family not in _FAMILIES or transport not in _TRANSPORTS:
                raise _error("unknown_family", f"family and transport 0x{buf[13]:02x}")
        if n < V2_FIXED_LENGTH:
            return False
        length = int.from_bytes(buf[14:16], "big")
        if length > self._max_v2:
            raise _error("oversized", f"a {length}-byte header body (the limit is {self._max_v2})")
        self._total = V2_FIXED_LENGTH + length
        return True


def _parse_v1(line: bytes) -> ProxyHeader:
    # `line` is the header without its CRLF; it starts with "PROXY ".
    rest = line[len(V1_PREFIX) :]
    if rest.startswith(b"UNKNOWN") and rest[7:8] in (b"", b" "):
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", None, None, unknown_rest=rest[7:])
    parts = rest.split(b" ")
    if parts[0] not in (b"TCP4", b"TCP6"):
        raise _error(
            "unknown_family", f"protocol {parts[0][:16]!r}; expected TCP4, TCP6 or UNKNOWN"
        )
    if len(parts) != 5:
        raise _error("malformed", f"{len(parts) - 1} fields after {parts[0].decode()}; expected 4")
    v6 = parts[0] == b"TCP6"
    src = _v1_host(parts[1], v6)
    dst = _v1_host(parts[2], v6)
    sport = _v1_port(parts[3])
    dport = _v1_port(parts[4])
    family = "INET6" if v6 else "INET"
    return ProxyHeader(1, "PROXY", family, "STREAM", (src, sport), (dst, dport))


def _v1_port(text: bytes) -> int:
    # Decimal 0..65535, no leading zero ("to avoid any possible confusion
    # with octal numbers").
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise _error("malformed", f"bad port {text[:8]!r}")
    port = int(text)
    if port > 0xFFFF:
        raise _error("malformed", f"port {port} out of range")
    return port


def _v1_host(text: bytes, v6: bool) -> str:
    if not v6:
        # Exactly four decimal numbers 0..255, no leading zeros.
        numbers = text.split(b".")
        if len(numbers) != 4 or not all(
            n.isdigit() and len(n) <= 3 and (len(n) == 1 or n[:1] != b"0") and int(n) <= 255
            for n in numbers
        ):
            raise _error("malformed", f"bad IPv4 address {text[:40]!r}")
        return text.decode("ascii")
    # Hexadecimal groups and colons (the dotted tail of an IPv4-mapped
    # address too: inet_ntop writes it, and so do proxies using it); no zone.
    if not text or len(text) > 45 or text.translate(None, b"0123456789abcdefABCDEF:."):
        raise _error("malformed", f"bad IPv6 address {text[:48]!r}")
    try:
        address = ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        raise _error("malformed", f"bad IPv6 address {text[:48]!r}") from None
    return str(address)


def _parse_v2(data: bytes) -> ProxyHeader:
    # `data` is the whole header; its fixed part is checked already.
    command = _COMMANDS[data[12] & 0x0F]
    family_code = data[13] >> 4
    family = _FAMILIES[family_code]
    transport = _TRANSPORTS[data[13] & 0x0F]
    body = memoryview(data)[V2_FIXED_LENGTH:]
    address_length = _ADDRESS_LENGTHS[family_code]
    if len(body) < address_length:
        raise _error(
            "malformed",
            f"{family} addresses take {address_length} bytes; the header has {len(body)}",
        )
    source: Address | None = None
    destination: Address | None = None
    if family_code == 1:
        src, dst, sport, dport = _INET.unpack_from(body)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    elif family_code == 2:
        src, dst, sport, dport = _INET6.unpack_from(body)
        source = (str(ipaddress.IPv6Address(src)), sport)
        destination = (str(ipaddress.IPv6Address(dst)), dport)
    elif family_code == 3:
        source = _unix_path(bytes(body[:_UNIX_PATH]))
        destination = _unix_path(bytes(body[_UNIX_PATH:address_length]))
    offset = V2_FIXED_LENGTH + address_length
    tlvs, crc_at = _parse_tlvs(data, offset)
    if crc_at is not None:
        expected = int.from_bytes(data[crc_at : crc_at + 4], "big")
        actual = crc32c(data[:crc_at] + b"\0\0\0\0" + data[crc_at + 4 :])
        if actual != expected:
            raise _error("bad_crc", f"CRC32C 0x{expected:08x} announced, 0x{actual:08x} computed")
    return ProxyHeader(2, command, family, transport, source, destination, tlvs)


def _unix_path(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "surrogateescape")


def _parse_tlvs(data: bytes, offset: int) -> tuple[tuple[tuple[int, bytes], ...], int | None]:
    # The TLV list from `offset` to the end: it must fill the header exactly.
    # Returns the TLVs and the offset of the CRC32C value, if there is one.
    tlvs = []
    crc_at = None
    end = len(data)
    while offset < end:
        if end - offset < 3:
            raise _error("malformed", f"{end - offset} bytes left after the TLVs, not a TLV")
        kind = data[offset]
        length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        start = offset + 3
        if start + length > end:
            raise _error("malformed", f"TLV 0x{kind:02x} of {length} bytes overruns the header")
        value = data[start : start + length]
        if kind == PP2_TYPE_CRC32C:
            if length != 4:
                raise _error("malformed", f"a CRC32C TLV of {length} bytes; expected 4")
            if crc_at is not None:
                raise _error("malformed", "two CRC32C TLVs")
            crc_at = start
        elif kind == PP2_TYPE_UNIQUE_ID and length > MAX_UNIQUE_ID:
            raise _error("malformed", f"a {length}-byte unique id (at most {MAX_UNIQUE_ID})")
        elif kind == PP2_TYPE_SSL:
            _parse_ssl(value)  # a malformed SSL block is a malformed header
        tlvs.append((kind, value))
        offset = start + length
    return tuple(tlvs), crc_at


def _parse_ssl(value: bytes) -> ProxySSL:
    if len(value) < 5:
        raise _error("malformed", f"an SSL TLV of {len(value)} bytes; at least 5")
    return ProxySSL(value[0], int.from_bytes(value[1:5], "big"), _parse_sub_tlvs(value))


def _parse_sub_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    offset = 5  # after the client bits and the verify field
    end = len(data)
    while offset < end:
        if end - offset < 3:
            raise _error("malformed", "a truncated TLV in the SSL TLV")
        kind = data[offset]
        length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        start = offset + 3
        if start + length > end:
            raise _error("malformed", f"SSL sub-TLV 0x{kind:02x} overruns the SSL TLV")
        tlvs.append((kind, data[start : start + length]))
        offset = start + length
    return tuple(tlvs)


def parse(data: bytes, accept: str = "any") -> tuple[ProxyHeader | None, bytes]:
    """Parse a header at the start of ``data``: ``(header, the bytes after it)``.

    ``(None, b"")`` when ``data`` is a valid beginning of a header but not a
    whole one.

    Raises:
        ProxyHeaderError: ``data`` does not start with a valid header.
    """
    parser = ProxyParser(accept)
    header = parser.feed(data)
    return header, parser.rest


# ------------------------------------------------------------------ encoding


def encode(header: ProxyHeader, *, checksum: bool = False) -> bytes:
    """The wire form of ``header``: ``parse(encode(h))`` gives ``h`` back.

    Version 2 TLVs are written as given, in order; with ``checksum``, the
    CRC32C TLV is computed (its value replaced, or the TLV appended).
    Version 1 writes ``PROXY TCP4|TCP6 src dst sport dport`` or
    ``PROXY UNKNOWN`` (and ``unknown_rest``); IPv6 hosts as given.

    Raises:
        ValueError: the header cannot be written in its version (a version
            1 ``LOCAL`` or Unix header, TLVs in version 1, an address of the
            wrong family, a value over 65,535 bytes).
    """
    if header.version == 1:
        return _encode_v1(header)
    if header.version == 2:
        return _encode_v2(header, checksum)
    raise ValueError(f"PROXY protocol version {header.version}: expected 1 or 2")


def _encode_v1(header: ProxyHeader) -> bytes:
    if header.tlvs:
        raise ValueError("version 1 has no TLVs")
    if header.command != "PROXY":
        raise ValueError("version 1 has no LOCAL command (send UNKNOWN)")
    if header.family == "UNSPEC":
        if header.unknown_rest and not header.unknown_rest.startswith(b" "):
            raise ValueError("unknown_rest must be empty or start with a space")
        line = b"PROXY UNKNOWN" + header.unknown_rest + b"\r\n"
    elif header.family in ("INET", "INET6"):
        proto = "TCP4" if header.family == "INET" else "TCP6"
        src = _inet(header.source, header.family)
        dst = _inet(header.destination, header.family)
        line = f"PROXY {proto} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")
    else:
        raise ValueError(f"version 1 cannot carry a {header.family} address")
    if len(line) > V1_MAX_LENGTH:
        raise ValueError(f"a {len(line)}-byte version 1 line (at most {V1_MAX_LENGTH})")
    return line


def _inet(address: Address | None, family: str) -> tuple[str, int]:
    if not isinstance(address, tuple) or len(address) != 2:
        raise ValueError(f"an {family} address is (host, port), not {address!r}")
    host, port = address
    kind = ipaddress.IPv4Address if family == "INET" else ipaddress.IPv6Address
    kind(host)  # ValueError for a host of the other family
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return host, port


def _encode_v2(header: ProxyHeader, checksum: bool) -> bytes:
    family_code = _FAMILY_CODES[header.family]
    fixed = bytes(
        [
            0x20 | _COMMAND_CODES[header.command],
            family_code << 4 | _TRANSPORT_CODES[header.transport],
        ]
    )
    if family_code == 0:
        addresses = b""
    elif family_code == 3:
        addresses = _unix_raw(header.source) + _unix_raw(header.destination)
    else:
        address = ipaddress.IPv4Address if family_code == 1 else ipaddress.IPv6Address
        layout = _INET if family_code == 1 else _INET6
        src = _inet(header.source, header.family)
        dst = _inet(header.destination, header.family)
        addresses = layout.pack(address(src[0]).packed, address(dst[0]).packed, src[1], dst[1])
    tlvs = list(header.tlvs)
    if checksum and not any(kind == PP2_TYPE_CRC32C for kind, _ in tlvs):
        tlvs.append((PP2_TYPE_CRC32C, b"\0\0\0\0"))
    body = bytearray(addresses)
    crc_at = None
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV 0x{kind:x} of {len(value)} bytes cannot be written")
        body += bytes([kind]) + len(value).to_bytes(2, "big")
        if checksum and kind == PP2_TYPE_CRC32C:
            crc_at = V2_FIXED_LENGTH + len(body)
            value = b"\0\0\0\0"
        body += value
    if len(body) > 0xFFFF:
        raise ValueError(f"a {len(body)}-byte version 2 body (at most 65535)")
    data = bytearray(V2_SIGNATURE + fixed + len(body).to_bytes(2, "big") + body)
    if crc_at is not None:
        data[crc_at : crc_at + 4] = crc32c(data).to_bytes(4, "big")
    return bytes(data)


def _unix_raw(path: Address | None) -> bytes:
    if not isinstance(path, str):
        raise ValueError(f"a Unix address is a path, not {path!r}")
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > _UNIX_PATH or raw.endswith(b"\0"):
        raise ValueError(f"a Unix path of {len(raw)} bytes (at most 108, no trailing NUL)")
    return raw.ljust(_UNIX_PATH, b"\0")


# ----------------------------------------------------------------- settings


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    """A server's PROXY protocol configuration (``Server(proxy_protocol=...)``).

    Attributes:
        accept: ``"v1"``, ``"v2"`` or ``"any"``.
        trusted: the networks whose connections may carry a header; a
            connection from anywhere else is closed before a byte is read.
            Unix-socket peers have no address: the socket file's permissions
            decide who connects, and they are trusted.
        timeout: seconds the whole header may take to arrive.
        max_v2_length: see ``ProxyParser``.
    """

    accept: str
    trusted: tuple[_Network, ...]
    timeout: float = DEFAULT_PROXY_HEADER_TIMEOUT
    max_v2_length: int = DEFAULT_MAX_V2_LENGTH

    @classmethod
    def make(
        cls,
        accept: str,
        trusted: Iterable[str | _Network],
        timeout: float = DEFAULT_PROXY_HEADER_TIMEOUT,
    ) -> ProxySettings:
        """Settings from the Server's arguments.

        Raises:
            ValueError: an unknown ``accept``, a bad network (the message
                names it), a timeout that is not positive.
        """
        if accept not in ACCEPT_MODES:
            raise ValueError(
                f"proxy_protocol must be None or one of {', '.join(ACCEPT_MODES)}, not {accept!r}"
            )
        if not timeout > 0:
            raise ValueError(f"proxy_header_timeout must be positive, got {timeout}")
        return cls(accept, parse_networks(trusted), float(timeout))

    def parser(self) -> ProxyParser:
        """A parser for one connection's header."""
        return ProxyParser(self.accept, max_v2_length=self.max_v2_length)

    def trusts(self, peer: Any) -> bool:
        """Whether a connection from ``peer`` (as accept(2) gives it) may send a header."""
        if not isinstance(peer, tuple):
            return True  # a Unix socket: no address, the file's permissions apply
        try:
            address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's IPv4 client
        return any(address in network for network in self.trusted)


def parse_networks(networks: Iterable[str | _Network]) -> tuple[_Network, ...]:
    """Networks from CIDR strings (``10.0.0.0/8``, ``::1``, a bare address is one host).

    Raises:
        ValueError: a string that is not a network; the message names it.
    """
    if isinstance(networks, (str, bytes)):
        networks = [networks]
    result = []
    for item in networks:
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            result.append(item)
            continue
        try:
            result.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or network (CIDR): {item!r}") from None
    return tuple(result)
