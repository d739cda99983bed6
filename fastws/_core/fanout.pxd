# The C contract of the fanout core: other Cython code (ours or a user's)
# cimports these classes and calls their cdef methods through the vtable.

from picows.picows cimport WSTransport


cdef class Outbox:
    cdef:
        readonly WSTransport transport
        Hub hub
        char* buf
        Py_ssize_t size
        Py_ssize_t capacity
        bint dirty
        readonly bint closed
        readonly bint overflowed
        public Py_ssize_t limit
        public object on_overflow
        readonly list channels
        public unsigned char deflate_bits

    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef bint _make_room(self, Py_ssize_t n) except -1
    cdef int _queued(self) except -1
    cdef int _append(self, const char* data, Py_ssize_t n) except -1
    cdef int _append_frame(self, unsigned char first, const char* data, Py_ssize_t n) except -1
    cdef int _send(self, const char* frame, Py_ssize_t size) except -1
    cdef int _write_pending(self) except -1
    cdef int _shrink(self) except -1
    cpdef overflow(self)
    cpdef control(self, unsigned char opcode, bytes payload)
    cpdef send_text(self, bytes payload)
    cpdef send_binary(self, bytes payload)
    cpdef send_deflated(self, bytes payload, bint text)
    cpdef flush(self)
    cpdef close(self)


cdef class Channel:
    cdef:
        readonly str name
        list members
        dict positions
        Py_ssize_t deflaters[16]


cdef class Hub:
    cdef:
        dict channels
        list dirty
        list overflowed
        bint flush_scheduled
        object loop
        object flush_callback
        char* frame
        Py_ssize_t frame_capacity
        readonly unsigned long long deliveries
        readonly unsigned long long frames_out
        readonly unsigned long long bytes_out

    cdef int _mark_dirty(self, Outbox outbox) except -1
    cdef int _schedule_flush(self) except -1
    cpdef Py_ssize_t publish(self, str channel, bytes payload, dict deflated=*) except -1
    cpdef int subscribe(self, Outbox outbox, str channel) except -1
    cpdef int unsubscribe(self, Outbox outbox, str channel) except -1
    cpdef int drop(self, Outbox outbox) except -1
    cpdef flush(self)
