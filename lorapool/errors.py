"""The typed error tree.

Every failure a caller can cause is a subclass of :class:`LorapoolError` whose
message says what was wrong and what to do about it. A failed call leaves the
registry and the resident adapters as they were.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AdapterExists",
    "AdapterForgotten",
    "AdapterInUse",
    "AdapterNotFound",
    "AdapterValidationError",
    "AuditChainBroken",
    "BackendClosed",
    "BackendError",
    "BackendNotStarted",
    "BackendServerError",
    "BackendUnavailable",
    "ColdStartRejected",
    "ContentMismatch",
    "DeadlineExceeded",
    "DiskFull",
    "ExtraNotInstalled",
    "InvalidRequest",
    "LoadError",
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
    "SourceError",
    "SourceNotAllowed",
    "SourceNotDeletable",
    "SourceNotFound",
    "UnsupportedParameter",
]


from typing import Any, Literal


def _rebuild(cls: type[LorapoolError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class LorapoolError(Exception):
    """Base class of every error lorapool raises on purpose.

    Errors pickle as they are (message and fields such as ``retry_after``), so
    they cross process boundaries (Ray Serve replicas) unchanged.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class AdapterNotFound(LorapoolError, LookupError):
    """No adapter is registered under this id (or the caller may not know it exists)."""

    def __init__(self, adapter_id: str) -> None:
        self.adapter_id = adapter_id
        super().__init__(
            f"adapter {adapter_id!r} is not registered; register it first with "
            f"`await pool.register({adapter_id!r}, source=..., tenant=...)` "
            "or check the id with `pool.list_adapters(tenant=...)`"
        )


class AdapterForgotten(AdapterNotFound):
    """The adapter was forgotten (``pool.forget(..., in_flight="cancel")``) while this
    request used it: the request was cancelled, and is billed for what it produced."""

    def __init__(self, adapter_id: str, produced: int = 0) -> None:
        self.adapter_id = adapter_id
        self.produced = produced
        LorapoolError.__init__(
            self,
            f"adapter {adapter_id!r} was deleted while this request used it; the request "
            f"was cancelled after {produced} tokens (billed as produced) and the adapter "
            "is no longer registered",
        )


class AccessDenied(LorapoolError, PermissionError):
    """The tenant may see this adapter (a shared one) but not change it.

    Another tenant's private adapter is never this error: it is
    :class:`AdapterNotFound`, exactly like one that does not exist.
    """

    def __init__(self, adapter_id: str, tenant: str) -> None:
        self.adapter_id = adapter_id
        self.tenant = tenant
        super().__init__(
            f"tenant {tenant!r} may use adapter {adapter_id!r} but not change it: it is shared, "
            "and only its owner manages it"
        )


class SourceNotAllowed(LorapoolError, PermissionError):
    """The caller may not register adapters from this source (or may not register at all).

    The message never says whether anything exists at the source: a path outside
    the caller's roots reads the same whether it is a file, a directory or nothing.
    """

    def __init__(self, source: str, detail: str = "") -> None:
        self.source = source
        super().__init__(
            f"registering from {source!r} is not allowed for this caller"
            + (f": {detail}" if detail else "")
            + "; the operator configures the allowed sources ([registration] in the server "
            "config, or AdapterPool.register(..., allowed=SourceRules(...)))"
        )


class AdapterExists(LorapoolError, ValueError):
    """An adapter with this id is already registered."""

    def __init__(self, adapter_id: str) -> None:
        self.adapter_id = adapter_id
        super().__init__(
            f"adapter {adapter_id!r} is already registered; unregister it first or pick another id"
        )


class AdapterInUse(LorapoolError):
    """The adapter cannot be changed now because requests or pins hold it."""


class SourceNotDeletable(LorapoolError):
    """``forget(..., delete_source=True)`` cannot delete this adapter's source (an
    ``http(s)://`` URL, a source plugin without deletion); nothing was changed."""

    def __init__(self, source: str, detail: str) -> None:
        self.source = source
        super().__init__(
            f"cannot delete the adapter source {source!r}: {detail}; forget it without "
            "delete_source=True and delete the source where it is kept"
        )


