"""Smoke tests of the benchmark suite on tiny sizes: the run completes, the JSON has its schema,
every available provider produced a number and every skipped one says why. No speed is asserted."""
import json
import math
import sys
import time

import pytest
import torch

import llama_ext
from benchmarks import cli, harness, report

SMOKE_ARGS = ["--smoke", "--no-progress", "--dtype", "float32", "--device", "cpu"]


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
        assert {"mode", "dtype", "size", "label", "unit", "work", "headline", "ceiling", "results"} <= set(case)
        assert case["work"] > 0
        for name, info in op["providers"].items():
            result = case["results"][name]
            _check_result(result, (op["op"], case["mode"], name))
            if info["skip_reason"]:
                assert result["status"] == "skipped"
            else:  # every available provider produced a number
                assert result["status"] == "ok", (op["op"], case["mode"], name, result.get("reason"))


def test_smoke_run_writes_json_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(SMOKE_ARGS + ["--op", "rms_norm", "--op", "rotary", "--op", "attention", "--out", str(out)]) == 0
    data = json.loads((out / "results-cpu.json").read_text())
    assert data["schema_version"] == 1
    assert {"env", "config", "ceilings", "ops", "elapsed_s", "command"} <= set(data)
    for key in ("device_name", "torch", "torch_threads", "git_commit", "date_utc"):
        assert key in data["env"]
    assert data["ceilings"]["copy"]["rate"] > 0
    assert data["ceilings"]["matmul"]["float32"]["rate"] > 0
    assert data["env"]["llama_ext_cpu_capability"] == llama_ext.cpu_capability()
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
    # Bandwidth cases carry the copy sampled in their own rounds; FLOP cases do not.
    for op in ops.values():
        for case in op["cases"]:
            for r in case["results"].values():
                if r["status"] == "ok" and not r["single_call"]:
                    same_round = r.get("fraction_of_copy_same_rounds")
                    assert (same_round is not None and same_round > 0) == (case["unit"] == "GB/s"), (op["op"], r)
    for name in ops:
        assert (out / f"{name}-cpu.png").stat().st_size > 0
    stdout = capsys.readouterr().out
    assert f"### RMSNorm [CPU kernels: {llama_ext.cpu_capability()}]" in stdout and "| llama_ext |" in stdout
    assert "same-round copy)" in stdout
    assert (out / "results-cpu.md").read_text().count("### ") == 3


def test_run_without_matplotlib_or_tqdm_writes_its_tables(tmp_path, monkeypatch, capsys):
    # An existing torch environment may lack the plotting and progress-bar packages: the run still
    # ends with its JSON and tables, and says that it skipped the plots.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    out = tmp_path / "bench"
    assert cli.main(SMOKE_ARGS + ["--op", "rms_norm", "--provider", "llama_ext", "--out", str(out)]) == 0
    data = json.loads((out / "results-cpu.json").read_text())
    _check_op(data["ops"][0], ["llama_ext"])
    assert (out / "results-cpu.md").read_text().count("### ") == 1
    assert not list(out.glob("*.png"))
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().err


def _toy_bench(providers, unit="GB/s", work=64.0):
    case = harness.Case(mode="fwd", dtype=torch.bfloat16, size=8, label="8", unit=unit, work=work, out_bytes=32)
    return harness.OpBench(name="toy", title="toy", size_name="n", cases=[case], providers=providers,
                           make_inputs=lambda c: torch.randn(8) + 3)


def test_cpu_pages_follow_the_kernel_mode_and_torch_switch(tmp_path, monkeypatch):
    # 2 MB pages: always under the kernel's `always`, never under `never` (or where the kernel
    # says nothing), and under `madvise` only where torch asks for them (THP_MEM_ALLOC_ENABLE=1).
    expected = {"always": (True, True, True), "madvise": (True, False, False), "never": (False, False, False),
                None: (False, False, False)}
    for mode, huge in expected.items():
        path = tmp_path / f"enabled-{mode}"
        if mode is not None:
            path.write_text(" ".join(f"[{m}]" if m == mode else m for m in ("always", "madvise", "never")) + "\n")
        monkeypatch.setattr(harness, "THP_MODE_PATH", str(path))
        for requested, want in zip(("1", "0", None), huge):
            if requested is None:
                monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
            else:
                monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", requested)
            assert harness.cpu_pages() == dict(thp_mode=mode, thp_mem_alloc_enable=requested, huge_pages=want)


