"""``fastws serve --workers N``: N nodes on one port, kept running by a supervisor.

A node is one process, so it uses one core. To use a host's cores, the
supervisor starts N ordinary nodes (``python -m fastws serve``) that each
bind the port with SO_REUSEPORT, so that the kernel spreads new connections
over them, and share channels through Redis as nodes on separate hosts do.
The supervisor serves nothing itself: it starts, watches and stops.

Each worker gets the supervisor's resolved options as ``FASTWS_*``
variables, not on its command line, where a Redis password would show in
``ps``; so a restarted worker runs with the options the group started with,
whatever became of the TOML file since. Its node name is the group's name
(``node_name``, else host name and the supervisor's pid) plus ``-w<i>``. It
also gets one end of a socket pair: it writes READY there once it listens,
and drains, as on SIGTERM, when the other end closes because the supervisor
died.

The rules, in docs/workers.md:

- a worker that exits before every worker has listened once ends the group:
  the supervisor stops the others and returns 1, because what stopped it (a
  port already taken, Redis unreachable) would stop every retry too, and the
  service manager above is the one to decide when to try again;
- after that, a worker that exits is restarted, after a backoff that doubles
  from BACKOFF_FIRST to BACKOFF_MAX while its slot keeps failing within
  STABLE_AFTER seconds of listening; a slot whose worker fails to listen
  MAX_FAILED_STARTS times in a row ends the group with 1 the same way;
- SIGTERM and SIGINT are forwarded to every worker, which drains, and the
  supervisor returns once all have exited: 0 if each ended cleanly. A
  second signal is forwarded too, and stops the workers at once.

Metrics add up over the group (fastws.metrics): the supervisor makes a
directory for prometheus_client's multiprocess files, names it to every
worker as ``PROMETHEUS_MULTIPROC_DIR``, removes a dead worker's gauges when
it reaps it, and the whole directory when the group stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from prometheus_client import multiprocess

from fastws import logs, metrics
from fastws.config import OPTIONS, Config

if TYPE_CHECKING:
    from fastws.app import App
    from fastws.node import Node

logger = logging.getLogger("fastws.workers")

# The hidden `fastws serve` flag that makes a process a worker: the number
# of its end of the socket pair.
LINK_FLAG = "--worker-link"
READY = b"ready\n"

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0
MAX_FAILED_STARTS = 5

# Longest the supervisor sleeps between looks at its workers and signals.
POLL = 0.1

# A worker that ended this way was stopped by a signal the supervisor forwarded.
_CLEAN = (0, -signal.SIGTERM, -signal.SIGINT)


def environ(config: Config, node_name: str) -> dict[str, str]:
    """This environment without ``FASTWS_*``, plus every option as ``config`` has it.

    ``FASTWS_CONFIG`` goes too: the values already include the file's.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    for option in OPTIONS:
        value = getattr(config, option.name)
        if isinstance(value, bool):
            env[option.env] = "true" if value else "false"
        elif isinstance(value, dict):
            env[option.env] = json.dumps(value)
        elif isinstance(value, list):
            env[option.env] = ",".join(value)  # origins and CIDR blocks hold no commas
        else:
            env[option.env] = str(value)
    env["FASTWS_NODE_NAME"] = node_name
    return env


@dataclass
class _Slot:
    """Worker number ``index``: its process, if one runs, and its record of failures."""

    index: int
    name: str
    proc: subprocess.Popen[bytes] | None = None
    link: socket.socket | None = None
    serving_since: float | None = None
    restart_at: float | None = None
    failed_starts: int = 0
    quick_exits: int = 0


