"""Functional ops: thin wrappers over ``torch.ops.llama_ext``, plus their fake (meta)
kernels for ``torch.compile`` and their autograd formulas.

The kernels themselves, and all argument checking, live in C++ (``csrc/``).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.llama_ext


def _rstd_dtype(dtype: torch.dtype) -> torch.dtype:
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


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim, with HF ``LlamaRMSNorm`` numerics.

    ``y = weight * (x * rsqrt(mean(x**2, -1) + eps)).to(x.dtype)``: statistics and the
    normalization run in float32 (float64 for float64 input), the normalized value is
    rounded once to ``x.dtype``, then multiplied by ``weight`` (same dtype as ``x``;
    ``None`` means ones) and rounded again. ``x`` may have any leading dims and strided
    rows; its last dim must be contiguous. Differentiable in ``x`` and ``weight``.
    """
    return _ops.rms_norm(x, weight, eps)[0]


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6
) -> Tuple[Tensor, Tensor]:
    """``res = x + residual`` (rounded to ``x.dtype``) and ``rms_norm(res)`` in one pass.

    Returns ``(rms_norm(res, weight, eps), res)``. Differentiable in all three tensors.
    """
    out, residual_out, _ = _ops.fused_add_rms_norm(x, residual, weight, eps)
    return out, residual_out


def fused_add_rms_norm_(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> None:
    """In-place, inference-only form: ``residual <- x + residual``, ``x <- rms_norm(residual)``."""
    _check_no_grad_inplace("fused_add_rms_norm_", x, residual, weight)
    _ops.fused_add_rms_norm_(x, residual, weight, eps)


@torch.library.register_fake("llama_ext::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
        x.shape[:-1], dtype=_rstd_dtype(x.dtype)
    )


@torch.library.register_fake("llama_ext::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out), x.new_empty(x.shape[:-1], dtype=_rstd_dtype(x.dtype))


@torch.library.register_fake("llama_ext::fused_add_rms_norm_")
def _fused_add_rms_norm_inplace_fake(x, residual, weight, eps):
    return None


@torch.library.register_fake("llama_ext::rms_norm_backward")
def _rms_norm_backward_fake(grad_out, x, weight, rstd, grad_residual_out, compute_grad_weight):
    n = x.shape[-1] if (compute_grad_weight and weight is not None) else 0
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((n,))


def _rms_norm_weight_grad(ctx, grad_weight: Tensor) -> Optional[Tensor]:
    return grad_weight if ctx.weight_needs_grad else None


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.weight_needs_grad = weight is not None and ctx.needs_input_grad[1]
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_backward(ctx, grad_out, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = _ops.rms_norm_backward(_contiguous_grad(grad_out), x, weight, rstd, None, ctx.weight_needs_grad)
    return grad_x, _rms_norm_weight_grad(ctx, grad_weight), None


def _fused_add_rms_norm_setup_context(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, residual_out, rstd = output
    ctx.weight_needs_grad = weight is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(residual_out, weight, rstd)


def _fused_add_rms_norm_backward(ctx, grad_out, grad_residual_out, _grad_rstd):
    residual_out, weight, rstd = ctx.saved_tensors
    grad_sum, grad_weight = _ops.rms_norm_backward(
        _contiguous_grad(grad_out), residual_out, weight, rstd, _contiguous_grad(grad_residual_out),
        ctx.weight_needs_grad,
    )
    # residual_out = x + residual, so both inputs receive the same gradient.
    return grad_sum, grad_sum, _rms_norm_weight_grad(ctx, grad_weight), None


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