def test_cpu_model_names_the_x86_family_and_model(tmp_path):
    # A VM's brand string alone ("AMD EPYC") does not tell Zen 4 from Zen 5: the tables also give
    # the family and model of the first processor (not of any later one).
    first = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    later = "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: other\n"
    path = tmp_path / "cpuinfo"
    path.write_text(first + "\n" + later)
    assert harness._cpu_model(str(path)) == "AMD EPYC (family 26, model 2)"
    path.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert harness._cpu_model(str(path)) == "Some CPU"
    assert harness._cpu_model(str(tmp_path / "missing"))  # falls back to platform's name


def test_decode_smoke_and_dram_cases(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(SMOKE_ARGS + ["--op", "decode", "--out", str(out)]) == 0
    data = json.loads((out / "results-cpu.json").read_text())
    # The caches' pages are part of the record (decode from DRAM depends on them).
    pages = data["env"]["cpu_pages"]
    assert f"- pages: {'2 MB' if pages['huge_pages'] else '4 KB'} for CPU tensors" in report.header_text(data)
    (op,) = data["ops"]
    _check_op(op, ["eager", "native", "compile", "llama_ext", "llama_ext_2mb"])
    modes = {case["mode"]: case for case in op["cases"]}
    assert set(modes) == {"b2 contiguous", "b2 paged16", "b2 contiguous, DRAM"}
    for case in op["cases"]:  # every provider reads the same tokens: the same outputs as eager
        for name in ("native", "compile", "llama_ext", "llama_ext_2mb"):
            assert case["results"][name]["max_abs_diff_vs_eager"] < 1e-4, (case["mode"], name)
    # A DRAM case is judged against the copy from DRAM, the others against the headline copy.
    dram = modes["b2 contiguous, DRAM"]
    assert dram["ceiling_kind"] == "dram_copy" and dram["ceiling"] == data["ceilings"]["dram_copy"]["rate"] > 0
    assert dram["params"]["layers"] == 2 and dram["label"].endswith("(2 layers)")
    assert modes["b2 contiguous"]["ceiling"] == data["ceilings"]["copy"]["rate"]
    stdout = capsys.readouterr().out
    assert "% DRAM copy (" in stdout and "same-round DRAM copy)" in stdout and "- DRAM copy ceiling: " in stdout


def test_decode_provider_on_kv_cache_memory():
    """llama_ext_2mb reads copies of a case's caches (contiguous, or the paged pools) from
    empty_kv_cache: equal to them, in other memory, on the CPU 2 MB-aligned from 2 MB on."""
    from benchmarks import bench_decode

    for paged in (False, True):
        cache = torch.randn(1, 2048, 8, 128)  # 8 MB
        inputs = {"k_cache": cache, "v_cache": cache + 1, "q": torch.randn(1, 1, 32, 128)}
        if paged:
            inputs.update(pool_k=cache.view(128, 16, 8, 128), pool_v=(cache + 2).view(128, 16, 8, 128),
                          block_table=torch.zeros(1, 128, dtype=torch.int32))
        copied = bench_decode._in_kv_cache_memory(inputs)
        names = ("pool_k", "pool_v") if paged else ("k_cache", "v_cache")
        for name in names:
            assert torch.equal(copied[name], inputs[name])
            assert copied[name].data_ptr() != inputs[name].data_ptr() and copied[name].data_ptr() % (2 << 20) == 0
        assert copied["q"] is inputs["q"]


def test_dram_decode_case_calls_take_the_layers_in_turn():
    from benchmarks import bench_decode

    cfg = harness.RunConfig(device="cpu", dtypes=[torch.float32], smoke=True)
    bench = bench_decode.build(cfg)
    (case,) = [c for c in bench.cases if c.ceiling == "dram_copy"]
    layers = bench.make_inputs(case)
    assert len(layers) == case.params["layers"] == 2
    assert not torch.equal(layers[0]["k_cache"], layers[1]["k_cache"])
    for provider in bench.providers:
        call = provider.build(case, layers)
        first, second, third = call(), call(), call()
        assert torch.equal(first, third) and not torch.equal(first, second), provider.name
    # No other run's ceiling needs the DRAM copy: measured only for an op that has such cases.
    ceilings = harness.Ceilings(cfg)
    ceilings.prepare([c for c in bench.cases if c.ceiling != "dram_copy"])
    assert ceilings.dram_copy is None
    ceilings.prepare(bench.cases)
    assert ceilings.dram_copy["rate"] > 0


def test_provider_over_budget_gets_one_marked_call():
    calls = {"slow": 0, "fast": 0}

    def counted(name, seconds):
        def build(case, inputs):
            def fn():
                calls[name] += 1
                time.sleep(seconds)
                return inputs * 2
            return fn
        return build

    cfg = harness.RunConfig(device="cpu", dtypes=[torch.bfloat16], smoke=True, min_run_time=0.05, budget_s=0.1)
    bench = _toy_bench([harness.Provider("eager", counted("fast", 0.0)), harness.Provider("slow", counted("slow", 0.15))])
    op = harness.run_op(bench, cfg, harness.Ceilings(cfg), progress=False)
    slow, fast = op["cases"][0]["results"]["slow"], op["cases"][0]["results"]["eager"]
    assert calls["slow"] == 2  # the warm-up, then one timed call
    assert slow["single_call"] and slow["samples"] == 1 and slow["median_ms"] >= 150
    assert not fast["single_call"] and calls["fast"] > 3
    table = report.op_table(op)
    assert "| 1 call |" in table and "one timed call" in table


def test_slow_warm_up_of_a_fast_call_is_sampled():
    # A first call that compiles for longer than the budget (torch.compile on a cold cache) does
    # not make a fast provider a one-call row: a second call decides.
    calls = []

    def compiling(case, inputs):
        def fn():
            calls.append(1)
            time.sleep(0.15 if len(calls) == 1 else 0.0)
            return inputs * 2
        return fn

    cfg = harness.RunConfig(device="cpu", dtypes=[torch.bfloat16], smoke=True, min_run_time=0.05, budget_s=0.1)
    bench = _toy_bench([harness.Provider("eager", lambda c, x: lambda: x * 2), harness.Provider("compile", compiling)])
    op = harness.run_op(bench, cfg, harness.Ceilings(cfg), progress=False)
    result = op["cases"][0]["results"]["compile"]
    assert not result["single_call"] and result["samples"] >= 2 and len(calls) > 3
    assert result["median_ms"] < 100


def test_sampling_makes_few_calls_beyond_its_samples():
    # A sample is its calls: no untimed calls per sample (torch.utils.benchmark.Timer.timeit
    # makes two); the warm-up, an untimed call before the first sample and before each round, and
    # the two peak-memory calls (CPU: traced, then resident).
    calls = []

    def build(case, inputs):
        def fn():
            calls.append(1)
            time.sleep(0.002)
            return inputs * 2
        return fn

    cfg = harness.RunConfig(device="cpu", dtypes=[torch.bfloat16], smoke=True, min_run_time=0.05, budget_s=10.0)
    op = harness.run_op(_toy_bench([harness.Provider("eager", build)]), cfg, harness.Ceilings(cfg), progress=False)
    result = op["cases"][0]["results"]["eager"]
    assert result["calls_per_sample"] == 1 and result["samples"] >= 10
    assert len(calls) <= result["samples"] + 4 + harness.CPU_ROUNDS


def test_state_another_provider_reset_is_refilled_by_an_untimed_call():
    # benchmarks/e2e.py builds each generate() provider after torch._dynamo.reset(), so a provider
    # built earlier recompiles in its next call: that call must not be its first sample (with
    # two samples, one of them a recompile, the median was 3x the call).
    state = {"stale": False}

    def resetting(case, inputs):
        state["stale"] = True
        return lambda: inputs * 2

    def compiled(case, inputs):
        def fn():
            if state["stale"]:
                state["stale"] = False
                time.sleep(0.05)
            return inputs * 2
        return fn

    cfg = harness.RunConfig(device="cpu", dtypes=[torch.bfloat16], smoke=True, min_run_time=0.05, budget_s=0.1)
    bench = _toy_bench([harness.Provider("compile", compiled), harness.Provider("eager", resetting)])
    op = harness.run_op(bench, cfg, harness.Ceilings(cfg), progress=False)
    result = op["cases"][0]["results"]["compile"]
    assert not result["single_call"] and result["median_ms"] < 10


def test_reduced_dtype_ceiling_is_the_best_rate_for_its_math_and_excess_is_flagged():
    cfg = harness.RunConfig(device="cpu", dtypes=[torch.bfloat16], smoke=True, min_run_time=0.01)
    ceilings = harness.Ceilings(cfg)
    ceilings.measure([torch.bfloat16])
    own = ceilings.matmul["bfloat16"]["rate"]
    fp32 = ceilings.matmul["float32"]["rate"]
    assert ceilings.matmul_tflops(torch.bfloat16) == max(own, fp32)
    assert ceilings.matmul_tflops(torch.float32) == fp32
    # A result faster than its ceiling is flagged, never shown as a fraction over 100%.
    bench = _toy_bench([harness.Provider("eager", lambda c, x: lambda: x * 2)], unit="TFLOP/s", work=1e15)
    op = harness.run_op(bench, cfg, ceilings, progress=False)
    result = op["cases"][0]["results"]["eager"]
    assert result["above_ceiling"] and result["fraction_of_ceiling"] is None
    assert "above matmul ceiling!" in report.op_table(op) and "%" not in report.op_table(op).split("|---|")[-1]


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
    rows = {(c["params"]["family"], c["mode"]) for c in op["cases"]}
    assert rows == {(f, m) for f in ("llama", "gemma3") for m in ("train", "prefill", "decode")} | {("llama", "generate")}
    for case in op["cases"]:
        if case["mode"] != "train":  # same weights, same tokens: the same logits and greedy tokens
            assert case["results"]["sdpa"]["max_abs_diff_vs_eager"] < 1e-3
        if case["mode"] == "generate":  # compiled, on the static cache: HF eager's greedy tokens
            assert case["results"]["llama_ext"]["max_abs_diff_vs_eager"] == 0


def test_update_results_md_rewrites_only_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n<!-- cpu-avx2:begin -->\nold cpu\n<!-- cpu-avx2:end -->\n"
                    "<!-- cpu-avx512:begin -->\nold avx512\n<!-- cpu-avx512:end -->\n"
                    "## GPU\n<!-- cuda:begin -->\nold gpu\n<!-- cuda:end -->\n")
    result = {
        "env": {"device": "cpu", "date_utc": "d", "git_commit": "c", "git_dirty": False, "device_name": "n",
                "logical_cpus": 2, "torch_threads": 2, "load_average_at_start": [0.1, 0.1, 0.1], "torch": "t",
                "torch_cuda": None, "python": "p", "transformers": None, "triton": None, "cpu_capability": "x",
                "llama_ext_cpu_capability": "avx2", "cpu_levels": ["default", "avx2"]},
        "ceilings": {"copy": None, "matmul": {}}, "warning": None, "command": "python -m benchmarks",
        "elapsed_s": 1.0, "ops": [],
    }
    report.update_results_md(result, str(path))
    text = path.read_text()
    assert "old cpu" not in text and "old avx512" in text and "old gpu" in text and "commit c" in text
    # A level without a section yet gets its own, before the GPU part.
    result["env"]["llama_ext_cpu_capability"] = "default"
    report.update_results_md(result, str(path))
    text = path.read_text()
    assert "<!-- cpu-default:begin -->" in text and text.index("cpu-default") < text.index("## GPU")
    assert "old avx512" in text and "old gpu" in text


