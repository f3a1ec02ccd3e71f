"""An ASGI app served by uvicorn on loopback, inside the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    """A started server: its base URL, port and the uvicorn server itself."""

    url: str
    port: int
    server: Any


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[Running]:
    """Serve ``app`` on a free 127.0.0.1 port until the block ends, then shut it down
    gracefully (lifespan on: the app's startup and shutdown run)."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                await task
                raise AssertionError("the server stopped before it started")
            await asyncio.sleep(0.05)
        yield Running(f"http://127.0.0.1:{port}", port, server)
    finally:
        server.should_exit = True
        await task
