"""The generator's clients, and the loads made of subscribers.

Each mode returns one dict of figures (see _generator.py for how it is run):

fanout  N subscribers on one channel and one publisher that keeps at most
        `window` publications outstanding (sent minus those seen by a sentinel
        subscriber, the last to subscribe, so usually the last the server
        serves). After a warm-up it measures deliveries, the server's CPU and
        its own CPU over a fixed window, then stops publishing and checks that
        every subscriber got every publication.

idle    N idle connections each subscribed to one channel; reports the server's
        RSS growth per connection.

latency N subscribers and a publisher sending at a steady rate, each
        publication carrying its send time; reports the distribution of
        publish-to-deliver times seen by every 10th subscriber.

Against two nodes sharing a Redis (--peer-url), fanout and latency spread
their subscribers evenly over both nodes and publish on the first (node A):
the fanout's sentinel is on node B, so the window counts publications that
crossed Redis, and the latency's headline percentiles are those of node B's
subscribers (node A's are reported too). Each node's CPU and Redis's are
reported apart; the server's is the nodes' sum.

--deflate makes every subscriber offer permessage-deflate (the publisher
does not). picows does not inflate, but hands frames with RSV1 set over as
they are, which is all a counting subscriber needs; the sentinel inflates
them to check the order, and counts the bytes each frame took on the wire.
--data records publishes ~1.2 KB JSON objects (a list of records whose values
change from one publication to the next) instead of a run of "x".

The server's figures are sampled here, next to the counters, so that CPU and
deliveries cover exactly the same interval.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from picows import WSError, WSListener, WSMsgType, WSTransport, ws_connect

from benchmarks import _proc
from benchmarks._wire import Dialect

TEXT = WSMsgType.TEXT
CONNECT_TIMEOUT = 10.0
CONNECT_CONCURRENCY = 64  # stays well under a default listen backlog of 100
DEFLATE_OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate"}
DEFLATE_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.2: appended before inflating
RECORD_POOL = 512  # distinct publications the publisher cycles through
DRAIN_MAX = 60.0  # longest wait for a fanout's last publications to arrive

L = TypeVar("L", bound="Client")


def progress(msg: str) -> None:
    print(f"  [load] {msg}", file=sys.stderr, flush=True)


class Stats:
    """Counters every listener shares, for what should not happen."""

    disconnects = 0
    retries = 0
    server_errors: ClassVar[list[str]] = []


class Client(WSListener):
    """Greets the server the way its dialect wants; `ready` resolves once it is in.

    Servers on the channel protocol send a welcome frame, echo paths send
    nothing (`expect_welcome=False`), Socket.IO needs its namespace handshake.
    """

    def __init__(self, dialect: Dialect, expect_welcome: bool = True) -> None:
        self.dialect = dialect
        self.expect_welcome = expect_welcome
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A failed attempt's future may fail after nobody awaits it: retrieve quietly.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        hello = self.dialect.hello()
        if hello is not None:
            transport.send(TEXT, hello)
        if not self.expect_welcome:
            self.on_ready(transport)

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is not TEXT:
            return
        payload = payload_of(frame)
        if self.answer(transport, payload):
            return
        if not self.ready.done() and self.dialect.is_welcome(payload):
            self.on_ready(transport)
        else:
            self.on_message(transport, payload)

    def answer(self, transport: WSTransport, payload: bytes) -> bool:
        """Answer what the dialect wants answered (Engine.IO pings); True if it was one."""
        reply = self.dialect.ping_reply(payload)
        if reply is not None:
            transport.send(TEXT, reply)
        return reply is not None

    def on_ready(self, transport: WSTransport) -> None:
        self.ready.set_result(None)

    def on_message(self, transport: WSTransport, payload: bytes) -> None:
        """Anything after the greeting; subclasses that care override it."""

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        Stats.disconnects += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected before it was ready"))


class Subscriber(Client):
    """Subscribes once in; `ready` resolves on the sub reply, then it only counts frames."""

    SUB_ID = 1

    def __init__(self, dialect: Dialect, channel: str) -> None:
        super().__init__(dialect)
        self.sub_frame = dialect.sub(channel, self.SUB_ID)
        self.count = 0
        self.subscribed = False
        self.deflate = False  # whether the server accepted permessage-deflate

    def on_ws_connected(self, transport: WSTransport) -> None:
        extensions = transport.response.headers.get("Sec-WebSocket-Extensions") or ""
        self.deflate = extensions.startswith("permessage-deflate")
        super().on_ws_connected(transport)

    def on_ready(self, transport: WSTransport) -> None:
        transport.send(TEXT, self.sub_frame)  # `ready` waits for its reply

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        # The generator's hot path: after the reply only publications arrive, but
        # for Engine.IO's one-byte pings, which must be answered, not counted.
        if self.subscribed and frame.payload_size != 1:
            self.count += 1
        else:
            super().on_ws_frame(transport, frame)

    def on_message(self, transport: WSTransport, payload: bytes) -> None:
        if self.subscribed:
            return
        id, body = self.dialect.reply(payload)
        if id != self.SUB_ID or self.ready.done():
            return
        if body and body.get("ok"):
            self.subscribed = True
            self.ready.set_result(None)
        else:
            self.ready.set_exception(RuntimeError(f"sub refused: {body}"))


def payload_of(frame: Any) -> bytes:
    """A frame's message, inflated if it came compressed (RSV1 set)."""
    payload: bytes = frame.get_payload_as_bytes()
    if frame.rsv1:
        return zlib.decompressobj(-15).decompress(payload + DEFLATE_TAIL)
    return payload


