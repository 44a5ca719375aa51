import ctypes

import pytest
import torch
from torch.library import opcheck

import llama_ext
from llama_ext.reference import gptj_rotary_reference, hf_cos_sin, rotary_reference

try:  # the external reference: transformers' own code; the project's copy only without it
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb
except ImportError:
    from llama_ext.reference import hf_apply_rotary_pos_emb

from conftest import (CUDA_DTYPES, CUDA_TYPE_NAMES, DEVICES, assert_close, assert_device_assert,
                      device_dtype_params, emulation_only_on_cpu, ptx_kernel)

HEAD_DIMS = [64, 80, 128, 256]
HEAD_COUNTS = [(12, 4), (5, 1)]
MAX_POSITION = 96


def make(shape, device, dtype):
    return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)


def tables(rotary_dim, device, max_position=MAX_POSITION, dtype=torch.float32):
    cos, sin = llama_ext.rope_cos_sin(rotary_dim, max_position, device=device)
    return cos.to(dtype), sin.to(dtype)


def random_positions(batch, seq, device, dtype=torch.int64, max_position=MAX_POSITION):
    return torch.randint(0, max_position, (batch, seq), device=device, dtype=dtype)


def qk(batch, seq, heads, head_dim, device, dtype):
    n_q, n_kv = heads
    return make((batch, seq, n_q, head_dim), device, dtype), make((batch, seq, n_kv, head_dim), device, dtype)


def check_against_reference(q, k, q_out, k_out, cos, sin, positions, interleaved, inverse=False, scale=1.0):
    for x, out in ((q, q_out), (k, k_out)):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert_close(out, rotary_reference(x, cos, sin, positions, interleaved, inverse), x.dtype, scale)


# ---- forward against float64 --------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("heads", HEAD_COUNTS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_matches_float64(device, dtype, head_dim, partial, heads, interleaved):
    # partial rotary: half of head_dim for 64/128/256, and a rotary_dim that is not a multiple of
    # 16 bytes for 80 (40), so both the vector and the scalar CUDA paths are covered.
    rotary_dim = head_dim // 2 if partial else head_dim
    q, k = qk(2, 7, heads, head_dim, device, dtype)
    cos, sin = tables(rotary_dim, device)
    positions = random_positions(2, 7, device)
    q_out, k_out = llama_ext.apply_rotary(q, k, cos, sin, positions, interleaved)
    check_against_reference(q, k, q_out, k_out, cos, sin, positions, interleaved)
    if partial:  # dims past rotary_dim pass through bit for bit
        assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])
        assert torch.equal(k_out[..., rotary_dim:], k[..., rotary_dim:])


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_inverse_undoes_rotation(device, dtype, interleaved):
    q, k = qk(3, 5, (4, 2), 64, device, dtype)
    cos, sin = tables(48, device)
    positions = random_positions(3, 5, device)
    q_inv, k_inv = torch.ops.llama_ext.apply_rotary(q, k, cos, sin, positions, interleaved, True)
    check_against_reference(q, k, q_inv, k_inv, cos, sin, positions, interleaved, inverse=True)
    q_back, k_back = llama_ext.apply_rotary(q_inv, k_inv, cos, sin, positions, interleaved)
    # Back to the input, up to two roundings of the dtype and cos^2 + sin^2 = 1 in the fp32 tables.
    for back, x in ((q_back, q), (k_back, k)):
        there = rotary_reference(x, cos, sin, positions, interleaved, inverse=True)
        assert_close(back, rotary_reference(there, cos, sin, positions, interleaved), dtype, scale=2.0)
        assert_close(back, x, torch.float32 if dtype == torch.float64 else dtype, scale=2.0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("rotary_dim", [8, 24, 64])
def test_interleaved_matches_gptj_reference(device, dtype, rotary_dim):
    q, k = qk(2, 6, (5, 1), 64, device, dtype)
    cos, sin = tables(rotary_dim, device)
    positions = random_positions(2, 6, device)
    q_out, k_out = llama_ext.apply_rotary(q, k, cos, sin, positions, interleaved=True)
    assert_close(q_out, gptj_rotary_reference(q, cos, sin, positions), dtype)
    assert_close(k_out, gptj_rotary_reference(k, cos, sin, positions), dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params(CUDA_DTYPES))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_hf_apply_rotary_pos_emb(device, dtype, head_dim):
    """HF's eager code on [batch, heads, seq, head_dim] with its per-token cos/sin in q's dtype,
    fed to the fused op as transposed views. HF rounds cos/sin and each product to the dtype; the
    fused op rounds once, so it agrees with HF to HF's own error and is closer to float64."""
    b, s = 2, 9
    q = make((b, 12, s, head_dim), device, dtype)
    k = make((b, 4, s, head_dim), device, dtype)
    cos, sin = tables(head_dim, device)
    positions = random_positions(b, s, device)
    hf_q, hf_k = hf_apply_rotary_pos_emb(q, k, *hf_cos_sin(cos, sin, positions, dtype))
    q_out, k_out = llama_ext.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, positions)
    for ours, hf, x in ((q_out.transpose(1, 2), hf_q, q), (k_out.transpose(1, 2), hf_k, k)):
        assert_close(ours, hf, dtype, scale=4.0)
        exact = rotary_reference(x.transpose(1, 2), cos, sin, positions).transpose(1, 2)
        assert (ours.double() - exact).abs().mean() <= (hf.double() - exact).abs().mean()


