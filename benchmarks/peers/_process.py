"""How a peer process starts (flags, limits, uvloop) and leaves on SIGTERM or SIGINT.

It leaves within a second or so, whatever it holds.

The driver gives a server 5 s after SIGTERM before it kills it. Unwinding
10,000 connections one by one through a library's graceful path takes longer
than that, and it is no part of what is measured. On loopback, with 10,000
subscribers still connected: websockets closes each with a closing
handshake (~9 s in all); aiohttp waits up to its shutdown_timeout, 60 s, for
every open WebSocket handler to return; python-socketio's disconnect scans
every room, and each client has a room to itself, so 10,000 disconnects take
~25 s of CPU, even when the clients have already gone.

So a peer stops accepting, gives its library GRACE seconds to close what it
can, and then leaves without unwinding the rest: the kernel closes the
sockets. Exit status 0, as for any clean stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import NoReturn

import uvloop

from benchmarks._proc import raise_nofile_limit

GRACE = 1.0  # seconds the library gets to close connections before the process goes


def exit_now() -> NoReturn:
    """End the process with status 0, skipping the event loop's teardown.

    That teardown would cancel, and so unwind one at a time, every
    connection's task still there.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


async def stop_on_signal(close: Callable[[], Awaitable[object]], grace: float = GRACE) -> NoReturn:
    """Wait for SIGINT or SIGTERM, give `close()` up to `grace` seconds, then exit.

    The handler is a plain signal.signal one, not loop.add_signal_handler:
    the loop hears of a signal only when it next polls for I/O, and with
    thousands of connections closing at once it first runs thousands of
    ready callbacks (python-socketio: ~25 s of them). A Python handler runs
    at the next bytecode instead, and starts a timer thread that ends the
    process when the grace is up, busy loop or not.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    deadline = threading.Timer(grace, exit_now)
    deadline.daemon = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not deadline.is_alive():  # the first signal only
            deadline.start()
            loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    await stop.wait()
    await close()
    exit_now()


def main(run: Callable[[str, int], Awaitable[object]], description: str) -> None:
    """A peer's entry point: --host and --port, quiet logs, the fd limit lifted."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raise_nofile_limit()
    uvloop.run(run(args.host, args.port))
