"""Builds the extension: ``llama_ext._C`` (the Python module, the op schemas and the CUDA
kernels) and one library of CPU kernels per vector ISA level, ``llama_ext._cpu_<level>``.

CUDA sources are compiled whenever torch is a CUDA build and nvcc can be found, GPU or not,
for ``TORCH_CUDA_ARCH_LIST`` (default: see ``_default_cuda_arch_list``). ``LLAMA_EXT_CPU_ONLY=1`` skips them.
``LLAMA_EXT_CPU_CAPABILITIES=default,avx2`` builds only the CPU levels named (default: all).
"""
import glob
import os
import platform
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_DIR = os.path.join(ROOT, "build")


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
    (8.9), H100 / H200 (9.0) and, where nvcc and torch know them, B200 / B300 (10.0, whose image
    10.3 runs) and RTX 50xx / DGX Spark (12.0, whose image 12.1 runs). PTX of 9.0, the oldest
    generation with every feature the kernels use (the launch overlap's wait), lets every later GPU
    without an image of its own (Jetson Thor's 11.0, and newer) compile them at load time: PTX
    compiles only for its own generation and later ones, so PTX of 12.0 would leave 10.x and 11.0
    with no kernels."""
    import subprocess

    import torch

    archs = ["8.0", "8.6", "8.9", "9.0+PTX"]
    try:
        nvcc_archs = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                                    capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        nvcc_archs = []
    # torch.utils.cpp_extension accepts 10.0 and 12.0 from torch 2.7 on.
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 7):
        archs += [arch for arch in ("10.0", "12.0") if f"compute_{arch.replace('.', '')}" in nvcc_archs]
    return ";".join(archs)


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


# The CPU kernel levels, lowest first, and the compiler flags of each. Every csrc/cpu/*.cpp is
# compiled once per level into its own library, llama_ext/_cpu_<level>.so (csrc/cpu/capability.h
# says why and what a kernel file must follow); at import llama_ext loads the best one the CPU
# runs (llama_ext/_cpu_kernels.py; csrc/module.cpp names the CPU features each level needs).
# at::vec picks its vector width from the CPU_CAPABILITY macros, and puts its code in a
# namespace of that name.
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
CPU_LEVELS = {
    "default": [],
    "avx2": _AVX2 + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": _AVX512 + ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    # VCVTNEPS2BF16 (fp32 -> bf16 in one instruction) and the VDPBF16PS tile products of bf16
    # attention (csrc/cpu/bf16_dot.h).
    "avx512_bf16": _AVX512 + ["-mavx512bf16", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    # avx512_bf16 plus the AMX tile products of bf16 attention (csrc/cpu/amx_dot.h).
    "amx_bf16": _AVX512
    + ["-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def _compiler_takes(flags):
    """Whether the C++ compiler accepts these flags (GCC before 11 and Clang before 12 know no
    AMX flags, for one)."""
    compiler = os.environ.get("CXX", "c++")
    try:
        probe = subprocess.run([compiler, "-x", "c++", "-fsyntax-only", *flags, "-"], input=b"int main() {}\n",
                               capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True  # no compiler to ask: the build itself will say what is wrong
    return probe.returncode == 0


def _cpu_levels():
    """The levels to build: all of them on x86-64 (only the portable one elsewhere), or the
    comma-separated LLAMA_EXT_CPU_CAPABILITIES, which may only trim ("default" is always built,
    so the build runs on any CPU). A level whose flags the compiler lacks is left out, with a
    warning: the build then runs everywhere, at the best level it has."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    chosen = os.environ.get("LLAMA_EXT_CPU_CAPABILITIES")
    names = set(CPU_LEVELS)
    if chosen:
        names = {n.strip().lower() for n in chosen.split(",") if n.strip()}
        unknown = names - set(CPU_LEVELS)
        if unknown:
            raise ValueError(f"LLAMA_EXT_CPU_CAPABILITIES: unknown level(s) {sorted(unknown)}; known: {list(CPU_LEVELS)}")
    levels = []
    for name, flags in CPU_LEVELS.items():
        if name != "default" and name not in names:
            continue
        if name != "default" and not _compiler_takes(flags):
            print(f"warning: llama_ext: the C++ compiler does not take {' '.join(flags)}; "
                  f"the {name} CPU level is not built", file=sys.stderr)
            continue
        levels.append(name)
    return levels


def _sources(*patterns):
    return sorted(f for p in patterns for f in glob.glob(os.path.join("csrc", p), recursive=True))


def _config_stamp(config):
    """A file whose content is the build's configuration, rewritten only when that changes: as
    a dependency of every extension it makes setuptools rebuild when flags change (e.g. a CPU-only
    build followed by a CUDA one), while an unchanged tree is skipped without compiling."""
    path = os.path.join(BUILD_DIR, "config.txt")
    text = repr(config)
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    os.makedirs(BUILD_DIR, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def _extensions():
    openmp = os.environ.get("LLAMA_EXT_OPENMP", "1") == "1"
    # -g0: Python's own CFLAGS ask for debug info, which makes the template-heavy kernel objects
    # several times larger and the compile slower. -std=c++20 (host and nvcc): the sources' own
    # language level, which torch's build helpers would otherwise pick by torch version (C++17
    # in torch 2.11, C++20 in 2.14).
    std = "-std=c++20"
    common = ["-O3", "-g0", std] + (["-fopenmp"] if openmp else [])
    # -lstdc++ before the compiler driver's own: the libraries bind to the process's shared
    # libstdc++ where a driver adds -static-libstdc++ (checked with such a g++ wrapper). The H200
    # machine's /opt/gcc g++ embeds libstdc++ even so (gpu-check's probe links with -lstdc++):
    # _check_shared_libstdcxx refuses what that builds.
    link = (["-fopenmp"] if openmp else []) + ["-lstdc++"]
    cuda = _want_cuda()
    nvcc_flags = [
        std,
        "-O3",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "--threads", os.environ.get("LLAMA_EXT_NVCC_THREADS", "2"),
    ] + (["-Xptxas=-v"] if os.environ.get("LLAMA_EXT_PTXAS_VERBOSE") == "1" else [])
    levels = _cpu_levels()
    stamp = _config_stamp(dict(common=common, cuda=cuda and nvcc_flags, arch=os.environ.get("TORCH_CUDA_ARCH_LIST"),
                               levels={n: CPU_LEVELS[n] for n in levels}))
    headers = _sources("**/*.h", "**/*.cuh") + [stamp, "setup.py"]

    # Every library uses CPython's limited API only (py_limited_api: torch compiles them with
    # Py_LIMITED_API, so anything else fails to compile, and links no libtorch_python), so one
    # build serves every CPython from torch's oldest on: an abi3 wheel (setup's bdist_wheel
    # option below). The ops reach Python through the dispatcher, not through bindings.
    limited = dict(py_limited_api=True)

    # The module and schemas, plus the CUDA kernels: compiled once, no vector ISA flags.
    main_sources = _sources("*.cpp")
    if cuda:
        main = cpp_extension.CUDAExtension(
            "llama_ext._C", main_sources + _sources("cuda/*.cu"), depends=headers,
            extra_compile_args={"cxx": common, "nvcc": nvcc_flags}, extra_link_args=link, **limited)
    else:
        main = cpp_extension.CppExtension("llama_ext._C", main_sources, depends=headers,
                                          extra_compile_args={"cxx": common}, extra_link_args=link, **limited)
    # Hidden symbols: the libraries share inline functions compiled for different ISAs, and none
    # may resolve to another library's copy.
    hidden = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    kernels = [
        cpp_extension.CppExtension(f"llama_ext._cpu_{name}", _sources("cpu/*.cpp"), depends=headers,
                                   extra_compile_args={"cxx": common + hidden + CPU_LEVELS[name]},
                                   extra_link_args=link, **limited)
        for name in levels
    ]
    return [main] + kernels


def _pin_ninja():
    """Puts the ninja of the building Python's environment (the `ninja` package), when it has one,
    first on PATH, alone. `make` (the venv first on PATH), pip and `python setup.py` then all run
    the same ninja; two versions keep incompatible logs in the persistent build folder, and each
    would recompile everything the other built."""
    try:
        import ninja
    except ImportError:
        return
    exe = os.path.join(ninja.BIN_DIR, "ninja")
    if not os.path.isfile(exe):
        return
    pinned = os.path.join(BUILD_DIR, "ninja-bin")
    link = os.path.join(pinned, "ninja")
    try:
        os.makedirs(pinned, exist_ok=True)
        if not (os.path.islink(link) and os.readlink(link) == exe):
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(exe, link)
    except OSError:
        return  # a read-only or link-less folder: the ninja on PATH builds, as without the package
    os.environ["PATH"] = pinned + os.pathsep + os.environ.get("PATH", "")


class BuildExt(cpp_extension.BuildExtension):
    """Objects go to a persistent folder per extension (build/obj-<python>/<extension>), whatever
    build_temp pip or setuptools picked: ninja (one version, _pin_ninja) then recompiles only what
    changed, in pip builds too, and the CPU levels' objects of the same source do not overwrite
    each other."""

    def run(self):
        _pin_ninja()
        super().run()

    def build_extension(self, ext):
        given = self.build_temp
        self.build_temp = os.path.join(BUILD_DIR, f"obj-{sys.implementation.cache_tag}", ext.name.split(".")[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = given
        _check_shared_libstdcxx(self.get_ext_fullpath(ext.name))
        _remove_other_builds(self.get_ext_fullpath(ext.name))

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        for ext in self.extensions:
            _remove_other_builds(os.path.join(ROOT, self.get_ext_filename(ext.name)))


# std::ostream's integer insertion and std::locale: defined by libstdc++.so, and in a library
# only when a static copy of libstdc++ was linked into it.
_LIBSTDCXX_INTERNALS = ("_ZNSo9_M_insertIlEERSoT_", "_ZNSt6localeC1Ev")


def _check_shared_libstdcxx(built):
    """Fails the build of a library that carries its own copy of libstdc++. Such a library mixes
    its streams with the process's locale: formatting a number into an error message (every
    TORCH_CHECK with a size in it) prints garbage or crashes the process, as it did on a GPU
    machine whose compiler wrapper linked libstdc++ statically."""
    try:
        out = subprocess.run(["nm", "-D", "--defined-only", built], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return  # no binutils: nothing to check with
    embedded = [s for s in _LIBSTDCXX_INTERNALS if s in out.split()]
    if embedded:
        cxx = os.environ.get("CXX", "c++")
        raise RuntimeError(
            f"{built} defines libstdc++'s own symbols ({', '.join(embedded)}): the C++ compiler ({cxx}) linked a "
            "static copy of libstdc++ into it, and torch extensions built so crash when they format an error "
            "message. Build with a compiler that links libstdc++ as a shared library, e.g. CC=gcc CXX=g++.")


def _remove_other_builds(built):
    """Removes the libraries left beside `built` under another file name (before the abi3 builds,
    llama_ext/_C.cpython-311-x86_64-linux-gnu.so), in the build folder, whose contents a wheel
    takes, and in place: Python's import and llama_ext/_cpu_kernels.py try the interpreter's own
    suffix before .abi3.so, so the old file would load instead of the new one."""
    import importlib.machinery

    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    stem = next((built[: -len(x)] for x in sorted(suffixes, key=len, reverse=True) if built.endswith(x)), None)
    if stem is None:
        return
    for suffix in suffixes:
        if stem + suffix != built and os.path.exists(stem + suffix):
            os.remove(stem + suffix)


def _abi3_tag():
    """The wheel's abi3 tag: the oldest CPython that torch compiles limited-API extensions for
    (Py_LIMITED_API, e.g. 0x030A0000 -> cp310)."""
    version = int(getattr(cpp_extension, "min_supported_cpython", "0x030A0000"), 16)
    return f"cp{version >> 24}{(version >> 16) & 0xFF}"


def _torch_requirement():
    """The torch this build links against, to the minor version: libtorch's C++ ABI changes between
    minor releases, so a wheel built against 2.14 must not be installed next to 2.15."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


setup(
    name="llama_ext",
    install_requires=[_torch_requirement()],
    version="0.1.0",
    packages=find_packages(include=["llama_ext", "llama_ext.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": _abi3_tag()}},
)
