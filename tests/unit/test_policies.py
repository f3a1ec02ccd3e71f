"""Eviction policies: conformance, behaviour that sets each apart from LRU, loading, simulator."""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Collection, Hashable, Iterable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import pytest

from lorapool.bench.cache import belady, main, read_trace, simulate, zipf_trace
from lorapool.plugins import available, load_policy
from lorapool.policies import (
    DEFAULT_EVICTION,
    EvictionPolicy,
    GDSFPolicy,
    LRU2Policy,
    LRUPolicy,
    S3FIFOPolicy,
    SievePolicy,
    TTLPolicy,
    WTinyLFUPolicy,
)
from lorapool.testing import (
    ManualClock,
    PolicyCase,
    check_policy,
    policy_conformance_cases,
    policy_factory,
)

ROOT = Path(__file__).resolve().parents[2]
BUILTINS = {
    "lru": LRUPolicy,
    "lru2": LRU2Policy,
    "sieve": SievePolicy,
    "s3fifo": S3FIFOPolicy,
    "wtinylfu": WTinyLFUPolicy,
    "gdsf": GDSFPolicy,
    "ttl": TTLPolicy,
}


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "custom_policy", ROOT / "examples/custom_policy.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- conformance -----------------------------------------------------------------------


@pytest.mark.parametrize("case", policy_conformance_cases(), ids=str)
@pytest.mark.parametrize("name", available("lorapool.policies"))
def test_builtin_policy_conforms(name: str, case: PolicyCase) -> None:
    case.run(policy_factory(name))


@pytest.mark.parametrize("case", policy_conformance_cases(), ids=str)
def test_example_policy_conforms(case: PolicyCase) -> None:
    largest_first = _example().LargestFirstPolicy
    case.run(lambda clock: largest_first(clock=clock))


class _IgnoresEvictable(LRUPolicy):
    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        return next(iter(self._order), None) if evictable else None


