"""Soak the OpenAI-compatible server: the load test in rounds for a long time, RSS sampled.

    python examples/soak_server.py --minutes 30 --json docs/soak.json

Starts ``examples/openai_server.py`` on 127.0.0.1 with the demo model (2 slots, 5 adapters
over 3 tenants), then runs ``python -m lorapool.testing.loadtest`` (a second process, 20%
of streams cancelled) round after round until the time is up. Prints, per round, the
outcomes and the server's RSS; at the end, the totals and the RSS drift after the first
round (warm-up). Exit status 1 on any unexpected error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"sk-a": "acme", "sk-b": "globex", "sk-c": "initech"}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--round-requests", type=int, default=120)
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args()

    from lorapool.backends.torch import ensure_demo_model
    from lorapool.cache import default_cache_dir
    from lorapool.testing import make_random_adapter

    model = ensure_demo_model()
    names = [f"soak{i}" for i in range(5)]
    root = default_cache_dir() / "soak-adapters"
    for i, name in enumerate(names):
        if not (root / name / "adapter_model.safetensors").is_file():
            import torch
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
            make_random_adapter(root / name, base, rank=8 * (1 + i % 2), seed=100 + i)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="lorapool-soak-"))
    keys = "\n".join(f'"{k}" = {{ tenant = "{t}" }}' for k, t in KEYS.items())
    (work / "server.toml").write_text(
        f'[backend]\nkind = "torch"\nmodel = "{model}"\nmax_slots = 2\nmax_rank = 16\n'
        f'max_batch = 6\noptions = {{ max_seq_len = 256 }}\n\n[store]\nhost_bytes = "64MiB"\n\n'
        f"[keys]\n{keys}\n\n[server]\nport = {port}\n"
    )
    log = (work / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "openai_server.py"), str(work / "server.toml")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    totals: Counter[str] = Counter()
    unexpected = 0
    rss: list[float] = []
    try:
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        models: dict[str, list[str]] = {}
        base = None
        for i, name in enumerate(names):
            key = list(KEYS)[i % len(KEYS)]
            adapter = f"{KEYS[key]}/{name}"
            headers = {"Authorization": f"Bearer {key}"}
            body = {"lora_name": adapter, "lora_path": str(root / name)}
            httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers).raise_for_status()
            if base is None:
                base = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
            models.setdefault(key, [base]).append(adapter)
        deadline = time.monotonic() + args.minutes * 60
        round_no = 0
        while time.monotonic() < deadline:
            round_no += 1
            cmd = [sys.executable, "-m", "lorapool.testing.loadtest", url, "--seed", str(round_no)]
            cmd += ["--requests", str(args.round_requests), "--concurrency", "6", "--cancel", "0.2"]
            for key, ms in models.items():
                cmd += ["--keys", f"{key}={','.join(ms)}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            report = json.loads(done.stdout.strip().splitlines()[-1])
            totals.update(report["outcomes"])
            unexpected += report["unexpected_errors"]
            rss.append(rss_mib(server.pid))
            print(f"round {round_no}: {report['outcomes']} rss {rss[-1]:.0f} MiB", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
    summary = {
        "minutes": args.minutes,
        "rounds": len(rss),
        "outcomes": dict(totals),
        "unexpected_errors": unexpected,
        "rss_after_warmup_mib": round(rss[0], 1) if rss else None,
        "rss_end_mib": round(rss[-1], 1) if rss else None,
        "rss_drift": round(rss[-1] / rss[0] - 1, 4) if len(rss) > 1 else None,
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
