"""Reliability: property tests over random shapes, strides and dtypes; numerical edge cases;
huge tensors; threads, streams and CUDA graphs; no memory growth. Every check runs on CPU in
CI and on CUDA in `make gpu-check`."""
import concurrent.futures
import gc
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama_ext
from llama_ext.reference import fused_add_rms_norm_reference, rms_norm_reference, rotary_reference

from conftest import DEVICES, TOLERANCES, assert_close, dtypes_for

# Deterministic and bounded: a fixed seed per test (derandomize), no example database on disk,
# a fixed number of examples, no per-example deadline (the first call may compile or warm up).
PROPERTY_SETTINGS = settings(
    derandomize=True,
    database=None,
    max_examples=int(os.environ.get("LLAMA_EXT_PROPERTY_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def strided_rows(draw, device, dtype, hidden):
    """A random [*leading, hidden] tensor that is contiguous, a slice of wider rows, or a
    transposed view of its leading dims: every layout with a contiguous last dim."""
    leading = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    layout = draw(st.sampled_from(["contiguous", "sliced", "transposed"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 2).to(device=device, dtype=dtype)

    if layout == "sliced":
        offset = draw(st.integers(0, 7))
        return randn(*leading, hidden + offset + 3)[..., offset : offset + hidden]
    if layout == "transposed" and len(leading) >= 2:
        return randn(*reversed(leading[:2]), *leading[2:], hidden).transpose(0, 1)
    return randn(*leading, hidden)


def _rms_norm_case(data, device):
    dtype = data.draw(st.sampled_from(dtypes_for(device)))
    hidden = data.draw(st.integers(1, 300))
    x = data.draw(strided_rows(device, dtype, hidden))
    with_weight = data.draw(st.booleans())
    weight = torch.randn(hidden, dtype=torch.float32).to(device=device, dtype=dtype) if with_weight else None
    return dtype, x, weight


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_rms_norm_forward_backward(device, data):
    dtype, x, weight = _rms_norm_case(data, device)
    x = x.detach().requires_grad_()
    w = weight.detach().requires_grad_() if weight is not None else None
    y = llama_ext.rms_norm(x, w, 1e-5)
    assert_close(y, rms_norm_reference(x, w, 1e-5), dtype)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if w is not None else None
    rms_norm_reference(x64, w64, 1e-5).backward(grad.double())
    assert_close(x.grad, x64.grad, dtype, scale=4.0)
    if w is not None:
        # dweight sums over every row: scale the tolerance with the row count.
        rows = max(1, x.numel() // x.shape[-1])
        assert_close(w.grad, w64.grad, dtype, scale=4.0 * rows**0.5)


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_fused_add_rms_norm_and_inplace(device, data):
    dtype, x, weight = _rms_norm_case(data, device)
    residual = torch.randn(x.shape, dtype=torch.float32).to(device=device, dtype=dtype)
    y, res = llama_ext.fused_add_rms_norm(x, residual, weight)
    y_ref, res_ref = fused_add_rms_norm_reference(x, residual, weight)
    assert_close(res, res_ref, dtype)
    assert_close(y, rms_norm_reference(res, weight), dtype)
    x_in, res_in = x.clone(), residual.clone()
    llama_ext.fused_add_rms_norm_(x_in, res_in, weight)
    torch.testing.assert_close(res_in, res, atol=0, rtol=0)
    torch.testing.assert_close(x_in, y, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_apply_rotary_forward_backward(device, data):
    dtype = data.draw(st.sampled_from(dtypes_for(device)))
    batch, seq = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 9))
    n_kv = data.draw(st.integers(1, 3))
    n_q = n_kv * data.draw(st.integers(1, 3))
    head_dim = 2 * data.draw(st.integers(1, 64))
    rotary_dim = 2 * data.draw(st.integers(1, head_dim // 2))
    interleaved = data.draw(st.booleans())
    hf_layout = data.draw(st.booleans())  # [b, h, s, d] storage passed as a transposed view
    max_position = seq + data.draw(st.integers(1, 8))
    positions_kind = data.draw(st.sampled_from(["none", "seq", "batch_seq"]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))

    def make(heads):
        shape = (batch, heads, seq, head_dim) if hf_layout else (batch, seq, heads, head_dim)
        t = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        return t.transpose(1, 2) if hf_layout else t

    q, k = make(n_q).requires_grad_(), make(n_kv).requires_grad_()
    cos, sin = llama_ext.rope_cos_sin(rotary_dim, max_position, device=device)
    index_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    positions = {
        "none": None,
        "seq": torch.randint(0, max_position, (seq,), generator=gen).to(device=device, dtype=index_dtype),
        "batch_seq": torch.randint(0, max_position, (batch, seq), generator=gen).to(device=device, dtype=index_dtype),
    }[positions_kind]
    q2, k2 = llama_ext.apply_rotary(q, k, cos, sin, positions, interleaved=interleaved)
    assert_close(q2, rotary_reference(q, cos, sin, positions, interleaved), dtype)
    assert_close(k2, rotary_reference(k, cos, sin, positions, interleaved), dtype)
    # The backward is the inverse rotation.
    gq, gk = torch.randn_like(q2), torch.randn_like(k2)
    torch.autograd.backward([q2, k2], [gq, gk])
    assert_close(q.grad, rotary_reference(gq, cos, sin, positions, interleaved, inverse=True), dtype)
    assert_close(k.grad, rotary_reference(gk, cos, sin, positions, interleaved, inverse=True), dtype)


# ---- bad input never writes --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_failed_inplace_call_writes_nothing(device):
    x = torch.randn(4, 64, device=device)
    residual = torch.randn(4, 64, device=device)
    before = (x.clone(), residual.clone())
    with pytest.raises(ValueError, match="weight must have shape"):
        llama_ext.fused_add_rms_norm_(x, residual, torch.ones(63, device=device))
    with pytest.raises(ValueError, match="eps"):
        llama_ext.fused_add_rms_norm_(x, residual, None, -1.0)
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1])


@pytest.mark.parametrize("device", ["cpu"])  # CUDA reports positions through a device assert
def test_failed_inplace_rotary_writes_nothing(device):
    q, k = torch.randn(1, 6, 4, 64, device=device), torch.randn(1, 6, 2, 64, device=device)
    cos, sin = llama_ext.rope_cos_sin(64, 8, device=device)
    before = (q.clone(), k.clone())
    bad_positions = torch.tensor([0, 1, 2, 3, 4, 8], device=device)  # 8 is past the table
    with pytest.raises(IndexError, match="positions"):
        llama_ext.apply_rotary_(q, k, cos, sin, bad_positions)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])


# ---- numerical edge cases ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_nan_and_inf_stay_in_their_row(device, dtype):
    """Documented (README): a NaN in a row makes that whole row NaN; an Inf makes rstd 0, so
    the Inf element becomes NaN (Inf * 0) and the rest of its row 0. Every other row is
    unaffected, bit for bit."""
    x = torch.randn(6, 257, device=device).to(dtype)
    w = torch.randn(257, device=device).to(dtype)
    clean = llama_ext.rms_norm(x, w)
    x[1, 7] = float("nan")
    x[4, 100] = float("inf")
    y = llama_ext.rms_norm(x, w)
    assert torch.isnan(y[1]).all()
    assert torch.isnan(y[4, 100])
    assert (y[4, torch.arange(257, device=device) != 100] == 0).all()
    for row in (0, 2, 3, 5):
        assert torch.equal(y[row], clean[row])


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_fp16_huge_values_do_not_overflow(device):
    """1e4**2 overflows fp16 but not the fp32 statistics."""
    x = (torch.rand(3, 4096, device=device) * 2e4 - 1e4).to(torch.float16)
    y = llama_ext.rms_norm(x, None)
    assert torch.isfinite(y).all()
    assert_close(y, rms_norm_reference(x), torch.float16)


# ---- huge tensors: 64-bit indexing ---------------------------------------------------------


def _tile_rows(base, rows):
    """[rows, n] built by repeating a random block: cheap to make, never all zeros."""
    reps = (rows + base.shape[0] - 1) // base.shape[0]
    return base.repeat(reps, 1)[:rows]


@pytest.mark.slow
def test_rms_norm_more_than_2_pow_31_elements_cpu():
    hidden = 4096
    rows = 2**31 // hidden + 64  # 2^31 + 262144 elements, 4.3 GB in bf16
    base = torch.randn(64, hidden).to(torch.bfloat16)
    x = _tile_rows(base, rows)
    assert x.numel() > 2**31
    w = torch.randn(hidden).to(torch.bfloat16)
    y = llama_ext.rms_norm(x, w)
    expected = llama_ext.rms_norm(base, w)
    # The rows past element 2^31 must equal the same rows computed in a small tensor.
    torch.testing.assert_close(y[-64:], expected[(rows - 64) % 64 :].repeat(2, 1)[:64], atol=0, rtol=0)
    torch.testing.assert_close(y[:64], expected, atol=0, rtol=0)
    del x, y


@pytest.mark.slow
def test_apply_rotary_more_than_2_pow_31_elements_cpu():
    """q with 2^31 + 2^18 elements (4.3 GB in bf16): the last tokens, whose offsets pass 2^31,
    must equal the same tokens rotated in a small tensor."""
    heads, head_dim = 32, 128
    seq = 2**31 // (heads * head_dim) + 64
    base = torch.randn(64, heads * head_dim).to(torch.bfloat16)
    q = _tile_rows(base, seq).view(1, seq, heads, head_dim)
    k = q[:, :, :1].clone()
    assert q.numel() > 2**31
    cos, sin = llama_ext.rope_cos_sin(head_dim, 64)
    positions = torch.arange(seq) % 64
    llama_ext.apply_rotary_(q, k, cos, sin, positions)
    small = base.view(64, 1, heads, head_dim).transpose(0, 1).contiguous()  # [1, 64, h, d]
    small_k = small[:, :, :1].clone()
    llama_ext.apply_rotary_(small, small_k, cos, sin, torch.arange(64))
    tail = slice(seq - 64, seq)
    first = (seq - 64) % 64
    expected = torch.cat([small[:, first:], small[:, :first]], dim=1)
    torch.testing.assert_close(q[:, tail], expected, atol=0, rtol=0)
    torch.testing.assert_close(k[:, tail], torch.cat([small_k[:, first:], small_k[:, :first]], dim=1), atol=0, rtol=0)
    del q, k


# ---- threads, streams, graphs, memory --------------------------------------------------------


def _op_calls(device):
    """(name, fn) pairs that call each op once on fresh inputs and check the result."""
    x = torch.randn(8, 256, device=device)
    w = torch.randn(256, device=device)
    r = torch.randn(8, 256, device=device)
    y_ref = rms_norm_reference(x, w)
    fy_ref, fres_ref = fused_add_rms_norm_reference(x, r, w)

    def rms():
        assert_close(llama_ext.rms_norm(x, w), y_ref, torch.float32)

    def fused():
        y, res = llama_ext.fused_add_rms_norm(x, r, w)
        assert_close(y, fy_ref, torch.float32)

    def fused_inplace():
        xi, ri = x.clone(), r.clone()
        llama_ext.fused_add_rms_norm_(xi, ri, w)
        assert_close(xi, fy_ref, torch.float32)

    def rms_backward():
        xg = x.clone().requires_grad_()
        llama_ext.rms_norm(xg, w).sum().backward()
        assert torch.isfinite(xg.grad).all()

    q = torch.randn(2, 5, 4, 64, device=device)
    k = torch.randn(2, 5, 2, 64, device=device)
    cos, sin = llama_ext.rope_cos_sin(64, 16, device=device)
    positions = torch.tensor([3, 1, 4, 1, 5], device=device)
    q_ref = rotary_reference(q, cos, sin, positions)

    def rotary():
        q2, _ = llama_ext.apply_rotary(q, k, cos, sin, positions)
        assert_close(q2, q_ref, torch.float32)

    def rotary_inplace():
        qi, ki = q.clone(), k.clone()
        llama_ext.apply_rotary_(qi, ki, cos, sin, positions)
        assert_close(qi, q_ref, torch.float32)

    def rotary_backward():
        qg = q.clone().requires_grad_()
        q2, _ = llama_ext.apply_rotary(qg, k, cos, sin, positions)
        q2.sum().backward()
        assert torch.isfinite(qg.grad).all()

    return [("rms_norm", rms), ("fused_add_rms_norm", fused), ("fused_add_rms_norm_", fused_inplace),
            ("rms_norm_backward", rms_backward), ("apply_rotary", rotary), ("apply_rotary_", rotary_inplace),
            ("apply_rotary_backward", rotary_backward)]


def test_threads_call_every_op_at_once():
    calls = _op_calls("cpu")
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(fn) for _ in range(25) for _, fn in calls]
        for f in futures:
            f.result()


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc (Linux)")
def test_no_memory_growth_cpu():
    calls = _op_calls("cpu")
    for _ in range(200):  # warm up the allocator and autograd
        for _, fn in calls:
            fn()
    gc.collect()
    before = _rss_bytes()
    for _ in range(10_000 // len(calls)):
        for _, fn in calls:
            fn()
    gc.collect()
    growth = _rss_bytes() - before
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 10,000 calls"


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
def test_no_memory_growth_cuda():
    calls = _op_calls("cuda")
    for _, fn in calls:
        fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(10_000 // len(calls)):
        for _, fn in calls:
            fn()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before


@cuda_only
def test_ops_run_on_the_current_stream():
    stream = torch.cuda.Stream()
    calls = _op_calls("cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        for _, fn in calls:
            fn()
    stream.synchronize()


@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_ops_on_second_gpu():
    with torch.cuda.device(0):  # the current device differs from the tensors' device
        for _, fn in _op_calls("cuda:1"):
            fn()


@cuda_only
def test_cuda_graph_capture_of_forward_ops():
    x = torch.randn(8, 256, device="cuda")
    r = torch.randn(8, 256, device="cuda")
    w = torch.randn(256, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        llama_ext.rms_norm(x, w)
        llama_ext.fused_add_rms_norm(x, r, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = llama_ext.rms_norm(x, w)
        fy, fres = llama_ext.fused_add_rms_norm(x, r, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, rms_norm_reference(x, w), torch.float32)
    assert_close(fy, fused_add_rms_norm_reference(x, r, w)[0], torch.float32)
