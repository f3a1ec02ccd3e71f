"""Every sampling parameter of TorchBackend, each shown by its effect on the real model
(issue 26): top_k, min_p, the penalties, logit_bias, stop_token_ids, min_tokens, n with
seeds, logprobs with top_logprobs, and usage over n samples."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lorapool.errors import InvalidRequest
from lorapool.types import Chunk, GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
REPEAT = "one two one two one two one two"
SHORT = [{"role": "user", "content": "Answer with one word only: what colour is the sky?"}]


@pytest.fixture(scope="module")
async def backend(model_dir: Path) -> AsyncIterator[Any]:
    """One engine for the module (each test leaves it idle)."""
    from lorapool.backends.torch import TorchBackend

    b = TorchBackend(model_dir, max_slots=2, max_rank=16, max_batch=8, max_seq_len=256)
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()


def _req(rid: str, prompt: Any = PROMPT, **params: Any) -> GenerationRequest:
    params.setdefault("max_tokens", 8)
    return GenerationRequest(rid, prompt, SamplingParams(**params))


async def _chunks(backend: Any, request: GenerationRequest) -> list[Chunk]:
    return [c async for c in backend.generate(request)]


async def _ids(backend: Any, request: GenerationRequest) -> list[int]:
    return [t for c in await _chunks(backend, request) for t in c.token_ids]


def _repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


async def test_the_backend_declares_every_parameter(backend: Any) -> None:
    fields = set(SamplingParams.model_fields) - {"structured"}
    kinds = {"json_object", "json_schema", "regex", "choice", "grammar"}
    assert backend.capabilities.sampling == fields | {f"structured.{k}" for k in kinds}


async def test_top_k_1_and_min_p_1_are_greedy(backend: Any) -> None:
    greedy, top_k, min_p, *sampled = await asyncio.gather(
        _ids(backend, _req("g", temperature=0.0, ignore_eos=True)),
        _ids(backend, _req("k", temperature=1.5, top_k=1, seed=7, ignore_eos=True)),
        _ids(backend, _req("m", temperature=1.5, min_p=1.0, seed=7, ignore_eos=True)),
        # With room to sample, truncation still samples: other seeds, other tokens.
        *(_ids(backend, _req(f"s{s}", temperature=1.5, top_k=50, seed=s)) for s in range(3)),
    )
    assert top_k == greedy
    assert min_p == greedy
    assert len({tuple(s) for s in sampled}) > 1, sampled


async def test_penalties_reduce_repeats(backend: Any) -> None:
    penalties: list[dict[str, float]] = [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"repetition_penalty": 2.0},
    ]
    plain, *penalised = await asyncio.gather(
        *(
            _ids(
                backend, _req(f"p{i}", REPEAT, temperature=0.0, max_tokens=12, ignore_eos=True, **p)
            )
            for i, p in enumerate([{}, *penalties])
        )
    )
    assert _repeats(plain) >= 6, backend.decode(plain)  # greedy goes on: "two two two-..."
    for penalty, ids in zip(penalties, penalised, strict=True):
        assert _repeats(ids) < _repeats(plain), (penalty, backend.decode(ids))


async def test_logit_bias_bans_and_forces(backend: Any) -> None:
    forced_id = backend.encode(" banana")[-1]
    greedy, forced = await asyncio.gather(
        _ids(backend, _req("g", temperature=0.0, max_tokens=3, ignore_eos=True)),
        _ids(
            backend,
            _req("f", temperature=0.0, max_tokens=3, ignore_eos=True, logit_bias={forced_id: 100}),
        ),
    )
    assert forced == [forced_id] * 3
    banned = await _ids(
        backend,
        _req("b", temperature=0.0, max_tokens=3, ignore_eos=True, logit_bias={greedy[0]: -100}),
    )
    assert banned[0] != greedy[0]
    assert greedy[0] not in banned


async def test_stop_token_ids_end_with_stop(backend: Any) -> None:
    greedy = await _ids(backend, _req("g", temperature=0.0, max_tokens=8, ignore_eos=True))
    k = next(i for i in range(2, 8) if greedy[i] not in greedy[:i])
    chunks = await _chunks(
        backend,
        _req("s", temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=[greedy[k]]),
    )
    ids = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].finish_reason == "stop"
    assert ids == greedy[:k]  # the stop token is not returned...
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == k + 1  # ...but it was produced


async def test_min_tokens_prevents_an_early_eos(backend: Any) -> None:
    free, held = await asyncio.gather(
        _chunks(backend, _req("e", SHORT, temperature=0.0, max_tokens=16)),
        _chunks(backend, _req("m", SHORT, temperature=0.0, max_tokens=16, min_tokens=10)),
    )
    short = [t for c in free for t in c.token_ids]
    assert free[-1].finish_reason == "stop" and len(short) < 10, short
    ids = [t for c in held for t in c.token_ids]
    assert len(ids) >= 10
    assert not set(ids[:10]) & set(backend._engine.eos_ids)
    assert ids[: len(short)] == short  # the same tokens until EOS would have come


async def test_n_samples_with_a_seed(backend: Any) -> None:
    params = dict(temperature=1.0, seed=123, max_tokens=6, ignore_eos=True)

    async def samples(rid: str) -> tuple[dict[int, list[int]], list[Chunk]]:
        chunks = await _chunks(backend, _req(rid, n=3, **params))
        out: dict[int, list[int]] = {}
        for c in chunks:
            out.setdefault(c.index, []).extend(c.token_ids)
        return out, chunks

    first, chunks = await samples("n1")
    assert sorted(first) == [0, 1, 2]
    assert len({tuple(v) for v in first.values()}) == 3, first  # three different samples
    (second, _), *alone = await asyncio.gather(
        samples("n2"),
        *(_ids(backend, _req(f"one{i}", **{**params, "seed": 123 + i})) for i in range(3)),
    )
    assert second == first  # reproducible
    for i in range(3):  # sample i is what a single request with seed + i gives
        assert first[i] == alone[i]
    # Each sample's last chunk ends it; only the stream's last chunk carries usage, for
    # the whole request: the prompt once, every sample's completion tokens.
    finishes = [c for c in chunks if c.finish_reason is not None]
    assert sorted(c.index for c in finishes) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in finishes)
    assert [c for c in chunks if c.usage is not None] == [chunks[-1]]
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == len(backend.encode(PROMPT))
    assert usage.completion_tokens == 3 * 6
    assert backend.live_sequences == 0


async def test_closing_a_stream_of_n_samples_cancels_them_all(backend: Any) -> None:
    stream = backend.generate(_req("c", n=4, temperature=1.0, max_tokens=64, ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(600):  # a hang guard, not a speed bound
        if backend.live_sequences == 0 and backend.free_kv_rows == backend.max_batch:
            break
        await asyncio.sleep(0.05)
    assert backend.live_sequences == 0
    assert backend.free_kv_rows == backend.max_batch


async def test_top_logprobs(backend: Any) -> None:
    chunks, sampled, plain = await asyncio.gather(
        _chunks(backend, _req("l", temperature=0.0, max_tokens=5, logprobs=True, top_logprobs=5)),
        # Sampled and penalised: logprobs are still the model's, before any processing.
        _chunks(
            backend,
            _req(
                "ls",
                temperature=1.0,
                seed=3,
                max_tokens=5,
                presence_penalty=2.0,
                logprobs=True,
                top_logprobs=5,
            ),
        ),
        _chunks(backend, _req("np", temperature=0.0, max_tokens=3)),
    )
    ids = [t for c in chunks for t in c.token_ids]
    entries = [lp for c in chunks for lp in c.logprobs]
    assert [e.token_id for e in entries] == ids
    for e in entries:
        assert len(e.top) == 5
        values = [t.logprob for t in e.top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0.0 for v in [e.logprob, *values])
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5
        # Greedy: the produced token is the likeliest, with its log-probability.
        assert e.top[0].token_id == e.token_id
        assert e.logprob == e.top[0].logprob
        assert e.token == backend._tokenizer.decode([e.token_id])
    sampled_entries = [lp for c in sampled for lp in c.logprobs]
    assert len(sampled_entries) == sum(len(c.token_ids) for c in sampled)
    for e in sampled_entries:
        assert e.logprob <= e.top[0].logprob
        alts = {t.token_id: t.logprob for t in e.top}
        if e.token_id in alts:
            assert alts[e.token_id] == e.logprob
        else:
            assert e.logprob <= e.top[-1].logprob
    assert all(c.logprobs == () for c in plain)  # not asked, not computed


async def test_ids_outside_the_vocabulary_and_n_over_the_batch_are_refused(backend: Any) -> None:
    vocab = backend._engine.model.cfg.vocab_size
    with pytest.raises(InvalidRequest, match=str(vocab + 5)):
        await _ids(backend, _req("b", logit_bias={vocab + 5: 1.0}))
    with pytest.raises(InvalidRequest, match=str(vocab)):
        await _ids(backend, _req("s", stop_token_ids=[3, vocab]))
    with pytest.raises(InvalidRequest, match="max_batch"):
        await _ids(backend, _req("n", n=backend.max_batch + 1))
    assert await _ids(backend, _req("ok", temperature=0.0, max_tokens=2))  # still serving
    assert backend.live_sequences == 0
