"""The hot path: channels, subscriber sets, frame-once publish, coalesced writes.

A publication is framed once into a scratch buffer. For every subscriber the
frame's bytes are appended to that connection's outbox, a plain C buffer, and
the connection is marked dirty. Once per event-loop turn the hub flushes each
dirty outbox with a single write, so N publications in one turn cost a
subscriber one syscall instead of N. Replies and other per-connection frames
go through the same outbox, which keeps every byte a client receives in the
order the server produced it.

Nothing here decides policy. When an outbox passes its limit (or its
transport's buffer does, which the connection reports through
``Outbox.overflow``) the core stops queueing for it and, after the flush,
calls ``on_overflow`` so that Python code chooses what to do (close with
1013).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memset

import asyncio

from picows.picows cimport MemoryBuffer, WSTransport

# An outbox keeps a buffer of this size or smaller between flushes, so that a
# busy subscriber does not realloc every turn, while an idle one holds nothing
# larger.
cdef Py_ssize_t RETAINED_CAPACITY = 2048

# A frame larger than this is written straight to each transport after the
# outbox's pending bytes, instead of being copied into every outbox.
cdef Py_ssize_t DIRECT_WRITE_SIZE = 65536

# An outbox holding this much is written at once rather than at the end of
# the turn: a burst within one turn then costs a few writes, not memory, and
# the send-buffer limit judges how fast the client reads, not how large a
# burst is.
cdef Py_ssize_t EARLY_WRITE_SIZE = 65536

# First header bytes of final frames: FIN, then RSV1 when compressed, opcode.
cdef unsigned char TEXT = 0x81
cdef unsigned char BINARY = 0x82
cdef unsigned char RSV1 = 0x40

# Raw deflate windows a connection may have negotiated: 9 to 15 bits.
DEF MAX_WINDOW_BITS = 15

# Largest header a server frame needs: 2 bytes + 8 bytes of length, no mask.
DEF MAX_HEADER = 10
# RFC 6455 5.5: a control frame's payload.
DEF MAX_CONTROL_PAYLOAD = 125


cdef inline Py_ssize_t write_header(unsigned char* p, unsigned char first,
                                    Py_ssize_t n) noexcept:
    """Write an unmasked frame header for an n-byte payload; return its size.

    ``first`` is the header's first byte: FIN, RSV1 (compressed), opcode.
    """
    cdef int i
    p[0] = first
    if n < 126:
        p[1] = <unsigned char>n
        return 2
    if n < 65536:
        p[1] = 126
        p[2] = <unsigned char>(n >> 8)
        p[3] = <unsigned char>(n & 0xFF)
        return 4
    p[1] = 127
    for i in range(8):
        p[2 + i] = <unsigned char>((n >> (56 - 8 * i)) & 0xFF)
    return 10


cdef bytes _frame(unsigned char first, bytes payload):
    cdef unsigned char header[MAX_HEADER]
    cdef Py_ssize_t h = write_header(header, first, PyBytes_GET_SIZE(payload))
    return (<char*>header)[:h] + payload


def frame(bytes payload, bint text=True):
    """Return the complete server frame for ``payload`` (used by tests and tools)."""
    return _frame(TEXT if text else BINARY, payload)


cdef class Outbox:
    """The bytes queued for one connection until the end of the loop turn."""

    def __cinit__(self, WSTransport transport, Hub hub, Py_ssize_t limit=0):
        self.transport = transport
        self.hub = hub
        self.buf = NULL
        self.size = 0
        self.capacity = 0
        self.dirty = False
        self.closed = False
        self.overflowed = False
        self.limit = limit
        self.on_overflow = None
        self.channels = []  # few per connection: a list is a quarter of a set's size
        self.deflate_bits = 0

    def __dealloc__(self):
        free(self.buf)

    @property
    def pending(self):
        """Bytes queued here and not yet handed to the transport."""
        return self.size

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.size + extra
        cdef Py_ssize_t cap
        cdef char* grown
        if need <= self.capacity:
            return 0
        cap = self.capacity * 2 if self.capacity else 512
        while cap < need:
            cap *= 2
        grown = <char*>realloc(self.buf, cap)
        if grown == NULL:
            raise MemoryError()
        self.buf = grown
        self.capacity = cap
        return 0

    cpdef overflow(self):
        """Stop queueing for this connection and report it after the flush.

        Called by the core when the outbox passes its limit, and by the
        connection when its transport's buffer passes the same limit (the
        transport's high-water mark). The report is deferred so that no
        Python callback runs while a channel's subscribers are iterated.
        """
        if self.overflowed:
            return
        self.overflowed = True
        self.closed = True
        self.size = 0
        self.hub.overflowed.append(self)
        self.hub._schedule_flush()

    cdef bint _make_room(self, Py_ssize_t n) except -1:
        """Reserve n more bytes; False when closed, or when n would pass the limit."""
        if self.closed:
            return False
        if self.limit and self.size + n > self.limit:
            self.overflow()
            return False
        self._reserve(n)
        return True

    cdef int _queued(self) except -1:
        """After bytes were added: write now if the outbox is large, else at turn's end."""
        if self.size >= EARLY_WRITE_SIZE:
            return self._write_pending()
        if not self.dirty:
            self.hub._mark_dirty(self)
        return 0

    cdef int _append(self, const char* data, Py_ssize_t n) except -1:
        if not self._make_room(n):
            return 0
        memcpy(self.buf + self.size, data, n)
        self.size += n
        return self._queued()

    cdef int _append_frame(self, unsigned char first, const char* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t h
        if not self._make_room(n + MAX_HEADER):
            return 0
        h = write_header(<unsigned char*>self.buf + self.size, first, n)
        memcpy(self.buf + self.size + h, data, n)
        self.size += h + n
        self.hub.frames_out += 1
        return self._queued()

    cdef int _send(self, const char* frame, Py_ssize_t size) except -1:
        """Queue a complete frame; one too large to copy goes straight to the transport."""
        if size <= DIRECT_WRITE_SIZE:
            return self._append(frame, size)
        if self.closed:
            return 0
        self._write_pending()
        if not (self.transport.is_disconnected or self.transport.is_close_frame_sent):
            self.transport._fast_write(frame, size)
            self.hub.bytes_out += size
        return 0

    cdef int _write_pending(self) except -1:
        cdef Py_ssize_t n = self.size
        cdef WSTransport t = self.transport
        if n == 0:
            return 0
        self.size = 0
        if t.is_disconnected or t.is_close_frame_sent:
            return 0
        self.hub.bytes_out += n
        t._fast_write(self.buf, n)
        return 0

    cdef int _shrink(self) except -1:
        """At the end of a turn, give back a buffer that a burst made large."""
        if self.capacity > RETAINED_CAPACITY and self.size == 0:
            free(self.buf)
            self.buf = NULL
            self.capacity = 0
        return 0

    cpdef control(self, unsigned char opcode, bytes payload):
        """Write a ping (0x9) or pong (0xA) now, ahead of anything queued.

        A pong must not wait for the end of the loop turn behind a batch of
        publications, and a ping measures the peer, not our queue.
        """
        cdef unsigned char frame[2 + MAX_CONTROL_PAYLOAD]
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        if n > MAX_CONTROL_PAYLOAD:
            raise ValueError("a control frame carries at most 125 bytes")
        if self.closed or self.transport.is_disconnected or self.transport.is_close_frame_sent:
            return
        frame[0] = 0x80 | opcode
        frame[1] = <unsigned char>n
        memcpy(&frame[2], PyBytes_AS_STRING(payload), n)
        self.transport._fast_write(<char*>frame, 2 + n)
        self.hub.bytes_out += 2 + n

    cpdef send_text(self, bytes payload):
        """Queue one TEXT frame whose payload is already valid UTF-8."""
        self._append_frame(TEXT, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))

    cpdef send_binary(self, bytes payload):
        """Queue one BINARY frame."""
        self._append_frame(BINARY, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))

    cpdef send_deflated(self, bytes payload, bint text):
        """Queue one frame whose payload is a message compressed by permessage-deflate."""
        self._append_frame((TEXT if text else BINARY) | RSV1,
                           PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))

    cpdef flush(self):
        """Hand what is queued to the transport now (before a close frame, say)."""
        self._write_pending()

    cpdef close(self):
        """Leave every channel and drop what is queued.

        Later sends are ignored. Closing twice is harmless.
        """
        self.closed = True
        self.size = 0
        self.hub.drop(self)


