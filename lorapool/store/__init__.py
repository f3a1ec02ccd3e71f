"""The store wing: where each adapter's bytes are, and getting them where they must be.

* :mod:`~lorapool.store.tiered`: :class:`TieredStore`, the facade (device slots <-
  host RAM <- disk <- source) that wires the modules below together.
* :mod:`~lorapool.store.ladder`: :class:`~lorapool.store.ladder.Rung`, the one
  get-or-fill every tier is reached through (look up, count a hit or a miss,
  fill once per key).
* :mod:`~lorapool.store.device`: the backend's slots and loading an adapter into one.
* :mod:`~lorapool.store.host`: verified, prepared adapter bytes in RAM.
* :mod:`~lorapool.store.disk`: the disk tier's files (staging, verify then rename).
* :mod:`~lorapool.store.fetch`: sources by scheme, retries, archives, staging a
  new adapter, and downloading into the disk tier.
* :mod:`~lorapool.store.tiers`: :class:`Tier` (byte-bounded bookkeeping over an
  eviction policy), :class:`SingleFlight` and :func:`parse_size`.
* :mod:`~lorapool.store.references`: references and pins, which no tier evicts.
* :mod:`~lorapool.store.prefetch`: hints and prefetch policies through a
  bounded queue, a concurrency gate and a token bucket.
* :mod:`~lorapool.store.stats`: :class:`StoreStats`, the counters.

Where the bytes come from is the :mod:`lorapool.sources` seam.
"""

from lorapool.store.disk import DiskFull, DiskTier, Staged
from lorapool.store.stats import StoreStats
from lorapool.store.tiered import TieredStore
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
