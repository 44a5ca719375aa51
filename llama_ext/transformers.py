"""Run HF transformers RMSNorm + RoPE + GQA decoders on llama_ext's kernels: ``patch_model(model)``
(RoPE decoders with LayerNorms too: their attention and rotary).

Importing this module imports ``transformers`` (an optional dependency: ``pip install
.[transformers]``) and registers the ``"llama_ext"`` attention implementation, so
``AutoModelForCausalLM.from_config(cfg, attn_implementation="llama_ext")`` also works (attention
only; ``patch_model`` moves RMSNorm and the rotary embedding too). ``import llama_ext`` alone
never imports transformers.

One mechanism serves every family; nothing here is written per model. What ``patch_model``
changes, and through which hook (each chosen as the narrowest one transformers 5.x offers that
keeps the change to the one model being patched):

* RMSNorms are found by behaviour: every module named ``*RMSNorm`` is probed on a CPU copy with
  random weights, which fixes its variant (weight or ``1 + weight``, as Gemma stores it; the
  normalized value rounded to the input dtype before the weight, as Llama does, or one rounding
  of the fp32 product, as Gemma and OLMo 2 do) and checks its eps. It is replaced by
  :class:`llama_ext.RMSNorm` of that variant holding the *same* ``weight`` Parameter, wherever it
  sits (before or after attention and MLP, per-head QK norms over head_dim or full-width ones);
* attention modules are those whose forward calls transformers' attention-function registry.
  They keep running their own class's forward (fused or separate projections, QK norms, layers
  without rope, the scale, window and softcap each family passes: all exactly as HF wrote them),
  with two hooks: ``AttentionInterface.register("llama_ext", ...)`` for the kernel (and
  ``AttentionMaskInterface.register("llama_ext", ...)`` so the model hands it the 2D padding mask
  or None rather than a dense 4D mask; ``config._attn_implementation`` is set to it), and the
  rotary embedding: transformers calls ``apply_rotary_pos_emb`` as a module-level function of
  ``modeling_<family>``, shared by every model of that family in the process (including unpatched
  ones, e.g. a reference model), so each patched module runs a copy of its forward in which that
  one global name is bound to :func:`llama_ext.apply_rotary` in the pairing the family's own
  function computes (Llama's ``rotate_half`` halves, GLM's and ERNIE's interleaved pairs, or
  Cohere's interleaved pairs on tables that repeat each angle in adjacent columns), found by
  comparing them on probe inputs. The rotation uses HF's cos/sin, so every rope type (llama3,
  longrope, per-layer-type bases, partial rotary, the Qwen-VL families' multimodal tables) is
  computed from exactly HF's angles;
* in a vision-language model only the text decoder (``get_decoder()``) is changed, and only its
  sub-config's attention implementation is set: the vision tower and projector, whose attention
  is not causal, stay HF's.

Exactness: what the kernels cannot reproduce exactly raises ``ValueError`` naming it (attention
dropout in training, ``output_attentions``, attention sinks, 4D, bidirectional or custom masks, a sliding window
over a padding mask with holes, padded batches on a static cache, an RMSNorm or rotary that is not
one the kernels compute, a model family without a parity test); nothing silently falls back to HF
code. HF's sliding window ``W`` (a query sees itself and the ``W - 1`` keys before it) is the
kernels' ``window_size=(W - 1, 0)``; logit softcapping is the kernels' ``softcap``.

HF's static cache (``cache_implementation="static"``): the family's forward writes the step's k/v
into the cache's buffers as usual, and attention then runs on
:func:`llama_ext.gqa_attention_with_kvcache` over what the layer returns, with the lengths read
from the layer's device-side counter (a sliding-window layer's ring: see
``_static_cache_attention``), so a ``torch.compile(fullgraph=True)`` decode step has no host sync.

Padded batches are unpadded to :func:`llama_ext.gqa_attention_varlen`, as are packed sequences
(several per row, restarting position_ids, no attention_mask: transformers detects them). Query rows at padding
positions are not attended by anything; their outputs are zeros (HF computes a meaningless
average there), so compare models on non-padding positions only.
"""
import copy
import functools
import inspect
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

ATTN_IMPLEMENTATION = "llama_ext"

