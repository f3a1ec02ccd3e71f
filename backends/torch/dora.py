"""DoRA's per-row output scale, computed once per adapter as PEFT computes it.

PEFT's ``DoraLinearLayer`` (peft 0.21, ``tuners/lora/dora.py``) serves a DoRA
linear as ``y = s * (x W^T + scale * x A^T B^T) + bias`` where, per output row,
``s = magnitude / ||W + scale * B A||`` (the L2 norm of each row of the
combined weight, over the input dimension; ``torch.linalg.norm(..., dim=1)``),
detached from autograd. ``s`` depends only on the adapter and the base weight,
so lorapool computes it when the adapter is prepared and a forward pass only
multiplies by it.

PEFT computes the norm in the activations' dtype; here it is always fp32 (the
exact match for an fp32 model, and closer to it than bf16 for a bf16 one).
"""

from __future__ import annotations

import torch

__all__ = ["magnitude_scale"]


def magnitude_scale(
    weight: torch.Tensor,
    a_t: torch.Tensor,
    b_t: torch.Tensor,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """``magnitude / ||W + (a_t @ b_t)^T||`` per output row, as fp32 ``[out]``.

    ``weight`` is the base linear's ``W`` as ``[out, in]``; ``a_t`` is ``A^T``
    ``[in, r]`` and ``b_t`` is ``scale * B^T`` ``[r, out]`` (the LoRA scaling,
    ``alpha/r`` or rsLoRA's ``alpha/sqrt(r)``, already folded in, as lorapool
    stores B); ``magnitude`` is the adapter's ``lora_magnitude_vector``,
    ``[out]``. Raises ``ValueError`` when the shapes do not fit together.
    """
    out_features, in_features = weight.shape
    if (
        a_t.dim() != 2
        or b_t.dim() != 2
        or a_t.shape[0] != in_features
        or b_t.shape[1] != out_features
        or a_t.shape[1] != b_t.shape[0]
        or tuple(magnitude.shape) != (out_features,)
    ):
        raise ValueError(
            f"DoRA shapes do not fit: W {tuple(weight.shape)}, A^T {tuple(a_t.shape)}, "
            f"B^T {tuple(b_t.shape)}, magnitude {tuple(magnitude.shape)}"
        )
    with torch.no_grad():
        combined = weight.float() + (a_t.float() @ b_t.float()).t()
        norm: torch.Tensor = torch.linalg.vector_norm(combined, dim=1)
        return (magnitude.float() / norm).detach()
