"""Workload generators for ``lorapool bench``: seeded, so a seed fixes every request.

* S-LoRA style: Gamma-distributed inter-arrival times with a given rate and
  coefficient of variation (cv = 1 is Poisson; larger is burstier), adapter
  popularity by a power law with exponent ``alpha`` (the i-th most popular
  adapter drawn with weight ``i**-alpha``), and input/output lengths from a
  :class:`Lengths` distribution.
* Punica's four popularity patterns: ``distinct`` (every request its own
  adapter), ``uniform``, ``skewed`` (Zipf, alpha 1.5) and ``identical`` (one
  adapter for all).
* Trace replay: a CSV with a timestamp, input-token and output-token column and
  optional adapter and tenant columns; the Azure LLM inference trace layout
  (``TIMESTAMP,ContextTokens,GeneratedTokens``) is read as is.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

__all__ = [
    "PATTERNS",
    "Lengths",
    "Request",
    "gamma_arrivals",
    "pattern_weights",
    "read_trace",
    "slora_workload",
    "zipf_weights",
]

Pattern = Literal["distinct", "uniform", "skewed", "identical"]
PATTERNS: tuple[Pattern, ...] = ("distinct", "uniform", "skewed", "identical")


@dataclass(frozen=True)
class Request:
    """One request of a workload: when, which adapter and tenant, how many tokens."""

    at: float
    """Seconds from the start of the run."""
    adapter: str | None
    tenant: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: ``fixed:N``, ``uniform:LO,HI`` or ``lognormal:MEAN,CV``.

    ``lognormal`` takes the mean and coefficient of variation of the lengths
    themselves (not of their logarithm); samples are rounded and at least 1.
    """

    kind: Literal["fixed", "uniform", "lognormal"]
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Lengths:
        """From ``fixed:128``, ``uniform:8,512`` or ``lognormal:256,0.5``."""
        kind, _, rest = spec.partition(":")
        try:
            values = [float(v) for v in rest.split(",")] if rest else []
        except ValueError:
            raise ValueError(f"bad length spec {spec!r}: numbers expected after ':'") from None
        if kind == "fixed" and len(values) == 1 and values[0] >= 1:
            return cls("fixed", values[0])
        if kind == "uniform" and len(values) == 2 and 1 <= values[0] <= values[1]:
            return cls("uniform", values[0], values[1])
        if kind == "lognormal" and len(values) == 2 and values[0] >= 1 and values[1] > 0:
            return cls("lognormal", values[0], values[1])
        raise ValueError(
            f"bad length spec {spec!r}; use fixed:N, uniform:LO,HI or lognormal:MEAN,CV"
        )

    def sample(self, rng: random.Random) -> int:
        """One length."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        sigma2 = math.log1p(self.b**2)
        mu = math.log(self.a) - sigma2 / 2
        return max(1, round(rng.lognormvariate(mu, math.sqrt(sigma2))))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        return f"{self.kind}:{self.a:g},{self.b:g}"


def gamma_arrivals(rng: random.Random, *, rate: float, cv: float, duration: float) -> list[float]:
    """Arrival times in ``[0, duration)``: Gamma inter-arrivals with mean ``1/rate``, cv ``cv``."""
    if rate <= 0 or cv <= 0 or duration <= 0:
        raise ValueError("rate, cv and duration must be > 0")
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    out: list[float] = []
    t = rng.gammavariate(shape, scale)
    while t < duration:
        out.append(t)
        t += rng.gammavariate(shape, scale)
    return out


def zipf_weights(n: int, alpha: float) -> list[float]:
    """Popularity of ``n`` adapters, the i-th (from 1) with weight ``i**-alpha``, summing to 1."""
    if n < 1:
        raise ValueError("n must be >= 1")
    raw = [(i + 1) ** -alpha for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def pattern_weights(pattern: Pattern, n: int) -> list[float]:
    """Punica's popularity patterns over ``n`` adapters (``distinct`` is handled by the caller)."""
    if pattern == "identical":
        return [1.0] + [0.0] * (n - 1)
    if pattern == "uniform":
        return [1.0 / n] * n
    if pattern == "skewed":
        return zipf_weights(n, 1.5)
    raise ValueError(f"unknown pattern {pattern!r}; use one of {PATTERNS}")


