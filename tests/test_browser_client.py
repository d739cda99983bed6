"""The browser client, fastws.js, in a real headless Chromium against real nodes.

The page imports the module from the node (GET /fastws.js) into a blank tab,
whose origin is not the node's, so the import also proves the CORS header.
That origin is opaque: the tab's upgrades carry ``Origin: null``, which a
node refuses with 403 unless ``allowed_origins`` lists it (docs/origins.md),
so the nodes here list it, and one test shows a node that does not.
Publications are made from Python with a plain WebSocket client; the
browser's connection goes through a TCP proxy where the test needs to cut
it. Chromium is driven through the DevTools protocol (tests/browser.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from browser import Page
from conftest import (
    HOST,
    REPO,
    NodeProcess,
    ascrape,
    free_port,
    http_get,
    metric,
    proto_client,
    start_node,
    unique,
)
from tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(60)

CUTS = 6
PAGE_PUBS = 150

# Installed in the page after the import: start() connects a client with
# short backoff, subscribes to one channel and keeps what it yields, the
# client's states and how the subscription loop ended.
HARNESS = """
window.start = (url, ch, options = {}) => {
  const run = { states: [], seen: [], ended: null };
  run.client = fastws.connect(url, {
    minDelay: 20, maxDelay: 200, ...options, onState: (s) => run.states.push(s),
  });
  run.sub = run.client.subscribe(ch);
  (async () => {
    try {
      for await (const item of run.sub) run.seen.push(item);
      run.ended = "done";
    } catch (e) {
      run.ended = { code: e.code, closeCode: e.closeCode ?? null };
    }
  })();
  window.run = run;
  return true;
};
"""


# Nodes that let a blank tab in: its opaque origin is sent as "null". Never
# list "null" in production; any sandboxed frame of any site sends it too.
BLANK_TAB = {"FASTWS_ALLOWED_ORIGINS": "null"}


def js(value: Any) -> str:
    """A Python value as a JavaScript literal."""
    return json.dumps(value)


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    """conftest's shared node, letting the blank tab in."""
    n = start_node(env=BLANK_TAB)
    yield n
    n.stop()
    n.cleanup_files()


@pytest.fixture
def node_factory(node_factory: Callable[..., NodeProcess]) -> Callable[..., NodeProcess]:
    """conftest's node_factory, whose nodes let the blank tab in unless env says otherwise."""

    def make(*args: Any, env: dict[str, str] | None = None, **kwargs: Any) -> NodeProcess:
        return node_factory(*args, env={**BLANK_TAB, **(env or {})}, **kwargs)

    return make


async def load(page: Page, port: int) -> None:
    """Import the client from the node into the page, as a page on another origin would."""
    kind = await page.run(
        f"window.fastws = await import({js(f'http://{HOST}:{port}/fastws.js')});"
        f"{HARNESS}; return typeof fastws.connect;"
    )
    assert kind == "function"


async def start(page: Page, url: str, ch: str, **options: Any) -> None:
    await page.run(f"return start({js(url)}, {js(ch)}, {js(options)});")


async def publish_from_page(page: Page, ch: str, data: Any) -> int:
    return int(await page.run(f"return await run.client.publish({js(ch)}, {js(data)});"))


async def opens(page: Page) -> int:
    return int(await page.evaluate("run.states.filter((s) => s === 'open').length"))


def test_the_node_serves_the_module_to_any_origin(node: NodeProcess) -> None:
    source = (REPO / "fastws" / "static" / "fastws.js").read_bytes()
    for path in ("/fastws.js", "/fastws.js?v=0.1.0"):
        r = http_get(node.port, path)
        assert r.status == 200, r
        assert r.headers["content-type"] == "text/javascript; charset=utf-8"
        assert r.headers["access-control-allow-origin"] == "*"
        assert "max-age" in r.headers["cache-control"]
        assert r.body == source


async def test_a_blank_page_imports_the_module_from_the_node(page: Page, node: NodeProcess) -> None:
    await load(page, node.port)
    exports = await page.evaluate("Object.keys(fastws).sort()")
    assert exports == ["Client", "FastwsError", "HEARTBEAT_CHANNEL", "Subscription", "connect"]


