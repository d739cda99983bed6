"""/metrics worth scraping: what each family counts, on real nodes with real clients.

A real Prometheus scrapes a node and gives a metric back through its HTTP
API; a real two-worker group answers any scrape with the whole group's
totals, which do not go back when a worker is killed and replaced.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    HOST,
    NodeProcess,
    ProtoClient,
    RawWS,
    ascrape,
    clean_env,
    close_payload,
    free_port,
    http_get,
    metric,
    proto_client,
    start_node,
    start_redis,
    unique,
)

from fastws.metrics import close_label
from fastws.namespaces import Namespaces

pytestmark = pytest.mark.timeout(90)


def families(text: str) -> dict[str, str]:
    """{family: type} from the # TYPE lines."""
    found = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            found[name] = kind
    return found


async def wait_for_metric(
    port: int, name: str, want: Callable[[float], bool], timeout: float = 5.0, **labels: str
) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = metric(await ascrape(port), name, **labels)
        if want(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------
# what a single node exposes
# --------------------------------------------------------------------------


def test_every_family_is_exposed_with_its_type(node: NodeProcess) -> None:
    text = http_get(node.port, "/metrics").text
    kinds = families(text)
    expected = {
        "fastws_processes": "gauge",
        "fastws_connections_open": "gauge",
        "fastws_channels": "gauge",
        "fastws_history_channels": "gauge",
        "fastws_history_publications": "gauge",
        "fastws_connections_accepted_total": "counter",
        "fastws_connections_refused_total": "counter",
        "fastws_connections_closed_total": "counter",
        "fastws_messages_in_total": "counter",
        "fastws_bytes_in_total": "counter",
        "fastws_messages_out_total": "counter",
        "fastws_bytes_out_total": "counter",
        "fastws_publications_total": "counter",
        "fastws_deliveries_total": "counter",
        "fastws_recoveries_total": "counter",
        "fastws_rate_limit_closes_total": "counter",
        "fastws_slow_consumer_closes_total": "counter",
        "fastws_ping_rtt_seconds": "histogram",
        "fastws_broker_latency_seconds": "histogram",
        "fastws_broker_errors_total": "counter",
    }
    for name, kind in expected.items():
        base = name.removesuffix("_total")
        assert kinds.get(name, kinds.get(base)) == kind, (name, kinds)
    # Counters carry no _created series: a group's files have none either.
    assert "_created" not in text
    # Refusal reasons and the server's close codes are there from the start, at 0.
    for reason in ("max_connections", "max_connections_per_ip", "draining", "origin"):
        assert f'fastws_connections_refused_total{{reason="{reason}"}}' in text
    for code in (1000, 1001, 1006, 1008, 1011, 1013):
        assert f'fastws_connections_closed_total{{code="{code}"}}' in text


async def test_traffic_publications_recoveries_and_close_codes_are_counted(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--namespaces", json.dumps({"chat": {"history_size": 5}})])
    before = await ascrape(node.port)
    assert metric(before, "fastws_publications_total", namespace="chat") == 0
    ch, chat = unique("news"), unique("chat:room")
    async with proto_client(node.ws_url()) as a, proto_client(node.ws_url()) as b:
        reply = await a.sub(ch)
        await b.pub(ch, "x" * 100)
        await b.pub(chat, 1)
        await b.pub(unique("made-up") + ":x", 2)  # an unconfigured prefix counts as default
        await a.next_pub(ch)
        # since a position the history covers: recovered; another epoch: not
        await b.sub(ch, since={"epoch": reply["epoch"], "seq": 0})
        await b.sub(chat, since={"epoch": "gone", "seq": 3})
        during = await ascrape(node.port)
        assert metric(during, "fastws_connections_open") == 2
        assert metric(during, "fastws_history_channels") >= 2
        assert metric(during, "fastws_history_publications") >= 3
    raw = await RawWS.open(node.port)
    await raw.welcome()
    await raw.send_frame(0x8, close_payload(4321))  # an application's own close code
    await raw.wait_close()
    raw.close()
    normal = await wait_for_metric(
        node.port, "fastws_connections_closed_total", lambda v: v >= 2, code="1000"
    )
    assert normal == 2
    m = await wait_for_metric(
        node.port, "fastws_connections_closed_total", lambda v: v >= 1, code="4xxx"
    )
    assert m == 1
    m2 = await ascrape(node.port)
    assert metric(m2, "fastws_publications_total", namespace="chat") == 1
    assert metric(m2, "fastws_publications_total", namespace="default") == 2
    assert 'namespace="made-up' not in (http_get(node.port, "/metrics").text)
    assert metric(m2, "fastws_recoveries_total", recovered="true") == 1
    assert metric(m2, "fastws_recoveries_total", recovered="false") == 1
    assert metric(m2, "fastws_deliveries_total") - metric(before, "fastws_deliveries_total") == 1
    # the 100-byte publication came in inside a pub command, so more than 100 bytes
    grown = metric(m2, "fastws_bytes_in_total") - metric(before, "fastws_bytes_in_total")
    assert grown > 100
    assert metric(m2, "fastws_connections_accepted_total") == 3


def test_close_codes_and_namespaces_are_bounded_labels() -> None:
    assert [close_label(c) for c in (1000, 1013, 1015)] == ["1000", "1013", "1015"]
    assert [close_label(c) for c in (3000, 3999, 4000, 4999)] == ["3xxx", "3xxx", "4xxx", "4xxx"]
    assert [close_label(c) for c in (999, 1016, 2999, 5000)] == ["other"] * 4
    from fastws.config import Config

    namespaces = Namespaces(Config(namespaces={"chat": {}, "default": {}}))
    assert namespaces.label("chat:1") == "chat"
    assert namespaces.label("chat") == "default"
    assert namespaces.label("other:1") == "default"
    assert namespaces.labels() == ["default", "chat"]


async def test_rate_limit_and_slow_consumer_closes_are_counted(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--rate-limit", "1", "--rate-burst", "2"])
    async with proto_client(node.ws_url()) as c:
        for i in range(20):
            await c.send({"op": "unsub", "ch": "x", "id": i})
        await asyncio.wait_for(c.ws.wait_closed(), 5)
        assert c.ws.close_code == 1008
    m = await wait_for_metric(node.port, "fastws_rate_limit_closes_total", lambda v: v >= 1)
    assert m == 1
    assert metric(await ascrape(node.port), "fastws_connections_closed_total", code="1008") == 1

    slow_node = node_factory(
        args=["--max-send-buffer", "65536", "--rate-limit", "0", "--max-message-size", "1048576"]
    )
    ch = unique("slow")
    slow = await RawWS.open(slow_node.port, rcvbuf=4096)
    await slow.welcome()
    assert (await slow.request({"op": "sub", "ch": ch, "id": 1})).get("ok") is True
    async with proto_client(slow_node.ws_url()) as publisher:
        for _ in range(200):
            await publisher.pub(ch, "x" * 100_000)
            if metric(await ascrape(slow_node.port), "fastws_slow_consumer_closes_total"):
                break
    slow.close()
    m = await wait_for_metric(slow_node.port, "fastws_slow_consumer_closes_total", lambda v: v >= 1)
    assert m == 1
    closed = await wait_for_metric(
        slow_node.port, "fastws_connections_closed_total", lambda v: v >= 1, code="1013"
    )
    assert closed == 1


async def test_ping_round_trips_are_observed(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(args=["--ping-interval", "0.2", "--ping-timeout", "2"])
    async with proto_client(node.ws_url()):  # websockets answers pings by itself
        count = await wait_for_metric(
            node.port, "fastws_ping_rtt_seconds_count", lambda v: v >= 2, timeout=5
        )
        samples = await ascrape(node.port)
    assert count >= 2
    assert metric(samples, "fastws_pings_sent_total") >= count
    # on loopback a round trip takes well under a second each
    assert 0 < metric(samples, "fastws_ping_rtt_seconds_sum") < count
    assert metric(samples, "fastws_ping_rtt_seconds_bucket", le="1.0") == count


async def test_a_made_up_pong_is_not_a_round_trip(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(args=["--ping-interval", "0.2", "--ping-timeout", "5"])
    ws = await RawWS.open(node.port)
    try:
        await ws.welcome()
        ping = await ws.recv_frame(timeout=3)
        assert ping.opcode == 0x9 and len(ping.payload) == 8
        # a pong that claims the ping left a day ago is not observed, nor is
        # an unsolicited one that follows the real answer
        await ws.send_frame(0xA, struct.pack("!d", time.monotonic() - 86400))
        await ws.send_frame(0xA, ping.payload)
        await asyncio.sleep(0.3)
        samples = await ascrape(node.port)
        assert metric(samples, "fastws_ping_rtt_seconds_count") == 0
    finally:
        ws.close()


# --------------------------------------------------------------------------
# broker calls, against a Redis of the test's own that it stops
# --------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[NodeProcess]:
    server = start_redis()
    yield server
    server.stop()
    server.cleanup_files()


async def test_broker_latency_by_operation_and_errors(
    own_redis: NodeProcess, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(args=["--redis", f"redis://{HOST}:{own_redis.port}/0"])
    ch = unique("broker")
    async with proto_client(node.ws_url()) as c:
        reply = await c.sub(ch)
        await c.pub(ch, 1)
        await c.request({"op": "history", "ch": ch})
        await c.sub(unique("again"), since={"epoch": reply["epoch"], "seq": 0})
        samples = await ascrape(node.port)
        for operation in ("publish", "history", "position", "subscribe"):
            assert (
                metric(samples, "fastws_broker_latency_seconds_count", operation=operation) >= 1
            ), operation
        assert metric(samples, "fastws_broker_latency_seconds_sum", operation="publish") < 5
        own_redis.stop()
        r = await c.request({"op": "pub", "ch": ch, "data": 2})
        assert r["error"]["code"] == "unavailable", r
    samples = await ascrape(node.port)
    assert metric(samples, "fastws_broker_errors_total", operation="publish") == 1
    lost = await wait_for_metric(
        node.port, "fastws_broker_errors_total", lambda v: v >= 1, operation="pubsub"
    )
    assert lost >= 1


# --------------------------------------------------------------------------
# a group of workers answers for all of them
# --------------------------------------------------------------------------

SERVING = re.compile(r"worker (\d+) serving: pid (\d+) \((\S+)\)")


def wait_serving(group: NodeProcess, count: int, timeout: float = 15.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while len(SERVING.findall(group.stderr())) < count:
        if time.monotonic() > deadline or not group.alive():
            pytest.fail(f"{count} workers never served\n{group.output_tail()}", pytrace=False)
        time.sleep(0.05)
    return {int(i): int(pid) for i, pid, _ in SERVING.findall(group.stderr())}


def worker_metrics_dir(pid: int) -> str:
    """The metrics directory the supervisor gave a worker, from its environment."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        name, _, value = item.partition(b"=")
        if name == b"PROMETHEUS_MULTIPROC_DIR":
            return value.decode()
    raise AssertionError(f"worker {pid} has no PROMETHEUS_MULTIPROC_DIR")


async def scrapes(port: int, n: int) -> list[dict[str, float]]:
    """n scrapes, each on a new connection: the kernel spreads them over the workers."""
    return [await ascrape(port) for _ in range(n)]


async def assert_every_scrape(
    port: int, check: Callable[[dict[str, float]], bool], timeout: float = 5.0
) -> None:
    """Within timeout, six scrapes in a row all pass check; fail with what they showed."""
    deadline = time.monotonic() + timeout
    while True:
        got = await scrapes(port, 6)
        ok = all(check(s) for s in got)
        if ok or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert ok, [
        (
            metric(s, "fastws_processes"),
            metric(s, "fastws_connections_open"),
            metric(s, "fastws_connections_accepted_total"),
        )
        for s in got
    ]


async def test_a_group_of_workers_answers_any_scrape_with_the_whole_group(
    redis_server: str,
) -> None:
    group = start_node(args=["--workers", "2", "--redis", redis_server, "--drain-period", "0.2"])
    try:
        pids = wait_serving(group, 2)
        names = {f"{socket.gethostname()}-{group.pid}-w{i}" for i in (1, 2)}
        ch = unique("group")
        async with AsyncExitStack() as stack:
            clients: list[ProtoClient] = []
            seen: dict[str, int] = {}
            while set(seen) != names or len(clients) < 6:
                client = await stack.enter_async_context(proto_client(group.ws_url()))
                assert client.welcome is not None
                seen[client.welcome["node"]] = seen.get(client.welcome["node"], 0) + 1
                clients.append(client)
                assert len(clients) < 64, seen
            for client in clients:
                await client.pub(ch, "x")
            opened = len(clients)
            # Every scrape, whichever worker answers, covers both once they
            # have copied their counters (every second).
            await assert_every_scrape(
                group.port,
                lambda s: (
                    metric(s, "fastws_processes") == 2
                    and metric(s, "fastws_connections_open") == opened
                    and metric(s, "fastws_connections_accepted_total") == opened
                    and metric(s, "fastws_publications_total") == opened
                ),
            )
            # A worker killed and replaced: its connections are gone from
            # the gauges, but its counts stay in the group's totals.
            on_w1 = seen[f"{socket.gethostname()}-{group.pid}-w1"]
            os.kill(pids[1], signal.SIGKILL)
            await asyncio.to_thread(wait_serving, group, 3)
            await assert_every_scrape(
                group.port,
                lambda s: (
                    metric(s, "fastws_processes") == 2
                    and metric(s, "fastws_connections_open") == opened - on_w1
                    and metric(s, "fastws_connections_accepted_total") >= opened
                ),
            )
            directory = worker_metrics_dir(pids[2])
            assert Path(directory).is_dir()
        assert group.stop() == 0, group.output_tail()
        # the supervisor removes the group's metrics files when the group stops
        assert not Path(directory).exists()
    finally:
        group.stop()
        group.cleanup_files()


# --------------------------------------------------------------------------
# a real Prometheus scrapes a node
# --------------------------------------------------------------------------


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus is not installed; run `bash scripts/system-deps.sh test`", pytrace=False
        )
    return binary


def query(port: int, promql: str) -> list[dict[str, Any]]:
    r = http_get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert r.status == 200, r
    answer = json.loads(r.body)
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


async def test_a_real_prometheus_scrapes_a_node_and_answers_a_query(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    binary = prometheus_binary()
    node = node_factory()
    async with proto_client(node.ws_url()) as c:
        await c.pub(unique("prom"), 1)
    async with proto_client(node.ws_url()):
        pass
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: fastws\n"
        "    static_configs:\n"
        f"      - targets: ['{HOST}:{node.port}']\n"
    )
    port = free_port()
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address={HOST}:{port}",
        "--log.level=warn",
    ]
    prometheus = NodeProcess(argv, port, clean_env(), "prometheus")
    try:
        prometheus.wait_ready(lambda: http_get(port, "/-/ready", timeout=1).status == 200, 30)
        deadline = time.monotonic() + 20
        accepted: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            accepted = await asyncio.to_thread(
                query, port, 'fastws_connections_accepted_total{job="fastws"}'
            )
            if accepted:
                break
            await asyncio.sleep(0.5)
        assert accepted, prometheus.output_tail()
        assert float(accepted[0]["value"][1]) == 2, accepted
        up = await asyncio.to_thread(query, port, 'up{job="fastws"}')
        assert up and up[0]["value"][1] == "1", up
        by_namespace = await asyncio.to_thread(
            query, port, "sum by (namespace) (fastws_publications_total)"
        )
        assert [(r["metric"], r["value"][1]) for r in by_namespace] == [
            ({"namespace": "default"}, "1")
        ]
    finally:
        prometheus.stop()
        prometheus.cleanup_files()
