"""Grouped-query attention at batch 1 with Llama-3-8B heads (32 query, 8 kv, head_dim 128),
causal, over a sweep of sequence lengths: forward, forward + backward, and (``--full``) decode
(one query against the whole sequence's keys); at sequences longer than ``WINDOW`` also both
with a causal sliding window of ``WINDOW`` keys (``window_size=(WINDOW - 1, 0)``, Mistral's), whose
cost should track the window, not the sequence: compare the ``fwd`` and ``fwd-window`` rows of
one size (e.g. ``--size 4096``).

q, k and v are ``[batch, seq, heads, head_dim]`` as the projections produce them; HF's eager
code and SDPA receive the ``[batch, heads, seq, head_dim]`` transpose views, and every provider
returns ``[batch, seq, q_heads, head_dim]`` contiguous, ready for the output projection (as
HF's attention functions do). TFLOP/s counts ``4 * h_q * d`` per visible (query, key) pair (``b * s_q * s_k``, halved for
causal self-attention; decode sees every key; a window sees at most ``WINDOW`` keys per query),
times 3.5 for forward + backward (the backward is 2.5 forwards).
"""
import contextlib
import os

import torch
import torch.nn.functional as F

import llama_ext
from llama_ext import reference

from .common import compiled, llama_ext_cuda_skip, random_inputs, sweep
from .harness import Case, OpBench, Provider

