"""Fanout benchmark: fastws against a plain picows broadcast server.

For each server, one after the other (never both at once), on a fresh
process each time:

1. fanout: S subscribers on one channel, one publisher keeping a window of
   publications outstanding; deliveries/s and the server's CPU per delivery
   over a fixed window after a warm-up;
2. idle: RSS growth of the server per idle, subscribed connection.

The server is pinned to one CPU and the load generator to another, so
"server CPU per delivery" is the server's alone, and the generator's own CPU
share is reported: above 90 % it may be what limits the throughput.

Run from the repository root:  python -m benchmarks.fanout [--only picows]
Results: a table on stdout, benchmarks/results/fanout.json; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import _proc
from benchmarks._servers import ROOT, SERVERS, BenchError, ServerSpec, run_load, running_server

RESULTS = ROOT / "benchmarks" / "results"
GENERATOR_BUSY = 0.90  # above this share of its core the generator may be the bottleneck
OTHER_LOAD = 0.10  # CPU share used by anything else during the window worth a warning
SERVER_SATURATED = 0.90  # a server core less busy than this was not the limit


def progress(msg: str) -> None:
    print(f"[fanout] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fanout", description=__doc__.splitlines()[0]
    )
    p.add_argument("--subscribers", type=int, default=1000, help="subscribers in the fanout run")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument("--payload-size", type=int, default=64, help="bytes of data per publication")
    p.add_argument("--window", type=int, default=64, help="max publications outstanding")
    p.add_argument("--idle-connections", type=int, default=10000)
    p.add_argument("--repeat", type=int, default=1, help="runs per server; the median is reported")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for other load on the machine to stop before starting",
    )
    p.add_argument("--only", choices=sorted(SERVERS), help="benchmark one server only")
    p.add_argument("--output", type=Path, default=RESULTS / "fanout.json")
    args = p.parse_args()
    if args.subscribers < 1 or args.idle_connections < 1 or args.repeat < 1 or args.window < 1:
        p.error("--subscribers, --idle-connections, --repeat and --window must be >= 1")
    return args


def one_round(
    name: str, rep: int, args: argparse.Namespace, cpus: tuple[int | None, int | None]
) -> dict[str, Any]:
    """One fanout run and one idle run of `name`, each on its own fresh server."""
    fanout = {
        "subscribers": args.subscribers,
        "duration": args.duration,
        "warmup": args.warmup,
        "payload-size": args.payload_size,
        "window": args.window,
    }
    phases = [  # (mode, generator flags, generator timeout)
        ("fanout", fanout, args.warmup + args.duration + 90),
        ("idle", {"connections": args.idle_connections}, 60 + args.idle_connections / 100),
    ]
    return run_phases(name, SERVERS[name], rep, phases, cpus)


Phase = tuple[str, dict[str, Any], float]  # (generator mode, generator flags, timeout)


def run_phases(
    name: str,
    spec: ServerSpec,
    rep: int,
    phases: list[Phase],
    cpus: tuple[int | None, int | None],
    log: Callable[[str], None] = progress,
) -> dict[str, Any]:
    """Each phase against its own fresh server; a True flag is passed bare, a False one not."""
    out: dict[str, Any] = {"errors": [], "server_log": [], "exit_notes": []}
    for phase, flags, timeout in phases:
        log_path = RESULTS / "logs" / f"{name}-{phase}-{rep}.log"
        server = None
        try:
            with running_server(spec, cpus[0], log_path) as server:
                log(
                    f"{name} #{rep} {phase}: server pid {server.proc.pid} on port "
                    f"{server.port}, ready in {server.startup_s:.1f} s"
                )
                load_args = [
                    f"--{k}" if v is True else f"--{k}={v}"
                    for k, v in flags.items()
                    if v is not False
                ]
                out[phase] = run_load(phase, server, cpus[1], load_args, timeout)
                summarize(name, phase, out[phase], log)
        except BenchError as exc:
            log(f"{name} #{rep} {phase} FAILED: {exc}")
            out["errors"].append(f"{phase}: {exc}")
        if server is not None:
            if server.exit_note:
                out["exit_notes"].append(f"{phase}: {server.exit_note}")
            out["server_log"] += [f"{phase}: {ln}" for ln in server.log_lines()[:20]]
    return out


def summarize(
    name: str, phase: str, r: dict[str, Any], log: Callable[[str], None] = progress
) -> None:
    if phase == "fanout":
        log(
            f"{name} fanout: {r['deliveries_per_s']:,.0f} deliveries/s, "
            f"{r['server_us_per_delivery']:.2f} us/delivery (process), "
            f"{fmt(r['server_core_us_per_delivery'], '.2f')} (core); server process "
            f"{r['server_cpu_share']:.0%}, core {fmt(r['server_core_busy'], '.0%')}; generator "
            f"process {r['generator_cpu_share']:.0%}, core {fmt(r['generator_core_busy'], '.0%')}; "
            f"other {r['other_cpu_share']:.0%}"
        )
    else:
        log(
            f"{name} idle: {r['kb_per_connection']:.1f} KB/connection "
            f"({r['connections']} connected in {r['connect_s']:.1f} s)"
        )


def median_of(runs: list[dict[str, Any]], phase: str, key: str) -> float | None:
    values = [r[phase][key] for r in runs if phase in r and r[phase].get(key) is not None]
    return statistics.median(values) if values else None


FANOUT_KEYS = (
    "deliveries_per_s",
    "server_us_per_delivery",
    "server_core_us_per_delivery",
    "server_cpu_share",
    "server_core_busy",
    "generator_cpu_share",
    "generator_core_busy",
    "other_cpu_share",
)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    m = {key: median_of(runs, "fanout", key) for key in FANOUT_KEYS}
    m["kb_per_idle_connection"] = median_of(runs, "idle", "kb_per_connection")
    return m


def generator_load(m: dict[str, Any]) -> float:
    """How busy the generator's core was: its process, or softirq on its core, whichever is more."""
    return max(m["generator_cpu_share"] or 0.0, m["generator_core_busy"] or 0.0)


