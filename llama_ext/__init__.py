"""llama_ext: fused RMSNorm, rotary embedding and grouped-query attention for PyTorch.

Every op is a ``torch.ops.llama_ext`` custom op with CPU and (when built) CUDA kernels,
autograd, and fake kernels for ``torch.compile``.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.llama_ext and its CUDA kernels)
from . import _cpu_kernels  # loads the CPU kernels of the best ISA level this CPU runs
from .ops import (
    apply_rotary,
    apply_rotary_,
    empty_kv_cache,
    fused_add_rms_norm,
    fused_add_rms_norm_,
    gqa_attention,
    gqa_attention_varlen,
    gqa_attention_with_kvcache,
    rms_norm,
)
from .modules import GQAttention, KVCache, PagedKVCache, RMSNorm, RotaryEmbedding
from .rope import rope_cos_sin
from . import distributed  # noqa: F401,E402  (registers the DTensor sharding rules of the ops)

__version__ = "0.1.0"


def cuda_kernels_built() -> bool:
    """True when this build of the extension contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("llama_ext::rms_norm", "CUDA")


def cpu_capability() -> str:
    """The vector ISA level of the CPU kernels in use: ``"amx_bf16"``, ``"avx512_bf16"``,
    ``"avx512"``, ``"avx2"`` or ``"default"`` (portable). The best one this CPU runs, unless the environment
    variable ``LLAMA_EXT_CPU_CAPABILITY`` chose a lower one before import."""
    return _cpu_kernels.CAPABILITY


__all__ = [
    "GQAttention",
    "KVCache",
    "PagedKVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "apply_rotary_",
    "cpu_capability",
    "cuda_kernels_built",
    "empty_kv_cache",
    "fused_add_rms_norm",
    "fused_add_rms_norm_",
    "gqa_attention",
    "gqa_attention_varlen",
    "gqa_attention_with_kvcache",
    "rms_norm",
    "rope_cos_sin",
]
