"""Benchmarks: ratios measured side by side in one run, printed and written as JSON.

Run them with ``lorapool bench <scenario>`` (or ``python -m lorapool bench``):
``serve`` (any workload through lorapool on any target: latency, SLO, loads),
``engine`` (mixed-adapter throughput vs PEFT), ``cache`` (eviction policy
simulator), ``store`` (load paths), ``fairness`` (FCFS vs FairScheduler),
``vllm`` (raw vLLM vs lorapool over vLLM), ``prefix`` (agent and multi-turn chat
workloads with the prefix cache on vs off vs raw vLLM), and ``report``, which runs
the others and writes ``docs/performance.md``.
Benchmarks are not tests: nothing here asserts on wall-clock speed.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["SCENARIOS", "add_scenarios", "run"]

SCENARIOS = ("serve", "engine", "cache", "store", "fairness", "vllm", "prefix", "report")


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
    """Run the scenario ``args.scenario`` parsed by :func:`add_scenarios`.

    Every scenario's JSON (``--json``) gets a ``meta`` entry: machine,
    package versions and the configuration it ran with (seeds included).
    """
    import json
    from pathlib import Path

    from .meta import run_meta

    status: int = _module(args.scenario).run(args)
    out = getattr(args, "json", None)
    if status == 0 and out and Path(out).is_file():
        results = json.loads(Path(out).read_text())
        if isinstance(results, dict):
            meta = run_meta(args)
            meta.update({k: v for k, v in results.get("meta", {}).items() if k not in meta})
            results["meta"] = meta
            Path(out).write_text(json.dumps({"meta": meta, **results}, indent=2, default=str))
    return status
