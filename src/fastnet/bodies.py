"""Body codecs for the router: how a message class becomes bytes and back.

A codec is any object with two methods, called once per message class when a
router (or a client) is set up, never per message:

    decoder(cls) -> Callable[[bytes], cls]     raises on a body it cannot decode
    encoder(cls) -> Callable[[cls], Buffer]

The router calls the returned functions per message. A decoder's exception
becomes a ``DECODE_ERROR`` reply; an encoder's, an ``INTERNAL`` one.

- ``Raw()``: the body is the message: a class is built from the bytes
  (``cls(body)``, e.g. a ``bytes`` subclass) and encoded with ``bytes()``.
- ``Packed()``: fixed layouts of the ``struct`` module; each class names its
  layout in a ``layout`` class attribute (``"!IH"``) and is built from the
  unpacked fields in order (a ``NamedTuple``, a dataclass).
- ``Msgpack()``: MessagePack through msgspec (``pip install fastnet[msgspec]``),
  for ``msgspec.Struct`` classes (or any type msgspec can decode into). A
  message's type is already in the header, so no tagged union is needed to
  tell the types on one connection apart.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["BodyCodec", "Msgpack", "Packed", "Raw"]


class BodyCodec(Protocol):
    """What a router needs of a body codec."""

    def decoder(self, cls: type) -> Callable[[bytes], Any]:
        """A function turning a body into a ``cls`` (raises when it cannot)."""
        ...

    def encoder(self, cls: type) -> Callable[[Any], Any]:
        """A function turning a ``cls`` into a bytes-like body."""
        ...


class Raw:
    """The body is the message's bytes (``cls(body)`` to decode, ``bytes(msg)`` to encode)."""

    def decoder(self, cls: type) -> Callable[[bytes], Any]:
        return cls

    def encoder(self, cls: type) -> Callable[[Any], Any]:
        return bytes

    def __repr__(self) -> str:
        return "Raw()"


class Packed:
    """Fixed ``struct`` layouts: each class has a ``layout`` format string.

    A ``NamedTuple`` sets it without an annotation (``layout = "!ii"`` in the
    class body), a dataclass as ``layout: ClassVar[str] = "!ii"``. The fields
    are packed in their declared order; a layout is fixed in size, so a body
    of another size is a decode error.
    """

    def _layout(self, cls: type) -> struct.Struct:
        layout = getattr(cls, "layout", None)
        if not isinstance(layout, str):
            raise TypeError(
                f"{cls.__qualname__} has no 'layout' (a struct format string) for the Packed codec"
            )
        try:
            return struct.Struct(layout)
        except struct.error as exc:
            raise TypeError(
                f"{cls.__qualname__}.layout {layout!r} is not a struct format: {exc}"
            ) from None

    def decoder(self, cls: type) -> Callable[[bytes], Any]:
        unpack = self._layout(cls).unpack
        make = getattr(cls, "_make", None)  # a NamedTuple
        if make is not None:
            return lambda body: make(unpack(body))
        return lambda body: cls(*unpack(body))

    def encoder(self, cls: type) -> Callable[[Any], Any]:
        pack = self._layout(cls).pack
        if hasattr(cls, "_make"):
            return lambda msg: pack(*msg)
        if dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
            return lambda msg: pack(*[getattr(msg, name) for name in names])
        raise TypeError(
            f"the Packed codec needs a NamedTuple or a dataclass, not {cls.__qualname__}"
        )

    def __repr__(self) -> str:
        return "Packed()"


class Msgpack:
    """MessagePack bodies through msgspec, typed by the message class (``msgspec.Struct``)."""

    def __init__(self) -> None:
        try:
            import msgspec
        except ImportError as exc:  # pragma: no cover - the extra is installed in tests
            raise ImportError(
                "the Msgpack codec needs msgspec: pip install 'fastnet[msgspec]'"
            ) from exc
        self._msgpack = msgspec.msgpack
        self._encode = msgspec.msgpack.Encoder().encode

    def decoder(self, cls: type) -> Callable[[bytes], Any]:
        return self._msgpack.Decoder(cls).decode

    def encoder(self, cls: type) -> Callable[[Any], Any]:
        return self._encode

    def __repr__(self) -> str:
        return "Msgpack()"
