"""Outputs of a run: markdown tables (stdout and RESULTS.md), JSON, and PNG plots."""
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional

# Calls profiled for a CUDA result's kernel breakdown (harness.kernel_times).
PROFILED_CALLS = 10

CEILING_LABEL = {"copy": "copy", "dram_copy": "DRAM copy", "matmul": "matmul"}


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_mb(nbytes: Optional[int]) -> str:
    return "" if nbytes is None else f"{nbytes / (1 << 20):.1f}"


def _case_rows(case: Dict[str, Any]) -> List[str]:
    ceiling = CEILING_LABEL.get(case["ceiling_kind"], "")
    rows = []
    for name, r in case["results"].items():
        if r["status"] == "skipped":
            continue  # listed once per op, under the table
        backend = f" [{r['sdpa_backend']}]" if r.get("sdpa_backend") else ""
        head = f"| {case['mode']} | {case['dtype']} | {case['label']} | {name}{backend} "
        if r["status"] != "ok":
            rows.append(head + f"| n/a | | | | | | {r['reason'].replace('|', '/')} |")
            continue
        fraction, speedup, diff = r["fraction_of_ceiling"], r.get("speedup_vs_eager"), r["max_abs_diff_vs_eager"]
        single = r.get("single_call")
        if r.get("above_ceiling"):
            of_ceiling = f"above {ceiling} ceiling!"
        else:
            of_ceiling = "" if fraction is None else f"{100 * fraction:.0f}% {ceiling}"
        if r.get("fraction_of_copy_same_rounds") is not None:
            of_ceiling += f" ({100 * r['fraction_of_copy_same_rounds']:.0f}% same-round {ceiling})"
        cells = [
            _fmt_ms(r["median_ms"]) + ("*" if single else ""),
            "1 call" if single else f"{_fmt_ms(r['p20_ms'])}-{_fmt_ms(r['p80_ms'])}",
            f"{r['throughput']:.3g}",
            of_ceiling,
            "" if speedup is None else f"{speedup:.2f}x",
            _fmt_mb(r["peak_mem_bytes"]),
            "" if diff is None else f"{diff:.1e}",
        ]
        rows.append(head + "| " + " | ".join(cells) + " |")
    return rows


