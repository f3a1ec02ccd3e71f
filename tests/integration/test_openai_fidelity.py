"""The example server as the official ``openai`` client sees it, field by field: uvicorn on
127.0.0.1 over TorchBackend with the real model (max_completion_tokens, include_usage,
logprobs in both shapes, finish_reason, system_fingerprint, n choices, structured output
through ``chat.completions.parse``, an unknown field refused by name)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import pytest_asyncio
from pydantic import BaseModel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # hang guards, not speed

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lorapool import AdapterPool  # noqa: E402
from lorapool.server import ApiKeys, create_app  # noqa: E402

from .serving import serve_app  # noqa: E402

KEY = "key-acme"
USER = [{"role": "user", "content": "Name the three primary colours."}]
TIMEOUT = 1800.0
"""A request's hang guard, never a speed requirement (2 busy cores run this)."""


@dataclass
class Server:
    url: str
    model: str

    def client(self) -> Any:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT
        )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(model_dir: Path) -> AsyncIterator[Server]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=2, max_rank=32, max_batch=8, max_seq_len=512)
    pool = AdapterPool(backend)
    app = create_app(pool, auth=ApiKeys({KEY: "acme"}), shutdown_timeout=5)
    async with serve_app(app) as running:
        yield Server(running.url, backend.capabilities.base_model)


async def test_max_completion_tokens_finish_reason_and_fingerprint(server: Server) -> None:
    client = server.client()
    r = await client.chat.completions.create(
        model=server.model,
        messages=USER,
        max_completion_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    assert r.system_fingerprint and r.system_fingerprint.startswith("fp_")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    done = await client.chat.completions.create(
        model=server.model, messages=USER, max_completion_tokens=200, temperature=0
    )
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.system_fingerprint == r.system_fingerprint


async def test_stream_include_usage_and_fingerprint_on_every_chunk(server: Server) -> None:
    client = server.client()
    stream = await client.chat.completions.create(
        model=server.model,
        messages=USER,
        max_completion_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    assert all(c.system_fingerprint and c.system_fingerprint.startswith("fp_") for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["length"]
    plain = await client.chat.completions.create(
        model=server.model, messages=USER, max_completion_tokens=3, temperature=0, stream=True
    )
    assert all(c.usage is None for c in [c async for c in plain])


async def test_chat_logprobs_shape(server: Server) -> None:
    client = server.client()
    r = await client.chat.completions.create(
        model=server.model,
        messages=USER,
        max_completion_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0.0
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        best = max(t.logprob for t in entry.top_logprobs)
        assert entry.logprob == pytest.approx(best, abs=1e-4)  # greedy takes the likeliest
        assert all(t.bytes == list(t.token.encode("utf-8")) for t in entry.top_logprobs)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    stream = await client.chat.completions.create(
        model=server.model,
        messages=USER,
        max_completion_tokens=4,
        temperature=0,
        logprobs=True,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed = [
        e
        for c in [c async for c in stream]
        for ch in c.choices
        if ch.logprobs
        for e in ch.logprobs.content
    ]
    assert len(streamed) == 4 and all(e.top_logprobs == [] for e in streamed)


async def test_completions_legacy_logprobs(server: Server) -> None:
    client = server.client()
    r = await client.completions.create(
        model=server.model,
        prompt="The three primary colours are",
        max_tokens=5,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0.0 for v in lp.token_logprobs)
    pairs = zip(lp.tokens, lp.top_logprobs, strict=True)
    assert all(len(top) <= 3 and t in top for t, top in pairs)  # the token and 2 likeliest
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.system_fingerprint and r.choices[0].finish_reason == "length"


async def test_n_choices_whole_and_streamed(server: Server) -> None:
    client = server.client()
    r = await client.chat.completions.create(
        model=server.model,
        messages=USER,
        n=3,
        max_completion_tokens=4,
        temperature=1.0,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.message.content for c in r.choices)
    assert r.usage.completion_tokens == 12  # every sample's tokens: the request's usage
    stream = await client.chat.completions.create(
        model=server.model,
        messages=USER,
        n=2,
        max_completion_tokens=4,
        temperature=1.0,
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"} and all(texts.values())
    assert usage is not None and usage.completion_tokens == 8


class Colour(BaseModel):
    colour: Literal["red", "green", "blue"]
    primary: bool


async def test_parse_with_a_pydantic_model_end_to_end(server: Server) -> None:
    client = server.client()
    for seed in (1, 2, 3):
        r = await client.chat.completions.parse(
            model=server.model,
            messages=[{"role": "user", "content": "Pick a colour and say if it is primary."}],
            response_format=Colour,
            max_completion_tokens=64,
            temperature=0.8,
            seed=seed,
        )
        message = r.choices[0].message
        assert isinstance(message.parsed, Colour), message.content
        assert r.choices[0].finish_reason == "stop"
    r = await client.chat.completions.create(
        model=server.model,
        messages=USER,
        response_format={"type": "json_object"},
        max_completion_tokens=64,
        temperature=0,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


async def test_an_unknown_field_is_a_400_naming_it(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=server.model, messages=USER, extra_body={"frobnicate": True}
        )
    body = refused.value.body
    assert body["param"] == "frobnicate"
    assert body["message"] == "Unrecognized request argument supplied: frobnicate"
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=server.model, messages=USER, store=True)
    assert refused.value.body["param"] == "store"
