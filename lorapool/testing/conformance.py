"""A conformance suite every eviction policy passes, built-in or your own.

A policy is given as a *factory*: a callable that takes a
:class:`~lorapool.testing.ManualClock` and returns a fresh policy. Run every
check at once::

    from lorapool.testing import check_policy

    check_policy(lambda clock: MyPolicy(clock=clock))

or one pytest test per check::

    import pytest
    from lorapool.testing import policy_conformance_cases

    @pytest.mark.parametrize("case", policy_conformance_cases(), ids=str)
    def test_my_policy(case):
        case.run(lambda clock: MyPolicy(clock=clock))

The checks drive the policy the way a tier does: a hit calls ``on_access``; a
miss in a full tier asks ``victim(evictable)`` and calls ``on_remove`` on the
answer, then ``on_insert(key, size, cost)``. Random traces pin entries, hold
some in use, remove entries explicitly, re-insert removed keys, call
``on_access``/``on_remove`` with unknown keys, sometimes ask for a victim
without evicting it (a load that failed), and pass ``evictable`` as lists,
tuples, sets, frozensets and dict views. A failed check raises
``AssertionError``. The checks:

``protocol``
    The object satisfies :class:`~lorapool.policies.EvictionPolicy`;
    ``victim`` of an empty collection is ``None``; unknown keys are harmless;
    a removed key can be inserted again.
``evictable-only``
    ``victim`` returns a member of ``evictable`` (never a pinned or in-use
    entry), and a key whenever ``evictable`` is not empty.
``capacity``
    Random traces through tiers of 1, 4 and 16 entries and of 64 size units
    keep working; if the policy defines ``__len__`` (the number of entries it
    tracks), it always equals the number of entries in the tier.
``deterministic``
    Two runs of one trace, each with its own manual clock moved alike, choose
    the same victims.
``bounded``
    Memory does not grow with the number of distinct keys seen: the deep
    ``sys.getsizeof`` of the policy after 20,000 requests for mostly new keys
    is at most twice what it was after 4,000 requests over 200 keys (plus
    16 KiB), at a capacity of 8.
"""

from __future__ import annotations

import random
import sys
from collections import deque
from collections.abc import Callable, Collection, Hashable, Sized
from dataclasses import dataclass
from typing import Any

from lorapool.abc import EvictionPolicy, lacks

from .clock import ManualClock

__all__ = [
    "PolicyCase",
    "PolicyFactory",
    "check_policy",
    "deep_sizeof",
    "policy_conformance_cases",
    "policy_factory",
]

PolicyFactory = Callable[[ManualClock], EvictionPolicy]
"""Builds a fresh policy that reads time from the given clock."""


@dataclass(frozen=True)
class PolicyCase:
    """One conformance check; :meth:`run` it on a policy factory."""

    name: str
    check: Callable[[PolicyFactory], None]

    def run(self, factory: PolicyFactory) -> None:
        """Run the check; raises ``AssertionError`` if the policy fails it."""
        self.check(factory)

    def __str__(self) -> str:
        return self.name


def policy_factory(name: str) -> PolicyFactory:
    """A factory for the policy registered under ``name`` (``"sieve"``, ...), given a clock."""
    from importlib.metadata import entry_points

    from lorapool.plugins import load_policy

    target: Any = None
    for ep in entry_points(group="lorapool.policies"):
        if ep.name == name:
            target = ep.load()
            break
    if target is None:
        target = type(load_policy(name))

    def build(clock: ManualClock) -> EvictionPolicy:
        policy: EvictionPolicy = target(clock=clock)
        return policy

    return build


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


_SHAPES: tuple[Callable[[list[Hashable]], Collection[Hashable]], ...] = (
    list,
    set,
    tuple,
    frozenset,
    lambda keys: dict.fromkeys(keys).keys(),
)


