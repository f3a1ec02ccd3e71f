"""The formats wing: no import of validation, and the old ``lorapool.adapters`` path."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import lorapool.formats

FORMATS = Path(lorapool.formats.__file__).parent
ADAPTERS_NAMES = [
    "ADAPTER_FILES",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterFiles",
    "adapter_digest",
    "check_supported",
    "inspect_adapter_dir",
    "read_safetensors_header",
    "sha256_of_files",
]


def _imports(path: Path) -> set[str]:
    """The lorapool modules a formats module imports (relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add(node.module or "")
            else:
                parent = "lorapool" if node.level == 2 else "lorapool.formats"
                found.add(f"{parent}.{node.module}" if node.module else parent)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] == "lorapool"}


def test_formats_imports_only_errors_types_and_itself() -> None:
    for path in sorted(FORMATS.glob("*.py")):
        outside = {
            m
            for m in _imports(path)
            if not m.startswith("lorapool.formats")
            and m not in ("lorapool.errors", "lorapool.types")
        }
        assert not outside, f"{path.name} imports {sorted(outside)}"


def test_old_adapters_path_answers_with_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "lorapool.adapters", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("lorapool.adapters")
    assert old is lorapool.formats
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    for name in ADAPTERS_NAMES:
        assert name in lorapool.formats.__all__
        assert getattr(old, name) is getattr(lorapool.formats, name)
