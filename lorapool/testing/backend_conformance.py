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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorapool.abc import Backend
from lorapool.errors import AdapterNotFound, LorapoolError
from lorapool.pool import AdapterPool
from lorapool.types import GenerationRequest, SamplingParams

__all__ = ["ALL_CHECKS", "BackendReport", "ConformanceError", "check_backend"]

ALL_CHECKS = (
    "capabilities",
    "streaming",
    "mixed",
    "more-adapters-than-slots",
    "cancellation",
    "unload-drain",
    "resume",
    "errors",
    "close",
)
"""Every check, in the order :func:`check_backend` runs them (``more-adapters-than-slots``
only when more adapters than the backend's slots are given, ``resume`` only for a backend
with ``Capabilities.resume``)."""

PROMPT = "Write one sentence about the sea."
_TENANT = "conformance"


class ConformanceError(AssertionError):
    """A backend broke the contract; the message says which check and how."""


@dataclass
class BackendReport:
    """What :func:`check_backend` ran and saw."""

    checks: list[str] = field(default_factory=list)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    """Greedy token ids per adapter (``"base"`` for the base model), solo runs."""
    prefix_tokens: int | None = None


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
    the rest (backends that offer it), and typed errors.
    """
    _require(len(adapters) >= 2, "setup", "give at least two adapters")
    report = BackendReport(prefix_tokens=prefix_tokens)
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    backend = make_backend()
    async with AdapterPool(backend) as pool:
        caps = backend.capabilities
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
        long = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
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
        mid = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
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
