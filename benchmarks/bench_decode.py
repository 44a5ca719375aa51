"""Decode: one new token per sequence against a KV cache (gqa_attention_with_kvcache), Llama-3-8B
heads (32 query, 8 kv, head_dim 128), over batch sizes and context lengths.

Throughput is the K/V bytes a decode step must read, ``2 * batch * context * kv_heads * d``
elements, in GB/s: the measure that the copy-bandwidth ceiling bounds. llama_ext appends the
step's k/v (one token, at position context - 1) and attends over the whole cache in one call,
on a contiguous cache (``contiguous``) or a paged one with 16-token blocks scattered over the
pool (``paged16``). HF eager attention, SDPA and torch.compile of eager attend over the same
cache (as HF's ``[batch, heads, seq, d]`` transpose views), without the append (the new token
equals the cached last one, so all outputs agree): they do less work than llama_ext for the
same score.

On CPU a case's cache stays in the L3 between calls when it fits (16.8 MB at b1 4096 bf16), which
a model's decode step never sees: its other layers' caches evict it. The ``contiguous, DRAM``
cases give every provider the caches of as many layers as fill 256 MB and each call the next
layer's, so that each call reads its cache from DRAM, and judge them against a copy whose
buffers are as far beyond the L3 (``dram_copy``). On CUDA every call already reads from HBM
(the timer evicts L2 before it), so there are none.

Chunked prefill (``build_chunked_prefill``): a chunk of new tokens per sequence, appended after
the cache's earlier ones and attending over all of them with the causal mask aligned
bottom-right, as a serving engine's chunked prefill or a prompt written into a static cache does:
compute-bound, so judged in TFLOP/s of the visible (query, key) pairs against the matmul ceiling,
on a contiguous and a paged cache. The other providers attend with an explicit mask (SDPA's
``is_causal`` aligns top-left).
"""
import itertools
import math

import torch
import torch.nn.functional as F

import llama_ext
from llama_ext import reference

from .bench_attention import _eager_attention, _visible_pairs, sdpa_backend
from .common import compiled, llama_ext_cuda_skip, random_inputs
from .harness import Case, OpBench, Provider

HEADS = (32, 8)
HEAD_DIM = 128
BLOCK_SIZE = 16
# (batches, contexts): quick, then --full. The CPU reference point is batch 1 at 4096.
SIZES = {
    "cpu": (([1], [4096]), ([1, 8], [1024, 2048, 4096])),
    "cuda": (([1, 32], [8192]), ([1, 8, 32], [1024, 2048, 4096, 8192, 16384])),
}
SMOKE = dict(batches=[2], contexts=[40], heads=(4, 2), head_dim=16)
# CPU: a step of this many query tokens too (speculative decoding's verify step: 32 query rows a kv
# head at 32/8), on a contiguous cache. On CUDA gpu-check's time goes to the decode targets.
VERIFY_TOKENS = 8
# Chunked prefill, (chunk, contexts) quick and --full, per device: a chunk of new tokens at the end
# of each context. On CUDA only with --full: gpu-check's time goes to the decode targets.
CHUNKS = {"cpu": ((512, [4096]), (512, [1024, 2048, 4096])), "cuda": (None, (2048, [4096, 8192, 16384]))}
PAGED_NOTE = ("paged16 cases: llama_ext reads 16-token blocks in random pool order through the block table; "
              "the other providers read the same tokens contiguously")
SMOKE_CHUNK = dict(chunk=130, contexts=[160])  # the prefill route's 128 query tokens and more
# The layers' caches of a DRAM case fill at least this much (harness.CPU_DRAM_COPY_BYTES: 8x L3).
DRAM_CASE_BYTES = 256 << 20
DRAM = "contiguous, DRAM"


def _cases(cfg):
    if cfg.smoke:
        batches, contexts = SMOKE["batches"], SMOKE["contexts"]
        (q_heads, kv_heads), d = SMOKE["heads"], SMOKE["head_dim"]
    else:
        quick, full = SIZES["cuda" if cfg.is_cuda else "cpu"]
        batches, contexts = full if cfg.full else quick
        contexts = list(cfg.sizes) if cfg.sizes else contexts
        (q_heads, kv_heads), d = HEADS, HEAD_DIM
    layouts = ("contiguous", "paged16") + (() if cfg.is_cuda else (DRAM,))
    verify = () if cfg.is_cuda or cfg.smoke else (f"contiguous, {VERIFY_TOKENS} query tokens",)
    cases = []
    for dtype in cfg.dtypes:
        e = torch.empty((), dtype=dtype).element_size()
        for layout in layouts + verify:
            seq_q = VERIFY_TOKENS if layout in verify else 1
            for batch in batches:
                for ctx in contexts:
                    work = 2 * batch * ctx * kv_heads * d * e
                    layers = 1
                    if layout == DRAM:
                        layers = 2 if cfg.smoke else math.ceil(DRAM_CASE_BYTES / work)
                    cases.append(Case(
                        mode=f"b{batch} {layout}", dtype=dtype, size=ctx,
                        label=f"b{batch} {seq_q}x{ctx} {q_heads}/{kv_heads}x{d} {layout}"
                        + (f" ({layers} layers)" if layers > 1 else ""),
                        unit="GB/s", work=work, out_bytes=batch * seq_q * q_heads * d * e,
                        params={"batch": batch, "context": ctx, "seq_q": seq_q, "q_heads": q_heads,
                                "kv_heads": kv_heads, "head_dim": d, "paged": layout == "paged16", "layers": layers,
                                "scale": d**-0.5},
                        ceiling_kind="dram_copy" if layout == DRAM else None,
                    ))
    return cases


