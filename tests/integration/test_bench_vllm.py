"""``lorapool bench vllm`` runs briefly through the real CLI in the vLLM venv: raw vLLM and
lorapool over vLLM side by side; its JSON carries meta and both sides' figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

pytest.importorskip("vllm")


def test_bench_vllm_inside(tmp_path: Path) -> None:
    out = tmp_path / "vllm.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    args = ("--parts", "inside", "--requests", "8", "--json", str(out))
    done = subprocess.run(
        [sys.executable, "-m", "lorapool", "bench", "vllm", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=500,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["versions"]["vllm"] and data["meta"]["config"]["requests"] == 8
    inside = data["inside"]
    assert inside["requests"] == 8
    assert min(inside["raw_tok_s"]) > 0 and min(inside["lorapool_tok_s"]) > 0
    assert inside["ratio"] > 0 and "inside max_loras" in done.stdout
