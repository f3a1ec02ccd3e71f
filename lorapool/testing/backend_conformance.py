"""The backend conformance suite: what every engine behind the Backend seam must do.

Run it on a backend you wrote (or one of lorapool's) with real adapters::

    from lorapool.testing import check_backend

    report = await check_backend(lambda: MyBackend(...), {"a": path_a, "b": path_b, "c": path_c})

``make_backend`` is called for a fresh, unstarted backend; the suite drives it
through an :class:`~lorapool.AdapterPool` (the way applications use it) and,
for the error checks, directly. Each check raises :class:`ConformanceError`
naming what failed. Outputs are compared under greedy decoding: a request's
text must not depend on what else is in the batch. Engines whose kernels are
not batch-invariant may pass ``prefix_tokens=k`` to compare only the first
``k`` tokens of mixed runs with solo runs (the report says which was used).

The ``sampling`` check has a row per sampling parameter (:data:`PARAMETER_SAMPLES`): a
parameter the backend lists in ``Capabilities.sampling`` must be served (the request
completes; ``n`` samples each end with a finish reason, ``logprobs`` give one entry per
token with ``top_logprobs`` alternatives, a ``choice`` that stops is one of the choices);
any other must be refused with :class:`~lorapool.errors.UnsupportedParameter` naming the
backend and the parameter, by ``backend.generate`` and by ``AdapterPool.generate``, and the
backend must serve on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapool.abc import Backend
from lorapool.errors import AdapterNotFound, LorapoolError, UnsupportedParameter
from lorapool.pool import AdapterPool
from lorapool.sampling import ALL_PARAMETERS
from lorapool.types import Chunk, GenerationRequest, SamplingParams, StructuredOutput

__all__ = [
    "ALL_CHECKS",
    "PARAMETER_SAMPLES",
    "BackendReport",
    "ConformanceError",
    "check_backend",
    "sampling_parameter_names",
]

ALL_CHECKS = (
    "capabilities",
    "streaming",
    "mixed",
    "more-adapters-than-slots",
    "cancellation",
    "unload-drain",
    "resume",
    "errors",
    "sampling",
    "close",
)
"""Every check, in the order :func:`check_backend` runs them (``more-adapters-than-slots``
only when more adapters than the backend's slots are given, ``resume`` only for a backend
with ``Capabilities.resume``)."""

PROMPT = "Write one sentence about the sea."
_TENANT = "conformance"

PARAMETER_SAMPLES: dict[str, dict[str, Any]] = {
    "max_tokens": {"max_tokens": 3},
    "temperature": {"temperature": 0.0},
    "top_p": {"top_p": 0.9},
    "seed": {"seed": 7},
    "stop": {"stop": ("\n\n\n",)},
    "ignore_eos": {"ignore_eos": True},
    "top_k": {"top_k": 5},
    "min_p": {"min_p": 0.05},
    "presence_penalty": {"presence_penalty": 0.5},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "repetition_penalty": {"repetition_penalty": 1.1},
    "logit_bias": {"logit_bias": {0: -1.0}},
    "stop_token_ids": {"stop_token_ids": (0,)},
    "min_tokens": {"min_tokens": 1},
    "n": {"n": 2},
    "logprobs": {"logprobs": True},
    "top_logprobs": {"logprobs": True, "top_logprobs": 2},
    "structured.json_object": {"structured": StructuredOutput.json_object()},
    "structured.json_schema": {
        "structured": StructuredOutput.json_schema(
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        )
    },
    "structured.regex": {"structured": StructuredOutput.regex("[a-z]{1,3}")},
    "structured.choice": {"structured": StructuredOutput.choice(["yes", "no"])},
    "structured.grammar": {"structured": StructuredOutput.grammar('start: "yes" | "no"')},
}
"""For each name :meth:`SamplingParams.used` can report, the fields of a request that sets
it (and, where it needs one, a parameter it depends on): the ``sampling`` check's rows."""


def sampling_parameter_names() -> frozenset[str]:
    """Every name :meth:`SamplingParams.used` can report (structured output by kind)."""
    return ALL_PARAMETERS


class ConformanceError(AssertionError):
    """A backend broke the contract; the message says which check and how."""


