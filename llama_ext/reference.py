"""Pure-PyTorch reference implementations, shared by the tests and the benchmarks.

``*_reference`` functions compute in float64 (the ground truth for tests); ``hf_*``
functions reproduce HF transformers' eager Llama code in the input dtype (the "eager"
baseline of the benchmarks and the bit-level numerics contract).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


# ---- RMSNorm ------------------------------------------------------------------------------


def rms_norm_reference(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, offset: float = 0.0) -> Tensor:
    """float64 RMSNorm over the last dim; the weight applied is ``offset + weight`` (ones for None).
    The cast order (``cast_before_weight``) only moves roundings, which float64 does not have."""
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    w = torch.ones((), dtype=torch.float64, device=x.device) if weight is None else weight.double()
    return y * (offset + w) if (weight is not None or offset != 0.0) else y


def fused_add_rms_norm_reference(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    sum_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor]:
    """float64 ``(rms_norm(x + residual), x + residual)``, the sum rounded to ``sum_dtype``
    (default: the inputs' dtype) as the op rounds it before normalizing. The rounding passes
    gradients through unchanged, so float64 leaves standing for lower-precision inputs give the
    op's gradients when ``sum_dtype`` names that precision."""
    res = x.double() + residual.double()
    res = res + (res.to(sum_dtype or x.dtype).double() - res).detach()
    return rms_norm_reference(res, weight, eps, offset), res


def hf_rms_norm(
    x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, offset: float = 0.0, cast_before_weight: bool = True
) -> Tensor:
    """HF's RMSNorm forward in the input dtype (the eager baseline): ``LlamaRMSNorm`` with
    ``cast_before_weight``, else ``Olmo2RMSNorm`` (``offset=0``) / ``GemmaRMSNorm`` (``offset=1``)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    if weight is None:
        return (h * (offset + 1.0)).to(input_dtype)
    if cast_before_weight:
        if offset == 0.0:
            return weight * h.to(input_dtype)
        out_dtype = torch.promote_types(input_dtype, weight.dtype)
        return ((offset + weight.float()) * h.to(input_dtype).float()).to(out_dtype)
    return (h * (offset + weight.float() if offset != 0.0 else weight.float())).to(input_dtype)


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


# ---- Grouped-query attention ----------------------------------------------------------------


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[b, n_kv_heads, s, d]`` -> ``[b, n_kv_heads * n_rep, s, d]``, as HF's ``repeat_kv``."""
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def causal_mask_bottom_right(seq_q: int, seq_k: int, device=None) -> Tensor:
    """Boolean ``[seq_q, seq_k]``, True where query ``i`` may see key ``j``: ``j <= i + seq_k - seq_q``."""
    return attention_mask_bottom_right(seq_q, seq_k, True, (-1, -1), device)


def attention_mask_bottom_right(
    seq_q: int, seq_k: int, causal: bool = True, window_size: Tuple[int, int] = (-1, -1), device=None
) -> Tensor:
    """Boolean ``[seq_q, seq_k]``, True where query ``i`` may see key ``j``, as FlashAttention
    defines it: with ``i' = i + seq_k - seq_q`` (bottom-right alignment), ``i' - left <= j <= i' + right``
    for ``window_size = (left, right)``, ``-1`` meaning unbounded on that side; ``causal`` makes
    ``right`` 0."""
    left, right = window_size
    if causal:
        right = 0
    # A side longer than both sequences together reaches every key: clamped, int64 cannot overflow.
    left, right = min(left, seq_q + seq_k), min(right, seq_q + seq_k)
    i = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    j = torch.arange(seq_k, device=device)[None, :]
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    return visible


def gqa_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """float64 ``(out, lse)`` of :func:`llama_ext.gqa_attention` on ``[batch, seq, heads, d]``
    inputs: repeat_kv, scores ``s = scale * q k^T`` (``softcap * tanh(s / softcap)`` when
    ``softcap > 0``), masked softmax with the bottom-right causal / sliding-window mask of
    :func:`attention_mask_bottom_right`. Rows that see no key give zeros and lse 0, the kernels'
    convention. Differentiable (autograd through tanh gives the softcap's exact derivative)."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
    n_rep = q64.shape[1] // k64.shape[1]
    k64, v64 = repeat_kv(k64, n_rep), repeat_kv(v64, n_rep)
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    seq_q, seq_k = q.shape[1], k.shape[1]
    visible = attention_mask_bottom_right(seq_q, seq_k, causal, window_size, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on rows that see nothing
    seen = visible.any(-1)  # [seq_q]
    probs = torch.where(seen[:, None], torch.exp(scores - torch.where(seen, lse, 0.0)[..., None]), 0.0)
    out = (probs @ v64).transpose(1, 2)
    return out, torch.where(seen, lse, 0.0)


def gqa_attention_varlen_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """float64 ``(out [total_q, h, d], lse [h, total_q])``: the batched reference per sequence."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        o, l = gqa_attention_reference(
            q[None, cq[b] : cq[b + 1]], k[None, ck[b] : ck[b + 1]], v[None, ck[b] : ck[b + 1]], causal,
            q.shape[-1] ** -0.5 if scale is None else scale, window_size, softcap,
        )
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def hf_eager_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: Optional[float] = None, mask: Optional[Tensor] = None
) -> Tensor:
    """HF ``eager_attention_forward`` in the input dtype (repeat_kv, matmul, fp32 softmax, matmul)
    on ``[batch, heads, seq, d]`` tensors, with an additive bottom-right causal mask (or the
    additive ``mask`` given, which replaces it): the benchmarks' eager baseline. Returns
    ``[batch, seq_q, heads, d]`` as HF does."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_rep = q.shape[1] // k.shape[1]
    key_states, value_states = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    attn_weights = torch.matmul(q, key_states.transpose(2, 3)) * scale
    if mask is not None:
        attn_weights = attn_weights + mask
    elif causal:
        visible = causal_mask_bottom_right(q.shape[2], k.shape[2], q.device)
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, torch.finfo(q.dtype).min)
        attn_weights = attn_weights + mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous()


# ---- Attention against a KV cache -------------------------------------------------------------


def _cache_slots(cache_len: int, b: int, block_size: int, block_table: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(block, offset) of tokens 0..cache_len-1 of sequence ``b``: the batch row itself for a
    contiguous cache, the block table's entries for a paged one."""
    pos = torch.arange(cache_len)
    if block_table is None:
        return torch.full_like(pos, b), pos
    return block_table[b].cpu().long()[pos // block_size], pos % block_size


def gqa_attention_with_kvcache_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    rotary_interleaved: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """float64 ``(out, lse, k_cache', v_cache')`` of :func:`llama_ext.gqa_attention_with_kvcache`;
    the caches are updated copies in their own dtype (the new k rotated in float64 and rounded
    once, as apply_rotary does; q likewise before the attention). Window and softcap as
    FlashAttention: query i sits at i' = i + L - seq_q and sees keys i' - left <= j <= i' + right
    (causal: right = 0); scores s = scale q.k become softcap * tanh(s / softcap) before masking.
    Rows that see no key give zeros and lse 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    seq_q, seq_new = q.shape[1], 0 if k is None else k.shape[1]
    n_rep = q.shape[2] // k_cache.shape[2]
    lens = cache_seqlens.cpu().tolist()
    outs, lses = [], []
    for b, start in enumerate(lens):
        length = start + seq_new
        qb = q[b : b + 1]
        if seq_new:
            kb, vb = k[b : b + 1], v[b : b + 1]
            if rotary_cos is not None:
                pos = torch.arange(start, length, device=k.device)[None]
                kb = rotary_reference(kb, rotary_cos, rotary_sin, pos, rotary_interleaved).to(k.dtype)
            blk, off = _cache_slots(length, b, block_size, block_table)
            k_cache[blk[start:], off[start:]] = kb[0].to(k_cache.device)
            v_cache[blk[start:], off[start:]] = vb[0].to(v_cache.device)
        if rotary_cos is not None:
            pos = torch.arange(start, start + seq_q, device=q.device)[None]
            qb = rotary_reference(qb, rotary_cos, rotary_sin, pos, rotary_interleaved).to(q.dtype)
        blk, off = _cache_slots(length, b, block_size, block_table)
        kk = k_cache[blk, off].double().transpose(0, 1)  # [kv_heads, L, d]
        vv = v_cache[blk, off].double().transpose(0, 1)
        kk, vv = kk.repeat_interleave(n_rep, 0), vv.repeat_interleave(n_rep, 0)
        qq = qb[0].double().transpose(0, 1)  # [heads, seq_q, d]
        scores = (qq @ kk.transpose(-1, -2)) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        visible = attention_mask_bottom_right(seq_q, length, causal, window_size, q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        seen = visible.any(-1)
        lse = torch.logsumexp(scores, dim=-1) if length else scores.new_zeros(scores.shape[:-1])
        shift = torch.where(seen, lse, 0.0)[..., None]
        probs = torch.where(seen[:, None], torch.exp(scores - shift), 0.0)
        outs.append((probs @ vv).transpose(0, 1))
        lses.append(torch.where(seen, lse, 0.0))
    return torch.stack(outs), torch.stack(lses), k_cache, v_cache
