"""One row's logits processing and sampling, and the log-probabilities a request asks for.

A row's logits go through, in order: ``logit_bias``, ``repetition_penalty`` (prompt and
output), ``presence_penalty`` / ``frequency_penalty`` (output), ``min_tokens`` (the
end-of-sequence token and ``stop_token_ids`` banned before that many outputs), the
grammar's mask (structured output), then temperature, ``top_k``, ``top_p``, ``min_p`` and
sampling (vLLM's meanings, see :class:`~lorapool.sampling.SamplingParams`). A greedy row
with nothing to process is never copied: its token is the batch's arg-max.

Log-probabilities come from the raw logits, before any of the above, and are computed
only for the rows that ask (:func:`raw_logprobs`).

Every tensor here is made and used on the engine thread (see ``Engine.start``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorapool.sampling import SamplingParams

__all__ = ["NoTokenAllowed", "RawLogprob", "RowSampler", "raw_logprobs"]

RawLogprob = tuple[int, float, tuple[tuple[int, float], ...]]
"""A produced token's id and log-probability, and the likeliest ``(id, logprob)`` pairs."""


class NoTokenAllowed(RuntimeError):
    """Every token of a row was banned (its grammar, ``min_tokens``): nothing to sample."""


class RowSampler:
    """How one sequence turns its row of logits into its next token.

    Built from the request's parameters; the penalty state (which tokens the prompt and
    output hold, how often the output holds each) is made on first use and kept up to
    date from the sequence's output, so a preempted or resumed sequence carries it on.
    """

    def __init__(
        self,
        params: SamplingParams,
        *,
        eos_ids: frozenset[int],
        generator: torch.Generator | None,
    ) -> None:
        self.params = params
        self.generator = generator
        self.stop_ids = frozenset(params.stop_token_ids)
        banned = set(self.stop_ids)
        if not params.ignore_eos:
            banned |= eos_ids
        self._min_banned = sorted(banned)
        self._penalised = (
            params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
            or params.repetition_penalty != 1.0
        )
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        self._counts: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        self._folded = 0

    @property
    def processes(self) -> bool:
        """Whether the row's logits change before the pick (else greedy rows take the arg-max)."""
        p = self.params
        return bool(p.logit_bias or self._penalised or p.min_tokens or p.temperature > 0.0)

    def process(
        self,
        row: torch.Tensor,
        prompt: Sequence[int],
        output: Sequence[int],
        allowed: torch.Tensor | None,
    ) -> torch.Tensor:
        """The row's logits after bias, penalties, ``min_tokens`` and the grammar's mask.

        ``row`` is a float32 copy the method may change in place; ``allowed`` is the
        grammar's boolean mask over the vocabulary, or ``None`` without a grammar.
        """
        p = self.params
        if p.logit_bias:
            if self._bias is None:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
                values = torch.tensor(list(p.logit_bias.values()), device=row.device)
                self._bias = ids, values
            row.index_add_(0, self._bias[0], self._bias[1])
        if self._penalised:
            self._fold(row, prompt, output)
            assert self._counts is not None and self._seen is not None
            if p.repetition_penalty != 1.0:
                rp = p.repetition_penalty
                penalised = torch.where(row > 0, row / rp, row * rp)
                row = torch.where(self._seen, penalised, row)
            if p.frequency_penalty != 0.0:
                row -= p.frequency_penalty * self._counts
            if p.presence_penalty != 0.0:
                row -= p.presence_penalty * (self._counts > 0).to(row.dtype)
        if self._min_banned and len(output) < p.min_tokens:
            row[self._min_banned] = -torch.inf
        if allowed is not None:
            row.masked_fill_(~allowed, -torch.inf)
        return row

    def _fold(self, row: torch.Tensor, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Bring the penalty state up to date with the output (made on first use)."""
        if self._counts is None or self._seen is None:
            self._counts = torch.zeros(row.shape[-1], dtype=row.dtype, device=row.device)
            self._seen = torch.zeros(row.shape[-1], dtype=torch.bool, device=row.device)
            self._seen[torch.tensor(list(prompt), dtype=torch.long, device=row.device)] = True
            self._folded = 0
        new = output[self._folded :]
        if new:
            ids = torch.tensor(list(new), dtype=torch.long, device=row.device)
            self._counts.index_add_(
                0, ids, torch.ones(len(new), dtype=row.dtype, device=ids.device)
            )
            self._seen[ids] = True
            self._folded = len(output)

    def choose(self, row: torch.Tensor) -> int:
        """Pick the next token from processed logits (see the module's order).

        Temperature scaling subtracts the row's maximum first, so every positive
        temperature gives a valid distribution: as it approaches zero it approaches
        greedy instead of overflowing; a temperature below the dtype's smallest normal
        number acts as that number. ``top_p`` always keeps the likeliest token, so a
        ``top_p`` too small for the dtype is greedy, never an empty distribution.
        Raises :class:`NoTokenAllowed` when every token is banned.
        """
        p = self.params
        top = row.max()
        if not bool(torch.isfinite(top)):
            raise NoTokenAllowed("no token is allowed (every one is banned or masked)")
        if p.temperature == 0.0:
            return int(row.argmax())
        temperature = max(p.temperature, torch.finfo(row.dtype).tiny)
        scaled = (row - top) / temperature
        order: torch.Tensor | None = None
        if p.top_k is not None and p.top_k < scaled.shape[-1]:
            scaled, order = scaled.topk(p.top_k)  # sorted, likeliest first
        probs = torch.softmax(scaled, dim=-1)
        if p.min_p > 0.0:
            probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
        if p.top_p < 1.0:
            if order is None:
                probs, order = probs.sort(descending=True)
            keep = probs.cumsum(0) - probs < p.top_p
            keep[0] = True  # the likeliest token stays, however small top_p is
            probs = torch.where(keep, probs, 0.0)
        pick = int(torch.multinomial(probs.cpu(), 1, generator=self.generator).item())
        return pick if order is None else int(order[pick])


def raw_logprobs(
    logits: torch.Tensor, rows: list[int], chosen: list[int], top: list[int]
) -> list[RawLogprob]:
    """The log-probability of ``chosen[j]`` in row ``rows[j]`` and its ``top[j]`` likeliest
    alternatives (sorted, likeliest first), from the raw logits' log-softmax, in one batch."""
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    picked = lp.gather(1, torch.tensor(chosen, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    k = max(top, default=0)
    if k:
        values, ids = lp.topk(k, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    out: list[RawLogprob] = []
    for j, (token, logprob) in enumerate(zip(chosen, picked, strict=True)):
        alts: tuple[tuple[int, float], ...] = ()
        if top[j]:
            alts = tuple(zip(top_ids[j][: top[j]], top_values[j][: top[j]], strict=True))
        out.append((token, float(logprob), alts))
    return out
