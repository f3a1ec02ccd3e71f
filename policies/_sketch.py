"""A count-min sketch of 4-bit counters that halves itself periodically (TinyLFU's)."""

from __future__ import annotations

from collections.abc import Hashable

from ._util import stable_hash

__all__ = ["FrequencySketch"]

_MASK64 = (1 << 64) - 1
_SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_HALVE = bytes(i >> 1 for i in range(256))
_MAX_COUNT = 15
_WIDTH_FACTOR = 4  # counters per row for each entry of capacity


class FrequencySketch:
    """Estimates how often each key was seen lately, in memory fixed by :meth:`ensure_capacity`.

    Four rows of counters (four per entry of ``capacity``, rounded up to a power
    of two), saturating at 15, updated conservatively (only the counters at the
    key's minimum are raised). After ``sample_factor`` times ``capacity``
    increments every counter is halved, so estimates follow recent history and
    a shift in popularity is noticed.
    """

    def __init__(self, capacity: int = 16, *, sample_factor: int = 10) -> None:
        self.sample_factor = sample_factor
        self.capacity = 0
        self._bits = 0
        self._table = bytearray()
        self._additions = 0
        self.sample_size = 0
        self.ensure_capacity(capacity)

    def ensure_capacity(self, capacity: int) -> None:
        """Grow (and clear) the table to suit ``capacity`` entries, by doublings; never shrinks."""
        if capacity <= self.capacity:
            return
        capacity = 1 << (max(capacity, 16) - 1).bit_length()
        self.capacity = capacity
        self._bits = (capacity * _WIDTH_FACTOR - 1).bit_length()
        self._table = bytearray(len(_SEEDS) << self._bits)
        self._additions = 0
        self.sample_size = self.sample_factor * capacity

    def __len__(self) -> int:
        return len(self._table)

    def _indexes(self, key: Hashable) -> list[int]:
        h = stable_hash(key) & _MASK64
        shift = 64 - self._bits
        return [
            (row << self._bits) | (((h * seed) & _MASK64) >> shift)
            for row, seed in enumerate(_SEEDS)
        ]

    def increment(self, key: Hashable) -> None:
        """Count one occurrence of ``key``."""
        table = self._table
        indexes = self._indexes(key)
        low = min(table[i] for i in indexes)
        if low < _MAX_COUNT:  # conservative update: raise only the counters at the minimum
            for i in indexes:
                if table[i] == low:
                    table[i] += 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self._table = bytearray(self._table.translate(_HALVE))
            self._additions //= 2

    def estimate(self, key: Hashable) -> int:
        """How often ``key`` was seen lately (an overestimate at worst)."""
        table = self._table
        return min(table[i] for i in self._indexes(key))
