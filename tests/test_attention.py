import types

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import llama_ext
from llama_ext.reference import (
    causal_mask_bottom_right,
    gqa_attention_reference,
    gqa_attention_varlen_reference,
    hf_eager_attention,
)

# The CUDA kernels have instantiations for CUDA_HEAD_DIMS only; the CPU takes any multiple of 8.
from conftest import (CUDA_DTYPES, CUDA_HEAD_DIMS, DECODE_ROUTE_MAX_SEQ_Q, DEVICES, assert_close,
                      check_kernel_emulation, device_dtype_params, emulation_only_on_cpu)


def make(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


def cuda_rejects(device, q, k, v):
    """CUDA has kernels for CUDA_HEAD_DIMS only and must refuse any other head_dim with a clear
    ValueError, never wrong output. Checks that and returns True when the case ends there."""
    if device != "cuda" or q.shape[-1] in CUDA_HEAD_DIMS:
        return False
    with pytest.raises(ValueError, match="not supported by the CUDA attention kernels"):
        llama_ext.gqa_attention(q, k, v)
    return True


def qkv(batch, seq_q, seq_k, n_q, n_kv, d, device, dtype):
    return (
        make((batch, seq_q, n_q, d), device, dtype),
        make((batch, seq_k, n_kv, d), device, dtype),
        make((batch, seq_k, n_kv, d), device, dtype),
    )


def assert_lse_close(lse, expected, dtype):
    # lse is computed in fp32 (fp64 for fp64) from the exact inputs, whatever their dtype.
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(lse, expected, torch.float64 if dtype == torch.float64 else torch.float32, scale=2.0)


# (batch, seq_q, seq_k, n_q_heads, n_kv_heads, head_dim, causal)
FORWARD_CASES = [
    (2, 17, 17, 32, 8, 128, True),
    (1, 127, 127, 12, 4, 64, True),
    (2, 129, 129, 8, 1, 32, False),
    (1, 129, 300, 8, 8, 80, True),  # seq_q < seq_k: bottom-right diagonal
    (1, 300, 129, 5, 5, 96, True),  # seq_q > seq_k: the first rows see no key
    (3, 1, 1, 8, 1, 256, True),
    (1, 1, 1000, 32, 8, 128, True),  # decode step over a long cache
    (1, 1000, 1000, 4, 2, 40, True),
    (2, 3, 130, 8, 2, 8, False),
    (1, 64, 17, 8, 1, 256, False),
    (2, 37, 45, 5, 5, 32, True),
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "b{}-q{}-k{}-h{}/{}-d{}-{}".format(*c[:6], "causal" if c[6] else "full"))
def test_forward_matches_float64(device, dtype, case):
    batch, seq_q, seq_k, n_q, n_kv, d, causal = case
    q, k, v = qkv(batch, seq_q, seq_k, n_q, n_kv, d, device, dtype)
    if cuda_rejects(device, q, k, v):
        return
    out, lse = llama_ext.gqa_attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = gqa_attention_reference(q, k, v, causal)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (batch, n_q, seq_q)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    assert torch.equal(llama_ext.gqa_attention(q, k, v, causal=causal), out)


@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("d", [8, 32, 40, 64, 80, 96, 128, 256])
def test_every_head_dim(device, dtype, d):
    q, k, v = qkv(2, 33, 33, 6, 2, d, device, dtype)
    if cuda_rejects(device, q, k, v):
        return
    out, lse = llama_ext.gqa_attention(q, k, v, return_lse=True)
    ref_out, ref_lse = gqa_attention_reference(q, k, v)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.bfloat16, torch.float16]))
@pytest.mark.parametrize("d", [8, 40, 80, 96, 256])
@pytest.mark.parametrize("seq_k", [129, 135, 136, 137, 143, 144, 145, 263])
def test_key_block_and_row_tails(device, dtype, d, seq_k):
    """Tails of the blocked products: 1, 7, 8, 9, 15, 16 and 17 keys past a full 128-key block
    (and 7 past a 256-key one, the bf16 CPU forward's block),
    7 query rows per head (an odd number of rows per group), head dims off the vector width, and a
    window whose first key is not a multiple of 16. The outputs start as NaN (poisoned), so an
    unwritten or over-read column fails."""
    q, k, v = qkv(1, 7, seq_k, 6, 2, d, device, dtype)
    if cuda_rejects(device, q, k, v):
        return
    for causal, window in [(True, (-1, -1)), (False, (-1, -1)), (True, (seq_k - 11, 0))]:
        out, lse = llama_ext.gqa_attention(q, k, v, causal=causal, return_lse=True, window_size=window)
        ref_out, ref_lse = gqa_attention_reference(q, k, v, causal, None, window)
        assert_close(out, ref_out, dtype)
        assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_give_zeros_and_zero_lse(device):
    q, k, v = qkv(1, 10, 4, 4, 2, 32, device, torch.float32)
    out, lse = llama_ext.gqa_attention(q, k, v, causal=True, return_lse=True)
    # Bottom-right: query i sees keys j <= i - 6, so rows 0..5 see nothing.
    assert torch.equal(out[:, :6], torch.zeros_like(out[:, :6]))
    assert torch.equal(lse[:, :, :6], torch.zeros_like(lse[:, :, :6]))
    assert (out[:, 6:].abs().sum(-1) > 0).all()
    q, k, v = qkv(1, 3, 0, 4, 2, 32, device, torch.float32)
    out, lse = llama_ext.gqa_attention(q, k, v, causal=False, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.zeros_like(lse))