def server_load(m: dict[str, Any]) -> float:
    """Whether the server's core was saturated: the pinned core's busy share when known."""
    core = m["server_core_busy"]
    return float(core if core is not None else m["server_cpu_share"] or 0.0)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def findings(results: dict[str, Any]) -> list[str]:
    """Everything odd a reader should know before trusting the figures."""
    notes = []
    for name, res in results.items():
        for i, run in enumerate(res["runs"], 1):
            tag = f"{name} #{i}"
            notes += [f"{tag}: {e}" for e in run["errors"]]
            notes += [f"{tag}: server {n}" for n in run["exit_notes"]]
            if run["server_log"]:
                notes.append(
                    f"{tag}: server printed {len(run['server_log'])} log line(s), "
                    f"first: {run['server_log'][0][:200]}"
                )
            f = run.get("fanout")
            if f:
                notes += fanout_findings(tag, f)
            idle = run.get("idle")
            if idle and idle["disconnects"]:
                notes.append(f"{tag}: idle disconnects = {idle['disconnects']}")
    return notes


def fanout_findings(tag: str, f: dict[str, Any]) -> list[str]:
    notes = []
    if generator_load(f) > GENERATOR_BUSY:
        notes.append(
            f"{tag}: generator core at {generator_load(f):.0%} (process "
            f"{f['generator_cpu_share']:.0%}): the generator may be the bottleneck, "
            "so deliveries/s is a lower bound"
        )
    if server_load(f) < SERVER_SATURATED:
        notes.append(
            f"{tag}: server core only {server_load(f):.0%} busy: the server was not saturated"
        )
    if f["other_cpu_share"] > OTHER_LOAD:
        notes.append(
            f"{tag}: other processes used {f['other_cpu_share']:.0%} of a core "
            "during the window: the figures may be disturbed"
        )
    for key in ("lost_after_drain", "seq_errors", "disconnects"):
        if f[key]:
            notes.append(f"{tag}: fanout {key} = {f[key]}")
    if f["server_error_replies"]:
        notes.append(f"{tag}: server error replies: {f['server_error_replies'][:3]}")
    if f["server_processes"] != 1:
        notes.append(f"{tag}: server is {f['server_processes']} processes (summed)")
    return notes


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, Any], ratios: dict[str, float | None]) -> str:
    widths = (8, 13, 14, 14, 12, 15, 13)

    def line(*cells: str) -> str:
        aligned = [f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)]
        aligned[0] = f"{cells[0]:<{widths[0]}}"
        return " ".join(aligned)

    head = line(
        "server",
        "deliveries/s",
        "us/deliv proc",
        "us/deliv core",
        "server core",
        "gen proc/core",
        "KB/idle conn",
    )
    rows = [head, "-" * len(head)]
    for name, res in results.items():
        m = res["median"]
        busy = "!" if generator_load(m) > GENERATOR_BUSY else " "
        gen = f"{fmt(m['generator_cpu_share'], '.0%')}/{fmt(m['generator_core_busy'], '.0%')}"
        rows.append(
            line(
                name,
                fmt(m["deliveries_per_s"], ",.0f"),
                fmt(m["server_us_per_delivery"], ".2f"),
                fmt(m["server_core_us_per_delivery"], ".2f"),
                fmt(m["server_core_busy"], ".0%"),
                gen + busy,
                fmt(m["kb_per_idle_connection"], ".1f"),
            )
        )
    rows += [
        "",
        "us/deliv proc: server process utime+stime per delivery; core: its whole pinned core,",
        "softirq included (the loopback TCP work that the server's sends cause runs there).",
    ]
    if any(v is not None for v in ratios.values()):
        rows.append(
            f"fastws/picows: throughput x{fmt(ratios['throughput'], '.2f')}, "
            f"CPU per delivery x{fmt(ratios['cpu_per_delivery'], '.2f')} (process), "
            f"x{fmt(ratios['core_per_delivery'], '.2f')} (core), "
            f"memory per idle conn x{fmt(ratios['memory_per_connection'], '.2f')}"
        )
    if any(generator_load(r["median"]) > GENERATOR_BUSY for r in results.values()):
        rows.append(f"! generator core above {GENERATOR_BUSY:.0%}: it may be the bottleneck")
    return "\n".join(rows)


