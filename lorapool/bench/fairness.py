"""Fairness: FCFS vs FairScheduler on a noisy neighbour, an S-LoRA-style trace, and at scale.

Three parts, each a side-by-side comparison in one run (``--parts`` picks some):

``noisy``: one tenant sends ten times the request rate of three quiet ones
(Poisson arrivals, fixed seed). The same trace is replayed under
FCFSScheduler and FairScheduler (equal weights) on one pool, and the quiet
tenants' arrivals alone are replayed as the no-noise baseline under each.
The traces of further seeds (``--more-seeds``, default 1 and 2) are then
replayed under FairScheduler alone, with and without the noisy tenant, for
a quiet p99 pooled over every seed beside the first seed's.
TorchBackend on the demo model by default; ``--backend mock`` uses a
MockBackend with a fixed ``token_delay`` instead (no model, same trace).

``slora``: Gamma-distributed inter-arrival times (bursty, cv 2) and a
power-law (Zipf) adapter popularity over 32 adapters owned by 8 tenants, on a
MockBackend with 4 device slots: FCFS vs FairScheduler vs
FairScheduler(fairness=FairnessConfig(affinity_slack=0)), with device loads per 1000
requests.

``overhead``: the scheduler driven directly (no pool) with 100, 1,000 and
10,000 tenants, each with its own adapter: the time of ``acquire`` (admission,
enqueue, dispatch attempt) and ``release`` (which dispatches the next request)
per request, with a standing backlog of one queued request per tenant.

TTFT is the time from the call to ``pool.generate`` to its first token. The
noisy part also plots each request's TTFT over its arrival time (matplotlib,
the ``bench`` extra): to ``docs/fairness-ttft.png`` when run from the
repository root, to ``--plot PATH`` when given, nowhere with ``--no-plot``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import json
import math
import platform
import random
import sys
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapool.scheduler import (
    AdmissionConfig,
    ColdStart,
    DispatchCheck,
    FairnessConfig,
    FairScheduler,
    FCFSScheduler,
    HandoffHook,
    PlacesConfig,
    PreemptHook,
    ResidencyCheck,
    Scheduler,
    Ticket,
)
from lorapool.testing import MockBackend
from lorapool.types import LoadedAdapter

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["add_arguments", "run"]

PARTS = ("noisy", "slora", "overhead")
PROMPTS = [
    "Write a haiku about the sea.",
    "Name three colours of the rainbow.",
    "What is the capital of France?",
    "Give me one tip for better sleep.",
    "Why is the sky blue?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Describe a cat in five words.",
]
DEFAULT_PLOT = Path("docs") / "fairness-ttft.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``fairness`` scenario."""
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every trace (default 0)")
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="tokens per request, noisy and slora (16)"
    )
    noisy = parser.add_argument_group("noisy neighbour")
    noisy.add_argument(
        "--backend",
        choices=("torch", "mock"),
        default="torch",
        help="torch: TorchBackend on the demo model (default); mock: MockBackend, token_delay",
    )
    noisy.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (30)")
    noisy.add_argument("--noisy-rate", type=float, default=20.0, help="noisy req/s (20)")
    noisy.add_argument("--quiet-rate", type=float, default=2.0, help="req/s per quiet tenant (2)")
    noisy.add_argument("--quiet-tenants", type=int, default=3, help="quiet tenants (3)")
    noisy.add_argument("--max-batch", type=int, default=16, help="engine batch rows (16)")
    noisy.add_argument(
        "--mock-token-delay",
        type=float,
        default=0.1,
        help="seconds per token with --backend mock (0.1: capacity = max_batch/max_tokens/0.1)",
    )
    noisy.add_argument(
        "--more-seeds",
        default="1,2",
        help="further seeds replayed under FairScheduler only, with and without the noisy "
        "tenant, for a quiet p99 pooled over every seed ('' for none; default 1,2)",
    )
    noisy.add_argument("--window", type=float, default=5.0, help="service-share window, s (5)")
    noisy.add_argument("--cache-dir", default=None, help="model and adapter cache")
    noisy.add_argument(
        "--plot",
        default=None,
        help=f"write the TTFT plot here (default {DEFAULT_PLOT} when run from the repository)",
    )
    noisy.add_argument("--no-plot", action="store_true", help="write no plot")
    slora = parser.add_argument_group("S-LoRA-style trace (MockBackend)")
    slora.add_argument("--slora-duration", type=float, default=20.0, help="seconds (20)")
    slora.add_argument("--slora-rate", type=float, default=60.0, help="mean req/s (60)")
    slora.add_argument("--slora-cv", type=float, default=2.0, help="inter-arrival cv (2)")
    slora.add_argument("--slora-adapters", type=int, default=32, help="adapters (32)")
    slora.add_argument("--slora-tenants", type=int, default=8, help="tenants (8)")
    slora.add_argument("--slora-alpha", type=float, default=1.0, help="Zipf exponent (1.0)")
    slora.add_argument("--slora-slots", type=int, default=4, help="device slots (4)")
    slora.add_argument("--slora-batch", type=int, default=8, help="max_batch (8)")
    slora.add_argument("--slora-token-delay", type=float, default=0.005, help="s/token (0.005)")
    slora.add_argument(
        "--slora-load-delay", type=float, default=0.005, help="s per device load (0.005)"
    )
    over = parser.add_argument_group("scheduling overhead")
    over.add_argument(
        "--overhead-tenants", default="100,1000,10000", help="tenant counts (100,1000,10000)"
    )
    over.add_argument(
        "--overhead-requests", type=int, default=50_000, help="timed requests each (50000)"
    )
    parser.add_argument("--json", default=None, help="write the results as JSON here")


# -- shared: percentiles, adapters, a recording scheduler ---------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _safetensors(tensors: Mapping[str, list[int]]) -> bytes:
    header: dict[str, object] = {}
    offset = 0
    for name, shape in tensors.items():
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * offset


