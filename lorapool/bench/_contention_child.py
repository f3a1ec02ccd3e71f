"""One wait policy's TorchBackend for ``bench engine --contention --waits``: a child process.

OpenMP reads its wait policy (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) once, when torch
loads it, so each policy compared runs in a process of its own, started by
:class:`lorapool.bench.contention.WaitChild` with the policy in its environment. It speaks
JSON lines: the first line on stdin is its configuration (the bench's arguments, the model
and adapter paths, the dtype); it answers ``{"ready": settings}`` once its pool is warm,
then each ``{"k": K}`` with ``{"tok_s": ...}`` (one batch over ``K`` distinct adapters,
:class:`lorapool.bench.contention.Workload`), and exits at the end of stdin. Answers go
to the process's original stdout; anything else printed to stdout goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO


def _answer(channel: TextIO, message: dict[str, Any]) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


async def _serve(config: dict[str, Any], channel: TextIO) -> None:
    from .contention import Workload, settings_of
    from .engine_rig import torch_backend

    args = argparse.Namespace(**config["args"])
    backend = torch_backend(args, Path(config["model_dir"]), config["dtype"])
    adapters = [Path(p) for p in config["adapters"]]
    async with Workload(args, backend, adapters) as workload:
        settings = await settings_of(backend, "torch")
        settings["gomp_spincount"] = os.environ.get("GOMP_SPINCOUNT", "unset")
        _answer(channel, {"ready": settings})
        governor = getattr(getattr(backend, "_engine", None), "governor", None)
        while line := await asyncio.to_thread(sys.stdin.readline):
            tok_s = await workload.run(int(json.loads(line)["k"]))
            if governor is not None:  # where the thread governor left the count
                print(
                    f"    governor: threads {governor.threads}, lowered {governor.lowered}, "
                    f"raised {governor.raised}, others' CPUs {governor.others:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
            _answer(channel, {"tok_s": tok_s})


def main() -> None:
    """Serve the parent's commands until its end of stdin."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints cannot corrupt the protocol
    config = json.loads(sys.stdin.readline())
    import lorapool.backends.torch  # noqa: F401 - the wait policy, before torch loads

    asyncio.run(_serve(config, channel))


if __name__ == "__main__":
    main()