cdef class Channel:
    """Subscribers of one channel: a list to iterate, a dict for O(1) removal."""

    def __cinit__(self, str name):
        self.name = name
        self.members = []
        self.positions = {}
        memset(self.deflaters, 0, sizeof(self.deflaters))

    def __len__(self):
        return len(self.members)


cdef class Hub:
    """Every channel of this process and the once-per-turn flush."""

    def __cinit__(self):
        self.channels = {}
        self.dirty = []
        self.overflowed = []
        self.flush_scheduled = False
        self.loop = None
        self.flush_callback = self.flush
        self.frame = NULL
        self.frame_capacity = 0
        self.deliveries = 0
        self.frames_out = 0
        self.bytes_out = 0

    def __dealloc__(self):
        free(self.frame)

    def outbox(self, WSTransport transport, Py_ssize_t limit=0):
        """Make the outbox of a newly connected transport, and slim the transport.

        picows keeps the upgrade request and response (headers and all) on
        the transport for the connection's life, and a 1 KiB buffer for the
        frames its own send methods build. By now the connection has read
        what it needs from the request, and fastws writes its frames from
        the outbox, so both go: about 2 KB per idle connection. The buffer
        is replaced by an empty one, which picows grows if it ever sends a
        close frame. (Private picows fields: see docs/decisions/0002.)
        """
        transport.request = None
        transport.response = None
        transport._write_buffer = MemoryBuffer(0)
        return Outbox(transport, self, limit)

    def channel_names(self):
        return list(self.channels)

    def deflate_bits(self, str channel):
        """The deflate windows that the channel's compressing subscribers negotiated."""
        cdef Channel ch = self.channels.get(channel)
        cdef int bits
        if ch is None:
            return []
        return [bits for bits in range(1, MAX_WINDOW_BITS + 1) if ch.deflaters[bits]]

    def subscriber_count(self, str channel):
        ch = self.channels.get(channel)
        return 0 if ch is None else len((<Channel>ch).members)

    cdef int _schedule_flush(self) except -1:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            if self.loop is None:
                self.loop = asyncio.get_running_loop()
            self.loop.call_soon(self.flush_callback)
        return 0

    cdef int _mark_dirty(self, Outbox outbox) except -1:
        outbox.dirty = True
        self.dirty.append(outbox)
        self._schedule_flush()
        return 0

    cpdef int subscribe(self, Outbox outbox, str channel) except -1:
        """Add outbox to channel, once."""
        cdef Channel ch = self.channels.get(channel)
        if ch is None:
            ch = Channel(channel)
            self.channels[channel] = ch
        if outbox in ch.positions:
            return 0
        if outbox.deflate_bits > MAX_WINDOW_BITS:
            raise ValueError("deflate_bits is 0 or a window of 9 to 15 bits")
        ch.positions[outbox] = len(ch.members)
        ch.members.append(outbox)
        ch.deflaters[outbox.deflate_bits] += 1
        outbox.channels.append(channel)
        return 0

    cpdef int unsubscribe(self, Outbox outbox, str channel) except -1:
        """Remove outbox from channel in O(1), and the channel once it is empty."""
        cdef Channel ch = self.channels.get(channel)
        cdef Py_ssize_t pos
        cdef Outbox last
        if ch is None:
            return 0
        pos = ch.positions.pop(outbox, -1)
        if pos < 0:
            return 0
        outbox.channels.remove(channel)
        ch.deflaters[outbox.deflate_bits] -= 1
        last = ch.members.pop()
        if last is not outbox:
            ch.members[pos] = last
            ch.positions[last] = pos
        if not ch.members:
            del self.channels[channel]
        return 0

    cpdef int drop(self, Outbox outbox) except -1:
        """Remove outbox from every channel."""
        for name in list(outbox.channels):
            self.unsubscribe(outbox, name)
        return 0

    cpdef Py_ssize_t publish(self, str channel, bytes payload, dict deflated=None) except -1:
        """Frame payload once and queue it for every subscriber; return how many.

        ``deflated`` maps a deflate window to the payload compressed with it:
        subscribers that negotiated that window get the compressed frame,
        framed once as well, and every other subscriber the plain one.
        """
        cdef Channel ch = self.channels.get(channel)
        cdef Py_ssize_t n, h, size, i, count
        cdef Outbox o
        cdef char* grown
        cdef list compressed = None
        cdef bytes framed
        if ch is None:
            return 0
        n = PyBytes_GET_SIZE(payload)
        size = n + MAX_HEADER
        if size > self.frame_capacity:
            grown = <char*>realloc(self.frame, size)
            if grown == NULL:
                raise MemoryError()
            self.frame = grown
            self.frame_capacity = size
        h = write_header(<unsigned char*>self.frame, TEXT, n)
        memcpy(self.frame + h, PyBytes_AS_STRING(payload), n)
        size = h + n
        if deflated:
            compressed = [None] * (MAX_WINDOW_BITS + 1)
            for bits, data in deflated.items():
                compressed[bits] = _frame(TEXT | RSV1, data)
        count = len(ch.members)
        for i in range(count):
            o = <Outbox>ch.members[i]
            if o.deflate_bits and compressed is not None and compressed[o.deflate_bits] is not None:
                framed = <bytes>compressed[o.deflate_bits]
                o._send(PyBytes_AS_STRING(framed), PyBytes_GET_SIZE(framed))
            else:
                o._send(self.frame, size)
        self.deliveries += count
        self.frames_out += count
        return count

    cpdef flush(self):
        """Write every dirty outbox once, then report the ones that overflowed."""
        cdef list dirty = self.dirty
        cdef list overflowed
        cdef Outbox o
        self.flush_scheduled = False
        self.dirty = []
        for o in dirty:
            o.dirty = False
            o._write_pending()
            o._shrink()
        if self.overflowed:
            overflowed = self.overflowed
            self.overflowed = []
            for o in overflowed:
                self.drop(o)
                if o.on_overflow is not None:
                    o.on_overflow(o)
