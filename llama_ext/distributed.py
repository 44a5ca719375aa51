"""llama_ext on torch.distributed: context-parallel (ring) attention and DTensor sharding rules.

Context parallelism splits one long sequence across the ranks of a process group::

    q_l = shard_for_context_parallel(q, dim=1, group=group)      # also k, v, position ids, labels
    out_l = context_parallel_attention(q_l, k_l, v_l, causal=True, group=group)
    out = gather_from_context_parallel(out_l, dim=1, group=group)  # only where the full tensor is needed

Load-balanced ("zigzag") layout. With W ranks the sequence is cut into 2W equal chunks
``0 .. 2W-1`` and rank ``r`` holds chunks ``r`` and ``2W-1-r``, in that order. Under a causal mask
the work of a query chunk grows with its index, so pairing an early chunk with a late one gives
every rank the same work. Ring attention: at step ``s = 0 .. W-1`` rank ``r`` holds the K/V of
rank ``src = (r - s) mod W`` (chunks ``src`` and ``2W-1-src``); meanwhile the block of step
``s + 1`` is already on its way (``isend``/``irecv`` to ``r + 1`` / from ``r - 1``). Query chunk
``i`` sees key chunk ``j`` fully when ``j < i``, causally when ``j == i`` and not at all when
``j > i``; every ``r, src`` then falls into one of three cases, each one kernel call of half the
local block's work (so no step computes a fully masked block):

* ``s == 0`` (``src == r``): chunks ``(r, 2W-1-r)`` against themselves. In local coordinates this
  is plain causal attention over the local ``2c`` tokens: query chunk ``r`` sees its own chunk
  causally and not chunk ``2W-1-r``; query chunk ``2W-1-r`` sees chunk ``r`` fully and its own
  causally. One causal call.
* ``src < r``: both local query chunks come after key chunk ``src`` and before key chunk
  ``2W-1-src`` (``2W-1-src > 2W-1-r >= W > r``). One non-causal call: all local queries
  against the first half of the block.
* ``src > r``: key chunks ``src`` and ``2W-1-src`` both come after query chunk ``r``
  (``2W-1-src >= W > r``) and before query chunk ``2W-1-r``. One non-causal call: the second
  half of the local queries against the whole block.

Non-causal attention uses the same layout and calls every block in full. Partial outputs merge
exactly through their log-sum-exp (in float32, float64 for float64 inputs); the backward
recomputes each block with the merged output and the global lse (so every block sees the global
softmax probabilities) and sends dK/dV accumulators (float32) around the ring after the K/V
they belong to: W - 1 K/V transfers forward, W - 1 K/V transfers and W dK/dV transfers backward.
Every step is a ``torch.ops.llama_ext.gqa_attention_forward``/``_backward`` call on the local
device: gloo on CPU, NCCL on CUDA (P2P on its own stream, so transfers overlap the kernels).

DTensor: importing llama_ext registers sharding rules (``register_sharding``) for every
``torch.ops.llama_ext`` op, so DTensor inputs run locally without any redistribution:

* ``rms_norm``, ``fused_add_rms_norm(_)``, ``rms_norm_backward``: sharded along any dim but the
  hidden (last) one (e.g. sequence parallel's ``Shard(1)``), weight replicated; the weight
  gradient comes out ``Partial()`` (a sum over the local rows);
* ``apply_rotary(_)``: batch, sequence (``positions`` sharded alike: ``[seq]`` as ``Shard(0)``,
  ``[batch, seq]`` as ``Shard(1)``; explicit positions required) or heads;
* ``gqa_attention_forward``/``_backward``: batch or heads (the kv heads must split evenly, so
  every rank keeps whole query groups); varlen: heads;
* ``gqa_attention_with_kvcache``: heads (q, caches, k/v; lse along its heads dim) or, with
  contiguous caches, batch (with ``cache_seqlens``); ``block_table`` and rotary tables replicated.

Anything else (``Partial`` inputs, the hidden dim, sequence-sharded attention) raises an error
naming the op, the placements and the supported shardings (DTensor's sharding propagation reports
it as a ``RuntimeError``) instead of gathering silently; for a sequence split across ranks use
:func:`context_parallel_attention`.
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .ops import _default_scale, _stats_dtype

_ops = torch.ops.llama_ext


# ---- process group helpers --------------------------------------------------------------------


def _world_and_rank(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs an initialized torch.distributed process group")
    return dist.get_world_size(group), dist.get_rank(group)


def _zigzag_chunks(x: Tensor, dim: int, world: int, name: str) -> List[Tensor]:
    dim = dim % x.dim() if x.dim() else 0
    if x.dim() == 0 or x.size(dim) % (2 * world):
        raise ValueError(
            f"{name} must have a dim {dim} divisible by 2 * world_size = {2 * world} for context parallelism, "
            f"got shape {tuple(x.shape)}"
        )
    return list(x.chunk(2 * world, dim))


def shard_for_context_parallel(x: Tensor, dim: int = 1, group=None) -> Tensor:
    """This rank's share of ``x`` along ``dim`` (the sequence): chunks ``r`` and ``2W-1-r`` of
    ``2W`` equal chunks, concatenated (see the module docstring). ``x.size(dim)`` must be a multiple
    of ``2W``. Apply it alike to q/k/v (or the model's input ids), position ids and labels."""
    world, rank = _world_and_rank(group)
    chunks = _zigzag_chunks(x, dim, world, "x")
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim)


