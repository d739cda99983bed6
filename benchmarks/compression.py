"""Compression benchmark: fastws without and with permessage-deflate, same load.

For each variant, on a fresh fastws process each time (the fanout benchmark's
machinery, see fanout.py):

1. fanout: S subscribers on one channel and a publisher keeping a window of
   ~1.2 KB JSON publications outstanding (15 records whose ids, prices and
   timestamps change from one publication to the next); in the deflate run
   the node has --compression and every subscriber negotiates
   permessage-deflate, so the node compresses each publication once for all;
2. idle: RSS growth per idle subscribed connection, negotiating deflate or not.

The key figure is the ratio of server CPU per delivery, deflate over plain.

Run from the repository root:  python -m benchmarks.compression
Results: a table on stdout, benchmarks/results/compression.json; progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import fanout
from benchmarks._servers import ServerSpec, fastws_spec

CPU_TARGET = 1.3  # deflate/plain server CPU per delivery we aim to stay under
EXTRA_KEYS = ("message_bytes_per_delivery", "wire_bytes_per_delivery", "compressed_share")


def progress(msg: str) -> None:
    print(f"[compression] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compression", description=__doc__.splitlines()[0]
    )
    p.add_argument("--subscribers", type=int, default=1000, help="subscribers in the fanout run")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument("--records", type=int, default=15, help="records per publication (~75 B each)")
    p.add_argument("--window", type=int, default=64, help="max publications outstanding")
    p.add_argument("--idle-connections", type=int, default=10000)
    p.add_argument("--compression-level", type=int, help="zlib level (default: the node's)")
    p.add_argument("--repeat", type=int, default=1, help="runs per variant; the median is reported")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for other load on the machine to stop before starting",
    )
    p.add_argument("--output", type=Path, default=fanout.RESULTS / "compression.json")
    args = p.parse_args()
    if min(args.subscribers, args.idle_connections, args.repeat, args.window, args.records) < 1:
        p.error("--subscribers, --idle-connections, --repeat, --window, --records must be >= 1")
    return args


def variants(args: argparse.Namespace) -> dict[str, tuple[ServerSpec, bool]]:
    """name: (server, whether clients offer permessage-deflate)."""
    extra = ["--compression"]
    if args.compression_level is not None:
        extra += ["--compression-level", str(args.compression_level)]
    return {
        "plain": (fastws_spec(name="fastws-plain"), False),
        "deflate": (fastws_spec(*extra, name="fastws-deflate"), True),
    }


def one_round(
    name: str,
    spec: ServerSpec,
    deflate: bool,
    rep: int,
    args: argparse.Namespace,
    cpus: tuple[int | None, int | None],
) -> dict[str, Any]:
    load = {
        "subscribers": args.subscribers,
        "duration": args.duration,
        "warmup": args.warmup,
        "data": "records",
        "records": args.records,
        "window": args.window,
        "deflate": deflate,
    }
    idle = {"connections": args.idle_connections, "deflate": deflate}
    phases: list[fanout.Phase] = [
        ("fanout", load, args.warmup + args.duration + 90),
        ("idle", idle, 60 + args.idle_connections / 100),
    ]
    run = fanout.run_phases(spec.name, spec, rep, phases, cpus, progress)
    f = run.get("fanout")
    if f:
        progress(
            f"{spec.name}: {f['message_bytes_per_delivery']:.0f} B message, "
            f"{f['wire_bytes_per_delivery']:.0f} B on the wire per delivery, "
            f"{f['compressed_share']:.0%} of frames compressed"
        )
    return run


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    m = fanout.summary(runs)
    m.update({key: fanout.median_of(runs, "fanout", key) for key in EXTRA_KEYS})
    return m


def compare(results: dict[str, Any]) -> dict[str, float | None]:
    """deflate over plain; for memory the difference too, since plain's share is most of it."""
    plain, deflate = results["plain"]["median"], results["deflate"]["median"]

    def r(key: str) -> float | None:
        return fanout.ratio(deflate[key], plain[key])

    kb = (plain["kb_per_idle_connection"], deflate["kb_per_idle_connection"])
    return {
        "throughput": r("deliveries_per_s"),
        "cpu_per_delivery": r("server_us_per_delivery"),
        "core_per_delivery": r("server_core_us_per_delivery"),
        "wire_bytes_per_delivery": r("wire_bytes_per_delivery"),
        "memory_per_connection": r("kb_per_idle_connection"),
        "extra_kb_per_idle_connection": kb[1] - kb[0] if None not in kb else None,
    }


