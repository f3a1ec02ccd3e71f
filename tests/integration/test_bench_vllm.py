"""``lorapool bench vllm`` runs briefly through the real CLI in the vLLM venv: raw vLLM and
lorapool over vLLM side by side; its JSON carries meta and both sides' figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .cli import run_bench

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

pytest.importorskip("vllm")


def test_bench_vllm_inside(tmp_path: Path) -> None:
    out = tmp_path / "vllm.json"
    args = ("--parts", "inside", "--requests", "8", "--json", str(out))
    done = run_bench("vllm", *args, cwd=tmp_path, timeout=500)
    data = json.loads(out.read_text())
    assert data["meta"]["versions"]["vllm"] and data["meta"]["config"]["requests"] == 8
    inside = data["inside"]
    assert inside["requests"] == 8
    assert min(inside["raw_tok_s"]) > 0 and min(inside["lorapool_tok_s"]) > 0
    assert inside["ratio"] > 0 and "inside max_loras" in done.stdout
