"""gqa_attention_with_kvcache at 1-128 query tokens a sequence (speculative decoding's verify step,
short chunks of a chunked prefill) next to gqa_attention on the same cache, as the benchmark times
CUDA calls (benchmarks/harness.py: L2 evicted before each call). Past kDecodeRouteMaxSeqQ (4)
tokens gqa_attention runs the prefill kernels, and the KV-cache op hands a call to them from
kPrefillRouteMinSeqQ (128) tokens (csrc/kvcache_attention.h; on the CPU also earlier, by
runs_on_prefill_kernel in csrc/cpu/kvcache_attention.cpp): where the second column is the faster,
that threshold is too high. Batch 1, the decode targets' context and heads (scripts/
profile_cases.py), bf16, a contiguous cache, every call over all of it. `make gpu-profile` runs it
(its group `query_tokens`); alone, on a GPU with an in-place build:

    python3 scripts/query_tokens.py [--rep-ms 100]

--device cpu --smoke runs the same flow on small shapes (the CPU test of this file).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import llama_ext  # noqa: E402
from scripts import profile_cases  # noqa: E402
from scripts.decode_splits import time_call, timing_main  # noqa: E402

TOKENS = (1, 2, 4, 5, 8, 16, 32, 64, 127, 128)
SMOKE_TOKENS = (1, 5, 8)


def run(device, smoke, rep_ms):
    sizes = profile_cases._sizes(smoke)
    rand = profile_cases.bf16_rand(device)
    context, heads, kv_heads, d = sizes["context"], sizes["heads"], sizes["kv_heads"], sizes["head_dim"]
    k_cache, v_cache = rand(1, context, kv_heads, d), rand(1, context, kv_heads, d)
    # Nothing appended: every call attends over the whole cache, as gqa_attention does.
    seqlens = torch.full((1,), context, dtype=torch.int32, device=device)
    print(f"{device}; batch 1, context {context}, {heads}/{kv_heads} heads x {d}, bf16, contiguous cache")
    print("| query tokens | gqa_attention_with_kvcache | gqa_attention | with_kvcache / gqa_attention |")
    print("|---|---|---|---|")
    for tokens in SMOKE_TOKENS if smoke else TOKENS:
        q = rand(1, tokens, heads, d)

        def with_kvcache():
            with torch.no_grad():
                return llama_ext.gqa_attention_with_kvcache(q, k_cache, v_cache, seqlens)

        def plain():
            with torch.no_grad():
                return llama_ext.gqa_attention(q, k_cache, v_cache)

        first, second = time_call(with_kvcache, device, rep_ms), time_call(plain, device, rep_ms)
        print(f"| {tokens} | {first * 1e6:.1f} us | {second * 1e6:.1f} us | {first / second:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(timing_main(__doc__, run))
