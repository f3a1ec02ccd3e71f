"""Serve a workload through lorapool on one or more targets, side by side: latency, SLO, loads.

Open-loop replay: every request starts at its arrival time whatever the
engine's state, as in production. Workloads (``--workload``): ``slora``
(Gamma arrivals with ``--rate``/``--cv``, power-law popularity ``--alpha``),
``punica:distinct|uniform|skewed|identical``, or ``trace:FILE.csv`` (Azure
layout ``TIMESTAMP,ContextTokens,GeneratedTokens``, optional ``adapter`` and
``tenant`` columns). Targets (``--target``, repeatable): a backend's name in the
``lorapool.backends`` entry points, built on ``--model`` (``torch``, the embedded
engine; ``vllm``, in-process vLLM, from the vLLM venv; ``sglang``, in-process
SGLang, GPU; or an installed package's backend), or ``url:BASE_URL`` (a running
vLLM/SGLang OpenAI server, reached through the ``openai`` backend). TGI is not a
target: its adapters are fixed when it starts, so the benchmark cannot register its own.
Raw engines without lorapool are compared by the ``engine`` (PEFT) and
``vllm`` (raw vLLM) scenarios.

Reports per target and adapter count: throughput, TTFT and inter-token
latency p50/p90/p99, SLO attainment for ``--slo-ttft``, per-tenant service,
device loads and hit ratios per tier; a table, ``--json``, and PNGs in
``--plots`` (latency CDFs, throughput vs adapters, per-tenant TTFT over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorapool.abc import Backend
from lorapool.backends.base import build_backend
from lorapool.bench.fairness import _pct as percentile
from lorapool.bench.meta import run_meta
from lorapool.bench.workload import PATTERNS, Lengths, Request, read_trace, slora_workload
from lorapool.plugins import BACKENDS, available

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's options."""
    parser.add_argument(
        "--target",
        action="append",
        default=None,
        help="a backend's name (torch, vllm, sglang, an installed plugin's) or url:URL; "
        "repeatable (torch)",
    )
    parser.add_argument(
        "--workload", default="slora", help="slora | punica:PATTERN | trace:FILE (slora)"
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (30)")
    parser.add_argument("--rate", type=float, default=2.0, help="mean requests/s (2)")
    parser.add_argument("--cv", type=float, default=1.0, help="inter-arrival cv (1: Poisson)")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent (1.0)")
    parser.add_argument("--adapters", default="4,16", help="adapter counts to sweep (4,16)")
    parser.add_argument("--tenants", type=int, default=4, help="tenants (4)")
    parser.add_argument("--input", default="lognormal:48,0.5", help="prompt token lengths")
    parser.add_argument("--output", default="uniform:8,24", help="output token lengths")
    parser.add_argument("--speedup", type=float, default=1.0, help="trace time divided by this")
    parser.add_argument("--limit", type=int, default=None, help="first N trace rows")
    parser.add_argument("--slots", type=int, default=4, help="device slots (4)")
    parser.add_argument("--max-batch", type=int, default=16, help="engine batch rows (16)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (16)")
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT bound, s (1.0)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (0)")
    parser.add_argument("--cache-dir", default=None, help="model and adapter cache")
    parser.add_argument(
        "--model", default=None, help="base model directory (default: the demo SmolLM2)"
    )
    parser.add_argument(
        "--adapter-dir",
        default=None,
        help="use your PEFT adapters: every subdirectory holding adapter_config.json",
    )
    parser.add_argument(
        "--adapter-uri",
        default="{path}",
        help="the URI each adapter is registered from, with {path} (its directory) and "
        "{name} (the directory's name): e.g. s3://bucket/adapters/{name} to load them "
        "through a source; any scheme an installed source serves ({path})",
    )
    parser.add_argument("--plots", default=None, help="write PNG plots into this directory")
    parser.add_argument("--json", default=None, help="write the results as JSON here")


@dataclass
class _Done:
    request: Request
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    finished: float = 0.0
    error: str | None = None


def _pct(values: Sequence[float], q: float) -> float | None:
    """The shared percentile, ``None`` (valid JSON) instead of nan for no values."""
    return percentile(values, q) if values else None


def _workload(args: argparse.Namespace, adapters: Sequence[str]) -> list[Request]:
    kind, _, rest = args.workload.partition(":")
    if kind == "trace":
        return read_trace(rest, adapters=adapters, limit=args.limit, speedup=args.speedup)
    pattern = None
    if kind == "punica":
        if rest not in PATTERNS:
            raise SystemExit(f"--workload punica:PATTERN with PATTERN in {PATTERNS}")
        pattern = rest
    elif kind != "slora":
        raise SystemExit(f"unknown --workload {args.workload!r}")
    return slora_workload(
        seed=args.seed,
        duration=args.duration,
        rate=args.rate,
        cv=args.cv,
        adapters=adapters,
        alpha=args.alpha,
        pattern=pattern,
        tenants=args.tenants,
        input_lengths=Lengths.parse(args.input),
        output_lengths=Lengths.parse(args.output),
    )


def _backend(target: str, args: argparse.Namespace, model_dir: Path) -> Backend:
    """The target's backend: ``url:URL`` is the ``openai`` backend on URL, a name is built
    on ``--model`` with the slots, rank and batch of the flags."""
    name, model = ("openai", target[4:]) if target.startswith("url:") else (target, str(model_dir))
    return build_backend(
        name, model, max_slots=args.slots, max_rank=args.rank, max_batch=args.max_batch
    )


def _check_targets(targets: Sequence[str]) -> None:
    """Refuse a target no installed package declares, before any adapter is made."""
    names = available(BACKENDS)
    unknown = [t for t in targets if not t.startswith("url:") and t not in names]
    if unknown:
        raise SystemExit(f"unknown --target {unknown}; use one of {names} or url:BASE_URL")


async def _replay(pool: Any, requests: Sequence[Request], bar: Any) -> tuple[list[_Done], float]:
    from lorapool import SamplingParams

    done = [_Done(r) for r in requests]
    start = time.perf_counter()

    async def one(d: _Done) -> None:
        r = d.request
        await asyncio.sleep(max(0.0, start + r.at - time.perf_counter()))
        sent = time.perf_counter()
        params = SamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True)
        last = sent
        try:
            async for chunk in pool.generate(
                "hi" + " go" * (r.input_tokens - 1),
                adapter=r.adapter,
                tenant=r.tenant,
                params=params,
            ):
                now = time.perf_counter()
                if d.ttft is None:
                    d.ttft = now - sent
                else:
                    d.gaps.append(now - last)
                last = now
                d.tokens += len(chunk.token_ids)
                if chunk.usage is not None:  # the engine's own count wins
                    d.tokens = chunk.usage.completion_tokens
        except Exception as exc:  # a refusal or failure is a result, not a crash
            d.error = type(exc).__name__
        d.finished = time.perf_counter() - start
        bar.update(1)

    await asyncio.gather(*(one(d) for d in done))
    return done, time.perf_counter() - start


