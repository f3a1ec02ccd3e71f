"""DoRA's per-row scale (``backends/torch/dora.py``) against PEFT's own DoRA layer.

A small ``nn.Linear`` (with a bias) wrapped by PEFT with ``use_dora=True``, its A,
B and magnitude moved away from their initial values: ``magnitude_scale`` times
``x W^T + x A^T (scale B^T)``, plus the bias, is what PEFT outputs, with plain
scaling and with rsLoRA.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from torch import nn  # noqa: E402

from lorapool.backends.torch.dora import magnitude_scale  # noqa: E402

IN, OUT = 24, 20


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # type: ignore[no-any-return]


def _peft_dora(rank: int, alpha: int, rslora: bool, seed: int) -> tuple[nn.Module, nn.Module]:
    """PEFT's DoRA around a random linear, its weights perturbed; and the wrapped layer."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=["proj"],
        use_dora=True,
        use_rslora=rslora,
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    model = peft.get_peft_model(_Net(), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_(0, 0.3)
        layer.lora_B["default"].weight.normal_(0, 0.3)
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.mul_(torch.linspace(0.5, 1.5, OUT))
    model.eval()
    return model, layer


def _ours(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lorapool's serving equation, from the layer's tensors as lorapool stores them."""
    base = layer.base_layer
    scale = layer.scaling["default"]
    a_t = layer.lora_A["default"].weight.detach().t()
    b_t = layer.lora_B["default"].weight.detach().t() * scale
    magnitude = layer.lora_magnitude_vector["default"].weight.detach()
    s = magnitude_scale(base.weight.detach(), a_t, b_t, magnitude)
    y = s * (x @ base.weight.detach().t() + x @ a_t @ b_t) + base.bias.detach()
    return y, s


@pytest.mark.parametrize(
    ("rank", "alpha", "rslora"), [(4, 8, False), (8, 16, True), (1, 3, False), (16, 4, True)]
)
def test_matches_peft_dora(rank: int, alpha: int, rslora: bool) -> None:
    model, layer = _peft_dora(rank, alpha, rslora, seed=rank)
    expected_scale = alpha / rank**0.5 if rslora else alpha / rank
    assert layer.scaling["default"] == pytest.approx(expected_scale)
    x = torch.randn(5, 3, IN, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(x)
        with model.disable_adapter():
            base_only = model(x)
    mine, s = _ours(layer, x)
    assert s.dtype == torch.float32 and s.shape == (OUT,)
    torch.testing.assert_close(mine, want, atol=1e-5, rtol=1e-5)
    # the test would catch DoRA ignored: plain LoRA (s = 1) is far from PEFT's output
    base = layer.base_layer
    a_t = layer.lora_A["default"].weight.detach().t()
    b_t = layer.lora_B["default"].weight.detach().t() * layer.scaling["default"]
    plain = x @ base.weight.detach().t() + x @ a_t @ b_t + base.bias.detach()
    assert float((plain - want).abs().max()) > 1e-2
    assert float((want - base_only).abs().max()) > 1e-2


def test_is_magnitude_over_row_norms() -> None:
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    a_t = torch.zeros(2, 1)
    b_t = torch.zeros(1, 3)
    magnitude = torch.tensor([10.0, 1.0, 2.0])
    torch.testing.assert_close(
        magnitude_scale(weight, a_t, b_t, magnitude), torch.tensor([2.0, 0.5, 2.0])
    )
    # the LoRA delta enters the norm: W + (A^T B^T)^T, B^T already scaled
    a_t = torch.tensor([[1.0], [0.0]])
    b_t = torch.tensor([[1.0, 0.0, 0.0]])  # row 0 becomes [4, 4]
    got = magnitude_scale(weight, a_t, b_t, magnitude)
    torch.testing.assert_close(got[0], torch.tensor(10.0 / 32**0.5))


def test_low_precision_inputs_give_fp32() -> None:
    _, layer = _peft_dora(4, 8, False, seed=3)
    base = layer.base_layer.weight.detach()
    a_t = layer.lora_A["default"].weight.detach().t()
    b_t = layer.lora_B["default"].weight.detach().t() * layer.scaling["default"]
    magnitude = layer.lora_magnitude_vector["default"].weight.detach()
    fp32 = magnitude_scale(base, a_t, b_t, magnitude)
    bf16 = magnitude_scale(base.bfloat16(), a_t.bfloat16(), b_t.bfloat16(), magnitude.bfloat16())
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.02)


def test_no_autograd_graph() -> None:
    weight = torch.randn(3, 2, requires_grad=True)
    a_t = torch.randn(2, 1, requires_grad=True)
    b_t = torch.randn(1, 3, requires_grad=True)
    s = magnitude_scale(weight, a_t, b_t, torch.ones(3, requires_grad=True))
    assert not s.requires_grad


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "m_shape"),
    [
        ((3, 2), (2, 4), (4,)),
        ((2, 2), (3, 4), (4,)),
        ((2, 2), (2, 5), (4,)),
        ((2, 2), (2, 4), (5,)),
    ],
)
def test_shapes_that_do_not_fit_are_refused(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], m_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="DoRA shapes"):
        magnitude_scale(
            torch.zeros(4, 2), torch.zeros(a_shape), torch.zeros(b_shape), torch.ones(m_shape)
        )
