"""Eviction policy simulator: miss ratios of every built-in policy and Belady's optimum.

Each policy is driven exactly like a tier drives it: a hit calls ``on_access``;
a miss asks ``victim(evictable)`` and calls ``on_remove`` until the new entry
fits, then ``on_insert(key, size, cost)``. Every entry is evictable (no pins),
a request is one tick of 10 ms on a manual clock, and the load cost is
``1 + size`` (a fixed latency plus a transfer time). Belady's optimum evicts the
entry used farthest in the future; with sizes that rule is only an
approximation of the optimum.

Default workloads, each ``--requests`` long and seeded from ``--seed``: Zipf
with alpha 0.8, 1.0 and 1.2 over 1000 adapters, cache of 50/100/200 entries;
the same Zipf (alpha 1.0) with its popularity ranking reshuffled five times;
200 adapters in 4, 8, 16 and 32 device slots; 1000 adapters of 1, 2, 4 or 8
size units in a cache of 5/10/20% of their total size (object and byte miss
ratios). ``--trace FILE`` replays a file instead (``key [size]`` per line).
The summary compares the default device policy with the best other policy of
each row and with the LRU-to-Belady gap, and the host/disk default likewise
on the sized rows.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import sys
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lorapool.policies.base import EvictionPolicy
from lorapool.testing.clock import ManualClock

__all__ = [
    "BELADY",
    "Result",
    "Row",
    "add_arguments",
    "belady",
    "default_rows",
    "main",
    "read_trace",
    "run",
    "shifting_trace",
    "simulate",
    "summarize",
    "zipf_trace",
]

BELADY = "belady"
TICK = 0.01
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Result:
    """Counts of one simulation."""

    requests: int
    misses: int
    bytes_requested: int
    bytes_missed: int

    @property
    def miss_ratio(self) -> float:
        """Misses per request."""
        return self.misses / self.requests if self.requests else 0.0

    @property
    def byte_miss_ratio(self) -> float:
        """Bytes loaded per byte requested."""
        return self.bytes_missed / self.bytes_requested if self.bytes_requested else 0.0


@dataclass(frozen=True)
class Row:
    """One workload at one cache size: a trace, its sizes (``None``: all 1) and a capacity."""

    label: str
    keys: Sequence[Hashable] = field(repr=False)
    capacity: int
    sizes: Mapping[Any, int] | None = field(default=None, repr=False)


def simulate(
    policy: EvictionPolicy,
    keys: Iterable[K],
    capacity: int,
    sizes: Mapping[K, int] | None = None,
    clock: ManualClock | None = None,
) -> Result:
    """Replay ``keys`` through a tier of ``capacity`` (entries, or size units with ``sizes``)."""
    resident: dict[K, int] = {}
    used = requests = misses = bytes_requested = bytes_missed = 0
    evictable = resident.keys()
    for key in keys:
        size = 1 if sizes is None else sizes[key]
        requests += 1
        bytes_requested += size
        if clock is not None:
            clock.advance(TICK)
        if key in resident:
            policy.on_access(key)
            continue
        misses += 1
        bytes_missed += size
        if size > capacity:
            continue  # can never fit: served without caching
        while used + size > capacity:
            victim = policy.victim(evictable)
            if victim is None or victim not in resident:
                raise RuntimeError(f"{type(policy).__name__}.victim returned {victim!r}")
            used -= resident.pop(victim)
            policy.on_remove(victim)
        resident[key] = size
        used += size
        policy.on_insert(key, size, 1.0 + size)
    return Result(requests, misses, bytes_requested, bytes_missed)


def belady(keys: Sequence[K], capacity: int, sizes: Mapping[K, int] | None = None) -> Result:
    """Belady's MIN: evict the entry whose next use is farthest (optimal for equal sizes)."""
    never = len(keys)
    next_use = [never] * len(keys)
    seen: dict[K, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        next_use[i] = seen.get(keys[i], never)
        seen[keys[i]] = i
    resident: dict[K, int] = {}  # key -> next use
    heap: list[tuple[int, int, K]] = []  # (-next use, tie-break, key); stale ones skipped
    used = misses = bytes_requested = bytes_missed = 0
    for i, key in enumerate(keys):
        size = 1 if sizes is None else sizes[key]
        bytes_requested += size
        if key not in resident:
            misses += 1
            bytes_missed += size
            if size > capacity:
                continue
            while used + size > capacity:
                far, _, victim = heapq.heappop(heap)
                if resident.get(victim) != -far:
                    continue  # stale: the key was used again (or left) since
                del resident[victim]
                used -= 1 if sizes is None else sizes[victim]
            used += size
        resident[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], i, key))
    return Result(len(keys), misses, bytes_requested, bytes_missed)


# -- workloads -------------------------------------------------------------------------