@pytest.mark.parametrize("device,dtype", device_dtype_params(CUDA_DTYPES))
@pytest.mark.parametrize("seq_q,seq_k,causal", [(129, 129, True), (17, 200, False), (1, 1, True)])
def test_matches_torch_sdpa(device, dtype, seq_q, seq_k, causal):
    """SDPA aligns its causal mask top-left: compare only where that agrees (square or non-causal)."""
    q, k, v = qkv(2, seq_q, seq_k, 12, 4, 64, device, dtype)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    assert_close(llama_ext.gqa_attention(q, k, v, causal=causal), expected, dtype, scale=2.0)


@pytest.mark.parametrize("device,dtype", device_dtype_params(CUDA_DTYPES))
@pytest.mark.parametrize("seq_q,seq_k", [(17, 17), (5, 127), (1, 129)])
def test_matches_hf_eager_attention_forward(device, dtype, seq_q, seq_k):
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import eager_attention_forward

    n_q, n_kv, d = 8, 2, 64
    q, k, v = qkv(2, seq_q, seq_k, n_q, n_kv, d, device, dtype)
    visible = causal_mask_bottom_right(seq_q, seq_k, device)
    mask = torch.zeros(seq_q, seq_k, device=device, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    module = types.SimpleNamespace(num_key_value_groups=n_q // n_kv, training=False)
    hf_out, _ = eager_attention_forward(
        module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask[None, None], scaling=d**-0.5
    )
    ours = llama_ext.gqa_attention(q, k, v, causal=True)
    # HF rounds the probabilities to the input dtype before the second matmul: one more rounding.
    assert_close(ours, hf_out, dtype, scale=2.0)
    assert_close(hf_eager_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), hf_out, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_hf_layout_views(device, dtype):
    """[b, h, s, d] tensors passed as transpose views: strided, last dim contiguous, no copy."""
    q = make((2, 8, 40, 64), device, dtype).transpose(1, 2)
    k = make((2, 2, 50, 64), device, dtype).transpose(1, 2)
    v = make((2, 2, 50, 64), device, dtype)[:, :, :, :].transpose(1, 2)
    assert not q.is_contiguous()
    out = llama_ext.gqa_attention(q, k, v)
    assert_close(out, gqa_attention_reference(q, k, v)[0], dtype)


def make_varlen(lens_q, lens_k, n_q, n_kv, d, device, dtype):
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    q = make((sum(lens_q), n_q, d), device, dtype)
    k = make((sum(lens_k), n_kv, d), device, dtype)
    v = make((sum(lens_k), n_kv, d), device, dtype)
    return q, k, v, cu_q, cu_k


VARLEN_CASES = [
    # lens_q, lens_k, causal
    ([5, 0, 300, 1, 129], [5, 0, 300, 40, 129], True),
    ([17, 3, 200], [17, 0, 250], True),  # a sequence with queries but no keys
    ([64, 1, 130], [10, 500, 130], False),
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", VARLEN_CASES, ids=["mixed", "no-keys", "full"])
def test_varlen_matches_float64(device, dtype, case):
    lens_q, lens_k, causal = case
    q, k, v, cu_q, cu_k = make_varlen(lens_q, lens_k, 12, 4, 64, device, dtype)
    out, lse = llama_ext.gqa_attention_varlen(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_lse=True
    )
    ref_out, ref_lse = gqa_attention_varlen_reference(q, k, v, cu_q, cu_k, causal)
    assert out.shape == q.shape and lse.shape == (12, q.shape[0])
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_equals_batched_per_sequence(device):
    """Packing sequences changes nothing: each one equals its own batched call."""
    lens = [7, 130, 1]
    q, k, v, cu_q, cu_k = make_varlen(lens, lens, 8, 2, 32, device, torch.float32)
    out = llama_ext.gqa_attention_varlen(q, k, v, cu_q, cu_k, max(lens), max(lens))
    for b, (start, end) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist())):
        single = llama_ext.gqa_attention(q[None, start:end], k[None, start:end], v[None, start:end])[0]
        if device == "cpu" and end - start > DECODE_ROUTE_MAX_SEQ_Q:  # one code path on the CPU: identical bits
            assert torch.equal(out[start:end], single), f"sequence {b}"
        else:
            assert_close(out[start:end], single, torch.float32)


def grads_of(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.autograd.backward(fn(*leaves), grad_out)
    return [t.grad for t in leaves]


# (batch, seq_q, seq_k, n_q_heads, n_kv_heads, head_dim, causal)
BACKWARD_CASES = [
    (2, 17, 17, 8, 2, 64, True),
    (1, 129, 300, 12, 4, 32, True),
    (1, 300, 129, 5, 5, 80, True),
    (2, 127, 127, 8, 1, 128, False),
    (1, 1, 257, 8, 2, 256, True),
    (1, 45, 70, 6, 2, 96, True),
    # Head dims off the 16-column vector width and an odd row count per group (CPU only).
    (2, 3, 130, 8, 2, 8, False),
    (1, 33, 47, 3, 3, 40, True),
    # Row tiles of 16 and 32 with tails (3 heads x 67 rows), key blocks ending 13 keys into a
    # 32-key step, keys in several backward chunks.
    (1, 200, 333, 6, 2, 128, True),
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: "b{}-q{}-k{}-h{}/{}-d{}-{}".format(*c[:6], "causal" if c[6] else "full"))
def test_backward_matches_float64(device, dtype, case):
    batch, seq_q, seq_k, n_q, n_kv, d, causal = case
    q, k, v = qkv(batch, seq_q, seq_k, n_q, n_kv, d, device, dtype)
    if cuda_rejects(device, q, k, v):
        return
    grad_out = make(q.shape, device, dtype)
    got = grads_of(lambda a, b, c: llama_ext.gqa_attention(a, b, c, causal=causal), (q, k, v), grad_out)
    expected = grads_of(lambda a, b, c: gqa_attention_reference(a, b, c, causal)[0], [t.double() for t in (q, k, v)], grad_out.double())
    # Gradients sum over up to seq_q * group terms, each rounded once to the dtype.
    for name, g, e in zip("qkv", got, expected):
        assert g.dtype == dtype and g.shape == e.shape, name
        assert_close(g, e, dtype, scale=4.0)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_configurations_of_100kb_parts(monkeypatch, dtype):
    """LLAMA_EXT_CUDA_SMEM_KB=100 makes a large-memory GPU launch what a ~100 KB part (sm_86/89/120)
    would (the 8-warp forward tile at d=128, the 64-key backward at d=128, the 32x32 backward at
    d=256, ...): forward, backward and a routed decode call at every head dim against float64."""
    monkeypatch.setenv("LLAMA_EXT_CUDA_SMEM_KB", "100")
    for d in CUDA_HEAD_DIMS:
        for seq_q, seq_k in [(150, 150), (2, 300)]:  # prefill tiles; a decode-shaped (routed) call
            q, k, v = qkv(2, seq_q, seq_k, 8, 2, d, "cuda", dtype)
            grad_out = make(q.shape, "cuda", dtype)
            got = grads_of(lambda a, b, c: llama_ext.gqa_attention(a, b, c), (q, k, v), grad_out)
            out = llama_ext.gqa_attention(q, k, v)
            ref_out = gqa_attention_reference(q, k, v)[0]
            expected = grads_of(lambda a, b, c: gqa_attention_reference(a, b, c)[0],
                                [t.double() for t in (q, k, v)], grad_out.double())
            assert_close(out, ref_out, dtype)
            for name, g, e in zip("qkv", got, expected):
                assert_close(g, e, dtype, scale=4.0)
    # The cap is read at each launch: a value below its floor is refused there.
    monkeypatch.setenv("LLAMA_EXT_CUDA_SMEM_KB", "1")
    with pytest.raises(ValueError, match="LLAMA_EXT_CUDA_SMEM_KB"):
        llama_ext.gqa_attention(q, k, v)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_varlen_backward_matches_float64(device, dtype):
    lens_q, lens_k = [5, 0, 200, 3, 1], [5, 0, 150, 0, 70]
    q, k, v, cu_q, cu_k = make_varlen(lens_q, lens_k, 8, 2, 64, device, dtype)
    grad_out = make(q.shape, device, dtype)
    got = grads_of(lambda a, b, c: llama_ext.gqa_attention_varlen(a, b, c, cu_q, cu_k, 200, 150), (q, k, v), grad_out)
    expected = grads_of(
        lambda a, b, c: gqa_attention_varlen_reference(a, b, c, cu_q, cu_k)[0], [t.double() for t in (q, k, v)], grad_out.double()
    )
    for g, e in zip(got, expected):
        assert_close(g, e, dtype, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_over_thread_counts_on_cpu(dtype):
    """The CPU spreads tasks over threads by cost (a long sequence packed with short ones, one
    with queries but no keys, an empty one): forward and backward match float64 at 1, 3 and 8
    threads, with bit-identical results whatever the thread count; and calls with fewer tasks
    than threads."""
    lens_q, lens_k = [300, 5, 0, 1, 40, 7], [300, 5, 0, 0, 60, 7]
    q, k, v, cu_q, cu_k = make_varlen(lens_q, lens_k, 8, 2, 64, "cpu", dtype)
    grad_out = make(q.shape, "cpu", dtype)

    def run(a, b, c):
        return llama_ext.gqa_attention_varlen(a, b, c, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)

    expected = grads_of(
        lambda a, b, c: gqa_attention_varlen_reference(a, b, c, cu_q, cu_k)[0], [t.double() for t in (q, k, v)],
        grad_out.double(),
    )
    expected_out = gqa_attention_varlen_reference(q, k, v, cu_q, cu_k)[0]
    threads = torch.get_num_threads()
    results = []
    try:
        for run_threads in (1, 3, 8):
            torch.set_num_threads(run_threads)
            out = run(q, k, v)
            assert_close(out, expected_out, dtype)
            got = grads_of(run, (q, k, v), grad_out)
            for g, e in zip(got, expected):
                assert_close(g, e, dtype, scale=4.0)
            results.append((out, *got))
            # One sequence, one kv head, one query block: fewer tasks than threads.
            q1, k1, v1 = qkv(1, 40, 40, 2, 1, 64, "cpu", dtype)
            assert_close(llama_ext.gqa_attention(q1, k1, v1), gqa_attention_reference(q1, k1, v1)[0], dtype)
    finally:
        torch.set_num_threads(threads)
    for later in results[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], later):
            assert torch.equal(a, b), f"{name} depends on the thread count"


@pytest.mark.parametrize(
    "device,dtype,d",
    [("cpu", torch.float32, 64), ("cpu", torch.bfloat16, 64)]
    + [("cuda", torch.bfloat16, 64), ("cuda", torch.bfloat16, 256)] * ("cuda" in DEVICES),
)
def test_backward_is_deterministic(device, dtype, d):
    """The CPU backward sums dq partials in a shape-determined order: every gradient is
    bit-identical every run, whatever the thread count. On CUDA dk and dv are (one CTA owns
    each key block and share of the GQA group, the shares' partials are summed in a fixed
    order); dq is accumulated with fp32 atomics, so only its value, not its bits, is checked
    there."""
    q, k, v = qkv(1, 700, 700, 8, 1, d, device, dtype)
    grad_out = make(q.shape, device, dtype)
    first = grads_of(llama_ext.gqa_attention, (q, k, v), grad_out)
    threads = torch.get_num_threads()
    for run_threads in (1, threads):
        torch.set_num_threads(run_threads)
        try:
            again = grads_of(llama_ext.gqa_attention, (q, k, v), grad_out)
        finally:
            torch.set_num_threads(threads)
        for name, a, b in zip("qkv", first, again):
            if device == "cpu" or name != "q":
                assert torch.equal(a, b), f"d{name} changed between runs"
            else:
                assert_close(a, b, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params(CUDA_DTYPES))
@pytest.mark.parametrize("d", [64, 128])
def test_unaligned_rows(device, dtype, d):
    """Rows that start off a 16-byte boundary (a [..., 1:] slice) take CUDA's register-staged
    tile loads instead of cp.async: forward and backward against the reference."""
    bases = [make((1, 70, h, d + 1), device, dtype).requires_grad_() for h in (4, 2, 2)]
    q, k, v = (b[..., 1:] for b in bases)  # grads flow back through the unaligned views
    out, lse = llama_ext.gqa_attention(q, k, v, return_lse=True)
    ref_out, ref_lse = gqa_attention_reference(q.detach(), k.detach(), v.detach())
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    grad_out = make(q.shape, device, dtype)
    out.backward(grad_out)
    got = [b.grad[..., 1:] for b in bases]
    expected = grads_of(lambda a, b, c: gqa_attention_reference(a, b, c)[0], [t.detach().double() for t in (q, k, v)], grad_out.double())
    for name, g, e in zip("qkv", got, expected):
        assert_close(g, e, dtype, scale=4.0)


@pytest.mark.parametrize(
    "seq_q,seq_k,causal,n_q,n_kv", [(5, 5, True, 4, 2), (3, 7, True, 2, 1), (6, 4, True, 2, 2), (4, 6, False, 3, 1)]
)
def test_gradcheck_float64(seq_q, seq_k, causal, n_q, n_kv):
    q, k, v = (t.requires_grad_() for t in qkv(2, seq_q, seq_k, n_q, n_kv, 8, "cpu", torch.float64))
    fn = lambda a, b, c: llama_ext.gqa_attention(a, b, c, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


def test_gradcheck_varlen_float64():
    q, k, v, cu_q, cu_k = make_varlen([3, 0, 4], [5, 2, 4], 2, 1, 8, "cpu", torch.float64)
    for t in (q, k, v):
        t.requires_grad_()
    fn = lambda a, b, c: llama_ext.gqa_attention_varlen(a, b, c, cu_q, cu_k, 4, 5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_opcheck(device, dtype):
    q, k, v = qkv(2, 9, 13, 4, 2, 32, device, dtype)
    for t in (q, k, v):
        t.requires_grad_()
    fwd = torch.ops.llama_ext.gqa_attention_forward
    # (causal, window_left, window_right, softcap)
    for options in [(True, -1, -1, 0.0), (False, -1, -1, 0.0), (True, 4, 0, 0.0), (False, 2, 3, 1.5)]:
        causal, *rest = options
        opcheck(fwd, (q, k, v, None, None, 0, 0, causal, 0.3, *rest))
        out, lse = fwd(q.detach(), k.detach(), v.detach(), None, None, 0, 0, causal, 0.3, *rest)
        opcheck(
            torch.ops.llama_ext.gqa_attention_backward,
            (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, None, 0, 0, causal, 0.3, *rest),
        )
    qv, kv, vv, cu_q, cu_k = make_varlen([3, 0, 9], [4, 2, 9], 4, 2, 32, device, dtype)
    opcheck(fwd, (qv, kv, vv, cu_q, cu_k, 9, 9, True, 0.3, -1, -1, 0.0))
    opcheck(fwd, (qv, kv, vv, cu_q, cu_k, 9, 9, True, 0.3, 3, 0, 2.0))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: the real compiler, with codegen
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, backend):
    def step(q, k, v, cu_q, cu_k):
        batched = llama_ext.gqa_attention(q * 2.0, k, v)
        packed = llama_ext.gqa_attention_varlen(q[0], k[0], v[0], cu_q, cu_k, 6, 10, causal=False)
        windowed = llama_ext.gqa_attention(q, k, v, window_size=(3, 0), softcap=2.5)
        packed_windowed = llama_ext.gqa_attention_varlen(
            q[0], k[0], v[0], cu_q, cu_k, 6, 10, causal=False, window_size=(2, 1), softcap=1.5
        )
        return batched.sum() + packed.sum() + windowed.sum() + packed_windowed.sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    q, k, v = (t.requires_grad_() for t in qkv(1, 10, 10, 4, 2, 32, device, torch.float32))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    out = compiled(q, k, v, cu, cu)
    torch.testing.assert_close(out, step(q, k, v, cu, cu))
    out.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequences(device):
    for seq_q, seq_k in [(0, 0), (0, 5), (5, 0)]:
        q, k, v = (t.requires_grad_() for t in qkv(2, seq_q, seq_k, 4, 2, 32, device, torch.float32))
        out, lse = llama_ext.gqa_attention(q, k, v, causal=False, return_lse=True)
        assert out.shape == q.shape and lse.shape == (2, 4, seq_q)
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
        assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(q.grad, torch.zeros_like(q))
    q, k, v, cu_q, cu_k = make_varlen([0, 0], [0, 0], 4, 2, 32, device, torch.float32)
    assert llama_ext.gqa_attention_varlen(q, k, v, cu_q, cu_k, 0, 0).shape == (0, 4, 32)


def test_lse_is_not_differentiable():
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 4, 2, 1, 8, "cpu", torch.float32))
    out, lse = llama_ext.gqa_attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


def _args(q, k, v, cu_q=None, cu_k=None, max_q=0, max_k=0):
    return q, k, v, cu_q, cu_k, max_q, max_k


def _bad_inputs(d):
    f32 = dict(device=d)
    i32 = dict(device=d, dtype=torch.int32)
    ok_q, ok_k = torch.randn(1, 4, 4, 32, **f32), torch.randn(1, 4, 2, 32, **f32)
    packed_q, packed_k = torch.randn(6, 4, 32, **f32), torch.randn(6, 2, 32, **f32)
    cu = torch.tensor([0, 2, 6], **i32)
    return [
        ("heads not divisible", _args(torch.randn(1, 4, 5, 32, **f32), ok_k, ok_k), ValueError, r"n_q_heads \(5\) must be a multiple of n_kv_heads \(2, k.s heads\)"),
        ("head_dim mismatch", _args(ok_q, torch.randn(1, 4, 2, 64, **f32), torch.randn(1, 4, 2, 64, **f32)), ValueError, "head_dim"),
        ("head_dim not multiple of 8", _args(torch.randn(1, 4, 4, 12, **f32), torch.randn(1, 4, 2, 12, **f32), torch.randn(1, 4, 2, 12, **f32)), ValueError, "multiple of 8"),
        ("head_dim too large", _args(torch.randn(1, 2, 1, 264, **f32), torch.randn(1, 2, 1, 264, **f32), torch.randn(1, 2, 1, 264, **f32)), ValueError, "between 8 and 256"),
        ("dtype mismatch", _args(ok_q, ok_k.half(), ok_k.half()), TypeError, "same dtype"),
        ("integer q", _args(ok_q.int(), ok_k.int(), ok_k.int()), TypeError, "floating-point"),
        ("v shape", _args(ok_q, ok_k, torch.randn(1, 5, 2, 32, **f32)), ValueError, "v must have the same shape"),
        ("batch mismatch", _args(ok_q, torch.randn(2, 4, 2, 32, **f32), torch.randn(2, 4, 2, 32, **f32)), ValueError, "batch size"),
        ("0-dim", _args(torch.tensor(1.0, **f32), ok_k, ok_k), ValueError, "must be"),
        ("3-dim batched", _args(packed_q, packed_k, packed_k), ValueError, r"\[batch, seq, heads, head_dim\]"),
        ("last dim strided", _args(torch.randn(1, 4, 32, 4, **f32).transpose(-1, -2), ok_k, ok_k), RuntimeError, "contiguous in its last dimension"),
        ("cu_seqlens_k missing", _args(packed_q, packed_k, packed_k, cu, None, 4, 4), ValueError, "given together"),
        ("cu_seqlens decreasing", _args(packed_q, packed_k, packed_k, torch.tensor([0, 4, 2, 6], **i32), torch.tensor([0, 2, 4, 6], **i32), 4, 4), ValueError, "non-decreasing"),
        ("cu_seqlens wrong total", _args(packed_q, packed_k, packed_k, torch.tensor([0, 2, 5], **i32), cu, 4, 4), ValueError, "number of packed tokens"),
        ("cu_seqlens not starting at 0", _args(packed_q, packed_k, packed_k, torch.tensor([1, 2, 6], **i32), cu, 4, 4), ValueError, r"\[0\] must be 0"),
        ("cu_seqlens int64", _args(packed_q, packed_k, packed_k, cu.long(), cu.long(), 4, 4), TypeError, "int32"),
        ("max_seqlen too small", _args(packed_q, packed_k, packed_k, cu, cu, 3, 4), ValueError, "longer than max_seqlen_q"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(_bad_inputs("cpu"))), ids=[c[0] for c in _bad_inputs("cpu")])
def test_bad_input_raises_clear_error(device, index):
    _, args, exc, message = _bad_inputs(device)[index]
    with pytest.raises(exc, match=message):
        torch.ops.llama_ext.gqa_attention_forward(*args, True, 0.125, -1, -1, 0.0)


def test_bad_scale_and_devices():
    q, k, v = qkv(1, 4, 4, 2, 1, 32, "cpu", torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        llama_ext.gqa_attention(torch.tensor(1.0), k, v)
    with pytest.raises(ValueError, match="scale"):
        llama_ext.gqa_attention(q, k, v, scale=-1.0)
    out, lse = llama_ext.gqa_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="lse must have shape"):
        torch.ops.llama_ext.gqa_attention_backward(out, q, k, v, out, lse[:, :, :2], None, None, 0, 0, True, 0.2, -1, -1, 0.0)
    with pytest.raises(TypeError, match="lse must be"):
        torch.ops.llama_ext.gqa_attention_backward(out, q, k, v, out, lse.double(), None, None, 0, 0, True, 0.2, -1, -1, 0.0)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="same device"):
            llama_ext.gqa_attention(q, k.cuda(), v.cuda())
    if not torch.cuda.is_available():
        return
    with pytest.raises(TypeError, match="float64"):
        llama_ext.gqa_attention(q.double().cuda(), k.double().cuda(), v.double().cuda())


