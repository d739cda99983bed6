"""fastws behind a real nginx running deploy/nginx.conf: a node dies, no client notices.

Three `fastws serve --redis` nodes share a real redis-server; a real nginx
runs the shipped deploy/nginx.conf in front of them, with only the node
addresses, its port and its log and temp paths replaced, so that the
example the docs give is the one tested. Clients (fastws.client) reach the
nodes only through nginx. One node holding some of the subscribers is
killed with SIGKILL in the middle of a numbered stream: every subscriber
still gets every publication exactly once, in order, with no Reset; those
of the dead node come back through nginx on the other two.

nginx must be installed (`bash scripts/system-deps.sh test`, which
`make test` runs); without it these tests fail rather than skip.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    HOST,
    REPO,
    NodeProcess,
    ahttp_get,
    ascrape,
    clean_env,
    free_port,
    start_node,
    unique,
)

import fastws.client
from fastws.client import Item, Publication, Reset, Subscription

pytestmark = pytest.mark.timeout(60)

SHIPPED = REPO / "deploy" / "nginx.conf"
NODE_NAMES = ("node-a", "node-b", "node-c")
FAST = {"min_delay": 0.05, "max_delay": 0.5}  # reconnect within a fraction of a second

# What render() replaces in the shipped file; the test fails if the file no
# longer has them, rather than testing something else.
_UPSTREAM_SERVER = re.compile(r"^(\s*server )[0-9.]+:\d+( [^;]*;)$", re.MULTILINE)
_LISTEN = "listen 80;"
_LOG_DIR = "/var/log/nginx/"
_HTTP_BLOCK = "\nhttp {\n"


def nginx_binary() -> str:
    """The nginx executable; Debian puts it in /usr/sbin, off some users' PATH."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail(
            "nginx is not installed; run `bash scripts/system-deps.sh test`",
            pytrace=False,
        )
    return found


def render(shipped: str, listen_port: int, upstreams: list[int], workdir: Path) -> str:
    """deploy/nginx.conf for this test: its nodes, its port, files in ``workdir``."""
    servers = _UPSTREAM_SERVER.findall(shipped)
    assert len(servers) == len(upstreams), (
        f"deploy/nginx.conf has {len(servers)} upstream server lines, the test runs "
        f"{len(upstreams)} nodes"
    )
    ports = iter(upstreams)
    conf = _UPSTREAM_SERVER.sub(lambda m: f"{m[1]}{HOST}:{next(ports)}{m[2]}", shipped)
    for old in (_LISTEN, _HTTP_BLOCK):
        assert conf.count(old) == 1, f"deploy/nginx.conf no longer has one {old.strip()!r}"
    conf = conf.replace(_LISTEN, f"listen {HOST}:{listen_port};")
    conf = conf.replace(_LOG_DIR, f"{workdir}/")
    # The packaged temp paths (/var/lib/nginx) are root's; nginx creates
    # these at start even when nothing is buffered.
    temp = "".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return conf.replace(_HTTP_BLOCK, _HTTP_BLOCK + temp)


def start_nginx(upstreams: list[int], workdir: Path) -> NodeProcess:
    """nginx in the foreground as this user, its errors on stderr (NodeProcess logs it)."""
    binary = nginx_binary()
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(render(SHIPPED.read_text(), port, upstreams, workdir))
    main = f"daemon off; pid {workdir}/nginx.pid; error_log stderr warn;"
    argv = [binary, "-p", f"{workdir}/", "-e", "stderr", "-c", str(conf), "-g", main]
    server = NodeProcess(argv, port, clean_env(), "nginx")
    try:
        server.wait_port_open()
    except BaseException:
        server.stop(timeout=3)
        raise
    return server


@pytest.fixture
def cluster(redis_server: str, tmp_path: Path) -> Iterator[tuple[NodeProcess, list[NodeProcess]]]:
    """nginx in front of three nodes that share the session's Redis."""
    nginx_binary()
    nodes = [
        start_node(
            args=["--redis", redis_server, "--node-name", name, "--drain-period", "0.5"],
            wait=False,
        )
        for name in NODE_NAMES
    ]
    proxy: NodeProcess | None = None
    try:
        for node in nodes:
            node.wait_healthy()
        proxy = start_nginx([node.port for node in nodes], tmp_path)
        yield proxy, nodes
    finally:
        if proxy is not None:
            proxy.stop()
            proxy.cleanup_files()
        for node in nodes:
            node.stop()
            node.cleanup_files()


def ws_url(proxy: NodeProcess) -> str:
    return f"ws://{HOST}:{proxy.port}/ws"


