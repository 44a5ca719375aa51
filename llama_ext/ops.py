"""Functional ops: thin wrappers over ``torch.ops.llama_ext``, plus their fake (meta)
kernels for ``torch.compile`` and their autograd formulas.

The kernels themselves, and all argument checking, live in C++ (``csrc/``).
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

_ops = torch.ops.llama_ext


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Row statistics (RMSNorm's rstd, attention's lse) are float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_no_grad_inplace(name: str, *tensors: Optional[Tensor]) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{name} writes its inputs in place and has no autograd formula; "
            f"call it under torch.no_grad() or use the out-of-place form for training"
        )


def _contiguous_grad(grad: Optional[Tensor]) -> Optional[Tensor]:
    """Incoming gradients may be expanded (stride 0, e.g. from ``.sum()``); kernels need a
    contiguous last dim."""
    if grad is None or grad.dim() == 0 or grad.size(-1) <= 1 or grad.stride(-1) == 1:
        return grad
    return grad.contiguous()


# ---- RMSNorm ------------------------------------------------------------------------------


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> Tensor:
    """RMSNorm over the last dim, with the numerics of HF's RMSNorm modules.

    Statistics and the normalization run in float32 (float64 for float64 input):
    ``xhat = x * rsqrt(mean(x**2, -1) + eps)``. The weight applied is ``offset + weight``
    (``None`` means ones; Gemma stores ``weight`` around 0 and uses ``offset=1.0``), in float32.

    - ``cast_before_weight=True`` (HF ``LlamaRMSNorm``, Qwen, Mistral): ``xhat`` is rounded to
      ``x.dtype``, then multiplied by the weight in the promoted dtype of ``x`` and ``weight``,
      which is also the output dtype (float32 for a float32 weight with bf16/fp16 ``x``).
    - ``cast_before_weight=False`` (Gemma, OLMo 2): ``xhat * (offset + weight)`` in float32,
      rounded once to ``x.dtype``, the output dtype.

    ``weight`` has ``x``'s dtype or, for float16/bfloat16 ``x``, float32. ``x`` may have any
    leading dims and strided rows; its last dim must be contiguous. Differentiable in ``x`` and
    ``weight`` (whose gradient has ``weight``'s dtype).
    """
    return _ops.rms_norm(x, weight, eps, offset, cast_before_weight)[0]


def fused_add_rms_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> Tuple[Tensor, Tensor]:
    """``res = x + residual`` (rounded to ``x.dtype``) and ``rms_norm(res)`` in one pass.

    Returns ``(rms_norm(res, weight, eps, offset, cast_before_weight), res)``. Differentiable in
    all three tensors.
    """
    out, residual_out, _ = _ops.fused_add_rms_norm(x, residual, weight, eps, offset, cast_before_weight)
    return out, residual_out


def fused_add_rms_norm_(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> None:
    """In-place, inference-only form: ``residual <- x + residual``, ``x <- rms_norm(residual)``.

    The result must have ``x``'s dtype: a float32 weight with bf16/fp16 ``x`` needs
    ``cast_before_weight=False`` here (``TypeError`` otherwise).
    """
    _check_no_grad_inplace("fused_add_rms_norm_", x, residual, weight)
    _ops.fused_add_rms_norm_(x, residual, weight, eps, offset, cast_before_weight)


def _rms_norm_out_dtype(x: Tensor, weight: Optional[Tensor], cast_before_weight: bool) -> torch.dtype:
    """The output dtype HF's module gives: promoted with the weight's only in the Llama order."""
    if cast_before_weight and weight is not None:
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype


@torch.library.register_fake("llama_ext::rms_norm")
def _rms_norm_fake(x, weight, eps, offset=0.0, cast_before_weight=True):
    out = torch.empty_like(x, memory_format=torch.contiguous_format, dtype=_rms_norm_out_dtype(x, weight, cast_before_weight))
    return out, x.new_empty(x.shape[:-1], dtype=_stats_dtype(x.dtype))


@torch.library.register_fake("llama_ext::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps, offset=0.0, cast_before_weight=True):
    out = torch.empty_like(x, memory_format=torch.contiguous_format, dtype=_rms_norm_out_dtype(x, weight, cast_before_weight))
    residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, residual_out, x.new_empty(x.shape[:-1], dtype=_stats_dtype(x.dtype))


@torch.library.register_fake("llama_ext::fused_add_rms_norm_")
def _fused_add_rms_norm_inplace_fake(x, residual, weight, eps, offset=0.0, cast_before_weight=True):
    return None


@torch.library.register_fake("llama_ext::rms_norm_backward")
def _rms_norm_backward_fake(grad_out, x, weight, rstd, grad_residual_out, compute_grad_weight, offset=0.0,
                            cast_before_weight=True):
    want = compute_grad_weight and weight is not None
    grad_weight = x.new_empty((x.shape[-1] if want else 0,), dtype=weight.dtype if weight is not None else x.dtype)
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_weight


def _rms_norm_weight_grad(ctx, grad_weight: Tensor) -> Optional[Tensor]:
    return grad_weight if ctx.weight_needs_grad else None


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _, offset, cast_before_weight = inputs
    _, rstd = output
    ctx.weight_needs_grad = weight is not None and ctx.needs_input_grad[1]
    ctx.offset, ctx.cast_before_weight = offset, cast_before_weight
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_backward(ctx, grad_out, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = _ops.rms_norm_backward(
        _contiguous_grad(grad_out), x, weight, rstd, None, ctx.weight_needs_grad, ctx.offset, ctx.cast_before_weight
    )
    return grad_x, _rms_norm_weight_grad(ctx, grad_weight), None, None, None


def _fused_add_rms_norm_setup_context(ctx, inputs, output):
    _, _, weight, _, offset, cast_before_weight = inputs
    _, residual_out, rstd = output
    ctx.weight_needs_grad = weight is not None and ctx.needs_input_grad[2]
    ctx.offset, ctx.cast_before_weight = offset, cast_before_weight
    ctx.save_for_backward(residual_out, weight, rstd)


def _fused_add_rms_norm_backward(ctx, grad_out, grad_residual_out, _grad_rstd):
    residual_out, weight, rstd = ctx.saved_tensors
    grad_sum, grad_weight = _ops.rms_norm_backward(
        _contiguous_grad(grad_out), residual_out, weight, rstd, _contiguous_grad(grad_residual_out),
        ctx.weight_needs_grad, ctx.offset, ctx.cast_before_weight,
    )
    # residual_out = x + residual, so both inputs receive the same gradient.
    return grad_sum, grad_sum, _rms_norm_weight_grad(ctx, grad_weight), None, None, None


torch.library.register_autograd(
    "llama_ext::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup_context
)
torch.library.register_autograd(
    "llama_ext::fused_add_rms_norm", _fused_add_rms_norm_backward, setup_context=_fused_add_rms_norm_setup_context
)


# ---- Rotary position embedding --------------------------------------------------------------


def apply_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Optional[Tensor] = None,
    interleaved: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Rotary position embedding of ``q`` and ``k`` in one pass; returns new ``(q, k)``.

    ``q`` is ``[batch, seq, n_q_heads, head_dim]`` and ``k`` ``[batch, seq, n_kv_heads, head_dim]``
    (head counts may differ), any strides with a contiguous last dim: HF's
    ``[batch, heads, seq, head_dim]`` tensors pass as ``q.transpose(1, 2)`` without a copy. The
    outputs have q's and k's shapes and layouts, as ``torch.empty_like`` makes them: the same
    strides for dense inputs (so a transposed HF view gives a transposed output whose
    ``.transpose(1, 2)`` is contiguous), dense in the same dim order otherwise (a slice of a fused
    qkv projection gives a contiguous ``[batch, seq, heads, head_dim]`` output).

    ``cos``/``sin`` are ``[max_position, rotary_dim // 2]`` tables (:func:`llama_ext.rope_cos_sin`),
    float32; float64 ``q``/``k`` (CPU only) may also take float64 tables and compute in float64,
    which makes ``gradcheck`` exact. ``positions`` (int32/int64, ``[batch, seq]`` or ``[seq]``)
    picks each token's table row; ``None`` means ``0..seq-1``. A position outside the table raises
    ``IndexError`` on CPU and a device-side assert on CUDA.

    The first ``rotary_dim`` dims of each head are rotated, pairing ``(i, i + rotary_dim/2)``
    (Llama/NeoX ``rotate_half``) or, with ``interleaved``, ``(2i, 2i+1)`` (GPT-J); the rest pass
    through unchanged. Math is fp32 from the fp32 tables, rounded once to the input dtype.

    Differentiable in ``q`` and ``k`` (the gradient is the inverse rotation); no gradient flows to
    ``cos``/``sin`` or ``positions``.
    """
    return _ops.apply_rotary(q, k, cos, sin, positions, interleaved, False)


def apply_rotary_(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Optional[Tensor] = None,
    interleaved: bool = False,
) -> Tuple[Tensor, Tensor]:
    """In-place, inference-only :func:`apply_rotary`: rotates ``q`` and ``k`` where they are
    (any strides, e.g. views into a fused qkv projection) and returns them."""
    _check_no_grad_inplace("apply_rotary_", q, k)
    _ops.apply_rotary_(q, k, cos, sin, positions, interleaved, False)
    return q, k


@torch.library.register_fake("llama_ext::apply_rotary")
def _apply_rotary_fake(q, k, cos, sin, positions, interleaved, inverse):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("llama_ext::apply_rotary_")
def _apply_rotary_inplace_fake(q, k, cos, sin, positions, interleaved, inverse):
    return None


def _apply_rotary_setup_context(ctx, inputs, output):
    _, _, cos, sin, positions, interleaved, inverse = inputs
    ctx.interleaved = interleaved
    ctx.inverse = inverse
    ctx.save_for_backward(cos, sin, positions)


def _apply_rotary_backward(ctx, grad_q, grad_k):
    cos, sin, positions = ctx.saved_tensors
    # A rotation's transpose is the rotation by -theta: the same op with `inverse` flipped.
    grad_q, grad_k = _ops.apply_rotary(
        _contiguous_grad(grad_q), _contiguous_grad(grad_k), cos, sin, positions, ctx.interleaved, not ctx.inverse
    )
    return grad_q, grad_k, None, None, None, None, None


torch.library.register_autograd(
    "llama_ext::apply_rotary", _apply_rotary_backward, setup_context=_apply_rotary_setup_context
)


# ---- Grouped-query attention ----------------------------------------------------------------


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    """``head_dim ** -0.5`` unless given; a q without dims gets 1.0 so the kernel's shape check
    reports it."""
    if scale is not None:
        return float(scale)
    return float(q.shape[-1]) ** -0.5 if q.dim() > 0 and q.shape[-1] > 0 else 1.0


def _window(window_size) -> Tuple[int, int]:
    """``window_size`` as the kernels' ``(window_left, window_right)`` ints. Their values (-1 or
    >= 0) are checked by the kernels, with the other arguments."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window_size ({side}) must be an int, got {type(value).__name__} {value!r}")
    return left, right


def gqa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
):
    """Grouped-query attention ``softmax(scale * q k^T) v``, fused and memory-efficient.

    ``q`` is ``[batch, seq_q, n_q_heads, head_dim]``; ``k`` and ``v`` are
    ``[batch, seq_k, n_kv_heads, head_dim]`` with ``n_q_heads % n_kv_heads == 0`` (MQA and MHA
    included). Query head ``h`` reads kv head ``h // (n_q_heads // n_kv_heads)``; K and V are
    never repeated or copied. Any strides work as long as the last dim is contiguous, so HF's
    ``[b, h, s, d]`` tensors pass as ``.transpose(1, 2)`` views.

    ``causal=True`` aligns the mask bottom-right: query ``i`` sees keys
    ``j <= i + seq_k - seq_q`` (as FlashAttention does; torch's SDPA aligns top-left), so a
    KV-cache decode step (``seq_q`` 1 or a few tokens) is a plain call. ``scale`` defaults to
    ``head_dim ** -0.5``.

    ``window_size=(left, right)`` is a sliding window as in FlashAttention: with
    ``i' = i + seq_k - seq_q``, query ``i`` sees keys ``i' - left <= j <= i' + right``; ``-1``
    leaves that side unbounded (the default ``(-1, -1)``: no window). With ``causal=True`` the
    right side is 0 whatever is passed, so a causal window of ``left + 1`` keys is
    ``window_size=(left, 0)`` (or ``(left, -1)``). Key blocks outside every row's window are
    never read: the cost grows with the window, not with ``seq_k``. ``softcap > 0`` caps the
    scores smoothly before masking and softmax, ``s -> softcap * tanh(s / softcap)`` with
    ``s = scale * q.k`` (Gemma 2); ``0`` turns it off. The backward uses the exact derivative. The softmax runs in float32 (float64 for float64 input) with online
    rescaling; no ``[seq_q, seq_k]`` matrix is materialized.

    A query row that sees no key (``seq_q > seq_k`` under causal, or ``seq_k == 0``) gives an
    output row of zeros and ``lse = 0``. With ``return_lse=True`` returns ``(out, lse)``,
    ``lse`` float32 (float64 for float64 input) ``[batch, n_q_heads, seq_q]``: the natural log
    of the softmax denominator, ``logsumexp`` over the visible keys of the (capped) scores. Differentiable in q, k and v;
    ``lse`` is not differentiable.
    """
    left, right = _window(window_size)
    out, lse = _ops.gqa_attention_forward(
        q, k, v, None, None, 0, 0, causal, _default_scale(q, scale), left, right, float(softcap)
    )
    return (out, lse) if return_lse else out


def gqa_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
):
    """:func:`gqa_attention` over packed variable-length sequences (FlashAttention's varlen API).

    ``q`` is ``[total_q, n_q_heads, head_dim]`` and ``k``/``v`` ``[total_k, n_kv_heads, head_dim]``:
    sequence ``b`` owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of ``q`` and
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of ``k``/``v``. ``cu_seqlens_*`` are int32
    ``[batch + 1]`` prefix sums from 0 to the total; ``max_seqlen_*`` bound every sequence's
    length. Causal masking and the sliding window are bottom-right within each sequence (``i'``
    counts from the end of that sequence's keys); a sequence with 0 keys gives
    zeros. ``lse`` is ``[n_q_heads, total_q]``. Everything else as in :func:`gqa_attention`.
    """
    left, right = _window(window_size)
    out, lse = _ops.gqa_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, _default_scale(q, scale),
        left, right, float(softcap),
    )
    return (out, lse) if return_lse else out


@torch.library.register_fake("llama_ext::gqa_attention_forward")
def _gqa_attention_forward_fake(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, softcap
):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if cu_seqlens_q is None:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    else:
        lse_shape = (q.shape[1], q.shape[0])
    return out, q.new_empty(lse_shape, dtype=_stats_dtype(q.dtype))


@torch.library.register_fake("llama_ext::gqa_attention_backward")
def _gqa_attention_backward_fake(
    grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
    window_left, window_right, softcap,
):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _gqa_attention_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *attrs = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.attrs = attrs  # max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, softcap


def _gqa_attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    grad_q, grad_k, grad_v = _ops.gqa_attention_backward(
        _contiguous_grad(grad_out), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.attrs
    )
    return (grad_q, grad_k, grad_v) + (None,) * (2 + len(ctx.attrs))


torch.library.register_autograd(
    "llama_ext::gqa_attention_forward", _gqa_attention_backward, setup_context=_gqa_attention_setup_context
)


# ---- Attention against a KV cache (decode) ----------------------------------------------------


def gqa_attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    rotary_interleaved: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
):
    """Attention of new queries against a KV cache, with the new keys/values appended in place
    (FlashAttention's ``flash_attn_with_kvcache``): the decode step of a generation loop.

    ``q`` is ``[batch, seq_q, n_q_heads, d]``. The caches are ``[batch, capacity, n_kv_heads, d]``
    or, with ``block_table`` (int32 ``[batch, max_blocks]``: the cache block holding each
    ``block_size`` tokens of a sequence), paged ``[num_blocks, block_size, n_kv_heads, d]``.
    ``cache_seqlens`` (int32 ``[batch]``) counts the tokens each sequence already holds.

    When ``k``/``v`` (``[batch, seq_new, n_kv_heads, d]``) are given they are first written into the
    caches at positions ``cache_seqlens[b] .. cache_seqlens[b] + seq_new - 1`` (``k`` rotated by
    ``rotary_cos``/``rotary_sin`` when given: float32 ``[max_position, rotary_dim / 2]`` tables as
    :func:`llama_ext.rope_cos_sin` returns, pairs as in :func:`llama_ext.apply_rotary`); then ``q``
    (rotated at positions ``cache_seqlens[b] + i`` when the tables are given; they need ``k``)
    attends over the first ``cache_seqlens[b] + seq_new`` tokens of its sequence. The causal mask
    and ``window_size=(left, right)`` align bottom-right as in :func:`gqa_attention` (``-1`` is
    unbounded; causal forces ``right = 0``); ``softcap > 0`` maps scores ``s`` to
    ``softcap * tanh(s / softcap)`` before masking. ``cache_seqlens`` is not advanced: the caller
    owns it. Nothing but the written slots of the caches changes.

    Returns ``out`` (``[batch, seq_q, n_q_heads, d]``) or ``(out, lse)`` with ``lse`` float32
    ``[batch, n_q_heads, seq_q]``; a row that sees no key gives zeros and lse 0. Inference only:
    an input that requires grad (with grad mode on) raises. A ``cache_seqlens + seq_new`` beyond
    the capacity, a block table entry outside the cache or a position outside the rotary tables
    raises before anything is written on CPU and is a device-side assert on CUDA, whose calls
    never synchronize with the host (a decode step captures in a CUDA graph).
    """
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"gqa_attention_with_kvcache is an inference op without a gradient, but {name} requires grad; "
                    f"call it under torch.no_grad() (or use gqa_attention for training)"
                )
    left, right = _window(window_size)
    out, lse = _ops.gqa_attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens, k, v, block_table, causal, _default_scale(q, scale), rotary_cos,
        rotary_sin, rotary_interleaved, left, right, float(softcap),
    )
    return (out, lse) if return_lse else out


@torch.library.register_fake("llama_ext::gqa_attention_with_kvcache")
def _gqa_attention_with_kvcache_fake(
    q, k_cache, v_cache, cache_seqlens, k, v, block_table, causal, scale, rotary_cos, rotary_sin, rotary_interleaved,
    window_left, window_right, softcap,
):
    out = q.new_empty(q.shape)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_stats_dtype(q.dtype))


def empty_kv_cache(
    size: Sequence[int], dtype: Optional[torch.dtype] = None, device: Union[torch.device, str, None] = None
) -> Tensor:
    """An uninitialized tensor for a KV cache of :func:`gqa_attention_with_kvcache` (``torch.empty``
    of a floating ``dtype``, the default dtype when None, on ``device``, the CPU when None).

    On the CPU, a tensor of 2 MB or more is 2 MB-aligned and advised into transparent huge pages
    (``madvise(MADV_HUGEPAGE)``; without effect where THP is off), as PyTorch's allocator does for
    every tensor only under ``THP_MEM_ALLOC_ENABLE=1``: a decode step reads the whole cache, and in
    4 KB pages nearly every page it reads is a TLB miss (what 2 MB pages gained:
    ``csrc/kv_cache_memory.cpp``). :class:`KVCache` and :class:`PagedKVCache` allocate their caches
    here. Elsewhere it is ``torch.empty``."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device("cpu" if device is None else device)
    return _ops.empty_kv_cache([int(n) for n in size], dtype, device)


@torch.library.register_fake("llama_ext::empty_kv_cache")
def _empty_kv_cache_fake(size, dtype, device):
    return torch.empty(size, dtype=dtype, device=device)