def test_cpu_providers_are_sampled_interleaved():
    """A case's providers take turns in CPU_ROUNDS rounds, so a slow spell of a shared machine
    falls on all of them rather than on whichever was sampled during it."""
    order = []

    def sleeper(name):
        def fn():
            order.append(name)
            time.sleep(0.002)  # ~2 ms: one call per sample
        return fn

    # Enough samples that every round gets some even when a loaded machine stretches each 2 ms
    # sleep to 30 ms (fewer than CPU_ROUNDS + 1 samples would leave rounds empty).
    timings = harness.time_cpu_interleaved({"a": sleeper("a"), "b": sleeper("b")}, min_run_time=0.2)
    turns = sum(1 for x, y in zip(order, order[1:]) if x != y)
    assert turns >= 2 * harness.CPU_ROUNDS - 1, order
    for timing in timings.values():
        assert timing["samples"] >= 3 and timing["median_ms"] >= 2.0


def _runnable_levels():
    return [name for name, missing in llama_ext._cpu_kernels.levels().items() if missing is None]


@pytest.mark.skipif(_runnable_levels() == ["default"], reason="this CPU runs only the default level: nothing to limit")
def test_cpu_isa_limit_runs_every_library_at_that_level(tmp_path):
    """--cpu-isa default: a fresh process in which llama_ext, torch's own kernels, MKL and oneDNN
    all run at the portable level, recorded in the JSON and in its own RESULTS.md section."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "limited"
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--no-progress", "--cpu-isa", "default", "--op",
               "rms_norm", "--dtype", "float32", "--provider", "eager", "--provider", "llama_ext", "--device", "cpu",
               "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=root)
    for name in list(harness.CPU_ISA_LIMITS["default"]) + [harness.CPU_ISA_ENV, llama_ext._cpu_kernels.ENV_VAR]:
        env.pop(name, None)
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "results-cpu.json").read_text())
    run_env = data["env"]
    assert run_env["llama_ext_cpu_capability"] == "default" and run_env["cpu_capability"] == "DEFAULT"
    assert run_env["cpu_isa_limit"] == "default"
    assert run_env["cpu_isa_limit_env"] == harness.CPU_ISA_LIMITS["default"]
    # Its own inductor cache: code compiled under one level must not be reused under another.
    limited_cache = harness.cpu_isa_environment("default")["TORCHINDUCTOR_CACHE_DIR"]
    assert limited_cache.endswith("cpu-isa-default") and limited_cache != os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    assert "TORCHINDUCTOR_CACHE_DIR" not in harness.cpu_isa_environment("amx_bf16")
    assert "--cpu-isa default" in data["command"]
    _check_op(data["ops"][0], ["eager", "llama_ext"])
    assert report.results_md_section(data) == "cpu-default-limited"
    assert f"this CPU, which runs {_runnable_levels()[-1]}, stands in for one with no more than default" in report.markdown(data)
    assert "[CPU kernels: default, on a CPU with" in report.markdown(data)


def test_cpu_level_below_the_cpu_best_needs_cpu_isa_for_results_md(monkeypatch, capsys):
    levels = {"default": None, "avx2": None, "avx512": "AVX-512F"}
    monkeypatch.setattr(llama_ext._cpu_kernels, "levels", lambda: levels)
    monkeypatch.setattr(llama_ext, "cpu_capability", lambda: "default")
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cpu", "--update-results-md"])
    assert "use --cpu-isa default" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cpu", "--cpu-isa", "avx512"])
    assert "--cpu-isa avx512: this CPU runs only default, avx2" in capsys.readouterr().err
    assert cli.parse_args(["--device", "cpu", "--update-results-md", "--cpu-isa", "default"]).cpu_isa == "default"
    assert cli.parse_args(["--device", "cpu", "--cpu-isa", "avx2"]).cpu_isa == "avx2"


def test_cuda_timings_have_the_statistics_of_cpu_timings():
    """The ceilings and tables read min_ms, median_ms, p20_ms and p80_ms from either backend's
    timing. CI has no GPU: a stand-in clock whose events report the calls' order. Each timed call
    comes after an L2 eviction and a hold of the GPU longer than the host took to queue it."""
    log = []

    class FakeEvent:
        def record(self):
            log.append(("record", self))

        def elapsed_time(self, end):
            return log.index(("record", end)) - log.index(("record", self))  # ms: 2 for start, fn, end

    class FakeClock:
        evict_ms = 0.05

        def span_ms(self, fn):
            fn()
            return 0.5

        def evict(self):
            log.append("evict")

        def hold(self, ms):
            log.append(("hold", ms))

        event = FakeEvent

        def synchronize(self):
            log.append("sync")

    def fn():
        time.sleep(0.002)
        log.append("fn")

    cuda = harness.time_cuda(fn, "cuda", rep_ms=10, clock=FakeClock())
    cpu = harness.time_cpu(lambda: None, min_run_time=0.01)
    stats = {"min_ms", "median_ms", "p20_ms", "p80_ms"}
    assert stats <= set(cpu) and stats <= set(cuda)
    assert cuda["samples"] == 10 and cuda["min_ms"] == cuda["median_ms"] == 2.0
    timed = log[-(5 * 10 + 1):]  # each sample's five steps, then the last sync
    assert timed[-1] == "sync" and log[-(5 * 10 + 2)] == "sync"  # the host-time probe's sync before them
    for i in range(10):
        evict, hold, start, call, end = timed[5 * i:5 * i + 5]
        assert evict == "evict" and hold[0] == "hold" and hold[1] >= 1.5 * 2.0
        assert start[0] == "record" and call == "fn" and end[0] == "record"


def test_kernel_breakdown_names_times_and_reports_each_kernel():
    """CUDA results carry their kernels (harness.kernel_times; CI has no GPU, so the profiler's CPU
    ops stand in for kernels), each call's found between its preamble's, and the tables list them
    with their span against the call's median."""
    assert harness.kernel_name(
        "void llama_ext::cuda::(anonymous namespace)::attend_tc_kernel<__nv_bfloat16, 128>(llama_ext::cuda::"
        "(anonymous namespace)::KVCacheKernelParams)") == "attend_tc_kernel"
    assert harness.kernel_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                               "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)"
                               ) == "vectorized_elementwise_kernel"
    x, marker = torch.randn(64), torch.randn(8)
    profile = harness.kernel_times(lambda: (x + 1).mul_(2), calls=4, activity="CPU", preamble=lambda: marker.neg())
    by_name = {row["kernel"]: row for row in profile["kernels"]}
    assert profile["calls"] == 4 and set(by_name) == {"add", "mul_"}
    assert by_name["add"]["launches"] == 1 and by_name["mul_"]["launches"] == 1
    rows = profile["kernels"]
    assert all(row["us"] > 0 for row in rows) and rows == sorted(rows, key=lambda row: -row["us"])
    assert profile["span_us"] > 0
    op = {"title": "t", "status": "ok", "size_name": "n", "notes": [], "providers": {},
          "cases": [{"mode": "b1", "dtype": "bfloat16", "label": "b1 8192", "unit": "GB/s", "headline": True,
                     "ceiling_kind": "copy", "results": {"llama_ext": {
                         "status": "ok", "median_ms": 0.0415, "p20_ms": 0.04, "p80_ms": 0.042, "throughput": 808.0,
                         "fraction_of_ceiling": 0.19, "max_abs_diff_vs_eager": None, "peak_mem_bytes": 0,
                         "kernels": [{"kernel": "attend_tc_kernel", "launches": 1, "us": 20.0},
                                     {"kernel": "combine_kernel", "launches": 2, "us": 3.5}],
                         "kernel_span_us": 25.25}}}]}
    table = report.op_table(op)
    assert (f"- kernels, us per call (torch.profiler over {report.PROFILED_CALLS} calls after the timing, each from "
            "an evicted L2 as timed; span: first kernel's start to last one's end):") in table
    assert ("  - b1 bfloat16 b1 8192, llama_ext: attend_tc_kernel 20.0, combine_kernel 3.5 (x2); "
            "sum 23.5, span 25.2 of the 41.5 us median") in table


