"""TorchBackend's prefix cache on the real model and real PEFT adapters (issue 28).

Exactness: a request whose prompt starts with cached blocks gives, token for token, the
greedy output of an engine without the cache (the base model and adapters of ranks 8,
16 and 32; the shared prefix ending in the middle of a block and exactly on a block's
end). Isolation: the same prompt under two adapters and the base model shares no block,
a name registered again with other weights gets no hit, and two tenants sending the
same prompt on the base model or one shared adapter share no block. Bounded memory: a long
mixed run (cancellations, preemptions, n samples) never holds more than the budget and
gives back every KV row.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from lorapool.formats import inspect_adapter_dir
from lorapool.types import (
    GenerationRequest,
    LoadedAdapter,
    SamplingParams,
    StructuredOutput,
    Usage,
)

pytestmark = pytest.mark.slow

BS = 16
SLOTS = {"r8-attn": 0, "r16-all": 1, "r32-all": 2}
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SYSTEM = (
    "You are the support agent of Example Corp. Answer in two sentences at most. "
    "Tools: lookup_order(order_id: string) returns an order's status; "
    "refund(order_id: string, amount: number) starts a refund; "
    "escalate(reason: string) hands the chat to a person. Never invent an order id. "
)


def _loaded(name: str, path: Path, adapter_id: str | None = None) -> LoadedAdapter:
    files = inspect_adapter_dir(path)
    weights = (path / "adapter_model.safetensors").read_bytes()
    return LoadedAdapter(adapter_id or name, files.config, weights, files.sha256)


async def _run(
    backend: Any, prompt: Any, adapter: str | None, rid: str, params: SamplingParams = PARAMS
) -> tuple[list[int], Usage]:
    request = GenerationRequest(
        rid, prompt, params, adapter_id=adapter, slot=None if adapter is None else SLOTS[adapter]
    )
    ids: list[int] = []
    usage: Usage | None = None
    async for chunk in backend.generate(request):
        ids.extend(chunk.token_ids)
        usage = chunk.usage or usage
    assert usage is not None
    return ids, usage


def _chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def _pair(backend: Any, boundary: bool) -> tuple[Any, Any, int]:
    """Two chat prompts sharing a system prompt whose common token prefix ends exactly on
    a block's end (``boundary``) or in the middle of a block; and that prefix's length."""
    for pad in range(64):
        system = SYSTEM + "Be kind. " * pad
        first = _chat(system, "Where is order 1234?")
        second = _chat(system, "Can I get a refund for order 99?")
        common = _common(await backend.aencode(first), await backend.aencode(second))
        if (common % BS == 0) == boundary:
            return first, second, common
    raise AssertionError("no padding gives the wanted prefix length")


async def _start(model_dir: Path, adapters: dict[str, Path], **options: Any) -> Any:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(
        model_dir,
        max_slots=3,
        max_rank=32,
        max_batch=4,
        max_seq_len=512,
        dtype="float32",
        prefix_block_size=BS,
        **options,
    )
    await backend.start()
    for name, slot in SLOTS.items():
        await backend.load(_loaded(name, adapters[name]), slot)
    return backend


@pytest.mark.parametrize("boundary", [False, True], ids=["mid-block", "block-end"])
async def test_a_cache_hit_gives_the_output_of_no_cache(
    model_dir: Path, adapters: dict[str, Path], boundary: bool
) -> None:
    on = await _start(model_dir, adapters)
    off = await _start(model_dir, adapters, prefix_cache_bytes=0)
    try:
        assert on.capabilities.prefix_cache and not off.capabilities.prefix_cache
        assert off.prefix_cache_stats() is None
        first, second, common = await _pair(on, boundary)
        hit = common // BS * BS
        assert hit > 0 and (common == hit) == boundary
        whole = len(await on.aencode(second))
        for adapter in (None, *SLOTS):
            label = adapter or "base"
            before = on.prefix_cache_stats().hit_tokens
            # The first prompt fills the cache; the second starts with its blocks.
            warm, warm_usage = await _run(on, first, adapter, f"warm-{label}")
            assert warm_usage.cached_tokens == 0, label
            got, usage = await _run(on, second, adapter, f"hit-{label}")
            assert usage.cached_tokens == hit, label
            assert on.prefix_cache_stats().hit_tokens == before + hit, label
            want, off_usage = await _run(off, second, adapter, f"ref-{label}")
            assert off_usage.cached_tokens == 0
            assert got == want, label  # token for token
            assert warm == (await _run(off, first, adapter, f"ref1-{label}"))[0], label
            # The same prompt again: every full block but the one holding its last token.
            again, again_usage = await _run(on, second, adapter, f"again-{label}")
            assert again == want, label
            assert again_usage.cached_tokens == (whole - 1) // BS * BS, label
        # n samples share the hit (sample 0's row copied), and structured output holds.
        two = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=2)
        both = GenerationRequest("n2", second, two, adapter_id="r16-all", slot=1)
        samples: dict[int, list[int]] = {0: [], 1: []}
        async for chunk in on.generate(both):
            samples[chunk.index].extend(chunk.token_ids)
        ref = (await _run(off, second, "r16-all", "n2-ref", two.model_copy(update={"n": 1})))[0]
        assert samples[0] == samples[1] == ref
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        structured = SamplingParams(
            max_tokens=24, temperature=0.0, structured=StructuredOutput.json_schema(schema)
        )
        got_json, json_usage = await _run(on, second, "r8-attn", "json", structured)
        assert json_usage.cached_tokens > 0
        assert got_json == (await _run(off, second, "r8-attn", "json-ref", structured))[0]
        assert on.free_kv_rows == 4 and on.live_sequences == 0
    finally:
        await on.aclose()
        await off.aclose()


async def test_no_block_is_shared_across_adapters_or_the_base_model(
    model_dir: Path, adapters: dict[str, Path]
) -> None:
    on = await _start(model_dir, adapters)
    off = await _start(model_dir, adapters, prefix_cache_bytes=0)
    try:
        prompt = _chat(SYSTEM * 3, "Where is order 1234?")
        for adapter in ("r8-attn", "r16-all", None):
            got, usage = await _run(on, prompt, adapter, f"iso-{adapter}")
            assert usage.cached_tokens == 0, adapter
            assert got == (await _run(off, prompt, adapter, f"ref-{adapter}"))[0], adapter
        stats = on.prefix_cache_stats()
        assert stats.hit_tokens == 0 and stats.cached_blocks > 0
        # Not for want of a cache: the same prompt under the same adapter hits.
        _, usage = await _run(on, prompt, "r8-attn", "iso-again")
        assert usage.cached_tokens > 0
        # The same content in two slots is the same adapter: sharing is right there.
        await on.load(_loaded("r8-attn", adapters["r8-attn"], "other-name"), 2)
        request = GenerationRequest("same", prompt, PARAMS, adapter_id="other-name", slot=2)
        cached = 0
        async for chunk in on.generate(request):
            cached = chunk.usage.cached_tokens if chunk.usage else cached
        assert cached > 0
    finally:
        await on.aclose()
        await off.aclose()


async def test_a_name_registered_again_with_other_weights_gets_no_hit(
    model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from lorapool import AdapterPool
    from lorapool.backends.torch import TorchBackend

    off = await _start(model_dir, adapters, prefix_cache_bytes=0)
    backend = TorchBackend(
        model_dir, max_slots=2, max_rank=32, max_batch=4, max_seq_len=512, dtype="float32"
    )
    prompt = _chat(SYSTEM * 3, "Can I get a refund for order 99?")
    try:
        async with AdapterPool(backend) as pool:
            await pool.register("bot", str(adapters["r8-attn"]), tenant="acme")
            first = await pool.complete(prompt, adapter="bot", tenant="acme", params=PARAMS)
            again = await pool.complete(prompt, adapter="bot", tenant="acme", params=PARAMS)
            assert first.usage.cached_tokens == 0 and again.usage.cached_tokens > 0
            assert list(again.token_ids) == list(first.token_ids)
            cached = backend.prefix_cache_stats()
            assert cached is not None and cached.cached_blocks > 0
            await pool.unregister("bot", tenant="acme")
            # Forgotten: its content's blocks are gone (none of another content was there).
            after = backend.prefix_cache_stats()
            assert after is not None and after.forgotten == cached.cached_blocks > 0
            assert after.cached_blocks == 0
            await pool.register("bot", str(adapters["r16-all"]), tenant="acme")
            new = await pool.complete(prompt, adapter="bot", tenant="acme", params=PARAMS)
            assert new.usage.cached_tokens == 0
            want = (await _run(off, prompt, "r16-all", "ref-new"))[0]
            assert list(new.token_ids) == want
            assert list(new.token_ids) != list(first.token_ids)
    finally:
        await off.aclose()


async def test_tenants_never_share_a_block_on_the_base_model_or_one_shared_adapter(
    model_dir: Path, adapters: dict[str, Path]
) -> None:
    """A hit would tell one tenant what another sent (its cached_tokens, its time to
    first token): each tenant's blocks are its own, even for the same content."""
    from lorapool import AdapterPool
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(
        model_dir, max_slots=2, max_rank=32, max_batch=4, max_seq_len=512, dtype="float32"
    )
    prompt = _chat(SYSTEM * 3, "Where is order 1234?")
    async with AdapterPool(backend) as pool:
        for tenant in ("acme", "globex"):  # the same weights, registered by each
            await pool.register("bot", str(adapters["r8-attn"]), tenant=tenant)
        for adapter in (None, "bot"):
            first = await pool.complete(prompt, adapter=adapter, tenant="acme", params=PARAMS)
            again = await pool.complete(prompt, adapter=adapter, tenant="acme", params=PARAMS)
            assert first.usage.cached_tokens == 0 and again.usage.cached_tokens > 0, adapter
            before = backend.prefix_cache_stats()
            assert before is not None
            other = await pool.complete(prompt, adapter=adapter, tenant="globex", params=PARAMS)
            assert other.usage.cached_tokens == 0, adapter
            after = backend.prefix_cache_stats()
            assert after is not None and after.hit_tokens == before.hit_tokens, adapter
            assert list(other.token_ids) == list(first.token_ids), adapter
            # globex's own second request hits its own blocks.
            mine = await pool.complete(prompt, adapter=adapter, tenant="globex", params=PARAMS)
            assert mine.usage.cached_tokens > 0, adapter


