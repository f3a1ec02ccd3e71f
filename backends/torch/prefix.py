"""The prefix (KV) cache: keys and values of token blocks already computed, by content.

A prompt is cut into blocks of ``block_size`` tokens. Block ``j``'s key chains the key
of block ``j - 1`` (for block 0, a root made of the *adapter content*: the sha256 of its
weights and config, or :data:`BASE_CONTENT` for the base model) and block ``j``'s
tokens, so a key names the whole prefix up to the block's end under one content. The
root also holds the request's *scope* (the pool's digest of its tenant), so two tenants
never share a block either, even on the base model or one shared adapter: a hit would
tell one tenant what another sent. The same prompt under two adapters, under two
versions of one adapter name, or from two tenants, never shares a block: their roots
differ. A name is never part of a key.

The cached keys and values live in a pool of blocks preallocated to the byte budget
(``[layers, kv_heads, blocks, block_size, head_dim]``, K and V). A sequence admitted
with a cached prefix gets those blocks *copied* into its own KV row, and only the rest
of its prompt is prefilled; after the prefill, and when the sequence leaves its row,
its full blocks not cached yet are copied out into the pool. Nothing running refers to
the pool, so evicting a block can never pull state from under a running sequence
(docs/decisions.md, "Prefix cache: copied blocks").

Eviction is leaf-first: only a block no other cached block continues may go, so a
chain is never broken in the middle (a hit is always a whole prefix), and among the
leaves an :class:`~lorapool.abc.EvictionPolicy` chooses (``lru`` by default). A chain
is touched from its last block to its first, so a block is never older, to the policy,
than the blocks that continue it.

:class:`PrefixIndex` is the bookkeeping alone (keys, blocks, the tree, the policy),
pure Python; :class:`PrefixCache` adds the tensors and the copies.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorapool.abc import EvictionPolicy

from .model import KVCache

__all__ = ["BASE_CONTENT", "PrefixCache", "PrefixIndex", "chain_keys"]

BASE_CONTENT = "base-model"
"""The content of requests on the base model (an adapter's is a 64-hex-digit sha256)."""

_ROOT = b"lorapool-prefix-v1\0"


def chain_keys(
    content: str,
    tokens: Sequence[int],
    block_size: int,
    known: Sequence[bytes] = (),
    *,
    scope: str = "",
) -> list[bytes]:
    """The keys of every full block of ``tokens`` under ``content`` in ``scope``.

    ``known``: keys already computed for a prefix of the same tokens, content and scope
    (they are kept, and the chain goes on from the last). ``scope``: the isolation
    domain (the pool's digest of the tenant); chains of two scopes never meet.
    """
    keys = list(known)
    if keys:
        prev = keys[-1]
    else:
        root = _ROOT + content.encode() + b"\0" + scope.encode()
        prev = hashlib.blake2b(root, digest_size=32).digest()
    for j in range(len(keys), len(tokens) // block_size):
        block = array("q", tokens[j * block_size : (j + 1) * block_size]).tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=32).digest()
        keys.append(prev)
    return keys


@dataclass
class _Entry:
    block: int
    parent: bytes | None
    content: str
    scope: str = ""
    children: int = 0


class PrefixIndex:
    """Which block of the pool holds which chained key, within ``capacity`` blocks.

    Pure bookkeeping, no tensors: :meth:`match` finds the longest cached prefix of a
    chain, :meth:`insert` allocates blocks for the rest (evicting leaves, never a
    block of the chain being inserted), :meth:`forget` drops a content's blocks and
    :meth:`forget_scope` a scope's (a tenant's).
    """

    def __init__(self, capacity: int, policy: EvictionPolicy) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.policy = policy
        self._entries: dict[bytes, _Entry] = {}
        self._leaves: dict[bytes, None] = {}  # ordered, for a deterministic fallback
        self._by_content: dict[str, set[bytes]] = {}
        self._by_scope: dict[str, set[bytes]] = {}
        self._free = list(range(capacity - 1, -1, -1))  # pop() gives the lowest first
        self.evictions = 0
        """Blocks given up to make room."""
        self.forgotten = 0
        """Blocks dropped by :meth:`forget`."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def block_of(self, key: bytes) -> int:
        """The pool block holding ``key``."""
        return self._entries[key].block

    def is_leaf(self, key: bytes) -> bool:
        """Whether no cached block continues ``key``'s."""
        return key in self._leaves

    def match(self, keys: Sequence[bytes], *, touch: bool = True) -> list[int]:
        """The blocks of the longest cached prefix of ``keys``, in order.

        ``touch``: tell the policy the blocks were used (last block first).
        """
        blocks: list[int] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                break
            blocks.append(entry.block)
        if touch:
            for key in reversed(keys[: len(blocks)]):
                self.policy.on_access(key)
        return blocks

    def insert(
        self, keys: Sequence[bytes], content: str, block_bytes: int, scope: str = ""
    ) -> list[tuple[int, int]]:
        """Cache the chain ``keys`` (of ``content`` in ``scope``): ``(j, block)`` for each
        key ``j`` given a new block, to be filled by the caller.

        Keys already cached are kept (and touched). Stops at the first key that finds
        no block, even after evicting: the chain stays a prefix.
        """
        fresh: list[tuple[int, int]] = []
        protect: set[bytes] = set()
        parent: bytes | None = None
        for j, key in enumerate(keys):
            if key not in self._entries:
                block = self._allocate(protect)
                if block is None:
                    break
                self._entries[key] = _Entry(block, parent, content, scope)
                self._by_content.setdefault(content, set()).add(key)
                self._by_scope.setdefault(scope, set()).add(key)
                self._leaves[key] = None
                if parent is not None:
                    above = self._entries[parent]
                    above.children += 1
                    self._leaves.pop(parent, None)
                self.policy.on_insert(key, block_bytes, 0.0)
                fresh.append((j, block))
            protect.add(key)
            parent = key
        for key in reversed(keys[: len(protect)]):
            self.policy.on_access(key)
        return fresh

    def _allocate(self, protect: set[bytes]) -> int | None:
        if self._free:
            return self._free.pop()
        evictable = [k for k in self._leaves if k not in protect]
        if not evictable:
            return None
        victim = self.policy.victim(evictable)
        if victim is None or victim not in self._leaves or victim in protect:
            victim = evictable[0]
        assert isinstance(victim, bytes)
        self.evictions += 1
        return self._remove(victim, free=False)

    def _remove(self, key: bytes, *, free: bool = True) -> int:
        """Drop a leaf; its block goes back to the free list (``free``) or to the caller."""
        entry = self._entries.pop(key)
        self._leaves.pop(key, None)
        self._ungroup(key, entry)
        if entry.parent is not None:
            above = self._entries.get(entry.parent)
            if above is not None:
                above.children -= 1
                if above.children == 0:
                    self._leaves[entry.parent] = None
        self.policy.on_remove(key)
        if free:
            self._free.append(entry.block)
        return entry.block

    def _ungroup(self, key: bytes, entry: _Entry) -> None:
        """Take ``key`` out of its content's and its scope's groups."""
        for groups, name in ((self._by_content, entry.content), (self._by_scope, entry.scope)):
            keys = groups.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del groups[name]

    def _drop(self, keys: set[bytes]) -> int:
        """Drop whole chains (``keys`` holds every key that continues any of them)."""
        for key in keys:
            entry = self._entries.pop(key)
            self._ungroup(key, entry)
            self._leaves.pop(key, None)
            self.policy.on_remove(key)
            self._free.append(entry.block)
        self._free.sort(reverse=True)
        self.forgotten += len(keys)
        return len(keys)

    def forget(self, content: str) -> int:
        """Drop every block cached under ``content``; returns how many.

        A chain holds one content from its root on, so no other content's chain loses
        a block.
        """
        return self._drop(set(self._by_content.get(content, ())))

    def forget_scope(self, scope: str) -> int:
        """Drop every block cached in ``scope`` (a tenant's, whatever the content);
        returns how many. A chain holds one scope from its root on."""
        return self._drop(set(self._by_scope.get(scope, ())))

    def contents(self) -> set[str]:
        """The contents with blocks cached."""
        return set(self._by_content)

    def verify(self) -> None:
        """Check the bookkeeping (tests): every block cached or free, once; every cached
        block's parent cached, of the same content; children counts and leaves right.
        Raises :class:`AssertionError`."""
        blocks = [e.block for e in self._entries.values()] + self._free
        assert sorted(blocks) == list(range(self.capacity)), "a block lost or held twice"
        children: dict[bytes, int] = dict.fromkeys(self._entries, 0)
        for key, entry in self._entries.items():
            if entry.parent is not None:
                above = self._entries.get(entry.parent)
                assert above is not None, "a chain broken in the middle"
                assert above.content == entry.content, "a chain across contents"
                assert above.scope == entry.scope, "a chain across scopes"
                children[entry.parent] += 1
            assert key in self._by_content.get(entry.content, set())
            assert key in self._by_scope.get(entry.scope, set())
        for key, entry in self._entries.items():
            assert entry.children == children[key], "a wrong child count"
            assert (key in self._leaves) == (children[key] == 0), "a wrong leaf"
        assert sum(len(k) for k in self._by_content.values()) == len(self._entries)
        assert sum(len(k) for k in self._by_scope.values()) == len(self._entries)


class PrefixCache:
    """The block pool and the copies between it and the KV cache's rows.

    Runs on the engine thread; its counters may be read from any thread.
    """

    def __init__(
        self,
        kv: KVCache,
        *,
        budget_bytes: int,
        block_size: int,
        policy: EvictionPolicy,
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        layers, _, heads, _, head_dim = kv.k.shape
        self.block_size = block_size
        self.block_bytes = 2 * layers * heads * block_size * head_dim * kv.k.element_size()
        capacity = max(0, budget_bytes) // self.block_bytes
        self.budget_bytes = budget_bytes
        self.index = PrefixIndex(capacity, policy)
        shape = (layers, heads, capacity, block_size, head_dim)
        # Empty, not zeros: on CPU the pages are only taken as blocks are written.
        self.k = torch.empty(shape, dtype=kv.k.dtype, device=kv.k.device)
        self.v = torch.empty(shape, dtype=kv.v.dtype, device=kv.v.device)

    @property
    def capacity(self) -> int:
        """Blocks the budget holds."""
        return self.index.capacity

    @property
    def cached_blocks(self) -> int:
        """Blocks cached now."""
        return len(self.index)

    @property
    def cached_bytes(self) -> int:
        """Memory the cached blocks hold now."""
        return len(self.index) * self.block_bytes

    def copy_in(self, kv: KVCache, row: int, blocks: Sequence[int]) -> None:
        """Copy ``blocks`` (a chain, in order) into row ``row``'s first positions."""
        bs = self.block_size
        for pos, first, count in _runs(blocks):
            n = count * bs
            layers, heads, _, _, hd = self.k.shape
            kv.k[:, row, :, pos * bs : pos * bs + n] = self.k[:, :, first : first + count].reshape(
                layers, heads, n, hd
            )
            kv.v[:, row, :, pos * bs : pos * bs + n] = self.v[:, :, first : first + count].reshape(
                layers, heads, n, hd
            )

    def copy_out(self, kv: KVCache, row: int, placed: Sequence[tuple[int, int]]) -> None:
        """Copy row ``row``'s block ``j`` into pool block ``b`` for each ``(j, b)``."""
        bs = self.block_size
        layers, heads, _, _, hd = self.k.shape
        for (j0, b0), count in _pairs_runs(placed):
            n = count * bs
            src_k = kv.k[:, row, :, j0 * bs : j0 * bs + n].reshape(layers, heads, count, bs, hd)
            src_v = kv.v[:, row, :, j0 * bs : j0 * bs + n].reshape(layers, heads, count, bs, hd)
            self.k[:, :, b0 : b0 + count] = src_k
            self.v[:, :, b0 : b0 + count] = src_v


def _runs(blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(position of the run's first block in the chain, first block, blocks)`` for each
    run of consecutive block numbers."""
    runs: list[tuple[int, int, int]] = []
    for j, b in enumerate(blocks):
        if runs and runs[-1][1] + runs[-1][2] == b:
            pos, first, count = runs[-1]
            runs[-1] = (pos, first, count + 1)
        else:
            runs.append((j, b, 1))
    return runs


def _pairs_runs(placed: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    """Runs of ``(j, block)`` pairs where both go up by one: ``((j0, b0), count)``."""
    runs: list[tuple[tuple[int, int], int]] = []
    for j, b in placed:
        if runs:
            (j0, b0), count = runs[-1]
            if j0 + count == j and b0 + count == b:
                runs[-1] = ((j0, b0), count + 1)
                continue
        runs.append(((j, b), 1))
    return runs