# model_type -> family name: the families whose parity with HF eager tests/test_transformers.py
# checks. The patching itself is generic; a family joins this table with its test.
SUPPORTED_FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "mixtral": "Mixtral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3",
    "olmo2": "OLMo 2",
    "granite": "Granite",
    "smollm3": "SmolLM3",
    "gemma": "Gemma",
    "vaultgemma": "VaultGemma",
    "glm": "GLM",
    "glm4": "GLM-4",
    "glm4_moe": "GLM-4-MoE",
    "ernie4_5": "ERNIE 4.5",
    "ernie4_5_moe": "ERNIE 4.5 MoE",
    "helium": "Helium",
    "olmo3": "OLMo 3",
    "olmoe": "OLMoE",
    "flex_olmo": "FlexOlmo",
    "exaone4": "EXAONE 4.0",
    "ministral": "Ministral",
    "seed_oss": "Seed-OSS",
    "arcee": "Arcee",
    "internlm3": "InternLM3",
    "hunyuan_v1_dense": "Hunyuan",
    "hunyuan_v1_moe": "Hunyuan-MoE",
    "qwen2_moe": "Qwen2-MoE",
    "granitemoe": "GraniteMoE",
    "dots1": "dots.llm1",
    "granitemoeshared": "GraniteMoE-Shared",
    "jetmoe": "JetMoE",
    "bitnet": "BitNet",
    "apertus": "Apertus",
    "qwen3_next": "Qwen3-Next",
    "minimax": "MiniMax",
    "qwen3_5_text": "Qwen3.5",
    "qwen3_5_moe_text": "Qwen3.5-MoE",
    "stablelm": "StableLM",
    "starcoder2": "StarCoder2",
    "phi": "Phi",
    "olmo": "OLMo",
    "nemotron": "Nemotron",
    "gpt_neox": "GPT-NeoX",
    "persimmon": "Persimmon",
    "falcon": "Falcon",
    "dbrx": "DBRX",
    "modernbert-decoder": "ModernBERT decoder",
    "cohere": "Cohere (Command R)",
    "cohere2": "Cohere 2 (Command R7B, Command A)",
    "exaone": "EXAONE 3",
    "ministral3": "Ministral 3",
    "cwm": "CWM",
    "hyperclovax": "HyperCLOVA X",
    "iquestcoder": "IQuest-Coder",
    "jais2": "Jais 2",
    "apertus1p5_text": "Apertus 1.5 (text)",
    "dory": "Dory",
    "afmoe": "AFMoE (Trinity)",
    "aria_text": "Aria (text)",
    "cohere2_moe": "Cohere 2 MoE",
    "exaone_moe": "EXAONE MoE",
    "hy_v3": "Hunyuan V3",
    "kolibri1": "Kolibri",
    "laguna": "Laguna",
    "mellum": "Mellum",
    "minimax_m2": "MiniMax-M2",
    "phimoe": "Phi-3.5-MoE",
    "sarvam_moe": "Sarvam MoE",
    "solar_open": "Solar Open",
    "beam": "Beam",
    "minicpm5_moe": "MiniCPM5-MoE",
    "param2moe": "Param-2 MoE",
    "ergo": "Ergo",
    "zaya": "ZAYA",
    "falcon_h1": "Falcon-H1",
    "lfm2": "LFM2",
    "lfm2_moe": "LFM2-MoE",
    "lfm3": "LFM3",
    "olmo_hybrid": "OLMo Hybrid",
    "nemotron_h": "Nemotron-H",
    "lara_mini": "Lara Mini",
    "jamba": "Jamba",
    "bamba": "Bamba",
    "granitemoehybrid": "GraniteMoeHybrid (Granite 4.0)",
    "zamba": "Zamba",
    "zamba2": "Zamba2",
    "recurrent_gemma": "RecurrentGemma",
    # vision-language models: their text decoder (a family above, or one of these text decoders)
    # is patched, the vision tower and projector stay HF's
    "qwen2_vl_text": "Qwen2-VL text decoder",
    "qwen2_5_vl_text": "Qwen2.5-VL text decoder",
    "qwen3_vl_text": "Qwen3-VL text decoder",
    "qwen3_vl_moe_text": "Qwen3-VL-MoE text decoder",
    "glm4v_text": "GLM-4.1V text decoder",
    "glm4v_moe_text": "GLM-4.5V text decoder",
    "gemma3": "Gemma 3 (vision-language)",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "qwen3_vl_moe": "Qwen3-VL-MoE",
    "qwen3_5": "Qwen3.5 (vision-language)",
    "glm4v": "GLM-4.1V",
    "glm4v_moe": "GLM-4.5V",
    "llava": "LLaVA",
    "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision",
    "mistral3": "Mistral 3 (Mistral Small 3.1+)",
    "internvl": "InternVL",
    "aya_vision": "Aya Vision",
    "smolvlm": "SmolVLM",
}


# model_type -> the transformers release from which the family's HF attention calls the attention
# registry; before it the attention is computed inline, out of patch_model's reach.
REGISTRY_SINCE = {"falcon": "5.25"}


def _supported_families_text() -> str:
    return ", ".join(f"{name} (model_type '{key}')" for key, name in SUPPORTED_FAMILIES.items())


# ---- attention function (the "llama_ext" entry of the registry) ----------------------------


