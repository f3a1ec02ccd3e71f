"""One request's fault ends that request alone: the engine step's other rows go on.

A temperature so small that ``logits / temperature`` overflows used to make
``torch.multinomial`` raise inside the engine step, and the step's error handler then
failed every running request of every tenant. Logits that are not finite (an adapter that
overflowed) had the same reach.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import torch

from lorapool.errors import BackendError, InvalidRequest
from lorapool.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
OTHER = "Once upon a time, in a quiet village,"


def _req(rid: str, prompt: str, **params: Any) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=12, ignore_eos=True, **params))


async def _collect(backend: Any, request: GenerationRequest) -> list[int]:
    ids: list[int] = []
    async for chunk in backend.generate(request):
        ids.extend(chunk.token_ids)
    return ids


async def test_a_tiny_temperature_samples_like_greedy_and_hurts_nobody(backend: Any) -> None:
    greedy = await _collect(backend, _req("g", PROMPT, temperature=0.0))
    other_alone = await _collect(backend, _req("o0", OTHER, temperature=0.0))
    tiny, other = await asyncio.gather(
        _collect(backend, _req("t", PROMPT, temperature=1e-300, seed=3)),
        _collect(backend, _req("o1", OTHER, temperature=0.0)),
    )
    # The limit of sampling as the temperature goes to zero is greedy decoding.
    assert tiny == greedy
    assert other == other_alone
    # Any positive temperature is a valid request (the smallest positive double too).
    assert SamplingParams(temperature=5e-324).temperature > 0
    assert backend.stats.row_faults == 0


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-45])
async def test_a_tiny_top_p_keeps_the_likeliest_token(backend: Any, top_p: float) -> None:
    """Found by the server fuzz: a ``top_p`` that rounds to zero in float32 kept no token at
    all, and the request ended with "invalid multinomial distribution"."""
    greedy = await _collect(backend, _req("g", PROMPT, temperature=0.0))
    faults = backend.stats.row_faults
    tiny = await _collect(backend, _req("p", PROMPT, temperature=0.7, top_p=top_p, seed=5))
    assert tiny == greedy  # only the likeliest token is left to sample
    assert backend.stats.row_faults == faults


async def test_non_finite_logits_end_that_request_alone(backend: Any) -> None:
    engine = backend._engine
    other_alone = await _collect(backend, _req("o0", OTHER, temperature=0.0))
    sampled_alone = await _collect(backend, _req("s0", OTHER, temperature=0.8, seed=11))
    faults = backend.stats.row_faults

    def poison(ids: list[str], logits: Any) -> None:  # on the engine thread, after each forward
        # What an adapter that overflowed produces: this row only, from its third token on.
        if "bad" in ids and bad_tokens:
            with torch.inference_mode():
                logits[ids.index("bad")] = math.nan

    bad_tokens: list[int] = []

    async def bad() -> None:
        async for chunk in backend.generate(_req("bad", PROMPT, temperature=0.0)):
            bad_tokens.extend(chunk.token_ids)

    engine.logits_hook = poison
    try:
        results = await asyncio.gather(
            bad(),
            _collect(backend, _req("o1", OTHER, temperature=0.0)),
            _collect(backend, _req("s1", OTHER, temperature=0.8, seed=11)),
            return_exceptions=True,
        )
    finally:
        engine.logits_hook = None
    error, other, sampled = results
    assert isinstance(error, BackendError), error
    assert "not finite" in str(error) and "(base model)" in str(error)
    assert "other requests go on" in str(error)
    assert 1 <= len(bad_tokens) < 12
    # The other requests of the same steps finished with the tokens they have alone.
    assert other == other_alone
    assert sampled == sampled_alone
    assert backend.stats.row_faults == faults + 1
    # The engine still serves, and frees every row.
    assert await _collect(backend, _req("after", PROMPT, temperature=0.0))
    assert backend.live_sequences == 0


def test_a_non_positive_temperature_is_still_refused() -> None:
    with pytest.raises((InvalidRequest, ValueError)):
        SamplingParams(temperature=-1e-300)