@dataclass
class BackendReport:
    """What :func:`check_backend` ran and saw."""

    checks: list[str] = field(default_factory=list)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    """Greedy token ids per adapter (``"base"`` for the base model), solo runs."""
    prefix_tokens: int | None = None
    accepted: list[str] = field(default_factory=list)
    """Sampling parameters the backend lists in ``Capabilities.sampling``, each served."""
    refused: list[str] = field(default_factory=list)
    """The other sampling parameters, each refused with ``UnsupportedParameter``."""


def _require(ok: bool, check: str, message: str) -> None:
    if not ok:
        raise ConformanceError(f"[{check}] {message}")


async def check_backend(
    make_backend: Callable[[], Backend],
    adapters: Mapping[str, str | Path],
    *,
    max_tokens: int = 12,
    prefix_tokens: int | None = None,
) -> BackendReport:
    """Run every check on a backend made by ``make_backend``; return what was seen.

    ``adapters`` maps names to PEFT adapter directories the backend can serve;
    give at least as many as the backend has slots plus one (so slots must be
    reused) and at least two. Checks: capabilities, streaming, mixed adapters
    in one batch, more adapters than slots, cancellation, unload drains
    in-flight requests, a request resumed after part of its output goes on with
    the rest (backends that offer it), typed errors, and a row per sampling parameter
    (served if ``Capabilities.sampling`` lists it, refused with
    :class:`~lorapool.errors.UnsupportedParameter` by the backend and the pool if not;
    :attr:`BackendReport.accepted` and :attr:`BackendReport.refused` say which).
    """
    _require(len(adapters) >= 2, "setup", "give at least two adapters")
    report = BackendReport(prefix_tokens=prefix_tokens)
    backend = make_backend()
    async with AdapterPool(backend) as pool:
        caps = backend.capabilities
        # Fixed-length streams where the backend can keep going past EOS (TGI cannot).
        fixed = "ignore_eos" in caps.sampling
        greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=fixed)
        _require(caps.max_slots >= 1 and caps.max_rank >= 1, "capabilities", f"{caps}")
        _require(bool(caps.base_model), "capabilities", "base_model is empty")
        _require(await backend.health(), "capabilities", "health() is False after start")
        report.checks.append("capabilities")
        names = list(adapters)
        full_ids: dict[
            str, str
        ] = {}  # the registry's ids (tenant/name), which the store and the engine use
        for name in names:
            full_ids[name] = (
                await pool.register(name, str(adapters[name]), tenant=_TENANT)
            ).adapter_id

        # Streaming: several chunks, the last with finish reason and usage.
        chunks = [
            c async for c in pool.generate(PROMPT, adapter=names[0], tenant=_TENANT, params=greedy)
        ]
        ids = [t for c in chunks for t in c.token_ids]
        last = chunks[-1]
        _require(len(chunks) >= 2, "streaming", f"{len(chunks)} chunk(s) for {max_tokens} tokens")
        _require(last.finish_reason == "length", "streaming", f"finish {last.finish_reason!r}")
        _require(
            last.usage is not None and last.usage.completion_tokens == len(ids) == max_tokens,
            "streaming",
            f"usage {last.usage} for {len(ids)} streamed tokens",
        )
        _require(
            all(c.finish_reason is None for c in chunks[:-1]),
            "streaming",
            "a chunk before the last has a finish reason",
        )
        report.checks.append("streaming")

        # Solo runs, then everything at once: each output must not change.
        async def run(adapter: str | None) -> list[int]:
            done = await pool.complete(PROMPT, adapter=adapter, tenant=_TENANT, params=greedy)
            return list(done.token_ids)

        solo = {"base": await run(None)}
        for name in names:
            solo[name] = await run(name)
        report.outputs = solo
        differing = [n for n in names if solo[n] != solo["base"]]
        _require(
            len(differing) >= 2,
            "mixed",
            f"only {differing} change the base model's output: adapters are not applied",
        )
        keys = ["base", *names, *names]
        together = await asyncio.gather(*(run(None if k == "base" else k) for k in keys))
        k = prefix_tokens or max_tokens
        for key, got in zip(keys, together, strict=True):
            _require(
                got[:k] == solo[key][:k],
                "mixed",
                f"{key} in a mixed batch gave {got[:k]}, alone {solo[key][:k]}",
            )
        report.checks.append("mixed")
        if len(names) > caps.max_slots:
            report.checks.append("more-adapters-than-slots")

        # Cancellation: leave a long stream early; the engine keeps serving.
        long = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=fixed)
        stream = pool.generate(PROMPT, adapter=names[1], tenant=_TENANT, params=long)
        seen = 0
        async for chunk in stream:
            seen += len(chunk.token_ids)
            if seen >= 2:
                break
        await stream.aclose()
        _require(seen < 64, "cancellation", "the stream ran to the end before it was closed")
        _require(
            pool.store.refs(full_ids[names[1]]) == 0,
            "cancellation",
            "the cancelled request holds its adapter",
        )
        _require(await backend.health(), "cancellation", "unhealthy after a cancelled stream")
        _require(await run(names[1]) == solo[names[1]], "cancellation", "serving after a cancel")
        report.checks.append("cancellation")

        # Unload drains: a request in flight finishes whole; the adapter then leaves the device.
        target = names[0]
        mid = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=fixed)
        started = asyncio.Event()
        received: list[int] = []

        async def in_flight() -> None:
            async for chunk in pool.generate(PROMPT, adapter=target, tenant=_TENANT, params=mid):
                received.extend(chunk.token_ids)
                started.set()

        task = asyncio.create_task(in_flight())
        await started.wait()
        await pool.unload(target, tenant=_TENANT)
        _require(
            len(received) == 24,
            "unload-drain",
            f"unload returned after {len(received)} of the request's 24 tokens",
        )
        await task
        _require(not pool.store.on_device(full_ids[target]), "unload-drain", "still on the device")
        _require(await run(target) == solo[target], "unload-drain", "reload gives other output")
        report.checks.append("unload-drain")

        if caps.resume:
            await _check_resume(pool, backend, names[1], solo[names[1]], greedy)
            report.checks.append("resume")

        # Errors are typed, and nothing else is harmed.
        try:
            await pool.complete(PROMPT, adapter="no/such-adapter", tenant=_TENANT, params=greedy)
        except AdapterNotFound:
            pass
        else:
            _require(False, "errors", "an unknown adapter did not raise AdapterNotFound")
        bogus = GenerationRequest("conformance-bogus", PROMPT, greedy, "never-loaded", 0)
        agen = backend.generate(bogus)
        try:
            await agen.__anext__()
        except LorapoolError:
            pass
        except StopAsyncIteration:
            _require(False, "errors", "a request for an adapter never loaded produced nothing")
        else:
            _require(False, "errors", "a request for an adapter never loaded was served")
        finally:
            with contextlib.suppress(BaseException):
                await agen.aclose()  # type: ignore[attr-defined]
        _require(await run(None) == solo["base"], "errors", "serving after an error")
        report.checks.append("errors")

        await _check_sampling(pool, backend, report)
        _require(await run(None) == solo["base"], "sampling", "serving after the sampling rows")
        report.checks.append("sampling")
    _require(not await backend.health(), "close", "health() is True after the pool closed")
    report.checks.append("close")
    return report


