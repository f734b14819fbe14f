"""Sizes both codec backends share, defined once.

``fastnet._frame`` (Cython) and ``fastnet._frame_py`` both read these at
import time, so the windows ``get_buffer`` opens and the point from which a
frame is received into its own object are the same whichever backend runs:
the differential tests compare window sizes call by call. The asyncio layer
takes them from ``fastnet.framing``. Each value is part of the codecs'
observable behaviour; a change here changes both backends at once.
"""

from __future__ import annotations

__all__ = ["DIRECT_THRESHOLD", "MAX_READ", "READ_SIZE"]

# Window get_buffer() opens when the caller gives no size hint (asyncio passes
# -1): 64 KiB is what uvloop asks for and about what one recv() on loopback
# returns under load.
READ_SIZE = 65536

# Largest window get_buffer() opens for a size hint: a bigger recv() gains
# nothing, and the bound keeps the extension's size arithmetic far from
# overflow.
MAX_READ = 1 << 20

# Delivered frame size from which a length-prefixed frame is received straight
# into its own object: get_buffer() then opens a window of exactly the frame's
# missing bytes. Below it, one copy out of the receive buffer is cheaper than
# the extra recv() that ends exactly at the frame boundary; 32 KiB is a
# measured-by-eye guess, not a tuned optimum.
DIRECT_THRESHOLD = 32768
