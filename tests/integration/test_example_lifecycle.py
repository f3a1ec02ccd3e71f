"""``examples/lifecycle.py`` runs, end to end, as the lifecycle guide says (issue 29, item 7).

The example signs three versions, registers one (and has a tampered copy refused), gates
a promotion that passes and one that is refused, has a bad canary rolled back by the
pool's watch, verifies the audit log and forgets the adapter; it exits non-zero when any
outcome is not the expected one, and each step prints a line this test checks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]


def test_the_lifecycle_example_runs_every_step() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lifecycle.py")],
        capture_output=True,
        text=True,
        timeout=2300,  # a hang guard: it takes minutes
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "a tampered copy was refused: manifest_mismatch" in out
    assert "3. v2 passed the gate and serves {'v2': 100.0}; scores {'exact_match':" in out
    assert "4. v3 refused:" in out and "the alias still serves {'v2': 100.0}" in out
    assert "5. canary v3 rolled back after" in out
    assert "audit #" in out and "entries verify" in out
    assert "acme/support is not found any more" in out
    assert "FAILED" not in out
