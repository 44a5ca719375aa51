"""The CUDA attention kernels really run on tensor cores: their SASS, read from the built
extension with cuobjdump, holds HMMA (mma.sync), LDSM (ldmatrix) and LDGSTS (cp.async) for
both architectures the extension targets by default (TORCH_CUDA_ARCH_LIST 8.0;9.0). Needs no
GPU, only a CUDA build and cuobjdump (on PATH, in $CUDA_HOME/bin, or shipped in triton's
package). A build for other architectures only (`make gpu-check` builds for the local GPU)
skips the missing one, saying so, and must contain at least one of the two."""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from conftest import CUDA_HEAD_DIMS, CUDA_MAX_BACKWARD_TC_HEAD_DIM, CUDA_TC_TYPES

ARCHS = ("sm_80", "sm_90")
# Kernel name fragments (they appear verbatim inside the mangled names) and the (dtype, head_dim)
# instantiations each must have, from the one list in csrc/cuda/attention_launch.cuh.
TENSOR_CORE_KERNELS = {
    "attention_forward_tc_kernel": {(t, d) for t in CUDA_TC_TYPES for d in CUDA_HEAD_DIMS},
    "attention_backward_tc_kernel": {
        (t, d) for t in CUDA_TC_TYPES for d in CUDA_HEAD_DIMS if d <= CUDA_MAX_BACKWARD_TC_HEAD_DIM
    },
    # The decode kernel of gqa_attention_with_kvcache (csrc/cuda/kvcache_attention.cu).
    "attend_tc_kernel": {(t, d) for t in CUDA_TC_TYPES for d in CUDA_HEAD_DIMS},
}
# Kernels that must not touch local memory either (no spills, no stack arrays), beyond the above.
NO_LOCAL_MEMORY_KERNELS = ("attend_simt_kernel",)
REQUIRED_OPCODES = ("HMMA", "LDSM", "LDGSTS")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = []
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        for root in triton.submodule_search_locations:
            candidates.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def _extension_path():
    spec = importlib.util.find_spec("llama_ext._C")
    assert spec is not None and spec.origin, "llama_ext._C is not built"
    return spec.origin


def _run(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def sass_by_arch():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, $CUDA_HOME/bin or triton's package)")
    so = _extension_path()
    try:
        elves = _run(tool, "-lelf", so)
    except subprocess.CalledProcessError as e:
        # cuobjdump exits non-zero on a host-only binary ("does not contain device code").
        pytest.skip(f"the extension has no CUDA kernels (CPU-only build): {e.stderr.strip()}")
    built = set(re.findall(r"\b(sm_\d+)\b", elves))
    if not built:
        pytest.skip("the extension has no CUDA kernels (CPU-only build)")
    assert built & set(ARCHS), f"the build has SASS for {sorted(built)} only, none of {ARCHS}"
    return {arch: _run(tool, "-sass", "-arch", arch, so) for arch in ARCHS if arch in built}


def _sass_for(sass_by_arch, arch):
    if arch not in sass_by_arch:
        pytest.skip(f"the extension was built without {arch} (TORCH_CUDA_ARCH_LIST); built: {sorted(sass_by_arch)}")
    return sass_by_arch[arch]


def _template_args(name, kernel):
    """(dtype, head_dim) of a mangled `kernel<T, D, ...>` instantiation: after the kernel's name
    come I, T as <length><identifier>, and D as Li<value>E."""
    m = re.search(rf"{kernel}I(\d+)", name)
    assert m, f"{name}: no template arguments after {kernel}"
    start = m.end()
    dtype = name[start: start + int(m.group(1))]
    d = re.match(r"Li(\d+)E", name[start + int(m.group(1)):])
    assert d, f"{name}: no head_dim after the dtype {dtype}"
    return dtype, int(d.group(1))


def _functions(sass):
    """{mangled function name: its SASS text} from a cuobjdump -sass listing."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", sorted(TENSOR_CORE_KERNELS))
def test_attention_kernels_use_tensor_cores(sass_by_arch, arch, kernel):
    functions = {name: body for name, body in _functions(_sass_for(sass_by_arch, arch)).items() if kernel in name}
    found = {_template_args(name, kernel) for name in functions}
    assert found == TENSOR_CORE_KERNELS[kernel], (
        f"{arch}: {kernel} instantiations differ from attention_launch.cuh's list: missing "
        f"{sorted(TENSOR_CORE_KERNELS[kernel] - found)}, unexpected {sorted(found - TENSOR_CORE_KERNELS[kernel])}"
    )
    for name, body in functions.items():
        opcodes = set(re.findall(r"\b([A-Z][A-Z0-9]+)(?:\.[A-Z0-9_.]+)?\s", body))
        missing = [op for op in REQUIRED_OPCODES if op not in opcodes]
        assert not missing, f"{arch} {name}: no {missing} in its SASS"


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_tensor_core_kernels_do_not_spill(sass_by_arch, arch):
    # Local-memory traffic (STL/LDL) in the hot kernels would mean register spills.
    for name, body in _functions(_sass_for(sass_by_arch, arch)).items():
        if any(kernel in name for kernel in (*TENSOR_CORE_KERNELS, *NO_LOCAL_MEMORY_KERNELS)):
            assert not re.search(r"\b(STL|LDL)\b", body), f"{arch} {name} spills to local memory"


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_softcap_uses_no_approximate_tanh(sass_by_arch, arch):
    # --use_fast_math would turn tanhf into MUFU.TANH (~2^-11 relative error): the softcap's
    # tanh must be the full-precision one (precise_tanh in attention_common.cuh).
    functions = {n: b for n, b in _functions(_sass_for(sass_by_arch, arch)).items() if "attention" in n}
    assert functions, f"{arch}: no attention kernels in the SASS"
    for name, body in functions.items():
        assert "MUFU.TANH" not in body, f"{arch} {name} uses the approximate tanh"
