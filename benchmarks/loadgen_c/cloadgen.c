/*
 * cloadgen: a C epoll load generator that drives and verifies a framed echo server.
 *
 * Usage:
 *
 *     cloadgen --port 9000 [--host 127.0.0.1] [--connections 64] [--depth 16]
 *              [--size 64] [--duration 2] [--warmup 0.5] [--server-pid PID] [--json]
 *              [--protocol frames|router] [--message-type N]
 *
 * Why it exists: fastnet's own generator (python -m fastnet.loadgen) adds
 * about a microsecond of Python per read to the kernel's recv and send, more
 * CPU per frame than Tokio's server spends. This one does the same job, with
 * the same wire format, the same verification and the same JSON report
 * (benchmarks/compare.py reads either), with nothing per read but recv,
 * memcmp and send: its CPU per frame is the kernel's, about what the fastest
 * server spends (one recv and one send per read, like the generator), so it
 * comes as close to saturating Tokio as one core can. It is built by
 * compare.py with `gcc -O2` on demand.
 *
 * Strategy:
 *
 * - Frames are length-prefixed: a 4-byte big-endian length, then `size`
 *   payload bytes (fastnet's default LengthPrefixed()). All frames have the
 *   same size, so what a connection sends is a fixed byte sequence: a ring of
 *   R precomputed frames, repeated. Frame i of the ring starts with i (4
 *   bytes, little-endian) and continues with bytes from a xorshift generator
 *   seeded by i, so any two frames of the ring differ (for payloads of 4
 *   bytes or more; shorter ones keep the low bytes of i). R is more than twice
 *   the depth, so a server that drops, duplicates or reorders frames among
 *   those in flight returns bytes that differ from the ring. Connection n
 *   starts at frame n mod R, so bytes echoed on the wrong connection differ
 *   too.
 * - Each connection keeps `depth` frames in flight: it sends `depth` frames,
 *   and whenever k echoed frames have come back complete it sends k more, in
 *   one send() of a contiguous slice of the ring (the ring is stored with its
 *   first bytes appended again, so no slice wraps).
 * - A correct echo returns exactly the bytes sent. Every read is compared with
 *   the ring at the connection's receive offset by one memcmp: every byte is
 *   verified, for content and for order, with no decoding. A difference is an
 *   error that names the byte, and closes that connection.
 * - Latency is measured per send, not per frame, as fastnet.loadgen does:
 *   each top-up records its time and the index of its last frame; when a read
 *   completes frames, each top-up they belong to contributes (now - sent)
 *   once, weighted by its frames completed in that read, into a histogram of
 *   1.024 us buckets.
 * - One thread, level-triggered epoll, one recv per readiness event (a short
 *   read means the socket is empty; a full one is followed by another).
 * - After the warmup, the measured window starts: frames completed, this
 *   process's CPU time, the server's CPU time (utime + stime of --server-pid
 *   from /proc/PID/stat) and the whole machine's busy time (/proc/stat) are
 *   read at both edges. After it, no new frames are sent; the frames in
 *   flight must come back (and are verified) within DRAIN_TIMEOUT seconds.
 *
 * --protocol router drives the router's wire format instead (specified in
 * src/fastnet/wire.py): each frame is a request, a 12-byte header (kind 1,
 * flags 0, type --message-type, a request id, deadline 0) before the payload,
 * and the server answers each with a reply (kind 2) carrying the same id and
 * payload, in any order. So replies are parsed, not compared as a stream:
 *
 * - A request is a copy of a ring frame with its id written in, appended to
 *   the connection's output buffer; a top-up is one send() of the buffer.
 *   Ids are a per-connection counter (wrapping, skipping 0), and the request
 *   with id i on connection n carries ring frame (i + n) mod R's payload.
 * - The ids in flight live in a per-connection table of 2**k >= 2 x depth
 *   slots indexed by id & (2**k - 1), holding the id and its send time: an id
 *   whose slot is taken by an older request still in flight is skipped, so a
 *   lookup is one probe. A reply's id must be in flight and its body equal to
 *   the request's (one memcmp); latency is now - send time, per request.
 * - A frame cut by the end of a read is kept in a per-connection buffer
 *   (allocated the first time one is needed) until its end comes.
 * - An error reply (kind 3) counts one error, with its code and text, and
 *   frees its request's slot: the connection goes on, as a router's does. A
 *   malformed frame, an unknown id or a wrong body counts one error and
 *   closes the connection, as a wrong echo does. Control messages are skipped,
 *   but a ping gets its pong and a drain is counted ("drains", not an error):
 *   the connection then sends no new request, collects the replies still due
 *   and closes.
 *
 * Output: one JSON object on stdout, the shape of `fastnet.loadgen --json`
 * (frames, frames_per_s, mib_per_s, latency_ms, errors, error_messages,
 * loadgen_cpu_*, server_cpu_*, other_cpu_util, ...). Exit status 0 when
 * frames were echoed and all verified, 1 on any error, 2 on bad arguments.
 * Linux only (epoll, /proc).
 */

#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* The length field: 4 bytes, big-endian, as fastnet's default LengthPrefixed(). */
#define HEADER_SIZE 4

/* Largest recv per readiness event. Matches fastnet.loadgen's MAX_READ and
 * uvloop's read buffer: 256 KiB takes a whole 8 x 4 x 64 KiB burst at once. */
#define READ_SIZE (256 * 1024)

/* Target size of the ring of distinct frames: 64 KiB keeps the expected bytes
 * in the L2 cache of any current CPU while making wrap-arounds rare (the same
 * figure as fastnet.loadgen's RING_TARGET_BYTES). */
#define RING_TARGET_BYTES (64 * 1024)

/* After the measured window, how long outstanding frames may take to come back
 * before the missing ones count as errors. Generous: on a loaded 2-core
 * machine a slow server can need a second to flush 64 x 16 frames. */
#define DRAIN_TIMEOUT_S 5.0

/* A blocking connect gives up after this long (SO_SNDTIMEO): a server whose
 * backlog is full drops SYNs, and the kernel retries them for minutes. */