def test_kernel_breakdown_splits_calls_at_the_preamble_and_measures_their_span():
    """Kernels are grouped into calls by the preamble's kernels between them, whatever order the
    profiler lists them in; what runs before the first preamble is no call; the span is each
    call's first start to last end, so overlapping kernels (programmatic dependent launch) give a
    span below their sum, and gaps one above."""
    spans = [("warm", 0.0, 5.0), ("evict", 10.0, 20.0), ("hold", 20.0, 30.0),
             ("append", 31.0, 33.0), ("attend", 32.0, 52.0), ("combine", 51.0, 55.0),
             ("evict", 60.0, 70.0), ("hold", 70.0, 80.0),
             ("append", 82.0, 84.0), ("attend", 86.0, 106.0), ("combine", 108.0, 112.0)]
    calls = harness.calls_between_markers(list(reversed(spans)), {"evict", "hold"})
    assert [[name for name, _, _ in call] for call in calls] == [["append", "attend", "combine"]] * 2
    profile = harness.call_kernels(calls)
    assert profile["calls"] == 2
    assert [(row["kernel"], row["launches"], row["us"]) for row in profile["kernels"]] == [
        ("attend", 1, 20.0), ("combine", 1, 4.0), ("append", 1, 2.0)]
    assert profile["span_us"] == 30.0  # the calls' spans are 24 (overlapped) and 30 (gaps): the upper median
    assert harness.calls_between_markers([("evict", 0.0, 1.0), ("evict", 2.0, 3.0)], {"evict"}) == []
    with pytest.raises(RuntimeError, match="no kernels between the preamble's"):
        harness.call_kernels([])


