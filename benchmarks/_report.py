"""The suite's results as Markdown tables and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OPS = {  # what `ops` counts in each mode
    "fanout": "deliveries/s",
    "latency": "deliveries/s",
    "echo": "messages/s",
    "roundtrip": "round trips/s",
    "churn": "handshakes/s",
}
EXTRA = {  # more columns, by figure key (a scenario's `keys` pick them)
    "p50_us": "p50 µs",
    "p99_us": "p99 µs",
    "p999_us": "p99.9 µs",
    "wire_bytes_per_delivery": "wire bytes/delivery",
    "publications_per_s": "publications/s",
    "publications_per_read": "publications/read",
    "redis_us_per_op": "Redis CPU µs/op",
    "node_a_p50_us": "node A p50 µs",
    "node_a_p99_us": "node A p99 µs",
}

FORMATS = {"redis_us_per_op": ".2f", "publications_per_read": ".1f"}  # others: ",.0f"


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    cfg = doc["config"]
    lines = [
        "# fastws benchmarks",
        "",
        f"{doc['when']}; {len(m['cpus'])} CPUs, Linux {m['kernel']}, Python {m['python']}; "
        f"{versions}.",
        f"Server pinned to CPU {m['server_cpu']}, load generator to CPU {m['generator_cpu']}; "
        f"median of {cfg['repeat']} run(s) of {cfg['duration']:g} s after {cfg['warmup']:g} s "
        f"of warm-up; wall time {doc['wall_s']:.0f} s.",
        "",
        "## Targets",
        "",
        "| scenario | target | figure | met |",
        "|---|---|---:|:---:|",
    ]
    for name, entry in doc["scenarios"].items():
        for t in entry["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(f"| {name} | {t['target']} | {fmt(t['figure'], '.2f')} | {met} |")
    for name, entry in doc["scenarios"].items():
        lines += ["", f"## {name}: {entry['title']}", ""]
        lines += scenario_table(entry)
        if entry["notes"]:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in entry["notes"]]
    return "\n".join(lines) + "\n"


def scenario_table(entry: dict[str, Any]) -> list[str]:
    medians = {name: s["median"] for name, s in entry["servers"].items() if s["median"]}
    if not medians:
        return ["No run produced figures."]
    # Ratios are to raw picows, or where it does not run to the first server
    # (fastws without deflate, fastws with the memory broker).
    base_name = "picows" if "picows" in medians else next(iter(medians))
    base = medians[base_name]
    sample = next(iter(medians.values()))
    if sample.get("mode") == "idle":
        rows = ["| server | KB per connection | x raw picows |", "|---|---:|---:|"]
        for name, f in medians.items():
            r = rel(f, base, "kb_per_connection")
            rows.append(f"| {name} | {f['kb_per_connection']:.1f} | {fmt(r, '.2f')} |")
        return rows
    keys = entry.get("keys")
    extra = [k for k in keys if k in EXTRA] if keys else [k for k in EXTRA if k in sample]
    head = (
        f"| server | {OPS[sample['mode']]} | x {base_name} | server CPU µs/op | x {base_name} "
        "| server core | generator core |"
    )
    head += "".join(f" {EXTRA[k]} |" for k in extra)
    rows = [head, "|---" + "|---:" * (6 + len(extra)) + "|"]
    for name, f in medians.items():
        gen = f["generator_core_busy"]
        busy = " !" if max(f["generator_cpu_share"], gen or 0) > 0.9 else ""
        row = (
            f"| {name} | {f['ops_per_s']:,.0f} | {fmt(rel(f, base, 'ops_per_s'), '.2f')} "
            f"| {fmt(f['server_us_per_op'], '.2f')} "
            f"| {fmt(rel(f, base, 'server_us_per_op'), '.2f')} "
            f"| {fmt(f['server_core_busy'], '.0%')} | {fmt(gen, '.0%')}{busy} |"
        )
        row += "".join(f" {fmt(f.get(k), FORMATS.get(k, ',.0f'))} |" for k in extra)
        rows.append(row)
    rows += [
        "",
        "µs/op: the server process's CPU (user + system) per operation"
        + (", both nodes' for fastws+redis; Redis's own apart" if "fastws+redis" in medians else "")
        + ". `!`: the load generator's core was over 90 % busy, so throughput is a lower bound.",
    ]
    return rows


def rel(f: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    a, b = f.get(key), base.get(key)
    return a / b if a is not None and b else None


def plots(doc: dict[str, Any], out: Path) -> list[Path]:
    """Throughput vs subscribers, the latency distribution, memory per connection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    scenarios = doc["scenarios"]

    broadcast = sorted(
        (
            s
            for name, s in scenarios.items()
            if name.startswith("broadcast") and s["servers"] and mode_of(s) == "fanout"
        ),
        key=lambda s: subscribers_of(s),
    )
    if broadcast:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for server in servers_in(broadcast):
            points = [
                (subscribers_of(s), s["servers"][server]["median"])
                for s in broadcast
                if s["servers"].get(server, {}).get("median")
            ]
            xs = [p[0] for p in points]
            ax1.plot(xs, [p[1]["ops_per_s"] for p in points], marker="o", label=server)
            ax2.plot(xs, [p[1]["server_us_per_op"] for p in points], marker="o", label=server)
        for ax, label in ((ax1, "deliveries/s"), (ax2, "server CPU µs per delivery")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("subscribers")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        ax1.legend()
        fig.suptitle("Broadcast, 64-byte publications (server on one core)")
        fig.tight_layout()
        made.append(save(fig, out / "broadcast.png"))

    latency = scenarios.get("latency")
    if latency:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for server, s in latency["servers"].items():
            q = s["median"].get("quantiles_us")
            if q:
                ax.plot([v / 1000 for _, v in q], [p for p, _ in q], label=server)
        ax.set_xscale("log")  # the peers span three orders of magnitude
        ax.set_xlabel("publish-to-deliver latency, ms")
        ax.set_ylabel("percentile")
        ax.set_title("Latency at 50 publications/s to 1,000 subscribers")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        made.append(save(fig, out / "latency.png"))

    memory = scenarios.get("memory")
    if memory:
        names = [n for n, s in memory["servers"].items() if s["median"]]
        values = [memory["servers"][n]["median"]["kb_per_connection"] for n in names]
        fig, ax = plt.subplots(figsize=(7, 4))
        bars = ax.bar(names, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.1f")
        ax.set_ylabel("KB per idle subscribed connection")
        ax.set_title("Server memory per connection (RSS growth over 10,000)")
        fig.tight_layout()
        made.append(save(fig, out / "memory.png"))
    return made


def mode_of(entry: dict[str, Any]) -> str | None:
    for s in entry["servers"].values():
        if s["median"]:
            mode: str = s["median"]["mode"]
            return mode if s["median"].get("data") != "records" else "records"
    return None


def subscribers_of(entry: dict[str, Any]) -> int:
    return max(int(s["median"].get("subscribers", 0)) for s in entry["servers"].values())


def servers_in(entries: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for e in entries:
        names += [n for n in e["servers"] if n not in names]
    return names


def save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