def _tiny_adapters(root: Path, count: int) -> list[Path]:
    """``count`` small valid PEFT LoRA directories (rank 4, q_proj of layer 0), distinct bytes."""
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [4, 8],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": [8, 4],
    }
    paths = []
    for i in range(count):
        d = root / f"a{i}"
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8 + i, "target_modules": ["q_proj"]}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        (d / "adapter_model.safetensors").write_bytes(_safetensors(tensors))
        paths.append(d)
    return paths


@dataclass
class _Request:
    """One request of a trace and what happened to it (``perf_counter`` seconds)."""

    at: float
    tenant: str
    adapter: str
    prompt: str
    start: float = math.nan
    dispatch: float = math.nan
    first: float = math.nan
    end: float = math.nan
    tokens: int = 0
    stamps: list[tuple[float, int]] = field(default_factory=list)
    error: str | None = None


_CURRENT: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "lorapool_bench_request", default=None
)


class _Recorder:
    """A Scheduler that delegates to ``inner`` and stamps each request's dispatch time.

    ``use`` swaps the inner scheduler between runs (nothing in flight), binding it
    with the limits the pool gave at start, so runs share one warm backend.
    """

    def __init__(self, inner: Scheduler) -> None:
        self.inner = inner
        self._bound: dict[str, Any] | None = None
        self._preempt: PreemptHook | None = None
        self._hand_off: HandoffHook | None = None

    @property
    def queued(self) -> int:
        """The inner scheduler's queue depth."""
        return self.inner.queued

    def use(self, inner: Scheduler) -> None:
        """Delegate to ``inner`` from now on (bound with the pool's limits)."""
        self.inner = inner
        if self._bound is not None:
            inner.bind(**self._bound)
        inner.bind_preemption(self._preempt)
        inner.bind_handoff(self._hand_off)

    def bind(
        self,
        *,
        max_inflight: int,
        can_dispatch: DispatchCheck,
        on_device: ResidencyCheck | None = None,
    ) -> None:
        """Remember the pool's limits and bind the inner scheduler with them."""
        self._bound = {
            "max_inflight": max_inflight,
            "can_dispatch": can_dispatch,
            "on_device": on_device,
        }
        self.inner.bind(max_inflight=max_inflight, can_dispatch=can_dispatch, on_device=on_device)

    def bind_preemption(self, preempt: PreemptHook | None) -> None:
        """Remember the pool's preemption hook and hand it to the inner scheduler."""
        self._preempt = preempt
        self.inner.bind_preemption(preempt)

    def bind_handoff(self, hand_off: HandoffHook | None) -> None:
        """Remember the pool's hand-off hook and hand it to the inner scheduler."""
        self._hand_off = hand_off
        self.inner.bind_handoff(hand_off)

    def tier_of(self, tenant: str) -> str | None:
        """Delegated."""
        return self.inner.tier_of(tenant)

    @property
    def queued_by_tier(self) -> dict[str, int]:
        """Delegated."""
        return self.inner.queued_by_tier

    async def acquire(self, ticket: Ticket) -> None:
        """The inner scheduler's acquire, then stamp the dispatch on the current request."""
        await self.inner.acquire(ticket)
        record = _CURRENT.get()
        if record is not None:
            record.dispatch = time.perf_counter()

    def charge(self, ticket: Ticket, *, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Delegated."""
        self.inner.charge(ticket, input_tokens=input_tokens, output_tokens=output_tokens)

    def cold_start(self, tenant: str) -> ColdStart:
        """Delegated."""
        return self.inner.cold_start(tenant)

    def release(self, ticket: Ticket) -> None:
        """Delegated."""
        self.inner.release(ticket)

    def kick(self) -> None:
        """Delegated."""
        self.inner.kick()


@dataclass
class _SlowLoadBackend(MockBackend):
    """MockBackend whose device loads take ``load_delay`` seconds (a host->device copy)."""

    load_delay: float = 0.0

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Sleep ``load_delay``, then load as MockBackend does."""
        if self.load_delay:
            await asyncio.sleep(self.load_delay)
        await super().load(adapter, slot)


async def _replay(pool: Any, trace: Sequence[_Request], max_tokens: int) -> float:
    """Issue each request at its ``at`` offset and stream it; return the start time."""
    from lorapool import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(r: _Request) -> None:
        _CURRENT.set(r)
        r.start = time.perf_counter()
        try:
            stream = pool.generate(r.prompt, adapter=r.adapter, tenant=r.tenant, params=params)
            async for chunk in stream:
                if chunk.token_ids:
                    now = time.perf_counter()
                    if math.isnan(r.first):
                        r.first = now
                    r.stamps.append((now, len(chunk.token_ids)))
                    r.tokens += len(chunk.token_ids)
        except Exception as exc:  # recorded, shown in the table as not completed
            r.error = f"{type(exc).__name__}: {exc}"
        r.end = time.perf_counter()

    t0 = time.perf_counter()
    tasks = []
    for r in trace:
        delay = r.at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(r)))
    await asyncio.gather(*tasks)
    return t0


def _fresh(trace: Iterable[_Request]) -> list[_Request]:
    return [_Request(r.at, r.tenant, r.adapter, r.prompt) for r in trace]


