"""Loads the CPU kernels built for the best vector ISA level this CPU runs.

The build holds one library of CPU kernels per level (``_cpu_default``, ``_cpu_avx2``,
``_cpu_avx512``, ``_cpu_avx512_bf16``, ``_cpu_amx_bf16``; see ``csrc/cpu/capability.h``). Loading one registers
its kernels for ``torch.ops.llama_ext``; exactly one is loaded per process. The environment
variable ``LLAMA_EXT_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``, ``avx512_bf16`` or ``amx_bf16``)
forces a level, e.g. to test or benchmark a lower one; asking for a level this CPU cannot run,
or one the build left out, raises.

Where two kernels are equally correct but fast on different cores, the loader also tells the
library which to run, from the CPU's vendor and family: decode against a contiguous KV cache
takes the key-major tiles of the AVX-512 levels on Zen 5 and later, where they won, and the
other tiles elsewhere (``csrc/cpu/kvcache_attention.cpp``, "Key-major tiles").
``LLAMA_EXT_CPU_DECODE_KEY_MAJOR=1`` (or ``0``) overrides that choice.
"""
import ctypes
import importlib.machinery
import os
from typing import Dict, Optional

import torch

from . import _C

ENV_VAR = "LLAMA_EXT_CPU_CAPABILITY"
KEY_MAJOR_ENV_VAR = "LLAMA_EXT_CPU_DECODE_KEY_MAJOR"
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


def key_major_decode_pays(vendor: str, family: int) -> bool:
    """Whether decode's key-major tiles beat the other tiles on this CPU: measured to win on
    AMD family 0x1A (Zen 5), to lose on family 0x19 (Zen 4); not compared on Intel, which keeps
    the other tiles."""
    return vendor == "AuthenticAMD" and family >= 0x1A


def _requested_key_major() -> Optional[bool]:
    """LLAMA_EXT_CPU_DECODE_KEY_MAJOR as a bool; None when unset."""
    requested = os.environ.get(KEY_MAJOR_ENV_VAR, "").strip()
    if not requested:
        return None
    if requested not in ("0", "1"):
        raise ValueError(f"{KEY_MAJOR_ENV_VAR}={requested!r}: use 1 (key-major decode tiles) or 0 (the other tiles)")
    return requested == "1"


def _set_key_major(level: str, wanted: bool) -> bool:
    """Tells the loaded library whether decode takes the key-major tiles; returns whether it does
    (only the AVX-512 levels have them)."""
    set_key_major = ctypes.CDLL(library_path(level)).llama_ext_cpu_decode_key_major
    set_key_major.argtypes = [ctypes.c_int]
    set_key_major.restype = ctypes.c_int
    return bool(set_key_major(int(wanted)))


CAPABILITY = _load(_choose())
_key_major_request = _requested_key_major()
# Whether decode against a contiguous cache runs the key-major tiles (see the module's docstring).
KEY_MAJOR_DECODE = _set_key_major(
    CAPABILITY, key_major_decode_pays(*_C.cpu_model()) if _key_major_request is None else _key_major_request)
if _key_major_request and not KEY_MAJOR_DECODE:
    raise RuntimeError(f"{KEY_MAJOR_ENV_VAR}=1, but the {CAPABILITY} level has no key-major decode tiles (the "
                       "AVX-512 levels have them)")