class _GatherFromContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group) -> Tensor:
        world, rank = _world_and_rank(group)
        ctx.dim, ctx.group = dim, group
        shards = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shards, x.contiguous(), group=group)
        chunks: List[Optional[Tensor]] = [None] * (2 * world)
        for r, shard in enumerate(shards):
            chunks[r], chunks[2 * world - 1 - r] = shard.chunk(2, dim)
        return torch.cat(chunks, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The gathered tensor is replicated: every rank continues with the same values, so each
        # rank's gradient is its own slice of the incoming one (no communication).
        return shard_for_context_parallel(grad, ctx.dim, ctx.group), None, None


def gather_from_context_parallel(out_l: Tensor, dim: int = 1, group=None) -> Tensor:
    """Inverse of :func:`shard_for_context_parallel`: every rank gets the whole tensor in sequence
    order. Differentiable, with the gradient of a replicated result (each rank keeps its slice)."""
    dim = dim % out_l.dim()
    if out_l.size(dim) % 2:
        raise ValueError(f"out_l must have an even dim {dim} (two chunks), got shape {tuple(out_l.shape)}")
    return _GatherFromContextParallel.apply(out_l, dim, group)


# ---- ring attention -----------------------------------------------------------------------------


class _Ring:
    """Neighbour exchange on a process group: send to rank + 1, receive from rank - 1."""

    def __init__(self, group):
        self.group = group
        self.world, self.rank = _world_and_rank(group)
        self.next = self._global((self.rank + 1) % self.world)
        self.prev = self._global((self.rank - 1) % self.world)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def exchange(self, send: Tensor):
        """Starts sending ``send`` on and receiving its predecessor's counterpart; returns the
        receive buffer and the work handles (``send`` must stay unmodified until they finish)."""
        recv = torch.empty_like(send)
        works = dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, send, self.next, self.group), dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        )
        return recv, works


def _wait(works) -> None:
    for work in works:
        work.wait()


def _ring_step_slices(step: int, rank: int, src: int, local: int, causal: bool):
    """For ring step ``step`` (K/V of rank ``src``): the local query rows, the block's key rows
    and whether the call is causal (see the module docstring)."""
    everything = slice(0, local)
    if not causal:
        return everything, everything, False
    half = local // 2
    if step == 0:
        return everything, everything, True
    if src < rank:
        return everything, slice(0, half), False
    return slice(half, local), everything, False


