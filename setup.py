"""Builds the one extension module, ``llama_ext._C``.

CUDA sources are compiled whenever torch is a CUDA build and nvcc can be found, GPU or not,
for ``TORCH_CUDA_ARCH_LIST`` (default: see ``_default_cuda_arch_list``). ``LLAMA_EXT_CPU_ONLY=1`` skips them.
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_wrapper_script(path):
    """The nvcc on PATH may be a shell script that execs the real one; torch would then
    derive CUDA_HOME from the script's folder, which holds no headers or libraries."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc and not _is_wrapper_script(nvcc):
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _default_cuda_arch_list(cuda_home):
    """Every current NVIDIA GPU generation: A100 (8.0), RTX 30xx / A10 (8.6), RTX 40xx / L4 / L40
    (8.9), H100 / H200 (9.0) and, where nvcc and torch know it, RTX 50xx (12.0); PTX of the
    newest lets later GPUs compile the kernels at load time."""
    import subprocess

    import torch

    archs = ["8.0", "8.6", "8.9", "9.0"]
    try:
        nvcc_archs = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                                    capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        nvcc_archs = []
    # torch.utils.cpp_extension accepts 12.0 from torch 2.7 on.
    torch_knows_sm120 = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 7)
    if "compute_120" in nvcc_archs and torch_knows_sm120:
        archs.append("12.0")
    return ";".join(archs) + "+PTX"


def _want_cuda():
    if os.environ.get("LLAMA_EXT_CPU_ONLY", "0") == "1":
        return False
    import torch

    if torch.version.cuda is None:
        return False
    home = _find_cuda_home()
    if home is None:
        return False
    # torch.utils.cpp_extension read CUDA_HOME at import time; point it at the real toolkit.
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_cuda_arch_list(home))
    return True


def _host_cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_vector_flags():
    """at::vec picks its vector width from CPU_CAPABILITY_* macros; without one it falls back
    to scalar loops. pip compiles on the machine that runs the code, so, like torch.compile,
    target the build host: AVX-512 where it has AVX-512 (F/BW/VL/DQ), else AVX2 + FMA + F16C.
    LLAMA_EXT_CPU_VEC=avx512|avx2|none (or 0) overrides (e.g. to build for another machine)."""
    choice = os.environ.get("LLAMA_EXT_CPU_VEC", "auto").lower()
    if choice not in ("auto", "avx512", "avx2", "none", "0"):
        raise ValueError(f"LLAMA_EXT_CPU_VEC must be auto, avx512, avx2 or none, got {choice!r}")
    if platform.machine() not in ("x86_64", "AMD64") or choice in ("none", "0"):
        return []
    if choice == "auto":
        flags = _host_cpu_flags()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
            choice = "avx512"
        elif {"avx2", "fma", "f16c"} <= flags:
            choice = "avx2"
        else:
            return []
    if choice == "avx512":
        flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                 "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        # fp32 -> bf16 rounding in one instruction, and the VDPBF16PS tile products of bf16
        # attention (csrc/cpu/bf16_dot.h).
        if "avx512_bf16" in _host_cpu_flags():
            flags.append("-mavx512bf16")
        return flags
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _extension():
    cxx_flags = ["-O3"] + _cpu_vector_flags()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if os.environ.get("LLAMA_EXT_OPENMP", "1") == "1":
        cxx_flags.append("-fopenmp")
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = [
            "-O3",
            "--use_fast_math",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ]
        if os.environ.get("LLAMA_EXT_PTXAS_VERBOSE") == "1":
            nvcc_flags.append("-Xptxas=-v")
        threads = os.environ.get("LLAMA_EXT_NVCC_THREADS", "2")
        nvcc_flags += ["--threads", threads]
        return cpp_extension.CUDAExtension(
            "llama_ext._C",
            sources,
            extra_compile_args={"cxx": cxx_flags + ["-DLLAMA_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
        )
    return cpp_extension.CppExtension(
        "llama_ext._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
    )


setup(
    name="llama_ext",
    version="0.1.0",
    packages=find_packages(include=["llama_ext", "llama_ext.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