def _rows_contiguous(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """The kernels read rows with a contiguous last dim; a projection may leave another dim
    innermost (Zaya's convolutional q/k/v): such a tensor is copied into one, the others pass."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


# Arguments of the attention interface that change what attention computes, which the kernels
# do not: a model that passes one is refused rather than given dense attention.
_UNSUPPORTED_ATTENTION_KWARGS = {
    "s_aux": "attention sinks (as GPT-OSS passes them)",
    "sinks": "attention sinks",
    "position_bias": "additive position biases (T5-style relative attention)",
    "indices": "sparse attention's selected keys (DeepSeek-V3.2-style indexers)",
    "block_indices": "block-sparse attention's selected key blocks (as MiniMax-M3 passes them)",
}


def _reject_unsupported_attention(module, dropout: float, kwargs) -> None:
    if dropout > 0:
        raise ValueError(
            f"llama_ext attention has no dropout, but attention_dropout={dropout} is active (the model is in "
            "training mode); set config.attention_dropout = 0.0"
        )
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise ValueError("output_attentions=True is not supported: llama_ext attention never forms the attention matrix")
    for name, what in _UNSUPPORTED_ATTENTION_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{what} ({name}) are not supported by llama_ext attention")


def _kernel_options(sliding_window: Optional[int], softcap: Optional[float]) -> dict:
    """The attention kernels' ``window_size``/``softcap`` for HF's arguments (None: off). HF's
    window ``W`` keeps keys ``j > i - W`` (``sliding_window_overlay``): the query and the
    ``W - 1`` keys before it."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of keys, got {sliding_window}")
    return {
        "window_size": (-1, -1) if sliding_window is None else (int(sliding_window) - 1, 0),
        "softcap": 0.0 if softcap is None else float(softcap),
    }


def _check_window_over_padding(key_valid: Tensor) -> None:
    """A window counts positions of the padded row; the unpadded kernel counts tokens. The two
    agree when each row's tokens are contiguous (left or right padding), not across holes."""
    seq_k = key_valid.shape[1]
    index = torch.arange(seq_k, device=key_valid.device)
    first = torch.where(key_valid, index, seq_k).amin(1)
    last = torch.where(key_valid, index, -1).amax(1)
    count = key_valid.sum(1)
    if not bool(((count == 0) | (last - first + 1 == count)).all()):
        raise ValueError(
            "sliding-window attention with an attention_mask that has padding between a sequence's tokens is not "
            "supported by llama_ext attention (only left or right padding)"
        )


def _varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, causal: bool, scale: Optional[float], **options
) -> Tensor:
    """Attention over the valid (mask True) tokens of each sequence, through the varlen kernel.

    q [batch, seq_q, n_q_heads, d]; k/v [batch, seq_k, n_kv_heads, d]; key_valid bool
    [batch, seq_k]. The queries are the last seq_q key positions, so each sequence's valid
    queries are the last of its valid keys: bottom-right causal alignment is the right one for
    any mask, left padding included. Rows of padding queries are zeros. ``options`` are the
    kernels' window_size/softcap.
    """
    if options["window_size"][0] >= 0:
        _check_window_over_padding(key_valid)
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
        **options,
    )
    out = out_tokens.new_zeros(batch * seq_q, n_q_heads, head_dim).index_copy(0, q_index, out_tokens)
    return out.view(batch, seq_q, n_q_heads, head_dim)


def _packed_attention(
    q: Tensor, k: Tensor, v: Tensor, sequence_ids: Tensor, causal: bool, scale: Optional[float], **options
) -> Tensor:
    """Attention within each packed sequence: q/k/v [batch, seq, heads, d] hold several sequences
    per row, ``sequence_ids`` [batch, seq] numbers them; every row of q/k/v is a token of one.
    A window counts positions within each sequence, as HF's (position_ids restart per sequence)."""
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
        **options,
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
    made (None, bool padding mask or packed-sequence ids); ``sliding_window`` and ``softcap`` as
    the model passes them (None: off). Returns ([batch, seq_q, n_q_heads, d], None)."""
    static_layer = kwargs.pop(_STATIC_LAYER_KWARG, None)
    _reject_unsupported_attention(module, dropout, kwargs)
    options = _kernel_options(sliding_window, softcap)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # The kernels take [batch, seq, heads, d] with any strides but a contiguous last dim: HF's
    # [batch, heads, seq, d] tensors pass as transposed views, with no copy.
    q, k, v = _rows_contiguous(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    if static_layer is not None:
        return _static_cache_attention(static_layer, q, k, v, attention_mask, options, scaling), None
    group = getattr(module, "context_parallel_group", None)
    if group is not None:
        if options["softcap"]:
            raise ValueError("context-parallel attention does not support logit softcapping (softcap)")
        out = hf_context_parallel_attention(
            q, k, v, attention_mask, kwargs.get("position_ids"), sliding_window, causal, scaling, group
        )
        return out, None
    if attention_mask is None:
        return llama_ext.gqa_attention(q, k, v, causal=causal, scale=scaling, **options), None
    if attention_mask.dim() != 2 or attention_mask.shape != (key.shape[0], key.shape[2]):
        raise ValueError(
            "llama_ext attention takes a 2D [batch, kv_length] padding mask; got attention_mask of shape "
            f"{tuple(attention_mask.shape)} for {key.shape[2]} keys (custom 4D masks are not "
            "supported)"
        )
    if attention_mask.dtype == torch.bool:
        return _varlen_attention(q, k, v, attention_mask, causal, scaling, **options), None
    return _packed_attention(q, k, v, attention_mask, causal, scaling, **options), None


# ---- mask function (the "llama_ext" entry of the mask registry) -----------------------------


def _closure_values(fn) -> list:
    return [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ())]


def _qualname(fn) -> str:
    """``fn.__qualname__``, read from its code object where Python has ``co_qualname`` (3.11+):
    dynamo traces that, not a function's ``__qualname__``, so the mask walk runs in compiled steps."""
    code = getattr(fn, "__code__", None)
    if code is not None and hasattr(code, "co_qualname"):
        return code.co_qualname
    return getattr(fn, "__qualname__", "")


