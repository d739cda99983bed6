"""Process plumbing shared by the benchmark driver and the load generator.

CPU time and RSS are read straight from /proc so that the figures cover
exactly the server's process tree (a `--workers N` node forks children),
and both sides can sample them without the other's cooperation.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import socket
import time
from collections.abc import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile_limit() -> int:
    """Lift the soft fd limit to the hard one: 10,000 idle sockets need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin(cpu: int | None) -> None:
    """Pin the calling process (and what it later forks) to one CPU, if given."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def child_setup(cpu: int | None):  # type: ignore[no-untyped-def]
    """A preexec_fn: pin and lift the fd limit before exec, so no thread escapes."""

    def setup() -> None:
        pin(cpu)
        raise_nofile_limit()

    return setup


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (via /proc/PID/task/TID/children)."""
    seen: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except FileNotFoundError:
                pass
    return seen


def _cpu_ticks_one(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # comm (field 2) may contain spaces; fields after the closing paren are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime+stime of the given processes, in seconds (clock-tick resolution)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            total += _cpu_ticks_one(pid)
    return total / CLK_TCK


def rss_kb(pids: Iterable[int]) -> int:
    """Sum of VmRSS over the given processes, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except FileNotFoundError:
            pass
    return total


class CpuStat:
    """One /proc/stat line, in seconds.

    The kernel charges softirq time to the CPU, not to a process: on loopback
    the TCP receive work a server's send() causes runs as softirq on the
    server's core, so a pinned core's `busy` tells more than the process's
    utime+stime whether that core was saturated.
    """

    __slots__ = ("busy", "irq", "task")

    def __init__(self, fields: list[int]) -> None:
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        self.task = (user + nice + system + steal) / CLK_TCK  # processes, and time stolen
        self.irq = (irq + softirq) / CLK_TCK
        self.busy = self.task + self.irq


def cpu_stats() -> dict[str, CpuStat]:
    """Every `cpu*` line of /proc/stat: "cpu" is the sum, "cpu0", "cpu1"... each core."""
    stats = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *rest = line.split()
            stats[name] = CpuStat([int(x) for x in rest])
    return stats


def only_cpu(pid: int) -> int | None:
    """The one CPU `pid` is pinned to, or None when it may run on several."""
    cpus = os.sched_getaffinity(pid)
    return next(iter(cpus)) if len(cpus) == 1 else None


def self_cpu_seconds() -> float:
    """This process's own user+system CPU, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out; a fresh one per server avoids TIME_WAIT clashes."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_ready(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(host: str, port: int, path: str) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def redis_ok(host: str, port: int) -> bool:
    """Whether a Redis answers PING on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