# ---- positions, layouts, in place ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_positions_forms(device, pos_dtype):
    q, k = qk(2, 6, (4, 2), 64, device, torch.float32)
    cos, sin = tables(64, device)
    # None is 0..seq-1; [seq] broadcasts over the batch; [batch, seq] per token; offsets (decode).
    arange = torch.arange(6, device=device, dtype=pos_dtype)
    expected_none = llama_ext.apply_rotary(q, k, cos, sin, arange.expand(2, 6).contiguous())
    for got, ref in zip(llama_ext.apply_rotary(q, k, cos, sin, None), expected_none):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    for got, ref in zip(llama_ext.apply_rotary(q, k, cos, sin, arange), expected_none):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    offsets = (torch.tensor([[40], [80]], device=device) + torch.arange(6, device=device)).to(pos_dtype)
    q_out, k_out = llama_ext.apply_rotary(q, k, cos, sin, offsets)
    check_against_reference(q, k, q_out, k_out, cos, sin, offsets, False)
    strided = random_positions(2, 12, device, pos_dtype)[:, ::2]  # non-contiguous positions
    q_out, k_out = llama_ext.apply_rotary(q, k, cos, sin, strided)
    check_against_reference(q, k, q_out, k_out, cos, sin, strided, False)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_varlen_positions(device):
    """Batch 1 with per-token positions restarting at each packed sequence."""
    q, k = qk(1, 10, (4, 1), 128, device, torch.bfloat16)
    cos, sin = tables(128, device)
    positions = torch.cat([torch.arange(4), torch.arange(6)]).to(device)
    q_out, k_out = llama_ext.apply_rotary(q, k, cos, sin, positions)
    check_against_reference(q, k, q_out, k_out, cos, sin, positions, False)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_strided_inputs_no_copy(device, dtype, interleaved):
    b, s, n_q, n_kv, d = 2, 5, 6, 2, 64
    cos, sin = tables(48, device)
    positions = random_positions(b, s, device)
    # HF layout [b, h, s, d] as transposed views.
    q_hf, k_hf = make((b, n_q, s, d), device, dtype), make((b, n_kv, s, d), device, dtype)
    q_out, k_out = llama_ext.apply_rotary(q_hf.transpose(1, 2), k_hf.transpose(1, 2), cos, sin, positions, interleaved)
    assert q_out.transpose(1, 2).is_contiguous() and k_out.transpose(1, 2).is_contiguous()  # layout kept
    check_against_reference(q_hf.transpose(1, 2), k_hf.transpose(1, 2), q_out, k_out, cos, sin, positions, interleaved)
    # q and k as views into one fused qkv projection, rotated in place: v must stay untouched.
    qkv = make((b, s, n_q + 2 * n_kv, d), device, dtype)
    original = qkv.clone()
    q, k = qkv[:, :, :n_q], qkv[:, :, n_q : n_q + n_kv]
    returned = llama_ext.apply_rotary_(q, k, cos, sin, positions, interleaved)
    assert returned[0] is q and returned[1] is k
    q_ref, k_ref = original[:, :, :n_q], original[:, :, n_q : n_q + n_kv]
    check_against_reference(q_ref, k_ref, q, k, cos, sin, positions, interleaved)
    assert torch.equal(qkv[:, :, n_q + n_kv :], original[:, :, n_q + n_kv :])
    q_out, k_out = llama_ext.apply_rotary(q_ref, k_ref, cos, sin, positions, interleaved)
    assert q_out.is_contiguous() and k_out.is_contiguous()  # non-dense views give dense outputs
    check_against_reference(q_ref, k_ref, q_out, k_out, cos, sin, positions, interleaved)
    # Rows offset by one element: no 16-byte alignment, so CUDA takes its scalar path.
    flat = make((b, s, n_q * d + 1), device, dtype)
    q_odd = flat[:, :, 1:].view(b, s, n_q, d)
    q_out, k_out = llama_ext.apply_rotary(q_odd, q_odd[:, :, :n_kv], cos, sin, positions, interleaved)
    check_against_reference(q_odd, q_odd[:, :, :n_kv], q_out, k_out, cos, sin, positions, interleaved)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_inplace_matches_out_of_place(device, dtype, interleaved):
    q, k = qk(2, 7, (5, 1), 80, device, dtype)
    cos, sin = tables(40, device)
    positions = random_positions(2, 7, device, torch.int32)
    q_ref, k_ref = llama_ext.apply_rotary(q, k, cos, sin, positions, interleaved)
    llama_ext.apply_rotary_(q, k, cos, sin, positions, interleaved)
    torch.testing.assert_close(q, q_ref, atol=0, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=0, rtol=0)


