"""The benchmark suite: every scenario against fastws and its peers, side by side.

    python -m benchmarks                      # everything (make bench), ~30 minutes
    python -m benchmarks broadcast-1k echo-16 # some scenarios
    python -m benchmarks --servers fastws,picows --repeat 1
    python -m benchmarks --list               # the scenarios and their targets

Each run starts a fresh server pinned to one CPU and the load generator
pinned to another, measures, and stops the server. Each (scenario, server)
is run --repeat times and the median reported. Results: a Markdown table on
stdout; JSON, Markdown and PNG plots in --output (benchmarks/results/);
progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import _proc, _report
from benchmarks._servers import CLUSTER, ROOT, BenchError, run_load, running
from benchmarks.scenarios import ALL, BY_NAME, SCENARIOS, Scenario, load_flags

RESULTS = ROOT / "benchmarks" / "results"
GENERATOR_BUSY = 0.90  # above this share of its core the generator may be the bottleneck
OTHER_LOAD = 0.10  # CPU share used by anything else during a run worth a warning
PROBLEM_KEYS = ("lost_after_drain", "seq_errors", "disconnects", "failures", "bad_responses")


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="default: all")
    p.add_argument("--servers", default=",".join(ALL), help="comma-separated (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="runs per server; the median counts")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for other load on the machine to stop before starting",
    )
    p.add_argument(
        "--subscribers",
        type=int,
        default=None,
        metavar="N",
        help="N subscribers in every scenario that has them instead of its own (quick checks)",
    )
    p.add_argument("--output", type=Path, default=RESULTS, help="where results go")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = p.parse_args()
    unknown = [s for s in args.scenarios if s not in BY_NAME]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {sorted(BY_NAME)}")
    args.servers = [s for s in args.servers.split(",") if s]
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def list_scenarios() -> None:
    width = max(len(s.name) for s in SCENARIOS)
    for s in SCENARIOS:
        print(f"{s.name:{width}} {s.title}")
        for t in s.targets:
            print(f"{'':{width}}   target: {t.text}")


def servers_of(scenario: Scenario, wanted: list[str]) -> list[str]:
    """The servers a scenario runs against; fastws variants follow --servers' fastws."""
    return [s for s in scenario.servers if s.split("+")[0] in wanted]


def run_once(
    scenario: Scenario,
    server: str,
    rep: int,
    args: argparse.Namespace,
    cpus: tuple[int | None, int | None],
) -> dict[str, Any]:
    """One run on a fresh server: the generator's figures, or the error that stopped it."""
    log_path = args.output / "logs" / f"{scenario.name}-{server}-{rep}.log"
    flags = {**load_flags(scenario, server), "duration": args.duration, "warmup": args.warmup}
    if args.subscribers is not None and "subscribers" in flags:
        flags["subscribers"] = args.subscribers
    argv = [f"--{k}" if v is True else f"--{k}={v}" for k, v in flags.items() if v is not False]
    run: dict[str, Any] = {"error": None, "server_log": [], "exit_note": ""}
    try:
        with running(server, scenario.echo, cpus[0], log_path) as srv:
            run["figures"] = run_load(scenario.mode, srv, cpus[1], argv, scenario.timeout)
        run["exit_note"] = srv.exit_note
        run["server_log"] = srv.log_lines()[:20]
    except BenchError as exc:
        run["error"] = str(exc)
    return run


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median over the runs that produced it; lists from the median run."""
    figures = [r["figures"] for r in runs if "figures" in r]
    if not figures:
        return {}
    out: dict[str, Any] = {}
    for key, value in figures[0].items():
        values = [f[key] for f in figures if isinstance(f.get(key), int | float)]
        if isinstance(value, bool) or not values:
            out[key] = value
        else:
            out[key] = statistics.median(values)
    order = sorted(figures, key=lambda f: f.get("ops_per_s") or f.get("kb_per_connection") or 0)
    middle = order[len(order) // 2]
    out.update({k: v for k, v in middle.items() if isinstance(v, list)})
    out["runs"] = len(figures)
    return out


def generator_load(f: dict[str, Any]) -> float:
    """How busy the generator's core was: its process, or its core, whichever is more."""
    return max(f.get("generator_cpu_share") or 0.0, f.get("generator_core_busy") or 0.0)


def findings(scenario: Scenario, server: str, runs: list[dict[str, Any]]) -> list[str]:
    """Everything odd a reader should know before trusting the figures."""
    notes = []
    for i, run in enumerate(runs, 1):
        tag = f"{scenario.name} {server} #{i}"
        if run["error"]:
            notes.append(f"{tag}: {run['error']}")
        if run["exit_note"]:
            notes.append(f"{tag}: server {run['exit_note']}")
        if run["server_log"]:
            notes.append(f"{tag}: server logged: {run['server_log'][0][:200]}")
        f = run.get("figures")
        if not f:
            continue
        if generator_load(f) > GENERATOR_BUSY:
            notes.append(
                f"{tag}: load generator's core {generator_load(f):.0%} busy: it may be the "
                "bottleneck, so throughput is a lower bound; compare CPU per operation"
            )
        if (f.get("other_cpu_share") or 0) > OTHER_LOAD:
            notes.append(f"{tag}: other processes used {f['other_cpu_share']:.0%} of a core")
        for key in PROBLEM_KEYS:
            if f.get(key):
                notes.append(f"{tag}: {key} = {f[key]}")
        if f.get("lost_after_drain") and f["mode"] == "fanout":
            notes.append(
                f"{tag}: the deliveries above were still missing when the wait for the "
                "backlog ended (up to 60 s): dropped by the server, or too slow to drain"
            )
        if f.get("server_error_replies"):
            notes.append(f"{tag}: server error replies: {f['server_error_replies'][:3]}")
    return notes


