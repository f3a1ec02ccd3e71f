"""The wheel holds every source file; importing lorapool imports no engine."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAPPING = {"lorapool": "lorapool", "backends": "lorapool/backends", "policies": "lorapool/policies"}


def test_import_lorapool_does_not_import_torch() -> None:
    code = (
        "import sys, lorapool, lorapool.testing, lorapool.policies, lorapool.backends;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'vllm', 'sglang', 'aiobotocore') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_wheel_contains_every_source_file(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lorapool-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, installed in MAPPING.items():
        for f in (ROOT / folder).rglob("*"):
            if f.is_file() and f.suffix in (".py", ".typed", ".c") and "__pycache__" not in f.parts:
                expected.add(f"{installed}/{f.relative_to(ROOT / folder).as_posix()}")
    assert expected, "no sources found"
    missing = sorted(expected - names)
    assert not missing, f"wheel lacks {missing}"
    assert "lorapool/py.typed" in names
