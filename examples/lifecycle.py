"""An adapter's whole life on one pool: sign, register, gate, canary, roll back, forget.

    python examples/lifecycle.py

Runs on the demo model (SmolLM2-135M-Instruct on the embedded TorchBackend, CPU) with the
trained demo adapters (``examples/train_adapter.py``: ``pirate`` talks like a pirate,
``caps`` shouts). Tenant ``acme`` owns the alias ``support``:

1. **sign**: a platform key pair; each version's directory gets ``lorapool-signature.json``
   (``lorapool sign DIR --key KEY`` on the command line). acme's policy is ``required``.
2. **register** v1 (the pirate weights). A copy with one byte changed after signing is
   refused (``SignatureError``, reason ``manifest_mismatch``) and nothing changes.
3. **gate** v2 (the same weights, retrained and identical) against v1: the gate's cases run
   through the pool, candidate and baseline in the same batches; it passes and v2 takes
   all traffic, its scores stored in the registry.
4. **refused** v3 (the caps weights): the gate shows the regression, the alias stays on v2.
5. **canary** v3 anyway, at 50% without a gate: users' feedback on its answers is poor, and
   the pool's canary watch rolls the alias back to v2 by itself.
6. **audit**: every step above is in the hash-chained audit log; ``verify()`` checks it.
7. **forget** the alias: every version leaves the registry, the disk tier, host RAM, the
   device and the engine's prefix cache; the next request is ``AdapterNotFound``.

Every step prints what happened; the script exits 0 when each outcome is the expected one.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.backends.torch import TorchBackend, ensure_demo_model
from lorapool.errors import AdapterNotFound, PromotionRefused, SignatureError
from lorapool.lifecycle import CanaryPolicy, EvalCase, Gate
from lorapool.signing import (
    Keyring,
    load_private_key,
    load_public_key,
    sign_directory,
    write_key_pair,
)
from lorapool.types import Completion

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quickstart import ensure_adapters  # noqa: E402

PARAMS = SamplingParams(max_tokens=24, temperature=0.0)
QUESTIONS = [
    "What is the weather like today?",
    "How do I reset my password?",
    "What is a good name for a dog?",
    "How far away is the moon?",
    "Recommend a good book.",
    "Can you suggest a fun weekend activity?",
]


def pirate_feedback(answer: Completion) -> float:
    """What acme's users think of an answer: they came for the pirate (1) or not (0)."""
    text = answer.text.lower()
    return float(any(w in text for w in ("arr", "matey", "ye ", "yo ho", "ahoy")))


def versions(work: Path, adapters: dict[str, Path], key: Path, key_id: str) -> dict[str, Path]:
    """Each version's own directory, signed with the platform key."""
    private = load_private_key(key)
    out = {}
    for version, persona in (("v1", "pirate"), ("v2", "pirate"), ("v3", "caps")):
        path = work / f"support-{version}"
        shutil.copytree(adapters[persona], path)
        sign_directory(path, private, key_id=key_id)
        out[version] = path
    return out


async def canary_traffic(pool: AdapterPool, rounds: int) -> int:
    """acme's users ask questions and rate the answers, until the alias has one version."""
    sent = 0
    for r in range(rounds):
        if len(pool.registry.alias("acme/support", None).traffic) == 1:
            break
        ids = [f"user-{r}-{i}" for i in range(len(QUESTIONS))]
        answers = await asyncio.gather(
            *(
                pool.complete(
                    [{"role": "user", "content": q}],
                    adapter="support",
                    tenant="acme",
                    params=PARAMS,
                    request_id=rid,
                )
                for q, rid in zip(QUESTIONS, ids, strict=True)
            )
        )
        for rid, answer in zip(ids, answers, strict=True):
            sent += pool.feedback(rid, pirate_feedback(answer), tenant="acme")
    return sent


