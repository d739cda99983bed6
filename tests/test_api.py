"""The server HTTP API (docs/api.md), with real HTTP requests against real nodes.

Requests go over plain sockets, written by hand where a test needs a
malformed one; clients are real WebSocket clients with real JWTs. The
cross-node disconnect runs on two `fastws serve --redis` processes sharing
a real redis-server, and the outage test cuts an in-process node's link to
Redis with a TCP proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
import pytest
from conftest import (
    HOST,
    PYTHON,
    REPO,
    NodeProcess,
    ahttp_get,
    clean_env,
    free_port,
    proto_client,
    start_node,
    unique,
)
from tcpproxy import TcpProxy

from fastws import App
from fastws.config import Config, ConfigError, load

pytestmark = pytest.mark.timeout(60)

KEY = "api-key-" + "a" * 40
SECRET = "test-secret-" + "s" * 40
NAMESPACES = {"room": {"presence": True}, "feed": {"client_publish": False}}


def token(user: str, ttl: float = 300.0) -> str:
    return jwt.encode({"sub": user, "exp": time.time() + ttl}, SECRET, algorithm="HS256")


# --------------------------------------------------------------------------
# a small HTTP/1.1 client on asyncio streams, keep-alive included
# --------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        """The error code of a failure body."""
        return str(self.json()["error"]["code"])

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.headers!r}, {self.body[:300]!r})"


class Http:
    """One connection to the API; requests go one after another over it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Http:
        return cls(*await asyncio.open_connection(HOST, port))

    async def send_raw(self, data: bytes) -> Response:
        self.writer.write(data)
        await self.writer.drain()
        return await self.read()

    async def read(self, timeout: float = 10.0) -> Response:
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Response(status, headers, body)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = KEY,
        headers: dict[str, str] | None = None,
    ) -> Response:
        head = {"Host": f"{HOST}"}
        if key is not None:
            head["Authorization"] = f"Bearer {key}"
        data = b""
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            head["Content-Type"] = "application/json"
            head["Content-Length"] = str(len(data))
        elif method == "POST":
            head["Content-Length"] = "0"
        head.update(headers or {})
        text = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
        return await self.send_raw(text.encode("latin-1") + b"\r\n" + data)

    async def closed(self, timeout: float = 5.0) -> bool:
        """Whether the server ends the connection (EOF) within timeout."""
        async with asyncio.timeout(timeout):
            return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()


async def call(port: int, method: str, path: str, body: Any = None, **kw: Any) -> Response:
    """One request on a connection of its own."""
    http = await Http.open(port)
    try:
        return await http.request(method, path, body, **kw)
    finally:
        http.close()


# --------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------


def api_node(*args: str, name: str = "", env: dict[str, str] | None = None) -> NodeProcess:
    """`fastws serve` with the API on a port of its own (``node.api_port``)."""
    api_port = free_port()
    argv = ["--api-port", str(api_port), "--namespaces", json.dumps(NAMESPACES), *args]
    if name:
        argv += ["--node-name", name]
    node = start_node(
        args=argv, env={"FASTWS_API_KEY": KEY, "FASTWS_TOKEN_SECRET": SECRET, **(env or {})}
    )
    node.api_port = api_port  # type: ignore[attr-defined]
    return node


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    n = api_node()
    yield n
    n.stop()
    n.cleanup_files()


@pytest.fixture(scope="module")
def pair(redis_server: str) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """Two nodes sharing the session's redis-server, named api-a and api-b."""
    a = api_node("--redis", redis_server, name=f"api-a-{time.monotonic_ns()}")
    try:
        b = api_node("--redis", redis_server, name=f"api-b-{time.monotonic_ns()}")
    except BaseException:
        a.stop()
        raise
    yield a, b
    for n in (a, b):
        n.stop()
        n.cleanup_files()


def port_of(node: NodeProcess) -> int:
    return int(node.api_port)  # type: ignore[attr-defined]


def ws_url(node: NodeProcess, user: str) -> str:
    return f"{node.ws_url()}?token={token(user)}"


