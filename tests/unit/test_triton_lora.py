"""The Triton LoRA kernel (``backends/torch/triton_lora.py``) on a machine without a GPU.

The kernel itself runs through Triton's interpreter on CPU tensors, in a child pytest
over ``triton_interpreter_cases.py`` with ``TRITON_INTERPRET=1`` (Triton reads it once,
when it is first imported, and this process may have imported it already): every plan
shape of ``test_lora_plan.py``, mixed ranks, missing modules, DoRA rows, rows without
an adapter, fp32 and 16-bit. Here: what happens before a launch (the hook's choices,
the checks, the segments) and that CPU installs never import triton.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorapool.backends.torch.lora import LoraBatch, LoraSlots

from .test_lora_plan import LAYERS, MAX_RANK, SHAPES, SLOTS, _slots

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton (the 'gpu' or 'dev' extra)"
)

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CHILD_TIMEOUT_S = 600
"""A hang guard only: the interpreted cases take about 35 s on two busy cores."""


def test_kernel_in_triton_interpreter_matches_reference() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    cases = HERE / "triton_interpreter_cases.py"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(cases)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed is not None and int(passed.group(1)) >= 40, out[-3000:]
    assert "skipped" not in out, out[-3000:]


def _triton() -> type:
    from lorapool.backends.torch.triton_lora import TritonLora

    return TritonLora


def test_cpu_arenas_never_import_triton() -> None:
    code = (
        "import sys, torch\n"
        "from lorapool.backends.torch.lora import LoraSlots\n"
        "from tests.unit.test_lora_plan import SHAPES\n"
        "s = LoraSlots(SHAPES, 1, 2, 4, torch.float32, torch.device('cpu'))\n"
        "assert s.triton is None\n"
        "assert 'triton' not in sys.modules, 'triton imported on CPU'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_refuses_paneled_arenas_and_bad_blocks() -> None:
    triton_lora = _triton()
    paneled = LoraSlots(
        SHAPES,
        LAYERS,
        SLOTS,
        MAX_RANK,
        torch.float32,
        torch.device("cpu"),
        object(),  # type: ignore[arg-type]  # any kernel lays B out in panels
    )
    with pytest.raises(ValueError, match="panels"):
        triton_lora(paneled)
    plain, _ = _slots(torch.float32)
    for bad in (8, 48, 0):
        with pytest.raises(ValueError, match="power of two >= 16"):
            triton_lora(plain, block_n=bad)
    from lorapool.backends.torch.triton_lora import triton_kernel

    assert triton_kernel(paneled) is None  # logged, PyTorch's path instead
    assert triton_kernel(plain) is not None


def test_lora_kernel_env_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorapool.backends.torch.triton_lora import triton_kernel

    plain, _ = _slots(torch.float32)
    monkeypatch.setenv("LORAPOOL_LORA_KERNEL", "0")
    assert triton_kernel(plain) is None


def test_hands_back_what_it_does_not_take_and_refuses_misfits() -> None:
    """False (the PyTorch path runs) for mixed or other dtypes and strided columns, before
    any launch: a launch on CPU tensors outside the interpreter would fail."""
    slots, _ = _slots(torch.float32)
    kernel = _triton()(slots)
    seg = slots.plan([0, 1, 2]).segments
    assert seg is None, "the slots have no kernel attached, so no segments"
    seg = LoraBatch([0, 1, 2], torch.device("cpu"), segments=True).segments
    assert seg is not None
    x, y = torch.randn(3, 24), torch.zeros(3, 16)
    assert not kernel.run(0, "down", seg, x, y.bfloat16())
    assert not kernel.run(0, "down", seg, x.double(), y.double())
    assert not kernel.run(0, "down", seg, torch.randn(24, 3).t(), y)
    assert not kernel.run(0, "down", seg, x, torch.zeros(16, 3).t())
    with pytest.raises(ValueError, match="do not fit"):
        kernel.run(0, "down", seg, torch.randn(3, 16), y)
    with pytest.raises(ValueError, match="indexes token 2"):
        kernel.run(0, "down", seg, x[:2], y[:2])


def test_segments_hold_up_to_16_tokens_of_one_slot_and_are_copied_once() -> None:
    slots, _ = _slots(torch.float32)
    kernel = _triton()(slots)
    token_slots = [0] * 40 + [3, -1, 3] + [1] * 16 + [2]
    seg = LoraBatch(token_slots, torch.device("cpu"), segments=True).segments
    assert seg is not None
    d = kernel._segments(seg)
    assert d.slot.tolist() == [0, 0, 0, 1, 2, 3]
    assert d.ptr.tolist() == [0, 16, 32, 40, 56, 57, 59]
    tok = d.tok.tolist()
    assert tok[:40] == list(range(40))
    assert tok[40:56] == list(range(43, 59)) and tok[56] == 59 and tok[57:] == [40, 42]
    assert kernel._segments(seg) is d, "one copy per plan"


def test_a_kernel_that_cannot_launch_leaves_its_groups_to_pytorch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outside the interpreter, on CPU tensors, the first launch fails (no GPU, or Triton
    refuses CPU pointers): the kernel logs it, hands the group back, and is not tried
    again for that signature; the results are PyTorch's, right."""
    from .test_lora_plan import _reference

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter would run it")
    slots, adapters = _slots(torch.float32)
    kernel = _triton()(slots)
    slots.triton = kernel
    token_slots = [0, 3, -1, 3, 1]
    x = torch.randn(len(token_slots), 24)
    for _ in range(2):
        y = torch.zeros(len(token_slots), 16)
        slots.apply(0, "down_proj", slots.plan(token_slots), x, y)
        want = _reference(adapters, 0, "down_proj", token_slots, x)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    assert kernel._failed == {("down", torch.float32, False)}
    assert kernel._proven == set()
    assert sum("failed to build" in r.message for r in caplog.records) == 1