async def main() -> int:
    """Run the lifecycle; 0 when every step ended as it should."""
    model_dir = ensure_demo_model()
    adapters = ensure_adapters()
    work = Path(tempfile.mkdtemp(prefix="lorapool-lifecycle-"))
    try:
        # 1. sign
        key, public, key_id = write_key_pair(work / "keys", key_id="platform-2026")
        keyring = Keyring()
        keyring.add(load_public_key(public.read_bytes()), key_id=key_id)
        dirs = versions(work, adapters, key, key_id)
        print(f"1. signed v1, v2, v3 with key {key_id}")

        backend = TorchBackend(model_dir, max_slots=4, max_rank=16, max_batch=16, max_seq_len=512)
        store = TieredStore(host_bytes="256MiB", disk_dir=work / "store")
        async with AdapterPool(
            backend, store=store, keyring=keyring, signing={"acme": "required"}
        ) as pool:
            # 2. register (and refuse a tampered copy)
            await pool.register("support", str(dirs["v1"]), tenant="acme", version="v1")
            tampered = work / "tampered"
            shutil.copytree(dirs["v1"], tampered)
            weights = tampered / "adapter_model.safetensors"
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0x01
            weights.write_bytes(bytes(data))
            try:
                await pool.register("support", str(tampered), tenant="acme", version="vX")
            except SignatureError as exc:
                print(f"2. registered v1; a tampered copy was refused: {exc.reason}")
            else:
                print("2. FAILED: a tampered adapter was registered")
                return 1

            # 3. gate v2 against v1: the same answers, promoted
            # Greedy answers of the same weights can still differ in a token when the engine
            # batches them differently (floating-point sums in another order): a threshold
            # of 0.2 lets one case in six differ; the caps weights differ in every case.
            gate = Gate(
                [EvalCase(q, params=PARAMS) for q in QUESTIONS],
                name="support-smoke",
                threshold=0.2,
            )
            await pool.register(
                "support", str(dirs["v2"]), tenant="acme", version="v2", activate=False
            )
            done = await pool.promote(
                "support",
                "v2",
                tenant="acme",
                gate=gate,
                on_progress=lambda n, total: print(f"   gate: {n}/{total}", end="\r"),
            )
            print()  # after the progress line
            scores = dict(pool.registry.resolve("acme/support@v2", None).metadata.eval_scores)
            print(f"3. v2 passed the gate and serves {dict(done.traffic)}; scores {scores}")

            # 4. gate v3 (the caps weights): refused, the alias stays on v2
            await pool.register(
                "support", str(dirs["v3"]), tenant="acme", version="v3", activate=False
            )
            try:
                await pool.promote("support", "v3", tenant="acme", gate=gate)
            except PromotionRefused as exc:
                traffic = pool.registry.alias("acme/support", None).traffic
                print(f"4. v3 refused: {exc.reason}; the alias still serves {traffic}")
            else:
                print("4. FAILED: v3 passed the gate")
                return 1

            # 5. canary v3 without a gate: poor feedback, rolled back by the watch
            policy = CanaryPolicy(window=50, min_samples=6, min_feedback=6, max_quality_drop=0.3)
            await pool.promote("support", "v3", tenant="acme", canary=50, canary_policy=policy)
            rated = await canary_traffic(pool, rounds=8)
            traffic = pool.registry.alias("acme/support", None).traffic
            if traffic != {"v2": 100.0}:
                print(f"5. FAILED: the canary was not rolled back: {traffic}")
                return 1
            (rollback,) = pool.audit.entries(action="rollback")
            print(
                f"5. canary v3 rolled back after {rated} rated answers: {rollback.detail['reason']}"
            )

            # 6. audit
            for entry in pool.audit.entries(tenant="acme"):
                print(f"   audit #{entry.seq} {entry.action} {entry.adapter or ''}")
            print(f"6. the audit log's {pool.audit.verify()} entries verify")

            # 7. forget
            report = await pool.forget("support", tenant="acme")
            print(
                f"7. forgot {list(report.registry)}; disk copies deleted: {len(report.disk_paths)}"
            )
            try:
                await pool.complete("Hello", adapter="support", tenant="acme", params=PARAMS)
            except AdapterNotFound:
                print("   acme/support is not found any more")
            else:
                print("7. FAILED: the forgotten adapter still answered")
                return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