class _Tier:
    """A tier of ``capacity`` units that drives a policy and checks its answers."""

    def __init__(self, policy: EvictionPolicy, capacity: int, rng: random.Random) -> None:
        self.policy = policy
        self.capacity = capacity
        self.rng = rng
        self.resident: dict[Hashable, int] = {}
        self.used = 0
        self.pinned: set[Hashable] = set()
        self.in_use: set[Hashable] = set()
        self.victims: list[Hashable] = []

    def request(self, key: Hashable, size: int) -> None:
        if key in self.resident:
            self.policy.on_access(key)
            return
        while self.used + size > self.capacity:
            evictable = [k for k in self.resident if k not in self.pinned and k not in self.in_use]
            shape = self.rng.choice(_SHAPES)
            victim = self.policy.victim(shape(evictable))
            if not evictable:
                _require(victim is None, f"victim of an empty collection was {victim!r}")
                return  # the tier refuses the load
            _require(
                victim is not None and victim in evictable,
                f"victim {victim!r} is not among the evictable {sorted(map(repr, evictable))}"
                f" (pinned {sorted(map(repr, self.pinned))},"
                f" in use {sorted(map(repr, self.in_use))})",
            )
            self.victims.append(victim)
            if self.rng.random() < 0.03:
                return  # the load failed after choosing a victim: nothing is evicted
            self.remove(victim)
        self.resident[key] = size
        self.used += size
        self.policy.on_insert(key, size, self.rng.uniform(0.001, 0.5) * size)
        self.check_len()

    def remove(self, key: Hashable) -> None:
        self.used -= self.resident.pop(key)
        self.pinned.discard(key)
        self.in_use.discard(key)
        self.policy.on_remove(key)
        self.check_len()

    def check_len(self) -> None:
        if isinstance(self.policy, Sized):
            tracked = len(self.policy)
            _require(
                tracked == len(self.resident),
                f"len(policy) is {tracked} with {len(self.resident)} entries in the tier",
            )


def _drive(
    factory: PolicyFactory,
    *,
    capacity: int,
    steps: int,
    seed: int,
    universe: int = 64,
    max_size: int = 1,
    distinct_from: int | None = None,
) -> tuple[EvictionPolicy, list[Hashable]]:
    """Run a random trace; with ``distinct_from``, later keys are mostly new ones."""
    rng = random.Random(seed)
    clock = ManualClock()
    policy = factory(clock)
    tier = _Tier(policy, capacity, rng)
    sizes: dict[Hashable, int] = {}
    for step in range(steps):
        clock.advance(rng.choice((0.0, 0.5, 5.0, 600.0)))
        if distinct_from is not None and step >= distinct_from and rng.random() < 0.8:
            key: Hashable = f"new-{step}"
        else:
            key = f"k{int(universe * rng.random() ** 2)}"  # skewed: low numbers are popular
        size = sizes.setdefault(key, rng.randint(1, max_size))
        tier.request(key, size)
        roll = rng.random()
        resident = list(tier.resident)
        if roll < 0.02 and resident:
            tier.remove(rng.choice(resident))
        elif roll < 0.06 and resident and len(tier.pinned) < capacity // 2:
            tier.pinned.add(rng.choice(resident))
        elif roll < 0.09 and tier.pinned:
            tier.pinned.discard(rng.choice(sorted(map(str, tier.pinned))))
        elif roll < 0.10:
            policy.on_access(f"unknown-{step}")
            policy.on_remove(f"unknown-{step}")
        tier.in_use = {k for k in resident if k in tier.resident and rng.random() < 0.2}
    return policy, tier.victims


