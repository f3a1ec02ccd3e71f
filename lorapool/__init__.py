"""lorapool: serve one base model with many per-tenant LoRA adapters, in process.

>>> from lorapool import AdapterPool, SamplingParams
>>> from lorapool.backends.torch import TorchBackend, ensure_demo_model

``import lorapool`` imports no engine and no torch.
"""

from . import errors
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
from .fair import FairScheduler, TierPolicy
from .pool import AdapterPool, Session, TenantUsage
from .registry import Registry
from .scheduling import FCFSScheduler, Scheduler
from .store import StoreStats, TieredStore
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
