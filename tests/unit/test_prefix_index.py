"""The prefix cache's block index: chained keys, content separation, the budget and
leaf-first eviction; and the copies between the block pool and a KV row."""

from __future__ import annotations

import pytest

from lorapool.policies import LRUPolicy

torch = pytest.importorskip("torch")

from lorapool.backends.torch.prefix import (  # noqa: E402
    BASE_CONTENT,
    PrefixCache,
    PrefixIndex,
    chain_keys,
)

A = "a" * 64
B = "b" * 64
BS = 4


def test_keys_chain_the_whole_prefix_and_the_content() -> None:
    tokens = list(range(10))
    keys = chain_keys(A, tokens, BS)
    assert len(keys) == 2  # full blocks only: 10 // 4
    # A block's key depends on every token before it, not only its own.
    other = chain_keys(A, [99, *tokens[1:]], BS)
    assert other[0] != keys[0] and other[1] != keys[1]
    # The same tokens under another content, or the base model: no key in common.
    assert not set(keys) & set(chain_keys(B, tokens, BS))
    assert not set(keys) & set(chain_keys(BASE_CONTENT, tokens, BS))
    # Extending known keys gives the keys computed from scratch.
    longer = [*tokens, 10, 11]
    assert chain_keys(A, longer, BS, keys) == chain_keys(A, longer, BS)
    # The same block of tokens at another place in the chain has another key.
    same = chain_keys(A, [1, 2, 3, 4, 1, 2, 3, 4], BS)
    assert same[0] != same[1]


def test_keys_of_two_scopes_never_meet() -> None:
    """Two tenants' chains of the same tokens and content share no key."""
    tokens = list(range(12))
    for content in (A, BASE_CONTENT):
        acme = chain_keys(content, tokens, BS, scope="acme")
        assert not set(acme) & set(chain_keys(content, tokens, BS, scope="globex"))
        assert not set(acme) & set(chain_keys(content, tokens, BS))
        assert chain_keys(content, tokens, BS, scope="acme") == acme
        # The scope cannot be forged from the content's side of the root.
        assert not set(acme) & set(chain_keys(content + "\0acme", tokens, BS))


def test_match_finds_the_longest_cached_prefix() -> None:
    index = PrefixIndex(8, LRUPolicy())
    keys = chain_keys(A, list(range(16)), BS)
    placed = index.insert(keys[:3], A, 100)
    assert [j for j, _ in placed] == [0, 1, 2]
    assert index.match(keys) == [b for _, b in placed]
    assert index.match(keys[:1]) == [placed[0][1]]
    # A prompt that diverges in its second block shares the first block only.
    forked = chain_keys(A, [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11], BS)
    assert index.match(forked) == [placed[0][1]]
    # Inserting the fork allocates its own blocks after the shared one.
    fork_placed = index.insert(forked, A, 100)
    assert [j for j, _ in fork_placed] == [1, 2]
    assert len(index) == 5
    # Nothing under another content.
    assert index.match(chain_keys(B, list(range(16)), BS)) == []


def test_budget_evicts_leaves_first_and_never_breaks_a_chain() -> None:
    index = PrefixIndex(4, LRUPolicy())
    old = chain_keys(A, list(range(12)), BS)  # 3 blocks
    index.insert(old, A, 100)
    new = chain_keys(B, list(range(100, 108)), BS)  # 2 blocks: one must go
    placed = index.insert(new, B, 100)
    assert len(placed) == 2 and len(index) == 4 and index.evictions == 1
    # The victim was the old chain's leaf (its last block), never a middle block.
    assert old[0] in index and old[1] in index and old[2] not in index
    assert index.match(old) == [index.block_of(old[0]), index.block_of(old[1])]
    # Every cached key's parent is cached: walking any chain finds no hole.
    for chain in (old, new):
        cached = [k in index for k in chain]
        assert cached == sorted(cached, reverse=True)
    index.verify()


def test_eviction_follows_the_policy_among_leaves() -> None:
    index = PrefixIndex(4, LRUPolicy())
    first = chain_keys(A, [1, 2, 3, 4, 5, 6, 7, 8], BS)
    second = chain_keys(B, [1, 2, 3, 4, 5, 6, 7, 8], BS)
    index.insert(first, A, 100)
    index.insert(second, B, 100)
    index.match(first)  # first is now the most recently used
    index.insert(chain_keys(BASE_CONTENT, [9, 9, 9, 9], BS), BASE_CONTENT, 100)
    # The least recently used leaf went: the second chain's last block.
    assert first[1] in index and second[1] not in index and second[0] in index
    index.verify()


