"""How many CPU threads the embedded engine runs: as many as this process may actually use.

PyTorch sizes its intra-op pool from the CPUs the process may run on (GNU OpenMP reads
the affinity mask when it loads) but not from a cgroup CPU quota: in a container limited
to 2 CPUs on a 64-core host it runs 64 threads. Every parallel region (PyTorch's and the
LoRA kernel's) then waits at its barrier for threads the quota has throttled, and the
step takes several times longer instead of proportionally longer.

:func:`usable_cpus` is the choice, from inputs given as arguments (unit-tested);
:func:`process_usable_cpus` feeds it this process's affinity mask and cgroup files.
The quota is rounded down (at least 1): the fraction left over is for the application's
own threads in the same cgroup (event loop, tokenizers), and an engine thread that ran on
it would be throttled, holding every barrier for the rest of the quota period.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "CGROUP_ROOT",
    "SPIN_COUNT",
    "ThreadGovernor",
    "cgroup_cpu_limit",
    "cpu_limit_v1",
    "cpu_limit_v2",
    "choose_openmp_wait",
    "cpus_busy",
    "environ_without_openmp_choice",
    "process_usable_cpus",
    "usable_cpus",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where cgroup file systems are mounted (v2 at the root; v1 one directory per controller)."""

_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def cpu_limit_v2(cpu_max_text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (``"200000 100000"`` -> 2.0); ``None`` for
    no limit (``"max 100000"``) and for text that is not a quota."""
    parts = cpu_max_text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_limit_v1(cfs_quota_text: str, cfs_period_text: str) -> float | None:
    """CPUs allowed by cgroup v1's ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``; ``None``
    for no limit (quota ``-1``) and for text that is not a number."""
    try:
        quota, period = int(cfs_quota_text.strip()), int(cfs_period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _threads(cpus_allowed: int, limit: float | None) -> int:
    cpus = max(1, cpus_allowed)
    if limit is None:
        return cpus
    return max(1, min(cpus, math.floor(limit + 1e-9)))


def usable_cpus(
    affinity: Iterable[int] | int,
    cpu_max_text: str | None = None,
    *,
    cfs_quota_text: str | None = None,
    cfs_period_text: str | None = None,
) -> int:
    """The threads worth running: the CPUs in ``affinity`` (a set of CPU ids, or a count),
    capped by a cgroup CPU quota rounded down, at least 1.

    ``cpu_max_text`` is cgroup v2's ``cpu.max``; ``cfs_quota_text`` and ``cfs_period_text``
    are cgroup v1's files. ``None`` (not there, unreadable) or no limit in them: the
    affinity count alone. Both given: the smaller limit.
    """
    cpus = affinity if isinstance(affinity, int) else len(set(affinity))
    limits = []
    if cpu_max_text is not None:
        limits.append(cpu_limit_v2(cpu_max_text))
    if cfs_quota_text is not None and cfs_period_text is not None:
        limits.append(cpu_limit_v1(cfs_quota_text, cfs_period_text))
    found = [lim for lim in limits if lim is not None]
    return _threads(cpus, min(found) if found else None)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(root: Path, cgroup_path: str) -> list[Path]:
    """``root/<cgroup_path>`` and each directory above it, up to ``root`` itself."""
    parts = [p for p in cgroup_path.strip().split("/") if p and p != ".."]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup_text: str | None = None) -> float | None:
    """This process's cgroup CPU quota in CPUs, the smallest along its cgroup's path (v2's
    ``cpu.max``, v1's ``cpu.cfs_quota_us``); ``None`` when there is none or nothing is
    readable. ``self_cgroup_text`` is ``/proc/self/cgroup`` (read when ``None``)."""
    if self_cgroup_text is None:
        self_cgroup_text = _read(Path("/proc/self/cgroup")) or ""
    limits: list[float] = []
    for line in self_cgroup_text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2 (unified)
            for d in _ancestors(root, path):
                text = _read(d / "cpu.max")
                limit = cpu_limit_v2(text) if text is not None else None
                if limit is not None:
                    limits.append(limit)
        elif "cpu" in controllers.split(","):  # v1
            for mount in _V1_CPU_DIRS:
                for d in _ancestors(root / mount, path):
                    quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                    limit = cpu_limit_v1(quota, period) if quota and period else None
                    if limit is not None:
                        limits.append(limit)
    return min(limits) if limits else None


SPIN_COUNT = 10000
"""Iterations an idle OpenMP thread spins before it sleeps, by lorapool's choice (about
0.1 ms; libgomp's own default is 300,000, about 3 ms). Measured side by side on 2 cores
(docs/performance.md, issue 33): as fast as libgomp's default on a quiet machine, and it
keeps 0.4x of its quiet throughput when another process takes one of the cores, where
libgomp's default keeps 0.06x."""

OPENMP_WAIT_UNSET = (
    "libgomp's default, spinning (torch was imported before lorapool.backends.torch)"
)
"""What :func:`choose_openmp_wait` reports when it came too late to choose."""


_SET_HERE: dict[str, str] = {}  # the variables choose_openmp_wait set, as it set them


def environ_without_openmp_choice() -> dict[str, str]:
    """This process's environment less the OpenMP variables :func:`choose_openmp_wait` set
    (those the environment already had stay): for child processes running another engine
    (vLLM, llama.cpp), which should run with their own defaults or the operator's."""
    return {k: v for k, v in os.environ.items() if _SET_HERE.get(k) != v}


def choose_openmp_wait() -> str:
    """Have OpenMP's idle threads spin briefly, then sleep (``OMP_WAIT_POLICY=PASSIVE``,
    ``GOMP_SPINCOUNT=`` :data:`SPIN_COUNT`) unless the environment chose either; returns
    the setting the runtime will use.

    A spinning thread burns the core another process needs, and a parallel region waits
    at its barrier for a thread descheduled from that core: with a neighbour on one of two
    cores the engine kept 0.06x of its quiet throughput with libgomp's default spin (3 ms),
    0.4x with this one, 0.65x never spinning; quietly, never spinning cost 17-20% and this
    spin nothing measurable (docs/performance.md, issue 33). The OpenMP runtime reads the
    variables once, when torch loads it, so this only works before ``import torch``;
    afterwards it returns :data:`OPENMP_WAIT_UNSET` when nothing was set (the caller
    warns). Sets variables of the whole process: other OpenMP code in it waits so too.
    """
    chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if "torch" not in sys.modules and not chosen:
        _SET_HERE.update(OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT=str(SPIN_COUNT))
        os.environ.update(_SET_HERE)
    policy = os.environ.get("OMP_WAIT_POLICY")
    spin = os.environ.get("GOMP_SPINCOUNT")
    if policy is None and spin is None:
        return OPENMP_WAIT_UNSET
    return ", ".join(
        f"{name}={value}"
        for name, value in (("OMP_WAIT_POLICY", policy), ("GOMP_SPINCOUNT", spin))
        if value is not None
    )


def process_usable_cpus() -> int:
    """:func:`usable_cpus` for this process: ``os.sched_getaffinity(0)`` (``os.cpu_count()``
    where there is none) and its cgroup CPU quota (:func:`cgroup_cpu_limit`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return _threads(cpus, cgroup_cpu_limit())


def cpus_busy(cpus: Iterable[int] | None = None) -> float | None:
    """Seconds the CPUs ``cpus`` (default: those this process may use) have been busy, in all.

    From ``/proc/stat``: every tick but idle and iowait (steal counts as busy: the
    hypervisor gave that time to someone else). ``None`` where there is no such file.
    """
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return None
    wanted = {f"cpu{c}" for c in cpus}
    try:
        with open("/proc/stat", "rb") as f:
            lines = f.read().decode().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted and len(fields) > 5:
            # user nice system idle iowait irq softirq steal (guest time is inside user)
            busy = fields[1:9]
            ticks += sum(int(v) for v in busy) - int(fields[4]) - int(fields[5])
    return ticks / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """The engine's thread count, one fewer for each core other processes hold.

    A parallel step is as slow as its slowest thread: when another process takes one of
    the engine's cores, the thread there runs in the scheduler's slices and every region
    of every step waits for it (measured: 0.34-0.39x of the quiet throughput on 2 cores
    with one taken, while one thread alone lost nothing). So the governor measures, over
    each ``window`` of busy stepping, how much CPU time *other* processes took on the
    CPUs this process may use: their busy time (:func:`cpus_busy`) less this process's
    own CPU time (``time.process_time``). The count is ``limit`` less one thread for each
    whole core that takes beyond ``slack`` (a neighbour using 0.8 of a core costs one
    thread; one using 0.2, none). The process's own threads never count, so a busy event
    loop beside the engine does not make it drop one. A lower count applies at once, a
    higher one after ``settle`` windows agreeing. Call :meth:`step` on the engine thread
    after each step and apply the count it returns there (PyTorch's count is per thread),
    :meth:`idle` when the engine runs out of work, and :meth:`wake` before the first step
    when work comes again.
    """

    def __init__(
        self,
        limit: int,
        *,
        window: float = 0.25,
        slack: float = 0.3,
        settle: int = 2,
        read_busy: Callable[[], float | None] = cpus_busy,
        read_own: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.threads = limit
        """The thread count now."""
        self.window = window
        self.slack = slack
        self.settle = settle
        self._read_busy = read_busy
        self._read_own = read_own
        self._clock = clock
        self._start: tuple[float, float, float] | None = None
        self._higher = 0  # windows in a row whose count was above the current one
        self._idle_start: tuple[float, float, float] | None = None  # the wait's first mark
        self._idle = False
        self.others = 0.0
        """CPUs other processes took on this process's CPUs in the last window."""
        self.lowered = 0
        """Times the count went down."""
        self.raised = 0
        """Times the count went up."""

    def _mark(self, now: float) -> None:
        busy = self._read_busy()
        self._start = None if busy is None else (now, busy, self._read_own())

    def idle(self) -> None:
        """The engine has no work and waits for some (called again while it waits: only
        the first call counts). The window in progress is dropped; the wait itself is
        measured, for :meth:`wake`."""
        self._start = None
        if not self._idle:
            self._idle = True
            self._mark(self._clock())
            self._idle_start, self._start = self._start, None

    @property
    def resting(self) -> bool:
        """Between :meth:`idle` and :meth:`wake`."""
        return self._idle

    def wake(self) -> int:
        """The engine has work again after :meth:`idle`: the thread count for its first step.

        Decided from what other processes did on the process's CPUs during the wait when
        it lasted a ``window`` or more (the process's own CPU time is then near nothing,
        so that measure is clean); after a shorter wait, every thread (``limit``): a busy
        period starts optimistic, and a neighbour found costs one window. Without this a
        batch arriving just after a neighbour left would run its first step, often a long
        prefill, at the count the neighbour left behind.
        """
        began, self._idle_start = self._idle_start, None
        self._idle = False
        if self.limit == 1:
            return 1
        now = self._clock()
        self._mark(now)  # the first busy window starts here
        if began is not None and self._start is not None and now - began[0] >= self.window:
            _, busy, own = self._start
            self.others = max(0.0, (busy - began[1]) - (own - began[2])) / (now - began[0])
            target = self.target(self.others)
        else:
            target = self.limit
        if target < self.threads:
            self.lowered += 1
        elif target > self.threads:
            self.raised += 1
        self.threads = target
        self._higher = 0
        return self.threads

    def target(self, others: float) -> int:
        """The count for ``others`` CPUs taken by other processes."""
        taken = max(0, math.ceil(others - self.slack))
        return max(1, self.limit - taken)

    def step(self) -> int:
        """After one engine step: the thread count to run the next with."""
        if self.limit == 1:
            return 1
        now = self._clock()
        if self._start is None:
            self._mark(now)
            return self.threads
        began, busy_then, own_then = self._start
        elapsed = now - began
        if elapsed < self.window:
            return self.threads
        self._mark(now)
        if self._start is None:
            return self.threads
        _, busy, own = self._start
        self.others = max(0.0, (busy - busy_then) - (own - own_then)) / elapsed
        target = self.target(self.others)
        if target < self.threads:
            self.threads = target
            self.lowered += 1
            self._higher = 0
        elif target > self.threads:
            self._higher += 1
            if self._higher >= self.settle:
                self.threads = target
                self.raised += 1
                self._higher = 0
        else:
            self._higher = 0
        return self.threads
