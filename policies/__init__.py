"""Eviction (and later prefetch) policies: pure, synchronous decision objects.

Policies know keys, sizes and costs, never bytes or I/O. Tiers call them and
never evict a pinned or in-use entry, whatever a policy proposes. Built-in
policies register through the ``lorapool.policies`` entry-point group, the
same way a user's own policy does.
"""

from .base import EvictionPolicy
from .lru import LRUPolicy

__all__ = ["EvictionPolicy", "LRUPolicy"]
