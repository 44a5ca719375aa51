"""Quick rotary benchmark (not a test): llama_ext.apply_rotary vs HF's eager apply_rotary_pos_emb
(q and k), torch.compile of it, and a copy of the same bytes, all out of place, reported in GB/s
of q + k read and written. Defaults: batch 1, 1024 tokens, 32/8 heads, head_dim 128.

    PYTHONPATH=. python scripts/bench_rotary.py [--device cpu|cuda] [--tokens 1024] [--reps 50] [--threads N]
"""
import argparse
import statistics
import time

import torch

import llama_ext
from llama_ext.reference import hf_apply_rotary_pos_emb, hf_cos_sin


def time_interleaved(fns, device, reps):
    """Best and median seconds per call of each fn. Calls run round-robin, so load from other
    processes on a shared machine hits every candidate alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(5):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return {name: (min(ts), statistics.median(ts)) for name, ts in samples.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for every candidate (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, b, s = args.device, args.batch, args.tokens
    cos, sin = llama_ext.rope_cos_sin(args.head_dim, max(s, 2048), device=device)
    positions = torch.arange(s, device=device).expand(b, s)
    compiled = None if args.no_compile else torch.compile(hf_apply_rotary_pos_emb)
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        # HF layout [b, h, s, d]: "llama_ext" takes it as [b, s, h, d] views (no copy);
        # "llama_ext bshd" is the projection-native contiguous [b, s, h, d] layout.
        q = torch.randn(b, args.q_heads, s, args.head_dim, device=device).to(dtype)
        k = torch.randn(b, args.kv_heads, s, args.head_dim, device=device).to(dtype)
        hf_cos, hf_sin = hf_cos_sin(cos, sin, positions, dtype)
        qkv = torch.cat((q.flatten(), k.flatten()))
        nbytes = 2 * qkv.numel() * qkv.element_size()  # read + write
        q_bshd, k_bshd = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        fns = {
            "llama_ext": lambda: llama_ext.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, positions),
            "llama_ext bshd": lambda: llama_ext.apply_rotary(q_bshd, k_bshd, cos, sin, positions),
            "hf eager": lambda: hf_apply_rotary_pos_emb(q, k, hf_cos, hf_sin),
            "copy": lambda: qkv.clone(),
        }
        if compiled is not None:
            fns["torch.compile"] = lambda: compiled(q, k, hf_cos, hf_sin)
        results = time_interleaved(fns, device, args.reps)
        for label, (best, median) in results.items():
            print(
                f"{name:9s} {label:15s} best {best * 1e3:7.3f} ms {nbytes / best / 1e9:6.1f} GB/s"
                f"   median {median * 1e3:7.3f} ms {nbytes / median / 1e9:6.1f} GB/s"
            )
        for stat, index in (("best", 0), ("median", 1)):
            ours = results["llama_ext"][index]
            summary = f"{name:9s} {stat:6s} speedup: {results['hf eager'][index] / ours:.2f}x eager"
            if compiled is not None:
                summary += f", {results['torch.compile'][index] / ours:.2f}x torch.compile"
            print(summary + f", {results['copy'][index] / ours * 100:.0f}% of copy bandwidth")

if __name__ == "__main__":
    main()