async def close_of(client: Any, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """The close code and reason the node sent a client."""
    async with asyncio.timeout(timeout):
        await client.ws.wait_closed()
    return client.ws.close_code, client.ws.close_reason


# --------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------


def test_the_api_is_off_by_default_and_never_without_a_key() -> None:
    assert load(environ={}).api_port == 0
    assert load(environ={}).api_host == "127.0.0.1"
    with pytest.raises(ConfigError, match="api_key"):
        load({"api_port": "9000"}, environ={})
    with pytest.raises(ConfigError, match="too short"):
        load({"api_port": "9000", "api_key": "short"}, environ={})
    with pytest.raises(ConfigError, match="port of its own"):
        load({"api_port": "9000", "port": "9000", "api_key": KEY}, environ={})
    config = load({"api_port": "9000"}, environ={"FASTWS_API_KEY": KEY})
    assert (config.api_port, config.api_key) == (9000, KEY)


def test_fastws_serve_refuses_to_start_the_api_without_a_key() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "fastws", "serve", "--port", "0", "--api-port", str(free_port())],
        cwd=str(REPO),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "api_key" in result.stderr


# --------------------------------------------------------------------------
# authentication
# --------------------------------------------------------------------------


async def test_requests_without_the_right_key_get_401(node: NodeProcess) -> None:
    port = port_of(node)
    for kw in (
        {"key": None},
        {"key": "wrong-" + KEY},
        {"key": KEY[:-1]},
        {"key": None, "headers": {"Authorization": f"Basic {KEY}"}},
        {"key": None, "headers": {"X-API-Key": "nope"}},
        # Both ways at once must carry the same key.
        {"key": KEY, "headers": {"X-API-Key": "nope"}},
    ):
        r = await call(port, "GET", "/api/info", **kw)
        assert r.status == 401, (kw, r)
        assert r.error == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    # Unknown paths too: nothing is told before the key is.
    r = await call(port, "GET", "/secret", key=None)
    assert r.status == 401
    r = await call(port, "GET", "/api/info", key=None, headers={"X-API-Key": KEY})
    assert r.status == 200, r
    r = await call(port, "GET", "/api/info", headers={"X-API-Key": KEY})
    assert r.status == 200, r


async def test_the_api_port_is_not_the_websocket_port(node: NodeProcess) -> None:
    """The WebSocket port has no /api, and the API port no WebSocket."""
    assert (await ahttp_get(node.port, "/api/info")).status == 404
    r = await call(port_of(node), "GET", "/ws")
    assert r.status == 404 and r.error == "not_found"


# --------------------------------------------------------------------------
# the endpoints
# --------------------------------------------------------------------------


async def test_publish_reaches_subscribers_and_history(node: NodeProcess) -> None:
    ch = unique("feed:api")  # client_publish is off in feed: only the server publishes
    async with proto_client(ws_url(node, "alice")) as client:
        await client.sub(ch)
        r = await call(port_of(node), "POST", "/api/publish", {"channel": ch, "data": {"n": 1}})
        assert r.status == 200, r
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"seq": 1}
        pub = await client.next_pub(ch)
        assert (pub["seq"], pub["data"]) == (1, {"n": 1})
        refused = await client.request({"op": "pub", "ch": ch, "data": 2})
        assert refused["error"]["code"] == "forbidden"


async def test_broadcast_publishes_to_each_channel(node: NodeProcess) -> None:
    first, second = unique("bc"), unique("bc")
    port = port_of(node)
    assert (await call(port, "POST", "/api/publish", {"channel": second, "data": 0})).status == 200
    async with proto_client(ws_url(node, "a")) as a, proto_client(ws_url(node, "b")) as b:
        await a.sub(first)
        await b.sub(second)
        r = await call(port, "POST", "/api/broadcast", {"channels": [first, second], "data": "hi"})
        assert r.status == 200, r
        assert r.json() == {"seqs": {first: 1, second: 2}, "errors": {}}
        assert (await a.next_pub(first))["data"] == "hi"
        assert (await b.next_pub(second))["seq"] == 2
    for body in (
        {"channels": [], "data": 1},
        {"channels": "x", "data": 1},
        {"channels": [first, first], "data": 1},
        {"channels": [first, ""], "data": 1},
        {"channels": [first, 7], "data": 1},
        {"channels": [first]},
        {"channels": [f"c{i}" for i in range(1001)], "data": 1},
    ):
        r = await call(port, "POST", "/api/broadcast", body)
        assert r.status == 400 and r.error == "bad_request", (body, r)