class SourceNotFound(LorapoolError, FileNotFoundError):
    """The adapter's source (a directory, an object, a URL) does not exist."""

    def __init__(
        self,
        source: str,
        detail: str = "",
        hint: str = "pass the directory that holds adapter_config.json",
    ) -> None:
        self.source = source
        message = f"adapter source {source!r} does not exist"
        if detail:
            message += f": {detail}"
        super().__init__(f"{message}; {hint}")


class SourceError(LorapoolError, OSError):
    """Fetching an adapter's files from its source failed.

    ``transient`` says whether trying again may help (a dropped connection, a
    5xx answer, a throttle); the store retries those with backoff and gives up
    at once on the others (access denied, a malformed URI).
    """

    def __init__(self, uri: str, detail: str, *, transient: bool) -> None:
        self.uri = uri
        self.detail = detail
        self.transient = transient
        kind = "transient" if transient else "permanent"
        super().__init__(f"{kind} error fetching {uri!r}: {detail}")


class ContentMismatch(SourceError):
    """Fetched files do not match the sha256 recorded at registration; nothing was kept."""

    def __init__(self, uri: str, detail: str) -> None:
        super().__init__(uri, detail, transient=False)


class ExtraNotInstalled(LorapoolError, ImportError):
    """A feature needs an optional dependency that is not installed."""

    def __init__(self, feature: str, extra: str, cause: str = "") -> None:
        self.feature = feature
        self.extra = extra
        message = f"{feature} needs the {extra!r} extra: pip install 'lorapool[{extra}]'"
        if cause:
            message += f" ({cause})"
        super().__init__(message)


class AdapterValidationError(LorapoolError, ValueError):
    """The adapter's files were read but are not acceptable.

    ``reason`` is a stable machine-readable code (``"not_peft"``,
    ``"unsupported_rank"``, ``"unsupported_target"``, ...); ``detail`` says
    what to fix.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"[{reason}] {detail}")


class NotAPeftAdapter(AdapterValidationError):
    """The source exists but does not hold a PEFT LoRA adapter."""

    def __init__(self, source: str, detail: str) -> None:
        self.source = source
        super().__init__(
            "not_peft",
            f"{source!r} is not a PEFT LoRA adapter ({detail}); it must hold "
            "adapter_config.json and adapter_model.safetensors as written by "
            "peft's save_pretrained",
        )


class InvalidRequest(LorapoolError, ValueError):
    """The request itself is malformed (bad prompt, too long for the engine, ...)."""


class UnsupportedParameter(InvalidRequest):
    """The request sets a parameter its backend cannot honour (never silently ignored)."""

    def __init__(self, backend: str, parameters: list[str]) -> None:
        self.backend = backend
        self.parameters = parameters
        names = ", ".join(parameters)
        super().__init__(
            f"the {backend} backend does not support {names}; leave "
            f"{'it' if len(parameters) == 1 else 'them'} unset or use a backend that does"
        )


class _RetryableError(LorapoolError):
    """An error the caller may retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"{message}; retry after {retry_after:.3g} s")


class RateLimited(_RetryableError):
    """The tenant exceeded its request or token rate."""


class Overloaded(_RetryableError):
    """The pool's queue is full; the request was shed."""


class ColdStartRejected(_RetryableError):
    """The adapter is not warm and the tenant's cold-start policy is ``reject``."""


class DeadlineExceeded(LorapoolError, TimeoutError):
    """The request's deadline passed before it was served; it left the queue."""


class PinLimitExceeded(LorapoolError):
    """Pinning one more adapter would leave no device slot for anything else."""


class LoadError(LorapoolError):
    """An adapter could not be brought to the tier a request needed."""

    def __init__(self, adapter_id: str, tier: str, cause: str) -> None:
        self.adapter_id = adapter_id
        self.tier = tier
        self.cause = cause
        super().__init__(f"could not load adapter {adapter_id!r} into the {tier} tier: {cause}")


class BackendError(LorapoolError):
    """The engine failed while serving a request."""


