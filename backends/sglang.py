"""SGLangBackend: lorapool over an in-process SGLang engine (``sglang.Engine``).

lorapool decides residency; SGLang runs the batches. When the store puts an adapter in
device slot ``s``, the backend writes its verified bytes to a local directory and calls
``load_lora_adapter(name, path, pinned=True)``: a pinned adapter keeps its GPU slot
until it is unloaded, so SGLang's own LRU never evicts it. The engine is started with
``max_loras_per_batch = max_slots + 1`` (SGLang counts the base model as one adapter of
a batch, and refuses to pin every slot), so base requests and ``max_slots`` adapters
share one batch. Unload (after the store drained the adapter's requests) calls
``unload_lora_adapter``.

Targeted: SGLang 0.5 (checked against 0.5.23): ``Engine(model_path=..., enable_lora=True,
max_loras_per_batch=..., max_lora_rank=..., lora_target_modules=[...])``;
``async_load_lora_adapter`` / ``async_unload_lora_adapter`` (returning
``LoRAUpdateOutput(success, error_message, loaded_adapters)``); ``await
async_generate(input_ids=..., sampling_params={...}, lora_path=<name>, rid=..., stream=True)``
yielding ``{"text", "output_ids", "meta_info"}`` dicts whose text and ids are cumulative
unless the engine runs with ``incremental_streaming_output``; ``meta_info`` carries
``finish_reason`` (``{"type": "length"|"stop"|"abort", ...}`` or ``None``),
``prompt_tokens`` and ``completion_tokens``; ``tokenizer_manager.abort_request(rid)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorapool.errors import (
    BackendError,
    BackendUnavailable,
    InvalidRequest,
    LoadError,
    UnsupportedParameter,
)
from lorapool.sampling import BASIC_PARAMETERS
from lorapool.types import (
    Capabilities,
    Chunk,
    FinishReason,
    GenerationRequest,
    LoadedAdapter,
    SamplingParams,
    Usage,
)

from .base import BaseBackend
from .files import AdapterDirs, check_load

__all__ = [
    "SGLANG_SAMPLING",
    "SGLangBackend",
    "SGLangStream",
    "sglang_finish_reason",
    "sglang_sampling_params",
]

log = logging.getLogger(__name__)

_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SGLANG_SAMPLING = BASIC_PARAMETERS | {
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "stop_token_ids",
    "min_tokens",
    "structured.json_object",
    "structured.json_schema",
    "structured.regex",
    "structured.choice",
}
"""What SGLang 0.5's ``sampling_params`` take with lorapool's meaning: ``top_k``,
``min_p``, the three penalties, ``logit_bias``, ``stop_token_ids``, ``min_new_tokens``,
and structured output as ``json_schema`` (any object: ``{"type": "object"}``) or ``regex``
(a choice: the regex of its escaped options). Not served (refused): ``n`` (several
samples stream as a batch of outputs this backend does not yet tell apart),
``logprobs`` (SGLang returns them in ``meta_info``; not yet read, and not checked on a
real engine), and Lark grammars (SGLang's ``ebnf`` is xgrammar's EBNF)."""


def _sglang() -> Any:
    try:
        import sglang
    except ImportError as exc:
        raise BackendUnavailable("sglang", "sglang", str(exc)) from exc
    return sglang


def sglang_sampling_params(params: SamplingParams) -> dict[str, Any]:
    """SGLang's ``sampling_params`` dict (``temperature=0`` is greedy there too)."""
    out: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "ignore_eos": params.ignore_eos,
    }
    if params.stop:
        out["stop"] = list(params.stop)
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    optional: dict[str, Any] = {
        "top_k": params.top_k,
        "min_p": params.min_p or None,
        "presence_penalty": params.presence_penalty or None,
        "frequency_penalty": params.frequency_penalty or None,
        "repetition_penalty": None
        if params.repetition_penalty == 1.0
        else params.repetition_penalty,
        "logit_bias": {str(t): b for t, b in params.logit_bias.items()} or None,
        "stop_token_ids": list(params.stop_token_ids) or None,
        "min_new_tokens": params.min_tokens or None,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    so = params.structured
    if so is None:
        return out
    if so.kind == "json_object":
        out["json_schema"] = json.dumps({"type": "object"})
    elif so.kind == "json_schema":
        out["json_schema"] = so.spec
    elif so.kind == "regex":
        out["regex"] = so.spec
    elif so.kind == "choice":
        out["regex"] = "(" + "|".join(re.escape(c) for c in so.choices) + ")"
    else:
        raise UnsupportedParameter("SGLangBackend", [f"structured.{so.kind}"])
    return out


def sglang_finish_reason(reason: object) -> FinishReason | None:
    """lorapool's finish reason for ``meta_info["finish_reason"]``; raises for failed requests.

    SGLang reports ``{"type": "length"}``, ``{"type": "stop", "matched": ...}`` or
    ``{"type": "abort", "message": ..., "status_code": ...}``; an abort with a 4xx status
    is a refused request, one with a 5xx status an engine failure, one without a
    cancellation.
    """
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, Mapping) else reason
    if kind == "length":
        return "length"
    if kind != "abort":
        return "stop"
    status = reason.get("status_code") if isinstance(reason, Mapping) else None
    message = reason.get("message") if isinstance(reason, Mapping) else None
    if isinstance(status, int) and 400 <= status < 500:
        raise InvalidRequest(f"SGLang refused the request: {message}")
    if isinstance(status, int) and status >= 500:
        raise BackendError(f"SGLang failed the request: {message}")
    return "cancelled"