def _chunk_cases(cfg):
    if cfg.smoke:
        chunk, contexts = SMOKE_CHUNK["chunk"], SMOKE_CHUNK["contexts"]
        (q_heads, kv_heads), d = SMOKE["heads"], SMOKE["head_dim"]
    else:
        chunk, contexts = CHUNKS["cuda" if cfg.is_cuda else "cpu"][1 if cfg.full else 0]
        contexts = list(cfg.sizes) if cfg.sizes else contexts
        (q_heads, kv_heads), d = HEADS, HEAD_DIM
    cases = []
    for dtype in cfg.dtypes:
        e = torch.empty((), dtype=dtype).element_size()
        for layout in ("contiguous", "paged16"):
            for ctx in contexts:
                if ctx < chunk:
                    continue
                cases.append(Case(
                    mode=f"b1 chunk {layout}", dtype=dtype, size=ctx,
                    label=f"b1 {chunk}x{ctx} {q_heads}/{kv_heads}x{d} {layout}", unit="TFLOP/s",
                    work=4 * _visible_pairs(chunk, ctx, 0) * q_heads * d, out_bytes=chunk * q_heads * d * e,
                    params={"batch": 1, "context": ctx, "seq_q": chunk, "q_heads": q_heads, "kv_heads": kv_heads,
                            "head_dim": d, "paged": layout == "paged16", "layers": 1, "scale": d**-0.5},
                ))
    return cases


def _make_inputs(case, device):
    """One layer's inputs, or for a DRAM case the list of every layer's."""
    p = case.params
    rand = random_inputs(case, device)
    if p["layers"] > 1:
        return [_layer_inputs(case, device, rand) for _ in range(p["layers"])]
    return _layer_inputs(case, device, rand)


