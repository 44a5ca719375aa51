import pytest
import torch
from torch.library import opcheck

import llama_ext
from llama_ext.reference import fused_add_rms_norm_reference, hf_rms_norm, rms_norm_reference

from conftest import CUDA_DTYPES, DEVICES, assert_close, device_dtype_params

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
    # The kernel normalizes the rounded residual, as HF does: compare against that.
    assert_close(y, rms_norm_reference(res, weight), dtype)
    assert_close(y, y_ref, dtype, scale=2.0)


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
def test_fused_add_rms_norm_backward_matches_float64(device, dtype):
    hidden = 769
    x = make((7, hidden), device, dtype).requires_grad_()
    residual = make((7, hidden), device, dtype).requires_grad_()
    weight = make((hidden,), device, dtype).requires_grad_()
    g_y, g_res = make((7, hidden), device, dtype), make((7, hidden), device, dtype)
    y, res = llama_ext.fused_add_rms_norm(x, residual, weight)
    torch.autograd.backward([y, res], [g_y, g_res])

    leaves = [t.detach().double().requires_grad_() for t in (x, residual, weight)]
    y64, res64 = fused_add_rms_norm_reference(*leaves)
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
    ("weight size", lambda d: (torch.randn(2, 4, device=d), torch.ones(5, device=d)), ValueError, "weight must have shape"),
    ("weight dtype", lambda d: (torch.randn(2, 4, device=d), torch.ones(4, device=d, dtype=torch.float16)), TypeError, "weight must have the same dtype"),
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
