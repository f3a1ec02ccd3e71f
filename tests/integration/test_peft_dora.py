"""DoRA served exactly as PEFT computes it (issue 30, item 3), on the real model.

One engine batch on ``TorchBackend(max_rank=64)`` holds adapters of ranks
4/8/16/32/64, DoRA and plain LoRA rows together, one DoRA adapter with rsLoRA,
plus a base-model row: each row gives the same 32 greedy tokens and allclose
logits as PEFT running that adapter alone. The DoRA adapters have A, B and
magnitudes moved away from PEFT's initial values, and the test first checks
that PEFT's DoRA output is far from the same weights run as plain LoRA, so an
engine that ignored the magnitudes would fail it.

Registration: a backend whose capabilities lack ``dora`` (``MockBackend``, as
vLLM's) refuses a DoRA adapter with ``unsupported_dora``; TorchBackend takes it.
The magnitude names lorapool accepts are the ones PEFT itself loads.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool
from lorapool.errors import AdapterValidationError
from lorapool.formats import LLAMA_PARENTS, LoraTargets, map_lora_tensors
from lorapool.testing import MockBackend
from lorapool.testing.adapters import ALL_LINEAR, ATTENTION
from lorapool.types import GenerationRequest, SamplingParams

from .dora_adapters import make_peft_adapter
from .test_peft_equivalence import NEW_TOKENS, _loaded, _peft_greedy

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

MLP = ("gate_proj", "up_proj", "down_proj")
# name -> (rank, target modules, use_rslora, use_dora)
SPECS: dict[str, tuple[int, tuple[str, ...], bool, bool]] = {
    "r4-dora-attn": (4, ATTENTION, False, True),
    "r8-lora-all": (8, ALL_LINEAR, False, False),
    "r16-dora-all-rslora": (16, ALL_LINEAR, True, True),
    "r32-dora-mlp": (32, MLP, False, True),
    "r64-lora-attn": (64, ATTENTION, False, False),
}
PROMPTS: dict[str | None, str] = {
    None: "Tell me a story about a lighthouse keeper.",
    "r4-dora-attn": "What is two plus two?",
    "r8-lora-all": "Write a haiku about the sea.",
    "r16-dora-all-rslora": "Why is the sky blue?",
    "r32-dora-mlp": "Name three colours of the rainbow.",
    "r64-lora-attn": "Describe your favourite breakfast.",
}
CACHE_VERSION = "v1"
"""Bump when :data:`SPECS` or :func:`make_peft_adapter` change: the adapters are cached."""
MAGNITUDE = "lora_magnitude_vector"


@pytest.fixture(scope="module")
def dora_adapters(lorapool_cache: Path, model_dir: Path) -> dict[str, Path]:
    """The adapters of :data:`SPECS`, written by PEFT once and cached (on a base model of
    their own, as ``tests/conftest.py`` makes its adapters)."""
    root = lorapool_cache / f"test-adapters-dora-{CACHE_VERSION}"
    out: dict[str, Path] = {}
    base = None
    for seed, (name, (rank, targets, rslora, dora)) in enumerate(SPECS.items()):
        path = root / name
        if not (path / "adapter_model.safetensors").is_file():
            if base is None:
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            tmp = root / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            make_peft_adapter(
                tmp,
                base,
                rank=rank,
                target_modules=targets,
                seed=100 + seed,
                use_rslora=rslora,
                use_dora=dora,
            )
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        out[name] = path
    return out


def _as_plain_lora(src: Path, dest: Path) -> Path:
    """The same A and B without DoRA: ``use_dora`` off and the magnitudes removed."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    config = json.loads((src / "adapter_config.json").read_text())
    config["use_dora"] = False
    (dest / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(src / "adapter_model.safetensors")
    plain = {k: v for k, v in tensors.items() if MAGNITUDE not in k}
    assert len(plain) < len(tensors)
    save_file(plain, dest / "adapter_model.safetensors")
    return dest


def _peft_first_logits(hf_model: Any, tokenizer: Any, adapter: Path, prompt: str) -> Any:
    """PEFT's logits for the first generated token, the adapter alone."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model, str(adapter))
    try:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        with torch.inference_mode():
            return model(ids).logits[0, -1].float()
    finally:
        model.unload()


class _Run:
    def __init__(self) -> None:
        self.tokens: dict[str | None, list[int]] = {}
        self.logits: dict[str, list[Any]] = {}
        self.steps: list[set[str]] = []


async def _mixed_batch(backend: Any, adapters: dict[str, Path]) -> _Run:
    """Every adapter and the base model submitted together to one engine."""
    slots: dict[str, int] = {}
    for slot, name in enumerate(adapters):
        await backend.load(_loaded(name, adapters[name]), slot)
        slots[name] = slot
    run = _Run()

    def hook(request_ids: list[str], logits: Any) -> None:
        run.steps.append(set(request_ids))
        for rid, row in zip(request_ids, logits, strict=True):
            run.logits.setdefault(rid, []).append(row.clone())

    backend._engine.logits_hook = hook
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

    async def one(name: str | None) -> list[int]:
        request = GenerationRequest(
            f"req-{name or 'base'}",
            [{"role": "user", "content": PROMPTS[name]}],
            params,
            name,
            None if name is None else slots[name],
        )
        ids: list[int] = []
        async for chunk in backend.generate(request):
            ids.extend(chunk.token_ids)
        return ids

    names: list[str | None] = [None, *adapters]
    run.tokens = dict(zip(names, await asyncio.gather(*(one(n) for n in names)), strict=True))
    assert any(len(s) == len(names) for s in run.steps), "requests never ran in one batch"
    return run


# A hang guard, not a speed bound: 520 s on 2 cores shared with three other busy sessions
# (PEFT's reference runs, 32 steps each without a KV cache, are most of it).
@pytest.mark.timeout(1800)
async def test_dora_and_lora_rows_in_one_batch_match_peft(
    model_dir: Path, dora_adapters: dict[str, Path], hf_model: Any, tmp_path: Path
) -> None:
    from lorapool.backends.torch import TorchBackend

    backend = TorchBackend(
        model_dir, max_slots=len(SPECS), max_rank=64, max_batch=8, max_seq_len=256
    )
    await backend.start()
    try:
        tokenizer = backend._tokenizer
        # DoRA matters for these adapters: PEFT's DoRA output is far from plain LoRA's.
        for name, (_, _, _, dora) in SPECS.items():
            if not dora:
                continue
            with_dora = _peft_first_logits(hf_model, tokenizer, dora_adapters[name], PROMPTS[name])
            plain = _as_plain_lora(dora_adapters[name], tmp_path / name)
            without = _peft_first_logits(hf_model, tokenizer, plain, PROMPTS[name])
            effect = float((with_dora - without).abs().max())
            assert effect > 1.0, f"{name}: DoRA changes PEFT's logits by only {effect:.3f}"
        run = await _mixed_batch(backend, dora_adapters)
    finally:
        await backend.aclose()
    failures: list[str] = []
    outputs = set()
    for name in [None, *SPECS]:
        ref_tokens, ref_logits, _ = _peft_greedy(
            hf_model, tokenizer, None if name is None else dora_adapters[name], PROMPTS[name]
        )
        outputs.add(tuple(ref_tokens))
        mine = run.logits[f"req-{name or 'base'}"]
        kind = "base" if name is None else ("DoRA" if SPECS[name][3] else "LoRA")
        if run.tokens[name] != ref_tokens:
            first = next(
                i
                for i, (a, b) in enumerate(zip(run.tokens[name], ref_tokens, strict=False))
                if a != b
            )
            failures.append(f"{name} ({kind}): tokens differ from PEFT from step {first}")
        for step in (0, len(ref_logits) - 1):
            err = float((mine[step] - ref_logits[step]).abs().max())
            if not torch.allclose(mine[step], ref_logits[step], atol=2e-3, rtol=1e-3):
                failures.append(f"{name} ({kind}): step {step} logits off by {err:.4f}")
    assert not failures, "; ".join(failures)
    assert len(outputs) == len(SPECS) + 1, "adapters should change the output"


async def test_dora_refused_without_the_capability_accepted_by_torch_backend(
    model_dir: Path, dora_adapters: dict[str, Path]
) -> None:
    from lorapool.backends.torch import TorchBackend

    dora, plain = dora_adapters["r4-dora-attn"], dora_adapters["r8-lora-all"]
    mock = MockBackend()
    assert not mock.capabilities.dora
    async with AdapterPool(mock) as pool:
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("dora", str(dora), tenant="acme")
        assert err.value.reason == "unsupported_dora"
        assert "does not serve DoRA" in str(err.value)
        assert pool.list_adapters(tenant="acme") == []
        await pool.register("plain", str(plain), tenant="acme")

    backend = TorchBackend(model_dir, max_slots=2, max_rank=64, max_batch=2, max_seq_len=128)
    async with AdapterPool(backend) as pool:
        assert backend.capabilities.dora, "TorchBackend should declare Capabilities(dora=True)"
        info = await pool.register("dora", str(dora), tenant="acme")
        assert info.config.use_dora
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        tokens = [
            c async for c in pool.generate("Hello", adapter="dora", tenant="acme", params=params)
        ]
        assert sum(len(c.token_ids) for c in tokens) == 4


@pytest.mark.parametrize(
    ("suffix", "peft_loads"),
    [("", True), (".weight", True), (".default.weight", True), (".default", False)],
)
def test_magnitude_names_as_peft_loads_them(
    dora_adapters: dict[str, Path], hf_model: Any, tmp_path: Path, suffix: str, peft_loads: bool
) -> None:
    """lorapool maps a magnitude name exactly when PEFT loads the tensor under it."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    src = dora_adapters["r4-dora-attn"]
    dest = tmp_path / "renamed"
    shutil.copytree(src, dest)
    tensors = load_file(src / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith(MAGNITUDE))
    marked = torch.full_like(tensors[key], 7.0)
    tensors[key + suffix] = tensors.pop(key) * 0 + marked
    save_file(tensors, dest / "adapter_model.safetensors")

    model = PeftModel.from_pretrained(hf_model, str(dest))
    try:
        module = model.base_model.model.get_submodule(
            key.removeprefix("base_model.model.").removesuffix(f".{MAGNITUDE}")
        )
        loaded = module.lora_magnitude_vector["default"].weight
        assert bool((loaded == 7.0).all()) == peft_loads
    finally:
        model.unload()
    targets = LoraTargets(frozenset(ATTENTION), dora=True)
    mapping = map_lora_tensors(tensors, targets, LLAMA_PARENTS)
    assert (mapping.problems == []) == peft_loads, [str(p) for p in mapping.problems]
