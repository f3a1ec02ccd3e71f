"""A bounded load generator for an OpenAI-compatible lorapool server (run it as its own process).

    python -m lorapool.testing.loadtest URL --keys sk-a=acme/a,acme/b --keys sk-b=globex/x \\
        --requests 200 --concurrency 8 --cancel 0.1 --duration 120 --seed 0

Sends a fixed number of streaming and non-streaming completions and chats, each from a
random key to one of that key's models, cancels a fraction of the streams after their
first chunk, checks every completed response is well formed, and prints one JSON report:
counts by outcome, unexpected errors (with samples), latency percentiles. It stops at
``--requests`` or ``--duration``, whichever comes first. Only loopback or the test's own
hosts should ever be targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["LoadReport", "main", "run_load"]

_PROMPTS = (
    "Tell me about the sea.",
    "Write two lines about mountains.",
    "What is a good name for a cat?",
    "Explain rain to a child.",
)


@dataclass
class LoadReport:
    """What a load run saw."""

    outcomes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        ordered = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(ordered[int(q * (len(ordered) - 1))], 4) if ordered else None

        return {
            "outcomes": dict(self.outcomes),
            "unexpected_errors": len(self.unexpected),
            "samples": self.unexpected[:5],
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
            "seconds": round(self.seconds, 2),
        }


def _check_whole(body: dict[str, Any], chat: bool) -> str | None:
    """Why a non-streamed response is malformed, or None."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        usage = body["usage"]
        ok = (
            isinstance(text, str)
            and choice["finish_reason"] in ("stop", "length")
            and usage["completion_tokens"] >= 1
            and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        )
    except (KeyError, IndexError, TypeError) as exc:
        return f"malformed body ({exc!r}): {str(body)[:200]}"
    return None if ok else f"inconsistent body: {str(body)[:200]}"


async def _one(
    client: httpx.AsyncClient, key: str, model: str, rng: random.Random, cancel: float
) -> tuple[str, str | None]:
    """One request: ``(outcome, problem)``; a problem is an unexpected error."""
    chat = rng.random() < 0.5
    stream = rng.random() < 0.7
    prompt = rng.choice(_PROMPTS)
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(4, 24), "stream": stream}
    body["temperature"] = rng.choice([0.0, 0.7])
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Authorization": f"Bearer {key}"}
    if not stream:
        response = await client.post(path, json=body, headers=headers)
        if response.status_code in (429, 503):
            return "refused", None
        if response.status_code != 200:
            return "error", f"HTTP {response.status_code}: {response.text[:200]}"
        problem = _check_whole(response.json(), chat)
        return ("ok", None) if problem is None else ("malformed", problem)
    async with client.stream("POST", path, json=body, headers=headers) as response:
        if response.status_code in (429, 503):
            return "refused", None
        if response.status_code != 200:
            await response.aread()
            return "error", f"HTTP {response.status_code}: {response.text[:200]}"
        events, done, usage = 0, False, None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return "error", f"stream error: {event['error']}"
            usage = event.get("usage") or usage
            events += 1
            if events == 1 and rng.random() < cancel:
                return "cancelled", None  # leaving the block closes the connection
        if not done or usage is None or usage.get("completion_tokens", 0) < 1:
            return "malformed", f"stream ended without [DONE]/usage after {events} events"
        return "ok", None


async def run_load(
    url: str,
    models: dict[str, list[str]],
    *,
    requests: int,
    concurrency: int = 8,
    cancel: float = 0.1,
    duration: float = 300.0,
    seed: int = 0,
    request_timeout: float = 120.0,
) -> LoadReport:
    """Send ``requests`` requests (or stop after ``duration`` s) with ``concurrency`` workers.

    ``models`` maps an API key to the models it may use; ``request_timeout`` bounds each
    request's connect and reads (seconds).
    """
    rng = random.Random(seed)
    plan = [(k, rng.choice(v)) for k, v in models.items() for _ in range(requests)]
    rng.shuffle(plan)
    plan = plan[:requests]
    report = LoadReport()
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    started = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=request_timeout, limits=limits) as client:

        async def worker(wid: int) -> None:
            wrng = random.Random(seed * 1000 + wid)
            while not queue.empty() and time.monotonic() - started < duration:
                key, model = queue.get_nowait()
                t0 = time.monotonic()
                try:
                    outcome, problem = await _one(client, key, model, wrng, cancel)
                except httpx.HTTPError as exc:
                    outcome, problem = "error", f"{type(exc).__name__}: {exc}"
                report.outcomes[outcome] += 1
                if problem is not None:
                    report.unexpected.append(problem)
                if outcome == "ok":
                    report.latencies.append(time.monotonic() - t0)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: print the report as JSON; exit 1 on any unexpected error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("url")
    parser.add_argument(
        "--keys", action="append", required=True, help="KEY=model1,model2 (repeatable)"
    )
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--cancel", type=float, default=0.1, help="fraction of streams cancelled")
    parser.add_argument("--duration", type=float, default=300.0, help="stop after this, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, s")
    args = parser.parse_args(argv)
    models = {}
    for spec in args.keys:
        key, _, names = spec.partition("=")
        models[key] = [n for n in names.split(",") if n]
    report = asyncio.run(
        run_load(
            args.url,
            models,
            requests=args.requests,
            concurrency=args.concurrency,
            cancel=args.cancel,
            duration=args.duration,
            seed=args.seed,
            request_timeout=args.timeout,
        )
    )
    sys.stdout.write(json.dumps(report.as_dict()) + "\n")
    return 1 if report.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
