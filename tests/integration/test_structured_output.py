"""Structured output in TorchBackend (llguidance), end to end through AdapterPool (issue 26).

100 requests, each under its own random JSON schema, across 8 real PEFT adapters and the
base model, run mixed in the engine's batches: every output parses and validates against
its schema. A regex, a choice and a Lark grammar are each matched exactly; a schema,
pattern or grammar that does not compile is refused with InvalidRequest and the engine
goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool, SamplingParams
from lorapool.errors import InvalidRequest
from lorapool.types import StructuredOutput

jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.slow

ADAPTERS = 8
TENANT = "acme"
WORDS = ["red", "green", "blue", "north", "south", "cat", "dog", "tea", "jazz", "rain"]


@pytest.fixture(scope="module")
def eight_adapters(lorapool_cache: Path, model_dir: Path, adapters: dict[str, Path]) -> list[Path]:
    """The five shared test adapters and three more of their own (made once, cached)."""
    from lorapool.testing import make_random_adapter
    from lorapool.testing.adapters import ATTENTION

    paths = list(adapters.values())
    root = lorapool_cache / "test-adapters-structured"
    base = None
    for i in range(ADAPTERS - len(paths)):
        path = root / f"r8-attn-{i}"
        if not (path / "adapter_model.safetensors").is_file():
            if base is None:
                import torch
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            make_random_adapter(path, base, rank=8, target_modules=ATTENTION, seed=100 + i)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
async def pool(model_dir: Path, eight_adapters: list[Path]) -> AsyncIterator[AdapterPool]:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(model_dir, max_slots=8, max_rank=32, max_batch=32, max_seq_len=320)
    async with AdapterPool(backend) as p:
        for i, path in enumerate(eight_adapters):
            await p.register(f"{TENANT}/a{i}", str(path), tenant=TENANT)
        yield p


def random_schema(rng: random.Random) -> dict[str, Any]:
    """An object of 1-4 required properties: a bounded string, a bounded integer, a
    boolean, an enum, or an array of a few integers or enum values."""
    properties: dict[str, Any] = {}
    names = rng.sample(["id", "name", "ok", "kind", "tags", "score", "city", "flag"], 4)
    for name in names[: rng.randint(1, 4)]:
        kind = rng.choice(["string", "integer", "boolean", "enum", "array"])
        if kind == "string":
            properties[name] = {"type": "string", "maxLength": rng.randint(1, 12)}
        elif kind == "integer":
            properties[name] = {"type": "integer", "minimum": 0, "maximum": rng.randint(1, 999)}
        elif kind == "boolean":
            properties[name] = {"type": "boolean"}
        elif kind == "enum":
            properties[name] = {"enum": rng.sample(WORDS, rng.randint(2, 4))}
        else:
            items = rng.choice(
                [
                    {"type": "integer", "minimum": 0, "maximum": 99},
                    {"enum": rng.sample(WORDS, 3)},
                ]
            )
            properties[name] = {"type": "array", "items": items, "maxItems": rng.randint(1, 3)}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


async def test_100_random_schemas_across_8_adapters_all_validate(pool: AdapterPool) -> None:
    rng = random.Random(26)
    schemas = [random_schema(rng) for _ in range(100)]
    names: list[str | None] = [f"{TENANT}/a{i % ADAPTERS}" for i in range(96)] + [None] * 4
    rng.shuffle(names)

    async def one(i: int) -> tuple[str, str]:
        completion = await pool.complete(
            [{"role": "user", "content": f"Describe item {i} as JSON."}],
            adapter=names[i],
            tenant=TENANT,
            params=SamplingParams(
                max_tokens=160,
                temperature=0.8,
                seed=i,
                structured=StructuredOutput.json_schema(schemas[i]),
            ),
        )
        return completion.text, completion.finish_reason

    results = await asyncio.gather(*(one(i) for i in range(100)))
    failures = []
    for schema, (text, finish) in zip(schemas, results, strict=True):
        try:
            jsonschema.validate(json.loads(text), schema)
            assert finish == "stop"
        except Exception as exc:  # collected, so the message shows every failure
            failures.append((schema, text, finish, repr(exc)[:200]))
    assert not failures, failures
    stats = pool.backend.stats
    assert max(stats.distinct_adapters) >= 4  # the schemas ran mixed across adapters
    assert stats.row_faults == 0


async def test_json_object_regex_choice_and_lark_grammar(pool: AdapterPool) -> None:
    async def run(
        structured: StructuredOutput, adapter: str | None, seed: int, temperature: float = 0.7
    ) -> str:
        completion = await pool.complete(
            [{"role": "user", "content": 'Answer. As JSON: {"ok": true}'}],
            adapter=adapter,
            tenant=TENANT,
            params=SamplingParams(
                max_tokens=40, temperature=temperature, seed=seed, structured=structured
            ),
        )
        assert completion.finish_reason == "stop", completion
        return completion.text

    pattern = r"[0-9]{3}-[a-z]{2,4}"
    choices = ["red", "green", "blue and gold"]
    lark = """
