"""Run HF transformers Llama-family models on llama_ext's kernels: ``patch_model(model)``.

Importing this module imports ``transformers`` (an optional dependency: ``pip install
.[transformers]``) and registers the ``"llama_ext"`` attention implementation, so
``AutoModelForCausalLM.from_config(cfg, attn_implementation="llama_ext")`` also works (attention
only; ``patch_model`` moves RMSNorm and the rotary embedding too). ``import llama_ext`` alone
never imports transformers.

What ``patch_model`` changes, and through which hook (each chosen as the narrowest one
transformers 5.x offers that keeps the change to the one model being patched):

* every family RMSNorm (including Qwen3's per-head ``q_norm``/``k_norm`` over head_dim) is
  replaced by :class:`llama_ext.RMSNorm` holding the *same* ``weight`` Parameter;
* attention goes through transformers' attention-function registry:
  ``AttentionInterface.register("llama_ext", ...)`` for the kernel, and
  ``AttentionMaskInterface.register("llama_ext", ...)`` so the model hands it the 2D padding mask
  (or None) rather than a dense 4D mask; the model's ``config._attn_implementation`` is set to it;
* the rotary embedding: transformers exposes ``apply_rotary_pos_emb`` only as a module-level
  function of ``modeling_<family>``, shared by every model of that family in the process
  (including unpatched ones, e.g. a reference model). So each attention module gets its own
  ``forward`` instead: the same projections, cache update and registry call as HF's, with the
  rotation done by :func:`llama_ext.apply_rotary` directly in the projection's
  ``[batch, seq, heads, head_dim]`` layout.

Exactness: anything the kernels cannot reproduce exactly raises ``ValueError`` naming the
setting (active sliding window, attention dropout in training, ``output_attentions``, softcap,
4D, bidirectional or custom masks, padded batches on a static cache); nothing silently falls
back to HF code. HF's static cache (``cache_implementation="static"``) runs on
:func:`llama_ext.gqa_attention_with_kvcache`, which appends to the cache's buffers in place and
reads the lengths on the device, so a ``torch.compile(fullgraph=True)`` decode step has no host
sync.

Padded batches are unpadded to :func:`llama_ext.gqa_attention_varlen`, as are packed sequences
(several per row, restarting position_ids, no attention_mask: transformers detects them). Query rows at padding
positions are not attended by anything; their outputs are zeros (HF computes a meaningless
average there), so compare models on non-padding positions only.
"""
import sys
import types
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import llama_ext
import transformers
from llama_ext.distributed import hf_context_parallel_attention

# The attention forward below mirrors transformers 5.x's (the `cache` argument, `Cache.update`'s
# signature, the mask registry); 4.x differs in all three.
MIN_TRANSFORMERS_VERSION = "5.0"
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"llama_ext.transformers needs transformers >= {MIN_TRANSFORMERS_VERSION}, found {transformers.__version__}"
    )

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

ATTN_IMPLEMENTATION = "llama_ext"

# model_type -> (family name, RMSNorm class name, attention class name)
SUPPORTED_FAMILIES = {
    "llama": ("Llama", "LlamaRMSNorm", "LlamaAttention"),
    "mistral": ("Mistral", "MistralRMSNorm", "MistralAttention"),
    "qwen2": ("Qwen2", "Qwen2RMSNorm", "Qwen2Attention"),
    "qwen3": ("Qwen3", "Qwen3RMSNorm", "Qwen3Attention"),
}

# The llama_ext ops this module calls; they are checked once, when a model is patched.
_REQUIRED_OPS = ("RMSNorm", "apply_rotary", "gqa_attention", "gqa_attention_varlen")


def _supported_families_text() -> str:
    return ", ".join(f"{name} (model_type '{key}')" for key, (name, _, _) in SUPPORTED_FAMILIES.items())


# ---- attention function (the "llama_ext" entry of the registry) ----------------------------


