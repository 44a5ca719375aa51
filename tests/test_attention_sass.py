"""The CUDA attention kernels really run on tensor cores: their SASS, read from the built
extension with cuobjdump, holds HMMA (mma.sync), LDSM (ldmatrix) and LDGSTS (cp.async), and no
local-memory traffic (spills), for every architecture the extension targets by default
(TORCH_CUDA_ARCH_LIST 8.0;8.6;8.9;9.0+PTX;10.0;12.0), in every instantiation the sources list (the forward:
one per dtype and tile configuration of kFwdTiles in csrc/cuda/attention_fwd.cu). Needs no GPU,
only a CUDA build and cuobjdump (on PATH, in $CUDA_HOME/bin, or shipped in triton's package). A
build for other architectures only (`make gpu-check` builds for the local GPU) skips the missing
ones, saying so, and must contain at least one of them."""
import importlib.util
import os
import re
import subprocess

import pytest

from conftest import CUDA_HEAD_DIMS, CUDA_TC_TYPES, load_emulation

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
FORWARD_SOURCE = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "attention_fwd.cu")
KVCACHE_SOURCE = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda", "kvcache_attention.cu")


def _forward_tiles():
    """kFwdTiles of attention_fwd.cu: (head_dim, block_m, block_n, warps, q_in_registers,
    min_ctas_per_sm) per configuration, in the order of their indices."""
    with open(FORWARD_SOURCE) as f:
        text = f.read()
    m = re.search(r"kFwdTiles\[\] = \{(.*?)\n\};", text, flags=re.S)
    assert m, f"kFwdTiles not found in {FORWARD_SOURCE}"
    rows = re.findall(r"\{(\d+), (\d+), (\d+), (\d+), (true|false), (\d+)\}", m.group(1))
    return [(int(d), int(bm), int(bn), int(w), q == "true", int(c)) for d, bm, bn, w, q, c in rows]


FORWARD_TILES = _forward_tiles()
# Kernel name fragments (they appear verbatim inside the mangled names) and the instantiations
# each must have: (dtype, head_dim) from the one list in csrc/cuda/attention_launch.cuh, plus the
# forward's tile index and whether it reads a paged cache (kPaged: gqa_attention_with_kvcache's
# prefill route).
TENSOR_CORE_KERNELS = {
    "attention_forward_tc_kernel": {(t, d, i, paged) for t in CUDA_TC_TYPES for i, (d, *_) in enumerate(FORWARD_TILES)
                                    for paged in (0, 1)},
    "attention_backward_tc_kernel": {(t, d) for t in CUDA_TC_TYPES for d in CUDA_HEAD_DIMS},
    # The decode kernel of gqa_attention_with_kvcache (csrc/cuda/kvcache_attention.cu).
    "attend_tc_kernel": {(t, d) for t in CUDA_TC_TYPES for d in CUDA_HEAD_DIMS},
}
# The backward's tile configurations (BwdConfig<D, keys, queries, two warps per key slice>), every
# one a device may pick by its shared memory (BwdConfigs of csrc/cuda/attention_bwd.cu, as
# tools/emulate_attention_bwd.py transcribes them: its digest test keeps the two in step).
BACKWARD_CONFIGS = {
    (c.kD, c.kBlockN, c.kBlockM, int(c.kSplitRoles))
    for d in CUDA_HEAD_DIMS for c in load_emulation("emulate_attention_bwd").bwd_configs(d)
}
# Kernels that must not touch local memory either (no spills, no stack arrays), beyond the above,
# as patterns of their mangled names: the decode's SIMT kernel, and the RMSNorm backward's
# row-ahead kernels (<..., aligned, cache 2, row ahead>), which hold two rows' chunks and their
# dweight sums in registers at up to 128 (csrc/cuda/rms_norm.cu).
NO_LOCAL_MEMORY_KERNELS = ("attend_simt_kernel", r"rms_norm_bwd_kernelI\w*Lb1ELi2ELb1EE")
REQUIRED_OPCODES = ("HMMA", "LDSM", "LDGSTS")