start: "answer: " word ", " word
word: "yes" | "no" | "maybe"
"""
    texts = await asyncio.gather(
        # Any object: greedy on the base model, which copies the prompt's (a sampled one may
        # write a number longer than max_tokens).
        *(run(StructuredOutput.json_object(), None, s, temperature=0.0) for s in range(2)),
        *(run(StructuredOutput.regex(pattern), f"{TENANT}/a{s % ADAPTERS}", s) for s in range(3)),
        *(run(StructuredOutput.choice(choices), None, s) for s in range(3)),
        *(run(StructuredOutput.grammar(lark), f"{TENANT}/a{s + 3}", s) for s in range(3)),
    )
    objects, regexes, chosen, grammar = texts[:2], texts[2:5], texts[5:8], texts[8:]
    assert all(isinstance(json.loads(t), dict) for t in objects), objects
    assert all(re.fullmatch(pattern, t) for t in regexes), regexes
    assert all(t in choices for t in chosen), chosen
    assert all(re.fullmatch(r"answer: (yes|no|maybe), (yes|no|maybe)", t) for t in grammar), grammar


async def test_greedy_structured_output_with_ignore_eos_ends_with_stop(pool: AdapterPool) -> None:
    completion = await pool.complete(
        "Pick one:",
        tenant=TENANT,
        params=SamplingParams(
            max_tokens=30,
            temperature=0.0,
            ignore_eos=True,
            structured=StructuredOutput.choice(["alpha", "beta"]),
        ),
    )
    assert completion.text in ("alpha", "beta")
    assert completion.finish_reason == "stop"


@pytest.mark.parametrize(
    "structured",
    [
        StructuredOutput.json_schema({"type": "object", "properties": {"a": {"type": "nope"}}}),
        StructuredOutput.regex("a(b"),
        StructuredOutput.grammar("start: undefined_rule"),
    ],
    ids=["schema", "regex", "grammar"],
)
async def test_what_does_not_compile_is_refused_and_the_engine_goes_on(
    pool: AdapterPool, structured: StructuredOutput
) -> None:
    with pytest.raises(InvalidRequest, match="does not compile"):
        await pool.complete(
            "Hi",
            adapter=f"{TENANT}/a0",
            tenant=TENANT,
            params=SamplingParams(max_tokens=8, structured=structured),
        )
    after = await pool.complete(
        "Hi",
        adapter=f"{TENANT}/a0",
        tenant=TENANT,
        params=SamplingParams(
            max_tokens=8, temperature=0.0, structured=StructuredOutput.choice(["ok"])
        ),
    )
    assert after.text == "ok"
    assert pool.backend.live_sequences == 0


async def test_a_matcher_error_ends_that_request_alone(pool: AdapterPool) -> None:
    from lorapool.errors import BackendError
    from lorapool.types import GenerationRequest

    backend: Any = pool.backend
    engine = backend._engine
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    banana = backend.encode(" banana")[-1]
    broken: list[str] = []

    def hook(ids: list[str], logits: Any) -> None:  # on the engine thread, before sampling
        for seq in engine._running:
            if seq.request_id == "bad" and not broken:
                # A token the pattern does not allow: llguidance's matcher is in error.
                assert not seq.matcher.consume_token(banana)
                broken.append(seq.matcher.get_error())

    def request(rid: str) -> GenerationRequest:
        params = SamplingParams(
            max_tokens=12, temperature=0.0, structured=StructuredOutput.regex(pattern)
        )
        return GenerationRequest(rid, "Code:", params)

    async def text(rid: str) -> str:
        return "".join([c.text async for c in backend.generate(request(rid))])

    faults = backend.stats.row_faults
    engine.logits_hook = hook
    try:
        bad, good = await asyncio.gather(text("bad"), text("good"), return_exceptions=True)
    finally:
        engine.logits_hook = None
    assert isinstance(bad, BackendError), bad
    assert "structured output failed" in str(bad) and "other requests go on" in str(bad)
    assert broken
    assert isinstance(good, str) and re.fullmatch(pattern, good), good
    assert backend.stats.row_faults == faults + 1
    assert re.fullmatch(pattern, await text("after"))
    assert backend.live_sequences == 0