def _reject_unsupported_attention(module, key: Tensor, dropout: float, sliding_window, softcap, kwargs) -> None:
    if dropout > 0:
        raise ValueError(
            f"llama_ext attention has no dropout, but attention_dropout={dropout} is active (the model is in "
            "training mode); set config.attention_dropout = 0.0"
        )
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise ValueError("output_attentions=True is not supported: llama_ext attention never forms the attention matrix")
    if softcap is not None:
        raise ValueError(f"attention logit softcapping (softcap={softcap}) is not supported by llama_ext attention")
    # A sliding window of W only removes keys once a query sees more than W of them; below that
    # it is plain causal attention. (A sliding-window cache keeps W - 1 past keys, so decoding
    # one token at a time past the window stays exact.)
    if sliding_window is not None and key.shape[2] > sliding_window:
        raise ValueError(
            f"sliding-window attention is active (sliding_window={sliding_window}, {key.shape[2]} keys) and is "
            "not supported by llama_ext attention; keep sequences within the window"
        )


def _varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, causal: bool, scale: Optional[float]
) -> Tensor:
    """Attention over the valid (mask True) tokens of each sequence, through the varlen kernel.

    q [batch, seq_q, n_q_heads, d]; k/v [batch, seq_k, n_kv_heads, d]; key_valid bool
    [batch, seq_k]. The queries are the last seq_q key positions, so each sequence's valid
    queries are the last of its valid keys: bottom-right causal alignment is the right one for
    any mask, left padding included. Rows of padding queries are zeros.
    """
    batch, seq_q, n_q_heads, head_dim = q.shape
    seq_k = k.shape[1]
    query_valid = key_valid[:, seq_k - seq_q:]
    q_index = query_valid.reshape(-1).nonzero().squeeze(1)
    k_index = key_valid.reshape(-1).nonzero().squeeze(1)
    q_lens = query_valid.sum(1, dtype=torch.int32)
    k_lens = key_valid.sum(1, dtype=torch.int32)
    cu_seqlens_q = F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_seqlens_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
    out_tokens = llama_ext.gqa_attention_varlen(
        q.reshape(batch * seq_q, n_q_heads, head_dim).index_select(0, q_index),
        k.reshape(batch * seq_k, -1, head_dim).index_select(0, k_index),
        v.reshape(batch * seq_k, -1, head_dim).index_select(0, k_index),
        cu_seqlens_q,
        cu_seqlens_k,
        int(q_lens.max()),
        int(k_lens.max()),
        causal=causal,
        scale=scale,
    )
    out = out_tokens.new_zeros(batch * seq_q, n_q_heads, head_dim).index_copy(0, q_index, out_tokens)
    return out.view(batch, seq_q, n_q_heads, head_dim)


def _packed_attention(
    q: Tensor, k: Tensor, v: Tensor, sequence_ids: Tensor, causal: bool, scale: Optional[float]
) -> Tensor:
    """Attention within each packed sequence: q/k/v [batch, seq, heads, d] hold several sequences
    per row, ``sequence_ids`` [batch, seq] numbers them; every row of q/k/v is a token of one."""
    batch, seq, n_q_heads, head_dim = q.shape
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    start_rows = starts.reshape(-1).nonzero().squeeze(1)
    cu_seqlens = F.pad(start_rows, (0, 1), value=batch * seq).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max())
    out = llama_ext.gqa_attention_varlen(
        q.reshape(batch * seq, n_q_heads, head_dim),
        k.reshape(batch * seq, -1, head_dim),
        v.reshape(batch * seq, -1, head_dim),
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        causal=causal,
        scale=scale,
    )
    return out.view(batch, seq, n_q_heads, head_dim)


