"""Where adapters live on the device: one pooled allocation, first fit, compacted on demand.

:class:`LoraSlots` keeps every resident adapter's weights in one flat tensor, each
adapter in one contiguous block of exactly its own size (rank-proportional: an adapter
of rank 8 in a pool built for rank 64 takes an eighth of the room). This module is the
bookkeeping only, in units of elements: which ranges are taken, which are free, and how
to slide blocks together when the free room is split into holes too small for a new
adapter. It knows nothing of tensors; the caller does the copies a compaction asks for.

Blocks are aligned to :data:`ALIGN` elements (a 64-byte cache line of fp32), so a
block's size is rounded up to it: the only rounding the pool adds to an adapter's bytes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = ["ALIGN", "Arena", "Move"]

ALIGN = 16
"""Blocks start and end on multiples of this many elements."""


@dataclass(frozen=True)
class Move:
    """Copy ``size`` elements from ``src`` to ``dst`` (``dst < src``; the ranges may
    overlap, so copy through a temporary or front to back)."""

    src: int
    dst: int
    size: int


def rounded(size: int) -> int:
    """``size`` elements rounded up to whole :data:`ALIGN` units."""
    return -(-size // ALIGN) * ALIGN


class Arena:
    """First-fit allocation of ``capacity`` elements in aligned blocks.

    :meth:`alloc` returns a block's offset, or ``None`` when no single hole is large
    enough (even if the free room in all is: then :meth:`compact` and try again).
    Offsets change only through :meth:`compact`, which says how.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, not {capacity}")
        self.capacity = capacity - capacity % ALIGN
        self._starts: list[int] = []
        """Offsets of the blocks, sorted."""
        self._size: dict[int, int] = {}
        """Each block's (rounded) size, by offset."""
        self.used = 0
        """Elements in blocks."""

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def free(self) -> int:
        """Elements in no block (possibly split into several holes)."""
        return self.capacity - self.used

    def holes(self) -> list[tuple[int, int]]:
        """The free ranges as ``(offset, size)``, in order."""
        out: list[tuple[int, int]] = []
        at = 0
        for start in self._starts:
            if start > at:
                out.append((at, start - at))
            at = start + self._size[start]
        if self.capacity > at:
            out.append((at, self.capacity - at))
        return out

    def blocks(self) -> list[tuple[int, int]]:
        """The taken ranges as ``(offset, size)``, in order."""
        return [(s, self._size[s]) for s in self._starts]

    def size_of(self, offset: int) -> int:
        """The (rounded) size of the block at ``offset``."""
        return self._size[offset]

    def alloc(self, size: int) -> int | None:
        """Take a block of ``size`` elements (rounded up): its offset, or ``None`` when no
        hole holds it."""
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        need = max(rounded(size), ALIGN)
        for at, room in self.holes():
            if room >= need:
                bisect.insort(self._starts, at)
                self._size[at] = need
                self.used += need
                return at
        return None

    def release(self, offset: int) -> None:
        """Give the block at ``offset`` back; ``KeyError`` if there is none."""
        size = self._size.pop(offset)
        self._starts.pop(bisect.bisect_left(self._starts, offset))
        self.used -= size

    def compaction(self) -> list[Move]:
        """The moves that slide every block down to close the holes, in the order to make
        them; none is made here: make each copy, then record it with :meth:`move`."""
        moves: list[Move] = []
        at = 0
        for start in self._starts:
            size = self._size[start]
            if start != at:
                moves.append(Move(start, at, size))
            at += size
        return moves

    def move(self, src: int, dst: int) -> None:
        """Record that the block at ``src`` now starts at ``dst`` (its copy was made)."""
        size = self._size[src]
        if any(s < dst + size and dst < s + self._size[s] for s in self._starts if s != src):
            raise ValueError(f"a block at {dst} of {size} would overlap another")
        del self._size[src]
        self._starts.pop(bisect.bisect_left(self._starts, src))
        bisect.insort(self._starts, dst)
        self._size[dst] = size

    def compact(self) -> list[Move]:
        """Close the holes in the books at once (for callers with nothing to copy); the
        moves it recorded."""
        moves = self.compaction()
        for m in moves:
            self.move(m.src, m.dst)
        return moves
