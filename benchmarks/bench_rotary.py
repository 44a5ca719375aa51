"""Rotary position embedding on q and k together (Llama rotate_half pairing, full rotary dim),
out of place, forward and backward, at batch 1 over a sweep of token counts with Llama-3-8B
heads: 32 query and 8 kv heads of head_dim 128.

q and k are laid out ``[batch, seq, heads, head_dim]`` as the projections produce them; HF's
eager code receives the ``[batch, heads, seq, head_dim]`` transpose views it works on, so every
provider reads the same memory. GB/s counts the minimum bytes: read q and k, write both
results (backward: read both output gradients, write both input gradients), plus the fp32
cos/sin rows of the positions used.
"""
import torch

import llama_ext
from llama_ext import reference

from .common import backward_closure, compiled, llama_ext_cuda_skip, random_inputs, sweep
from .harness import Case, OpBench, Provider

HEADS = (32, 8)
HEAD_DIM = 128
BASE = 10000.0
TOKENS = {
    "cpu": ([1024], [128, 256, 512, 1024, 2048, 4096, 8192]),  # quick: the reference point
    "cuda": ([32768], [1024, 2048, 4096, 8192, 16384, 32768, 65536]),
}
SMOKE = dict(tokens=[16], heads=(4, 2), head_dim=16)


def _eager_apply():
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError:
        return reference.hf_apply_rotary_pos_emb, "llama_ext.reference.hf_apply_rotary_pos_emb (transformers not installed)"
    return apply_rotary_pos_emb, "transformers apply_rotary_pos_emb"


def _hf_cos_sin(tokens: int, head_dim: int, dtype, device):
    """HF's rotary embedding output for positions 0..tokens-1: [1, tokens, head_dim] in dtype."""
    inv_freq = 1.0 / (BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(tokens, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _make_inputs(case, device):
    p = case.params
    rand = random_inputs(case, device)

    b, s, d = 1, p["tokens"], p["head_dim"]
    inputs = {"q": rand(b, s, p["q_heads"], d), "k": rand(b, s, p["kv_heads"], d)}
    inputs["grad_q"], inputs["grad_k"] = rand(*inputs["q"].shape), rand(*inputs["k"].shape)
    inputs["hf_cos"], inputs["hf_sin"] = _hf_cos_sin(s, d, case.dtype, device)
    if hasattr(llama_ext, "rope_cos_sin"):
        inputs["cos"], inputs["sin"] = llama_ext.rope_cos_sin(d, s, base=BASE, device=device)
    return inputs


def build(cfg):
    tokens_sweep = sweep(cfg, TOKENS, SMOKE["tokens"])
    q_heads, kv_heads = SMOKE["heads"] if cfg.smoke else HEADS
    head_dim = SMOKE["head_dim"] if cfg.smoke else HEAD_DIM
    cases = []
    for dtype in cfg.dtypes:
        e = torch.empty((), dtype=dtype).element_size()
        for mode in ("fwd", "bwd"):
            for tokens in tokens_sweep:
                qk = tokens * (q_heads + kv_heads) * head_dim
                cases.append(Case(
                    mode=mode, dtype=dtype, size=tokens, label=f"{tokens}x({q_heads}+{kv_heads})x{head_dim}",
                    unit="GB/s", work=2 * qk * e + 2 * tokens * (head_dim // 2) * 4,
                    out_bytes=tokens * q_heads * head_dim * e,
                    params={"batch": 1, "tokens": tokens, "q_heads": q_heads, "kv_heads": kv_heads,
                            "head_dim": head_dim, "base": BASE},
                ))
    apply_hf, eager_src = _eager_apply()

    def eager(q, k, inputs):  # HF works on [b, h, s, d] views; results viewed back as [b, s, h, d]
        q2, k2 = apply_hf(q.transpose(1, 2), k.transpose(1, 2), inputs["hf_cos"], inputs["hf_sin"])
        return q2.transpose(1, 2), k2.transpose(1, 2)

    def ours(q, k, inputs):
        return llama_ext.apply_rotary(q, k, inputs["cos"], inputs["sin"])

    def provider(get_fn):
        def make(case, inputs):
            fn = get_fn()
            if case.mode == "fwd":
                return lambda: fn(inputs["q"], inputs["k"], inputs)
            q, k = inputs["q"].detach().requires_grad_(), inputs["k"].detach().requires_grad_()
            return backward_closure(fn(q, k, inputs), (q, k), (inputs["grad_q"], inputs["grad_k"]))
        return make

    return OpBench(
        name="rotary",
        title="rotary embedding, q and k (apply_rotary)",
        size_name="tokens",
        cases=cases,
        providers=[
            Provider("eager", provider(lambda: eager), eager_src),
            Provider("native", None, skip_reason="torch has no native rotary embedding op"),
            Provider("compile", provider(compiled(eager)), "torch.compile of eager"),
            Provider("llama_ext", provider(lambda: ours), "llama_ext.apply_rotary",
                     llama_ext_cuda_skip(cfg, "apply_rotary")),
        ],
        make_inputs=lambda case: _make_inputs(case, cfg.device),
        notes=["cos/sin tables are built once outside the timing (HF: [1, seq, head_dim] in the input dtype; "
               "llama_ext: fp32 [positions, head_dim / 2])",
               "bwd times the backward pass alone (autograd.grad on a retained graph) for dq and dk"],
    )
