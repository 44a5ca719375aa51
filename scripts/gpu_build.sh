#!/usr/bin/env bash
# The extension built in place for the GPU of this machine alone, the quickest build that tests
# what will run there: `make gpu-check`'s build stage, and `make gpu-profile`'s when no build is
# in place. Then each kernel's registers, stack (spills) and shared memory as built.
#
# A compiler whose shared libraries would carry their own static libstdc++ gives way to the
# system's gcc/g++: the first GPU machine's CXX (a g++ wrapper) linked one in, and its number
# formatting crashed on the process's locale (benchmarks/RESULTS.md, the first GPU runs);
# setup.py refuses such a library. A build without kernels (no nvcc found) fails here rather
# than in every test.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${ARCH:-9.0}}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export LLAMA_EXT_NVCC_THREADS=1  # one arch: nvcc has nothing to run in parallel
# One CPU kernel library (the portable one) where the build makes one per vector ISA: these runs
# test CUDA, and each library is a separate, sequential extension build.
export LLAMA_EXT_CPU_CAPABILITIES=default

# Whether the C++ compiler $1 still links a static copy of libstdc++ into a shared library behind
# an explicit -lstdc++ (setup.py's link; it refuses such a library, by the symbols of
# _LIBSTDCXX_INTERNALS): one tiny library, a second.
static_libstdcxx() {
  local dir rc
  dir=$(mktemp -d)
  printf '#include <sstream>\nstd::string f(long x) { std::ostringstream s; s << x; return s.str(); }\n' >"$dir/t.cpp"
  "$1" -shared -fPIC "$dir/t.cpp" -o "$dir/t.so" -lstdc++ 2>/dev/null && nm -D --defined-only "$dir/t.so" | grep -q ' _ZNSt6localeC1Ev$'
  rc=$?
  rm -rf "$dir"
  return $rc
}

if static_libstdcxx "${CXX:-c++}"; then
  echo "${CXX:-c++} links libstdc++ statically: building with CC=gcc CXX=g++"
  export CC=gcc CXX=g++
fi
LLAMA_EXT_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace || exit
"$PY" -c 'import llama_ext; assert llama_ext.cuda_kernels_built(), "built without CUDA kernels: nvcc not found?"' || exit
cuobjdump -res-usage llama_ext/_C*.so | grep -A1 llama_ext || echo 'cuobjdump -res-usage: unavailable'
