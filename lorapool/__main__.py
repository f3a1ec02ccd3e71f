"""``python -m lorapool`` / the ``lorapool`` console script."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``lorapool bench engine ...``."""
    parser = argparse.ArgumentParser(prog="lorapool", description="lorapool command line")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark (side-by-side ratios)")
    scenarios = bench.add_subparsers(dest="scenario", required=True)
    from .bench import engine

    engine.add_arguments(scenarios.add_parser("engine", help=engine.__doc__))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bench" and args.scenario == "engine":
        return engine.run(args)
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
