"""A real Redis Cluster of three masters, started from Python for the tests.

Each master is a ``redis-server --cluster-enabled yes`` on a free port of
this host, keeping nothing on disk but its cluster config file (in a
directory of its own). The masters are given a third of the 16384 slots
each with ``CLUSTER ADDSLOTSRANGE``, introduced to each other with
``CLUSTER MEET``, and the cluster counts as up once every master says
``cluster_state:ok`` and maps every slot to the same three masters.

The cluster bus port is chosen free as well (``--cluster-port``, Redis 7),
rather than the default port + 10000, which may be taken or past 65535.

:meth:`Cluster.move_slot` reshards a slot by hand (IMPORTING / MIGRATING,
``MIGRATE`` of its keys, ``SETSLOT NODE`` on every master), as
``redis-cli --cluster reshard`` does, so a test can move a channel under a
running node; :meth:`Cluster.kill` and :meth:`Cluster.restart` crash a
master and bring it back empty.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import HOST, NodeProcess, clean_env, free_port
from redis.crc import key_slot

SLOTS = 16384
READY_TIMEOUT = 20.0  # seconds the masters get to agree on the slot map


def slot_of(name: str | bytes) -> int:
    """The hash slot of a key or sharded pub/sub channel (hash tags honoured)."""
    return int(key_slot(name.encode() if isinstance(name, str) else name))


def channel_slot(channel: str, prefix: str = "fastws") -> int:
    """The slot of a fastws channel's keys and pub/sub channel, ``fastws:{C}``."""
    return slot_of(f"{prefix}:{{{channel}}}")


class Cluster:
    """Three (or more) running masters; :meth:`stop` ends them."""

    def __init__(self, masters: int = 3) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed; run `bash scripts/system-deps.sh test`",
                pytrace=False,
            )
        self.directory = tempfile.mkdtemp(prefix="fastws-redis-cluster-")
        self.ports: list[int] = []
        self.bus_ports: list[int] = []
        self.servers: list[NodeProcess] = []
        try:
            for _ in range(masters):
                self._start_master(binary)
            self._form()
        except BaseException:
            self.stop()
            raise

    @property
    def seed_url(self) -> str:
        """One master's URL; a cluster client learns the others from it."""
        return f"redis://{HOST}:{self.ports[0]}"

    def url(self, port: int) -> str:
        return f"redis://{HOST}:{port}"

    def client(self, port: int) -> redis.Redis:
        """A plain (not cluster-aware) client of one master."""
        return redis.Redis(host=HOST, port=port, socket_timeout=5.0)

    def _start_master(self, binary: str) -> None:
        port, bus = free_port(), free_port()
        while bus == port or port in self.ports + self.bus_ports or bus in self.ports:
            port, bus = free_port(), free_port()
        argv = [
            binary,
            "--port", str(port),
            "--bind", HOST,
            "--cluster-enabled", "yes",
            "--cluster-port", str(bus),
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", "3000",
            "--dir", self.directory,
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        server = NodeProcess(argv, port, clean_env(), f"redis-cluster-{port}")
        self.ports.append(port)
        self.bus_ports.append(bus)
        self.servers.append(server)
        server.wait_ready(lambda: self._answers(port))

    def _answers(self, port: int) -> bool:
        with self.client(port) as r:
            return bool(r.ping())

    def _form(self) -> None:
        n = len(self.ports)
        bounds = [SLOTS * i // n for i in range(n + 1)]
        for i, port in enumerate(self.ports):
            with self.client(port) as r:
                r.execute_command("CLUSTER ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
        with self.client(self.ports[0]) as r:
            for port, bus in zip(self.ports[1:], self.bus_ports[1:], strict=True):
                r.execute_command("CLUSTER MEET", HOST, port, bus)
        self.wait_agreed()

    def wait_agreed(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every master is ok and all map every slot to the same masters."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                maps = [self.slot_map(port) for port in self.ports]
                states = [self._info(port) for port in self.ports]
            except (redis.RedisError, OSError) as exc:
                last = exc
            else:
                last = (states, maps)
                full = all(sum(hi - lo + 1 for lo, hi, _ in m) == SLOTS for m in maps)
                if (
                    full
                    and all(m == maps[0] for m in maps)
                    and all(s["cluster_state"] == "ok" for s in states)
                    and all(int(s["cluster_known_nodes"]) == len(self.ports) for s in states)
                ):
                    return
            time.sleep(0.05)
        pytest.fail(f"the Redis Cluster did not come up within {timeout} s: {last!r}")

    def _info(self, port: int) -> dict[str, str]:
        with self.client(port) as r:
            info = r.execute_command("CLUSTER INFO")  # parsed by redis-py into a dict
        return {str(k): str(v) for k, v in info.items()}

    def slot_map(self, port: int) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master port) as one master sees it, sorted."""
        with self.client(port) as r:
            ranges = r.execute_command("CLUSTER SLOTS")
        return sorted((int(lo), int(hi), int(master[1])) for lo, hi, master, *_ in ranges)

    def owner(self, slot: int) -> int:
        """The port of the master that serves the slot."""
        for lo, hi, port in self.slot_map(self.ports[0]):
            if lo <= slot <= hi:
                return port
        raise LookupError(f"slot {slot} is not served")

    def node_id(self, port: int) -> str:
        with self.client(port) as r:
            return str(r.execute_command("CLUSTER MYID").decode())

    def move_slot(self, slot: int, to_port: int) -> None:
        """Reshard one slot, keys and all, to another master, as redis-cli does.

        Every master learns the new owner with ``SETSLOT NODE`` (the
        destination first, so that it never refuses the slot's keys); the
        source then drops its sharded pub/sub subscribers of the slot.
        """
        from_port = self.owner(slot)
        if from_port == to_port:
            return
        source, target = self.node_id(from_port), self.node_id(to_port)
        with self.client(to_port) as dst, self.client(from_port) as src:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", HOST, to_port, "", 0, 5000, "REPLACE", "KEYS", *keys)
            dst.execute_command("CLUSTER SETSLOT", slot, "NODE", target)
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", target)
        for port in self.ports:
            if port not in (from_port, to_port):
                with self.client(port) as r:
                    r.execute_command("CLUSTER SETSLOT", slot, "NODE", target)
        self.wait_agreed()

    def kill(self, port: int) -> None:
        """SIGKILL one master: a crash. Its keys are gone (nothing on disk)."""
        server = self.servers[self.ports.index(port)]
        server.send_signal(signal.SIGKILL)
        server.proc.wait(5)
        server.cleanup_files()

    def restart(self, port: int) -> None:
        """Start a killed master again: same port, same node id and slots (its
        cluster config file is kept), no keys. Waits until the cluster is ok."""
        i = self.ports.index(port)
        old = self.servers[i]
        self.servers[i] = NodeProcess(old.argv, port, clean_env(), old.name)
        self.servers[i].wait_ready(lambda: self._answers(port))
        self.wait_agreed()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
            server.cleanup_files()
        self.servers.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(masters: int = 3) -> Iterator[Cluster]:
    cluster = Cluster(masters)
    try:
        yield cluster
    finally:
        cluster.stop()
