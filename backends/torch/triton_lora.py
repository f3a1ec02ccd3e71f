"""The segmented LoRA kernel for CUDA, in Triton: one launch per projection group.

The GPU counterpart of ``sgmv.c`` (:mod:`.kernel`), over the same arena and
descriptors (:class:`~.lora.LoraSlots`), with ``B`` stored plain (``[r, out]``, the
layout :class:`~.lora.LoraSlots` uses whenever the C kernel is off). One launch adds
the deltas of every slot in the forward pass to one fused projection output
(``q|k|v``, ``gate|up``, ``o`` or ``down``). Its grid is segments x output tiles x
modules: a segment is up to :data:`SEGMENT_ROWS` tokens of one slot; each program
shrinks its rows through the slot's ``A^T`` columns of its module (``x A``, in
chunks of :data:`RANK_BLOCK` of the slot's own rank, read from the descriptor, so
work and bytes follow each adapter's rank), expands them through its tile of
``scale * B^T``, and adds the delta to ``y``; a DoRA module's rows become
``s * (y + delta)``. Products and sums are fp32 (``ieee``; the shrink of 16-bit
activations through a 16-bit arena runs in TF32, which holds those values exactly);
16-bit outputs are rounded once, when the row is stored.

Each output tile redoes its rows' shrink (``in x r``, small) rather than waiting on
another launch: the shrink's ``A`` comes from L2 after the first tile.

``triton`` is imported with this module, and :mod:`.lora` imports this module only
for a CUDA arena (:func:`triton_kernel`), so CPU installs never need it. On CPU the
kernel runs on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is
in the environment before triton is first imported (Triton reads it as it decorates
its own functions): the unit tests check it that way, in a child process.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from .kernel import DESC_FIELDS, MAX_MODULES
from .layout import GROUPS

if TYPE_CHECKING:
    from .lora import LoraSlots, _Segments

__all__ = ["RANK_BLOCK", "SEGMENT_ROWS", "TritonLora", "triton_kernel"]

log = logging.getLogger(__name__)

SEGMENT_ROWS = 16
"""Tokens of one slot per program: the rows of one ``tl.dot`` tile (its minimum, 16)."""
RANK_BLOCK = 16
"""Rank columns per step of the shrink/expand loop; a slot of rank r takes ``ceil(r / 16)``."""
DEFAULT_BLOCK_N = 128
"""Output columns per program."""
DEFAULT_BLOCK_K = 64
"""Input columns per step of the shrink."""

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Activation dtypes the kernel takes (``x`` and ``y`` alike)."""


