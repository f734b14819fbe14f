"""fastnet: production TCP services that speak a framed protocol.

Layout (data flows top to bottom on receive):

    framing.py      framing specs (LengthPrefixed, Lines); picks the codec backend
    _frame.pyx      Cython hot path: streaming decoders over self-managed buffers, encoders
    _frame_py.py    pure-Python twin of _frame, identical behaviour
    errors.py       exception hierarchy shared by both backends
"""

from __future__ import annotations

from .errors import (
    ConnectionBrokenError,
    ConnectionBusyError,
    ConnectionClosedError,
    FastnetError,
    FrameError,
    FrameTooLarge,
    IncompleteFrame,
)
from .framing import (
    ACCELERATED,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_LINE_LENGTH,
    LengthPrefixed,
    Lines,
)

__version__ = "0.1.0"

__all__ = [
    "ACCELERATED",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_LINE_LENGTH",
    "ConnectionBrokenError",
    "ConnectionBusyError",
    "ConnectionClosedError",
    "FastnetError",
    "FrameError",
    "FrameTooLarge",
    "IncompleteFrame",
    "LengthPrefixed",
    "Lines",
    "__version__",
]