def _check_cp_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    for t, name in ((q, "q_l"), (k, "k_l"), (v, "v_l")):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k_l and v_l must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            "context-parallel attention is self-attention over one sharded sequence: q_l and k_l must share "
            f"batch and local sequence length, got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if causal and q.shape[1] % 2:
        raise ValueError(
            "causal context-parallel attention needs the two-chunk layout of shard_for_context_parallel "
            f"(an even local sequence length), got q_l of shape {tuple(q.shape)}"
        )


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, group) -> Tensor:
        ring = _Ring(group)
        local = q.shape[1]
        acc_dtype = _stats_dtype(q.dtype)
        out_acc = lse_acc = None
        kv = torch.stack([k, v])
        for step in range(ring.world):
            if step + 1 < ring.world:
                next_kv, works = ring.exchange(kv)
            src = (ring.rank - step) % ring.world
            rows, keys, step_causal = _ring_step_slices(step, ring.rank, src, local, causal)
            out, lse = _ops.gqa_attention_forward(
                q[:, rows], kv[0][:, keys], kv[1][:, keys], None, None, 0, 0, step_causal, scale, -1, -1, 0.0
            )
            if out_acc is None:  # step 0 covers every query row
                out_acc, lse_acc = out.to(acc_dtype), lse
            else:
                _merge_partial(out_acc[:, rows], lse_acc[:, :, rows], out, lse)
            if step + 1 < ring.world:
                _wait(works)
                kv = next_kv
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.causal, ctx.scale, ctx.group = causal, scale, group
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        local = q.shape[1]
        acc_dtype = _stats_dtype(q.dtype)
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)  # the held block's dK/dV so far
        dkv_works = None
        for step in range(ring.world):
            if step + 1 < ring.world:
                next_kv, kv_works = ring.exchange(kv)
            src = (ring.rank - step) % ring.world
            rows, keys, step_causal = _ring_step_slices(step, ring.rank, src, local, causal=ctx.causal)
            dq_part, dk_part, dv_part = _ops.gqa_attention_backward(
                grad_out[:, rows], q[:, rows], kv[0][:, keys], kv[1][:, keys], out[:, rows],
                lse[:, :, rows].contiguous(), None, None, 0, 0, step_causal, ctx.scale, -1, -1, 0.0,
            )
            dq[:, rows] += dq_part
            if dkv_works is not None:  # this block's accumulator, from the ranks that held it before
                _wait(dkv_works)
                dkv = next_dkv
            dkv[0][:, keys] += dk_part
            dkv[1][:, keys] += dv_part
            next_dkv, dkv_works = ring.exchange(dkv) if ring.world > 1 else (dkv, [])
            if step + 1 < ring.world:
                _wait(kv_works)
                kv = next_kv
        _wait(dkv_works)  # after W hops every block's accumulator is back with its owner
        return dq.to(q.dtype), next_dkv[0].to(k.dtype), next_dkv[1].to(v.dtype), None, None, None


def _merge_partial(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """In place: ``(out_acc, lse_acc) <- softmax-weighted union of two disjoint key sets``.
    out [batch, rows, heads, d], lse [batch, heads, rows]."""
    lse_new = torch.logaddexp(lse_acc, lse)
    w_acc = torch.exp(lse_acc - lse_new).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(lse - lse_new).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(out.to(out_acc.dtype) * w_new)
    lse_acc.copy_(lse_new)


def context_parallel_attention(
    q_l: Tensor, k_l: Tensor, v_l: Tensor, causal: bool = True, scale: Optional[float] = None, group=None
) -> Tensor:
    """Ring attention over a sequence sharded by :func:`shard_for_context_parallel` on ``group``.

    ``q_l`` is ``[batch, local_seq, n_q_heads, head_dim]`` and ``k_l``/``v_l``
    ``[batch, local_seq, n_kv_heads, head_dim]`` (GQA as in :func:`llama_ext.gqa_attention`), this
    rank's share of the global sequence; every rank passes the same shapes. Returns this rank's
    share of ``gqa_attention(q, k, v, causal, scale)`` over the whole sequence, computed exactly
    (blockwise with log-sum-exp merging) and differentiable in q, k and v. ``causal`` masks
    top-left over the global sequence (self-attention: ``seq_q == seq_k``).
    """
    _check_cp_inputs(q_l, k_l, v_l, causal)
    return _RingAttention.apply(q_l, k_l, v_l, causal, _default_scale(q_l, scale), group)


def ring_communication_bytes(q_l: Tensor, k_l: Tensor, world_size: int) -> Dict[str, int]:
    """Bytes each rank sends per :func:`context_parallel_attention` call, forward and backward:
    K/V blocks (input dtype) and dK/dV accumulators (float32; float64 for float64)."""
    kv_bytes = 2 * k_l.numel() * k_l.element_size()
    dkv_bytes = 2 * k_l.numel() * torch.finfo(_stats_dtype(k_l.dtype)).bits // 8
    hops = world_size - 1
    return {"forward": hops * kv_bytes, "backward": hops * kv_bytes + world_size * dkv_bytes if hops else 0}


# ---- HF transformers: the attention of patch_model(model, context_parallel_group=...) -------------


def hf_context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention_mask: Optional[Tensor],
    position_ids: Optional[Tensor],
    sliding_window: Optional[int],
    causal: bool,
    scale: Optional[float],
    group,
) -> Tensor:
    """The attention of a model patched with ``context_parallel_group``: q/k/v
    ``[batch, local_seq, heads, d]`` of a sequence sharded by :func:`shard_for_context_parallel`.

    The model must get the sharded ``position_ids`` (they carry the layout; a jump between the
    two chunks makes transformers see "packed sequences", which is why an int64 mask is accepted
    once the positions are checked). Padding masks, KV caches (decoding) and an active sliding
    window raise ``ValueError``.
    """
    world, rank = _world_and_rank(group)
    local = q.shape[1]
    if k.shape[1] != local:
        raise ValueError(
            "context-parallel attention runs full sharded sequences (training, scoring); a KV cache or decoding "
            f"step ({local} queries, {k.shape[1]} keys) is not supported: pass use_cache=False"
        )
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        raise ValueError("context-parallel attention does not take a padding attention_mask; pass none")
    if sliding_window is not None and local * world > sliding_window:
        raise ValueError(
            f"sliding-window attention (sliding_window={sliding_window}) over {local * world} tokens is not supported "
            "by context-parallel attention"
        )
    expected = shard_for_context_parallel(torch.arange(local * world, device=q.device), 0, group)
    if position_ids is None or not bool((position_ids == expected).all()):
        raise ValueError(
            "a context-parallel model needs position_ids = shard_for_context_parallel(arange(seq)) (one sequence "
            "per row, sharded like the input ids); packed sequences are not supported"
        )
    return context_parallel_attention(q, k, v, causal=causal, scale=scale, group=group)


