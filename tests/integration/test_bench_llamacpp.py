"""llama.cpp as a bench target (issue 30, item 5) on the real demo model and real PEFT
adapters: llama.cpp's own converters make GGUF files that llama.cpp loads, the child serves
a base request and an adapter request (the adapter visibly applied, and as PEFT applies
it), and ``bench engine --engines torch,llamacpp`` prints its rows beside TorchBackend's.

Uses the llama.cpp venv that ``make setup-llamacpp`` builds (``make test`` builds it first);
builds nothing itself. Without the venv the tests skip, except under CI (``CI`` set), where
a missing venv is a broken setup and fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lorapool.bench.llamacpp import (
    LlamaCppChild,
    LlamaCppError,
    LlamaCppVenv,
    convert_adapter,
    convert_model,
    prompt_tokens,
)

from .cli import run_bench

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def venv() -> LlamaCppVenv:
    try:
        return LlamaCppVenv()
    except LlamaCppError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ggufs(
    venv: LlamaCppVenv, model_dir: Path, adapters: dict[str, Path], lorapool_cache: Path
) -> dict[str, Path]:
    out = {t: convert_model(venv, model_dir, t, lorapool_cache) for t in ("f32", "q8_0")}
    out["lora"] = convert_adapter(venv, adapters["r16-all"], model_dir, lorapool_cache)
    return out


def _gguf_tensor_types(venv: LlamaCppVenv, path: Path) -> dict[str, str]:
    """Tensor name -> GGML type name, read with the venv's gguf package."""
    import subprocess

    code = (
        "import json, sys, gguf\n"
        "r = gguf.GGUFReader(sys.argv[1])\n"
        "print(json.dumps({t.name: t.tensor_type.name for t in r.tensors}))\n"
    )
    done = subprocess.run(
        [str(venv.python), "-c", code, str(path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    types: dict[str, str] = json.loads(done.stdout)
    return types


def test_converted_files_are_gguf_of_the_asked_types(
    venv: LlamaCppVenv, ggufs: dict[str, Path], model_dir: Path, lorapool_cache: Path
) -> None:
    for path in ggufs.values():
        assert path.read_bytes()[:4] == b"GGUF", path
    f32 = _gguf_tensor_types(venv, ggufs["f32"])
    q8 = _gguf_tensor_types(venv, ggufs["q8_0"])
    lora = _gguf_tensor_types(venv, ggufs["lora"])
    assert f32["blk.0.attn_q.weight"] == "F32" and f32["blk.0.ffn_down.weight"] == "F32"
    assert q8["blk.0.attn_q.weight"] == "Q8_0" and q8["blk.0.ffn_down.weight"] == "Q8_0"
    # Every projection of every layer gets its A and B (rank 16, all linear layers), in F32.
    assert {n for n in lora if n.startswith("blk.0.")} == {
        f"blk.0.{m}.weight.lora_{ab}"
        for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        for ab in "ab"
    }
    assert set(lora.values()) == {"F32"}
    # Cached by content: converting again returns the same files without running again.
    written = ggufs["f32"].stat().st_mtime_ns
    assert convert_model(venv, model_dir, "f32", lorapool_cache) == ggufs["f32"]
    assert ggufs["f32"].stat().st_mtime_ns == written


def _peft_greedy(model_dir: Path, adapter: Path | None, ids: list[int]) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
        )
    return [int(t) for t in out[0, len(ids) :]]  # up to its end of sequence, included


def test_child_serves_base_and_adapter_requests(
    venv: LlamaCppVenv, ggufs: dict[str, Path], model_dir: Path, adapters: dict[str, Path]
) -> None:
    ids = prompt_tokens(model_dir, 1)[0]
    requests = [{"tokens": ids, "adapter": None}, {"tokens": ids, "adapter": 0}]
    outputs: dict[str, list[list[int]]] = {}
    with LlamaCppChild(venv, timeout=600) as child:
        assert child.info["llama_cpp_python"] == venv.version
        for outtype in ("f32", "q8_0"):
            loaded = child.call(
                op="load",
                name=outtype,
                model=str(ggufs[outtype]),
                adapters=[str(ggufs["lora"])],
                n_ctx=256,
                n_threads=2,
            )
            assert loaded["adapters"] == 1
            answer = child.call(op="run", name=outtype, requests=requests, max_tokens=MAX_TOKENS)
            assert answer["completion_tokens"] == 2 * MAX_TOKENS and answer["seconds"] > 0
            outputs[outtype] = answer["tokens"]
        with pytest.raises(LlamaCppError, match="KeyError"):
            child.call(op="run", name="missing", requests=requests, max_tokens=1)
    for outtype, (base, adapted) in outputs.items():
        assert len(base) == len(adapted) == MAX_TOKENS, outtype
        assert base != adapted, f"{outtype}: the adapter changed nothing"
    # F32 is the precision of the checkpoint's own weights: llama.cpp's greedy tokens are
    # the Hugging Face model's, and with the adapter set, PEFT's (alpha / r scaling
    # included), up to where generate stops at the end of sequence (llama.cpp goes on).
    for got, adapter in zip(outputs["f32"], (None, adapters["r16-all"]), strict=True):
        want = _peft_greedy(model_dir, adapter, ids)
        assert len(want) >= 8 and got[: len(want)] == want, (adapter, got, want)


def test_bench_engine_prints_llamacpp_rows(tmp_path: Path, venv: LlamaCppVenv) -> None:
    out = tmp_path / "engine.json"
    args = ("--engines", "torch,llamacpp", "--adapters", "2", "--batch", "2", "--rounds", "1")
    more = ("--max-tokens", "4", "--no-peft", "--no-structured", "--json", str(out))
    done = run_bench("engine", *args, *more, cwd=tmp_path, timeout=900)
    for label in ("F32 base", "F32 2 adapters", "Q8_0 base", "Q8_0 2 adapters"):
        assert f"llama.cpp {label}" in done.stdout, done.stdout
    assert "torch / llama.cpp" in done.stdout
    data = json.loads(out.read_text())
    llama = data["llamacpp"]
    assert llama["llama_cpp_python"] == venv.version and llama["threads"] >= 1
    assert llama["requests"] == 2 and llama["max_tokens"] == 4
    rows = {r["configuration"]: r for r in llama["rows"]}
    assert set(rows) == {
        "llama.cpp F32 base",
        "llama.cpp F32 2 adapters",
        "llama.cpp Q8_0 base",
        "llama.cpp Q8_0 2 adapters",
    }
    for row in rows.values():
        assert row["tok_per_s"] > 0 and row["torch_over_llamacpp"] > 0
        assert len(row["rounds"]) == 1 and row["torch_dtype"] == "float32"
