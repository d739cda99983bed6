"""The ``fastws`` command.

``fastws serve`` runs a node, or with ``--workers`` a supervisor of several
(fastws.workers); ``fastws options`` prints the options table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fastws import config as config_module
from fastws import workers
from fastws.app import App


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastws", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a standalone node")
    config_module.add_arguments(serve)
    serve.add_argument(workers.LINK_FLAG, dest="worker_link", type=int, help=argparse.SUPPRESS)
    commands.add_parser("options", help="print docs/configuration.md: every option")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "options":
        sys.stdout.write(config_module.markdown())
        return 0
    try:
        config = config_module.from_args(args)
    except config_module.ConfigError as exc:
        print(f"fastws: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1 and args.worker_link is None:
        return workers.supervise(config)
    app = App(config)
    app.channels(config.path)
    if args.worker_link is None:
        app.run()
    else:
        workers.serve_worker(app, args.worker_link)
    return 0
