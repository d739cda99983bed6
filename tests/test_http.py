"""Plain HTTP endpoints, and configuration by TOML / env / flag."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import HOST, NodeProcess, ahttp_get, free_port, http_get, proto_client, unique
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# endpoints
# --------------------------------------------------------------------------


def test_healthz(node: NodeProcess) -> None:
    r = http_get(node.port, "/healthz")
    assert r.status == 200, r


def test_readyz(node: NodeProcess) -> None:
    r = http_get(node.port, "/readyz")
    assert r.status == 200, r


@pytest.mark.parametrize("path", ["/nope", "/", "/healthz/extra", "/metricsx", "/ws/x"])
def test_unknown_paths_404(node: NodeProcess, path: str) -> None:
    r = http_get(node.port, path)
    assert r.status == 404, r


def test_plain_get_on_ws_path_is_not_200(node: NodeProcess) -> None:
    # /ws without an upgrade is not a page; whatever it answers, it is an error
    r = http_get(node.port, "/ws")
    assert 400 <= r.status < 500, r


def parse_metrics(text: str) -> tuple[dict[str, str], dict[str, float]]:
    """Return ({family: type}, {sample name with labels: value}) from Prometheus text."""
    types: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(None, 3)
            types[name] = typ.strip()
            continue
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?)\s+(\S+)(?:\s+\S+)?$", line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1)] = float(m.group(2))
    return types, samples


def sample(samples: dict[str, float], name: str) -> float:
    """Sum of every sample of ``name`` (over label sets)."""
    vals = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    assert vals, f"no sample named {name}: {sorted(samples)[:40]}"
    return sum(vals)


def test_metrics_families(node: NodeProcess) -> None:
    r = http_get(node.port, "/metrics")
    assert r.status == 200, r
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("text/plain") or "openmetrics" in ctype, r.headers
    types, samples = parse_metrics(r.text)
    assert types.get("fastws_connections_open") == "gauge", types
    # counters: prometheus_client names the family without _total in TYPE lines
    for fam in ("fastws_messages_in", "fastws_messages_out"):
        assert types.get(fam) == "counter" or types.get(fam + "_total") == "counter", (fam, types)
        sample(samples, fam + "_total")
    sample(samples, "fastws_connections_open")


async def test_metrics_reflect_traffic(fresh_node: NodeProcess) -> None:
    node = fresh_node

    async def metrics() -> dict[str, float]:
        r = await ahttp_get(node.port, "/metrics")
        assert r.status == 200, r
        return parse_metrics(r.text)[1]

    before = await metrics()
    assert sample(before, "fastws_connections_open") == 0
    ch = unique()
    async with proto_client(node.ws_url()) as a, proto_client(node.ws_url()) as b:
        await a.sub(ch)
        await b.pub(ch, 1)
        await a.next_pub(ch)
        during = await metrics()
        assert sample(during, "fastws_connections_open") == 2, during
        # what exactly is counted is the implementer's call; traffic must show
        for fam in ("fastws_messages_in_total", "fastws_messages_out_total"):
            assert sample(during, fam) > sample(before, fam), fam
    # closed: the gauge goes back down
    deadline = time.monotonic() + 3
    while True:
        after = await metrics()
        if sample(after, "fastws_connections_open") == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert sample(after, "fastws_connections_open") == 0, after


# --------------------------------------------------------------------------
# configuration: flag > env > TOML > default
# --------------------------------------------------------------------------


async def ws_works(node: NodeProcess, path: str) -> bool:
    """True if a WebSocket at ``path`` gets the welcome; False if the upgrade is refused."""
    try:
        async with proto_client(node.ws_url(path)) as c:
            assert c.welcome is not None
            r = await c.sub(unique())
            assert r["seq"] == 0
            return True
    except InvalidStatus as e:
        assert e.response.status_code in (400, 403, 404, 426), e
        return False
    except (InvalidHandshake, ConnectionClosed, OSError):
        return False


def write_toml(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "fastws.toml"
    p.write_text(body)
    return p


async def test_default_path_is_ws(node: NodeProcess) -> None:
    assert await ws_works(node, "/ws")
    assert not await ws_works(node, "/custom")


async def test_ws_path_with_query_string(node: NodeProcess) -> None:
    # clients put e.g. ?token=... on the upgrade request; the path is still /ws
    assert await ws_works(node, "/ws?token=abc&x=1")


async def test_connections_open_after_abort(fresh_node: NodeProcess) -> None:
    """A client that vanishes without a close frame (RST) is no longer counted."""
    node = fresh_node

    async def gauge() -> float:
        r = await ahttp_get(node.port, "/metrics")
        return sample(parse_metrics(r.text)[1], "fastws_connections_open")

    async with proto_client(node.ws_url()) as a:
        await a.sub(unique())
        assert await gauge() == 1
        a.ws.transport.abort()
        deadline = time.monotonic() + 3
        while await gauge() != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await gauge() == 0


async def test_path_from_flag(node_factory: Callable[..., NodeProcess]) -> None:
    n = node_factory(args=["--path", "/custom"])
    assert await ws_works(n, "/custom")
    assert not await ws_works(n, "/ws")


async def test_path_from_env(node_factory: Callable[..., NodeProcess]) -> None:
    n = node_factory(env={"FASTWS_PATH": "/custom"})
    assert await ws_works(n, "/custom")
    assert not await ws_works(n, "/ws")


async def test_path_from_toml(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, 'path = "/custom"\n')
    n = node_factory(args=["--config", str(cfg)])
    assert await ws_works(n, "/custom")
    assert not await ws_works(n, "/ws")


async def test_port_from_env(node_factory: Callable[..., NodeProcess]) -> None:
    port = free_port()
    n = node_factory(port, env={"FASTWS_PORT": str(port)}, port_flag=False)
    assert n.port == port
    assert await ws_works(n, "/ws")


async def test_port_and_path_from_toml(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    port = free_port()
    cfg = write_toml(tmp_path, f'port = {port}\npath = "/fromtoml"\n')
    n = node_factory(port, args=["--config", str(cfg)], port_flag=False)
    assert await ws_works(n, "/fromtoml")


async def test_config_file_from_env(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    cfg = write_toml(tmp_path, 'path = "/viaenvconfig"\n')
    n = node_factory(env={"FASTWS_CONFIG": str(cfg)})
    assert await ws_works(n, "/viaenvconfig")


async def test_flag_overrides_env(node_factory: Callable[..., NodeProcess]) -> None:
    n = node_factory(args=["--path", "/fromflag"], env={"FASTWS_PATH": "/fromenv"})
    assert await ws_works(n, "/fromflag")
    assert not await ws_works(n, "/fromenv")


async def test_flag_port_overrides_env_port(node_factory: Callable[..., NodeProcess]) -> None:
    env_port, flag_port = free_port(), free_port()
    n = node_factory(flag_port, env={"FASTWS_PORT": str(env_port)})
    assert await ws_works(n, "/ws")
    with pytest.raises(OSError):
        socket.create_connection((HOST, env_port), timeout=1).close()


async def test_env_overrides_toml(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    cfg = write_toml(tmp_path, 'path = "/fromtoml"\n')
    n = node_factory(args=["--config", str(cfg)], env={"FASTWS_PATH": "/fromenv"})
    assert await ws_works(n, "/fromenv")
    assert not await ws_works(n, "/fromtoml")


async def test_flag_overrides_toml(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    cfg = write_toml(tmp_path, 'path = "/fromtoml"\n')
    n = node_factory(args=["--config", str(cfg), "--path", "/fromflag"])
    assert await ws_works(n, "/fromflag")
    assert not await ws_works(n, "/fromtoml")


async def test_max_message_size(node_factory: Callable[..., NodeProcess]) -> None:
    n = node_factory(args=["--max-message-size", "1024"])
    ch = unique()
    async with proto_client(n.ws_url()) as a:
        # under the limit: fine
        assert await a.pub(ch, "x" * 900) == 1
        # over the limit: closed with 1009
        await a.send({"op": "pub", "ch": ch, "data": "x" * 2048, "id": 2})
        with pytest.raises(ConnectionClosed) as exc:
            while True:
                await a.recv(timeout=5)
        assert a.ws.close_code == 1009, (exc.value, a.ws.close_code)
    assert (await ahttp_get(n.port, "/healthz")).status == 200


async def test_handshake_timeout(node_factory: Callable[..., NodeProcess]) -> None:
    n = node_factory(args=["--handshake-timeout", "1"])
    reader, writer = await asyncio.open_connection(HOST, n.port)
    try:
        # send half a request line and stall
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        t0 = time.monotonic()
        try:
            data = await asyncio.wait_for(reader.read(), 6)  # EOF once the node drops us
        except ConnectionResetError:
            data = b""
        elapsed = time.monotonic() - t0
        assert elapsed < 4, f"dropped only after {elapsed:.1f} s"
        assert b"101" not in data.split(b"\r\n", 1)[0], data
    finally:
        writer.close()


async def test_log_level_flag_and_env(node_factory: Callable[..., NodeProcess]) -> None:
    quiet = node_factory(args=["--log-level", "warning"])
    loud = node_factory(env={"FASTWS_LOG_LEVEL": "debug"})
    for n in (quiet, loud):
        assert await ws_works(n, "/ws")
    await asyncio.sleep(0.2)
    assert " INFO " not in quiet.stderr() + quiet.stdout(), quiet.output_tail()
    assert " DEBUG " in loud.stderr() + loud.stdout() or " INFO " in loud.stderr() + loud.stdout()
