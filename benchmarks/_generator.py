"""The load generator: picows clients on uvloop, run as its own (pinned) process.

It prints progress on stderr and one JSON object on stdout: the figures of
its mode, or {"error": ...}. The modes live in _load.py (subscriber loads)
and _load_request.py (request-reply loads).

Run: python -m benchmarks._generator fanout --url ws://127.0.0.1:P/ws --server-pid PID

Against two nodes sharing a Redis (fanout and latency): --url is node A,
where the publisher connects, --peer-url node B, --server-pid is given for
both and --redis-pid for the Redis, whose CPU is reported apart.
"""

from __future__ import annotations

import argparse
import json
import sys

import uvloop

from benchmarks import _load, _load_request, _proc
from benchmarks._wire import DIALECTS

MODES = {**_load.MODES, **_load_request.MODES}


def main() -> None:
    parser = argparse.ArgumentParser(description="fastws benchmark load generator")
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--url", required=True)
    parser.add_argument(
        "--server-pid",
        type=int,
        action="append",
        required=True,
        dest="server_pids",
        help="a node's pid; repeated for a server of several nodes (their CPU is summed)",
    )
    parser.add_argument(
        "--peer-url", default=None, help="a second node: half the subscribers connect there"
    )
    parser.add_argument(
        "--redis-pid", type=int, default=None, help="a Redis the nodes share: its CPU apart"
    )
    parser.add_argument("--dialect", choices=sorted(DIALECTS), default="fastws")
    parser.add_argument("--channel", default=None)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    _load.add_arguments(parser)
    _load_request.add_arguments(parser)
    args = parser.parse_args()
    args.dialect = DIALECTS[args.dialect]
    args.server_pid = args.server_pids[0]
    args.channel = args.channel or args.mode
    _proc.raise_nofile_limit()
    try:
        result = uvloop.run(MODES[args.mode](args))
    except Exception as exc:  # reported to the driver, which decides what to do
        print(json.dumps({"mode": args.mode, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