async def test_a_node_refuses_a_page_of_an_origin_it_does_not_allow(
    page: Page, node_factory: Callable[..., NodeProcess]
) -> None:
    """What the seed design let through: a page of another site connecting."""
    strict = node_factory(env={"FASTWS_ALLOWED_ORIGINS": ""})  # the default: none
    await load(page, strict.port)  # the module itself is served to any origin
    closed = await page.run(
        f"""
        const ws = new WebSocket({js(strict.ws_url())});
        return await new Promise((resolve) => {{
          ws.onopen = () => resolve("open");
          ws.onclose = (e) => resolve(e.code);
        }});
        """
    )
    assert closed == 1006  # the browser's word for an upgrade refused (here with 403)
    samples = await ascrape(strict.port)
    assert metric(samples, "fastws_connections_refused_total", reason="origin") == 1
    assert metric(samples, "fastws_connections_accepted_total") == 0


async def test_subscribe_publish_and_unsubscribe(page: Page, node: NodeProcess) -> None:
    ch = unique("browser")
    await load(page, node.port)
    await start(page, node.ws_url(), ch)
    # Sent after the subscription on the same connection, so it comes back.
    assert await publish_from_page(page, ch, {"hello": "world"}) == 1
    async with proto_client(node.ws_url()) as c:
        assert await c.pub(ch, [1, 2]) == 2
        seen = await page.wait_for("run.seen.length >= 2 && run.seen")
        assert seen == [{"seq": 1, "data": {"hello": "world"}}, {"seq": 2, "data": [1, 2]}]
        assert await page.evaluate("run.sub.position.seq") == 2

        await page.run("run.sub.unsubscribe();")
        assert await page.wait_for("run.ended") == "done"
        await c.pub(ch, 3)
        await asyncio.sleep(0.2)
        assert await page.evaluate("run.seen.length") == 2

    await page.run("run.client.close();")
    assert await page.evaluate("run.states") == ["open", "closed"]
    closed = await page.run(
        "try { await run.client.publish('x', 1); } catch (e) { return e.code; }"
    )
    assert closed == "closed"


async def test_an_error_reply_rejects_with_its_code(page: Page, node: NodeProcess) -> None:
    ch = unique("browser")
    await load(page, node.port)
    await start(page, node.ws_url(), ch)
    error = await page.run(
        """
        try { await run.client.publish("x".repeat(256), 1); return null; }
        catch (e) {
          return { error: e instanceof Error, name: e.name, code: e.code, message: e.message };
        }
        """
    )
    assert error is not None and error["error"] is True and error["name"] == "FastwsError"
    assert error["code"] == "bad_request" and "255" in error["message"]
    # The connection goes on.
    assert await publish_from_page(page, ch, "after") == 1
    assert await opens(page) == 1


async def cut_repeatedly(page: Page, proxy: TcpProxy, cuts: int) -> None:
    """Cut the page's connection ``cuts`` times, each once it is open again."""
    for k in range(1, cuts + 1):
        await page.wait_for(
            f"run.client.state === 'open' && run.states.filter((s) => s === 'open').length >= {k}"
        )
        await asyncio.sleep(random.uniform(0.15, 0.3))
        assert proxy.cut() == 1


