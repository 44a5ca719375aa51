#!/usr/bin/env bash
# `make gpu-check`: the whole CUDA verification in one call on a lent GPU machine (system
# python3 with torch, no venv, no downloads). Builds for the local GPU with all cores, runs the
# test suite on CUDA, runs compute-sanitizer (memcheck, racecheck, synccheck) over every CUDA
# kernel at odd sizes, then the benchmark (which rewrites the GPU section of
# benchmarks/RESULTS.md). Each stage has a time limit so the whole run fits in 8 minutes.
# Results go to $OUT (else ./gpu-results), at most 8 files since that is what the device tool
# brings back: summary.txt, env.log, build.log, tests.log, sanitize.log, bench.md, bench.json,
# RESULTS.md. The summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-$PWD/gpu-results}
WORK=$(mktemp -d)
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export LLAMA_EXT_NVCC_THREADS=${LLAMA_EXT_NVCC_THREADS:-4}
# Build only for the GPU that is here: the quickest build that tests what will run.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}

summary=()
failed=0
stage() {  # stage NAME LIMIT_SECONDS COMMAND...: runs with a time limit, logs, records the status
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$WORK/$name.log"
  summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$WORK/$name.log" | cut -c1-110)")")
  [ "$rc" -eq 0 ] || failed=1
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; git rev-parse --short HEAD 2>/dev/null; date -u; } | tee "$RESULTS/env.log"

if stage build 150 env LLAMA_EXT_PTXAS_VERBOSE=1 $PY setup.py build_ext --inplace; then
  # CUDA only: CI runs every CPU test; the 2^31-element CPU tests are left to CI too.
  stage tests 180 env LLAMA_EXT_TEST_DEVICES=cuda $PY -m pytest tests -q -rs -p no:cacheprovider -m "not slow"
  stage memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 $PY scripts/sanitize_kernels.py
  stage racecheck 40 env SANITIZE_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 1 $PY scripts/sanitize_kernels.py
  stage synccheck 25 env SANITIZE_QUICK=1 compute-sanitizer --tool synccheck --error-exitcode 1 $PY scripts/sanitize_kernels.py
  stage bench 70 $PY -m benchmarks --device cuda --out "$WORK/bench" --update-results-md --no-progress
fi

cp "$WORK/build.log" "$RESULTS/build.log"
[ -f "$WORK/tests.log" ] && cp "$WORK/tests.log" "$RESULTS/tests.log"
cat "$WORK"/{memcheck,racecheck,synccheck}.log >"$RESULTS/sanitize.log" 2>/dev/null
[ -f "$WORK/bench/results-cuda.md" ] && cp "$WORK/bench/results-cuda.md" "$RESULTS/bench.md"
[ -f "$WORK/bench/results-cuda.json" ] && cp "$WORK/bench/results-cuda.json" "$RESULTS/bench.json"
cp benchmarks/RESULTS.md "$RESULTS/RESULTS.md"
{
  echo "=== summary ($(head -n 1 "$RESULTS/env.log"))"
  printf '%s\n' "${summary[@]}"
  spills=$(grep -E "spill (stores|loads)" "$WORK/build.log" | grep -vc " 0 bytes spill stores, 0 bytes spill loads")
  echo "kernels with register spills: $spills"
  [ "$failed" -eq 0 ] && echo "gpu-check: PASS" || echo "gpu-check: FAIL"
} | tee "$RESULTS/summary.txt"
exit "$failed"