async def test_the_shipped_config_proxies_the_endpoint_and_hides_the_probes(
    cluster: tuple[NodeProcess, list[NodeProcess]],
) -> None:
    proxy, nodes = cluster
    js = await ahttp_get(proxy.port, "/fastws.js")
    assert js.status == 200 and b"export" in js.body, js
    for private in ("/readyz", "/healthz", "/metrics", "/"):
        assert (await ahttp_get(proxy.port, private)).status == 404, private
    for node in nodes:  # on their own addresses, the probes are there
        assert (await ahttp_get(node.port, "/readyz")).status == 200
    async with fastws.client.connect(ws_url(proxy), **FAST) as client:
        await asyncio.wait_for(client.wait_connected(), 5)
        assert client.node in NODE_NAMES


async def test_a_node_killed_mid_stream_loses_no_publication_for_anyone(
    cluster: tuple[NodeProcess, list[NodeProcess]],
) -> None:
    """The issue's end-to-end proof: kill -9 a node; every stream stays whole."""
    proxy, nodes = cluster
    by_name = dict(zip(NODE_NAMES, nodes, strict=True))
    ch = unique("lb")
    total, kill_at, subscribers = 600, 200, 12
    url = ws_url(proxy)
    clients = [fastws.client.connect(url, **FAST) for _ in range(subscribers)]
    publisher = fastws.client.connect(url, **FAST)
    for client in [*clients, publisher]:
        client.start()
    try:
        subs = await asyncio.wait_for(asyncio.gather(*(c.subscribe(ch) for c in clients)), 10)
        await asyncio.wait_for(publisher.wait_connected(), 5)
        placed = Counter(c.node for c in clients)
        assert set(placed) <= set(NODE_NAMES), placed
        # The victim holds subscribers but not the publisher, whose
        # publishes are at-least-once: one resent after the kill would be a
        # second copy of a number, under a new seq, and blur the proof.
        candidates = [n for n in NODE_NAMES if n != publisher.node and placed[n]]
        assert candidates, f"no node to kill: subscribers {placed}, publisher {publisher.node}"
        victim_name = max(candidates, key=lambda n: placed[n])
        victim = by_name[victim_name]
        survivors = [n for n in NODE_NAMES if n != victim_name]
        moved = [c for c in clients if c.node == victim_name]

        async def publish_all() -> None:
            for n in range(1, total + 1):
                assert await publisher.publish(ch, n) == n
                if n == kill_at:
                    os.kill(victim.pid, signal.SIGKILL)
                if n % 10 == 0:
                    await asyncio.sleep(0.03)  # about 300 a second, over 2 s

        async def read_all(sub: Subscription) -> list[Item]:
            items: list[Item] = []
            while len(items) < total:
                items.append(await sub.get())
                if isinstance(items[-1], Reset):
                    break
            return items

        _, *streams = await asyncio.wait_for(
            asyncio.gather(publish_all(), *(read_all(s) for s in subs)), 20
        )
        expected = [Publication(n, n) for n in range(1, total + 1)]
        for client, items in zip(clients, streams, strict=True):
            resets = [i for i in items if isinstance(i, Reset)]
            assert not resets, f"{client.client_id} (was on {client.node}) got {resets}"
            assert items == expected, f"{client.client_id}: stream not whole"

        assert victim.proc.wait(timeout=5) == -signal.SIGKILL
        # The dead node's clients came back once, through nginx, on the others;
        # everyone else kept the connection it had.
        for client in clients:
            assert client.connected
            assert client.node in survivors, (client.client_id, client.node)
            assert client.connects == (2 if client in moved else 1), (
                client.client_id,
                client.connects,
            )
        assert publisher.connects == 1

        # nginx tried the dead node (least_conn: it held nothing now), was
        # refused, and passed those upgrades on to the others.
        assert proxy.alive(), proxy.output_tail()
        assert f"{HOST}:{victim.port}" in proxy.stderr(), proxy.output_tail()
        async with fastws.client.connect(url, **FAST) as late:
            await asyncio.wait_for(late.wait_connected(), 5)
            assert late.node in survivors
        assert (await ahttp_get(proxy.port, "/fastws.js")).status == 200

        # The two survivors are ready and hold exactly the clients they
        # should: their own, the moved ones and the publisher.
        holding = Counter(c.node for c in [*clients, publisher])
        for name in survivors:
            node = by_name[name]
            assert node.alive(), node.output_tail()
            assert (await ahttp_get(node.port, "/readyz")).status == 200
            samples = await ascrape(node.port)
            assert samples["fastws_connections_open"] == holding[name], (name, samples)
            assert "Traceback" not in node.stderr(), node.output_tail()
    finally:
        await asyncio.gather(*(c.close() for c in [*clients, publisher]))
