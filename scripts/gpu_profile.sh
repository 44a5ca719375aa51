#!/usr/bin/env bash
# `make gpu-profile`: Nsight Compute (ncu) over the performance targets' shapes
# (scripts/profile_cases.py): for each kernel, its duration, its throughput against the GPU's
# speed of light (DRAM, L2, shared memory, SM issue), its warps' stall reasons, its occupancy
# and its launch. One process and one report per group of cases (decode, attention, norms), in
# $OUT (else ./gpu-results): ncu_GROUP.txt, whole, and the lines that say where the time goes
# printed here. Then, without ncu, the group `splits`: the decode targets timed at every forced
# split count (scripts/decode_splits.py), in decode_splits.txt; the group `row_ahead`: the
# RMSNorm backward with each of its kernels (scripts/row_ahead.py), in row_ahead.txt; and the group
# `query_tokens`: the KV-cache op at 1-128 query tokens next to gqa_attention
# (scripts/query_tokens.py), in query_tokens.txt.
#
# For the call after `make gpu-check` on the same warm machine, which keeps its in-place build;
# without one it first builds for this GPU alone (scripts/gpu_build.sh, ~80 s). On the H200
# (2026-12-04) the three groups took 63 s together.
# The clocks are left alone (--clock-control none: the device notes' METHOD.md), so durations
# are the benchmark's; ncu replays each kernel once per metric pass, restoring its memory.
#
# PROFILE_GROUPS="decode" limits the groups; PROFILE_LIMIT (seconds, default 150) bounds each.
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS=${OUT:-$PWD/gpu-results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH" PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# LLAMA_EXT_GPU_CHECK_DRY_RUN=1: the same flow without a GPU, ncu a stub (scripts/gpu_check_stubs/)
# and the cases at their --smoke shapes on the CPU kernels, no build.
CASE_ARGS=()
SPLITS_ARGS=()
ROW_AHEAD_ARGS=()
TOKENS_ARGS=()
if [ "${LLAMA_EXT_GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  export PATH="$PWD/scripts/gpu_check_stubs:$PATH"
  CASE_ARGS=(--device cpu --smoke)
  SPLITS_ARGS=(--device cpu --smoke --rep-ms 5 --splits 1,2)
  ROW_AHEAD_ARGS=(--device cpu --smoke --rep-ms 5)
  TOKENS_ARGS=(--device cpu --smoke --rep-ms 5)
elif ! "$PY" -c 'import sys, llama_ext; sys.exit(not llama_ext.cuda_kernels_built())' 2>/dev/null; then
  echo "=== build (no CUDA build in place)"
  bash scripts/gpu_build.sh >"$RESULTS/profile_build.log" 2>&1 || { tail -n 30 "$RESULTS/profile_build.log"; exit 1; }
fi

# Nsight Compute: on PATH, else where its installer puts it.
NCU=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu "$CUDA_HOME"/nsight-compute*/ncu 2>/dev/null | tail -n 1)
[ -n "$NCU" ] || { echo "ncu: not found on PATH, in /opt/nvidia/nsight-compute or in $CUDA_HOME"; exit 1; }
SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis
          --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats)
# The lines of each kernel's report that say where its time goes.
KEY='^  [A-Za-z_].*\(|^case |Stall|WRN|OPT|^    (Duration|DRAM Throughput|Memory Throughput|L1/TEX Hit|L2 Hit'
KEY+='|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Achieved Occupancy|Theoretical Occupancy'
KEY+='|Registers Per Thread|Block Limit)'
status=0
for group in ${PROFILE_GROUPS:-decode attention norms splits row_ahead query_tokens}; do
  echo "=== $group"
  if [ "$group" = splits ]; then
    report="$RESULTS/decode_splits.txt"
    timeout "${PROFILE_LIMIT:-150}" "$PY" scripts/decode_splits.py "${SPLITS_ARGS[@]}" >"$report" 2>&1
    rc=$?
    tail -n 8 "$report"
  elif [ "$group" = row_ahead ]; then
    report="$RESULTS/row_ahead.txt"
    timeout "${PROFILE_LIMIT:-150}" "$PY" scripts/row_ahead.py "${ROW_AHEAD_ARGS[@]}" >"$report" 2>&1
    rc=$?
    tail -n 16 "$report"
  elif [ "$group" = query_tokens ]; then
    report="$RESULTS/query_tokens.txt"
    timeout "${PROFILE_LIMIT:-150}" "$PY" scripts/query_tokens.py "${TOKENS_ARGS[@]}" >"$report" 2>&1
    rc=$?
    tail -n 12 "$report"
  else
    report="$RESULTS/ncu_$group.txt"
    timeout "${PROFILE_LIMIT:-150}" "$NCU" --clock-control none --profile-from-start off "${SECTIONS[@]}" \
      "$PY" scripts/profile_cases.py --group "$group" "${CASE_ARGS[@]}" >"$report" 2>&1
    rc=$?
    grep -E "$KEY" "$report" | cut -c1-160 | head -n 150
  fi
  if [ "$rc" -ne 0 ]; then
    echo "$group: exited with $rc (124: past PROFILE_LIMIT)"
    tail -n 15 "$report"
    status=1
  fi
done
exit $status
