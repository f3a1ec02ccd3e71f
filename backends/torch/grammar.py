"""Structured output for the embedded engine, with llguidance.

:class:`Grammars` holds the tokenizer llguidance matches against (built once, at start)
and compiles a request's :class:`~lorapool.sampling.StructuredOutput` into a matcher when
the request arrives (off the event loop); one that does not compile is refused with
:class:`~lorapool.errors.InvalidRequest` carrying llguidance's message. JSON is compact:
no whitespace between tokens.

:class:`MaskFiller` fills the next-token masks of many matchers (different grammars,
different adapters) in one parallel call, on a worker thread: the engine starts it right
after a step's tokens are consumed, so it overlaps the next forward pass, and applies the
masks just before sampling. The worker only calls llguidance (no torch op): buffers are
made on the engine thread (see ``Engine.start`` for why).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import llguidance.hf
import torch
from llguidance import LLExecutor, LLMatcher, LLTokenizer

from lorapool.errors import InvalidRequest
from lorapool.sampling import StructuredOutput

__all__ = ["Grammars", "MaskFiller", "allowed_tokens", "grammar_text"]

_COMPACT: Any = {"whitespace_flexible": False}
"""JSON without whitespace between tokens (llguidance's JSON compile options)."""


def grammar_text(structured: StructuredOutput) -> str:
    """llguidance's grammar for a structured-output request (not yet checked).

    Raises ``ValueError`` where llguidance refuses the input outright.
    """
    kind, spec = structured.kind, structured.spec or ""
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_COMPACT)
    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(spec, defaults=_COMPACT)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in structured.choices)
        )
    return LLMatcher.grammar_from_lark(spec)


class Grammars:
    """llguidance's view of the model's tokenizer, and the matchers compiled against it.

    ``vocab_size`` is the model's (its logits' width), which may exceed the tokenizer's.
    Building it takes a fraction of a second: once per backend.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.tokenizer: LLTokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)

    def matcher(self, structured: StructuredOutput, resume: Sequence[int] = ()) -> LLMatcher:
        """A matcher at the start of ``structured``'s grammar, after the ``resume`` tokens.

        Raises :class:`~lorapool.errors.InvalidRequest` with llguidance's message when
        the schema, pattern or grammar does not compile.
        """
        what = structured.kind.replace("_", " ")
        try:
            text = grammar_text(structured)
        except ValueError as exc:
            raise InvalidRequest(f"the {what} does not compile: {exc}") from None
        matcher = LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"the {what} does not compile: {matcher.get_error().strip()}")
        if resume and not matcher.consume_tokens(list(resume)):
            raise InvalidRequest(
                f"the resumed tokens do not follow the {what}: {matcher.get_error().strip()}"
            )
        return matcher


class MaskFiller:
    """Next-token bitmasks of many matchers in one parallel llguidance call.

    :meth:`fill` computes them now, on the calling thread; :meth:`start` on the worker
    thread, returning a future. A bitmask row holds ``ceil(vocab / 32)`` int32 words, bit
    ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        # One executor per calling thread: the worker's fills and the engine thread's own
        # (rows just prefilled) may run at once.
        self._executors = {"now": LLExecutor(), "worker": LLExecutor()}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lorapool-grammar-masks")

    def buffer(self, rows: int) -> torch.Tensor:
        """A bitmask buffer for ``rows`` matchers (make it on the engine thread)."""
        return torch.empty((rows, self.words), dtype=torch.int32)

    def fill(
        self, matchers: Sequence[LLMatcher], buffer: torch.Tensor, on: str = "now"
    ) -> torch.Tensor:
        """Fill ``buffer``'s first ``len(matchers)`` rows with their masks; return it."""
        if matchers:
            assert buffer.is_contiguous() and buffer.shape[0] >= len(matchers)
            self._executors[on].unsafe_compute_mask_ptr(
                [(m, i) for i, m in enumerate(matchers)],
                buffer.data_ptr(),
                self.words * 4,
                buffer.shape[0],
            )
        return buffer

    def start(self, matchers: Sequence[LLMatcher], buffer: torch.Tensor) -> Future[torch.Tensor]:
        """:meth:`fill` on the worker thread; the matchers must not change until it is done."""
        return self._worker.submit(self.fill, list(matchers), buffer, "worker")

    def allowed(self, bitmask: torch.Tensor) -> torch.Tensor:
        """The boolean ``[rows, vocab_size]`` mask of a bitmask ``[rows, words]``."""
        return allowed_tokens(bitmask, self.vocab_size)

    def close(self) -> None:
        """Stop the worker thread (after the fill it runs, if any)."""
        self._worker.shutdown(wait=True)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The boolean ``[rows, vocab_size]`` mask of a bitmask ``[rows, words]``."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
