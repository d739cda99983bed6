"""`fastws serve --workers N`: N processes on one port, one system through Redis.

Real supervisors, real workers and a real redis-server: connections spread
over the workers, publications cross between them, a killed worker is
replaced, SIGTERM drains the group, and a group that cannot start or has no
backplane says so instead of looping.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import replace

import pytest
from conftest import (
    HOST,
    PYTHON,
    REPO,
    NodeProcess,
    ProtoClient,
    clean_env,
    free_port,
    proto_client,
    start_node,
    start_redis,
    unique,
    wait_exit,
)

from fastws import config as config_module
from fastws import workers

SERVING = re.compile(r"worker (\d+) serving: pid (\d+) \((\S+)\)")


def serving(group: NodeProcess) -> dict[int, int]:
    """{worker index: pid} of the latest worker of each slot that said it serves."""
    return {int(i): int(pid) for i, pid, _ in SERVING.findall(group.stderr())}


def wait_serving(group: NodeProcess, count: int, timeout: float = 15.0) -> dict[int, int]:
    """Wait for the log to show ``count`` workers serving in all; return the latest pids."""
    deadline = time.monotonic() + timeout
    while len(SERVING.findall(group.stderr())) < count:
        if time.monotonic() > deadline or not group.alive():
            pytest.fail(f"{count} workers never served\n{group.output_tail()}", pytrace=False)
        time.sleep(0.05)
    return serving(group)


@pytest.fixture
def group(redis_server: str) -> Iterator[NodeProcess]:
    """A supervisor of two workers; they all run until the test's end."""
    g = start_node(args=["--workers", "2", "--redis", redis_server, "--drain-period", "0.2"])
    wait_serving(g, 2)
    yield g
    g.stop()
    g.cleanup_files()


async def connect_until(url: str, nodes: set[str], stack: AsyncExitStack) -> dict[str, ProtoClient]:
    """Open connections until there is one on each of ``nodes``; {node name: client}."""
    found: dict[str, ProtoClient] = {}
    for _ in range(64):
        client = await stack.enter_async_context(proto_client(url))
        assert client.welcome is not None
        found.setdefault(client.welcome["node"], client)
        if nodes <= found.keys():
            return found
    raise AssertionError(f"connections reached only {sorted(found)}, not all of {nodes}")


def test_worker_environment_gives_back_the_same_config() -> None:
    config = config_module.load(
        {
            "workers": "3",
            "redis": "redis://:secret@127.0.0.1:1/0",
            "compression": "true",
            "ping_interval": "0.1",
            "namespaces": '{"chat": {"presence": true, "history_size": 5}}',
            "allowed_origins": "https://app.example, https://*.example.org",
            "trusted_proxies": "10.0.0.0/8,192.168.1.7",
        },
        environ={},
    )
    env = workers.environ(config, "group-w1")
    assert config_module.load(environ=env) == replace(config, node_name="group-w1")


def test_workers_without_a_backplane_are_refused() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "fastws", "serve", "--workers", "2", "--port", str(free_port())],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "workers: 2 processes need redis" in result.stderr


async def test_connections_spread_over_the_workers_and_publications_cross(
    group: NodeProcess,
) -> None:
    # Without node_name the group is named by the host and the supervisor's pid.
    names = {f"{socket.gethostname()}-{group.pid}-w{i}" for i in (1, 2)}
    welcomed: list[str] = []
    async with AsyncExitStack() as stack:
        for _ in range(24):
            client = await stack.enter_async_context(proto_client(group.ws_url()))
            assert client.welcome is not None
            welcomed.append(client.welcome["node"])
        assert set(welcomed) == names, welcomed
        on = await connect_until(group.ws_url(), names, stack)
        w1, w2 = (on[name] for name in sorted(names))
        ch = unique("workers")
        await w2.sub(ch)
        await w1.sub(ch)
        assert await w1.pub(ch, "from w1") == 1
        assert await w2.pub(ch, "from w2") == 2
        for client in (w1, w2):
            got = [(await client.next_pub(ch))["data"] for _ in range(2)]
            assert got == ["from w1", "from w2"]


