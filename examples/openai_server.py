"""Serve a lorapool pool with the OpenAI API, configured by a TOML file.

    python examples/openai_server.py examples/server.toml

Tenants call it with their API key and any OpenAI client; adapters are registered
with ``POST /v1/load_lora_adapter`` (vLLM's body: ``lora_name``, ``lora_path``) or
ahead of time with ``AdapterPool.register``. SIGTERM/Ctrl-C stops accepting requests,
lets streams in flight finish (``server.shutdown_timeout``), then closes the pool.

This is a thin wrapper over :func:`lorapool.server.run.serve` (``lorapool serve CONFIG``
does the same).
"""

from __future__ import annotations

import argparse

from lorapool.server.config import load_config
from lorapool.server.logs import JsonLines
from lorapool.server.run import serve

__all__ = ["JsonLines", "main"]


def main() -> None:
    """Parse the config path and serve it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="TOML config file (see examples/server.toml)")
    args = parser.parse_args()
    serve(load_config(args.config))


if __name__ == "__main__":
    main()