def llama_ext_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """transformers attention-interface signature: query [batch, n_q_heads, seq_q, d], key/value
    [batch, n_kv_heads, seq_k, d] (HF layout), attention_mask what :func:`llama_ext_padding_mask`
    made (None, bool padding mask or packed-sequence ids). Returns ([batch, seq_q, n_q_heads, d], None)."""
    _reject_unsupported_attention(module, key, dropout, sliding_window, softcap, kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # The kernels take [batch, seq, heads, d] with any strides but a contiguous last dim: HF's
    # [batch, heads, seq, d] tensors pass as transposed views, with no copy.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    group = getattr(module, "context_parallel_group", None)
    if group is not None:
        out = hf_context_parallel_attention(
            q, k, v, attention_mask, kwargs.get("position_ids"), sliding_window, causal, scaling, group
        )
        return out, None
    if attention_mask is None:
        return llama_ext.gqa_attention(q, k, v, causal=causal, scale=scaling), None
    if attention_mask.dim() != 2 or attention_mask.shape != (key.shape[0], key.shape[2]):
        raise ValueError(
            "llama_ext attention takes a 2D [batch, kv_length] padding mask; got attention_mask of shape "
            f"{tuple(attention_mask.shape)} for {key.shape[2]} keys (custom 4D masks and static KV caches are "
            "not supported)"
        )
    if attention_mask.dtype == torch.bool:
        return _varlen_attention(q, k, v, attention_mask, causal, scaling), None
    return _packed_attention(q, k, v, attention_mask, causal, scaling), None


# ---- mask function (the "llama_ext" entry of the mask registry) -----------------------------


def _closure_values(fn) -> list:
    return [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ())]


def _mask_parts(mask_function) -> list:
    """The elementary mask functions that transformers' ``and_masks(...)`` and
    ``remap_positions_for_packed_sequence(...)`` wrappers are made of."""
    if not getattr(mask_function, "__qualname__", "").startswith(("and_masks.", "remap_positions_for_packed_sequence.")):
        return [mask_function]
    parts = []
    for value in _closure_values(mask_function):
        for fn in value if isinstance(value, tuple) else (value,):
            if callable(fn):
                parts += _mask_parts(fn)
    return parts


def _is_part(fn, maker: str) -> bool:
    return getattr(fn, "__qualname__", "").startswith(maker + ".")


def llama_ext_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Optional[Tensor] = None,
    **kwargs,
) -> Optional[Tensor]:
    """transformers mask-interface signature. The kernels mask causally themselves, so the model
    only hands over what is not plain causal attention:

    * None: nothing (no padding, one sequence per row);
    * a bool [batch, kv_length] tensor: which keys are real tokens (padding is False);
    * an int64 [batch, seq] tensor: packed sequences (several per row, found by transformers
      from position_ids that restart), the id of the sequence each token belongs to.

    A sliding window is checked against the key count in the attention function; any other
    mask pattern (bidirectional, custom mask functions) raises.
    """
    # Plain causal (the compiled static-cache decode step's case) skips the closure walk, which
    # dynamo cannot trace.
    plain = mask_function is causal_mask_function
    parts = [mask_function] if plain else _mask_parts(mask_function)
    packed = [] if plain else [part for part in parts if _is_part(part, "packed_sequence_mask_function")]
    unsupported = [
        part
        for part in parts
        if part is not causal_mask_function and not _is_part(part, "sliding_window_overlay") and part not in packed
    ]
    if unsupported:
        raise ValueError(
            "llama_ext attention supports causal masks with padding or packed sequences only; this model built a "
            f"mask from {', '.join(getattr(p, '__qualname__', repr(p)) for p in unsupported)} (bidirectional "
            "attention or a custom mask function)"
        )
    if packed:  # transformers only looks for packing when there is neither a padding mask nor a cache
        (sequence_ids,) = [value for value in _closure_values(packed[0]) if isinstance(value, Tensor)]
        return sequence_ids
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


AttentionInterface.register(ATTN_IMPLEMENTATION, llama_ext_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, llama_ext_padding_mask)


# ---- attention module forward with llama_ext rotary -----------------------------------------


