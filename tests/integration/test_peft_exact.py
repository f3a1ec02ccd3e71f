"""PEFT-exact acceptance, against the real model and PEFT itself.

An adapter that lorapool accepts serves exactly what ``PeftModel.from_pretrained``
serves: the tokens and logits of the embedded engine match PEFT's for adapters
using ``.default`` tensor names, ``"all-linear"``, ``layers_to_transform`` and
``exclude_modules``. Files PEFT reads differently from how they look (a tensor
for a module the config does not target, one weight under two names, names
without PEFT's prefix, a targeted module without tensors) are refused at
registration and by the engine's loader, after checking here that PEFT indeed
ignores those tensors (or serves random initial weights).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lorapool.errors import AdapterValidationError, LoadError
from lorapool.formats import BaseModelSpec
from lorapool.types import GenerationRequest, SamplingParams
from lorapool.validation import validate_adapter

from .test_peft_equivalence import _loaded
from .test_validation_pool import _config as _edit_config
from .test_validation_pool import _tensors as _edit_tensors

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

PROMPT = "What is two plus two?"
TOKENS = 8
Edit = Callable[[Path], None]


def _variant(src: Path, dest: Path, *edits: Edit) -> Path:
    shutil.copytree(src, dest)
    for edit in edits:
        edit(dest)
    return dest


def _rename_all(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def change(t: dict[str, Any]) -> None:
        for key in [k for k in t if old in k]:
            t[key.replace(old, new)] = t.pop(key)

    return change


def _drop(part: str) -> Callable[[dict[str, Any]], None]:
    def change(t: dict[str, Any]) -> None:
        for key in [k for k in t if part in k]:
            del t[key]

    return change


def _add_untargeted(t: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(7)
    prefix = "base_model.model.model.layers.0.mlp.gate_proj"
    t[f"{prefix}.lora_A.weight"] = torch.randn(8, 576, generator=g) / 24
    t[f"{prefix}.lora_B.weight"] = torch.randn(1536, 8, generator=g)


def _add_duplicate(t: dict[str, Any]) -> None:
    key = next(k for k in sorted(t) if "lora_A" in k)
    t[key.replace(".lora_A.", ".lora_A.default.")] = torch.randn_like(t[key]) * 3


async def _engine_greedy(backend: Any, adapter: Path, slot: int) -> tuple[list[int], Any]:
    """Greedy tokens and last-step logits of the engine serving ``adapter`` alone."""
    await backend.load(_loaded(adapter.name, adapter), slot)
    logits: list[Any] = []
    backend._engine.logits_hook = lambda ids, rows: logits.append(rows[0].clone())
    request = GenerationRequest(
        f"req-{adapter.name}",
        [{"role": "user", "content": PROMPT}],
        SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True),
        adapter.name,
        slot,
    )
    ids: list[int] = []
    try:
        async for chunk in backend.generate(request):
            ids.extend(chunk.token_ids)
    finally:
        backend._engine.logits_hook = None
    return ids, logits[-1]


def _peft(
    hf_model: Any, tokenizer: Any, adapter: Path, new_tokens: int = 1
) -> tuple[list[int], list[Any], Any]:
    """PEFT's greedy tokens and per-step logits for ``adapter`` (``PeftModel.from_pretrained``,
    as a user would load it), and the base model's first-step logits."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model, str(adapter))
    try:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        with torch.inference_mode():
            with model.disable_adapter():
                base_first = model(ids).logits[0, -1].float()
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = [int(t) for t in out.sequences[0, ids.shape[1] :]]
        return tokens, [step[0].float() for step in out.logits], base_first
    finally:
        model.unload()