def _summary(done: Sequence[_Done], span: float, slo: float, stats: Any) -> dict[str, Any]:
    ok = [d for d in done if d.error is None and d.ttft is not None]
    ttft = [d.ttft for d in ok if d.ttft is not None]
    gaps = [g for d in ok for g in d.gaps]
    tenants: dict[str, list[_Done]] = defaultdict(list)
    for d in ok:
        tenants[d.request.tenant].append(d)
    hit_ratio = {}
    for tier in sorted(set(stats.hits) | set(stats.misses)):
        seen = stats.hits.get(tier, 0) + stats.misses.get(tier, 0)
        hit_ratio[tier] = stats.hits.get(tier, 0) / seen if seen else None
    return {
        "requests": len(done),
        "completed": len(ok),
        "errors": dict(sorted(Counter(d.error for d in done if d.error).items())),
        "seconds": span,
        "requests_per_s": len(ok) / span if span else 0.0,
        "output_tokens_per_s": sum(d.tokens for d in ok) / span if span else 0.0,
        "ttft_s": {f"p{q}": _pct(ttft, q) for q in (50, 90, 99)},
        "itl_s": {f"p{q}": _pct(gaps, q) for q in (50, 90, 99)},
        "slo_ttft_s": slo,
        "slo_attainment": sum(1 for t in ttft if t <= slo) / len(done) if done else None,
        "device_loads": stats.device_loads,
        "hit_ratio": hit_ratio,
        "tenants": {
            t: {
                "requests": len(ds),
                "output_tokens": sum(d.tokens for d in ds),
                "ttft_p50_s": _pct([d.ttft for d in ds if d.ttft is not None], 50),
                "ttft_p99_s": _pct([d.ttft for d in ds if d.ttft is not None], 99),
            }
            for t, ds in sorted(tenants.items())
        },
        "timeline": [
            [round(d.request.at, 4), d.request.tenant, round(d.ttft, 5)] for d in ok if d.ttft
        ],
    }


