"""The llama.cpp side of ``bench engine --engines torch,llamacpp``: a child process.

Run by :mod:`lorapool.bench.llamacpp` with the llama.cpp venv's python
(``scripts/setup-llamacpp-venv.sh``) as a script, by path: it imports only the standard
library and ``llama_cpp`` (no torch, no lorapool). It speaks JSON lines: one command per
line on stdin, one answer per line on the protocol channel (the process's original stdout;
anything the C library prints to stdout goes to stderr instead, so it cannot corrupt the
protocol). Commands:

``{"op": "load", "name": N, "model": GGUF, "adapters": [GGUF...], "n_ctx": C, "n_threads": T}``
    load a model and its LoRA adapters (``llama_adapter_lora_init``), kept under ``N``;
``{"op": "run", "name": N, "max_tokens": M, "requests": [{"tokens": [...], "adapter": i}]}``
    serve the requests one after another, as a llama-cpp-python user does: before each, the
    request's adapter (an index into the model's adapters, or null for the base model) is
    set on the context (``llama_set_adapters_lora``, scale 1.0) and the context's KV cache
    is cleared (no prefix reuse, like the TorchBackend side with its prefix cache off); then
    ``M`` tokens are generated greedily (temperature 0, end of sequence ignored). Answers
    the tokens, the seconds of the whole run and the tokens generated;
``{"op": "quit"}``.

Every answer has ``"ok"``; a failed command answers ``{"ok": false, "error": ...}`` and the
child goes on.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import sys
import time
from typing import Any, TextIO


def _llama_cpp() -> Any:
    """The llama_cpp module (of the llama.cpp venv; untyped, and absent from lorapool's)."""
    return importlib.import_module("llama_cpp")


class _Model:
    """One loaded GGUF model, its context, and its LoRA adapters."""

    def __init__(self, cmd: dict[str, Any]) -> None:
        llama_cpp = _llama_cpp()
        self._lib = llama_cpp
        threads = int(cmd["n_threads"])
        self.llm = llama_cpp.Llama(
            model_path=str(cmd["model"]),
            n_ctx=int(cmd["n_ctx"]),
            n_batch=int(cmd["n_ctx"]),
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )
        self.adapters: list[Any] = []
        for path in cmd.get("adapters", []):
            adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not adapter:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path}")
            self.adapters.append(adapter)
        self._current: int | str | None = "unset"

    def select(self, adapter: int | None) -> None:
        """Set ``adapter`` (an index, or None for the base model) on the context."""
        if adapter == self._current:
            return
        lib = self._lib
        if adapter is None:
            rc = lib.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            arr = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter])
            scales = (ctypes.c_float * 1)(1.0)
            rc = lib.llama_set_adapters_lora(self.llm.ctx, arr, 1, scales)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({rc}) for adapter {adapter}")
        self._current = adapter

    def complete(self, tokens: list[int], max_tokens: int) -> list[int]:
        """``max_tokens`` greedy tokens after ``tokens``, from an empty KV cache."""
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
            out.append(int(token))
            if len(out) >= max_tokens:
                break
        return out

    def close(self) -> None:
        """Free the adapters and the model."""
        for adapter in self.adapters:
            self._lib.llama_adapter_lora_free(adapter)
        self.adapters.clear()
        self.llm.close()


def _run(model: _Model, cmd: dict[str, Any]) -> dict[str, Any]:
    max_tokens = int(cmd["max_tokens"])
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for req in cmd["requests"]:
        adapter = req.get("adapter")
        model.select(None if adapter is None else int(adapter))
        outputs.append(model.complete([int(t) for t in req["tokens"]], max_tokens))
    seconds = time.perf_counter() - start
    produced = sum(len(o) for o in outputs)
    return {"ok": True, "tokens": outputs, "seconds": seconds, "completion_tokens": produced}


def _serve(commands: TextIO, answers: TextIO) -> None:
    models: dict[str, _Model] = {}

    def answer(obj: dict[str, Any]) -> None:
        answers.write(json.dumps(obj) + "\n")
        answers.flush()

    llama_cpp = _llama_cpp()
    answer(
        {
            "ok": True,
            "ready": True,
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
        }
    )
    for line in commands:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "quit":
                answer({"ok": True})
                break
            if op == "load":
                start = time.perf_counter()
                old = models.pop(str(cmd["name"]), None)
                if old is not None:
                    old.close()
                model = _Model(cmd)
                models[str(cmd["name"])] = model
                answer(
                    {
                        "ok": True,
                        "seconds": time.perf_counter() - start,
                        "adapters": len(model.adapters),
                    }
                )
            elif op == "run":
                answer(_run(models[str(cmd["name"])], cmd))
            else:
                answer({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:
            answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    for model in models.values():
        model.close()


def main() -> int:
    """Serve commands from stdin until ``quit`` or end of input."""
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # C-level prints go to stderr
    sys.stdout = sys.stderr
    _serve(sys.stdin, proto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