#define CONNECT_TIMEOUT_S 10

/* Error messages kept for the report; the count of errors is always exact. */
#define MAX_MESSAGES 10
#define MESSAGE_SIZE 200

/* Latency buckets are 2**10 ns = 1.024 us wide (as fastnet.loadgen's), and
 * there are 2**22 of them: up to 4.3 s, beyond which latencies share the last
 * bucket. calloc'd, so only the pages of buckets in use are ever touched. */
#define HISTOGRAM_SHIFT 10
#define HISTOGRAM_BUCKETS (1u << 22)

/* File descriptors needed beyond the connections: stdio, epoll, /proc reads. */
#define FD_MARGIN 16

/* Readiness events taken per epoll_wait: a 1,000-connection run gets many
 * per call; more than this only waits for the next call. */
#define MAX_EVENTS 512

/* The router's wire format (src/fastnet/wire.py): after the length field, a
 * 12-byte header: kind (1), flags (1), type (2), id (4), deadline (4), all
 * big-endian; then the body. */
#define ROUTER_HEADER 12
#define ROUTER_BODY (HEADER_SIZE + ROUTER_HEADER) /* a body's offset in its frame */
#define KIND_REQUEST 1
#define KIND_REPLY 2
#define KIND_ERROR 3
#define KIND_CONTROL 4
#define CONTROL_PING 1
#define CONTROL_PONG 2
#define CONTROL_DRAIN 3
/* The longest body accepted in a message that is not a reply (an error
 * reply's code and text): a longer frame is an error, so that a broken
 * length field cannot make the generator buffer without end. */
#define MAX_ERROR_BODY (16 * 1024)
/* Characters of an error reply's text kept in the error message. */
#define ERROR_TEXT 120
/* Pongs that may wait in a connection's output buffer (16 bytes each). */
#define PONG_ROOM 64

/* A request in flight (--protocol router). */
struct slot {
    uint32_t id;
    uint32_t used;
    uint64_t sent_ns;
};

struct conn {
    int fd;             /* -1 once closed */
    int number;         /* index, for error messages */
    int failed;         /* an error was counted; the connection is closed */
    int writing;        /* EPOLLOUT is armed: a send was cut short */
    uint64_t start;     /* ring offset of this connection's first byte */
    uint64_t want;      /* bytes that should have been sent so far */
    uint64_t sent;      /* bytes sent */
    uint64_t received;  /* bytes received and verified */
    uint64_t done;      /* frames completed: received / frame_size */
    uint64_t *batch_end;   /* top-ups in flight: index after their last frame */
    uint64_t *batch_ns;    /* ... and when they were queued */
    unsigned batch_head, batch_count;
    /* --protocol router */
    struct slot *slots;    /* requests in flight, indexed by id & slot_mask */
    unsigned pending;      /* requests in flight */
    uint32_t next_id;      /* the next id to try (never 0) */
    int server_drain;      /* the server sent drain: no new requests */
    unsigned char *out;    /* requests and pongs to send: out[out_sent, out_len) */
    size_t out_len, out_sent;
    unsigned char *partial; /* a frame cut by the end of a read (allocated on demand) */
    size_t partial_len;
};

/* The run's parameters and state: one process, one thread. */
static struct {
    const char *host;
    int port;
    int connections;
    int depth;
    uint64_t size;
    double duration;
    double warmup;
    long server_pid;
    int router;            /* --protocol router */
    unsigned message_type; /* --message-type */

    uint64_t frame_size;
    uint64_t ring_frames;
    uint64_t period;
    uint64_t tail;
    unsigned char *ring;
    uint64_t body_offset;  /* where a payload starts in its frame */
    uint64_t max_length;   /* router: the longest length field accepted */
    uint32_t slot_mask;    /* router: slots per connection - 1 */
    size_t out_capacity;   /* router: bytes of a connection's output buffer */
    uint64_t drains;       /* router: drain messages received */
    unsigned char *body;   /* router, --body-hex: every request's payload */

    struct conn *conns;
    int epfd;
    int recording;  /* inside the measured window: record latencies */
    int stopping;   /* after the window: send no new frames */
    uint64_t *histogram;
    uint64_t errors;
    int messages;
    char message[MAX_MESSAGES][MESSAGE_SIZE];
    unsigned char *buffer;
} g;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double process_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* CPU seconds (user + system, all threads) used by `pid` so far, or -1. */
static double pid_cpu_s(long pid) {
    char path[64], text[4096];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1.0;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    /* Fields after the ")" that closes the command name: state is field 3,
     * utime and stime are fields 14 and 15 (proc(5)). */
    char *p = strrchr(text, ')');
    if (!p) return -1.0;
    p += 2;
    unsigned long long utime = 0, stime = 0;
    for (int field = 3; field <= 15 && *p; field++) {
        if (field == 14) utime = strtoull(p, NULL, 10);
        if (field == 15) stime = strtoull(p, NULL, 10);
        p = strchr(p, ' ');
        if (!p) break;
        p++;
    }
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

/* CPU seconds all CPUs have spent busy since boot (/proc/stat), or -1: all but
 * idle and iowait (user, nice, system, irq, softirq, steal). */
static double machine_busy_s(void) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1.0;
    unsigned long long t[8] = {0};
    int got = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &t[0], &t[1], &t[2],
                     &t[3], &t[4], &t[5], &t[6], &t[7]);
    fclose(f);
    if (got != 8) return -1.0;
    unsigned long long busy = 0;
    for (int i = 0; i < 8; i++) busy += t[i];
    busy -= t[3] + t[4];
    return (double)busy / (double)sysconf(_SC_CLK_TCK);
}

static void error_message(const char *format, ...) {
    g.errors++;
    if (g.messages >= MAX_MESSAGES) return;
    va_list args;
    va_start(args, format);
    vsnprintf(g.message[g.messages++], MESSAGE_SIZE, format, args);
    va_end(args);
}

static void close_conn(struct conn *c) {
    if (c->fd >= 0) {
        close(c->fd);  /* also removes it from the epoll set */
        c->fd = -1;
    }
}