def slora_workload(
    *,
    seed: int,
    duration: float,
    rate: float,
    cv: float = 1.0,
    adapters: Sequence[str],
    alpha: float | None = 1.0,
    pattern: Pattern | None = None,
    tenants: int = 4,
    input_lengths: Lengths = Lengths("fixed", 32),
    output_lengths: Lengths = Lengths("fixed", 16),
) -> list[Request]:
    """Gamma arrivals, power-law (``alpha``) or Punica ``pattern`` popularity, length draws.

    Tenant ``t{k}`` owns every adapter whose index is ``k`` modulo ``tenants``;
    ``distinct`` gives each request its own adapter, named ``adapters[i % len]``
    (so pass at least as many adapters as requests for truly distinct ones).
    """
    rng = random.Random(seed)
    times = gamma_arrivals(rng, rate=rate, cv=cv, duration=duration)
    if pattern is not None:
        weights = None if pattern == "distinct" else pattern_weights(pattern, len(adapters))
    else:
        weights = zipf_weights(len(adapters), 1.0 if alpha is None else alpha)
    out: list[Request] = []
    for i, at in enumerate(times):
        index = i % len(adapters) if weights is None else _draw(rng, weights)
        out.append(
            Request(
                at=at,
                adapter=adapters[index],
                tenant=f"t{index % tenants}",
                input_tokens=input_lengths.sample(rng),
                output_tokens=output_lengths.sample(rng),
            )
        )
    return out


def _draw(rng: random.Random, weights: Sequence[float]) -> int:
    return rng.choices(range(len(weights)), weights=weights)[0]


_TIME = ("timestamp", "time", "at", "arrival")
_INPUT = ("contexttokens", "input_tokens", "prompt_tokens", "input")
_OUTPUT = ("generatedtokens", "output_tokens", "completion_tokens", "output")


def _column(header: Sequence[str], names: Sequence[str], path: Path, required: bool) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    if required:
        raise ValueError(f"{path}: no column named any of {list(names)} in header {list(header)}")
    return None


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    text = value.strip()
    # Azure's traces: "2023-11-16 18:15:46.6805900" (7 fractional digits).
    head, dot, frac = text.partition(".")
    if dot:
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text).timestamp()


def read_trace(
    path: str | Path,
    *,
    adapters: Sequence[str] | None = None,
    limit: int | None = None,
    speedup: float = 1.0,
) -> list[Request]:
    """Requests from a CSV trace, times relative to the first row, divided by ``speedup``.

    Columns (case-insensitive): a timestamp (``TIMESTAMP``: seconds or an ISO
    date-time), input tokens (``ContextTokens``), output tokens
    (``GeneratedTokens``), and optionally ``adapter`` and ``tenant``. Rows
    without an adapter get ``adapters[row % len(adapters)]`` when ``adapters``
    is given, else the base model.
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty trace") from None
        t_col = _column(header, _TIME, path, True)
        i_col = _column(header, _INPUT, path, True)
        o_col = _column(header, _OUTPUT, path, True)
        a_col = _column(header, ("adapter", "adapter_id", "model"), path, False)
        n_col = _column(header, ("tenant", "user"), path, False)
        assert t_col is not None and i_col is not None and o_col is not None
        rows: list[tuple[float, Request]] = []
        for n, row in enumerate(reader):
            if limit is not None and n >= limit:
                break
            if not row:
                continue
            try:
                at = _seconds(row[t_col])
                tokens_in, tokens_out = int(row[i_col]), int(row[o_col])
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}: row {n + 2}: {exc}") from None
            adapter = row[a_col] if a_col is not None and row[a_col] else None
            if adapter is None and adapters:
                adapter = adapters[n % len(adapters)]
            tenant = row[n_col] if n_col is not None and row[n_col] else "trace"
            rows.append((at, Request(0.0, adapter, tenant, max(1, tokens_in), max(1, tokens_out))))
    if not rows:
        return []
    start = min(at for at, _ in rows)
    return sorted(
        (
            Request((at - start) / speedup, r.adapter, r.tenant, r.input_tokens, r.output_tokens)
            for at, r in rows
        ),
        key=lambda r: r.at,
    )
