#!/usr/bin/env bash
# `make gpu-check`: the whole CUDA verification in one call on a lent GPU machine (its system
# python3 with torch, no venv, no downloads), within 9 minutes, build included.
#
# Stages, in order, each under its own time limit (the table below):
#   env        GPU, driver, toolkit and Python package versions
#   build      the extension for this GPU's architecture only, on all cores, with ptxas -v
#   tests      the test suite's CUDA half (CI runs the CPU half), failing tests named
#   memcheck   compute-sanitizer over scripts/sanitize_kernels.py: every kernel and tail
#   racecheck  the same, the cases with shared memory
#   synccheck  the same, the cases with barriers
#   bench_attention  the benchmark of attention (compute-bound, the longest op) in its own process
#   bench_memory     the benchmark of every other op (the memory-bound ones: decode first, then the
#              rest as benchmarks/cli.py lists them; chunked prefill, compute-bound, runs on CUDA
#              with --full only and is recorded as skipped) in ONE process, with each llama_ext result's
#              kernels and their device times (--kernels). One process pays the cold imports
#              (torch, transformers, torchvision) and the bandwidth ceilings, measured before and
#              after the ops, once instead of once per op; every op has run on the H200 without a
#              crash (2026-12-04), so the isolation of one process per op (a crash costing only
#              its own numbers) is given up for the time it cost.
#              The benchmark writes its tables after each op, so a stage stopped at its limit keeps
#              the ops it finished.
# Every stage after the build runs whatever failed before it. The summary (summary.txt, printed
# last) opens with the verdict and the first failing stage and why, then one line per stage, the
# failing tests, the sanitizer reports, spills and the benchmark tables.
#
# Results go to $OUT (else ./gpu-results): summary.txt, env_build.log, tests.log, sanitize.log,
# bench.log, bench.md, bench.json and, on a GPU, RESULTS.md (benchmarks/RESULTS.md with its cuda
# section rewritten): 8 files, the most the device tool brings back.
#
# LLAMA_EXT_GPU_CHECK_DRY_RUN=1 runs the same control flow, limits and summary on a machine
# without a GPU: nvidia-smi and compute-sanitizer become stubs (scripts/gpu_check_stubs/; the
# sanitizer stub runs the real case list on the CPU kernels), the build and the CUDA tests
# become stub stages, the benchmark runs its --smoke sizes on the CPU. For tests of this script,
# GPU_CHECK_STUB_FAIL and GPU_CHECK_STUB_HANG (stage names, comma-separated) make stub stages
# fail or hang, and GPU_CHECK_LIMIT_<stage>=S overrides one limit.
set -uo pipefail
cd "$(dirname "$0")/.."

# ---- Time limits, seconds: the one place they are set --------------------------------------
# Each stage gets SIGINT at its limit (pytest and the case list then print what they have) and
# SIGKILL GRACE seconds later; the limits plus a grace each must fit TOTAL_LIMIT, which
# `scripts/gpu_check.sh --plan` prints and tests/test_gpu_check.py checks.
# Measured on the H200 machine (2026-12-04, several runs; its 16 cores, torch 2.11):
#   env: 5-10 s.
#   build: 68-81 s from nothing for sm_90 alone; setuptools builds one extension after the other
#     (_C, then the CPU kernel library).
#   tests: 2254 CUDA-half tests (CPU-only ones included) on 12 workers: 2203 ended in 173 s, five
#     of them at a 60 s per-test limit that they pass in ~90 s; the other 51 took 120 s more.
#     The CPU-only modules and tests are now left out; the kernel tests are listed first, so a
#     run stopped at the limit loses the model-level ones (tests/test_transformers*.py) first.
#     The latest run: 201 s of 203 (pytest's own count 195 s); the eighth call's (2802fae) 164 s
#     of 205. Since then the CUDA half grew from 2182 to 2516 tests (collected with transformers
#     5.25; 5.17 there lacks many of the 19 families added, whose tests it skips): 15 s more
#     here, from racecheck (39 s of its 65 used), synccheck (9 of 20) and bench_memory (24 of 55).
#   sanitizers: the case list starts no case in the tool's last SANITIZE_TAIL seconds (--deadline),
#     so a slow tool costs tails, reported, not the whole stage. Python, torch and CUDA start
#     under the tool first: up to ~10 s. memcheck: all 24 cases in 10 s. racecheck: ~50 s of
#     cases, the last three the longest (kvcache_d256 10 s, kvcache_d128 6 s,
#     attention_tiles_d256 4 s). synccheck: ~1 s of cases.
#   bench: tables only (--no-plots: matplotlib's first import took 6+ s), ceilings included.
#     attention 27-34 s; decode 26 s alone, and RMSNorm, the fused add and rotary over 20 s each
#     in their own processes, each paying the imports and the ceilings: bench_memory pays them once.
# 9 minutes (the device tool's 10-minute command limit minus a margin) less ~10 s for the summary.
TOTAL_LIMIT=530
GRACE=3
declare -A LIMIT=(
  [env]=12 [build]=90 [tests]=220
  [memcheck]=20 [racecheck]=60 [synccheck]=15
  [bench_attention]=35 [bench_memory]=50
)
# Per tool: no case starts in its last SANITIZE_TAIL seconds, about its longest case (racecheck's
# kvcache_d256: 10 s; every synccheck case well under 1 s).
declare -A SANITIZE_TAIL=([memcheck]=4 [racecheck]=11 [synccheck]=2)