async def _one_run(
    target: str, args: argparse.Namespace, model_dir: Path, paths: Sequence[Path], n: int
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from lorapool import AdapterPool

    names = [f"bench/a{i}" for i in range(n)]
    requests = _workload(args, names)
    async with AdapterPool(_backend(target, args, model_dir)) as pool:
        for i, name in enumerate(names):
            uri = args.adapter_uri.format(path=paths[i], name=paths[i].name)
            await pool.register(name, uri, tenant=f"t{i % args.tenants}", shared=True)
        with tqdm(total=len(requests), desc=f"{target} {n} adapters", unit="req") as bar:
            done, span = await _replay(pool, requests, bar)
        return {
            "target": target,
            "adapters": n,
            **_summary(done, span, args.slo_ttft, pool.store.stats),
        }


def _fmt(x: float | None, scale: float = 1000.0) -> str:
    return "-" if x is None else f"{x * scale:7.0f}"


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'target':>10} {'adapters':>8} {'req/s':>6} {'tok/s':>7} {'TTFT p50':>8} "
        f"{'p90':>7} {'p99':>7} {'ITL p50':>7} {'p99':>7} {'SLO':>5} {'loads':>6} {'errors':>6}"
    )
    lines = [head + "   (latencies in ms)", "-" * len(head)]
    for r in rows:
        slo = "-" if r["slo_attainment"] is None else f"{r['slo_attainment']:5.0%}"
        lines.append(
            f"{r['target'][:10]:>10} {r['adapters']:>8} {r['requests_per_s']:6.2f} "
            f"{r['output_tokens_per_s']:7.1f} {_fmt(r['ttft_s']['p50']):>8} "
            f"{_fmt(r['ttft_s']['p90'])} {_fmt(r['ttft_s']['p99'])} "
            f"{_fmt(r['itl_s']['p50'])} {_fmt(r['itl_s']['p99'])} {slo:>5} "
            f"{r['device_loads']:>6} {sum(r['errors'].values()):>6}"
        )
    return "\n".join(lines)


def _figures(rows: Sequence[dict[str, Any]]) -> list[tuple[str, Figure]]:
    """The plots of a run's rows, by file name: every value axis starts at zero and names
    its unit (a log axis says so in its label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: list[tuple[str, Figure]] = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ttft = sorted(t for _, _, t in r["timeline"])
        if ttft:
            ax.step(
                [0.0, *ttft],
                [0.0] + [(i + 1) / len(ttft) for i in range(len(ttft))],
                where="post",
                label=f"{r['target']}, {r['adapters']} adapters",
            )
    ax.set(xlabel="TTFT (s)", ylabel="fraction of requests (0-1)", title="TTFT CDF")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    figures.append(("serve-ttft-cdf.png", fig))

    fig, ax = plt.subplots(figsize=(7, 4))
    for target in sorted({r["target"] for r in rows}):
        mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["adapters"])
        ax.plot(
            [r["adapters"] for r in mine],
            [r["output_tokens_per_s"] for r in mine],
            marker="o",
            label=target,
        )
    ax.set(
        xlabel="distinct adapters (log2 scale)",
        ylabel="output throughput (tokens/s)",
        title="Throughput vs adapters",
    )
    ax.set_xscale("log", base=2)
    counts = sorted({r["adapters"] for r in rows})
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.minorticks_off()
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.1)
    ax.legend(fontsize=8, loc="lower right")
    figures.append(("serve-throughput.png", fig))

    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 2.2 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        by_tenant: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for at, tenant, ttft in r["timeline"]:
            by_tenant[tenant].append((at, ttft))
        for tenant, points in sorted(by_tenant.items()):
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=6, label=tenant)
        ax.set(ylabel="TTFT (s)", title=f"{r['target']}, {r['adapters']} adapters")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=6, ncol=4)
    axes[-1, 0].set_xlabel("arrival (s)")
    figures.append(("serve-tenant-ttft.png", fig))
    for _, fig in figures:
        fig.tight_layout()
    return figures


def _plots(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Write the plots of a run's rows to ``out``."""
    figures = _figures(rows)  # selects the Agg backend before pyplot is used
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, fig in figures:
        written.append(out / name)
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def replot(json_path: str | Path, out: str | Path) -> list[Path]:
    """Draw the plots again from a run's JSON (``--json``) without running anything:
    ``python -c "from lorapool.bench.serve import replot; replot('docs/bench-serve.json',
    'docs')"``."""
    results = json.loads(Path(json_path).read_text())
    return _plots(results["runs"], Path(out))


def run(args: argparse.Namespace) -> int:
    """Run every target x adapter count, print the table, write JSON and plots."""
    from lorapool.bench.engine import _make_adapters
    from lorapool.cache import default_cache_dir

    targets = args.target or ["torch"]
    _check_targets(targets)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if args.model:
        model_dir = Path(args.model).expanduser()
    else:
        from lorapool.backends.torch import ensure_demo_model

        model_dir = ensure_demo_model(cache)
    counts = [int(c) for c in str(args.adapters).split(",")]
    if args.adapter_dir:
        root = Path(args.adapter_dir).expanduser()
        paths = sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file())
        if len(paths) < max(counts):
            raise SystemExit(f"--adapters asks for {max(counts)} but {root} holds {len(paths)}")
    else:
        paths = _make_adapters(cache, model_dir, max(counts), args.rank)
    rows: list[dict[str, Any]] = []
    for target in targets:
        for n in counts:
            rows.append(asyncio.run(_one_run(target, args, model_dir, paths, n)))
    print(_table(rows))
    results: dict[str, Any] = {"meta": run_meta(args), "runs": rows}
    if args.plots:
        results["plots"] = [str(p) for p in _plots(rows, Path(args.plots))]
        print("plots: " + ", ".join(results["plots"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0
