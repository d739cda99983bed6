"""The benchmark suite runs end to end: real servers, the real load generator,
and it writes what it promises (JSON, Markdown, plots).

Figures are not judged here (performance is never asserted in a test); the
runs are cut to a fraction of a second so the check stays cheap, and every
load mode, both dialects and the fastws echo example are exercised.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_the_suite_runs_every_mode_and_writes_its_results(tmp_path: Path) -> None:
    scenarios = ["broadcast-100", "latency", "echo-16", "roundtrip", "churn", "compression"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            *scenarios,
            "--servers",
            "fastws,picows,socketio",
            "--repeat",
            "1",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--output",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "suite.json").read_text())
    for name in scenarios:
        servers = doc["scenarios"][name]["servers"]
        for server, result in servers.items():
            figures = result["median"]
            assert figures, f"{name} {server}: no figures"
            assert figures["ops"] > 0, f"{name} {server}: {figures}"
            assert not figures.get("lost_after_drain"), f"{name} {server} lost: {figures}"
            assert not figures.get("seq_errors"), f"{name} {server} reordered: {figures}"
    assert set(doc["scenarios"]["broadcast-100"]["servers"]) == {"fastws", "picows", "socketio"}
    assert set(doc["scenarios"]["compression"]["servers"]) == {"fastws", "fastws+deflate"}
    deflated = doc["scenarios"]["compression"]["servers"]["fastws+deflate"]["median"]
    assert deflated["compressed_share"] == 1.0
    markdown = (tmp_path / "suite.md").read_text()
    assert "## Targets" in markdown and "## echo-16" in markdown
    assert markdown in proc.stdout
    for plot in ("broadcast.png", "latency.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(240)
def test_the_cross_node_scenarios_run_two_nodes_on_a_redis_beside_one_memory_node(
    tmp_path: Path,
) -> None:
    """Two `fastws serve --redis` nodes on a redis-server the suite starts, against
    one memory node: the report has the figures the cross-node section is made of."""
    scenarios = ["cross-node-16", "cross-node-latency"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            *scenarios,
            "--subscribers",
            "40",
            "--repeat",
            "1",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--output",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "suite.json").read_text())
    for name in scenarios:
        entry = doc["scenarios"][name]
        assert set(entry["servers"]) == {"fastws", "fastws+redis"}
        memory = entry["servers"]["fastws"]["median"]
        redis = entry["servers"]["fastws+redis"]["median"]
        for figures in (memory, redis):
            assert figures["ops"] > 0, f"{name}: {figures}"
            assert not figures.get("lost_after_drain"), f"{name} lost: {figures}"
            assert not figures.get("seq_errors"), f"{name} reordered: {figures}"
            assert figures["publications_per_s"] > 0
        # Subscribers spread over both nodes, each node's CPU and Redis's apart.
        assert memory["subscribers_per_node"] == [40]
        assert redis["subscribers_per_node"] == [20, 20]
        assert "redis_us_per_op" not in memory
        # CPU is read in clock ticks (10 ms): a node of this short a run may
        # show none, so the figures are checked for being there, not for size.
        for key in ("server_us_per_op", "node_a_us_per_op", "node_b_us_per_op"):
            assert redis[key] >= 0, key
        assert redis["redis_us_per_op"] is not None
        [target] = entry["targets"]
        assert target["figure"] == redis["server_us_per_op"] / memory["server_us_per_op"]
        assert any("redis-server are all pinned" in note for note in entry["notes"])
    assert (
        doc["scenarios"]["cross-node-16"]["servers"]["fastws+redis"]["median"]["publishers"] == 16
    )
    latency = doc["scenarios"]["cross-node-latency"]["servers"]["fastws+redis"]["median"]
    assert latency["p50_us"] > 0 and latency["node_a_p50_us"] > 0  # node B's, and A's
    markdown = (tmp_path / "suite.md").read_text()
    assert "## cross-node-latency" in markdown and "Redis CPU µs/op" in markdown
    for log in ("redis", "a", "b"):
        assert (tmp_path / "logs" / f"cross-node-16-fastws+redis-1-{log}.log").exists()
