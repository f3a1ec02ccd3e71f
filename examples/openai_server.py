"""Serve a lorapool pool with the OpenAI API, configured by a TOML file.

    python examples/openai_server.py examples/server.toml

Tenants call it with their API key and any OpenAI client; adapters are registered
with ``POST /v1/load_lora_adapter`` (vLLM's body: ``lora_name``, ``lora_path``) or
ahead of time with ``AdapterPool.register``. SIGTERM/Ctrl-C stops accepting requests,
lets streams in flight finish (``server.shutdown_timeout``), then closes the pool.
"""

from __future__ import annotations

import argparse
import json
import logging

import uvicorn

from lorapool.server.config import load_config


class JsonLines(logging.Formatter):
    """One JSON object per log line, with the request fields the server attaches.

    A record with an exception (every 500: the server logs it with ``exc_info``) carries
    its traceback as ``exc_info``, the stack of a ``stack_info`` record as ``stack_info``.
    """

    _SKIP = set(logging.makeLogRecord({}).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in self._SKIP}
        line = {"level": record.levelname, "event": record.getMessage(), **fields}
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=repr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="TOML config file (see examples/server.toml)")
    args = parser.parse_args()
    config = load_config(args.config)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    app = config.build_app()
    if config.server.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(
            config.server.metrics_port, addr=config.server.host, registry=app.state.metrics.registry
        )
    uvicorn.run(
        app,
        host=config.server.host,
        port=config.server.port,
        timeout_graceful_shutdown=int(config.server.shutdown_timeout),
        log_config=None,
    )


if __name__ == "__main__":
    main()
