"""Shared fixtures and helpers for the fastws test suite.

Everything here talks to a real node over real sockets: the node runs as a
subprocess (``python -m fastws serve``) on a free port, and the helpers speak
plain HTTP/1.1 and WebSocket to it. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"
READY_TIMEOUT = 15.0  # seconds a node gets to answer /healthz
STOP_TIMEOUT = 10.0  # seconds a node gets to exit after SIGTERM at teardown


def _raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit.

    Done at import time so that both this process (the fanout tests open a
    thousand client sockets) and every node subprocess (which inherits the
    limit) can hold that many descriptors.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_nofile_limit()


# --------------------------------------------------------------------------
# ports and plain HTTP
# --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class HTTPResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"HTTPResponse({self.status}, {self.headers!r}, {self.body[:200]!r})"


def _request_bytes(path: str, port: int) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        "User-Agent: fastws-tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"bad HTTP status line: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        line, _, rest = body.partition(b"\r\n")
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


def _body_complete(headers: dict[str, str], body: bytes) -> bool:
    if "content-length" in headers:
        return len(body) >= int(headers["content-length"])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return b"0\r\n\r\n" in body
    return False  # read until EOF


def _finish(status: int, headers: dict[str, str], body: bytes) -> HTTPResponse:
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return HTTPResponse(status, headers, body)


def http_get(port: int, path: str, timeout: float = 5.0) -> HTTPResponse:
    """Blocking HTTP/1.1 GET over a plain socket. Raises OSError if nothing answers."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(_request_bytes(path, port))
        buf = b""
        head: bytes | None = None
        status, headers = 0, {}
        while True:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if head is None and b"\r\n\r\n" in buf:
                head, buf = buf.split(b"\r\n\r\n", 1)
                status, headers = _parse_head(head)
            if head is not None and _body_complete(headers, buf):
                break
        if head is None:
            raise ConnectionError(f"no HTTP response head for GET {path}: {buf[:200]!r}")
        return _finish(status, headers, buf)


async def ahttp_get(port: int, path: str, timeout: float = 5.0) -> HTTPResponse:
    """The same GET on asyncio (needed when the server runs in this event loop)."""

    async def go() -> HTTPResponse:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(_request_bytes(path, port))
            await writer.drain()
            buf = b""
            head: bytes | None = None
            status, headers = 0, {}
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk
                if head is None and b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    status, headers = _parse_head(head)
                if head is not None and _body_complete(headers, buf):
                    break
            if head is None:
                raise ConnectionError(f"no HTTP response head for GET {path}: {buf[:200]!r}")
            return _finish(status, headers, buf)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.wait_for(go(), timeout)


