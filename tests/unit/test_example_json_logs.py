"""examples/openai_server.py's JSON log lines keep a 500's traceback."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from lorapool.server import app as server_app

ROOT = Path(__file__).resolve().parents[2]


def _example() -> Any:
    spec = importlib.util.spec_from_file_location(
        "openai_server", ROOT / "examples" / "openai_server.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Lines(logging.Handler):
    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _fail_deep_inside() -> None:
    raise RuntimeError("boom from deep inside")


def test_a_500_is_logged_as_one_json_line_with_its_traceback() -> None:
    handler = _Lines(_example().JsonLines())
    log = logging.getLogger("lorapool.server")
    log.addHandler(handler)
    try:
        try:
            _fail_deep_inside()
        except RuntimeError as exc:
            response = server_app._error(exc)
    finally:
        log.removeHandler(handler)
    assert response.status_code == 500
    assert json.loads(bytes(response.body))["error"]["type"] == "internal_error"
    assert len(handler.lines) == 1
    line = json.loads(handler.lines[0])
    assert line["level"] == "ERROR" and line["event"] == "unexpected error"
    assert "Traceback (most recent call last)" in line["exc_info"]
    assert "_fail_deep_inside" in line["exc_info"]
    assert "RuntimeError: boom from deep inside" in line["exc_info"]


def test_fields_json_cannot_encode_are_written_as_their_repr() -> None:
    formatter = _example().JsonLines()
    record = logging.makeLogRecord({"msg": "request", "levelname": "INFO", "path": Path("/x")})
    assert json.loads(formatter.format(record))["path"] == repr(Path("/x"))
