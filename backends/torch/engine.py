"""The continuous-batching loop that runs on its own thread.

One iteration ("step"): apply queued control operations (slot loads), drop
cancelled sequences, admit waiting sequences into free KV rows and prefill
them, then decode one token for every running sequence. Requests join and
leave between steps; the event loop never waits on a forward pass.

Each row's next token goes through its :class:`~.sampler.RowSampler` (bias, penalties,
``min_tokens``, a grammar's mask, temperature and truncation); a request of ``n`` samples
is prefilled once and its KV row copied into its siblings' rows. Grammar masks for the
next step are filled on a worker thread while the next forward runs (``grammar.py``).

A request that arrives while a decode step runs does not wait for the step to
end: between two of the decode's layers, fresh sequences that fit in free
rows are prefilled (their own forward pass, on rows the decode does not
touch), so a first token waits for one layer and a prefill instead of the rest
of a step that grows with the rows running (docs/decisions.md, "Prefill
between a decode's layers").

With a prefix cache (``prefix.py``), an admitted sequence whose tokens start with
blocks cached under its adapter's content gets them copied into its row and
prefills only the rest, from that position; its full blocks go into the cache after
its prefill and again when it leaves its row (finished, cancelled or preempted), so a
resumed sequence, or the next turn of a chat, finds its own earlier tokens there.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lorapool.types import FinishReason, SamplingParams

from .lora import LoraSlots
from .model import KVCache, LlamaModel
from .prefix import BASE_CONTENT, PrefixCache, chain_keys
from .sampler import NoTokenAllowed, RawLogprob, RowSampler, raw_logprobs
from .threads import ThreadGovernor

if TYPE_CHECKING:
    from .grammar import MaskFiller

__all__ = ["Engine", "EngineStats", "Event", "RowFault", "Sequence"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """What the engine tells a sequence's consumer: new tokens, or how it ended.

    ``produced`` counts the tokens generated, one more than ``token_ids`` when the
    sequence ended on a token that is not returned (end-of-sequence, a stop token id);
    ``logprobs`` has one entry per token of ``token_ids`` when the request asked.
    """

    token_ids: list[int]
    finish: FinishReason | None = None
    error: BaseException | None = None
    produced: int = 0
    logprobs: tuple[RawLogprob, ...] = ()
    cached: int = 0
    """Prompt tokens the sequence's first prefill took from the prefix cache."""


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    slot: int
    sink: Callable[[Event], None]
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    row: int = -1
    length: int = 0
    preempted: int = 0
    """Times this sequence gave up its KV row; it is recomputed from its tokens on return."""
    index: int = 0
    """Which of the request's ``n`` samples this is."""
    siblings: list[Sequence] = field(default_factory=list)
    """The request's other samples, waiting with this one (sample 0): they take rows right
    after it when it is admitted, with a copy of its prefilled KV row and its logits."""
    sampler: RowSampler | None = None
    """Bias, penalties, ``min_tokens`` and sampling (made by :meth:`Engine.submit`)."""
    matcher: Any = None
    """The llguidance matcher of a structured-output request."""
    pending_mask: tuple[Future[torch.Tensor], int, int] | None = None
    """A mask fill under way for this sequence: (future, its row, output length then)."""
    cached: int | None = None
    """Prompt tokens its first prefill took from the prefix cache (None: not prefilled)."""
    scope: str = ""
    """The prefix cache's isolation domain (the pool's digest of the tenant): cached
    blocks are shared only between sequences of one scope and one adapter content."""
    prefix_keys: tuple[str, list[bytes]] | None = None
    """The chained block keys of its tokens so far, and the content they were made for."""

    def rows_needed(self) -> int:
        """KV rows the sequence takes when admitted: its own and its waiting siblings'."""
        return 1 + len(self.siblings)

    def context(self) -> list[int]:
        """The tokens a prefill must run: the prompt, plus any output (after a preemption)."""
        return self.prompt_ids + self.output if self.output else self.prompt_ids