async def test_presence_lists_subscribers_with_their_users(node: NodeProcess) -> None:
    ch = unique("room:api")
    port = port_of(node)
    async with proto_client(ws_url(node, "alice")) as alice, proto_client(ws_url(node, "bob")):
        await alice.sub(ch)
        r = await call(port, "GET", f"/api/presence?channel={ch}")
        assert r.status == 200, r
        assert r.json() == {
            "clients": {
                alice.welcome["client"]: {  # type: ignore[index]
                    "client": alice.welcome["client"],  # type: ignore[index]
                    "user": "alice",
                }
            }
        }
    r = await call(port, "GET", f"/api/presence?channel={unique('nopresence')}")
    assert r.status == 400 and r.error == "not_available", r


async def test_history_with_since_and_limit(node: NodeProcess) -> None:
    ch = unique("hist")
    port = port_of(node)
    for n in range(1, 6):
        await call(port, "POST", "/api/publish", {"channel": ch, "data": n})
    r = await call(port, "GET", f"/api/history?channel={ch}")
    assert r.status == 200, r
    whole = r.json()
    assert whole["seq"] == 5
    assert [(p["seq"], p["data"]) for p in whole["publications"]] == [(n, n) for n in range(1, 6)]
    epoch = whole["epoch"]
    r = await call(port, "GET", f"/api/history?channel={ch}&since_epoch={epoch}&since_seq=2")
    assert [p["seq"] for p in r.json()["publications"]] == [3, 4, 5]
    since = f"since_epoch={epoch}&since_seq=2&limit=2"
    r = await call(port, "GET", f"/api/history?channel={ch}&{since}")
    assert [p["seq"] for p in r.json()["publications"]] == [3, 4]
    r = await call(port, "GET", f"/api/history?channel={ch}&limit=2")
    assert [p["seq"] for p in r.json()["publications"]] == [4, 5]
    r = await call(port, "GET", f"/api/history?channel={ch}&since_epoch={epoch}&since_seq=5")
    assert r.json()["publications"] == []
    # Another epoch, or past the end: the caller must start again from here.
    for since in ("since_epoch=other&since_seq=1", f"since_epoch={epoch}&since_seq=9"):
        r = await call(port, "GET", f"/api/history?channel={ch}&{since}")
        assert r.status == 409, r
        assert r.error == "unrecoverable"
        assert (r.json()["epoch"], r.json()["seq"]) == (epoch, 5)
    # A channel name travels percent-encoded like any query value.
    odd = unique("a b&c=d:é")
    await call(port, "POST", "/api/publish", {"channel": odd, "data": 1})
    from urllib.parse import quote

    r = await call(port, "GET", f"/api/history?channel={quote(odd, safe='')}")
    assert r.status == 200 and r.json()["publications"][0]["ch"] == odd, r


async def test_disconnect_on_one_node(node: NodeProcess) -> None:
    """With the memory broker the node is the whole deployment."""
    user = unique("user")
    async with (
        proto_client(ws_url(node, user)) as first,
        proto_client(ws_url(node, user)) as second,
        proto_client(ws_url(node, "someone-else")) as other,
    ):
        r = await call(port_of(node), "POST", "/api/disconnect", {"user": user})
        assert r.status == 200, r
        body = r.json()
        assert body["disconnected"] == 2
        assert body["unanswered"] == []
        assert list(body["nodes"].values()) == [2]
        for client in (first, second):
            # The default: 1008, which fastws's clients take as final.
            assert await close_of(client) == (1008, "disconnected")
        assert (await other.sub(unique("still")))["ok"] is True


