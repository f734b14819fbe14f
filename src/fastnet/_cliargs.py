"""Command-line values shared by ``fastnet serve`` and ``fastnet bench``.

One definition of each spelling the two commands accept: sizes
(``--max-frame``, ``--size``), framings (``--framing``), event loops
(``--loop``), ports and hosts, positive numbers, and the loading of
``module:NAME`` targets (an ``APP``, a framing spec object). Both ``cli.py``
and ``loadgen.py`` build their parsers from these, so the commands cannot
drift apart again.

Strategy: every parser here is an argparse ``type=`` function. It returns
the parsed value, or raises ``UsageError`` (an ``argparse.ArgumentTypeError``)
with a message that says what was given and exactly what is accepted.
argparse turns that into exit status 2, and ``ArgumentParser`` below prints it
as one line on stderr. Checks that need two options at once (``--max-frame``
with ``--framing``) or that run after parsing (loading ``APP``) raise the same
``UsageError``, and the commands report it the same way, with status 2.
Nothing here catches an exception that is not the user's: an error raised
while importing the user's module, other than the module being missing, is a
bug in that module and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import re
import sys
from typing import Any, NoReturn

from .framing import Framing, LengthPrefixed, Lines

__all__ = [
    "FRAMING_HELP",
    "FRAMING_METAVAR",
    "LOOPS",
    "SIZE_SPELLINGS",
    "ArgumentParser",
    "UsageError",
    "add_loop_argument",
    "framing_text",
    "load_attribute",
    "non_negative_float",
    "parse_framing",
    "parse_host",
    "parse_loop",
    "parse_port",
    "parse_size",
    "positive_float",
    "positive_int",
    "resolve_loop",
    "uvloop_version",
    "with_limit",
]


class UsageError(argparse.ArgumentTypeError, ValueError):
    """A bad command line: one line on stderr and exit status 2 (argparse's convention).

    Also a ``ValueError``: the functions that take these values from Python
    (``fastnet.loadgen.bench``) raise it for a bad value.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting a usage error as one line on stderr, status 2.

    argparse prints the whole usage text before the error; for a command
    with a dozen options that buries the one line that matters. Subcommand
    parsers made by ``add_subparsers`` are of this class too.
    """

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` on stderr and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------ sizes

# Every suffix is binary, KB and MB included: for a frame or buffer limit,
# "64KB" means 65536 bytes in nginx, PostgreSQL, Docker, HAProxy and Java's
# -Xmx, and that is what a user typing --max-frame 64KB expects. A decimal
# reading would turn away a 65536-byte frame under a limit the user believes
# is 64 KB.
SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}

SIZE_SPELLINGS = (
    "a whole number of bytes, optionally followed by K, KB or KiB (x1024), "
    "M, MB or MiB (x1024**2), G, GB or GiB (x1024**3), in any case: 65536, 64K, 64KB, 8MiB"
)

_SIZE = re.compile(r"([0-9]+)([a-z]*)", re.ASCII)


def parse_size(text: str) -> int:
    """Parse a byte count: ``65536``, ``64K``, ``64KB``, ``64KiB``, ``8MB``, ``8MiB``, ``1G``.

    The suffixes are case-insensitive and all binary: K, KB and KiB are
    1024; M, MB and MiB 1024**2; G, GB and GiB 1024**3; B (or none) is bytes.

    Raises:
        UsageError: anything else (a fraction, a sign, a space, another unit).
    """
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in SIZE_UNITS:
        raise UsageError(f"not a size: {text!r}; expected {SIZE_SPELLINGS}")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


# ---------------------------------------------------------------------- framing

FRAMING_METAVAR = "length[:SIZE[:ORDER]]|lines[:DELIM]|module:NAME"

FRAMING_HELP = (
    "wire layout: length (4-byte big-endian length field), length:SIZE (1, 2, 3, 4 or 8 "
    "bytes), length:SIZE:ORDER (big or little); lines (newline-terminated, a \\r before the "
    "newline removed too), lines:DELIM (frames end with DELIM; escapes \\n \\r \\t \\0 \\\\ "
    "\\xHH, e.g. 'lines:\\r\\n'); or module:NAME, a fastnet.LengthPrefixed or fastnet.Lines "
    "object in an importable module (default: the app's own, a Router's, else length)"
)

# The backslash escapes DELIM may use, and the byte each stands for. \xHH
# (two hex digits) gives any other byte.
_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "0": b"\0", "\\": b"\\"}


def parse_delimiter(text: str) -> bytes:
    """Return the bytes of a ``lines:DELIM`` delimiter, escapes resolved.

    ``\\n``, ``\\r``, ``\\t``, ``\\0`` (NUL), ``\\\\`` and ``\\xHH`` stand for
    one byte each; any other character stands for itself (UTF-8 encoded).

    Raises:
        UsageError: an empty delimiter or an unknown or cut-short escape.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\":
            out += char.encode()
            i += 1
            continue
        code = text[i + 1 : i + 2]
        if code in _ESCAPES:
            out += _ESCAPES[code]
            i += 2
        elif code == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2 : i + 4]):
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            # Shown as typed: a repr would double every backslash.
            raise UsageError(
                f"bad delimiter '{text}': unknown escape '{text[i : i + 4]}' "
                "(use \\n, \\r, \\t, \\0, \\\\ or \\xHH)"
            )
    if not out:
        raise UsageError("lines:DELIM needs a delimiter (e.g. 'lines:\\r\\n' or 'lines:\\0')")
    return bytes(out)


