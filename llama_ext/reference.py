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


# ---- Rotary position embedding -------------------------------------------------------------


def _gather_table(table: Tensor, positions: Optional[Tensor], batch: int, seq: int) -> Tensor:
    """Rows of a [max_position, rotary_dim // 2] table for each token, as [batch, seq, 1, half]."""
    if positions is None:
        positions = torch.arange(seq, device=table.device)
    positions = positions.long().expand(batch, seq)
    return table[positions].unsqueeze(2)


def rotary_reference(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Optional[Tensor] = None,
    interleaved: bool = False,
    inverse: bool = False,
) -> Tensor:
    """float64 rotation of ``x`` [batch, seq, heads, head_dim] by the table rows at ``positions``.

    Rotate-half pairs (i, i + rotary_dim/2); ``interleaved`` pairs (2i, 2i+1) as GPT-J does.
    Dims past ``rotary_dim = 2 * cos.shape[-1]`` pass through; ``inverse`` rotates by -theta.
    """
    x64 = x.double()
    batch, seq, _, _ = x.shape
    half = cos.shape[-1]
    c = _gather_table(cos.double(), positions, batch, seq)
    s = _gather_table(sin.double(), positions, batch, seq)
    if inverse:
        s = -s
    rot, rest = x64[..., : 2 * half], x64[..., 2 * half :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


def gptj_rotary_reference(x: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """GPT-J's own formulation (``rotate_every_two`` with ``repeat_interleave``d tables), in float64:
    an independent check of ``interleaved=True``."""
    x64 = x.double()
    batch, seq, _, _ = x.shape
    rotary_dim = 2 * cos.shape[-1]
    c = _gather_table(cos.double(), positions, batch, seq).repeat_interleave(2, dim=-1)
    s = _gather_table(sin.double(), positions, batch, seq).repeat_interleave(2, dim=-1)
    rot, rest = x64[..., :rotary_dim], x64[..., rotary_dim:]
    every_two = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat((rot * c + every_two * s, rest), dim=-1)


def hf_rotate_half(x: Tensor) -> Tensor:
    """HF ``rotate_half``."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
) -> Tuple[Tensor, Tensor]:
    """HF ``apply_rotary_pos_emb``, in the input dtype: the eager baseline. ``cos``/``sin`` are
    HF's per-token [batch, seq, head_dim] tables (halves duplicated, already in q's dtype)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (hf_rotate_half(q) * sin)
    k_embed = (k * cos) + (hf_rotate_half(k) * sin)
    return q_embed, k_embed


def hf_cos_sin(cos: Tensor, sin: Tensor, positions: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Our [max_position, half] tables as HF's per-token [batch, seq, 2 * half] cos/sin in ``dtype``
    (what ``LlamaRotaryEmbedding.forward`` returns)."""
    c, s = cos[positions.long()], sin[positions.long()]
    return torch.cat((c, c), dim=-1).to(dtype), torch.cat((s, s), dim=-1).to(dtype)


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
