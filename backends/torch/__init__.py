"""The embedded default engine: pure PyTorch, CPU or CUDA.

Import cost: this package imports torch; ``import lorapool`` does not.
"""

from __future__ import annotations

from lorapool.errors import BackendUnavailable

try:
    import torch as _torch  # noqa: F401
    import transformers as _transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise BackendUnavailable("torch", "torch", str(exc)) from exc

from .backend import TorchBackend
from .demo_model import DEMO_MODEL_NAME, default_cache_dir, ensure_demo_model

__all__ = ["DEMO_MODEL_NAME", "TorchBackend", "default_cache_dir", "ensure_demo_model"]