def _escape_delimiter(delimiter: bytes) -> str:
    """The ``lines:DELIM`` text of ``delimiter``: the inverse of ``parse_delimiter``."""
    names = {byte[0]: "\\" + code for code, byte in _ESCAPES.items()}
    parts = []
    for byte in delimiter:
        if byte in names:
            parts.append(names[byte])
        elif 0x20 < byte < 0x7F:
            parts.append(chr(byte))
        else:
            parts.append(f"\\x{byte:02x}")
    return "".join(parts)


def parse_framing(text: str, max_frame: int | None = None) -> Framing:
    """Parse a ``--framing`` value into a framing spec.

    Accepted forms (the keywords ``length``, ``lines``, ``big`` and ``little``
    in any case):

    - ``length``, ``length:SIZE``, ``length:SIZE:ORDER``: a length field of
      SIZE bytes (1, 2, 3, 4 or 8; default 4) in ORDER (``big`` or
      ``little``; default big), counting the body only.
    - ``lines``: newline-terminated frames; one ``\\r`` before the newline is
      removed too.
    - ``lines:DELIM``: frames that end with DELIM, escapes as
      ``parse_delimiter`` (``lines:\\r\\n``, ``lines:\\0``, ``lines:\\x03``).
    - ``module:NAME``: the ``fastnet.LengthPrefixed`` or ``fastnet.Lines``
      object ``NAME`` (a dotted attribute path) in module ``module``,
      imported as ``APP`` is, for any layout the forms above cannot say
      (an offset, an adjustment, frames kept whole).

    Args:
        text: the option's value.
        max_frame: when not None, the spec's limit (``max_frame``, or
            ``max_length`` for lines), replacing a module spec's own.

    Raises:
        UsageError: an unknown form, a bad parameter, a module or attribute
            that cannot be loaded, an object that is not a framing spec, or
            a ``max_frame`` the layout cannot take.
    """
    # Not stripped: a DELIM may be or end with a space.
    keyword, colon, rest = text.partition(":")
    kind = keyword.strip().lower()
    if kind == "length":
        parts = rest.lower().split(":") if colon else []
        if len(parts) > 2 or not all(parts):
            raise UsageError(f"bad framing {text!r}: expected length[:SIZE[:big|little]]")
        if parts and not re.fullmatch(r"[0-9]+", parts[0]):
            raise UsageError(f"bad framing {text!r}: SIZE must be 1, 2, 3, 4 or 8")
        size = int(parts[0]) if parts else 4
        order = parts[1] if len(parts) > 1 else "big"
        if order not in ("big", "little"):
            raise UsageError(f"bad framing {text!r}: ORDER must be big or little, not {order!r}")
        spec: Framing = _build(text, LengthPrefixed, length_size=size, byteorder=order)
    elif kind == "lines":
        spec = _build(text, Lines, delimiter=parse_delimiter(rest)) if colon else Lines()
    elif colon and keyword and rest:
        obj = load_attribute(text.strip(), "framing")
        if not isinstance(obj, Framing):
            raise UsageError(
                f"bad framing {text!r}: {rest!r} is a {type(obj).__name__}, "
                "not a framing spec (fastnet.LengthPrefixed or fastnet.Lines)"
            )
        spec = obj
    else:
        raise UsageError(f"bad framing {text!r}: expected {FRAMING_METAVAR}")
    return spec if max_frame is None else with_limit(spec, max_frame, text)


def _build(text: str, cls: Any, **params: Any) -> Any:
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad framing {text!r}: {exc}") from None


def with_limit(spec: Framing, max_frame: int, framing: str | None = None) -> Framing:
    """Return ``spec`` with its frame limit set to ``max_frame``.

    Args:
        spec: a ``LengthPrefixed`` (sets ``max_frame``) or ``Lines`` (sets
            ``max_length``).
        max_frame: the new limit in bytes.
        framing: the ``--framing`` text, named in the error.

    Raises:
        UsageError: the spec refuses the limit; the message names both values.
    """
    try:
        if isinstance(spec, Lines):
            return dataclasses.replace(spec, max_length=max_frame)
        return dataclasses.replace(spec, max_frame=max_frame)
    except (TypeError, ValueError) as exc:
        shown = framing if framing is not None else framing_text(spec) or repr(spec)
        raise UsageError(
            f"--max-frame {max_frame} does not suit --framing {shown}: {exc}"
        ) from None


