"""Eviction (and later prefetch) policies: pure, synchronous decision objects.

Policies know keys, sizes and costs, never bytes or I/O. Tiers call them and
never evict a pinned or in-use entry, whatever a policy proposes. Built-in
policies register through the ``lorapool.policies`` entry-point group, the
same way a user's own policy does, under short names:

* ``lru`` (:class:`LRUPolicy`): least recently used.
* ``lru2`` (:class:`LRU2Policy`): LRU-K with K = 2; entries used once go first.
* ``sieve`` (:class:`SievePolicy`): FIFO with a visited bit and a moving hand.
* ``s3fifo`` (:class:`S3FIFOPolicy`): small FIFO, main CLOCK, ghost keys.
* ``wtinylfu`` (:class:`WTinyLFUPolicy`): LRU window, frequency filter, segmented LRU.
* ``gdsf`` (:class:`GDSFPolicy`): lowest ``L + freq * cost / size`` goes first.
* ``ttl`` (:class:`TTLPolicy`): idle for ``ttl`` seconds first, then LRU; ``expired()``.

Every policy takes a keyword-only ``clock`` (``time.monotonic`` by default).
:data:`DEFAULT_EVICTION` names the policy each tier uses unless told otherwise;
``docs/decisions.md`` explains the choice with the simulator's results
(``python -m lorapool.bench cache``).
"""

from lorapool.plugins import DEFAULT_EVICTION

from .base import EvictionPolicy
from .gdsf import GDSFPolicy
from .lru import LRUPolicy
from .lru2 import LRU2Policy
from .s3fifo import S3FIFOPolicy
from .sieve import SievePolicy
from .ttl import TTLPolicy
from .wtinylfu import WTinyLFUPolicy

__all__ = [
    "DEFAULT_EVICTION",
    "EvictionPolicy",
    "GDSFPolicy",
    "LRU2Policy",
    "LRUPolicy",
    "S3FIFOPolicy",
    "SievePolicy",
    "TTLPolicy",
    "WTinyLFUPolicy",
]