def _offsets(t):
    """The storage offsets of t's elements, as a set."""
    idx = torch.tensor(t.storage_offset())
    for size, stride in zip(t.shape, t.stride()):
        idx = (idx.unsqueeze(-1) + torch.arange(size) * stride).flatten()
    return set(idx.tolist())


def _rotates_in_place_unless(overlap, message, buffer, q, k, cos, sin):
    """apply_rotary_ on q (a view into `buffer`) and k: where they overlap, refused with `message`,
    writing nothing; else rotated as out of place. Whether it rotated."""
    before = buffer.clone()
    if overlap:
        with pytest.raises(RuntimeError, match=message):
            llama_ext.apply_rotary_(q, k, cos, sin)
        assert torch.equal(buffer, before)
        return False
    q_ref, k_ref = llama_ext.apply_rotary(q, k, cos, sin)
    llama_ext.apply_rotary_(q, k, cos, sin)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    return True


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_views_of_one_buffer(device):
    """q and k written in place as strided views of one buffer (slices of a fused qkv, at any
    head and token strides and offsets), which ATen's overlap check cannot resolve: refused,
    naming both and writing nothing, exactly when some element of q is one of k (brute force over
    their offsets); otherwise rotated as out of place."""
    gen = torch.Generator().manual_seed(0)
    buffer = torch.randn(4096, generator=gen).to(device)
    cos, sin = tables(8, device)
    refused = ran = 0
    for _ in range(300):
        d, seq = 8, int(torch.randint(1, 4, (), generator=gen))
        views = []
        for heads in (int(torch.randint(1, 4, (), generator=gen)), int(torch.randint(1, 3, (), generator=gen))):
            inner = int(torch.randint(d, 3 * d + 1, (), generator=gen))
            gap = int(torch.randint(0, 3 * d, (), generator=gen))
            if torch.rand((), generator=gen) < 0.5:  # [.., seq, heads, d] rows
                head_stride, token_stride = inner, heads * inner + gap
            else:  # heads outermost, as HF's [batch, heads, seq, d] transposed
                token_stride, head_stride = inner, seq * inner + gap
            offset = int(torch.randint(0, 2 * d * 8, (), generator=gen))
            views.append(buffer.as_strided((1, seq, heads, d), (4096, token_stride, head_stride, 1), offset))
        q, k = views
        overlap = bool(_offsets(q) & _offsets(k))
        if _rotates_in_place_unless(overlap, "q and k overlap in memory", buffer, q, k, cos, sin):
            ran += 1
        else:
            refused += 1
    assert refused > 30 and ran > 30, (refused, ran)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_view_that_overlaps_itself(device):
    """q written in place as a strided view of a buffer at any head and token strides (some of
    which make two of its elements one, which ATen's check cannot tell): refused, naming q and
    writing nothing, exactly when two of its offsets coincide (brute force); otherwise rotated as
    out of place."""
    gen = torch.Generator().manual_seed(1)
    buffer = torch.randn(4096, generator=gen).to(device)
    cos, sin = tables(8, device)
    k = torch.randn(1, 3, 1, 8, generator=gen).to(device)
    refused = ran = 0
    for _ in range(300):
        seq, heads = int(torch.randint(2, 4, (), generator=gen)), int(torch.randint(2, 4, (), generator=gen))
        head_stride, token_stride = (int(torch.randint(1, 40, (), generator=gen)) for _ in range(2))
        q = buffer.as_strided((1, seq, heads, 8), (4096, token_stride, head_stride, 1), 16)
        overlap = len(_offsets(q)) < q.numel()
        if _rotates_in_place_unless(overlap, "q is written in place", buffer, q, k[:, :seq].clone(), cos, sin):
            ran += 1
        else:
            refused += 1
    assert refused > 30 and ran > 30, (refused, ran)


