"""The engine's thread count follows what the process may use: its affinity mask and its
cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_*``), rounded down, at least 1."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lorapool.backends.torch.threads import (
    ThreadGovernor,
    cgroup_cpu_limit,
    cpu_limit_v1,
    cpu_limit_v2,
    cpus_busy,
    process_usable_cpus,
    usable_cpus,
)


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [
        ({0, 1}, None, 2),
        ({3}, None, 1),
        (range(64), None, 64),
        (8, None, 8),
        ({0, 1, 2, 3}, "max 100000", 4),  # no limit: the affinity count
        ({0, 1, 2, 3}, "max", 4),
        ({0, 1, 2, 3}, "200000 100000", 2),
        (range(64), "200000 100000\n", 2),  # a 2-CPU container on a 64-core host
        ({0, 1, 2, 3}, "150000 100000", 1),  # 1.5 CPUs: rounded down
        ({0, 1, 2, 3}, "250000 100000", 2),
        ({0, 1, 2, 3}, "50000 100000", 1),  # half a CPU: still one thread
        ({0, 1, 2, 3}, "100000 100000", 1),
        ({0, 1, 2, 3}, "400000 50000", 4),  # 8 CPUs of quota, 4 allowed by affinity
        ({0, 1}, "800000 100000", 2),
        ({0, 1, 2, 3}, "", 4),  # empty or garbled file: ignored
        ({0, 1, 2, 3}, "lots 100000", 4),
        ({0, 1, 2, 3}, "0 100000", 4),
        (set(), None, 1),
    ],
)
def test_v2_quota(affinity: set[int] | range | int, cpu_max: str | None, expected: int) -> None:
    assert usable_cpus(affinity, cpu_max) == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        ("-1\n", "100000\n", 4),  # no limit
        ("200000\n", "100000\n", 2),
        ("150000", "100000", 1),
        ("100000", "50000", 2),
        ("junk", "100000", 4),
        ("200000", "0", 4),
    ],
)
def test_v1_quota(quota: str, period: str, expected: int) -> None:
    assert usable_cpus({0, 1, 2, 3}, cfs_quota_text=quota, cfs_period_text=period) == expected


def test_both_versions_the_smaller_limit_wins() -> None:
    assert usable_cpus(8, "600000 100000", cfs_quota_text="300000", cfs_period_text="100000") == 3
    assert usable_cpus(8, "max 100000", cfs_quota_text="300000", cfs_period_text="100000") == 3


def test_limits_in_cpus() -> None:
    assert cpu_limit_v2("150000 100000") == 1.5
    assert cpu_limit_v2("max 100000") is None
    assert cpu_limit_v1("-1", "100000") is None
    assert cpu_limit_v1("50000", "100000") == 0.5


def _write(path: Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in (line.split("=", 1) for line in text.split(";")):
        (path / name).write_text(content)


def test_v2_files_smallest_along_the_path(tmp_path: Path) -> None:
    _write(tmp_path, "cpu.max=max 100000\n")
    _write(tmp_path / "app.slice", "cpu.max=300000 100000\n")
    _write(tmp_path / "app.slice" / "svc", "cpu.max=max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/app.slice/svc\n") == 3.0
    # The cgroup's own directory not visible (a namespace): the levels that are still count.
    assert cgroup_cpu_limit(tmp_path, "0::/app.slice/other/deeper\n") == 3.0
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None


def test_v1_files(tmp_path: Path) -> None:
    _write(
        tmp_path / "cpu,cpuacct" / "docker" / "abc",
        "cpu.cfs_quota_us=150000;cpu.cfs_period_us=100000",
    )
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cgroup_cpu_limit(tmp_path, text) == 1.5
    # A container that sees its own cgroup as the mount's root.
    _write(tmp_path / "ns" / "cpu", "cpu.cfs_quota_us=200000;cpu.cfs_period_us=100000")
    assert cgroup_cpu_limit(tmp_path / "ns", "4:cpu,cpuacct:/docker/abc\n") == 2.0
    _write(tmp_path / "nolimit" / "cpu", "cpu.cfs_quota_us=-1;cpu.cfs_period_us=100000")
    assert cgroup_cpu_limit(tmp_path / "nolimit", "4:cpu:/\n") is None


def test_unreadable_files_mean_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "absent", "0::/x\n4:cpu:/y\n") is None
    (tmp_path / "cpu.max").mkdir()  # a directory where the file should be: unreadable
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None
    assert cgroup_cpu_limit(tmp_path, "not a cgroup file") is None


def test_this_process() -> None:
    import os

    n = process_usable_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))


# -- the LoRA kernel's schedule -----------------------------------------------------------


def test_schedule_texts() -> None:
    from lorapool.backends.torch.kernel import parse_schedule

    assert parse_schedule("static") == ("static", 1)
    assert parse_schedule(" Dynamic ") == ("dynamic", 1)
    assert parse_schedule("dynamic,4") == ("dynamic", 4)
    for bad in ("guided", "dynamic,0", "dynamic,x", "static,2", ""):
        with pytest.raises(ValueError, match="LORAPOOL_KERNEL_SCHEDULE"):
            parse_schedule(bad)


needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@needs_cc
def test_kernel_schedule_default_env_and_setter(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorapool.backends.torch.kernel import DEFAULT_SCHEDULE, SgmvKernel, build_kernel

    path = build_kernel().path
    try:
        monkeypatch.delenv("LORAPOOL_KERNEL_SCHEDULE", raising=False)
        kernel = SgmvKernel(path)
        assert kernel.schedule == DEFAULT_SCHEDULE == ("dynamic", 1)
        monkeypatch.setenv("LORAPOOL_KERNEL_SCHEDULE", "static")
        assert SgmvKernel(path).schedule == ("static", 1)
        assert kernel.schedule == ("static", 1), "one setting for the process's library"
        kernel.set_schedule("dynamic", 3)
        assert kernel.schedule == ("dynamic", 3)
        with pytest.raises(ValueError):
            kernel.set_schedule("guided")
        monkeypatch.setenv("LORAPOOL_KERNEL_SCHEDULE", "sometimes")
        with pytest.raises(ValueError, match="LORAPOOL_KERNEL_SCHEDULE"):
            SgmvKernel(path)
    finally:
        monkeypatch.delenv("LORAPOOL_KERNEL_SCHEDULE", raising=False)
        SgmvKernel(path)  # back to the default for later tests in this process


@needs_cc
@pytest.mark.parametrize("schedule", [("static", 1), ("dynamic", 1), ("dynamic", 3)])
def test_every_schedule_gives_the_same_bits(schedule: tuple[str, int]) -> None:
    """Each segment writes its own rows in a fixed order whatever thread runs it: the
    schedules differ in speed under contention only, never in the numbers."""
    import torch

    from lorapool.backends.torch.kernel import DEFAULT_SCHEDULE, build_kernel

    from .test_lora_plan import CASES, _slots

    kernel = build_kernel()
    token_slots = CASES["spread-out slots, every row adapted"]
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    try:
        for sched in (DEFAULT_SCHEDULE, schedule):
            kernel.set_schedule(*sched)
            slots, _ = _slots(torch.float32, kernel)  # type: ignore[arg-type]
            gen = torch.Generator().manual_seed(1)
            h = torch.randn(len(token_slots), 16, generator=gen)
            qkv = torch.zeros(len(token_slots), 32)
            slots.apply_qkv(0, slots.plan(token_slots), h, qkv)
            outputs[sched] = qkv
    finally:
        kernel.set_schedule(*DEFAULT_SCHEDULE)
    assert torch.equal(outputs[DEFAULT_SCHEDULE], outputs[schedule])
    assert outputs[schedule].abs().sum() > 0


# -- TorchBackend(threads=...) ------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_threads_refused(bad: object, tmp_path: Path) -> None:
    from lorapool.backends.torch import TorchBackend

    with pytest.raises(ValueError, match="threads"):
        TorchBackend(tmp_path, threads=bad)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, None])
async def test_threads_applied_at_start(model_dir: Path, threads: int | None) -> None:
    import torch

    from lorapool.backends.torch import TorchBackend

    before = torch.get_num_threads()
    # More than any machine here may use, set before the engine thread exists: a new thread
    # takes the count last set, so without the setting the engine would run this many.
    torch.set_num_threads(max(2, before) + 1)
    try:
        backend = TorchBackend(model_dir, threads=threads, max_slots=1, max_batch=2, max_seq_len=64)
        await backend.start()
        try:
            engine = backend._engine
            assert engine is not None

            def probe() -> tuple[int, int | None]:  # on the engine thread
                lora = engine.lora
                if lora.kernel is None:
                    return torch.get_num_threads(), None
                lora.plan([0, 0])  # the kernel's team: read from torch at each plan
                return torch.get_num_threads(), lora._threads

            torch_threads, kernel_threads = await asyncio.wrap_future(engine.call(probe))
            want = threads if threads is not None else process_usable_cpus()
            assert torch_threads == want
            assert kernel_threads in (want, None)
        finally:
            await backend.aclose()
    finally:
        torch.set_num_threads(before)


class _Fake:
    """A clock and the CPU counters the governor reads, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy = 0.0  # the process's CPUs, everyone's time on them
        self.own = 0.0  # this process's CPU time

    def clock(self) -> float:
        return self.now

    def read_busy(self) -> float:
        return self.busy

    def read_own(self) -> float:
        return self.own

    def run(
        self,
        gov: ThreadGovernor,
        seconds: float,
        others: float,
        own: Callable[[int], float] = float,
        dt: float = 0.05,
    ) -> list[int]:
        """Steps of ``dt`` for ``seconds``: other processes take ``others`` CPUs, the process
        ``own(n)`` at ``n`` threads. The counts used."""
        used = []
        for _ in range(round(seconds / dt)):
            n = gov.threads
            used.append(n)
            self.now += dt
            self.own += own(n) * dt
            self.busy += (own(n) + others) * dt
            gov.step()
        return used


