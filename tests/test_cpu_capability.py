"""Run-time CPU ISA dispatch: one kernel library per level (csrc/cpu/capability.h), the best
one the CPU runs loaded at import, LLAMA_EXT_CPU_CAPABILITY forcing a lower one.

This process runs the kernels at one level; the key correctness tests run again in a
subprocess at every other level this CPU supports, so that the AVX2 and portable paths stay
tested on AVX-512 machines."""
import os
import platform
import shutil
import subprocess
import sys

import pytest

import llama_ext
from llama_ext import _cpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = list(_cpu_kernels.levels())
X86 = platform.machine().lower() in ("x86_64", "amd64")
# Every level a full build holds on x86-64 (setup.py builds fewer only when told to).
FULL_BUILD = X86 and not os.environ.get("LLAMA_EXT_CPU_CAPABILITIES")
# The tests that compare every kernel with float64 and HF: forward, backward, every head dim,
# fully masked rows, strided inputs, determinism, decode against contiguous and paged caches
# (one split and several), RMSNorm's NaN / Inf rows (each level rounds bf16 its own way), and
# the attention forward's key and row tails and windows (levels tile the products their own way).
# Not the CUDA kernels run in the PTX interpreter (`in_ptx`), which no CPU level changes.
KEY_TESTS = ("(matches_float64 or follows_hf or every_head_dim or fully_masked or deterministic or strided "
             "or unaligned or hf_layout or matches_reference or long_context or nan_and_inf "
             "or row_tails or window_softcap_forward or window_softcap_varlen or never_read) and not in_ptx")


def _runnable_built():
    return [n for n, missing in _cpu_kernels.levels().items() if missing is None and _cpu_kernels.library_path(n)]


def _run(code_or_args, level, timeout=120):
    env = dict(os.environ, **({_cpu_kernels.ENV_VAR: level} if level is not None else {}))
    if level is None:
        env.pop(_cpu_kernels.ENV_VAR, None)
    args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_levels_lowest_first_and_default_always_runs():
    assert LEVELS == ["default", "avx2", "avx512", "avx512_bf16", "amx_bf16"]
    levels = _cpu_kernels.levels()
    assert levels["default"] is None
    # A level implies every one below it.
    supported = [levels[n] is None for n in LEVELS]
    assert supported == sorted(supported, reverse=True)


@pytest.mark.skipif(not FULL_BUILD, reason="a build trimmed by LLAMA_EXT_CPU_CAPABILITIES, or not x86-64")
def test_every_level_is_built():
    assert [n for n in LEVELS if _cpu_kernels.library_path(n)] == LEVELS


def test_import_picks_the_best_level_unless_forced():
    forced = os.environ.get(_cpu_kernels.ENV_VAR)
    assert llama_ext.cpu_capability() == (forced or _runnable_built()[-1])
    result = _run("import llama_ext; print(llama_ext.cpu_capability())", None)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [_runnable_built()[-1]]


@pytest.mark.parametrize("level", LEVELS)
def test_forced_level_is_loaded_or_refused_clearly(level):
    result = _run("import llama_ext; print(llama_ext.cpu_capability())", level)
    missing = _cpu_kernels.levels()[level]
    if missing is None and _cpu_kernels.library_path(level):
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [level]
    elif missing is not None:  # the CPU lacks it: a clear error, never SIGILL
        assert result.returncode == 1
        assert f"LLAMA_EXT_CPU_CAPABILITY={level}, but this CPU lacks {missing}" in result.stderr
    else:
        assert result.returncode == 1 and "left that level out" in result.stderr


def test_unknown_level_is_refused():
    result = _run("import llama_ext", "avx1024")
    assert result.returncode == 1
    assert "ValueError: LLAMA_EXT_CPU_CAPABILITY='avx1024' is not a CPU level" in result.stderr


# What each level's library must contain: the AVX-512 code is really compiled in, even on a build
# host that cannot run it, and a lower level never contains a higher level's instructions.
DISASSEMBLY = {
    "default": (["xmm"], ["ymm", "zmm"]),
    "avx2": (["ymm", "vfmadd", "vcvtph2ps"], ["zmm"]),
    "avx512": (["zmm"], ["vdpbf16ps"]),
    "avx512_bf16": (["zmm", "vdpbf16ps", "vcvtneps2bf16"], ["tdpbf16ps"]),
    "amx_bf16": (["zmm", "vdpbf16ps", "tdpbf16ps", "ldtilecfg", "tileloadd"], []),
}


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="needs x86-64 and objdump")
@pytest.mark.parametrize("level", LEVELS)
def test_library_holds_its_level_instructions(level):
    path = _cpu_kernels.library_path(level)
    if path is None:
        pytest.skip(f"this build left out {level}")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                          check=True).stdout
    present, absent = DISASSEMBLY[level]
    for mnemonic in present:
        assert mnemonic in text, f"{level}: no {mnemonic} in {path}"
    for mnemonic in absent:
        assert mnemonic not in text, f"{level}: {mnemonic} in {path}"