async def test_disconnect_refuses_bad_requests(node: NodeProcess) -> None:
    port = port_of(node)
    for body in (
        {},
        {"user": ""},
        {"user": 7},
        {"user": "u", "code": 1002},
        {"user": "u", "code": 999},
        {"user": "u", "code": 5000},
        {"user": "u", "code": "4000"},
        {"user": "u", "code": True},
        {"user": "u", "reason": "x" * 124},
        {"user": "u", "reason": "é" * 62},
        {"user": "u", "reason": 1},
        {"user": "u", "why": "typo"},
    ):
        r = await call(port, "POST", "/api/disconnect", body)
        assert r.status == 400 and r.error == "bad_request", (body, r)
    for code in (1000, 1001, 1012, 3000, 4999):
        r = await call(port, "POST", "/api/disconnect", {"user": unique("u"), "code": code})
        assert r.status == 200 and r.json()["disconnected"] == 0, r


async def test_info_describes_the_node(node: NodeProcess) -> None:
    ch = unique("info")
    async with proto_client(ws_url(node, "alice")) as client:
        await client.sub(ch)
        r = await call(port_of(node), "GET", "/api/info")
        assert r.status == 200, r
        info = r.json()
        assert info["connections"] >= 1 and info["channels"] >= 1
        assert info["broker_ready"] is True
        assert info["node"] in info["nodes"]
        assert info["nodes"][info["node"]]["address"].endswith(f":{node.port}")


# --------------------------------------------------------------------------
# requests the API refuses
# --------------------------------------------------------------------------


async def test_bad_bodies_and_queries_get_400(node: NodeProcess) -> None:
    port = port_of(node)
    for body in (
        b"{not json",
        b"",
        b"[1, 2]",
        {"data": 1},
        {"channel": "c"},
        {"channel": "", "data": 1},
        {"channel": "c" * 256, "data": 1},
        {"channel": ["c"], "data": 1},
        {"channel": "c", "data": 1, "extra": 2},
    ):
        r = await call(port, "POST", "/api/publish", body)
        assert r.status == 400, (body, r)
        assert r.error == "bad_request"
        assert r.json()["error"]["message"]
    # Data that cannot be published (nested past what orjson writes) takes no seq.
    deep = "[" * 300 + "]" * 300
    r = await call(port, "POST", "/api/publish", f'{{"channel": "c", "data": {deep}}}'.encode())
    assert r.status == 400 and r.error == "bad_request", r
    for query in (
        "",
        "channel=",
        "channel=a&channel=b",
        "channel=a&since_seq=1",
        "channel=a&since_epoch=e&since_seq=-1",
        "channel=a&limit=x",
        "channel=a&limit=1e3",
        "channel=a&colour=red",
        "channel=%ff",
    ):
        r = await call(port, "GET", f"/api/history?{query}")
        assert r.status == 400 and r.error == "bad_request", (query, r)
    r = await call(port, "GET", "/api/info?verbose=1")
    assert r.status == 400, r


