"""``nn.Module`` front ends of the ops."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from .rope import cos_sin_from_inv_freq, rope_inv_freq, rope_type_of


class RMSNorm(nn.Module):
    """Drop-in for HF's RMSNorm modules (see :func:`llama_ext.rms_norm`).

    The defaults are HF ``LlamaRMSNorm`` (Qwen, Mistral too): ``weight`` starts at ones, the
    normalized value is rounded to the input dtype before the weight multiplies it. Gemma
    (1, 2, 3): ``offset=1.0, cast_before_weight=False`` with ``weight`` starting at zeros; OLMo 2:
    ``cast_before_weight=False``. ``weight`` starts at ``1 - offset``, so the weight applied
    starts at ones (zeros for Gemma, as there).
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        offset: float = 0.0,
        cast_before_weight: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.offset = offset
        self.cast_before_weight = cast_before_weight

    def forward(self, x: Tensor, residual: Tensor = None):
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.variance_epsilon, self.offset, self.cast_before_weight)
        return ops.fused_add_rms_norm(
            x, residual, self.weight, self.variance_epsilon, self.offset, self.cast_before_weight
        )

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, eps={self.variance_epsilon}, offset={self.offset}, "
            f"cast_before_weight={self.cast_before_weight}"
        )


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
    decoding needs no mask) through :func:`llama_ext.gqa_attention`, with its ``window_size``
    (e.g. ``(sliding_window - 1, 0)`` for a window of ``sliding_window`` keys) and ``softcap``.
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
        window_size: Tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
    ):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}), or pass head_dim"
            )
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        self.scaling = self.head_dim**-0.5
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias, **factory)
        self.rope = rope
        self.window_size = tuple(window_size)
        self.softcap = softcap

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
        out = ops.gqa_attention(
            q, k, v, causal=True, scale=self.scaling, window_size=self.window_size, softcap=self.softcap
        )
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        extra = f", window_size={self.window_size}" if self.window_size != (-1, -1) else ""
        extra += f", softcap={self.softcap}" if self.softcap else ""
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}{extra}"
