"""lorapool: serve one base model with many per-tenant LoRA adapters, in process.

>>> from lorapool import AdapterPool, SamplingParams
>>> from lorapool.backends.torch import TorchBackend, ensure_demo_model

``import lorapool`` imports no engine and no torch.
"""

from lorapool.registry import Registry
from lorapool.scheduler import FCFSScheduler, Scheduler
from lorapool.scheduler.fair import FairScheduler, TierPolicy
from lorapool.store import StoreStats, TieredStore

from . import _compat, errors
from .errors import (
    AccessDenied,
    AdapterNotFound,
    AdapterValidationError,
    BackendError,
    InvalidRequest,
    LoadError,
    LorapoolError,
    NotAPeftAdapter,
    SourceError,
    SourceNotFound,
)
from .pool import AdapterPool, Session, TenantUsage
from .types import (
    AdapterInfo,
    Capabilities,
    Chunk,
    Completion,
    GenerationRequest,
    LoadedAdapter,
    LoraConfig,
    SamplingParams,
    Usage,
)

__version__ = "0.1.0"

_compat.install()

__all__ = [
    "AccessDenied",
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterPool",
    "AdapterValidationError",
    "BackendError",
    "Capabilities",
    "Chunk",
    "Completion",
    "FCFSScheduler",
    "FairScheduler",
    "GenerationRequest",
    "InvalidRequest",
    "LoadError",
    "LoadedAdapter",
    "LoraConfig",
    "LorapoolError",
    "NotAPeftAdapter",
    "Registry",
    "SamplingParams",
    "Scheduler",
    "Session",
    "SourceError",
    "SourceNotFound",
    "StoreStats",
    "TenantUsage",
    "TierPolicy",
    "TieredStore",
    "Usage",
    "__version__",
    "errors",
]
