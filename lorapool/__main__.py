"""``python -m lorapool`` / the ``lorapool`` console script."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``lorapool bench engine|cache ...``."""
    parser = argparse.ArgumentParser(prog="lorapool", description="lorapool command line")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark (side-by-side ratios)")
    from . import bench as benchmarks

    benchmarks.add_scenarios(bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        return benchmarks.run(args)
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
