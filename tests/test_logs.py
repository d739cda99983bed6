"""Logs: JSON lines whose lines about a connection carry its client, user, address and trace.

Real nodes write to stderr; the tests read the lines back. The trace id
comes from a W3C traceparent header on the upgrade, or is made up, and is
the one the welcome frame carries.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import (
    PYTHON,
    REPO,
    NodeProcess,
    RawWS,
    clean_env,
    free_port,
    http_get,
    proto_client,
    unique,
)

from fastws import logs

pytestmark = pytest.mark.timeout(60)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# --------------------------------------------------------------------------
# traceparent, strictly
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        TRACEPARENT,
        f"00-{TRACE}-{PARENT}-00",
        f" 00-{TRACE}-{PARENT}-01\t",  # optional whitespace around a header value
        f"01-{TRACE}-{PARENT}-01",  # a later version...
        f"cc-{TRACE}-{PARENT}-01-what-comes-next",  # ...may carry more after a '-'
    ],
)
def test_a_valid_traceparent_gives_its_trace_id(header: str) -> None:
    assert logs.parse_traceparent(header) == TRACE
    assert logs.trace_id([header]) == TRACE


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"00-{TRACE.upper()}-{PARENT}-01",  # uppercase hex
        f"00-{TRACE}-{PARENT.upper()}-01",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"01-{TRACE}-{PARENT}-01extra",  # more, but not after a '-'
        f"00-{TRACE[:-1]}-{PARENT}-01",  # short trace id
        f"00-{TRACE}0-{PARENT}-01",  # long trace id
        f"00-{TRACE}-{PARENT}-1",  # short flags
        f"0-{TRACE}-{PARENT}-01",
        f"00-{TRACE[:-1]}g-{PARENT}-01",  # not hex
        f"00_{TRACE}_{PARENT}_01",
    ],
)
def test_an_invalid_traceparent_gives_a_made_up_trace_id(header: str) -> None:
    assert logs.parse_traceparent(header) is None
    made_up = logs.trace_id([header])
    assert HEX32.match(made_up) and made_up != TRACE


def test_two_traceparent_headers_or_none_give_a_made_up_trace_id() -> None:
    assert logs.trace_id([TRACEPARENT, TRACEPARENT]) != TRACE
    a, b = logs.trace_id([]), logs.trace_id([])
    assert HEX32.match(a) and HEX32.match(b) and a != b


async def test_the_welcome_frame_carries_the_trace_id(node: NodeProcess) -> None:
    headers = {"traceparent": TRACEPARENT}
    async with proto_client(node.ws_url(), additional_headers=headers) as c:
        assert c.welcome is not None and c.welcome["trace"] == TRACE
    bad = {"traceparent": f"00-{'0' * 32}-{PARENT}-01"}
    async with proto_client(node.ws_url(), additional_headers=bad) as c:
        assert c.welcome is not None and HEX32.match(c.welcome["trace"])
        assert c.welcome["trace"] != "0" * 32
    async with proto_client(node.ws_url()) as a, proto_client(node.ws_url()) as b:
        assert a.welcome is not None and b.welcome is not None
        assert HEX32.match(a.welcome["trace"]) and a.welcome["trace"] != b.welcome["trace"]


# --------------------------------------------------------------------------
# JSON lines from real nodes
# --------------------------------------------------------------------------

# A library-mode app: a handler that fails on every message, and the
# channel protocol; its options come from FASTWS_* as `fastws serve`'s do.
APP = """
import sys
from fastws import App, Handler

class Boom(Handler):
    def on_message(self, message):
        raise RuntimeError("boom")

app = App()
app.mount("/boom", Boom)
app.channels("/ws")
app.run(host="127.0.0.1", port=int(sys.argv[1]))
"""


def json_lines(node: NodeProcess) -> list[dict[str, Any]]:
    """Every line of the node's stderr, each of which must be a JSON object."""
    parsed = []
    for line in node.stderr().splitlines():
        item = json.loads(line)
        assert isinstance(item, dict), line
        for key in ("time", "level", "logger", "message", "pid"):
            assert key in item, item
        assert TIME.match(item["time"]), item
        parsed.append(item)
    return parsed