async def test_http_errors(node: NodeProcess) -> None:
    port = port_of(node)
    r = await call(port, "GET", "/api/nothing")
    assert r.status == 404 and r.error == "not_found"
    r = await call(port, "GET", "/api/publish")
    assert r.status == 405 and r.headers["allow"] == "POST" and r.error == "method_not_allowed"
    r = await call(port, "DELETE", "/api/info")
    assert r.status == 405 and r.headers["allow"] == "GET"
    # Not JSON: 415, whatever the body.
    body = b'{"channel": "c", "data": 1}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Length": str(len(body))}
        if content_type:
            headers["Content-Type"] = content_type
        http = await Http.open(port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        r = await http.send_raw(
            f"POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n{head}\r\n".encode()
            + body
        )
        http.close()
        assert r.status == 415 and r.error == "unsupported_media_type", (content_type, r)
    r = await call(
        port,
        "POST",
        "/api/publish",
        body,
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status == 200, r
    # Over the body limit: refused before the body is read, and the connection ends.
    http = await Http.open(port)
    r = await http.send_raw(
        f"POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {(1 << 20) + 1}\r\n\r\n".encode()
    )
    assert r.status == 413 and r.error == "too_large", r
    assert await http.closed()
    http.close()
    # Chunked bodies, and POSTs without a length.
    for head in ("Transfer-Encoding: chunked\r\n", ""):
        http = await Http.open(port)
        r = await http.send_raw(
            f"POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{head}\r\n".encode()
        )
        assert r.status == 411 and r.error == "length_required", r
        http.close()
    # Malformed heads.
    for raw in (
        b"GET /api/info\r\n\r\n",
        b"GET /api/info HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /api/info HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
        b"GET /api/info HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET http://x/api/info HTTP/1.1\r\n\r\n",
    ):
        http = await Http.open(port)
        r = await http.send_raw(raw)
        assert r.status == 400 and r.error == "bad_request", (raw, r)
        assert await http.closed()
        http.close()
    r = await call(port, "GET", "/api/info", headers={"X-Filler": "x" * 20000})
    assert r.status == 431, r
    http = await Http.open(port)
    r = await http.send_raw(b"GET /api/info HTTP/2.0\r\n\r\n")
    assert r.status == 505, r
    http.close()


async def test_keep_alive_and_expect_continue(node: NodeProcess) -> None:
    port = port_of(node)
    ch = unique("keep")
    http = await Http.open(port)
    try:
        for n in range(1, 4):
            r = await http.request("POST", "/api/publish", {"channel": ch, "data": n})
            assert r.json() == {"seq": n}
        # An error with the body read keeps the connection; a 404 of a GET too.
        assert (await http.request("POST", "/api/publish", b"nope")).status == 400
        assert (await http.request("GET", "/api/none")).status == 404
        assert (await http.request("GET", "/api/info")).status == 200
        # curl's Expect: 100-continue is answered once the key and path are good.
        body = json.dumps({"channel": ch, "data": "big"}).encode()
        http.writer.write(
            f"POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        interim = await http.read()
        assert interim.status == 100
        r = await http.send_raw(body)
        assert r.json() == {"seq": 4}
        r = await http.request("GET", "/api/info", headers={"Connection": "close"})
        assert r.status == 200 and r.headers["connection"] == "close"
        assert await http.closed()
    finally:
        http.close()


# --------------------------------------------------------------------------
# two nodes through Redis
# --------------------------------------------------------------------------


async def test_disconnect_closes_a_users_connections_on_every_node(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    a, b = pair
    user = unique("user")
    async with (
        proto_client(ws_url(a, user)) as on_a,
        proto_client(ws_url(b, user)) as on_b,
        proto_client(ws_url(b, "bystander")) as other,
    ):
        r = await call(
            port_of(a), "POST", "/api/disconnect", {"user": user, "code": 4001, "reason": "banned"}
        )
        assert r.status == 200, r
        result = r.json()
        names = {on_a.welcome["node"], on_b.welcome["node"]}  # type: ignore[index]
        assert result["disconnected"] == 2
        assert {n: result["nodes"][n] for n in names} == dict.fromkeys(names, 1)
        assert not names & set(result["unanswered"])
        assert await close_of(on_a) == (4001, "banned")
        assert await close_of(on_b) == (4001, "banned")
        assert (await other.sub(unique("still")))["ok"] is True
    # Through the other node's API: nobody left to close.
    r = await call(port_of(b), "POST", "/api/disconnect", {"user": user})
    assert r.status == 200 and r.json()["disconnected"] == 0, r


async def test_publish_on_one_node_reaches_the_other_and_info_lists_both(
    pair: tuple[NodeProcess, NodeProcess],
) -> None:
    a, b = pair
    ch = unique("room:pair")
    async with proto_client(ws_url(b, "carol")) as client:
        await client.sub(ch)
        r = await call(port_of(a), "POST", "/api/publish", {"channel": ch, "data": "x"})
        assert r.json() == {"seq": 1}
        assert (await client.next_pub(ch))["data"] == "x"
        presence = (await call(port_of(a), "GET", f"/api/presence?channel={ch}")).json()
        assert [c["user"] for c in presence["clients"].values()] == ["carol"]
        info = (await call(port_of(a), "GET", "/api/info")).json()
        assert {client.welcome["node"], info["node"]} <= info["nodes"].keys()  # type: ignore[index]
        assert info["nodes"][client.welcome["node"]]["connections"] >= 0  # type: ignore[index]


# --------------------------------------------------------------------------
# Redis away, and a draining node
# --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def node_through(proxy: TcpProxy) -> AsyncIterator[Any]:
    """A node in this process whose Redis is reached through proxy, with the API on."""
    app = App(
        Config(
            redis=f"redis://{HOST}:{proxy.port}/0",
            api_port=free_port(),
            api_key=KEY,
            namespaces=dict(NAMESPACES),
            log_level="warning",
        )
    )
    app.channels("/ws")
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    try:
        yield node
    finally:
        await asyncio.wait_for(node.stop(0), 10)


async def test_503_while_redis_is_unreachable(redis_server: str) -> None:
    target = redis_server.removeprefix("redis://").split("/")[0]
    proxy = await TcpProxy.start(HOST, int(target.split(":")[1]))
    try:
        async with node_through(proxy) as node:
            port = node.api.port
            ch = unique("away")
            assert (
                await call(port, "POST", "/api/publish", {"channel": ch, "data": 1})
            ).status == 200
            proxy.refusing = True
            proxy.cut()
            for method, path, body in (
                ("POST", "/api/publish", {"channel": ch, "data": 2}),
                ("POST", "/api/broadcast", {"channels": [ch, unique("away")], "data": 2}),
                ("GET", f"/api/history?channel={ch}", None),
                ("GET", f"/api/presence?channel={unique('room:away')}", None),
                ("POST", "/api/disconnect", {"user": "someone"}),
            ):
                r = await call(port, method, path, body)
                assert r.status == 503, (path, r)
                assert r.error == "unavailable" and r.headers["retry-after"] == "1"
            # Info answers from what it last knew: what an operator wants now.
            r = await call(port, "GET", "/api/info")
            assert r.status == 200 and r.json()["broker_ready"] is False, r
            proxy.refusing = False
            async with asyncio.timeout(20):
                while True:
                    r = await call(port, "POST", "/api/publish", {"channel": ch, "data": 3})
                    if r.status == 200:
                        break
                    await asyncio.sleep(0.1)
            assert r.json() == {"seq": 2}
    finally:
        await proxy.close()


async def test_the_api_answers_while_the_node_drains() -> None:
    app = App(Config(api_port=free_port(), api_key=KEY, drain_period=1.5, log_level="warning"))
    app.channels("/ws")
    node = await asyncio.wait_for(app.serve(host=HOST, port=0), 10)
    port = node.api.port
    ch = unique("drain")
    async with (
        proto_client(f"ws://{HOST}:{node.port}/ws") as one,
        proto_client(f"ws://{HOST}:{node.port}/ws"),
    ):
        await one.sub(ch)
        stopping = asyncio.create_task(node.stop())
        await asyncio.sleep(0.1)
        assert node.state.value == "draining"
        r = await call(port, "POST", "/api/publish", {"channel": ch, "data": 1})
        assert r.status == 200, r
        await asyncio.wait_for(stopping, 10)
    with pytest.raises(OSError):
        await call(port, "GET", "/api/info")


async def test_disconnect_reaches_every_node_on_a_redis_cluster(redis_cluster: str) -> None:
    """The control channel is a sharded pub/sub channel like any other there."""
    started = []
    try:
        for name in ("cluster-a", "cluster-b"):
            config = Config(
                redis_cluster=redis_cluster,
                api_port=free_port() if not started else 0,
                api_key=KEY,
                token_secret=SECRET,
                node_name=f"{name}-{time.monotonic_ns()}",
                log_level="warning",
            )
            app = App(config)
            app.channels("/ws")
            started.append(await asyncio.wait_for(app.serve(host=HOST, port=0), 10))
        a, b = started
        user = unique("user")
        url = f"ws://{HOST}:{{}}/ws?token={token(user)}"
        async with (
            proto_client(url.format(a.port)) as on_a,
            proto_client(url.format(b.port)) as on_b,
        ):
            r = await call(a.api.port, "POST", "/api/disconnect", {"user": user, "code": 4002})
            assert r.status == 200, r
            assert r.json()["nodes"][b.app.node_name] == 1
            assert r.json()["disconnected"] == 2
            assert await close_of(on_a) == (4002, "disconnected")
            assert await close_of(on_b) == (4002, "disconnected")
    finally:
        for node in started:
            await asyncio.wait_for(node.stop(0), 10)
