"""Graceful drain on SIGTERM: probes keep answering, upgrades get 503, clients leave in a spread.

The node keeps its listening socket during the drain: ``/healthz`` is 200,
``/readyz`` 503, and a new upgrade 503 on the same port. Its connections
are closed with 1001 spread evenly over ``--drain-period``; then it exits 0.
A second SIGTERM ends it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable

import pytest
from conftest import (
    OP_CLOSE,
    NodeProcess,
    PeerClosed,
    RawWS,
    ahttp_get,
    ascrape,
    metric,
    unique,
    wait_exit,
)

pytestmark = pytest.mark.timeout(60)


class Watched:
    """A raw client whose close (frame or drop) is timestamped against the signal."""

    def __init__(self, ws: RawWS) -> None:
        self.ws = ws
        self.code: int | None = None
        self.how = ""
        self.at: float | None = None  # monotonic time the close frame or the drop arrived
        self.task: asyncio.Task[None] | None = None
        self.messages: list[object] = []

    async def watch(self) -> None:
        try:
            while True:
                f = await self.ws.recv_frame(timeout=60)
                if f.opcode == OP_CLOSE:
                    self.at = time.monotonic()
                    self.code = f.close_code
                    self.how = "close frame"
                    with contextlib.suppress(OSError):
                        await self.ws.send_frame(OP_CLOSE, f.payload[:2])
                    return
                self.messages.append(f.json())
        except PeerClosed as exc:
            self.at = time.monotonic()
            self.how = exc.how

    @property
    def closed(self) -> bool:
        return self.at is not None


async def watched_clients(node: NodeProcess, n: int) -> list[Watched]:
    out = []
    for _ in range(n):
        ws = await RawWS.open(node.port)
        assert ws.status == 101, ws.status
        await ws.welcome()
        w = Watched(ws)
        out.append(w)
    for w in out:
        w.task = asyncio.create_task(w.watch())
    return out


async def finish(clients: list[Watched], timeout: float) -> None:
    tasks = [w.task for w in clients if w.task is not None]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    for w in clients:
        w.ws.close()


async def upgrade_status(node: NodeProcess) -> int:
    ws = await RawWS.open(node.port)
    ws.close()
    return ws.status


async def test_drain_probes_refusals_and_spread_closes(
    node_factory: Callable[..., NodeProcess],
) -> None:
    period, n = 2.0, 20
    node = node_factory(args=["--drain-period", str(period)])
    clients = await watched_clients(node, n)
    try:
        await asyncio.sleep(0.2)
        assert not any(w.closed for w in clients), "a client was closed before SIGTERM"

        t0 = time.monotonic()
        node.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        # at once: not ready, still healthy, upgrades refused, all on the same port
        ready = await ahttp_get(node.port, "/readyz")
        assert ready.status == 503, ready
        health = await ahttp_get(node.port, "/healthz")
        assert health.status == 200, health
        assert await upgrade_status(node) == 503
        assert time.monotonic() - t0 < 1.0, "the probes took too long to test 'at once'"

        # a client whose turn has not come yet is still served
        await asyncio.sleep(0.3)
        waiting = [w for w in clients if not w.closed]
        assert waiting, "every client was closed within 0.4 s of a 2 s drain"
        ch = unique("drain")
        served = False
        for w in waiting[-3:]:  # one may be closed (its turn) in the meantime; not all
            await w.ws.send_json({"op": "pub", "ch": ch, "data": 1, "id": 5})
            for _ in range(100):
                if w.messages or w.closed:
                    break
                await asyncio.sleep(0.01)
            if any(isinstance(m, dict) and m.get("id") == 5 for m in w.messages):
                assert any(isinstance(m, dict) and m.get("ok") for m in w.messages), w.messages
                served = True
                break
            assert w.code == 1001, (w.code, w.how, w.messages)
        assert served, "no client still waiting for its turn was served"

        # halfway through: the same again
        await asyncio.sleep(max(0.0, t0 + 1.2 - time.monotonic()))
        assert node.alive(), node.output_tail()
        assert (await ahttp_get(node.port, "/healthz")).status == 200
        assert (await ahttp_get(node.port, "/readyz")).status == 503
        assert await upgrade_status(node) == 503
        samples = await ascrape(node.port)
        assert metric(samples, "fastws_connections_refused_total", reason="draining") >= 2

        rc = await wait_exit(node, period + 5)
        t_exit = time.monotonic() - t0
        await finish(clients, 3)
        assert rc == 0, f"exit code {rc}\n{node.output_tail()}"
    finally:
        await finish(clients, 0.1)

    codes = [w.code for w in clients]
    assert codes == [1001] * n, ([(w.code, w.how) for w in clients], node.output_tail())
    times = sorted(w.at - t0 for w in clients if w.at is not None)
    print(f"\nclose times after SIGTERM: {[round(t, 2) for t in times]}; exit at {t_exit:.2f} s")
    assert times[0] >= 0
    assert times[0] < 0.5, times
    assert times[-1] >= period / 2, f"all closed within {times[-1]:.2f} s of a {period} s drain"
    assert times[-1] <= period + 1.0, times
    # evenly: each half of the period holds a fair share of the closes
    first_half = sum(1 for t in times if t < period / 2)
    assert n // 4 <= first_half <= 3 * n // 4, times
    # then the process exits, not long after the last close
    assert t_exit <= period + 3.0, t_exit


async def test_second_sigterm_exits_at_once(node_factory: Callable[..., NodeProcess]) -> None:
    period, n = 10.0, 10
    node = node_factory(args=["--drain-period", str(period)])
    clients = await watched_clients(node, n)
    try:
        t0 = time.monotonic()
        node.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert node.alive(), node.output_tail()
        closed_in_drain = sum(1 for w in clients if w.closed)
        t1 = time.monotonic()
        node.send_signal(signal.SIGTERM)
        rc = await wait_exit(node, 3.0)
        t_exit = time.monotonic() - t1
        assert rc is not None, f"still running 3 s after a second SIGTERM\n{node.output_tail()}"
        await finish(clients, 3)
    finally:
        await finish(clients, 0.1)
    print(f"\nsecond SIGTERM: exit code {rc} after {t_exit:.2f} s")
    assert t_exit < 2.0, t_exit
    assert closed_in_drain <= 2, f"{closed_in_drain} of {n} closed in 0.5 s of a 10 s drain"
    # the rest saw their connection end right then, well before the drain period
    assert all(w.closed for w in clients), [(w.code, w.how) for w in clients]
    late = [round(w.at - t0, 2) for w in clients if w.at is not None and w.at - t0 > 3.0]
    assert not late, late
    assert all(w.code in (1001, None) for w in clients), [(w.code, w.how) for w in clients]
    assert sum(1 for w in clients if w.code == 1001) <= closed_in_drain + 1


async def test_drain_with_no_clients_exits_promptly(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--drain-period", "10"])
    node.send_signal(signal.SIGTERM)
    rc = await wait_exit(node, 3.0)
    assert rc == 0, f"exit code {rc}\n{node.output_tail()}"