def sharing_note(cpus: tuple[int | None, int | None]) -> str:
    """What shares a core in the cross-node runs: the reader must know to trust them."""
    if cpus[0] is None:
        return f"{CLUSTER}: fewer than 2 CPUs, so nothing was pinned; figures are rough"
    return (
        f"{CLUSTER}: node A, node B and redis-server are all pinned to CPU {cpus[0]}, the "
        f"core that the single memory node has to itself, so both get one core of server "
        f"work; the load generator is alone on CPU {cpus[1]}. CPU is read per process from "
        "/proc (nodes in µs/op, Redis apart); a publication goes A -> Redis -> B through "
        "context switches on that one core, which its latency includes"
    )


def machine(available: list[int], cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    packages = (
        "fastws",
        "picows",
        "uvloop",
        "orjson",
        "websockets",
        "aiohttp",
        "python-socketio",
    )
    return {
        "cpus": available,
        "server_cpu": cpus[0],
        "generator_cpu": cpus[1],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in packages},
    }


def wait_for_quiet(seconds: float) -> float:
    """Wait up to `seconds` for other load to stop; returns the share of a core still busy."""
    busy = background_load()
    deadline = time.monotonic() + seconds
    while busy > OTHER_LOAD and time.monotonic() < deadline:
        progress(f"waiting for a quiet machine: {busy:.0%} of a core busy")
        busy = background_load(4.0)
    return busy


def background_load(seconds: float = 1.0) -> float:
    before = _proc.cpu_stats()["cpu"].busy
    time.sleep(seconds)
    return (_proc.cpu_stats()["cpu"].busy - before) / seconds


def setup() -> tuple[list[int], tuple[int | None, int | None]]:
    """Signals, fd limit and pinning; returns the usable CPUs and (server, generator)."""
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops its subprocess.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _proc.raise_nofile_limit()
    available = _proc.usable_cpus()
    cpus = (available[0], available[1]) if len(available) >= 2 else (None, None)
    _proc.pin(cpus[1])  # the driver mostly sleeps; keep it off the server's core
    return available, cpus


def summary_line(server: str, f: dict[str, Any]) -> str:
    if "kb_per_connection" in f:
        return f"{server}: {f['kb_per_connection']:.1f} KB per idle connection"
    line = (
        f"{server}: {f['ops_per_s']:,.0f} ops/s, {f['server_us_per_op']:.2f} us/op server CPU, "
        f"generator core {generator_load(f):.0%}"
    )
    if "p50_us" in f:
        line += f", p50 {f['p50_us']:.0f} us, p99 {f['p99_us']:.0f} us"
    return line


def main() -> int:
    args = parse_args()
    if args.list:
        list_scenarios()
        return 0
    available, cpus = setup()
    scenarios = [BY_NAME[n] for n in args.scenarios] if args.scenarios else SCENARIOS
    plan = [(s, server) for s in scenarios for server in servers_of(s, args.servers)]
    total = len(plan) * args.repeat
    progress(
        f"{len(scenarios)} scenario(s), {total} runs; server on CPU {cpus[0]}, "
        f"generator on CPU {cpus[1]}"
    )
    busy_before = wait_for_quiet(args.wait_quiet)
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    done = 0
    for scenario, server in plan:
        runs = []
        for rep in range(1, args.repeat + 1):
            done += 1
            progress(f"[{done}/{total}] {scenario.name}: {server} #{rep}")
            run = run_once(scenario, server, rep, args, cpus)
            if run["error"]:
                progress(f"  FAILED: {run['error']}")
            else:
                progress(f"  {summary_line(server, run['figures'])}")
            runs.append(run)
        entry = results.setdefault(
            scenario.name, {"title": scenario.title, "keys": list(scenario.keys), "servers": {}}
        )
        entry["servers"][server] = {"median": median(runs), "runs": runs}
        notes = entry.setdefault("notes", [])
        if server == CLUSTER:
            notes.append(sharing_note(cpus))
        notes.extend(findings(scenario, server, runs))

    for scenario in scenarios:
        entry = results[scenario.name]
        medians = {name: s["median"] for name, s in entry["servers"].items()}
        entry["targets"] = [
            dict(zip(("target", "figure", "met"), (t.text, *t.check(medians)), strict=True))
            for t in scenario.targets
        ]
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(time.monotonic() - t0, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**machine(available, cpus), "busy_before_start": busy_before},
        "scenarios": results,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "suite.json").write_text(json.dumps(document, indent=2) + "\n")
    markdown = _report.markdown(document)
    (args.output / "suite.md").write_text(markdown)
    plots = _report.plots(document, args.output)
    print(markdown)
    progress(f"done in {document['wall_s']} s; results and {len(plots)} plot(s) in {args.output}")
    failed = any(
        run["error"] for e in results.values() for s in e["servers"].values() for run in s["runs"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