def framing_text(spec: Framing) -> str | None:
    """The ``--framing`` text that gives ``spec`` back, or None when there is none.

    ``length:SIZE:ORDER``, ``lines`` or ``lines:DELIM`` (escaped); None for
    what only ``module:NAME`` can describe (an offset, an adjustment, a strip,
    unstripped lines). The frame limit is not part of the text.
    """
    if isinstance(spec, Lines):
        if not spec.strip:
            return None
        return "lines" if spec.delimiter == b"\n" else "lines:" + _escape_delimiter(spec.delimiter)
    if spec.offset or spec.adjustment or spec.strip is not None:
        return None
    return f"length:{spec.length_size}:{spec.byteorder}"


# ------------------------------------------------------------ module:NAME loading


def load_attribute(target: str, what: str) -> Any:
    """Import ``module`` and return the attribute ``NAME`` of ``module:NAME``.

    ``NAME`` may be a dotted path (``Handlers.reverse``). The current
    directory is made importable first, so ``myapp:handler`` works next to
    ``myapp.py``.

    Args:
        target: ``module:NAME``.
        what: what the target is for (``app``, ``framing``), named in errors.

    Raises:
        UsageError: not of the form ``module:NAME``, the module cannot be
            imported (ImportError), or it has no such attribute. Any other
            exception raised while importing the module propagates as it is.
    """
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise UsageError(f"{what} {target!r} is not of the form module:NAME")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} for {what} {target!r}: {exc}") from None
    try:
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise UsageError(
            f"module {module_name!r} has no attribute {attribute!r} ({what} {target!r})"
        ) from None
    return obj


# ------------------------------------------------------------------------ loops

LOOPS = ("auto", "asyncio", "uvloop")


def uvloop_version() -> str | None:
    """uvloop's version when it can be imported (``""`` if it has none), else None."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return str(getattr(uvloop, "__version__", ""))


def resolve_loop(choice: str) -> str:
    """The loop ``choice`` gives: ``auto`` is ``uvloop`` when installed, else ``asyncio``."""
    if choice != "auto":
        return choice
    return "asyncio" if uvloop_version() is None else "uvloop"


def parse_loop(text: str) -> str:
    """Parse ``--loop``: ``auto``, ``asyncio`` or ``uvloop`` (any case).

    Raises:
        UsageError: another name, or ``uvloop`` when uvloop cannot be imported.
    """
    choice = text.strip().lower()
    if choice not in LOOPS:
        raise UsageError(f"unknown loop {text!r}: expected {', '.join(LOOPS)}")
    if choice == "uvloop" and uvloop_version() is None:
        raise UsageError("uvloop is not installed (pip install uvloop, or use --loop asyncio)")
    return choice


def add_loop_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--loop auto|asyncio|uvloop`` to ``parser``."""
    parser.add_argument(
        "--loop",
        type=parse_loop,
        default="auto",
        metavar="|".join(LOOPS),
        help="event loop; auto uses uvloop if installed (auto)",
    )


# ------------------------------------------------------------ numbers, addresses


def positive_int(text: str) -> int:
    """Parse an integer of at least 1.

    Raises:
        UsageError: not an integer, or below 1.
    """
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"not an integer: {text!r}") from None
    if value < 1:
        raise UsageError(f"must be at least 1: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"must be a finite number of seconds: {text!r}")
    return value


def positive_float(text: str) -> float:
    """Parse a finite number above 0 (seconds).

    Raises:
        UsageError: not a number, not finite, or not above 0.
    """
    value = _seconds(text)
    if not value > 0:
        raise UsageError(f"must be positive: {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """Parse a finite number of at least 0 (seconds).

    Raises:
        UsageError: not a number, not finite, or negative.
    """
    value = _seconds(text)
    if value < 0:
        raise UsageError(f"must not be negative: {text!r}")
    return value


def parse_port(text: str) -> int:
    """Parse a TCP port, 0 to 65535.

    Raises:
        UsageError: not an integer or out of range.
    """
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise UsageError(f"port out of range 0-65535: {text!r}")
    return value


def parse_host(text: str) -> str:
    """Parse ``--host``: an address or name, or ``unix:PATH`` for a Unix socket.

    Raises:
        UsageError: empty, or ``unix:`` without a path.
    """
    if not text:
        raise UsageError("the host must not be empty (127.0.0.1, ::1, 0.0.0.0, a name, unix:PATH)")
    if text == "unix:":
        raise UsageError("unix:PATH needs a path")
    return text
