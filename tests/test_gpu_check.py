"""`make gpu-check` (scripts/gpu_check.sh) on a machine without a GPU: its dry run
(LLAMA_EXT_GPU_CHECK_DRY_RUN=1: nvidia-smi, compute-sanitizer, the CUDA build and the CUDA tests
stubbed; the real control flow, limits, sanitizer case list on the CPU kernels, CPU benchmark
and summary), its stage plan against the 9-minute limit, and the summary's reading of real tool
output. The first GPU run is rare: these make sure it cannot be lost to the script itself."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
from conftest import DEVICES

# The script's own tests need no GPU: they belong to the CPU half (CI), not to the CUDA half
# that `make gpu-check` runs.
pytestmark = pytest.mark.skipif("cpu" not in DEVICES, reason="CPU half only (LLAMA_EXT_TEST_DEVICES excludes cpu)")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check_summary  # noqa: E402

STAGE_ORDER = ["env", "build", "tests", "memcheck", "racecheck", "synccheck"]
MAX_RESULT_FILES = 8  # what the device tool brings back from $OUT


# The limits are sized for the GPU machine; a loaded CI machine takes longer over the stubbed stages.
WIDENED = {f"GPU_CHECK_LIMIT_{s}": "400" for s in STAGE_ORDER + ["bench_attention", "bench_memory"]}


def dry_run(out, **env):
    full_env = dict(os.environ, LLAMA_EXT_GPU_CHECK_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable, **env)
    # Its own session, so that a timeout here ends every stage it started.
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    summary = (out / "summary.txt").read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), summary


def stage_rows(summary):
    """{stage: (status, detail)} from the summary's stage table."""
    rows = {}
    for line in summary.splitlines():
        m = re.match(r"(\w+)\s+(ok|FAIL|TIMEOUT|INCOMPLETE|SKIPPED)\s+\d+ /\s*\d+ s  (.*)", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def test_stage_limits_fit_nine_minutes():
    proc = subprocess.run(["bash", str(SCRIPT), "--plan"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=300)
    assert proc.returncode == 0, f"the stage limits do not fit:\n{proc.stdout}{proc.stderr}"
    stages = [line.split()[0] for line in proc.stdout.splitlines()[:-1]]
    assert stages == STAGE_ORDER + ["bench_attention", "bench_memory"], proc.stdout


def test_dry_run_reports_the_first_failure_first_and_still_benchmarks(tmp_path):
    # The CUDA tests and memcheck fail, the attention benchmark hangs past its (shortened) limit.
    proc, summary = dry_run(tmp_path, GPU_CHECK_STUB_FAIL="tests,memcheck", GPU_CHECK_STUB_HANG="bench_attention",
                            **dict(WIDENED, GPU_CHECK_LIMIT_bench_attention="3"))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = summary.splitlines()[0]
    assert first.startswith("gpu-check: FAIL (DRY RUN"), summary
    assert "first failure: tests FAIL" in first and "test_stub_fails_on_request" in first, first
    assert "also: memcheck FAIL" in summary and "also: bench_attention TIMEOUT" in summary, summary

    rows = stage_rows(summary)
    assert list(rows)[:6] == STAGE_ORDER, summary
    assert rows["env"][0] == "ok" and rows["build"][0] == "ok", summary
    assert rows["racecheck"][0] == "ok" and rows["synccheck"][0] == "ok", summary
    for tool in ("racecheck", "synccheck"):
        m = re.search(r"(\d+) of (\d+) cases", rows[tool][1])
        assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0, rows[tool]
    assert rows["bench_attention"][0] == "TIMEOUT" and rows["bench_memory"][0] == "ok", summary

    assert "failing tests (1):" in summary
    # Why it failed, from the log written as it failed (scripts/pytest_failure_log.py).
    assert ("scripts/gpu_check_stubs/test_stub.py::test_stub_fails_on_request: AssertionError: "
            "GPU_CHECK_STUB_FAIL names tests") in summary, summary
    assert "memcheck: [" in summary and "Invalid __global__ read" in summary  # the report, with its case
    # The targets, each named (the smoke sizes have none of their cases).
    assert "performance targets" in summary and "NO RESULT  attention, causal, seq 8192" in summary, summary
    # The benchmark of what worked: every memory-bound op, from one process.
    bench = (tmp_path / "bench.md").read_text()
    assert "RMSNorm" in bench or "rms_norm" in bench, bench[:500]
    ops = [op["op"] for op in json.loads((tmp_path / "bench.json").read_text())["ops"]]
    assert ops == ["decode", "rms_norm", "fused_add_rms_norm", "rotary", "chunked_prefill"], ops
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= MAX_RESULT_FILES and all((tmp_path / f).is_file() for f in files), files
    assert proc.stdout.rstrip().splitlines()[-1] == first  # the verdict is also the last line printed


def test_dry_run_build_failure_skips_the_rest_and_says_why(tmp_path):
    proc, summary = dry_run(tmp_path, GPU_CHECK_STUB_FAIL="build", **WIDENED)
    assert proc.returncode == 1
    first = summary.splitlines()[0]
    assert "first failure: build FAIL: csrc/cuda/stub.cu(1): error" in first, summary
    rows = stage_rows(summary)
    for s in ("tests", "memcheck", "racecheck", "synccheck", "bench"):
        assert rows[s] == ("SKIPPED", "no build"), summary


# ---- the summary on the output of the real tools ------------------------------------------------

PYTEST_XDIST_LOG = """\
============================= test session starts ==============================
created: 8/8 workers
8 workers [3 items]

[gw1] [ 33%] PASSED tests/test_rms_norm.py::test_rms_norm[cuda-float32]
[gw0] [ 66%] FAILED tests/test_attention.py::test_forward[cuda-bfloat16-128]
[gw2] [100%] SKIPPED tests/test_reliability.py::test_second_gpu
=========================== short test summary info ============================
SKIPPED [1] tests/test_reliability.py:677: needs a second GPU
FAILED tests/test_attention.py::test_forward[cuda-bfloat16-128] - AssertionError: Tensor-likes are not close!
=================== 1 failed, 1 passed, 1 skipped in 41.20s ====================
"""

MEMCHECK_LOG = """\
========= COMPUTE-SANITIZER
case rms_norm_vector ...
case rms_norm_vector ok 2.1s
case attention_tiles_d80 ...
========= Invalid __global__ read of size 16 bytes
=========     at void llama_ext::cuda::attention::attention_forward_tc_kernel<__nv_bfloat16, 80>(Params)+0x1a30 in attention_fwd.cu:120
=========     by thread (3,0,0) in block (1,0,0)
=========     Address 0x7f0000001000 is out of bounds
case attention_tiles_d80 ok 1.0s
sanitize cases (memcheck, cuda): 2 of 9 run in 50s
left out at the deadline: attention_edges_d32, attention_edges_d64
========= ERROR SUMMARY: 1 error
"""

BUILD_LOG = """\
ptxas info    : Compiling entry function '_ZN9llama_ext4cuda6kernelILi1EEEvv' for 'sm_90'
ptxas info    : Function properties for _ZN9llama_ext4cuda6kernelILi1EEEvv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function '_ZN9llama_ext4cuda6kernelILi2EEEvv' for 'sm_90'
ptxas info    : Function properties for _ZN9llama_ext4cuda6kernelILi2EEEvv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


def write_work(work, stages, logs):
    work.mkdir()
    (work / "stages.tsv").write_text("".join("\t".join(map(str, row)) + "\n" for row in stages))
    for name, text in logs.items():
        (work / f"{name}.log").write_text(text)


def test_summary_reads_pytest_sanitizer_and_ptxas_output(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    results.mkdir()
    write_work(work, [("env", 0, 3, 30), ("build", 0, 90, 150), ("tests", 1, 41, 120), ("memcheck", 1, 55, 60),
                      ("racecheck", 3, 30, 30), ("synccheck", 124, 25, 20), ("bench_memory", 1, 4, 55)],
               {"env": "NVIDIA H200, 580.159.04, 143771 MiB, 9.0\n", "build": BUILD_LOG, "tests": PYTEST_XDIST_LOG,
                "memcheck": MEMCHECK_LOG,
                "racecheck": "case rms_norm_vector ...\ncase rms_norm_vector ok 1.0s\n"
                             "sanitize cases (racecheck, cuda): 1 of 8 run in 16s\n"
                             "left out at the deadline: attention_tiles_d32\n========= ERROR SUMMARY: 0 errors\n",
                "synccheck": "case rms_norm_vector ...\ncase rms_norm_vector ok 1.0s\ncase attention_tiles_d32 ...\n",
                "bench_memory": "Traceback (most recent call last):\nRuntimeError: CUDA error: an illegal memory access\n"})
    rc = gpu_check_summary.summarize(str(work), str(results), total_limit=540, grace=5, elapsed=300, dry_run=False)
    assert rc == 1
    summary = (results / "summary.txt").read_text()
    first = summary.splitlines()[0]
    assert first.startswith("gpu-check: FAIL - first failure: tests FAIL: 1 failed, 1 passed, 1 skipped"), first
    assert "tests/test_attention.py::test_forward[cuda-bfloat16-128]" in first
    rows = stage_rows(summary)
    assert rows["build"] == ("ok", "2 kernels compiled, 1 with register spills")
    assert rows["memcheck"][0] == "FAIL" and "1 errors, 2 of 9 cases" in rows["memcheck"][1]
    assert "[attention_tiles_d80] Invalid __global__ read of size 16 bytes at void llama_ext" in rows["memcheck"][1]
    assert rows["racecheck"][0] == "INCOMPLETE" and "attention_tiles_d32" in rows["racecheck"][1]
    assert rows["synccheck"] == ("TIMEOUT", "stopped at its limit in case attention_tiles_d32; "
                                            "case list did not finish")
    assert rows["bench_memory"] == ("FAIL", "RuntimeError: CUDA error: an illegal memory access")
    assert "_ZN9llama_ext4cuda6kernelILi1EEEvv: 4 bytes spill stores, 4 bytes spill loads" in summary
    assert "failing tests (1):" in summary
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == first


def test_summary_passes_only_when_every_stage_is_ok(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    results.mkdir()
    write_work(work, [("env", 0, 3, 30), ("build", 0, 90, 150), ("tests", 0, 41, 120)],
               {"build": BUILD_LOG.replace("4 bytes spill", "0 bytes spill"),
                "tests": PYTEST_XDIST_LOG.replace("1 failed, ", "").replace("FAILED", "PASSED")})
    assert gpu_check_summary.summarize(str(work), str(results), 540, 5, 200, dry_run=False) == 0
    summary = (results / "summary.txt").read_text()
    assert summary.startswith("gpu-check: PASS - 3 stages"), summary
    assert "register spills:" not in summary


def test_targets_read_the_run_and_derive_the_backward():
    from benchmarks import targets

    def case(mode, size, work, **results):
        return {"mode": mode, "size": size, "dtype": "bfloat16", "work": work,
                "results": {p: dict(status="ok", **r) for p, r in results.items()}}

    flops = 4 * 32 * 128 * 8192 * 8193 / 2  # the forward's causal FLOPs
    run = {"ops": [
        {"op": "attention", "cases": [
            # Forward at 400 TFLOP/s; forward + backward: 3.5x the work, the backward at 200.
            case("fwd", 8192, flops, llama_ext=dict(median_ms=flops / 400e9, throughput=400.0),
                 native=dict(median_ms=flops / 300e9, throughput=300.0)),
            case("fwd+bwd", 8192, 3.5 * flops,
                 llama_ext=dict(median_ms=flops / 400e9 + 2.5 * flops / 200e9, throughput=0.0)),
        ]},
        {"op": "rms_norm", "cases": [case("fwd", 32768, 1, llama_ext=dict(median_ms=1.0, fraction_of_ceiling=0.93))]},
        {"op": "decode", "cases": [case("b1 paged16", 8192, 1, llama_ext=dict(median_ms=1.0, fraction_of_ceiling=0.5),
                                        llama_ext_100kb=dict(median_ms=1.0, fraction_of_ceiling=0.6))]},
    ]}
    lines = targets.check(run)
    assert len(lines) == len(targets.TARGETS)

    def line_of(*words):
        found = [line for line in lines if all(w in line for w in words)]
        assert len(found) == 1, (words, lines)
        return found[0]

    fwd = line_of("attention", "forward")
    assert fwd.startswith("MET") and ": 400 TFLOP/s (target >= 350 TFLOP/s); native 300 TFLOP/s" in fwd, fwd
    bwd = line_of("attention", "backward")  # the native provider has no fwd+bwd case: not shown
    assert bwd.startswith("MISSED") and bwd.endswith(": 200 TFLOP/s (target >= 250 TFLOP/s)"), bwd
    norm = line_of("RMSNorm", "forward")
    assert norm.startswith("MET") and ": 93% of copy (target >= 90% of copy)" in norm, norm
    paged = line_of("batch 1, paged")
    assert paged.startswith("MISSED") and "50% of copy" in paged and "llama_ext_100kb 60% of copy" in paged, paged
    missing = [line for line in lines if line.startswith("NO RESULT")]
    assert len(missing) == len(targets.TARGETS) - 4, missing


def test_profile_dry_run_runs_every_case_in_its_group(tmp_path):
    """`make gpu-profile` (scripts/gpu_profile.sh) without a GPU: ncu a stub, the cases of
    scripts/profile_cases.py at their --smoke shapes on the CPU kernels, one report per group,
    then the decode split sweep's table (scripts/decode_splits.py) with a row per decode case, the
    RMSNorm backward's kernel table (scripts/row_ahead.py) and the query-token table
    (scripts/query_tokens.py)."""
    env = dict(os.environ, LLAMA_EXT_GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=str(ROOT))
    listing = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_cases.py"), "--list"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    groups = dict(line.split(": ") for line in listing.splitlines())
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_profile.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"ncu_{g}.txt" for g in groups] + ["decode_splits.txt", "row_ahead.txt", "query_tokens.txt"])
    for group, cases in groups.items():
        report = (tmp_path / f"ncu_{group}.txt").read_text()
        assert re.findall(r"^case (\S+)$", report, re.M) == cases.split(), report[-2000:]
    splits = (tmp_path / "decode_splits.txt").read_text()
    assert re.findall(r"^\| (decode_\S+) \|", splits, re.M) == groups["decode"].split(), splits[-2000:]
    row_ahead = (tmp_path / "row_ahead.txt").read_text()
    assert len(re.findall(r"^\| (?:fused_add_)?rms_norm \d+x\d+ ", row_ahead, re.M)) == 8, row_ahead[-2000:]
    tokens = (tmp_path / "query_tokens.txt").read_text()
    assert re.findall(r"^\| (\d+) \|", tokens, re.M) == ["1", "5", "8"], tokens[-2000:]


def test_query_tokens_table_on_the_cpu():
    """scripts/query_tokens.py at its --smoke shapes on the CPU kernels: a row per query-token
    count, the KV-cache op's time and gqa_attention's on the same cache, and their ratio."""
    cmd = [sys.executable, str(ROOT / "scripts" / "query_tokens.py"), "--device", "cpu", "--smoke", "--rep-ms", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split(" | ")[0][2:] for row in rows] == ["1", "5", "8"], proc.stdout
    for row in rows:
        assert re.fullmatch(r"\| \d+ \| \d+\.\d us \| \d+\.\d us \| \d+\.\d\d \|", row), row


def test_row_ahead_table_on_the_cpu():
    """scripts/row_ahead.py at its --smoke shapes on the CPU kernels: a row per shape, dtype and
    form (plain, fused), each with three cells (time and share of the copy ceiling): the
    launcher's choice, the plain kernel and the row-ahead kernel."""
    cmd = [sys.executable, str(ROOT / "scripts" / "row_ahead.py"), "--device", "cpu", "--smoke", "--rep-ms", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| (fused_add_)?rms_norm ", line)]
    assert [row.split(" | ")[0][2:] for row in rows] == [
        f"{form} {shape} {dtype}" for shape in ("64x256", "96x48") for dtype in ("bfloat16", "float32")
        for form in ("rms_norm", "fused_add_rms_norm")], proc.stdout
    for row in rows:
        assert len(re.findall(r"\d+\.\d us \d+%", row)) == 3, row


def test_decode_splits_table_on_the_cpu():
    """scripts/decode_splits.py at its --smoke shapes on the CPU kernels: one row per decode case
    of scripts/profile_cases.py, one cell (time and share of the copy ceiling) per split count
    asked for and four for the launcher's own (as shipped, without the launch overlap, with the
    ring of two and with the deep ring); split counts outside 1..128 are refused."""
    cmd = [sys.executable, str(ROOT / "scripts" / "decode_splits.py"), "--device", "cpu", "--smoke", "--rep-ms", "5"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd + ["--splits", "1,3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| decode_")]
    cases = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_cases.py"), "--list"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    decode = dict(line.split(": ") for line in cases.splitlines())["decode"].split()
    assert [row.split(" | ")[0][2:] for row in rows] == decode, proc.stdout
    for row in rows:
        assert len(re.findall(r"\d+\.\d us \d+%", row)) == 6, row
    proc = subprocess.run(cmd + ["--splits", "0,129"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "split counts run from 1 to 128" in proc.stderr, proc.stderr[-2000:]