def test_a_chain_never_evicts_itself() -> None:
    index = PrefixIndex(2, LRUPolicy())
    keys = chain_keys(A, list(range(16)), BS)  # 4 blocks, room for 2
    placed = index.insert(keys, A, 100)
    assert [j for j, _ in placed] == [0, 1]
    assert index.match(keys) == [b for _, b in placed]
    assert index.evictions == 0


def test_forget_drops_one_content_only() -> None:
    index = PrefixIndex(8, LRUPolicy())
    a = chain_keys(A, list(range(8)), BS)
    b = chain_keys(B, list(range(8)), BS)
    index.insert(a, A, 100)
    index.insert(b, B, 100)
    assert index.forget(A) == 2 and index.forgotten == 2
    assert index.match(a) == [] and len(index.match(b)) == 2
    assert index.contents() == {B}
    # Its blocks are free again: four more fit without evicting.
    index.insert(chain_keys(A, list(range(50, 74)), BS), A, 100)
    assert index.evictions == 0 and len(index) == 8
    assert index.forget("never-cached") == 0
    index.verify()


def test_forget_scope_drops_one_tenant_s_blocks_of_every_content() -> None:
    index = PrefixIndex(12, LRUPolicy())
    tokens = list(range(8))
    mine = [chain_keys(c, tokens, BS, scope="acme") for c in (A, BASE_CONTENT)]
    theirs = [chain_keys(c, tokens, BS, scope="globex") for c in (A, BASE_CONTENT)]
    for content, keys in zip((A, BASE_CONTENT), mine, strict=True):
        index.insert(keys, content, 100, "acme")
    for content, keys in zip((A, BASE_CONTENT), theirs, strict=True):
        index.insert(keys, content, 100, "globex")
    assert index.forget_scope("acme") == 4 and index.forgotten == 4
    assert all(index.match(keys) == [] for keys in mine)
    assert all(len(index.match(keys)) == 2 for keys in theirs)
    assert index.forget_scope("acme") == 0
    # A content's forget still finds the other scope's blocks of it.
    assert index.forget(A) == 2 and len(index.match(theirs[1])) == 2
    index.verify()


def test_a_long_random_run_keeps_the_bookkeeping_whole() -> None:
    import random

    rng = random.Random(7)
    index = PrefixIndex(20, LRUPolicy())
    contents = [A, B, BASE_CONTENT]
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(4, 40))] for _ in range(12)]
    for step in range(400):
        content = rng.choice(contents)
        tokens = rng.choice(prompts) + [rng.randrange(50) for _ in range(rng.randrange(8))]
        keys = chain_keys(content, tokens, BS)
        if rng.random() < 0.5:
            index.insert(keys, content, 100)
        else:
            index.match(keys)
        if step % 97 == 0:
            index.forget(rng.choice(contents))
        index.verify()
        assert len(index) <= index.capacity
    assert index.evictions > 0


def test_zero_capacity_caches_nothing() -> None:
    index = PrefixIndex(0, LRUPolicy())
    assert index.insert(chain_keys(A, list(range(8)), BS), A, 100) == []
    assert len(index) == 0


class _KV:
    """The attributes of KVCache that PrefixCache uses."""

    def __init__(self, rows: int, positions: int) -> None:
        self.k = torch.randn(2, rows, 3, positions, 5)
        self.v = torch.randn(2, rows, 3, positions, 5)


def test_blocks_copied_out_and_in_hold_the_row_s_keys_and_values() -> None:
    kv = _KV(rows=3, positions=24)
    block_bytes = 2 * 2 * 3 * BS * 5 * 4
    prefix = PrefixCache(kv, budget_bytes=6 * block_bytes, block_size=BS, policy=LRUPolicy())  # type: ignore[arg-type]
    assert prefix.capacity == 6 and prefix.block_bytes == block_bytes
    keys = chain_keys(A, list(range(20)), BS)  # 5 blocks
    placed = prefix.index.insert(keys, A, block_bytes)
    prefix.copy_out(kv, 0, placed)  # type: ignore[arg-type]
    assert prefix.cached_bytes == 5 * block_bytes
    blocks = prefix.index.match(keys)
    prefix.copy_in(kv, 2, blocks)  # type: ignore[arg-type]
    assert torch.equal(kv.k[:, 2, :, :20], kv.k[:, 0, :, :20])
    assert torch.equal(kv.v[:, 2, :, :20], kv.v[:, 0, :, :20])
    # Blocks that are not consecutive in the pool are copied as well.
    prefix.index.forget(A)
    scattered = [(0, 4), (1, 1), (2, 2)]
    prefix.copy_out(kv, 1, scattered)  # type: ignore[arg-type]
    prefix.copy_in(kv, 2, [4, 1, 2])  # type: ignore[arg-type]
    assert torch.equal(kv.k[:, 2, :, :12], kv.k[:, 1, :, :12])
    assert torch.equal(kv.v[:, 2, :, :12], kv.v[:, 1, :, :12])
