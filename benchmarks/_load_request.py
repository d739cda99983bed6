"""Request-reply loads: echo, the acknowledged publish, and connection churn.

echo       C connections to an echo path, each keeping `inflight` messages
           outstanding: every reply buys one more message. With 16 in
           flight a server can answer the messages of one read in one
           write; with 1 it cannot, and the figure is its per-message cost.
roundtrip  The same on the channel protocol: `pub` with an id, answered by
           its reply, one outstanding per connection.
churn      W workers each connecting, waiting for the greeting (fastws's
           welcome frame, Socket.IO's namespace reply), closing with a close
           frame and waiting for the server to drop the connection, again and
           again: handshakes per second and server CPU per handshake.

The generator writes requests as pre-masked frames, all those owed after one
read in a single write (see _wire.py), so that it is cheaper per message
than the servers it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from picows import WSError, WSTransport, ws_connect

from benchmarks._load import (
    CONNECT_TIMEOUT,
    Client,
    Sample,
    Stats,
    Watched,
    close_all,
    errors_seen,
    open_many,
    progress,
    window_figures,
)
from benchmarks._wire import Dialect, masked

REQUEST_ID = 1  # one request outstanding per connection (roundtrip) can reuse its id


class Requester(Client):
    """Keeps `inflight` requests outstanding; each response buys one more."""

    def __init__(
        self, dialect: Dialect, request: bytes, inflight: int, expect_welcome: bool
    ) -> None:
        super().__init__(dialect, expect_welcome)
        self.frame = masked(request)
        self.inflight = inflight
        self.count = 0  # responses
        self.sent = 0
        self.owed = 0
        self.running = False
        self.first: bytes | None = None  # the first response, checked after the run

    def start(self) -> None:
        self.running = True
        self.send(self.inflight)

    def send(self, n: int) -> None:
        assert self.transport is not None
        self.transport.underlying_transport.write(self.frame * n)
        self.sent += n

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if self.ready.done() and frame.payload_size != 1:
            self.count += 1
            if self.first is None:
                self.first = frame.get_payload_as_bytes()
            if self.running:
                self.owed += 1
        else:
            super().on_ws_frame(transport, frame)
        # picows marks the last frame parsed from one read: answer them all at once.
        if frame.last_in_buffer and self.owed:
            self.send(self.owed)
            self.owed = 0


def request_of(args: argparse.Namespace) -> tuple[bytes, Any]:
    """The request a connection repeats, and a check of the first response."""
    dialect: Dialect = args.dialect
    if args.mode == "echo":
        request = dialect.echo(b"x" * args.payload_size)

        def echoed(first: bytes) -> str | None:
            return None if first == request else f"echo returned {first[:80]!r}"

        return request, echoed
    request = dialect.pub(args.channel, "x" * args.payload_size, REQUEST_ID)

    def acknowledged(first: bytes) -> str | None:
        id, body = dialect.reply(first)
        ok = id == REQUEST_ID and body is not None and "error" not in body
        return None if ok else f"pub not acknowledged: {first[:120]!r}"

    return request, acknowledged


async def run_requests(args: argparse.Namespace) -> dict[str, Any]:
    watched = Watched(args)
    request, check = request_of(args)
    inflight = args.inflight if args.mode == "echo" else 1
    welcome = args.mode == "roundtrip" or args.dialect.name == "socketio"
    clients: list[Requester] = await open_many(
        args,
        args.connections,
        lambda: Requester(args.dialect, request, inflight, welcome),
        args.mode,
    )
    disconnects_before = Stats.disconnects

    def answered() -> int:
        return sum(c.count for c in clients)

    progress(f"{args.mode}: {inflight} in flight on each of {len(clients)} connections")
    for c in clients:
        c.start()
    await asyncio.sleep(args.warmup)
    a = Sample(watched, answered())
    progress(f"measuring {args.duration:.1f} s")
    await asyncio.sleep(args.duration)
    b = Sample(watched, answered())
    for c in clients:
        c.running = False
    missing = await settle(clients)
    problems = [p for c in clients[:1] if c.first is not None and (p := check(c.first))]
    disconnects = Stats.disconnects - disconnects_before
    close_all(clients)
    await asyncio.sleep(0.2)
    if b.count == a.count:
        raise RuntimeError(f"no responses during the window; {problems}")
    return {
        "mode": args.mode,
        "connections": len(clients),
        "inflight": inflight,
        "payload_size": args.payload_size,
        **window_figures(a, b, args.server_pid),
        "lost_after_drain": missing,
        "bad_responses": problems,
        "disconnects": disconnects,
        **errors_seen(),
    }


async def settle(clients: list[Requester], timeout: float = 10.0) -> int:
    """Wait for every request sent to be answered; return how many never were."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        missing = sum(c.sent - c.count for c in clients)
        if missing == 0:
            return 0
        await asyncio.sleep(0.05)
    return sum(c.sent - c.count for c in clients)


async def handshake(args: argparse.Namespace) -> None:
    """One connection's whole life: upgrade, greeting, close handshake, TCP close."""
    client = Client(args.dialect)
    try:
        transport, _ = await asyncio.wait_for(ws_connect(lambda: client, args.url), CONNECT_TIMEOUT)
        await asyncio.wait_for(client.ready, CONNECT_TIMEOUT)
        transport.send_close()
        # The server closes TCP first (RFC 6455 7.1.1), so TIME_WAIT stays on its side.
        await asyncio.wait_for(transport.wait_disconnected(), CONNECT_TIMEOUT)
    finally:
        if client.transport is not None and not client.transport.is_disconnected:
            client.transport.disconnect(graceful=False)


async def run_churn(args: argparse.Namespace) -> dict[str, Any]:
    watched = Watched(args)
    done = 0
    failures: list[str] = []
    stop = asyncio.Event()

    async def worker() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                await handshake(args)
                done += 1
            except (TimeoutError, OSError, WSError, ConnectionError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)

    progress(f"churn: {args.workers} workers connecting and closing")
    workers = [asyncio.create_task(worker()) for _ in range(args.workers)]
    await asyncio.sleep(args.warmup)
    a = Sample(watched, done)
    progress(f"measuring {args.duration:.1f} s")
    await asyncio.sleep(args.duration)
    b = Sample(watched, done)
    stop.set()
    await asyncio.gather(*workers)
    return {
        "mode": "churn",
        "workers": args.workers,
        **window_figures(a, b, args.server_pid),
        "failures": len(failures),
        "first_failures": failures[:3],
        "disconnects": 0,  # every connection is closed on purpose here
        **errors_seen(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the modes in this module (--connections and --payload-size are shared)."""
    parser.add_argument("--inflight", type=int, default=1, help="messages outstanding (echo)")
    parser.add_argument("--workers", type=int, default=32, help="concurrent handshakes (churn)")


MODES = {"echo": run_requests, "roundtrip": run_requests, "churn": run_churn}
