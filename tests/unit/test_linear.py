"""The model's projections: oneDNN's packed linear on CPU gives what ``F.linear`` gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorapool.backends.torch.model import Linear


@pytest.mark.parametrize("rows", [1, 5, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_in_fp32(rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(rows, 64, generator=gen)
    want = F.linear(x, w, b)
    layer = Linear(w.clone(), None if b is None else b.clone())
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    # A strided input (a column slice of a wider activation) works as well.
    wide = torch.randn(rows, 100, generator=gen)
    torch.testing.assert_close(layer(wide[:, :64]), F.linear(wide[:, :64], w, b))


def test_packed_linear_in_bf16_matches_an_fp32_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen)
    x = torch.randn(32, 64, generator=gen)
    out = Linear(w.bfloat16())(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, w), rtol=2e-2, atol=0.25)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_cpu_weights_are_packed_and_the_dense_copy_is_dropped() -> None:
    w = torch.randn(96, 64)
    layer = Linear(w)
    assert layer._packed is not None and layer._packed.is_mkldnn
    assert layer.weight.numel() == 0  # the packed copy replaces the dense weight
    assert layer.out_features == 96


def test_other_dtypes_fall_back_to_f_linear() -> None:
    w = torch.randn(8, 4, dtype=torch.float64)
    layer = Linear(w)
    assert layer._packed is None
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, w))