def _mask_parts(mask_function) -> list:
    """The elementary mask functions that transformers' ``and_masks(...)`` and
    ``remap_positions_for_packed_sequence(...)`` wrappers are made of."""
    if not _qualname(mask_function).startswith(("and_masks.", "remap_positions_for_packed_sequence.")):
        return [mask_function]
    parts = []
    for value in _closure_values(mask_function):
        for fn in value if isinstance(value, tuple) else (value,):
            if callable(fn):
                parts += _mask_parts(fn)
    return parts or [mask_function]  # a wrapper whose parts cannot be read is not one llama_ext computes


def _is_part(fn, maker: str) -> bool:
    return _qualname(fn).startswith(maker + ".")


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

    A sliding-window overlay is left to the attention function, which applies each layer's
    ``sliding_window`` in the kernel; any other mask pattern (bidirectional, custom mask functions) raises.
    """
    # A compiled decode step (one query, after a prefill that checked the same model's masks)
    # skips the closure walk: the dynamo of older torch (2.11) cannot read closures. Every other
    # call walks, compiled or not (torch 2.14 traces the walk; an older one fails loudly in
    # _mask_parts rather than attend across packed sequences or past a bidirectional part).
    decode_step = torch.compiler.is_compiling() and q_length == 1
    parts = [] if mask_function is causal_mask_function or decode_step else _mask_parts(mask_function)
    packed = [part for part in parts if _is_part(part, "packed_sequence_mask_function")]
    unsupported = [
        part
        for part in parts
        if part is not causal_mask_function and not _is_part(part, "sliding_window_overlay") and part not in packed
    ]
    if unsupported:
        raise ValueError(
            "llama_ext attention supports causal masks with padding or packed sequences only; this model built a "
            f"mask from {', '.join(_qualname(p) or repr(p) for p in unsupported)} (bidirectional "
            "attention or a custom mask function)"
        )
    if packed:  # transformers only looks for packing when there is neither a padding mask nor a cache
        (sequence_ids,) = [value for value in _closure_values(packed[0]) if isinstance(value, Tensor)]
        return sequence_ids
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    # A mask shorter than kv_length covers the tokens so far of a static cache's kv_length slots
    # (transformers 5.17 hands it over unpadded); the slots after it come after every query, so
    # the causal mask hides them whatever they hold.
    if bool(attention_mask.all()):
        return None
    if attention_mask.shape[1] < kv_length:  # as transformers' prepare_padding_mask: not real tokens
        attention_mask = F.pad(attention_mask, (0, kv_length - attention_mask.shape[1]))
    return attention_mask


AttentionInterface.register(ATTN_IMPLEMENTATION, llama_ext_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, llama_ext_padding_mask)


# ---- attention module forward with llama_ext rotary -----------------------------------------


def _apply_rotary_from_hf(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                          pair_tables: bool = False) -> Tuple[Tensor, Tensor]:
    """Rotate q [batch, seq, n_q_heads, d] and k [batch, seq, n_kv_heads, d] by HF's per-token
    cos/sin ([batch or 1, seq, rotary_dim]; rotary_dim <= d, the rest of each head passes through,
    as in HF's partial rotary), pairing dims (i, i + rotary_dim/2) or, with ``interleaved``,
    (2i, 2i + 1). HF's tables hold each angle twice: in both halves (``cat(f, f)``, most families)
    or, with ``pair_tables``, in adjacent columns (``repeat_interleave(f, 2)``, Cohere).

    Each token's angles become one row of a [rows, rotary_dim/2] table, looked up at position =
    row index: the rotation uses exactly HF's angles, whatever the rope type (llama3, linear,
    dynamic, longrope, ... and their attention scaling are all folded into cos/sin).
    """
    half = cos.shape[-1] // 2
    table_batch, seq = cos.shape[0], cos.shape[1]
    if table_batch not in (1, q.shape[0]):
        raise ValueError(f"rotary cos/sin have batch {table_batch}, expected 1 or {q.shape[0]}")

    def table(t: Tensor) -> Tensor:
        angles = t[..., ::2] if pair_tables else t[..., :half]
        return angles.reshape(table_batch * seq, half).to(torch.float32).contiguous()

    positions = torch.arange(table_batch * seq, device=q.device).view(table_batch, seq)
    q, k = _rows_contiguous(q, k)
    return llama_ext.apply_rotary(q, k, table(cos), table(sin), positions[0] if table_batch == 1 else positions,
                                  interleaved=interleaved)


def _rotary_in_hf_layout(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int, interleaved: bool,
                         pair_tables: bool = False):
    if unsqueeze_dim == 2:
        return _apply_rotary_from_hf(q, k, cos, sin, interleaved, pair_tables)
    if unsqueeze_dim != 1:
        raise ValueError(f"apply_rotary_pos_emb: unsqueeze_dim must be 1 or 2, got {unsqueeze_dim}")
    # The kernel writes its outputs in the inputs' strides, so the rotated [batch, seq, heads, d]
    # views transpose back to contiguous HF-layout tensors.
    q, k = _apply_rotary_from_hf(q.transpose(1, 2), k.transpose(1, 2), cos, sin, interleaved, pair_tables)
    return q.transpose(1, 2), k.transpose(1, 2)


def _apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` of the Llama family
    (``rotate_half``: dims i and i + rotary_dim/2 rotate together) on llama_ext: q/k are
    [batch, heads, seq, d] (``unsqueeze_dim=1``, how attention modules call it) or
    [batch, seq, heads, d] (``unsqueeze_dim=2``); the results have the inputs' layout."""
    return _rotary_in_hf_layout(q, k, cos, sin, unsqueeze_dim, interleaved=False)


