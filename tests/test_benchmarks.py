"""Smoke tests of the benchmark suite on tiny sizes: the run completes, the JSON has its schema,
every available provider produced a number and every skipped one says why. No speed is asserted."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import llama_ext
from benchmarks import bench_attention, bench_rotary, cli, harness, report

SMOKE_ARGS = ["--smoke", "--no-progress", "--dtype", "float32", "--device", "cpu"]


def _stand_in_rope_cos_sin(rotary_dim, max_position, base=10000.0, rope_scaling=None, device=None):
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _stand_in_apply_rotary(q, k, cos, sin, positions=None, interleaved=False):
    def rotate(x):
        c, s = cos[: x.shape[1], None, :], sin[: x.shape[1], None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def _stand_in_gqa_attention(q, k, v, causal=True, scale=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal and q.shape[1] > 1, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).contiguous()


@pytest.fixture
def ops_present(monkeypatch):
    """Pure-PyTorch stand-ins for the ops still being written, so their benchmark modules run
    end to end; once an op lands in llama_ext, its real kernel is benchmarked instead."""
    for name, fn in [("rope_cos_sin", _stand_in_rope_cos_sin), ("apply_rotary", _stand_in_apply_rotary),
                     ("gqa_attention", _stand_in_gqa_attention)]:
        if not hasattr(llama_ext, name):
            monkeypatch.setattr(llama_ext, name, fn, raising=False)


def _check_result(result, where):
    assert result["status"] in ("ok", "skipped", "n/a"), where
    if result["status"] != "ok":
        assert result["reason"], f"{where}: {result['status']} without a reason"
        return
    for key in ("median_ms", "p20_ms", "p80_ms", "throughput"):
        assert math.isfinite(result[key]) and result[key] > 0, (where, key, result[key])
    assert result["p20_ms"] <= result["median_ms"] <= result["p80_ms"], where
    assert result["peak_mem_bytes"] is None or result["peak_mem_bytes"] >= 0, where


def _check_op(op, expected_providers):
    assert op["status"] == "ok", op.get("reason")
    assert set(op["providers"]) == set(expected_providers)
    assert op["cases"], op["op"]
    for case in op["cases"]:
        assert {"mode", "dtype", "size", "label", "unit", "work", "judging", "ceiling", "results"} <= set(case)
        assert case["work"] > 0
        for name, info in op["providers"].items():
            result = case["results"][name]
            _check_result(result, (op["op"], case["mode"], name))
            if info["skip_reason"]:
                assert result["status"] == "skipped"
            else:  # every available provider produced a number
                assert result["status"] == "ok", (op["op"], case["mode"], name, result.get("reason"))


def test_smoke_run_writes_json_tables_and_plots(tmp_path, ops_present, capsys):
    out = tmp_path / "bench"
    assert cli.main(SMOKE_ARGS + ["--op", "rms_norm", "--op", "rotary", "--op", "attention", "--out", str(out)]) == 0
    data = json.loads((out / "results-cpu.json").read_text())
    assert data["schema_version"] == 1
    assert {"env", "config", "ceilings", "ops", "elapsed_s", "command"} <= set(data)
    for key in ("device_name", "torch", "torch_threads", "git_commit", "date_utc"):
        assert key in data["env"]
    assert data["ceilings"]["copy"]["gbps"] > 0
    assert data["ceilings"]["matmul"]["float32"]["tflops"] > 0
    ops = {op["op"]: op for op in data["ops"]}
    assert list(ops) == ["rms_norm", "rotary", "attention"]
    _check_op(ops["rms_norm"], ["eager", "native", "compile", "llama_ext"])
    _check_op(ops["rotary"], ["eager", "native", "compile", "llama_ext"])
    _check_op(ops["attention"], ["eager", "native", "compile", "llama_ext"])
    assert ops["rotary"]["providers"]["native"]["skip_reason"]
    # The providers compute the same thing: the benchmark is wired to the right inputs.
    for op in ops.values():
        for case in op["cases"]:
            for name in ("native", "compile", "llama_ext"):
                diff = case["results"][name].get("max_abs_diff_vs_eager")
                assert diff is None or diff < 1e-3, (op["op"], case["mode"], name, diff)
    assert all(c["results"]["native"]["sdpa_backend"] for c in ops["attention"]["cases"])
    for name in ops:
        assert (out / f"{name}-cpu.png").stat().st_size > 0
    stdout = capsys.readouterr().out
    assert "### RMSNorm" in stdout and "| llama_ext |" in stdout
    assert (out / "results-cpu.md").read_text().count("### ") == 3


def test_ops_skip_cleanly_while_llama_ext_lacks_them(monkeypatch):
    for name in ("apply_rotary", "rope_cos_sin", "gqa_attention"):
        monkeypatch.delattr(llama_ext, name, raising=False)
    cfg = harness.RunConfig(device="cpu", dtypes=[torch.float32], smoke=True)
    ceilings = harness.Ceilings(cfg)
    for module, missing in ((bench_rotary, "apply_rotary"), (bench_attention, "gqa_attention")):
        op = harness.run_op(module.build(cfg), cfg, ceilings, progress=False)
        assert op["status"] == "skipped" and missing in op["reason"] and op["cases"] == []
        assert "skipped: " in report.op_table(op)
    assert ceilings.copy is None  # nothing was measured


def test_failing_provider_is_recorded_not_raised():
    def fails(case, inputs):
        raise RuntimeError("no kernel for this shape\nsecond line")

    cfg = harness.RunConfig(device="cpu", dtypes=[torch.float32], smoke=True, min_run_time=0.01)
    case = harness.Case(mode="fwd", dtype=torch.float32, size=8, label="8", unit="GB/s", work=64.0, out_bytes=32)
    bench = harness.OpBench(
        name="toy", title="toy", size_name="n", cases=[case],
        providers=[harness.Provider("eager", lambda c, x: lambda: x * 2),
                   harness.Provider("llama_ext", fails),
                   harness.Provider("native", None, skip_reason="not here")],
        make_inputs=lambda c: torch.randn(8) + 3,
    )
    op = harness.run_op(bench, cfg, harness.Ceilings(cfg), progress=False)
    results = op["cases"][0]["results"]
    assert results["eager"]["status"] == "ok" and results["eager"]["speedup_vs_eager"] == 1.0
    assert results["llama_ext"] == {"status": "n/a", "reason": "RuntimeError: no kernel for this shape"}
    assert results["native"] == {"status": "skipped", "reason": "not here"}
    assert "| llama_ext | n/a |" in report.op_table(op)


def test_e2e_smoke(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "e2e"
    assert cli.main(SMOKE_ARGS + ["--op", "none", "--e2e", "--out", str(out)]) == 0
    data = json.loads((out / "results-cpu.json").read_text())
    (op,) = data["ops"]
    _check_op(op, ["eager", "sdpa", "llama_ext"])
    assert {c["mode"] for c in op["cases"]} == {"train", "prefill", "decode"}
    for case in op["cases"]:
        if case["mode"] != "train":  # same weights, same tokens: the same logits and greedy tokens
            assert case["results"]["sdpa"]["max_abs_diff_vs_eager"] < 1e-3


def test_update_results_md_rewrites_only_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n<!-- cpu:begin -->\nold cpu\n<!-- cpu:end -->\n<!-- cuda:begin -->\nold gpu\n<!-- cuda:end -->\n")
    result = {
        "env": {"device": "cpu", "date_utc": "d", "git_commit": "c", "git_dirty": False, "device_name": "n",
                "logical_cpus": 2, "torch_threads": 2, "load_average_at_start": [0.1, 0.1, 0.1], "torch": "t",
                "torch_cuda": None, "python": "p", "transformers": None, "triton": None, "cpu_capability": "x"},
        "ceilings": {"copy": None, "matmul": {}}, "warning": None, "command": "python -m benchmarks",
        "elapsed_s": 1.0, "ops": [],
    }
    report.update_results_md(result, str(path))
    text = path.read_text()
    assert "old cpu" not in text and "old gpu" in text and "commit c" in text
