"""Prometheus metrics of a node, and how the workers of a group add up.

The hot path only bumps plain integers (``App.stats`` in Python, the hub's
counters in the core); :data:`FAMILIES` says what each becomes, and they are
read when /metrics is scraped, so counting costs nothing per message beyond
an integer add. The two histograms, ping round trip and broker latency, are
observed once per answered ping and once per broker call, never per
delivery. docs/observability.md lists every metric.

Alone, a node reads its counters live at each scrape (:class:`_Live`).

In a group of workers (``fastws serve --workers N``, fastws.workers) a
scrape of the shared port reaches whichever worker the kernel picks, and
that worker must answer for all of them. The supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` to a directory of its own, which puts
prometheus_client in multiprocess mode: every value lives in a small
memory-mapped file per process, and the scraped worker adds up every
worker's files. Each worker copies its plain counters into its files every
:data:`SYNC_PERIOD` seconds and when it stops, and the scraped one just
before it answers; histograms write theirs as they are observed. Counters of
a worker that died stay in the directory, so a group's totals never go back
when a worker is replaced; the supervisor removes a dead worker's gauges,
which are summed over the live workers only.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from fastws.brokers.base import Calls

if TYPE_CHECKING:
    from fastws.app import App

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The variable that puts prometheus_client in multiprocess mode; read when
# prometheus_client is imported, so a worker has it from its start.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Reasons for refusing an upgrade that /metrics shows from the start, at 0,
# so that a rate over them works from the first refusal. A reason counted
# in ``Stats.refused`` that is not listed here shows up once it is counted.
REFUSAL_REASONS = (
    "max_connections",
    "max_connections_per_ip",
    "draining",
    "origin",
    "unauthorized",
)

# Close codes shown from the start: those the node sends, and 1000 and 1006.
CLOSE_CODES = (1000, 1001, 1002, 1006, 1007, 1008, 1009, 1011, 1012, 1013)

# Seconds a worker's plain counters may be behind in its files (workers only).
SYNC_PERIOD = 1.0

# A ping's round trip: a LAN answers in under a millisecond, a phone on a
# bad network in seconds; past ping_timeout the connection is cut anyway.
PING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# A broker call: Redis on the same host answers in ~100 µs; COMMAND_TIMEOUT is 5 s.
BROKER_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

Reading = float | Mapping[str, float]


@dataclass(frozen=True)
class Family:
    """One metric read from the plain counters: a number, or one per label value."""

    name: str  # counters get ``_total`` in the exposition
    kind: str  # "counter" or "gauge"
    help: str
    read: Callable[[App], Reading]
    label: str = ""  # the label's name, when ``read`` gives {label value: number}


def _closes(app: App) -> dict[str, float]:
    counted: dict[str, float] = dict.fromkeys(map(str, CLOSE_CODES), 0)
    for code, n in app.stats.closes.items():
        label = close_label(code)
        counted[label] = counted.get(label, 0) + n
    return counted


def close_label(code: int) -> str:
    """A close code as a label: the registered ones as they are, applications' by range.

    Clients may close with any code from 3000 to 4999; one series each would
    let them grow the series count, so those are ``3xxx`` and ``4xxx``.
    """
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


def _refused(app: App) -> dict[str, float]:
    counted: dict[str, float] = dict.fromkeys(REFUSAL_REASONS, 0)
    counted.update(app.stats.refused)
    return counted


def _publications(app: App) -> dict[str, float]:
    counted: dict[str, float] = dict.fromkeys(app.namespaces.labels(), 0)
    counted.update(app.stats.publications)
    return counted


FAMILIES: tuple[Family, ...] = (
    Family(
        "fastws_processes",
        "gauge",
        "Node processes this scrape covers: 1, or the live workers of a group.",
        lambda app: 1,
    ),
    Family(
        "fastws_connections_open",
        "gauge",
        "WebSocket connections open now.",
        lambda app: len(app.connections),
    ),
    Family(
        "fastws_channels",
        "gauge",
        "Channels with at least one subscriber on this node (summed over a group's workers).",
        lambda app: len(app.hub.channel_names()),
    ),
    Family(
        "fastws_tasks",
        "gauge",
        "asyncio tasks alive in the node's processes.",
        lambda app: len(asyncio.all_tasks()),
    ),
    Family(
        "fastws_history_channels",
        "gauge",
        "Channels keeping a history (with Redis: of those this node listens to, sampled).",
        lambda app: app.broker.kept()[0],
    ),
    Family(
        "fastws_history_publications",
        "gauge",
        "Publications kept in channel histories (with Redis: of the channels this node "
        "listens to, sampled).",
        lambda app: app.broker.kept()[1],
    ),
    Family(
        "fastws_connections_accepted",
        "counter",
        "WebSocket upgrades accepted.",
        lambda app: app.stats.accepted,
    ),
    Family(
        "fastws_connections_refused",
        "counter",
        "WebSocket upgrades refused, by reason.",
        _refused,
        "reason",
    ),
    Family(
        "fastws_connections_closed",
        "counter",
        "Connections ended, by close code (1006: without a close frame; 3xxx and 4xxx: "
        "application codes, by range).",
        _closes,
        "code",
    ),
    Family(
        "fastws_messages_in",
        "counter",
        "Whole messages received from clients.",
        lambda app: app.stats.messages_in,
    ),
    Family(
        "fastws_bytes_in",
        "counter",
        "Payload bytes of the messages received from clients, as they came (compressed or not).",
        lambda app: app.stats.bytes_in,
    ),
    Family(
        "fastws_messages_out",
        "counter",
        "Frames queued to clients, publications included.",
        lambda app: app.hub.frames_out,
    ),
    Family(
        "fastws_bytes_out",
        "counter",
        "Bytes handed to client transports, frame headers included.",
        lambda app: app.hub.bytes_out,
    ),
    Family(
        "fastws_publications",
        "counter",
        "Publications made through this node (clients' pub and App.publish), by namespace "
        "(configured ones; every other channel is 'default').",
        _publications,
        "namespace",
    ),
    Family(
        "fastws_deliveries",
        "counter",
        "Publications queued to a subscriber.",
        lambda app: app.hub.deliveries,
    ),
    Family(
        "fastws_recoveries",
        "counter",
        "Subscriptions with since: recovered (missed publications replayed) or not "
        "(the client must refetch).",
        lambda app: {"true": app.stats.recovered, "false": app.stats.not_recovered},
        "recovered",
    ),
    Family(
        "fastws_command_errors",
        "counter",
        "Commands answered with an error.",
        lambda app: app.stats.command_errors,
    ),
    Family(
        "fastws_protocol_errors",
        "counter",
        "Connections failed for a WebSocket protocol violation.",
        lambda app: app.stats.protocol_errors,
    ),
    Family(
        "fastws_handler_errors",
        "counter",
        "Unexpected errors in a connection's handler (closed 1011).",
        lambda app: app.stats.handler_errors,
    ),
    Family(
        "fastws_rate_limited",
        "counter",
        "Commands refused with limit_exceeded.",
        lambda app: app.stats.rate_limited,
    ),
    Family(
        "fastws_rate_limit_closes",
        "counter",
        "Connections closed with 1008 for going on past the rate limit.",
        lambda app: app.stats.rate_limit_closes,
    ),
    Family(
        "fastws_policy_closes",
        "counter",
        "Connections closed with 1008 for floods or bad commands (rate-limit closes included).",
        lambda app: app.stats.policy_closes,
    ),
    Family(
        "fastws_slow_consumer_closes",
        "counter",
        "Connections closed with 1013 as slow consumers.",
        lambda app: app.stats.slow_consumers,
    ),
    Family(
        "fastws_token_expiry_closes",
        "counter",
        "Connections closed with 1008 when their token expired.",
        lambda app: app.stats.token_expired,
    ),
    Family(
        "fastws_pings_sent",
        "counter",
        "Keepalive pings sent to quiet connections.",
        lambda app: app.stats.pings_sent,
    ),
    Family(
        "fastws_ping_timeouts",
        "counter",
        "Connections cut for not answering a ping.",
        lambda app: app.stats.ping_timeouts,
    ),
)


class BrokerCalls(Calls):
    """The broker's calls as a latency histogram and an error counter, by operation."""

    def __init__(self) -> None:
        self.latency = Histogram(
            "fastws_broker_latency_seconds",
            "Time a broker call to the backplane (Redis) took, by operation.",
            ["operation"],
            buckets=BROKER_BUCKETS,
            registry=None,
        )
        self.errors = Counter(
            "fastws_broker_errors",
            "Broker calls that failed (the backplane unreachable, or an error reply), and "
            "lost pub/sub connections (operation 'pubsub').",
            ["operation"],
            registry=None,
        )
        # The histogram's child per operation, found once: labels() takes a lock.
        self._timers: dict[str, Histogram] = {}

    def took(self, operation: str, seconds: float) -> None:
        timer = self._timers.get(operation)
        if timer is None:
            timer = self._timers[operation] = self.latency.labels(operation)
        timer.observe(seconds)

    def failed(self, operation: str) -> None:
        self.errors.labels(operation).inc()