class BackendNotStarted(BackendError, RuntimeError):
    """A backend was used before :meth:`~lorapool.abc.Backend.start` (or after a failed start).

    ``AdapterPool`` starts its backend itself (``async with pool``); this error
    means the backend was driven directly.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        super().__init__(f"{backend} is not started; use `async with pool` or await its start()")


class BackendClosed(BackendError, RuntimeError):
    """A backend was used after :meth:`~lorapool.abc.Backend.aclose`; make a new one."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        super().__init__(f"{backend} was closed; create a new one")


class PoolClosed(LorapoolError, RuntimeError):
    """An :class:`~lorapool.AdapterPool` was started again after it was closed."""

    def __init__(self) -> None:
        super().__init__("this AdapterPool is closed; create a new one")


class BackendServerError(BackendError):
    """A remote engine answered with an error status: ``status`` and the server's message."""

    def __init__(self, status: int, message: str, *, what: str) -> None:
        self.status = status
        self.server_message = message
        super().__init__(f"the server could not {what}: HTTP {status}: {message}")


class DiskFull(LorapoolError):
    """The disk tier cannot make room without evicting adapters in use or pinned."""


class PluginNotFound(LorapoolError, LookupError):
    """No plugin of that name is registered in the entry-point group."""

    def __init__(self, group: str, name: str, available: list[str]) -> None:
        self.group = group
        self.name = name
        self.available = available
        super().__init__(f"no {group} plugin named {name!r}; available: {available}")


class BackendUnavailable(ExtraNotInstalled):
    """The engine a backend needs is not installed."""

    def __init__(self, backend: str, extra: str, cause: str = "") -> None:
        self.backend = backend
        super().__init__(f"the {backend} backend", extra, cause)


class RegistryUnavailable(LorapoolError):
    """The registry's storage refused a read or write (a full disk, a locked or damaged file).

    Nothing was recorded; the registry is as it was before the call. Free space or
    repair the store, then retry. Not a source error: it is never retried as one.
    """

    def __init__(self, operation: str, cause: str) -> None:
        self.operation = operation
        self.cause = cause
        super().__init__(
            f"the adapter registry could not {operation}: {cause}; nothing was recorded "
            "(check the registry's disk and file, then retry)"
        )


SignatureReason = Literal[
    "missing", "unknown_key", "revoked_key", "bad_signature", "manifest_mismatch"
]
"""Why an adapter's signature was refused (:class:`SignatureError`)."""


class SignatureError(LorapoolError, PermissionError):
    """An adapter's signature was refused; nothing was registered, loaded or changed.

    ``reason``: ``missing`` (the tenant's policy requires a signature and there is none),
    ``unknown_key`` (no key of the keyring has the signer's key id), ``revoked_key``,
    ``bad_signature`` (the manifest does not verify under the key), ``manifest_mismatch``
    (a file's bytes, the config or the base model differ from what was signed).
    """

    def __init__(self, adapter: str, reason: SignatureReason, detail: str = "") -> None:
        self.adapter = adapter
        self.reason: SignatureReason = reason
        self.detail = detail
        text = f"adapter {adapter!r} refused: signature {reason.replace('_', ' ')}"
        super().__init__(f"{text}: {detail}" if detail else text)


class PromotionRefused(LorapoolError):
    """An adapter version failed its eval gate; the alias's traffic is as it was.

    ``report`` is the gate's report (:class:`lorapool.lifecycle.GateReport`): the scores of
    the candidate and the baseline, case by case, and the regression that refused it.
    """

    def __init__(self, adapter: str, reason: str, report: Any = None) -> None:
        self.adapter = adapter
        self.reason = reason
        self.report = report
        super().__init__(f"promotion of {adapter!r} refused: {reason}")


class AuditChainBroken(LorapoolError):
    """The audit log's hash chain does not hold at entry ``seq``: the entry was edited,
    removed or inserted after it was written."""

    def __init__(self, seq: int, detail: str) -> None:
        self.seq = seq
        self.detail = detail
        super().__init__(f"audit log entry {seq} does not verify: {detail}")