def _apply_rotary_pos_emb_interleaved(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
    """The same with dims 2i and 2i + 1 rotating together, by the angle of cos/sin's column i (GLM,
    ERNIE 4.5, Helium: cos[..., :rotary_dim/2].repeat_interleave(2))."""
    return _rotary_in_hf_layout(q, k, cos, sin, unsqueeze_dim, interleaved=True)


def _apply_rotary_pos_emb_pairs(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1):
    """Dims 2i and 2i + 1 rotating together by the angle of cos/sin's columns 2i and 2i + 1, which
    hold it twice (Cohere: its rotary embedding repeat_interleaves the angles)."""
    return _rotary_in_hf_layout(q, k, cos, sin, unsqueeze_dim, interleaved=True, pair_tables=True)


_ROTARY_NAME = "apply_rotary_pos_emb"
# llama_ext's rotary embeddings for HF families: the pairing each computes, and how the family's
# cos/sin tables hold each angle twice (in both halves, or in adjacent columns), which is what
# the family's function is probed with.
_ROTARIES = {
    "half-split rotate_half": (_apply_rotary_pos_emb, False),
    "interleaved (2i, 2i+1)": (_apply_rotary_pos_emb_interleaved, False),
    "interleaved (2i, 2i+1) on pair-duplicated tables": (_apply_rotary_pos_emb_pairs, True),
}


def _rotary_probes(rotary_fn, pair_tables: bool):
    """(q, k, cos, sin, rotary_fn's result) on random q/k and angles, full width and (where the
    function takes it) half width; or the error that the function raised at full width."""
    generator = torch.Generator().manual_seed(0)
    batch, seq, head_dim = 2, 5, 16
    q = torch.randn(batch, 4, seq, head_dim, generator=generator)
    k = torch.randn(batch, 2, seq, head_dim, generator=generator)
    twice = (lambda t: t.repeat_interleave(2, -1)) if pair_tables else (lambda t: t.repeat(1, 1, 2))
    probes = []
    for rotary_dim in (head_dim, head_dim // 2):
        angles = 10 * torch.rand(batch, seq, rotary_dim // 2, generator=generator)
        cos, sin = twice(angles.cos()), twice(angles.sin())
        try:
            probes.append((q, k, cos, sin, rotary_fn(q, k, cos, sin)))
        except RuntimeError as error:  # a full-width-only rotation refuses narrower tables: never called with them
            if rotary_dim == head_dim:
                return error
    return probes


@functools.lru_cache(maxsize=None)
def _check_rotary(rotary_fn):
    """The llama_ext rotary (of ``_ROTARIES``) that computes what the family's
    ``apply_rotary_pos_emb`` does: same parameters, same results on random q/k and angles in the
    tables' layout, full width and (where the family's function takes it) partial. Raises if
    none does."""
    # With the `kernels` package (a dependency from transformers 5.25), transformers' hub-kernel
    # decorator makes the family's function an nn.Module whose forward calls it.
    signed = rotary_fn.forward if isinstance(rotary_fn, nn.Module) else rotary_fn
    where = f"{rotary_fn.__module__}.{getattr(rotary_fn, '__name__', _ROTARY_NAME)}"
    params = list(inspect.signature(signed).parameters)
    if params != list(inspect.signature(_apply_rotary_pos_emb).parameters):
        raise ValueError(f"{where}{inspect.signature(signed)} is not a rotary embedding llama_ext computes")
    probes = {pair_tables: _rotary_probes(rotary_fn, pair_tables) for pair_tables in (False, True)}
    for ours, pair_tables in _ROTARIES.values():
        cases = probes[pair_tables]
        if isinstance(cases, list) and all(
            torch.allclose(a, e, rtol=1e-5, atol=1e-5)
            for q, k, cos, sin, expected in cases
            for a, e in zip(ours(q, k, cos, sin), expected)
        ):
            return ours
    errors = [probe for probe in probes.values() if isinstance(probe, Exception)]
    failure = f": it fails on cos/sin of HF's [batch, seq, rotary_dim] layouts ({errors[0]})" if errors else ""
    raise ValueError(
        f"{where} is not a rotary embedding llama_ext computes (one of: {', '.join(_ROTARIES)}; a rotation of the "
        f"first rotary_dim dims by cos/sin){failure}"
    )


def _with_global(fn, name: str, value):
    """A copy of ``fn`` in which the global ``name`` is ``value``. A decorator chain
    (``functools.wraps`` wrappers such as transformers' ``deprecate_kwarg``) is copied with each
    wrapper's closure pointing at the copy of what it wraps, so every decorator still applies."""
    inner = getattr(fn, "__wrapped__", None)
    closure, fn_globals = fn.__closure__, fn.__globals__
    if inner is None:
        fn_globals = {**fn_globals, name: value}
    else:
        inner_copy = _with_global(inner, name, value)
        cells = [cell for cell in closure or () if cell.cell_contents is inner]
        if not cells:
            raise ValueError(f"cannot rebind {name} in {fn.__qualname__}: its wrapper does not hold the wrapped function")
        closure = tuple(types.CellType(inner_copy) if cell in cells else cell for cell in closure)
    result = types.FunctionType(fn.__code__, fn_globals, fn.__name__, fn.__defaults__, closure)
    result.__kwdefaults__ = fn.__kwdefaults__
    result.__dict__.update(fn.__dict__)
    result.__qualname__, result.__doc__, result.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    if inner is not None:
        result.__wrapped__ = inner_copy
    return result


def _is_registry_attention(module: nn.Module) -> bool:
    """An attention module that calls transformers' attention-function registry in its forward."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


# attention class -> its forward with the rotary on llama_ext (filled when a model is patched; a
# plain dict, so torch.compile traces the lookup)
_PATCHED_FORWARDS = {}


def _forward_with_llama_ext_rotary(attention_class):
    """``attention_class.forward`` (decorators included) with ``apply_rotary_pos_emb`` bound to
    llama_ext's; the forward itself when it applies no rotary embedding."""
    forward = attention_class.forward
    inner = inspect.unwrap(forward)
    if _ROTARY_NAME not in inner.__code__.co_names:
        return forward
    return _with_global(forward, _ROTARY_NAME, _check_rotary(inner.__globals__[_ROTARY_NAME]))


def _cache_kwarg(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes and returns its KV cache: transformers 5.x
    renamed ``past_key_values`` to ``cache`` (argument and output), and warns at the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _patched_attention_forward(self, *args, **kwargs):
    """The attention module's own HF forward, with the rotary on llama_ext (attention reaches
    llama_ext through the registry). A static cache's layer travels to the attention function in
    the forward's kwargs, which every family hands on to the registry call."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name changed in transformers 5.x
    static_layer = _static_cache_layer(cache, self.layer_idx) if cache is not None else None
    if static_layer is not None:
        kwargs[_STATIC_LAYER_KWARG] = static_layer
    return _PATCHED_FORWARDS[type(self)](self, *args, **kwargs)


# ---- static KV cache (cache_implementation="static") on gqa_attention_with_kvcache --------------

# The forward's kwarg that carries a static cache's layer to the attention function.
_STATIC_LAYER_KWARG = "llama_ext_static_cache_layer"


def _static_cache_layer(cache, layer_idx: int):
    """The layer of a static (compileable) cache that this attention serves, or None for
    dynamic caches. Static layers other than transformers' StaticLayer and its sliding-window
    ring (quantized or offloaded layers) raise."""
    if not getattr(cache, "is_compileable", False):
        return None
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    if type(layer).__name__ not in ("StaticLayer", "StaticSlidingWindowLayer"):
        raise ValueError(
            f"{type(cache).__name__} with {type(layer).__name__} layers is not supported by patch_model; use "
            'cache_implementation="static" (StaticLayer, StaticSlidingWindowLayer) or the default DynamicCache'
        )
    return layer


def _static_cache_attention(layer, q: Tensor, k: Tensor, v: Tensor, attention_mask, options: dict,
                            scaling: Optional[float]) -> Tensor:
    """Attention of q [batch, seq, n_q_heads, d] over what a static layer's update just returned,
    k/v [batch, length, n_kv_heads, d] views holding this step's k/v after the earlier tokens: one
    llama_ext.gqa_attention_with_kvcache call over their first cache_seqlens tokens, the queries
    aligned to the last of them.

    A StaticLayer returns its buffers; their filled length is its device-side counter, so a
    compiled decode step needs no host sync. A StaticSlidingWindowLayer keeps the last
    W = sliding window tokens: it returns its buffers while they are not full (filled length: the
    counter), then its ring (rolled so that the newest token is last) or, for several new tokens,
    the ring's tokens followed by them; every returned token is then filled, and its device-side
    counter is no longer advanced. Its host-side count of every token seen tells the two apart: the
    filled length is the smaller of that count and the returned length."""
    if attention_mask is not None:
        # A 2D padding mask reaches here only when not all of its tokens are real (the mask
        # function drops all-True masks while it can check them): padded batches need varlen.
        raise ValueError(
            "patch_model's static-cache path needs unpadded batches (attention_mask None or all ones); use the "
            "default DynamicCache for padded batches"
        )
    if getattr(layer, "is_sliding", False):
        filled = min(layer.cumulative_length_int, k.shape[1])
        cache_seqlens = torch.full((q.shape[0],), filled, dtype=torch.int32, device=q.device)
    else:
        cache_seqlens = layer.cumulative_length.to(torch.int32).expand(q.shape[0])
    return llama_ext.gqa_attention_with_kvcache(q, k, v, cache_seqlens, scale=scaling, **options)


# ---- patch_model ------------------------------------------------------------------------------


def _is_rms_norm_like(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and not isinstance(module, llama_ext.RMSNorm)


def _rms_norm_variant(norm: nn.Module) -> Tuple[float, float, bool]:
    """``(eps, offset, cast_before_weight)`` such that ``llama_ext.RMSNorm`` with them computes
    what the HF module ``norm`` does. Found on a CPU copy of ``norm`` with random weights: fp32 inputs tell the
    weight applied (``weight`` or ``1 + weight``) and check the eps (rows whose mean square is
    near it); bf16 inputs with an fp32 weight tell the rounding order from the result's dtype
    (fp32: the normalized value was rounded to bf16 and then multiplied, as Llama does; bf16: the
    fp32 product was rounded once, as Gemma and OLMo 2 do) and check the values."""
    name = type(norm).__name__
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not isinstance(eps, float):
        raise ValueError(f"{name} is not an RMSNorm llama_ext computes (it needs a 1-D weight and a float eps)")
    generator = torch.Generator().manual_seed(0)
    probe_weight = nn.Parameter(torch.randn(weight.shape[0], generator=generator))
    probe = copy.deepcopy(norm, {id(weight): probe_weight}).cpu()
    row_scales = torch.tensor([max(eps, 1e-12) ** 0.5, 0.1, 1.0, 30.0]).unsqueeze(1)  # the first: eps matters
    x = torch.randn(4, weight.shape[0], generator=generator) * row_scales

    def normalized(inputs: Tensor) -> Tensor:
        inputs = inputs.double()
        return inputs * torch.rsqrt(inputs.pow(2).mean(-1, keepdim=True) + eps)

    def close(actual: Tensor, expected: Tensor, tol: float) -> bool:
        return actual.shape == expected.shape and torch.allclose(
            actual.double(), expected, rtol=tol, atol=tol * expected.abs().max().item()
        )

    with torch.no_grad():
        out, out_bf16 = probe(x), probe(x.bfloat16())
    offsets = [offset for offset in (0.0, 1.0) if close(out, normalized(x) * (offset + probe_weight.double()), 1e-5)]
    if not offsets or out_bf16.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(
            f"{name} is not an RMSNorm llama_ext computes: x / sqrt(mean(x^2) + eps) times weight or 1 + weight, "
            f"with eps={eps}"
        )
    offset, cast_before_weight = offsets[0], out_bf16.dtype == torch.float32
    scaled = offset + probe_weight.double()
    if cast_before_weight:
        expected_bf16 = normalized(x.bfloat16()).bfloat16().double() * scaled
    else:
        expected_bf16 = (normalized(x.bfloat16()) * scaled).bfloat16().double()
    if not close(out_bf16, expected_bf16, 2 ** -7):
        raise ValueError(f"{name} in bf16 is not an RMSNorm llama_ext computes (neither rounding order matches)")
    return eps, offset, cast_before_weight


def _rms_norm_replacements(model: nn.Module) -> list:
    """``(parent, name, llama_ext.RMSNorm)`` for every RMSNorm of ``model``, each sharing the
    original's weight Parameter (optimizers and tied state keep working)."""
    replacements = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if not _is_rms_norm_like(child):
                continue
            eps, offset, cast_before_weight = _rms_norm_variant(child)
            norm = llama_ext.RMSNorm(
                child.weight.shape[0], eps=eps, offset=offset, cast_before_weight=cast_before_weight, device="meta"
            )
            norm.weight = child.weight
            norm.train(child.training)
            replacements.append((parent, name, norm))
    return replacements


def _text_decoder(model: nn.Module, config) -> Tuple[nn.Module, Optional[str]]:
    """The module whose norms and attention ``patch_model`` changes, and the key of its config
    among ``config.sub_configs`` (None when the model is a decoder itself). A vision-language
    model's is its text decoder (``get_decoder()``, the module holding
    ``config.get_text_config()``), which must be a supported family too; its vision tower and
    projector, whose norms and attention are not causal decoders', are left out."""
    text_config = config.get_text_config(decoder=True)
    if text_config is config:
        return model, None
    key = next((name for name in config.sub_configs if getattr(config, name, None) is text_config), None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if key is None or getattr(decoder, "config", None) is not text_config:
        raise ValueError(f"cannot find the text decoder of {type(model).__name__} (model_type {config.model_type!r})")
    if text_config.model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"the text decoder of {type(model).__name__} has model_type {text_config.model_type!r}; patch_model "
            f"supports {_supported_families_text()}"
        )
    return decoder, key


def patch_model(model: nn.Module, context_parallel_group=None) -> nn.Module:
    """Run a transformers RMSNorm + RoPE + GQA decoder on llama_ext, in place.

    RMSNorms become :class:`llama_ext.RMSNorm` (same weights, the variant the family uses), the
    rotary embedding runs on :func:`llama_ext.apply_rotary` and attention on
    :func:`llama_ext.gqa_attention` / :func:`llama_ext.gqa_attention_varlen` (padded batches), with
    sliding windows and logit softcapping as the model sets them, registered as the
    ``"llama_ext"`` attention implementation; everything else (MLPs and MoE experts, embeddings,
    final logit softcapping) stays HF's; in a vision-language model, only its text decoder is
    patched. Families: see ``SUPPORTED_FAMILIES``. Training,
    ``generate()`` with the default DynamicCache (and left-padded batches) or
    ``cache_implementation="static"`` are supported; settings the kernels cannot serve exactly
    raise ``ValueError`` (see the module docstring), before the model is changed where they are
    visible in it. Returns ``model``.

    ``context_parallel_group`` (a torch.distributed process group, or ``dist.group.WORLD``) makes
    attention ring attention over that group (:mod:`llama_ext.distributed`): the model then takes
    this rank's share of every sequence, ``input_ids``, ``position_ids`` (required) and labels
    each passed through :func:`llama_ext.distributed.shard_for_context_parallel`, for training
    and scoring (no KV cache, padding mask or packing), of text models.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"patch_model supports {_supported_families_text()}; got {type(model).__name__} "
            f"with model_type {model_type!r}"
        )
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

    decoder, config_key = _text_decoder(model, config)
    if config_key is not None and context_parallel_group is not None:
        raise ValueError(
            f"context_parallel_group is supported for text models only; {type(model).__name__} is a vision-language "
            "model (its image tokens and multimodal position ids are not sharded)"
        )
    attention_modules = [m for m in decoder.modules() if _is_registry_attention(m)]
    if not attention_modules:
        since = REGISTRY_SINCE.get(model_type)
        later = (f": {SUPPORTED_FAMILIES[model_type]} attention goes through it from transformers {since} on, "
                 f"this is {transformers.__version__}") if since else ""
        raise ValueError(
            f"found no attention module in {type(model).__name__} that uses transformers' attention registry{later}"
        )
    for attention_class in {type(m) for m in attention_modules} - _PATCHED_FORWARDS.keys():
        # raises for a rotary llama_ext does not compute
        _PATCHED_FORWARDS[attention_class] = _forward_with_llama_ext_rotary(attention_class)
    for parent, name, norm in _rms_norm_replacements(decoder):
        setattr(parent, name, norm)
    for attention in attention_modules:
        attention.forward = types.MethodType(_patched_attention_forward, attention)
        attention.context_parallel_group = context_parallel_group
    if config_key is not None:  # the text decoder's attention and masks only
        model.set_attn_implementation({config_key: ATTN_IMPLEMENTATION})
    elif hasattr(model, "set_attn_implementation"):
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
