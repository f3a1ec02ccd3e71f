"""The store wing: where each adapter's bytes are, and getting them where they must be.

* :mod:`~lorapool.store.tiered`: :class:`TieredStore`, the facade (device slots <-
  host RAM <- disk <- source), references, pins and prefetch.
* :mod:`~lorapool.store.tiers`: :class:`Tier` (byte-bounded bookkeeping over an
  eviction policy) and :class:`SingleFlight`.
* :mod:`~lorapool.store.disk`: the disk tier's files (staging, verify then rename).

Where the bytes come from is the :mod:`lorapool.sources` seam.
"""

from lorapool.store.disk import DiskFull, DiskTier, Staged
from lorapool.store.tiered import StoreStats, TieredStore
from lorapool.store.tiers import SingleFlight, Tier, parse_size

__all__ = [
    "DiskFull",
    "DiskTier",
    "SingleFlight",
    "Staged",
    "StoreStats",
    "Tier",
    "TieredStore",
    "parse_size",
]
