"""The case list that compute-sanitizer (memcheck, racecheck, synccheck) walks in `make gpu-check`:
every CUDA kernel and every tail of it, at the smallest sizes that reach them.

Each case is one function registered with @case: it names the sanitizer tools it is meant for
and calls the ops at sizes chosen to end inside a vector, a warp, a block or a tile. Adding a
kernel is adding one such function (or one line to a per-head-dim loop at the bottom). Cases are
ordered so that the first ones reach every kernel once and later ones add tails; with --deadline
the script starts no case after that time and names the ones it left out (exit 3), so a time
limit costs coverage of tails, never a silent pass.

Sizes and why (the largest tiles and thresholds the kernels use today, plus a tail):
- RMSNorm rows of 1, 7, 128 (67 rows: warp-sized rows, several per block), 384 (67 rows of two
  chunks a lane: the backward's row-ahead kernel with several rows per block), 769 (odd: scalar
  path), 4104 (16-byte vectors, register-cached row, one partial block), 65544 (longer than any
  register cache: the looped path in the forward and the backward's workspace), an aligned and an
  unaligned strided view; for memcheck, 600 x 4104 and 6003 x 384 (more row blocks than the
  backward's grid has CTAs: rows loaded ahead up to the last). Shared memory: the block
  reduction, hence every tool.
- Rotary: vector (16-byte chunks) and scalar (a rotary half that is no multiple of a vector, a
  misaligned view) paths, both pairings, pass-through dims, positions in int64 and int32, the HF
  [b, h, s, d] layout. No shared memory or barriers: memcheck only.
- Attention, per supported head_dim (probed from the op itself, so a new head_dim is covered
  without an edit): 130 queries x 197 keys crosses every query tile (<= 128) and key tile
  (<= 128) with a tail; 197 x 130 causal leaves 67 query rows with no visible key; decode (1
  query); non-causal; a misaligned copy of q/k/v (no cp.async); fp16 and bf16 tensor-core
  instantiations; fp32 (SIMT); varlen with an empty sequence; group sizes 2 and 8; the tiles of
  ~100 KB GPUs (LLAMA_EXT_CUDA_SMEM_KB=100) at the head dims where they differ from a large GPU's.

Run as `python scripts/sanitize_kernels.py [--tool memcheck] [--deadline UNIX_TIME]`; `--device cpu`
walks the same cases on the CPU kernels (the dry run of `make gpu-check`, which checks that the
case list itself runs); `--list` prints the cases.
"""
import argparse
import inspect
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Tuple

import torch

import llama_ext

ALL_TOOLS = ("memcheck", "racecheck", "synccheck")
MEMCHECK = ("memcheck",)
# Exit status when --deadline left cases out (the caller reports it as incomplete).
EXIT_INCOMPLETE = 3


@dataclass
class Case:
    name: str
    tools: Tuple[str, ...]
    run: Callable[[str], None]


CASES = []


def case(name, tools=ALL_TOOLS):
    """Registers fn(device) as a sanitizer case for `tools`."""

    def register(fn):
        CASES.append(Case(name, tuple(tools), fn))
        return fn

    return register


def rnd(*shape, dtype, device):
    return torch.randn(*shape, device=device, dtype=dtype)


def misaligned(*shape, dtype, device):
    """A view whose base is one element past an allocation and whose rows are one element
    longer than they look: neither 16-byte aligned nor vectorizable."""
    *lead, last = shape
    return rnd(*lead, last + 1, dtype=dtype, device=device)[..., 1:]


def accepts(fn, keyword):
    return keyword in inspect.signature(fn).parameters


HALF = (torch.bfloat16, torch.float16)

# ---- RMSNorm ----------------------------------------------------------------------------------


