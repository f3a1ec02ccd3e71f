"""Running ``python -m lorapool bench ...`` as a user would, for the bench tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_bench(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a ``lorapool bench`` sub-command offline in ``cwd``; assert it exited 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lorapool", "bench", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
