"""``nn.Module`` front ends of the ops."""
from typing import List, Optional, Tuple

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
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``.

        float32 activations under a float16/bfloat16 weight (a model that keeps its residual stream
        in float32 after ``.to(bfloat16)``) meet the weight in float32, as HF's norms promote it:
        exactly, since widening is exact."""
        weight = self.weight
        if x.dtype == torch.float32 and weight.dtype in (torch.float16, torch.bfloat16):
            weight = weight.float()
        if residual is None:
            return ops.rms_norm(x, weight, self.variance_epsilon, self.offset, self.cast_before_weight)
        return ops.fused_add_rms_norm(x, residual, weight, self.variance_epsilon, self.offset, self.cast_before_weight)

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
    ``longrope`` switches to ``long_factor`` tables past ``original_max_position_embeddings``
    (built at the first such call, on the tables' device, as HF builds them).
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
        if self.rope_type == "proportional" and self.rotary_dim != head_dim:
            raise ValueError(
                "proportional rope spans the whole head: give its partial_rotary_factor in rope_scaling, "
                f"not as the module's ({partial_rotary_factor})"
            )
        self.interleaved = interleaved
        cos, sin = self._tables(device)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)
        self.max_seq_len_cached = max_position_embeddings
        if self.rope_type == "longrope":
            self.original_max_position = self.rope_scaling.get(
                "original_max_position_embeddings", max_position_embeddings
            )
            # Built at the first call past original_max_position, on the tables' device, where HF
            # builds them (in its forward): a GPU's pow rounds differently from the CPU's.
            self.register_buffer("long_cos_cached", None, persistent=False)
            self.register_buffer("long_sin_cached", None, persistent=False)

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
                if self.long_cos_cached is None:
                    long_cos, long_sin = self._tables(cos.device, seq_len=self.original_max_position + 1)
                    self.long_cos_cached = long_cos[: self.max_position_embeddings]
                    self.long_sin_cached = long_sin[: self.max_position_embeddings]
                cos, sin = self.long_cos_cached, self.long_sin_cached
        return ops.apply_rotary(q, k, cos, sin, positions, self.interleaved)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_position_embeddings="
            f"{self.max_position_embeddings}, base={self.base}, rope_type={self.rope_type!r}"
        )


class KVCache:
    """Keys and values of past tokens for incremental decoding with :class:`GQAttention`.

    Preallocated ``[batch, capacity, n_kv_heads, head_dim]`` buffers (allocated at the first
    step, in its dtype and device) filled in place by :func:`llama_ext.gqa_attention_with_kvcache`,
    which appends a step's k/v and attends over the cache in one call. ``capacity`` is the
    initial number of tokens per sequence; a step past it reallocates to twice the size
    (pass the generation's total length to avoid that). :attr:`offset` (a host int, so no device
    sync) is the number of cached tokens, the position of the next one; :attr:`cache_seqlens`
    is the same count as the op's int32 device tensor. :attr:`k`/:attr:`v` are views of the
    filled part.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.k_cache = self.v_cache = self.cache_seqlens = None
        self.offset = 0

    @property
    def k(self) -> Optional[Tensor]:
        return None if self.k_cache is None else self.k_cache[:, : self.offset]

    @property
    def v(self) -> Optional[Tensor]:
        return None if self.v_cache is None else self.v_cache[:, : self.offset]

    def positions(self, seq: int, device=None) -> Tensor:
        """Positions of the next ``seq`` tokens, ``[seq]``."""
        return torch.arange(self.offset, self.offset + seq, device=device)

    def _reserve(self, k: Tensor) -> None:
        batch, new, heads, d = k.shape
        needed = self.offset + new
        if self.k_cache is not None and needed <= self.k_cache.shape[1]:
            return
        capacity = max(self.capacity, needed, 2 * (0 if self.k_cache is None else self.k_cache.shape[1]))
        k_cache = ops.empty_kv_cache((batch, capacity, heads, d), k.dtype, k.device)
        v_cache = ops.empty_kv_cache(k_cache.shape, k.dtype, k.device)
        if self.k_cache is not None:
            k_cache[:, : self.offset] = self.k_cache[:, : self.offset]
            v_cache[:, : self.offset] = self.v_cache[:, : self.offset]
        else:
            self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=k.device)
        self.k_cache, self.v_cache = k_cache, v_cache

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: Optional[float] = None,
        window_size: Tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
    ) -> Tensor:
        """Appends ``k``/``v`` ``[batch, new, n_kv_heads, head_dim]`` and returns causal attention
        of ``q`` ``[batch, new, n_heads, head_dim]`` over every cached token. With autograd
        recording (training through a cache), the step's k/v are still cached (detached) and the
        attention runs on :func:`llama_ext.gqa_attention`, differentiable in this step's q/k/v."""
        self._reserve(k)
        start, new = self.offset, k.shape[1]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            with torch.no_grad():
                self.k_cache[:, start : start + new] = k
                self.v_cache[:, start : start + new] = v
            k_all = torch.cat([self.k_cache[:, :start], k], dim=1)
            v_all = torch.cat([self.v_cache[:, :start], v], dim=1)
            out = ops.gqa_attention(
                q, k_all, v_all, causal=True, scale=scale, window_size=window_size, softcap=softcap
            )
        else:
            out = ops.gqa_attention_with_kvcache(
                q, self.k_cache, self.v_cache, self.cache_seqlens, k, v,
                scale=scale, window_size=window_size, softcap=softcap,
            )
        self.cache_seqlens += new
        self.offset += new
        return out

    def update(self, k: Tensor, v: Tensor):
        """Appends ``k``/``v`` without attending; returns the cached k, v (views)."""
        self._reserve(k)
        new = k.shape[1]
        self.k_cache[:, self.offset : self.offset + new] = k
        self.v_cache[:, self.offset : self.offset + new] = v
        self.cache_seqlens += new
        self.offset += new
        return self.k, self.v


