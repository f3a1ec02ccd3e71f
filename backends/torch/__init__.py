"""The embedded default engine: pure PyTorch, CPU or CUDA.

Import cost: this package imports torch; ``import lorapool`` does not.
"""

from __future__ import annotations

import logging

from lorapool.errors import BackendUnavailable

from .threads import OPENMP_WAIT_UNSET, choose_openmp_wait

WAIT_POLICY = choose_openmp_wait()  # before torch loads its OpenMP runtime
"""The OpenMP wait setting of this process's torch (a short spin, then sleep, unless the
environment chose before torch was imported; see :func:`.threads.choose_openmp_wait`)."""
if WAIT_POLICY == OPENMP_WAIT_UNSET:
    logging.getLogger(__name__).warning(
        "torch was imported before lorapool.backends.torch with OMP_WAIT_POLICY and "
        "GOMP_SPINCOUNT unset: its OpenMP threads spin 3 ms while they wait, and the engine "
        "loses most of its throughput when another process takes a core; set "
        "OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 in the environment (docs/operations.md)"
    )

try:
    import torch as _torch  # noqa: F401
    import transformers as _transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise BackendUnavailable("torch", "torch", str(exc)) from exc

from .backend import TorchBackend  # noqa: E402 - after the wait policy is set
from .demo_model import DEMO_MODEL_NAME, default_cache_dir, ensure_demo_model  # noqa: E402

__all__ = [
    "DEMO_MODEL_NAME",
    "WAIT_POLICY",
    "TorchBackend",
    "default_cache_dir",
    "ensure_demo_model",
]
