"""TorchBackend: the embedded engine, pure PyTorch + a Hugging Face tokenizer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import torch
from safetensors.torch import load as load_safetensors

from lorapool.abc import EvictionPolicy
from lorapool.errors import BackendError, InvalidRequest, LoadError
from lorapool.plugins import load_policy
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

from ..base import BaseBackend
from .detok import IncrementalDetokenizer, StopMatcher
from .engine import Engine, EngineStats, Event, RowFault
from .engine import Sequence as EngineSequence
from .kernel import SgmvKernel, build_kernel, cpu_kernel
from .lora import LoraSlots, PreparedAdapter, prepare_adapter
from .model import BaseWeights, KVCache, LlamaModel
from .prefix import PrefixCache
from .threads import process_usable_cpus

__all__ = ["TorchBackend"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SAMPLING = ALL_PARAMETERS - STRUCTURED_PARAMETERS
"""The sampling parameters TorchBackend honours: every one (structured output besides,
:data:`STRUCTURED`, with llguidance)."""
STRUCTURED = STRUCTURED_PARAMETERS


class TorchBackend(BaseBackend):
    """Continuous batching with a different LoRA adapter per row, in one forward pass.

    ``model`` is a directory with a Hugging Face Llama-family checkpoint in
    safetensors (see :func:`ensure_demo_model`). ``max_slots`` adapters are
    resident at once, each of rank up to ``max_rank``; ``max_batch`` sequences
    run at once, each up to ``max_seq_len`` tokens (prompt and completion) in a
    KV cache preallocated at start. Works on CPU and CUDA.

    ``dtype`` is the model's: fp32 by default on CPU (exact against PEFT),
    bf16 on CUDA. ``dtype="bfloat16"`` on a CPU with AVX-512 BF16 runs the
    base matmuls several times faster; attention then runs in fp32 and the
    LoRA stacks stay fp32, both measured faster there (docs/decisions.md).

    ``lora_kernel``: on CPU, the LoRA matmuls (prefills and decode steps) run
    through a small C kernel built on first use with the system compiler
    (``kernel.py``). ``None`` uses it when it builds and falls back to PyTorch
    matmuls otherwise; ``True`` requires it (start fails with the compiler's
    message); ``False`` never uses it, nor the Triton kernel on CUDA.

    ``lora_bytes``: the LoRA arena's bytes, where every resident adapter takes its
    own rank's and modules' bytes (default: room for ``max_slots`` adapters at
    ``max_rank`` over every module); the store evicts to keep within it.
    ``lora_layout="padded"`` lays every adapter out at ``max_rank`` over every
    module instead (the old layout, kept for the benchmark's comparison).

    ``threads``: the engine's CPU threads, PyTorch's intra-op pool and the LoRA
    kernel's team alike, set with ``torch.set_num_threads`` on the engine thread
    when it starts. ``None``: the CPUs this process may use, its affinity mask
    capped by its cgroup CPU quota rounded down (:mod:`.threads`), and never more
    than PyTorch already has (``OMP_NUM_THREADS``, an earlier
    ``torch.set_num_threads``). PyTorch keeps the count per thread, each thread
    taking the last value set when it first runs a parallel op: the application's
    threads that already ran torch ops keep theirs, later ones start from this.
    Every parallel region waits for its slowest thread, so a thread more than the
    cores the process actually gets slows each step several times over instead of
    in proportion; next to a busy application, leave it a core (docs/operations.md).
    Below 1: :class:`ValueError`. ``adapt_threads`` (default ``False``, experimental):
    the engine runs with one thread fewer for each core other processes hold on this
    process's CPUs, measured as their busy time less this process's own CPU time
    (:class:`~.threads.ThreadGovernor`); ``threads`` is then the most it uses.

    ``interleave_prefill``: a request arriving while a decode step runs is
    prefilled between two of that step's layers instead of after it, so its
    first token waits for one layer, not for a step over every running row
    (``False``: prefills only between steps).

    ``spare_rows``: KV rows beyond ``max_batch`` (by default one per four,
    at least one; none without ``interleave_prefill``) where a request let in
    by a preemption (:meth:`preempt`) is prefilled while the running decode
    step still holds the paused sequence's row; the paused sequence leaves at
    the step's end and the decode never runs more than ``max_batch`` rows.
    Each costs one row of KV cache (``max_seq_len`` positions).

    ``prefix_cache_bytes``: the prefix (KV) cache's budget. A request whose prompt
    starts with blocks of ``prefix_block_size`` tokens already computed *under the
    same adapter content* (the sha256 :meth:`load` is given; the base model has its
    own) gets their keys and values copied into its KV row and prefills only the rest:
    the same output, token for token, for a fraction of the prefill. Blocks are keyed
    by content and the chain of tokens before them, never by an adapter's name, so no
    block is shared across adapters or across versions of one name. ``None``: half the
    KV cache's own size; 0: off. Within the budget, blocks that no other cached block
    continues are given up first, in the order of ``prefix_cache_eviction`` (a policy
    name from ``lorapool.policies`` or an :class:`~lorapool.abc.EvictionPolicy`;
    ``lru`` by default). :meth:`forget` drops a content's blocks (the pool calls it
    when an adapter is unregistered); :meth:`prefix_cache_stats` reads the counters,
    and each request's ``Usage.cached_tokens`` says how many of its prompt tokens came
    from the cache.

    Sampling: every :class:`~lorapool.types.SamplingParams` field is honoured (vLLM's
    meanings; ``Capabilities.sampling`` lists them), structured output through llguidance
    (compact JSON). ``logit_bias`` and ``stop_token_ids`` naming a token outside the
    vocabulary, ``n`` above ``max_batch`` and a schema, pattern or grammar that does not
    compile are refused with :class:`~lorapool.errors.InvalidRequest` when the request
    arrives.

    The stream of a request with ``n`` samples: every chunk carries its sample's
    ``Chunk.index``; each sample's last chunk carries its ``finish_reason``; the stream's
    very last chunk (the last sample to end) also carries ``usage`` for the whole request:
    the prompt's tokens once, the completion tokens of every sample summed. The samples
    share one prefill; with a ``seed``, sample ``i`` uses ``seed + i``. Closing the stream
    cancels every sample. Such a request is never preempted, nor resumed.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        max_slots: int = 8,
        max_rank: int = 16,
        max_batch: int = 32,
        max_seq_len: int = 1024,
        max_prefill_tokens: int = 2048,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        lora_kernel: bool | None = None,
        interleave_prefill: bool = True,
        spare_rows: int | None = None,
        threads: int | None = None,
        adapt_threads: bool = False,
        prefix_cache_bytes: int | None = None,
        prefix_block_size: int = 16,
        prefix_cache_eviction: str | EvictionPolicy = "lru",
        lora_bytes: int | None = None,
        lora_layout: str = "paged",
    ) -> None:
        if lora_bytes is not None and (isinstance(lora_bytes, bool) or lora_bytes < 0):
            raise ValueError(f"lora_bytes must be an int >= 0, or None: {lora_bytes!r}")
        if lora_layout not in ("paged", "padded"):
            raise ValueError(f"lora_layout must be 'paged' or 'padded', not {lora_layout!r}")
        if max_slots < 1 or max_rank < 1 or max_batch < 1 or max_seq_len < 2:
            raise ValueError("max_slots, max_rank, max_batch must be >= 1 and max_seq_len >= 2")
        if prefix_cache_bytes is not None and prefix_cache_bytes < 0:
            raise ValueError("prefix_cache_bytes must be >= 0 (0: no prefix cache), or None")
        if prefix_block_size < 1:
            raise ValueError("prefix_block_size must be >= 1")
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"threads must be an int >= 1, or None (the usable CPUs): {threads!r}")
        super().__init__()
        self.model_path = Path(model).expanduser()
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max(max_prefill_tokens, max_seq_len)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        # The LoRA stacks: fp32 on CPU whatever the model's dtype, because
        # PyTorch's CPU batched matmul on LoRA-sized 16-bit operands is slower than
        # in fp32 (docs/decisions.md, "16-bit on CPU"); the model's dtype elsewhere.
        self.lora_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.lora_kernel = lora_kernel
        self.interleave_prefill = interleave_prefill
        if spare_rows is None:
            spare_rows = max(1, max_batch // 4) if interleave_prefill else 0
        if spare_rows < 0 or (spare_rows and not interleave_prefill):
            raise ValueError("spare_rows must be >= 0, and 0 without interleave_prefill")
        self.spare_rows = spare_rows
        self.threads = threads
        """The ``threads`` asked for (``None``: the usable CPUs, chosen at start)."""
        self.adapt_threads = adapt_threads
        """Whether the thread count follows the cores the engine actually gets."""
        self.prefix_cache_bytes = prefix_cache_bytes
        """The prefix cache's budget asked for (``None``: half the KV cache's size)."""
        self.prefix_block_size = prefix_block_size
        self.prefix_cache_eviction = prefix_cache_eviction
        self.lora_bytes = lora_bytes
        """The LoRA arena's budget asked for (``None``: ``max_slots`` adapters at
        ``max_rank`` over every module)."""
        self.lora_layout = lora_layout
        """``"paged"``: each adapter at its own rank and modules; ``"padded"``: every
        adapter at ``max_rank`` over every module (the layout before, for comparison)."""
        self._engine: Engine | None = None
        self._stats: EngineStats | None = None
        self._slot_of: dict[str, int] = {}
        self._grammars: Any = None  # grammar.Grammars, with llguidance
        self._vocab_size = 0
        self._token_text: dict[int, str] = {}

    @classmethod
    def from_config(cls, model: str | None = None, /, **options: Any) -> Self:
        """See :meth:`BaseBackend.from_config`; no model: the demo SmolLM2 (converted once)."""
        from .demo_model import ensure_demo_model

        return cls(Path(model) if model is not None else ensure_demo_model(), **options)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def stats(self) -> EngineStats:
        """Engine counters: steps, tokens, distinct adapters per step (kept after close)."""
        if self._stats is None:
            raise self._lifecycle_error()
        return self._stats

    def adapters_per_pass(self) -> dict[int, int]:
        """Forward passes by the distinct adapters in each, counted by the engine at each
        pass (``Capabilities.pass_stats``); a copy, empty before start."""
        return {} if self._stats is None else dict(self._stats.distinct_adapters)

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counters and size now (``Capabilities.prefix_cache``);
        ``None`` before start or with the cache off."""
        stats, engine = self._stats, self._engine
        prefix = None if engine is None else engine.prefix
        if stats is None or prefix is None:
            return None
        return PrefixCacheStats(
            prompt_tokens=stats.prefill_tokens,
            hit_tokens=stats.prefix_hit_tokens,
            cached_bytes=prefix.cached_bytes,
            cached_blocks=prefix.cached_blocks,
            budget_bytes=prefix.capacity * prefix.block_bytes,
            evictions=prefix.index.evictions,
            forgotten=prefix.index.forgotten,
        )

    async def forget(self, sha256: str) -> None:
        """Drop the prefix cache's blocks computed under adapter content ``sha256``."""
        engine = self._engine
        if engine is not None and engine.alive:
            await asyncio.wrap_future(engine.forget(sha256))

    async def forget_scope(self, scope: str) -> None:
        """Drop the prefix cache's blocks of one scope (a forgotten tenant's)."""
        engine = self._engine
        if engine is not None and engine.alive:
            await asyncio.wrap_future(engine.forget_scope(scope))

    async def purge(self, adapter_id: str, sha256: str) -> list[str]:
        """Drop the prefix cache's blocks computed under the forgotten adapter's content
        (its slots and host copy are the store's, already freed)."""
        engine = self._engine
        if engine is None or not engine.alive or engine.prefix is None:
            return []
        dropped = await asyncio.wrap_future(engine.forget(sha256))
        return [f"prefix cache: {dropped} blocks of content {sha256[:12]}"]

    @property
    def free_kv_rows(self) -> int:
        """KV-cache rows not held by a sequence (``max_batch`` when idle)."""
        return self._require_engine().free_rows

    @property
    def live_sequences(self) -> int:
        """Sequences waiting for or holding a KV row."""
        return self._require_engine().live

    async def _start(self) -> Capabilities:
        """Load the weights and tokenizer, allocate KV and slots, start the step thread."""
        if not (self.model_path / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.model_path} holds no config.json; pass a Hugging Face checkpoint "
                "directory (lorapool.backends.torch.ensure_demo_model() makes one)"
            )
        from transformers import AutoTokenizer

        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_path)
        vocab_size = int(json.loads((self.model_path / "config.json").read_text())["vocab_size"])
        grammars, masks = await asyncio.to_thread(self._structured, vocab_size)
        engine = Engine(
            self._build,
            eos_ids=self._eos_ids(self._tokenizer),
            max_prefill_tokens=self.max_prefill_tokens,
            interleave_prefill=self.interleave_prefill,
            spare_rows=self.spare_rows,
            masks=masks,
            prefix=self._prefix_cache,
            adapt_threads=self.adapt_threads,
        )
        try:
            await asyncio.wrap_future(engine.start())
        except BaseException:
            if masks is not None:
                masks.close()
            raise
        cfg = engine.model.cfg
        self._engine = engine
        self._stats = engine.stats
        self._grammars = grammars
        self._vocab_size = cfg.vocab_size
        sampling = SAMPLING | (STRUCTURED if grammars is not None else frozenset())
        return Capabilities(
            max_slots=self.max_slots,
            max_rank=self.max_rank,
            max_batch=self.max_batch,
            base_model=self.model_path.name,
            target_modules=frozenset(cfg.module_shapes()),
            dynamic_load=True,
            pinning=True,
            max_seq_len=self.max_seq_len,
            preemption=True,
            resume=True,
            pass_stats=True,
            prefix_cache=engine.prefix is not None,
            model_path=self.model_path,
            sampling=frozenset(sampling),
            dora=not cfg.attention_bias,
            device_bytes=engine.lora.nbytes,
        )

    def _structured(self, vocab_size: int) -> tuple[Any, Any]:
        """llguidance's tokenizer (built once) and mask filler; ``(None, None)`` without it."""
        try:
            from .grammar import Grammars, MaskFiller
        except ImportError as exc:  # pragma: no cover - llguidance is in the torch extra
            log.warning("structured output is off: llguidance is not importable (%s)", exc)
            return None, None
        return Grammars(self._tokenizer, vocab_size), MaskFiller(vocab_size)

    def _build(self) -> tuple[LlamaModel, LoraSlots, KVCache]:
        """Runs on the engine thread."""
        threads = self.threads or min(process_usable_cpus(), torch.get_num_threads())
        torch.set_num_threads(threads)  # before LoraSlots, which reads it for the kernel
        log.info("TorchBackend threads: %d (asked for %s)", threads, self.threads)
        model = LlamaModel(self.model_path, dtype=self.dtype, device=self.device)
        cfg = model.cfg
        kernel: SgmvKernel | None = None
        if self.device.type == "cpu" and self.lora_kernel is not False:
            kernel = build_kernel() if self.lora_kernel else cpu_kernel()
        lora = LoraSlots(
            cfg.module_shapes(),
            cfg.num_layers,
            self.max_slots,
            self.max_rank,
            self.lora_dtype,
            self.device,
            kernel,
            capacity_bytes=self.lora_bytes,
            padded=self.lora_layout == "padded",
        )
        if self.lora_kernel is False:
            lora.triton = None  # lora_kernel=False: PyTorch's matmuls on every device
        rows = self.max_batch + self.spare_rows
        cache = KVCache(cfg, rows, self.max_seq_len, self.dtype, self.device)
        log.info(
            "TorchBackend ready: %s on %s, %d slots x rank %d (%.1f MiB), KV %d (+%d spare) x %d"
            " (%.1f MiB), LoRA kernel %s",
            self.model_path.name,
            self.device,
            self.max_slots,
            self.max_rank,
            lora.nbytes / 2**20,
            self.max_batch,
            self.spare_rows,
            self.max_seq_len,
            cache.nbytes / 2**20,
            lora.kernel.path.name if lora.kernel is not None else "off",
        )
        return model, lora, cache

    def _prefix_cache(self, cache: KVCache) -> PrefixCache | None:
        """The prefix cache over ``cache``'s layout, within the budget (engine thread)."""
        budget = self.prefix_cache_bytes
        if budget is None:
            budget = cache.nbytes // 2
        policy = load_policy(self.prefix_cache_eviction)
        prefix = PrefixCache(
            cache, budget_bytes=budget, block_size=self.prefix_block_size, policy=policy
        )
        if prefix.capacity == 0:
            return None
        log.info(
            "TorchBackend prefix cache: %d blocks of %d tokens (%.1f MiB)",
            prefix.capacity,
            prefix.block_size,
            prefix.capacity * prefix.block_bytes / 2**20,
        )
        return prefix

    def _eos_ids(self, tokenizer: Any) -> frozenset[int]:
        ids: set[int] = set()
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        gen = self.model_path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list):
                ids.update(int(e) for e in eos)
        return frozenset(ids)

    async def _aclose(self) -> None:
        """Stop the step thread; requests still running end with an error."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.stop)

    async def health(self) -> bool:
        """True while the step thread is alive."""
        return self._engine is not None and self._engine.alive

    def _require_engine(self) -> Engine:
        self._require_started()
        assert self._engine is not None  # set by _start, cleared by _aclose
        return self._engine

    # -- adapters --------------------------------------------------------------------

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Parse and lay out the adapter (on a short-lived thread) for a fast switch.

        The host tier then holds the compact tensors instead of the file's
        bytes, so a host-to-device switch is a copy of the adapter's own size.
        """
        if isinstance(adapter.prepared, PreparedAdapter):
            return adapter
        prepared = await self._prepare(adapter)
        return dataclasses.replace(
            adapter, weights=b"", prepared=prepared, prepared_nbytes=prepared.nbytes
        )

    async def _prepare(self, adapter: LoadedAdapter) -> PreparedAdapter:
        engine = self._require_engine()
        cfg = engine.model.cfg

        def prepare() -> PreparedAdapter:
            tensors = load_safetensors(adapter.weights)
            if adapter.config.use_dora and cfg.attention_bias:
                raise ValueError("DoRA is not served on a model whose projections have a bias")
            return prepare_adapter(
                adapter.adapter_id,
                adapter.config,
                tensors,
                cfg.module_shapes(),
                cfg.num_layers,
                self.max_rank,
                self.lora_dtype,
                BaseWeights(self.model_path, self.dtype) if adapter.config.use_dora else None,
            )

        try:
            return await _in_fresh_thread(prepare)
        except Exception as exc:
            raise LoadError(adapter.adapter_id, "host", str(exc)) from exc

    async def lora_resident_bytes(self) -> dict[str, int]:
        """``{adapter id: bytes}`` each resident adapter takes of the LoRA arena (whose
        capacity is ``capabilities.device_bytes``), read on the engine thread."""
        engine = self._require_engine()
        return await asyncio.wrap_future(engine.call(engine.lora.resident_bytes))

    def device_nbytes(self, adapter: LoadedAdapter) -> int:
        """Bytes of the LoRA arena the prepared adapter takes: its own rank and modules
        (``lora_layout="paged"``), or ``max_rank`` over every module (``"padded"``)."""
        engine = self._require_engine()
        prepared = adapter.prepared
        if not isinstance(prepared, PreparedAdapter):
            raise ValueError(f"{adapter.adapter_id!r} is not prepared (prepare() first)")
        return engine.lora.adapter_nbytes(prepared)

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Copy a prepared adapter into ``slot`` (preparing it first if needed)."""
        engine = self._require_engine()
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is out of range 0..{self.max_slots - 1}")
        prepared = adapter.prepared
        if not isinstance(prepared, PreparedAdapter):
            prepared = await self._prepare(adapter)
        if prepared.adapter_id != adapter.adapter_id:
            prepared = dataclasses.replace(prepared, adapter_id=adapter.adapter_id)
        final = prepared

        def install() -> None:
            content = engine.slot_content.pop(slot, None)  # uncached until its weights are whole
            try:
                engine.lora.copy_in(slot, final)
            except BaseException:
                if content is not None and engine.lora.occupant[slot] == previous:
                    engine.slot_content[slot] = content  # the occupant stayed, whole
                raise
            if adapter.sha256:
                engine.slot_content[slot] = adapter.sha256

        previous = engine.lora.occupant[slot]
        await asyncio.wrap_future(engine.call(install))
        if previous is not None and self._slot_of.get(previous) == slot:
            del self._slot_of[previous]
        self._slot_of[adapter.adapter_id] = slot

    def preempt(self, request_id: str) -> bool:
        """Free a running request's KV row for a waiting request; it resumes by recompute.

        The row is given up at the next step, and only if a request that was
        never preempted is waiting for a row then (or took a spare row meanwhile,
        see ``spare_rows``); the preempted request waits
        behind it and, when it gets a row again, one prefill over its prompt and
        output restores its KV (its stream pauses, nothing is lost). False when
        the request is not running or was already asked to pause.
        """
        engine = self._engine
        return engine is not None and engine.preempt(request_id)

    async def unload(self, adapter_id: str) -> None:
        """Free the adapter's slot (the store has drained its requests)."""
        engine = self._require_engine()
        slot = self._slot_of.pop(adapter_id, None)
        if slot is None:
            return

        def clear() -> None:
            engine.slot_content.pop(slot, None)
            engine.lora.clear(slot)

        await asyncio.wrap_future(engine.call(clear))

    def slot_of(self, adapter_id: str) -> int | None:
        """The slot an adapter occupies, if any."""
        return self._slot_of.get(adapter_id)

    # -- generation ------------------------------------------------------------------

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids, without special tokens."""
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def check_request(self, request: GenerationRequest) -> None:
        """:meth:`BaseBackend.check_request`, and the token ids and ``n`` checked against
        the model: a ``logit_bias`` or ``stop_token_ids`` id outside the vocabulary, or
        more samples than ``max_batch``, is :class:`~lorapool.errors.InvalidRequest`."""
        super().check_request(request)
        params = request.params
        for what, ids in (
            ("logit_bias", params.logit_bias),
            ("stop_token_ids", params.stop_token_ids),
        ):
            outside = sorted(t for t in ids if t >= self._vocab_size)
            if outside:
                raise InvalidRequest(
                    f"{what} names token {outside[0]}, outside the vocabulary "
                    f"(ids 0..{self._vocab_size - 1})"
                )
        if params.n > self.max_batch:
            raise InvalidRequest(
                f"n={params.n} samples exceed the engine's max_batch of {self.max_batch}"
            )
        if params.n > 1 and request.resume:
            raise InvalidRequest("a request of several samples cannot be resumed")

    def _token(self, token_id: int) -> str:
        """A token's text (cached)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = str(self._tokenizer.decode([token_id]))
        return text

    def _logprobs(self, event: Event) -> tuple[TokenLogprob, ...]:
        return tuple(
            TokenLogprob(
                token_id,
                self._token(token_id),
                logprob,
                tuple(TopLogprob(t, self._token(t), lp) for t, lp in top),
            )
            for token_id, logprob, top in event.logprobs
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a completion; leaving the loop early cancels it within one step.

        A request with ``resume`` tokens starts as a preempted sequence returns: its
        prompt and those tokens in one prefill, then the tokens still to come (greedy
        output unchanged; a seeded sample restarts its random stream). With ``n``
        samples, see the class's docstring for the stream's shape.
        """
        self.check_request(request)
        engine = self._require_engine()
        if request.adapter_id is not None and request.slot is None:
            raise InvalidRequest(f"adapter {request.adapter_id!r} has no device slot")
        # Tokenized on a worker thread (bounded by max_prompt_chars first): a long prompt
        # never holds up the event loop, which serves every other request.
        prompt_ids = await self.aencode(request.prompt, request.tools or None)
        if request.slot is not None and engine.lora.occupant[request.slot] != request.adapter_id:
            raise BackendError(
                f"slot {request.slot} holds {engine.lora.occupant[request.slot]!r}, "
                f"not {request.adapter_id!r}"
            )
        params = request.params
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        resumed = list(request.resume)
        if len(resumed) >= params.max_tokens:
            raise InvalidRequest(
                f"the request already has {len(resumed)} of its {params.max_tokens} tokens"
            )
        if len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the engine's max_seq_len {self.max_seq_len}; "
                "shorten the prompt or lower max_tokens"
            )
        matcher: Any = None
        if params.structured is not None:
            # Compiled off the event loop: a large schema or grammar takes milliseconds.
            matcher = await asyncio.to_thread(self._grammars.matcher, params.structured, resumed)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        seqs = [
            EngineSequence(
                request_id=request.request_id,
                prompt_ids=prompt_ids,
                params=params,
                slot=-1 if request.slot is None else request.slot,
                scope=request.cache_scope or "",
                sink=_sink(loop, queue, i),
                generator=_generator(params, i),
                output=list(resumed),
                index=i,
                matcher=None if matcher is None else matcher if i == 0 else matcher.deep_copy(),
            )
            for i in range(params.n)
        ]
        seqs[0].siblings = seqs[1:]
        samples = [_Sample(self.decode, params, resumed) for _ in seqs]
        produced = len(resumed)
        cached = 0
        open_samples = len(samples)
        served_by = "base" if request.adapter_id is None else "adapter"
        engine.submit(seqs[0])
        try:
            while open_samples:
                index, event = await queue.get()
                sample = samples[index]
                if sample.done:
                    continue  # a sample stopped by a stop string: its cancel's echo
                if isinstance(event.error, RowFault):
                    raise BackendError(
                        f"request {request.request_id} on adapter "
                        f"{request.adapter_id or '(base model)'} ended: {event.error.reason}; "
                        "the engine's other requests go on"
                    )
                if event.error is not None:
                    raise BackendError(
                        f"engine failed on request {request.request_id}: {event.error}"
                    )
                produced += event.produced
                cached = max(cached, event.cached)
                text, finish = sample.feed(event)
                if finish is not None and event.finish is None:
                    engine.cancel(request.request_id, index)  # a stop string
                if finish is not None:
                    open_samples -= 1
                    yield Chunk(
                        text=text,
                        token_ids=tuple(event.token_ids),
                        finish_reason=finish,
                        usage=None if open_samples else Usage(len(prompt_ids), produced, cached),
                        adapter_id=request.adapter_id,
                        served_by=served_by,
                        index=index,
                        logprobs=self._logprobs(event),
                    )
                elif text or event.token_ids:
                    yield Chunk(
                        text=text,
                        token_ids=tuple(event.token_ids),
                        adapter_id=request.adapter_id,
                        served_by=served_by,
                        index=index,
                        logprobs=self._logprobs(event),
                    )
        finally:
            if open_samples:
                engine.cancel(request.request_id)


class _Sample:
    """One sample's text so far: its detokenizer and stop strings."""

    def __init__(
        self, decode: Callable[[Sequence[int]], str], params: SamplingParams, resumed: list[int]
    ) -> None:
        self.detok = IncrementalDetokenizer(decode)
        self.detok.add(resumed)  # the text already streamed: context for what follows
        self.stops = StopMatcher(params.stop)
        self.done = False

    def feed(self, event: Event) -> tuple[str, FinishReason | None]:
        """The text to send for an event, and the sample's finish reason if it ended."""
        text = self.stops.feed(self.detok.add(event.token_ids)) if event.token_ids else ""
        finish: FinishReason | None = event.finish
        if self.stops.stopped and finish is None:
            finish = "stop"
        if finish is not None:
            self.done = True
            if not self.stops.stopped:
                text += self.stops.flush()
        return text, finish


def _sink(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[int, Event]], index: int
) -> Callable[[Event], None]:
    """The engine-thread callback that hands sample ``index``'s events to the stream."""

    def sink(event: Event) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, event))

    return sink


def _generator(params: SamplingParams, index: int) -> torch.Generator | None:
    """Sample ``index``'s random stream: ``seed + index`` with a seed, fresh otherwise."""
    if params.temperature <= 0:
        return None
    generator = torch.Generator()
    if params.seed is not None:
        generator.manual_seed(params.seed + index)
    else:
        generator.seed()
    return generator


async def _in_fresh_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a new thread that exits afterwards (see :meth:`Engine.start` for why)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(_set_exception, fut, exc)
        else:
            loop.call_soon_threadsafe(_set_result, fut, result)

    threading.Thread(target=target, name="lorapool-adapter-prepare", daemon=True).start()
    return await fut


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