def _sgmv(  # type: ignore[no-untyped-def]
    x,
    y,
    mem,
    desc,
    seg_ptr,
    seg_slot,
    tok,
    ldx,
    ldy,
    in_dim,
    mods,
    DESC: tl.constexpr,
    MAXM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_16BIT: tl.constexpr,
):
    """Program (segment, output tile, module): ``y[rows, tile] += x[rows] A_m B_m[:, tile]``.

    ``desc`` is this layer and group's ``[slots, DESC]`` descriptor block (``sgmv.c``'s
    fields), ``mods`` the group's ``[out[m]..., y_off[m]...]`` (``MAXM`` each).
    ``DOT_16BIT``: ``x`` and the arena are both 16-bit, whose values TF32 holds
    exactly (8 exponent bits, 10 of mantissa), so the shrink runs on the tensor cores
    in TF32 with no rounding (the products, and fp32 sums, as ``ieee`` gives them).
    """
    s = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    m = tl.program_id(2)
    d = desc + tl.load(seg_slot + s).to(tl.int64) * DESC
    a_off = tl.load(d)
    b_off = tl.load(d + 3 + m)
    out = tl.load(mods + m)
    if (a_off >= 0) & (b_off >= 0) & (n0 < out):
        width = tl.load(d + 1)
        rank = tl.load(d + 2).to(tl.int32)
        col = tl.load(d + 3 + MAXM + m)
        sc_off = tl.load(d + 3 + 2 * MAXM + m)
        y_off = tl.load(mods + MAXM + m)
        rows = tl.load(seg_ptr + s) + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(seg_ptr + s + 1)
        tk = tl.load(tok + rows, mask=row_ok, other=0).to(tl.int64)
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < out
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, in_dim, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < in_dim
                xs = tl.load(
                    x + tk[:, None] * ldx + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                a = tl.load(
                    mem + a_off + kk[:, None] * width + (col + rr)[None, :],
                    mask=k_ok[:, None] & r_ok[None, :],
                    other=0.0,
                )
                if DOT_16BIT:
                    t += tl.dot(xs.to(tl.float32), a.to(tl.float32), input_precision="tf32")
                else:
                    t += tl.dot(xs.to(tl.float32), a.to(tl.float32), input_precision="ieee")
            b = tl.load(
                mem + b_off + rr[:, None] * out + cols[None, :],
                mask=r_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += tl.dot(t, b.to(tl.float32), input_precision="ieee")
        ok = row_ok[:, None] & col_ok[None, :]
        yp = y + tk[:, None] * ldy + y_off + cols[None, :]
        res = tl.load(yp, mask=ok, other=0.0).to(tl.float32) + acc
        if sc_off >= 0:
            sc = tl.load(mem + sc_off + cols, mask=col_ok, other=0.0)
            res = res * sc.to(tl.float32)[None, :]
        if y.dtype.element_ty == tl.bfloat16:
            # Rounded to nearest even in integer steps, as PyTorch and sgmv.c round (NaN
            # kept): Triton's interpreter truncates a plain .to(tl.bfloat16).
            u = res.to(tl.uint32, bitcast=True)
            bits = tl.where(
                (u & 0x7FFFFFFF) > 0x7F800000,
                (u >> 16) | 0x40,
                (u + 0x7FFF + ((u >> 16) & 1)) >> 16,
            )
            tl.store(yp, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=ok)
        else:
            tl.store(yp, res.to(y.dtype.element_ty), mask=ok)


@functools.cache
def _compiled() -> Any:
    """``_sgmv`` under ``triton.jit`` (compiled per signature at its first launch)."""
    return triton.jit(_sgmv)


@dataclass(frozen=True)
class _Group:
    index: int
    in_dim: int
    width: int
    """Columns of the fused output."""
    n_mod: int
    tiles: int
    """Output tiles of the widest module."""
    mods: torch.Tensor
    """``[out[m]] * MAX_MODULES + [y_off[m]] * MAX_MODULES`` on the arena's device."""


@dataclass(frozen=True)
class _DeviceSegments:
    count: int
    ptr: torch.Tensor
    slot: torch.Tensor
    tok: torch.Tensor


class TritonLora:
    """The kernel bound to one :class:`~.lora.LoraSlots`: its arena, a device copy of its
    descriptors (refreshed when :attr:`~.lora.LoraSlots.desc_version` moves), and each
    group's fixed arguments.

    ``block_n`` and ``block_k`` (powers of two, >= 16) size the output tile and the
    shrink's step.
    """

    def __init__(
        self,
        slots: LoraSlots,
        *,
        block_n: int = DEFAULT_BLOCK_N,
        block_k: int = DEFAULT_BLOCK_K,
    ) -> None:
        if slots.kernel is not None:
            raise ValueError("the Triton kernel reads B as [r, out]; this arena is in panels")
        for name, value in (("block_n", block_n), ("block_k", block_k)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, not {value}")
        self.slots = slots
        self.block_n = block_n
        self.block_k = block_k
        self.device = slots.memory.device
        self._kernel = _compiled()
        self._desc = torch.empty_like(slots.desc, device=self.device)
        self._desc_version = -1
        self._desc_views: dict[tuple[int, str], torch.Tensor] = {}
        self._groups: dict[str, _Group] = {}
        for gi, (group, modules) in enumerate(GROUPS.items()):
            if len(modules) > MAX_MODULES:
                raise ValueError(f"{group}: {len(modules)} modules, the kernel takes {MAX_MODULES}")
            outs = [slots.shapes[m][1] for m in modules]
            starts = [sum(outs[:j]) for j in range(len(outs))]
            pad = [0] * (MAX_MODULES - len(modules))
            mods = torch.tensor(outs + pad + starts + pad, dtype=torch.int64, device=self.device)
            tiles = -(-max(outs) // block_n)
            in_dim = slots.shapes[modules[0]][0]
            self._groups[group] = _Group(gi, in_dim, sum(outs), len(modules), tiles, mods)
            for layer in range(slots.num_layers):
                self._desc_views[(layer, group)] = self._desc[layer, gi]
        self._seg_source: _Segments | None = None
        self._seg: _DeviceSegments | None = None
        self._proven: set[tuple[str, torch.dtype, bool]] = set()
        """Signatures launched once: a later failure is a real error, raised."""
        self._failed: set[tuple[str, torch.dtype, bool]] = set()
        """Signatures whose first launch failed: left to PyTorch's path from then on."""

    def _segments(self, seg: _Segments) -> _DeviceSegments:
        """The plan's tokens in segments of up to :data:`SEGMENT_ROWS` of one slot, on the
        device; one copy per plan (the last plan's is kept)."""
        if seg is self._seg_source and self._seg is not None:
            return self._seg
        ptr = seg.ptr.tolist()
        slot_of = seg.slot.tolist()
        new_ptr = [0]
        new_slot: list[int] = []
        i = 0
        while i < seg.count:
            # The plan's segments of one slot are consecutive and its tokens contiguous.
            j = i
            while j + 1 < seg.count and slot_of[j + 1] == slot_of[i]:
                j += 1
            start, end = ptr[i], ptr[j + 1]
            for at in range(start, end, SEGMENT_ROWS):
                new_ptr.append(min(at + SEGMENT_ROWS, end))
                new_slot.append(slot_of[i])
            i = j + 1
        n = len(new_slot)
        head = torch.tensor(new_ptr + new_slot, dtype=torch.int32)
        packed = torch.cat([head, seg.tok.to(torch.int32)]).to(self.device)
        self._seg = _DeviceSegments(
            n, packed[: n + 1], packed[n + 1 : 2 * n + 1], packed[2 * n + 1 :]
        )
        self._seg_source = seg
        return self._seg

    def run(self, layer: int, group: str, seg: _Segments, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Add ``group``'s deltas for every segment of ``seg`` into ``y``, in one launch.

        ``False`` (nothing done) for what the kernel does not take: other dtypes,
        ``x`` and ``y`` of different dtypes, columns not contiguous, another device.
        Raises :class:`ValueError` when the tensors do not fit the group or the plan.
        """
        g = self._groups[group]
        if (
            x.dtype is not y.dtype
            or x.dtype not in _DTYPES
            or x.device != self.device
            or y.device != self.device
            or x.stride(1) != 1
            or y.stride(1) != 1
        ):
            return False
        if x.shape[1] != g.in_dim or y.shape[1] != g.width:
            raise ValueError(f"{group}: x {tuple(x.shape)} / y {tuple(y.shape)} do not fit")
        if x.shape[0] < seg.rows or y.shape[0] < seg.rows:
            raise ValueError(f"{group}: the plan indexes token {seg.rows - 1}, x has {x.shape[0]}")
        slots = self.slots
        if self._desc_version != slots.desc_version:
            self._desc.copy_(slots.desc)
            self._desc_version = slots.desc_version
        d = self._segments(seg)
        mem = slots.memory
        dot_16bit = x.dtype is not torch.float32 and mem.dtype is not torch.float32
        key = (group, x.dtype, dot_16bit)
        if key in self._failed:
            return False
        index = self.device.index
        try:
            if (
                self.device.type == "cuda"
                and index is not None
                and torch.cuda.current_device() != index
            ):
                with torch.cuda.device(index):  # Triton launches on the current device
                    self._launch(g, layer, group, d, x, y, dot_16bit)
            else:
                self._launch(g, layer, group, d, x, y, dot_16bit)
        except Exception:
            if key in self._proven:
                raise
            # The first launch of a signature compiles it, before anything is written: a
            # GPU or Triton that cannot build it leaves the group to PyTorch's path.
            log.warning(
                "Triton LoRA kernel failed to build for %s; PyTorch matmuls", key, exc_info=True
            )
            self._failed.add(key)
            return False
        self._proven.add(key)
        return True

    def _launch(
        self,
        g: _Group,
        layer: int,
        group: str,
        d: _DeviceSegments,
        x: torch.Tensor,
        y: torch.Tensor,
        dot_16bit: bool,
    ) -> None:
        self._kernel[(d.count, g.tiles, g.n_mod)](
            x,
            y,
            self.slots.memory,
            self._desc_views[(layer, group)],
            d.ptr,
            d.slot,
            d.tok,
            x.stride(0),
            y.stride(0),
            g.in_dim,
            g.mods,
            DESC=DESC_FIELDS,
            MAXM=MAX_MODULES,
            BLOCK_M=SEGMENT_ROWS,
            BLOCK_N=self.block_n,
            BLOCK_K=self.block_k,
            BLOCK_R=RANK_BLOCK,
            DOT_16BIT=dot_16bit,
        )


_OFF = {"0", "false", "off"}


def triton_kernel(slots: LoraSlots) -> TritonLora | None:
    """The kernel for ``slots``, or ``None`` (logged once per arena) when
    ``LORAPOOL_LORA_KERNEL=0`` turns the LoRA kernels off or the arena is in panels."""
    if os.environ.get("LORAPOOL_LORA_KERNEL", "1").strip().lower() in _OFF:
        return None
    try:
        return TritonLora(slots)
    except ValueError as exc:
        log.warning("Triton LoRA kernel not used, PyTorch matmuls instead: %s", exc)
        return None
