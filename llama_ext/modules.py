"""``nn.Module`` front ends of the ops."""
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .rope import cos_sin_from_inv_freq, rope_inv_freq, rope_type_of


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


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with HF's scaling types: ``rope(q, k, positions)`` returns the
    rotated ``(q, k)`` (see :func:`llama_ext.apply_rotary` for layouts; ``positions`` ``None``
    means ``0..seq-1``).

    ``rotary_dim = int(head_dim * partial_rotary_factor)`` leading dims of each head are rotated.
    ``rope_scaling`` is HF's dict (see :func:`llama_ext.rope_cos_sin`). The float32 cos/sin tables
    are non-persistent buffers (they follow ``.to()``), ``[max_position_embeddings, rotary_dim // 2]``.
    ``dynamic`` (NTK) recomputes them, as HF does, when a sequence reaches past the cached length,
    and returns to the original ones for sequences within ``max_position_embeddings`` again;
    ``longrope`` switches to ``long_factor`` tables past ``original_max_position_embeddings``.
    Those two types read ``positions.max()`` on the host (one device sync per call, as HF).
    ``interleaved=True`` pairs dims GPT-J style; ``device`` is where the tables are built.
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        rope_scaling: Optional[dict] = None,
        partial_rotary_factor: float = 1.0,
        interleaved: bool = False,
        device=None,
    ):
        super().__init__()
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        if not 2 <= self.rotary_dim <= head_dim or self.rotary_dim % 2:
            raise ValueError(
                f"int(head_dim * partial_rotary_factor) = {self.rotary_dim} must be an even number in [2, head_dim]"
            )
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.rope_scaling = dict(rope_scaling) if rope_scaling is not None else None
        self.rope_type = rope_type_of(rope_scaling)
        self.interleaved = interleaved
        cos, sin = self._tables(device)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)
        self.max_seq_len_cached = max_position_embeddings
        if self.rope_type == "longrope":
            self.original_max_position = self.rope_scaling.get(
                "original_max_position_embeddings", max_position_embeddings
            )
            long_cos, long_sin = self._tables(device, seq_len=self.original_max_position + 1)
            self.register_buffer("long_cos_cached", long_cos[:max_position_embeddings], persistent=False)
            self.register_buffer("long_sin_cached", long_sin[:max_position_embeddings], persistent=False)

    def _tables(self, device, seq_len=None):
        inv_freq, attention_scaling = rope_inv_freq(
            self.rotary_dim, self.max_position_embeddings, self.base, self.rope_scaling, device, seq_len
        )
        rows = max(self.max_position_embeddings, int(seq_len) if seq_len is not None else 0)
        return cos_sin_from_inv_freq(inv_freq, rows, attention_scaling)

    def _dynamic_update(self, seq_len: int) -> None:
        device = self.cos_cached.device
        if seq_len > self.max_seq_len_cached:  # growth: NTK base for this length
            seq_len_t = torch.tensor(seq_len, dtype=torch.int64, device=device)  # HF's fp32 arithmetic
            self.cos_cached, self.sin_cached = self._tables(device, seq_len=seq_len_t)
            self.max_seq_len_cached = seq_len
        elif seq_len < self.max_position_embeddings < self.max_seq_len_cached:  # back within range: reset
            self.cos_cached, self.sin_cached = self._tables(device)
            self.max_seq_len_cached = self.max_position_embeddings

    def forward(self, q: Tensor, k: Tensor, positions: Optional[Tensor] = None):
        cos, sin = self.cos_cached, self.sin_cached
        if self.rope_type in ("dynamic", "longrope"):
            seq_len = int(positions.max()) + 1 if positions is not None and positions.numel() else q.shape[1]
            if self.rope_type == "dynamic":
                self._dynamic_update(seq_len)
                cos, sin = self.cos_cached, self.sin_cached
            elif seq_len > self.original_max_position:
                cos, sin = self.long_cos_cached, self.long_sin_cached
        return ops.apply_rotary(q, k, cos, sin, positions, self.interleaved)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_position_embeddings="
            f"{self.max_position_embeddings}, base={self.base}, rope_type={self.rope_type!r}"
        )