async def test_a_killed_worker_is_replaced_and_subscribers_keep_receiving(
    group: NodeProcess,
) -> None:
    pids = serving(group)
    names = {f"{socket.gethostname()}-{group.pid}-w{i}" for i in (1, 2)}
    victim, survivor = sorted(names)
    ch = unique("workers")
    async with AsyncExitStack() as stack:
        on = await connect_until(group.ws_url(), names, stack)
        listener = on[survivor]
        await listener.sub(ch)
        await on[victim].sub(ch)
        os.kill(pids[1], signal.SIGKILL)
        # The killed worker's clients lose their connection, without a close frame.
        await asyncio.wait_for(on[victim].ws.wait_closed(), 5)
        assert on[victim].ws.close_code in (None, 1006)
        replaced = await asyncio.to_thread(wait_serving, group, 3)
        assert replaced[1] != pids[1] and replaced[2] == pids[2]
        assert f"worker 1 (pid {pids[1]}) was killed by SIGKILL: restarting" in group.stderr()
        # The replacement has the slot's name, takes connections and publishes
        # to the survivor's subscriber; it receives the survivor's publications.
        again = await connect_until(group.ws_url(), {victim}, stack)
        await again[victim].sub(ch)
        await again[victim].pub(ch, "from the replacement")
        await listener.pub(ch, "from the survivor")
        for client in (listener, again[victim]):
            got = [(await client.next_pub(ch))["data"] for _ in range(2)]
            assert got == ["from the replacement", "from the survivor"]


async def test_sigterm_drains_every_worker_and_exits_0(group: NodeProcess) -> None:
    pids = serving(group)
    names = {f"{socket.gethostname()}-{group.pid}-w{i}" for i in (1, 2)}
    async with AsyncExitStack() as stack:
        on = await connect_until(group.ws_url(), names, stack)
        group.send_signal(signal.SIGTERM)
        for client in on.values():
            await asyncio.wait_for(client.ws.wait_closed(), 5)
            assert client.ws.close_code == 1001
        assert await wait_exit(group, 10) == 0, group.output_tail()
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its supervisor"
    assert "every worker stopped" in group.stderr()


def test_a_group_that_cannot_listen_exits_1_at_once(redis_server: str) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        argv = ["serve", "--host", HOST, "--port", str(port), "--workers", "2"]
        result = subprocess.run(
            [PYTHON, "-m", "fastws", *argv, "--redis", redis_server],
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1, result.stderr
    assert "address already in use" in result.stderr
    assert "before it listened: stopping every worker" in result.stderr
    assert "restarting" not in result.stderr
    assert time.monotonic() - started < 15


# The supervisor of the next test, with its backoff shortened from seconds to
# tens of milliseconds so that five failed restarts take about as long as
# starting five processes.
QUICK_SUPERVISOR = """
import sys
from fastws import cli, workers
workers.BACKOFF_FIRST = workers.BACKOFF_MAX = 0.05
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_group_whose_restarts_keep_failing_gives_up_with_1() -> None:
    redis = start_redis()
    redis_port = redis.port
    port = free_port()
    argv = ["serve", "--host", HOST, "--port", str(port), "--workers", "2"]
    argv += ["--redis", f"redis://{HOST}:{redis_port}/0", "--drain-period", "0.2"]
    try:
        group = NodeProcess([PYTHON, "-c", QUICK_SUPERVISOR, *argv], port, clean_env(), "group")
        try:
            pids = wait_serving(group, 2)
            redis.stop()  # every replacement now fails to reach Redis
            os.kill(pids[1], signal.SIGKILL)
            deadline = time.monotonic() + 20
            while group.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            log = group.stderr()
            assert group.proc.returncode == 1, group.output_tail()
            assert "before it listened (try 5): stopping every worker" in log
            assert "cannot reach Redis" in log
            assert len(SERVING.findall(log)) == 2, "a replacement served without Redis"
        finally:
            group.stop()
            group.cleanup_files()
    finally:
        redis.stop()
        redis.cleanup_files()
