"""Device slots holding LoRA weights, and the mixed-adapter matmuls.

Every LoRA-able linear of every layer has one stacked tensor per side:
``A^T`` as ``[layers, slots, in, max_rank]`` and ``scale * B^T`` as
``[layers, slots, max_rank, out]`` (with the C kernel the same numbers are laid
out for it: each slot's A and B of a projection group in one block, B in panels
of 16 columns; :meth:`LoraSlots.b_matrix`). An adapter of rank ``r < max_rank`` fills
the first ``r`` columns and zeros the rest, so mixed ranks and mixed target
modules share one layout and the result is exact. ``q/k/v`` and ``gate/up``
share their input, so their ``A`` sides are stored side by side and shrunk with
one matmul. The stacks may be wider than the activations (fp32 stacks under a
bf16 model on CPU); inputs are cast up and deltas cast back as they are added.

A forward pass gets one :class:`LoraBatch` plan (which token uses which slot).
On CPU with the C kernel (``kernel.py``), one kernel call per projection group
does every slot's shrink, expand and add, for decode steps and prefills alike.
Otherwise (no compiler, fp16 activations, CUDA), with many adapters the plan
pads each slot's tokens to a common count and runs one batched matmul per side
for all slots (segmented by slot, never per row); with one adapter, or very
uneven groups, one matmul per slot.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lorapool.formats import LLAMA_PARENTS, LoraTargets, map_lora_tensors
from lorapool.types import LoraConfig

from .kernel import MAX_MODULES, SgmvGroup, SgmvKernel

__all__ = [
    "KERNEL_SEGMENT_ROWS",
    "LoraBatch",
    "LoraSlots",
    "PreparedAdapter",
    "prepare_adapter",
]

KERNEL_SEGMENT_ROWS = 4
"""A slot's tokens are cut into kernel segments of at most this many, so that one
adapter's rows spread over the threads (the later segments read its weights from
cache) and each segment's rows fit one register tile."""

_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "gate_up": ("gate_proj", "up_proj"),
    "o": ("o_proj",),
    "down": ("down_proj",),
}
_GROUP_OF = {m: g for g, ms in _GROUPS.items() for m in ms}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
"""Activation dtypes the C kernel takes."""


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked against the model and laid out compactly, ready to copy to a slot.

    Only the modules it targets, at its own rank: ``a[module]`` is ``A^T`` as
    ``[layers, in, r]`` and ``b[module]`` is ``scale * B^T`` as
    ``[layers, r, out]``. This is the host-tier form: a switch to the device
    copies these bytes and nothing else.
    """

    adapter_id: str
    rank: int
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    nbytes: int


def prepare_adapter(
    adapter_id: str,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, int]],
    num_layers: int,
    max_rank: int,
    dtype: torch.dtype,
) -> PreparedAdapter:
    """Check an adapter's tensors against the model and lay them out for a slot.

    Which module each tensor goes to is decided by
    :func:`lorapool.formats.map_lora_tensors`, as PEFT decides it and as
    validation did at registration: a tensor PEFT would ignore (untargeted,
    misnamed, or stored under two names) is refused, never applied. A module
    with no tensors adds nothing. Runs off the engine thread; raises
    ``ValueError`` (:class:`lorapool.errors.AdapterValidationError` for the
    names) saying what does not fit.
    """
    r = config.r
    if r > max_rank:
        raise ValueError(f"rank {r} exceeds max_rank {max_rank}")
    scale = config.scaling
    parents = {m: p for m, p in LLAMA_PARENTS.items() if m in shapes}
    mapping = map_lora_tensors(tensors, LoraTargets.from_config(config), parents)
    mapping.raise_first()
    found: dict[tuple[int, str, str], torch.Tensor] = {}
    for name, site in mapping.sites.items():
        t = tensors[name]
        layer, module, side = site.layer, site.module, site.side
        if layer >= num_layers:
            raise ValueError(f"tensor {name!r} names layer {layer}; the model has {num_layers}")
        fan_in, fan_out = shapes[module]
        want = (r, fan_in) if side == "A" else (fan_out, r)
        if tuple(t.shape) != want:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
        found[(layer, module, side)] = t
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for module in sorted({m for _, m, _ in found}):
        fan_in, fan_out = shapes[module]
        ma = torch.zeros(num_layers, fan_in, r, dtype=dtype)
        mb = torch.zeros(num_layers, r, fan_out, dtype=dtype)
        for layer in range(num_layers):
            ta = found.get((layer, module, "A"))
            tb = found.get((layer, module, "B"))
            if (ta is None) != (tb is None):
                raise ValueError(f"layer {layer} {module}: lora_A and lora_B must come in pairs")
            if ta is None or tb is None:
                continue
            ma[layer] = ta.t().to(dtype)
            mb[layer] = (tb.float().t() * scale).to(dtype)
        a[module], b[module] = ma, mb
    nbytes = sum(t.nbytes for t in a.values()) + sum(t.nbytes for t in b.values())
    return PreparedAdapter(adapter_id, r, a, b, nbytes)


@dataclass(frozen=True)
class _Segments:
    """The C kernel's view of a plan: tokens sorted by slot, in segments of one slot each
    and at most :data:`KERNEL_SEGMENT_ROWS` tokens."""

    count: int
    ptr: torch.Tensor
    slot: torch.Tensor
    tok: torch.Tensor
    tokens: int
    rows: int
    """One past the highest token index."""
    addresses: tuple[int, int, int]
    """``ptr``, ``slot`` and ``tok``'s data pointers, read once per pass."""

    @classmethod
    def build(cls, groups: dict[int, list[int]]) -> _Segments:
        order = sorted(groups)
        ptr = [0]
        tok: list[int] = []
        slots: list[int] = []
        for s in order:
            members = groups[s]
            for i in range(0, len(members), KERNEL_SEGMENT_ROWS):
                tok.extend(members[i : i + KERNEL_SEGMENT_ROWS])
                ptr.append(len(tok))
                slots.append(s)
        ptr_t, slot_t, tok_t = (torch.tensor(v, dtype=torch.int32) for v in (ptr, slots, tok))
        addresses = (ptr_t.data_ptr(), slot_t.data_ptr(), tok_t.data_ptr())
        return cls(len(slots), ptr_t, slot_t, tok_t, len(tok), max(tok) + 1, addresses)


