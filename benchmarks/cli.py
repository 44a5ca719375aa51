"""Command line of the benchmark suite: selects ops, dtypes, device and sweep, runs them with
the shared harness, prints one table per op and writes JSON, markdown and PNG plots."""
import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from . import harness, report

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU: both dtypes; CUDA: bf16, the dtype models run in there.
DEFAULT_DTYPES = {"cpu": ["float32", "bfloat16"], "cuda": ["bfloat16"]}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-results")
RESULTS_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _op_builders() -> Dict[str, Callable]:
    from . import bench_attention, bench_decode, bench_rms_norm, bench_rotary

    return {
        "rms_norm": bench_rms_norm.build_rms_norm,
        "fused_add_rms_norm": bench_rms_norm.build_fused_add_rms_norm,
        "rotary": bench_rotary.build,
        "attention": bench_attention.build,
        "decode": bench_decode.build,
        "chunked_prefill": bench_decode.build_chunked_prefill,
    }


PROVIDERS = ["eager", "native", "compile", "llama_ext", "llama_ext_100kb", "llama_ext_2mb", "sdpa"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ops = list(_op_builders())
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--op", action="append", choices=ops + ["none"],
                   help="op to run (repeatable; default: all). 'none' with --e2e runs only the end-to-end model")
    p.add_argument("--dtype", action="append", choices=list(DTYPES),
                   help="dtype to run (repeatable; default: float32 and bfloat16 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--provider", action="append", choices=PROVIDERS,
                   help="provider to run (repeatable; default: all). 'sdpa' is HF's SDPA model in --e2e; "
                        "'llama_ext_100kb' (CUDA attention) runs llama_ext with the tiles of ~100 KB-shared-memory GPUs; "
                        "'llama_ext_2mb' (CPU decode) runs llama_ext over caches in 2 MB pages (empty_kv_cache)")
    p.add_argument("--cpu-isa", choices=list(harness.CPU_ISA_LIMITS),
                   help="stand in for a CPU with no more than this llama_ext CPU level: llama_ext, torch, inductor, "
                        "MKL and oneDNN all run at it (a fresh process with their ISA variables set)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own, all cores)")
    p.add_argument("--budget", type=float,
                   help="seconds per case and provider: a provider whose call (after its warm-up) takes over a "
                        "fifth of it gets one timed call, marked * (default: 3 on CPU, 20 with --full, 10 on CUDA)")
    p.add_argument("--full", action="store_true", help="the whole size sweep (default: a quick one)")
    p.add_argument("--size", action="append", type=int,
                   help="size to run instead of the sweep (repeatable): rows for RMSNorm, tokens for rotary, "
                        "sequence length for attention; e.g. --op attention --size 2048 for the CPU reference point")
    p.add_argument("--e2e", action="store_true", help="also run the end-to-end Llama benchmark (benchmarks.e2e)")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for JSON, markdown and plots (default: bench-results/)")
    p.add_argument("--update-results-md", action="store_true",
                   help="rewrite this device's section of benchmarks/RESULTS.md with the run's tables")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and short timings, to check the suite runs")
    p.add_argument("--kernels", action="store_true",
                   help="CUDA: list each llama_ext result's kernels with their device times (torch.profiler)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--no-plots", action="store_true",
                   help="tables only (matplotlib's first import on a fresh machine takes seconds)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    if args.smoke and args.update_results_md:
        p.error("--smoke timings are not results: drop --update-results-md")
    if not args.device.startswith("cuda"):
        _check_cpu_level(p, args)
    return args


def _check_cpu_level(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--cpu-isa names a level this CPU runs. A run whose llama_ext kernels are below the CPU's
    best level while the other providers' libraries are not (LLAMA_EXT_CPU_CAPABILITY alone)
    stands for no real CPU: it may compare levels, but not become RESULTS.md's table."""
    import llama_ext

    runnable = [name for name, missing in llama_ext._cpu_kernels.levels().items() if missing is None]
    if args.cpu_isa and args.cpu_isa not in runnable:
        p.error(f"--cpu-isa {args.cpu_isa}: this CPU runs only {', '.join(runnable)}")
    level = args.cpu_isa or llama_ext.cpu_capability()
    if args.update_results_md and level != runnable[-1] and not args.cpu_isa:
        p.error(f"llama_ext runs at {level} on a CPU that runs {runnable[-1]}, but torch, MKL and oneDNN do not: "
                f"use --cpu-isa {level} for a table of a {level} CPU")


def run(args: argparse.Namespace) -> Dict:
    """Runs the selected benchmarks and returns the JSON-ready result."""
    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [DTYPES[d] for d in (args.dtype or DEFAULT_DTYPES[args.device.split(":")[0]])]
    cuda = args.device.startswith("cuda")
    budget = args.budget or (10.0 if cuda else 20.0 if args.full else 3.0)
    cfg = harness.RunConfig(device=args.device, dtypes=dtypes, full=args.full, smoke=args.smoke, sizes=args.size,
                            min_run_time=0.02 if args.smoke else 0.3, cuda_rep_ms=10 if args.smoke else 100,
                            budget_s=budget, kernel_times=args.kernels)
    env = harness.environment(cfg.device)
    warning = harness.load_warning(env)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    ceilings = harness.Ceilings(cfg)
    ceilings.measure(cfg.dtypes)
    builders = _op_builders()
    selected = [] if args.op and "none" in args.op else (args.op or list(builders))
    if args.e2e:
        from . import e2e

        builders = dict(builders, e2e=e2e.build)
        selected = selected + ["e2e"]
    result = {
        "schema_version": 1,
        "command": "python -m benchmarks " + " ".join(_argv_of(args)),
        "config": {"device": cfg.device, "dtypes": [harness.dtype_name(d) for d in cfg.dtypes], "full": cfg.full,
                   "smoke": cfg.smoke, "ops": selected, "e2e": args.e2e, "budget_s": cfg.budget_s},
        "env": env,
        "warning": warning,
        "ceilings": ceilings.as_dict(),
        "ops": [],
        "elapsed_s": 0.0,
    }
    for name in selected:
        bench = builders[name](cfg)
        if args.provider:
            bench.providers = [p for p in bench.providers if p.name in args.provider]
        op_start = time.time()
        op = harness.run_op(bench, cfg, ceilings, progress=not args.no_progress)
        op["elapsed_s"] = time.time() - op_start  # what each op costs the run, to keep the quick run quick
        result["ops"].append(op)
        # The tables so far, so that a run stopped by a time limit still leaves its numbers.
        result.update(ceilings=ceilings.as_dict(), elapsed_s=time.time() - start)
        report.write_tables(result, args.out)
    # Again after the ops: a ceiling measured while other processes ran is too low, and a
    # fraction of it too high. The tables are printed once the ceilings are final.
    ceilings.measure(cfg.dtypes)
    for op in result["ops"]:
        harness.apply_ceilings(op, ceilings)
        print(report.op_table(op, report.op_isa(result)), flush=True)
    result.update(ceilings=ceilings.as_dict(), elapsed_s=time.time() - start)
    return result


def _argv_of(args: argparse.Namespace) -> List[str]:
    argv = [f"--op {o}" for o in args.op or []] + [f"--dtype {d}" for d in args.dtype or []]
    argv += [f"--provider {p}" for p in args.provider or []] + ([f"--threads {args.threads}"] if args.threads else [])
    argv += [f"--budget {args.budget:g}"] if args.budget else []
    argv += [f"--cpu-isa {args.cpu_isa}"] if args.cpu_isa else []
    argv += [f"--size {n}" for n in args.size or []] + [f"--device {args.device}"] + [f"--{flag}" for flag in ("full", "e2e", "smoke") if getattr(args, flag)]
    return argv


def _run_limited(level: str, argv: List[str]) -> None:
    """Replaces this process with the same command under --cpu-isa's limits (harness.CPU_ISA_LIMITS)."""
    env = dict(os.environ, **harness.cpu_isa_environment(level))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], env)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.cpu_isa and os.environ.get(harness.CPU_ISA_ENV) != args.cpu_isa:
        _run_limited(args.cpu_isa, argv)
    result = run(args)
    paths = report.write_outputs(result, args.out, plots=not args.no_plots)
    if args.update_results_md:
        report.update_results_md(result, RESULTS_MD)
        paths.append(RESULTS_MD)
    print(report.header_text(result))
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
    return 0