async def test_cuts_lose_nothing_and_deliver_each_publication_once_in_order(
    page: Page, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(args=["--history-size", "10000"])
    proxy = await TcpProxy.start(HOST, node.port)
    try:
        ch, back = unique("cut"), unique("cut-back")
        await load(page, node.port)
        async with (
            proto_client(node.ws_url()) as publisher,
            proto_client(node.ws_url()) as listener,
        ):
            await listener.sub(back)
            await start(page, f"ws://{HOST}:{proxy.port}/ws", ch)
            # Answered after the page's sub, so the subscription is live.
            assert await publish_from_page(page, ch, 0) == 1
            # Meanwhile the page publishes a numbered stream of its own
            # through the same cuts, not waiting for each acknowledgement.
            await page.run(
                f"""
                window.acks = (async () => {{
                  const acks = [];
                  for (let i = 1; i <= {PAGE_PUBS}; i++) {{
                    acks.push(run.client.publish({js(back)}, i));
                    await new Promise((resolve) => setTimeout(resolve, 10));
                  }}
                  return Promise.all(acks);
                }})();
                return true;
                """
            )
            cutter = asyncio.create_task(cut_repeatedly(page, proxy, CUTS))
            n = 0
            try:
                while not cutter.done() or n < 200:
                    n += 1
                    await publisher.pub(ch, n)
                    await asyncio.sleep(0.004)
            finally:
                cutter.cancel()
            if not cutter.cancelled():
                cutter.result()  # a failure of the cutter is the test's

            seen = await page.wait_for(f"run.seen.length >= {n + 1} && run.seen", timeout=15)
            assert [item.get("data") for item in seen] == list(range(n + 1))
            assert [item.get("seq") for item in seen] == list(range(1, n + 2))
            await page.wait_for(f"run.states.filter((s) => s === 'open').length >= {CUTS + 1}")
            assert await opens(page) == CUTS + 1  # no reconnect but the cuts' own

            # At least once: every page publish was acknowledged and arrived.
            seqs = await page.evaluate("acks", timeout=20)
            assert len(seqs) == PAGE_PUBS
            received: set[int] = set()
            while len(received) < PAGE_PUBS:
                received.add((await listener.next_pub(back))["data"])
            assert received == set(range(1, PAGE_PUBS + 1))
    finally:
        await proxy.close()


async def test_a_restarted_node_yields_the_reset_item(
    page: Page, node_factory: Callable[..., NodeProcess]
) -> None:
    port = free_port()
    first = node_factory(port)
    ch = unique("restart")
    await load(page, port)
    await start(page, first.ws_url(), ch)
    for i in range(1, 4):
        assert await publish_from_page(page, ch, i) == i
    before = await page.wait_for("run.seen.length >= 3 && run.sub.position")
    assert before["seq"] == 3

    await asyncio.to_thread(first.stop)
    await asyncio.to_thread(node_factory, port)  # same port, new history
    reset = await page.wait_for("run.seen.find((item) => item.reset)", timeout=15)
    assert reset["epoch"] != before["epoch"]
    assert reset == {"reset": True, "epoch": reset["epoch"], "seq": 0}
    assert await publish_from_page(page, ch, 4) == 1
    seen = await page.wait_for("run.seen.length >= 5 && run.seen")
    assert seen[3:] == [reset, {"seq": 1, "data": 4}]
    assert await page.evaluate("run.sub.position") == {"epoch": reset["epoch"], "seq": 1}


async def test_a_silent_connection_is_replaced_and_recovers(
    page: Page, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory()
    proxy = await TcpProxy.start(HOST, node.port)
    try:
        ch = unique("silent")
        await load(page, node.port)
        await start(page, f"ws://{HOST}:{proxy.port}/ws", ch, heartbeatTimeout=1000)
        assert await publish_from_page(page, ch, 1) == 1
        # Idle but alive: the probes are answered and the connection stays.
        await asyncio.sleep(1.5)
        assert await page.evaluate("run.states") == ["open"]

        # Half-open: nothing flows either way and neither end is told. What
        # is published meanwhile comes with the recovery.
        proxy.pause()
        t0 = time.monotonic()
        async with proto_client(node.ws_url()) as c:
            assert await c.pub(ch, 2) == 2
        await page.wait_for("run.states.includes('connecting')", timeout=5)
        detected = time.monotonic() - t0
        assert detected < 2.0, detected
        seen = await page.wait_for("run.seen.length >= 2 && run.seen", timeout=5)
        assert seen == [{"seq": 1, "data": 1}, {"seq": 2, "data": 2}]
        assert proxy.connections == 2
    finally:
        await proxy.close()


async def test_a_policy_close_stops_retrying(
    page: Page, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(args=["--rate-limit", "1", "--rate-burst", "3"])
    ch = unique("policy")
    await load(page, node.port)
    await start(page, node.ws_url(), ch)
    await page.wait_for("run.client.state === 'open'")
    outcomes = await page.run(
        f"""
        const all = Array.from({{ length: 10 }}, (_, i) => run.client.publish({js(ch)}, i));
        const results = await Promise.allSettled(all);
        return results.map((r) =>
          r.status === "fulfilled" ? "ok" : `${{r.reason.code}}:${{r.reason.closeCode ?? ""}}`);
        """
    )
    assert outcomes[0] == "ok", outcomes
    assert "limit_exceeded:" in outcomes, outcomes
    assert outcomes[-1] == "closed:1008", outcomes
    assert await page.wait_for("run.ended") == {"code": "closed", "closeCode": 1008}
    await asyncio.sleep(0.5)  # several backoff periods: no new attempt
    assert await page.evaluate("run.states") == ["open", "closed"]


async def test_duplicates_are_dropped_and_a_gap_is_refilled(page: Page, node: NodeProcess) -> None:
    """Against a scripted node that breaks the contract: the client still delivers 1..5 once.

    fastws itself never repeats or skips a seq, so a stand-in speaks the
    protocol here: it repeats publications, then skips one; the client
    must drop the repeats, and on the gap reconnect and subscribe from its
    last delivered position, from which the stand-in replays.
    """
    from websockets.asyncio.server import serve

    subs: list[dict[str, Any]] = []

    async def scripted(ws: Any) -> None:
        await ws.send(js({"welcome": {"client": "c", "node": "scripted"}}))
        sub = json.loads(await ws.recv())
        subs.append(sub)
        if "since" not in sub:
            reply = {"id": sub["id"], "ok": True, "ch": "s", "epoch": "E", "seq": 0}
            await ws.send(js({**reply, "recovered": False}))
            for seq in (1, 2, 1, 2, 3, 2, 5):  # repeats, then a gap at 4
                await ws.send(js({"ch": "s", "seq": seq, "data": seq}))
        else:
            reply = {"id": sub["id"], "ok": True, "ch": "s", "epoch": "E", "seq": 5}
            await ws.send(js({**reply, "recovered": True}))
            for seq in (3, 4, 5):  # a replay that overlaps what was delivered
                await ws.send(js({"ch": "s", "seq": seq, "data": seq}))
        await ws.wait_closed()

    async with serve(scripted, HOST, 0) as server:
        port = server.sockets[0].getsockname()[1]
        await load(page, node.port)
        await start(page, f"ws://{HOST}:{port}/", "s")
        seen = await page.wait_for("run.seen.length >= 5 && run.seen")
        await asyncio.sleep(0.2)  # nothing more comes
        assert (
            await page.evaluate("run.seen") == seen == [{"seq": s, "data": s} for s in range(1, 6)]
        )
        assert [sub.get("since") for sub in subs] == [None, {"epoch": "E", "seq": 3}]
        assert any("jumped from seq 3 to 5" in line for line in page.console)


async def test_a_resubscription_meeting_a_node_without_redis_is_retried(
    page: Page, redis_server: str
) -> None:
    from fastws import App
    from fastws.config import Config

    redis_port = int(redis_server.rsplit(":", 1)[1].split("/")[0])
    to_redis = await TcpProxy.start(HOST, redis_port)
    nodes = []
    for url in (f"redis://{HOST}:{to_redis.port}/0", redis_server):
        app = App(Config(redis=url, log_level="warning", allowed_origins=["null"]))
        app.channels("/ws")
        nodes.append(await app.serve(host=HOST, port=0))
    a, b = nodes
    to_a = await TcpProxy.start(HOST, a.port)
    try:
        ch = unique("browser-unavailable")
        await load(page, a.port)
        await start(page, f"ws://{HOST}:{to_a.port}/ws", ch)
        await page.wait_for("run.sub.position !== null")
        await b.app.publish(ch, 1)
        await page.wait_for("run.seen.length >= 1")
        to_redis.refusing = True
        to_redis.cut()  # node A loses Redis...
        async with asyncio.timeout(10):
            while a.app.broker.ready:
                await asyncio.sleep(0.05)
        to_a.cut()  # ...and the page A: it reconnects and resubscribes, in vain for now
        await page.wait_for("run.states.filter((s) => s === 'open').length >= 2")
        await b.app.publish(ch, 2)
        await b.app.publish(ch, 3)
        await asyncio.sleep(0.5)
        to_redis.refusing = False
        seen = await page.wait_for("run.seen.length >= 3 && run.seen", timeout=15)
        assert seen == [{"seq": n, "data": n} for n in (1, 2, 3)]
        assert await page.evaluate("run.ended") is None
    finally:
        await to_a.close()
        for node in nodes:
            await node.stop()
        await to_redis.close()
