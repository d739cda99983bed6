"""Prometheus exposition of a node's counters.

The hot path only bumps plain integers (``App.stats`` in Python, the hub's
counters in the core); this collector reads them when /metrics is scraped,
so counting costs nothing per message beyond an integer add.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from fastws.app import App

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REFUSAL_REASONS = (
    "max_connections",
    "max_connections_per_ip",
    "draining",
    "origin",
    "unauthorized",
)


class AppCollector:
    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app, stats, hub = self.app, self.app.stats, self.app.hub
        yield GaugeMetricFamily(
            "fastws_connections_open", "WebSocket connections open now.", len(app.connections)
        )
        yield GaugeMetricFamily(
            "fastws_channels",
            "Channels with at least one subscriber on this node.",
            len(hub.channel_names()),
        )
        yield GaugeMetricFamily(
            "fastws_tasks", "asyncio tasks alive in this process.", len(asyncio.all_tasks())
        )
        refused = CounterMetricFamily(
            "fastws_connections_refused",
            "WebSocket upgrades refused, by reason.",
            labels=["reason"],
        )
        for reason in REFUSAL_REASONS:
            refused.add_metric([reason], stats.refused[reason])
        yield refused
        counters = (
            ("fastws_connections_accepted", "WebSocket upgrades accepted.", stats.accepted),
            ("fastws_messages_in", "Whole messages received from clients.", stats.messages_in),
            (
                "fastws_messages_out",
                "Frames queued to clients, publications included.",
                hub.frames_out,
            ),
            ("fastws_deliveries", "Publications queued to a subscriber.", hub.deliveries),
            ("fastws_bytes_out", "Bytes handed to client transports.", hub.bytes_out),
            ("fastws_command_errors", "Commands answered with an error.", stats.command_errors),
            (
                "fastws_protocol_errors",
                "Connections failed for a WebSocket protocol violation.",
                stats.protocol_errors,
            ),
            (
                "fastws_handler_errors",
                "Unexpected errors in a connection's handler (closed 1011).",
                stats.handler_errors,
            ),
            ("fastws_rate_limited", "Commands refused with limit_exceeded.", stats.rate_limited),
            (
                "fastws_policy_closes",
                "Connections closed with 1008 for floods or bad commands.",
                stats.policy_closes,
            ),
            (
                "fastws_slow_consumer_closes",
                "Connections closed with 1013 as slow consumers.",
                stats.slow_consumers,
            ),
            (
                "fastws_token_expiry_closes",
                "Connections closed with 1008 when their token expired.",
                stats.token_expired,
            ),
            ("fastws_pings_sent", "Keepalive pings sent to quiet connections.", stats.pings_sent),
            (
                "fastws_ping_timeouts",
                "Connections cut for not answering a ping.",
                stats.ping_timeouts,
            ),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value)


def registry_for(app: App) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(app))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