static void fail(struct conn *c) {
    c->failed = 1;
    close_conn(c);
}

/* ------------------------------------------------------------------ the ring */

/* Payload byte j of ring frame i: i itself in the first 4 bytes (little-endian),
 * then a xorshift32 sequence seeded by i. */
static void fill_payload(unsigned char *p, uint64_t size, uint32_t index) {
    uint32_t x = index * 2654435761u + 0x9e3779b9u;
    for (uint64_t j = 0; j < size; j++) {
        if (j < 4) {
            p[j] = (unsigned char)(index >> (8 * j));
        } else {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            p[j] = (unsigned char)x;
        }
    }
}

static void put_be32(unsigned char *p, uint32_t value) {
    p[0] = (unsigned char)(value >> 24);
    p[1] = (unsigned char)(value >> 16);
    p[2] = (unsigned char)(value >> 8);
    p[3] = (unsigned char)value;
}

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static unsigned be16(const unsigned char *p) { return (unsigned)p[0] << 8 | (unsigned)p[1]; }

/* The ring: frames of a length field, (router) a request header with id 0,
 * then the payload. */
static int build_ring(void) {
    g.body_offset = g.router ? ROUTER_BODY : HEADER_SIZE;
    g.frame_size = g.body_offset + g.size;
    uint64_t fill = (RING_TARGET_BYTES + g.frame_size - 1) / g.frame_size;
    uint64_t least = 2 * (uint64_t)g.depth + 1;
    g.ring_frames = fill > least ? fill : least;
    g.period = g.ring_frames * g.frame_size;
    /* Any recv (up to READ_SIZE) and any send (up to depth frames) starting
     * inside the period stays inside period + tail. */
    uint64_t in_flight = (uint64_t)g.depth * g.frame_size;
    g.tail = in_flight > READ_SIZE ? in_flight : READ_SIZE;
    g.ring = malloc(g.period + g.tail);
    if (!g.ring) return -1;
    for (uint64_t i = 0; i < g.ring_frames; i++) {
        unsigned char *frame = g.ring + i * g.frame_size;
        put_be32(frame, (uint32_t)(g.frame_size - HEADER_SIZE));
        if (g.router) {
            unsigned char *header = frame + HEADER_SIZE;
            memset(header, 0, ROUTER_HEADER);
            header[0] = KIND_REQUEST;
            header[2] = (unsigned char)(g.message_type >> 8);
            header[3] = (unsigned char)g.message_type;
        }
        if (g.body)
            memcpy(frame + g.body_offset, g.body, g.size);
        else
            fill_payload(frame + g.body_offset, g.size, (uint32_t)i);
    }
    for (uint64_t i = 0; i < g.tail; i++) g.ring[g.period + i] = g.ring[i % g.period];
    return 0;
}

/* ------------------------------------------------------------------ sending */

static void set_writing(struct conn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(g.epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0) c->writing = on;
}

/* Send what is owed (want - sent, or the router's output buffer); arm
 * EPOLLOUT when the socket is full. */
static void flush(struct conn *c) {
    for (;;) {
        const unsigned char *from;
        uint64_t n;
        if (g.router) {
            from = c->out + c->out_sent;
            n = c->out_len - c->out_sent;
        } else {
            from = g.ring + (c->start + c->sent) % g.period;
            n = c->want - c->sent;
            if (n > g.tail) n = g.tail;
        }
        if (!n) break;
        ssize_t w = send(c->fd, from, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!c->writing) set_writing(c, 1);
                return;
            }
            error_message("connection %d: send failed after %llu frames: %s", c->number,
                          (unsigned long long)c->done, strerror(errno));
            fail(c);
            return;
        }
        c->sent += (uint64_t)w;
        if (g.router) c->out_sent += (size_t)w;
    }
    if (g.router) c->out_len = c->out_sent = 0;
    if (c->writing) set_writing(c, 0);
}

/* Queue frames up to `end` (a frame index) as one top-up, then send. */
static void top_up(struct conn *c, uint64_t end, uint64_t now) {
    unsigned slot = (c->batch_head + c->batch_count) % (unsigned)(g.depth + 1);
    c->batch_end[slot] = end;
    c->batch_ns[slot] = now;
    c->batch_count++;
    c->want = end * g.frame_size;
    flush(c);
}

/* Room for `n` more bytes in the router output buffer: the bytes already
 * sent are dropped first. */
static int out_room(struct conn *c, size_t n) {
    if (c->out_sent) {
        memmove(c->out, c->out + c->out_sent, c->out_len - c->out_sent);
        c->out_len -= c->out_sent;
        c->out_sent = 0;
    }
    return c->out_len + n <= g.out_capacity;
}

/* A fresh id for a request: the counter's next value whose slot is free
 * (a slot still taken holds an older request in flight: that id is skipped,
 * so the ids in flight stay distinct). There are at most `depth` requests in
 * flight and at least 2 x depth slots, so this ends within depth + 1 tries. */
static uint32_t take_id(struct conn *c) {
    for (;;) {
        uint32_t id = c->next_id++;
        if (c->next_id == 0) c->next_id = 1; /* wrap, skipping 0 (one-way) */
        if (!c->slots[id & g.slot_mask].used) return id;
    }
}

/* Router: queue requests up to `depth` in flight, then send. */
static void router_top_up(struct conn *c, uint64_t now) {
    unsigned count = (unsigned)g.depth - c->pending;
    if (!count) return;
    if (!out_room(c, (size_t)count * g.frame_size)) return; /* cannot happen: see out_capacity */
    for (unsigned i = 0; i < count; i++) {
        uint32_t id = take_id(c);
        struct slot *s = &c->slots[id & g.slot_mask];
        s->id = id;
        s->used = 1;
        s->sent_ns = now;
        c->pending++;
        unsigned char *frame = c->out + c->out_len;
        memcpy(frame, g.ring + ((uint64_t)id + (uint64_t)c->number) % g.ring_frames * g.frame_size,
               g.frame_size);
        put_be32(frame + HEADER_SIZE + 4, id);
        c->out_len += g.frame_size;
    }
    flush(c);
}