def rms_norm_calls(x, w, r):
    """Forward (plain, fused, in place) and backward (with and without weight, fused) on one shape."""
    x = x.detach().requires_grad_()
    r = r.detach().requires_grad_()
    wg = w.detach().requires_grad_()
    y = llama_ext.rms_norm(x, wg)
    y.backward(torch.randn_like(y))
    y = llama_ext.rms_norm(x, None)
    y.backward(torch.randn_like(y))
    y, res = llama_ext.fused_add_rms_norm(x, r, wg)
    torch.autograd.backward((y, res), (torch.randn_like(y), torch.randn_like(res)))
    if accepts(llama_ext.rms_norm, "offset"):  # Gemma / OLMo 2 forms
        y = llama_ext.rms_norm(x, wg, offset=1.0, cast_before_weight=False)
        y.backward(torch.randn_like(y))
    with torch.no_grad():
        llama_ext.fused_add_rms_norm_(x.detach().clone(), r.detach().clone(), w)


def rms_norm_rows(sizes, dtypes, device, make=rnd):
    for dtype in dtypes:
        for rows, hidden in sizes:
            w = rnd(hidden, dtype=dtype, device=device)
            rms_norm_calls(make(rows, hidden, dtype=dtype, device=device),
                           w, make(rows, hidden, dtype=dtype, device=device))


@case("rms_norm_vector")
def _(device):
    rms_norm_rows(((67, 128), (3, 4104), (2, 65544)), (torch.float32, torch.bfloat16), device)
    rms_norm_rows(((3, 4104), (67, 384)), (torch.float16,), device)
    # Rows of an aligned strided view: vectorized, with a row stride that is not the length.
    rms_norm_rows(((5, 1024),), (torch.bfloat16,), device,
                  make=lambda r, n, dtype, device: rnd(r, 3 * n, dtype=dtype, device=device)[:, n:2 * n])


@case("rms_norm_scalar")
def _(device):
    rms_norm_rows(((67, 1), (67, 7), (3, 769), (2, 16411)), (torch.float32, torch.bfloat16), device)
    rms_norm_rows(((3, 4104), (2, 65544)), (torch.bfloat16,), device, make=misaligned)


@case("rms_norm_rows_ahead", MEMCHECK)
def _(device):
    # More row blocks than the backward's grid holds CTAs, so that each CTA of the row-ahead kernel
    # loads rows ahead of the one it reduces, up to the last (a partial one for the short rows):
    # long rows and short ones; then an fp32 weight, whose fp32 output makes g's chunks 32 bytes.
    rms_norm_rows(((600, 4104), (6003, 384)), (torch.bfloat16,), device)
    x = rnd(600, 4104, dtype=torch.bfloat16, device=device).requires_grad_()
    w = rnd(4104, dtype=torch.float32, device=device).requires_grad_()
    y = llama_ext.rms_norm(x, w)
    y.backward(torch.randn_like(y))


# ---- Rotary -----------------------------------------------------------------------------------


def rotary_calls(dtype, head_dim, rotary_dim, device, make=rnd):
    cos, sin = llama_ext.rope_cos_sin(rotary_dim, 64, device=device)
    for interleaved in (False, True):
        q = make(2, 13, 12, head_dim, dtype=dtype, device=device).requires_grad_()
        k = make(2, 13, 4, head_dim, dtype=dtype, device=device).requires_grad_()
        q2, k2 = llama_ext.apply_rotary(q, k, cos, sin, interleaved=interleaved)
        torch.autograd.backward((q2, k2), (torch.randn_like(q2), torch.randn_like(k2)))
        # HF layout [b, h, s, d] as a transposed view, in place, explicit positions.
        for pos_dtype in (torch.int64, torch.int32):
            qt = rnd(2, 5, 13, head_dim, dtype=dtype, device=device).transpose(1, 2)
            kt = rnd(2, 1, 13, head_dim, dtype=dtype, device=device).transpose(1, 2)
            pos = torch.randint(0, 64, (2, 13), device=device, dtype=pos_dtype)
            llama_ext.apply_rotary_(qt, kt, cos, sin, positions=pos, interleaved=interleaved)


@case("rotary_vector", MEMCHECK)
def _(device):
    for dtype in (torch.float32, torch.bfloat16):
        rotary_calls(dtype, 128, 64, device)  # half the dims pass through
        rotary_calls(dtype, 64, 64, device)