def test_cpu_peak_memory_sees_the_attention_scratch():
    # The CPU attention kernels take their large scratch (the backward's dq partials: here 4 key
    # chunks x a fp32 copy of q, 64 MB, allocated on the calling thread) from outside PyTorch's
    # allocator (csrc/cpu/scratch.h). The profiler's memory trace, one of the benchmark's two
    # measures of peak MB, sees it only as reported: its peak may not fall short of the resident
    # set's growth over the same call (~84 MB: the partials' rows that the key chunks reach, 5/8
    # of them under causal masking, and the gradients; the trace without the partials: ~42 MB).
    q = torch.randn(1, 1024, 32, 128, requires_grad=True)
    k, v = (torch.randn(1, 1024, 8, 128, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, 1024, 32, 128)

    def step():
        return torch.autograd.grad(llama_ext.gqa_attention(q, k, v), (q, k, v), grad)

    step()  # first-call growth (code, thread pools) out of the way
    try:
        rss_growth = harness._cpu_peak_from_rss(step)
    except OSError as exc:
        pytest.skip(f"no VmHWM reset here: {exc}")
    traced = harness._cpu_peak_from_profiler(step)
    assert rss_growth >= 48 << 20, rss_growth  # the partials' reached rows are fresh pages each call
    assert traced >= 0.9 * rss_growth, (traced, rss_growth)
    assert harness.peak_memory(step, "cpu")["peak_mem_bytes"] >= 0.9 * rss_growth