class _Hoarder(LRUPolicy):
    """Remembers every key it ever saw."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.seen: set[Hashable] = set()

    def on_insert(self, key: Hashable, size: int, cost: float) -> None:
        self.seen.add(key)
        super().on_insert(key, size, cost)


class _Unseeded(LRUPolicy):
    def victim(self, evictable: Collection[Hashable]) -> Hashable | None:
        return random.choice(sorted(map(str, evictable))) if evictable else None


@pytest.mark.parametrize(
    ("policy", "failing"),
    [(_IgnoresEvictable, "evictable-only"), (_Hoarder, "bounded"), (_Unseeded, "deterministic")],
)
def test_conformance_catches_broken_policies(policy: type[LRUPolicy], failing: str) -> None:
    (case,) = [c for c in policy_conformance_cases() if c.name == failing]
    with pytest.raises(AssertionError):
        case.run(lambda clock: policy(clock=clock))
    with pytest.raises(AssertionError):
        check_policy(lambda clock: policy(clock=clock))


# -- behaviour that plain LRU would not show ---------------------------------------------


def _insert(policy: EvictionPolicy, *keys: str, size: int = 1, cost: float = 1.0) -> None:
    for key in keys:
        policy.on_insert(key, size, cost)


def _resident_after(
    policy: EvictionPolicy, keys: Iterable[Hashable], capacity: int
) -> set[Hashable]:
    resident: set[Hashable] = set()
    for key in keys:
        if key in resident:
            policy.on_access(key)
            continue
        if len(resident) >= capacity:
            victim = policy.victim(set(resident))
            resident.remove(victim)
            policy.on_remove(victim)
        resident.add(key)
        policy.on_insert(key, 1, 1.0)
    return resident


def test_sieve_keeps_a_visited_entry_over_a_newer_unvisited_one() -> None:
    sieve, lru = SievePolicy(), LRUPolicy()
    for p in (sieve, lru):
        _insert(p, "a")
        p.on_access("a")
        _insert(p, "b")
    assert lru.victim({"a", "b"}) == "a"
    assert sieve.victim({"a", "b"}) == "b"
    sieve.on_remove("b")
    _insert(sieve, "c")
    assert sieve.victim({"a", "c"}) == "a"  # the hand cleared a's visit on its way


def test_lru2_evicts_a_once_used_entry_first_and_remembers_evicted_keys() -> None:
    p = LRU2Policy()
    _insert(p, "a")
    p.on_access("a")
    _insert(p, "b")
    assert p.victim({"a", "b"}) == "b"
    p.on_remove("a")
    _insert(p, "a")  # a came back: its earlier use counts
    assert p.victim({"a", "b"}) == "b"


@pytest.mark.parametrize("name", ["lru2", "s3fifo", "wtinylfu"])
@pytest.mark.parametrize("capacity", [4, 16])
def test_frequent_key_survives_a_scan_of_one_hit_keys(name: str, capacity: int) -> None:
    trace = [*(["hot"] * 5), *(f"scan{i}" for i in range(20 * capacity))]
    assert "hot" not in _resident_after(LRUPolicy(), trace, capacity)
    assert "hot" in _resident_after(load_policy(name), trace, capacity)


def test_wtinylfu_segments_all_keep_an_entry_at_four_slots() -> None:
    p = WTinyLFUPolicy()
    keys = [f"k{i % 6}" for i in range(200)]
    resident = _resident_after(p, keys, 4)
    assert len(p) == len(resident) == 4
    assert p._window and p._probation and p._protected


def test_gdsf_evicts_a_cheap_large_entry_before_an_expensive_small_one() -> None:
    p, lru = GDSFPolicy(), LRUPolicy()
    for policy in (p, lru):
        policy.on_insert("expensive-small", 1, 2.0)
        policy.on_insert("cheap-large", 1000, 0.5)
        policy.on_access("cheap-large")
    assert lru.victim({"expensive-small", "cheap-large"}) == "expensive-small"
    assert p.victim({"expensive-small", "cheap-large"}) == "cheap-large"
    priority = p.priority("cheap-large")
    p.on_remove("cheap-large")
    assert p.inflation == priority  # L rises to the evicted priority
    p.on_insert("new", 1, 0.5)
    new_priority = p.priority("new")
    assert priority is not None and new_priority == pytest.approx(priority + 0.5)


def test_gdsf_removal_that_is_not_an_eviction_does_not_inflate() -> None:
    p = GDSFPolicy()
    p.on_insert("a", 1, 3.0)
    p.on_remove("a")
    assert p.inflation == 0.0


def test_ttl_evicts_and_lists_expired_entries_first() -> None:
    clock = ManualClock()
    p = TTLPolicy(ttl=30.0, clock=clock)
    _insert(p, "a")
    clock.advance(10)
    _insert(p, "b")
    clock.advance(25)
    assert p.expired() == ["a"]
    assert p.victim({"a", "b"}) == "a"
    p.on_access("a")
    assert p.expired() == []
    assert p.victim({"a", "b"}) == "b"
    clock.advance(30)
    assert p.expired() == ["b", "a"]
    with pytest.raises(ValueError):
        TTLPolicy(ttl=0)


def test_every_policy_accepts_a_clock() -> None:
    clock = ManualClock()
    for cls in BUILTINS.values():
        assert cls(clock=clock).clock is clock


# -- loading by name ---------------------------------------------------------------------


def test_policies_load_by_entry_point_name() -> None:
    registered = {ep.name for ep in entry_points(group="lorapool.policies")}
    assert set(BUILTINS) <= registered
    assert set(BUILTINS) <= set(available("lorapool.policies"))
    for name, cls in BUILTINS.items():
        policy = load_policy(name)
        assert type(policy) is cls and isinstance(policy, EvictionPolicy)
    mine = SievePolicy()
    assert load_policy(mine) is mine
    with pytest.raises(LookupError, match="wtinylfu"):
        load_policy("no-such-policy")


def test_default_eviction_names_registered_policies() -> None:
    assert set(DEFAULT_EVICTION) == {"device", "host", "disk"}
    assert set(DEFAULT_EVICTION.values()) <= set(BUILTINS)


# -- simulator ---------------------------------------------------------------------------


def test_belady_is_a_lower_bound_on_a_small_zipf_trace() -> None:
    keys = zipf_trace(200, 1.0, 5000, random.Random(1))
    best = belady(keys, 20)
    for name in BUILTINS:
        clock = ManualClock()
        result = simulate(policy_factory(name)(clock), keys, 20, clock=clock)
        assert result.requests == 5000
        assert best.misses <= result.misses, name
    assert best.misses >= len(set(keys))  # every first request misses


def test_simulator_counts_bytes() -> None:
    keys = ["a", "b", "a", "c", "a"]
    sizes = {"a": 2, "b": 1, "c": 4}
    result = simulate(LRUPolicy(), keys, 4, sizes)
    assert (result.misses, result.bytes_requested, result.bytes_missed) == (4, 11, 9)
    assert result.byte_miss_ratio == pytest.approx(9 / 11)


def test_cli_runs_default_workloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cache.json"
    assert main(["--requests", "400", "--jobs", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "belady" in text and "slots=4" in text and "[bytes]" in text
    assert "LRU->Belady gap" in text and "approximates the optimum" in text
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 19 and "device" in doc["summary"]


def test_cli_replays_a_trace_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorapool.__main__ import main as lorapool_main

    trace = tmp_path / "trace.txt"
    trace.write_text("# key size\n" + "".join(f"a{i % 7} {1 + i % 3}\n" for i in range(50)))
    keys, sizes = read_trace(trace)
    assert len(keys) == 50 and sizes is not None and sizes["a1"] == 2
    assert (
        lorapool_main(
            ["bench", "cache", "--trace", str(trace), "--capacities", "4,50%", "--jobs", "1"]
        )
        == 0
    )
    assert "trace.txt bytes=50%" in capsys.readouterr().out


def test_example_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    _example().main()
    assert "conformance suite: passed" in capsys.readouterr().out