def wire_size(payload_size: int) -> int:
    """Bytes a server-to-client frame takes on the wire: header (unmasked) and payload."""
    header = 2 if payload_size < 126 else 4 if payload_size < 65536 else 10
    return header + payload_size


class Sentinel(Subscriber):
    """The subscriber whose count drives the publisher's window.

    It also checks seq order and measures what each publication costs on the
    wire; the server sends every subscriber the same frame, so its figures
    hold for all.
    """

    def __init__(self, dialect: Dialect, channel: str) -> None:
        super().__init__(dialect, channel)
        self.last_seq = 0
        self.seq_errors = 0
        self.compressed = 0  # frames with RSV1 set
        self.wire_bytes = 0  # frame headers and payloads, as received
        self.message_bytes = 0  # the messages, inflated
        self.reads = 0  # reads that brought publications (picows marks each one's last frame)
        self.on_delivery: Callable[[], None] = lambda: None

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if not self.subscribed or frame.msg_type is not TEXT or frame.payload_size == 1:
            super().on_ws_frame(transport, frame)
            return
        self.count += 1
        self.reads += frame.last_in_buffer
        self.compressed += frame.rsv1
        self.wire_bytes += wire_size(frame.payload_size)
        message = payload_of(frame)
        self.message_bytes += len(message)
        seq = int(self.dialect.publication(message)["seq"])
        if self.last_seq and seq != self.last_seq + 1:
            self.seq_errors += 1
        self.last_seq = seq
        self.on_delivery()


class Publisher(Client):
    """Sends pubs without id (no reply), keeping `window` outstanding against the sentinel.

    With more connections to publish on (`outlets`, --publishers) it sends on
    each in turn: a node runs one connection's commands in order, so through
    a broker that waits (Redis) one connection has one publication under way
    at a time, and several have several.
    """

    def __init__(
        self, dialect: Dialect, frames: list[bytes], window: int, sentinel: Sentinel
    ) -> None:
        super().__init__(dialect)
        self.frames = frames
        self.window = window
        self.sentinel = sentinel
        self.sent = 0
        self.running = False
        self.outlets: list[WSTransport] = []  # every connection published on, this one first
        sentinel.on_delivery = self.top_up

    def top_up(self) -> None:
        if not self.running or self.transport is None:
            return
        frames, outlets = self.frames, self.outlets or [self.transport]
        for _ in range(self.window - (self.sent - self.sentinel.count)):
            outlets[self.sent % len(outlets)].send(TEXT, frames[self.sent % len(frames)])
            self.sent += 1

    def on_message(self, transport: WSTransport, payload: bytes) -> None:
        _, body = self.dialect.reply(payload)
        if body and "error" in body and len(Stats.server_errors) < 10:
            Stats.server_errors.append(str(body["error"]))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        super().on_ws_disconnected(transport)
        self.running = False


