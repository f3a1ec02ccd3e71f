"""Run the server from a :class:`~lorapool.server.config.ServerConfig`: ``serve(config)``.

    python -m lorapool.server.run server.toml

:func:`serve` sets up JSON logging (:mod:`lorapool.server.logs`), the optional metrics
listener (``server.metrics_port``) and uvicorn on ``server.host``/``server.port``, and
blocks until the server has stopped.

Shutdown drains with the listener up: the first SIGTERM or SIGINT starts the app's
:class:`~lorapool.server.drain.Drain` (new requests, on new connections and on kept-alive
ones, get a 503 with ``Retry-After``; ``/ready`` says 503; ``/health`` answers; streams
in flight go on for up to ``server.shutdown_timeout`` seconds, then end with an SSE
error event and ``data: [DONE]``). Only after the drain does uvicorn close the listener
and the lifespan close the pool; the process then exits 0. A second signal exits at
once (status 128 + the signal's number), nothing drained or closed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from types import FrameType

import uvicorn

from .config import ServerConfig, load_config
from .drain import CUT_GRACE_S, Drain
from .logs import configure_json_logging

__all__ = ["DrainingServer", "main", "serve"]

log = logging.getLogger("lorapool.server")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the app before anything closes.

    Uvicorn's own first signal closes the listening socket at once and runs the app's
    shutdown only once the connections are gone. Here the first signal starts
    ``drain.run()`` on the event loop and the server goes on serving (the app refuses
    new work with 503s); when the drain is over, uvicorn's usual shutdown follows
    (listener closed, idle connections closed, the lifespan's shutdown). A second
    signal ends the process at once (``os._exit(128 + signal)``). Without a ``drain``
    it behaves like uvicorn's server.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain | None) -> None:
        super().__init__(config)
        self.drain = drain
        self.signalled: int | None = None
        """The first exit signal's number, once it came."""
        self._draining: asyncio.Task[int] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain (on the next tick); second: exit now."""
        if self.drain is None:
            super().handle_exit(sig, frame)
            return
        if self.signalled is None and not self.should_exit:
            self.signalled = sig
            return
        log.warning("second exit signal (%d): exiting now, without draining", sig)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(128 + sig)

    async def on_tick(self, counter: int) -> bool:
        """Uvicorn's tick, plus: start the drain after a signal, exit once it is over."""
        if self.signalled is not None and self.drain is not None:
            if self._draining is None:
                log.info("exit signal %d: draining before the listener closes", self.signalled)
                self._draining = asyncio.get_running_loop().create_task(self.drain.run())
            elif self._draining.done():
                self.should_exit = True
        return await super().on_tick(counter)


def serve(config: ServerConfig) -> None:
    """Serve the app ``config`` describes until SIGTERM or SIGINT; blocks.

    Logs are JSON lines on stderr (uvicorn's included; its access log is off: the
    server's own request line carries more). ``server.metrics_port``, when set, serves
    ``/metrics`` on a listener of its own on ``server.host``. ``[tracing] enabled``
    turns on OpenTelemetry spans (:func:`lorapool.tracing.enable`) for this process.
    """
    configure_json_logging()
    if config.tracing.enabled:
        from lorapool import tracing

        tracing.enable()
    app = config.build_app()
    if config.server.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(
            config.server.metrics_port, addr=config.server.host, registry=app.state.metrics.registry
        )
    uvicorn_config = uvicorn.Config(
        app,
        host=config.server.host,
        port=config.server.port,
        lifespan="on",
        # The drain already waited for the requests; this bounds only the closing of
        # connections after it (a stream the drain cut that would not end).
        timeout_graceful_shutdown=int(CUT_GRACE_S),
        log_config=None,
        access_log=False,
    )
    server = DrainingServer(uvicorn_config, getattr(app.state, "drain", None))
    server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's STARTUP_FAILURE: the log says why


def main(argv: list[str] | None = None) -> None:
    """``python -m lorapool.server.run CONFIG``: :func:`serve` the TOML file ``CONFIG``."""
    parser = argparse.ArgumentParser(description="Serve a lorapool pool with the OpenAI API.")
    parser.add_argument("config", help="TOML config file (see examples/server.toml)")
    args = parser.parse_args(argv)
    serve(load_config(args.config))


if __name__ == "__main__":
    main()
