"""The scenarios of the suite, the servers each runs against, and the targets.

A scenario is one load-generator mode with its flags. Each runs against
fastws and the peers, one server at a time on a fresh process, and is
judged by a ratio to raw picows measured in the same run (absolute figures
drift on a shared machine; ratios much less).

`ops` is what the mode counts: deliveries for broadcast, echoed messages,
acknowledged publications, completed handshakes. Where the load generator
saturates its core, throughput is a lower bound for the faster server and
the server's CPU per operation is the figure that stays honest, so every
table shows both.

The cross-node scenarios compare fastws with the memory broker, one node,
against `fastws+redis`: two nodes sharing a redis-server, with the same
subscribers spread over both and the publisher on node A. Their target is
the cost of going through Redis: server CPU per delivery (both nodes') at
most 1.2x one memory node's, which holds only if Redis sends each node a
publication once, never once per subscriber. Redis's own CPU is reported
apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PEERS = ("picows", "websockets", "aiohttp", "socketio")
ALL = ("fastws", *PEERS)
CROSS_NODE = ("fastws", "fastws+redis")  # one memory node; two nodes sharing a Redis

Figures = dict[str, Any]  # a scenario's median figures, server -> key -> value


@dataclass(frozen=True)
class Target:
    """A goal from the performance issue, checked on the medians of one scenario."""

    text: str
    check: Callable[[Figures], tuple[float | None, bool | None]]  # (the figure, met?)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    mode: str  # the load generator's mode
    flags: dict[str, Any]
    servers: tuple[str, ...] = ALL
    echo: bool = False  # runs against each server's echo endpoint
    targets: tuple[Target, ...] = ()
    timeout: float = 120.0
    keys: tuple[str, ...] = field(default=())  # extra figures worth a column


def ratio(figures: Figures, key: str, a: str = "fastws", b: str = "picows") -> float | None:
    x, y = figures.get(a, {}).get(key), figures.get(b, {}).get(key)
    return x / y if x is not None and y else None


def at_least(key: str, bound: float, against: str = "picows") -> Callable[[Figures], Any]:
    def check(f: Figures) -> tuple[float | None, bool | None]:
        r = ratio(f, key, b=against)
        return r, None if r is None else r >= bound

    return check


def at_most(key: str, bound: float, server: str = "fastws") -> Callable[[Figures], Any]:
    def check(f: Figures) -> tuple[float | None, bool | None]:
        v = f.get(server, {}).get(key)
        return v, None if v is None else v <= bound

    return check


def at_most_relative(key: str, bound: float, a: str, b: str) -> Callable[[Figures], Any]:
    def check(f: Figures) -> tuple[float | None, bool | None]:
        r = ratio(f, key, a, b)
        return r, None if r is None else r <= bound

    return check


def broadcast(subscribers: int, label: str, targets: tuple[Target, ...] = ()) -> Scenario:
    return Scenario(
        f"broadcast-{label}",
        f"Broadcast, {subscribers:,} subscribers, 64-byte publications, 64 in flight",
        "fanout",
        {"subscribers": subscribers, "payload-size": 64, "window": 64},
        targets=targets,
        timeout=180 + subscribers / 50,
    )


def echo(inflight: int, bound: float) -> Scenario:
    return Scenario(
        f"echo-{inflight}",
        f"Echo, 50 connections, {inflight} message(s) in flight each, 64 bytes",
        "echo",
        {"connections": 50, "inflight": inflight, "payload-size": 64},
        echo=True,
        targets=(Target(f"messages/s >= {bound:g}x raw picows", at_least("ops_per_s", bound)),),
    )


def through_redis(bound: float) -> Target:
    return Target(
        f"server CPU per delivery through Redis (both nodes) <= {bound:g}x one memory node",
        at_most_relative("server_us_per_op", bound, "fastws+redis", "fastws"),
    )


def cross_node(publishers: int) -> Scenario:
    """Full speed through Redis: 64 publications in flight from node A, counted at node B.

    A node runs one connection's commands in order, so a single publishing
    connection has one publication crossing Redis at a time; with 16 they
    are 16 at once.
    """
    name = "cross-node" if publishers == 1 else f"cross-node-{publishers}"
    who = "one publisher" if publishers == 1 else f"{publishers} publisher connections"
    return Scenario(
        name,
        f"Cross-node at full speed: 1,000 subscribers over two nodes sharing a Redis; "
        f"{who} on node A, 64 publications of 64 bytes in flight (counted at node B); "
        "against one memory node",
        "fanout",
        {"subscribers": 1000, "payload-size": 64, "window": 64, "publishers": publishers},
        servers=CROSS_NODE,
        targets=(through_redis(1.2),),
        keys=("publications_per_s", "publications_per_read", "redis_us_per_op"),
    )


BROADCAST_TARGETS = (
    Target("deliveries/s >= 4x raw picows", at_least("ops_per_s", 4.0)),
    Target("server CPU per delivery <= 1.2 us", at_most("server_us_per_op", 1.2)),
)

SCENARIOS = [
    broadcast(100, "100"),
    broadcast(1000, "1k", BROADCAST_TARGETS),
    broadcast(10000, "10k", BROADCAST_TARGETS),
    Scenario(
        "latency",
        "Publish-to-deliver latency, 1,000 subscribers, 50 publications/s",
        "latency",
        {"subscribers": 1000, "rate": 50, "payload-size": 64},
        targets=(
            Target(
                "p50 no worse than raw picows", at_most_relative("p50_us", 1.0, "fastws", "picows")
            ),
            Target(
                "p99 no worse than raw picows", at_most_relative("p99_us", 1.0, "fastws", "picows")
            ),
        ),
        keys=("p50_us", "p99_us", "p999_us"),
    ),
    echo(16, 3.0),
    echo(1, 0.95),
    Scenario(
        "roundtrip",
        "Channel protocol round trip: pub acknowledged, 50 connections, 1 in flight",
        "roundtrip",
        {"connections": 50, "payload-size": 64},
        targets=(Target("round trips/s >= 0.8x raw picows", at_least("ops_per_s", 0.8)),),
    ),
    Scenario(
        "churn",
        "Connection churn: upgrade, greeting, close; 32 at a time",
        "churn",
        {"workers": 32},
        targets=(Target("handshakes/s >= 0.9x raw picows", at_least("ops_per_s", 0.9)),),
    ),
    Scenario(
        "memory",
        "Memory: RSS growth per idle subscribed connection, 10,000 connections",
        "idle",
        {"connections": 10000},
        targets=(
            Target("<= 8 KB per idle subscribed connection", at_most("kb_per_connection", 8)),
        ),
        timeout=300,
    ),
    Scenario(
        "compression",
        "Compressed fanout: 1,000 subscribers, ~1.2 KB JSON, permessage-deflate on and off",
        "fanout",
        {"subscribers": 1000, "data": "records", "window": 64},
        servers=("fastws", "fastws+deflate"),
        targets=(
            Target(
                "CPU per delivery with deflate <= 1.3x without",
                at_most_relative("server_us_per_op", 1.3, "fastws+deflate", "fastws"),
            ),
        ),
        keys=("wire_bytes_per_delivery",),
    ),
    cross_node(1),
    cross_node(16),
    Scenario(
        "cross-node-latency",
        "Cross-node at 50 publications/s on node A: 1,000 subscribers over two nodes "
        "sharing a Redis, latency at node B; one memory node",
        "latency",
        {"subscribers": 1000, "rate": 50, "payload-size": 64},
        servers=CROSS_NODE,
        targets=(through_redis(1.2),),
        keys=("redis_us_per_op", "p50_us", "p99_us", "node_a_p50_us", "node_a_p99_us"),
    ),
]

BY_NAME = {s.name: s for s in SCENARIOS}


def load_flags(scenario: Scenario, server: str) -> dict[str, Any]:
    """The generator's flags for one server: deflate-enabled servers get offers."""
    flags = dict(scenario.flags)
    if server.endswith("+deflate"):
        flags["deflate"] = True
    return flags
