"""The load generator: picows clients on uvloop, run as its own (pinned) process.

Two modes, each printing one JSON object on stdout and progress on stderr:

fanout  N subscribers on one channel and one publisher that keeps at most
        `window` publications outstanding (sent minus those seen by a sentinel
        subscriber, the last to subscribe, so usually the last the server
        serves). After a warm-up it measures deliveries, the server's CPU and
        its own CPU over a fixed window, then stops publishing and checks that
        every subscriber got every publication.

idle    N idle connections each subscribed to one channel; reports the server's
        RSS growth per connection.

--deflate makes every subscriber offer permessage-deflate (the publisher
does not). picows does not inflate, but hands frames with RSV1 set over as
they are, which is all a counting subscriber needs; the sentinel inflates
them to check the order, and counts the bytes each frame took on the wire.
--data records publishes ~1.2 KB JSON objects (a list of records whose values
change from one publication to the next) instead of a run of "x".

The server's figures are sampled here, next to the counters, so that CPU and
deliveries cover exactly the same interval.

Run: python -m benchmarks._load fanout --url ws://127.0.0.1:P/ws --server-pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import orjson
import uvloop
from picows import WSError, WSListener, WSMsgType, WSTransport, ws_connect

from benchmarks import _proc

TEXT = WSMsgType.TEXT
CONNECT_TIMEOUT = 10.0
CONNECT_CONCURRENCY = 64  # stays well under a default listen backlog of 100
DEFLATE_OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate"}
DEFLATE_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.2: appended before inflating
RECORD_POOL = 512  # distinct publications the publisher cycles through

L = TypeVar("L", bound=WSListener)


def progress(msg: str) -> None:
    print(f"  [load] {msg}", file=sys.stderr, flush=True)


class Stats:
    """Counters every listener shares, for what should not happen."""

    disconnects = 0
    retries = 0
    server_errors: ClassVar[list[str]] = []


class Subscriber(WSListener):
    """Subscribes on connect; once acked, only counts frames (the generator's hot path)."""

    def __init__(self, channel: str) -> None:
        self.sub_frame = orjson.dumps({"op": "sub", "ch": channel, "id": 1})
        self.count = 0
        self.subscribed = False
        self.deflate = False  # whether the server accepted permessage-deflate
        self.acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A failed attempt's future may fail after nobody awaits it: retrieve quietly.
        self.acked.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        extensions = transport.response.headers.get("Sec-WebSocket-Extensions") or ""
        self.deflate = extensions.startswith("permessage-deflate")
        transport.send(TEXT, self.sub_frame)

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if self.subscribed:
            # After the ack only publications arrive (picows answers PINGs itself);
            # not checking msg_type halves this callback's cost, the generator's hot path.
            self.count += 1
            return
        if frame.msg_type is not TEXT:
            return
        msg = orjson.loads(payload_of(frame))
        if msg.get("id") != 1:
            return  # the welcome frame
        if msg.get("ok"):
            self.subscribed = True
            if not self.acked.done():
                self.acked.set_result(None)
        elif not self.acked.done():
            self.acked.set_exception(RuntimeError(f"sub refused: {msg}"))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        Stats.disconnects += 1
        if not self.acked.done():
            self.acked.set_exception(ConnectionError("disconnected before the sub ack"))


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

    def __init__(self, channel: str) -> None:
        super().__init__(channel)
        self.last_seq = 0
        self.seq_errors = 0
        self.compressed = 0  # frames with RSV1 set
        self.wire_bytes = 0  # frame headers and payloads, as received
        self.message_bytes = 0  # the messages, inflated
        self.on_delivery: Callable[[], None] = lambda: None

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if not self.subscribed:
            super().on_ws_frame(transport, frame)
            return
        if frame.msg_type is not TEXT:
            return
        self.count += 1
        self.compressed += frame.rsv1
        self.wire_bytes += wire_size(frame.payload_size)
        message = payload_of(frame)
        self.message_bytes += len(message)
        seq = orjson.loads(message).get("seq")
        if self.last_seq and seq != self.last_seq + 1:
            self.seq_errors += 1
        self.last_seq = seq
        self.on_delivery()


class Publisher(WSListener):
    """Sends pubs without id (no ack), keeping `window` outstanding against the sentinel."""

    def __init__(self, frames: list[bytes], window: int, sentinel: Sentinel) -> None:
        self.frames = frames
        self.window = window
        self.sentinel = sentinel
        self.sent = 0
        self.running = False
        self.transport: WSTransport | None = None
        sentinel.on_delivery = self.top_up

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def top_up(self) -> None:
        if not self.running or self.transport is None:
            return
        frames = self.frames
        for _ in range(self.window - (self.sent - self.sentinel.count)):
            self.transport.send(TEXT, frames[self.sent % len(frames)])
            self.sent += 1

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type is TEXT:
            msg = orjson.loads(frame.get_payload_as_bytes())
            if "error" in msg and len(Stats.server_errors) < 10:
                Stats.server_errors.append(str(msg["error"]))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        Stats.disconnects += 1
        self.running = False


async def connect(
    url: str, make: Callable[[], L], acked: bool = True, headers: dict[str, str] | None = None
) -> L:
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
            if acked:
                await asyncio.wait_for(listener.acked, CONNECT_TIMEOUT)  # type: ignore[attr-defined]
            return listener
        except (TimeoutError, OSError, WSError) as exc:
            last = exc
            Stats.retries += 1
            if listener.transport is not None:  # type: ignore[attr-defined]
                listener.transport.disconnect(graceful=False)  # type: ignore[attr-defined]
            await asyncio.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"could not connect to {url}: {last!r}")


