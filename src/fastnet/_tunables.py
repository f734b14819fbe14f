"""Sizes both codec backends share, defined once.

``fastnet._frame`` (Cython) and ``fastnet._frame_py`` both read these at
import time, so the windows ``get_buffer`` opens and the point from which a
frame is received into its own object are the same whichever backend runs:
the differential tests compare window sizes call by call. The asyncio layer
takes them from ``fastnet.framing``. Each value is part of the codecs'
observable behaviour; a change here changes both backends at once.
"""

from __future__ import annotations

__all__ = [
    "BATCH_BOUNDS",
    "BULK_READ",
    "DEFAULT_MAX_WRITE_BUFFER",
    "DIRECT_ROOM",
    "DIRECT_THRESHOLD",
    "HANDLER_SECONDS_BOUNDS",
    "LARGE_FRAME",
    "MAX_READ",
    "PAUSE_BUSY",
    "PAUSE_FAIR",
    "PAUSE_INBOX",
    "PAUSE_RATE",
    "PAUSE_STOP",
    "PAUSE_WRITE",
    "PLAIN_AFTER_READS",
    "READ_BURST",
    "READ_FAIR_FRAMES",
    "READ_HIGH_BYTES",
    "READ_HIGH_FRAMES",
    "READ_LOW_BYTES",
    "READ_LOW_FRAMES",
    "READ_SIZE",
    "SALVAGE_BYTES",
]

# Window get_buffer() opens when the caller gives no size hint (asyncio passes
# -1): 64 KiB is what uvloop asks for and about what one recv() on loopback
# returns under load.
READ_SIZE = 65536

# Largest window get_buffer() opens for a size hint: a bigger recv() gains
# nothing, and the bound keeps the extension's size arithmetic far from
# overflow.
MAX_READ = 1 << 20

# Delivered frame size from which a length-prefixed frame is received straight
# into its own object: get_buffer() then opens a window of the frame's missing
# bytes (and the next header: DIRECT_ROOM). Below it, one copy out of the
# receive buffer is cheaper than the extra recv() that ends exactly at the
# frame boundary; 32 KiB is a measured-by-eye guess, not a tuned optimum.
DIRECT_THRESHOLD = 32768

# Largest next header (the bytes up to the length field's end, or up to the
# strip if that goes further) a large frame's object is allocated room for,
# so that one read ends the frame and fetches that header. Every common
# layout's header is a few bytes; a larger one (offset and strip reach 2**48)
# would add that much to every large frame, so its frames keep windows of
# their own bytes alone, each followed by a header-sized read.
DIRECT_ROOM = 64

# ---------------------------------------------------------------------------
# The connection core (fastnet._core and fastnet._core_py) reads these too.

# Read backpressure. A handler that takes whole batches never comes near these
# marks: its inbox is empty each time it waits. They bound what a handler that
# consumes frame by frame, or not at all, lets pile up: 4096 frames is about
# four 64 KiB reads of 64-byte frames; 4 MiB is sixty-four 64 KiB reads, or
# half a maximum-size (8 MiB) frame, so reading pauses after such a frame
# until the handler has taken it. Resuming at a quarter of the mark
# (hysteresis) avoids a pause/resume pair of system calls per read.
READ_HIGH_FRAMES = 4096
READ_LOW_FRAMES = READ_HIGH_FRAMES // 4
READ_HIGH_BYTES = 4 * 1024 * 1024
READ_LOW_BYTES = READ_HIGH_BYTES // 4

# Length-prefixed payloads this large are written as [length field, payload]
# instead of being copied into one joined buffer. It equals the decoder's
# direct-receive threshold, so a large frame received straight into its final
# bytes object is echoed without ever being copied in user space. Below it,
# copying a few KiB costs less than an extra iovec (or, without vectored
# writes, an extra system call and packet). A judgement call.
LARGE_FRAME = DIRECT_THRESHOLD

# Default hard limit of a connection's unsent bytes (queued and in the
# transport's buffer), past which send() raises WriteBufferFull: 64 times
# asyncio's and uvloop's default write high-water mark (64 KiB), room for the
# bursts of a handler that drains now and then, while one that never drains
# holds at most a few MiB.
DEFAULT_MAX_WRITE_BUFFER = 4 * 1024 * 1024

# Replies queued past this many bytes make a server handler that takes its
# next frame check the transport's write high-water mark (_wait_writing): the
# per-frame test reads only the queue, not the transport. asyncio's and
# uvloop's default mark.
QUEUE_CHECK_BYTES = 64 * 1024

# Most extra reads the core makes per readiness event on CPython's selector
# transport while receiving runs of large frames, so a connection streaming
# large frames cannot keep the loop from the others for long (libuv reads up
# to 32 times per event, small reads included).
READ_BURST = 16

# Why reading is paused (bit flags); it resumes when none is left.
PAUSE_INBOX = 1  # the handler has too many frames queued
PAUSE_WRITE = 2  # the transport is over its write high-water mark
PAUSE_STOP = 4  # no more input wanted: shutdown, framing error, close
PAUSE_FAIR = 8  # until the loop's next turn, after a read of very many frames
PAUSE_RATE = 16  # the peer is over its frames-per-second limit (Limits.frame_rate)
PAUSE_BUSY = 32  # a Router's connection has max_in_flight handlers running

# A read that delivered more frames than this pauses reading until the event
# loop's next turn, so other connections get their turn: uvloop (libuv)
# reads a stream up to 32 times per readiness event, and a flood of tiny
# frames makes each 64 KiB read 16,384 frames, tens of milliseconds of work
# on the pure-Python backend. Reads of real traffic stay far below it
# (64-byte frames: about 1,000 per read), so it costs them nothing.
READ_FAIR_FRAMES = 4096

# Histogram buckets the core fills when metrics are on (ReadStats), upper
# bounds inclusive, +Inf implied. Frames per read: powers of two up to the
# inbox's high-water mark. Handler time (seconds): 5 µs to 10 s, about three
# buckets a decade, fine enough for a p99 from a callback that answers in
# microseconds and from a task that awaits a database.
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
HANDLER_SECONDS_BOUNDS = (
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)

# On uvloop a connection takes small frames through plain reads (uvloop reads
# into its own buffer and hands over the bytes: no get_buffer call per read)
# and switches to get_buffer/buffer_updated while a large frame is under way,
# so the frame is received straight into its object. It switches back after
# this many reads in a row with no large frame begun: each switch costs
# uvloop a read stop and start (an epoll_ctl or two), so a run of large
# frames, whose header reads come between them, stays on one mode.
PLAIN_AFTER_READS = 8

# A plain read is as large as uvloop's own buffer (256 KiB): under a flood of
# tiny frames that is four times the frames of a get_buffer window in one
# handler call (65,536 zero-length frames: about 100 ms on the pure-Python
# backend, which then kept a healthy client's pings waiting 0.9-1.4 s). A read
# of at least this many bytes (the peer sends faster than it is served)
# switches to get_buffer, whose window bounds each read, and such reads do not
# count towards switching back: plain reads are for small reads.
BULK_READ = READ_SIZE // 2

# Most input read from a socket after its connection broke (leftover.py):
# what the peer sent before it reset. The kernel's receive buffer bounds it
# first (6 MiB by default on Linux).
SALVAGE_BYTES = 16 << 20
