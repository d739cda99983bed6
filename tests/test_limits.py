"""Limits on what one client (or one address, or everyone) may take from a node.

Connection caps are refused with an HTTP status before the upgrade; limits
on what an open connection sends are answered with an error reply and then
a close code. Everything is asserted as the client sees it on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    HOST,
    OP_BINARY,
    OP_CONT,
    OP_TEXT,
    NodeProcess,
    RawWS,
    ahttp_get,
    ascrape,
    clean_env,
    free_port,
    http_get,
    metric,
    node_argv,
    proto_client,
    unique,
    ws_frame,
)

from fastws import config

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------

CONTRACT_DEFAULTS: dict[str, Any] = {
    "ping_interval": 25.0,
    "ping_timeout": 20.0,
    "max_message_size": 65536,
    "max_connections": 0,
    "max_connections_per_ip": 0,
    "handshake_timeout": 5.0,
    "rate_limit": 1000.0,
    "rate_burst": 1000,
    "max_bad_commands": 10,
    "max_send_buffer": 1048576,
    "close_timeout": 2.0,
    "drain_period": 10.0,
}

# a value of the right type that differs from the default
OTHER_VALUE: dict[str, Any] = {
    "ping_interval": 3.5,
    "ping_timeout": 4.5,
    "max_message_size": 1234,
    "max_connections": 7,
    "max_connections_per_ip": 3,
    "handshake_timeout": 1.5,
    "rate_limit": 12.5,
    "rate_burst": 9,
    "max_bad_commands": 4,
    "max_send_buffer": 65536,
    "close_timeout": 0.5,
    "drain_period": 2.0,
}


@pytest.mark.parametrize("name", sorted(CONTRACT_DEFAULTS))
def test_option_default(name: str) -> None:
    default = getattr(config.Config(), name)
    assert default == CONTRACT_DEFAULTS[name], f"{name} defaults to {default!r}"
    assert type(default) is type(CONTRACT_DEFAULTS[name]), (name, default)


@pytest.mark.parametrize("name", sorted(OTHER_VALUE))
def test_option_from_flag_env_and_toml(name: str, tmp_path: Path) -> None:
    value = OTHER_VALUE[name]
    option = next(o for o in config.OPTIONS if o.name == name)
    assert option.flag == "--" + name.replace("_", "-")
    assert option.env == "FASTWS_" + name.upper()
    toml = tmp_path / "fastws.toml"
    toml.write_text(f"{name} = {value!r}\n")
    assert getattr(config.load({}, {}, str(toml)), name) == value
    assert getattr(config.load({}, {option.env: str(value)}), name) == value
    assert getattr(config.load({name: str(value)}, {}), name) == value


# --------------------------------------------------------------------------
# message size
# --------------------------------------------------------------------------


def command_of_size(size: int, ch: str, cid: int) -> bytes:
    """A valid pub command whose JSON is exactly ``size`` bytes."""
    base = json.dumps({"op": "pub", "ch": ch, "id": cid, "data": ""}, separators=(",", ":"))
    pad = size - len(base)
    assert pad >= 0
    out = json.dumps({"op": "pub", "ch": ch, "id": cid, "data": "x" * pad}, separators=(",", ":"))
    assert len(out) == size
    return out.encode()


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
async def test_message_size_limit(
    node_factory: Callable[..., NodeProcess], fragmented: bool
) -> None:
    limit = 4096
    node = node_factory(args=["--max-message-size", str(limit)])
    ch = unique("size")

    async def send(ws: RawWS, payload: bytes) -> None:
        if not fragmented:
            await ws.send_frame(OP_TEXT, payload)
            return
        third = len(payload) // 3
        await ws.send_raw(
            ws_frame(OP_TEXT, payload[:third], fin=False)
            + ws_frame(OP_CONT, payload[third : 2 * third], fin=False)
            + ws_frame(OP_CONT, payload[2 * third :], fin=True)
        )

    ws = await RawWS.open(node.port)
    try:
        await ws.welcome()
        # exactly the limit: accepted
        await send(ws, command_of_size(limit, ch, 1))
        r = await ws.recv_json()
        assert r.get("id") == 1 and r.get("ok") is True, r
        # one byte more: closed with 1009
        await send(ws, command_of_size(limit + 1, ch, 2))
        code, frames = await ws.wait_close()
        assert code == 1009, (code, frames)
        assert not any(b'"id":2' in f.payload for f in frames), frames
    finally:
        ws.close()
    assert (await ahttp_get(node.port, "/healthz")).status == 200
    # The oversize pub was refused, not executed: only the first was published.
    async with proto_client(node.ws_url()) as c:
        assert (await c.request({"op": "history", "ch": ch}))["seq"] == 1


# --------------------------------------------------------------------------
# connection caps
# --------------------------------------------------------------------------


async def open_ok(port: int, source: str | None = None) -> RawWS:
    ws = await RawWS.open(port, source=source)
    assert ws.status == 101, (ws.status, ws.body)
    await ws.welcome()
    return ws


async def open_refused(port: int, source: str | None = None) -> RawWS:
    ws = await RawWS.open(port, source=source)
    ws.close()
    return ws


async def eventually_accepted(port: int, source: str | None = None, within: float = 3.0) -> RawWS:
    """Retry an upgrade until accepted (a slot freed by a close is freed once the node sees it)."""
    deadline = time.monotonic() + within
    while True:
        ws = await RawWS.open(port, source=source)
        if ws.status == 101:
            await ws.welcome()
            return ws
        ws.close()
        assert time.monotonic() < deadline, f"still refused ({ws.status}) after a slot was freed"
        await asyncio.sleep(0.05)


async def close_cleanly(ws: RawWS) -> None:
    await ws.send_frame(0x8, (1000).to_bytes(2, "big"))
    code, _ = await ws.wait_close()
    assert code == 1000, code
    ws.close()


async def test_max_connections_503(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(args=["--max-connections", "3"])
    ch = unique("cap")
    held = [await open_ok(node.port) for _ in range(3)]
    try:
        refused = await open_refused(node.port)
        assert refused.status == 503, (refused.status, refused.body)
        # another address does not help: the cap is node-wide
        other = await open_refused(node.port, source="127.0.0.2")
        assert other.status == 503, (other.status, other.body)
        # probes still answer while the node is full
        assert (await ahttp_get(node.port, "/healthz")).status == 200
        samples = await ascrape(node.port)
        assert metric(samples, "fastws_connections_refused_total", reason="max_connections") == 2
        assert metric(samples, "fastws_connections_open") == 3

        # the connections held are unaffected
        r = await held[0].request({"op": "sub", "ch": ch, "id": 1})
        assert r.get("ok") is True, r
        r = await held[1].request({"op": "pub", "ch": ch, "data": "still here", "id": 2})
        assert r.get("ok") is True and r.get("seq") == 1, r
        pub = await held[0].recv_json()
        assert pub == {"ch": ch, "seq": 1, "data": "still here"}, pub

        # a slot freed is a slot available
        await close_cleanly(held.pop())
        held.append(await eventually_accepted(node.port))
        again = await open_refused(node.port)
        assert again.status == 503, again.status
    finally:
        for ws in held:
            ws.close()


async def test_max_connections_under_a_burst(node_factory: Callable[..., NodeProcess]) -> None:
    """20 upgrades at once against a cap of 5: exactly 5 are accepted."""
    node = node_factory(args=["--max-connections", "5"])
    results = await asyncio.gather(*(RawWS.open(node.port) for _ in range(20)))
    try:
        statuses = sorted(ws.status for ws in results)
        assert statuses.count(101) == 5 and statuses.count(503) == 15, statuses
        for ws in results:
            if ws.status == 101:
                await ws.welcome()
        samples = await ascrape(node.port)
        assert metric(samples, "fastws_connections_open") == 5, samples
        assert metric(samples, "fastws_connections_refused_total", reason="max_connections") == 15
    finally:
        for ws in results:
            ws.close()


async def test_max_connections_per_ip_429(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(args=["--max-connections-per-ip", "2"])
    held = [await open_ok(node.port), await open_ok(node.port)]
    try:
        refused = await open_refused(node.port)
        assert refused.status == 429, (refused.status, refused.body)
        # a different address is unaffected, up to its own limit
        held += [await open_ok(node.port, "127.0.0.2"), await open_ok(node.port, "127.0.0.2")]
        refused2 = await open_refused(node.port, "127.0.0.2")
        assert refused2.status == 429, refused2.status
        held.append(await open_ok(node.port, "127.0.0.3"))
        # plain HTTP from the capped address still works
        assert (await ahttp_get(node.port, "/healthz")).status == 200
        samples = await ascrape(node.port)
        assert (
            metric(samples, "fastws_connections_refused_total", reason="max_connections_per_ip")
            == 2
        ), samples
        assert metric(samples, "fastws_connections_refused_total", reason="max_connections") == 0
        # the held connections work
        for i, ws in enumerate(held):
            r = await ws.request({"op": "sub", "ch": unique("ip"), "id": i})
            assert r.get("ok") is True, r
        # closing one of 127.0.0.1's frees a slot for 127.0.0.1
        await close_cleanly(held.pop(0))
        held.append(await eventually_accepted(node.port))
    finally:
        for ws in held:
            ws.close()


async def test_caps_are_released_by_aborted_connections(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """Connections reset by the client, or cut mid-frame, give their slots back."""
    node = node_factory(args=["--max-connections", "4", "--max-connections-per-ip", "2"])
    for round_ in range(5):
        a, b = await open_ok(node.port), await open_ok(node.port)
        refused = await open_refused(node.port)
        assert refused.status == 429, (round_, refused.status)
        await a.send_raw(ws_frame(OP_TEXT, b'{"op":"sub","ch":"half-a-frame"}')[:7])
        a.abort()
        b.abort()
        # both slots come back (once the node has seen the resets)
        c = await eventually_accepted(node.port)
        d = await eventually_accepted(node.port)
        c.abort()
        d.abort()
    deadline = time.monotonic() + 3
    while metric(await ascrape(node.port), "fastws_connections_open") != 0:
        assert time.monotonic() < deadline, "aborted connections still counted open"
        await asyncio.sleep(0.05)


async def test_max_connections_from_toml(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    toml = tmp_path / "fastws.toml"
    toml.write_text("max_connections = 1\n")
    node = node_factory(args=["--config", str(toml)])
    first = await open_ok(node.port)
    try:
        refused = await open_refused(node.port)
        assert refused.status == 503, refused.status
    finally:
        first.close()


# --------------------------------------------------------------------------
# handshake timeout
# --------------------------------------------------------------------------

HANDSHAKE_SLACK = 1.0


async def dropped_after(ws: RawWS, limit: float) -> tuple[float, bytes]:
    """Seconds until the node ends the TCP connection, and what it sent before."""
    t0 = time.monotonic()
    data = b""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionResetError):
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(ws.sock, 65536), limit)
            if not chunk:
                break
            data += chunk
    return time.monotonic() - t0, data


async def test_handshake_timeout_silent_tcp_client(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--handshake-timeout", "1"])
    ws = await RawWS.open(node.port, upgrade=False)
    try:
        elapsed, data = await dropped_after(ws, 1 + HANDSHAKE_SLACK + 3)
        assert 0.8 <= elapsed <= 1 + HANDSHAKE_SLACK, f"dropped after {elapsed:.2f} s"
        assert not data.startswith(b"HTTP/1.1 101"), data
    finally:
        ws.close()


async def test_handshake_timeout_slowloris(node_factory: Callable[..., NodeProcess]) -> None:
    """Bytes that keep trickling in do not extend the handshake deadline."""
    node = node_factory(args=["--handshake-timeout", "1"])
    ws = await RawWS.open(node.port, upgrade=False)
    request = ws.upgrade_request()[:-4]  # never the final blank line
    loop = asyncio.get_running_loop()

    async def trickle() -> None:
        for byte in request * 10:
            await loop.sock_sendall(ws.sock, bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    try:
        elapsed, data = await dropped_after(ws, 1 + HANDSHAKE_SLACK + 3)
        assert not sender.done() or sender.exception() is not None, "trickle ran out first"
        assert 0.8 <= elapsed <= 1 + HANDSHAKE_SLACK, f"dropped after {elapsed:.2f} s"
        assert not data.startswith(b"HTTP/1.1 101"), data
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        ws.close()


async def test_completed_upgrade_outlives_handshake_timeout(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--handshake-timeout", "0.5"])
    ws = await open_ok(node.port)
    try:
        await asyncio.sleep(1.5)
        r = await ws.request({"op": "sub", "ch": unique("hs"), "id": 1})
        assert r.get("ok") is True, r
    finally:
        ws.close()


# --------------------------------------------------------------------------
# command rate
# --------------------------------------------------------------------------


def pubs(ch: str, ids: list[int | None]) -> bytes:
    """Pub commands in one write, so that the node reads them in one go."""
    out = b""
    for i in ids:
        cmd: dict[str, Any] = {"op": "pub", "ch": ch, "data": i}
        if i is not None:
            cmd["id"] = i
        out += ws_frame(OP_TEXT, json.dumps(cmd).encode())
    return out


async def read_replies(ws: RawWS, n: int, timeout: float = 5.0) -> list[Any]:
    out = []
    for _ in range(n):
        f = await ws.recv_msg(timeout)
        assert f.opcode == OP_TEXT, f"expected a reply, got {f!r} after {out!r}"
        out.append(f.json())
    return out


async def test_rate_limit_refuses_and_does_not_execute(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--rate-limit", "5", "--rate-burst", "5"])
    ch = unique("rate")
    sub = await open_ok(node.port)
    ws = await open_ok(node.port)
    try:
        assert (await sub.request({"op": "sub", "ch": ch, "id": 1})).get("ok") is True
        # the welcome is not a command; 5 commands fit the bucket, the rest are refused
        await ws.send_raw(pubs(ch, [1, 2, 3, 4, 5, 6, 7, None]))
        replies = await read_replies(ws, 8)
        oks = [r for r in replies if r.get("ok") is True]
        errors = [r for r in replies if "error" in r]
        assert [r["id"] for r in oks] == [1, 2, 3, 4, 5], replies
        assert [r["seq"] for r in oks] == [1, 2, 3, 4, 5], replies
        assert [r["id"] for r in errors] == [6, 7, None], replies
        assert all(r["error"]["code"] == "limit_exceeded" for r in errors), replies
        # refused commands were not executed: the subscriber saw exactly five
        got = [(await sub.recv_json())["data"] for _ in range(5)]
        assert got == [1, 2, 3, 4, 5], got
        with pytest.raises(TimeoutError):
            extra = await sub.recv_msg(0.3)
            pytest.fail(f"a refused command was executed: {extra!r}")
        # after the bucket refills, commands go through again, and the connection is open
        await asyncio.sleep(1.2)
        r = await ws.request({"op": "pub", "ch": ch, "data": "later", "id": 9})
        assert r.get("ok") is True and r.get("seq") == 6, r
    finally:
        ws.close()
        sub.close()


async def test_rate_limit_flood_is_closed_1008(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(args=["--rate-limit", "5", "--rate-burst", "5"])
    ch = unique("rate")
    ws = await open_ok(node.port)
    try:
        await ws.send_raw(pubs(ch, list(range(1, 31))))
        code, frames = await ws.wait_close()
        replies = [f.json() for f in frames]
        oks = [r["id"] for r in replies if r.get("ok") is True]
        refused = [r["id"] for r in replies if r.get("error", {}).get("code") == "limit_exceeded"]
        assert code == 1008, (code, replies)
        assert oks == [1, 2, 3, 4, 5], replies
        # refused rate-burst (5) times in a row: the last refusals may be the close itself
        assert 1 <= len(refused) <= 5 and refused == list(range(6, 6 + len(refused))), replies
        assert len(replies) == len(oks) + len(refused), replies
    finally:
        ws.close()


async def test_rate_limit_refusals_forgiven_after_a_full_refill(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """Refused 3 times, backed off until the bucket was full, refused 3 more: still open."""
    node = node_factory(args=["--rate-limit", "10", "--rate-burst", "4"])
    ch = unique("rate")
    ws = await open_ok(node.port)
    try:
        for round_ in range(3):
            ids = [round_ * 10 + i for i in range(1, 8)]
            await ws.send_raw(pubs(ch, ids))  # type: ignore[arg-type]
            replies = await read_replies(ws, 7)
            codes = [r.get("error", {}).get("code", "ok") for r in replies]
            assert codes == ["ok"] * 4 + ["limit_exceeded"] * 3, (round_, replies)
            await asyncio.sleep(0.7)  # a full refill takes 0.4 s
        r = await ws.request({"op": "sub", "ch": ch, "id": 99})
        assert r.get("ok") is True, r
    finally:
        ws.close()


async def test_rate_below_the_limit_is_never_refused(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--rate-limit", "20", "--rate-burst", "3"])
    ch = unique("rate")
    ws = await open_ok(node.port)
    try:
        for i in range(25):  # 10 commands/s, for 2.5 s, against 20/s with a burst of 3
            r = await ws.request({"op": "pub", "ch": ch, "data": i, "id": i})
            assert r.get("ok") is True, (i, r)
            await asyncio.sleep(0.1)
    finally:
        ws.close()


# --------------------------------------------------------------------------
# malformed commands
# --------------------------------------------------------------------------

BAD_FRAMES = [
    ws_frame(OP_TEXT, b"not json"),
    ws_frame(OP_TEXT, b"[1, 2]"),
    ws_frame(OP_TEXT, b'{"op": "nope", "id": 3}'),
    ws_frame(OP_BINARY, b'{"op": "sub", "ch": "x", "id": 4}'),
    ws_frame(OP_TEXT, b'{"op": "sub", "id": 5}'),
]


async def test_bad_commands_below_the_limit_are_answered(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--max-bad-commands", "5"])
    ws = await open_ok(node.port)
    try:
        await ws.send_raw(b"".join(BAD_FRAMES[:4]))
        replies = await read_replies(ws, 4)
        assert all(r.get("error", {}).get("code") == "bad_request" for r in replies), replies
        r = await ws.request({"op": "sub", "ch": unique("bad"), "id": 10})
        assert r.get("ok") is True, r
    finally:
        ws.close()


async def test_bad_commands_at_the_limit_close_1008(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """max-bad-commands malformed commands in quick succession (40 ms) close with 1008.

    They are 10 ms apart, so that they do not all land in the same loop turn
    (or the same millisecond of the loop clock) by luck.
    """
    node = node_factory(args=["--max-bad-commands", "5"])
    ws = await open_ok(node.port)
    try:
        for frame in BAD_FRAMES:
            await ws.send_raw(frame)
            await asyncio.sleep(0.01)
        code, frames = await ws.wait_close(timeout=3)
        replies = [f.json() for f in frames]
        assert code == 1008, (
            f"5 malformed commands within 40 ms against --max-bad-commands 5: "
            f"close code {code}, replies {replies}"
        )
        assert 4 <= len(replies) <= 5, replies
        assert all(r.get("error", {}).get("code") == "bad_request" for r in replies), replies
    finally:
        ws.close()
    samples = await ascrape(node.port)
    assert metric(samples, "fastws_connections_open") == 0


async def test_bad_commands_are_forgiven_over_time(
    node_factory: Callable[..., NodeProcess],
) -> None:
    """4 strikes, 3.2 s of good behaviour (3 whole seconds forgiven), 3 more: 4 < 5, open."""
    node = node_factory(args=["--max-bad-commands", "5"])
    ws = await open_ok(node.port)
    try:
        await ws.send_raw(b"".join(BAD_FRAMES[:4]))
        await read_replies(ws, 4)
        await asyncio.sleep(3.2)
        await ws.send_raw(b"".join(BAD_FRAMES[:3]))
        replies = await read_replies(ws, 3)
        assert all(r.get("error", {}).get("code") == "bad_request" for r in replies), replies
        r = await ws.request({"op": "sub", "ch": unique("bad"), "id": 10})
        assert r.get("ok") is True, r
    finally:
        ws.close()


async def test_failed_but_well_formed_commands_are_not_strikes(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--max-bad-commands", "3"])
    ws = await open_ok(node.port)
    ch = unique("bad")
    try:
        frames = b"".join(
            ws_frame(
                OP_TEXT,
                json.dumps(
                    {"op": "history", "ch": ch, "since": {"epoch": "gone", "seq": 1}, "id": i}
                ).encode(),
            )
            for i in range(20)
        )
        await ws.send_raw(frames)
        replies = await read_replies(ws, 20)
        assert all("error" in r and r["error"]["code"] != "bad_request" for r in replies), replies
        r = await ws.request({"op": "sub", "ch": ch, "id": 100})
        assert r.get("ok") is True, r
    finally:
        ws.close()


async def test_default_max_bad_commands_is_10(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory()
    ws = await open_ok(node.port)
    try:
        await ws.send_raw(ws_frame(OP_TEXT, b"garbage") * 9)
        replies = await read_replies(ws, 9)
        assert all(r.get("error", {}).get("code") == "bad_request" for r in replies), replies
        await ws.send_raw(ws_frame(OP_TEXT, b"garbage") * 2)
        code, frames = await ws.wait_close()
        assert code == 1008, (code, frames)
    finally:
        ws.close()


def test_a_node_raises_its_open_files_limit_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard > 256, "the test needs a hard limit above 256"

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    port = free_port()
    proc = subprocess.Popen(
        node_argv("--host", HOST, "--port", str(port)),
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=low_soft_limit,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if http_get(port, "/healthz", timeout=1.0).status == 200:
                    break
            time.sleep(0.05)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
        soft = line.split()[3]
        assert soft != "256" and (soft == "unlimited" or int(soft) > 256), line
    finally:
        proc.terminate()
        proc.wait(10)
