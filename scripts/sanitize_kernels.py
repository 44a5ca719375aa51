"""Calls every CUDA kernel once at odd sizes, for compute-sanitizer (memcheck, racecheck,
synccheck) in `make gpu-check`: tails that are not multiples of any vector or tile width,
misaligned and strided rows, the register-cached and looped RMSNorm paths, every attention
head_dim, causal and not, seq_q != seq_k, decode, varlen. Sizes stay small: the sanitizers
slow kernels down a hundredfold."""
import os

import torch

import llama_ext

# racecheck and synccheck are far slower than memcheck: SANITIZE_QUICK=1 keeps every kernel
# and head_dim but fewer dtypes and shapes.
QUICK = os.environ.get("SANITIZE_QUICK") == "1"

assert torch.cuda.is_available() and llama_ext.cuda_kernels_built(), "needs a GPU and the CUDA build"
dev = "cuda"
torch.manual_seed(0)
exercised = []


def rnd(*shape, dtype):
    return torch.randn(*shape, device=dev, dtype=dtype)


for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # RMSNorm: tails (7), unaligned rows (769), vectors (4096), looped paths (65536, 16384 bwd).
    for hidden in (1, 7, 769, 4096, 16384, 65536):
        x = rnd(3, hidden, dtype=dtype).requires_grad_()
        w = rnd(hidden, dtype=dtype).requires_grad_()
        r = rnd(3, hidden, dtype=dtype).requires_grad_()
        llama_ext.rms_norm(x, w).sum().backward()
        y, res = llama_ext.fused_add_rms_norm(x, r, w)
        (y.float().sum() + res.float().sum()).backward()
        with torch.no_grad():
            llama_ext.fused_add_rms_norm_(x.detach().clone(), r.detach().clone(), w.detach())
    strided = rnd(5, 3 * 1024, dtype=dtype)[:, 1024:2048]
    llama_ext.rms_norm(strided, None)
exercised.append("rms_norm")

if hasattr(llama_ext, "apply_rotary"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for head_dim, rotary_dim in ((64, 64), (80, 80), (128, 64), (256, 256)):
            cos, sin = llama_ext.rope_cos_sin(rotary_dim, 64, device=dev)
            for interleaved in (False, True):
                q = rnd(2, 13, 12, head_dim, dtype=dtype).requires_grad_()
                k = rnd(2, 13, 4, head_dim, dtype=dtype).requires_grad_()
                q2, k2 = llama_ext.apply_rotary(q, k, cos, sin, interleaved=interleaved)
                (q2.float().sum() + k2.float().sum()).backward()
                # HF layout [b, h, s, d] as a transposed view, with explicit positions.
                qt = rnd(2, 5, 13, head_dim, dtype=dtype).transpose(1, 2)
                kt = rnd(2, 1, 13, head_dim, dtype=dtype).transpose(1, 2)
                pos = torch.randint(0, 64, (2, 13), device=dev)
                llama_ext.apply_rotary_(qt, kt, cos, sin, positions=pos, interleaved=interleaved)
    exercised.append("rotary")

if hasattr(llama_ext, "gqa_attention"):
    # Tile edges: forward 128 queries x 64 keys (64 x 32 at d=256); backward 64 keys x 64 or 32
    # queries. (300, 20) causal leaves whole query blocks with no visible key.
    shapes = ((1, 1), (17, 17), (64, 64), (63, 65), (129, 129), (1, 77), (65, 130), (200, 33), (300, 20))
    if QUICK:
        shapes = ((17, 17), (63, 65), (300, 20))
    for dtype in (torch.bfloat16, torch.float32) if QUICK else (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (32, 64, 80, 96, 128, 256):
            for seq_q, seq_k in shapes:
                for causal in (True, False):
                    q = rnd(2, seq_q, 8, head_dim, dtype=dtype).requires_grad_()
                    k = rnd(2, seq_k, 2, head_dim, dtype=dtype).requires_grad_()
                    v = rnd(2, seq_k, 2, head_dim, dtype=dtype).requires_grad_()
                    llama_ext.gqa_attention(q, k, v, causal=causal).float().sum().backward()
            # Head counts 5/5 and 8/1, the HF [b, h, s, d] layout as a transposed view, and rows
            # that are not 16-byte aligned (no cp.async).
            for h_q, h_kv in ((5, 5), (8, 1)):
                q = rnd(1, h_q, 257, head_dim, dtype=dtype).transpose(1, 2).requires_grad_()
                k = rnd(1, h_kv, 257, head_dim, dtype=dtype).transpose(1, 2).requires_grad_()
                v = rnd(1, h_kv, 257, head_dim, dtype=dtype).transpose(1, 2).requires_grad_()
                llama_ext.gqa_attention(q, k, v, causal=True).float().sum().backward()
            unaligned = [rnd(1, 127, 4, head_dim + 1, dtype=dtype)[..., 1:] for _ in range(3)]
            llama_ext.gqa_attention(*unaligned, causal=True)
            lens = torch.tensor([0, 5, 70, 1], device=dev)
            cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
            total = int(lens.sum())
            q = rnd(total, 6, head_dim, dtype=dtype).requires_grad_()
            k = rnd(total, 3, head_dim, dtype=dtype).requires_grad_()
            v = rnd(total, 3, head_dim, dtype=dtype).requires_grad_()
            out = llama_ext.gqa_attention_varlen(q, k, v, cu, cu, 70, 70, causal=True)
            out.float().sum().backward()
    exercised.append("attention")

torch.cuda.synchronize()
print("sanitized kernels:", ", ".join(exercised))
