"""Brokers carry publications between nodes and number them; see base.Broker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastws.brokers.base import Broker
from fastws.brokers.memory import MemoryBroker

if TYPE_CHECKING:
    from fastws.config import Config
    from fastws.namespaces import Namespaces

__all__ = ["Broker", "MemoryBroker", "make_broker"]


def make_broker(config: Config, options: Namespaces) -> Broker:
    """The broker the config asks for: Redis when ``redis`` is set, Redis Cluster
    when ``redis_cluster`` is, else the memory one.

    The Redis brokers are imported only then, so that fastws runs without the
    ``redis`` extra installed.
    """
    if config.redis:
        from fastws.brokers.redis import RedisBroker

        return RedisBroker(config.redis, options, options.shortest_ttl())
    if config.redis_cluster:
        from fastws.brokers.cluster import ClusterBroker

        return ClusterBroker(config.redis_cluster, options, options.shortest_ttl())
    return MemoryBroker(options, options.shortest_ttl())