def _check_protocol(factory: PolicyFactory) -> None:
    policy = factory(ManualClock())
    missing = lacks(policy, EvictionPolicy)
    _require(not missing, f"{policy!r} lacks EvictionPolicy's methods {missing}")
    empties: tuple[Collection[Hashable], ...] = ([], set(), (), {}.keys())
    for empty in empties:
        _require(policy.victim(empty) is None, "victim of an empty collection is not None")
    policy.on_access("unknown")
    policy.on_remove("unknown")
    for key in ("a", "b", "c"):
        policy.on_insert(key, 1, 0.01)
    policy.on_access("a")
    _require(policy.victim(set()) is None, "victim of an empty collection is not None")
    _require(policy.victim(["b"]) == "b", "victim of ['b'] is not 'b'")
    _require(policy.victim(("a", "c")) in ("a", "c"), "victim not among ('a', 'c')")
    policy.on_remove("a")
    policy.on_remove("a")
    policy.on_insert("a", 2, 0.02)
    policy.on_access("a")
    _require(policy.victim(["a"]) == "a", "victim of ['a'] after re-insertion is not 'a'")
    if isinstance(policy, Sized):
        _require(len(policy) == 3, f"len(policy) is {len(policy)} with 3 entries")


def _check_evictable_only(factory: PolicyFactory) -> None:
    rng = random.Random(7)
    policy = factory(ManualClock())
    keys: list[Hashable] = [f"k{i}" for i in range(8)]
    for key in keys:
        policy.on_insert(key, 1, 0.1)
    for step in range(400):
        policy.on_access(rng.choice(keys))
        evictable = rng.sample(keys, rng.randint(0, len(keys)))
        victim = policy.victim(rng.choice(_SHAPES)(evictable))
        if evictable:
            _require(victim in evictable, f"step {step}: {victim!r} not in {evictable}")
        else:
            _require(victim is None, f"step {step}: victim of nothing is {victim!r}")


def _check_capacity(factory: PolicyFactory) -> None:
    for seed, capacity in enumerate((1, 4, 16)):
        _drive(factory, capacity=capacity, steps=3000, seed=seed, universe=8 * capacity)
    _drive(factory, capacity=64, steps=3000, seed=3, universe=100, max_size=8)


def _check_deterministic(factory: PolicyFactory) -> None:
    for capacity, max_size in ((6, 1), (40, 8)):
        runs = [
            _drive(factory, capacity=capacity, steps=2000, seed=11, universe=60, max_size=max_size)
            for _ in range(2)
        ]
        first, second = runs[0][1], runs[1][1]
        pairs = zip(first, second, strict=False)
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        _require(
            first == second,
            f"two runs of one trace chose different victims (first difference at eviction {same})",
        )


def _check_bounded(factory: PolicyFactory) -> None:
    policy, _ = _drive(factory, capacity=8, steps=4000, seed=5, universe=200)
    warm = deep_sizeof(policy)
    policy, _ = _drive(factory, capacity=8, steps=20000, seed=5, universe=200, distinct_from=4000)
    grown = deep_sizeof(policy)
    _require(
        grown <= 2 * warm + 16384,
        f"policy grew from {warm} to {grown} bytes while tracking at most 8 entries",
    )


def deep_sizeof(obj: object) -> int:
    """Bytes held by ``obj`` and what it references (containers, attributes, ``__slots__``).

    Callables (a clock, a bound method), classes and modules are not counted.
    """
    seen: set[int] = set()
    stack: deque[object] = deque([obj])
    total = 0
    while stack:
        item = stack.pop()
        if id(item) in seen or (callable(item) and item is not obj):
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset, deque)):
            stack.extend(item)
        if hasattr(item, "__dict__") and not isinstance(item, type):
            stack.append(vars(item))
        for klass in type(item).__mro__:
            for slot in getattr(klass, "__slots__", ()):
                if isinstance(slot, str) and hasattr(item, slot):
                    stack.append(getattr(item, slot))
    return total


_CASES = (
    PolicyCase("protocol", _check_protocol),
    PolicyCase("evictable-only", _check_evictable_only),
    PolicyCase("capacity", _check_capacity),
    PolicyCase("deterministic", _check_deterministic),
    PolicyCase("bounded", _check_bounded),
)


def policy_conformance_cases() -> list[PolicyCase]:
    """The checks, for ``pytest.mark.parametrize("case", ..., ids=str)``."""
    return list(_CASES)


def check_policy(factory: PolicyFactory) -> None:
    """Run every check on the policy ``factory`` builds; raises ``AssertionError`` on failure."""
    for case in _CASES:
        case.run(factory)
