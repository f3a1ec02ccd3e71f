"""An adapter's tensors checked against the model and laid out compactly: the host-tier form.

:func:`prepare_adapter` runs once per adapter, off the engine thread, when the adapter
enters the host tier. What it returns holds only the modules the adapter targets, at its
own rank, so a switch to the device copies the adapter's own bytes and nothing else
(:meth:`~lorapool.backends.torch.lora.LoraSlots.copy_in`).

DoRA adapters (``use_dora=true``) also get, per targeted module and layer, the vector
PEFT scales that layer's output by: ``magnitude / ||W + scale * B A||`` (row norms),
which depends only on the adapter and the base weights, so it is computed here once
(``base_weight`` reads the base model's weights) and the forward pass only multiplies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorapool.formats import LLAMA_PARENTS, LoraTargets, map_lora_tensors
from lorapool.types import LoraConfig

__all__ = ["BaseWeight", "PreparedAdapter", "prepare_adapter"]

BaseWeight = Callable[[int, str], torch.Tensor]
"""``(layer, module) -> W`` as ``[out, in]``: the base model's weight of one linear."""


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked against the model and laid out compactly, ready to copy to a slot.

    Only the modules it targets, at its own rank: ``a[module]`` is ``A^T`` as
    ``[layers, in, r]`` and ``b[module]`` is ``scale * B^T`` as
    ``[layers, r, out]``; for a DoRA adapter ``dora[module]`` is the output scale
    ``[layers, out]`` (fp32). This is the host-tier form: a switch to the device
    copies these bytes and nothing else.
    """

    adapter_id: str
    rank: int
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    nbytes: int
    dora: dict[str, torch.Tensor] = field(default_factory=dict)


def prepare_adapter(
    adapter_id: str,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    num_layers: int,
    max_rank: int,
    dtype: torch.dtype,
    base_weight: BaseWeight | None = None,
) -> PreparedAdapter:
    """Check an adapter's tensors against the model and lay them out for a slot.

    Which module each tensor goes to is decided by
    :func:`lorapool.formats.map_lora_tensors`, as PEFT decides it and as
    validation did at registration: a tensor PEFT would ignore (untargeted,
    misnamed, or stored under two names) is refused, never applied. A module
    with no tensors adds nothing. A DoRA adapter needs ``base_weight``. Runs off
    the engine thread; raises ``ValueError``
    (:class:`lorapool.errors.AdapterValidationError` for the names) saying what
    does not fit.
    """
    r = config.r
    if r > max_rank:
        raise ValueError(f"rank {r} exceeds max_rank {max_rank}")
    if config.use_dora and base_weight is None:
        raise ValueError("a DoRA adapter needs the base model's weights to be prepared")
    scale = config.scaling
    parents = {m: p for m, p in LLAMA_PARENTS.items() if m in shapes}
    mapping = map_lora_tensors(tensors, LoraTargets.from_config(config), parents)
    mapping.raise_first()
    found: dict[tuple[int, str, str], torch.Tensor] = {}
    for name, site in mapping.sites.items():
        t = tensors[name]
        layer, module, side = site.layer, site.module, str(site.side)
        if layer >= num_layers:
            raise ValueError(f"tensor {name!r} names layer {layer}; the model has {num_layers}")
        fan_in, fan_out = shapes[module]
        want = {"A": (r, fan_in), "B": (fan_out, r), "M": (fan_out,)}[side]
        if tuple(t.shape) != want:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
        found[(layer, module, side)] = t
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    dora: dict[str, torch.Tensor] = {}
    for module in sorted({m for _, m, s in found if s != "M"}):
        fan_in, fan_out = shapes[module]
        ma = torch.zeros(num_layers, fan_in, r, dtype=dtype)
        mb = torch.zeros(num_layers, r, fan_out, dtype=dtype)
        md = torch.ones(num_layers, fan_out, dtype=torch.float32)
        for layer in range(num_layers):
            ta = found.get((layer, module, "A"))
            tb = found.get((layer, module, "B"))
            if (ta is None) != (tb is None):
                raise ValueError(f"layer {layer} {module}: lora_A and lora_B must come in pairs")
            if ta is None or tb is None:
                continue
            ma[layer] = ta.t().to(dtype)
            mb[layer] = (tb.float().t() * scale).to(dtype)
            if config.use_dora:
                assert base_weight is not None
                magnitude = found.get((layer, module, "M"))
                if magnitude is None:
                    raise ValueError(f"layer {layer} {module}: a DoRA adapter needs its magnitude")
                md[layer] = _dora_scale(base_weight(layer, module), ta, tb, scale, magnitude)
        a[module], b[module] = ma, mb
        if config.use_dora:
            dora[module] = md
    nbytes = sum(t.nbytes for d in (a, b, dora) for t in d.values())
    return PreparedAdapter(adapter_id, r, a, b, nbytes, dora)


def _dora_scale(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
) -> torch.Tensor:
    """``magnitude / ||W + scale * B A||`` over each output row, in fp32, as PEFT's DoRA."""
    from .dora import magnitude_scale

    return magnitude_scale(
        weight.float(), lora_a.float().t(), lora_b.float().t() * scale, magnitude.float()
    ).float()
