"""The build contains what this machine can compile."""
import os

import pytest
import torch

import llama_ext


def test_cuda_kernels_built_when_expected():
    """In CI, a CUDA build of torch plus nvcc means the CUDA kernels must be in the build, so
    a silently skipped CUDA compile fails CI instead of passing as a CPU-only build."""
    nvcc = os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    expected = torch.version.cuda is not None and nvcc and os.environ.get("LLAMA_EXT_CPU_ONLY") != "1"
    if os.environ.get("CI") != "true":
        pytest.skip("asserted only under CI=true; local builds may set LLAMA_EXT_CPU_ONLY=1")
    assert llama_ext.cuda_kernels_built() == expected


def test_build_runs_the_environments_ninja():
    """setup.py puts the building environment's ninja (the `ninja` package) first on PATH, so make,
    pip and `python setup.py` share the persistent build folder instead of each recompiling
    everything when the ninja on PATH differs (their logs are not compatible across versions)."""
    ninja = pytest.importorskip("ninja")
    root = os.path.dirname(os.path.dirname(os.path.abspath(llama_ext.__file__)))
    link = os.path.join(root, "build", "ninja-bin", "ninja")
    if not os.path.lexists(link):
        pytest.skip("llama_ext was not built in this tree (an installed wheel)")
    assert os.readlink(link) == os.path.join(ninja.BIN_DIR, "ninja")