def test_tile_configurations_load_through_load_config():
    """Every LDTILECFG goes through cpu::amx::load_config (amx_dot.h), whose asm operand is the
    whole 64-byte configuration. GCC 12's _tile_loadconfig declares only 8 bytes of it read, so the
    compiler may drop the stores of the tile rows and widths as dead, and the first tile
    instruction then raises SIGILL."""
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for name in files:
            with open(os.path.join(dirpath, name)) as f:
                if "_tile_loadconfig(" in f.read():
                    offenders.append(os.path.relpath(os.path.join(dirpath, name), ROOT))
    assert offenders == [], f"_tile_loadconfig in {offenders}: use cpu::amx::load_config"


# The levels that compile decode's key-major tiles (csrc/cpu/kvcache_attention.cpp, kKeyMajor).
KEY_MAJOR_LEVELS = ("avx512", "avx512_bf16", "amx_bf16")


def test_key_major_decode_tiles_where_measured_to_win():
    pays = _cpu_kernels.key_major_decode_pays
    assert pays("AuthenticAMD", 0x1A)  # Zen 5
    assert pays("AuthenticAMD", 0x1B)
    assert not pays("AuthenticAMD", 0x19)  # Zen 4, Zen 3
    assert not pays("GenuineIntel", 6)
    assert not pays("", 0)
    requested = _cpu_kernels._requested_key_major()
    wanted = pays(*llama_ext._C.cpu_model()) if requested is None else requested
    has_tiles = llama_ext.cpu_capability() in KEY_MAJOR_LEVELS
    assert _cpu_kernels.KEY_MAJOR_DECODE == (wanted and has_tiles)


def _key_major_env_run(value, level=None):
    env = dict(os.environ, **{_cpu_kernels.KEY_MAJOR_ENV_VAR: value})
    if level is not None:
        env[_cpu_kernels.ENV_VAR] = level
    code = "from llama_ext import _cpu_kernels as c; print(c.CAPABILITY, c.KEY_MAJOR_DECODE)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_key_major_decode_override():
    level = llama_ext.cpu_capability()
    has_tiles = level in KEY_MAJOR_LEVELS
    off = _key_major_env_run("0", level)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == [level, "False"]
    on = _key_major_env_run("1", level)
    if has_tiles:
        assert on.returncode == 0, on.stderr
        assert on.stdout.split() == [level, "True"]
    else:  # a level without the tiles refuses the request rather than ignoring it
        assert on.returncode == 1
        assert f"{_cpu_kernels.KEY_MAJOR_ENV_VAR}=1, but the {level} level has no key-major" in on.stderr
    bad = _key_major_env_run("yes", level)
    assert bad.returncode == 1
    assert f"ValueError: {_cpu_kernels.KEY_MAJOR_ENV_VAR}='yes': use 1" in bad.stderr


def test_decode_tests_pass_with_the_other_decode_tiles():
    """The decode tests run in this process on the tiles this CPU takes; here they run again on
    the others, so both stay tested on every AVX-512 CPU."""
    if llama_ext.cpu_capability() not in KEY_MAJOR_LEVELS:
        pytest.skip(f"the {llama_ext.cpu_capability()} level has no key-major decode tiles to switch between")
    env = dict(os.environ, **{_cpu_kernels.KEY_MAJOR_ENV_VAR: "0" if _cpu_kernels.KEY_MAJOR_DECODE else "1"})
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_kvcache_attention.py", "-q", "-x", "-p",
                             "no:cacheprovider", "-k", KEY_TESTS], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


@pytest.mark.parametrize("level", LEVELS)
def test_key_correctness_tests_pass_at_every_level(level):
    if level not in _runnable_built():
        pytest.skip(f"this CPU or build cannot run {level}")
    if level == llama_ext.cpu_capability():
        pytest.skip(f"{level} is this process's level: the whole suite runs on it")
    tests = ["tests/test_attention.py", "tests/test_rms_norm.py", "tests/test_rotary.py",
             "tests/test_kvcache_attention.py", "tests/test_reliability.py"]
    result = _run(["-m", "pytest", *tests, "-q", "-x", "-p", "no:cacheprovider", "-k", KEY_TESTS], level,
                  timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