def _int(value: object, default: int) -> int:
    return int(value) if isinstance(value, (int, float, str)) else default


@dataclass
class SGLangStream:
    """Turns one request's streamed SGLang outputs into chunks.

    ``incremental``: the engine streams deltas (``incremental_streaming_output``)
    rather than the cumulative text and ids it streams by default.
    """

    incremental: bool = False
    adapter_id: str | None = None
    served_by: str = "adapter"
    stop_token_ids: frozenset[int] = frozenset()
    text: str = ""
    ids_seen: int = 0
    finished: bool = False

    def feed(self, out: Mapping[str, Any]) -> Chunk:
        """The chunk for one streamed output; the last carries finish reason and usage."""
        meta = out.get("meta_info") or {}
        ids = [int(t) for t in out.get("output_ids") or ()]
        text = out.get("text") or ""
        if self.incremental:
            new_ids, new_text = ids, text
            self.ids_seen += len(ids)
        else:
            # Cumulative ids are the engine's live list: read only the ones this output counts.
            end = _int(meta.get("completion_tokens"), len(ids))
            new_ids = ids[self.ids_seen : end]
            self.ids_seen = max(self.ids_seen, end)
            if text.startswith(self.text):
                new_text, self.text = text[len(self.text) :], text
            else:  # the final text lost a stop string already streamed: never rewind
                new_text = ""
        reason = meta.get("finish_reason")
        finish = sglang_finish_reason(reason)
        matched = reason.get("matched") if isinstance(reason, Mapping) else None
        if finish == "stop" and new_ids and matched == new_ids[-1] in self.stop_token_ids:
            new_ids = new_ids[:-1]  # a stop token is not returned (its text is trimmed)
        chunk = Chunk(
            new_text, tuple(new_ids), adapter_id=self.adapter_id, served_by=self.served_by
        )
        if finish is None:
            return chunk
        self.finished = True
        completion = _int(meta.get("completion_tokens"), self.ids_seen)
        usage = Usage(_int(meta.get("prompt_tokens"), 0), completion)
        return replace(chunk, finish_reason=finish, usage=usage)


@dataclass
class _Lora:
    name: str
    slot: int
    sha256: str


