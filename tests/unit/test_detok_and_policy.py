"""Stop strings, incremental detokenisation and the LRU policy."""

from __future__ import annotations

from collections.abc import Sequence

from lorapool.backends.torch.detok import IncrementalDetokenizer, StopMatcher
from lorapool.plugins import load_policy
from lorapool.policies import EvictionPolicy, LRUPolicy


def test_stop_matcher_holds_back_prefixes() -> None:
    m = StopMatcher(["END"])
    assert m.feed("hello E") == "hello "
    assert m.feed("N") == ""
    assert m.feed("D and more") == ""
    assert m.stopped


def test_stop_matcher_releases_false_alarm() -> None:
    m = StopMatcher(["END"])
    assert m.feed("E") == ""
    assert m.feed("x") == "Ex"
    assert not m.stopped
    assert m.feed("EN") == ""
    assert m.flush() == "EN"


def test_incremental_detokenizer_waits_for_whole_characters() -> None:
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b"!"}

    def decode(ids: Sequence[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    d = IncrementalDetokenizer(decode)
    out = [d.add([1]), d.add([2]), d.add([3]), d.add([4])]
    assert out == ["caf", "", "é", "!"]


def test_lru_policy() -> None:
    p = load_policy("lru")
    assert isinstance(p, LRUPolicy) and isinstance(p, EvictionPolicy)
    for k in "abc":
        p.on_insert(k, 1, 0.0)
    p.on_access("a")
    assert p.victim({"a", "b", "c"}) == "b"
    assert p.victim({"a", "c"}) == "c"
    p.on_remove("c")
    assert p.victim({"a"}) == "a"
    assert p.victim(set()) is None
