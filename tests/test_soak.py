"""Leak soak: thousands of connection lifecycles against one node leave nothing behind.

One node subprocess, 50 concurrent workers, each running short lifecycles
until 10,000 of them are done or ~40 s have passed:

* clean: connect, subscribe, publish, get the reply and the publication,
  close with 1000;
* abort mid-frame: subscribe, send half of a frame, then reset the TCP
  connection; or reset right after the upgrade without reading anything;
* bad commands: malformed commands until the node closes with 1008;
* slow consumers (a background round every ~2 s): subscribers with a tiny
  receive buffer stop reading while a channel is flooded past the node's
  ``--max-send-buffer`` (64 KiB here); the node closes them with 1013.

Before and after (once the node has settled): its open descriptors, its
``fastws_tasks`` gauge, ``fastws_connections_open`` and its RSS. A warm-up
of a few hundred cycles comes first so that allocator and import-time
growth are not counted as leaks.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest
from conftest import (
    OP_CLOSE,
    OP_TEXT,
    NodeProcess,
    RawWS,
    ascrape,
    fd_count,
    metric,
    rss_kb,
    ws_frame,
)

pytestmark = pytest.mark.timeout(180)

TARGET_CYCLES = 20_000
TIME_BUDGET = 80.0
CONCURRENCY = 50
RSS_GROWTH_MB = 30
SLOW_PER_ROUND = 16
CHANNELS = 64


def source(i: int) -> str:
    # spread clients over source addresses: no ephemeral-port exhaustion
    return f"127.0.0.{2 + i % 16}"


def bad_commands() -> bytes:
    return (
        ws_frame(OP_TEXT, b"{not json")
        + ws_frame(OP_TEXT, b'{"op": "zzz", "id": 1}')
        + ws_frame(0x2, b"\x00\x01")
        + ws_frame(OP_TEXT, b'{"op": "pub", "id": 2}')
    )


class Soak:
    def __init__(self, node: NodeProcess, seed: int = 1) -> None:
        self.node = node
        self.rng = random.Random(seed)
        self.done: Counter[str] = Counter()
        self.problems: list[str] = []
        self.slow_rounds = 0
        self.slow_closed = 0

    def problem(self, what: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(what)

    async def clean(self, i: int) -> None:
        ws = await RawWS.open(self.node.port, source=source(i))
        try:
            await ws.welcome()
            ch = f"soak-{i % CHANNELS}"
            await ws.send_raw(
                ws_frame(OP_TEXT, json.dumps({"op": "sub", "ch": ch, "id": 1}).encode())
                + ws_frame(
                    OP_TEXT, json.dumps({"op": "pub", "ch": ch, "data": i, "id": 2}).encode()
                )
            )
            got_reply = got_pub = False
            while not (got_reply and got_pub):
                f = await ws.recv_msg(timeout=10)
                if f.opcode == OP_CLOSE:
                    self.problem(f"clean cycle {i}: closed with {f.close_code}")
                    return
                m = f.json()
                if m.get("id") == 2:
                    got_reply = m.get("ok") is True
                elif m.get("data") == i:
                    got_pub = True
            await ws.send_frame(OP_CLOSE, (1000).to_bytes(2, "big"))
            code, _ = await ws.wait_close(timeout=10)
            if code != 1000:
                self.problem(f"clean cycle {i}: close answered with {code}")
        finally:
            ws.close()

    async def abort_mid_frame(self, i: int) -> None:
        ws = await RawWS.open(self.node.port, source=source(i))
        try:
            await ws.welcome()
            await ws.send_json({"op": "sub", "ch": f"soak-{i % CHANNELS}", "id": 1})
            whole = ws_frame(
                OP_TEXT, json.dumps({"op": "pub", "ch": "x", "data": "y" * 300}).encode()
            )
            await ws.send_raw(whole[: len(whole) // 2])
            await asyncio.sleep(0)
        finally:
            ws.abort()

    async def abort_at_once(self, i: int) -> None:
        ws = await RawWS.open(self.node.port, source=source(i))
        ws.abort()

    async def bad(self, i: int) -> None:
        ws = await RawWS.open(self.node.port, source=source(i))
        try:
            await ws.welcome()
            await ws.send_raw(bad_commands())
            code, frames = await ws.wait_close(timeout=10)
            if code != 1008:
                self.problem(f"bad cycle {i}: close code {code}, frames {frames[:5]}")
        finally:
            ws.close()

    async def slow_round(self, r: int) -> None:
        """Subscribers that stop reading, flooded until the node closes them with 1013."""
        ch = f"soak-flood-{r}"
        slows = []
        try:
            for k in range(SLOW_PER_ROUND):
                ws = await RawWS.open(self.node.port, source=source(k), rcvbuf=4096)
                await ws.welcome()
                rr = await ws.request({"op": "sub", "ch": ch, "id": 1})
                assert rr.get("ok") is True, rr
                slows.append(ws)
            pub = await RawWS.open(self.node.port, source=source(r))
            try:
                await pub.welcome()
                before = metric(await ascrape(self.node.port), "fastws_slow_consumer_closes_total")
                data = "z" * 8000
                frame = ws_frame(
                    OP_TEXT, json.dumps({"op": "pub", "ch": ch, "data": data}).encode()
                )
                for b in range(80):  # up to 80 x 8 x 8 kB = 5 MB: past kernel buffers + bound
                    await pub.send_raw(frame * 7)
                    rr = await pub.request({"op": "pub", "ch": ch, "data": data, "id": b})
                    assert rr.get("ok") is True, rr
                    if b % 8 == 7:
                        now = metric(
                            await ascrape(self.node.port), "fastws_slow_consumer_closes_total"
                        )
                        if now - before >= SLOW_PER_ROUND:
                            break
                now = metric(await ascrape(self.node.port), "fastws_slow_consumer_closes_total")
                if now - before < SLOW_PER_ROUND:
                    self.problem(f"slow round {r}: only {now - before} slow-consumer closes")
                self.slow_closed += int(now - before)
                await pub.send_frame(OP_CLOSE, (1000).to_bytes(2, "big"))
                await pub.wait_close(timeout=10)
            finally:
                pub.close()
            # half of them reset at once; the rest are left for the node to cut
            for k, ws in enumerate(slows):
                if k % 2 == 0:
                    ws.abort()
            await asyncio.sleep(1.0)
        finally:
            for ws in slows:
                ws.close()
        self.slow_rounds += 1

    async def cycle(self, i: int) -> None:
        x = self.rng.random()
        kind = (
            "clean"
            if x < 0.5
            else "abort_mid_frame"
            if x < 0.7
            else "abort_at_once"
            if x < 0.8
            else "bad"
        )
        try:
            await asyncio.wait_for(getattr(self, kind)(i), 15)
            self.done[kind] += 1
        except Exception as exc:
            self.problem(f"{kind} cycle {i}: {exc!r}")

    async def run(
        self, cycles: int, budget: float, slow_every: float, max_slow_rounds: int = 1000
    ) -> float:
        t0 = time.monotonic()
        deadline = t0 + budget
        counter = iter(range(cycles))

        async def worker() -> None:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                await self.cycle(i)

        async def slow_loop() -> None:
            r = 0
            while time.monotonic() < deadline - 3:
                try:
                    await asyncio.wait_for(self.slow_round(r), 30)
                except Exception as exc:
                    self.problem(f"slow round {r}: {exc!r}")
                r += 1
                if r >= max_slow_rounds:
                    return
                await asyncio.sleep(slow_every)

        slow = asyncio.create_task(slow_loop())
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        await slow
        return time.monotonic() - t0


async def settle(node: NodeProcess, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = await ascrape(node.port)
        if metric(samples, "fastws_connections_open") == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    return await ascrape(node.port)


async def test_soak_no_leaks(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(
        args=[
            "--max-send-buffer", "65536",
            "--close-timeout", "0.5",
            "--max-bad-commands", "3",
            "--rate-limit", "1000000",
            "--rate-burst", "1000000",
            "--log-level", "warning",
            # Channel history is memory kept on purpose (history_size
            # publications per channel for history_ttl), not a leak; the
            # soak measures what connections leave behind, so it keeps none.
            "--history-size", "0",
        ]
    )  # fmt: skip

    # warm-up, then the baseline
    warm = Soak(node, seed=7)
    await warm.run(cycles=400, budget=15, slow_every=0.5, max_slow_rounds=1)
    assert not warm.problems, warm.problems[:10]
    base = await settle(node)
    fds0, rss0 = fd_count(node.pid), rss_kb(node.pid)
    tasks0 = metric(base, "fastws_tasks")
    assert metric(base, "fastws_connections_open") == 0, base

    soak = Soak(node, seed=1234)
    elapsed = await soak.run(cycles=TARGET_CYCLES, budget=TIME_BUDGET, slow_every=1.0)
    after = await settle(node)
    fds1, rss1 = fd_count(node.pid), rss_kb(node.pid)
    tasks1 = metric(after, "fastws_tasks")
    total = sum(soak.done.values())
    growth_mb = (rss1 - rss0) / 1024
    print(
        f"\nsoak: {total} cycles in {elapsed:.1f} s ({dict(soak.done)}), "
        f"{soak.slow_rounds} slow rounds / {soak.slow_closed} slow-consumer closes; "
        f"fds {fds0} -> {fds1}, fastws_tasks {tasks0:g} -> {tasks1:g}, "
        f"RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MB ({growth_mb:+.1f} MB)"
    )
    assert node.alive(), node.output_tail()
    assert not soak.problems, f"{len(soak.problems)} problems, first: {soak.problems[:10]}"
    assert total >= 3000, f"only {total} cycles in {elapsed:.1f} s"
    assert soak.slow_closed >= SLOW_PER_ROUND, soak.slow_closed
    assert metric(after, "fastws_connections_open") == 0, after
    assert abs(fds1 - fds0) <= 2, f"descriptors {fds0} -> {fds1}"
    assert abs(tasks1 - tasks0) <= 1, f"fastws_tasks {tasks0} -> {tasks1}"
    assert growth_mb < RSS_GROWTH_MB, f"RSS grew {growth_mb:.1f} MB"
    assert "Traceback" not in node.stderr(), node.output_tail()