class Supervisor:
    """Runs ``config.workers`` workers until a signal, or until they cannot start."""

    def __init__(self, config: Config) -> None:
        self.config = config
        group = config.node_name or f"{socket.gethostname()}-{os.getpid()}"
        self.slots = [_Slot(i, f"{group}-w{i}") for i in range(1, config.workers + 1)]
        self.status = 0
        self._selector = selectors.DefaultSelector()
        self._signals: list[signal.Signals] = []
        self._stopping = False
        self._all_listened = False
        self.metrics_dir = ""

    def run(self) -> int:
        # The group's metrics files, fresh: a file left by an earlier group
        # would add its counts to this one's.
        self.metrics_dir = tempfile.mkdtemp(prefix="fastws-metrics-")
        try:
            return self._run()
        finally:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        logger.info(
            "fastws supervisor pid %d: %d workers on %s:%d",
            os.getpid(),
            len(self.slots),
            self.config.host,
            self.config.port,
        )
        for slot in self.slots:
            self._start(slot)
        while not self._stopping or any(slot.proc for slot in self.slots):
            self._step()
        logger.info("fastws supervisor pid %d: every worker stopped", os.getpid())
        return self.status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Acted on by the loop, not here, where a Popen may be half made.
        self._signals.append(signal.Signals(signum))

    def _step(self) -> None:
        for key, _ in self._selector.select(POLL):
            self._read_link(key.data)
        while self._signals:
            sig = self._signals.pop(0)
            if self._stopping:
                logger.warning("%s again: workers stop now", sig.name)
            else:
                logger.info("%s: draining every worker", sig.name)
            self._stop(sig)
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                self._exited(slot, now)
            elif slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)

    def _start(self, slot: _Slot) -> None:
        mine, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "fastws", "serve", LINK_FLAG, str(theirs.fileno())]
        env = environ(self.config, slot.name)
        env[metrics.MULTIPROC_ENV] = self.metrics_dir
        slot.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            # Out of the terminal's process group, so that Ctrl-C reaches
            # a worker once, forwarded, and does not count as a second signal.
            process_group=0,
        )
        theirs.close()
        mine.setblocking(False)
        self._selector.register(mine, selectors.EVENT_READ, slot)
        slot.link, slot.serving_since, slot.restart_at = mine, None, None
        logger.info("worker %d starting: pid %d", slot.index, slot.proc.pid)

    def _read_link(self, slot: _Slot) -> None:
        assert slot.link is not None and slot.proc is not None
        try:
            said = slot.link.recv(64)
        except OSError:
            said = b""
        if said != READY:  # the worker is gone; its exit is read from the process
            self._unlink(slot)
            return
        slot.serving_since = time.monotonic()
        slot.failed_starts = 0
        logger.info("worker %d serving: pid %d (%s)", slot.index, slot.proc.pid, slot.name)
        if not self._all_listened and all(s.serving_since is not None for s in self.slots):
            self._all_listened = True
            pids = ", ".join(str(s.proc.pid) for s in self.slots if s.proc)
            logger.info("all %d workers serving: pids %s", len(self.slots), pids)

    def _unlink(self, slot: _Slot) -> None:
        if slot.link is not None:
            self._selector.unregister(slot.link)
            slot.link.close()
            slot.link = None

    def _exited(self, slot: _Slot, now: float) -> None:
        assert slot.proc is not None
        code, pid = slot.proc.returncode, slot.proc.pid
        self._unlink(slot)
        slot.proc = None
        # Its gauges (connections open...) no longer count; its counters do.
        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        how = _how(code)
        if self._stopping:
            if code in _CLEAN:
                logger.info("worker %d (pid %d) stopped", slot.index, pid)
            else:
                logger.warning("worker %d (pid %d) %s while stopping", slot.index, pid, how)
                self.status = 1
            return
        if slot.serving_since is None:
            slot.failed_starts += 1
            if not self._all_listened or slot.failed_starts >= MAX_FAILED_STARTS:
                tries = "" if slot.failed_starts == 1 else f" (try {slot.failed_starts})"
                logger.error(
                    "worker %d (pid %d) %s before it listened%s: stopping every worker",
                    slot.index,
                    pid,
                    how,
                    tries,
                )
                self.status = 1
                self._stop(signal.SIGTERM)
                return
        elif now - slot.serving_since >= STABLE_AFTER:
            slot.quick_exits = 0
        delay = min(BACKOFF_FIRST * 2**slot.quick_exits, BACKOFF_MAX)
        slot.quick_exits += 1
        slot.restart_at = now + delay
        logger.warning(
            "worker %d (pid %d) %s: restarting it in %.1f s", slot.index, pid, how, delay
        )

    def _stop(self, sig: signal.Signals) -> None:
        self._stopping = True
        for slot in self.slots:
            slot.restart_at = None
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(sig)


def _how(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def supervise(config: Config) -> int:
    """Run ``config.workers`` workers of ``fastws serve``; the exit status for the group."""
    logs.configure(config.log_level, config.log_format)
    return Supervisor(config).run()


def serve_worker(app: App, link_fd: int) -> None:
    """Serve ``app`` as a worker: READY on the link once it listens, drain when it ends."""
    link = socket.socket(fileno=link_fd)

    def started(node: Node) -> None:
        link.sendall(READY)
        link.setblocking(False)
        asyncio.get_running_loop().add_reader(link.fileno(), _orphaned, link)

    try:
        app.run(started=started)
    finally:
        link.close()


def _orphaned(link: socket.socket) -> None:
    """The supervisor is gone (it sends nothing, so readable means closed): drain."""
    asyncio.get_running_loop().remove_reader(link.fileno())
    logger.warning("the supervisor is gone: draining")
    os.kill(os.getpid(), signal.SIGTERM)
