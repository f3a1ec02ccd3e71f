"""llama.cpp beside TorchBackend in ``bench engine --engines torch,llamacpp`` (issue 30, item 5).

llama.cpp runs as a CPU user runs it through llama-cpp-python: built from source for this
machine (``make setup-llamacpp``: ``scripts/setup-llamacpp-venv.sh``, a venv of its own),
the model and the PEFT adapters converted to GGUF by llama.cpp's own converters
(``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, shipped in the sdist the venv was
built from), one request at a time with the request's adapter selected on the context
before it (llama.cpp does not batch different adapters together). Two precisions: F32 (the
precision TorchBackend runs here) and Q8_0 (what CPU users run), the adapters in F32
(``convert_lora_to_gguf``'s default) for both.

The llama.cpp side is a child process (:mod:`lorapool.bench._llamacpp_child`, in the
llama.cpp venv, no torch) that answers JSON lines. Every TorchBackend round of the engine
benchmark is followed by one llama.cpp round (base-only and the most adapters, each at F32
and Q8_0), so slow phases of the machine hit both sides; the ratios are medians of
per-round ratios. Same prompts (the same token ids: the chat template is applied here and
the ids sent), same number of requests, same ``max_tokens``, greedy, end of sequence
ignored, no prefix reuse on either side; llama.cpp's threads: ``--threads``, else the CPUs
this process may use, and its OpenMP wait policy the operator's (not the PASSIVE that
:mod:`lorapool.backends.torch` sets for torch).

Converted files are cached under ``<cache>/gguf/``, keyed by the sha256 of the inputs'
files, the converter's version and the output type.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from .prompts import PROMPTS, chat

__all__ = [
    "OUTTYPES",
    "LlamaCppChild",
    "LlamaCppError",
    "LlamaCppSide",
    "LlamaCppVenv",
    "convert_adapter",
    "convert_model",
    "prompt_tokens",
]

OUTTYPES = ("f32", "q8_0")
"""The base model's GGUF types the benchmark runs: F32 (matched) and Q8_0 (what CPU users run)."""

DEFAULT_PYTHON = "~/.cache/lorapool/venvs/llamacpp/bin/python"
CHILD = Path(__file__).with_name("_llamacpp_child.py")
_LABELS = {"f32": "F32", "q8_0": "Q8_0"}


class LlamaCppError(RuntimeError):
    """The llama.cpp venv is missing, a conversion failed, or the child failed or hung."""


class LlamaCppVenv:
    """The llama.cpp venv made by ``scripts/setup-llamacpp-venv.sh``: its python and the
    llama.cpp source tree (converters) of the sdist llama-cpp-python was built from."""

    def __init__(self, python: str | Path = DEFAULT_PYTHON) -> None:
        self.python = Path(python).expanduser()
        if not self.python.is_file():
            raise LlamaCppError(
                f"no llama.cpp venv at {self.python}: run `make setup-llamacpp` "
                "(scripts/setup-llamacpp-venv.sh)"
            )
        root = self.python.parent.parent
        trees = sorted(root.glob("src/llama_cpp_python-*/vendor/llama.cpp"))
        if not trees or not (trees[-1] / "convert_hf_to_gguf.py").is_file():
            raise LlamaCppError(f"no llama.cpp converters under {root / 'src'}: rerun the setup")
        self.llama_dir = trees[-1]
        self.version = trees[-1].parent.parent.name.removeprefix("llama_cpp_python-")

    def convert(self, script: str, *argv: str, timeout: float = 1800.0) -> None:
        """Run one of llama.cpp's converters (``script`` in its tree) with ``argv``."""
        command = [str(self.python), str(self.llama_dir / script), *argv]
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout)[-3000:]
            raise LlamaCppError(f"{script} failed ({done.returncode}):\n{tail}")


def _digest(files: Sequence[Path], root: Path, *extra: str) -> str:
    h = hashlib.sha256()
    for item in extra:
        h.update(item.encode() + b"\0")
    for path in sorted(files):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]


def _cached(target: Path, make: Any) -> Path:
    """``target`` if it exists, else made by ``make(tmp_path)`` and moved there whole."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        out = tmp / target.name
        make(out)
        if not out.is_file():
            raise LlamaCppError(f"the converter wrote no {out.name}")
        out.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_model(venv: LlamaCppVenv, model_dir: Path, outtype: str, cache: Path) -> Path:
    """The Hugging Face model in ``model_dir`` as GGUF of ``outtype`` (``f32``, ``q8_0``):
    ``convert_hf_to_gguf.py --outtype``, cached by content."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, not {outtype!r}")
    key = _digest(_files(model_dir), model_dir, "model", venv.version, outtype)
    target = cache / "gguf" / key[:24] / f"model-{outtype}.gguf"

    def make(out: Path) -> None:
        venv.convert(
            "convert_hf_to_gguf.py", str(model_dir), "--outtype", outtype, "--outfile", str(out)
        )

    return _cached(target, make)


