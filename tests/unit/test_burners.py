"""The contention benchmark's CPU burners: pinned, paused between runs, and never left
behind, whatever way the benchmark ends (exception, SIGTERM, SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorapool.bench.contention import BURNER_TAG, Burners, CpuMeter, parse_cpus

CPU = max(os.sched_getaffinity(0))


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, T...), None when it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = text[text.rindex(")") + 2]
    return None if state in "ZX" else state


def _is_burner(pid: int) -> bool:
    try:
        return BURNER_TAG.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _gone(pids: list[int], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while any(_is_burner(p) and _state(p) is not None for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_parse_cpus() -> None:
    assert parse_cpus(str(CPU)) == [CPU]
    for bad in ("", "x", f"{CPU},{CPU}", "4096", "-1"):
        with pytest.raises(SystemExit, match="--burners"):
            parse_cpus(bad)


def test_paused_pinned_running_and_killed() -> None:
    with Burners([CPU]) as burners:
        (pid,) = burners.pids
        assert _is_burner(pid)
        assert _state(pid) == "T", "paused outside running()"
        meter = CpuMeter(burners)
        with burners.running():
            assert _state(pid) != "T"
            meter.start()
            time.sleep(0.5)
            use = meter.stop()
        assert _state(pid) == "T"
        assert os.sched_getaffinity(pid) == {CPU}
        assert use.burners > 0 and use.engine >= 0 and use.other >= 0
    assert _gone([pid], within=0)


def test_a_burner_resumed_from_outside_is_paused_again_before_a_quiet_run() -> None:
    """The kernel sends SIGCONT to every stopped process of an orphaned process group when
    one of its members exits (a bench started with nohup from a shell that has exited):
    a burner in the bench's group spun through "quiet" runs (seen: burner CPUs 0.73 in
    a quiet run). Burners get a session of their own, and are paused again before each
    quiet run."""
    with Burners([CPU]) as burners:
        (pid,) = burners.pids
        assert os.getsid(pid) == pid != os.getsid(0)  # its own session and group
        os.kill(pid, signal.SIGCONT)  # what the kernel did
        deadline = time.monotonic() + 5
        while _state(pid) == "T" and time.monotonic() < deadline:
            time.sleep(0.001)
        assert _state(pid) != "T"
        burners.pause()
        assert _state(pid) == "T"


def test_killed_when_the_block_raises() -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), Burners([CPU]) as burners:
        pids = burners.pids
        with burners.running():
            raise RuntimeError("boom")
    assert pids and _gone(pids, within=0)


_CHILD = """
import sys, time
from lorapool.bench.contention import Burners
with Burners([int(sys.argv[1])]) as burners:
    with burners.running():
        print(*burners.pids, flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_when_the_benchmark_is(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(CPU)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(_is_burner(p) for p in pids)
        proc.send_signal(sig)
        proc.wait(30)
        # SIGTERM: the benchmark's own cleanup; SIGKILL: the kernel (PR_SET_PDEATHSIG).
        assert _gone(pids)
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_wait_settings_parse_to_child_environments() -> None:
    from lorapool.bench.contention import LIBGOMP_SPINCOUNT, WaitSetting, parse_waits

    waits = parse_waits("passive, libgomp,spin:1000,spin:1000+adapt,default")
    libgomp = f"libgomp (spin {LIBGOMP_SPINCOUNT})"
    assert list(waits) == ["passive", libgomp, "spin 1000", "spin 1000 + governor", "default"]
    assert waits["default"] == WaitSetting({})
    assert waits["passive"] == WaitSetting({"OMP_WAIT_POLICY": "PASSIVE"})
    spin = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
    assert waits["spin 1000"] == WaitSetting(spin)
    assert waits["spin 1000 + governor"] == WaitSetting(spin, adapt_threads=True)
    assert waits[libgomp].env["GOMP_SPINCOUNT"] == "300000"
    for bad in ("active", "spin:", "spin:-1", "spin:x", "passive,passive", "", "spin:5,spin:05"):
        with pytest.raises(SystemExit, match="--waits"):
            parse_waits(bad)
    with pytest.raises(SystemExit, match=r"\+adapt"):
        parse_waits("passive+fast")