async def test_a_long_mixed_run_stays_within_its_budget_and_frees_every_row(
    model_dir: Path, adapters: dict[str, Path]
) -> None:
    from lorapool.backends.torch import TorchBackend
    from lorapool.backends.torch.model import ModelConfig

    cfg = ModelConfig.from_dir(model_dir)
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * BS * cfg.head_dim * 4  # fp32
    budget_blocks = 24
    backend = TorchBackend(
        model_dir,
        max_slots=3,
        max_rank=32,
        max_batch=3,
        max_seq_len=512,
        dtype="float32",
        prefix_block_size=BS,
        prefix_cache_bytes=budget_blocks * block_bytes + block_bytes // 2,
    )
    await backend.start()
    try:
        for name, slot in SLOTS.items():
            await backend.load(_loaded(name, adapters[name]), slot)
        engine = backend._engine
        index = engine.prefix.index
        assert index.capacity == budget_blocks
        systems = [SYSTEM + f"Tenant {t} sells {w}. " * 4 for t, w in enumerate("ABCDEF")]
        peak = 0
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                stats = backend.prefix_cache_stats()
                peak = max(peak, stats.cached_bytes)
                await asyncio.sleep(0.002)

        async def one(i: int) -> None:
            # Every other request: a hot system prompt on the base model (hits); the rest
            # rotate over five system prompts and four contents (evictions).
            hot = i % 2 == 0
            adapter = None if hot else [None, *SLOTS][i // 2 % 4]
            system = systems[0] if hot else systems[1 + i // 2 % 5]
            prompt = _chat(system, f"Question {i}: where is order {i}?")
            params = PARAMS.model_copy(update={"max_tokens": 4 + i % 9})
            request = GenerationRequest(
                f"mix-{i}",
                prompt,
                params,
                adapter_id=adapter,
                slot=None if adapter is None else SLOTS[adapter],
            )
            seen = 0
            async for chunk in backend.generate(request):
                seen += len(chunk.token_ids)
                if i % 5 == 0 and seen >= 2:
                    break  # cancelled mid-stream
                if i % 7 == 3 and seen == 2:
                    backend.preempt(request.request_id)  # paused if someone waits

        watcher = asyncio.create_task(watch())
        for wave in range(4):
            await asyncio.gather(*(one(wave * 12 + i) for i in range(12)))
        stop.set()
        await watcher
        stats = backend.prefix_cache_stats()
        assert peak <= budget_blocks * block_bytes and stats.cached_bytes <= stats.budget_bytes
        assert stats.evictions > 0 and stats.hit_tokens > 0  # the budget was exercised
        assert backend.stats.preemptions > 0
        index.verify()  # every block cached or free, once; no chain broken in the middle
        assert backend.free_kv_rows == 3 and backend.live_sequences == 0
        # Forgetting every content empties the cache and frees every block.
        for sha in index.contents():
            await backend.forget(sha)
        assert backend.prefix_cache_stats().cached_blocks == 0
        index.verify()
    finally:
        await backend.aclose()
