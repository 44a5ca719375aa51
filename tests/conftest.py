"""Shared test parametrization: every test runs on CPU and, when a GPU exists, on CUDA."""
import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings


# Every op output starts as NaN (see new_output in csrc/common.h): an element a kernel does not
# write fails the comparison. Read by the extension at its first call, so set before any test.
os.environ.setdefault("LLAMA_EXT_POISON_OUTPUTS", "1")

# LLAMA_EXT_TEST_DEVICES=cuda (what `make gpu-check` sets) runs only the CUDA half; CI runs the CPU one.
DEVICES = os.environ.get("LLAMA_EXT_TEST_DEVICES", "cpu,cuda").split(",")
DEVICES = [d for d in DEVICES if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_DTYPES = CUDA_DTYPES + (torch.float64,)


def _cuda_attention_kernel_list():
    """The one list of what the CUDA attention kernels cover, read from its X-macros in
    csrc/cuda/attention_launch.cuh: (head dims, tensor-core dtypes)."""
    path = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "attention_launch.cuh")
    with open(path) as f:
        text = f.read()

    def x_macro(name):
        m = re.search(rf"#define {name}\(X\)((?: X\([^)]*\))+)\s*$", text, flags=re.M)
        assert m, f"{name} not found in {path}"
        return re.findall(r"X\(([^)]*)\)", m.group(1))

    head_dims = tuple(int(d) for d in x_macro("LLAMA_EXT_ATTENTION_HEAD_DIMS"))
    return head_dims, tuple(x_macro("LLAMA_EXT_ATTENTION_TC_TYPES"))


CUDA_HEAD_DIMS, CUDA_TC_TYPES = _cuda_attention_kernel_list()

# Property tests: deterministic and bounded. A fixed seed per test (derandomize), no example
# database on disk, a fixed number of examples, no per-example deadline (the first call may
# compile or warm up).
PROPERTY_SETTINGS = settings(
    derandomize=True,
    database=None,
    max_examples=int(os.environ.get("LLAMA_EXT_PROPERTY_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _decode_route_max_seq_q():
    """The most query tokens of a batched gqa_attention call routed to the KV-cache kernels (set
    once, in csrc/attention.h)."""
    path = os.path.join(os.path.dirname(__file__), "..", "csrc", "attention.h")
    with open(path) as f:
        m = re.search(r"kDecodeRouteMaxSeqQ = (\d+);", f.read())
    assert m, f"kDecodeRouteMaxSeqQ not found in {path}"
    return int(m.group(1))


DECODE_ROUTE_MAX_SEQ_Q = _decode_route_max_seq_q()

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
    """Compare with the dtype's tolerance. `scale` widens only the absolute part (for results
    that sum many rounded terms); the relative part stays a few ulps of the dtype."""
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol["atol"] * scale, rtol=tol["rtol"])


def assert_device_assert(code, message):
    """Runs `code` (it imports torch and llama_ext itself) in a child process, since a device-side
    assert poisons the CUDA context, and checks that it died of one: CUDA's report or the
    assert's own message."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "device-side assert" in result.stderr or message in result.stderr, result.stderr[-2000:]


def load_emulation(name):
    """The module tools/<name>.py (numpy only; it needs no build)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    emulation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emulation)
    return emulation


def check_kernel_emulation(name):
    """Runs tools/<name>.py, a lane-level numpy transcription of a CUDA tensor-core kernel (PTX
    fragment layouts from tools/ptx_emu.py): the kernel sources must be those it transcribes
    (their digest), every case must match float64 (run_cases raises on a mismatch, a
    shared-memory race or a case list that misses a path), and every injected kernel bug must be
    caught (check_mutants)."""
    emulation = load_emulation(name)
    digest = emulation.ptx_emu.sources_digest(emulation.TRANSCRIBED)
    assert digest == emulation.TRANSCRIBED_DIGEST, (
        f"{', '.join(emulation.TRANSCRIBED)} changed since tools/{name}.py transcribed them: transcribe the "
        f"change there, run it, then set its TRANSCRIBED_DIGEST to {digest!r}")
    results = emulation.run_cases(verbose=False)
    assert results and all(result[-1] for result in results)
    assert all(emulation.check_mutants(verbose=False).values())


CUDA_TYPE_NAMES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}  # in signatures


@functools.lru_cache(maxsize=None)
def _ptx_run():
    return load_emulation("ptx_run")


@functools.lru_cache(maxsize=None)
def _ptx_module(source_stem):
    return _ptx_run().load(source_stem)


def ptx_kernel(source_stem, match):
    """A kernel of csrc/cuda/<source_stem>.cu as the built extension embeds it in PTX, ready to run
    in tools/ptx_run.py: (the module, its Program) for the one kernel whose demangled signature
    contains `match` (say "rotary_kernel<__half, true, false>"). Skips where the extension was
    built without CUDA."""
    try:
        module = _ptx_module(source_stem)
    except FileNotFoundError as e:  # a CPU-only build, or no cuobjdump
        pytest.skip(f"the CUDA kernels' PTX: {e}")
    names = module.kernels(lambda signature: match in signature)
    assert len(names) == 1, f"{len(names)} kernels of {source_stem}.cu match {match!r}"
    return _ptx_run(), _ptx_run().Program(module, names[0])


# The emulations are the CPU half's check of the CUDA kernels; the GPU machine runs the kernels.
emulation_only_on_cpu = pytest.mark.skipif("cpu" not in DEVICES,
                                           reason="CPU half only: the GPU machine runs the kernel itself")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
