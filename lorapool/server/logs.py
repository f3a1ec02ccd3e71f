"""JSON log lines for the server: one object a line, tracebacks kept, no colour codes.

:class:`JsonLines` formats a record as one JSON object: ``level``, ``event`` (the
message), every field a caller attached with ``extra=`` (the request log's
``request_id``, ``tenant``, ...), ``exc_info`` (the formatted traceback) and
``stack_info``. Uvicorn's ``color_message`` extra (the message again, with ANSI colour
codes) is dropped, and any ANSI escape left in a string field is stripped, so no line
carries terminal control codes. :func:`configure_json_logging` installs it on the root
logger and routes uvicorn's loggers through it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

__all__ = ["JsonLines", "configure_json_logging"]

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_DROP = {"color_message"}


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _ANSI.sub("", value).replace("\x1b", "")
    return value


class JsonLines(logging.Formatter):
    """One JSON object per log line, with the request fields the server attaches.

    A record with an exception (every 500: the server logs it with ``exc_info``; uvicorn's
    "Exception in ASGI application" too) carries its traceback as ``exc_info``, the stack
    of a ``stack_info`` record as ``stack_info``. Uvicorn's ``color_message`` is dropped and
    ANSI escapes are stripped from every string.
    """

    _SKIP = set(logging.makeLogRecord({}).__dict__) | {"message"} | _DROP

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line."""
        fields = {k: _clean(v) for k, v in record.__dict__.items() if k not in self._SKIP}
        line: dict[str, Any] = {
            "level": record.levelname,
            "logger": record.name,
            "event": _clean(record.getMessage()),
            **fields,
        }
        if record.exc_info:
            line["exc_info"] = _clean(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc_info"] = _clean(record.exc_text)
        if record.stack_info:
            line["stack_info"] = _clean(self.formatStack(record.stack_info))
        return json.dumps(line, default=repr)


def configure_json_logging(level: int = logging.INFO, *, access_log: bool = False) -> None:
    """Log JSON lines to stderr from every logger, uvicorn's included.

    Uvicorn's ``uvicorn`` and ``uvicorn.error`` loggers propagate to the root handler
    (their own handlers, if any, are removed); ``uvicorn.access`` is off unless
    ``access_log`` (the server's own request log line carries more: tenant, adapter,
    tokens, request id).
    """
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.disabled = not access_log