async def _check_resume(
    pool: AdapterPool, backend: Backend, name: str, solo: list[int], greedy: SamplingParams
) -> None:
    """Resumed after half its output, a request streams the other half (greedy: the same
    tokens as the solo run) and reports usage as if it had never stopped."""
    info = pool.registry.resolve(name, _TENANT)
    slot = await pool.store.acquire(info)
    try:
        half = len(solo) // 2
        request = GenerationRequest(
            "conformance-resume", PROMPT, greedy, info.adapter_id, slot, tuple(solo[:half])
        )
        chunks = [c async for c in backend.generate(request)]
    finally:
        pool.store.release(info.adapter_id)
    rest = [t for c in chunks for t in c.token_ids]
    _require(rest == solo[half:], "resume", f"resumed after {half} tokens: {rest}, solo {solo}")
    usage = chunks[-1].usage if chunks else None
    _require(
        usage is not None and usage.completion_tokens == len(solo),
        "resume",
        f"usage {usage}: completion should count all {len(solo)} tokens",
    )


async def _check_sampling(pool: AdapterPool, backend: Backend, report: BackendReport) -> None:
    """A row per sampling parameter: one the backend lists in ``Capabilities.sampling`` is
    served (the request completes, in the shape the parameter asks for); any other is
    refused with :class:`UnsupportedParameter` naming the backend and the parameter, by
    ``backend.generate`` and by ``AdapterPool.generate`` alike, and the backend serves on.
    """
    check = "sampling"
    names = sampling_parameter_names()
    missing = sorted(names - set(PARAMETER_SAMPLES))
    _require(not missing, check, f"no sample request for {missing} (update PARAMETER_SAMPLES)")
    supported = backend.capabilities.sampling
    unknown = sorted(supported - names)
    _require(not unknown, check, f"Capabilities.sampling names unknown parameters {unknown}")
    backend_name = type(backend).__name__
    for name in sorted(names):
        fields = dict(PARAMETER_SAMPLES[name])
        if "max_tokens" in supported and "max_tokens" not in fields:
            fields["max_tokens"] = 8
        params = SamplingParams(**fields)
        row = f"{check}/{name}"
        if name in supported:
            try:
                chunks = [c async for c in pool.generate(PROMPT, tenant=_TENANT, params=params)]
            except LorapoolError as exc:
                _require(False, row, f"listed in Capabilities.sampling, but refused: {exc!r}")
            _check_served(row, name, params, chunks)
            report.accepted.append(name)
            continue
        request = GenerationRequest(f"conformance-{name}", PROMPT, params)
        agen: Any = None
        try:
            agen = backend.generate(request)  # refused when called, or at the first chunk
            await agen.__anext__()
        except UnsupportedParameter as exc:
            _require_refusal(row, "backend.generate", exc, backend_name, name)
        except StopAsyncIteration:
            _require(False, row, "backend.generate produced nothing, and raised nothing")
        except LorapoolError as exc:
            _require(False, row, f"backend.generate raised {exc!r}, not UnsupportedParameter")
        else:
            _require(False, row, f"backend.generate served a request setting {name}")
        finally:
            if agen is not None:
                with contextlib.suppress(BaseException):
                    await agen.aclose()
        try:
            await pool.complete(PROMPT, tenant=_TENANT, params=params)
        except UnsupportedParameter as exc:
            _require_refusal(row, "AdapterPool.generate", exc, backend_name, name)
        else:
            _require(False, row, f"AdapterPool.generate served a request setting {name}")
        report.refused.append(name)
        _require(await backend.health(), row, "unhealthy after a refused request")