class PagedKVCache:
    """A :class:`KVCache` whose tokens live in fixed-size blocks of a shared pool (vLLM's paged
    attention): sequences take blocks as they grow and return them when freed, so a batch of
    sequences of different lengths holds only the blocks it uses, and a finished sequence's slot
    can start a new one while the others keep decoding.

    The pool ``[num_blocks, block_size, n_kv_heads, head_dim]`` (per k and v, allocated at the
    first step in its dtype and device; it doubles when no block is free) is read and written by
    :func:`llama_ext.gqa_attention_with_kvcache` through an int32 :attr:`block_table`
    ``[batch, max_blocks]``. Block bookkeeping is on the host (:attr:`lengths`, a free list), so
    a step never syncs with the device; the device tables are rewritten only on steps where a
    sequence crosses into a new block or is reset.
    """

    def __init__(self, num_blocks: int = 64, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k_cache = self.v_cache = self.block_table = self.cache_seqlens = None
        self.lengths: List[int] = []
        self.blocks: List[List[int]] = []  # each sequence's blocks, in token order
        self.free_blocks: List[int] = []
        self._tables_stale = True

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def offset(self) -> int:
        """The common length of the sequences (the position of the next token)."""
        if len(set(self.lengths)) > 1:
            raise ValueError(f"the sequences of this cache have different lengths {self.lengths}: use positions()")
        return self.lengths[0] if self.lengths else 0

    def positions(self, seq: int, device=None) -> Tensor:
        """Positions of the next ``seq`` tokens: ``[seq]``, or ``[batch, seq]`` when the
        sequences have different lengths."""
        if len(set(self.lengths)) <= 1:
            start = self.lengths[0] if self.lengths else 0
            return torch.arange(start, start + seq, device=device)
        starts = torch.tensor(self.lengths, device=device).unsqueeze(1)
        return starts + torch.arange(seq, device=device)

    def _allocate(self, k: Tensor) -> None:
        batch, _, heads, d = k.shape
        if self.k_cache is None:
            self.k_cache = ops.empty_kv_cache((self.num_blocks, self.block_size, heads, d), k.dtype, k.device)
            self.v_cache = ops.empty_kv_cache(self.k_cache.shape, k.dtype, k.device)
            self.free_blocks = list(range(self.num_blocks - 1, -1, -1))
            self.lengths = [0] * batch
            self.blocks = [[] for _ in range(batch)]
        elif batch != self.batch:
            raise ValueError(f"this cache holds {self.batch} sequences, but k has batch {batch}")

    def _take_block(self) -> int:
        if not self.free_blocks:  # grow the pool: existing block ids stay valid
            old = self.k_cache.shape[0]

            def grow(t: Tensor) -> Tensor:
                grown = ops.empty_kv_cache((2 * old,) + tuple(t.shape[1:]), t.dtype, t.device)
                grown[:old] = t
                return grown

            self.k_cache, self.v_cache = grow(self.k_cache), grow(self.v_cache)
            self.free_blocks = list(range(2 * old - 1, old - 1, -1))
        return self.free_blocks.pop()

    def _reserve(self, new: int) -> None:
        for b, length in enumerate(self.lengths):
            while len(self.blocks[b]) * self.block_size < length + new:
                self.blocks[b].append(self._take_block())
                self._tables_stale = True
        if self._tables_stale:
            max_blocks = max(1, max(len(blocks) for blocks in self.blocks))
            table = torch.zeros(self.batch, max_blocks, dtype=torch.int32)
            for b, blocks in enumerate(self.blocks):
                table[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            device = self.k_cache.device
            self.block_table = table.to(device)
            self.cache_seqlens = torch.tensor(self.lengths, dtype=torch.int32).to(device)
            self._tables_stale = False

    def _slots(self, b: int, start: int, end: int) -> Tuple[Tensor, Tensor]:
        """(block, offset) index tensors of tokens [start, end) of sequence b."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(self.blocks[b], dtype=torch.long)[pos // self.block_size]
        return blocks.to(self.k_cache.device), (pos % self.block_size).to(self.k_cache.device)

    def sequence(self, b: int) -> Tuple[Tensor, Tensor]:
        """The cached k, v of sequence b, gathered: ``[length, n_kv_heads, head_dim]`` each."""
        if self.k_cache is None:
            raise ValueError("the cache is empty")
        blk, off = self._slots(b, 0, self.lengths[b])
        return self.k_cache[blk, off], self.v_cache[blk, off]

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: Optional[float] = None,
        window_size: Tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
    ) -> Tensor:
        """As :meth:`KVCache.attend`: appends ``k``/``v`` ``[batch, new, n_kv_heads, head_dim]``
        to every sequence and returns causal attention of ``q`` over each sequence's tokens."""
        self._allocate(k)
        new = k.shape[1]
        self._reserve(new)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            # Training through a cache: the step's k/v are cached (detached), attention runs on
            # gqa_attention over the gathered tokens, differentiable in this step's q/k/v.
            length = self.offset
            with torch.no_grad():
                for b in range(self.batch):
                    blk, off = self._slots(b, length, length + new)
                    self.k_cache[blk, off], self.v_cache[blk, off] = k[b], v[b]
            past = [self.sequence(b) for b in range(self.batch)]
            k_all = torch.cat([torch.stack([p[0][:length] for p in past]), k], dim=1)
            v_all = torch.cat([torch.stack([p[1][:length] for p in past]), v], dim=1)
            out = ops.gqa_attention(q, k_all, v_all, causal=True, scale=scale, window_size=window_size, softcap=softcap)
        else:
            out = ops.gqa_attention_with_kvcache(
                q, self.k_cache, self.v_cache, self.cache_seqlens, k, v, block_table=self.block_table,
                scale=scale, window_size=window_size, softcap=softcap,
            )
        self.cache_seqlens += new
        self.lengths = [length + new for length in self.lengths]
        return out

    def free(self, b: int) -> None:
        """Ends sequence b: its blocks return to the pool and its slot restarts empty (the next
        step's token of this slot is position 0 of a new sequence)."""
        self.free_blocks.extend(reversed(self.blocks[b]))
        self.blocks[b] = []
        self.lengths[b] = 0
        self._tables_stale = True

    def reset(self) -> None:
        """Frees every sequence (the pool stays allocated)."""
        for b in range(self.batch):
            self.free(b)


class GQAttention(nn.Module):
    """Llama self-attention with grouped-query heads; a drop-in for HF's ``LlamaAttention``.

    ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` carry HF's names and shapes, so an HF
    state_dict loads as is. ``rope`` is an optional rotary embedding called as
    ``rope(q, k, positions)`` on ``[batch, seq, heads, head_dim]`` tensors (e.g.
    ``llama_ext.RotaryEmbedding``). Attention is causal (bottom-right aligned, so cached
    decoding needs no mask) through :func:`llama_ext.gqa_attention`, with its ``window_size``
    (e.g. ``(sliding_window - 1, 0)`` for a window of ``sliding_window`` keys) and ``softcap``, and
    with a :class:`KVCache` or :class:`PagedKVCache` through :func:`llama_ext.gqa_attention_with_kvcache`.
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

    def forward(self, x: Tensor, positions: Tensor = None, cache=None) -> Tensor:
        """``x`` ``[batch, seq, hidden]`` -> ``[batch, seq, hidden]``.

        ``positions`` (``[seq]`` or ``[batch, seq]``) feed the rotary embedding and default to
        the cache's next positions (``cache.positions(seq)``; ``0 .. seq - 1`` without cache).
        With ``cache``, this step's k/v are appended and attention runs over all cached tokens.
        """
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.rope is not None:
            if positions is None:
                positions = torch.arange(seq, device=x.device) if cache is None else cache.positions(seq, x.device)
            q, k = self.rope(q, k, positions)
        if cache is not None:
            out = cache.attend(q, k, v, scale=self.scaling, window_size=self.window_size, softcap=self.softcap)
        else:
            out = ops.gqa_attention(
                q, k, v, causal=True, scale=self.scaling, window_size=self.window_size, softcap=self.softcap
            )
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        extra = f", window_size={self.window_size}" if self.window_size != (-1, -1) else ""
        extra += f", softcap={self.softcap}" if self.softcap else ""
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}{extra}"
