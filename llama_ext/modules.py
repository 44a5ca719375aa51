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


class KVCache:
    """Keys and values of past tokens for incremental decoding with :class:`GQAttention`.

    Holds ``k`` and ``v`` as ``[batch, seq, n_kv_heads, head_dim]`` (the layout
    :func:`llama_ext.gqa_attention` reads). :meth:`update` appends a step and returns the
    full k/v; :attr:`offset` is the number of cached tokens, the position of the next one.
    Storage grows by concatenation: simple, and fine for tests and short generations.
    """

    def __init__(self):
        self.k = None
        self.v = None

    @property
    def offset(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def update(self, k: Tensor, v: Tensor):
        """Appends ``k``/``v`` ``[batch, new, n_kv_heads, head_dim]``; returns the cached k, v."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=1)
            self.v = torch.cat([self.v, v], dim=1)
        return self.k, self.v


class GQAttention(nn.Module):
    """Llama self-attention with grouped-query heads; a drop-in for HF's ``LlamaAttention``.

    ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` carry HF's names and shapes, so an HF
    state_dict loads as is. ``rope`` is an optional rotary embedding called as
    ``rope(q, k, positions)`` on ``[batch, seq, heads, head_dim]`` tensors (e.g.
    ``llama_ext.RotaryEmbedding``). Attention is causal (bottom-right aligned, so cached
    decoding needs no mask) through :func:`llama_ext.gqa_attention`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int = None,
        bias: bool = False,
        rope=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.scaling = self.head_dim**-0.5
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias, **factory)
        self.rope = rope

    def forward(self, x: Tensor, positions: Tensor = None, cache: KVCache = None) -> Tensor:
        """``x`` ``[batch, seq, hidden]`` -> ``[batch, seq, hidden]``.

        ``positions`` (``[seq]`` or ``[batch, seq]``) feed the rotary embedding and default to
        ``offset .. offset + seq - 1``, ``offset`` being the cache's length (0 without cache).
        With ``cache``, this step's k/v are appended and attention runs over all cached tokens.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.rope is not None:
            if positions is None:
                offset = 0 if cache is None else cache.offset
                positions = torch.arange(offset, offset + seq, device=x.device)
            q, k = self.rope(q, k, positions)
        if cache is not None:
            k, v = cache.update(k, v)
        out = ops.gqa_attention(q, k, v, causal=True, scale=self.scaling)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
