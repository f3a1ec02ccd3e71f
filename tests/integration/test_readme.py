"""The README's first Python snippet runs as a script, as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def first_python_block(markdown: str) -> str:
    """The first fenced ```python block of ``markdown``."""
    match = re.search(r"^```python\n(.*?)^```", markdown, re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


@pytest.mark.slow
def test_the_first_readme_snippet_runs(tmp_path: Path, lorapool_cache: Path) -> None:
    code = first_python_block((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "asyncio.run(" in code  # a script, not a fragment for an async REPL
    script = tmp_path / "readme.py"
    script.write_text(code)
    env = {**os.environ, "LORAPOOL_CACHE_DIR": str(lorapool_cache), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the snippet printed no completion"