def op_table(op: Dict[str, Any], isa: Optional[str] = None) -> str:
    """Markdown table of one op, headline sizes first, then (CPU) the page-fault-bound sizes.
    isa names the vector ISA the CPU kernels ran on."""
    lines = [f"### {op['title']}" + (f" [CPU kernels: {isa}]" if isa else "")]
    if op["status"] == "skipped":
        return "\n".join(lines + ["", f"skipped: {op['reason']}", ""])
    unit = op["cases"][0]["unit"] if op["cases"] else ""
    header = [
        f"| mode | dtype | {op['size_name']} | provider | median ms | p20-p80 ms | {unit} | of ceiling | vs eager | peak MB | max diff vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    headline = [row for c in op["cases"] if c["headline"] for row in _case_rows(c)]
    large = [row for c in op["cases"] if not c["headline"] for row in _case_rows(c)]
    lines += [""] + header + headline
    if large:
        lines += ["", "Outputs over 16 MB (each fresh CPU tensor of 32 MB or more pays ~13 ms of page faults "
                  "on this machine, whatever the kernel): shown for completeness, not used to judge kernels.",
                  ""] + header + large
    skipped = [f"- {name}: skipped ({p['skip_reason']})" for name, p in op["providers"].items() if p["skip_reason"]]
    results = [r for c in op["cases"] for r in c["results"].values()]
    if any(r.get("single_call") for r in results):
        skipped.append("- \\*: one timed call after the warm-up: sampling a call this slow would exceed the per-case "
                       "time budget")
    if any(r.get("fraction_of_copy_same_rounds") is not None for r in results):
        skipped.append("- same-round copy: the rate against dst.copy_(src) (the ceiling's size, bytes read + written) "
                       "sampled in the same interleaved rounds as the providers, medians of both; the ceiling is "
                       "the run's best copy sample, which a shared VM may reach only in a faster spell")
    if any(r.get("peak_mem_method") in ("profiler memory trace", "resident growth") for r in results):
        skipped.append("- peak MB (CPU): the larger of the profiler's memory trace of one call (exact, but the "
                       "calling thread's allocations only) and the resident set's growth over another (every "
                       "thread's, at page grain, after trimming the C heap)")
    if any(r.get("above_ceiling") for r in results):
        skipped.append("- above ceiling: faster than the ceiling measured in this run (a ceiling measured under "
                       "load, or a miscounted amount of work); no fraction is shown")
    sources = [f"- {name}: {p['source']}" for name, p in op["providers"].items() if p["source"] and not p["skip_reason"]]
    lines += [""] + sources + skipped + [f"- {note}" for note in op["notes"]] + _kernel_lines(op) + [""]
    return "\n".join(lines)


def _kernel_lines(op: Dict[str, Any]) -> List[str]:
    """The CUDA kernels of each llama_ext result (harness.kernel_times): their mean device time
    per call, their span from the first kernel's start to the last one's end (the sum plus the
    gaps between them, less any overlap), and the call's median time."""
    lines = []
    for case in op["cases"]:
        for name, r in case["results"].items():
            if r.get("kernels"):
                kernels = ", ".join(f"{k['kernel']} {k['us']:.1f}" + (f" (x{k['launches']:g})" if k["launches"] != 1 else "")
                                    for k in r["kernels"])
                total = sum(k["us"] for k in r["kernels"])
                span = f", span {r['kernel_span_us']:.1f}" if r.get("kernel_span_us") is not None else ""
                lines.append(f"  - {case['mode']} {case['dtype']} {case['label']}, {name}: {kernels}; "
                             f"sum {total:.1f}{span} of the {1e3 * r['median_ms']:.1f} us median")
            elif r.get("kernels_error"):
                lines.append(f"  - {case['mode']} {case['dtype']} {case['label']}, {name}: no kernel profile "
                             f"({r['kernels_error']})")
    if lines:
        lines.insert(0, f"- kernels, us per call (torch.profiler over {PROFILED_CALLS} calls after the timing, each "
                        "from an evicted L2 as timed; span: first kernel's start to last one's end):")
    return lines


def _key_major_text(env: Dict[str, Any]) -> str:
    """Which tiles the CPU decode ran on a contiguous cache (absent from older results)."""
    key_major = env.get("llama_ext_cpu_key_major_decode")
    if key_major is None:
        return ""
    return f"; key-major decode tiles {'on' if key_major else 'off'}"


def header_text(result: Dict[str, Any]) -> str:
    env, ceilings = result["env"], result["ceilings"]
    lines = [
        f"- date: {env['date_utc']}; commit {env['git_commit'] or 'unknown'}{' (with local changes)' if env['git_dirty'] else ''}",
        f"- machine: {env['device_name']} ({env['device']}), {env['logical_cpus']} logical CPUs, torch threads "
        f"{env['torch_threads']}, load average at start {', '.join(f'{v:.2f}' for v in env['load_average_at_start'] or [])}",
        f"- software: torch {env['torch']} (CUDA {env['torch_cuda']}), python {env['python']}, transformers "
        f"{env['transformers']}, triton {env['triton']}",
        f"- ISA: llama_ext CPU kernels **{env['llama_ext_cpu_capability']}** (this CPU runs: "
        f"{', '.join(env['cpu_levels'])}); torch's own CPU kernels {env['cpu_capability']}"
        + _key_major_text(env),
    ]
    pages = env.get("cpu_pages")
    if pages:
        lines.append(
            f"- pages: {'2 MB' if pages['huge_pages'] else '4 KB'} for CPU tensors of 2 MB or more (transparent huge "
            f"pages `{pages['thp_mode'] or 'unknown'}`, THP_MEM_ALLOC_ENABLE "
            f"{pages['thp_mem_alloc_enable'] if pages['thp_mem_alloc_enable'] is not None else 'unset'})")
    if env.get("cpu_isa_limit_env"):
        how = ", ".join(f"{k}={v}" for k, v in env["cpu_isa_limit_env"].items())
        lines.append(f"- limited: {how}" + (
            f" (`--cpu-isa {env['cpu_isa_limit']}`: this CPU, which runs {env['cpu_levels'][-1]}, stands in for one "
            f"with no more than {env['cpu_isa_limit']}; torch, inductor, MKL and oneDNN run at that level, caches, clocks and "
            "memory are this CPU's)" if env.get("cpu_isa_limit") else ""))
    for kind in ("copy", "dram_copy"):
        c = ceilings.get(kind)
        if c:
            lines.append(f"- {CEILING_LABEL[kind]} ceiling: {c['rate']:.1f} GB/s ({c['what']}, before and after the ops)")
    for name, m in ceilings["matmul"].items():
        lines.append(f"- matmul rate {name}: {m['rate'] * 1e3:.1f} GFLOP/s ({m['what']}, before and after the ops)")
    reduced = [n for n in ceilings["matmul"] if n in ("bfloat16", "float16")]
    if reduced and "float32" in ceilings["matmul"]:
        lines.append(f"- matmul ceiling of {' and '.join(reduced)}: the better of its own rate and float32's "
                     "(where the CPU emulates reduced-precision matmuls, kernels widen to fp32)")
    if result.get("warning"):
        lines.append(f"- warning: {result['warning']}")
    lines.append(f"- command: `{result['command']}`; run time {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


def op_isa(result: Dict[str, Any]) -> Optional[str]:
    env = result["env"]
    if env["device"].startswith("cuda"):
        return None
    level = env.get("llama_ext_cpu_capability")
    return f"{level}, on a CPU with {env['cpu_levels'][-1]} limited to it" if _limited(env) else level


def markdown(result: Dict[str, Any]) -> str:
    isa = op_isa(result)
    return header_text(result) + "\n\n" + "\n".join(op_table(op, isa) for op in result["ops"])


def write_json(result: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def plot_op(op: Dict[str, Any], path: str, device: str) -> Optional[str]:
    """Throughput against size, one panel per dtype (rows) and mode (columns), one line per
    provider, the measured ceiling as a dashed line. Returns the path, or None when there is nothing to draw."""
    if op["status"] != "ok" or not op["cases"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: Dict[tuple, List[Dict[str, Any]]] = {}
    for case in op["cases"]:
        panels.setdefault((case["dtype"], case["mode"]), []).append(case)
    dtypes = list(dict.fromkeys(d for d, _ in panels))  # one row per dtype, one column per mode
    modes = list(dict.fromkeys(m for _, m in panels))
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(5.2 * len(modes), 4 * len(dtypes)), squeeze=False)
    for (dtype, mode), cases in panels.items():
        ax = axes[dtypes.index(dtype)][modes.index(mode)]
        cases = sorted(cases, key=lambda c: c["size"])
        for provider in op["providers"]:
            points = [(c["size"], c["results"][provider]["throughput"]) for c in cases
                      if c["results"][provider]["status"] == "ok"]
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        ceilings = [c["ceiling"] for c in cases if c["ceiling"]]
        if ceilings:
            ax.axhline(ceilings[0], color="k", linestyle="--", linewidth=1,
                       label=f"measured {cases[0]['ceiling_kind']} ceiling")
        large = [c["size"] for c in cases if not c["headline"]]
        if large:
            # Half a doubling either side, so that a single large size still shows on the log axis.
            ax.axvspan(min(large) / 2**0.5, max(large) * 2**0.5, color="0.9", label="> 16 MB out (page faults)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(op["size_name"])
        ax.set_ylabel(cases[0]["unit"])
        ax.set_title(f"{op['op']} {mode} {dtype} ({device})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_tables(result: Dict[str, Any], out_dir: str) -> List[str]:
    """results-<device>.json (every number) and results-<device>.md (the tables)."""
    os.makedirs(out_dir, exist_ok=True)
    tag = result["env"]["device"].split(":")[0]
    paths = [os.path.join(out_dir, f"results-{tag}.json"), os.path.join(out_dir, f"results-{tag}.md")]
    write_json(result, paths[0])
    with open(paths[1], "w") as f:
        f.write(markdown(result))
    return paths


def write_outputs(result: Dict[str, Any], out_dir: str, plots: bool = True) -> List[str]:
    """The tables and, unless plots is False, one plot per op. The plots need matplotlib; without
    it (an existing torch environment) they are skipped with a note, so that the run still ends
    with its tables and RESULTS.md."""
    paths = write_tables(result, out_dir)
    if not plots:
        return paths
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib draws them)", file=sys.stderr)
        return paths
    device = result["env"]["device"]
    for op in result["ops"]:
        png = plot_op(op, os.path.join(out_dir, f"{op['op']}-{device.split(':')[0]}.png"), device)
        if png:
            paths.append(png)
    return paths


def results_md_section(result: Dict[str, Any]) -> str:
    """RESULTS.md keeps one section per CUDA run and per CPU ISA level: "cuda", "cpu-avx2", ...;
    a level run under --cpu-isa on a CPU with more gets its own: "cpu-avx2-limited"."""
    env = result["env"]
    device = env["device"].split(":")[0]
    if device == "cuda":
        return device
    level = env["llama_ext_cpu_capability"]
    return f"{device}-{level}" + ("-limited" if _limited(env) else "")


def _limited(env: Dict[str, Any]) -> bool:
    return bool(env.get("cpu_isa_limit")) and env["llama_ext_cpu_capability"] != env["cpu_levels"][-1]


def update_results_md(result: Dict[str, Any], path: str) -> None:
    """Rewrites this run's section of RESULTS.md (between its begin/end markers), or adds it
    before the GPU part when this ISA level has none yet."""
    tag = results_md_section(result)
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    with open(path) as f:
        text = f.read()
    body = f"{begin}\n{markdown(result)}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: body, text, flags=re.S)
    else:
        env = result["env"]
        heading = f"### CPU kernels at the {env['llama_ext_cpu_capability']} level" + (
            f", on a CPU with {env['cpu_levels'][-1]} limited to it (`--cpu-isa`)" if _limited(env) else "") + "\n\n"
        where = text.find("\n## GPU")
        where = len(text) if where < 0 else where + 1
        text = text[:where] + heading + body + "\n\n" + text[where:]
    with open(path, "w") as f:
        f.write(text)