def _governor(fake: _Fake, limit: int = 2) -> ThreadGovernor:
    return ThreadGovernor(limit, read_busy=fake.read_busy, read_own=fake.read_own, clock=fake.clock)


def test_governor_keeps_every_thread_while_only_its_own_process_is_busy() -> None:
    """The process's own threads (event loop, detokenizer) beside the engine's, even more
    than the cores: no other process takes anything, no thread is dropped."""
    fake = _Fake()
    gov = _governor(fake, limit=4)
    assert set(fake.run(gov, 60, others=0.1, own=lambda n: n + 1.5)) == {4}
    assert gov.lowered == 0 and gov.raised == 0


def test_governor_drops_a_thread_for_each_core_taken_and_does_not_flap() -> None:
    fake = _Fake()
    gov = _governor(fake, limit=2)
    used = fake.run(gov, 60, others=0.8, own=float)
    assert gov.threads == 1 and gov.lowered == 1 and gov.raised == 0
    assert used.count(2) <= 6  # two threads only until the first window closed
    fake4 = _Fake()
    four = ThreadGovernor(4, read_busy=fake4.read_busy, read_own=fake4.read_own, clock=fake4.clock)
    fake4.run(four, 5, others=2.0)
    assert four.threads == 2  # two cores taken: two threads fewer
    fake4.run(four, 5, others=0.2)  # a neighbour using a fifth of a core costs nothing
    assert four.threads == 4


