import ctypes

import pytest
import torch
from torch.library import opcheck

import llama_ext
from llama_ext.reference import fused_add_rms_norm_reference, hf_rms_norm, rms_norm_reference

from conftest import (CUDA_DTYPES, CUDA_TYPE_NAMES, DEVICES, assert_close, device_dtype_params, emulation_only_on_cpu,
                      ptx_kernel)

REDUCED = (torch.float16, torch.bfloat16)

# 1 and 7: tails only; 769 and 4099: unaligned rows (scalar CUDA path); 64, 5120: 16-byte
# vectors; 65536: wider than the CUDA register cache (looped path).
HIDDEN_SIZES = [1, 7, 64, 769, 4099, 5120, 65536]
LEADING_SHAPES = [(0,), (1,), (3,), (2, 5), (37,)]


def make(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("leading", LEADING_SHAPES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_float64(device, dtype, hidden, leading, with_weight):
    if hidden * max(1, leading[-1]) > 2**20:
        leading = (2,)  # keep the widest rows cheap
    x = make(leading + (hidden,), device, dtype, scale=3.0)
    weight = make((hidden,), device, dtype) if with_weight else None
    y = llama_ext.rms_norm(x, weight, eps=1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, rms_norm_reference(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params(CUDA_DTYPES))  # HF computes float64 in fp32
def test_rms_norm_follows_hf_numerics(device, dtype):
    """The contract: normalize in fp32, round to the input dtype, multiply by weight. Only the
    fp32 summation order differs from HF's, so results agree to an ulp or two of the dtype (most
    are bit-identical), far tighter than the float64 comparison."""
    x = make((8, 4096), device, dtype)
    weight = make((4096,), device, dtype)
    expected = hf_rms_norm(x, weight, 1e-6)
    actual = llama_ext.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(actual, expected, atol=0, rtol=4 * torch.finfo(dtype).eps)
    if dtype in (torch.float16, torch.bfloat16):  # the final rounding hides rstd's last bit
        assert (actual == expected).float().mean() > 0.99


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("hidden", [7, 769, 4096, 65536])
def test_fused_add_rms_norm_matches_float64(device, dtype, hidden):
    x, residual = make((5, 3, hidden), device, dtype), make((5, 3, hidden), device, dtype)
    weight = make((hidden,), device, dtype)
    y, res = llama_ext.fused_add_rms_norm(x, residual, weight)
    y_ref, res_ref = fused_add_rms_norm_reference(x, residual, weight)
    assert_close(res, res_ref, dtype)
    assert_close(y, y_ref, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("hidden", [7, 4096])
def test_fused_add_rms_norm_inplace(device, dtype, hidden):
    x, residual = make((4, hidden), device, dtype), make((4, hidden), device, dtype)
    weight = make((hidden,), device, dtype)
    y_ref, res_ref = llama_ext.fused_add_rms_norm(x, residual, weight)
    x_in, res_in = x.clone(), residual.clone()
    assert llama_ext.fused_add_rms_norm_(x_in, res_in, weight) is None
    torch.testing.assert_close(res_in, res_ref, atol=0, rtol=0)
    torch.testing.assert_close(x_in, y_ref, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_add_rms_norm_inplace_non_collapsible_views(device):
    """Leading dims that cannot be viewed as rows still update the caller's tensors."""
    base = make((6, 4, 64), device, torch.float32)
    x = base.transpose(0, 1)  # [4, 6, 64], leading dims not collapsible
    residual = make((4, 6, 64), device, torch.float32)
    y_ref, res_ref = llama_ext.fused_add_rms_norm(x, residual)
    llama_ext.fused_add_rms_norm_(x, residual)
    torch.testing.assert_close(residual, res_ref)
    torch.testing.assert_close(x, y_ref)
    torch.testing.assert_close(base.transpose(0, 1), y_ref)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_strided_rows_no_copy(device, dtype):
    """A slice of a wider tensor (row stride > hidden) and a transposed batch both work."""
    wide = make((16, 3 * 769), device, dtype)
    x = wide[:, 769 : 2 * 769]  # misaligned rows
    weight = make((769,), device, dtype)
    assert_close(llama_ext.rms_norm(x, weight), rms_norm_reference(x, weight), dtype)
    aligned = make((16, 3 * 1024), device, dtype)[:, 1024:2048]  # aligned, strided rows
    w1024 = make((1024,), device, dtype)
    assert_close(llama_ext.rms_norm(aligned, w1024), rms_norm_reference(aligned, w1024), dtype)
    xt = make((5, 8, 128), device, dtype).transpose(0, 1)
    assert_close(llama_ext.rms_norm(xt, None), rms_norm_reference(xt), dtype)
    res = make((16, 769), device, dtype)
    y, r = llama_ext.fused_add_rms_norm(x, res, weight)
    assert_close(r, x.double() + res.double(), dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("hidden", [7, 769, 4096, 16384])  # 16384: CUDA's looped backward
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_backward_matches_float64(device, dtype, hidden, with_weight):
    x = make((6, 5, hidden), device, dtype).requires_grad_()
    weight = make((hidden,), device, dtype).requires_grad_() if with_weight else None
    grad = make((6, 5, hidden), device, dtype)
    llama_ext.rms_norm(x, weight).backward(grad)

    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_() if with_weight else None
    rms_norm_reference(x64, w64).backward(grad.double())
    # dweight sums over 30 rows: scale the tolerance with the reduction.
    assert_close(x.grad, x64.grad, dtype, scale=4.0)
    if with_weight:
        assert_close(weight.grad, w64.grad, dtype, scale=8.0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("magnitude,eps", [(1.0, 1e-6), (1e-3, 0.0)])
def test_fused_add_rms_norm_backward_matches_float64(device, dtype, magnitude, eps):
    """Small inputs with eps 0: dx is a difference of terms ~1/rms, where the sum's rounding
    to the input dtype (which the op normalizes, as HF does) moves it by several tolerances, so
    the reference rounds the sum too."""
    hidden = 769
    x = make((7, hidden), device, dtype, scale=magnitude).requires_grad_()
    residual = make((7, hidden), device, dtype, scale=magnitude).requires_grad_()
    weight = make((hidden,), device, dtype).requires_grad_()
    g_y, g_res = make((7, hidden), device, dtype), make((7, hidden), device, dtype)
    y, res = llama_ext.fused_add_rms_norm(x, residual, weight, eps)
    torch.autograd.backward([y, res], [g_y, g_res])

    leaves = [t.detach().double().requires_grad_() for t in (x, residual, weight)]
    y64, res64 = fused_add_rms_norm_reference(*leaves, eps, sum_dtype=dtype)
    torch.autograd.backward([y64, res64], [g_y.double(), g_res.double()])
    for got, ref in zip((x.grad, residual.grad, weight.grad), (l.grad for l in leaves)):
        assert_close(got, ref, dtype, scale=8.0)


@pytest.mark.parametrize("with_weight", [True, False])
def test_gradcheck_float64(with_weight):
    x = torch.randn(4, 3, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, dtype=torch.float64, requires_grad=True) if with_weight else None
    r = torch.randn(4, 3, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: llama_ext.rms_norm(a, b), (x, w))
    assert torch.autograd.gradcheck(lambda a, b, c: llama_ext.fused_add_rms_norm(a, b, c), (x, r, w))


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grad_is_deterministic(device):
    x = make((1000, 256), device, torch.float32).requires_grad_()
    w = make((256,), device, torch.float32).requires_grad_()
    g = make((1000, 256), device, torch.float32)
    grads = []
    for _ in range(3):
        w.grad = None
        llama_ext.rms_norm(x, w).backward(g)
        grads.append(w.grad.clone())
    for other in grads[1:]:
        assert torch.equal(grads[0], other)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_opcheck(device, dtype):
    x = make((3, 5, 64), device, dtype).requires_grad_()
    w = make((64,), device, dtype).requires_grad_()
    r = make((3, 5, 64), device, dtype)
    opcheck(torch.ops.llama_ext.rms_norm, (x, w, 1e-6))
    opcheck(torch.ops.llama_ext.rms_norm, (x, None, 1e-6))
    opcheck(torch.ops.llama_ext.fused_add_rms_norm, (x, r, w, 1e-6))
    opcheck(torch.ops.llama_ext.fused_add_rms_norm_, (x.detach().clone(), r.clone(), w.detach(), 1e-6))
    y, rstd = torch.ops.llama_ext.rms_norm(x.detach(), w.detach(), 1e-6)
    opcheck(torch.ops.llama_ext.rms_norm_backward, (torch.randn_like(y), x.detach(), w.detach(), rstd, r, True))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])  # inductor: the real compiler, with codegen
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, backend):
    norm = llama_ext.RMSNorm(96).to(device)
    with torch.no_grad():
        norm.weight.normal_()

    def block(x, residual):
        h, res = norm(x, residual)
        return llama_ext.rms_norm(h * 2.0, norm.weight) + res

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x = make((4, 96), device, torch.float32).requires_grad_()
    r = make((4, 96), device, torch.float32)
    out = compiled(x, r)
    torch.testing.assert_close(out, block(x, r))
    out.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_hf_llama_rms_norm(device):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(256, eps=1e-5).to(device)
    with torch.no_grad():
        hf.weight.normal_()
    ours = llama_ext.RMSNorm(256, eps=1e-5).to(device)
    ours.load_state_dict(hf.state_dict())
    x = make((2, 9, 256), device, torch.float32)
    torch.testing.assert_close(ours(x), hf(x))
    assert torch.equal(llama_ext.RMSNorm(8).weight, torch.ones(8))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    x = torch.empty(0, 64, device=device)
    w = torch.ones(64, device=device)
    assert llama_ext.rms_norm(x, w).shape == (0, 64)
    y, r = llama_ext.fused_add_rms_norm(x, x.clone(), w)
    assert y.shape == r.shape == (0, 64)
    xg = x.clone().requires_grad_()
    llama_ext.rms_norm(xg, w).sum().backward()
    assert xg.grad.shape == (0, 64)


BAD_INPUTS = [
    ("0-dim input", lambda d: (torch.tensor(1.0, device=d), None), ValueError, "0-dim"),
    ("integer input", lambda d: (torch.ones(2, 4, dtype=torch.int32, device=d), None), TypeError, "floating-point"),
    ("bool input", lambda d: (torch.ones(2, 4, dtype=torch.bool, device=d), None), TypeError, "floating-point"),
    ("weight size", lambda d: (torch.randn(2, 4, device=d), torch.ones(5, device=d)), ValueError, r"weight must have shape \[4\] \(the hidden size of input\), got \[5\]"),
    ("weight dtype", lambda d: (torch.randn(2, 4, device=d), torch.ones(4, device=d, dtype=torch.float16)), TypeError, "weight must have the same dtype"),
    ("bf16 weight, fp32 input", lambda d: (torch.randn(2, 4, device=d), torch.ones(4, device=d, dtype=torch.bfloat16)), TypeError, "or, with float16/bfloat16 input, be float32"),
    ("fp64 weight, bf16 input", lambda d: (torch.randn(2, 4, device=d, dtype=torch.bfloat16), torch.ones(4, device=d, dtype=torch.float64)), TypeError, "weight must have the same dtype"),
    ("last dim strided", lambda d: (torch.randn(4, 2, device=d).t(), None), RuntimeError, "contiguous in its last dimension"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(device, case):
    _, build, exc, message = case
    x, w = build(device)
    with pytest.raises(exc, match=message):
        llama_ext.rms_norm(x, w)


def test_bad_eps_and_devices():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="eps"):
        llama_ext.rms_norm(x, None, eps=-1.0)
    with pytest.raises(ValueError, match="residual must have the same shape"):
        llama_ext.fused_add_rms_norm(x, torch.randn(2, 5))
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="same device"):
            llama_ext.rms_norm(x, torch.ones(4, device="cuda"))


def test_inplace_refuses_autograd():
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no autograd"):
        llama_ext.fused_add_rms_norm_(x, torch.randn(2, 4))


# ---- variants: offset (Gemma's 1 + weight) and the cast order -----------------------------------

VARIANTS = [
    pytest.param(0.0, True, id="llama"),
    pytest.param(0.0, False, id="olmo2"),
    pytest.param(1.0, False, id="gemma"),
    pytest.param(1.0, True, id="offset-cast-first"),
]


def weight_dtypes(dtype):
    return (dtype, torch.float32) if dtype in REDUCED else (dtype,)


def expected_out_dtype(dtype, weight_dtype, cast_before_weight):
    """What HF's modules return: Llama multiplies in the promoted dtype, Gemma/OLMo 2 cast back."""
    return torch.promote_types(dtype, weight_dtype) if cast_before_weight else dtype


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("offset,cast_before_weight", VARIANTS)
@pytest.mark.parametrize("hidden", [7, 128, 769, 4096])
def test_variants_match_float64(device, dtype, offset, cast_before_weight, hidden):
    for weight_dtype in weight_dtypes(dtype):
        x, residual = make((3, 5, hidden), device, dtype, scale=3.0), make((3, 5, hidden), device, dtype)
        weight = make((hidden,), device, weight_dtype, scale=0.5)
        out_dtype = expected_out_dtype(dtype, weight_dtype, cast_before_weight)
        y = llama_ext.rms_norm(x, weight, 1e-5, offset, cast_before_weight)
        assert y.dtype == out_dtype
        assert_close(y, rms_norm_reference(x, weight, 1e-5, offset), dtype, scale=2.0)

        y, res = llama_ext.fused_add_rms_norm(x, residual, weight, 1e-5, offset, cast_before_weight)
        assert y.dtype == out_dtype and res.dtype == dtype
        assert_close(res, x.double() + residual.double(), dtype)
        assert_close(y, rms_norm_reference(res, weight, 1e-5, offset), dtype, scale=2.0)

        if out_dtype == dtype:
            x_in, res_in = x.clone(), residual.clone()
            llama_ext.fused_add_rms_norm_(x_in, res_in, weight, 1e-5, offset, cast_before_weight)
            assert torch.equal(res_in, res) and torch.equal(x_in, y)
        else:
            with pytest.raises(TypeError, match="writes the result into input"):
                llama_ext.fused_add_rms_norm_(x.clone(), residual.clone(), weight, 1e-5, offset, cast_before_weight)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("offset,cast_before_weight", VARIANTS)
def test_variants_without_weight(device, dtype, offset, cast_before_weight):
    """None is a weight of ones: the weight applied is offset + 1."""
    x = make((4, 100), device, dtype, scale=2.0)
    y = llama_ext.rms_norm(x, None, 1e-6, offset, cast_before_weight)
    assert y.dtype == dtype
    assert_close(y, rms_norm_reference(x, None, 1e-6, offset), dtype, scale=2.0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("offset,cast_before_weight", VARIANTS)
@pytest.mark.parametrize("hidden", [7, 128, 4096, 16384])
def test_variants_backward_match_float64(device, dtype, offset, cast_before_weight, hidden):
    for weight_dtype in weight_dtypes(dtype):
        x = make((6, 5, hidden), device, dtype).requires_grad_()
        residual = make((6, 5, hidden), device, dtype).requires_grad_()
        weight = make((hidden,), device, weight_dtype, scale=0.5).requires_grad_()
        out_dtype = expected_out_dtype(dtype, weight_dtype, cast_before_weight)
        g_y, g_res = make((6, 5, hidden), device, out_dtype), make((6, 5, hidden), device, dtype)
        y, res = llama_ext.fused_add_rms_norm(x, residual, weight, 1e-6, offset, cast_before_weight)
        torch.autograd.backward([y, res], [g_y, g_res])
        assert x.grad.dtype == dtype and weight.grad.dtype == weight_dtype

        leaves = [t.detach().double().requires_grad_() for t in (x, residual, weight)]
        y64, res64 = fused_add_rms_norm_reference(*leaves, 1e-6, offset, sum_dtype=dtype)
        torch.autograd.backward([y64, res64], [g_y.double(), g_res.double()])
        assert_close(x.grad, leaves[0].grad, dtype, scale=8.0)
        assert_close(residual.grad, leaves[1].grad, dtype, scale=8.0)
        # dweight sums 30 rows of g * xhat; with cast_before_weight xhat was rounded to dtype.
        assert_close(weight.grad, leaves[2].grad, dtype, scale=16.0)

        x.grad = weight.grad = None
        llama_ext.rms_norm(x, weight, 1e-6, offset, cast_before_weight).backward(g_y)
        x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
        rms_norm_reference(x64, w64, 1e-6, offset).backward(g_y.double())
        assert_close(x.grad, x64.grad, dtype, scale=8.0)
        assert_close(weight.grad, w64.grad, dtype, scale=16.0)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("offset,cast_before_weight", VARIANTS)
@pytest.mark.parametrize("rows", [150, 230])  # dweight chunks of 5 and 8 rows (the last of 6)
@pytest.mark.parametrize("hidden", [7, 769, 4120])  # 4120: a tail past a whole vector
def test_backward_over_chunks_of_several_rows(device, dtype, offset, cast_before_weight, rows, hidden):
    """Enough rows that each of dweight's fixed row chunks holds several: the CPU adds a chunk's
    rows four at a time and then the rest one by one, with and without the fused add's residual
    gradient, for each weight dtype. On the CPU the bits do not depend on the thread count."""
    for weight_dtype in weight_dtypes(dtype):
        out_dtype = expected_out_dtype(dtype, weight_dtype, cast_before_weight)
        x = make((rows, hidden), device, dtype)
        residual = make((rows, hidden), device, dtype)
        weight = make((hidden,), device, weight_dtype, scale=0.5)
        g_y, g_res = make((rows, hidden), device, out_dtype), make((rows, hidden), device, dtype)
        args = (1e-6, offset, cast_before_weight)

        def grads(threads):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                fused = [t.detach().clone().requires_grad_() for t in (x, residual, weight)]
                y, res = llama_ext.fused_add_rms_norm(*fused, *args)
                torch.autograd.backward([y, res], [g_y, g_res])
                plain = [t.detach().clone().requires_grad_() for t in (x, weight)]
                llama_ext.rms_norm(*plain, *args).backward(g_y)
                return [t.grad for t in fused + plain]
            finally:
                torch.set_num_threads(before)

        got = grads(2)
        fused = [t.detach().double().requires_grad_() for t in (x, residual, weight)]
        y64, res64 = fused_add_rms_norm_reference(*fused, 1e-6, offset, sum_dtype=dtype)
        torch.autograd.backward([y64, res64], [g_y.double(), g_res.double()])
        plain = [t.detach().double().requires_grad_() for t in (x, weight)]
        rms_norm_reference(*plain, 1e-6, offset).backward(g_y.double())
        # dweight (2 and 4) sums `rows` products, each of an xhat rounded to dtype when cast first:
        # the 30-row tests' scale of 16 holds here too (on the CPU these cases need at most 5.1).
        for i, (g, ref) in enumerate(zip(got, [t.grad for t in fused + plain])):
            assert_close(g, ref, dtype, scale=16.0 if i in (2, 4) else 8.0)
        if device == "cpu" and hidden >= 769:  # narrower rows stay on one thread
            for threads in (1, 3):
                assert all(torch.equal(a, b) for a, b in zip(grads(threads), got))


def _hf_norm_classes():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    # HF class -> (offset, cast_before_weight) of the llama_ext module that replaces it.
    return {
        LlamaRMSNorm: (0.0, True),
        Qwen3RMSNorm: (0.0, True),
        Olmo2RMSNorm: (0.0, False),
        GemmaRMSNorm: (1.0, False),
        Gemma2RMSNorm: (1.0, False),
        Gemma3RMSNorm: (1.0, False),
    }


HF_NORMS = ["LlamaRMSNorm", "Qwen3RMSNorm", "Olmo2RMSNorm", "GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"]


# (device, input dtype, weight dtype): the module in the input's dtype, fp32 modules on fp16/bf16,
# and fp16/bf16 modules on fp32 activations (a model whose residual stream stays fp32 after
# .to(bfloat16)), whose weight the module widens, as HF's norms promote it.
HF_DTYPES = [
    pytest.param(d, t, w, id=f"{d}-{str(t).split('.')[-1]}-weight-{str(w).split('.')[-1]}")
    for d in DEVICES
    for t in CUDA_DTYPES
    for w in weight_dtypes(t) + ((torch.float16, torch.bfloat16) if t == torch.float32 else ())
]


@pytest.mark.parametrize("device,dtype,weight_dtype", HF_DTYPES)
@pytest.mark.parametrize("hf_name", HF_NORMS)
@pytest.mark.parametrize("hidden", [128, 4096])
def test_module_follows_each_hf_norm_bit_for_bit(device, dtype, weight_dtype, hf_name, hidden):
    """Same numerics as HF's module, for its own dtypes (including an fp32 module on bf16/fp16
    activations): the output dtype is HF's, and only the fp32 sum order of the statistics
    differs, so results agree to an ulp or two of the output dtype and nearly all are identical."""
    cls = next(c for c in _hf_norm_classes() if c.__name__ == hf_name)
    offset, cast_before_weight = _hf_norm_classes()[cls]
    hf = cls(hidden, eps=1e-6).to(device=device, dtype=weight_dtype)
    with torch.no_grad():
        hf.weight.normal_(0.0, 0.5)
    ours = llama_ext.RMSNorm(hidden, eps=1e-6, offset=offset, cast_before_weight=cast_before_weight).to(
        device=device, dtype=weight_dtype
    )
    ours.load_state_dict(hf.state_dict())
    x = make((16, hidden), device, dtype, scale=2.0)
    expected = hf(x)
    actual = ours(x)
    assert actual.dtype == expected.dtype
    out_eps = torch.finfo(expected.dtype).eps
    # An fp32 result of a bf16-rounded value inherits that rounding's ulp.
    torch.testing.assert_close(actual, expected, atol=0, rtol=4 * max(out_eps, torch.finfo(dtype).eps))
    if dtype in REDUCED:  # a rounding to the input dtype hides rstd's last bit
        assert (actual == expected).float().mean() > 0.99


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hf_name", HF_NORMS)
def test_module_gradients_follow_hf(device, hf_name):
    """fp32 module on fp32 input: gradients of input and weight match HF's autograd closely."""
    cls = next(c for c in _hf_norm_classes() if c.__name__ == hf_name)
    offset, cast_before_weight = _hf_norm_classes()[cls]
    hf = cls(96, eps=1e-6).to(device)
    with torch.no_grad():
        hf.weight.normal_(0.0, 0.5)
    ours = llama_ext.RMSNorm(96, eps=1e-6, offset=offset, cast_before_weight=cast_before_weight).to(device)
    ours.load_state_dict(hf.state_dict())
    x = make((4, 7, 96), device, torch.float32).requires_grad_()
    g = make((4, 7, 96), device, torch.float32)
    dx_hf, dw_hf = torch.autograd.grad(hf(x), (x, hf.weight), g)
    dx, dw = torch.autograd.grad(ours(x), (x, ours.weight), g)
    torch.testing.assert_close(dx, dx_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, dw_hf, atol=1e-5, rtol=1e-5)


def test_module_weight_starts_at_applied_ones():
    assert torch.equal(llama_ext.RMSNorm(8).weight, torch.ones(8))
    gemma = llama_ext.RMSNorm(8, offset=1.0, cast_before_weight=False)
    assert torch.equal(gemma.weight, torch.zeros(8))
    x = make((3, 8), "cpu", torch.float32)
    torch.testing.assert_close(gemma(x), llama_ext.RMSNorm(8)(x), atol=0, rtol=0)
    assert "offset=1.0" in repr(gemma) and "cast_before_weight=False" in repr(gemma)


@pytest.mark.parametrize("offset,cast_before_weight", VARIANTS)
def test_variants_gradcheck_float64(offset, cast_before_weight):
    x = torch.randn(4, 3, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: llama_ext.rms_norm(a, b, 1e-6, offset, cast_before_weight), (x, w))
    assert torch.autograd.gradcheck(
        lambda a, b, c: llama_ext.fused_add_rms_norm(a, b, c, 1e-6, offset, cast_before_weight), (x, r, w)
    )
    assert torch.autograd.gradcheck(lambda a: llama_ext.rms_norm(a, None, 1e-6, offset, cast_before_weight), (x,))


@pytest.mark.parametrize("device,dtype", device_dtype_params(REDUCED))
@pytest.mark.parametrize("offset,cast_before_weight", VARIANTS)
def test_variants_opcheck(device, dtype, offset, cast_before_weight):
    x = make((3, 5, 64), device, dtype).requires_grad_()
    w = make((64,), device, torch.float32).requires_grad_()
    w_same = make((64,), device, dtype).requires_grad_()
    r = make((3, 5, 64), device, dtype)
    for weight in (w, w_same):
        opcheck(torch.ops.llama_ext.rms_norm, (x, weight, 1e-6, offset, cast_before_weight))
        opcheck(torch.ops.llama_ext.fused_add_rms_norm, (x, r, weight, 1e-6, offset, cast_before_weight))
        y, rstd = torch.ops.llama_ext.rms_norm(x.detach(), weight.detach(), 1e-6, offset, cast_before_weight)
        opcheck(
            torch.ops.llama_ext.rms_norm_backward,
            (torch.randn_like(y), x.detach(), weight.detach(), rstd, r, True, offset, cast_before_weight),
        )
    opcheck(torch.ops.llama_ext.fused_add_rms_norm_, (x.detach().clone(), r.clone(), w.detach(), 1e-6, offset, False))


@pytest.mark.parametrize("device", DEVICES)
def test_variants_torch_compile_fullgraph(device):
    """A Gemma-style norm and a Llama norm with an fp32 weight on bf16 activations, through inductor."""
    gemma = llama_ext.RMSNorm(64, offset=1.0, cast_before_weight=False).to(device)
    llama = llama_ext.RMSNorm(64).to(device)
    with torch.no_grad():
        gemma.weight.normal_(0.0, 0.5)
        llama.weight.normal_()

    def block(x, residual):
        h, res = gemma(x, residual)
        return llama(h) + res

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    x = make((4, 64), device, torch.bfloat16).requires_grad_()
    r = make((4, 64), device, torch.bfloat16)
    out = compiled(x, r)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, block(x, r))
    out.sum().backward()
    assert gemma.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_variants_bad_input():
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="offset must be a finite number"):
        llama_ext.rms_norm(x, None, 1e-6, float("nan"))
    with pytest.raises(TypeError, match="writes the result into input"):
        llama_ext.fused_add_rms_norm_(x, x.clone(), torch.ones(4), 1e-6, 0.0, True)
    w = torch.ones(4)
    y, rstd = torch.ops.llama_ext.rms_norm(x, w, 1e-6, 0.0, True)
    with pytest.raises(TypeError, match="grad_out must have the forward output's dtype"):
        torch.ops.llama_ext.rms_norm_backward(y.bfloat16(), x, w, rstd, None, True, 0.0, True)
    with pytest.raises(TypeError, match="grad_out must have the forward output's dtype"):
        torch.ops.llama_ext.rms_norm_backward(y, x, w, rstd, None, True, 0.0, False)


# ---- layout independence ----------------------------------------------------------------------


def misaligned(t):
    """The rows of t, copied into a buffer one element wider and viewed from its second element:
    off their 16-byte alignment (the first row one element past it)."""
    wide = torch.empty(t.shape[0], t.shape[1] + 1, device=t.device, dtype=t.dtype)
    wide[:, 1:] = t
    return wide[:, 1:]


@pytest.mark.parametrize("device,dtype", device_dtype_params(CUDA_DTYPES))
@pytest.mark.parametrize("hidden", [128, 1024, 4096, 16384, 65536])
@pytest.mark.parametrize("offset,cast_before_weight", [VARIANTS[0], VARIANTS[2]])
def test_misaligned_rows_give_the_same_bits(device, dtype, hidden, offset, cast_before_weight):
    """A row one element off its 16-byte alignment (the unaligned, element-wise CUDA path) gives
    exactly the bits of its contiguous copy (the vectorized path): forward, fused, in place and
    backward (dx and dweight), for short (per-row warp), register-cached and looped rows."""
    rows = 3 if hidden >= 16384 else 37
    x, r = make((rows, hidden), device, dtype), make((rows, hidden), device, dtype)
    g, g_res = make((rows, hidden), device, dtype), make((rows, hidden), device, dtype)
    w = make((hidden,), device, dtype)
    xs, rs, gs, g_res_s = (misaligned(t) for t in (x, r, g, g_res))
    assert xs.data_ptr() % 16 != 0 and torch.equal(xs, x)
    args = (w, 1e-6, offset, cast_before_weight)

    assert torch.equal(llama_ext.rms_norm(xs, *args), llama_ext.rms_norm(x, *args))
    y_s, res_s = llama_ext.fused_add_rms_norm(xs, rs, *args)
    y, res = llama_ext.fused_add_rms_norm(x, r, *args)
    assert torch.equal(y_s, y) and torch.equal(res_s, res)
    x_in, r_in = misaligned(x), misaligned(r)
    llama_ext.fused_add_rms_norm_(x_in, r_in, *args)
    assert torch.equal(x_in, y) and torch.equal(r_in, res)

    rstd = torch.ops.llama_ext.rms_norm(res, *args)[1]
    dx_s, dw_s = torch.ops.llama_ext.rms_norm_backward(gs, misaligned(res), w, rstd, g_res_s, True, offset,
                                                       cast_before_weight)
    dx, dw = torch.ops.llama_ext.rms_norm_backward(g, res, w, rstd, g_res, True, offset, cast_before_weight)
    assert torch.equal(dx_s, dx) and torch.equal(dw_s, dw)


@pytest.mark.parametrize("device,dtype", device_dtype_params(CUDA_DTYPES))
@pytest.mark.parametrize("rows,hidden", [(20003, 384), (4000, 1536), (3000, 4096)])
@pytest.mark.parametrize("offset,cast_before_weight", [VARIANTS[0], VARIANTS[2]])
def test_backward_over_many_rows_per_cta(device, dtype, rows, hidden, offset, cast_before_weight):
    """Enough rows that every CUDA CTA takes several row blocks, the short rows' last one partial.
    These widths are two chunks a thread in bf16/fp16 (short rows of 384, long rows of 1536 and
    4096), where the launcher takes the row-ahead kernel if it fits as many CTAs per SM as the
    plain one (on sm_90: every bf16/fp16 case at 384 and 4096; fp32 and 1536 stay plain):
    it loads each row while the one before is reduced and written, and keeps dweight's sums in
    registers over all its rows. dx and dweight, plain and with the fused add's residual gradient,
    for each weight dtype, match float64, and the same rows one element off their alignment (the
    element-wise kernel, its sums in memory, a row's loads at its start) give the same bits."""
    x, g_res = make((rows, hidden), device, dtype), make((rows, hidden), device, dtype)
    args = (1e-6, offset, cast_before_weight)
    for weight_dtype in weight_dtypes(dtype):
        w = make((hidden,), device, weight_dtype, scale=0.5)
        g = make((rows, hidden), device, expected_out_dtype(dtype, weight_dtype, cast_before_weight))
        rstd = torch.ops.llama_ext.rms_norm(x, w, *args)[1]
        x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
        rms_norm_reference(x64, w64, 1e-6, offset).backward(g.double())
        for gres in (None, g_res):
            dx, dw = torch.ops.llama_ext.rms_norm_backward(g, x, w, rstd, gres, True, offset, cast_before_weight)
            dx_s, dw_s = torch.ops.llama_ext.rms_norm_backward(
                misaligned(g), misaligned(x), w, rstd, None if gres is None else misaligned(gres), True, offset,
                cast_before_weight)
            assert torch.equal(dx_s, dx) and torch.equal(dw_s, dw)
            assert_close(dx, x64.grad + (0.0 if gres is None else gres.double()), dtype, scale=8.0)
            # dweight sums up to 20003 products of an xhat rounded to dtype (cast first) against
            # float64's exact ones: on the CPU these cases need an absolute scale of at most 29.
            assert_close(dw, w64.grad, dtype, scale=64.0)


@pytest.mark.skipif("cuda" not in DEVICES, reason="LLAMA_EXT_CUDA_ROW_AHEAD steers the CUDA launcher")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("rows,hidden", [(20003, 384), (3000, 1536), (3000, 4096)])
def test_backward_kernel_override_keeps_the_bits_on_cuda(monkeypatch, dtype, rows, hidden):
    """LLAMA_EXT_CUDA_ROW_AHEAD=0 (the plain kernel) and =1 (the row-ahead kernel wherever the
    layout has one) run on the launcher's own grid, so dx and dweight keep the bits of the
    launcher's choice, plain and fused, with either weight dtype; in fp32 at 4096, where sm_90's
    rule keeps the plain kernel, =1 runs the row-ahead one on a grid sized for more CTAs than fit
    at once."""
    x, g_res = make((rows, hidden), "cuda", dtype), make((rows, hidden), "cuda", dtype)
    for weight_dtype in weight_dtypes(dtype):
        w = make((hidden,), "cuda", weight_dtype, scale=0.5)
        g = make((rows, hidden), "cuda", expected_out_dtype(dtype, weight_dtype, True))
        rstd = torch.ops.llama_ext.rms_norm(x, w, 1e-6)[1]
        for gres in (None, g_res):
            results = {}
            for setting in (None, "0", "1"):
                if setting is None:
                    monkeypatch.delenv("LLAMA_EXT_CUDA_ROW_AHEAD", raising=False)
                else:
                    monkeypatch.setenv("LLAMA_EXT_CUDA_ROW_AHEAD", setting)
                results[setting] = torch.ops.llama_ext.rms_norm_backward(g, x, w, rstd, gres, True, 0.0, True)
            for setting in ("0", "1"):
                assert all(torch.equal(mine, auto) for mine, auto in zip(results[setting], results[None])), setting


@pytest.mark.skipif("cuda" not in DEVICES, reason="LLAMA_EXT_CUDA_ROW_AHEAD steers the CUDA launcher")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_backward_kernel_override_refuses_other_values_on_cuda(monkeypatch, dtype):
    """A LLAMA_EXT_CUDA_ROW_AHEAD other than 0 or 1 raises, naming the variable, in every backward
    call: rows with a row-ahead kernel (4096) and without one (64, 20000: cache 1, loop)."""
    for hidden in (4096, 64, 20000):
        x, g = make((8, hidden), "cuda", dtype), make((8, hidden), "cuda", dtype)
        w = make((hidden,), "cuda", dtype)
        rstd = torch.ops.llama_ext.rms_norm(x, w, 1e-6)[1]
        for bad in ("2", "yes", ""):
            monkeypatch.setenv("LLAMA_EXT_CUDA_ROW_AHEAD", bad)
            with pytest.raises(ValueError, match="LLAMA_EXT_CUDA_ROW_AHEAD must be 0 or 1"):
                torch.ops.llama_ext.rms_norm_backward(g, x, w, rstd, None, True, 0.0, True)
        monkeypatch.delenv("LLAMA_EXT_CUDA_ROW_AHEAD")


# ---- the CUDA kernels' own PTX, run on the CPU (tools/ptx_run.py) ---------------------------------
# The host side of rms_norm.cu for the interpreter: the parameter structs of csrc/rms_norm.h
# (checked against each kernel's parameter size) and the launchers' row layout.

class _FwdParams(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64 if kind == "p" else ctypes.c_int64 if kind == "i" else ctypes.c_double)
                for name, kind in (("x", "p"), ("x_stride", "i"), ("residual", "p"), ("residual_stride", "i"),
                                   ("residual_out", "p"), ("residual_out_stride", "i"), ("weight", "p"), ("y", "p"),
                                   ("y_stride", "i"), ("rstd", "p"), ("rows", "i"), ("n", "i"), ("eps", "d"),
                                   ("offset", "d"))] + [
        ("cast_before_weight", ctypes.c_bool), ("dtype", ctypes.c_int8), ("weight_dtype", ctypes.c_int8),
        ("out_dtype", ctypes.c_int8)]


class _BwdParams(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64 if kind == "p" else ctypes.c_int64 if kind == "i" else ctypes.c_double)
                for name, kind in (("grad_out", "p"), ("grad_out_stride", "i"), ("x", "p"), ("x_stride", "i"),
                                   ("weight", "p"), ("rstd", "p"), ("grad_residual", "p"),
                                   ("grad_residual_stride", "i"), ("grad_x", "p"), ("grad_x_stride", "i"),
                                   ("grad_weight", "p"), ("rows", "i"), ("n", "i"), ("offset", "d"))] + [
        ("cast_before_weight", ctypes.c_bool), ("dtype", ctypes.c_int8), ("weight_dtype", ctypes.c_int8),
        ("out_dtype", ctypes.c_int8)]


_SCALAR_TYPES = {torch.float16: 5, torch.float32: 6, torch.bfloat16: 15}  # at::ScalarType


def _row_layout(n, dtype, max_cache):
    """rms_norm.cu's row_layout: (group, threads, cache)."""
    chunk = 16 // dtype.itemsize
    chunks = -(-n // chunk)
    pow2 = lambda v: 1 << max(0, (int(v) - 1).bit_length())
    if chunks <= 128:
        group = min(32, pow2(chunks))
        return group, 256, pow2(-(-chunks // group))
    threads = min(512, -(-(-(-chunks // 2)) // 32) * 32)
    per_thread = -(-chunks // threads)
    return threads, threads, pow2(per_thread) if per_thread <= max_cache else 0


def _rms_norm_fwd_in_ptx(x, weight, residual, eps, offset, cast, out_dtype, aligned):
    """rms_norm_fwd_kernel's PTX over the rows of x: (y, residual_out, rstd)."""
    rows, n = x.shape
    group, threads, cache = _row_layout(n, x.dtype, 8)
    w_dtype = weight.dtype if weight is not None else x.dtype
    names = ", ".join(CUDA_TYPE_NAMES[t] for t in (x.dtype, w_dtype, out_dtype))
    kind = (f"rms_norm_fwd_kernel<{names}, "
            f"{str(aligned).lower()}, {cache if aligned else 0}>")
    run, program = ptx_kernel("rms_norm", kind)
    mem = run.DeviceMemory()
    y = torch.full((rows, n), float("nan"), dtype=out_dtype)
    rstd = torch.full((rows,), float("nan"))
    res_out = torch.full_like(x, float("nan"))
    p = _FwdParams(x=mem.upload(x, "x"), x_stride=x.stride(0), y=mem.upload(y, "y"), y_stride=n,
                   rstd=mem.upload(rstd, "rstd"), rows=rows, n=n, eps=eps, offset=offset, cast_before_weight=cast,
                   dtype=_SCALAR_TYPES[x.dtype], weight_dtype=_SCALAR_TYPES[w_dtype],
                   out_dtype=_SCALAR_TYPES[out_dtype])
    if weight is not None:
        p.weight = mem.upload(weight, "weight")
    if residual is not None:
        p.residual, p.residual_stride = mem.upload(residual, "residual"), residual.stride(0)
        p.residual_out, p.residual_out_stride = mem.upload(res_out, "residual_out"), n
    assert ctypes.sizeof(p) == program.kernel.params[0].size
    program.launch(mem, [bytes(p), group], grid=(-(-rows // (threads // group)),), block=(threads,))
    return mem.download(p.y, y), mem.download(p.residual_out, res_out) if residual is not None else None, \
        mem.download(p.rstd, rstd)


def _rms_norm_bwd_in_ptx(grad, x, weight, rstd, grad_residual, offset, cast, aligned, row_ahead, grid):
    """rms_norm_bwd_kernel's PTX on `grid` CTAs, then reduce_dweight_kernel's: (dx, dweight)."""
    rows, n = x.shape
    group, threads, cache = _row_layout(n, x.dtype, 4)
    cache = cache if aligned else 0
    w_dtype = weight.dtype
    chunk = 16 // x.dtype.itemsize
    ws_stride = -(-n // chunk) * chunk
    rows_per_cta = threads // group
    sums_in_smem = rows_per_cta * ws_stride * 4 <= 32 * 1024
    names = ", ".join(CUDA_TYPE_NAMES[t] for t in (x.dtype, w_dtype, grad.dtype))
    kind = (f"rms_norm_bwd_kernel<{names}, "
            f"{str(aligned).lower()}, {cache}, {str(row_ahead).lower()}>")
    run, program = ptx_kernel("rms_norm", kind)
    mem = run.DeviceMemory()
    dx = torch.full_like(x, float("nan"))
    dw = torch.full((n,), float("nan"), dtype=w_dtype)
    workspace = torch.full((grid, ws_stride), float("nan"))
    p = _BwdParams(grad_out=mem.upload(grad, "grad_out"), grad_out_stride=grad.stride(0), x=mem.upload(x, "x"),
                   x_stride=x.stride(0), weight=mem.upload(weight, "weight"), rstd=mem.upload(rstd, "rstd"),
                   grad_x=mem.upload(dx, "grad_x"), grad_x_stride=n, grad_weight=mem.upload(dw, "grad_weight"),
                   rows=rows, n=n, offset=offset, cast_before_weight=cast, dtype=_SCALAR_TYPES[x.dtype],
                   weight_dtype=_SCALAR_TYPES[w_dtype], out_dtype=_SCALAR_TYPES[grad.dtype])
    if grad_residual is not None:
        p.grad_residual = mem.upload(grad_residual, "grad_residual")
        p.grad_residual_stride = grad_residual.stride(0)
    assert ctypes.sizeof(p) == program.kernel.params[0].size
    ws = mem.upload(workspace, "workspace")
    program.launch(mem, [bytes(p), group, ws, ws_stride, sums_in_smem], grid=(grid,), block=(threads,),
                   dynamic_shared=rows_per_cta * ws_stride * 4 if sums_in_smem else 0)
    _, reduce = ptx_kernel("rms_norm", f"reduce_dweight_kernel<{CUDA_TYPE_NAMES[w_dtype]}>")
    # Wide rows: the first two and the last of reduce_dweight's CTAs (32 columns each) only.
    reduce_grid = -(-n // 32)
    ctas = None if reduce_grid <= 8 else [(0, 0, 0), (1, 0, 0), (reduce_grid - 1, 0, 0)]
    reduce.launch(mem, [ws, grid, ws_stride, n, p.grad_weight], grid=(reduce_grid,), block=(512,), ctas=ctas)
    columns = torch.arange(n) if ctas is None else torch.cat([torch.arange(32 * c[0], min(n, 32 * c[0] + 32))
                                                              for c in ctas])
    return mem.download(p.grad_x, dx), mem.download(p.grad_weight, dw), columns


# (input, weight, out) dtypes and cast_before_weight as the ops pair them, and the row length of
# each layout: short rows (group 16 / 32 of a 256-thread CTA), long rows cached in 2 or 4 chunks a
# thread, and unaligned rows (the loop).
_PTX_VARIANTS = [(torch.bfloat16, torch.bfloat16, False), (torch.bfloat16, torch.float32, True),
                 (torch.float16, torch.float32, False), (torch.float32, torch.float32, False)]


@emulation_only_on_cpu
@pytest.mark.parametrize("dtype,weight_dtype,cast", _PTX_VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("n,rows", [(128, 20), (200, 9), (2048, 2), (100, 3), (8200, 1), (32776, 1)])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_cuda_forward_in_ptx_matches_float64(dtype, weight_dtype, cast, n, rows, fused):
    """rms_norm_fwd_kernel as compiled (its embedded PTX, thread by thread in tools/ptx_run.py):
    each layout (short rows, rows cached 1 to 8 chunks a thread, rows past the cache looped, and
    unaligned rows) with the rows of its last CTA only partly valid, with and without the fused add,
    strided rows; rstd and every element written, nothing outside the tensors."""
    vec = 16 // dtype.itemsize
    aligned = n % vec == 0
    out_dtype = torch.promote_types(dtype, weight_dtype) if cast else dtype
    x = make((rows, n + vec), "cpu", dtype, scale=3.0)[:, :n]  # rows a vector apart
    residual = make((rows, n), "cpu", dtype) if fused else None
    weight = make((n,), "cpu", weight_dtype, scale=0.5)
    offset = 1.0 if cast else 0.0
    y, res_out, rstd = _rms_norm_fwd_in_ptx(x, weight, residual, 1e-5, offset, cast, out_dtype, aligned)
    s = x if residual is None else res_out
    if fused:
        assert_close(res_out, x.double() + residual.double(), dtype)
    assert_close(y, rms_norm_reference(s, weight, 1e-5, offset), dtype, scale=2.0)
    torch.testing.assert_close(rstd.double(), s.double().pow(2).mean(-1).add(1e-5).rsqrt(), rtol=1e-5, atol=0)


@emulation_only_on_cpu
@pytest.mark.parametrize("dtype,weight_dtype,cast", _PTX_VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("n,rows,kernel", [(128, 40, "cached"), (2048, 5, "cached"), (2048, 5, "row_ahead"),
                                           (100, 7, "unaligned"), (8200, 3, "cached")])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_cuda_backward_in_ptx_matches_float64(dtype, weight_dtype, cast, n, rows, kernel, fused):
    """rms_norm_bwd_kernel (plain, row-ahead and unaligned) and reduce_dweight_kernel as compiled,
    on 2 CTAs so that each strides over several row blocks, the last partly valid: dx and dweight
    against float64, with and without the fused add's residual gradient."""
    assert kernel != "row_ahead" or _row_layout(n, dtype, 4)[2] == 2, "the row-ahead kernel is cache 2's only"
    out_dtype = torch.promote_types(dtype, weight_dtype) if cast else dtype
    x = make((rows, n), "cpu", dtype)
    weight = make((n,), "cpu", weight_dtype, scale=0.5)
    grad = make((rows, n), "cpu", out_dtype)
    grad_residual = make((rows, n), "cpu", dtype) if fused else None
    offset = 1.0 if cast else 0.0
    rstd = x.float().pow(2).mean(-1).add(1e-6).rsqrt()
    dx, dw, columns = _rms_norm_bwd_in_ptx(grad, x, weight, rstd, grad_residual, offset, cast,
                                           aligned=kernel != "unaligned", row_ahead=kernel == "row_ahead", grid=2)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    rms_norm_reference(x64, w64, 1e-6, offset).backward(grad.double())
    expected_dx = x64.grad + (grad_residual.double() if fused else 0)
    assert_close(dx, expected_dx, dtype, scale=8.0)
    assert_close(dw[columns], w64.grad[columns], dtype, scale=16.0)


@emulation_only_on_cpu
@pytest.mark.parametrize("weight_dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("n_partials", [1, 16, 37])
def test_cuda_dweight_reduction_in_ptx_sums_in_its_fixed_order(weight_dtype, n_partials):
    """reduce_dweight_kernel as compiled, over workspace rows a padded stride apart: 40 columns
    (its second CTA's 32 only partly used), partials fewer than, equal to and not a multiple of
    its 16 warps; the result is the sum in its documented order (each warp a contiguous range of
    rows in order, then the warps in order), rounded once to the weight's dtype."""
    n, ws_stride = 40, 48
    workspace = torch.randn(n_partials, ws_stride)
    run, program = ptx_kernel("rms_norm", f"reduce_dweight_kernel<{CUDA_TYPE_NAMES[weight_dtype]}>")
    mem = run.DeviceMemory()
    dw = torch.full((n,), float("nan"), dtype=weight_dtype)
    address = mem.upload(dw, "dweight")
    program.launch(mem, [mem.upload(workspace, "workspace"), n_partials, ws_stride, n, address], grid=(2,),
                   block=(512,))
    per_warp = -(-n_partials // 16)
    expected = torch.zeros(n)
    for warp in range(16):
        part = torch.zeros(n)
        for b in range(warp * per_warp, min((warp + 1) * per_warp, n_partials)):
            part = part + workspace[b, :n]
        expected = expected + part
    assert torch.equal(mem.download(address, dw), expected.to(weight_dtype))
