"""cos/sin tables for rotary position embedding, with every HF transformers ``rope_type``.

Each formula mirrors ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` op for op (same
float32 torch ops in the same order, on the device where HF runs them: see ``rope_inv_freq``),
so the inverse frequencies, and the tables ``cos(p * inv_freq) * attention_scaling`` computed on
the tables' device, match HF's rotary embedding to the bit, attention scaling (yarn, longrope)
included.
"""
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")

# Keys HF reads without a default, per rope_type.
_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("long_factor", "short_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "proportional": (),
}


def rope_type_of(rope_scaling: Optional[Dict[str, Any]]) -> str:
    """The ``rope_type`` of an HF ``rope_scaling`` / ``rope_parameters`` dict (``type`` is the
    legacy spelling; ``None`` is ``"default"``), validated with its required keys."""
    if rope_scaling is None:
        return "default"
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    missing = [key for key in _REQUIRED_KEYS[rope_type] if key not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling of rope_type {rope_type!r} is missing required key(s): {', '.join(missing)}")
    return rope_type


def _exponents(rotary_dim: int, device) -> Tensor:
    """``arange(0, dim, 2) / dim`` in float32, as HF builds it."""
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / rotary_dim


def _default(rotary_dim, base, device) -> Tensor:
    return 1.0 / (base ** _exponents(rotary_dim, device))


def _dynamic(rotary_dim, max_position, base, scaling, seq_len, device) -> Tensor:
    factor = scaling["factor"]
    if seq_len is None:
        seq_len = max_position
    elif isinstance(seq_len, Tensor):
        # HF's forward passes max(position_ids) + 1 as a tensor: keep its float32 arithmetic.
        seq_len = torch.maximum(seq_len, torch.tensor(max_position, dtype=seq_len.dtype, device=seq_len.device))
    else:
        seq_len = max(seq_len, max_position)
    base = base * ((factor * seq_len / max_position) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return 1.0 / (base ** _exponents(rotary_dim, device))


def _yarn_attention_factor(factor, scaling) -> float:
    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    return attention_factor


def _yarn(rotary_dim, max_position, base, scaling, device) -> Tuple[Tensor, float]:
    dim = rotary_dim
    original_max = scaling.get("original_max_position_embeddings", max_position)
    factor = scaling["factor"]
    if factor is None:
        factor = max_position / original_max
    attention_factor = _yarn_attention_factor(factor, scaling)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def _longrope(rotary_dim, max_position, base, scaling, seq_len, device) -> Tuple[Tensor, float]:
    original_max = scaling.get("original_max_position_embeddings", max_position)
    factor = scaling.get("factor")
    if factor is None:
        factor = max_position / original_max
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    use_long = seq_len is not None and seq_len > original_max
    ext = scaling["long_factor" if use_long else "short_factor"]
    if len(ext) != rotary_dim // 2:
        raise ValueError(
            f"longrope {'long' if use_long else 'short'}_factor must have rotary_dim // 2 = {rotary_dim // 2} "
            f"entries, got {len(ext)}"
        )
    ext_factors = torch.tensor(ext, dtype=torch.float32, device=device)
    inv_freq_shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (ext_factors * base**inv_freq_shape), attention_factor


def _llama3(rotary_dim, max_position, base, scaling, device) -> Tensor:
    inv_freq = _default(rotary_dim, base, device)
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling.get("original_max_position_embeddings", max_position)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def _proportional(rotary_dim, base, scaling, device) -> Tensor:
    """Gemma 4's full-attention layers: the first partial_rotary_factor of the pairs turn at the
    frequencies of the whole head (exponents over rotary_dim, the head dim here: the table always
    spans it), the others not at all (inv_freq 0: cos 1, sin 0); all divided by factor."""
    angles = int(scaling.get("partial_rotary_factor", 1.0) * rotary_dim // 2)
    exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / rotary_dim
    still = torch.zeros(rotary_dim // 2 - angles, dtype=torch.float32, device=device)
    return torch.cat((1.0 / (base**exponents), still)) / scaling.get("factor", 1.0)


def rope_inv_freq(
    rotary_dim: int,
    max_position: int,
    base: float = 10000.0,
    rope_scaling: Optional[Dict[str, Any]] = None,
    device=None,
    seq_len=None,
) -> Tuple[Tensor, float]:
    """float32 inverse frequencies [rotary_dim // 2] and the attention scaling of an HF rope config.

    ``max_position`` is HF's ``max_position_embeddings``. ``seq_len`` is HF's: the length the
    table serves, used by ``dynamic`` (NTK base grows past ``max_position``) and ``longrope``
    (``long_factor`` past ``original_max_position_embeddings``); ``None`` is the initial table.
    A ``rope_theta`` key in ``rope_scaling`` (HF's ``rope_parameters``) overrides ``base``.
    ``proportional`` reads its ``partial_rotary_factor`` from ``rope_scaling`` and spans the whole
    head: pass the head dim as ``rotary_dim``.
    """
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even number >= 2, got {rotary_dim}")
    if max_position < 1:
        raise ValueError(f"max_position must be >= 1, got {max_position}")
    rope_type = rope_type_of(rope_scaling)
    scaling = rope_scaling or {}
    base = scaling.get("rope_theta") or base
    if not base > 0:
        raise ValueError(f"base (rope_theta) must be > 0, got {base}")
    if "factor" in scaling and not scaling["factor"] > 0:
        raise ValueError(f"rope_scaling['factor'] must be > 0, got {scaling['factor']}")
    # Where HF computes them: the initial inverse frequencies on the CPU (when it builds the
    # module, and again in _init_weights), those for a sequence length (dynamic, longrope) in
    # its forward, on the activations' device. A GPU's pow rounds differently from the CPU's,
    # and one ulp of inv_freq is p ulps of the angle at position p.
    where = device if seq_len is not None else None
    inv_freq, attention_scaling = _inv_freq(rope_type, rotary_dim, max_position, base, scaling, seq_len, where)
    return (inv_freq if device is None else inv_freq.to(device)), attention_scaling


def _inv_freq(rope_type, rotary_dim, max_position, base, scaling, seq_len, device) -> Tuple[Tensor, float]:
    if rope_type == "default":
        return _default(rotary_dim, base, device), 1.0
    if rope_type == "linear":
        return _default(rotary_dim, base, device) / scaling["factor"], 1.0
    if rope_type == "dynamic":
        return _dynamic(rotary_dim, max_position, base, scaling, seq_len, device), 1.0
    if rope_type == "yarn":
        return _yarn(rotary_dim, max_position, base, scaling, device)
    if rope_type == "longrope":
        return _longrope(rotary_dim, max_position, base, scaling, seq_len, device)
    if rope_type == "proportional":
        return _proportional(rotary_dim, base, scaling, device), 1.0
    return _llama3(rotary_dim, max_position, base, scaling, device), 1.0


def cos_sin_from_inv_freq(inv_freq: Tensor, num_positions: int, attention_scaling: float) -> Tuple[Tensor, Tensor]:
    """``cos/sin(p * inv_freq) * attention_scaling`` for p in [0, num_positions), float32, as
    HF's rotary embedding forward computes them."""
    positions = torch.arange(num_positions, device=inv_freq.device, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def rope_cos_sin(
    rotary_dim: int,
    max_position: int,
    base: float = 10000.0,
    rope_scaling: Optional[Dict[str, Any]] = None,
    device=None,
    *,
    seq_len: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """float32 ``cos, sin``, each ``[max(max_position, seq_len), rotary_dim // 2]``, for
    :func:`llama_ext.apply_rotary`.

    ``rope_scaling`` is HF transformers' dict: ``rope_type`` (or legacy ``type``) one of
    ``"default"``, ``"linear"``, ``"dynamic"``, ``"yarn"``, ``"longrope"``, ``"llama3"``,
    ``"proportional"``, with the keys HF reads for it. ``max_position`` plays the role of HF's
    ``max_position_embeddings`` in the scaling formulas (and is the default for
    ``original_max_position_embeddings``). The tables
    include HF's attention scaling (yarn's and longrope's ``attention_factor``) and match HF's
    rotary embedding for the same config to fp32 rounding. ``seq_len`` (keyword) asks for the
    table HF uses at that sequence length (see :func:`rope_inv_freq`). Unknown rope types and
    missing keys raise ``ValueError``.
    """
    inv_freq, attention_scaling = rope_inv_freq(rotary_dim, max_position, base, rope_scaling, device, seq_len)
    num_positions = max(max_position, int(seq_len) if seq_len is not None else 0)
    return cos_sin_from_inv_freq(inv_freq, num_positions, attention_scaling)