def test_governor_returns_to_every_thread_once_the_neighbour_leaves() -> None:
    fake = _Fake()
    gov = _governor(fake, limit=3)
    fake.run(gov, 5, others=2.0)
    assert gov.threads == 1
    fake.run(gov, 5, others=0.0)
    assert gov.threads == 3 and gov.raised == 1


def test_governor_raises_only_after_windows_agree() -> None:
    """A single quiet window inside a contended stretch does not bring a thread back."""
    fake = _Fake()
    gov = _governor(fake, limit=2)
    fake.run(gov, 2, others=1.0)
    assert gov.threads == 1
    for _ in range(20):
        fake.run(gov, 0.25, others=0.0)  # one window quiet
        fake.run(gov, 0.25, others=1.0)  # the next taken again
    assert gov.raised == 0 and gov.threads == 1


def test_governor_decides_on_steps_longer_than_its_window() -> None:
    """A contended step can take longer than the window: each step then closes one."""
    fake = _Fake()
    gov = _governor(fake, limit=2)
    fake.run(gov, 10, others=1.0, dt=0.6)
    assert gov.threads == 1 and gov.lowered == 1


def test_governor_ignores_idle_gaps_and_missing_counters() -> None:
    fake = _Fake()
    gov = _governor(fake, limit=2)
    fake.run(gov, 1, others=0.0)
    gov.idle()
    fake.now += 30  # the engine waited for work; a neighbour ran meanwhile
    fake.busy += 30
    assert gov.step() == 2
    assert set(fake.run(gov, 1, others=0.0)) == {2}
    blind = ThreadGovernor(2, read_busy=lambda: None, read_own=fake.read_own, clock=fake.clock)
    assert set(fake.run(blind, 5, others=1.0)) == {2}
    with pytest.raises(ValueError, match="limit"):
        ThreadGovernor(0)
    assert ThreadGovernor(1, read_busy=fake.read_busy, clock=fake.clock).step() == 1


def test_governor_wakes_at_the_count_the_wait_measured_or_else_at_every_thread() -> None:
    """A batch that comes after the engine waited: a wait of a window or more with a
    neighbour busy starts it at one thread fewer, a quiet one at every thread; a wait too
    short to measure starts it at every thread (optimistic: the first window corrects)."""
    fake = _Fake()
    gov = _governor(fake, limit=2)
    fake.run(gov, 2, others=1.0)
    assert gov.threads == 1
    gov.idle()
    fake.now += 0.01  # the neighbour left just as the batch finished; the next comes at once
    gov.idle()  # called again while waiting: the first call's mark stands
    assert gov.resting
    assert gov.wake() == 2 and gov.raised == 1
    assert not gov.resting
    fake.run(gov, 2, others=1.0)  # it is back: one window at two threads, then one
    assert gov.threads == 1 and gov.lowered == 2
    gov.idle()
    fake.now += 5  # a long wait, the neighbour busy all along
    fake.busy += 5 * 1.0
    assert gov.wake() == 1 and gov.others == pytest.approx(1.0)
    fake.run(gov, 1, others=1.0)
    gov.idle()
    fake.now += 5  # a long quiet wait
    assert gov.wake() == 2 and gov.others == pytest.approx(0.0)
    assert set(fake.run(gov, 2, others=0.0)) == {2}
    one = ThreadGovernor(1, read_busy=fake.read_busy, read_own=fake.read_own, clock=fake.clock)
    one.idle()
    assert one.wake() == 1