def findings(results: dict[str, Any], ratios: dict[str, float | None]) -> list[str]:
    """fanout's notes, plus whether each run compressed exactly when it should have."""
    notes = fanout.findings(results)
    for name, res in results.items():
        want = name == "deflate"
        for i, run in enumerate(res["runs"], 1):
            for phase, total in (("fanout", "subscribers"), ("idle", "connections")):
                r = run.get(phase)
                if r and r["deflate_negotiated"] != (r[total] if want else 0):
                    notes.append(
                        f"{name} #{i} {phase}: {r['deflate_negotiated']} of {r[total]} "
                        "connections negotiated permessage-deflate"
                    )
            share = run.get("fanout", {}).get("compressed_share")
            if share is not None and share != (1.0 if want else 0.0):
                notes.append(f"{name} #{i}: {share:.1%} of the sentinel's publications compressed")
    cpu = ratios["cpu_per_delivery"]
    if cpu is not None and cpu > CPU_TARGET:
        notes.append(f"deflate/plain CPU per delivery x{cpu:.2f}, above the x{CPU_TARGET} target")
    return notes


def table(results: dict[str, Any], ratios: dict[str, float | None]) -> str:
    widths = (13, 13, 14, 14, 12, 15, 12, 13, 13)

    def line(*cells: str) -> str:
        aligned = [f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)]
        aligned[0] = f"{cells[0]:<{widths[0]}}"
        return " ".join(aligned)

    head = line(
        "fastws",
        "deliveries/s",
        "us/deliv proc",
        "us/deliv core",
        "server core",
        "gen proc/core",
        "B/deliv msg",
        "B/deliv wire",
        "KB/idle conn",
    )
    rows = [head, "-" * len(head)]
    fmt = fanout.fmt
    for name, res in results.items():
        m = res["median"]
        busy = "!" if fanout.generator_load(m) > fanout.GENERATOR_BUSY else " "
        gen = f"{fmt(m['generator_cpu_share'], '.0%')}/{fmt(m['generator_core_busy'], '.0%')}"
        rows.append(
            line(
                name,
                fmt(m["deliveries_per_s"], ",.0f"),
                fmt(m["server_us_per_delivery"], ".2f"),
                fmt(m["server_core_us_per_delivery"], ".2f"),
                fmt(m["server_core_busy"], ".0%"),
                gen + busy,
                fmt(m["message_bytes_per_delivery"], ",.0f"),
                fmt(m["wire_bytes_per_delivery"], ",.0f"),
                fmt(m["kb_per_idle_connection"], ".1f"),
            )
        )
    if "plain" in results and "deflate" in results:

        def x(key: str) -> str:
            return "x" + fmt(ratios[key], ".2f")

        rows.append(
            line(
                "deflate/plain",
                x("throughput"),
                x("cpu_per_delivery"),
                x("core_per_delivery"),
                "",
                "",
                "",
                x("wire_bytes_per_delivery"),
                f"{fmt(ratios['extra_kb_per_idle_connection'], '+.1f')}",
            )
        )
    rows += [
        "",
        "us/deliv: server CPU per delivery, its process (proc) and its whole pinned core (core).",
        "B/deliv msg: the publication as JSON; wire: the frame received, header included.",
        f"Target: deflate/plain CPU per delivery at most x{CPU_TARGET}.",
    ]
    if any(fanout.generator_load(r["median"]) > fanout.GENERATOR_BUSY for r in results.values()):
        rows.append(f"! generator core above {fanout.GENERATOR_BUSY:.0%}: it may be the bottleneck")
    return "\n".join(rows)


def main() -> int:
    args = parse_args()
    available, cpus = fanout.setup()
    chosen = variants(args)
    progress(
        f"variants {list(chosen)}, {args.repeat} round(s); server on CPU {cpus[0]}, "
        f"generator on CPU {cpus[1]}"
    )
    idle_busy = fanout.wait_for_quiet(args.wait_quiet, progress)

    t0 = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for rep in range(1, args.repeat + 1):  # alternate variants, so drift hits both alike
        for name, (spec, deflate) in chosen.items():
            runs[name].append(one_round(name, spec, deflate, rep, args, cpus))
    results: dict[str, Any] = {n: {"runs": r, "median": summary(r)} for n, r in runs.items()}

    ratios = compare(results)
    return fanout.report(
        "compression",
        args,
        t0,
        fanout.machine(available, cpus),
        idle_busy,
        results,
        ratios,
        findings(results, ratios),
        table(results, ratios),
    )


if __name__ == "__main__":
    sys.exit(main())