@case("rotary_scalar", MEMCHECK)
def _(device):
    rotary_calls(torch.bfloat16, 80, 40, device)  # a rotary half of 20: no whole vectors
    rotary_calls(torch.float32, 128, 128, device, make=misaligned)


# ---- Attention --------------------------------------------------------------------------------


# --head-dims: a subset of the supported dims (the dry run on the CPU, whose kernels take every
# multiple of 8, keeps it short).
HEAD_DIMS_WANTED = None


def supported_head_dims(device):
    """The head dims the attention op accepts on this device: its own check is the one list.
    Tensor-core shapes are multiples of 16, so only those are asked."""
    dims = []
    for d in range(16, 257, 16):
        q = torch.randn(1, 1, 1, d, device=device, dtype=torch.bfloat16)
        try:
            llama_ext.gqa_attention(q, q, q)
        except ValueError:
            continue
        dims.append(d)
    if HEAD_DIMS_WANTED is not None:
        missing = sorted(set(HEAD_DIMS_WANTED) - set(dims))
        assert not missing, f"--head-dims {missing} not supported on {device} (supported: {dims})"
        dims = [d for d in dims if d in HEAD_DIMS_WANTED]
    return dims


def attention_call(dtype, d, seq_q, seq_k, device, *, causal=True, heads=(2, 1), batch=2, make=rnd,
                   backward=True, **kwargs):
    h_q, h_kv = heads
    q = make(batch, seq_q, h_q, d, dtype=dtype, device=device).requires_grad_(backward)
    k = make(batch, seq_k, h_kv, d, dtype=dtype, device=device).requires_grad_(backward)
    v = make(batch, seq_k, h_kv, d, dtype=dtype, device=device).requires_grad_(backward)
    out = llama_ext.gqa_attention(q, k, v, causal=causal, **kwargs)
    if backward:
        out.backward(torch.randn_like(out))


def hf_layout(*shape, dtype, device):
    """[b, s, h, d] as a transposed view of HF's [b, h, s, d]."""
    b, s, h, d = shape
    return rnd(b, h, s, d, dtype=dtype, device=device).transpose(1, 2)


def attention_tiles(d, device):
    """Every query and key tile with a tail, forward and backward, both half dtypes."""
    for dtype in HALF:
        attention_call(dtype, d, 130, 197, device)


def attention_edges(d, device):
    """Rows with no visible key, decode, non-causal, no cp.async, HF layout, group of 8, and
    window/softcap where the op has them."""
    dtype = torch.bfloat16
    attention_call(dtype, d, 197, 130, device)
    attention_call(dtype, d, 1, 197, device, backward=False)
    attention_call(dtype, d, 130, 197, device, causal=False)
    attention_call(dtype, d, 67, 67, device, make=misaligned)
    attention_call(dtype, d, 67, 67, device, heads=(8, 1), batch=1, make=hf_layout)
    if accepts(llama_ext.gqa_attention, "window_size"):
        attention_call(dtype, d, 130, 197, device, window_size=(70, 0))
        attention_call(dtype, d, 130, 197, device, causal=False, window_size=(33, 20), softcap=30.0)


def attention_simt(device):
    """fp32 inputs take the SIMT kernels (the decode one too), any head_dim at run time: the
    extremes and a tail."""
    dims = supported_head_dims(device)
    for d in (dims[0], dims[-1]):
        attention_call(torch.float32, d, 130, 197, device)
        attention_call(torch.float32, d, 197, 130, device, make=misaligned)
        if hasattr(llama_ext, "gqa_attention_with_kvcache"):
            kvcache_calls(d, device, torch.float32)


def attention_varlen(dtype, d, device):
    lens = torch.tensor([0, 5, 130, 1], device=device)
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    total, longest = int(lens.sum()), int(lens.max())
    q = rnd(total, 4, d, dtype=dtype, device=device).requires_grad_()
    k = rnd(total, 2, d, dtype=dtype, device=device).requires_grad_()
    v = rnd(total, 2, d, dtype=dtype, device=device).requires_grad_()
    out = llama_ext.gqa_attention_varlen(q, k, v, cu, cu, longest, longest, causal=True)
    out.backward(torch.randn_like(out))


