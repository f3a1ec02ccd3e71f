"""Run every scenario and write the performance page from their output (``docs/performance.md``).

Each section is one scenario run by this command with the arguments shown in
the page: its printed table verbatim, its JSON next to the page, its PNGs
linked. Hand-written analysis for a section lives in
``docs/performance-notes/<scenario>.md`` and is included after the measured
output, so the page never carries numbers this run did not produce. ``vllm``
runs with the vLLM venv's Python (``--vllm-python``) when it exists.
``--quick`` shrinks every run (for smoke tests, not for publishing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lorapool.bench.meta import run_meta

__all__ = ["add_arguments", "run"]

VLLM_PYTHON = Path("~/.cache/lorapool/venvs/vllm/bin/python").expanduser()
# Engines' own log records on stdout (vLLM's "(EngineCore pid=1) INFO 11-22 ..."), not results.
_LOG_LINE = re.compile(r"^(\([\w-]+ pid=\d+\) )?(DEBUG|INFO|WARNING) \d\d-\d\d ")


@dataclass(frozen=True)
class _Section:
    scenario: str
    title: str
    about: str
    args: tuple[str, ...]
    quick: tuple[str, ...]
    plots: tuple[str, ...] = ()


SECTIONS = (
    _Section(
        "engine",
        "Engine: mixed adapters vs base-only vs PEFT",
        "TorchBackend decode throughput with 1, 4 and 16 distinct adapters per batch, against "
        "the base model alone and against PEFT's own mixed-adapter batches, interleaved rounds "
        "(median), in fp32 and in bf16 (both sides in the same dtype). Targets: 16 distinct "
        "adapters ≥ 0.85x base-only; ≥ 3x PEFT's mixed batch.",
        ("--rounds", "5", "--dtype", "float32,bfloat16"),
        ("--rounds", "1", "--batch", "4", "--max-tokens", "4", "--adapters", "1,2", "--no-peft"),
    ),
    _Section(
        "cache",
        "Cache policy simulator: eviction policies vs Belady",
        "Hit ratios of every eviction policy on synthetic workloads (Zipf, scans, shifts), "
        "against Belady's optimum, in one run.",
        (),
        ("--requests", "2000", "--jobs", "1"),
    ),
    _Section(
        "store",
        "Store load paths: disk → host and host → device",
        "Time to bring an adapter from disk to host memory and to switch it onto the device, "
        "interleaved rounds.",
        ("--rounds", "30"),
        ("--rounds", "2"),
    ),
    _Section(
        "fairness",
        "Fairness: FCFS vs FairScheduler",
        "The noisy-neighbour scenario on TorchBackend (one tenant at 10x the others), an "
        "S-LoRA-style Gamma/power-law trace, and the per-request scheduling overhead at up to "
        "10k tenants. Targets: quiet tenants' p99 TTFT ≤ 1.5x baseline; overhead ≤ 50 µs.",
        ("--plot", "{out}/fairness-ttft.png"),
        (
            "--parts",
            "overhead",
            "--overhead-tenants",
            "100",
            "--overhead-requests",
            "2000",
            "--no-plot",
        ),
        ("fairness-ttft.png",),
    ),
    _Section(
        "serve",
        "Serving a workload: latency, SLO and loads vs adapter count",
        "An S-LoRA-style open-loop workload (Poisson arrivals, power-law popularity, lognormal "
        "prompts) through lorapool on TorchBackend with 4 device slots, at 4 and 16 adapters.",
        ("--duration", "30", "--adapters", "4,16", "--plots", "{out}"),
        ("--duration", "2", "--rate", "2", "--adapters", "1,2", "--plots", "{out}"),
        ("serve-ttft-cdf.png", "serve-throughput.png", "serve-tenant-ttft.png"),
    ),
    _Section(
        "vllm",
        "vLLM: raw vLLM vs lorapool over vLLM, and TorchBackend vs vLLM-CPU",
        "The same workload through raw vLLM and through lorapool over vLLM: (a) adapters within "
        "max_loras, throughput ratio (target ≥ 0.97); (b) 4x more hot adapters than max_loras, "
        "power-law popularity, p99 TTFT ratio (target ≤ 0.5); TorchBackend vs vLLM-CPU.",
        ("--cpu-loras", "17"),
        ("--parts", "inside", "--requests", "8"),
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options."""
    parser.add_argument("--out", default="docs", help="directory of the page, JSON, PNGs (docs)")
    parser.add_argument("--only", default=None, help="comma-separated scenarios (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny runs, for smoke tests")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="the vLLM venv's python")