def _apply_rotary_from_hf(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
    """Rotate q [batch, seq, n_q_heads, d] and k [batch, seq, n_kv_heads, d] by HF's per-token
    cos/sin ([batch or 1, seq, d], both halves equal).

    Each token's first half of cos/sin becomes one row of a [rows, d/2] table, looked up at
    position = row index: the rotation uses exactly HF's angles, whatever the rope type
    (llama3, linear, dynamic, ... and their attention scaling are all folded into cos/sin).
    """
    half = q.shape[-1] // 2
    table_batch, seq = cos.shape[0], cos.shape[1]
    if table_batch not in (1, q.shape[0]):
        raise ValueError(f"rotary cos/sin have batch {table_batch}, expected 1 or {q.shape[0]}")
    cos_table = cos[..., :half].reshape(table_batch * seq, half).to(torch.float32).contiguous()
    sin_table = sin[..., :half].reshape(table_batch * seq, half).to(torch.float32).contiguous()
    positions = torch.arange(table_batch * seq, device=q.device).view(table_batch, seq)
    return llama_ext.apply_rotary(q, k, cos_table, sin_table, positions[0] if table_batch == 1 else positions)


def _patched_attention_forward(
    self,
    hidden_states: Tensor,
    position_embeddings: Optional[Tuple[Tensor, Tensor]] = None,
    attention_mask: Optional[Tensor] = None,
    cache=None,
    past_key_values=None,
    **kwargs,
):
    """HF's Llama/Mistral/Qwen2/Qwen3 attention forward, with the rotary on llama_ext."""
    cache = cache if cache is not None else past_key_values  # the name changed in transformers 5.x
    static_layer = _static_cache_layer(cache, self.layer_idx) if cache is not None else None
    if position_embeddings is None:
        raise ValueError("patch_model's attention needs the model's position_embeddings (cos, sin)")
    heads_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states).view(heads_shape)
    k = self.k_proj(hidden_states).view(heads_shape)
    v = self.v_proj(hidden_states).view(heads_shape)
    if hasattr(self, "q_norm"):  # Qwen3: RMSNorm over head_dim of every head
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = _apply_rotary_from_hf(q, k, *position_embeddings)
    if static_layer is not None:
        out = _static_cache_attention(self, static_layer, q, k, v, attention_mask, kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), None
    # From here on HF's layout [batch, heads, seq, d], which the cache and the registry expect.
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)

    # patch_model selects "llama_ext"; a later set_attn_implementation still takes effect.
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    # Mistral reads the window from the config, Qwen2/Qwen3 per layer; Llama has none.
    sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    attn_output, attn_weights = attention_interface(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        sliding_window=sliding_window,
        **kwargs,
    )
    attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self.o_proj(attn_output), attn_weights


# ---- static KV cache (cache_implementation="static") on gqa_attention_with_kvcache --------------


def _static_cache_layer(cache, layer_idx: int):
    """The layer of a static (compileable) cache that this attention serves, or None for
    dynamic caches. Static layers other than transformers' plain StaticLayer (sliding-window
    rings, quantized or offloaded layers) raise."""
    if not getattr(cache, "is_compileable", False):
        return None
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    if type(layer).__name__ != "StaticLayer":
        raise ValueError(
            f"{type(cache).__name__} with {type(layer).__name__} layers is not supported by patch_model; use "
            'cache_implementation="static" (StaticLayer) or the default DynamicCache'
        )
    return layer


def _static_cache_attention(module, layer, q: Tensor, k: Tensor, v: Tensor, attention_mask, kwargs) -> Tensor:
    """Appends this step's k/v [batch, seq, n_kv_heads, d] to the static layer's buffers and attends
    over them in one llama_ext.gqa_attention_with_kvcache call. The buffers ([batch, heads,
    max_cache_len, d]) pass as transposed views; the layer's device-side length counter feeds
    cache_seqlens, so a compiled decode step needs no host sync."""
    _reject_unsupported_attention(module, k.transpose(1, 2), module.attention_dropout if module.training else 0.0,
                                  None, None, kwargs)
    # The lengths live on the device: a window is exact only if no sequence can outgrow it.
    sliding_window = getattr(module, "sliding_window", getattr(module.config, "sliding_window", None))
    if sliding_window is not None and sliding_window < layer.max_cache_len:
        raise ValueError(
            f"sliding_window={sliding_window} is shorter than the static cache ({layer.max_cache_len} tokens): "
            "sliding-window attention is not supported by patch_model's static-cache path"
        )
    if attention_mask is not None:
        # A 2D padding mask reaches here only when not all of its tokens are real (the mask
        # function drops all-True masks while it can check them): padded batches need varlen.
        raise ValueError(
            "patch_model's static-cache path needs unpadded batches (attention_mask None or all ones); use the "
            "default DynamicCache for padded batches"
        )
    if not layer.is_initialized:
        layer.lazy_initialization(k.transpose(1, 2), v.transpose(1, 2))
    batch, seq = q.shape[:2]
    cache_seqlens = layer.cumulative_length.to(torch.int32).expand(batch)
    out = llama_ext.gqa_attention_with_kvcache(
        q, layer.keys.transpose(1, 2), layer.values.transpose(1, 2), cache_seqlens, k, v, scale=module.scaling
    )
    layer.cumulative_length.add_(seq)
    return out


