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