async def open_subscribers(
    url: str, n: int, channel: str, what: str, headers: dict[str, str] | None
) -> list[Subscriber]:
    """n subscribed connections, opened a bounded number at a time."""
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    done = 0
    step = max(1000, n // 5)
    t0 = time.perf_counter()

    async def one() -> Subscriber:
        nonlocal done
        async with sem:
            sub = await connect(url, lambda: Subscriber(channel), headers=headers)
        done += 1
        if done % step == 0 and done < n:
            progress(f"{what}: {done}/{n} subscribed")
        return sub

    subs = await asyncio.gather(*(one() for _ in range(n)))
    progress(f"{what}: {n} subscribed in {time.perf_counter() - t0:.1f} s")
    return list(subs)


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


class Snapshot:
    """Everything read at one instant of the measurement window."""

    def __init__(self, subs: list[Subscriber], sentinel: Sentinel, pids: list[int]) -> None:
        self.t = time.perf_counter()
        self.counts = [s.count for s in subs]
        self.pubs = sentinel.count
        self.wire_bytes = sentinel.wire_bytes
        self.message_bytes = sentinel.message_bytes
        self.compressed = sentinel.compressed
        self.server_cpu = _proc.cpu_seconds(pids)
        self.self_cpu = _proc.self_cpu_seconds()
        self.cpus = _proc.cpu_stats()


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
    return [orjson.dumps({"op": "pub", "ch": args.channel, "data": d}) for d in datas]


async def run_fanout(args: argparse.Namespace) -> dict[str, Any]:
    pids = _proc.process_tree(args.server_pid)
    server_core, own_core = _proc.only_cpu(args.server_pid), _proc.only_cpu(0)
    frames = pub_frames(args)
    headers = DEFLATE_OFFER if args.deflate else None
    subs = await open_subscribers(args.url, args.subscribers - 1, args.channel, "fanout", headers)
    # The sentinel subscribes last, so it is likely the last in the server's fanout order.
    sentinel = await connect(args.url, lambda: Sentinel(args.channel), headers=headers)
    subs.append(sentinel)
    publisher = await connect(
        args.url, lambda: Publisher(frames, args.window, sentinel), acked=False
    )
    disconnects_before = Stats.disconnects

    progress(f"publishing (window {args.window}), warm-up {args.warmup:.1f} s")
    publisher.running = True
    publisher.top_up()
    watchdog = asyncio.create_task(stall_watchdog(sentinel))
    try:
        await race(asyncio.sleep(args.warmup), watchdog)
        a = Snapshot(subs, sentinel, pids)
        progress(f"measuring {args.duration:.1f} s")
        await race(asyncio.sleep(args.duration), watchdog)
        b = Snapshot(subs, sentinel, pids)
    finally:
        publisher.running = False
        watchdog.cancel()

    lost = await drain(subs, publisher.sent)
    disconnects = Stats.disconnects - disconnects_before
    close_all([*subs, publisher])
    await asyncio.sleep(0.2)

    elapsed = b.t - a.t
    per_sub = [y - x for x, y in zip(a.counts, b.counts, strict=True)]
    deliveries = sum(per_sub)
    pubs = b.pubs - a.pubs
    server_cpu = b.server_cpu - a.server_cpu
    gen_cpu = b.self_cpu - a.self_cpu

    def core(name: str, attr: str) -> float:
        return float(getattr(b.cpus[name], attr) - getattr(a.cpus[name], attr))

    def core_busy(cpu: int | None) -> float | None:
        return core(f"cpu{cpu}", "busy") / elapsed if cpu is not None else None

    server_core_s = core(f"cpu{server_core}", "busy") if server_core is not None else None
    return {
        "mode": "fanout",
        "subscribers": len(subs),
        "data": args.data,
        "payload_size": args.payload_size if args.data == "filler" else None,
        "window": args.window,
        "elapsed_s": elapsed,
        "publications": pubs,
        "publications_per_s": pubs / elapsed,
        # From the sentinel over the window: the message as sent to a subscriber
        # (inflated), and the frame it took on the wire (header included).
        "message_bytes_per_delivery": (b.message_bytes - a.message_bytes) / pubs if pubs else None,
        "wire_bytes_per_delivery": (b.wire_bytes - a.wire_bytes) / pubs if pubs else None,
        "compressed_share": (b.compressed - a.compressed) / pubs if pubs else None,
        "deflate_offered": args.deflate,
        "deflate_negotiated": sum(s.deflate for s in subs),
        "deliveries": deliveries,
        "deliveries_per_s": deliveries / elapsed,
        # The server process's own utime+stime: the headline cost per delivery.
        "server_cpu_s": server_cpu,
        "server_cpu_share": server_cpu / elapsed,
        "server_us_per_delivery": server_cpu * 1e6 / deliveries if deliveries else None,
        # Its whole pinned core, softirq included (loopback TCP receive work lands there).
        "server_core": server_core,
        "server_core_busy": core_busy(server_core),
        "server_core_us_per_delivery": (
            server_core_s * 1e6 / deliveries if deliveries and server_core_s is not None else None
        ),
        "generator_cpu_share": gen_cpu / elapsed,
        "generator_core": own_core,
        "generator_core_busy": core_busy(own_core),
        # Process time on the machine that was neither the server nor us: other jobs, steal.
        "other_cpu_share": max(0.0, core("cpu", "task") - server_cpu - gen_cpu) / elapsed,
        "per_subscriber_min": min(per_sub),
        "per_subscriber_max": max(per_sub),
        "sent_total": publisher.sent,
        "lost_after_drain": lost,
        "seq_errors": sentinel.seq_errors,
        "disconnects": disconnects,
        "connect_retries": Stats.retries,
        "server_error_replies": Stats.server_errors,
        "server_processes": len(pids),
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


async def drain(subs: list[Subscriber], sent: int, timeout: float = 10.0) -> int:
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
    warm = await connect(args.url, lambda: Subscriber(args.channel), headers=headers)
    before = await settled_rss(pids)
    progress(f"idle: server RSS before {before / 1024:.1f} MiB; opening {args.connections}")
    t0 = time.perf_counter()
    conns = await open_subscribers(args.url, args.connections, args.channel, "idle", headers)
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


def main() -> None:
    parser = argparse.ArgumentParser(description="fastws benchmark load generator")
    parser.add_argument("mode", choices=["fanout", "idle"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--channel", default=None)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--payload-size", type=int, default=64, help="filler bytes per pub")
    parser.add_argument("--data", choices=["filler", "records"], default="filler")
    parser.add_argument("--records", type=int, default=15, help="records per pub (--data records)")
    parser.add_argument("--deflate", action="store_true", help="subscribers offer compression")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--connections", type=int, default=10000)
    args = parser.parse_args()
    args.channel = args.channel or ("bench" if args.mode == "fanout" else "idle")
    _proc.raise_nofile_limit()

    run = run_fanout if args.mode == "fanout" else run_idle
    try:
        result = uvloop.run(run(args))
    except Exception as exc:  # reported to the driver, which decides what to do
        print(json.dumps({"mode": args.mode, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
