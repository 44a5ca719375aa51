"""Pure-PyTorch reference implementations, shared by the tests and the benchmarks.

``*_reference`` functions compute in float64 (the ground truth for tests); ``hf_*``
functions reproduce HF transformers' eager Llama code in the input dtype (the "eager"
baseline of the benchmarks and the bit-level numerics contract).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


# ---- RMSNorm ------------------------------------------------------------------------------


def rms_norm_reference(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """float64 RMSNorm over the last dim."""
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def fused_add_rms_norm_reference(
    x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6
) -> Tuple[Tensor, Tensor]:
    """float64 ``(rms_norm(x + residual), x + residual)``."""
    res = x.double() + residual.double()
    return rms_norm_reference(res, weight, eps), res


def hf_rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """HF ``LlamaRMSNorm.forward``, in the input dtype: the eager baseline."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    h = h.to(input_dtype)
    return h if weight is None else weight * h


# ---- Rotary position embedding (HF-style eager) ----------------------------------------------


def hf_rotate_half(x: Tensor) -> Tensor:
    """HF ``rotate_half``: ``(x1, x2) -> (-x2, x1)`` over the two halves of the last dim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
    """HF ``apply_rotary_pos_emb``: q, k ``[batch, heads, seq, head_dim]``, cos/sin
    ``[batch, seq, head_dim]`` (each frequency twice, in the input dtype)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + hf_rotate_half(q) * sin, k * cos + hf_rotate_half(k) * sin


# ---- Grouped-query attention (HF-style eager) ------------------------------------------------


def hf_repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """HF ``repeat_kv``: ``[batch, kv_heads, seq, d] -> [batch, kv_heads * n_rep, seq, d]``."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def hf_eager_attention(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], scaling: float) -> Tensor:
    """HF ``eager_attention_forward`` without dropout: q ``[batch, q_heads, seq_q, d]``, k/v
    ``[batch, kv_heads, seq_k, d]``, an additive mask; returns ``[batch, seq_q, q_heads, d]``."""
    n_rep = q.shape[1] // k.shape[1]
    weights = torch.matmul(q, hf_repeat_kv(k, n_rep).transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, hf_repeat_kv(v, n_rep)).transpose(1, 2).contiguous()