def _layers_adapter(hf_model: Any, dest: Path) -> Path:
    """A real PEFT adapter made with layers_to_transform (and random A and B)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[0, 3, 7, 20],
        layers_pattern="layers",
        init_lora_weights=False,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(hf_model, config)
    try:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.05)
        model.save_pretrained(str(dest), safe_serialization=True)
    finally:
        model.unload()
    return dest


async def test_accepted_adapters_serve_what_peft_serves(
    backend: Any, adapters: dict[str, Path], hf_model: Any, model_dir: Path, tmp_path: Path
) -> None:
    base = BaseModelSpec.from_dir(model_dir)
    accepted = {
        "default-names": _variant(
            adapters["r8-attn"],
            tmp_path / "default-names",
            _edit_tensors(_rename_all(".lora_A.", ".lora_A.default.")),
        ),
        "all-linear": _variant(
            adapters["r16-all"], tmp_path / "all-linear", _edit_config(target_modules="all-linear")
        ),
        "exclude-modules": _variant(
            adapters["r16-all"],
            tmp_path / "exclude-modules",
            _edit_config(exclude_modules=["down_proj", "model.layers.4.self_attn.q_proj"]),
            _edit_tensors(_drop(".down_proj.")),
            _edit_tensors(_drop(".layers.4.self_attn.q_proj.")),
        ),
        "layers-to-transform": _layers_adapter(hf_model, tmp_path / "layers-to-transform"),
    }
    for slot, (name, path) in enumerate(accepted.items()):
        report = validate_adapter(path, base=base)
        assert report.ok, (name, [str(p) for p in report.problems])
        tokens, last = await _engine_greedy(backend, path, slot)
        ref_tokens, ref_logits, base_first = _peft(hf_model, backend._tokenizer, path, TOKENS)
        assert tokens == ref_tokens, f"{name}: tokens differ from PEFT"
        torch.testing.assert_close(last, ref_logits[-1], atol=2e-3, rtol=1e-3)
        effect = float((ref_logits[0] - base_first).abs().max())
        assert effect > 0.1, f"{name}: the adapter should change the output"


REFUSED: dict[str, tuple[str, Edit, str]] = {
    # name: (source adapter, edit, reason)
    "untargeted": ("r8-attn", _edit_tensors(_add_untargeted), "untargeted_tensors"),
    "ambiguous": ("r8-attn", _edit_tensors(_add_duplicate), "ambiguous_tensor_names"),
    "no-prefix": (
        "r8-attn",
        _edit_tensors(_rename_all("base_model.model.model.", "model.")),
        "unknown_module",
    ),
    "narrowed-by-exclude": (
        "r8-attn",
        _edit_config(exclude_modules=["o_proj"]),
        "untargeted_tensors",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_what_peft_ignores_is_refused(
    case: str,
    backend: Any,
    adapters: dict[str, Path],
    hf_model: Any,
    model_dir: Path,
    tmp_path: Path,
) -> None:
    source, edit, reason = REFUSED[case]
    original = adapters[source]
    path = _variant(original, tmp_path / case, edit)
    # PEFT loads the file as if the extra, duplicate or misnamed tensors were not there
    # (for no-prefix: as if there were no tensors at all).
    if case in ("untargeted", "ambiguous"):
        mine = _peft(hf_model, backend._tokenizer, path)
        ref = _peft(hf_model, backend._tokenizer, original)
        torch.testing.assert_close(mine[1][0], ref[1][0], atol=0, rtol=0)
        assert not torch.equal(ref[1][0], ref[2]), "the adapter should change the output"
    report = validate_adapter(path, base=BaseModelSpec.from_dir(model_dir))
    assert reason in report.reasons, [str(p) for p in report.problems]
    with pytest.raises(AdapterValidationError) as info:
        report.raise_if_refused()
    assert info.value.reason == reason
    if case != "narrowed-by-exclude":  # the engine's config keeps target_modules only
        with pytest.raises(LoadError, match=reason):
            await backend.load(_loaded(case, path), 0)


async def test_targeted_module_without_tensors_is_refused(
    backend: Any, adapters: dict[str, Path], hf_model: Any, model_dir: Path, tmp_path: Path
) -> None:
    """PEFT wraps a targeted module the file has no tensors for and keeps its initial
    weights: random here (init_lora_weights=false), so it is not the adapter lorapool would
    serve (nothing on that module)."""
    path = _variant(
        adapters["r8-attn"],
        tmp_path / "missing",
        _edit_tensors(_drop(".o_proj.")),
    )
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert "o_proj" in cfg["target_modules"] and cfg["init_lora_weights"] is False
    narrowed = _variant(
        path,
        tmp_path / "narrowed",
        _edit_config(target_modules=[m for m in cfg["target_modules"] if m != "o_proj"]),
    )
    torch.manual_seed(0)
    with_gap = _peft(hf_model, backend._tokenizer, path)
    without = _peft(hf_model, backend._tokenizer, narrowed)
    assert not torch.equal(with_gap[1][0], without[1][0]), "PEFT filled the gap with zeros"
    base = BaseModelSpec.from_dir(model_dir)
    assert validate_adapter(path, base=base).reasons == ["missing_tensors"]
    assert validate_adapter(narrowed, base=base).ok