RESULTS=${OUT:-$PWD/gpu-results}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
DRY_RUN=${LLAMA_EXT_GPU_CHECK_DRY_RUN:-0}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for scripts/*.py too
if [ "$DRY_RUN" = 1 ]; then
  export PATH="$PWD/scripts/gpu_check_stubs:$PATH"
  DEVICE=cpu
else
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export PATH="$CUDA_HOME/bin:$PATH"
  DEVICE=cuda
fi

limit_of() {  # limit_of STAGE: GPU_CHECK_LIMIT_<stage> if set, else the table's, else (bench_all and
  # the skipped `bench`: every op in one stage) the two benchmark stages' limits together
  local override="GPU_CHECK_LIMIT_$1"
  echo "${!override:-${LIMIT[$1]:-$((LIMIT[bench_attention] + LIMIT[bench_memory]))}}"
}

# stage NAME COMMAND...: runs COMMAND under NAME's limit (SIGINT first, so pytest and the case
# list still print what they have; SIGKILL GRACE seconds later), logs to $WORK/NAME.log and records
# "NAME rc seconds limit" in $WORK/stages.tsv. rc 124: stopped at its limit.
stage() {
  local name=$1 limit start rc
  shift
  limit=$(limit_of "$name")
  start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  if [ "$DRY_RUN" = 1 ] && [[ ",${GPU_CHECK_STUB_HANG:-}," == *",$name,"* ]]; then
    set -- sleep 100000
  fi
  timeout -s INT -k "$GRACE" "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 137 ] && rc=124  # killed after the SIGINT grace period: still a timeout
  tail -n 15 "$WORK/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$WORK/stages.tsv"
  return "$rc"
}

skip() {  # skip NAME REASON: a stage that cannot run, recorded as such
  printf '%s\tskip\t0\t%s\t%s\n' "$1" "$(limit_of "$1")" "$2" >>"$WORK/stages.tsv"
}

sanitizer() {  # sanitizer TOOL: compute-sanitizer's TOOL over the case list, bounded by --deadline
  local tool=$1 deadline=$(( $(date +%s) + $(limit_of "$1") - ${SANITIZE_TAIL[$1]} ))
  local opts=(--tool "$tool" --error-exitcode 1 --print-limit 20)
  # Only our kernels are instrumented (torch's own run at full speed); CUDA API errors are ours
  # to check (every launch is checked), torch probes some on purpose.
  opts+=(--kernel-name kns=llama_ext --report-api-errors no)
  # Every tensor its own cudaMalloc, so that an access past a tensor's end is outside any
  # allocation (the caching allocator would hide it inside a larger block).
  local cases=(--tool "$tool" --device "$DEVICE" --deadline "$deadline")
  [ "$DRY_RUN" = 1 ] && cases+=(--head-dims 64,256)  # the CPU takes every multiple of 8
  stage "$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer "${opts[@]}" "$PY" scripts/sanitize_kernels.py "${cases[@]}"
}

# The benchmark's ops (they import the extension: known after the build): attention in
# bench_attention, the others in bench_memory, decode first.
BENCH_OPS=
MEMORY_OPS=()
list_bench_ops() {
  local op
  BENCH_OPS=$("$PY" -c "from benchmarks import cli; print(*cli._op_builders())" 2>"$WORK/bench_ops.err")
  MEMORY_OPS=()
  [[ " $BENCH_OPS " == *" decode "* ]] && MEMORY_OPS+=(decode)
  for op in $BENCH_OPS; do
    [ "$op" = attention ] || [ "$op" = decode ] || MEMORY_OPS+=("$op")
  done
}
bench_stages() {  # the benchmark's stages, in order
  if [ -z "$BENCH_OPS" ]; then echo bench_all; return; fi
  [[ " $BENCH_OPS " == *" attention "* ]] && echo bench_attention
  [ "${#MEMORY_OPS[@]}" -gt 0 ] && echo bench_memory
  return 0
}

plan() {  # the stages in order with their limits, and whether they fit TOTAL_LIMIT
  local total=0 s
  for s in env build tests memcheck racecheck synccheck $(bench_stages); do
    printf '%-28s %4s s\n' "$s" "$(limit_of "$s")"
    total=$((total + $(limit_of "$s") + GRACE))
  done
  printf 'total %s s with %s s grace per stage, of %s s\n' "$total" "$GRACE" "$TOTAL_LIMIT"
  [ "$total" -le "$TOTAL_LIMIT" ]
}
if [ "${1:-}" = --plan ]; then list_bench_ops; plan; exit; fi
mkdir -p "$RESULTS"
echo "gpu-check: results in $RESULTS$([ "$DRY_RUN" = 1 ] && echo '; DRY RUN (GPU stages stubbed)')"

# ---- env ------------------------------------------------------------------------------------
env_report() {  # fails when there is no GPU (outside the dry run) or no torch
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || return 1
  "$PY" - <<'PY' || return 1
import importlib, os, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, end="")
for name in ("transformers", "triton", "xdist", "pytest_timeout"):
    try:
        module = importlib.import_module(name)
        print(f", {name} {getattr(module, '__version__', 'present')}", end="")
    except Exception as e:
        print(f", {name} missing ({type(e).__name__})", end="")
print()
assert os.environ["DRY_RUN"] == "1" or torch.cuda.is_available(), "torch sees no GPU"
PY
  nvcc --version | tail -n 1 || echo "nvcc: missing"
  compute-sanitizer --version | tail -n 1 || echo "compute-sanitizer: missing"
  echo "cores $(nproc); commit $(git rev-parse --short HEAD 2>/dev/null); $(date -u)"
}
export -f env_report
export PY DRY_RUN
stage env bash -c env_report

# ---- build ----------------------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  stage build "$PY" scripts/gpu_check_stubs/stub_stage.py build
else
  stage build bash scripts/gpu_build.sh
fi
built=$?

# ---- tests, sanitizers, benchmark -------------------------------------------------------------
if [ "$built" -eq 0 ]; then
  list_bench_ops
  plan >"$WORK/plan.txt" || echo "WARNING: the stage limits exceed $TOTAL_LIMIT s: $(tail -n 1 "$WORK/plan.txt")"
  # The CUDA half (CI runs every CPU test); the 2^31-element tests are left to CI too. xdist
  # spreads torch.compile's CPU work over the cores; pytest-timeout stops a hung test alone.
  # --durations: the slowest tests in tests.log, to size this stage's limit by.
  pytest_opts=(-v -rfEs -p no:cacheprovider -p scripts.pytest_failure_log -m "not slow" --durations=25)
  "$PY" -c "import xdist" 2>/dev/null && pytest_opts+=(-n "${GPU_CHECK_WORKERS:-12}")
  "$PY" -c "import pytest_timeout" 2>/dev/null && pytest_opts+=(--timeout 150)
  # Each failure's report goes to the log as it happens (scripts/pytest_failure_log.py): a run
  # stopped at its limit still says why.
  export LLAMA_EXT_FAILURE_LOG="$WORK/test_failures.log"
  if [ "$DRY_RUN" = 1 ]; then
    stage tests "$PY" -m pytest "${pytest_opts[@]}" scripts/gpu_check_stubs/test_stub.py
  else
    # The kernels' tests first (pytest skips the files' second mention in tests/).
    # Left to CI, which runs every CPU test: the CPU kernel levels and tiles, gloo's processes, this
    # script's own dry runs.
    stage tests env LLAMA_EXT_TEST_DEVICES=cuda "$PY" -m pytest "${pytest_opts[@]}" \
      --ignore tests/test_distributed.py --ignore tests/test_cpu_capability.py --ignore tests/test_gpu_check.py \
      -k "not on_cpu and not test_cpu_ and not memory_growth_cpu and not out_of_table_cpu" tests/test_attention.py \
      tests/test_kvcache_attention.py tests/test_rms_norm.py tests/test_rotary.py tests/test_reliability.py tests
  fi
  for tool in memcheck racecheck synccheck; do sanitizer "$tool"; done
  mkdir -p "$WORK/bench"
  # llama_ext_100kb: the attention tiles of ~100 KB GPUs, measured here too (benchmarks/bench_attention.py).
  bench_args=(--device "$DEVICE" --provider eager --provider native --provider llama_ext --provider llama_ext_100kb
              --no-progress --no-plots)
  [ "$DRY_RUN" = 1 ] && bench_args+=(--smoke --threads 1)
  if [ -n "$BENCH_OPS" ]; then
    for s in $(bench_stages); do
      if [ "$s" = bench_attention ]; then
        stage bench_attention "$PY" -m benchmarks "${bench_args[@]}" --op attention --out "$WORK/bench/attention"
      else
        # The kernels' device times of every memory-bound op (the profiler adds to the stage's time).
        stage bench_memory "$PY" -m benchmarks "${bench_args[@]}" --kernels $(printf -- '--op %s ' "${MEMORY_OPS[@]}") \
          --out "$WORK/bench/memory"
      fi
    done
  else  # the op list itself failed to import: one run of everything shows why
    stage bench_all "$PY" -m benchmarks "${bench_args[@]}" --out "$WORK/bench/all"
  fi
else
  for s in tests memcheck racecheck synccheck bench; do skip "$s" "no build"; done
fi

# ---- summary --------------------------------------------------------------------------------
"$PY" scripts/gpu_check_summary.py --work "$WORK" --results "$RESULTS" --total-limit "$TOTAL_LIMIT" \
  --grace "$GRACE" --elapsed "$SECONDS" $([ "$DRY_RUN" = 1 ] && echo --dry-run)
