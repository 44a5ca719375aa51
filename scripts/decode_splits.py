"""The decode targets' shapes (scripts/profile_cases.py's decode group: batch 1 and 32, context
8192, contiguous and paged) timed at forced key split counts (LLAMA_EXT_CUDA_DECODE_SPLITS) next
to the launcher's own choice, with and without the launch overlap (LLAMA_EXT_CUDA_PDL=0 turns it
off), and with the attend kernel's ring of two stages and its deep ring of three at head dim 128
(LLAMA_EXT_CUDA_DECODE_DEEP_RING=0 / 1), as the benchmark times CUDA calls (benchmarks/harness.py:
L2 evicted before each call). A table of µs per call and the K/V bytes' share of the copy
ceiling, measured in the same run: the measurements that tune the split rule in
csrc/cuda/kvcache_attention.cu and judge the overlap and the deep ring.
`make gpu-profile` runs it (its group `splits`); alone, on a GPU with an in-place build:

    python3 scripts/decode_splits.py [--splits 1,2,4,...] [--rep-ms 100]

--device cpu --smoke runs the same flow on small shapes (the CPU test of this file); the CPU
kernels ignore these variables, so every column there times the same calls.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks import harness  # noqa: E402
from scripts import profile_cases  # noqa: E402

VARIABLE = "LLAMA_EXT_CUDA_DECODE_SPLITS"
NO_OVERLAP = ("LLAMA_EXT_CUDA_PDL", "0")
DEEP_RING = "LLAMA_EXT_CUDA_DECODE_DEEP_RING"
DEFAULT_SPLITS = (1, 2, 3, 4, 6, 8, 16, 24, 32, 48, 64, 96, 128)


def time_call(fn, device, rep_ms):
    """Median seconds of one call."""
    if device == "cuda":
        return harness.time_cuda(fn, device, rep_ms)["median_ms"] * 1e-3
    return harness.time_cpu(fn, rep_ms * 1e-3)["median_ms"] * 1e-3


def copy_ceiling(device, smoke, rep_ms):
    """Bytes per second of dst.copy_(src), read plus written (the benchmark's copy ceiling)."""
    cfg = harness.RunConfig(device=device, dtypes=[torch.bfloat16], smoke=smoke)
    call, nbytes = harness.copy_call(cfg)
    return 2 * nbytes / min(time_call(call, device, rep_ms) for _ in range(3))


def kv_bytes(batch, sizes):
    """The K/V cache bytes one decode step reads: 2 x batch x context x kv_heads x d, bf16."""
    return 2 * batch * sizes["context"] * sizes["kv_heads"] * sizes["head_dim"] * 2


def run(device, smoke, splits, rep_ms):
    sizes = profile_cases._sizes(smoke)
    rand = profile_cases.bf16_rand(device)
    ceiling = copy_ceiling(device, smoke, rep_ms)
    print(f"copy ceiling {ceiling / 1e9:.0f} GB/s; {device}; context {sizes['context']}, "
          f"{sizes['heads']}/{sizes['kv_heads']} heads x {sizes['head_dim']}, bf16")
    # (heading, environment): the launcher's choice with and without the overlap, then each count.
    for variable in (VARIABLE, NO_OVERLAP[0], DEEP_RING):
        os.environ.pop(variable, None)  # "auto splits" is the launcher as shipped
    # The forced counts run the ring of two, so that they compare split counts of one kernel.
    columns = [("auto splits", {}), ("auto, no overlap", dict([NO_OVERLAP])),
               ("auto, ring of 2", {DEEP_RING: "0"}), ("auto, deep ring", {DEEP_RING: "1"})]
    columns += [(f"{s} splits, ring of 2", {VARIABLE: str(s), DEEP_RING: "0"}) for s in splits]
    print("| case | " + " | ".join(heading for heading, _ in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for batch, paged in ((b, paged) for b in profile_cases.DECODE_BATCHES for paged in (False, True)):
        name = profile_cases.decode_name(batch, paged)
        call = profile_cases.decode_case(batch, paged)(rand, sizes, device)
        cells = []
        for _, environment in columns:
            os.environ.update(environment)
            try:
                seconds = time_call(call, device, rep_ms)
            except ValueError as e:  # the deep ring on a GPU whose shared memory does not hold it
                if "exceed this GPU's per-block limit" not in str(e):
                    raise
                cells.append("n/a (does not fit)")
                continue
            finally:
                for variable in environment:
                    os.environ.pop(variable, None)
            share = kv_bytes(batch, sizes) / seconds / ceiling
            cells.append(f"{seconds * 1e6:.1f} us {100 * share:.0f}%")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

def timing_parser(doc):
    """The command line of gpu-profile's timing scripts (this one, row_ahead.py, query_tokens.py):
    --device, --smoke and --rep-ms; the description is the first paragraph of `doc`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="small shapes (the CPU test of this file)")
    p.add_argument("--rep-ms", type=int, default=100, help="time per timing (default: %(default)s)")
    return p


def timing_main(doc, run, argv=None):
    """The main of a timing script whose run(device, smoke, rep_ms) takes timing_parser's line."""
    args = timing_parser(doc).parse_args(argv)
    run(args.device, args.smoke, args.rep_ms)
    return 0


def main(argv=None):
    p = timing_parser(__doc__)
    p.add_argument("--splits", default=",".join(map(str, DEFAULT_SPLITS)),
                   help="comma-separated split counts, 1 to 128 (default: %(default)s)")
    args = p.parse_args(argv)
    splits = [int(s) for s in args.splits.split(",") if s]
    bad = [s for s in splits if not 1 <= s <= 128]
    if bad:
        p.error(f"--splits: split counts run from 1 to 128, got {bad}")
    run(args.device, args.smoke, splits, args.rep_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
