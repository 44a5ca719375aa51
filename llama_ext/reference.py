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