# ---- DTensor sharding rules ------------------------------------------------------------------------

# One way to run an op locally: a name for messages, the sharded dim of each tensor argument (by
# schema name; absent: replicated) and the placements of the outputs.
_Layout = Tuple[str, Dict[str, int], list]


def _register_sharding_rules() -> None:
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec
    from torch.distributed.tensor.experimental import register_sharding

    def register(op_name: str, layouts_of: Callable[[dict], List[_Layout]]) -> None:
        op = getattr(_ops, op_name).default
        names = [a.name for a in op._schema.arguments]
        n_out = len(op._schema.returns)

        def rule(*args, **kwargs):
            # Arguments in the order DTensor expects their placements: positional, then keywords.
            # Non-tensor arguments (scalars, and any added to the schema later) get None.
            ordered = list(zip(names, args)) + list(kwargs.items())
            specs = dict(ordered)
            tensors = {n: s for n, s in ordered if isinstance(s, DTensorSpec)}
            layouts = layouts_of(specs)
            _check_local(op_name, tensors, layouts)

            def inputs(dims):
                return [
                    (Shard(dims[n]) if n in dims else Replicate()) if isinstance(s, DTensorSpec) else None
                    for n, s in ordered
                ]

            strategies = [([Replicate()] * n_out, inputs({}))]
            strategies += [(outs, inputs(dims)) for _, dims, outs in layouts]
            return strategies

        register_sharding(op)(rule)

    def _check_local(op_name: str, tensors: dict, layouts: List[_Layout]) -> None:
        mesh_ndim = next(iter(tensors.values())).mesh.ndim
        for m in range(mesh_ndim):
            placements = {n: s.placements[m] for n, s in tensors.items()}
            sharded = {}
            for n, p in placements.items():
                if type(p) is Shard:
                    sharded[n] = p.dim % tensors[n].ndim
                elif not p.is_replicate():
                    sharded[n] = None  # Partial and anything else never run locally
            if not sharded or any(all(dims.get(n) == d for n, d in sharded.items()) for _, dims, _ in layouts):
                continue
            supported = "; ".join(name for name, _, _ in layouts) or "replicated inputs only"
            raise ValueError(
                f"llama_ext.{op_name} cannot run locally on placements "
                f"{ {n: str(p) for n, p in placements.items()} } (mesh dim {m}); supported: {supported}. "
                "Redistribute explicitly (a sequence split across ranks goes through "
                "llama_ext.distributed.context_parallel_attention)"
            )

    # RMSNorm: rows are independent; the weight gradient sums over rows.
    def norm_layouts(specs, outputs):
        x = specs.get("input", specs.get("grad_out"))
        return [
            (f"rows sharded along dim {d} (not the hidden dim)",
             {n: d for n, s in specs.items() if isinstance(s, DTensorSpec) and n != "weight"},
             outputs(d))
            for d in range(x.ndim - 1)
        ]

    register("rms_norm", lambda s: norm_layouts(s, lambda d: [Shard(d), Shard(d)]))
    register("fused_add_rms_norm", lambda s: norm_layouts(s, lambda d: [Shard(d)] * 3))
    register("fused_add_rms_norm_", lambda s: norm_layouts(s, lambda d: []))
    register("rms_norm_backward", lambda s: norm_layouts(s, lambda d: [Shard(d), Partial()]))

    # Rotary: q/k [batch, seq, heads, d]; positions [seq] or [batch, seq]; cos/sin replicated.
    def rotary_layouts(specs, outputs):
        positions = specs.get("positions")
        pos_dims = positions.ndim if isinstance(positions, DTensorSpec) else 0
        layouts = [
            ("batch (dim 0)", {"q": 0, "k": 0, **({"positions": 0} if pos_dims == 2 else {})}, outputs(0)),
            ("heads (dim 2)", {"q": 2, "k": 2}, outputs(2)),
        ]
        if pos_dims:
            layouts.append(
                ("sequence (dim 1, with positions sharded alike)",
                 {"q": 1, "k": 1, "positions": pos_dims - 1}, outputs(1))
            )
        return layouts

    register("apply_rotary", lambda s: rotary_layouts(s, lambda d: [Shard(d), Shard(d)]))
    register("apply_rotary_", lambda s: rotary_layouts(s, lambda d: []))

    def check_whole_groups(what: str, q, head_dim: int, n_kv_heads: int) -> None:
        """Heads sharded W ways must split the kv heads evenly: every rank keeps whole query groups."""
        head_shards = 1
        for m, p in enumerate(q.placements):
            if type(p) is Shard and p.dim % q.ndim == head_dim:
                head_shards *= q.mesh.size(m)
        if n_kv_heads % head_shards:
            raise ValueError(
                f"llama_ext {what} on heads sharded {head_shards} ways needs n_kv_heads ({n_kv_heads}) "
                "divisible by that, so that every rank keeps whole query groups"
            )

    # Attention: batch or heads. Batched q/k/v/out [batch, seq, heads, d], lse [batch, heads, seq];
    # varlen q/k/v/out [total, heads, d], lse [heads, total] (heads only).
    def attention_layouts(specs, n_out):
        q, k = specs["q"], specs["k"]
        varlen = isinstance(specs.get("cu_seqlens_q"), DTensorSpec)
        head_dim = 1 if varlen else 2
        lse_head_dim = 0 if varlen else 1
        check_whole_groups("attention", q, head_dim, k.shape[head_dim])
        tensors = [n for n, s in specs.items() if isinstance(s, DTensorSpec) and not n.startswith("cu_seqlens")]
        outputs = [Shard(head_dim)] * 3 if n_out == 3 else [Shard(head_dim), Shard(lse_head_dim)]
        heads = {n: (lse_head_dim if n == "lse" else head_dim) for n in tensors}
        layouts = [(f"heads (dim {head_dim})", heads, outputs)]
        if not varlen:
            layouts.append(("batch (dim 0)", {n: 0 for n in tensors}, [Shard(0)] * n_out))
        return layouts

    register("gqa_attention_forward", lambda s: attention_layouts(s, 2))
    register("gqa_attention_backward", lambda s: attention_layouts(s, 3))

    # Attention against a KV cache: q/k/v/out [batch, seq, heads, d], caches [batch or blocks,
    # capacity, kv_heads, d], lse [batch, heads, seq]; cache_seqlens [batch] and block_table
    # [batch, max_blocks] go with the batch; rotary tables are replicated. Heads: every rank
    # holds its kv heads of every cache slot. Batch: contiguous caches only (a paged pool is
    # shared by the sequences, so each rank would write its own slots into a "replicated" pool).
    def kvcache_layouts(specs):
        q, k_cache = specs["q"], specs["k_cache"]
        check_whole_groups("gqa_attention_with_kvcache", q, 2, k_cache.shape[2])
        present = {n for n, s in specs.items() if isinstance(s, DTensorSpec)}
        per_head = {n: 2 for n in ("q", "k_cache", "v_cache", "k", "v") if n in present}
        layouts = [("heads (dim 2; lse dim 1)", per_head, [Shard(2), Shard(1)])]
        if "block_table" not in present:
            per_seq = {n: 0 for n in ("q", "k_cache", "v_cache", "cache_seqlens", "k", "v") if n in present}
            layouts.append(("batch (dim 0, contiguous caches)", per_seq, [Shard(0), Shard(0)]))
        return layouts

    register("gqa_attention_with_kvcache", kvcache_layouts)


if dist.is_available():
    _register_sharding_rules()


__all__ = [
    "context_parallel_attention",
    "gather_from_context_parallel",
    "hf_context_parallel_attention",
    "ring_communication_bytes",
    "shard_for_context_parallel",
]