/* ------------------------------------------------------------------ receiving */

static void report_difference(struct conn *c, const unsigned char *data, size_t n) {
    const unsigned char *expected = g.ring + (c->start + c->received) % g.period;
    size_t i = 0;
    while (i < n && data[i] == expected[i]) i++;
    uint64_t at = c->received + i;
    error_message("connection %d: echo differs from what was sent at byte %llu "
                  "(frame %llu, byte %llu of the frame)",
                  c->number, (unsigned long long)at, (unsigned long long)(at / g.frame_size),
                  (unsigned long long)(at % g.frame_size));
}

/* Account for frames completed up to `new_done`: latencies, then the top-up. */
static void completed(struct conn *c, uint64_t new_done) {
    uint64_t now = now_ns();
    uint64_t done = c->done;
    unsigned capacity = (unsigned)(g.depth + 1);
    while (done < new_done && c->batch_count) {
        uint64_t end = c->batch_end[c->batch_head];
        uint64_t sent_at = c->batch_ns[c->batch_head];
        if (end <= new_done) {
            c->batch_head = (c->batch_head + 1) % capacity;
            c->batch_count--;
        } else {
            end = new_done;
        }
        if (g.recording) {
            uint64_t bucket = (now - sent_at) >> HISTOGRAM_SHIFT;
            if (bucket >= HISTOGRAM_BUCKETS) bucket = HISTOGRAM_BUCKETS - 1;
            g.histogram[bucket] += end - done;
        }
        done = end;
    }
    c->done = new_done;
    if (!g.stopping) top_up(c, new_done + (uint64_t)g.depth, now);
}

/* ------------------------------------------------------------------ receiving replies (router) */

/* A length field outside what the generator accepts; 0 when it is fine. */
static int check_length(struct conn *c, uint32_t length) {
    if (length < ROUTER_HEADER) {
        error_message("connection %d: the server sent a %u-byte frame, shorter than the "
                      "12-byte router header", c->number, length);
    } else if (length > g.max_length) {
        error_message("connection %d: the server announced a %u-byte frame, longer than any "
                      "reply due (at most %llu)", c->number, length,
                      (unsigned long long)g.max_length);
    } else {
        return 0;
    }
    fail(c);
    return -1;
}

/* Queue a pong for ping `id`; 0, or -1 when too many wait (an error). */
static int pong(struct conn *c, uint32_t id) {
    if (!out_room(c, HEADER_SIZE + ROUTER_HEADER)) {
        error_message("connection %d: more than %d pings wait for their pong", c->number,
                      PONG_ROOM);
        fail(c);
        return -1;
    }
    unsigned char *frame = c->out + c->out_len;
    memset(frame, 0, HEADER_SIZE + ROUTER_HEADER);
    put_be32(frame, ROUTER_HEADER);
    frame[HEADER_SIZE] = KIND_CONTROL;
    frame[HEADER_SIZE + 3] = CONTROL_PONG;
    put_be32(frame + HEADER_SIZE + 4, id);
    c->out_len += HEADER_SIZE + ROUTER_HEADER;
    return 0;
}

/* A message that is not a well-formed reply of the expected length: an error
 * reply, a control message, or an error. 0, or -1 when the connection failed. */
static int router_other(struct conn *c, const unsigned char *f, uint32_t length) {
    unsigned kind = f[HEADER_SIZE], flags = f[HEADER_SIZE + 1];
    unsigned type = be16(f + HEADER_SIZE + 2);
    uint32_t id = be32(f + HEADER_SIZE + 4), deadline = be32(f + HEADER_SIZE + 8);
    if (flags) {
        error_message("connection %d: the server sent a message with flags 0x%02x "
                      "(reserved, must be 0)", c->number, flags);
    } else if (kind != KIND_REPLY && kind != KIND_ERROR && kind != KIND_CONTROL) {
        if (kind == KIND_REQUEST)
            error_message("connection %d: the server sent a request (kind 1), which a "
                          "client never accepts", c->number);
        else
            error_message("connection %d: the server sent an unknown kind %u, which a "
                          "client never accepts", c->number, kind);
    } else if (deadline) {
        error_message("connection %d: the server sent a deadline (%u ms) in a message of kind %u",
                      c->number, deadline, kind);
    } else if (kind == KIND_REPLY) {
        error_message("connection %d: the server sent a %u-byte reply to request %u, "
                      "whose body was %llu bytes", c->number, length - ROUTER_HEADER, id,
                      (unsigned long long)g.size);
    } else if (kind == KIND_ERROR) {
        struct slot *s = &c->slots[id & g.slot_mask];
        if (length < ROUTER_HEADER + 2) {
            error_message("connection %d: the server sent an error reply without its "
                          "2-byte error code", c->number);
        } else if (!s->used || s->id != id) {
            error_message("connection %d: the server sent an error reply to request %u, "
                          "which is not in flight", c->number, id);
        } else {
            /* An answer, though not the one wanted: one error; the connection
             * goes on, as the router's does. The text is shown as printable
             * ASCII (anything else as '?'), so the JSON report stays valid. */
            s->used = 0;
            c->pending--;
            const unsigned char *body = f + ROUTER_BODY;
            unsigned code = be16(body);
            size_t n = length - ROUTER_HEADER - 2;
            char text[ERROR_TEXT + 4];
            size_t shown = n > ERROR_TEXT ? ERROR_TEXT : n;
            for (size_t i = 0; i < shown; i++)
                text[i] = body[2 + i] >= 0x20 && body[2 + i] < 0x7f ? (char)body[2 + i] : '?';
            strcpy(text + shown, n > ERROR_TEXT ? "..." : "");
            error_message("connection %d: request %u (type %u) answered with error %u: '%s'",
                          c->number, id, type, code, text);
            return 0;
        }
    } else { /* control: skipped, but a ping gets its pong and a drain is counted */
        if (type == CONTROL_PING) return pong(c, id);
        if (type == CONTROL_DRAIN) {
            g.drains++;
            c->server_drain = 1;
        }
        return 0;
    }
    fail(c);
    return -1;
}

