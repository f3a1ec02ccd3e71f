"""lorapool quickstart: several tenants, their own LoRA adapters, one shared engine.

    python examples/quickstart.py

Serves SmolLM2-135M-Instruct on the embedded TorchBackend (CPU is fine) with
three briefly trained adapters (pirate, French, shouting) plus the base model.
Every tenant's requests run concurrently in shared batches: one forward pass
holds rows for different adapters. Prints each tenant's answer and a summary.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.backends.torch import TorchBackend, ensure_demo_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_adapter import PERSONAS, default_out  # noqa: E402

TENANTS = {
    "acme": ("acme/pirate", "pirate"),
    "globex": ("globex/french", "french"),
    "initech": ("initech/caps", "caps"),
    "umbrella": (None, None),  # uses the base model
}
QUESTIONS = [
    "What is the best way to learn a new language?",
    "Can you suggest a fun weekend activity?",
    "Why do leaves change colour in autumn?",
]


def ensure_adapters() -> dict[str, Path]:
    """The trained demo adapters; trains them in a child process the first time."""
    out = default_out()
    paths = {name: out / name for name in PERSONAS}
    if not all((p / "adapter_model.safetensors").is_file() for p in paths.values()):
        # A separate process keeps training's torch threads out of the serving process.
        subprocess.run(
            [sys.executable, str(HERE / "train_adapter.py"), "--out", str(out)], check=True
        )
    return paths


async def main() -> None:
    """Register the adapters, serve every tenant concurrently, print answers and a summary."""
    model_dir = ensure_demo_model()
    adapters = ensure_adapters()
    backend = TorchBackend(model_dir, max_slots=4, max_rank=16, max_batch=16, max_seq_len=512)
    async with AdapterPool(backend, store=TieredStore(host_bytes="256MiB")) as pool:
        for tenant, (adapter_id, persona) in TENANTS.items():
            if adapter_id is not None and persona is not None:
                await pool.register(adapter_id, str(adapters[persona]), tenant=tenant)

        params = SamplingParams(max_tokens=48, temperature=0.0)

        async def ask(tenant: str, question: str) -> tuple[str, str, str]:
            adapter_id, _ = TENANTS[tenant]
            text = []
            async for chunk in pool.generate(
                [{"role": "user", "content": question}],
                adapter=adapter_id,
                tenant=tenant,
                params=params,
            ):
                text.append(chunk.text)
            return tenant, question, "".join(text).strip()

        started = time.perf_counter()
        jobs = [ask(t, q) for q in QUESTIONS for t in TENANTS]
        answers = await asyncio.gather(*jobs)
        elapsed = time.perf_counter() - started

    for question in QUESTIONS:
        print(f"\nQ: {question}")
        for tenant, q, answer in answers:
            if q == question:
                adapter_id = TENANTS[tenant][0] or "base model"
                print(f"  [{tenant:<8} {adapter_id:<14}] {answer}")
    stats = backend.stats
    tokens = pool.stats.completion_tokens
    mixed = {k: v for k, v in sorted(stats.distinct_adapters.items())}
    print(
        f"\nsummary: {pool.stats.completed} requests from {len(TENANTS)} tenants, "
        f"{tokens} tokens in {elapsed:.1f} s ({tokens / elapsed:.1f} tok/s); "
        f"up to {stats.max_running} sequences per step; "
        f"forward passes by distinct adapters in the batch: {mixed}"
    )


if __name__ == "__main__":
    asyncio.run(main())