def _layer_inputs(case, device, rand):
    p = case.params

    b, ctx, kvh, d, seq_q = p["batch"], p["context"], p["kv_heads"], p["head_dim"], p.get("seq_q", 1)
    k_cache, v_cache = rand(b, ctx, kvh, d), rand(b, ctx, kvh, d)
    # The call's new k/v are the cache's last seq_q tokens, so every provider computes the same output.
    inputs = {"q": rand(b, seq_q, p["q_heads"], d), "k": k_cache[:, -seq_q:].clone(),
              "v": v_cache[:, -seq_q:].clone(), "k_cache": k_cache, "v_cache": v_cache,
              "cache_seqlens": torch.full((b,), ctx - seq_q, dtype=torch.int32, device=device)}
    inputs["visible"] = inputs["mask"] = None
    if seq_q > 1:  # the causal mask aligned bottom-right: HF's additive form, SDPA's boolean one
        visible = reference.attention_mask_bottom_right(seq_q, ctx, True, (-1, -1), device)
        inputs["visible"] = visible
        inputs["mask"] = torch.zeros(seq_q, ctx, dtype=case.dtype, device=device).masked_fill(
            ~visible, torch.finfo(case.dtype).min)[None, None]
    if p["paged"]:
        # The same tokens in BLOCK_SIZE-token blocks, scattered over the pool in random order.
        blocks = -(-ctx // BLOCK_SIZE)
        perm = torch.randperm(b * blocks, generator=torch.Generator().manual_seed(0)).to(device)
        pool_k = torch.empty(b * blocks, BLOCK_SIZE, kvh, d, dtype=case.dtype, device=device)
        pool_v = torch.empty_like(pool_k)
        padded = blocks * BLOCK_SIZE
        pad = (0, 0, 0, 0, 0, padded - ctx)
        pool_k[perm] = F.pad(k_cache, pad).view(b * blocks, BLOCK_SIZE, kvh, d)
        pool_v[perm] = F.pad(v_cache, pad).view(b * blocks, BLOCK_SIZE, kvh, d)
        inputs.update(pool_k=pool_k, pool_v=pool_v, block_table=perm.view(b, blocks).to(torch.int32))
    return inputs


def _in_kv_cache_memory(inputs):
    """A layer's inputs with its caches copied into llama_ext.empty_kv_cache tensors (on the CPU,
    2 MB pages, as KVCache and PagedKVCache allocate them)."""
    names = ("pool_k", "pool_v") if "block_table" in inputs else ("k_cache", "v_cache")
    copies = {n: llama_ext.empty_kv_cache(inputs[n].shape, inputs[n].dtype, inputs[n].device).copy_(inputs[n])
              for n in names}
    return {**inputs, **copies}


def _providers(cfg, kv_cache_memory=False):
    """eager, native, compile and llama_ext over a case's cache, for both ops; with
    kv_cache_memory on the CPU, also llama_ext_2mb: llama_ext over the same caches copied into
    empty_kv_cache's memory (outside the timing)."""
    attend_hf, eager_src = _eager_attention()

    def eager(inputs, scale):
        q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k_cache", "v_cache"))
        return attend_hf(q, k, v, inputs["mask"], scale)

    def native(inputs, scale):
        q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k_cache", "v_cache"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs["visible"], scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()

    def ours(inputs, scale):
        if "block_table" in inputs:
            return llama_ext.gqa_attention_with_kvcache(
                inputs["q"], inputs["pool_k"], inputs["pool_v"], inputs["cache_seqlens"], inputs["k"], inputs["v"],
                block_table=inputs["block_table"], scale=scale)
        return llama_ext.gqa_attention_with_kvcache(
            inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], inputs["k"], inputs["v"],
            scale=scale)

    def provider(get_fn, record_backend=False, prepare=None):
        def make(case, inputs):
            fn, scale = get_fn(), case.params["scale"]
            layers = inputs if isinstance(inputs, list) else [inputs]
            if prepare is not None:
                layers = [prepare(layer) for layer in layers]
            calls = itertools.count()  # a DRAM case's calls take its layers in turn, from the first

            def closure():
                with torch.no_grad():
                    return fn(layers[next(calls) % len(layers)], scale)
            if record_backend:
                closure.details = {"sdpa_backend": sdpa_backend(closure)}
                calls = itertools.count()  # that probe took the first layer: the timed calls start there again
            return closure
        return make

    return [
        Provider("eager", provider(lambda: eager), eager_src + " on the cache slice"),
        Provider("native", provider(lambda: native, record_backend=True),
                 "F.scaled_dot_product_attention(enable_gqa=True) on the cache slice"),
        Provider("compile", provider(compiled(eager)), "torch.compile of eager"),
        Provider("llama_ext", provider(lambda: ours),
                 "llama_ext.gqa_attention_with_kvcache (appends the call's k/v, then attends)",
                 llama_ext_cuda_skip(cfg, "gqa_attention_with_kvcache")),
    ] + ([
        Provider("llama_ext_2mb", provider(lambda: ours, prepare=_in_kv_cache_memory),
                 "llama_ext over the caches copied into llama_ext.empty_kv_cache tensors (2 MB transparent huge "
                 "pages, as KVCache and PagedKVCache allocate them; the other providers' caches come from "
                 "torch's allocator)"),
    ] if kv_cache_memory and not cfg.is_cuda else [])


def build(cfg):
    return OpBench(
        name="decode",
        title="Decode against a KV cache (gqa_attention_with_kvcache), K/V bytes read",
        size_name="context length (cached tokens)",
        cases=_cases(cfg),
        providers=_providers(cfg, kv_cache_memory=True),
        make_inputs=lambda case: _make_inputs(case, cfg.device),
        notes=["GB/s counts the K/V cache bytes one decode step reads (2 x batch x context x kv_heads x d)",
               PAGED_NOTE,
               f"{VERIFY_TOKENS} query tokens (CPU): a step of {VERIFY_TOKENS} new tokens (speculative decoding's "
               "verify step), the causal mask aligned bottom-right",
               "contiguous, DRAM cases (CPU): each call reads the next of the listed layers' caches, which the "
               "calls since its last one evicted from the L3, as in a model's decode step; judged against a copy "
               "from DRAM"],
    )


def build_chunked_prefill(cfg):
    cases = _chunk_cases(cfg)
    return OpBench(
        name="chunked_prefill",
        title="Chunked prefill into a KV cache (gqa_attention_with_kvcache), attention FLOPs",
        size_name="context length (cached tokens, the chunk's included)",
        cases=cases,
        providers=_providers(cfg),
        make_inputs=lambda case: _make_inputs(case, cfg.device),
        skip_reason=None if cases else "on CUDA with --full only (gpu-check's time goes to the decode targets)",
        notes=["TFLOP/s counts 4 x q_heads x d per visible (query, key) pair, the causal mask aligned bottom-right",
               "llama_ext appends the chunk's k/v, then attends: with 128 or more query tokens on the prefill "
               "kernels, which read a paged cache's blocks through the block table",
               PAGED_NOTE],
    )