@dataclass
class _Run:
    """A replayed trace under one scheduler."""

    label: str
    requests: list[_Request]
    t0: float
    device_loads: int = 0
    affinity_picks: int | None = None
    scheduler: str = ""
    preemptions: int = 0

    @property
    def done(self) -> list[_Request]:
        """Requests that completed and produced a token."""
        return [r for r in self.requests if r.error is None and not math.isnan(r.first)]

    def ttft(self, tenants: Iterable[str] | None = None) -> list[float]:
        """Seconds from the call to the first token, of the tenants' completed requests."""
        keep = None if tenants is None else set(tenants)
        return [r.first - r.start for r in self.done if keep is None or r.tenant in keep]

    def queue(self, tenant: str) -> list[float]:
        """Seconds from the call to dispatch, of the tenant's completed requests."""
        return [r.dispatch - r.start for r in self.done if r.tenant == tenant]

    @property
    def span(self) -> float:
        """Seconds from the start of the replay to the end of its last request."""
        return max((r.end for r in self.requests), default=self.t0) - self.t0

    @property
    def tokens_per_s(self) -> float:
        """Tokens generated over :attr:`span`."""
        return sum(r.tokens for r in self.requests) / self.span if self.span > 0 else math.nan


def _tenant_rows(run: _Run, tenants: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for t in tenants:
        ttft = run.ttft([t])
        queue = run.queue(t)
        rows.append(
            {
                "run": run.label,
                "tenant": t,
                "requests": sum(r.tenant == t for r in run.requests),
                "completed": len(ttft),
                "ttft_p50_ms": _pct(ttft, 50) * 1e3,
                "ttft_p99_ms": _pct(ttft, 99) * 1e3,
                "queue_p99_ms": _pct(queue, 99) * 1e3,
            }
        )
    return rows


def _describe(scheduler: object) -> str:
    """FairScheduler's settings that shape these runs (none for others), for the headers."""
    if not isinstance(scheduler, FairScheduler):
        return f"{type(scheduler).__name__}()"
    f, pace = scheduler.fairness, scheduler.places.pace
    settings = [
        f"affinity_slack={f.affinity_slack:g}",
        f"max_wait={f.max_wait:g}",
        f"headroom={scheduler.headroom:g}",
        "pace=measured" if pace is None else f"pace={pace:g}",
        f"credit={f.credit:g}",
        f"input_cost={f.input_cost:g}",
        f"output_cost={f.output_cost:g}",
    ]
    return f"FairScheduler({', '.join(settings)})"


def _plain_vtc() -> FairScheduler:
    """The ``noisy vtc`` side: FairScheduler without pacing, burst credit and preemption."""
    return FairScheduler(
        fairness=FairnessConfig(credit=0), places=PlacesConfig(pace=0, preemption=False)
    )


def _no_preemption() -> FairScheduler:
    """The ``noisy no-preempt`` side."""
    return FairScheduler(places=PlacesConfig(preemption=False))


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0f}"


# -- part 1: noisy neighbour --------------------------------------------------------------


def _by_tenant_state(run: _Run, tenants: Sequence[str]) -> dict[str, list[float]]:
    """TTFTs of the tenants' requests grouped by what their tenant had at the arrival."""
    groups: dict[str, list[float]] = {"idle": [], "in flight": [], "waiting": []}
    for r in run.done:
        if r.tenant not in tenants:
            continue
        mine = [o for o in run.requests if o.tenant == r.tenant and o is not r]
        if any(o.start < r.start < o.dispatch for o in mine):
            state = "waiting"
        elif any(o.dispatch <= r.start < o.end for o in mine):
            state = "in flight"
        else:
            state = "idle"
        groups[state].append(r.first - r.start)
    return groups


def _noisy_trace(args: argparse.Namespace, tenants: Sequence[str]) -> list[_Request]:
    trace = []
    for t in tenants:
        rate = args.noisy_rate if t == "noisy" else args.quiet_rate
        rng = random.Random(f"{args.seed}:{t}")
        at = rng.expovariate(rate)
        while at < args.duration:
            trace.append(_Request(at, t, f"{t}/lora", rng.choice(PROMPTS)))
            at += rng.expovariate(rate)
    trace.sort(key=lambda r: r.at)
    return trace


def _torch_adapters(cache: Path, model_dir: Path, count: int) -> list[Path]:
    """Rank-16 all-linear adapters, shared with the engine benchmark's cache."""
    from lorapool.testing import make_random_adapter
    from lorapool.testing.adapters import ALL_LINEAR

    root = cache / "bench-adapters" / "r16-all-linear"
    paths = [root / f"a{i}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").is_file()]
    if missing:
        import torch
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for p in missing:
            make_random_adapter(p, base, rank=16, target_modules=ALL_LINEAR, seed=int(p.name[1:]))
    return paths


def _windows(run: _Run, tenants: Sequence[str], width: float) -> list[dict[str, Any]]:
    """Per window: each tenant's share of the tokens served and the time it was backlogged.

    A tenant is backlogged while one of its requests has arrived and waits for dispatch.
    """
    spans: dict[str, list[tuple[float, float]]] = {}
    for t in tenants:
        merged: list[tuple[float, float]] = []
        for a, b in sorted(
            (r.start - run.t0, r.dispatch - run.t0)
            for r in run.requests
            if r.tenant == t and not math.isnan(r.dispatch)
        ):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        spans[t] = merged
    out = []
    for w in range(math.ceil(run.span / width)):
        lo, hi = w * width, (w + 1) * width
        served = dict.fromkeys(tenants, 0)
        for r in run.requests:
            for stamp, n in r.stamps:
                if lo <= stamp - run.t0 < hi:
                    served[r.tenant] += n
        total = sum(served.values())
        backlog = {
            t: sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in spans[t]) / width for t in tenants
        }
        out.append(
            {
                "run": run.label,
                "window": [lo, hi],
                "tokens": total,
                "share": {t: served[t] / total if total else math.nan for t in tenants},
                "backlogged": backlog,
            }
        )
    return out


def _more_seeds(args: argparse.Namespace) -> list[int]:
    """The further seeds, each once and never the first seed again."""
    seeds = [int(x) for x in str(args.more_seeds).split(",") if x.strip()]
    return [s for s in dict.fromkeys(seeds) if s != args.seed]


