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


def test_bench_vllm_hot_runs_raw_warm_and_cold_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "vllm.json"
    args = ("--parts", "hot", "--hot-requests", "6", "--repeats", "1", "--rate", "6")
    done = run_bench(
        "vllm", *args, "--cpu-loras", "9", "--json", str(out), cwd=tmp_path, timeout=500
    )
    hot = json.loads(out.read_text())["hot"]
    assert hot["hot_adapters"] == 16
    assert hot["requests"] == 6
    assert len(hot["raw_ttft_p99_s"]) == len(hot["cold_ttft_p99_s"]) == 1
    assert len(hot["no_handoff_ttft_p99_s"]) == len(hot["lorapool_handoffs"]) == 1
    assert "without hand-off (slot_wait=None)" in done.stdout
    for side in ("raw", "lorapool", "no_handoff"):  # a request's last token after its first
        assert hot[f"{side}_latency_p99_s"][0] >= hot[f"{side}_ttft_p99_s"][0] > 0
    # Both lorapool sides loaded adapters, and each side's loads were timed.
    assert hot["lorapool_device_loads"][0] > 0 and hot["cold_device_loads"][0] > 0
    assert hot["lorapool_load_ms"] > 0 and hot["cold_load_ms"] > 0
    assert "with warm_loras=0" in done.stdout