/* One complete message: `f` is its length field, `length` its value. */
static int router_message(struct conn *c, const unsigned char *f, uint32_t length, uint64_t now) {
    const unsigned char *header = f + HEADER_SIZE;
    if (header[0] == KIND_REPLY && length == g.frame_size - HEADER_SIZE && !header[1] &&
        !be32(header + 8)) {
        uint32_t id = be32(header + 4);
        struct slot *s = &c->slots[id & g.slot_mask];
        if (!s->used || s->id != id) {
            error_message("connection %d: a reply to request %u, which is not in flight",
                          c->number, id);
            fail(c);
            return -1;
        }
        const unsigned char *expected =
            g.ring + ((uint64_t)id + (uint64_t)c->number) % g.ring_frames * g.frame_size +
            ROUTER_BODY;
        if (memcmp(f + ROUTER_BODY, expected, g.size) != 0) {
            uint64_t at = 0;
            while (f[ROUTER_BODY + at] == expected[at]) at++;
            error_message("connection %d: the reply to request %u differs from its request's "
                          "body at byte %llu", c->number, id, (unsigned long long)at);
            fail(c);
            return -1;
        }
        s->used = 0;
        c->pending--;
        c->done++;
        if (g.recording) {
            uint64_t bucket = (now - s->sent_ns) >> HISTOGRAM_SHIFT;
            if (bucket >= HISTOGRAM_BUCKETS) bucket = HISTOGRAM_BUCKETS - 1;
            g.histogram[bucket]++;
        }
        return 0;
    }
    return router_other(c, f, length);
}

/* The bytes of one read: complete a cut frame first, then every whole frame
 * in place, then keep the start of a cut one. 0, or -1 when the connection
 * failed. */
static int router_input(struct conn *c, const unsigned char *data, size_t n, uint64_t now) {
    size_t p = 0;
    if (c->partial_len) {
        if (c->partial_len < HEADER_SIZE) {
            size_t take = HEADER_SIZE - c->partial_len;
            if (take > n) take = n;
            memcpy(c->partial + c->partial_len, data, take);
            c->partial_len += take;
            p += take;
            if (c->partial_len < HEADER_SIZE) return 0;
        }
        uint32_t length = be32(c->partial);
        if (check_length(c, length) != 0) return -1;
        size_t whole = HEADER_SIZE + (size_t)length;
        size_t take = whole - c->partial_len;
        if (take > n - p) take = n - p;
        memcpy(c->partial + c->partial_len, data + p, take);
        c->partial_len += take;
        p += take;
        if (c->partial_len < whole) return 0;
        c->partial_len = 0;
        if (router_message(c, c->partial, length, now) != 0) return -1;
    }
    while (n - p >= HEADER_SIZE) {
        uint32_t length = be32(data + p);
        if (check_length(c, length) != 0) return -1;
        if (n - p - HEADER_SIZE < length) break;
        if (router_message(c, data + p, length, now) != 0) return -1;
        p += HEADER_SIZE + (size_t)length;
    }
    if (p < n) {
        if (!c->partial) {
            c->partial = malloc(HEADER_SIZE + g.max_length);
            if (!c->partial) {
                error_message("connection %d: out of memory", c->number);
                fail(c);
                return -1;
            }
        }
        memcpy(c->partial, data + p, n - p);
        c->partial_len = n - p;
    }
    return 0;
}

static void router_readable(struct conn *c) {
    for (;;) {
        ssize_t n = recv(c->fd, g.buffer, READ_SIZE, 0);
        if (n > 0) {
            c->received += (uint64_t)n;
            uint64_t now = now_ns();
            if (router_input(c, g.buffer, (size_t)n, now) != 0) return;
            if (g.stopping || c->server_drain) {
                if (c->out_len > c->out_sent) flush(c); /* pongs */
                /* All answered after a drain: close, as the drain asks. */
                if (c->fd >= 0 && c->server_drain && !c->pending) close_conn(c);
            } else {
                router_top_up(c, now);
                if (c->fd >= 0 && c->out_len > c->out_sent) flush(c); /* pongs only */
            }
            if (c->fd < 0) return;
            if (n < READ_SIZE) return; /* the socket is empty */
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n == 0 && (g.stopping || c->server_drain) && !c->pending) {
            close_conn(c); /* an orderly close after everything came back */
            return;
        }
        if (n == 0)
            error_message("connection %d closed by the server after %llu frames", c->number,
                          (unsigned long long)c->done);
        else
            error_message("connection %d closed by the server after %llu frames: %s",
                          c->number, (unsigned long long)c->done, strerror(errno));
        fail(c);
        return;
    }
}

static void readable(struct conn *c) {
    if (g.router) {
        router_readable(c);
        return;
    }
    for (;;) {
        ssize_t n = recv(c->fd, g.buffer, READ_SIZE, 0);
        if (n > 0) {
            if (c->received + (uint64_t)n > c->sent) {
                error_message("connection %d: received %llu bytes more than it sent", c->number,
                              (unsigned long long)(c->received + (uint64_t)n - c->sent));
                fail(c);
                return;
            }
            const unsigned char *expected = g.ring + (c->start + c->received) % g.period;
            if (memcmp(g.buffer, expected, (size_t)n) != 0) {
                report_difference(c, g.buffer, (size_t)n);
                fail(c);
                return;
            }
            c->received += (uint64_t)n;
            uint64_t new_done = c->received / g.frame_size;
            if (new_done != c->done) {
                completed(c, new_done);
                if (c->failed) return;
            }
            if (n < READ_SIZE) return;  /* the socket is empty */
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n == 0 && g.stopping && c->received == c->want) {
            close_conn(c);  /* an orderly close after everything came back */
            return;
        }
        if (n == 0)
            error_message("connection %d closed by the server after %llu frames", c->number,
                          (unsigned long long)c->done);
        else
            error_message("connection %d closed by the server after %llu frames: %s",
                          c->number, (unsigned long long)c->done, strerror(errno));
        fail(c);
        return;
    }
}

