#!/usr/bin/env bash
# Build (or reuse) a dedicated virtualenv with llama-cpp-python built from source for this
# machine's CPU, plus llama.cpp's own GGUF converters, for `lorapool bench engine
# --engines torch,llamacpp`.
#
# Usage: scripts/setup-llamacpp-venv.sh [VENV_DIR]
#   VENV_DIR defaults to ${LORAPOOL_CACHE:-$HOME/.cache/lorapool}/venvs/llamacpp
#   PYTHON   (env) interpreter used to create the venv (default: python3, 3.10+)
#   JOBS     (env) parallel compile jobs (default: the cores this process may use)
#
# Idempotent: a stamp file inside the venv records the pinned versions below; when it
# matches, nothing is done. Otherwise the venv is rebuilt from scratch:
#   1. the converters' Python dependencies: torch (the CPU build, as the project's own
#      venv pins it), transformers (5.x, as the project's venv: the demo model's tokenizer
#      files name transformers 5's TokenizersBackend, which the 4.57.6 that llama.cpp's
#      requirements pin cannot load), sentencepiece, protobuf, safetensors, and gguf from
#      PyPI (the same version as the gguf-py the converters ship beside them)
#   2. the llama-cpp-python sdist, downloaded and unpacked to $VENV/src/: its
#      vendor/llama.cpp holds the converters (convert_hf_to_gguf.py,
#      convert_lora_to_gguf.py) that lorapool.bench.llamacpp runs from there
#   3. llama-cpp-python built from that unpacked source with
#      CMAKE_ARGS="-DGGML_NATIVE=ON ..." (a native CPU build: the instruction set of this
#      machine, as a CPU user builds it, less AMX (see NO_AMX below); no BLAS, no GPU; the
#      multimodal library, the tests, tools and examples are not built)
# The benchmark's child process (lorapool/bench/_llamacpp_child.py) runs in this venv and
# imports only llama_cpp and the standard library; torch here is for the converters.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
GGUF_VERSION="0.19.0"
TORCH_VERSION="2.13.0"
TRANSFORMERS_VERSION="5.25.0"
RECIPE_REV="2"   # bump when the build steps change

VENV="${1:-${LORAPOOL_CACHE:-$HOME/.cache/lorapool}/venvs/llamacpp}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
STAMP_FILE="$VENV/.lorapool-llamacpp-stamp"
# GGML_NATIVE: -march=native. Less AMX: ggml's AMX kernels crash here (SIGSEGV in
# ggml_backend_amx_mul_mat on the first Q8_0 decode of the demo model, llama-cpp-python
# 0.3.36, a Sapphire Rapids VM); GCC's explicit -mno-* flags win over -march=native, so
# ggml builds its AVX-512 (VNNI, BF16) kernels and its CPU repacking, not the AMX buffer.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF '-DCMAKE_C_FLAGS=$NO_AMX' '-DCMAKE_CXX_FLAGS=$NO_AMX'"
STAMP="recipe=$RECIPE_REV llama-cpp-python=$LLAMA_CPP_PYTHON_VERSION gguf=$GGUF_VERSION torch=$TORCH_VERSION transformers=$TRANSFORMERS_VERSION cmake=[$CMAKE_FLAGS]"
SRC="$VENV/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"

log() { printf '[setup-llamacpp-venv] %s\n' "$*" >&2; }

is_current() {
    [[ -f "$STAMP_FILE" && -x "$VENV/bin/python" ]] || return 1
    [[ "$(cat "$STAMP_FILE")" == "$STAMP" ]] || return 1
    [[ -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]] || return 1
    "$VENV/bin/python" - "$LLAMA_CPP_PYTHON_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("llama_cpp_python") == sys.argv[1]
import llama_cpp  # the shared library loads
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

log "installing the converters' dependencies (torch==$TORCH_VERSION, transformers==$TRANSFORMERS_VERSION, gguf==$GGUF_VERSION)"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "numpy>=2.2.6"
if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
    log "WARNING: installed torch is a CUDA build (the converters only need the CPU one)"
fi
"${PIP[@]}" install -q "transformers==$TRANSFORMERS_VERSION" "gguf==$GGUF_VERSION" \
    "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0" "safetensors>=0.4"

log "downloading the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
mkdir -p "$VENV/src"
"${PIP[@]}" download -q --no-deps --no-binary :all: -d "$VENV/src" \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
tar -xzf "$VENV/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$VENV/src"
rm -f "$VENV/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"

log "building llama-cpp-python from source ($JOBS jobs, CMAKE_ARGS=$CMAKE_FLAGS)"
BUILD_START=$SECONDS
CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    "${PIP[@]}" install -q --no-cache-dir "$SRC"
log "llama-cpp-python built in $((SECONDS - BUILD_START))s"

log "checking imports"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import gguf, transformers  # noqa: F401
import llama_cpp
print(f"llama-cpp-python {md.version('llama_cpp_python')}, gguf {md.version('gguf')}, "
      f"transformers {transformers.__version__}; "
      f"system: {llama_cpp.llama_print_system_info().decode()}")
EOF

printf '%s' "$STAMP" >"$STAMP_FILE"
log "done in ${SECONDS}s: $VENV"
