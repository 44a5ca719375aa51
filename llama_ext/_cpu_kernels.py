"""Loads the CPU kernels built for the best vector ISA level this CPU runs.

The build holds one library of CPU kernels per level (``_cpu_default``, ``_cpu_avx2``,
``_cpu_avx512``, ``_cpu_avx512_bf16``, ``_cpu_amx_bf16``; see ``csrc/cpu/capability.h``). Loading one registers
its kernels for ``torch.ops.llama_ext``; exactly one is loaded per process. The environment
variable ``LLAMA_EXT_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``, ``avx512_bf16`` or ``amx_bf16``)
forces a level, e.g. to test or benchmark a lower one; asking for a level this CPU cannot run,
or one the build left out, raises.
"""
import ctypes
import importlib.machinery
import os
from typing import Dict, Optional

import torch

from . import _C

ENV_VAR = "LLAMA_EXT_CPU_CAPABILITY"
_HERE = os.path.dirname(os.path.abspath(__file__))


def library_path(level: str) -> Optional[str]:
    """The built library of a level, or None when the build left it out."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, f"_cpu_{level}{suffix}")
        if os.path.exists(path):
            return path
    return None


def levels() -> Dict[str, Optional[str]]:
    """Every level, lowest first: None when this CPU runs it, else the features it lacks."""
    return dict(_C.cpu_capabilities())


def _choose() -> str:
    known = levels()
    built = [name for name in known if library_path(name)]
    runnable = [name for name in built if known[name] is None]
    requested = os.environ.get(ENV_VAR, "").strip().lower()
    if not requested:
        if not runnable:
            raise ImportError(f"llama_ext has no CPU kernel library in {_HERE} (built levels: {built})")
        return runnable[-1]
    if requested not in known:
        raise ValueError(f"{ENV_VAR}={requested!r} is not a CPU level; use one of {', '.join(known)}")
    if known[requested] is not None:
        raise RuntimeError(f"{ENV_VAR}={requested}, but this CPU lacks {known[requested]}; it runs "
                           f"{', '.join(n for n, missing in known.items() if missing is None)}")
    if requested not in built:
        raise RuntimeError(f"{ENV_VAR}={requested}, but this build of llama_ext left that level out (built: "
                           f"{', '.join(built)}; see LLAMA_EXT_CPU_CAPABILITIES in setup.py)")
    return requested


def _load(level: str) -> str:
    path = library_path(level)
    torch.ops.load_library(path)
    compiled_for = ctypes.CDLL(path).llama_ext_cpu_capability
    compiled_for.restype = ctypes.c_char_p
    actual = compiled_for().decode()
    if actual != level:  # a library built with the wrong flags would run the wrong code
        raise ImportError(f"{path} was compiled for the {actual} level, not {level}")
    return level


CAPABILITY = _load(_choose())