def convert_adapter(venv: LlamaCppVenv, adapter_dir: Path, model_dir: Path, cache: Path) -> Path:
    """The PEFT adapter in ``adapter_dir`` as an F32 GGUF LoRA (``convert_lora_to_gguf.py``,
    its default type), cached by content (the adapter's files and the base's config)."""
    inputs = [*_files(adapter_dir)]
    key = _digest(inputs, adapter_dir, "lora", venv.version, "f32")
    key = hashlib.sha256((key + (model_dir / "config.json").read_text()).encode()).hexdigest()
    target = cache / "gguf" / key[:24] / "lora-f32.gguf"

    def make(out: Path) -> None:
        venv.convert(
            "convert_lora_to_gguf.py",
            str(adapter_dir),
            "--base",
            str(model_dir),
            "--outtype",
            "f32",
            "--outfile",
            str(out),
        )

    return _cached(target, make)


def prompt_tokens(model_dir: Path, count: int) -> list[list[int]]:
    """The token ids of the engine benchmark's ``count`` requests: ``PROMPTS`` in turn as
    chats, the model's chat template applied with the generation prompt (as TorchBackend
    encodes a chat)."""
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(model_dir)
    out: list[list[int]] = []
    for j in range(count):
        ids = tok.apply_chat_template(
            chat(PROMPTS[j % len(PROMPTS)]), add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append([int(i) for i in ids])
    return out


class LlamaCppChild:
    """The llama.cpp child process: commands in, JSON answers out, each with a hang guard."""

    def __init__(self, venv: LlamaCppVenv, timeout: float = 1800.0) -> None:
        self.timeout = timeout
        from lorapool.backends.torch.threads import environ_without_openmp_choice

        # llama.cpp with its own OpenMP defaults (or the operator's), not those lorapool
        # chose for torch in this process.
        env = environ_without_openmp_choice()
        self._proc = subprocess.Popen(
            [str(venv.python), str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env=env,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            raise LlamaCppError(f"the llama.cpp child did not answer in {self.timeout:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise LlamaCppError(f"the llama.cpp child exited ({code}); its stderr shows why")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise LlamaCppError(f"llama.cpp child: {answer.get('error')}")
        return answer

    def call(self, **command: Any) -> dict[str, Any]:
        """Send one command; its answer (raises :class:`LlamaCppError` when it failed)."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(command) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError as exc:
            raise LlamaCppError("the llama.cpp child is gone") from exc
        return self._read()

    def close(self) -> None:
        """Ask the child to quit; kill it if it does not."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write('{"op": "quit"}\n')
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The llama.cpp options of ``bench engine``."""
    parser.add_argument(
        "--llamacpp-python",
        default=DEFAULT_PYTHON,
        help="with --engines ...,llamacpp: the llama.cpp venv's python (make setup-llamacpp)",
    )


class LlamaCppSide:
    """llama.cpp's rounds in the engine benchmark: base-only and ``adapters`` distinct
    adapters (request ``j`` on adapter ``j % adapters``, as TorchBackend's batch), at F32 and
    Q8_0; one round after each TorchBackend round."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, adapters: Sequence[Path]) -> None:
        from lorapool.cache import default_cache_dir

        cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
        try:
            self.venv = LlamaCppVenv(getattr(args, "llamacpp_python", DEFAULT_PYTHON))
        except LlamaCppError as exc:
            raise SystemExit(str(exc)) from exc
        self.k = len(adapters)
        self.max_tokens = int(args.max_tokens)
        self.threads = int(args.threads or len(os.sched_getaffinity(0)))
        print(f"llama.cpp: converting to GGUF under {cache / 'gguf'} (cached)", file=sys.stderr)
        models = {t: convert_model(self.venv, model_dir, t, cache) for t in OUTTYPES}
        loras = [str(convert_adapter(self.venv, a, model_dir, cache)) for a in adapters]
        self.tokens = prompt_tokens(model_dir, int(args.batch))
        self.child = LlamaCppChild(self.venv)
        n_ctx = max(len(t) for t in self.tokens) + self.max_tokens + 8
        try:
            for outtype, path in models.items():
                self.child.call(
                    op="load",
                    name=outtype,
                    model=str(path),
                    adapters=loras,
                    n_ctx=n_ctx,
                    n_threads=self.threads,
                )
            self._warm_up()
        except BaseException:
            self.child.close()
            raise
        self.runs: dict[str, list[float]] = {}
        self.files = {"models": {t: str(p) for t, p in models.items()}, "adapters": loras}

    def _warm_up(self) -> None:
        """Touch every model's weights and every adapter once (pages mapped in, graphs
        allocated), as TorchBackend's warm-up round loads every adapter into its slot."""
        requests = [{"tokens": self.tokens[0], "adapter": a} for a in [None, *range(self.k)]]
        for outtype in OUTTYPES:
            self.child.call(op="run", name=outtype, requests=requests, max_tokens=2)

    def configs(self) -> list[tuple[str, str, int]]:
        """(label, GGUF type, distinct adapters) of each llama.cpp run in a round."""
        return [
            (f"{_LABELS[t]} {'base' if k == 0 else f'{k} adapters'}", t, k)
            for t in OUTTYPES
            for k in (0, self.k)
        ]

    def run_once(self, outtype: str, k: int) -> float:
        """One run of the batch's requests, one after another; tokens per second."""
        requests = [
            {"tokens": t, "adapter": None if k == 0 else j % k} for j, t in enumerate(self.tokens)
        ]
        answer = self.child.call(
            op="run", name=outtype, requests=requests, max_tokens=self.max_tokens
        )
        return float(answer["completion_tokens"]) / float(answer["seconds"])

    def round(self, r: int) -> None:
        """Round ``r``: every configuration once, recorded."""
        for label, outtype, k in self.configs():
            tps = self.run_once(outtype, k)
            self.runs.setdefault(label, []).append(tps)
            print(f"  round {r + 1}: llama.cpp {label:<14} {tps:8.1f} tok/s", file=sys.stderr)

    def report(self, torch_runs: dict[str, list[float]], dtype: str) -> list[dict[str, Any]]:
        """Print llama.cpp's table beside TorchBackend's ``dtype`` runs; its JSON rows."""
        info = self.child.info
        print(
            f"\nllama.cpp (llama-cpp-python {info.get('llama_cpp_python')}, built from source, "
            f"{self.threads} threads, requests one at a time, the adapter set per request) vs "
            f"TorchBackend {dtype} (batched); {len(self.tokens)} requests x {self.max_tokens} "
            "tokens, greedy"
        )
        width = 28
        print(
            f"{'configuration':<{width}}{'tok/s':>10}{'torch tok/s':>13}{'torch / llama.cpp':>19}"
        )
        rows: list[dict[str, Any]] = []
        for label, outtype, k in self.configs():
            runs = self.runs.get(label, [])
            torch_label = "base" if k == 0 else f"{k} adapters"
            theirs = torch_runs.get(torch_label, [])
            if not runs:
                continue
            tps = statistics.median(runs)
            pairs = list(zip(theirs, runs, strict=False))
            ratio = statistics.median(t / r for t, r in pairs) if pairs else None
            torch_tps = statistics.median(theirs) if theirs else None
            shown_t = f"{torch_tps:>13.1f}" if torch_tps is not None else f"{'-':>13}"
            shown_r = f"{ratio:>18.2f}x" if ratio is not None else f"{'-':>19}"
            print(f"{'llama.cpp ' + label:<{width}}{tps:>10.1f}{shown_t}{shown_r}")
            rows.append(
                {
                    "engine": "llama.cpp",
                    "gguf": outtype,
                    "adapters": k,
                    "configuration": f"llama.cpp {label}",
                    "tok_per_s": tps,
                    "rounds": runs,
                    "torch_dtype": dtype,
                    "torch_tok_per_s": torch_tps,
                    "torch_over_llamacpp": ratio,
                }
            )
        return rows

    def meta(self) -> dict[str, Any]:
        """What the llama.cpp side ran: versions, threads, the child's system info, files."""
        return {
            "llama_cpp_python": self.child.info.get("llama_cpp_python"),
            "system_info": self.child.info.get("system_info"),
            "threads": self.threads,
            "requests": len(self.tokens),
            "max_tokens": self.max_tokens,
            "files": self.files,
        }

    def close(self) -> None:
        """Stop the child."""
        self.child.close()