async def _noisy_runs(
    args: argparse.Namespace, tenants: Sequence[str], trace: Sequence[_Request]
) -> tuple[dict[str, _Run], dict[tuple[int, str], _Run], str]:
    """The six runs of ``trace`` on one pool, then the fair pair for each further seed."""
    from lorapool import AdapterPool

    recorder = _Recorder(FCFSScheduler())
    backend: Any
    with tempfile.TemporaryDirectory(prefix="lorapool-bench-") as tmp:
        if args.backend == "torch":
            from lorapool.backends.torch import (
                DEMO_MODEL_NAME,
                TorchBackend,
                default_cache_dir,
                ensure_demo_model,
            )

            cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
            model_dir = ensure_demo_model(cache)
            paths = _torch_adapters(cache, model_dir, len(tenants))
            backend = TorchBackend(
                model_dir,
                max_slots=len(tenants),
                max_rank=16,
                max_batch=args.max_batch,
                max_seq_len=64 + args.max_tokens,
            )
            engine = (
                f"TorchBackend on {DEMO_MODEL_NAME} (fp32, max_batch {args.max_batch}, "
                f"{len(tenants)} slots, one rank-16 all-linear adapter per tenant)"
            )
        else:
            paths = _tiny_adapters(Path(tmp), len(tenants))
            backend = MockBackend(
                max_slots=len(tenants), max_batch=args.max_batch, token_delay=args.mock_token_delay
            )
            engine = (
                f"MockBackend (token_delay {args.mock_token_delay * 1e3:g} ms, max_batch "
                f"{args.max_batch}, {len(tenants)} slots, one adapter per tenant)"
            )
        runs: dict[str, _Run] = {}
        fair = ""
        async with AdapterPool(backend, scheduler=recorder) as pool:
            for t, path in zip(tenants, paths, strict=True):
                await pool.register(f"{t}/lora", str(path), tenant=t)
            warm = [_Request(0.0, t, f"{t}/lora", PROMPTS[0]) for t in tenants]
            await _replay(pool, warm, args.max_tokens)  # load every adapter, warm the engine
            quiet = [r for r in trace if r.tenant != "noisy"]
            plan: list[tuple[str, Sequence[_Request], Callable[[], Scheduler]]] = [
                ("no-noise fcfs", quiet, FCFSScheduler),
                ("no-noise fair", quiet, FairScheduler),
                ("noisy fcfs", trace, FCFSScheduler),
                ("noisy vtc", trace, _plain_vtc),
                ("noisy fair", trace, FairScheduler),
                ("noisy no-preempt", trace, _no_preemption),
            ]
            for label, items, make in plan:
                scheduler = make()
                recorder.use(scheduler)
                reqs = _fresh(items)
                loads = pool.store.stats.device_loads
                print(f"  {label}: {len(reqs)} requests ...", file=sys.stderr, flush=True)
                t0 = await _replay(pool, reqs, args.max_tokens)
                picks = scheduler.affinity_picks if isinstance(scheduler, FairScheduler) else None
                runs[label] = _Run(label, reqs, t0, pool.store.stats.device_loads - loads, picks)
                if isinstance(scheduler, FairScheduler):
                    runs[label].preemptions = scheduler.preemptions
                if label == "noisy fair":
                    fair = _describe(scheduler)
            more: dict[tuple[int, str], _Run] = {}
            for seed in _more_seeds(args):
                seeded = _noisy_trace(argparse.Namespace(**{**vars(args), "seed": seed}), tenants)
                for label, items in (
                    ("no-noise fair", [r for r in seeded if r.tenant != "noisy"]),
                    ("noisy fair", seeded),
                ):
                    recorder.use(FairScheduler())
                    reqs = _fresh(items)
                    print(
                        f"  seed {seed} {label}: {len(reqs)} requests ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    t0 = await _replay(pool, reqs, args.max_tokens)
                    more[(seed, label)] = _Run(label, reqs, t0)
    return runs, more, f"{engine}\nfair = {fair} with equal weights, after binding"


def _noisy(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, _Run]:
    tenants = ["noisy", *(f"quiet-{i + 1}" for i in range(args.quiet_tenants))]
    quiet = tenants[1:]
    trace = _noisy_trace(args, tenants)
    runs, more, engine = asyncio.run(_noisy_runs(args, tenants, trace))
    print(
        f"\nnoisy neighbour: {engine}\n"
        f"{args.duration:g} s of Poisson arrivals (seed {args.seed}): noisy {args.noisy_rate:g} "
        f"req/s, {len(quiet)} quiet tenants {args.quiet_rate:g} req/s each; "
        f"{args.max_tokens} tokens per request, short prompts; every request runs to the end"
    )
    print(
        f"\n{'run':<18}{'tenant':<9}{'reqs':>6}{'done':>6}{'TTFT p50':>10}{'p99 ms':>8}"
        f"{'queue p99':>11}{'tok/s':>8}"
    )
    rows = []
    for run in runs.values():
        shown = quiet if run.label.startswith("no-noise") else tenants
        for row in _tenant_rows(run, shown):
            rows.append(row)
            print(
                f"{run.label:<18}{row['tenant']:<9}{row['requests']:>6}{row['completed']:>6}"
                f"{_ms(row['ttft_p50_ms']):>10}{_ms(row['ttft_p99_ms']):>8}"
                f"{_ms(row['queue_p99_ms']):>11}"
            )
        print(
            f"{run.label:<18}{'all':<9}{len(run.requests):>6}{len(run.done):>6}"
            f"{_ms(_pct(run.ttft(), 50) * 1e3):>10}{_ms(_pct(run.ttft(), 99) * 1e3):>8}"
            f"{'':>11}{run.tokens_per_s:>8.1f}"
        )
    print("queue = arrival to dispatch; tok/s = tokens generated / (last token - first arrival)")

    print(
        f"\nservice share per {args.window:g} s window, % of the tokens generated in it "
        "(* = the tenant had a request waiting for dispatch more than half the window)"
    )
    print(f"{'run':<12}{'window s':<10}{'tokens':>7}" + "".join(f"{t:>10}" for t in tenants))
    windows = []
    for label in ("noisy fcfs", "noisy fair"):
        for w in _windows(runs[label], tenants, args.window):
            windows.append(w)
            lo, hi = w["window"]
            cells = "".join(
                f"{100 * w['share'][t]:>9.1f}{'*' if w['backlogged'][t] > 0.5 else ' '}"
                if w["tokens"]
                else f"{'-':>10}"
                for t in tenants
            )
            print(f"{label:<12}{f'{lo:g}-{hi:g}':<10}{w['tokens']:>7}{cells}")

    summary: dict[str, Any] = {}
    print()
    for sched in ("fcfs", "fair"):
        base = _pct(runs[f"no-noise {sched}"].ttft(quiet), 99)
        noisy = _pct(runs[f"noisy {sched}"].ttft(quiet), 99)
        ratio = noisy / base
        summary[sched] = {"baseline_p99_ms": base * 1e3, "noisy_p99_ms": noisy * 1e3, "x": ratio}
        verdict = "met" if ratio <= 1.5 else "not met"
        print(
            f"quiet tenants' p99 TTFT under {sched}: {noisy * 1e3:.0f} ms with the noisy "
            f"neighbour vs {base * 1e3:.0f} ms without = {ratio:.2f}x"
            + (f"  (target <= 1.5x: {verdict})" if sched == "fair" else "")
        )
    print(
        "quiet requests by what their tenant had when they arrived (idle: nothing; "
        "in flight: a request running, none waiting; waiting: a request already queued):"
    )
    states: dict[str, Any] = {}
    for label in ("noisy fcfs", "noisy fair"):
        groups = _by_tenant_state(runs[label], quiet)
        states[label] = {}
        parts = []
        for state, ttft in groups.items():
            p50, p99 = _pct(ttft, 50) * 1e3, _pct(ttft, 99) * 1e3
            states[label][state] = {"requests": len(ttft), "p50_ms": p50, "p99_ms": p99}
            parts.append(f"{state} {len(ttft)} reqs p50 {_ms(p50)} / p99 {_ms(p99)} ms")
        print(f"  {label}: " + "; ".join(parts))
    vtc = _pct(runs["noisy vtc"].ttft(quiet), 99)
    vtc_x = vtc / _pct(runs["no-noise fair"].ttft(quiet), 99)
    summary["vtc"] = {"noisy_p99_ms": vtc * 1e3, "x": vtc_x}
    print(
        f"the same FairScheduler without pacing, burst credit and preemption (noisy vtc: pace=0, "
        "credit=0, preemption=False): "
        f"quiet p99 {vtc * 1e3:.0f} ms = {summary['vtc']['x']:.2f}x; "
        f"throughput fair / vtc: "
        f"{runs['noisy fair'].tokens_per_s / runs['noisy vtc'].tokens_per_s:.2f}"
    )
    pre = _pct(runs["noisy no-preempt"].ttft(quiet), 99)
    summary["no_preempt"] = {
        "noisy_p99_ms": pre * 1e3,
        "x": pre / _pct(runs["no-noise fair"].ttft(quiet), 99),
    }
    summary["preemptions"] = runs["noisy fair"].preemptions
    print(
        f"requests paused by preemption under fair: {runs['noisy fair'].preemptions}; "
        f"the same FairScheduler with preemption=False (noisy no-preempt): quiet p99 "
        f"{pre * 1e3:.0f} ms = {summary['no_preempt']['x']:.2f}x; throughput fair / no-preempt: "
        f"{runs['noisy fair'].tokens_per_s / runs['noisy no-preempt'].tokens_per_s:.2f}"
    )
    settled = {
        label: _pct(
            [r.first - r.start for r in runs[label].done if r.tenant in quiet and r.at >= 10.0],
            99,
        )
        for label in ("noisy fcfs", "noisy vtc", "noisy no-preempt", "noisy fair")
    }
    summary["after_10s_p99_ms"] = {k: v * 1e3 for k, v in settled.items()}
    print(
        "quiet p99 TTFT of requests arriving after the first 10 s (past the start-up, when "
        "the first requests fill every place before any finishes): "
        + ", ".join(f"{k} {_ms(v * 1e3)} ms" for k, v in settled.items())
    )
    summary["fair_pooled"] = _pooled(args, runs, more, quiet)
    fcfs_noisy = _pct(runs["noisy fcfs"].ttft(quiet), 99)
    fair_noisy = _pct(runs["noisy fair"].ttft(quiet), 99)
    print(
        f"quiet p99 TTFT, FCFS / Fair with the noisy neighbour: {fcfs_noisy / fair_noisy:.1f}x; "
        f"throughput fair / fcfs: "
        f"{runs['noisy fair'].tokens_per_s / runs['noisy fcfs'].tokens_per_s:.2f}"
    )
    results["noisy"] = {
        "engine": engine,
        "tenants": tenants,
        "rows": rows,
        "tokens_per_s": {k: r.tokens_per_s for k, r in runs.items()},
        "windows": windows,
        "quiet_p99": summary,
        "quiet_by_tenant_state": states,
        "requests": {
            k: [
                {
                    "tenant": r.tenant,
                    "arrival": r.start - run.t0,
                    "ttft": r.first - r.start,
                    "queue": r.dispatch - r.start,
                    "end": r.end - run.t0,
                }
                for r in run.done
            ]
            for k, run in runs.items()
        },
    }
    return runs


def _pooled(
    args: argparse.Namespace,
    runs: Mapping[str, _Run],
    more: Mapping[tuple[int, str], _Run],
    quiet: Sequence[str],
) -> dict[str, Any] | None:
    """The fair quiet p99 over every seed's requests together, and each seed's ratio.

    One seed's p99 of a few hundred quiet requests is their second or third slowest, and
    moves a lot from run to run; pooling seeds makes the ratio steadier.
    """
    seeds = _more_seeds(args)
    if not seeds:
        return None
    pairs = {args.seed: (runs["no-noise fair"], runs["noisy fair"])}
    pairs.update({s: (more[(s, "no-noise fair")], more[(s, "noisy fair")]) for s in seeds})
    base = [t for b, _ in pairs.values() for t in b.ttft(quiet)]
    noisy = [t for _, n in pairs.values() for t in n.ttft(quiet)]
    per_seed = {s: _pct(n.ttft(quiet), 99) / _pct(b.ttft(quiet), 99) for s, (b, n) in pairs.items()}
    base_p99, noisy_p99 = _pct(base, 99), _pct(noisy, 99)
    ratio, p95_ratio = noisy_p99 / base_p99, _pct(noisy, 95) / _pct(base, 95)
    print(
        f"pooled over seeds {', '.join(map(str, pairs))} ({len(base)} quiet requests a side): "
        f"quiet p99 TTFT under fair {noisy_p99 * 1e3:.0f} ms with the noisy neighbour vs "
        f"{base_p99 * 1e3:.0f} ms without = {ratio:.2f}x  (target <= 1.5x: "
        f"{'met' if ratio <= 1.5 else 'not met'}); p95 {p95_ratio:.2f}x; each seed alone: "
        + ", ".join(f"{s} {x:.2f}x" for s, x in per_seed.items())
    )
    return {
        "seeds": list(pairs),
        "quiet_requests": len(base),
        "baseline_p99_ms": base_p99 * 1e3,
        "noisy_p99_ms": noisy_p99 * 1e3,
        "x": ratio,
        "p95_x": p95_ratio,
        "per_seed_x": per_seed,
    }


def _plot(path: Path, runs: Mapping[str, _Run], tenants: Sequence[str], engine: str) -> None:
    fig = _figure(runs, tenants, engine)  # selects the Agg backend before pyplot is used
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _figure(runs: Mapping[str, _Run], tenants: Sequence[str], engine: str) -> Figure:
    """TTFT per request under each scheduler. TTFT spans milliseconds to seconds, so its axis
    is logarithmic (and says so); arrival time starts at zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quiet = [t for t in tenants if t != "noisy"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = {"noisy": "0.65", **dict(zip(quiet, ("C0", "C1", "C2", "C3", "C4"), strict=False))}
    for ax, sched in zip(axes, ("fcfs", "fair"), strict=True):
        run = runs[f"noisy {sched}"]
        for t in tenants:
            done = [r for r in run.done if r.tenant == t]
            ax.scatter(
                [r.start - run.t0 for r in done],
                [r.first - r.start for r in done],
                s=6 if t == "noisy" else 14,
                color=colours.get(t, "C5"),
                label=t,
                alpha=0.6 if t == "noisy" else 0.9,
                zorder=1 if t == "noisy" else 2,
            )
        base = _pct(runs[f"no-noise {sched}"].ttft(quiet), 99)
        ax.axhline(base, color="k", linestyle="--", linewidth=1, label="quiet p99, no noise")
        ax.axhline(1.5 * base, color="k", linestyle=":", linewidth=1, label="1.5x that")
        ax.set_yscale("log")
        ax.set_title(f"{'FCFSScheduler' if sched == 'fcfs' else 'FairScheduler'}")
        ax.set_xlabel("arrival time (s)")
        ax.set_xlim(left=0)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time to first token (s, log scale)")
    axes[1].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Noisy neighbour, TTFT per request: {engine.splitlines()[0]}", fontsize=9)
    fig.tight_layout()
    return fig


# -- part 2: S-LoRA-style trace -----------------------------------------------------------


def _slora_trace(args: argparse.Namespace) -> list[_Request]:
    rng = random.Random(f"{args.seed}:slora")
    shape = 1.0 / args.slora_cv**2
    scale = 1.0 / (args.slora_rate * shape)
    cum: list[float] = []
    total = 0.0
    for i in range(args.slora_adapters):
        total += 1.0 / (i + 1) ** args.slora_alpha
        cum.append(total)
    trace = []
    at = rng.gammavariate(shape, scale)
    while at < args.slora_duration:
        a = rng.choices(range(args.slora_adapters), cum_weights=cum)[0]
        tenant = f"t{a % args.slora_tenants}"
        trace.append(_Request(at, tenant, f"{tenant}/a{a}", rng.choice(PROMPTS)))
        at += rng.gammavariate(shape, scale)
    return trace


async def _slora_run(
    args: argparse.Namespace, label: str, scheduler: Scheduler, trace: Sequence[_Request]
) -> _Run:
    from lorapool import AdapterPool

    backend = _SlowLoadBackend(
        max_slots=args.slora_slots,
        max_batch=args.slora_batch,
        token_delay=args.slora_token_delay,
        load_delay=args.slora_load_delay,
    )
    recorder = _Recorder(scheduler)
    with tempfile.TemporaryDirectory(prefix="lorapool-bench-") as tmp:
        paths = _tiny_adapters(Path(tmp), args.slora_adapters)
        async with AdapterPool(backend, scheduler=recorder) as pool:
            for a, path in enumerate(paths):
                tenant = f"t{a % args.slora_tenants}"
                await pool.register(f"{tenant}/a{a}", str(path), tenant=tenant)
            reqs = _fresh(trace)
            print(f"  slora {label}: {len(reqs)} requests ...", file=sys.stderr, flush=True)
            t0 = await _replay(pool, reqs, args.max_tokens)
            picks = scheduler.affinity_picks if isinstance(scheduler, FairScheduler) else None
            loads = pool.store.stats.device_loads
            return _Run(label, reqs, t0, loads, picks, _describe(scheduler))


def _slora(args: argparse.Namespace, results: dict[str, Any]) -> None:
    trace = _slora_trace(args)
    configs: list[tuple[str, Callable[[], Scheduler]]] = [
        ("fcfs", FCFSScheduler),
        ("fair", FairScheduler),
        ("fair slack=0", lambda: FairScheduler(fairness=FairnessConfig(affinity_slack=0))),
    ]
    runs = [asyncio.run(_slora_run(args, label, make(), trace)) for label, make in configs]
    tenants = [f"t{i}" for i in range(args.slora_tenants)]
    capacity = args.slora_batch / (args.max_tokens * args.slora_token_delay)
    print(
        f"\nS-LoRA-style trace on MockBackend (token_delay {args.slora_token_delay * 1e3:g} ms, "
        f"device load {args.slora_load_delay * 1e3:g} ms, max_batch {args.slora_batch}, "
        f"{args.slora_slots} slots; no model: it measures scheduling, not an engine)\n"
        f"{len(trace)} requests in {args.slora_duration:g} s: Gamma inter-arrivals "
        f"(mean {args.slora_rate:g} req/s, cv {args.slora_cv:g}), Zipf a={args.slora_alpha:g} "
        f"over {args.slora_adapters} adapters, adapter i owned by tenant t(i mod "
        f"{args.slora_tenants}); {args.max_tokens} tokens each; the engine's ceiling with no "
        f"slot limit is {capacity:.0f} req/s"
    )
    print(
        f"\n{'scheduler':<14}{'done':>6}{'tok/s':>8}{'loads':>7}{'loads/1k':>10}"
        f"{'affinity':>10}{'TTFT p50':>10}{'p99 ms':>8}"
    )
    summary = []
    for run in runs:
        per_k = 1000 * run.device_loads / len(run.requests)
        ttft = run.ttft()
        picks = "-" if run.affinity_picks is None else str(run.affinity_picks)
        print(
            f"{run.label:<14}{len(run.done):>6}{run.tokens_per_s:>8.0f}{run.device_loads:>7}"
            f"{per_k:>10.1f}{picks:>10}{_ms(_pct(ttft, 50) * 1e3):>10}"
            f"{_ms(_pct(ttft, 99) * 1e3):>8}"
        )
        summary.append(
            {
                "scheduler": run.label,
                "completed": len(run.done),
                "tokens_per_s": run.tokens_per_s,
                "device_loads": run.device_loads,
                "loads_per_1k": per_k,
                "affinity_picks": run.affinity_picks,
                "ttft_p50_ms": _pct(ttft, 50) * 1e3,
                "ttft_p99_ms": _pct(ttft, 99) * 1e3,
            }
        )
    for run in runs:
        if isinstance(run.affinity_picks, int):
            print(f"{run.label}: {run.scheduler}")
    print("\nper tenant TTFT p50 / p99 ms (share = the tenant's share of the requests)")
    print(f"{'tenant':<8}{'share':>7}" + "".join(f"{r.label:>20}" for r in runs))
    per_tenant = []
    for t in tenants:
        n = sum(r.tenant == t for r in trace)
        cells = ""
        for run in runs:
            ttft = run.ttft([t])
            p50, p99 = _pct(ttft, 50) * 1e3, _pct(ttft, 99) * 1e3
            cells += f"{_ms(p50) + ' / ' + _ms(p99):>20}"
            per_tenant.append({"scheduler": run.label, "tenant": t, "p50_ms": p50, "p99_ms": p99})
        print(f"{t:<8}{100 * n / len(trace):>6.1f}%{cells}")
    base = runs[0].device_loads
    print(
        f"device loads vs fcfs: fair {runs[1].device_loads / base:.2f}x, "
        f"fair slack=0 {runs[2].device_loads / base:.2f}x; "
        f"fair vs fair slack=0: {runs[1].device_loads / runs[2].device_loads:.2f}x"
    )
    results["slora"] = {"requests": len(trace), "rows": summary, "tenants": per_tenant}


# -- part 3: scheduling overhead at scale -------------------------------------------------


def _step(coro: Coroutine[Any, Any, None]) -> asyncio.Future[None] | None:
    """Run ``acquire`` up to its first wait; the future it waits on, or None if it returned."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    if not isinstance(waiting, asyncio.Future):
        raise RuntimeError(f"acquire waited on {waiting!r}, not on an asyncio future")
    return waiting


async def _overhead_one(
    make: Callable[[], Scheduler], tenants: int, requests: int, seed: int, all_resident: bool
) -> dict[str, float]:
    """Drive a scheduler like a pool with a standing backlog; time acquire and release."""
    inflight_limit, slots, out_tokens, prompt = 32, 32, 16, 10
    scheduler = make()
    resident: OrderedDict[str, None] = OrderedDict()  # the last `slots` adapters dispatched

    def can_dispatch(adapter: str | None, inflight: Mapping[str, int]) -> bool:
        return adapter is None or adapter in inflight or len(inflight) < slots

    def on_device(adapter: str) -> bool:
        return all_resident or adapter in resident

    scheduler.bind(max_inflight=inflight_limit, can_dispatch=can_dispatch, on_device=on_device)
    rng = random.Random(f"{seed}:overhead:{tenants}")
    running: deque[Ticket] = deque()
    loop_done = 0

    def started(ticket: Ticket) -> None:
        running.append(ticket)
        if ticket.adapter_id is not None:
            resident[ticket.adapter_id] = None
            resident.move_to_end(ticket.adapter_id)
            if len(resident) > slots:
                resident.popitem(last=False)

    def finish(ticket: Ticket, coro: Coroutine[Any, Any, None], _: object) -> None:
        nonlocal loop_done
        started(ticket)
        try:
            coro.send(None)
        except StopIteration:
            loop_done += 1

    seq = 0

    def submit() -> float:
        nonlocal seq
        t = rng.randrange(tenants)
        seq += 1
        ticket = Ticket(f"r{seq}", f"t{t}", f"t{t}/a", prompt_tokens=prompt, max_tokens=out_tokens)
        coro = scheduler.acquire(ticket)
        began = time.perf_counter()
        waiting = _step(coro)
        took = time.perf_counter() - began
        if waiting is None:
            started(ticket)
        else:
            waiting.add_done_callback(partial(finish, ticket, coro))
        return took

    backlog = tenants  # one queued request per tenant on average
    for _ in range(inflight_limit + backlog):
        submit()
    await asyncio.sleep(0)
    acquire: list[float] = []
    release: list[float] = []
    charge: list[float] = []
    gc.collect()
    for _ in range(requests):
        ticket = running.popleft()
        began = time.perf_counter()
        scheduler.charge(ticket, input_tokens=0)
        for _ in range(out_tokens):
            scheduler.charge(ticket, output_tokens=1)
        charged = time.perf_counter()
        scheduler.release(ticket)
        released = time.perf_counter()
        charge.append(charged - began)
        release.append(released - charged)
        acquire.append(submit())
        await asyncio.sleep(0)  # the dispatched request's wait ends (untimed)
    per_request = [a + r for a, r in zip(acquire, release, strict=True)]
    with_charges = [p + c for p, c in zip(per_request, charge, strict=True)]
    return {
        "acquire_mean_us": 1e6 * sum(acquire) / requests,
        "release_mean_us": 1e6 * sum(release) / requests,
        "mean_us": 1e6 * sum(per_request) / requests,
        "p99_us": 1e6 * _pct(per_request, 99),
        "charges_mean_us": 1e6 * sum(charge) / requests,
        "with_charges_mean_us": 1e6 * sum(with_charges) / requests,
        "with_charges_p99_us": 1e6 * _pct(with_charges, 99),
        "queued": float(scheduler.queued if hasattr(scheduler, "queued") else math.nan),
    }


def _overhead(args: argparse.Namespace, results: dict[str, Any]) -> None:
    counts = [int(c) for c in args.overhead_tenants.split(",") if c]
    print(
        f"\nscheduling overhead: the scheduler driven directly, {args.overhead_requests} timed "
        "requests per row from uniformly random tenants, each tenant with its own adapter; "
        "32 in flight, 32 device slots (the 32 adapters dispatched last count as on the "
        "device), a standing backlog of one queued request per tenant; 16 one-token charges "
        "per request; Fair is given max_queue = 4 x tenants so the backlog fits"
    )
    print(
        f"\n{'tenants':>8}  {'scheduler':<14}{'acquire':>9}{'release':>9}{'mean us':>9}"
        f"{'p99 us':>8}{'+charges':>10}{'p99':>7}"
    )
    rows: list[dict[str, Any]] = []
    for n in counts:
        fair = partial(FairScheduler, admission=AdmissionConfig(max_queue=4 * n + 64))
        slack0 = partial(fair, fairness=FairnessConfig(affinity_slack=0))
        configs: list[tuple[str, Callable[[], Scheduler], bool]] = [
            ("fcfs", FCFSScheduler, False),
            ("fair", fair, False),
            ("fair slack=0", slack0, False),
            ("fair resident", fair, True),
        ]
        for label, make, all_resident in configs:
            r = asyncio.run(_overhead_one(make, n, args.overhead_requests, args.seed, all_resident))
            rows.append({"tenants": n, "scheduler": label, **r})
            print(
                f"{n:>8}  {label:<14}{r['acquire_mean_us']:>9.1f}{r['release_mean_us']:>9.1f}"
                f"{r['mean_us']:>9.1f}{r['p99_us']:>8.1f}{r['with_charges_mean_us']:>10.1f}"
                f"{r['with_charges_p99_us']:>7.1f}"
            )
    print(
        "acquire = admission + enqueue + dispatch attempt; release = free the place and dispatch "
        "the next request; mean/p99 = acquire + release per request; +charges adds the 17 "
        "charge() calls a 16-token request makes"
    )
    fair_rows = [r for r in rows if r["scheduler"] == "fair"]
    if fair_rows:
        top = max(fair_rows, key=lambda r: r["tenants"])
        verdict = "met" if top["mean_us"] <= 50 else "not met"
        print(
            f"FairScheduler at {top['tenants']} tenants: {top['mean_us']:.1f} us mean, "
            f"{top['p99_us']:.1f} us p99 per request -> target <= 50 us: {verdict}"
        )
    results["overhead"] = rows


# -- entry point --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the parts asked for, print their tables, write the plot and JSON if asked."""
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown parts {unknown}; choose from {list(PARTS)}", file=sys.stderr)
        return 2
    plot: Path | None = None
    if "noisy" in parts and not args.no_plot:
        if args.plot:
            plot = Path(args.plot)
        elif Path("docs", "performance.md").is_file():
            plot = DEFAULT_PLOT
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "--plot needs matplotlib: pip install 'lorapool[bench]' (or pass --no-plot)",
                file=sys.stderr,
            )
            return 2
    started = time.perf_counter()
    print(f"fairness benchmark: parts {', '.join(parts)}, seed {args.seed}", file=sys.stderr)
    results: dict[str, Any] = {}
    if "noisy" in parts:
        runs = _noisy(args, results)
        if plot is not None:
            _plot(plot, runs, results["noisy"]["tenants"], results["noisy"]["engine"])
            print(f"\nTTFT plot written to {plot}")
    if "slora" in parts:
        _slora(args, results)
    if "overhead" in parts:
        _overhead(args, results)
    elapsed = time.perf_counter() - started
    print(f"\ntotal run time {elapsed:.0f} s")
    if args.json:
        meta = {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "args": vars(args),
            "seconds": elapsed,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, **results}, indent=2, default=str))
    return 0