_cuobjdump = load_emulation("ptx_run").cuobjdump


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
    """(dtype, head_dim, further arguments...) of a mangled `kernel<T, D, ...>` or
    `kernel<T, Config<D, ...>>` instantiation: after the kernel's name come I and T as
    <length><identifier>; a config struct follows as a (possibly nested, N...E) name with its own I;
    the first run of int or bool arguments (Li<value>E / Lb<value>E) holds the head dim and the rest."""
    m = re.search(rf"{kernel}I(\d+)", name)
    assert m, f"{name}: no template arguments after {kernel}"
    start = m.end()
    dtype = name[start: start + int(m.group(1))]
    values = re.search(r"((?:L[ib]\d+E)+)", name[start + int(m.group(1)):])
    assert values, f"{name}: no head_dim after the dtype {dtype}"
    return (dtype, *(int(v) for v in re.findall(r"L[ib](\d+)E", values.group(1))))


def _functions(sass):
    """{mangled function name: its SASS text} from a cuobjdump -sass listing."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", sorted(TENSOR_CORE_KERNELS))
def test_attention_kernels_use_tensor_cores(sass_by_arch, arch, kernel):
    functions = {name: body for name, body in _functions(_sass_for(sass_by_arch, arch)).items() if kernel in name}
    # Compared on as many leading arguments as the expected entries name (the backward's tile
    # configurations beyond the head dim are checked by test_attention_backward_configs).
    width = len(next(iter(TENSOR_CORE_KERNELS[kernel])))
    found = {_template_args(name, kernel)[:width] for name in functions}
    assert found == TENSOR_CORE_KERNELS[kernel], (
        f"{arch}: {kernel} instantiations differ from the sources' lists: missing "
        f"{sorted(TENSOR_CORE_KERNELS[kernel] - found)}, unexpected {sorted(found - TENSOR_CORE_KERNELS[kernel])}"
    )
    for name, body in functions.items():
        opcodes = set(re.findall(r"\b([A-Z][A-Z0-9]+)(?:\.[A-Z0-9_.]+)?\s", body))
        missing = [op for op in REQUIRED_OPCODES if op not in opcodes]
        assert not missing, f"{arch} {name}: no {missing} in its SASS"


def test_forward_tiles_cover_every_head_dim():
    # Every listed head dim has a tensor-core forward tile, and each tile is whole warps of whole
    # 16-row m-tiles (16 or 32 rows per warp) over whole 16-key chunks.
    assert {d for d, *_ in FORWARD_TILES} == set(CUDA_HEAD_DIMS)
    for d, block_m, block_n, warps, _, min_ctas in FORWARD_TILES:
        assert block_m % (16 * warps) == 0 and block_m // warps in (16, 32), (d, block_m, warps)
        assert block_n % 16 == 0 and min_ctas >= 1, (d, block_n, min_ctas)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_backward_configs(sass_by_arch, arch):
    # Each dtype has every backward configuration, so the device picks one by its shared memory.
    names = [n for n in _functions(_sass_for(sass_by_arch, arch)) if "attention_backward_tc_kernel" in n]
    for dtype in CUDA_TC_TYPES:
        found = {
            tuple(int(x) for x in m.groups())
            for n in names
            if _template_args(n, "attention_backward_tc_kernel")[0] == dtype
            for m in [re.search(r"BwdConfigILi(\d+)ELi(\d+)ELi(\d+)ELb([01])E", n)]
            if m
        }
        assert found == BACKWARD_CONFIGS, f"{arch} {dtype}: backward configs {sorted(found)}"


@pytest.mark.parametrize(
    "arch,kernel",
    [(arch, kernel) for arch in ARCHS for kernel in sorted(TENSOR_CORE_KERNELS) + list(NO_LOCAL_MEMORY_KERNELS)],
)
def test_attention_kernels_do_not_spill(sass_by_arch, arch, kernel):
    # Local-memory traffic (STL/LDL) in the hot kernels would mean register spills.
    sass = _functions(_sass_for(sass_by_arch, arch))
    functions = {name: body for name, body in sass.items() if re.search(kernel, name)}
    assert functions, f"{arch}: no {kernel} in the SASS"
    for name, body in functions.items():
        assert not re.search(r"\b(STL|LDL)\b", body), f"{arch} {name} spills to local memory"


# The RMSNorm kernels that keep a thread's chunks of a row in registers (csrc/cuda/rms_norm.cu,
# <T, W, O, aligned, cache[, plain]>) issue every load of those chunks before the first FFMA that
# uses one: in the forward x and residual, one 16-byte load each a chunk; in the plain backward g
# (sizeof(O) / sizeof(T) loads a chunk) and x, and at least the first chunk's weight. Loading a
# chunk and using it before loading the next leaves one chunk a thread in flight.
RMS_NORM_CACHED_KERNELS = {
    r"rms_norm_fwd_kernelI(\w+?)Lb1ELi([1-9])EEE": lambda cache, t, w, o: 2 * cache,
    r"rms_norm_bwd_kernelI(\w+?)Lb1ELi([1-9])ELb0EE": lambda cache, t, w, o: cache * (o // t + 1) + w // t,
}


def _rms_norm_dtype_sizes(mangled):
    """Element sizes of <T, W, O> mangled as a length-prefixed name (__nv_bfloat16, __half), f
    (float), or a substitution S<n>_ (T again: the only named type before it)."""
    sizes, rest = [], mangled
    while rest:
        named = re.match(r"(\d+)", rest)
        if named:
            sizes.append(2)
            rest = rest[named.end() + int(named.group(1)):]
        elif rest[0] == "f":
            sizes.append(4)
            rest = rest[1:]
        else:
            substitution = re.match(r"S\d*_", rest)
            assert substitution and sizes, f"{mangled}: unexpected {rest!r}"
            sizes.append(sizes[0])
            rest = rest[substitution.end():]
    assert len(sizes) == 3, f"{mangled}: not three dtypes"
    return sizes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", sorted(RMS_NORM_CACHED_KERNELS))
def test_rms_norm_row_loads_precede_their_use(sass_by_arch, arch, kernel):
    functions = _functions(_sass_for(sass_by_arch, arch))
    found = {(m.group(1), int(m.group(2))): body for n, body in functions.items() for m in [re.search(kernel, n)] if m}
    caches = (1, 2, 4, 8) if "fwd" in kernel else (1, 2, 4)
    assert {c for _, c in found} == set(caches) and len(found) == 7 * len(caches), (
        f"{arch}: {sorted(found)} are not the 7 dtype combinations of each of the caches {caches}")
    for (types, cache), body in found.items():
        expected = RMS_NORM_CACHED_KERNELS[kernel](cache, *_rms_norm_dtype_sizes(types))
        ahead = len(re.findall(r"\bLDG\.E\.128\b", body.split("FFMA")[0]))
        assert ahead >= expected, f"{arch} {kernel} <{types}, cache {cache}>: {ahead} 16-byte loads before the first FFMA"


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_softcap_uses_no_approximate_tanh(sass_by_arch, arch):
    # --use_fast_math would turn tanhf into MUFU.TANH (~2^-11 relative error): the softcap's
    # tanh must be the full-precision one (precise_tanh in attention_common.cuh).
    functions = {n: b for n, b in _functions(_sass_for(sass_by_arch, arch)).items() if "attention" in n}
    assert functions, f"{arch}: no attention kernels in the SASS"
    for name, body in functions.items():
        assert "MUFU.TANH" not in body, f"{arch} {name} uses the approximate tanh"


# The decode's launch overlap (programmatic dependent launch; common.cuh, kvcache_attention.cu):
# from sm_90 on, the append and the attend kernels let their successor launch early
# (griddepcontrol.launch_dependents: PREEXIT), and the attend kernels and the combine wait for
# their predecessor (griddepcontrol.wait: ACQBULK) before the first load of what it writes: the
# K/V copies (LDGSTS; the fp32 kernel's 16-byte LDG) and the partials (any LDG). Before sm_90
# both compile to nothing. A load hoisted above the wait would read the new tokens' cache rows
# before the append writes them.
DECODE_OVERLAP = {
    # kernel: (opcodes it must hold from sm_90 on, the first opcode the wait must precede)
    "append_kernel": (("PREEXIT",), None),
    "attend_tc_kernel": (("PREEXIT", "ACQBULK"), r"LDGSTS"),
    "attend_simt_kernel": (("PREEXIT", "ACQBULK"), r"LDG\.E\.128"),
    "combine_kernel": (("ACQBULK",), r"LDG"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_kernels_overlap_their_launches(sass_by_arch, arch):
    functions = _functions(_sass_for(sass_by_arch, arch))
    overlap = int(arch.split("_")[1]) >= 90
    for kernel, (opcodes, guarded) in DECODE_OVERLAP.items():
        bodies = {n: b for n, b in functions.items() if kernel in n and "kvcache_attention" in n}
        assert bodies, f"{arch}: no {kernel} in the SASS"
        for name, body in bodies.items():
            if not overlap:
                assert not re.search(r"\b(PREEXIT|ACQBULK)\b", body), f"{arch} {name}: launch-overlap instructions"
                continue
            for opcode in opcodes:
                assert re.search(rf"\b{opcode}\b", body), f"{arch} {name} lacks {opcode}"
            if guarded:
                wait = re.search(r"\bACQBULK\b", body).start()
                first = re.search(rf"\b{guarded}\b", body)
                assert first and wait < first.start(), f"{arch} {name}: a {guarded} before the wait (ACQBULK)"


# The decode attend kernels stage their query rows (stage_query_rows in kvcache_attention.cu): a
# thread takes a run of one row's elements and issues the loads of up to kQueryBatch of them
# (each element, and with rotary tables its partner and its pair's cos and sin) before it stores
# any to shared memory. Element by element, a thread waited for a round trip to memory per row of
# the tile. Checked as the longest run of the query's global loads with no shared-memory store
# among them: the tensor-core kernels' 16-bit loads are the query's alone (x and partner per
# element), the CUDA-core kernel's fp32 query shares LDG.E with the tables (four per element).
DECODE_QUERY_LOADS = {
    # kernel: (its query load, query rows per CTA, loads per element with rotary tables)
    "attend_tc_kernel": ("LDG.E.U16", 16, 2),
    "attend_simt_kernel": ("LDG.E", 8, 4),
}


def _longest_load_run(body, load):
    longest = run = 0
    for m in re.finditer(r"\b(LDG\.E(?:\.U16|\.64|\.128)?|STS(?:\.\w+)?)\b", body):
        run = 0 if m.group(1).startswith("STS") else run + (m.group(1) == load)
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", sorted(DECODE_QUERY_LOADS))
def test_decode_query_loads_precede_their_stores(sass_by_arch, arch, kernel):
    load, rows, per_element = DECODE_QUERY_LOADS[kernel]
    batch = int(re.search(r"constexpr int kQueryBatch = (\d+);", open(KVCACHE_SOURCE).read()).group(1))
    bodies = {n: b for n, b in _functions(_sass_for(sass_by_arch, arch)).items()
              if kernel in n and "kvcache_attention" in n}
    head_dim = {n: int(re.search(rf"{kernel}I\w+?Li(\d+)E", n).group(1)) for n in bodies}  # <T, D, ...>
    assert set(head_dim.values()) == set(CUDA_HEAD_DIMS), f"{arch}: {kernel} at head dims {sorted(head_dim.values())}"
    for name, body in bodies.items():
        d = head_dim[name]
        expected = per_element * min(rows * d // 128, batch)  # 128 threads: a run of rows x d / 128
        run = _longest_load_run(body, load)
        assert run >= expected, f"{arch} {kernel} d = {d}: {run} query loads in flight before a store, not {expected}"


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_combine_loads_partials_with_the_lse(sass_by_arch, arch):
    # combine_kernel issues the first batch of a thread's partial outputs (kBatch splits) with its
    # split's lse, before the block reductions of the lse values (their first SHFL) that the
    # weights need: the partials wait for the attend kernel, not for the weights.
    batch = int(re.search(r"constexpr int kBatch = (\d+);", open(KVCACHE_SOURCE).read()).group(1))
    bodies = {n: b for n, b in _functions(_sass_for(sass_by_arch, arch)).items()
              if "combine_kernel" in n and "kvcache_attention" in n}
    assert len(bodies) == 3, f"{arch}: {sorted(bodies)} are not the combine's three dtypes"
    for name, body in bodies.items():
        loads = len(re.findall(r"\bLDG\.E\b", body[:re.search(r"\bSHFL\b", body).start()]))
        assert loads >= batch + 1, f"{arch} {name}: {loads} loads before the first reduction, not {batch} + 1"
