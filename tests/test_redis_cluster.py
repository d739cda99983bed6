"""fastws on a real Redis Cluster of three masters (tests/rediscluster.py)."""

from __future__ import annotations

from typing import Any

from rediscluster import SLOTS, channel_slot, slot_of


def test_the_test_cluster_has_three_masters_sharing_every_slot(redis_cluster_nodes: Any) -> None:
    cluster = redis_cluster_nodes
    slot_map = cluster.slot_map(cluster.ports[0])
    assert {port for *_, port in slot_map} == set(cluster.ports) and len(cluster.ports) == 3
    assert sum(hi - lo + 1 for lo, hi, _ in slot_map) == SLOTS
    assert all(cluster.slot_map(port) == slot_map for port in cluster.ports)
    # A channel's keys and its pub/sub channel share the hash tag, so one slot.
    for key in ("seq", "epoch", "stream", "presence"):
        assert slot_of(f"fastws:{{news}}:{key}") == channel_slot("news")