def line_with(node: NodeProcess, text: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [item for item in json_lines(node) if text in item["message"]]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no line with {text!r}\n{node.output_tail()}")
        time.sleep(0.05)


@pytest.fixture
def json_app(tmp_path: Path) -> Iterator[NodeProcess]:
    script = tmp_path / "app.py"
    script.write_text(APP)
    port = free_port()
    env = clean_env(
        {
            "FASTWS_LOG_FORMAT": "json",
            "FASTWS_MAX_SEND_BUFFER": "65536",
            "FASTWS_RATE_LIMIT": "0",
            "FASTWS_MAX_MESSAGE_SIZE": "1048576",
        }
    )
    node = NodeProcess([PYTHON, str(script), str(port)], port, env, "json-app")
    node.wait_ready(lambda: http_get(port, "/healthz", timeout=1).status == 200)
    yield node
    node.stop()
    node.cleanup_files()


async def test_a_handler_error_line_carries_the_connection_fields(json_app: NodeProcess) -> None:
    ws = await RawWS.open(json_app.port, "/boom", headers={"traceparent": TRACEPARENT})
    try:
        await ws.send_text("anything")
        code, _ = await ws.wait_close()
        assert code == 1011
    finally:
        ws.close()
    line = line_with(json_app, "unhandled error, closing with 1011")
    assert line["level"] == "ERROR" and line["logger"] == "fastws.connection"
    assert re.match(r"^[0-9a-f]{16}$", line["client"]) and line["client"] in line["message"]
    assert line["user"] == "" and line["remote"] == "127.0.0.1" and line["trace"] == TRACE
    assert "RuntimeError: boom" in line["exc"]
    # lines not about a connection have none of its fields
    started = line_with(json_app, "listening on")
    assert not {"client", "user", "remote", "trace"} & started.keys()


async def test_a_slow_consumer_line_carries_the_connection_fields(json_app: NodeProcess) -> None:
    ch = unique("slow")
    slow = await RawWS.open(json_app.port, rcvbuf=4096, headers={"traceparent": TRACEPARENT})
    try:
        welcome = (await slow.welcome())["welcome"]
        assert welcome["trace"] == TRACE
        assert (await slow.request({"op": "sub", "ch": ch, "id": 1})).get("ok") is True
        async with proto_client(f"ws://127.0.0.1:{json_app.port}/ws") as publisher:
            for _ in range(200):
                await publisher.pub(ch, "x" * 100_000)
                if "closing with 1013" in json_app.stderr():
                    break
    finally:
        slow.close()
    line = line_with(json_app, "closing with 1013")
    assert line["level"] == "INFO"
    assert line["client"] == welcome["client"]
    assert (line["user"], line["remote"], line["trace"]) == ("", "127.0.0.1", TRACE)


async def test_the_user_is_on_the_lines_of_an_authenticated_connection(
    node_factory: Callable[..., NodeProcess],
) -> None:
    secret = "log-test-secret-" + "k" * 40
    node = node_factory(
        env={"FASTWS_TOKEN_SECRET": secret},
        args=["--token-leeway", "0", "--log-format", "json"],
    )
    token = jwt.encode({"sub": "alice", "exp": time.time() + 1.0}, secret, algorithm="HS256")
    url = f"{node.ws_url()}?token={token}"
    async with proto_client(url, additional_headers={"traceparent": TRACEPARENT}) as c:
        await asyncio.wait_for(c.ws.wait_closed(), 5)
        assert c.ws.close_code == 1008
    line = line_with(node, "token expired, closing with 1008")
    assert (line["user"], line["trace"], line["remote"]) == ("alice", TRACE, "127.0.0.1")
    assert c.welcome is not None and line["client"] == c.welcome["client"]


async def test_text_lines_about_a_connection_end_with_its_fields(
    node_factory: Callable[..., NodeProcess],
) -> None:
    node = node_factory(args=["--ping-interval", "0.2", "--ping-timeout", "0.3"])
    ws = await RawWS.open(node.port, headers={"traceparent": TRACEPARENT})
    try:
        client = (await ws.welcome())["welcome"]["client"]
        deadline = time.monotonic() + 5
        while "no answer to ping" not in node.stderr() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        ws.close()
    line = next(li for li in node.stderr().splitlines() if "no answer to ping" in li)
    assert " INFO fastws.heartbeat: connection " in line
    assert line.endswith(f"[client={client} user= remote=127.0.0.1 trace={TRACE}]"), line


def test_an_unknown_log_format_or_level_is_refused() -> None:
    for flag, value in (("--log-format", "xml"), ("--log-level", "loud")):
        result = subprocess.run(
            [PYTHON, "-m", "fastws", "serve", flag, value],
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert flag.removeprefix("--").replace("-", "_") in result.stderr