def wait_for_quiet(seconds: float, log: Callable[[str], None] = progress) -> float:
    """Wait up to `seconds` for other load to stop; returns the share of a core still busy."""
    idle_busy = background_load()
    deadline = time.monotonic() + seconds
    while idle_busy > OTHER_LOAD and time.monotonic() < deadline:
        log(f"waiting for a quiet machine: {idle_busy:.0%} of a core busy")
        idle_busy = background_load(4.0)
    if idle_busy > OTHER_LOAD:
        log(f"machine not quiet: {idle_busy:.0%} of a core busy before we start")
    return idle_busy


def background_load(seconds: float = 1.0) -> float:
    """Share of a core busy while we do nothing: is the machine quiet enough to measure?"""
    before = _proc.cpu_stats()["cpu"].busy
    time.sleep(seconds)
    return (_proc.cpu_stats()["cpu"].busy - before) / seconds


def machine(available: list[int], cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpus": available,
        "server_cpu": cpus[0],
        "generator_cpu": cpus[1],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("fastws", "picows", "uvloop", "orjson", "aiofastnet")},
    }


def setup() -> tuple[list[int], tuple[int | None, int | None]]:
    """Signals, fd limit and pinning for a driver; the usable CPUs and (server, generator)."""
    # SIGTERM unwinds like Ctrl-C, so every `finally` stops its subprocess.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _proc.raise_nofile_limit()
    available = _proc.usable_cpus()
    cpus: tuple[int | None, int | None] = (
        (available[0], available[1]) if len(available) >= 2 else (None, None)
    )
    _proc.pin(cpus[1])  # the driver mostly sleeps; keep it off the server's core
    return available, cpus


def main() -> int:
    args = parse_args()
    available, cpus = setup()
    names = [args.only] if args.only else ["fastws", "picows"]
    progress(
        f"servers {names}, {args.repeat} round(s); server on CPU {cpus[0]}, "
        f"generator on CPU {cpus[1]}"
    )

    idle_busy = wait_for_quiet(args.wait_quiet)

    t0 = time.monotonic()
    results: dict[str, Any] = {}
    for name in names:
        runs = [one_round(name, rep, args, cpus) for rep in range(1, args.repeat + 1)]
        results[name] = {"runs": runs, "median": summary(runs)}

    def compare(key: str) -> float | None:
        if "fastws" not in results or "picows" not in results:
            return None
        return ratio(results["fastws"]["median"][key], results["picows"]["median"][key])

    ratios = {
        "throughput": compare("deliveries_per_s"),
        "cpu_per_delivery": compare("server_us_per_delivery"),
        "core_per_delivery": compare("server_core_us_per_delivery"),
        "memory_per_connection": compare("kb_per_idle_connection"),
    }
    return report(
        "fanout",
        args,
        t0,
        machine(available, cpus),
        idle_busy,
        results,
        ratios,
        findings(results),
        table(results, ratios),
    )


def report(
    name: str,
    args: argparse.Namespace,
    t0: float,
    machine_info: dict[str, Any],
    idle_busy: float,
    results: dict[str, Any],
    ratios: dict[str, Any],
    notes: list[str],
    table_text: str,
) -> int:
    """Write the JSON results, print the table and notes; exit status 1 on errors."""
    if idle_busy > OTHER_LOAD:
        notes.insert(0, f"machine not quiet: {idle_busy:.0%} of a core busy before the run")
    document = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(time.monotonic() - t0, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**machine_info, "busy_before_start": idle_busy},
        "servers": results,
        "ratios": ratios,
        "notes": notes,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")

    print(table_text)
    if notes:
        print("\nnotes:")
        print("\n".join(f"- {n}" for n in notes))
    progress(f"done in {document['wall_s']} s; results in {args.output}")
    failed = any(run["errors"] for res in results.values() for run in res["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
