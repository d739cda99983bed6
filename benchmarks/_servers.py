"""Start, wait for, and stop the servers under test, and run the load generator.

A server is one process (fastws, a peer), or for `fastws+redis` a small
deployment: a redis-server of the run's own and two fastws nodes sharing it
(`running_cluster`). Either way the load generator is told where to connect
and whose CPU to count by `generator_args()`.

Every child is started in its own session, pinned and with the fd limit
lifted before exec, waited on with a timeout, and killed (by its own process
group id) if it does not leave when asked, so a failed run never leaves a
server behind or hangs the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _proc

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
CLUSTER = "fastws+redis"  # the server name of two nodes sharing a Redis


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
        # This checkout's fastws even when another one is installed (a clone
        # benchmarked with the main checkout's editable install).
        env={
            "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
        },
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


def redis_spec() -> ServerSpec:
    """A redis-server that keeps nothing on disk and logs only warnings."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not installed (bash scripts/system-deps.sh test)")
    return ServerSpec(
        "redis",
        lambda port: [
            binary,
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
        lambda port: _proc.redis_ok(HOST, port),
        path="",
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

    def generator_args(self) -> list[str]:
        """Where the load generator connects, and whose CPU it counts."""
        return [
            "--url",
            self.url,
            "--server-pid",
            str(self.proc.pid),
            "--dialect",
            self.spec.dialect,
        ]

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


@dataclass
class RunningCluster:
    """Two fastws nodes sharing one redis-server: node A takes the publisher, and
    subscribers are spread over A and B (the generator's --peer-url)."""

    redis: RunningServer
    nodes: list[RunningServer]

    @property
    def spec(self) -> ServerSpec:
        return self.nodes[0].spec

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def generator_args(self) -> list[str]:
        """Both nodes' CPU is the server's; Redis's is counted apart (--redis-pid)."""
        a, b = self.nodes
        return [
            *a.generator_args(),
            "--peer-url",
            b.url,
            "--server-pid",
            str(b.proc.pid),
            "--redis-pid",
            str(self.redis.proc.pid),
        ]

    @property
    def exit_note(self) -> str:
        parts = [self.redis, *self.nodes]
        return "; ".join(f"{p.spec.name} {p.exit_note}" for p in parts if p.exit_note)

    def log_lines(self) -> list[str]:
        """The nodes' lines; redis-server warns about the host (overcommit) on every start,
        so its log is kept on disk but not reported."""
        return [f"{n.spec.name}: {ln}" for n in self.nodes for ln in n.log_lines()]


@contextmanager
def running_cluster(
    cpu: int | None, log_path: Path, *node_options: str
) -> Iterator[RunningCluster]:
    """A redis-server on a free port and two `fastws serve --redis` nodes, all on `cpu`.

    Logs go next to `log_path`: -redis, -a and -b. Stopped in reverse: the
    nodes first (they clean up in Redis), then Redis.
    """
    stem = log_path.with_suffix("")
    with ExitStack() as stack:
        redis = stack.enter_context(running_server(redis_spec(), cpu, Path(f"{stem}-redis.log")))
        url = f"redis://{HOST}:{redis.port}/0"
        nodes = [
            stack.enter_context(
                running_server(
                    fastws_spec(
                        "--redis", url, "--node-name", name, *node_options, name=f"node {name}"
                    ),
                    cpu,
                    Path(f"{stem}-{name.lower()}.log"),
                )
            )
            for name in ("A", "B")
        ]
        yield RunningCluster(redis, nodes)


@contextmanager
def running(
    server: str, echo: bool, cpu: int | None, log_path: Path
) -> Iterator[RunningServer | RunningCluster]:
    """The server a scenario names, ready; every process of it stopped on the way out."""
    if server == CLUSTER:
        with running_cluster(cpu, log_path) as cluster:
            yield cluster
    else:
        with running_server(spec_for(server, echo), cpu, log_path) as single:
            yield single


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
    mode: str,
    server: RunningServer | RunningCluster,
    cpu: int | None,
    args: list[str],
    timeout: float,
) -> dict[str, Any]:
    """Run the load generator once; its progress goes to our stderr, its JSON is returned."""
    argv = [sys.executable, "-m", "benchmarks._generator", mode, *server.generator_args(), *args]
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