def zipf_trace(n_keys: int, alpha: float, requests: int, rng: random.Random) -> list[int]:
    """``requests`` keys drawn from a Zipf(``alpha``) popularity over ``n_keys`` shuffled keys."""
    cum = list(itertools.accumulate(1.0 / rank**alpha for rank in range(1, n_keys + 1)))
    ranking = list(range(n_keys))
    rng.shuffle(ranking)
    ranks = rng.choices(range(n_keys), cum_weights=cum, k=requests)
    return [ranking[r] for r in ranks]


def shifting_trace(
    n_keys: int, alpha: float, requests: int, rng: random.Random, phases: int = 5
) -> list[int]:
    """Zipf traffic whose popularity ranking is reshuffled at each of ``phases`` phases."""
    keys: list[int] = []
    for phase in range(phases):
        length = requests // phases + (1 if phase < requests % phases else 0)
        keys += zipf_trace(n_keys, alpha, length, rng)
    return keys


def default_rows(requests: int = 100_000, seed: int = 0) -> list[Row]:
    """The simulator's default workloads (each row seeded from ``seed`` and its label)."""

    def rng(label: str) -> random.Random:
        return random.Random(f"{seed}/{label}")

    rows: list[Row] = []
    for alpha in (0.8, 1.0, 1.2):
        keys = zipf_trace(1000, alpha, requests, rng(f"zipf{alpha}"))
        rows += [Row(f"zipf a={alpha} n=1000 cache={c}", keys, c) for c in (50, 100, 200)]
    keys = shifting_trace(1000, 1.0, requests, rng("shift"))
    rows += [Row(f"shifting a=1.0 n=1000 cache={c}", keys, c) for c in (50, 100, 200)]
    keys = zipf_trace(200, 1.0, requests, rng("slots"))
    rows += [Row(f"zipf a=1.0 n=200 slots={s}", keys, s) for s in (4, 8, 16, 32)]
    sized = rng("sized")
    keys = zipf_trace(1000, 1.0, requests, sized)
    sizes = {k: sized.choice((1, 2, 4, 8)) for k in range(1000)}
    total = sum(sizes.values())
    for pct in (5, 10, 20):
        rows.append(Row(f"sized a=1.0 n=1000 bytes={pct}%", keys, total * pct // 100, sizes))
    return rows


def read_trace(path: str | Path) -> tuple[list[str], dict[str, int] | None]:
    """Keys of a trace file (one ``key [size]`` a line; ``#`` comments) and sizes if given."""
    keys: list[str] = []
    sizes: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        keys.append(fields[0])
        if len(fields) > 1:
            sizes[fields[0]] = int(fields[1])
    if sizes and len(sizes) < len(set(keys)):
        raise ValueError(f"{path}: give a size on every line or on none")
    return keys, sizes or None


def _trace_rows(path: str, capacities: str) -> list[Row]:
    keys, sizes = read_trace(path)
    universe = sum(sizes.values()) if sizes else len(set(keys))
    rows: list[Row] = []
    for spec in capacities.split(","):
        spec = spec.strip()
        cap = universe * float(spec[:-1]) / 100 if spec.endswith("%") else float(spec)
        label = f"{Path(path).name} {'bytes' if sizes else 'cache'}={spec}"
        rows.append(Row(label, keys, max(1, int(cap)), sizes))
    return rows


# -- running ---------------------------------------------------------------------------


def _run_one(row: Row, name: str) -> Result:
    if name == BELADY:
        return belady(row.keys, row.capacity, row.sizes)
    from lorapool.testing.conformance import policy_factory

    clock = ManualClock()
    return simulate(policy_factory(name)(clock), row.keys, row.capacity, row.sizes, clock)


def _run_all(rows: list[Row], names: list[str], jobs: int) -> list[dict[str, Result]]:
    pairs = [(i, name) for i in range(len(rows)) for name in [*names, BELADY]]
    if jobs <= 1:
        results = [_run_one(rows[i], name) for i, name in pairs]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(_run_one, rows[i], name) for i, name in pairs]
            results = [f.result() for f in futures]
    out: list[dict[str, Result]] = [{} for _ in rows]
    for (i, name), result in zip(pairs, results, strict=True):
        out[i][name] = result
    return out


def summarize(
    rows: Sequence[Row],
    results: Sequence[Mapping[str, Result]],
    policy: str,
    *,
    baseline: str = "lru",
    byte: bool = False,
) -> dict[str, Any]:
    """How ``policy`` compares, row by row, with the best other policy and with Belady.

    ``worst_gap``: the largest amount (in miss ratio; byte miss ratio with
    ``byte``) by which ``policy`` misses more than the best other policy of
    its row, and ``worst_gap_relative`` that amount over the best one's ratio;
    ``closed``: the mean fraction of the ``baseline``-to-Belady gap that
    ``policy`` closes (rows where the baseline is already optimal left out).
    """

    def ratio(r: Result) -> float:
        return r.byte_miss_ratio if byte else r.miss_ratio

    worst: tuple[float, float, str] = (float("-inf"), 0.0, "")
    closed: list[float] = []
    for row, by_name in zip(rows, results, strict=True):
        mine = ratio(by_name[policy])
        best = min(
            (ratio(r) for n, r in by_name.items() if n not in (policy, BELADY)), default=mine
        )
        if mine - best > worst[0]:
            worst = (mine - best, (mine - best) / best if best else 0.0, row.label)
        if baseline in by_name and BELADY in by_name:
            span = ratio(by_name[baseline]) - ratio(by_name[BELADY])
            if span > 1e-12:
                closed.append((ratio(by_name[baseline]) - mine) / span)
    mean_closed = sum(closed) / len(closed) if closed else 0.0
    return {
        "policy": policy,
        "metric": "byte_miss_ratio" if byte else "miss_ratio",
        "rows": len(rows),
        "worst_gap": worst[0],
        "worst_gap_relative": worst[1],
        "worst_row": worst[2],
        "closed": mean_closed,
        "gap_target_met": worst[0] <= 0.02,
        "closed_target_met": mean_closed >= 0.30,
    }


def _print_summary(title: str, summary: Mapping[str, Any]) -> None:
    met = {True: "met", False: "NOT met"}
    print(
        f"{title}: worst gap to the best other policy {100 * summary['worst_gap']:+.2f} points"
        f" ({100 * summary['worst_gap_relative']:+.1f}% relative) on '{summary['worst_row']}'"
        f" -> target <= 2 points {met[summary['gap_target_met']]}"
    )
    print(
        f"{title}: closes {100 * summary['closed']:.1f}% of the LRU->Belady gap on average"
        f" -> target >= 30% {met[summary['closed_target_met']]}"
    )


# -- command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lorapool bench cache``."""
    parser.add_argument("--requests", type=int, default=100_000, help="requests per workload")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument("--trace", default=None, help="replay this file (`key [size]` a line)")
    parser.add_argument(
        "--capacities", default="5%,10%,20%", help="with --trace: entries, or %% of the keys/bytes"
    )
    parser.add_argument("--policies", default=None, help="comma-separated (default: all)")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4), help="processes")
    parser.add_argument("--json", default=None, help="write the results here as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the simulator, print the table and summary, write JSON if asked."""
    from lorapool.plugins import available
    from lorapool.policies import DEFAULT_EVICTION

    names = args.policies.split(",") if args.policies else available("lorapool.policies")
    if args.trace:
        rows = _trace_rows(args.trace, args.capacities)
    else:
        rows = default_rows(args.requests, args.seed)
    results = _run_all(rows, names, args.jobs)
    columns = [*names, BELADY]
    width = max(len(r.label) for r in rows) + 8
    print("miss ratio, % of requests ([bytes] rows: % of bytes); lower is better")
    print(f"{'workload':<{width}}" + "".join(f"{n:>9}" for n in columns))
    for row, by_name in zip(rows, results, strict=True):
        cells = "".join(f"{100 * by_name[n].miss_ratio:>9.2f}" for n in columns)
        print(f"{row.label:<{width}}{cells}")
        if row.sizes is not None:
            cells = "".join(f"{100 * by_name[n].byte_miss_ratio:>9.2f}" for n in columns)
            print(f"{row.label + ' [bytes]':<{width}}{cells}")
    if any(row.sizes is not None for row in rows):
        print(
            "sized rows: belady evicts the farthest next use, which only approximates the optimum"
        )
    summaries: dict[str, dict[str, Any]] = {}
    device = DEFAULT_EVICTION["device"]
    if device in names and "lru" in names:
        print()
        summaries["device"] = summarize(rows, results, device)
        _print_summary(f"default device policy {device}, {len(rows)} rows", summaries["device"])
    sized = [i for i, row in enumerate(rows) if row.sizes is not None]
    stored = {DEFAULT_EVICTION["host"], DEFAULT_EVICTION["disk"]}
    for name in sorted(stored & set(names)) if sized and "lru" in names else []:
        tiers = "/".join(t for t in ("host", "disk") if DEFAULT_EVICTION[t] == name)
        for byte in (False, True):
            key = f"{tiers} {'bytes' if byte else 'objects'}"
            summaries[key] = summarize(
                [rows[i] for i in sized], [results[i] for i in sized], name, byte=byte
            )
            title = f"default {tiers} policy {name}, sized rows, {key.split()[1]}"
            _print_summary(title, summaries[key])
    if args.json:
        doc = {
            "seed": args.seed,
            "requests": args.requests,
            "trace": args.trace,
            "rows": [
                {
                    "label": row.label,
                    "capacity": row.capacity,
                    "sized": row.sizes is not None,
                    "results": {
                        n: {
                            **asdict(r),
                            "miss_ratio": r.miss_ratio,
                            "byte_miss_ratio": r.byte_miss_ratio,
                        }
                        for n, r in by_name.items()
                    },
                }
                for row, by_name in zip(rows, results, strict=True)
            ],
            "summary": summaries,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorapool.bench.cache``."""
    parser = argparse.ArgumentParser(prog="lorapool bench cache", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
