"""``python -m lorapool.bench <scenario>``: the same as ``python -m lorapool bench <scenario>``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lorapool.bench import add_scenarios, run

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the scenario and its options, run it."""
    parser = argparse.ArgumentParser(prog="python -m lorapool.bench", description=__doc__)
    add_scenarios(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