/* ------------------------------------------------------------------ the run */

static void raise_fd_limit(void) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return;
    rlim_t wanted = (rlim_t)g.connections + FD_MARGIN;
    if (limit.rlim_max != RLIM_INFINITY && wanted > limit.rlim_max) wanted = limit.rlim_max;
    if (limit.rlim_cur != RLIM_INFINITY && wanted > limit.rlim_cur) {
        limit.rlim_cur = wanted;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

/* Open every connection (blocking connects, one after the other: on loopback
 * each takes microseconds), then make them non-blocking and watch them. */
static int open_connections(void) {
    char port[16];
    snprintf(port, sizeof port, "%d", g.port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *addr = NULL;
    int rc = getaddrinfo(g.host, port, &hints, &addr);
    if (rc != 0) {
        for (int i = 0; i < g.connections; i++)
            error_message("connection %d: cannot connect to %s:%d: %s", i, g.host, g.port,
                          gai_strerror(rc));
        return 0;
    }
    int connected = 0;
    for (int i = 0; i < g.connections; i++) {
        struct conn *c = &g.conns[i];
        c->fd = socket(addr->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0) {
            error_message("connection %d: socket: %s", i, strerror(errno));
            c->failed = 1;
            continue;
        }
        struct timeval timeout = {.tv_sec = CONNECT_TIMEOUT_S};
        setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
        if (connect(c->fd, addr->ai_addr, addr->ai_addrlen) != 0) {
            error_message("connection %d: cannot connect to %s:%d: %s", i, g.host, g.port,
                          strerror(errno));
            fail(c);
            continue;
        }
        /* Small frames go out at once, as every server under test does too. */
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(g.epfd, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
            error_message("connection %d: epoll_ctl: %s", i, strerror(errno));
            fail(c);
            continue;
        }
        connected++;
    }
    freeaddrinfo(addr);
    return connected;
}

static void dispatch(struct epoll_event *events, int n) {
    for (int i = 0; i < n; i++) {
        struct conn *c = events[i].data.ptr;
        if (c->fd < 0) continue;
        if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) readable(c);
        if (c->fd >= 0 && (events[i].events & EPOLLOUT)) flush(c);
    }
}

/* Serve readiness events until `deadline` (monotonic ns). */
static void run_until(uint64_t deadline) {
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        uint64_t now = now_ns();
        if (now >= deadline) return;
        int timeout_ms = (int)((deadline - now + 999999) / 1000000);
        int n = epoll_wait(g.epfd, events, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR) return;
        if (n > 0) dispatch(events, n);
    }
}

/* Frames sent and not yet echoed in full (router: requests not yet answered). */
static uint64_t outstanding(const struct conn *c) {
    if (c->fd < 0 || c->failed) return 0;
    if (g.router) return c->pending;
    return (c->want - c->received + g.frame_size - 1) / g.frame_size;
}

static int all_echoed(void) {
    for (int i = 0; i < g.connections; i++)
        if (outstanding(&g.conns[i])) return 0;
    return 1;
}

/* After the window: wait until every frame sent has come back, or time out. */
static void drain(void) {
    struct epoll_event events[MAX_EVENTS];
    uint64_t deadline = now_ns() + (uint64_t)(DRAIN_TIMEOUT_S * 1e9);
    while (!all_echoed()) {
        uint64_t now = now_ns();
        if (now >= deadline) break;
        int timeout_ms = (int)((deadline - now + 999999) / 1000000);
        int n = epoll_wait(g.epfd, events, MAX_EVENTS, timeout_ms);
        if (n < 0 && errno != EINTR) break;
        if (n > 0) dispatch(events, n);
    }
    uint64_t missing = 0;
    for (int i = 0; i < g.connections; i++) missing += outstanding(&g.conns[i]);
    if (missing)
        error_message(g.router ? "%llu requests sent were not answered within %g s after the run"
                               : "%llu frames sent were not echoed within %g s after the run",
                      (unsigned long long)missing, DRAIN_TIMEOUT_S);
}

static uint64_t frames_done(void) {
    uint64_t total = 0;
    for (int i = 0; i < g.connections; i++) total += g.conns[i].done;
    return total;
}

/* ------------------------------------------------------------------ report */

/* The q-th percentile (0-100) in ms, or -1 when there is no sample: the
 * midpoint of the bucket holding it, as fastnet.loadgen's Histogram does. */
static double percentile_ms(double q, uint64_t total) {
    if (!total) return -1.0;
    double rank = q / 100.0 * (double)total;
    uint64_t seen = 0;
    uint64_t bucket = 0;
    for (uint64_t b = 0; b < HISTOGRAM_BUCKETS; b++) {
        if (!g.histogram[b]) continue;
        bucket = b;
        seen += g.histogram[b];
        if ((double)seen >= rank) break;
    }
    return ((double)bucket + 0.5) * (double)(1u << HISTOGRAM_SHIFT) / 1e6;
}

static void json_number(const char *key, double value, int digits, int valid, int last) {
    if (valid)
        printf("  \"%s\": %.*f%s\n", key, digits, value, last ? "" : ",");
    else
        printf("  \"%s\": null%s\n", key, last ? "" : ",");
}

static void json_string(const char *text) {
    putchar('"');
    for (const char *p = text; *p; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

/* ------------------------------------------------------------------ arguments */

static void usage(FILE *out) {
    fprintf(out,
            "usage: cloadgen --port PORT [--host HOST] [--connections N] [--depth D]\n"
            "                [--size BYTES[K|M]] [--duration T] [--warmup W]\n"
            "                [--server-pid PID] [--json] [--protocol frames|router]\n"
            "                [--message-type N] [--body-hex HEX]\n"
            "Drive a length-prefixed (4-byte big-endian) echo server and verify every\n"
            "echoed byte; print one JSON report on stdout (--json is accepted for\n"
            "compatibility with fastnet.loadgen; the output is always JSON).\n"
            "--protocol router sends router requests (src/fastnet/wire.py) of type\n"
            "--message-type (1-65535, default 1) and matches the replies by id, in\n"
            "any order; --body-hex makes every request's body those bytes (a message a\n"
            "typed router decodes and encodes back), instead of the counter-tagged ring.\n");
}

static int parse_long(const char *text, long low, long high, long *out) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value < low || value > high) return -1;
    *out = value;
    return 0;
}

