"""lorapool.server.logs.JsonLines: one JSON object a line, tracebacks kept (also when given as
an exception instance, as uvicorn does), uvicorn's colour codes gone."""

from __future__ import annotations

import json
import logging

from lorapool.server.logs import JsonLines


def record(msg: str, *args: object, **kw: object) -> logging.LogRecord:
    logger = logging.getLogger("test.server.logs")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, msg, args, None, **kw)  # type: ignore[arg-type]


def test_uvicorns_color_message_is_dropped_and_no_escape_survives() -> None:
    rec = record(
        "Started server process [%d]",
        42,
        extra={
            "color_message": "Started server process [\x1b[36m%d\x1b[0m]",
            "who": "\x1b[1mme\x1b[0m",
        },
    )
    line = JsonLines().format(rec)
    assert "\x1b" not in line and "\\u001b" not in line
    fields = json.loads(line)
    assert fields["event"] == "Started server process [42]"
    assert "color_message" not in fields and fields["who"] == "me"


def test_an_exception_instance_as_exc_info_keeps_its_traceback() -> None:
    def fail() -> None:
        raise RuntimeError("boom inside")

    handler_lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            handler_lines.append(self.format(rec))

    handler = Lines()
    handler.setFormatter(JsonLines())
    logger = logging.getLogger("test.server.logs.exc")
    logger.addHandler(handler)
    try:
        try:
            fail()
        except RuntimeError as exc:
            logger.error("Exception in ASGI application\n", exc_info=exc)  # as uvicorn does
    finally:
        logger.removeHandler(handler)
    (line,) = handler_lines
    fields = json.loads(line)
    assert fields["level"] == "ERROR"
    assert "Traceback" in fields["exc_info"] and "RuntimeError: boom inside" in fields["exc_info"]
    assert "in fail" in fields["exc_info"]
