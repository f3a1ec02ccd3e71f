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
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "CGROUP_ROOT",
    "ThreadGovernor",
    "cgroup_cpu_limit",
    "cpu_limit_v1",
    "cpu_limit_v2",
    "machine_idle",
    "process_run_delay",
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


def process_usable_cpus() -> int:
    """:func:`usable_cpus` for this process: ``os.sched_getaffinity(0)`` (``os.cpu_count()``
    where there is none) and its cgroup CPU quota (:func:`cgroup_cpu_limit`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return _threads(cpus, cgroup_cpu_limit())


def process_run_delay() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU, in all.

    The sum of the second field of ``/proc/self/task/*/schedstat`` (nanoseconds on a
    run queue); ``None`` where the kernel does not keep it.
    """
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                fields = f.read().split()
        except OSError:
            continue  # the thread ended meanwhile
        if len(fields) >= 2:
            total += int(fields[1])
    return total / 1e9 if tasks else None


def machine_idle(cpus: Iterable[int] | None = None) -> float | None:
    """Seconds the CPUs ``cpus`` (default: those this process may use) have been idle, in all.

    From ``/proc/stat`` (idle and iowait ticks; steal counts as busy: a hypervisor took
    it); ``None`` where there is no such file.
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
            ticks += int(fields[4]) + int(fields[5])
    return ticks / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """The engine's thread count, lowered while its threads wait for CPUs they do not get.

    A parallel step is as slow as its slowest thread: when another process takes one of
    the engine's cores, the thread there runs in the scheduler's slices and every region
    of every step waits for it (measured: 0.37x the quiet throughput on 2 cores with one
    taken). So the governor watches, over each ``window`` of busy stepping, how long this
    process's threads sat on run queues (:func:`process_run_delay`): over ``max_wait``
    CPUs' worth, it drops a thread. It adds one back when the CPUs this process may use
    were idle for ``min_idle`` CPUs' worth (:func:`machine_idle`: a core is there for
    it), at most every ``hold`` seconds, the hold doubling (up to ``max_hold``) each time
    a thread added back had to be dropped again, so it does not flap. Where the idle time
    cannot be read it tries a thread again every ``max_hold`` seconds. On a quiet machine
    nothing waits and the count stays at ``limit``. Call :meth:`step` on the engine thread
    after each step and apply the count it returns there (PyTorch's count is per thread),
    and :meth:`idle` when the engine runs out of work.
    """

    def __init__(
        self,
        limit: int,
        *,
        window: float = 0.25,
        max_wait: float = 0.25,
        min_idle: float = 0.5,
        hold: float = 0.5,
        max_hold: float = 8.0,
        read_wait: Callable[[], float | None] = process_run_delay,
        read_idle: Callable[[], float | None] = machine_idle,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.threads = limit
        """The thread count now."""
        self.window = window
        self.max_wait = max_wait
        self.min_idle = min_idle
        self.min_hold = hold
        self.max_hold = max_hold
        self._hold = hold
        self._read_wait = read_wait
        self._read_idle = read_idle
        self._clock = clock
        self._start: tuple[float, float, float | None] | None = None
        self._changed = clock()
        self._raised = False
        self.lowered = 0
        """Times a thread was dropped."""
        self.raised = 0
        """Times a dropped thread was added back."""

    def _mark(self, now: float) -> None:
        waited = self._read_wait()
        self._start = None if waited is None else (now, waited, self._read_idle())

    def idle(self) -> None:
        """The engine has no work and waits for some: what happens meanwhile is not its."""
        self._start = None

    def step(self) -> int:
        """After one engine step: the thread count to run the next with."""
        if self.limit == 1:
            return 1
        now = self._clock()
        if self._start is None:
            self._mark(now)
            return self.threads
        began, waited_then, idle_then = self._start
        elapsed = now - began
        if elapsed < self.window:
            return self.threads
        self._mark(now)
        if self._start is None:
            return self.threads
        wait = (self._start[1] - waited_then) / elapsed
        idle_now = self._start[2]
        idle = None if idle_then is None or idle_now is None else (idle_now - idle_then) / elapsed
        if wait > self.max_wait and self.threads > 1:
            self.threads -= 1
            self.lowered += 1
            if self._raised:  # the thread added back did not get a CPU either: wait longer
                self._hold = min(self._hold * 2, self.max_hold)
            self._raised = False
            self._changed = now
        elif self.threads < self.limit and now - self._changed >= (
            self._hold if idle is not None else self.max_hold
        ):
            if idle is None or idle >= self.min_idle:
                self.threads += 1
                self.raised += 1
                self._raised = True
                self._changed = now
        elif self._raised and now - self._changed >= self.max_hold:
            self._raised = False  # it stuck: the next drop starts from a short hold again
            self._hold = self.min_hold
        return self.threads
