"""Brokers carry publications between nodes and number them; see base.Broker."""

from fastws.brokers.base import Broker
from fastws.brokers.memory import MemoryBroker

__all__ = ["Broker", "MemoryBroker"]