async def connect(url: str, make: Callable[[], L], headers: dict[str, str] | None = None) -> L:
    """One connection, retried a few times: a burst of connects can meet a full backlog.

    Each attempt gets a fresh listener, so a late callback from a failed attempt
    can never touch the one that is returned.
    """
    last: BaseException | None = None
    for attempt in range(3):
        listener = make()
        try:
            await asyncio.wait_for(
                ws_connect(lambda lst=listener: lst, url, extra_headers=headers), CONNECT_TIMEOUT
            )
            await asyncio.wait_for(listener.ready, CONNECT_TIMEOUT)
            return listener
        except (TimeoutError, OSError, WSError) as exc:
            last = exc
            Stats.retries += 1
            if listener.transport is not None:
                listener.transport.disconnect(graceful=False)
            await asyncio.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"could not connect to {url}: {last!r}")


async def open_many(
    args: argparse.Namespace,
    n: int,
    make: Callable[[], L],
    what: str,
    headers: dict[str, str] | None = None,
    url: str | None = None,
) -> list[L]:
    """n ready connections (to `url`, by default --url), opened a bounded number at a time."""
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    done = 0
    step = max(1000, n // 5)
    t0 = time.perf_counter()

    async def one() -> L:
        nonlocal done
        async with sem:
            client = await connect(url or args.url, make, headers=headers)
        done += 1
        if done % step == 0 and done < n:
            progress(f"{what}: {done}/{n} connected")
        return client

    clients = await asyncio.gather(*(one() for _ in range(n)))
    progress(f"{what}: {n} connected in {time.perf_counter() - t0:.1f} s")
    return list(clients)


def close_all(listeners: list[Any]) -> None:
    for lst in listeners:
        if lst.transport is not None and not lst.transport.is_disconnected:
            lst.transport.disconnect()


async def settled_rss(pids: list[int], timeout: float = 4.0) -> int:
    """RSS once it stops moving (three equal-ish samples), so late frees are counted."""
    await asyncio.sleep(0.3)
    samples = [_proc.rss_kb(pids)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        samples.append(_proc.rss_kb(pids))
        last = samples[-3:]
        if len(last) == 3 and max(last) - min(last) <= max(64, max(last) // 1000):
            break
    return samples[-1]


class Watched:
    """The processes whose CPU a run counts.

    `server` is every node's process tree: their CPU summed is the server's.
    `parts` are reported apart: each node's tree when there are several
    (`node_a`, `node_b`), and the Redis they share (`redis`), which is not
    part of the server.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        trees = [_proc.process_tree(pid) for pid in args.server_pids]
        self.server = [pid for tree in trees for pid in tree]
        self.parts: dict[str, list[int]] = {}
        if len(trees) > 1:
            self.parts = {f"node_{chr(ord('a') + i)}": tree for i, tree in enumerate(trees)}
        self.helpers: tuple[str, ...] = ()  # parts outside the server
        if getattr(args, "redis_pid", None) is not None:
            self.parts["redis"] = _proc.process_tree(args.redis_pid)
            self.helpers = ("redis",)


class Sample:
    """The clock and every CPU counter, read at one instant of the measurement window."""

    def __init__(self, watched: Watched, count: int) -> None:
        self.t = time.perf_counter()
        self.count = count  # operations done so far: deliveries, echoes, handshakes
        self.server_cpu = _proc.cpu_seconds(watched.server)
        self.parts = {name: _proc.cpu_seconds(pids) for name, pids in watched.parts.items()}
        self.helpers = watched.helpers
        self.processes = len(watched.server)
        self.self_cpu = _proc.self_cpu_seconds()
        self.cpus = _proc.cpu_stats()


def window_figures(a: Sample, b: Sample, server_pid: int) -> dict[str, Any]:
    """Operations and CPU between two samples: the figures every mode reports.

    `server_us_per_op` is the headline: the server process's own CPU per
    operation, which stays honest when the generator is what saturates.
    """
    elapsed = b.t - a.t
    ops = b.count - a.count
    server_cpu = b.server_cpu - a.server_cpu
    gen_cpu = b.self_cpu - a.self_cpu
    server_core, own_core = _proc.only_cpu(server_pid), _proc.only_cpu(0)

    def busy(cpu: int | None) -> float | None:
        if cpu is None:
            return None
        return float(b.cpus[f"cpu{cpu}"].busy - a.cpus[f"cpu{cpu}"].busy)

    server_core_s = busy(server_core)
    own_core_s = busy(own_core)
    machine_task = b.cpus["cpu"].task - a.cpus["cpu"].task
    parts = {name: b.parts[name] - a.parts[name] for name in a.parts}
    helpers_cpu = sum(parts[name] for name in a.helpers)
    return {
        "elapsed_s": elapsed,
        "ops": ops,
        "ops_per_s": ops / elapsed,
        "server_cpu_share": server_cpu / elapsed,
        "server_us_per_op": server_cpu * 1e6 / ops if ops else None,
        # The server's whole pinned core, softirq included (loopback TCP receive
        # work caused by its sends lands there).
        "server_core": server_core,
        "server_core_busy": server_core_s / elapsed if server_core_s is not None else None,
        "server_core_us_per_op": (
            server_core_s * 1e6 / ops if ops and server_core_s is not None else None
        ),
        "generator_cpu_share": gen_cpu / elapsed,
        "generator_core": own_core,
        "generator_core_busy": own_core_s / elapsed if own_core_s is not None else None,
        # Process time on the machine that was neither the server (nor a Redis
        # it relies on) nor us: other jobs, steal.
        "other_cpu_share": max(0.0, machine_task - server_cpu - helpers_cpu - gen_cpu) / elapsed,
        "server_processes": b.processes,
        # Each node of several, and a shared Redis: `redis_us_per_op`, `node_b_cpu_share`...
        **{f"{name}_cpu_share": cpu / elapsed for name, cpu in parts.items()},
        **{f"{name}_us_per_op": cpu * 1e6 / ops if ops else None for name, cpu in parts.items()},
    }


def errors_seen() -> dict[str, Any]:
    return {
        "connect_retries": Stats.retries,
        "server_error_replies": Stats.server_errors,
    }


def records(rng: random.Random, n: int) -> dict[str, Any]:
    """Market-data-like: n records of id, name, price, quantity, time (~1.2 KB for 15)."""
    ts = 1_764_000_000_000 + rng.randrange(10**9)
    return {
        "type": "trades",
        "ts": ts,
        "items": [
            {
                "id": rng.randrange(10**5),
                "name": rng.choice(NAMES),
                "px": round(rng.uniform(5, 900), 2),
                "qty": rng.randrange(1, 5000),
                "ts": ts - rng.randrange(5000),
            }
            for _ in range(n)
        ],
    }


NAMES = (
    "Acme Corp",
    "Globex",
    "Initech",
    "Umbrella",
    "Stark Industries",
    "Wayne Enterprises",
    "Hooli",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
    "Wonka",
    "Vandelay Industries",
)


def pub_frames(args: argparse.Namespace) -> list[bytes]:
    """What the publisher sends, cycled: one filler frame, or many distinct record sets."""
    if args.data == "filler":
        datas: list[Any] = ["x" * args.payload_size]
    else:
        rng = random.Random(7)
        datas = [records(rng, args.records) for _ in range(RECORD_POOL)]
    return [args.dialect.pub(args.channel, d) for d in datas]


def nodes_of(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(label, url, subscribers) per node: all on --url, or spread evenly with --peer-url."""
    if args.peer_url is None:
        return [("", args.url, args.subscribers)]
    half = args.subscribers // 2
    return [("node A", args.url, half), ("node B", args.peer_url, args.subscribers - half)]


async def run_fanout(args: argparse.Namespace) -> dict[str, Any]:
    watched = Watched(args)
    frames = pub_frames(args)
    headers = DEFLATE_OFFER if args.deflate else None
    dialect, channel = args.dialect, args.channel
    nodes = nodes_of(args)
    subs: list[Subscriber] = []
    for i, (label, url, n) in enumerate(nodes):
        last = i == len(nodes) - 1  # the sentinel's node: one fewer plain subscriber
        what = f"fanout {label}".rstrip()
        subs += await open_many(
            args, n - last, lambda: Subscriber(dialect, channel), what, headers, url=url
        )
    # The sentinel subscribes last (on the last node), so it is likely the last
    # in the server's fanout order.
    sentinel = await connect(nodes[-1][1], lambda: Sentinel(dialect, channel), headers=headers)
    subs.append(sentinel)
    publisher = await connect(args.url, lambda: Publisher(dialect, frames, args.window, sentinel))
    # More connections for the publisher to send on: replies (errors) only.
    outlets = [publisher]
    if args.publishers > 1:
        outlets += await open_many(
            args,
            args.publishers - 1,
            lambda: Publisher(dialect, frames, 0, Sentinel(dialect, channel)),
            "publishers",
        )
    publisher.outlets = [o.transport for o in outlets if o.transport is not None]
    disconnects_before = Stats.disconnects

    def delivered() -> int:
        return sum(s.count for s in subs)

    progress(f"publishing (window {args.window}), warm-up {args.warmup:.1f} s")
    publisher.running = True
    publisher.top_up()
    watchdog = asyncio.create_task(stall_watchdog(sentinel))
    try:
        await race(asyncio.sleep(args.warmup), watchdog)
        a = Sample(watched, delivered())
        wire_a, message_a, compressed_a, pubs_a, reads_a = (
            sentinel.wire_bytes,
            sentinel.message_bytes,
            sentinel.compressed,
            sentinel.count,
            sentinel.reads,
        )
        progress(f"measuring {args.duration:.1f} s")
        await race(asyncio.sleep(args.duration), watchdog)
        b = Sample(watched, delivered())
        pubs = sentinel.count - pubs_a
        wire, message = sentinel.wire_bytes - wire_a, sentinel.message_bytes - message_a
        compressed = sentinel.compressed - compressed_a
        reads = sentinel.reads - reads_a
    finally:
        publisher.running = False
        watchdog.cancel()

    # What is still in flight: up to `window` publications to every subscriber.
    # A slow server needs a while to deliver it; give it time, within reason.
    rate = (b.count - a.count) / (b.t - a.t)
    backlog_s = args.window * len(subs) / rate if rate else DRAIN_MAX
    lost = await drain(subs, publisher.sent, min(DRAIN_MAX, max(10.0, 2 * backlog_s)))
    disconnects = Stats.disconnects - disconnects_before
    close_all([*subs, *outlets])
    await asyncio.sleep(0.2)
    return {
        "mode": "fanout",
        "publishers": len(outlets),
        "subscribers": len(subs),
        "subscribers_per_node": [n for _, _, n in nodes],
        "data": args.data,
        "payload_size": args.payload_size if args.data == "filler" else None,
        "window": args.window,
        **window_figures(a, b, args.server_pid),
        "publications": pubs,
        "publications_per_s": pubs / (b.t - a.t),
        # From the sentinel over the window: the message as sent to a subscriber
        # (inflated), and the frame it took on the wire (header included).
        "message_bytes_per_delivery": message / pubs if pubs else None,
        "wire_bytes_per_delivery": wire / pubs if pubs else None,
        "compressed_share": compressed / pubs if pubs else None,
        # How many publications reached the sentinel per read of its socket:
        # about how many the server put in each write to a subscriber (more
        # when the generator falls behind and reads several writes at once).
        "publications_per_read": pubs / reads if reads else None,
        "deflate_offered": args.deflate,
        "deflate_negotiated": sum(s.deflate for s in subs),
        "sent_total": publisher.sent,
        "lost_after_drain": lost,
        "seq_errors": sentinel.seq_errors,
        "disconnects": disconnects,
        **errors_seen(),
    }


async def race(main: Any, watchdog: asyncio.Task[None]) -> None:
    """Await `main`, but surface the watchdog's failure at once if it fires first."""
    task = asyncio.ensure_future(main)
    await asyncio.wait({task, watchdog}, return_when=asyncio.FIRST_COMPLETED)
    if watchdog.done():
        task.cancel()
        watchdog.result()
    await task


async def stall_watchdog(sentinel: Sentinel, limit: float = 3.0) -> None:
    """Fail the run if the sentinel stops receiving: a window run would otherwise hang."""
    last, since = sentinel.count, time.monotonic()
    while True:
        await asyncio.sleep(0.25)
        if sentinel.count != last:
            last, since = sentinel.count, time.monotonic()
        elif time.monotonic() - since > limit:
            raise RuntimeError(
                f"stalled: sentinel got nothing for {limit:.0f} s "
                f"(disconnects so far: {Stats.disconnects}, server errors: {Stats.server_errors})"
            )


async def drain(subs: Sequence[Subscriber], sent: int, timeout: float = 10.0) -> int:
    """Wait for every subscriber to catch up to `sent`; return deliveries still missing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        missing = sum(max(0, sent - s.count) for s in subs)
        if missing == 0:
            return 0
        await asyncio.sleep(0.05)
    missing = sum(max(0, sent - s.count) for s in subs)
    progress(f"after {timeout:.0f} s of drain, {missing} deliveries still missing")
    return missing


async def run_idle(args: argparse.Namespace) -> dict[str, Any]:
    pids = _proc.process_tree(args.server_pid)
    # One warm connection first, so the baseline already holds the channel and
    # whatever the server allocates lazily on its first client.
    headers = DEFLATE_OFFER if args.deflate else None
    warm = await connect(args.url, lambda: Subscriber(args.dialect, args.channel), headers=headers)
    before = await settled_rss(pids)
    progress(f"idle: server RSS before {before / 1024:.1f} MiB; opening {args.connections}")
    t0 = time.perf_counter()
    conns: list[Subscriber] = await open_many(
        args, args.connections, lambda: Subscriber(args.dialect, args.channel), "idle", headers
    )
    connect_s = time.perf_counter() - t0
    after = await settled_rss(pids)
    disconnects = Stats.disconnects
    progress(f"idle: server RSS after {after / 1024:.1f} MiB")
    close_all([warm, *conns])
    await asyncio.sleep(0.5)
    return {
        "mode": "idle",
        "connections": args.connections,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "kb_per_connection": (after - before) / args.connections,
        "deflate_offered": args.deflate,
        "deflate_negotiated": sum(c.deflate for c in conns),
        "connect_s": connect_s,
        "disconnects": disconnects,
        "connect_retries": Stats.retries,
        "server_processes": len(pids),
    }


class Timed(Subscriber):
    """Records, for each publication, the time from the publisher's send to here.

    The publisher writes its perf_counter_ns() into the data; both run in
    this process, so the clocks agree.
    """

    def __init__(self, dialect: Dialect, channel: str) -> None:
        super().__init__(dialect, channel)
        self.recording = False
        self.latencies: list[int] = []

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if not self.subscribed or frame.payload_size == 1:
            super().on_ws_frame(transport, frame)
            return
        now = time.perf_counter_ns()
        self.count += 1
        if self.recording:
            data = self.dialect.publication(frame.get_payload_as_bytes())["data"]
            self.latencies.append(now - int(data[:STAMP]))


STAMP = 20  # digits of the send time at the start of each latency publication
# Every 10th subscriber times its deliveries: spread over the server's fanout
# order, while the generator's own parsing stays small next to what it measures.
SAMPLE_EVERY = 10


async def paced(publisher: Client, args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Publish at a steady rate, each publication carrying its send time; return the count."""
    assert publisher.transport is not None
    interval = 1.0 / args.rate
    sent = 0
    next_at = time.perf_counter()
    while not stop.is_set():
        data = str(time.perf_counter_ns()).zfill(STAMP).ljust(args.payload_size, "x")
        publisher.transport.send(TEXT, args.dialect.pub(args.channel, data))
        sent += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    return sent


QUANTILES = [q / 2 for q in range(200)] + [99.5, 99.9, 99.99, 100.0]


def quantile(ordered: list[int], q: float) -> float:
    """The q-th percentile of sorted values (nearest rank), in microseconds."""
    rank = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[rank] / 1000


def sampling(dialect: Dialect, channel: str) -> Callable[[], Subscriber]:
    """Makes subscribers, every SAMPLE_EVERY-th of them Timed."""
    made = 0

    def make() -> Subscriber:
        nonlocal made
        made += 1
        return Timed(dialect, channel) if made % SAMPLE_EVERY == 0 else Subscriber(dialect, channel)

    return make


def percentiles(latencies: list[int], prefix: str = "") -> dict[str, Any]:
    """p50, p90, p99, p99.9 and max of nanosecond latencies, in microseconds."""
    ordered = sorted(latencies)
    if not ordered:
        raise RuntimeError("no publication arrived during the window")
    return {
        f"{prefix}samples": len(ordered),
        f"{prefix}p50_us": quantile(ordered, 50),
        f"{prefix}p90_us": quantile(ordered, 90),
        f"{prefix}p99_us": quantile(ordered, 99),
        f"{prefix}p999_us": quantile(ordered, 99.9),
        f"{prefix}max_us": ordered[-1] / 1000,
    }


async def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    watched = Watched(args)
    dialect, channel = args.dialect, args.channel
    nodes = nodes_of(args)
    groups: list[list[Subscriber]] = []
    for label, url, n in nodes:
        what = f"latency {label}".rstrip()
        groups.append(await open_many(args, n, sampling(dialect, channel), what, url=url))
    subs = [s for group in groups for s in group]
    timed_by_node = [[s for s in group if isinstance(s, Timed)] for group in groups]
    timed = [t for ts in timed_by_node for t in ts]
    publisher = await connect(args.url, lambda: Client(dialect))
    disconnects_before = Stats.disconnects
    stop = asyncio.Event()
    progress(f"publishing {args.rate:g}/s to {len(subs)} subscribers, warm-up {args.warmup:.1f} s")
    pacer = asyncio.create_task(paced(publisher, args, stop))
    await asyncio.sleep(args.warmup)
    for t in timed:
        t.recording = True
    a = Sample(watched, sum(s.count for s in subs))
    progress(f"measuring {args.duration:.1f} s")
    await asyncio.sleep(args.duration)
    b = Sample(watched, sum(s.count for s in subs))
    for t in timed:
        t.recording = False
    stop.set()
    sent = await pacer
    lost = await drain(subs, sent)
    disconnects = Stats.disconnects - disconnects_before
    close_all([*subs, publisher])
    await asyncio.sleep(0.2)
    # The headline is the last node's subscribers: with two nodes, those a
    # publication reaches through Redis from the publisher's node A.
    ordered = sorted(x for t in timed_by_node[-1] for x in t.latencies)
    local = {}
    if len(nodes) > 1:
        local = percentiles([x for t in timed_by_node[0] for x in t.latencies], "node_a_")
    figures = window_figures(a, b, args.server_pid)
    return {
        "mode": "latency",
        "subscribers": len(subs),
        "subscribers_per_node": [n for _, _, n in nodes],
        "rate": args.rate,
        **figures,
        "publications_per_s": figures["ops_per_s"] / len(subs),
        **percentiles(ordered),
        **local,
        # The distribution, for the plot: (percentile, microseconds).
        "quantiles_us": [[q, quantile(ordered, q)] for q in QUANTILES],
        "lost_after_drain": lost,
        "disconnects": disconnects,
        **errors_seen(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the modes in this module."""
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--payload-size", type=int, default=64, help="filler bytes per pub")
    parser.add_argument("--data", choices=["filler", "records"], default="filler")
    parser.add_argument("--records", type=int, default=15, help="records per pub (--data records)")
    parser.add_argument("--deflate", action="store_true", help="subscribers offer compression")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--publishers", type=int, default=1, help="connections publishing (fanout)")
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=50.0, help="publications/s (latency)")


MODES = {"fanout": run_fanout, "idle": run_idle, "latency": run_latency}
