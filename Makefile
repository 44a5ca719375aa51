# Two commands on a fresh machine: `make test` and `make bench`. Both create .venv, install
# torch (a CUDA build, so the CUDA kernels compile even without a GPU) and the requirements,
# and build the extension in place (`setup.py build_ext --inplace`; tests and benchmarks import
# ./llama_ext). The build is a file that depends on every source: an unchanged tree builds
# nothing, and a changed one recompiles only what changed (ninja, objects kept under build/).
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME MAX_JOBS
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all build test bench wheel gpu-check gpu-profile clean FORCE

all: test

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
BUILT := build/.built
# The environment setup.py reads is an input too: build/.env changes only when it does.
BUILD_ENV := $(LLAMA_EXT_CPU_ONLY):$(LLAMA_EXT_CPU_CAPABILITIES):$(LLAMA_EXT_OPENMP):$(TORCH_CUDA_ARCH_LIST):$(CUDA_HOME):$(LLAMA_EXT_PTXAS_VERBOSE):$(LLAMA_EXT_NVCC_THREADS)

build/.env: FORCE
	@mkdir -p build
	@echo '$(BUILD_ENV)' | cmp -s - $@ || echo '$(BUILD_ENV)' > $@

$(BUILT): $(VENV)/.installed $(SOURCES) build/.env
	$(VPY) setup.py -q build_ext --inplace
	touch $@

build: $(BUILT)

test: build
	$(VPY) -m pytest tests -q -rs

bench: build
	$(VPY) -m benchmarks $(BENCH_ARGS)

# A wheel for this Python and torch, in dist/ (README: "Wheels").
wheel: $(VENV)/.installed
	$(VPY) -m pip wheel --no-build-isolation --no-deps -w dist .

# On a lent GPU machine: system python3 with torch, no venv and no downloads; every core builds
# (MAX_JOBS above is sized for the 2-core CI machine). LLAMA_EXT_GPU_CHECK_DRY_RUN=1: the same
# flow without a GPU, GPU stages stubbed.
gpu-check:
	MAX_JOBS=$$(nproc) bash scripts/gpu_check.sh

# On a lent GPU machine, best in the call after gpu-check (it reuses the in-place build): Nsight
# Compute over the performance targets' shapes, one report per group of ops.
gpu-profile:
	bash scripts/gpu_profile.sh

clean:
	rm -rf build dist *.egg-info llama_ext/*.so