# ---- sliding window and logit softcap --------------------------------------------------------


def window_id(c):
    return "b{}-q{}-k{}-h{}/{}-d{}-{}-w{},{}-cap{}".format(*c[:6], "causal" if c[6] else "full", *c[7], c[8])


# (batch, seq_q, seq_k, n_q_heads, n_kv_heads, head_dim, causal, window_size, softcap)
WINDOW_CASES = [
    (2, 300, 300, 8, 2, 64, True, (0, 0), 0.0),  # window 0: each query sees its own key only
    (1, 300, 300, 8, 2, 64, False, (0, 0), 0.0),
    (1, 257, 257, 4, 1, 32, True, (1, -1), 0.0),  # window 1
    (1, 257, 257, 4, 4, 32, False, (1, 1), 0.0),
    (2, 700, 700, 8, 2, 64, True, (200, 0), 0.0),  # smaller than the sequence, over several key blocks
    (1, 700, 700, 6, 2, 64, False, (150, 90), 0.0),
    (1, 700, 700, 4, 2, 64, False, (-1, 40), 0.0),  # right side only
    (1, 129, 129, 8, 2, 128, True, (1000, 0), 0.0),  # larger than the sequence
    (1, 129, 400, 8, 2, 80, True, (100, 0), 0.0),  # seq_q < seq_k
    (1, 400, 129, 5, 5, 96, False, (20, 30), 0.0),  # seq_q > seq_k: the first rows see no key
    (1, 1, 1000, 32, 8, 128, True, (255, 0), 0.0),  # decode step with a window
    (2, 129, 129, 8, 2, 64, True, (-1, -1), 30.0),  # softcap alone
    (1, 300, 300, 8, 2, 256, True, (64, 0), 50.0),  # Gemma 2 style: window and softcap
    (1, 129, 300, 6, 3, 32, False, (40, 40), 2.0),  # a softcap that bites
    (1, 300, 129, 4, 2, 40, True, (-1, -1), 1.0),
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", WINDOW_CASES, ids=window_id)
def test_window_softcap_forward_matches_float64(device, dtype, case):
    batch, seq_q, seq_k, n_q, n_kv, d, causal, window, softcap = case
    q, k, v = qkv(batch, seq_q, seq_k, n_q, n_kv, d, device, dtype)
    if cuda_rejects(device, q, k, v):
        return
    out, lse = llama_ext.gqa_attention(q, k, v, causal=causal, return_lse=True, window_size=window, softcap=softcap)
    ref_out, ref_lse = gqa_attention_reference(q, k, v, causal, None, window, softcap)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (batch, n_q, seq_q)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("case", WINDOW_CASES, ids=window_id)
def test_window_softcap_backward_matches_float64(device, dtype, case):
    batch, seq_q, seq_k, n_q, n_kv, d, causal, window, softcap = case
    q, k, v = qkv(batch, seq_q, seq_k, n_q, n_kv, d, device, dtype)
    if cuda_rejects(device, q, k, v):
        return
    grad_out = make(q.shape, device, dtype)
    options = dict(window_size=window, softcap=softcap)
    got = grads_of(lambda a, b, c: llama_ext.gqa_attention(a, b, c, causal=causal, **options), (q, k, v), grad_out)
    expected = grads_of(
        lambda a, b, c: gqa_attention_reference(a, b, c, causal, None, window, softcap)[0],
        [t.double() for t in (q, k, v)], grad_out.double(),
    )
    for name, g, e in zip("qkv", got, expected):
        assert g.dtype == dtype and g.shape == e.shape, name
        assert_close(g, e, dtype, scale=4.0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("causal,window,softcap", [(True, (50, 0), 0.0), (False, (30, 10), 5.0), (True, (0, 0), 0.0)])
def test_window_softcap_varlen_matches_float64(device, dtype, causal, window, softcap):
    lens_q, lens_k = [5, 0, 300, 1, 129, 3], [5, 0, 300, 40, 129, 0]
    q, k, v, cu_q, cu_k = make_varlen(lens_q, lens_k, 8, 2, 64, device, dtype)
    options = dict(causal=causal, window_size=window, softcap=softcap)
    out, lse = llama_ext.gqa_attention_varlen(q, k, v, cu_q, cu_k, 300, 300, return_lse=True, **options)
    ref_out, ref_lse = gqa_attention_varlen_reference(q, k, v, cu_q, cu_k, causal, None, window, softcap)
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse, dtype)
    grad_out = make(q.shape, device, dtype)
    got = grads_of(lambda a, b, c: llama_ext.gqa_attention_varlen(a, b, c, cu_q, cu_k, 300, 300, **options), (q, k, v), grad_out)
    expected = grads_of(
        lambda a, b, c: gqa_attention_varlen_reference(a, b, c, cu_q, cu_k, causal, None, window, softcap)[0],
        [t.double() for t in (q, k, v)], grad_out.double(),
    )
    for g, e in zip(got, expected):
        assert_close(g, e, dtype, scale=4.0)


@pytest.mark.parametrize("device", DEVICES)
def test_window_equivalences(device):
    """A window at least as long as the sequence is no window; under causal the right side is
    0 whatever is passed (as FlashAttention treats it); (-1, -1) and softcap 0 are the defaults."""
    q, k, v = qkv(2, 150, 150, 8, 2, 64, device, torch.float32)
    for causal in (True, False):
        plain = llama_ext.gqa_attention(q, k, v, causal=causal)
        assert torch.equal(llama_ext.gqa_attention(q, k, v, causal=causal, window_size=(-1, -1), softcap=0.0), plain)
        assert_close(llama_ext.gqa_attention(q, k, v, causal=causal, window_size=(150, 150)), plain, torch.float32)
        assert_close(llama_ext.gqa_attention(q, k, v, causal=causal, window_size=(2**40, 2**40)), plain, torch.float32)
    causal_window = llama_ext.gqa_attention(q, k, v, causal=True, window_size=(20, 0))
    for right in (-1, 7):
        assert torch.equal(llama_ext.gqa_attention(q, k, v, causal=True, window_size=(20, right)), causal_window)
    # Non-causal with right = 0 is the causal window.
    assert torch.equal(llama_ext.gqa_attention(q, k, v, causal=False, window_size=(20, 0)), causal_window)


@pytest.mark.parametrize("device,dtype", device_dtype_params(CUDA_DTYPES))
def test_keys_outside_every_window_are_never_read(device, dtype):
    """Key blocks no query row sees are skipped, not masked: NaN keys and values there (and a NaN
    query whose window does not reach them) leave every output and gradient outside their reach
    intact, and those keys get exactly zero gradients."""
    # Decode: one query over 1000 keys with a 256-key window sees keys 744..999 only.
    q, k, v = qkv(1, 1, 1000, 8, 2, 64, device, dtype)
    k[:, :512], v[:, :512] = float("nan"), float("nan")
    options = dict(causal=True, window_size=(255, 0))
    grad_out = make(q.shape, device, dtype)
    dq, dk, dv = grads_of(lambda a, b, c: llama_ext.gqa_attention(a, b, c, **options), (q, k, v), grad_out)
    expected = gqa_attention_reference(q, k.nan_to_num(), v.nan_to_num(), True, None, (255, 0))[0]
    assert_close(llama_ext.gqa_attention(q, k, v, **options), expected, dtype)
    assert torch.isfinite(dq).all()
    assert torch.equal(dk[:, :512], torch.zeros_like(dk[:, :512])) and torch.equal(dv[:, :512], torch.zeros_like(dv[:, :512]))
    # Training: a NaN query row (and its output gradient) at the end of a 1000-token sequence
    # with a 50-key window reaches no gradient of the first 512 keys.
    q, k, v = qkv(1, 1000, 1000, 4, 2, 64, device, dtype)
    grad_out = make(q.shape, device, dtype)
    options = dict(causal=True, window_size=(50, 0))
    clean = grads_of(lambda a, b, c: llama_ext.gqa_attention(a, b, c, **options), (q, k, v), grad_out)
    q[:, -1], grad_out[:, -1] = float("nan"), float("nan")
    poisoned = grads_of(lambda a, b, c: llama_ext.gqa_attention(a, b, c, **options), (q, k, v), grad_out)
    for name, a, b in zip("kv", clean[1:], poisoned[1:]):
        assert torch.equal(a[:, :512], b[:, :512]), f"d{name}"


@pytest.mark.parametrize(
    "seq_q,seq_k,causal,window,softcap",
    [(6, 6, True, (2, 0), 0.0), (5, 7, False, (1, 2), 0.0), (7, 4, False, (0, 1), 0.0), (6, 6, True, (-1, -1), 1.5),
     (5, 8, False, (3, 1), 0.8)],
)
def test_gradcheck_window_softcap_float64(seq_q, seq_k, causal, window, softcap):
    q, k, v = (t.requires_grad_() for t in qkv(2, seq_q, seq_k, 4, 2, 8, "cpu", torch.float64))
    fn = lambda a, b, c: llama_ext.gqa_attention(a, b, c, causal=causal, window_size=window, softcap=softcap)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    qv, kv, vv, cu_q, cu_k = make_varlen([3, 0, 5], [4, 2, 5], 2, 1, 8, "cpu", torch.float64)
    for t in (qv, kv, vv):
        t.requires_grad_()
    fn = lambda a, b, c: llama_ext.gqa_attention_varlen(  # noqa: E731
        a, b, c, cu_q, cu_k, 5, 5, causal=causal, window_size=window, softcap=softcap
    )
    assert torch.autograd.gradcheck(fn, (qv, kv, vv), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_window_and_softcap_raise(device):
    q, k, v = qkv(1, 4, 4, 2, 1, 32, device, torch.float32)
    cases = [
        (dict(window_size=(-2, 0)), ValueError, r"window_size\[0\] \(window_left\) must be -1"),
        (dict(window_size=(3, -7)), ValueError, r"window_size\[1\] \(window_right\) must be -1"),
        (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be"),
        (dict(softcap=float("nan")), ValueError, "softcap must be"),
        (dict(window_size=(4,)), TypeError, "window_size must be a pair"),
        (dict(window_size=4), TypeError, "window_size must be a pair"),
        (dict(window_size=(1.5, 0)), TypeError, r"window_size \(left\) must be an int"),
        (dict(window_size=(0, True)), TypeError, r"window_size \(right\) must be an int"),
    ]
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    for kwargs, exc, message in cases:
        with pytest.raises(exc, match=message):
            llama_ext.gqa_attention(q, k, v, **kwargs)
        with pytest.raises(exc, match=message):
            llama_ext.gqa_attention_varlen(q[0], k[0], v[0], cu, cu, 4, 4, **kwargs)
    out, lse = llama_ext.gqa_attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="window_left"):
        torch.ops.llama_ext.gqa_attention_backward(out, q, k, v, out, lse, None, None, 0, 0, True, 0.2, -3, 0, 0.0)
    with pytest.raises(ValueError, match="softcap"):
        torch.ops.llama_ext.gqa_attention_backward(out, q, k, v, out, lse, None, None, 0, 0, True, 0.2, -1, -1, -0.5)


# ---- GQAttention module --------------------------------------------------------------------


def hf_llama_attention(hidden, heads, kv_heads, head_dim, bias, device):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = LlamaConfig(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        attention_bias=bias,
    )
    config._attn_implementation = "eager"
    hf = LlamaAttention(config, layer_idx=0).to(device)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
    return hf


def hf_forward(hf, x, cos, sin):
    seq = x.shape[1]
    visible = causal_mask_bottom_right(seq, seq, x.device)
    mask = torch.zeros(seq, seq, device=x.device).masked_fill(~visible, torch.finfo(torch.float32).min)
    return hf(x, position_embeddings=(cos, sin), attention_mask=mask[None, None])[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,bias", [(8, 2, 32, False), (4, 4, 64, True), (6, 1, None, False)])
def test_module_matches_hf_llama_attention_without_rope(device, heads, kv_heads, head_dim, bias):
    hidden = 192
    hf = hf_llama_attention(hidden, heads, kv_heads, head_dim, bias, device)
    ours = llama_ext.GQAttention(hidden, heads, kv_heads, head_dim=head_dim, bias=bias).to(device)
    ours.load_state_dict(hf.state_dict())
    x = make((2, 23, hidden), device, torch.float32)
    d = ours.head_dim
    # cos = 1, sin = 0: HF's rotary becomes the identity, matching a rope-less module.
    identity = (torch.ones(2, 23, d, device=device), torch.zeros(2, 23, d, device=device))
    torch.testing.assert_close(ours(x), hf_forward(hf, x, *identity), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_module_with_rope_matches_hf_llama_attention(device):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hidden, heads, kv_heads, head_dim = 128, 8, 2, 32
    hf = hf_llama_attention(hidden, heads, kv_heads, head_dim, False, device)
    hf_rope = LlamaRotaryEmbedding(hf.config).to(device)
    rope = llama_ext.RotaryEmbedding(head_dim, max_position_embeddings=hf.config.max_position_embeddings, device=device)
    ours = llama_ext.GQAttention(hidden, heads, kv_heads, head_dim=head_dim, rope=rope).to(device)
    ours.load_state_dict(hf.state_dict())
    x = make((2, 19, hidden), device, torch.float32)
    positions = torch.arange(19, device=device)
    expected = hf_forward(hf, x, *hf_rope(x, positions[None].expand(2, -1)))
    torch.testing.assert_close(ours(x), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours(x, positions=positions), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_rope", [False, True])
def test_kv_cache_decode_equals_full_forward(device, with_rope):
    hidden, heads, kv_heads, head_dim = 96, 6, 2, 32
    rope = llama_ext.RotaryEmbedding(head_dim, max_position_embeddings=64, device=device) if with_rope else None
    attn = llama_ext.GQAttention(hidden, heads, kv_heads, head_dim=head_dim, rope=rope).to(device)
    x = make((2, 12, hidden), device, torch.float32)
    full = attn(x)
    cache = llama_ext.KVCache()
    steps = [attn(x[:, :5], cache=cache)]  # prefill 5 tokens, then 3 + 1 + 1 + 1 + 1 more
    assert cache.offset == 5
    for start, end in [(5, 8), (8, 9), (9, 10), (10, 11), (11, 12)]:
        steps.append(attn(x[:, start:end], cache=cache))
    assert cache.offset == 12 and cache.k.shape == (2, 12, kv_heads, head_dim)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_module_window_softcap_decode_equals_full_forward(device):
    """A windowed, softcapped module: the full forward matches the float64 reference on its own
    projections, and cached decoding step by step past the window gives the same outputs."""
    hidden, heads, kv_heads, head_dim = 96, 6, 2, 32
    rope = llama_ext.RotaryEmbedding(head_dim, max_position_embeddings=64, device=device)
    attn = llama_ext.GQAttention(hidden, heads, kv_heads, head_dim=head_dim, rope=rope, window_size=(3, 0), softcap=5.0)
    attn = attn.to(device)
    assert "window_size=(3, 0)" in repr(attn) and "softcap=5.0" in repr(attn)
    x = make((2, 12, hidden), device, torch.float32)
    full = attn(x)
    with torch.no_grad():
        q = attn.q_proj(x).view(2, 12, heads, head_dim)
        k = attn.k_proj(x).view(2, 12, kv_heads, head_dim)
        q, k = rope(q, k, torch.arange(12, device=device))
        v = attn.v_proj(x).view(2, 12, kv_heads, head_dim)
        ref = gqa_attention_reference(q, k, v, True, None, (3, 0), 5.0)[0].float()
        expected = attn.o_proj(ref.reshape(2, 12, heads * head_dim))
    torch.testing.assert_close(full, expected, atol=2e-5, rtol=2e-5)
    cache = llama_ext.KVCache()
    steps = [attn(x[:, :5], cache=cache)] + [attn(x[:, i : i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_module_trains_and_rejects_bad_heads():
    attn = llama_ext.GQAttention(64, 4, 2)
    x = torch.randn(2, 7, 64, requires_grad=True)
    attn(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in attn.parameters())
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        llama_ext.GQAttention(64, 6, 4)


@emulation_only_on_cpu
def test_tensor_core_forward_emulation():
    """The CUDA tensor-core forward kernel transcribed lane by lane, every tile configuration the
    launcher picks on sm_80, sm_90 and the ~100 KB parts: causal (bottom-right), windows, softcap,
    varlen, GQA; float64 within 1e-13 (tools/emulate_attention_fwd.py)."""
    check_kernel_emulation("emulate_attention_fwd")


@emulation_only_on_cpu
def test_tensor_core_backward_emulation():
    """The CUDA tensor-core backward kernels (the delta pre-kernel, both warp plans, dQ atomics,
    group splits) transcribed lane by lane, every configuration the launcher picks: causal,
    windows, softcap, varlen, GQA; float64 within 1e-13 (tools/emulate_attention_bwd.py)."""
    check_kernel_emulation("emulate_attention_bwd")