class LoraBatch:
    """Which tokens of a forward pass use which slot, grouped by slot.

    With ``segments=True`` (a CPU plan for :class:`LoraSlots` with the C
    kernel) the kernel runs it, whatever the group sizes. Otherwise three
    layouts, chosen per forward pass. *Span*: the tokens
    padded to a common count per slot over the contiguous slot range they use, run as one
    batched matmul on a view of the stacks. *Compact*: the same over just the
    slots in use, gathering their weights first (when the used slots are
    spread out, e.g. 4 adapters in slots 0, 5, 9 and 14). *Loop*: one matmul
    per slot (one adapter, or very uneven groups).
    """

    def __init__(
        self, token_slots: list[int], device: torch.device, *, segments: bool = False
    ) -> None:
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(token_slots):
            if s >= 0:
                groups.setdefault(s, []).append(i)
        self.slots = sorted(groups)
        self.num_tokens = sum(len(v) for v in groups.values())
        self.loop: list[tuple[int, torch.Tensor | slice]] = []
        self.padded = False
        self.segments: _Segments | None = None
        """Set when the C kernel can run this plan."""
        self._pending: tuple[list[int], dict[int, list[int]], torch.device] | None = None
        if not self.slots:
            return
        if segments and device.type == "cpu":
            self.segments = _Segments.build(groups)
            # PyTorch's layouts only where the kernel cannot run (fp16 activations).
            self._pending = (token_slots, groups, device)
            return
        self._layout(token_slots, groups, device)

    def ensure_layout(self) -> LoraBatch:
        """Make the PyTorch layouts if the plan was made for the kernel only."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._layout(*pending)
        return self

    def _layout(
        self, token_slots: list[int], groups: dict[int, list[int]], device: torch.device
    ) -> None:
        k = len(self.slots)
        if k > 1:
            lo, hi = self.slots[0], self.slots[-1]
            layouts: list[tuple[list[int], slice | list[int]]] = [
                (list(range(lo, hi + 1)), slice(lo, hi + 1)),
                (self.slots, self.slots),
            ]
            for slot_ids, slot_range in layouts:
                if self._pad(token_slots, groups, slot_ids, slot_range, device):
                    return
        for s in self.slots:
            idx = groups[s]
            if idx[-1] - idx[0] + 1 == len(idx):
                self.loop.append((s, slice(idx[0], idx[-1] + 1)))
            else:
                self.loop.append((s, torch.tensor(idx, dtype=torch.long, device=device)))

    def _pad(
        self,
        token_slots: list[int],
        groups: dict[int, list[int]],
        slot_ids: list[int],
        slot_range: slice | list[int],
        device: torch.device,
    ) -> bool:
        """Lay the tokens out padded over ``slot_ids``, unless that wastes too much."""
        m = max(len(v) for v in groups.values())
        unadapted = len(token_slots) - self.num_tokens
        if unadapted and len(slot_ids) * m == self.num_tokens:
            m += 1  # tokens without an adapter read their (zero) delta from a padding cell
        if len(slot_ids) * m > 2 * self.num_tokens + 16:
            return False
        pad = [[0] * m for _ in slot_ids]
        zero_cell = -1
        where = [0] * len(token_slots)
        for gi, s in enumerate(slot_ids):
            members = groups.get(s, ())
            for j, tok in enumerate(members):
                pad[gi][j] = tok
                where[tok] = gi * m + j
            if zero_cell < 0 and len(members) < m:
                zero_cell = gi * m + len(members)
        if unadapted:
            for tok, s in enumerate(token_slots):
                if s < 0:
                    where[tok] = zero_cell
        self.padded = True
        self.slot_range: slice | torch.Tensor = (
            slot_range
            if isinstance(slot_range, slice)
            else torch.tensor(slot_range, dtype=torch.long, device=device)
        )
        """The stacks' slots the padded groups use: a view (span) or a gather (compact)."""
        self.pad_index = torch.tensor(pad, dtype=torch.long, device=device)
        self.gather = torch.tensor(where, dtype=torch.long, device=device)
        """For each token, the padded cell holding its delta."""
        self.zero_cell = zero_cell if unadapted else -1
        """A padding cell zeroed after the shrink, or -1 when no token needs one."""
        return True

    @property
    def distinct(self) -> int:
        """Distinct adapters in this forward pass."""
        return len(self.slots)


