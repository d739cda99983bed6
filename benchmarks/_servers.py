"""Start, wait for, and stop the servers under test, and run the load generator.

Every child is started in its own session, pinned and with the fd limit
lifted before exec, waited on with a timeout, and killed (by its own process
group id) if it does not leave when asked, so a failed run never leaves a
server behind or hangs the driver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _proc

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


class BenchError(RuntimeError):
    """A run that could not produce figures; the message says why."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one kind of server, how to tell that it serves, and how to talk to it."""

    name: str
    argv: Callable[[int], list[str]]
    ready: Callable[[int], bool]
    path: str = "/ws"  # where its WebSocket endpoint is
    dialect: str = "fastws"  # see _wire.py
    env: dict[str, str] = field(default_factory=dict)  # added to the environment


def fastws_spec(*extra: str, name: str = "fastws") -> ServerSpec:
    """A fastws node; `extra` are more `fastws serve` options (e.g. --compression)."""
    return ServerSpec(
        name,
        lambda port: [
            sys.executable,
            "-m",
            "fastws",
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--log-level",
            "warning",
            # The publisher sends as fast as the node takes, far past the
            # default per-connection command rate; the peers have no limit.
            "--rate-limit",
            "0",
            *extra,
        ],
        lambda port: _proc.http_ok(HOST, port, "/healthz"),
    )


def fastws_echo_spec() -> ServerSpec:
    """fastws in library mode: examples/echo.py, a Handler that sends each message back."""
    return ServerSpec(
        "fastws",
        lambda port: [sys.executable, "examples/echo.py", "--host", HOST, "--port", str(port)],
        lambda port: _proc.tcp_ready(HOST, port),
        path="/",
        # Quiet as `fastws serve --log-level warning`, and this checkout's fastws
        # even when another one is installed.
        env={"FASTWS_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT)},
    )


def peer_spec(name: str, path: str = "/ws", dialect: str = "fastws") -> ServerSpec:
    """One of benchmarks/peers/NAME_server.py, serving channels on `path` and echo on /echo."""
    return ServerSpec(
        name,
        lambda port: [
            sys.executable,
            "-m",
            f"benchmarks.peers.{name}_server",
            "--host",
            HOST,
            "--port",
            str(port),
        ],
        lambda port: _proc.tcp_ready(HOST, port),
        path,
        dialect,
    )


SOCKETIO_PATH = "/socket.io/?EIO=4&transport=websocket"

PEERS = {
    "picows": peer_spec("picows"),
    "websockets": peer_spec("websockets"),
    "aiohttp": peer_spec("aiohttp"),
    "socketio": peer_spec("socketio", SOCKETIO_PATH, "socketio"),
}


def spec_for(server: str, echo: bool = False) -> ServerSpec:
    """The server to start for a scenario: echo scenarios use each server's echo endpoint."""
    if server == "fastws":
        return fastws_echo_spec() if echo else fastws_spec()
    if server == "fastws+deflate":
        return fastws_spec("--compression", name=server)
    peer = PEERS[server]
    if echo and peer.dialect == "fastws":
        return ServerSpec(peer.name, peer.argv, peer.ready, "/echo", peer.dialect)
    return peer


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the child's own process group (it was started as a session leader)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=STOP_TIMEOUT)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class RunningServer:
    spec: ServerSpec
    port: int
    proc: subprocess.Popen[Any]
    log_path: Path
    startup_s: float = 0.0
    exit_note: str = ""

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}{self.spec.path}"

    def log_lines(self) -> list[str]:
        """Whatever the server printed: at --log-level warning, each line is worth a look."""
        try:
            return [
                ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()
            ]
        except OSError:
            return []


@contextmanager
def running_server(spec: ServerSpec, cpu: int | None, log_path: Path) -> Iterator[RunningServer]:
    """A server on a fresh port, ready to serve; stopped (or killed) on the way out."""
    port = _proc.free_port(HOST)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            spec.argv(port),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **spec.env},
            preexec_fn=_proc.child_setup(cpu),
            start_new_session=True,
        )
    server = RunningServer(spec, port, proc, log_path)
    try:
        t0 = time.monotonic()
        ready = _proc.wait_until(lambda: proc.poll() is not None or spec.ready(port), READY_TIMEOUT)
        if proc.poll() is not None:
            raise BenchError(
                f"{spec.name} exited with {proc.returncode} before serving:\n{_tail(log_path)}"
            )
        if not ready:
            raise BenchError(
                f"{spec.name} not ready after {READY_TIMEOUT:.0f} s:\n{_tail(log_path)}"
            )
        server.startup_s = time.monotonic() - t0
        yield server
    finally:
        server.exit_note = stop(proc)


def stop(proc: subprocess.Popen[Any]) -> str:
    """SIGTERM, then SIGKILL after a grace period; returns a note if it was not clean."""
    if proc.poll() is not None:
        return f"had already exited with {proc.returncode}"
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return f"ignored SIGTERM for {STOP_TIMEOUT:.0f} s; killed"
    # Reap anything it forked and left behind in its group.
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return "" if code in (0, -signal.SIGTERM) else f"exited with {code} on SIGTERM"


def run_load(
    mode: str, server: RunningServer, cpu: int | None, args: list[str], timeout: float
) -> dict[str, Any]:
    """Run the load generator once; its progress goes to our stderr, its JSON is returned."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks._generator",
        mode,
        "--url",
        server.url,
        "--server-pid",
        str(server.proc.pid),
        "--dialect",
        server.spec.dialect,
        *args,
    ]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        preexec_fn=_proc.child_setup(cpu),
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise BenchError(f"load generator ({mode}) did not finish within {timeout:.0f} s") from None
    except BaseException:
        _kill_group(proc)
        raise
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise BenchError(
            f"load generator ({mode}) exited {proc.returncode} without a result: {lines[-3:]}"
        ) from None
    if "error" in result:
        raise BenchError(f"load generator ({mode}): {result['error']}")
    return result