class RowFault(Exception):
    """One row of an engine step failed (non-finite logits, a sampling error).

    It ends that request alone; the step's other rows go on.
    """

    def __init__(self, request_id: str, reason: str) -> None:
        self.request_id = request_id
        self.reason = reason
        super().__init__(reason)


@dataclass
class EngineStats:
    """Counters the engine keeps; read them from any thread."""

    steps: int = 0
    prefill_steps: int = 0
    """Prefill forward passes (one admission may take several, :meth:`Engine._groups`)."""
    tokens_generated: int = 0
    max_running: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    distinct_adapters: dict[int, int] = field(default_factory=dict)
    """Forward passes (prefills and decode steps) by the distinct adapters in each
    (0: the base model only), counted by the step thread as it runs each pass: a
    histogram with one bucket per count. Copy it (``dict(...)``) to read it elsewhere."""
    row_faults: int = 0
    threads: int = 0
    """The engine thread's thread count after the last change the governor made (0: none)."""
    thread_changes: int = 0
    """Times the governor changed the thread count (:class:`~.threads.ThreadGovernor`)."""
    """Requests ended alone by a fault of their row (see :class:`RowFault`)."""
    preemptions: int = 0
    interleaved_prefills: int = 0
    """Prefills run between two layers of a decode step."""
    prefill_tokens: int = 0
    """Tokens of the contexts admitted to a prefill (prompts, and a resumed sequence's
    output), whether computed or taken from the prefix cache."""
    prefix_hit_tokens: int = 0
    """Of those, tokens whose keys and values were copied from the prefix cache."""