class _KernelGroup(NamedTuple):
    record: SgmvGroup
    """Held here so the memory behind ``address`` lives as long as the stacks."""
    address: int
    """Where ``record`` lives, passed as the kernel's first argument."""
    in_dim: int
    width: int
    """Columns of the group's fused output."""


def _panels(n: int) -> int:
    """16-column panels that hold ``n`` columns."""
    return -(-n // 16)


class LoraSlots:
    """The device-resident stacks: ``max_slots`` adapters for every LoRA-able linear."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        num_layers: int,
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        kernel: SgmvKernel | None = None,
    ) -> None:
        self.shapes = shapes
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.kernel = kernel if device.type == "cpu" and dtype == torch.float32 else None
        """The C kernel, used for fp32 stacks on CPU when one was given."""
        self.a: dict[str, torch.Tensor] = {}
        """Per group, ``A^T`` of its modules side by side: ``[layers, slots, in, n * max_rank]``."""
        self.b: dict[str, torch.Tensor] = {}
        """Per module, ``scale * B^T``: ``[layers, slots, max_rank, out]``, or with the
        kernel ``[layers, slots, panels, max_rank, 16]`` (:meth:`b_matrix` reads either)."""
        self._buffers: list[torch.Tensor] = []
        if self.kernel is None:
            for g, ms in _GROUPS.items():
                fan_in = shapes[ms[0]][0]
                self.a[g] = torch.zeros(
                    num_layers, max_slots, fan_in, len(ms) * max_rank, dtype=dtype, device=device
                )
                self._buffers.append(self.a[g])
            for m, (_, fan_out) in shapes.items():
                self.b[m] = torch.zeros(
                    num_layers, max_slots, max_rank, fan_out, dtype=dtype, device=device
                )
                self._buffers.append(self.b[m])
        else:
            self._pack_for_kernel()
        self.occupant: list[str | None] = [None] * max_slots
        # Per slot: rank-columns each module's last occupant wrote (the rest are zero).
        self._written: list[dict[str, int]] = [{} for _ in range(max_slots)]
        # Each group's modules as column blocks of its fused output.
        self._columns: dict[str, list[tuple[str, int, int]]] = {}
        for group, modules in _GROUPS.items():
            start = 0
            self._columns[group] = []
            for m in modules:
                self._columns[group].append((m, start, start + shapes[m][1]))
                start += shapes[m][1]
        self._kernel_groups = self._bind_kernel() if self.kernel is not None else {}
        self._scratch = torch.empty(0, dtype=torch.float32)
        self._scratch_addr = 0
        self._work = torch.empty(0, dtype=torch.float32)
        self._widest = max(max(shape) for shape in shapes.values())
        self._widest_rank = max(len(ms) for ms in _GROUPS.values()) * max_rank
        """Scratch columns per token: the widest group's shrunk activations."""
        self._threads = torch.get_num_threads()

    def _pack_for_kernel(self) -> None:
        """The kernel's layout: per layer and group, one block per slot holding the slot's
        ``A`` and each module's ``B`` in panels of 16 columns, so a kernel segment
        reads one contiguous stretch (``sgmv.c``)."""
        for g, ms in _GROUPS.items():
            fan_in = self.shapes[ms[0]][0]
            sizes = [fan_in * len(ms) * self.max_rank]
            sizes += [_panels(self.shapes[m][1]) * self.max_rank * 16 for m in ms]
            block = -(-sum(sizes) // 16) * 16  # whole cache lines per slot
            buf = torch.zeros(
                self.num_layers, self.max_slots, block, dtype=self.dtype, device=self.device
            )
            self._buffers.append(buf)
            lead = (self.num_layers, self.max_slots)
            self.a[g] = buf[..., : sizes[0]].view(*lead, fan_in, len(ms) * self.max_rank)
            start = sizes[0]
            for m, size in zip(ms, sizes[1:], strict=True):
                panels = (_panels(self.shapes[m][1]), self.max_rank, 16)
                self.b[m] = buf[..., start : start + size].view(*lead, *panels)
                start += size

    def b_matrix(self, module: str, layer: int) -> torch.Tensor:
        """``scale * B^T`` of ``module`` in ``layer`` for every slot, ``[slots, max_rank, out]``.

        A view of the stacks, or a copy out of the kernel's panels (the PyTorch
        path runs with the kernel present only for fp16 activations).
        """
        b = self.b[module][layer]
        if self.kernel is None:
            return b
        out = self.shapes[module][1]
        return b.transpose(1, 2).flatten(2)[..., :out]

    def _bind_kernel(self) -> dict[tuple[int, str], _KernelGroup]:
        """Per layer and group, the kernel's record of what never changes: stack pointers,
        widths, output columns."""
        groups: dict[tuple[int, str], _KernelGroup] = {}
        for group, columns in self._columns.items():
            if len(columns) > MAX_MODULES:
                raise ValueError(f"{group}: {len(columns)} modules, the kernel takes {MAX_MODULES}")
            for layer in range(self.num_layers):
                a = self.a[group][layer]
                record = SgmvGroup(
                    a.data_ptr(), a.shape[1], a.shape[-1], len(columns), self.max_rank, a.stride(0)
                )
                for j, (m, start, end) in enumerate(columns):
                    record.b[j] = self.b[m][layer].data_ptr()
                    record.out[j] = end - start
                    record.y_off[j] = start
                groups[(layer, group)] = _KernelGroup(
                    record, ctypes.addressof(record), a.shape[1], columns[-1][2]
                )
        return groups

    def plan(self, token_slots: list[int]) -> LoraBatch:
        """The plan for one forward pass over these stacks (kernel segments when it runs)."""
        plan = LoraBatch(token_slots, self.device, segments=self.kernel is not None)
        if plan.segments is not None:
            self._threads = torch.get_num_threads()
        return plan

    @property
    def nbytes(self) -> int:
        """Device memory the stacks hold."""
        return sum(t.nbytes for t in self._buffers)

    def copy_in(self, slot: int, prepared: PreparedAdapter) -> None:
        """Overwrite ``slot`` with a prepared adapter.

        Copies the adapter's own columns and rows, and zeroes only what the
        previous occupant wrote beyond them (tracked per module), so a switch
        moves about as many bytes as the adapter has.
        """
        r = prepared.rank
        written = self._written[slot]
        for module in self.shapes:
            group = _GROUP_OF[module]
            base = _GROUPS[group].index(module) * self.max_rank
            a_cols = self.a[group][:, slot, :, base : base + self.max_rank]
            b_rows = self.b[module][:, slot]
            if self.kernel is not None:  # [layers, rank, panels, 16] over the panels
                b_rows = b_rows.transpose(1, 2)
            new = r if module in prepared.a else 0
            old = written.get(module, 0)
            if new:
                a_cols[..., :new].copy_(prepared.a[module])
                b = prepared.b[module]
                if self.kernel is not None:
                    cols = b_rows.shape[2] * 16
                    b = torch.nn.functional.pad(b, (0, cols - b.shape[-1]))
                    b = b.view(*b.shape[:-1], -1, 16)
                b_rows[:, :new].copy_(b)
            if old > new:
                a_cols[..., new:old].zero_()
                b_rows[:, new:old].zero_()
            written[module] = new
        self.occupant[slot] = prepared.adapter_id

    def clear(self, slot: int) -> None:
        """Mark ``slot`` free; its weights are overwritten by the next load."""
        self.occupant[slot] = None

    def _shrink(self, layer: int, group: str, plan: LoraBatch, x: torch.Tensor) -> torch.Tensor:
        a = self.a[group][layer]
        return torch.bmm(x[plan.pad_index].to(a.dtype), a[plan.slot_range])

    def _expand_padded(
        self, layer: int, module: str, plan: LoraBatch, t: torch.Tensor, y: torch.Tensor
    ) -> None:
        b = self.b_matrix(module, layer)[plan.slot_range]
        out = torch.bmm(t, b)
        # A gather and a dense add: about half the time of index_add_ on CPU.
        y.add_(out.flatten(0, 1).index_select(0, plan.gather))

    def _run_kernel(
        self, layer: int, group: str, seg: _Segments, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        assert self.kernel is not None
        _, address, in_dim, width = self._kernel_groups[(layer, group)]
        # The kernel trusts its pointers: check what it will index.
        x_rows, x_cols = x.shape
        y_rows, y_cols = y.shape
        if x_cols != in_dim or y_cols != width:
            raise ValueError(f"{group}: x {tuple(x.shape)} / y {tuple(y.shape)} do not fit")
        if x_rows < seg.rows or y_rows < seg.rows:
            raise ValueError(f"{group}: the plan indexes token {seg.rows - 1}, x has {x_rows}")
        if self._scratch.numel() < seg.tokens * self._widest_rank:
            self._scratch = torch.empty(seg.tokens * self._widest_rank, dtype=torch.float32)
            self._scratch_addr = self._scratch.data_ptr()
        ptr, slot, tok = seg.addresses
        args = (address, seg.count, ptr, slot, tok, x.data_ptr(), x.stride(0), y.data_ptr())
        if x.dtype is torch.float32:
            self.kernel.sgmv_f32(*args, y.stride(0), self._scratch_addr, self._threads)
            return
        # bf16: fp32 copies of a segment's input rows, then of its output rows.
        per_thread = KERNEL_SEGMENT_ROWS * self._widest
        if self._work.numel() < per_thread * self._threads:
            self._work = torch.empty(per_thread * self._threads, dtype=torch.float32)
        self.kernel.sgmv_bf16(
            *args,
            y.stride(0),
            self._scratch_addr,
            self._work.data_ptr(),
            per_thread,
            self._threads,
        )

    def _run(
        self, layer: int, group: str, plan: LoraBatch, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Add ``group``'s deltas into its fused output ``y`` (modules side by side)."""
        if not plan.slots:
            return
        seg = plan.segments
        if (
            seg is not None
            and self.kernel is not None
            and x.dtype is y.dtype
            and x.dtype in _KERNEL_DTYPES
            and x.stride(1) == 1
            and y.stride(1) == 1
        ):
            self._run_kernel(layer, group, seg, x, y)
            return
        plan.ensure_layout()
        columns = self._columns[group]
        modules = [m for m, _, _ in columns]
        ys = [y[:, start:end] for _, start, end in columns]
        r = self.max_rank
        if plan.padded:
            t = self._shrink(layer, group, plan, x)
            if plan.zero_cell >= 0:
                t.view(-1, t.shape[-1])[plan.zero_cell].zero_()
            for j, (module, y) in enumerate(zip(modules, ys, strict=True)):
                self._expand_padded(layer, module, plan, t[..., j * r : (j + 1) * r], y)
            return
        a = self.a[group][layer]
        bs = [self.b_matrix(m, layer) for m in modules]
        for slot, idx in plan.loop:
            xs = x[idx].to(a.dtype)
            t = xs @ a[slot]
            for j, (b, y) in enumerate(zip(bs, ys, strict=True)):
                out = (t[:, j * r : (j + 1) * r] @ b[slot]).to(y.dtype)
                if isinstance(idx, slice):
                    y[idx] += out
                else:
                    y.index_add_(0, idx, out)

    def apply_qkv(self, layer: int, plan: LoraBatch, x: torch.Tensor, qkv: torch.Tensor) -> None:
        """Add the q/k/v LoRA deltas into the fused projection output, in place."""
        self._run(layer, "qkv", plan, x, qkv)

    def apply_gate_up(self, layer: int, plan: LoraBatch, x: torch.Tensor, gu: torch.Tensor) -> None:
        """Add the gate/up LoRA deltas into the fused MLP input projection, in place."""
        self._run(layer, "gate_up", plan, x, gu)

    def apply(
        self, layer: int, module: str, plan: LoraBatch, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Add one single-module group's LoRA delta (``o_proj`` or ``down_proj``) into ``y``."""
        self._run(layer, _GROUP_OF[module], plan, x, y)