/* A byte count: 64, 64K / 64KiB (x1024), 1M / 1MiB (x1024**2). */
static int parse_size(const char *text, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || end == text || text[0] == '-') return -1;
    uint64_t unit = 1;
    if (!strcasecmp(end, "k") || !strcasecmp(end, "kib")) unit = 1024;
    else if (!strcasecmp(end, "m") || !strcasecmp(end, "mib")) unit = 1024 * 1024;
    else if (*end) return -1;
    *out = (uint64_t)value * unit;
    return 0;
}

static int parse_seconds(const char *text, double *out) {
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (errno || end == text || *end || value < 0 || value > 86400) return -1;
    *out = value;
    return 0;
}

static int parse_args(int argc, char **argv) {
    g.host = "127.0.0.1";
    g.port = -1;
    g.connections = 64;
    g.depth = 16;
    g.size = 64;
    g.duration = 5.0;
    g.warmup = 1.0;
    g.server_pid = 0;
    g.router = 0;
    g.message_type = 1;
    int message_type_given = 0;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "--json")) continue;
        if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "cloadgen: %s needs a value\n", arg);
            return -1;
        }
        const char *value = argv[++i];
        long number;
        int bad = 0;
        if (!strcmp(arg, "--host")) {
            g.host = value;
        } else if (!strcmp(arg, "--port")) {
            bad = parse_long(value, 1, 65535, &number);
            g.port = (int)number;
        } else if (!strcmp(arg, "--connections")) {
            bad = parse_long(value, 1, 1000000, &number);
            g.connections = (int)number;
        } else if (!strcmp(arg, "--depth")) {
            bad = parse_long(value, 1, 1000000, &number);
            g.depth = (int)number;
        } else if (!strcmp(arg, "--size")) {
            bad = parse_size(value, &g.size);
        } else if (!strcmp(arg, "--duration")) {
            bad = parse_seconds(value, &g.duration) || g.duration <= 0;
        } else if (!strcmp(arg, "--warmup")) {
            bad = parse_seconds(value, &g.warmup);
        } else if (!strcmp(arg, "--server-pid")) {
            bad = parse_long(value, 1, LONG_MAX, &g.server_pid);
        } else if (!strcmp(arg, "--protocol")) {
            bad = strcmp(value, "frames") != 0 && strcmp(value, "router") != 0;
            g.router = !strcmp(value, "router");
        } else if (!strcmp(arg, "--body-hex")) {
            /* A fixed request body (a valid message for a typed router,
             * e.g. a msgpack struct the server decodes and encodes back). */
            size_t digits = strlen(value);
            bad = digits == 0 || digits % 2 != 0;
            if (!bad) {
                g.body = malloc(digits / 2);
                if (!g.body) return -1;
                for (size_t k = 0; k < digits / 2 && !bad; k++) {
                    unsigned byte;
                    bad = sscanf(value + 2 * k, "%2x", &byte) != 1 ||
                          !isxdigit((unsigned char)value[2 * k]) ||
                          !isxdigit((unsigned char)value[2 * k + 1]);
                    g.body[k] = (unsigned char)byte;
                }
                g.size = digits / 2;
            }
        } else if (!strcmp(arg, "--message-type")) {
            bad = parse_long(value, 1, 65535, &number);
            g.message_type = (unsigned)number;
            message_type_given = 1;
        } else {
            fprintf(stderr, "cloadgen: unknown option %s\n", arg);
            usage(stderr);
            return -1;
        }
        if (bad) {
            fprintf(stderr, "cloadgen: bad value for %s: %s\n", arg, value);
            return -1;
        }
    }
    if (g.port < 0) {
        fprintf(stderr, "cloadgen: --port is required\n");
        usage(stderr);
        return -1;
    }
    if (g.size < 1 || g.size > 0xFFFFFFFFu - (g.router ? ROUTER_HEADER : 0)) {
        fprintf(stderr, "cloadgen: the payload size must be 1 byte to 4 GiB - 1%s\n",
                g.router ? " - 12 (the router header)" : "");
        return -1;
    }
    if (g.body && !g.router) {
        fprintf(stderr, "cloadgen: --body-hex needs --protocol router\n");
        return -1;
    }
    if (message_type_given && !g.router) {
        fprintf(stderr, "cloadgen: --message-type needs --protocol router\n");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    if (parse_args(argc, argv) != 0) return 2;
    raise_fd_limit();
    g.conns = calloc((size_t)g.connections, sizeof *g.conns);
    uint64_t *batches = calloc((size_t)g.connections * (size_t)(g.depth + 1) * 2, sizeof *batches);
    g.histogram = calloc(HISTOGRAM_BUCKETS, sizeof *g.histogram);
    g.buffer = malloc(READ_SIZE);
    g.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!g.conns || !batches || !g.histogram || !g.buffer || g.epfd < 0 || build_ring() != 0) {
        fprintf(stderr, "cloadgen: out of memory or no epoll\n");
        return 2;
    }
    struct slot *slots = NULL;
    unsigned char *outs = NULL;
    if (g.router) {
        /* Slots: a power of two, at least 2 x depth (see take_id). Output:
         * depth requests and PONG_ROOM pongs. */
        uint64_t slot_count = 2;
        while (slot_count < 2 * (uint64_t)g.depth) slot_count *= 2;
        g.slot_mask = (uint32_t)(slot_count - 1);
        g.max_length = ROUTER_HEADER + (g.size > MAX_ERROR_BODY ? g.size : MAX_ERROR_BODY);
        g.out_capacity = (size_t)g.depth * g.frame_size + PONG_ROOM * (HEADER_SIZE + ROUTER_HEADER);
        slots = calloc((size_t)g.connections * slot_count, sizeof *slots);
        outs = malloc((size_t)g.connections * g.out_capacity);
        if (!slots || !outs) {
            fprintf(stderr, "cloadgen: out of memory\n");
            return 2;
        }
    }
    for (int i = 0; i < g.connections; i++) {
        struct conn *c = &g.conns[i];
        c->number = i;
        c->fd = -1;
        c->start = ((uint64_t)i % g.ring_frames) * g.frame_size;
        c->batch_end = batches + (size_t)i * (size_t)(g.depth + 1) * 2;
        c->batch_ns = c->batch_end + g.depth + 1;
        if (g.router) {
            c->slots = slots + (size_t)i * ((size_t)g.slot_mask + 1);
            c->out = outs + (size_t)i * g.out_capacity;
            c->next_id = 1;
        }
    }

    int connected = open_connections();
    uint64_t begin = now_ns();
    for (int i = 0; i < g.connections; i++) {
        if (g.conns[i].fd < 0) continue;
        if (g.router)
            router_top_up(&g.conns[i], begin);
        else
            top_up(&g.conns[i], (uint64_t)g.depth, begin);
    }
    if (connected) run_until(begin + (uint64_t)(g.warmup * 1e9));

    uint64_t start_frames = frames_done();
    double start_cpu = process_cpu_s();
    double start_server = g.server_pid ? pid_cpu_s(g.server_pid) : -1.0;
    double start_machine = machine_busy_s();
    uint64_t start = now_ns();
    g.recording = 1;
    if (connected) run_until(start + (uint64_t)(g.duration * 1e9));
    g.recording = 0;
    g.stopping = 1;
    uint64_t end = now_ns();
    double end_cpu = process_cpu_s();
    double end_server = g.server_pid ? pid_cpu_s(g.server_pid) : -1.0;
    double end_machine = machine_busy_s();
    uint64_t frames = frames_done() - start_frames;

    drain();
    for (int i = 0; i < g.connections; i++) close_conn(&g.conns[i]);

    double window = (double)(end - start) / 1e9;
    double loadgen_cpu = end_cpu - start_cpu;
    int have_server = start_server >= 0 && end_server >= 0;
    double server_cpu = have_server ? end_server - start_server : 0.0;
    int have_machine = start_machine >= 0 && end_machine >= 0;
    double other = 0.0;
    if (have_machine) {
        /* Whatever else ran on the machine in the window: the noise figure. */
        other = (end_machine - start_machine - loadgen_cpu - server_cpu) / window;
        if (other < 0) other = 0.0;
    }
    uint64_t samples = 0;
    for (uint64_t b = 0; b < HISTOGRAM_BUCKETS; b++) samples += g.histogram[b];
    double fps = window > 0 ? (double)frames / window : 0.0;
    double mib = 1024.0 * 1024.0;

    printf("{\n");
    printf("  \"generator\": \"cloadgen (C, epoll)\",\n");
    printf("  \"host\": ");
    json_string(g.host);
    printf(",\n  \"port\": %d,\n", g.port);
    printf("  \"connections\": %d,\n  \"connected\": %d,\n", g.connections, connected);
    printf("  \"depth\": %d,\n  \"size\": %llu,\n", g.depth, (unsigned long long)g.size);
    printf("  \"framing\": \"length:4:big\",\n  \"processes\": 1,\n  \"loop\": \"epoll\",\n");
    printf("  \"protocol\": \"%s\",\n", g.router ? "router" : "frames");
    if (g.router)
        printf("  \"message_type\": %u,\n", g.message_type);
    else
        printf("  \"message_type\": null,\n");
    printf("  \"warmup_s\": %g,\n  \"duration_s\": %.4f,\n", g.warmup, window);
    printf("  \"frames\": %llu,\n", (unsigned long long)frames);
    json_number("frames_per_s", fps, 1, 1, 0);
    json_number("mib_per_s", fps * (double)g.size / mib, 3, 1, 0);
    json_number("wire_mib_per_s", fps * (double)g.frame_size / mib, 3, 1, 0);
    printf("  \"latency_ms\": {");
    const double qs[] = {50.0, 99.0, 99.9, 100.0};
    const char *names[] = {"p50", "p99", "p99.9", "max"};
    for (int i = 0; i < 4; i++) {
        double value = percentile_ms(qs[i], samples);
        if (value < 0)
            printf("\"%s\": null%s", names[i], i < 3 ? ", " : "");
        else
            printf("\"%s\": %.4f%s", names[i], value, i < 3 ? ", " : "");
    }
    printf("},\n");
    printf("  \"errors\": %llu,\n  \"error_messages\": [", (unsigned long long)g.errors);
    for (int i = 0; i < g.messages; i++) {
        if (i) printf(", ");
        json_string(g.message[i]);
    }
    printf("],\n");
    printf("  \"drains\": %llu,\n", (unsigned long long)g.drains);
    json_number("loadgen_cpu_s", loadgen_cpu, 4, 1, 0);
    json_number("loadgen_cpu_us_per_frame", frames ? loadgen_cpu / (double)frames * 1e6 : 0, 4,
                frames > 0, 0);
    json_number("loadgen_cpu_util", window > 0 ? loadgen_cpu / window : 0, 3, window > 0, 0);
    if (g.server_pid)
        printf("  \"server_pid\": %ld,\n", g.server_pid);
    else
        printf("  \"server_pid\": null,\n");
    json_number("server_cpu_s", server_cpu, 3, have_server, 0);
    json_number("server_cpu_us_per_frame", frames ? server_cpu / (double)frames * 1e6 : 0, 4,
                have_server && frames > 0, 0);
    json_number("server_cpu_util", window > 0 ? server_cpu / window : 0, 3,
                have_server && window > 0, 0);
    json_number("other_cpu_util", other, 3, have_machine && window > 0, 1);
    printf("}\n");
    fflush(stdout);
    return g.errors || !frames ? 1 : 0;
}