# --------------------------------------------------------------------------
# node subprocesses
# --------------------------------------------------------------------------


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without any FASTWS_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class NodeProcess:
    """A node (or example server) running as a subprocess."""

    def __init__(self, argv: Sequence[str], port: int, env: dict[str, str], name: str) -> None:
        self.argv = list(argv)
        self.port = port
        self.name = name
        # Output goes to files, not pipes: a chatty node must never block on a
        # full pipe, and the files are read back when something goes wrong.
        self._out = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"{name}-out-", suffix=".log", delete=False
        )
        self._err = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"{name}-err-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            self.argv,
            cwd=str(REPO),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def ws_url(self, path: str = "/ws") -> str:
        return f"ws://{HOST}:{self.port}{path}"

    def stdout(self) -> str:
        self._out.flush()
        return Path(self._out.name).read_text("utf-8", "replace")

    def stderr(self) -> str:
        self._err.flush()
        return Path(self._err.name).read_text("utf-8", "replace")

    def output_tail(self, n: int = 4000) -> str:
        return (
            f"--- {self.name} argv: {self.argv}\n"
            f"--- exit code: {self.proc.poll()}\n"
            f"--- stdout (tail) ---\n{self.stdout()[-n:]}\n"
            f"--- stderr (tail) ---\n{self.stderr()[-n:]}"
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, probe: Callable[[], bool], timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                pytest.fail(
                    f"{self.name} exited before it became ready\n{self.output_tail()}",
                    pytrace=False,
                )
            try:
                if probe():
                    return
            except OSError:
                pass
            except ValueError:
                pass
            time.sleep(0.05)
        pytest.fail(
            f"{self.name} did not become ready within {timeout} s\n{self.output_tail()}",
            pytrace=False,
        )

    def wait_healthy(self, timeout: float = READY_TIMEOUT) -> None:
        self.wait_ready(lambda: http_get(self.port, "/healthz", timeout=1.0).status == 200, timeout)

    def wait_port_open(self, timeout: float = READY_TIMEOUT) -> None:
        def probe() -> bool:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                return True

        self.wait_ready(probe, timeout)

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, SIGKILL if needed. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._close_files()
        return self.proc.returncode

    def _close_files(self) -> None:
        for f in (self._out, self._err):
            with contextlib.suppress(Exception):
                f.close()

    def cleanup_files(self) -> None:
        self._close_files()
        for f in (self._out, self._err):
            with contextlib.suppress(OSError):
                os.unlink(f.name)


def node_argv(*args: str) -> list[str]:
    return [PYTHON, "-m", "fastws", "serve", *args]


def start_node(
    port: int | None = None,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    *,
    port_flag: bool = True,
    wait: bool = True,
) -> NodeProcess:
    """Start ``python -m fastws serve``. ``port`` is where readiness is probed.

    With ``port_flag`` false the port is not put on the command line (the
    test configures it through env or TOML instead).
    """
    port = port or free_port()
    argv = ["--host", HOST]
    if port_flag:
        argv += ["--port", str(port)]
    node = NodeProcess(node_argv(*argv, *args), port, clean_env(env), "fastws-node")
    if wait:
        try:
            node.wait_healthy()
        except BaseException:
            node.stop(timeout=3)
            raise
    return node


def start_echo(port: int | None = None) -> NodeProcess:
    port = port or free_port()
    argv = [PYTHON, str(REPO / "examples" / "echo.py"), "--port", str(port)]
    node = NodeProcess(argv, port, clean_env(), "echo-example")
    try:
        # The echo example mounts a plain handler at "/", so there is no
        # /healthz contract for it: ready means the port accepts connections.
        node.wait_port_open()
    except BaseException:
        node.stop(timeout=3)
        raise
    return node


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    """One default node shared by a module's tests (tests use unique channel names)."""
    n = start_node()
    yield n
    n.stop()
    n.cleanup_files()


@pytest.fixture
def fresh_node() -> Iterator[NodeProcess]:
    """A default node of this test's own."""
    n = start_node()
    yield n
    n.stop()
    n.cleanup_files()


@pytest.fixture
def node_factory() -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes with custom flags/env; all of them are stopped at teardown."""
    nodes: list[NodeProcess] = []

    def make(*a: Any, **kw: Any) -> NodeProcess:
        n = start_node(*a, **kw)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()
        n.cleanup_files()


@pytest.fixture(scope="module")
def echo_server() -> Iterator[NodeProcess]:
    n = start_echo()
    yield n
    n.stop()
    n.cleanup_files()


# --------------------------------------------------------------------------
# a small channel-protocol client on top of websockets
# --------------------------------------------------------------------------

RECV_TIMEOUT = 5.0


class ProtoClient:
    """A /ws client that keeps messages it was not asked for in ``pending``."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.pending: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] | None = None
        self._next_id = 1000

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def recv_raw(self, timeout: float = RECV_TIMEOUT) -> str | bytes:
        return await asyncio.wait_for(self.ws.recv(), timeout)

    async def recv(self, timeout: float = RECV_TIMEOUT) -> Any:
        raw = await self.recv_raw(timeout)
        assert isinstance(raw, str), f"server sent a non-TEXT frame: {raw!r}"
        return json.loads(raw)

    async def send(self, msg: Any) -> None:
        await self.ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    async def reply_to(self, cid: Any, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """The next reply (ok or error) carrying ``id == cid``; other messages are kept."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no reply with id={cid!r}; kept: {self.pending!r}")
            msg = await self.recv(left)
            if (
                isinstance(msg, dict)
                and "id" in msg
                and msg["id"] == cid
                and type(msg["id"]) is type(cid)
                and ("ok" in msg or "error" in msg)
            ):
                return msg
            self.pending.append(msg)

    async def request(self, msg: dict[str, Any], timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        if "id" not in msg:
            msg = {**msg, "id": self.next_id()}
        await self.send(msg)
        return await self.reply_to(msg["id"], timeout)

    async def sub(self, ch: str, **extra: Any) -> dict[str, Any]:
        r = await self.request({"op": "sub", "ch": ch, **extra})
        assert r.get("ok") is True, f"sub {ch!r} failed: {r!r}"
        return r

    async def unsub(self, ch: str) -> dict[str, Any]:
        r = await self.request({"op": "unsub", "ch": ch})
        assert r.get("ok") is True, f"unsub {ch!r} failed: {r!r}"
        return r

    async def pub(self, ch: str, data: Any) -> int:
        r = await self.request({"op": "pub", "ch": ch, "data": data})
        assert r.get("ok") is True, f"pub to {ch!r} failed: {r!r}"
        return int(r["seq"])

    async def next_pub(
        self, ch: str | None = None, timeout: float = RECV_TIMEOUT
    ) -> dict[str, Any]:
        """The next publication (on ``ch`` if given); other messages stay in ``pending``."""

        def is_pub(m: Any) -> bool:
            return (
                isinstance(m, dict)
                and "seq" in m
                and "data" in m
                and "ch" in m
                and "id" not in m
                and (ch is None or m["ch"] == ch)
            )

        for i, m in enumerate(self.pending):
            if is_pub(m):
                return self.pending.pop(i)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no publication on {ch!r}; kept: {self.pending!r}")
            m = await self.recv(left)
            if is_pub(m):
                return m
            self.pending.append(m)

    async def expect_silence(self, duration: float = 0.3) -> None:
        """Assert that nothing (kept or new) arrives within ``duration`` seconds."""
        assert not self.pending, f"unexpected messages: {self.pending!r}"
        try:
            raw = await asyncio.wait_for(self.ws.recv(), duration)
        except TimeoutError:
            return
        pytest.fail(f"unexpected message: {raw!r}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)


@contextlib.asynccontextmanager
async def proto_client(url: str, *, welcome: bool = True, **kw: Any) -> Any:
    """Connect to ``url``; by default read and check the welcome frame first."""
    from websockets.asyncio.client import connect

    ws = await connect(url, open_timeout=5, close_timeout=2, **kw)
    c = ProtoClient(ws)
    try:
        if welcome:
            w = await c.recv()
            assert isinstance(w, dict) and "welcome" in w, f"first frame is not a welcome: {w!r}"
            c.welcome = w["welcome"]
        yield c
    finally:
        await c.close()


def unique(prefix: str = "ch") -> str:
    """A channel name no other test uses."""
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"


# --------------------------------------------------------------------------
# metrics and /proc figures of a node process
# --------------------------------------------------------------------------


def parse_samples(text: str) -> dict[str, float]:
    """{sample name with its labels, as written: value} from Prometheus text."""
    import re

    samples: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?)\s+(\S+)", line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1)] = float(m.group(2))
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """The value of ``name`` (summed over label sets, or the one matching ``labels``)."""
    total, found = 0.0, False
    for key, value in samples.items():
        base, _, lab = key.partition("{")
        if base != name:
            continue
        if labels and not all(f'{k}="{v}"' in lab for k, v in labels.items()):
            continue
        total += value
        found = True
    assert found, f"no sample {name} {labels or ''} among {sorted(samples)}"
    return total


def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    r = http_get(port, "/metrics", timeout=timeout)
    assert r.status == 200, r
    return parse_samples(r.text)


async def ascrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    r = await ahttp_get(port, "/metrics", timeout=timeout)
    assert r.status == 200, r
    return parse_samples(r.text)


def rss_kb(pid: int) -> int:
    """Resident set size of a process, in kB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_exit(node: NodeProcess, timeout: float) -> int | None:
    """The node's exit code once it exits, or None if it still runs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = node.proc.poll()
        if rc is not None:
            return rc
        await asyncio.sleep(0.02)
    return None


# --------------------------------------------------------------------------
# a raw-socket WebSocket client, for peers that misbehave below the protocol
# --------------------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class PeerClosed(Exception):
    """The server ended the TCP connection (EOF or reset) without a close frame."""

    def __init__(self, how: str, buffered: bytes = b"") -> None:
        super().__init__(how)
        self.how = how
        self.buffered = buffered


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    mask_key: bytes | None = None,
) -> bytes:
    """One client frame, masked unless told otherwise."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(mbit | 127)
        head += n.to_bytes(8, "big")
    if not mask:
        return bytes(head) + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    head += key
    if n:
        # XOR with the repeated key, fast enough for test payloads
        k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
        payload = (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")
    return bytes(head) + payload


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


class Frame:
    __slots__ = ("fin", "opcode", "payload", "rsv")

    def __init__(self, fin: bool, opcode: int, payload: bytes, rsv: int = 0) -> None:
        self.fin, self.opcode, self.payload, self.rsv = fin, opcode, payload, rsv

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE:
            return None
        return int.from_bytes(self.payload[:2], "big") if len(self.payload) >= 2 else 1005

    def json(self) -> Any:
        return json.loads(self.payload)

    def __repr__(self) -> str:
        return f"Frame(fin={self.fin}, op={self.opcode:#x}, {self.payload[:120]!r})"


class RawWS:
    """A WebSocket client on a plain non-blocking socket, driven by the event loop.

    It reads only when asked to, so a test controls exactly when (and
    whether) bytes leave the kernel's receive buffer; it sends whatever
    bytes it is given, valid frames or not.
    """

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.port = port
        self.buf = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.close_frame: Frame | None = None

    # connecting

    @classmethod
    async def open(
        cls,
        port: int,
        path: str = "/ws",
        *,
        source: str | None = None,
        rcvbuf: int | None = None,
        upgrade: bool = True,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> RawWS:
        """Connect (from ``source``, with a small ``rcvbuf`` if given) and upgrade.

        ``headers`` go into the upgrade request too (Origin, X-Forwarded-For...).
        """
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                sock.bind((source, 0))
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), timeout)
        except BaseException:
            sock.close()
            raise
        ws = cls(sock, port)
        if upgrade:
            try:
                await ws.handshake(path, timeout=timeout, headers=headers)
            except BaseException:
                ws.close()
                raise
        return ws

    def upgrade_request(self, path: str = "/ws", headers: dict[str, str] | None = None) -> bytes:
        import base64

        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        return (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()

    async def handshake(
        self, path: str = "/ws", timeout: float = 5.0, headers: dict[str, str] | None = None
    ) -> int:
        """Send the upgrade request and read the response head; return its status.

        For a refusal (not 101) the body is read too, into ``body``.
        """
        await self.send_raw(self.upgrade_request(path, headers))
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if not await self._fill(deadline - time.monotonic()):
                raise PeerClosed("EOF during the handshake", bytes(self.buf))
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        self.status, self.headers = _parse_head(head)
        if self.status != 101:
            want = int(self.headers.get("content-length", "0") or 0)
            while len(self.buf) < want:
                if not await self._fill(deadline - time.monotonic()):
                    break
            self.body = bytes(self.buf[:want])
            del self.buf[:want]
        return self.status

    # bytes

    async def send_raw(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _fill(self, timeout: float) -> bool:
        """Read once into the buffer; False on EOF, PeerClosed on reset."""
        if timeout <= 0:
            raise TimeoutError("nothing from the server in time")
        loop = asyncio.get_running_loop()
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 262144), timeout)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise PeerClosed(f"reset: {exc!r}", bytes(self.buf)) from None
        if not chunk:
            return False
        self.buf += chunk
        return True

    # frames

    def _parse_one(self) -> Frame | None:
        b = self.buf
        if len(b) < 2:
            return None
        fin, rsv, opcode = bool(b[0] & 0x80), (b[0] >> 4) & 0x7, b[0] & 0xF
        masked, n, pos = b[1] & 0x80, b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, pos = int.from_bytes(b[2:4], "big"), 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, pos = int.from_bytes(b[2:10], "big"), 10
        if masked:
            pos += 4  # servers do not mask; tolerate it anyway
        if len(b) < pos + n:
            return None
        payload = bytes(b[pos : pos + n])
        del b[: pos + n]
        return Frame(fin, opcode, payload, rsv)

    async def recv_frame(self, timeout: float = RECV_TIMEOUT) -> Frame:
        """The next frame; PeerClosed on EOF/reset without one."""
        deadline = time.monotonic() + timeout
        while True:
            f = self._parse_one()
            if f is not None:
                if f.opcode == OP_CLOSE and self.close_frame is None:
                    self.close_frame = f
                return f
            if not await self._fill(deadline - time.monotonic()):
                raise PeerClosed("EOF", bytes(self.buf))

    async def send_frame(self, opcode: int, payload: bytes, **kw: Any) -> None:
        await self.send_raw(ws_frame(opcode, payload, **kw))

    async def send_text(self, text: str | bytes) -> None:
        await self.send_frame(OP_TEXT, text.encode() if isinstance(text, str) else text)

    async def send_json(self, obj: Any) -> None:
        await self.send_text(json.dumps(obj))

    async def recv_msg(self, timeout: float = RECV_TIMEOUT, *, pong: bool = True) -> Frame:
        """The next data message (fragments joined) or close frame; pings answered."""
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        first: Frame | None = None
        while True:
            f = await self.recv_frame(deadline - time.monotonic())
            if f.opcode == OP_PING:
                if pong:
                    await self.send_frame(OP_PONG, f.payload)
                continue
            if f.opcode == OP_PONG:
                continue
            if f.opcode == OP_CLOSE:
                return f
            if first is None:
                first = f
            parts.append(f.payload)
            if f.fin:
                return Frame(True, first.opcode, b"".join(parts))

    async def recv_json(self, timeout: float = RECV_TIMEOUT) -> Any:
        f = await self.recv_msg(timeout)
        assert f.opcode == OP_TEXT, f"expected a TEXT message, got {f!r}"
        return f.json()

    async def welcome(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        w = await self.recv_json(timeout)
        assert isinstance(w, dict) and "welcome" in w, w
        return w

    async def request(self, msg: dict[str, Any], timeout: float = RECV_TIMEOUT) -> Any:
        """Send a command and return the reply with its id; other messages are dropped."""
        await self.send_json(msg)
        deadline = time.monotonic() + timeout
        while True:
            f = await self.recv_msg(deadline - time.monotonic())
            assert f.opcode != OP_CLOSE, f"closed with {f.close_code} awaiting {msg!r}"
            m = f.json()
            if isinstance(m, dict) and m.get("id") == msg.get("id") and ("ok" in m or "error" in m):
                return m

    async def wait_close(self, timeout: float = RECV_TIMEOUT) -> tuple[int | None, list[Frame]]:
        """Read until the server's close frame; answer it. Returns (code, frames before).

        ``code`` is None when the TCP connection ended without a close frame.
        """
        frames: list[Frame] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                f = await self.recv_frame(deadline - time.monotonic())
                if f.opcode == OP_CLOSE:
                    with contextlib.suppress(OSError):
                        await self.send_frame(OP_CLOSE, f.payload[:2])
                    return f.close_code, frames
                frames.append(f)
        except PeerClosed:
            return None, frames
        except TimeoutError:
            raise AssertionError(
                f"the server did not close within {timeout} s; frames meanwhile: {frames[:20]!r}"
            ) from None

    def abort(self) -> None:
        """Close with an RST (SO_LINGER 0)."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------
# a real redis-server for the Redis broker's tests
# --------------------------------------------------------------------------


def _redis_answers(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def start_redis(*options: str, port: int = 0) -> NodeProcess:
    """A redis-server of a test's own, answering on a free port (or ``port``).

    It keeps nothing on disk unless ``options`` (redis-server flags, which
    override the defaults) say so. A machine without redis-server fails the
    test rather than skipping it: `bash scripts/system-deps.sh test`
    installs it.
    """
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed; run `bash scripts/system-deps.sh test`",
            pytrace=False,
        )
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    server = NodeProcess([*argv, *options], port, clean_env(), "redis-server")
    try:
        server.wait_ready(lambda: _redis_answers(port))
    except BaseException:
        server.stop()
        server.cleanup_files()
        raise
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """The session's redis-server (:func:`start_redis`); yields its URL."""
    server = start_redis()
    try:
        yield f"redis://{HOST}:{server.port}/0"
    finally:
        server.stop()
        server.cleanup_files()


@pytest.fixture(scope="session")
def redis_cluster_nodes() -> Iterator[Any]:
    """A Redis Cluster of three masters of the session's own (tests/rediscluster.py).

    Fails, as ``redis_server`` does, when redis-server is not installed.
    """
    from rediscluster import running_cluster

    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster(redis_cluster_nodes: Any) -> str:
    """The seed URL of the session's Redis Cluster."""
    return str(redis_cluster_nodes.seed_url)


# --------------------------------------------------------------------------
# a real headless Chromium for the browser client's tests (tests/browser.py)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One browser per test module; fails when Chromium is not installed."""
    from browser import Chromium

    browser = Chromium()
    try:
        yield browser
    finally:
        browser.stop()


@pytest.fixture
async def page(chromium: Any) -> AsyncIterator[Any]:
    """A blank tab of that browser, closed after the test."""
    from browser import open_page

    async with open_page(chromium) as tab:
        yield tab
