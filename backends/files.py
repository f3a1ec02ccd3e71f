"""Adapters as PEFT directories on local disk, for engines that load adapters by path.

vLLM, SGLang and their OpenAI-compatible servers read an adapter from a
directory. lorapool holds verified bytes in its host tier; :class:`AdapterDirs`
writes them out (atomically, named by content hash) just before the engine
loads them, and deletes them when the engine no longer needs them. It also
writes the zero adapter some engines need to serve the base model in a batch
with adapters (see :func:`write_zero_adapter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from lorapool.errors import LoadError
from lorapool.formats import CONFIG_FILE, WEIGHTS_FILE
from lorapool.types import LoadedAdapter

__all__ = ["AdapterDirs", "check_load", "write_zero_adapter"]


def check_load(
    adapter: LoadedAdapter, slot: int, max_slots: int, max_rank: int, engine: str
) -> None:
    """Refuse a slot out of range (``ValueError``) or a rank ``engine`` cannot hold
    (:class:`LoadError`), before anything is written or loaded."""
    if not 0 <= slot < max_slots:
        raise ValueError(f"slot {slot} is out of range 0..{max_slots - 1}")
    if adapter.config.r > max_rank:
        raise LoadError(
            adapter.adapter_id,
            "device",
            f"rank {adapter.config.r} is above {engine}'s max_lora_rank {max_rank}",
        )


class AdapterDirs:
    """Content-addressed adapter directories under ``root`` (a temporary one by default).

    ``root`` must be readable by the engine: the local filesystem for an
    in-process engine, a volume shared with the server for a remote one.

    An engine reads a directory some time after it is named to it, so a
    backend holds a :meth:`lease` from writing the directory until the engine
    has loaded it, and deletes with :meth:`discard_unused`, which leaves leased
    directories alone; writes and deletes take turns. Without that, an unload
    deleting an adapter's files could land between a new load's write and the
    engine's read of the same files (seen once in the vLLM conformance run).
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="lorapool-adapters-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._leases: Counter[str] = Counter()
        self._lock = asyncio.Lock()

    def path_of(self, sha256: str) -> Path:
        """Where the adapter with this content hash is (or would be) written."""
        return self.root / sha256

    def materialise(self, adapter: LoadedAdapter) -> Path:
        """Write the adapter's config and weights once; return the directory. Blocking."""
        final = self.path_of(adapter.sha256)
        if (final / WEIGHTS_FILE).is_file():
            return final
        if not adapter.weights:
            raise ValueError(f"adapter {adapter.adapter_id!r} has no weight bytes to write")
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            config = adapter.config.model_dump(mode="json")
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            (tmp / WEIGHTS_FILE).write_bytes(adapter.weights)
            os.replace(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / WEIGHTS_FILE).is_file():  # not a concurrent writer's win
                raise
        return final

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """The adapter with its directory written (``prepared``), for a backend's ``prepare``."""
        return replace(adapter, prepared=await self.dir_of(adapter))

    async def dir_of(self, adapter: LoadedAdapter) -> Path:
        """The adapter's directory, written now if it is not there (off the event loop)."""
        async with self._lock:
            return await asyncio.to_thread(self.materialise, adapter)

    @contextlib.asynccontextmanager
    async def lease(self, adapter: LoadedAdapter) -> AsyncIterator[Path]:
        """The adapter's directory, written if needed and kept on disk until the block ends."""
        sha = adapter.sha256
        self._leases[sha] += 1
        try:
            yield await self.dir_of(adapter)
        finally:
            self._leases[sha] -= 1
            if self._leases[sha] <= 0:
                del self._leases[sha]

    def leased(self, sha256: str) -> bool:
        """Whether a lease holds this directory now."""
        return self._leases[sha256] > 0

    async def discard_unused(self, sha256: str) -> bool:
        """Delete an adapter's directory unless a lease holds it; whether it was deleted."""
        async with self._lock:
            if self.leased(sha256):
                return False
            await asyncio.to_thread(self.discard, sha256)
            return True

    def discard(self, sha256: str) -> None:
        """Delete an adapter's directory, leased or not. Blocking."""
        shutil.rmtree(self.path_of(sha256), ignore_errors=True)

    def close(self) -> None:
        """Delete everything if the directory was a temporary one."""
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)


def write_zero_adapter(dest: Path, module: str, in_features: int, out_features: int) -> Path:
    """A rank-1 PEFT LoRA on layer 0's ``module`` whose B is zero: it changes nothing.

    vLLM's CPU kernels (0.32) apply the last slot's adapter to base-model rows
    of a mixed batch (they index with -1); serving base rows through this
    adapter keeps them exact. Written without torch.
    """
    dest.mkdir(parents=True, exist_ok=True)
    group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    prefix = f"base_model.model.model.layers.0.{group}.{module}"
    shapes = {
        f"{prefix}.lora_A.weight": [1, in_features],
        f"{prefix}.lora_B.weight": [out_features, 1],
    }
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = shape[0] * shape[1] * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytearray(offset)
    # A must not be all zero either, or PEFT-style loaders may treat the pair as absent.
    struct.pack_into("<f", data, 0, 1.0)
    (dest / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data))
    config = {
        "peft_type": "LORA",
        "r": 1,
        "lora_alpha": 1,
        "target_modules": [module],
        "bias": "none",
    }
    (dest / CONFIG_FILE).write_text(json.dumps(config))
    return dest
