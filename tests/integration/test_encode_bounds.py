"""BaseBackend.encode's bounds on TorchBackend with the real tokenizer: text that is not text
and prompts longer than the context could hold are InvalidRequest before the tokenizer runs;
aencode tokenizes on a worker thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from lorapool import AdapterPool, InvalidRequest, SamplingParams


class _Watched:
    """The real tokenizer; records the thread of each encode / chat-template call."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.threads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if name not in ("encode", "apply_chat_template"):
            return attr

        def watched(*args: Any, **kwargs: Any) -> Any:
            self.threads.append(threading.current_thread().name)
            return attr(*args, **kwargs)

        return watched


@pytest.fixture
def watched(backend: Any) -> Any:
    tokenizer = _Watched(backend._tokenizer)
    backend._tokenizer = tokenizer
    try:
        yield tokenizer
    finally:
        backend._tokenizer = tokenizer.real


@pytest.mark.parametrize(
    "prompt, where",
    [
        ("a\ud800b", "the prompt"),
        ([{"role": "user", "content": "\udfff"}], "message 0's content"),
        (
            [{"role": "user", "content": "hi"}, {"role": "user\ud800", "content": "x"}],
            "message 1's role",
        ),
    ],
)
def test_a_lone_surrogate_is_an_invalid_request_not_a_tokenizer_error(
    backend: Any, watched: _Watched, prompt: Any, where: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        backend.encode(prompt)
    assert str(caught.value) == f"{where} contains an unpaired surrogate; send valid UTF-8 text"
    assert watched.threads == []


def test_a_prompt_longer_than_the_context_could_hold_is_refused_untokenized(
    backend: Any, watched: _Watched
) -> None:
    limit = backend.max_prompt_chars
    longest = max(len(t) for t in watched.real.get_vocab())
    assert limit == backend.capabilities.max_seq_len * longest * 4
    for prompt in ("x" * (limit + 1), [{"role": "user", "content": "x" * (limit + 1)}]):
        with pytest.raises(InvalidRequest) as caught:
            backend.encode(prompt)
        assert f"{limit + 1} characters" in str(caught.value) and "shorten" in str(caught.value)
    assert watched.threads == []
    # At the bound the tokenizer runs, and the token count decides.
    assert len(backend.encode("x" * 100)) > 0 and watched.threads


async def test_aencode_tokenizes_on_a_worker_thread(backend: Any, watched: _Watched) -> None:
    ids = await backend.aencode("The three primary colours are")
    assert ids == backend.encode("The three primary colours are")
    chat = await backend.aencode([{"role": "user", "content": "Hi"}])
    assert chat
    loop_thread = threading.current_thread().name
    on_loop = [name == loop_thread for name in watched.threads]
    assert on_loop == [False, True, False]  # encode itself runs where it is called


async def test_the_pool_refuses_a_lone_surrogate_with_a_typed_error(backend: Any) -> None:
    pool = AdapterPool(backend)
    async with pool:
        with pytest.raises(InvalidRequest, match="unpaired surrogate"):
            await pool.complete("\ud800", tenant="acme", params=SamplingParams(max_tokens=2))
        done = await asyncio.wait_for(
            pool.complete("Hi", tenant="acme", params=SamplingParams(max_tokens=2, temperature=0)),
            60,
        )
        assert done.usage.completion_tokens >= 1