def test_cpus_busy_reads_this_machine() -> None:
    busy = cpus_busy()
    if not Path("/proc/stat").exists():
        assert busy is None
    else:
        assert busy is not None and busy >= 0.0
        assert cpus_busy([]) == 0.0


@pytest.mark.slow
async def test_the_engine_drops_a_thread_while_a_neighbour_holds_a_core_and_serves_the_same(
    model_dir: Path,
) -> None:
    """The governor wired into the real engine: another process's CPU time reported on the
    process's cores makes the engine step with one thread fewer, on the engine thread, and
    the tokens are the same as at full count."""
    import torch

    from lorapool.backends.torch import TorchBackend
    from lorapool.types import GenerationRequest, SamplingParams

    before = torch.get_num_threads()
    backend = TorchBackend(
        model_dir, threads=2, adapt_threads=True, max_slots=1, max_batch=2, max_seq_len=128
    )
    await backend.start()
    try:
        engine = backend._engine
        assert engine is not None and engine.governor is not None
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

        async def tokens(rid: str) -> list[int]:
            request = GenerationRequest(rid, "Count to ten:", params)
            return [t async for c in backend.generate(request) for t in c.token_ids]

        # The governor reads a fake clock and fake counters (the real ones would tell how
        # busy this test machine is): one second per decode step, two CPUs of the process's
        # own, and as much CPU time of other processes as the test says.
        fake = _Fake()
        governor = engine.governor
        governor._read_busy = fake.read_busy
        governor._read_own = fake.read_own
        governor._clock = fake.clock
        others_per_step = [0.0]
        original = engine._decode

        def decode() -> None:
            original()
            fake.now += 1.0
            fake.own += 2.0
            fake.busy += 2.0 + others_per_step[0]

        engine._decode = decode  # type: ignore[method-assign]
        quiet = await tokens("quiet")
        assert engine.stats.thread_changes == 0  # no neighbour: every thread kept
        others_per_step[0] = 0.8  # another process takes most of a core
        contended = await tokens("contended")

        def count() -> int:
            return torch.get_num_threads()

        assert await asyncio.wrap_future(engine.call(count)) == 1
        assert engine.stats.thread_changes >= 1 and engine.stats.threads == 1
        assert contended == quiet
    finally:
        await backend.aclose()
        torch.set_num_threads(before)


def _wait_policy(code: str, env: dict[str, str]) -> list[str]:
    """Run ``code`` in a fresh interpreter; its printed lines and its stderr's warnings."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard: it imports torch
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [*done.stdout.split(), *(["WARNED"] if "OMP_WAIT_POLICY" in done.stderr else [])]


def test_the_backend_asks_openmp_to_spin_briefly_then_sleep_unless_told_otherwise() -> None:
    """Long-spinning OpenMP threads collapse the engine when a neighbour takes a core
    (issue 33): importing the backend sets OMP_WAIT_POLICY=PASSIVE and a short
    GOMP_SPINCOUNT before torch loads its OpenMP runtime; a setting the environment chose
    (either variable) is kept as it is; torch imported first gets a warning."""
    import os

    from lorapool.backends.torch.threads import SPIN_COUNT

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    show = (
        "import os, lorapool.backends.torch as t; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    assert _wait_policy(show, env) == ["PASSIVE", str(SPIN_COUNT)]
    assert _wait_policy(show, {**env, "OMP_WAIT_POLICY": "active"}) == ["active", "None"]
    assert _wait_policy(show, {**env, "GOMP_SPINCOUNT": "5"}) == ["None", "5"]
    late = (
        "import torch, os, lorapool.backends.torch as t; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    assert _wait_policy(late, env) == ["None", "None", "WARNED"]
    # Child processes running other engines get the environment without lorapool's choice.
    child = (
        "import os, lorapool.backends.torch.threads as t; e = t.environ_without_openmp_choice(); "
        "print(os.environ.get('GOMP_SPINCOUNT'), e.get('GOMP_SPINCOUNT'), e.get('OMP_WAIT_POLICY'))"
    )
    assert _wait_policy(child, env) == [str(SPIN_COUNT), "None", "None"]
    assert _wait_policy(child, {**env, "GOMP_SPINCOUNT": "7"}) == ["7", "7", "None"]
