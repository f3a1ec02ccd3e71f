"""AdapterPool end to end on the real model: tenants, adapters, streaming, typed errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import (
    AccessDenied,
    AdapterExists,
    AdapterNotFound,
    AdapterValidationError,
    InvalidRequest,
    NotAPeftAdapter,
    PinLimitExceeded,
    SourceNotFound,
)

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
CHAT = [{"role": "user", "content": "Say hello to the team."}]


@pytest.fixture
async def pool(model_dir: Path, adapters: dict[str, Path]) -> AsyncIterator[AdapterPool]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=3, max_rank=32, max_batch=8, max_seq_len=256)
    async with AdapterPool(backend) as p:
        await p.register("acme/support", str(adapters["r8-attn"]), tenant="acme")
        await p.register("globex/sales", str(adapters["r16-all"]), tenant="globex")
        await p.register(
            "platform/polite", str(adapters["r32-attn"]), tenant="platform", shared=True
        )
        yield p


async def test_streaming_chat_per_tenant_and_base(pool: AdapterPool) -> None:
    async def stream(adapter: str | None, tenant: str) -> tuple[str, list[Any]]:
        chunks = [
            c async for c in pool.generate(CHAT, adapter=adapter, tenant=tenant, params=GREEDY)
        ]
        return "".join(c.text for c in chunks), chunks

    results = await asyncio.gather(
        stream("acme/support", "acme"),
        stream("globex/sales", "globex"),
        stream("platform/polite", "acme"),
        stream(None, "initech"),
    )
    texts = [t for t, _ in results]
    assert len(set(texts)) == 4, texts
    for (_, chunks), adapter in zip(
        results, ["acme/support", "globex/sales", "platform/polite", None], strict=True
    ):
        last = chunks[-1]
        assert last.finish_reason in ("stop", "length")
        assert last.usage is not None and last.usage.prompt_tokens > 0
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert sum(len(c.token_ids) for c in chunks) <= last.usage.completion_tokens
        assert all(c.adapter_id == adapter for c in chunks)
        assert chunks[-1].served_by == ("base" if adapter is None else "adapter")
    completion = await pool.complete(CHAT, adapter="acme/support", tenant="acme", params=GREEDY)
    assert completion.text == texts[0]
    assert pool.stats.completed == 5


async def test_more_adapters_than_slots_are_all_served(
    pool: AdapterPool, adapters: dict[str, Path]
) -> None:
    await pool.register("acme/extra1", str(adapters["r16-qv-rslora"]), tenant="acme")
    await pool.register("acme/extra2", str(adapters["r32-all"]), tenant="acme")
    names = ["acme/support", "acme/extra1", "acme/extra2", "platform/polite"] * 2
    outs = await asyncio.gather(
        *(pool.complete("Hi", adapter=n, tenant="acme", params=GREEDY) for n in names)
    )
    assert all(o.usage.completion_tokens > 0 for o in outs)
    # Same adapter, same prompt, greedy: same text even though slots were recycled.
    assert [o.text for o in outs[:4]] == [o.text for o in outs[4:]]
    assert len(pool.store.resident) <= 3


async def test_typed_errors_leave_pool_serving(
    pool: AdapterPool, tmp_path: Path, adapters: dict[str, Path]
) -> None:
    before = [a.adapter_id for a in pool.list_adapters(tenant="acme")]
    with pytest.raises(AdapterNotFound, match="register it first"):
        await pool.complete("Hi", adapter="acme/nope", tenant="acme")
    with pytest.raises(AdapterNotFound) as missing:
        await pool.complete("Hi", adapter="globex/nope", tenant="acme")
    with pytest.raises(AdapterNotFound) as hidden:  # another tenant's: exactly as if missing
        await pool.complete("Hi", adapter="globex/sales", tenant="acme")
    assert str(hidden.value) == str(missing.value).replace("globex/nope", "globex/sales")
    with pytest.raises(SourceNotFound):
        await pool.register("acme/missing", str(tmp_path / "does-not-exist"), tenant="acme")
    (tmp_path / "notpeft").mkdir()
    (tmp_path / "notpeft" / "README.md").write_text("hello")
    with pytest.raises(NotAPeftAdapter, match=r"adapter_config\.json"):
        await pool.register("acme/notpeft", str(tmp_path / "notpeft"), tenant="acme")
    with pytest.raises(AdapterExists):
        await pool.register("acme/support", str(adapters["r8-attn"]), tenant="acme")
    big = tmp_path / "big"
    big.mkdir()
    for f in adapters["r32-all"].iterdir():
        (big / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((big / "adapter_config.json").read_text())
    cfg["r"] = 64
    (big / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterValidationError) as info:
        await pool.register("acme/big", str(big), tenant="acme")
    assert info.value.reason == "unsupported_rank"
    with pytest.raises(InvalidRequest):
        await pool.complete("Hi", adapter="acme/support", tenant="")
    with pytest.raises(InvalidRequest):
        await pool.complete([{"role": "user"}], adapter="acme/support", tenant="acme")
    with pytest.raises(AccessDenied):
        await pool.unregister("platform/polite", tenant="acme")

    assert [a.adapter_id for a in pool.list_adapters(tenant="acme")] == before
    out = await pool.complete(CHAT, adapter="acme/support", tenant="acme", params=GREEDY)
    assert out.usage.completion_tokens > 0


async def test_listing_is_scoped_to_tenant(pool: AdapterPool) -> None:
    assert [a.adapter_id for a in pool.list_adapters(tenant="acme")] == [
        "acme/support",
        "platform/polite",
    ]
    assert [a.adapter_id for a in pool.list_adapters(tenant="globex")] == [
        "globex/sales",
        "platform/polite",
    ]


async def test_pin_and_unregister_drains(pool: AdapterPool) -> None:
    await pool.pin("acme/support", tenant="acme")
    assert pool.store.on_device("acme/support")
    await pool.pin("sales", tenant="globex")
    with pytest.raises(PinLimitExceeded):
        await pool.pin("platform/polite", tenant=None)
    await pool.unpin("globex/sales", tenant="globex")

    stream = pool.generate(
        CHAT,
        adapter="acme/support",
        tenant="acme",
        params=SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    )
    first = await stream.__anext__()
    assert first.token_ids
    removal = asyncio.create_task(pool.unregister("acme/support", tenant="acme"))
    await asyncio.sleep(0.05)
    assert not removal.done(), "unregister must wait for the in-flight request"
    rest = [c async for c in stream]
    assert rest[-1].finish_reason == "length"
    await removal
    assert not pool.store.on_device("acme/support")
    assert not pool.store.on_host("acme/support")
    with pytest.raises(AdapterNotFound):
        await pool.complete("Hi", adapter="acme/support", tenant="acme")
