"""Where an adapter's pieces sit in its block of the LoRA arena (:mod:`.lora`).

A block repeats one stretch per layer; in it, for each projection group the
adapter targets (``q/k/v``, ``gate/up``, ``o``, ``down``), ``A^T`` of the targeted
modules side by side as ``[in, n * r]`` (they share their input, so one shrink
serves them), then each targeted module's ``scale * B^T`` (in 16-column panels
``[ceil(out / 16), r, 16]`` for the C kernel, ``[r, out]`` otherwise), then, for a
DoRA adapter, each module's output scale ``[out]``. Every piece starts on an
:data:`~.arena.ALIGN` boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arena import rounded

__all__ = ["GROUPS", "GROUP_OF", "GroupPiece", "ImageLayout", "panels"]

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "gate_up": ("gate_proj", "up_proj"),
    "o": ("o_proj",),
    "down": ("down_proj",),
}
GROUP_OF = {m: g for g, ms in GROUPS.items() for m in ms}


def panels(n: int) -> int:
    """16-column panels that hold ``n`` columns."""
    return -(-n // 16)


@dataclass(frozen=True)
class GroupPiece:
    """Where one projection group of an adapter sits in each layer's stretch of its block
    (offsets in elements from the stretch's start; ``-1``: that module is not there)."""

    group: str
    fan_in: int
    a: int
    width: int
    """Columns of ``A^T``: ``rank`` per module present."""
    b: tuple[int, ...]
    t_col: tuple[int, ...]
    """Where each module's rank block starts among the shrunk activations' columns."""
    dora: tuple[int, ...]


@dataclass(frozen=True)
class ImageLayout:
    """An adapter's block: one stretch of ``layer_stride`` elements per layer."""

    rank: int
    layer_stride: int
    layers: int
    groups: dict[str, GroupPiece]
    """Only the groups the adapter targets."""
    panels: bool

    @property
    def size(self) -> int:
        """Elements of the whole block."""
        return self.layers * self.layer_stride

    @classmethod
    def build(
        cls,
        shapes: dict[str, tuple[int, int]],
        layers: int,
        rank: int,
        modules: frozenset[str],
        dora: bool,
        paneled: bool,
    ) -> ImageLayout:
        """The layout of an adapter of ``rank`` over ``modules``."""
        at = 0
        groups: dict[str, GroupPiece] = {}
        for group, members in GROUPS.items():
            present = [m for m in members if m in modules]
            if not present:
                continue
            fan_in = shapes[members[0]][0]
            width = len(present) * rank
            a = at
            at += rounded(fan_in * width)
            b: list[int] = []
            t_col: list[int] = []
            scales: list[int] = []
            for m in members:
                if m not in present:
                    b.append(-1)
                    t_col.append(-1)
                    scales.append(-1)
                    continue
                out = shapes[m][1]
                b.append(at)
                t_col.append(present.index(m) * rank)
                at += rounded(panels(out) * rank * 16 if paneled else rank * out)
                scales.append(at if dora else -1)
                at += rounded(out) if dora else 0
            groups[group] = GroupPiece(
                group, fan_in, a, width, tuple(b), tuple(t_col), tuple(scales)
            )
        return cls(rank, at, layers, groups, paneled)