# ---- patch_model ------------------------------------------------------------------------------


def _check_ops_available() -> None:
    missing = [name for name in _REQUIRED_OPS if not hasattr(llama_ext, name)]
    if missing:
        raise RuntimeError(f"this build of llama_ext lacks {', '.join(missing)}, which patch_model needs")


def _replace_rms_norms(model: nn.Module, norm_class_name: str) -> int:
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ != norm_class_name:
                continue
            norm = llama_ext.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon, device="meta")
            norm.weight = child.weight  # the same Parameter: optimizers and tied state keep working
            norm.train(child.training)
            setattr(parent, name, norm)
            replaced += 1
    return replaced


def patch_model(model: nn.Module, context_parallel_group=None) -> nn.Module:
    """Run a Llama, Mistral, Qwen2 or Qwen3 transformers model on llama_ext, in place.

    RMSNorms become :class:`llama_ext.RMSNorm` (same weights), the rotary embedding runs on
    :func:`llama_ext.apply_rotary` and attention on :func:`llama_ext.gqa_attention` /
    :func:`llama_ext.gqa_attention_varlen` (padded batches), registered as the ``"llama_ext"``
    attention implementation. Training, ``generate()`` with the default DynamicCache (and
    left-padded batches) or ``cache_implementation="static"`` are supported; settings the kernels cannot serve exactly raise
    ``ValueError`` when they occur (see the module docstring). Returns ``model``.

    ``context_parallel_group`` (a torch.distributed process group, or ``dist.group.WORLD``) makes
    attention ring attention over that group (:mod:`llama_ext.distributed`): the model then takes
    this rank's share of every sequence, ``input_ids``, ``position_ids`` (required) and labels
    each passed through :func:`llama_ext.distributed.shard_for_context_parallel`, for training
    and scoring (no KV cache, padding mask or packing).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"patch_model supports {_supported_families_text()}; got {type(model).__name__} "
            f"with model_type {model_type!r}"
        )
    _check_ops_available()
    if getattr(config, "output_attentions", False):
        raise ValueError(
            "config.output_attentions=True is not supported: llama_ext attention never forms the attention matrix"
        )
    cache_implementation = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if cache_implementation not in (None, "dynamic", "static"):
        raise ValueError(
            f"generation_config.cache_implementation={cache_implementation!r} is not supported by patch_model; "
            'use the default dynamic cache or "static"'
        )

    _, norm_class_name, attention_class_name = SUPPORTED_FAMILIES[model_type]
    attention_modules = [m for m in model.modules() if type(m).__name__ == attention_class_name]
    if not attention_modules:
        raise ValueError(f"found no {attention_class_name} module in {type(model).__name__}; nothing to patch")
    _replace_rms_norms(model, norm_class_name)
    for attention in attention_modules:
        attention.forward = types.MethodType(_patched_attention_forward, attention)
        attention.context_parallel_group = context_parallel_group
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        config._attn_implementation = ATTN_IMPLEMENTATION
    return model


__all__ = [
    "ATTN_IMPLEMENTATION",
    "SUPPORTED_FAMILIES",
    "llama_ext_attention_forward",
    "llama_ext_padding_mask",
    "patch_model",
]
