"""lorapool: serve one base model with many per-tenant LoRA adapters, in process.

>>> from lorapool import AdapterPool, SamplingParams
>>> from lorapool.backends.torch import TorchBackend, ensure_demo_model

``import lorapool`` imports no engine and no torch. The package's rooms::

    lorapool/
      pool.py        AdapterPool, the facade an application embeds
      request.py     one request's life: ticket, legs, relay, usage
      abc.py         the seams (Backend, Scheduler, EvictionPolicy, PrefetchPolicy,
                     Source, RegistryStore), all in one place
      sampling.py    SamplingParams, StructuredOutput: what a request asks of the sampler
      tools.py       tool calling: rendering tools into a prompt, parsing calls out
      types.py       Chunk, Completion, Usage, Capabilities, ...
      errors.py      the error tree below
      plugins.py     finding backends, policies and sources through entry points
      registry/      adapters, tenants, versions, aliases, canary splits, the audit log
      signing/       signed adapter manifests: keys, keyring, verification
      lifecycle/     eval-gated promotion, the canary watch, forget
      scheduler/     whose request runs next: FCFS, fair (VTC), admission, preemption, hand-off
      store/         device slots <- host RAM <- disk <- source
      sources/       file, s3, http(s)
      formats/       safetensors headers, PEFT configs, archives, the base model's description
      validation.py  the checks an adapter passes before it is registered
      server/        the OpenAI-compatible HTTP server
      integrations/  Ray Serve
      bench/         ``lorapool bench``
      testing/       conformance suites and test doubles for plugin authors
    lorapool.backends   (plugins) torch, vllm, sglang, tgi, openai
    lorapool.policies   (plugins) lru, lru2, sieve, s3fifo, wtinylfu, gdsf, ttl; prefetch

Every error lorapool raises on purpose is a :class:`LorapoolError`, importable from
here and from :mod:`lorapool.errors`::

    LorapoolError
    ├── AdapterNotFound (LookupError)       an id that does not exist, or another tenant's
    │   └── AdapterForgotten                a request cancelled by forget (produced)
    ├── AccessDenied (PermissionError)      a shared adapter the caller may use, not change
    ├── SignatureError (PermissionError)    an adapter's signature refused (reason)
    ├── SourceNotAllowed (PermissionError)  a registration source outside the caller's rules
    ├── AdapterExists (ValueError)
    ├── AdapterInUse
    ├── AdapterValidationError (ValueError)
    │   └── NotAPeftAdapter
    ├── InvalidRequest (ValueError)
    │   └── UnsupportedParameter            a parameter the backend cannot honour (backend)
    ├── RateLimited, Overloaded, ColdStartRejected   (retry_after: seconds)
    ├── DeadlineExceeded (TimeoutError)
    ├── PinLimitExceeded
    ├── SourceNotFound (FileNotFoundError)
    ├── SourceNotDeletable                  forget(delete_source=True) on an http(s) source
    ├── SourceError (OSError)
    │   └── ContentMismatch
    ├── LoadError                           (adapter_id, tier, cause)
    ├── DiskFull
    ├── RegistryUnavailable                 (operation, cause)
    ├── AuditChainBroken                    the audit log fails to verify at entry ``seq``
    ├── PromotionRefused                    a version failed its eval gate (report)
    ├── BackendError
    │   ├── BackendNotStarted, BackendClosed (RuntimeError)
    │   └── BackendServerError              (status, server_message)
    ├── PoolClosed (RuntimeError)
    ├── PluginNotFound (LookupError)
    └── ExtraNotInstalled (ImportError)
        └── BackendUnavailable
"""

from lorapool import _compat, abc, errors
from lorapool._version import __version__
from lorapool.errors import (
    AccessDenied,
    AdapterExists,
    AdapterForgotten,
    AdapterInUse,
    AdapterNotFound,
    AdapterValidationError,
    AuditChainBroken,
    BackendClosed,
    BackendError,
    BackendNotStarted,
    BackendServerError,
    BackendUnavailable,
    ColdStartRejected,
    ContentMismatch,
    DeadlineExceeded,
    DiskFull,
    ExtraNotInstalled,
    InvalidRequest,
    LoadError,
    LorapoolError,
    NotAPeftAdapter,
    Overloaded,
    PinLimitExceeded,
    PluginNotFound,
    PoolClosed,
    PromotionRefused,
    RateLimited,
    RegistryUnavailable,
    SignatureError,
    SourceError,
    SourceNotAllowed,
    SourceNotDeletable,
    SourceNotFound,
    UnsupportedParameter,
)
from lorapool.pool import AdapterPool, Session, TenantUsage
from lorapool.registry import Registry
from lorapool.scheduler import FairScheduler, FCFSScheduler, Scheduler, TierPolicy
from lorapool.store import StoreStats, TieredStore
from lorapool.types import (
    AdapterInfo,
    Capabilities,
    Chunk,
    Completion,
    GenerationRequest,
    LoadedAdapter,
    LoraConfig,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

_compat.install()

__all__ = [
    "AccessDenied",
    "AdapterExists",
    "AdapterForgotten",
    "AuditChainBroken",
    "AdapterInUse",
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterPool",
    "AdapterValidationError",
    "BackendClosed",
    "BackendError",
    "BackendNotStarted",
    "BackendServerError",
    "BackendUnavailable",
    "Capabilities",
    "Chunk",
    "ColdStartRejected",
    "Completion",
    "ContentMismatch",
    "DeadlineExceeded",
    "DiskFull",
    "ExtraNotInstalled",
    "FCFSScheduler",
    "FairScheduler",
    "GenerationRequest",
    "InvalidRequest",
    "LoadError",
    "LoadedAdapter",
    "LoraConfig",
    "LorapoolError",
    "NotAPeftAdapter",
    "Overloaded",
    "PinLimitExceeded",
    "PluginNotFound",
    "PoolClosed",
    "PromotionRefused",
    "RateLimited",
    "RegistryUnavailable",
    "SignatureError",
    "Registry",
    "SamplingParams",
    "Scheduler",
    "Session",
    "SourceError",
    "SourceNotAllowed",
    "SourceNotDeletable",
    "SourceNotFound",
    "StoreStats",
    "StructuredOutput",
    "TenantUsage",
    "TierPolicy",
    "TieredStore",
    "TokenLogprob",
    "ToolCall",
    "TopLogprob",
    "Usage",
    "UnsupportedParameter",
    "__version__",
    "abc",
    "errors",
]