class Engine:
    """Owns the model, the KV cache and the LoRA slots; runs the step loop."""

    def __init__(
        self,
        build: Callable[[], tuple[LlamaModel, LoraSlots, KVCache]],
        *,
        eos_ids: frozenset[int],
        max_prefill_tokens: int,
        interleave_prefill: bool = True,
        spare_rows: int = 0,
        masks: MaskFiller | None = None,
        prefix: Callable[[KVCache], PrefixCache | None] | None = None,
        adapt_threads: bool = False,
    ) -> None:
        if spare_rows < 0:
            raise ValueError("spare_rows must be >= 0")
        self._make_prefix = prefix
        self.prefix: PrefixCache | None = None
        """The prefix cache (made on the engine thread at start; ``None``: off)."""
        self.slot_content: dict[int, str] = {-1: BASE_CONTENT}
        """The content (sha256) each LoRA slot holds, the base model's as slot -1; a slot
        missing here is never cached. Changed on the engine thread only."""
        self._build = build
        self.adapt_threads = adapt_threads
        self.governor: ThreadGovernor | None = None
        """Lowers the thread count while another process holds our cores (made at start,
        from the count the build set, when ``adapt_threads``)."""
        self.eos_ids = eos_ids
        self.max_prefill_tokens = max_prefill_tokens
        self.interleave_prefill = interleave_prefill
        self.spare_rows = spare_rows
        self.masks = masks
        self._rows = 0  # rows a decode step may run: the cache's, less the spare ones
        self.stats = EngineStats()
        self.logits_hook: Callable[[list[str], torch.Tensor], None] | None = None
        """Test hook: called on the engine thread with request ids and their logits."""
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cancelled: set[tuple[str, int | None]] = set()  # (request, sample or all)
        # Preemptions asked for, by request id, to the step start they were asked after;
        # ordered: first asked, first applied.
        self._preempt: dict[str, int] = {}
        self._step_starts = 0
        self._control: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._stop = False
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._main, name="lorapool-torch-engine", daemon=True
        )

    # -- called from other threads -------------------------------------------------

    def start(self) -> Future[None]:
        """Start the step thread; the future resolves once the model is built on it.

        Every tensor operation of the engine runs on this one thread, model
        loading included: a second long-lived thread that has run parallel
        torch ops (an executor thread, the event loop's) keeps its own OpenMP
        team alive and measurably slows the small ops of every later step.
        """
        self._thread.start()
        return self._ready

    @property
    def alive(self) -> bool:
        """True while the step thread runs."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop the step thread after the current step and fail what is left."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence (and its waiting siblings); admitted when KV rows are free."""
        for s in (seq, *seq.siblings):
            if s.sampler is None:
                s.sampler = RowSampler(s.params, eos_ids=self.eos_ids, generator=s.generator)
        with self._cond:
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, request_id: str, index: int | None = None) -> None:
        """Drop a request's sequences (only sample ``index``, if given) at the next step."""
        with self._cond:
            self._cancelled.add((request_id, index))
            self._cond.notify()

    def preempt(self, request_id: str) -> bool:
        """Ask that a running sequence give its KV row to a waiting one.

        Applied at the start of a step, and only while a sequence that was never
        preempted waits without a free row (or was already prefilled into a spare
        row during the step, see :meth:`_between_decode_layers`): the preempted
        sequence then waits behind it and, when it gets a row again, is recomputed
        from its prompt and output in one prefill; its stream just pauses. Returns
        False when the request is not running (not admitted yet, paused, or done) or
        was already asked to pause: one pause frees one row, so a second caller must
        pick another request. A request of several samples is never paused (False).
        """
        with self._cond:
            if request_id in self._preempt:
                return False
            mine = [s for s in self._running if s.request_id == request_id]
            if not mine or any(s.params.n > 1 for s in mine):
                return False
            self._preempt[request_id] = self._step_starts
            self._cond.notify()
            return True

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the engine thread between two steps."""
        fut: Future[Any] = Future()
        with self._cond:
            if self._stop:
                fut.set_exception(RuntimeError("engine is stopped"))
                return fut
            self._control.append((fn, fut))
            self._cond.notify()
        return fut

    def forget_scope(self, scope: str) -> Future[int]:
        """Drop the prefix cache's blocks of ``scope`` (a tenant's), between two steps;
        resolves to how many."""
        return self.call(
            lambda: 0 if self.prefix is None else self.prefix.index.forget_scope(scope)
        )

    def forget(self, content: str) -> Future[int]:
        """Drop the prefix cache's blocks of ``content`` (between two steps); resolves to
        how many were dropped."""
        return self.call(lambda: 0 if self.prefix is None else self.prefix.index.forget(content))

    @property
    def free_rows(self) -> int:
        """KV rows not held by a running sequence (the spare rows not counted)."""
        with self._cond:
            return max(0, self._rows - len(self._running))

    @property
    def live(self) -> int:
        """Sequences waiting or running."""
        with self._cond:
            return len(self._waiting) + len(self._running)

    # -- the engine thread ---------------------------------------------------------

    def _main(self) -> None:
        torch.set_grad_enabled(False)
        try:
            self.model, self.lora, self.cache = self._build()
            self.rope = self.model.rope_tables(self.cache.max_seq_len)
            if self._make_prefix is not None:
                self.prefix = self._make_prefix(self.cache)
            if self.adapt_threads:
                self.governor = ThreadGovernor(torch.get_num_threads())
            self._rows = self.cache.rows - self.spare_rows
            if self._rows < 1:
                raise ValueError(
                    f"a cache of {self.cache.rows} rows leaves none beside "
                    f"{self.spare_rows} spare ones"
                )
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        self._loop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._waiting or self._running or self._control):
                    if self.governor is not None:
                        self.governor.idle()
                    self._cond.wait()
                if self._stop:
                    break
                control = list(self._control)
                self._control.clear()
                cancelled = self._cancelled
                self._cancelled = set()
                self._apply_preemptions()
                admitted = self._admit(cancelled)
            for fn, fut in control:
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)
            for seq in [s for s in self._running if _is_cancelled(s, cancelled)]:
                self._finish(seq, "cancelled")
            if self.governor is not None and self.governor.resting and (admitted or self._running):
                self._use_threads(self.governor.wake())  # steps again after a wait
            try:
                if admitted:
                    t0 = time.perf_counter()
                    self._prefill(admitted)
                    self.stats.prefill_seconds += time.perf_counter() - t0
                if self._running:
                    t0 = time.perf_counter()
                    prefill_s = self.stats.prefill_seconds
                    self._decode()
                    # Less the prefills run between its layers (counted as prefill time).
                    interleaved = self.stats.prefill_seconds - prefill_s
                    self.stats.decode_seconds += time.perf_counter() - t0 - interleaved
                if self.governor is not None and (admitted or self._running):
                    self._govern(self.governor)
            except Exception as exc:
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._finish(seq, None, exc)
        for seq in list(self._running):
            self._finish(seq, None, RuntimeError("engine stopped"))
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for seq in waiting:
            for s in (seq, *seq.siblings):
                s.sink(Event([], error=RuntimeError("engine stopped")))
        if self.masks is not None:
            self.masks.close()

    def _govern(self, governor: ThreadGovernor) -> None:
        """Run the next step with the thread count the governor says."""
        self._use_threads(governor.step())

    def _use_threads(self, threads: int) -> None:
        """Run the next steps with ``threads`` threads (this thread's count)."""
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.stats.threads = threads
            self.stats.thread_changes += 1

    def _apply_preemptions(self) -> None:
        """Free rows for fresh waiting sequences by preempting as asked (lock held).

        A preemption still not applied at the second step start after it was asked is
        dropped: the newcomer it was asked for found a row freed otherwise (waiting one
        start more leaves time for its submission to arrive after the ask). Kept, it
        would later pause a request for a newcomer nobody asked a pause for, and make
        the request look paused to a caller asking again (:meth:`preempt` refuses one
        already asked).
        """
        self._step_starts += 1
        running = {s.request_id: s for s in self._running}
        for rid in [r for r in self._preempt if r not in running]:
            del self._preempt[rid]  # finished or cancelled meanwhile
        fresh = sum(s.rows_needed() for s in self._waiting if not s.preempted)
        short = fresh - (self._rows - len(self._running))  # < 0 rows free; > 0 in spare rows
        while short > 0 and self._preempt:
            rid = next(iter(self._preempt))
            del self._preempt[rid]
            seq = running[rid]
            self._release_row(seq)
            seq.preempted += 1
            self._waiting.append(seq)
            self.stats.preemptions += 1
            short -= 1
        for rid in [r for r, asked in self._preempt.items() if asked < self._step_starts - 1]:
            del self._preempt[rid]

    def _admit(self, cancelled: set[tuple[str, int | None]]) -> list[Sequence]:
        """Take waiting sequences into free rows, within the prefill budget (lock held).

        Sequences that have not started go before paused ones: a pause made room for
        a newcomer, and the paused sequence resuming first would take that room back.
        """
        for seq in [s for s in self._waiting if _is_cancelled(s, cancelled)]:
            self._waiting.remove(seq)
            for s in (seq, *seq.siblings):
                s.sink(Event([], "cancelled"))
        fresh = [s for s in self._waiting if not s.preempted]
        return self._take(fresh + [s for s in self._waiting if s.preempted])

    def _take(self, candidates: list[Sequence], rows: int | None = None) -> list[Sequence]:
        """Move candidates, in order, from waiting into free rows (of the first ``rows``,
        by default those a decode may run) within the prefill budget (lock held)."""
        admitted: list[Sequence] = []
        free = (self._rows if rows is None else rows) - len(self._running)
        longest = taken = 0
        for seq in candidates:
            if taken + seq.rows_needed() > free:
                break
            context = seq.context()
            hit = len(self._cached_blocks(seq, context, touch=False)) * self._block_size
            longest_if = max(longest, len(context) - hit)
            if admitted and longest_if * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            longest = longest_if
            taken += seq.rows_needed()
            admitted.append(seq)
        for seq in admitted:
            self._waiting.remove(seq)
        return admitted

    def _between_decode_layers(self) -> None:
        """Prefill fresh arrivals that fit in free rows, in the middle of a decode step.

        Only sequences that have not started (a paused one waits for the next step)
        and are not being cancelled; the decode's rows are the first ``len(running)``
        at its start and the prefill takes rows after them, so neither touches the
        other's cache, and a sequence that ends at its first token frees a row past
        the decode's too. With every row taken, a spare row takes a newcomer for each
        preemption asked for and not yet applied: the paused sequence leaves at the
        step's end (:meth:`_apply_preemptions`), and the newcomer has its first token
        by then instead of waiting for the step to end and then its prefill.
        """
        limit = self._rows + (self.spare_rows if self._preempt else 0)
        if not self._waiting or len(self._running) >= limit:
            return  # unlocked peek: an arrival missed here goes at the next layer or step
        with self._cond:
            fresh = [
                s
                for s in self._waiting
                if not s.preempted and not _is_cancelled(s, self._cancelled)
            ]
            running = {s.request_id for s in self._running}
            pending = sum(1 for rid in self._preempt if rid in running)
            rows = self._rows + min(self.spare_rows, pending)
            admitted = self._take(fresh, rows) if fresh else []
        if admitted:
            t0 = time.perf_counter()
            self._prefill(admitted)
            self.stats.prefill_seconds += time.perf_counter() - t0
            self.stats.interleaved_prefills += 1

    def _forward(
        self,
        tokens: torch.Tensor,
        row_start: int,
        starts: torch.Tensor,
        last: torch.Tensor,
        token_slots: list[int],
        between_layers: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        plan = self.lora.plan(token_slots)
        passes = self.stats.distinct_adapters  # one dict update a pass: no lock
        passes[plan.distinct] = passes.get(plan.distinct, 0) + 1
        return self.model.forward(
            tokens,
            row_start,
            starts,
            last,
            self.cache,
            self.rope,
            self.lora,
            plan if plan.distinct else None,
            between_layers,
        )

    @property
    def _block_size(self) -> int:
        return 0 if self.prefix is None else self.prefix.block_size

    def _keys(self, seq: Sequence, tokens: list[int]) -> tuple[str, list[bytes]] | None:
        """The content and chained keys of ``tokens``' full blocks (a prefix of the
        sequence's context; kept on the sequence and extended as it grows); ``None``
        when the sequence is not cached (no prefix cache, or a slot of unknown content)."""
        content = self.slot_content.get(seq.slot)
        if self.prefix is None or content is None:
            return None
        bs = self.prefix.block_size
        known: list[bytes] = []
        if seq.prefix_keys is not None and seq.prefix_keys[0] == content:
            known = seq.prefix_keys[1]
        full = len(tokens) // bs
        if len(known) < full:
            known = chain_keys(content, tokens, bs, known, scope=seq.scope)
            seq.prefix_keys = (content, known)
        return content, known[:full]

    def _cached_blocks(self, seq: Sequence, context: list[int], *, touch: bool) -> list[int]:
        """The pool blocks of the longest cached prefix of ``context``, leaving at least
        its last token to compute (its logits are the next token's)."""
        if self.prefix is None:
            return []
        keyed = self._keys(seq, context[: len(context) - 1])
        if keyed is None:
            return []
        return self.prefix.index.match(keyed[1], touch=touch)

    def _store(self, seq: Sequence, length: int) -> None:
        """Cache the full blocks of the sequence's first ``length`` positions not cached
        yet, copying them out of its row (which holds their keys and values)."""
        if self.prefix is None or seq.row < 0 or length < self.prefix.block_size:
            return
        keyed = self._keys(seq, seq.context()[:length])
        if keyed is None:
            return
        content, keys = keyed
        placed = self.prefix.index.insert(keys, content, self.prefix.block_bytes, seq.scope)
        if placed:
            self.prefix.copy_out(self.cache, seq.row, placed)

    def _groups(self, todo: list[int], starts: list[int]) -> list[list[int]]:
        """The prefill's forward passes: indices into the admitted sequences, by pass.

        One pass pads every row to its longest; a row with a cached prefix computes few
        tokens, so it joins rows of a similar length only (padding it to a cache miss's
        length would recompute as many tokens as the cache saved). Rows start at their
        cached length, and no row may reach past ``max_seq_len`` in its pass.
        """
        order = sorted(range(len(todo)), key=lambda i: -todo[i])
        groups: list[list[int]] = []
        width = 0
        for i in order:
            if (
                groups
                and width <= todo[i] + _SPLIT_TOKENS
                and starts[i] + width <= self.cache.max_seq_len
            ):
                groups[-1].append(i)
            else:
                groups.append([i])
                width = todo[i]
        if len(groups) == 1:
            return [list(range(len(todo)))]  # admission order
        return groups

    def _prefill(self, seqs: list[Sequence]) -> None:
        dev = self.model.device
        row0 = len(self._running)
        contexts = [s.context() for s in seqs]
        hits = [self._cached_blocks(s, c, touch=True) for s, c in zip(seqs, contexts, strict=True)]
        starts = [len(h) * self._block_size for h in hits]
        todo = [len(c) - h for c, h in zip(contexts, starts, strict=True)]
        groups = self._groups(todo, starts)
        ordered = [seqs[i] for g in groups for i in g]
        parts: list[torch.Tensor] = []
        row = row0
        for group in groups:
            width = max(todo[i] for i in group)
            tokens = torch.zeros(len(group), width, dtype=torch.long)
            slots: list[int] = []
            for k, i in enumerate(group):
                s, ids = seqs[i], contexts[i][starts[i] :]
                tokens[k, : len(ids)] = torch.tensor(ids)
                slots.extend([s.slot] * len(ids) + [-1] * (width - len(ids)))
                s.row = row + k
                s.length = len(contexts[i])
                if hits[i]:
                    assert self.prefix is not None
                    self.prefix.copy_in(self.cache, s.row, hits[i])
                if s.cached is None:  # the first prefill: the prompt's cached tokens
                    s.cached = min(starts[i], len(s.prompt_ids))
                self.stats.prefill_tokens += len(contexts[i])
                self.stats.prefix_hit_tokens += starts[i]
            last = torch.tensor([todo[i] - 1 for i in group], device=dev)
            begin = torch.tensor([starts[i] for i in group], dtype=torch.long, device=dev)
            parts.append(self._forward(tokens.to(dev), row, begin, last, slots))
            self.stats.prefill_steps += 1
            row += len(group)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.prefix is not None:
            finite = torch.isfinite(logits).all(dim=-1).tolist()
            for s, ok in zip(ordered, finite, strict=True):
                if ok:  # a row of non-finite logits ends with a fault: its KV is not kept
                    self._store(s, s.length)
        # A request's other samples: rows right after the prefilled ones, with a copy of
        # sample 0's KV row and its logits.
        siblings: list[Sequence] = []
        source: list[int] = []
        for i, s in enumerate(ordered):
            for sib in s.siblings:
                sib.row = row0 + len(ordered) + len(siblings)
                sib.length = s.length
                sib.cached = s.cached
                self.cache.move_row(s.row, sib.row, s.length)
                siblings.append(sib)
                source.append(i)
            s.siblings = []
        if siblings:
            index = list(range(len(ordered))) + source
            logits = logits[torch.tensor(index, device=logits.device)]
        self._running.extend(ordered + siblings)
        self.stats.max_running = max(self.stats.max_running, len(self._running))
        self._emit(ordered + siblings, logits)

    def _decode(self) -> None:
        dev = self.model.device
        seqs = list(self._running)
        tokens = torch.tensor([[s.output[-1]] for s in seqs], dtype=torch.long, device=dev)
        starts = torch.tensor([s.length for s in seqs], dtype=torch.long, device=dev)
        last = torch.zeros(len(seqs), dtype=torch.long, device=dev)
        between = self._between_decode_layers if self.interleave_prefill else None
        logits = self._forward(tokens, 0, starts, last, [s.slot for s in seqs], between)
        for s in seqs:
            s.length += 1
        self.stats.steps += 1
        self._emit(seqs, logits)

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        if self.logits_hook is not None:
            self.logits_hook([s.request_id for s in seqs], logits)
        # In inference mode, like the forward pass that made the logits: a sequence's
        # sampler state may be made during a prefill between a decode's layers (inside the
        # forward) and updated in place after it.
        with torch.inference_mode():
            chosen = self._sample(seqs, logits)
        asked = [
            i
            for i, (s, t) in enumerate(zip(seqs, chosen, strict=True))
            if s.params.logprobs and not isinstance(t, RowFault)
        ]
        logprobs: dict[int, RawLogprob] = {}
        if asked:
            picked = [int(c) for c in (chosen[i] for i in asked) if not isinstance(c, RowFault)]
            top = [seqs[i].params.top_logprobs for i in asked]
            logprobs = dict(zip(asked, raw_logprobs(logits, asked, picked, top), strict=True))
        for i, (seq, tok) in enumerate(zip(seqs, chosen, strict=True)):
            if not isinstance(tok, RowFault) and seq.matcher is not None:
                tok = self._advance_grammar(seq, tok)
            if isinstance(tok, RowFault):
                # This row alone ends: the other rows of the step go on.
                self.stats.row_faults += 1
                log.warning("request %s ended by a row fault: %s", seq.request_id, tok)
                self._finish(seq, None, tok)
                continue
            self.stats.tokens_generated += 1
            seq.output.append(tok)
            lp = (logprobs[i],) if i in logprobs else ()
            finish: FinishReason | None = None
            hidden = tok in seq.params.stop_token_ids or (
                tok in self.eos_ids and (not seq.params.ignore_eos or seq.matcher is not None)
            )
            if hidden:
                finish = "stop"  # the end-of-sequence or stop token is not returned
            elif seq.matcher is not None and seq.matcher.is_stopped():
                finish = "stop"  # the grammar is complete: only end-of-sequence could follow
            elif len(seq.output) >= seq.params.max_tokens:
                finish = "length"
            cached = seq.cached or 0
            if finish is None:
                seq.sink(Event([tok], produced=1, logprobs=lp, cached=cached))
            else:
                self._release_row(seq)
                ids = [] if hidden else [tok]
                lp = () if hidden else lp
                seq.sink(Event(ids, finish, produced=1, logprobs=lp, cached=cached))
        self._start_masks(seqs)

    def _advance_grammar(self, seq: Sequence, tok: int) -> int | RowFault:
        """Feed the token to the row's matcher; a matcher error is the row's fault."""
        try:
            if seq.matcher.consume_token(tok) and not seq.matcher.is_error():
                return tok
            reason = seq.matcher.get_error() or f"token {tok} does not follow the grammar"
        except Exception as exc:  # llguidance's misuse errors: this row's, not the step's
            reason = str(exc)
        return RowFault(seq.request_id, f"structured output failed: {reason}")

    def _start_masks(self, seqs: list[Sequence]) -> None:
        """Start filling the next step's masks of the rows under a grammar (worker thread)."""
        live = [s for s in seqs if s.matcher is not None and s.row >= 0]
        if not live or self.masks is None:
            return
        buffer = self.masks.buffer(len(live))
        future = self.masks.start([s.matcher for s in live], buffer)
        for j, s in enumerate(live):
            s.pending_mask = (future, j, len(s.output))

    def _grammar_masks(self, seqs: list[Sequence]) -> dict[int, torch.Tensor]:
        """Each grammar row's allowed tokens (by its index in ``seqs``), in one batch.

        Masks filled ahead of time (:meth:`_start_masks`) are waited for; the rows
        without one (just prefilled, resumed) are filled now, in one parallel call.
        """
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows or self.masks is None:
            return {}
        stale: list[int] = []
        for i in rows:
            pending = seqs[i].pending_mask
            if pending is None or pending[2] != len(seqs[i].output):
                stale.append(i)
        fresh = self.masks.fill([seqs[i].matcher for i in stale], self.masks.buffer(len(stale)))
        bitmask = self.masks.buffer(len(rows))
        for j, i in enumerate(rows):
            pending, seqs[i].pending_mask = seqs[i].pending_mask, None
            if i in stale or pending is None:
                bitmask[j] = fresh[stale.index(i)]
            else:
                future, k, _ = pending
                bitmask[j] = future.result()[k]
        allowed = self.masks.allowed(bitmask)
        return {i: allowed[j] for j, i in enumerate(rows)}

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | RowFault]:
        """The next token of each row, or the :class:`RowFault` that ends that row alone.

        A row whose logits are not all finite (an adapter that overflowed) is a fault,
        and so is a grammar that allows no token. A greedy row with nothing to process
        takes the batch's arg-max; the others go through their :class:`RowSampler`
        (``RowSampler.choose`` keeps tiny temperatures greedy and ``top_p`` keeping the
        likeliest token).
        """
        chosen: list[int | RowFault] = [int(c) for c in logits.argmax(dim=-1).tolist()]
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        try:
            allowed = self._grammar_masks(seqs)
        except Exception as exc:  # a failed mask fill: the grammar rows', not the step's
            allowed = {}
            for i, seq in enumerate(seqs):
                if seq.matcher is not None:
                    chosen[i] = RowFault(seq.request_id, f"structured output failed: {exc}")
        work: list[int] = []  # rows whose logits change before the pick
        for i, seq in enumerate(seqs):
            if isinstance(chosen[i], RowFault):
                continue
            if not finite[i]:
                chosen[i] = RowFault(seq.request_id, "the adapter's logits are not finite")
            elif seq.matcher is not None and seq.matcher.is_error():
                reason = seq.matcher.get_error()
                chosen[i] = RowFault(seq.request_id, f"structured output failed: {reason}")
            elif seq.sampler is not None and (seq.sampler.processes or i in allowed):
                work.append(i)
        if not work:
            return chosen
        # One copy of those rows, the grammar masks applied in one op (a mask's -inf is
        # unchanged by the bias and penalties that come before it in RowSampler's order).
        rows = logits[work].to(torch.float32)
        masked = [j for j, i in enumerate(work) if i in allowed]
        if masked:
            banned = ~torch.stack([allowed[work[j]] for j in masked])
            rows[masked] = rows[masked].masked_fill(banned, -torch.inf)
        # Greedy rows with nothing else to process: one arg-max (a row with no allowed
        # token is a fault).
        plain = [j for j, i in enumerate(work) if not _processes(seqs[i])]
        if plain:
            top, best = rows[plain].max(dim=-1)
            for j, value, token in zip(plain, top.tolist(), best.tolist(), strict=True):
                seq = seqs[work[j]]
                if value == -math.inf:
                    chosen[work[j]] = RowFault(seq.request_id, "sampling failed: no token allowed")
                else:
                    chosen[work[j]] = int(token)
        for j, i in enumerate(work):
            seq = seqs[i]
            if not _processes(seq):
                continue
            assert seq.sampler is not None
            try:
                row = seq.sampler.process(rows[j], seq.prompt_ids, seq.output, None)
                chosen[i] = seq.sampler.choose(row)
            except (RuntimeError, NoTokenAllowed) as exc:  # this row's, not the step's
                chosen[i] = RowFault(seq.request_id, f"sampling failed: {exc}")
        return chosen

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason | None,
        error: BaseException | None = None,
        emit: list[int] | None = None,
    ) -> None:
        """Free the sequence's row and tell its consumer (an error's row is not cached)."""
        self._release_row(seq, keep=error is None)
        seq.sink(Event(emit or [], reason, error, cached=seq.cached or 0))

    def _release_row(self, seq: Sequence, *, keep: bool = True) -> None:
        """Take the sequence out of the running rows, keeping them packed; its full
        blocks not cached yet go into the prefix cache first (``keep``)."""
        if seq.row >= 0 and seq.row < len(self._running) and self._running[seq.row] is seq:
            if keep:
                self._store(seq, seq.length)
            last = self._running[-1]
            if last is not seq:
                self.cache.move_row(last.row, seq.row, last.length)
                last.row = seq.row
                self._running[seq.row] = last
            self._running.pop()
            seq.row = -1


_SPLIT_TOKENS = 128
"""A prefill row this many tokens shorter than the pass's longest goes in a pass of its
own: padding it costs more than a pass's fixed work (:meth:`Engine._groups`)."""


def _processes(seq: Sequence) -> bool:
    """Whether the sequence's sampler does more than an arg-max of its (masked) logits."""
    return seq.sampler is not None and seq.sampler.processes


def _is_cancelled(seq: Sequence, cancelled: set[tuple[str, int | None]]) -> bool:
    """Whether a cancel names the sequence's request (all samples) or this sample."""
    return (seq.request_id, None) in cancelled or (seq.request_id, seq.index) in cancelled
