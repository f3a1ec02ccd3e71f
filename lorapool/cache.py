"""Where lorapool keeps converted models, generated adapters and downloads."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``$LORAPOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/lorapool``, else ``~/.cache/lorapool``."""
    env = os.environ.get("LORAPOOL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lorapool"
