"""Benchmarks: ratios measured side by side in one run, printed and written as JSON.

Run them with ``python -m lorapool bench <scenario>`` or
``python -m lorapool.bench <scenario>``: ``engine`` (throughput with mixed
adapters, needs the demo model) or ``cache`` (the eviction policy simulator).
Benchmarks are not tests: nothing here asserts on wall-clock speed.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["SCENARIOS", "add_scenarios", "run"]

SCENARIOS = ("engine", "cache", "store", "fairness", "vllm")


def _module(scenario: str) -> Any:
    import importlib

    return importlib.import_module(f"{__name__}.{scenario}")


def add_scenarios(parser: argparse.ArgumentParser) -> None:
    """Add one subcommand per scenario (``engine``, ``cache``) to ``parser``."""
    scenarios = parser.add_subparsers(dest="scenario", required=True)
    for name in SCENARIOS:
        module = _module(name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        module.add_arguments(scenarios.add_parser(name, help=summary, description=module.__doc__))


def run(args: argparse.Namespace) -> int:
    """Run the scenario ``args.scenario`` parsed by :func:`add_scenarios`."""
    status: int = _module(args.scenario).run(args)
    return status
