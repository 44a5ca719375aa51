"""Shared test parametrization: every test runs on CPU and, when a GPU exists, on CUDA."""
import pytest
import torch


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = CUDA_DTYPES + (torch.float64,)

# Tolerances against a float64 reference: a few units in the last place of each dtype,
# scaled for one intermediate rounding (HF numerics round the normalized value once).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def dtypes_for(device):
    return CPU_DTYPES if device == "cpu" else CUDA_DTYPES


def device_dtype_params(dtypes=CPU_DTYPES):
    """(device, dtype) pairs for pytest.mark.parametrize; float64 only on CPU."""
    return [
        pytest.param(d, t, id=f"{d}-{str(t).split('.')[-1]}")
        for d in DEVICES
        for t in dtypes
        if d == "cpu" or t != torch.float64
    ]


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale
    )


def poison_allocator(device, *shapes, dtype=torch.float32):
    """Allocate, fill with NaN and free blocks the size of the expected outputs, so that an
    output element a kernel forgets to write reads back as NaN and fails the comparison.
    The CUDA caching allocator hands the same blocks back; glibc malloc does for CPU too."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=device) for shape in shapes]
    del blocks


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
