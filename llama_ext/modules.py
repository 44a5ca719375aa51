"""``nn.Module`` front ends of the ops."""
import torch
from torch import Tensor, nn

from . import ops


class RMSNorm(nn.Module):
    """Drop-in for HF ``LlamaRMSNorm``: ``weight`` starts at ones; see :func:`llama_ext.rms_norm`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: Tensor, residual: Tensor = None):
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.variance_epsilon)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