def _require_refusal(
    row: str, where: str, exc: UnsupportedParameter, backend_name: str, name: str
) -> None:
    _require(
        exc.backend == backend_name and name in exc.parameters,
        row,
        f"{where} refused with backend={exc.backend!r} parameters={exc.parameters}; "
        f"expected {backend_name!r} and {name!r}",
    )


def _check_served(row: str, name: str, params: SamplingParams, chunks: list[Chunk]) -> None:
    """A served request's stream: every sample ends with a finish reason, the stream's last
    chunk carries usage, and what the parameter promises has its shape."""
    _require(bool(chunks), row, "the stream was empty")
    _require(chunks[-1].usage is not None, row, "the last chunk carries no usage")
    samples: dict[int, list[Chunk]] = {}
    for chunk in chunks:
        samples.setdefault(chunk.index, []).append(chunk)
    _require(
        sorted(samples) == list(range(params.n)),
        row,
        f"chunks for samples {sorted(samples)}, expected 0..{params.n - 1}",
    )
    produced = 0
    for index, own in samples.items():
        finishes = [c.finish_reason for c in own if c.finish_reason is not None]
        _require(
            len(finishes) == 1 and own[-1].finish_reason is not None,
            row,
            f"sample {index}: finish reasons {finishes}, the last only expected",
        )
        produced += sum(len(c.token_ids) for c in own)
    usage = chunks[-1].usage
    _require(
        usage is not None and usage.completion_tokens >= produced,
        row,
        f"usage {usage} for {produced} streamed tokens",
    )
    if params.logprobs:
        for chunk in chunks:
            _require(
                len(chunk.logprobs) == len(chunk.token_ids),
                row,
                f"{len(chunk.logprobs)} logprobs for {len(chunk.token_ids)} tokens",
            )
            for entry in chunk.logprobs:
                _require(entry.logprob <= 0.0, row, f"log-probability {entry.logprob} > 0")
                _require(
                    len(entry.top) == params.top_logprobs,
                    row,
                    f"{len(entry.top)} alternatives, top_logprobs={params.top_logprobs}",
                )
    if name == "structured.choice" and params.structured is not None:
        for index, own in samples.items():
            text = "".join(c.text for c in own)
            if own[-1].finish_reason == "stop":
                _require(
                    text in params.structured.choices,
                    row,
                    f"sample {index} gave {text!r}, not one of {params.structured.choices}",
                )
