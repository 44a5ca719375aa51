"""The RMSNorm backward's kernel choice measured side by side (csrc/cuda/rms_norm.cu): for rows of
two chunks a thread, the launcher runs the row-ahead kernel where it fits as many CTAs per SM as
the plain one. Each case is timed as the launcher chooses, with LLAMA_EXT_CUDA_ROW_AHEAD=0 (the
plain kernel) and with =1 (the row-ahead kernel wherever the layout has one), as the benchmark
times CUDA calls (benchmarks/harness.py: L2 evicted before each call), against the copy ceiling
of the same run. The bytes are the benchmark's (benchmarks/bench_rms_norm.py): 3 n e plain, 4 n e
fused. `make gpu-profile` runs it (its group `row_ahead`); alone, on a GPU with an in-place build:

    python3 scripts/row_ahead.py [--rep-ms 100]

--device cpu --smoke runs the same flow on small shapes (the CPU test of this file); the CPU
kernels ignore the variable, so every column there times the same calls.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import llama_ext  # noqa: E402
from benchmarks.common import backward_closure  # noqa: E402
from scripts.decode_splits import copy_ceiling, time_call, timing_main  # noqa: E402

VARIABLE = "LLAMA_EXT_CUDA_ROW_AHEAD"
COLUMNS = (("auto", None), ("plain (0)", "0"), ("row-ahead (1)", "1"))
# (rows, hidden): Llama-3-8B's 4096 (one CTA a row), 1536 (one CTA a row, fewer threads) and
# 384 (eight rows a CTA), two chunks a thread in bf16 and fp16; fp32 at 4096 and 1536 (four at 384).
SHAPES = ((32768, 4096), (65536, 1536), (262144, 384))
SMOKE_SHAPES = ((64, 256), (96, 48))
DTYPES = (torch.bfloat16, torch.float32)


def backward_call(rows, hidden, dtype, fused, device):
    """The backward of rms_norm (or fused_add_rms_norm, with a gradient for each of its outputs)
    alone, on a kept graph, as benchmarks/bench_rms_norm.py times it."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    x, weight = rand(rows, hidden), rand(hidden)
    if fused:
        residual = rand(rows, hidden)
        inputs = (x, residual, weight)
        outputs = llama_ext.fused_add_rms_norm(x, residual, weight)
    else:
        inputs = (x, weight)
        outputs = llama_ext.rms_norm(x, weight)
    grads = [rand(rows, hidden).detach() for _ in (outputs if fused else (outputs,))]
    return backward_closure(outputs, inputs, grads)


def run(device, smoke, rep_ms):
    ceiling = copy_ceiling(device, smoke, rep_ms)
    print(f"copy ceiling {ceiling / 1e9:.0f} GB/s; {device}; RMSNorm backward, dx and dweight")
    print("| case | " + " | ".join(heading for heading, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    os.environ.pop(VARIABLE, None)  # "auto" is the launcher as shipped
    for rows, hidden in SMOKE_SHAPES if smoke else SHAPES:
        for dtype in DTYPES:
            for fused in (False, True):
                call = backward_call(rows, hidden, dtype, fused, device)
                nbytes = (4 if fused else 3) * rows * hidden * dtype.itemsize
                cells = []
                for _, value in COLUMNS:
                    if value is not None:
                        os.environ[VARIABLE] = value
                    try:
                        seconds = time_call(call, device, rep_ms)
                    finally:
                        os.environ.pop(VARIABLE, None)
                    cells.append(f"{seconds * 1e6:.1f} us {100 * nbytes / seconds / ceiling:.0f}%")
                name = f"{'fused_add_rms_norm' if fused else 'rms_norm'} {rows}x{hidden} {str(dtype)[6:]}"
                print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(timing_main(__doc__, run))
