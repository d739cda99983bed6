"""Graceful stop: SIGTERM / SIGINT close every client with 1001 and exit 0.

The node spreads its 1001 closes over ``--drain-period`` (10 s by default);
these tests pass ``--drain-period 1`` so that the bounds below stay short.
tests/test_drain.py covers the drain itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable

import pytest
from conftest import NodeProcess, proto_client, unique, wait_exit
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(60)


async def drain_until_closed(c: object, timeout: float) -> None:
    ws = c.ws  # type: ignore[attr-defined]
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout)


async def assert_not_accepted(url: str) -> None:
    try:
        late = await connect(url, open_timeout=2, close_timeout=1)
    except Exception:
        return  # refused (connection refused, reset, non-101 status, timeout)
    try:
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            for _ in range(3):  # welcome at most, then the close
                await asyncio.wait_for(late.recv(), 2)
        assert late.close_code in (1001, 1006), (
            f"a client that connected after the stop signal is still served: {late.close_code}"
        )
    finally:
        await late.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_clients_1001_and_exits_0(
    node_factory: Callable[..., NodeProcess], sig: int
) -> None:
    node = node_factory(args=["--drain-period", "1"])
    ch = unique("stop")
    url = node.ws_url()
    async with proto_client(url) as a, proto_client(url) as b, proto_client(url) as c:
        clients = [a, b, c]
        await a.sub(ch)
        await b.sub(ch)
        assert await c.pub(ch, "before stop") == 1  # the clients are really live
        t0 = time.monotonic()
        node.send_signal(sig)
        await asyncio.wait_for(asyncio.gather(*(drain_until_closed(x, 5) for x in clients)), 6)
        codes = [x.ws.close_code for x in clients]
        reasons = [x.ws.close_reason for x in clients]
        assert codes == [1001, 1001, 1001], (codes, reasons, node.output_tail())

        # once clients are being told to go away, the node accepts nobody new:
        # a new connection is refused, or at most closed at once
        if node.alive():
            await assert_not_accepted(url)

        rc = await wait_exit(node, 5 - (time.monotonic() - t0) + 0.5)
        assert rc is not None, f"node still running 5 s after {sig!r}\n{node.output_tail()}"
        assert rc == 0, f"exit code {rc} after {sig!r}\n{node.output_tail()}"


async def test_sigterm_with_no_clients_exits_0(fresh_node: NodeProcess) -> None:
    node = fresh_node
    node.send_signal(signal.SIGTERM)
    rc = await wait_exit(node, 5)
    assert rc == 0, f"exit code {rc}\n{node.output_tail()}"
