"""Prometheus exposition of a node's counters.

The hot path only bumps plain integers (``App.stats`` in Python, the hub's
counters in the core); this collector reads them when /metrics is scraped,
so counting costs nothing per message beyond an integer add.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from fastws.app import App

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value)


def registry_for(app: App) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(app))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
