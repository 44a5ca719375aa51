# Two commands on a fresh machine: `make test` and `make bench`. Both create .venv, install
# torch (a CUDA build, so the CUDA kernels compile even without a GPU) and the requirements,
# and build the extension in place with `pip install --no-build-isolation -e .`.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME MAX_JOBS
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all build test bench gpu-check clean

all: test

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

build: $(VENV)/.installed
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(VPY) -m pytest tests -q -rs

bench: build
	$(VPY) -m benchmarks $(BENCH_ARGS)

# On a lent GPU machine: system python3 with torch, no venv and no downloads; every core builds
# (MAX_JOBS above is sized for the 2-core CI machine). LLAMA_EXT_GPU_CHECK_DRY_RUN=1: the same
# flow without a GPU, GPU stages stubbed.
gpu-check:
	MAX_JOBS=$$(nproc) bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info llama_ext/*.so