def test_inplace_refuses_autograd():
    q = torch.randn(1, 2, 2, 8, requires_grad=True)
    cos, sin = tables(8, "cpu")
    with pytest.raises(RuntimeError, match="no autograd"):
        llama_ext.apply_rotary_(q, torch.randn(1, 2, 1, 8), cos, sin)


# ---- autograd -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_backward_matches_float64(device, dtype, interleaved):
    q, k = qk(2, 6, (4, 2), 80, device, dtype)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = tables(64, device)
    positions = random_positions(2, 6, device)
    g_q, g_k = make(q.shape, device, dtype), make(k.shape, device, dtype)
    q_out, k_out = llama_ext.apply_rotary(q, k, cos, sin, positions, interleaved)
    torch.autograd.backward([q_out, k_out], [g_q, g_k])
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    refs = [rotary_reference(t, cos, sin, positions, interleaved) for t in (q64, k64)]
    torch.autograd.backward(refs, [g_q.double(), g_k.double()])
    assert_close(q.grad, q64.grad, dtype)
    assert_close(k.grad, k64.grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_with_one_output_used(device):
    """Only q_out feeds the loss: k's gradient is zero, and expanded incoming grads are fine."""
    q, k = qk(1, 4, (2, 1), 64, device, torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = tables(64, device)
    q_out, _ = llama_ext.apply_rotary(q, k, cos, sin)
    q_out.sum().backward()
    ones = torch.ones_like(q, dtype=torch.float64)
    torch.testing.assert_close(q.grad.double(), rotary_reference(ones, cos, sin, inverse=True))
    assert torch.equal(k.grad, torch.zeros_like(k))


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_gradcheck_float64(table_dtype, interleaved):
    q = torch.randn(2, 3, 3, 10, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 10, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(6, "cpu", dtype=table_dtype)
    positions = random_positions(2, 3, "cpu", max_position=MAX_POSITION)
    assert torch.autograd.gradcheck(lambda a, b: llama_ext.apply_rotary(a, b, cos, sin, positions, interleaved), (q, k))
    assert torch.autograd.gradgradcheck(
        lambda a, b: llama_ext.apply_rotary(a, b, cos, sin, positions, interleaved), (q, k)
    )


# ---- torch.library / torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_opcheck(device, dtype):
    q, k = qk(2, 3, (3, 1), 16, device, dtype)
    cos, sin = tables(12, device)
    positions = random_positions(2, 3, device, torch.int32)
    args = (q.requires_grad_(), k.requires_grad_(), cos, sin)
    opcheck(torch.ops.llama_ext.apply_rotary, args + (positions, False, False))
    opcheck(torch.ops.llama_ext.apply_rotary, args + (None, True, True))
    opcheck(torch.ops.llama_ext.apply_rotary_, (q.detach().clone(), k.detach().clone(), cos, sin, positions, False, False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: the real compiler, with codegen
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, backend):
    rope = llama_ext.RotaryEmbedding(64, max_position_embeddings=128).to(device)

    def attention_inputs(q, k, positions):
        q2, k2 = rope(q * 2.0, k, positions)
        return q2.sum(-1) + k2.sum(-1).mean(-1, keepdim=True)

    compiled = torch.compile(attention_inputs, fullgraph=True, backend=backend)
    q, k = qk(2, 5, (4, 2), 64, device, torch.float32)
    q.requires_grad_()
    positions = random_positions(2, 5, device, max_position=128)
    out = compiled(q, k, positions)
    torch.testing.assert_close(out, attention_inputs(q, k, positions))
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


# ---- tables and module against HF transformers --------------------------------------------------

HEAD_DIM, MAX_POS, ORIGINAL_MAX = 64, 256, 64
ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_MAX},
    "yarn-mscale": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_MAX,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2,
    },
    "longrope": {
        "rope_type": "longrope", "original_max_position_embeddings": ORIGINAL_MAX,
        "long_factor": [1.0 + i / 8 for i in range(HEAD_DIM // 2)],
        "short_factor": [1.0 + i / 64 for i in range(HEAD_DIM // 2)],
    },
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL_MAX,
    },
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.25},
    "proportional-factor": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0},
}


def hf_rotary_embedding(rope_scaling, base, device):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = dict(rope_scaling or {"rope_type": "default"}, rope_theta=base)
    config = transformers.LlamaConfig(
        hidden_size=8 * HEAD_DIM, num_attention_heads=8, head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS, rope_parameters=params,
    )
    return LlamaRotaryEmbedding(config).to(device)


def test_every_hf_rope_type_has_tables():
    """The rope types this transformers knows (its ROPE_INIT_FUNCTIONS, and "default") are the ones
    rope_cos_sin builds, each checked against HF's tables below."""
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    hf_types = set(rope_utils.ROPE_INIT_FUNCTIONS) | {"default"}
    assert hf_types <= set(llama_ext.rope.ROPE_TYPES), sorted(hf_types - set(llama_ext.rope.ROPE_TYPES))
    assert set(llama_ext.rope.ROPE_TYPES) <= {name.split("-")[0] for name in ROPE_SCALINGS}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
def test_tables_match_hf_rotary_embedding(device, name):
    base = 500000.0
    hf = hf_rotary_embedding(ROPE_SCALINGS[name], base, device)
    # longrope's initial tables are its short ones: positions within original_max.
    seq = ORIGINAL_MAX if name == "longrope" else MAX_POS
    positions = torch.arange(seq, device=device)[None]
    x = torch.zeros(1, device=device)
    hf_cos, hf_sin = hf(x, positions)
    cos, sin = llama_ext.rope_cos_sin(HEAD_DIM, MAX_POS, base, ROPE_SCALINGS[name], device=device)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (MAX_POS, HEAD_DIM // 2)
    ours_cos, ours_sin = hf_cos_sin(cos, sin, positions, torch.float32)
    # Same float32 ops in the same order as HF: equal up to the last bit of fp32.
    torch.testing.assert_close(ours_cos, hf_cos, atol=2e-7, rtol=0)
    torch.testing.assert_close(ours_sin, hf_sin, atol=2e-7, rtol=0)
    if name.startswith("yarn") or name == "longrope":  # attention scaling is folded in
        assert hf.attention_scaling != 1.0
        assert cos[0, 0].item() == pytest.approx(hf.attention_scaling)


def test_longrope_long_tables_are_built_where_the_tables_are():
    """HF builds longrope's long-factor tables in its forward, on the activations' device (a GPU's
    pow rounds differently from the CPU's): the module builds them at the first call past
    original_max_position_embeddings, on its tables' device (meta here, as a module moved there)."""
    rope = llama_ext.RotaryEmbedding(HEAD_DIM, MAX_POS, 10000.0, ROPE_SCALINGS["longrope"]).to("meta")
    assert rope.long_cos_cached is None
    seq = 2 * ORIGINAL_MAX
    rope(torch.empty(1, seq, 4, HEAD_DIM, device="meta"), torch.empty(1, seq, 2, HEAD_DIM, device="meta"))
    assert rope.long_cos_cached.device.type == "meta" and rope.long_cos_cached.shape == (MAX_POS, HEAD_DIM // 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
def test_module_matches_hf(device, name):
    """RotaryEmbedding + fused op against LlamaRotaryEmbedding + apply_rotary_pos_emb, with
    positions past max_position_embeddings for dynamic (NTK growth, then reset) and past
    original_max_position_embeddings for longrope (long factors)."""
    hf = hf_rotary_embedding(ROPE_SCALINGS[name], 10000.0, device)
    rope = llama_ext.RotaryEmbedding(HEAD_DIM, MAX_POS, 10000.0, ROPE_SCALINGS[name]).to(device)
    lengths = {"dynamic": [40, 2 * MAX_POS + 3, 40], "longrope": [40, 2 * ORIGINAL_MAX]}.get(name, [MAX_POS])
    for seq in lengths:
        q_hf, k_hf = make((1, 4, seq, HEAD_DIM), device, torch.float32), make((1, 2, seq, HEAD_DIM), device, torch.float32)
        positions = torch.arange(seq, device=device)[None]
        hf_q, hf_k = hf_apply_rotary_pos_emb(q_hf, k_hf, *hf(q_hf, positions))
        q_out, k_out = rope(q_hf.transpose(1, 2), k_hf.transpose(1, 2), positions)
        # fp32 HF vs fp32 fused: the same table values, rounding differs by an ulp or two.
        torch.testing.assert_close(q_out.transpose(1, 2), hf_q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k_out.transpose(1, 2), hf_k, atol=1e-5, rtol=1e-5)
    if name == "dynamic":
        assert rope.max_seq_len_cached == MAX_POS  # back to the original tables after the short call


@pytest.mark.parametrize("device", DEVICES)
def test_module_partial_rotary(device):
    rope = llama_ext.RotaryEmbedding(80, 128, partial_rotary_factor=0.5).to(device)
    assert rope.cos_cached.shape == (128, 20)
    q, k = qk(2, 5, (5, 1), 80, device, torch.float32)
    positions = random_positions(2, 5, device, max_position=128)
    q_out, k_out = rope(q, k, positions)
    check_against_reference(q, k, q_out, k_out, rope.cos_cached, rope.sin_cached, positions, False)
    assert torch.equal(q_out[..., 40:], q[..., 40:])
    assert "rotary_dim=40" in repr(rope)


def test_rope_cos_sin_errors():
    with pytest.raises(ValueError, match="unknown rope_type 'ntk'"):
        llama_ext.rope_cos_sin(64, 128, rope_scaling={"rope_type": "ntk"})
    with pytest.raises(ValueError, match="missing required key.*factor"):
        llama_ext.rope_cos_sin(64, 128, rope_scaling={"rope_type": "linear"})
    with pytest.raises(ValueError, match="low_freq_factor, high_freq_factor"):
        llama_ext.rope_cos_sin(64, 128, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="short_factor must have rotary_dim // 2 = 32"):
        llama_ext.rope_cos_sin(64, 128, rope_scaling={"rope_type": "longrope", "long_factor": [1.0], "short_factor": [1.0]})
    with pytest.raises(ValueError, match="rotary_dim must be an even number"):
        llama_ext.rope_cos_sin(7, 128)
    with pytest.raises(ValueError, match="even number in"):
        llama_ext.RotaryEmbedding(64, partial_rotary_factor=1.5)
    with pytest.raises(ValueError, match="proportional rope spans the whole head"):
        llama_ext.RotaryEmbedding(64, rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.25},
                                  partial_rotary_factor=0.5)
    # legacy "type" spelling is accepted
    cos, _ = llama_ext.rope_cos_sin(8, 4, rope_scaling={"type": "linear", "factor": 2.0})
    torch.testing.assert_close(cos, llama_ext.rope_cos_sin(8, 4, rope_scaling={"rope_type": "linear", "factor": 2.0})[0])


# ---- empty and bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["batch0", "seq0"])
def test_empty(device, shape):
    b, s = shape
    q, k = qk(b, s, (4, 2), 64, device, torch.float32)
    q.requires_grad_()
    cos, sin = tables(64, device)
    q_out, k_out = llama_ext.apply_rotary(q, k, cos, sin, torch.zeros(b, s, dtype=torch.long, device=device))
    assert q_out.shape == q.shape and k_out.shape == k.shape
    q_out.sum().backward()
    assert q.grad.shape == q.shape
    llama_ext.apply_rotary_(q.detach(), k, cos, sin)
    # zero kv heads is legal too
    q_out, k_out = llama_ext.apply_rotary(q.detach(), k[:, :, :0], cos, sin)
    assert k_out.shape == (b, s, 0, 64)


def _args(device, **overrides):
    args = dict(
        q=make((2, 3, 4, 16), device, torch.float32),
        k=make((2, 3, 2, 16), device, torch.float32),
        cos=torch.ones(8, 8, device=device),
        sin=torch.zeros(8, 8, device=device),
        positions=None,
    )
    args.update({key: (value(device) if callable(value) else value) for key, value in overrides.items()})
    return args


BAD_INPUTS = [
    ("integer q", dict(q=lambda d: torch.ones(2, 3, 4, 16, dtype=torch.int32, device=d)), TypeError, "floating-point"),
    ("k dtype", dict(k=lambda d: torch.ones(2, 3, 2, 16, dtype=torch.float16, device=d)), TypeError, "k must have the same dtype"),
    ("q 3-dim", dict(q=lambda d: torch.ones(6, 4, 16, device=d)), ValueError, r"q must be a 4-dim tensor, got 3 dims with shape \[6, 4, 16\]"),
    ("k seq", dict(k=lambda d: torch.ones(2, 4, 2, 16, device=d)), ValueError, "k must be \\[batch, seq, n_kv_heads"),
    ("k head_dim", dict(k=lambda d: torch.ones(2, 3, 2, 8, device=d)), ValueError, "k must be \\[batch, seq, n_kv_heads"),
    ("last dim strided", dict(q=lambda d: torch.ones(2, 3, 16, 4, device=d).transpose(2, 3)), RuntimeError, "contiguous in its last"),
    ("fp16 cos", dict(cos=lambda d: torch.ones(8, 8, dtype=torch.float16, device=d)), TypeError, "cos must be float32"),
    ("sin dtype", dict(sin=lambda d: torch.ones(8, 8, dtype=torch.float64, device=d)), TypeError, "sin must have the same dtype"),
    ("cos 1-dim", dict(cos=lambda d: torch.ones(8, device=d)), ValueError, "cos must be a 2-dim"),
    ("sin shape", dict(sin=lambda d: torch.ones(8, 4, device=d)), ValueError, "sin must have the same shape"),
    ("rotary_dim > head_dim", dict(cos=lambda d: torch.ones(8, 9, device=d), sin=lambda d: torch.ones(8, 9, device=d)), ValueError, "rotary_dim <= head_dim"),
    ("positions float", dict(positions=lambda d: torch.zeros(2, 3, device=d)), TypeError, "positions must be int32 or int64"),
    ("positions shape", dict(positions=lambda d: torch.zeros(3, 2, dtype=torch.long, device=d)), ValueError, "positions must be \\[batch, seq\\]"),
    ("seq past table", dict(cos=lambda d: torch.ones(2, 8, device=d), sin=lambda d: torch.ones(2, 8, device=d)), IndexError, "out of range for the cos/sin table of 2"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(device, case):
    _, overrides, exc, message = case
    args = _args(device, **overrides)
    with pytest.raises(exc, match=message):
        llama_ext.apply_rotary(**args)
    with pytest.raises(exc, match=message):
        llama_ext.apply_rotary_(**args)


@pytest.mark.parametrize("bad_position", [8, -1])
def test_position_out_of_table_cpu(bad_position):
    args = _args("cpu")
    q_before = args["q"].clone()
    positions = torch.zeros(2, 3, dtype=torch.int32)
    positions[1, 2] = bad_position
    with pytest.raises(IndexError, match=f"positions\\[b, s\\] has a value {bad_position} .*batch 1, seq 2.*table of 8"):
        llama_ext.apply_rotary(**dict(args, positions=positions))
    with pytest.raises(IndexError, match="table of 8 positions"):
        llama_ext.apply_rotary_(**dict(args, positions=positions[1]))
    assert torch.equal(args["q"], q_before)  # checked before anything is written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_position_out_of_table_cuda_device_assert():
    """A device-side assert poisons the CUDA context, so it runs in a child process."""
    code = (
        "import torch, llama_ext\n"
        "q = torch.randn(1, 4, 2, 64, device='cuda'); k = torch.randn(1, 4, 1, 64, device='cuda')\n"
        "cos, sin = llama_ext.rope_cos_sin(64, 16, device='cuda')\n"
        "pos = torch.tensor([0, 1, 16, 2], device='cuda')\n"
        "llama_ext.apply_rotary(q, k, cos, sin, pos)\n"
        "torch.cuda.synchronize()\n"
    )
    assert_device_assert(code, "position outside the cos/sin table")


def test_devices_must_match():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU for a second device")
    args = _args("cuda", cos=lambda d: torch.ones(8, 8), sin=lambda d: torch.zeros(8, 8))
    with pytest.raises(RuntimeError, match="cos must be on the same device"):
        llama_ext.apply_rotary(**args)
    with pytest.raises(TypeError, match="float64"):
        llama_ext.apply_rotary(**_args("cuda", q=lambda d: torch.ones(2, 3, 4, 16, dtype=torch.float64, device=d),
                                       k=lambda d: torch.ones(2, 3, 2, 16, dtype=torch.float64, device=d)))


# ---- the CUDA kernel's own PTX, run on the CPU (tools/ptx_run.py) ---------------------------------
# The host side of rotary.cu's launch(), for the interpreter: its parameter struct (checked against
# the kernel's parameter size) and its block shape rule.

class _Operand(ctypes.Structure):
    _fields_ = [("src", ctypes.c_uint64), ("dst", ctypes.c_uint64), ("src_stride", ctypes.c_int64 * 3),
                ("dst_stride", ctypes.c_int64 * 3), ("heads", ctypes.c_int32)]


class _Tables(ctypes.Structure):
    _fields_ = [("cos", ctypes.c_uint64), ("sin", ctypes.c_uint64), ("cos_stride", ctypes.c_int64),
                ("sin_stride", ctypes.c_int64), ("positions", ctypes.c_uint64), ("positions_int64", ctypes.c_bool),
                ("pos_batch_stride", ctypes.c_int64), ("pos_seq_stride", ctypes.c_int64)]


class _RotaryParams(ctypes.Structure):
    _fields_ = [("q", _Operand), ("k", _Operand), ("tables", _Tables), ("tokens", ctypes.c_int64),
                ("seq", ctypes.c_int64), ("max_position", ctypes.c_int64), ("head_dim", ctypes.c_int32),
                ("half", ctypes.c_int32), ("rotary_chunks", ctypes.c_int32), ("pass_chunks", ctypes.c_int32),
                ("inverse", ctypes.c_bool), ("copy_pass_through", ctypes.c_bool)]


def _rotary_in_ptx(q, k, cos, sin, positions, interleaved, inverse, in_place, block=None):
    """rotary_kernel's PTX over (q, k), as rotary.cu's launcher would launch it (or with `block`);
    returns (q_out, k_out) and the launch."""
    elem = q.element_size()
    vec = 16 // elem
    half = cos.shape[1]
    span = 2 * half if interleaved else half
    vectorized = span % vec == 0 and all(
        t.stride(d) * elem % 16 == 0 or t.shape[d] == 1 for t in (q, k) for d in range(3)) and q.shape[3] % vec == 0
    kind = f"rotary_kernel<{CUDA_TYPE_NAMES[q.dtype]}, {str(vectorized).lower()}, {str(interleaved).lower()}>"
    run, program = ptx_kernel("rotary", kind)
    mem = run.DeviceMemory()
    q_out = q.clone() if in_place else torch.full_like(q, float("nan"))
    k_out = k.clone() if in_place else torch.full_like(k, float("nan"))
    addresses = {}

    def device(t, name):
        addresses[name] = mem.upload(t, name)
        return addresses[name]

    def operand(src, dst, name):
        op = _Operand(device(src, name) if not in_place else 0, 0, (0, 0, 0), (0, 0, 0), src.shape[2])
        op.dst = device(dst, name + "_out")
        if in_place:
            op.src = op.dst
        strides = [0 if src.shape[d] == 1 else src.stride(d) for d in range(3)]
        op.src_stride[:] = strides
        op.dst_stride[:] = [0 if dst.shape[d] == 1 else dst.stride(d) for d in range(3)]
        return op

    p = _RotaryParams()
    p.q, p.k = operand(q, q_out, "q"), operand(k, k_out, "k")
    p.tables.cos, p.tables.sin = device(cos, "cos"), device(sin, "sin")
    p.tables.cos_stride, p.tables.sin_stride = cos.stride(0), sin.stride(0)
    if positions is not None:
        p.tables.positions = device(positions, "positions")
        p.tables.positions_int64 = positions.dtype == torch.int64
        p.tables.pos_batch_stride, p.tables.pos_seq_stride = (
            (0, positions.stride(0)) if positions.dim() == 1 else (positions.stride(0), positions.stride(1)))
    p.tokens, p.seq, p.max_position = q.shape[0] * q.shape[1], q.shape[1], cos.shape[0]
    p.head_dim, p.half = q.shape[3], half
    chunk = vec if vectorized else (2 if interleaved else 1)
    p.rotary_chunks = span // chunk
    p.pass_chunks = 0 if in_place else (q.shape[3] - 2 * half) // (chunk if vectorized else 1)
    p.inverse, p.copy_pass_through = inverse, not in_place
    assert ctypes.sizeof(p) == program.kernel.params[0].size
    if block is None:  # launch()'s rule
        heads = q.shape[2] + k.shape[2]
        groups = -(-heads // 2)
        bx = min(max(p.rotary_chunks, p.pass_chunks), 128)
        rounds = -(-groups // max(1, 512 // bx))
        by = -(-groups // rounds)
        block = (bx, by, max(1, min(p.tokens, 128 // (bx * by), 64)))
    launch = program.launch(mem, [bytes(p)], grid=(-(-p.tokens // block[2]),), block=block)
    return (mem.download(addresses["q_out"], q_out), mem.download(addresses["k_out"], k_out)), launch


@emulation_only_on_cpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("rotary_dim,interleaved", [(32, False), (48, True), (20, False), (20, True)],
                         ids=["half-vector", "interleaved-vector", "half-scalar", "interleaved-scalar"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "inplace"])
def test_cuda_kernel_in_ptx_matches_float64(dtype, rotary_dim, interleaved, in_place):
    """rotary_kernel as compiled (its embedded PTX, thread by thread in tools/ptx_run.py): 3 q heads
    and 2 k heads (a thread's head pair straddles q and k, and the last pair has one head), partial
    rotary with pass-through dims, positions, the inverse, the launcher's block shape and one that
    loops over chunks, heads and tokens; every element written, none outside the tensors."""
    q, k = qk(2, 3, (3, 2), 64, "cpu", dtype)
    cos, sin = tables(rotary_dim, "cpu", max_position=16)
    positions = random_positions(2, 3, "cpu", torch.int32, max_position=16)
    for inverse, block in ((False, None), (True, (1, 1, 2))):
        (q_out, k_out), _ = _rotary_in_ptx(q, k, cos, sin, positions, interleaved, inverse, in_place, block)
        for x, out in ((q, q_out), (k, k_out)):
            expected = rotary_reference(x, cos, sin, positions, interleaved, inverse)
            assert_close(out, expected, dtype)