@case("attention_100kb_tiles")
def _(device):
    # What a ~100 KB GPU (sm_86/89/120) launches, on this GPU: D = 128's 64-key backward blocks,
    # D = 256's 32 x 32 backward and the forward's smaller tiles.
    os.environ["LLAMA_EXT_CUDA_SMEM_KB"] = "100"
    try:
        for d in (128, 256):
            if d in supported_head_dims(device):
                attention_call(torch.bfloat16, d, 130, 197, device)
    finally:
        del os.environ["LLAMA_EXT_CUDA_SMEM_KB"]


@case("attention_simt_and_varlen")
def _(device):
    attention_simt(device)
    attention_varlen(torch.bfloat16, 128, device)
    attention_varlen(torch.float32, 64, device)


# ---- Decode against a KV cache ------------------------------------------------------------------


def kvcache_calls(d, device, dtype=torch.bfloat16):
    """Contiguous and paged caches, a long sequence (split over keys) beside a short and an
    empty one, one and several new tokens appended, with and without fused rotary; and a prompt
    of 130 tokens (the prefill route: lengths and rotated q from their own kernels, then the
    prefill kernels) with rotary only. Without rotary the route runs the same append (rotation is
    a run-time branch, taken both ways by the decode calls), key-lengths and prefill-forward
    kernels, less the rotate-q one; lse is computed either way (return_lse only picks what Python
    returns). A second prompt call would add racecheck time and no kernel."""
    batch, h_q, h_kv, capacity = 3, 8, 2, 1200
    seqlens = torch.tensor([1000, 3, 0], device=device, dtype=torch.int32)
    cos, sin = llama_ext.rope_cos_sin(d, capacity, device=device)
    for seq_new in (1, 3, 130):  # 130: a prompt, on the prefill route where the cache is contiguous
        q = rnd(batch, seq_new, h_q, d, dtype=dtype, device=device)
        k_new = rnd(batch, seq_new, h_kv, d, dtype=dtype, device=device)
        v_new = rnd(batch, seq_new, h_kv, d, dtype=dtype, device=device)
        k_cache = rnd(batch, capacity, h_kv, d, dtype=dtype, device=device)
        v_cache = rnd(batch, capacity, h_kv, d, dtype=dtype, device=device)
        if seq_new < 130:
            llama_ext.gqa_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k_new, v=v_new, return_lse=True)
        llama_ext.gqa_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k_new, v=v_new,
                                             rotary_cos=cos, rotary_sin=sin, return_lse=seq_new == 130)
        if seq_new > 3:
            continue  # a paged prompt: kvcache_paged_prompt_d{d} (memcheck)
        for block in (16, 64):
            blocks = -(-capacity // block)
            table = torch.randperm(batch * blocks, device=device).to(torch.int32).view(batch, blocks)
            k_pages = rnd(batch * blocks, block, h_kv, d, dtype=dtype, device=device)
            v_pages = rnd(batch * blocks, block, h_kv, d, dtype=dtype, device=device)
            llama_ext.gqa_attention_with_kvcache(q, k_pages, v_pages, seqlens, k=k_new, v=v_new, block_table=table)


def kvcache_paged_prompt(d, device, dtype=torch.bfloat16):
    """A prompt of 130 tokens written into a paged cache of 16-token blocks and attended on the
    prefill kernels through the block table (tensor cores in fp16 / bf16, CUDA cores in fp32),
    whose entries past each sequence's last page are -1, beside a sequence with no tokens before
    the prompt; lse returned."""
    batch, h_q, h_kv, block, seq_new = 3, 8, 2, 16, 130
    seqlens = torch.tensor([300, 3, 0], device=device, dtype=torch.int32)
    max_blocks = -(-(300 + seq_new + 40) // block)
    table = torch.randperm(batch * max_blocks, device=device).to(torch.int32).view(batch, max_blocks)
    for b, n in enumerate((seqlens + seq_new).tolist()):
        table[b, -(-n // block):] = -1
    k_pages = rnd(batch * max_blocks, block, h_kv, d, dtype=dtype, device=device)
    v_pages = rnd(batch * max_blocks, block, h_kv, d, dtype=dtype, device=device)
    q = rnd(batch, seq_new, h_q, d, dtype=dtype, device=device)
    k_new = rnd(batch, seq_new, h_kv, d, dtype=dtype, device=device)
    v_new = rnd(batch, seq_new, h_kv, d, dtype=dtype, device=device)
    llama_ext.gqa_attention_with_kvcache(q, k_pages, v_pages, seqlens, k=k_new, v=v_new, block_table=table,
                                         return_lse=True)


if hasattr(llama_ext, "gqa_attention_with_kvcache"):
    @case("kvcache_ring_of_two_d128")
    def _(device):
        # Where the GPU holds the deep ring, kvcache_d128's small grids take it under the
        # launcher's rule; the ring of two, which larger batches run, gets the same calls here.
        os.environ["LLAMA_EXT_CUDA_DECODE_DEEP_RING"] = "0"
        try:
            kvcache_calls(128, device)
        finally:
            os.environ.pop("LLAMA_EXT_CUDA_DECODE_DEEP_RING", None)

    @case("kvcache_paged_prompt_fp32", MEMCHECK)
    def _(device):
        # The SIMT prefill kernel reads the pages (no shared memory: memcheck alone); it takes any
        # head dim at run time, so one suffices.
        kvcache_paged_prompt(64, device, torch.float32)


# Per head_dim: tiles first (every kernel once), then the edges, which --deadline may leave out.
# The per-head-dim cases need the device to probe the supported dims, so they are registered in
# main() through these makers.
PER_HEAD_DIM = [
    ("attention_tiles_d{}", ALL_TOOLS, attention_tiles),
]
if hasattr(llama_ext, "gqa_attention_with_kvcache"):
    PER_HEAD_DIM.append(("kvcache_d{}", ALL_TOOLS, kvcache_calls))
PER_HEAD_DIM_EDGES = [
    ("attention_edges_d{}", MEMCHECK, attention_edges),
]
if hasattr(llama_ext, "gqa_attention_with_kvcache"):
    PER_HEAD_DIM_EDGES.append(("kvcache_paged_prompt_d{}", MEMCHECK, kvcache_paged_prompt))


def register_per_head_dim(device):
    dims = supported_head_dims(device)
    for makers in (PER_HEAD_DIM, PER_HEAD_DIM_EDGES):
        for d in dims:
            for name, tools, fn in makers:
                CASES.append(Case(name.format(d), tools, lambda dev, fn=fn, d=d: fn(d, dev)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tool", choices=ALL_TOOLS, default="memcheck", help="the sanitizer tool this run is under")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for the dry run")
    p.add_argument("--deadline", type=float, default=0,
                   help="start no case after this time, in seconds since the epoch (0: none); the caller sets it "
                        "from its own clock, so the interpreter's and CUDA's start-up count")
    p.add_argument("--head-dims", help="comma-separated subset of the supported head dims (default: all)")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    args = p.parse_args()
    global HEAD_DIMS_WANTED
    if args.head_dims:
        HEAD_DIMS_WANTED = [int(d) for d in args.head_dims.split(",")]

    if args.device == "cuda":
        assert torch.cuda.is_available() and llama_ext.cuda_kernels_built(), "needs a GPU and the CUDA build"
    start = time.monotonic()
    torch.manual_seed(0)
    register_per_head_dim(args.device)
    selected = [c for c in CASES if args.tool in c.tools]
    if args.list:
        for c in selected:
            print(c.name)
        return 0
    done, left_out = [], []
    for c in selected:
        if args.deadline and time.time() > args.deadline:
            left_out.append(c.name)
            continue
        t0 = time.monotonic()
        print(f"case {c.name} ...", flush=True)
        c.run(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"case {c.name} ok {time.monotonic() - t0:.1f}s", flush=True)
        done.append(c.name)
    print(f"sanitize cases ({args.tool}, {args.device}): {len(done)} of {len(selected)} run "
          f"in {time.monotonic() - start:.0f}s")
    if left_out:
        print(f"left out at the deadline: {', '.join(left_out)}")
        return EXIT_INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