class SGLangBackend(BaseBackend):
    """Serve lorapool's adapters with SGLang's batched multi-LoRA kernels, in this process.

    ``model`` is a model directory or hub name; the engine is built from it and
    ``engine_kwargs`` (any ``sglang.Engine``/``ServerArgs`` field) at :meth:`start`.
    Or pass a running ``engine`` (which the backend then neither starts nor shuts
    down; it needs ``enable_lora`` and ``max_loras_per_batch >= max_slots + 1``).
    ``max_rank`` is SGLang's ``max_lora_rank``; ``adapter_dir`` where adapters are
    written for SGLang to read (a temporary directory by default).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        max_slots: int = 4,
        max_rank: int = 16,
        max_batch: int = 32,
        engine: Any = None,
        adapter_dir: str | Path | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if max_slots < 1 or max_rank < 1:
            raise ValueError("max_slots and max_rank must be >= 1")
        if model is None and engine is None:
            raise ValueError("pass a model (path or name) or a running sglang engine")
        super().__init__()
        self.model = model
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.max_batch = max_batch
        self.engine_kwargs = engine_kwargs
        self.model_path: Path | None = None
        if model is not None and Path(model).expanduser().is_dir():
            self.model_path = Path(model).expanduser()
        self._owns_engine = engine is None
        self._engine: Any = engine
        self._dirs = AdapterDirs(adapter_dir)
        self._loras: dict[str, _Lora] = {}

    # -- lifecycle -------------------------------------------------------------------

    @property
    def engine(self) -> Any:
        """The ``sglang.Engine`` (after :meth:`start`)."""
        self._require_started()
        return self._engine

    def engine_args(self) -> dict[str, Any]:
        """The ``sglang.Engine`` keyword arguments :meth:`start` builds the engine with."""
        kwargs: dict[str, Any] = {
            "model_path": str(self.model),
            "enable_lora": True,
            "max_loras_per_batch": self.max_slots + 1,
            "max_lora_rank": self.max_rank,
            "lora_target_modules": list(_TARGETS),
            "max_running_requests": self.max_batch,
        }
        kwargs.update(self.engine_kwargs)
        return kwargs

    async def _start(self) -> Capabilities:
        """Build (or adopt) the engine and negotiate capabilities.

        Building loads the model and starts SGLang's scheduler processes; it runs in a
        thread so the event loop stays live.
        """
        if self._owns_engine:
            self._engine = await self._build(_sglang().Engine, self.engine_args())
        try:
            return self._negotiate(self._engine)
        except BaseException:
            if self._owns_engine:
                await asyncio.to_thread(self._engine.shutdown)
                self._engine = None
            raise

    @staticmethod
    async def _build(engine_cls: Any, kwargs: dict[str, Any]) -> Any:
        try:
            return await asyncio.to_thread(engine_cls, **kwargs)
        except ValueError as exc:
            # Older SGLang installs signal handlers while it builds: main thread only.
            if "main thread" not in str(exc):
                raise
            log.warning("building the SGLang engine on the event loop's thread (%s)", exc)
            return engine_cls(**kwargs)

    def _negotiate(self, engine: Any) -> Capabilities:
        args = engine.server_args
        if not getattr(args, "enable_lora", False):
            raise BackendError("the SGLang engine was started without enable_lora=True")
        per_batch = int(getattr(args, "max_loras_per_batch", 0) or 0)
        if per_batch < self.max_slots + 1:
            raise BackendError(
                f"the SGLang engine has max_loras_per_batch={per_batch}; lorapool needs "
                f"{self.max_slots + 1} (max_slots={self.max_slots} + 1 for base requests)"
            )
        rank = getattr(args, "max_lora_rank", None)
        self.max_rank = int(rank) if rank else self.max_rank
        manager = engine.tokenizer_manager
        path = getattr(manager, "model_path", None) or getattr(args, "model_path", None)
        if self.model_path is None and path and Path(str(path)).is_dir():
            self.model_path = Path(str(path))
        name = getattr(manager, "served_model_name", None) or path or self.model
        self.max_batch = int(getattr(args, "max_running_requests", None) or self.max_batch)
        context = getattr(manager, "context_len", None)
        return Capabilities(
            max_slots=self.max_slots,
            max_rank=self.max_rank,
            max_batch=self.max_batch,
            base_model=Path(str(name)).name,
            target_modules=frozenset(_TARGETS),
            dynamic_load=True,
            pinning=True,
            max_seq_len=None if context is None else int(context),
            model_path=self.model_path,
            sampling=SGLANG_SAMPLING,
            tools=True,  # chat prompts (and their tools) are encoded here: BaseBackend.encode
        )

    async def _aclose(self) -> None:
        """Shut the engine down (if the backend built it) and delete written adapters."""
        engine = self._engine
        if engine is not None and self._caps is not None:
            if self._owns_engine:
                await asyncio.to_thread(engine.shutdown)
                self._engine = None
            else:
                for name in list(self._loras):
                    await _unload_quietly(engine, name)
        self._loras.clear()
        await asyncio.to_thread(self._dirs.close)

    async def health(self) -> bool:
        """True while the engine is started and its tokenizer manager has not exited."""
        if not self.running or self._engine is None:
            return False
        manager = getattr(self._engine, "tokenizer_manager", None)
        return manager is not None and not getattr(manager, "gracefully_exit", False)

    # -- adapters --------------------------------------------------------------------

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Write the adapter where SGLang will read it, when it enters the host tier."""
        return await self._dirs.prepare(adapter)

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """``load_lora_adapter(..., pinned=True)`` the adapter as the occupant of ``slot``."""
        engine = self.engine
        check_load(adapter, slot, self.max_slots, self.max_rank, "SGLang")
        for other, lora in list(self._loras.items()):
            if lora.slot == slot or other == adapter.adapter_id:
                await self.unload(other)
        async with self._dirs.lease(adapter) as path:  # kept until recorded below
            try:
                await _lora_call(
                    engine.async_load_lora_adapter(adapter.adapter_id, str(path), pinned=True),
                    f"load adapter {adapter.adapter_id!r}",
                )
            except BackendError as exc:
                raise LoadError(adapter.adapter_id, "device", str(exc)) from None
            self._loras[adapter.adapter_id] = _Lora(adapter.adapter_id, slot, adapter.sha256)

    async def unload(self, adapter_id: str) -> None:
        """``unload_lora_adapter`` (the store has drained the adapter's requests)."""
        lora = self._loras.pop(adapter_id, None)
        if lora is None or self._engine is None:
            return
        await _lora_call(self._engine.async_unload_lora_adapter(lora.name), f"unload {lora.name!r}")
        if not any(other.sha256 == lora.sha256 for other in self._loras.values()):
            await self._dirs.discard_unused(lora.sha256)

    def slot_of(self, adapter_id: str) -> int | None:
        """The slot an adapter occupies, if any."""
        lora = self._loras.get(adapter_id)
        return None if lora is None else lora.slot

    # -- generation ------------------------------------------------------------------

    def _prompt_tokenizer(self) -> Any:
        """The engine's tokenizer (none when it runs with ``skip_tokenizer_init``)."""
        tok = getattr(self.engine.tokenizer_manager, "tokenizer", None)
        if tok is None:
            raise InvalidRequest("the SGLang engine has no tokenizer (skip_tokenizer_init)")
        return tok

    def _incremental(self) -> bool:
        manager = self.engine.tokenizer_manager
        flag = getattr(manager, "incremental_streaming_output", None)
        if flag is None:
            flag = getattr(self.engine.server_args, "incremental_streaming_output", False)
        return bool(flag)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a completion; closing the iterator aborts the request in SGLang."""
        self.check_request(request)
        engine = self.engine
        lora_name = None
        if request.adapter_id is not None:
            lora = self._loras.get(request.adapter_id)
            if lora is None:
                raise BackendError(f"adapter {request.adapter_id!r} is not loaded in SGLang")
            if request.slot is not None and lora.slot != request.slot:
                raise BackendError(
                    f"adapter {request.adapter_id!r} is in slot {lora.slot}, not {request.slot}"
                )
            lora_name = lora.name
        input_ids = await self.aencode(request.prompt, request.tools or None)
        if not input_ids:
            raise InvalidRequest("the prompt is empty")
        stream = SGLangStream(
            incremental=self._incremental(),
            adapter_id=request.adapter_id,
            served_by="base" if lora_name is None else "adapter",
            stop_token_ids=frozenset(request.params.stop_token_ids),
        )
        outputs: Any = None
        try:
            outputs = await engine.async_generate(
                input_ids=input_ids,
                sampling_params=sglang_sampling_params(request.params),
                lora_path=lora_name,
                rid=request.request_id,
                stream=True,
            )
            async for out in outputs:
                yield stream.feed(out)
                if stream.finished:
                    return
            if not stream.finished:
                raise BackendError("SGLang ended the stream without a finish reason")
        except (InvalidRequest, BackendError):
            raise
        except ValueError as exc:  # SGLang's validation (prompt too long, bad parameters)
            raise InvalidRequest(f"SGLang refused the request: {exc}") from exc
        except Exception as exc:
            raise BackendError(f"SGLang failed the request: {type(exc).__name__}: {exc}") from exc
        finally:
            if not stream.finished and self._engine is not None:
                self._engine.tokenizer_manager.abort_request(request.request_id)
            if outputs is not None and hasattr(outputs, "aclose"):
                with contextlib.suppress(Exception):
                    await outputs.aclose()


async def _unload_quietly(engine: Any, name: str) -> None:
    """Unload ``name`` from an engine lorapool does not own; log failures."""
    try:
        await _lora_call(engine.async_unload_lora_adapter(name), f"unload {name!r}")
    except BackendError as exc:
        log.info("could not unload %s on close: %s", name, exc)


async def _lora_call(call: Any, what: str) -> Any:
    """Await a LoRA update; SGLang reports failure in the result, not by raising."""
    try:
        result = await call if inspect.isawaitable(call) else call
    except Exception as exc:
        raise BackendError(f"SGLang could not {what}: {exc}") from exc
    if isinstance(result, Mapping):
        success, message = result.get("success", True), result.get("error_message")
    else:
        success, message = getattr(result, "success", True), getattr(result, "error_message", "")
    if not success:
        raise BackendError(f"SGLang could not {what}: {message}")
    return result
