"""The cases `make gpu-profile` (scripts/gpu_profile.sh) runs under Nsight Compute: the
performance targets' shapes (benchmarks/targets.py), each called a few times to warm up and then
once between cudaProfilerStart and cudaProfilerStop, so that `ncu --profile-from-start off`
profiles that call's kernels and nothing of the set-up. Cases print their names in order, which
is the order of their kernels in ncu's report.

Run: python3 scripts/profile_cases.py --group decode [--device cuda] [--smoke]
(--smoke: small shapes, for the CPU test of this file; --list: the groups and their cases)
"""
import argparse
import contextlib
import sys

import torch

import llama_ext

WARMUP_CALLS = 3
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # the targets' Llama-3-8B heads
DECODE_CONTEXT = 8192
ATTENTION_SEQ = 8192
NORM_SHAPE = (32768, 4096)
ROTARY_TOKENS = 32768
DECODE_BATCHES = (1, 32)


def _sizes(smoke):
    if smoke:
        return dict(heads=4, kv_heads=2, head_dim=16, context=96, seq=64, norm=(64, 256), tokens=64)
    return dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, context=DECODE_CONTEXT, seq=ATTENTION_SEQ,
                norm=NORM_SHAPE, tokens=ROTARY_TOKENS)


def bf16_rand(device):
    """Seeded standard-normal bf16 tensors on `device`, the cases' inputs."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
    return rand


def decode_name(batch, paged):
    return f"decode_b{batch}_{'paged16' if paged else 'contiguous'}"


def decode_case(batch, paged, block_size=16):
    """One decode step against a cache of `context` tokens: the step's k/v appended, then attended."""
    def build(rand, s, device):
        ctx, kvh, d = s["context"], s["kv_heads"], s["head_dim"]
        q = rand(batch, 1, s["heads"], d)
        k_new, v_new = rand(batch, 1, kvh, d), rand(batch, 1, kvh, d)
        seqlens = torch.full((batch,), ctx - 1, dtype=torch.int32, device=device)
        if paged:
            blocks = -(-ctx // block_size)
            table = torch.randperm(batch * blocks, generator=torch.Generator().manual_seed(0)).to(device)
            k_cache, v_cache = rand(batch * blocks, block_size, kvh, d), rand(batch * blocks, block_size, kvh, d)
            table = table.view(batch, blocks).to(torch.int32)
        else:
            k_cache, v_cache, table = rand(batch, ctx, kvh, d), rand(batch, ctx, kvh, d), None
        return lambda: llama_ext.gqa_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k_new, v=v_new,
                                                            block_table=table)
    return build


def attention_case(backward):
    """Causal attention over `seq` tokens at batch 1; backward: the gradients of q, k and v."""
    def build(rand, s, device):
        shape_q, shape_kv = (1, s["seq"], s["heads"], s["head_dim"]), (1, s["seq"], s["kv_heads"], s["head_dim"])
        q, k, v = rand(*shape_q), rand(*shape_kv), rand(*shape_kv)
        if not backward:
            return lambda: llama_ext.gqa_attention(q, k, v, causal=True)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out, grad = llama_ext.gqa_attention(q, k, v, causal=True), rand(*shape_q)
        return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    return build


def norm_case(fused, backward):
    def build(rand, s, device):
        x, weight = rand(*s["norm"]), rand(s["norm"][1])
        residual = rand(*s["norm"]) if fused else None
        if fused:
            call = lambda: llama_ext.fused_add_rms_norm(x, residual, weight)  # noqa: E731
        else:
            call = lambda: llama_ext.rms_norm(x, weight)  # noqa: E731
        if not backward:
            return call
        x.requires_grad_(), weight.requires_grad_()
        out = call()
        y = out[0] if fused else out
        grad = rand(*y.shape)
        return lambda: torch.autograd.grad(y, (x, weight), grad, retain_graph=True)
    return build


def rotary_case(backward):
    def build(rand, s, device):
        q = rand(1, s["tokens"], s["heads"], s["head_dim"])
        k = rand(1, s["tokens"], s["kv_heads"], s["head_dim"])
        cos, sin = llama_ext.rope_cos_sin(s["head_dim"], s["tokens"], device=device)
        if not backward:
            return lambda: llama_ext.apply_rotary(q, k, cos, sin)
        q.requires_grad_(), k.requires_grad_()
        q_out, k_out = llama_ext.apply_rotary(q, k, cos, sin)
        grads = (rand(*q_out.shape), rand(*k_out.shape))
        return lambda: torch.autograd.grad((q_out, k_out), (q, k), grads, retain_graph=True)
    return build


GROUPS = {
    "decode": {decode_name(b, paged): decode_case(b, paged) for b in DECODE_BATCHES for paged in (False, True)},
    "attention": {"attention_fwd": attention_case(False), "attention_bwd": attention_case(True)},
    "norms": {"rms_norm_fwd": norm_case(False, False), "rms_norm_bwd": norm_case(False, True),
              "fused_add_rms_norm_fwd": norm_case(True, False), "fused_add_rms_norm_bwd": norm_case(True, True),
              "rotary_fwd": rotary_case(False), "rotary_bwd": rotary_case(True)},
}


@contextlib.contextmanager
def profiled(device):
    """The region ncu --profile-from-start off profiles (the CUDA profiler API)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    try:
        yield
    finally:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()


def run(group, device, smoke):
    sizes = _sizes(smoke)
    rand = bf16_rand(device)
    for name, build in GROUPS[group].items():
        call = build(rand, sizes, device)
        for _ in range(WARMUP_CALLS):
            call()
        print(f"case {name}", flush=True)
        with profiled(device):
            out = call()
        assert all(torch.isfinite(t).all() for t in (out if isinstance(out, (tuple, list)) else (out,))), name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", action="append", choices=list(GROUPS), help="the groups to run (default: all)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="small shapes (the CPU test of this file)")
    p.add_argument("--list", action="store_true", help="print the groups and their cases and exit")
    args = p.parse_args(argv)
    if args.list:
        for group, cases in GROUPS.items():
            print(group + ": " + " ".join(cases))
        return 0
    for group in args.group or list(GROUPS):
        run(group, args.device, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
