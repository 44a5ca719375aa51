"""The build contains what this machine can compile, and the source distribution what it needs."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_libraries_use_the_limited_api():
    """setup.py builds every library against CPython's limited API (py_limited_api, Py_LIMITED_API),
    so one wheel (tagged abi3) serves every CPython from torch's oldest on: the libraries carry
    the abi3 suffix and need neither libtorch_python nor libpython (whose ABI is per version)."""
    from llama_ext import _cpu_kernels

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not on PATH")
    libraries = [llama_ext._C.__file__] + [p for p in map(_cpu_kernels.library_path, _cpu_kernels.levels()) if p]
    assert len(libraries) >= 2, libraries  # _C and the portable CPU kernels at least
    for path in libraries:
        assert path.endswith(".abi3.so"), path
        headers = subprocess.run([objdump, "-p", path], capture_output=True, text=True, check=True).stdout
        needed = [line.split()[1] for line in headers.splitlines() if line.strip().startswith("NEEDED")]
        assert "libc10.so" in needed, (path, needed)  # the parse found the dynamic section
        assert not [lib for lib in needed if lib.startswith(("libtorch_python", "libpython"))], (path, needed)


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


def test_sdist_carries_every_tracked_file(tmp_path):
    """The sdist (MANIFEST.in) holds every file git tracks but the CI entry point, so its tests
    run from it (they load tools/ and read csrc/), and no build outputs. Built from a copy of
    the tracked files, so this tree's build folder and egg-info do not leak in."""
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs the git checkout (the tracked files)")
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in tracked:
        if (repo / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=src, check=True,
                   capture_output=True, env=dict(os.environ, LLAMA_EXT_CPU_ONLY="1"))
    (sdist,) = (tmp_path / "dist").glob("llama_ext-*.tar.gz")
    spec = importlib.util.spec_from_file_location("check_wheel", repo / "scripts" / "check_wheel.py")
    check_wheel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_wheel)
    missing, built = check_wheel.sdist_problems(sdist, repo)
    assert not missing and not built, f"the sdist lacks {missing} / carries build outputs {built}"