class Metrics:
    """What one node's /metrics exposes: its App's counters and its histograms."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.directory = os.environ.get(MULTIPROC_ENV) or None
        self.ping_rtt = Histogram(
            "fastws_ping_rtt_seconds",
            "Round trip of keepalive pings: from the ping leaving to its pong arriving.",
            buckets=PING_BUCKETS,
            registry=None,
        )
        self.broker_calls = BrokerCalls()
        self._timer: asyncio.TimerHandle | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        if self.directory is None:
            self._registry.register(_Live(self))
            self._synced: _Synced | None = None
        else:
            MultiProcessCollector(self._registry, self.directory)  # type: ignore[no-untyped-call]
            self._synced = _Synced(app)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's figures, or the whole group's."""
        if self._synced is not None:
            self._synced.sync()
        return generate_latest(self._registry)

    def start(self) -> None:
        """Start copying the counters to this worker's files (only in a group)."""
        if self._synced is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SYNC_PERIOD, self._sync)

    def stop(self) -> None:
        """Stop copying, after a last copy: a drained worker's counts all stay counted."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._synced is not None:
            self._synced.sync()

    def _sync(self) -> None:
        assert self._synced is not None
        self._synced.sync()
        self._timer = asyncio.get_running_loop().call_later(SYNC_PERIOD, self._sync)

    def histograms(self) -> Iterator[Metric]:
        yield from self.ping_rtt.collect()
        yield from self.broker_calls.latency.collect()
        yield from self.broker_calls.errors.collect()


class _Live:
    """A single node's collector: the plain counters read as they are now."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        app = self.metrics.app
        for family in FAMILIES:
            reading = family.read(app)
            cls = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
            if family.label:
                assert isinstance(reading, Mapping)
                labelled = cls(family.name, family.help, labels=[family.label])
                for value, n in reading.items():
                    labelled.add_metric([value], n)
                yield labelled
            else:
                assert not isinstance(reading, Mapping)
                yield cls(family.name, family.help, value=reading)
        for metric in self.metrics.histograms():
            # A single process's Counter and Histogram add a ``_created``
            # series each; the group's files have none, so neither has this.
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class _Synced:
    """A worker's plain counters, copied into prometheus_client's per-process files.

    Counters are raised by what was counted since the last copy; gauges are
    set, and summed over the live workers when scraped.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self._metrics: dict[str, Counter | Gauge] = {}
        for family in FAMILIES:
            labels = [family.label] if family.label else []
            if family.kind == "counter":
                self._metrics[family.name] = Counter(
                    family.name, family.help, labels, registry=None
                )
            else:
                self._metrics[family.name] = Gauge(
                    family.name, family.help, labels, registry=None, multiprocess_mode="livesum"
                )
        self._copied: dict[tuple[str, str], float] = {}

    def sync(self) -> None:
        for family in FAMILIES:
            metric = self._metrics[family.name]
            reading = family.read(self.app)
            if isinstance(reading, Mapping):
                for value, n in reading.items():
                    self._put(family, metric.labels(value), value, n)
            else:
                self._put(family, metric, "", reading)

    def _put(self, family: Family, metric: Counter | Gauge, label: str, value: float) -> None:
        if isinstance(metric, Gauge):
            metric.set(value)
            return
        key = (family.name, label)
        more = value - self._copied.get(key, 0)
        if more > 0:
            metric.inc(more)
            self._copied[key] = value
        elif key not in self._copied:
            metric.inc(0)  # the series exists from the start, at 0
            self._copied[key] = value
