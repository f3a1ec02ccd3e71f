"""Run the server from a :class:`~lorapool.server.config.ServerConfig`: ``serve(config)``.

    python -m lorapool.server.run server.toml

:func:`serve` sets up JSON logging (:mod:`lorapool.server.logs`), the optional metrics
listener (``server.metrics_port``) and uvicorn on ``server.host``/``server.port``, and
blocks until the server has stopped.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from .config import ServerConfig, load_config
from .logs import configure_json_logging

__all__ = ["main", "serve"]

log = logging.getLogger("lorapool.server")


def serve(config: ServerConfig) -> None:
    """Serve the app ``config`` describes until SIGTERM or SIGINT; blocks.

    Logs are JSON lines on stderr (uvicorn's included; its access log is off: the
    server's own request line carries more). ``server.metrics_port``, when set, serves
    ``/metrics`` on a listener of its own on ``server.host``.
    """
    configure_json_logging()
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
        access_log=False,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m lorapool.server.run CONFIG``: :func:`serve` the TOML file ``CONFIG``."""
    parser = argparse.ArgumentParser(description="Serve a lorapool pool with the OpenAI API.")
    parser.add_argument("config", help="TOML config file (see examples/server.toml)")
    args = parser.parse_args(argv)
    serve(load_config(args.config))


if __name__ == "__main__":
    main()