def _command(section: _Section, args: argparse.Namespace, out: Path) -> list[str] | None:
    python = sys.executable
    if section.scenario == "vllm":
        if not Path(args.vllm_python).is_file():
            return None
        python = args.vllm_python
    extra = section.quick if args.quick else section.args
    json_path = out / f"bench-{section.scenario}.json"
    filled = [a.replace("{out}", str(out)) for a in extra]
    return [python, "-m", "lorapool", "bench", section.scenario, *filled, "--json", str(json_path)]


def _split_page(text: str) -> tuple[str, dict[str, str]]:
    """An existing page's header and its sections by title (each with its ``## `` line)."""
    chunks = re.split(r"\n(?=## )", text)
    sections = {}
    for chunk in chunks[1:]:
        title = chunk.splitlines()[0][3:].strip()
        sections[title] = chunk.rstrip("\n")
    return chunks[0].rstrip("\n"), sections


def _run_section(
    section: _Section, args: argparse.Namespace, out: Path, env: dict[str, str], stamp: str
) -> tuple[list[str], bool]:
    """Run one scenario; its part of the page (``stamp`` under its title), and whether it
    succeeded."""
    command = _command(section, args, out)
    parts = [f"## {section.title}", "", section.about, ""] + ([stamp, ""] if stamp else [])
    if command is None:
        parts.append(f"Not run: no vLLM venv at `{args.vllm_python}` (`make setup-vllm`).")
        return parts, True
    shown = " ".join(command[2:])
    print(f"== {shown}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    print(done.stdout[-4000:], flush=True)
    output = "\n".join(ln for ln in done.stdout.splitlines() if not _LOG_LINE.match(ln))
    parts += [f"`{shown}` ({seconds:.0f} s)", "", "```", output.strip("\n"), "```"]
    if done.returncode != 0:
        parts += [
            "",
            f"FAILED (exit {done.returncode}):",
            "",
            "```",
            done.stderr[-3000:],
            "```",
        ]
        return parts, False
    for png in section.plots:
        if (out / png).is_file():
            parts += ["", f"![{png}]({png})"]
    notes = out / "performance-notes" / f"{section.scenario}.md"
    if notes.is_file():
        parts += ["", notes.read_text().strip()]
    return parts, True


def run(args: argparse.Namespace) -> int:
    """Run the sections, then write ``<out>/performance.md``.

    With ``--only``, an existing page keeps its other sections and its header;
    each section run now says when it was re-run.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else {s.scenario for s in SECTIONS}
    unknown = wanted - {s.scenario for s in SECTIONS}
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    meta = {k: v for k, v in run_meta(args).items() if k != "config"}
    page = out / "performance.md"
    partial = bool(args.only) and page.is_file()
    header, kept = _split_page(page.read_text()) if partial else ("", {})
    if not partial:
        header = "\n".join(
            [
                "# Performance",
                "",
                "Generated by `lorapool bench report"
                + (" --quick" if args.quick else "")
                + "`: every figure below is printed by the command shown, in this run, on the "
                "machine described here. Ratios are measured side by side in one run; absolute "
                "times depend on the machine.",
                "",
                "```json",
                json.dumps(meta, indent=2),
                "```",
            ]
        )
    stamp = (
        f"Re-run alone at {meta['when']} (`lorapool bench report --only {args.only}`), on the "
        "machine of the header; the other sections are from the page's earlier run."
        if partial
        else ""
    )
    status = 0
    blocks = [header]
    for section in SECTIONS:
        if section.scenario not in wanted:
            if section.title in kept:
                blocks.append(kept[section.title])
            continue
        parts, ok = _run_section(section, args, out, env, stamp)
        status = status if ok else 1
        blocks.append("\n".join(parts))
    page.write_text("\n\n".join(blocks) + "\n")
    print(f"wrote {page}")
    return status