HEADS = (32, 8)
HEAD_DIM = 128
SEQ = {  # quick: short enough for the 3-minute CPU run; the CPU reference point is 2048 (--full)
    "cpu": ([512], [256, 512, 1024, 2048, 4096]),
    "cuda": ([8192], [1024, 2048, 4096, 8192, 16384]),
}
SMOKE = dict(seq=[16], heads=(4, 2), head_dim=16, window=8)
WINDOW = 512
# On CUDA, llama_ext also runs as a ~100 KB-shared-memory GPU (sm_86/89/120) would: the
# LLAMA_EXT_CUDA_SMEM_KB cap makes the launchers pick those parts' tile configurations, so one
# large GPU measures both sets (at D = 128 this is also the backward's 64-key blocks against its
# 128-key ones).
SMEM_CAPPED_KB = 100
# SDPA's kernels, by the aten op each runs (forward or backward names start the same way).
SDPA_BACKENDS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backend(fn) -> str:
    """The SDPA backend a call runs, read from the ops it dispatches (SDPA picks at run time)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    names = {e.name for e in prof.events()}
    for prefix, backend in SDPA_BACKENDS.items():  # most specific first
        if any(n.startswith(prefix) for n in names):
            return backend
    return "unknown"


@contextlib.contextmanager
def _smem_cap(kb):
    """LLAMA_EXT_CUDA_SMEM_KB=kb for the duration (the launchers read it at every call)."""
    name, old = "LLAMA_EXT_CUDA_SMEM_KB", os.environ.get("LLAMA_EXT_CUDA_SMEM_KB")
    os.environ[name] = str(kb)
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _eager_attention():
    try:
        from transformers.models.llama.modeling_llama import eager_attention_forward
    except ImportError:
        def fallback(q, k, v, mask, scaling):  # the same math
            return reference.hf_eager_attention(q, k, v, scale=scaling, mask=mask)

        return fallback, "llama_ext.reference.hf_eager_attention (transformers not installed)"

    class Attributes:  # all that eager_attention_forward reads from its module (dynamo traces this class)
        def __init__(self, groups):
            self.num_key_value_groups, self.training = groups, False

    def hf(q, k, v, mask, scaling):
        return eager_attention_forward(Attributes(q.shape[1] // k.shape[1]), q, k, v, mask, scaling)[0]

    return hf, "transformers eager_attention_forward (repeat_kv + matmul + softmax)"


def _visible_pairs(seq_q, seq_k, window):
    """(query, key) pairs a causal (windowed: ``window`` keys per query at most) mask lets through."""
    return int(reference.attention_mask_bottom_right(seq_q, seq_k, True, (window - 1 if window else -1, 0)).sum())


def _cases(cfg):
    q_heads, kv_heads = SMOKE["heads"] if cfg.smoke else HEADS
    d = SMOKE["head_dim"] if cfg.smoke else HEAD_DIM
    window = SMOKE["window"] if cfg.smoke else WINDOW
    seqs = sweep(cfg, SEQ, SMOKE["seq"])
    modes = ["fwd", "fwd+bwd"] + (["decode"] if cfg.full else []) + ["fwd-window", "fwd+bwd-window"]
    cases = []
    for dtype in cfg.dtypes:
        e = torch.empty((), dtype=dtype).element_size()
        for mode in modes:
            windowed = mode.endswith("-window")
            for seq in seqs:
                if windowed and seq <= window:
                    continue  # the window would be the whole sequence
                seq_q = 1 if mode == "decode" else seq
                flops = 4 * _visible_pairs(seq_q, seq, window if windowed else 0) * q_heads * d
                label = f"{seq_q}x{seq} {q_heads}/{kv_heads}x{d}" + (f" window {window}" if windowed else "")
                cases.append(Case(
                    mode=mode, dtype=dtype, size=seq, label=label, unit="TFLOP/s",
                    work=flops * (3.5 if mode.startswith("fwd+bwd") else 1.0), out_bytes=seq_q * q_heads * d * e,
                    params={"batch": 1, "seq_q": seq_q, "seq_k": seq, "q_heads": q_heads, "kv_heads": kv_heads,
                            "head_dim": d, "causal": True, "scale": d**-0.5,
                            "window_size": (window - 1 if windowed else -1, 0)},
                ))
    return cases


def _make_inputs(case, device):
    p = case.params
    rand = random_inputs(case, device)

    b, s_q, s_k, d = p["batch"], p["seq_q"], p["seq_k"], p["head_dim"]
    inputs = {"q": rand(b, s_q, p["q_heads"], d), "k": rand(b, s_k, p["kv_heads"], d),
              "v": rand(b, s_k, p["kv_heads"], d), "grad": rand(b, s_q, p["q_heads"], d)}
    # HF's additive causal (sliding-window) mask, aligned bottom-right (query i sees keys
    # i' - left <= j <= i', i' = i + s_k - s_q); SDPA takes the boolean form.
    visible = reference.attention_mask_bottom_right(s_q, s_k, True, p["window_size"], device)
    mask = torch.zeros(s_q, s_k, dtype=case.dtype, device=device).masked_fill(~visible, torch.finfo(case.dtype).min)
    inputs["mask"] = mask[None, None]
    inputs["visible"] = visible if p["window_size"][0] >= 0 else None
    inputs["window_size"] = p["window_size"]
    return inputs


def build(cfg):
    attend_hf, eager_src = _eager_attention()

    def eager(q, k, v, inputs, scale):
        return attend_hf(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), inputs["mask"], scale)

    def native(q, k, v, inputs, scale):
        # SDPA aligns the causal mask top-left; a single decode query sees every key anyway. It
        # has no sliding window: windowed cases pass the boolean mask.
        visible = inputs["visible"]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=visible, is_causal=visible is None and q.shape[1] > 1,
                                             scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()

    def ours(q, k, v, inputs, scale):
        return llama_ext.gqa_attention(q, k, v, causal=True, scale=scale, window_size=inputs["window_size"])

    def provider(get_fn, record_backend=False, smem_kb=None):
        def make(case, inputs):
            fn, scale = get_fn(), case.params["scale"]
            training = case.mode.startswith("fwd+bwd")
            leaves = [inputs[n].detach().requires_grad_(training) for n in ("q", "k", "v")]

            def closure():
                with _smem_cap(smem_kb) if smem_kb else contextlib.nullcontext():
                    out = fn(*leaves, inputs, scale)
                    return torch.autograd.grad(out, leaves, inputs["grad"]) if training else out
            if record_backend:
                closure.details = {"sdpa_backend": sdpa_backend(closure)}
            return closure
        return make

    return OpBench(
        name="attention",
        title="GQA attention, causal (gqa_attention)",
        size_name="sequence length (keys)",
        cases=_cases(cfg),
        providers=[
            Provider("eager", provider(lambda: eager), eager_src),
            Provider("native", provider(lambda: native, record_backend=True),
                     "F.scaled_dot_product_attention(enable_gqa=True); backend per case in JSON (sdpa_backend)"),
            Provider("compile", provider(compiled(eager)), "torch.compile of eager"),
            Provider("llama_ext", provider(lambda: ours), "llama_ext.gqa_attention(window_size=...)",
                     llama_ext_cuda_skip(cfg, "gqa_attention_forward")),
        ] + ([
            Provider("llama_ext_100kb", provider(lambda: ours, smem_kb=SMEM_CAPPED_KB),
                     f"llama_ext with LLAMA_EXT_CUDA_SMEM_KB={SMEM_CAPPED_KB}: the tile configurations of ~100 KB "
                     "GPUs (sm_86/89/120)", llama_ext_cuda_skip(cfg, "gqa_attention_forward")),
        ] if cfg.is_cuda else []),
        make_inputs=lambda case: _make_inputs(case, cfg.device),
        notes=["fwd+bwd times one forward and its backward (dq, dk, dv) together",
               "HF's additive causal mask is built once outside the timing, as HF builds it once per forward"],
    )
