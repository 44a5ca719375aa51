"""gqa_attention_with_kvcache against the float64 reference: contiguous and paged caches, the
append of new tokens (with fused rotary), windows and softcap, the split-KV path, untouched
cache slots, bad input, opcheck, torch.compile and CUDA graphs; and the CUDA kernels' compiled
PTX run on the CPU (tools/ptx_run.py)."""
import copy
import ctypes
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

import llama_ext
from llama_ext.reference import gqa_attention_reference, gqa_attention_with_kvcache_reference, rotary_reference

from conftest import (CPU_DTYPES, CUDA_HEAD_DIMS, CUDA_TYPE_NAMES, DECODE_ROUTE_MAX_SEQ_Q, DEVICES, PROPERTY_SETTINGS,
                      assert_close, assert_device_assert, check_kernel_emulation, device_dtype_params, dtypes_for,
                      emulation_only_on_cpu, load_emulation, ptx_kernel)

NAN = float("nan")


def make(shape, device, dtype):
    return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)


def bits(t):
    """The tensor's raw bits, so NaN slots compare equal to themselves."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


class Case:
    """A decode problem: caches filled with random tokens up to cache_seqlens (+ seq_new, the
    slots the call writes) and NaN everywhere else, so a read past a sequence's length or a
    write outside its slots shows."""

    def __init__(self, device, dtype, lens, seq_q, seq_new, n_q, n_kv, d, block_size=None, capacity=None, rotary=None):
        self.device, self.dtype = device, dtype
        batch = len(lens)
        capacity = max(lens) + seq_new + 5 if capacity is None else capacity
        self.cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.q = make((batch, seq_q, n_q, d), device, dtype)
        self.k = make((batch, seq_new, n_kv, d), device, dtype) if seq_new else None
        self.v = make((batch, seq_new, n_kv, d), device, dtype) if seq_new else None
        if block_size is None:
            self.block_table = None
            self.k_cache = torch.full((batch, capacity, n_kv, d), NAN, device=device, dtype=dtype)
            self.v_cache = torch.full_like(self.k_cache, NAN)
            for b, n in enumerate(lens):
                self.k_cache[b, :n] = make((n, n_kv, d), device, dtype)
                self.v_cache[b, :n] = make((n, n_kv, d), device, dtype)
        else:
            # Blocks shuffled over the cache, with spares that no sequence owns.
            max_blocks = -(-capacity // block_size)
            num_blocks = batch * max_blocks + 3
            perm = torch.randperm(num_blocks)[: batch * max_blocks].view(batch, max_blocks)
            self.block_table = perm.to(torch.int32).to(device)
            self.k_cache = torch.full((num_blocks, block_size, n_kv, d), NAN, device=device, dtype=dtype)
            self.v_cache = torch.full_like(self.k_cache, NAN)
            for b, n in enumerate(lens):
                blocks = perm[b, : -(-n // block_size)].to(device)
                for cache in (self.k_cache, self.v_cache):
                    rows = torch.full((len(blocks) * block_size, n_kv, d), NAN, device=device, dtype=dtype)
                    rows[:n] = make((n, n_kv, d), device, dtype)
                    cache[blocks] = rows.view(-1, block_size, n_kv, d)
        self.rotary_cos = self.rotary_sin = None
        if rotary is not None:
            rotary_dim, positions = rotary
            self.rotary_cos, self.rotary_sin = (
                t.to(device) for t in llama_ext.rope_cos_sin(rotary_dim, positions, base=500.0)
            )

    def call(self, **kw):
        return llama_ext.gqa_attention_with_kvcache(
            self.q, self.k_cache, self.v_cache, self.cache_seqlens, self.k, self.v, block_table=self.block_table,
            rotary_cos=self.rotary_cos, rotary_sin=self.rotary_sin, return_lse=True, **kw,
        )

    def tokens(self, b0, b1, n):
        """The first n cache tokens of sequences b0 .. b1 - 1, [b1 - b0, n, n_kv_heads, d]."""
        if self.block_table is None:
            return self.k_cache[b0:b1, :n], self.v_cache[b0:b1, :n]
        blocks = self.block_table[b0:b1, : -(-n // self.k_cache.shape[1])].long()
        return tuple(cache[blocks].flatten(1, 2)[:, :n] for cache in (self.k_cache, self.v_cache))

    def reference(self, **kw):
        return gqa_attention_with_kvcache_reference(
            self.q, self.k_cache, self.v_cache, self.cache_seqlens, self.k, self.v, self.block_table,
            rotary_cos=self.rotary_cos, rotary_sin=self.rotary_sin, **kw,
        )

    def lse_tolerance_dtype(self):
        """lse is fp32 (fp64 for fp64) and is held to that dtype's tolerance; but a rotated q is
        rounded to the input dtype, in the kernels from its fp32 rotation and in the reference
        from its float64 one, and the two can round one ulp apart: then lse carries the input
        dtype's rounding."""
        if self.dtype == torch.float64:
            return torch.float64
        return self.dtype if self.rotary_cos is not None else torch.float32

    def check(self, **kw):
        """Runs the op, compares out, lse and both caches with the reference."""
        ref_out, ref_lse, ref_k, ref_v = self.reference(**kw)
        k0, v0 = self.k_cache.clone(), self.v_cache.clone()
        out, lse = self.call(**kw)
        assert out.shape == self.q.shape and out.dtype == self.dtype
        assert lse.shape == (self.q.shape[0], self.q.shape[2], self.q.shape[1])
        assert lse.dtype == (torch.float64 if self.dtype == torch.float64 else torch.float32)
        assert_close(out, ref_out, self.dtype)
        assert_close(lse, ref_lse, self.lse_tolerance_dtype(), scale=2.0)
        for cache, before, ref in ((self.k_cache, k0, ref_k), (self.v_cache, v0, ref_v)):
            written = ~torch.eq(bits(before), bits(ref)).all(-1, keepdim=True).expand_as(ref)
            # Untouched slots keep their bits (NaN poison included); written ones hold the new
            # tokens (rotated ones within a rounding of the float64 rotation).
            assert torch.equal(bits(cache)[~written], bits(before)[~written])
            assert_close(cache[written], ref[written], self.dtype)
        return out, lse


def skip_cuda_head_dim(device, d):
    if device == "cuda" and d not in CUDA_HEAD_DIMS:
        pytest.skip(f"CUDA has no kvcache kernel for head_dim {d} (checked in test_bad_input)")


# (n_q_heads, n_kv_heads, head_dim)
GROUPINGS = [(32, 8, 64), (8, 1, 128), (4, 4, 32)]
LENS = [0, 1, 37, 130]  # an empty sequence, one token, odd lengths


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("heads", GROUPINGS, ids=lambda h: "{}/{}-d{}".format(*h))
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("seq_new,seq_q", [(0, 1), (1, 1), (3, 3), (2, 5)])
def test_matches_reference(device, dtype, heads, block_size, seq_new, seq_q):
    n_q, n_kv, d = heads
    case = Case(device, dtype, LENS, seq_q, seq_new, n_q, n_kv, d, block_size=block_size)
    case.check()


@pytest.mark.parametrize("device", DEVICES)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_property_matches_reference(device, data):
    """Random decode problems, each knob drawn independently: dtype, kv heads and group size (odd
    groups leave partial row tiles), head dim (any multiple of 8 on CPU, the kernel list on CUDA),
    one to three sequences of up to 150 or of 600-2500 tokens (the split path), query and new tokens
    (prefill-shaped calls of 20 included), contiguous or paged with any block size, fused rotary
    over part or all of d, causal or not, a window on either side, softcap, and on CPU the thread
    count; the caches' unused slots hold NaN."""
    dtype = data.draw(st.sampled_from(dtypes_for(device)))
    n_kv = data.draw(st.integers(1, 4))
    group = data.draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16]))
    d = data.draw(st.sampled_from(CUDA_HEAD_DIMS)) if device == "cuda" else 8 * data.draw(st.integers(1, 32))
    shortest, longest = data.draw(st.sampled_from([(0, 150), (600, 2500)]))
    lens = data.draw(st.lists(st.integers(shortest, longest), min_size=1, max_size=3))
    seq_q = data.draw(st.sampled_from([1, 1, 2, 3, 4, 5, 8, 20]))
    seq_new = data.draw(st.integers(0, seq_q))
    block_size = data.draw(st.sampled_from([None, None, 1, 5, 16, 32, 64]))
    rotary = None
    if seq_new > 0 and data.draw(st.booleans()):
        rotary_dim = 2 * data.draw(st.integers(1, d // 2))
        rotary = (rotary_dim, max(lens) + seq_q + data.draw(st.integers(0, 5)))  # q's positions run furthest
    side = st.one_of(st.just(-1), st.integers(0, 300))
    kw = dict(causal=data.draw(st.booleans()), window_size=(data.draw(side), data.draw(side)),
              softcap=data.draw(st.sampled_from([0.0, 0.0, 5.0, 30.0])))
    threads = data.draw(st.integers(1, 3)) if device == "cpu" else None
    seed = data.draw(st.integers(0, 2**31 - 1))
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)
        case = Case(device, dtype, lens, seq_q, seq_new, group * n_kv, n_kv, d, block_size=block_size, rotary=rotary)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        case.check(**kw)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("block_size", [None, 32, 64, 17], ids=["contiguous", "paged32", "paged64", "paged17"])
def test_long_context_split_path(device, dtype, block_size):
    """Several thousand keys: the key range is split over tasks (CPU) / CTAs (CUDA) and combined.
    A block size of 17 takes CUDA's block divisions (FastDivisor) through a magic number near
    2^32 over thousands of keys."""
    case = Case(device, dtype, [3001, 4099], 1, 1, 8, 1, 128, block_size=block_size)
    case.check()
    case = Case(device, dtype, [2500], 2, 2, 32, 8, 128, block_size=block_size)
    case.check(causal=False)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_prefill_shaped_calls(device, dtype, block_size):
    """Prompts written into the cache: 130-140 query tokens, with partial rotary, a window and
    softcap, without the causal mask, with fewer keys than queries (the first rows see none), and
    with unequal lengths (none at all for one sequence). These run on the prefill kernels: with
    equal lengths and no rotary, their outputs are gqa_attention's bits on the cache's first
    tokens, a paged cache's read through the block table (CUDA on tensor cores in fp16 / bf16 and
    CUDA cores in fp32; the CPU packs each key block from its pages); on the CPU, with unequal
    ones, those of one gqa_attention call per run of consecutive sequences of equal length."""
    rot = (32, 600)
    cases = [
        (Case(device, dtype, [0, 0], 130, 130, 8, 2, 64, block_size=block_size, rotary=rot), {}),
        (Case(device, dtype, [200, 200], 130, 130, 8, 2, 64, block_size=block_size),
         dict(window_size=(90, 0), softcap=30.0)),
        (Case(device, dtype, [70], 130, 3, 8, 2, 64, block_size=block_size), dict(causal=False)),
        (Case(device, dtype, [50], 140, 0, 8, 2, 64, block_size=block_size), {}),
        (Case(device, dtype, [300, 20], 130, 2, 8, 2, 64, block_size=block_size, rotary=rot), {}),
        (Case(device, dtype, [300, 20, 20, 0, 0, 150], 130, 0, 8, 2, 64, block_size=block_size),
         dict(window_size=(90, 0))),
    ]
    for case, kw in cases:
        seq_new = 0 if case.k is None else case.k.shape[1]
        lens = (case.cache_seqlens + seq_new).tolist()
        if block_size is not None:
            # As a serving engine holds it: -1 past each sequence's last block, and a column slice
            # of a wider table (its rows max_blocks + 2 entries apart).
            table = case.block_table.clone()
            for b, n in enumerate(lens):
                table[b, -(-n // block_size):] = -1
            wide = torch.full((table.shape[0], table.shape[1] + 2), -1, dtype=table.dtype, device=device)
            wide[:, :table.shape[1]] = table
            case.block_table = wide[:, :table.shape[1]]
        out, lse = case.check(**kw)
        if case.rotary_cos is not None or (device != "cpu" and len(set(lens)) > 1):
            continue
        runs = [0] + [b for b in range(1, len(lens)) if lens[b] != lens[b - 1]] + [len(lens)]
        for b0, b1 in zip(runs, runs[1:]):
            ref_out, ref_lse = llama_ext.gqa_attention(
                case.q[b0:b1], *case.tokens(b0, b1, lens[b0]), causal=kw.get("causal", True),
                window_size=kw.get("window_size", (-1, -1)), softcap=kw.get("softcap", 0.0), return_lse=True,
            )
            assert torch.equal(out[b0:b1], ref_out) and torch.equal(lse[b0:b1], ref_lse), (lens, b0, b1)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("block_size", [17, 64])
def test_paged_prefill_matches_reference_reading_pages_in_place(device, dtype, block_size):
    """A prompt of 130 tokens after 300 cached ones in each of two sequences, on a paged cache of
    17- or 64-token pages in shuffled pool order (17 straddles every key block of the prefill
    kernels), its pools strided (every other kv head of a wider pool): the float64 reference's
    results, nothing written outside the new tokens' slots, and the bits of gqa_attention on the
    gathered tokens. The table's entries past each sequence's last block are -1, as a serving
    engine pads them: never read. The kernels read the pages in place (the CPU packs each key block
    from its pages, with no copy of the cache)."""
    lens, seq_new = [300, 300], 130
    case = Case(device, dtype, lens, seq_new, seq_new, 8, 2, 64, block_size=block_size, capacity=500)
    for name in ("k_cache", "v_cache"):
        pool = getattr(case, name)
        wide = torch.full((*pool.shape[:2], 2 * pool.shape[2], pool.shape[3]), NAN, device=device, dtype=dtype)
        wide[:, :, ::2] = pool
        setattr(case, name, wide[:, :, ::2])
    case.block_table[:, -(-(lens[0] + seq_new) // block_size):] = -1
    case.check()
    out, lse = case.call()  # the same new tokens written again
    ref_out, ref_lse = llama_ext.gqa_attention(case.q, *case.tokens(0, 2, lens[0] + seq_new), return_lse=True)
    assert torch.equal(bits(out), bits(ref_out)) and torch.equal(lse, ref_lse)


KEPT_KEY_CASES = [
    pytest.param("0", [300, 300], {}, id="one-block-kept"),
    pytest.param("1", [5000], {}, id="1MB"),
    pytest.param("1", [5000], {"window_size": (1500, 0)}, id="1MB-window"),
]


@pytest.fixture
def two_threads():
    """torch's thread count pinned to 2 for the test, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [None, 17], ids=["contiguous", "paged17"])
@pytest.mark.parametrize("kept_mb,lens,kw", KEPT_KEY_CASES)
def test_prompt_matches_reference_past_the_kept_key_blocks(monkeypatch, two_threads, dtype, block_size, kept_mb,
                                                          lens, kw):
    """A CPU forward thread keeps the key blocks it packs (or copies) for its next query blocks,
    up to a budget; a block that finds no kept slot is packed again on each use into a spare one,
    or, fp32 and fp64 on a contiguous cache, read where it lies. LLAMA_EXT_CPU_KEPT_KEY_MB shrinks
    the budget, as a long sequence would outgrow it: to one block (0 MB), or to 1 MB, under which a
    5000-token cache at d = 64 has 1.3x (bf16 tiles) to 5.7x (fp64) the keys that fit, its blocks
    in kept slots by their index modulo the slots, from the first block or (sliding window) from
    the window's. A 130-token prompt (3 query blocks a kv head) on 2 threads, so that a thread
    reads again the blocks it kept for its last query block: the float64 reference's results, and
    the bits of the default budget, which keeps every block here."""
    case = Case("cpu", dtype, lens, 130, 130, 8, 2, 64, block_size=block_size)
    monkeypatch.setenv("LLAMA_EXT_CPU_KEPT_KEY_MB", kept_mb)
    out, lse = case.check(**kw)
    monkeypatch.delenv("LLAMA_EXT_CPU_KEPT_KEY_MB")
    kept_out, kept_lse = case.call(**kw)  # the same new tokens written again
    assert torch.equal(bits(out), bits(kept_out)) and torch.equal(bits(lse), bits(kept_lse))


@pytest.mark.parametrize("setting", ["16MB", "", "-1", "1e3", str(1 << 40)])
def test_kept_key_budget_rejects_a_bad_setting(monkeypatch, setting):
    case = Case("cpu", torch.float32, [300], 130, 130, 8, 2, 64)
    monkeypatch.setenv("LLAMA_EXT_CPU_KEPT_KEY_MB", setting)
    with pytest.raises(ValueError, match="LLAMA_EXT_CPU_KEPT_KEY_MB must be a whole number of MB"):
        case.call()


@pytest.mark.skipif("cuda" not in DEVICES, reason="the CUDA decode grid's limit needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_long_prompt_past_the_decode_grid_on_cuda(block_size, dtype):
    """A prompt whose rows would need more than 65535 CTA rows of the decode kernel's grid (128
    heads x ceil(8200 / 16) row tiles, 8 rows a tile in fp32): it runs on the prefill kernels
    (tensor cores in fp16, CUDA cores in fp32), a paged cache's rows read through the block table,
    the bits of gqa_attention on the cache's first tokens (this backend's deterministic forward)."""
    case = Case("cuda", dtype, [100], 8200, 8200, 128, 128, 32, block_size=block_size)
    out, lse = case.call()
    ref_out, ref_lse = llama_ext.gqa_attention(case.q, *case.tokens(0, 1, 8300), return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.skipif("cuda" not in DEVICES, reason="LLAMA_EXT_CUDA_SMEM_KB caps a GPU's shared memory")
def test_decode_kernel_without_its_shared_memory_refuses_before_writing(monkeypatch):
    """Under LLAMA_EXT_CUDA_SMEM_KB=2 the tensor-core decode kernel does not fit: a decode step
    raises naming the shared memory before the append writes anything."""
    case = Case("cuda", torch.bfloat16, [40, 7], 1, 1, 8, 2, 64, block_size=16)
    k0, v0 = case.k_cache.clone(), case.v_cache.clone()
    monkeypatch.setenv("LLAMA_EXT_CUDA_SMEM_KB", "2")
    with pytest.raises(RuntimeError, match="shared memory of the tensor-core decode kernel"):
        case.call()
    torch.cuda.synchronize()
    assert torch.equal(bits(case.k_cache), bits(k0)) and torch.equal(bits(case.v_cache), bits(v0))


@pytest.mark.skipif("cuda" not in DEVICES, reason="LLAMA_EXT_CUDA_SMEM_KB caps a GPU's shared memory")
def test_paged_prompt_without_tensor_core_tiles_runs_on_cuda_cores(monkeypatch):
    """Under LLAMA_EXT_CUDA_SMEM_KB=2 no prefill tile fits either: a bf16 prompt on a paged cache
    runs the SIMT prefill kernel through the block table, gqa_attention's bits (under the same cap)
    on the cache's first tokens, its table -1 past each sequence's last block."""
    case = Case("cuda", torch.bfloat16, [40, 40], 130, 130, 8, 2, 64, block_size=16, capacity=250)
    table = case.block_table.clone()
    table[:, -(-170 // 16):] = -1
    case.block_table = table
    monkeypatch.setenv("LLAMA_EXT_CUDA_SMEM_KB", "2")
    out, lse = case.check()
    ref_out, ref_lse = llama_ext.gqa_attention(case.q, *case.tokens(0, 2, 170), return_lse=True)
    assert torch.equal(bits(out), bits(ref_out)) and torch.equal(lse, ref_lse)


@pytest.mark.skipif("cuda" not in DEVICES, reason="a device-side assert needs a GPU")
def test_paged_prompt_with_a_block_outside_the_cache_asserts_on_cuda():
    """The prefill route reads a paged cache through the block table after checking each
    sequence's entries on the device: an entry outside the cache is a device-side assert (in a
    child process: it poisons the CUDA context), never a read out of bounds."""
    code = (
        "import torch, llama_ext\n"
        "kc = torch.randn(8, 16, 2, 64, device='cuda', dtype=torch.bfloat16); vc = torch.randn_like(kc)\n"
        "q = torch.randn(1, 130, 4, 64, device='cuda', dtype=torch.bfloat16)\n"
        "table = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 8]], device='cuda', dtype=torch.int32)\n"
        "seqlens = torch.tensor([120], device='cuda', dtype=torch.int32)\n"
        "llama_ext.gqa_attention_with_kvcache(q, kc, vc, seqlens, block_table=table)\n"
        "torch.cuda.synchronize()\n"
    )
    assert_device_assert(code, "block_table entry outside the cache")


@pytest.mark.skipif("cuda" not in DEVICES, reason="LLAMA_EXT_CUDA_DECODE_SPLITS steers the CUDA launcher")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 17], ids=["contiguous", "paged17"])
def test_forced_split_counts_on_cuda(monkeypatch, dtype, block_size):
    """LLAMA_EXT_CUDA_DECODE_SPLITS=N forces the key split count whatever the GPU: one split (no
    combine), a few, and more splits than key tiles (empty splits) all match the reference, and
    repeat their bits; a value out of range raises, naming the variable, before anything is
    written."""
    for splits in (1, 2, 5, 33, 128):
        monkeypatch.setenv("LLAMA_EXT_CUDA_DECODE_SPLITS", str(splits))
        case = Case("cuda", dtype, [700, 77, 0], 1, 1, 8, 2, 128, block_size=block_size)
        out, lse = case.check()
        out2, lse2 = case.call()  # the same new tokens written again: the same bits
        assert torch.equal(bits(out2), bits(out)) and torch.equal(bits(lse2), bits(lse))
    for bad in ("0", "129", "-3", "4x", ""):
        monkeypatch.setenv("LLAMA_EXT_CUDA_DECODE_SPLITS", bad)
        case = Case("cuda", dtype, [700, 77, 0], 1, 1, 8, 2, 128, block_size=block_size)
        k0, v0 = case.k_cache.clone(), case.v_cache.clone()
        with pytest.raises(ValueError, match="LLAMA_EXT_CUDA_DECODE_SPLITS must be a split count from 1 to 128"):
            case.call()
        torch.cuda.synchronize()
        assert torch.equal(bits(case.k_cache), bits(k0)) and torch.equal(bits(case.v_cache), bits(v0))


def bits_by_setting(monkeypatch, base, variable, values, split_counts):
    """{(value, splits): the bits of out, lse and both caches} of runs of a fresh copy of `base`
    checked against the reference, with `variable` at each value and LLAMA_EXT_CUDA_DECODE_SPLITS
    at each count (None: unset)."""
    results = {}
    for value in values:
        for splits in split_counts:
            for name, setting in ((variable, value), ("LLAMA_EXT_CUDA_DECODE_SPLITS", splits)):
                if setting is None:
                    monkeypatch.delenv(name, raising=False)
                else:
                    monkeypatch.setenv(name, str(setting))
            case = copy.deepcopy(base)
            out, lse = case.check()
            results[value, splits] = (bits(out), bits(lse), bits(case.k_cache), bits(case.v_cache))
    return results


@pytest.mark.skipif("cuda" not in DEVICES, reason="LLAMA_EXT_CUDA_PDL steers the CUDA launcher")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_launch_overlap_matches_serial_launches_on_cuda(monkeypatch, dtype, block_size):
    """The append, attend and combine launched overlapping (programmatic dependent launch, sm_90+)
    and one after another (LLAMA_EXT_CUDA_PDL=0) give the same bits: the attend waits for the
    new tokens' rows (rotated, several per sequence, the last split reading them) and the
    combine for the partials. Each run starts from the same caches."""
    base = Case("cuda", dtype, [3000, 1, 0, 517], 3, 3, 8, 2, 128, block_size=block_size, rotary=(128, 4096))
    results = bits_by_setting(monkeypatch, base, "LLAMA_EXT_CUDA_PDL", ("1", "0"), (None, 1, 7))
    for splits in (None, 1, 7):
        for mine, theirs in zip(results["1", splits], results["0", splits]):
            assert torch.equal(mine, theirs), f"splits {splits}: overlapped launches differ from serial ones"


@pytest.mark.skipif("cuda" not in DEVICES, reason="LLAMA_EXT_CUDA_DECODE_DEEP_RING steers the CUDA launcher")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_deep_ring_matches_the_ring_of_two_on_cuda(monkeypatch, dtype, block_size):
    """At head dim 128 the attend kernel's deep ring (three K/V stages, LLAMA_EXT_CUDA_DECODE_DEEP_RING=1)
    and its ring of two (=0) give the same bits, and so does the launcher's own choice: the ring's
    depth moves only when tiles are loaded. Long and short sequences (many tiles past the ring, one
    partial tile, none), new tokens rotated on append, the launcher's split count and forced ones
    (one split, 7, more splits than tiles); each run starts from the same caches. =1 runs where the
    GPU's shared memory per block holds the kernel (its size from the emulation's transcription of
    the tiling) and raises elsewhere; under LLAMA_EXT_CUDA_SMEM_KB=100 (a 100 KB part) it raises on
    any GPU, as does a value other than 0 or 1, naming the variable, before anything is written."""
    emulation = load_emulation("emulate_kvcache_attention")
    deep_smem = emulation.TcTiling(emulation.kDeepRingHeadDim, stage_budget=emulation.kTcDeepStageBudget).kSmemBytes
    holds_deep_ring = torch.cuda.get_device_properties(0).shared_memory_per_block_optin >= deep_smem
    base = Case("cuda", dtype, [3000, 1, 0, 517], 2, 2, 8, 2, 128, block_size=block_size, rotary=(128, 4096))

    def refused(match):
        case = copy.deepcopy(base)
        k0, v0 = case.k_cache.clone(), case.v_cache.clone()
        with pytest.raises(ValueError, match=match):
            case.call()
        torch.cuda.synchronize()
        assert torch.equal(bits(case.k_cache), bits(k0)) and torch.equal(bits(case.v_cache), bits(v0))

    rings = (None, "0", "1") if holds_deep_ring else (None, "0")
    results = bits_by_setting(monkeypatch, base, "LLAMA_EXT_CUDA_DECODE_DEEP_RING", rings, (None, 1, 7, 100))
    for ring, splits in results:
        for mine, theirs in zip(results[ring, splits], results["0", splits]):
            assert torch.equal(mine, theirs), f"ring {ring}, splits {splits}: differs from the ring of two"
    monkeypatch.delenv("LLAMA_EXT_CUDA_DECODE_SPLITS", raising=False)
    monkeypatch.setenv("LLAMA_EXT_CUDA_DECODE_DEEP_RING", "1")
    if not holds_deep_ring:
        refused("LLAMA_EXT_CUDA_DECODE_DEEP_RING=1: the deep-ring kernel's")
    monkeypatch.setenv("LLAMA_EXT_CUDA_SMEM_KB", "100")
    refused("LLAMA_EXT_CUDA_DECODE_DEEP_RING=1: the deep-ring kernel's")
    monkeypatch.delenv("LLAMA_EXT_CUDA_SMEM_KB")
    for bad in ("2", "yes", ""):
        monkeypatch.setenv("LLAMA_EXT_CUDA_DECODE_DEEP_RING", bad)
        refused("LLAMA_EXT_CUDA_DECODE_DEEP_RING must be 0 or 1")


@pytest.mark.skipif("cuda" not in DEVICES, reason="the 32-bit stride bound is the CUDA kernels'")
def test_cache_stride_past_32_bits_raises_on_cuda():
    """The attend kernels address a row as a 32-bit index times a 32-bit byte stride: a paged
    cache whose blocks lie 2^31 bytes apart (2 GB of storage) is refused, naming the cache, and
    nothing is written."""
    q = torch.randn(1, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    storage = torch.zeros(2**30 + 16 * 64, device="cuda", dtype=torch.bfloat16)
    k_cache = storage.as_strided((2, 16, 1, 64), (2**30, 64, 64, 1))
    v_cache = torch.zeros(2, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.tensor([5], device="cuda", dtype=torch.int32)
    block_table = torch.tensor([[0, 1]], device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k_cache: the CUDA kernels take the block stride \(dim 0\) below 2\^31"):
        llama_ext.gqa_attention_with_kvcache(q, k_cache, v_cache, seqlens, k, k.clone(), block_table=block_table)
    torch.cuda.synchronize()
    assert not k_cache.any() and not v_cache.any()
    del storage, k_cache


@pytest.mark.parametrize("device", DEVICES)
def test_empty_paged_cache_with_huge_blocks(device):
    """A paged cache of no blocks and a table of no columns holds no token, whatever its block
    size: the CPU returns zeros (lse 0); CUDA, whose kernels divide by the block size in 31 bits,
    refuses a block of 2^32 tokens with a ValueError rather than dividing by it."""
    q = torch.randn(1, 1, 8, 128, device=device, dtype=torch.float16)
    cache = torch.empty(0, 2**32, 2, 128, device=device, dtype=torch.float16)
    table = torch.empty(1, 0, device=device, dtype=torch.int32)
    seqlens = torch.zeros(1, device=device, dtype=torch.int32)
    if device == "cuda":
        with pytest.raises(ValueError, match=r"more than 2\^30 tokens per sequence or per block"):
            llama_ext.gqa_attention_with_kvcache(q, cache, cache, seqlens, block_table=table)
        return
    out, lse = llama_ext.gqa_attention_with_kvcache(q, cache, cache, seqlens, block_table=table, return_lse=True)
    assert not out.any() and not lse.any()


@pytest.mark.skipif("cuda" not in DEVICES, reason="the 32-bit stride bound is the CUDA kernels'")
def test_stride_of_a_single_element_dim_is_not_bounded_on_cuda():
    """A dim of one element is indexed at 0 only: its stride, however large, is no reason to
    refuse (a one-block table, a one-token cache), and the results are those of a plain one."""
    q = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(3, 16, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([5, 15], device="cuda", dtype=torch.int32)
    table = torch.tensor([[2], [0]], device="cuda", dtype=torch.int32)
    far = table.as_strided((2, 1), (1, 2**40))
    expected = llama_ext.gqa_attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table)
    got = llama_ext.gqa_attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=far)
    assert torch.equal(bits(got), bits(expected))
    one_token = torch.randn(2, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    far_token = one_token.as_strided((2, 1, 1, 64), (64, 2**40, 64, 1))
    lens = torch.ones(2, device="cuda", dtype=torch.int32)
    expected = llama_ext.gqa_attention_with_kvcache(q, one_token, one_token, lens)
    assert torch.equal(bits(llama_ext.gqa_attention_with_kvcache(q, far_token, far_token, lens)), bits(expected))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [40, 3000], ids=["one-split", "split"])
@pytest.mark.parametrize("poison", ["nan-query", "nan-key", "inf-key-row"])
@pytest.mark.parametrize("seq_q", [1, 130], ids=["decode", "prompt"])
def test_nonfinite_scores_reach_their_rows(device, dtype, length, poison, seq_q):
    """README (NaN and Inf): a NaN in a query row reaches that row, a NaN/Inf in a key the query
    rows that see it (here all of them), out and lse both, also when the key range is split over
    tasks / CTAs and combined (a split's NaN lse is never taken for an empty split), and for a
    prompt on the prefill kernels. Every other row keeps the clean call's bits; gqa_attention on
    the cache's tokens runs on the same kernels."""
    case = Case(device, dtype, [length, length], seq_q, seq_q, 8, 2, 64)
    case.k_cache.nan_to_num_(0.0)
    case.v_cache.nan_to_num_(0.0)
    clean_out, clean_lse = case.call()
    poisoned = torch.zeros(2, seq_q, 8, dtype=torch.bool, device=device)  # [batch, seq_q, n_q_heads]
    if poison == "nan-query":
        case.q[1, 0, 5, 7] = NAN
        poisoned[1, 0, 5] = True
    elif poison == "nan-key":
        case.k_cache[0, length // 3, 1, 0] = NAN  # kv head 1: query heads 4..7 see it
        poisoned[0, :, 4:] = True
    else:
        case.k_cache[1, 10, 0] = float("inf")  # a whole key row: q . k = Inf - Inf = NaN
        poisoned[1, :, :4] = True
    out, lse = case.call()  # appends the same new token again
    lse_rows = poisoned.permute(0, 2, 1)
    assert (~torch.isfinite(out[poisoned])).any(-1).all()
    assert (~torch.isfinite(lse[lse_rows])).all()
    assert torch.equal(out[~poisoned], clean_out[~poisoned])
    assert torch.equal(lse[~lse_rows], clean_lse[~lse_rows])
    k, v = case.k_cache[:, : length + seq_q], case.v_cache[:, : length + seq_q]
    out2, lse2 = llama_ext.gqa_attention(case.q, k, v, return_lse=True)
    assert (~torch.isfinite(out2[poisoned])).any(-1).all() and (~torch.isfinite(lse2[lse_rows])).all()
    assert torch.equal(out2[~poisoned], out[~poisoned])


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_task_shapes(device, dtype, block_size):
    """Uneven task shapes: 5 kv heads x 14 rows each, split over keys, in tiles of 4, 2 and 1 rows.
    On one CPU thread (four units a thread) a task takes 4 heads, then 1; on two, with fewer units
    than four a thread, the kv heads go in equal groups, here of 1 head. And more rows than a task
    holds (32 query heads x 3 tokens of one kv head)."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            Case(device, dtype, [1500, 9], 7, 2, 10, 5, 32, block_size=block_size).check()
    finally:
        torch.set_num_threads(before)
    Case(device, dtype, [700, 3], 3, 3, 32, 1, 64, block_size=block_size).check()


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_fused_rotary(device, dtype, interleaved, rotary_dim, block_size):
    case = Case(device, dtype, [0, 5, 40], 3, 3, 8, 2, 64, block_size=block_size, rotary=(rotary_dim, 64))
    out, _ = case.check(rotary_interleaved=interleaved)
    # The same as rotating with apply_rotary and calling without tables.
    pos = case.cache_seqlens.long()[:, None] + torch.arange(3, device=device)
    case2 = Case(device, dtype, [0, 5, 40], 3, 3, 8, 2, 64, block_size=block_size)
    case2.q, case2.k, case2.v = case.q, case.k, case.v
    q_rot, k_rot = llama_ext.apply_rotary(case.q, case.k, case.rotary_cos, case.rotary_sin, pos, interleaved)
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    case2.k_cache, case2.v_cache, case2.block_table = k_cache, v_cache, case.block_table
    # case.k_cache already holds the rotated new tokens: write the same slots again from k_rot.
    out2 = llama_ext.gqa_attention_with_kvcache(
        q_rot, k_cache, v_cache, case.cache_seqlens, k_rot, case.v, block_table=case.block_table
    )
    assert torch.equal(bits(k_cache), bits(case.k_cache))
    assert_close(out2, out, dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize(
    "causal,window,softcap",
    [(True, (0, -1), 0.0), (True, (1, -1), 0.0), (True, (16, -1), 0.0), (True, (1000, -1), 0.0),
     (False, (7, 3), 0.0), (False, (-1, 2), 0.0), (True, (-1, -1), 5.0), (True, (20, -1), 2.0),
     # sides past any length mean unbounded ones (clamped: no overflow in the window arithmetic)
     (False, (2**63 - 1, 2**63 - 1), 0.0), (False, (2**63 - 1, -1), 0.0)],
)
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_window_and_softcap(device, dtype, causal, window, softcap, block_size):
    case = Case(device, dtype, [0, 3, 70, 300], 4, 2, 8, 2, 64, block_size=block_size)
    case.check(causal=causal, window_size=window, softcap=softcap)


def test_reference_stays_on_the_inputs_device():
    """The float64 reference makes every tensor on its inputs' device: on the first GPU run, its
    CPU-made lse for an empty sequence failed every CUDA case that had one. Meta tensors enforce
    CUDA's same-device rule on a machine without a GPU (cache_seqlens and the block table, read
    on the host, stay on the CPU)."""
    def meta(t):
        return None if t is None else t.to("meta")

    empty = Case("cpu", torch.float32, [0, 3], 2, 0, 4, 2, 32)
    appended = Case("cpu", torch.float32, [0, 3], 2, 2, 4, 2, 32, block_size=16, rotary=(32, 64))
    for case, kw in ((empty, {}), (appended, dict(window_size=(1, 0), softcap=5.0))):
        out, lse, k_cache, v_cache = gqa_attention_with_kvcache_reference(
            meta(case.q), meta(case.k_cache), meta(case.v_cache), case.cache_seqlens, meta(case.k), meta(case.v),
            case.block_table, rotary_cos=meta(case.rotary_cos), rotary_sin=meta(case.rotary_sin), **kw)
        assert {t.device.type for t in (out, lse, k_cache, v_cache)} == {"meta"}
        assert out.shape == case.q.shape and lse.shape == (2, 4, 2)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_equals_gqa_attention_on_the_cache(device, dtype):
    """A decode step is gqa_attention over the cache slice (lse included)."""
    case = Case(device, dtype, [100, 100], 2, 2, 16, 4, 64)
    out, lse = case.call()
    k = case.k_cache[:, :102]
    v = case.v_cache[:, :102]
    ref_out, ref_lse = llama_ext.gqa_attention(case.q, k, v, return_lse=True)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, torch.float64 if dtype == torch.float64 else torch.float32, scale=2.0)
    ref64, lse64 = gqa_attention_reference(case.q, k, v)
    assert_close(out, ref64, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_every_cuda_head_dim_and_strided_q(device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    for d in CUDA_HEAD_DIMS:
        case = Case(device, dtype, [9, 200], 2, 1, 8, 2, d, block_size=16)
        case.q = make((2, 8, 2, d), device, dtype).transpose(1, 2)  # HF's [b, h, s, d] as a view
        case.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_head_dim_on_cpu(dtype):
    """The CPU kernel takes any multiple of 8 up to 256: head dims that end in a partial 16- or
    32-element chunk (the bf16 pair widening reads whole chunks, 16 elements at the avx2 level and
    32 at avx512, masked at the end)."""
    for d in (8, 24, 40, 72, 136, 200, 248):
        Case("cpu", dtype, [70, 0, 33], 2, 1, 6, 2, d, block_size=16).check()
        Case("cpu", dtype, [300], 1, 1, 4, 4, d).check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_thread_counts_on_cpu(dtype, block_size, threads):
    """The CPU split count follows the thread count and each sequence's length (none with one
    thread; with more, each task holds about 1 / (2 x threads) of all keys, so a short sequence
    batched with long ones is not split), tasks are spread over threads by cost, and a split
    range's score tiles are dealt out evenly, so a range of fewer tiles than splits leaves splits
    empty between others (3 threads: a window of 42 keys, 3 tiles, in 6 splits: 0, 1, 0, 1, 0,
    1 tiles)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        Case("cpu", dtype, [3001, 40, 0, 257], 1, 1, 32, 8, 128, block_size=block_size).check()
        case = Case("cpu", dtype, [1500], 2, 2, 8, 2, 64, block_size=block_size)
        case.check(window_size=(700, 0))
        case.check(window_size=(40, 0))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 16, 48, 8], ids=["contiguous", "paged16", "paged48", "paged8"])
def test_score_tile_shapes_on_cpu(dtype, block_size):
    """The CPU kernel's score tiles (on AMX at the amx_bf16 level: 16 keys one row stride apart,
    head dims of whole 32-element chunks, up to 16 rows per kv head a sub-tile, S^T tiles of a
    power of two columns transposed by permutes, P V on the tiles from 7 rows; FMA tiles
    otherwise): rows per kv head 1, 2, 4, 8, 9, 16 and 32, head dims 32-256, tiles within a page,
    across shuffled pages, and a partial last tile; splits cut at whole tiles, and a window whose
    first split starts between tiles; softcap."""
    for n_q, n_kv, seq_q, d in ((4, 4, 1, 64), (4, 2, 1, 64), (8, 2, 1, 128), (16, 2, 1, 32), (6, 2, 3, 96),
                                (16, 1, 1, 256), (16, 1, 2, 128)):
        Case("cpu", dtype, [1000, 37], seq_q, 1, n_q, n_kv, d, block_size=block_size).check()
    case = Case("cpu", dtype, [777], 1, 1, 8, 2, 128, block_size=block_size)
    case.check(window_size=(300, 0), softcap=20.0)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [None, 16, 17], ids=["contiguous", "paged16", "paged17"])
def test_rows_past_a_tile_matches_reference_on_cpu(dtype, block_size):
    """Many rows per kv head (G x seq_q) on the CPU kernel. At the amx_bf16 level a head's rows run
    as AMX sub-tiles of up to 16: 20 rows as 2 x 10, 42 as 3 x 14, 40 as 3 x 14 with 2 padding rows
    (which see no key and are never stored); S^T tiles of 8 columns for 6 and 7 rows; P V on the
    tiles from 7 rows, V restaged in key pairs, a paged17 block's tiles across pages. 70 rows are
    two row tiles (64 + 6) where this kernel keeps them: on 8 threads, more than the prefill
    kernel's tasks. Elsewhere the FMA tiles. Sequences of 1001 and 38 keys (partial key blocks)."""
    before = torch.get_num_threads()
    try:
        for n_q, n_kv, seq_q, d, threads in ((12, 2, 1, 128, 2), (14, 2, 1, 64, 2), (4, 1, 5, 128, 2),
                                             (7, 1, 6, 96, 2), (8, 1, 5, 128, 2), (5, 1, 14, 64, 8)):
            torch.set_num_threads(threads)
            case = Case("cpu", dtype, [1000, 37], seq_q, 1, n_q, n_kv, d, block_size=block_size)
            case.check()
            case.check(window_size=(300, 0), softcap=20.0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_few_query_tokens_of_many_rows_on_the_prefill_kernel_matches_reference(dtype, block_size):
    """On the CPU, past DECODE_ROUTE_MAX_SEQ_Q query tokens, a call whose rows per kv head pass a
    task's 64 (fewer at some levels) runs on the prefill kernel where each of its calls has a task
    for every thread: with equal lengths and no rotary, gqa_attention's bits on the cache's first
    tokens (which takes the prefill kernel for these too); with rotary, the float64 reference.
    6 query heads per kv head x 12 tokens = 72 rows; on 2 threads, 2 kv heads x 1 query block x 2
    sequences of equal length."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seq_q = 12
        assert seq_q > DECODE_ROUTE_MAX_SEQ_Q
        for lens, kw, rotary in (([500, 500], {}, None), ([300, 300], dict(window_size=(90, 0), softcap=30.0), None),
                                 ([700, 700], {}, (64, 800))):
            case = Case("cpu", dtype, lens, seq_q, 3, 12, 2, 64, block_size=block_size, rotary=rotary)
            out, lse = case.check(**kw)
            if rotary is None:
                n = lens[0] + 3
                ref_out, ref_lse = llama_ext.gqa_attention(case.q, *case.tokens(0, 2, n), return_lse=True,
                                                           window_size=kw.get("window_size", (-1, -1)),
                                                           softcap=kw.get("softcap", 0.0))
                assert torch.equal(bits(out), bits(ref_out)) and torch.equal(bits(lse), bits(ref_lse))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [None, 16, 64], ids=["contiguous", "paged16", "paged64"])
def test_phase_order_on_cpu(dtype, block_size):
    """2-byte rows of 8 kv heads x 128 (2 KB: two keys a page) on the CPU: 64-key blocks that every
    row sees are read in phase order (keys a page apart first), blocks that some row sees in part
    (the causal end of a 4-token query, a window's left edge, the last partial block) in address
    order after touch_rows; 4 and 6 query heads per kv head (score tiles of 4 and 16 keys: 8 and
    4 phases). At the amx_bf16 level in bf16: S^T tiles of 16 keys four apart (4 phases) where a
    block lies in one cache block (contiguous, paged64; paged16's blocks span four), with P V on
    the FMAs (4 and 6 rows per kv head) or on the tiles (8 rows); from 16 rows (4 and 8 query
    tokens), and paged16's from 8, the next block prefetched instead, each block after a task's
    first read as it lies."""
    for n_q, seq_q in ((32, 1), (32, 4), (48, 1), (64, 1), (32, 8)):
        case = Case("cpu", dtype, [1000, 130], seq_q, 1, n_q, 8, 128, block_size=block_size)
        case.check()
        case.check(window_size=(333, 0))


@pytest.mark.parametrize("device,dtype", device_dtype_params((torch.float16, torch.bfloat16)))
@pytest.mark.parametrize("block_size", [None, 16, 32, 64, 48], ids=["contiguous", "paged16", "paged32", "paged64",
                                                                    "paged48"])
def test_every_cuda_head_dim_row_tiles_and_splits(device, dtype, block_size):
    """On CUDA the tensor-core kernel: 6 query heads per kv head x 3 tokens = 18 rows, two m16 row
    tiles; a length of several key tiles, split over CTAs; a block size that tiles do not align to."""
    for d in CUDA_HEAD_DIMS:
        case = Case(device, dtype, [700, 77, 0], 3, 2, 12, 2, d, block_size=block_size)
        out, lse = case.check()
        if device == "cuda":
            # The kernel merges warps and splits in a fixed order: a second call (writing the
            # same new tokens again) gives the same bits.
            out2, lse2 = case.call()
            assert torch.equal(bits(out2), bits(out)) and torch.equal(bits(lse2), bits(lse))
    case = Case(device, dtype, [650], 1, 1, 8, 8, 128, block_size=block_size)  # one row per tile
    case.check(causal=False, window_size=(300, 40))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    case = Case(device, torch.float32, [3, 4], 0, 2, 4, 2, 32)  # seq_q = 0: only the append
    out, lse = case.call()
    assert out.shape == (2, 0, 4, 32) and lse.shape == (2, 4, 0)
    ref = case.reference()
    assert torch.equal(bits(case.k_cache), bits(ref[2]))
    for capacity in (None, 0):  # nothing cached (a cache of capacity 0: no block size to divide by)
        for dtype in (torch.float32, torch.bfloat16):
            case = Case(device, dtype, [0, 0], 1, 0, 4, 2, 32, capacity=capacity)
            out, lse = case.call()  # zeros, lse 0
            assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.zeros_like(lse))


def bad_cases(device):
    """(description, kwargs overrides, exception, message) of invalid calls."""
    dev = torch.device(device)
    python_checks = [  # the op's Python wrapper, shared with gqa_attention
        ("window not a pair", dict(window_size=4), TypeError, "window_size must be a pair"),
        ("window not ints", dict(window_size=(1.5, 0)), TypeError, r"window_size \(left\) must be an int"),
    ]
    return python_checks + [
        ("q dtype", dict(q=lambda c: c.q.half() if c.q.dtype != torch.half else c.q.float()), TypeError, "k_cache"),
        ("seqlens dtype", dict(cache_seqlens=lambda c: c.cache_seqlens.long()), TypeError, "cache_seqlens"),
        ("seqlens shape", dict(cache_seqlens=lambda c: c.cache_seqlens[:1]), ValueError, "cache_seqlens"),
        ("heads", dict(q=lambda c: c.q[:, :, :3]), ValueError, "n_kv_heads"),
        ("k without v", dict(v=lambda c: None), ValueError, "k and v"),
        ("k heads", dict(k=lambda c: c.k[:, :, :1], v=lambda c: c.v[:, :, :1]), ValueError, "k must be"),
        ("block_table dtype", dict(block_table=lambda c: c.block_table.long()), TypeError, "block_table"),
        ("block_table shape", dict(block_table=lambda c: c.block_table[:1]), ValueError, "block_table"),
        ("capacity", dict(cache_seqlens=lambda c: c.cache_seqlens + 100), ValueError, "capacity"),
        ("negative length", dict(cache_seqlens=lambda c: c.cache_seqlens - 10), ValueError, "negative"),
        ("block out of range", dict(block_table=lambda c: c.block_table + 1000), IndexError, "block_table"),
        ("rotary without k", dict(k=lambda c: None, v=lambda c: None, rotary=True), ValueError, "need k"),
        ("rotary table short", dict(rotary_short=True), IndexError, "rotary"),
        ("window", dict(window_size=(-2, 0)), ValueError, "window_size"),
        ("softcap", dict(softcap=-1.0), ValueError, "softcap"),
        ("head_dim", dict(head_dim=12), ValueError, "head_dim"),
    ] if dev.type == "cpu" else python_checks + [
        ("q dtype", dict(q=lambda c: c.q.half()), TypeError, "k_cache"),
        ("float64", dict(dtype=torch.float64), TypeError, "float64"),
        ("head_dim", dict(head_dim=40), ValueError, "head_dim"),
        ("block_table dtype", dict(block_table=lambda c: c.block_table.long()), TypeError, "block_table"),
        ("seqlens on cpu", dict(cache_seqlens=lambda c: c.cache_seqlens.cpu()), RuntimeError, "cache_seqlens"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_and_writes_nothing(device):
    for name, over, exc, match in bad_cases(device):
        over = dict(over)
        d = over.pop("head_dim", 32)
        dtype = over.pop("dtype", torch.float32)
        rotary = over.pop("rotary", False) or over.pop("rotary_short", False)
        case = Case(device, dtype, [5, 9], 2, 2, 4, 2, d, block_size=16, rotary=(d, 8 if name == "rotary table short" else 64) if rotary else None)
        k0, v0 = case.k_cache.clone(), case.v_cache.clone()
        args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, cache_seqlens=case.cache_seqlens, k=case.k,
                    v=case.v, block_table=case.block_table, rotary_cos=case.rotary_cos, rotary_sin=case.rotary_sin)
        kw = {}
        for key, val in over.items():
            if key in args:
                args[key] = val(case)
            else:
                kw[key] = val
        with pytest.raises(exc, match=match):
            llama_ext.gqa_attention_with_kvcache(**args, **kw)
        assert torch.equal(bits(case.k_cache), bits(k0)) and torch.equal(bits(case.v_cache), bits(v0)), name


@pytest.mark.parametrize("device", DEVICES)
def test_requires_grad_raises(device):
    case = Case(device, torch.float32, [5], 1, 1, 4, 2, 32)
    case.q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference op"):
        case.call()
    with torch.no_grad():
        case.call()


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_opcheck(device, dtype):
    op = torch.ops.llama_ext.gqa_attention_with_kvcache
    for block_size in (None, 16):
        case = Case(device, dtype, [3, 20], 2, 2, 8, 2, 64, block_size=block_size, rotary=(64, 64))
        # Finite caches: opcheck compares outputs of repeated runs.
        case.k_cache.nan_to_num_(0.0)
        case.v_cache.nan_to_num_(0.0)
        opcheck(op, (case.q, case.k_cache, case.v_cache, case.cache_seqlens, case.k, case.v, case.block_table, True,
                     0.125, case.rotary_cos, case.rotary_sin, False, -1, -1, 0.0))
        opcheck(op, (case.q, case.k_cache, case.v_cache, case.cache_seqlens, None, None, case.block_table, False,
                     0.125, None, None, False, 4, 1, 3.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    case = Case(device, torch.float32, [7, 30], 1, 1, 8, 2, 64, block_size=16, rotary=(64, 64))
    case.k_cache.nan_to_num_(0.0)
    case.v_cache.nan_to_num_(0.0)

    def step(q, k_cache, v_cache, seqlens, k, v, block_table, cos, sin):
        out = llama_ext.gqa_attention_with_kvcache(q, k_cache, v_cache, seqlens, k, v, block_table=block_table,
                                                   rotary_cos=cos, rotary_sin=sin)
        return out * 2

    args = (case.k_cache.clone(), case.v_cache.clone())
    expected = step(case.q, *args, case.cache_seqlens, case.k, case.v, case.block_table, case.rotary_cos, case.rotary_sin)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    out = compiled(case.q, case.k_cache, case.v_cache, case.cache_seqlens, case.k, case.v, case.block_table,
                   case.rotary_cos, case.rotary_sin)
    torch.testing.assert_close(out, expected)
    # The compiled call wrote the caches in place, as eager does.
    assert torch.equal(case.k_cache, args[0]) and torch.equal(case.v_cache, args[1])


@emulation_only_on_cpu
def test_tensor_core_kernel_emulation():
    """The CUDA tensor-core decode kernel (attend_tc_kernel), with the append and the combine,
    transcribed lane by lane: every head dim, paged and contiguous caches, splits, windows,
    softcap, rotary; float64 within 1e-13 (tools/emulate_kvcache_attention.py)."""
    check_kernel_emulation("emulate_kvcache_attention")


@pytest.mark.skipif("cuda" not in DEVICES, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("seq_q,block_size", [(1, 16), (130, None), (130, 16)],
                         ids=["decode-paged16", "prompt-contiguous", "prompt-paged16"])
def test_cuda_graph_capture(seq_q, block_size):
    """A decode step, and a prompt written into a contiguous or a paged cache (the prefill route),
    captured in a CUDA graph: no host sync, and the replay reads cache_seqlens' device value."""
    case = Case("cuda", torch.bfloat16, [100, 3000], seq_q, seq_q, 32, 8, 128, block_size=block_size,
                rotary=(128, 4096))
    case.k_cache.nan_to_num_(0.0)
    case.v_cache.nan_to_num_(0.0)
    k0, v0 = case.k_cache.clone(), case.v_cache.clone()
    expected, _ = case.call()
    case.k_cache.copy_(k0)
    case.v_cache.copy_(v0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        case.call()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = case.call()
    case.k_cache.copy_(k0)
    case.v_cache.copy_(v0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    # The graph follows cache_seqlens' device value: one more token changes the result.
    case.cache_seqlens += 1
    graph.replay()
    ref_out = case.reference()[0]
    assert_close(out, ref_out, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_rope", [False, True])
def test_gqattention_with_kvcache_module(device, with_rope):
    """GQAttention decoding through KVCache (the fused op, inference) equals the full forward,
    including when the cache outgrows its initial capacity."""
    hidden, heads, kv_heads, head_dim = 96, 6, 2, 32
    rope = llama_ext.RotaryEmbedding(head_dim, max_position_embeddings=64, device=device) if with_rope else None
    attn = llama_ext.GQAttention(hidden, heads, kv_heads, head_dim=head_dim, rope=rope).to(device)
    x = make((2, 12, hidden), device, torch.float32)
    with torch.no_grad():
        full = attn(x)
        cache = llama_ext.KVCache(capacity=6)
        steps = [attn(x[:, :5], cache=cache)]
        for start, end in [(5, 8), (8, 9), (9, 10), (10, 11), (11, 12)]:
            steps.append(attn(x[:, start:end], cache=cache))
    assert cache.offset == 12 and cache.k.shape == (2, 12, kv_heads, head_dim)
    assert cache.cache_seqlens.tolist() == [12, 12]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_rope", [False, True])
def test_gqattention_with_paged_kvcache_module(device, with_rope):
    """GQAttention decoding through PagedKVCache equals decoding through the contiguous KVCache,
    while the pool grows past its initial blocks."""
    hidden, heads, kv_heads, head_dim = 96, 6, 2, 32
    rope = llama_ext.RotaryEmbedding(head_dim, max_position_embeddings=64, device=device) if with_rope else None
    attn = llama_ext.GQAttention(hidden, heads, kv_heads, head_dim=head_dim, rope=rope).to(device)
    x = make((2, 23, hidden), device, torch.float32)
    chunks = [(0, 5), (5, 8), (8, 9), (9, 10), (10, 17), (17, 18), (18, 23)]
    with torch.no_grad():
        contiguous, paged = llama_ext.KVCache(capacity=32), llama_ext.PagedKVCache(num_blocks=3, block_size=4)
        expected = torch.cat([attn(x[:, s:e], cache=contiguous) for s, e in chunks], dim=1)
        got = torch.cat([attn(x[:, s:e], cache=paged) for s, e in chunks], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert paged.lengths == [23, 23] and paged.offset == 23
    assert paged.k_cache.shape[0] >= 12 and paged.block_table.shape == (2, 6)  # 6 blocks of 4 per sequence
    for b in range(2):
        k, v = paged.sequence(b)
        torch.testing.assert_close(k, contiguous.k[b], atol=0, rtol=0)
        torch.testing.assert_close(v, contiguous.v[b], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_kvcache_free_and_reuse(device):
    """Freeing a sequence returns its blocks, and its slot restarts at position 0 while the other
    sequence keeps its tokens: each slot then equals a contiguous cache of its own sequence."""
    hidden, heads, kv_heads, head_dim = 64, 4, 2, 32  # a head dim the CUDA kernels take
    rope = llama_ext.RotaryEmbedding(head_dim, max_position_embeddings=64, device=device)
    attn = llama_ext.GQAttention(hidden, heads, kv_heads, head_dim=head_dim, rope=rope).to(device)
    first = make((2, 9, hidden), device, torch.float32)
    after = make((2, 6, hidden), device, torch.float32)
    with torch.no_grad():
        cache = llama_ext.PagedKVCache(num_blocks=8, block_size=4)
        attn(first[:, :7], cache=cache)
        attn(first[:, 7:9], cache=cache)
        in_use = 8 - len(cache.free_blocks)
        cache.free(1)
        assert len(cache.free_blocks) == 8 - in_use + 3 and cache.lengths == [9, 0]
        with pytest.raises(ValueError, match="different lengths"):
            cache.offset
        got = torch.cat([attn(after[:, :4], cache=cache), attn(after[:, 4:5], cache=cache),
                         attn(after[:, 5:6], cache=cache)], dim=1)
        assert cache.lengths == [15, 6]
        # Slot 0: one sequence of 15 tokens; slot 1: a new sequence of 6.
        alone = llama_ext.KVCache()
        attn(first[:1], cache=alone)
        expected0 = attn(after[:1], cache=alone)
        expected1 = attn(after[1:])
    torch.testing.assert_close(got[:1], expected0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:], expected1, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.lengths == [0, 0] and len(cache.free_blocks) == cache.k_cache.shape[0]


@pytest.mark.parametrize("device", DEVICES)
def test_modules_on_huge_page_caches(device):
    """KVCache and PagedKVCache over caches of 2 MB and more (on the CPU, empty_kv_cache's huge
    pages; NaN until written under the suite's poisoning), the paged pool grown past them: each
    decodes as the full forward, and the CPU caches start on 2 MB boundaries."""
    hidden, heads, kv_heads, head_dim = 256, 4, 2, 128
    attn = llama_ext.GQAttention(hidden, heads, kv_heads, head_dim=head_dim).to(device)
    x = make((2, 1100, hidden), device, torch.float32)
    chunks = [(0, 600), (600, 601), (601, 1099), (1099, 1100)]
    with torch.no_grad():
        full = attn(x)
        contiguous = llama_ext.KVCache(capacity=2048)  # 2 x 2048 x 2 x 128 fp32: 4 MB each
        paged = llama_ext.PagedKVCache(num_blocks=8, block_size=256)  # 2 MB each; 2 x 5 blocks grow it
        pools = []
        outs = {"contiguous": [], "paged": []}
        for s, e in chunks:
            outs["contiguous"].append(attn(x[:, s:e], cache=contiguous))
            outs["paged"].append(attn(x[:, s:e], cache=paged))
            pools.append(paged.k_cache.shape[0])
    assert pools == [8, 8, 16, 16]
    for name, steps in outs.items():
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5, msg=name)
    if device == "cpu":
        for t in (contiguous.k_cache, contiguous.v_cache, paged.k_cache, paged.v_cache):
            assert t.data_ptr() % (2 << 20) == 0


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_empty_kv_cache(device):
    """empty_kv_cache is torch.empty's tensor (NaN under the suite's poisoning), on the CPU 2 MB-
    aligned from 2 MB on; bad sizes and dtypes raise naming them; opcheck (not its comparison of
    repeated outputs, which are uninitialized) and compile."""
    for size, dtype in [((1, 4096, 8, 128), torch.bfloat16), ((3, 5), torch.float32), ((0, 16, 2, 64), torch.float16)]:
        t = llama_ext.empty_kv_cache(size, dtype, device)
        assert (t.shape, t.dtype, t.device.type) == (size, dtype, device) and t.is_contiguous()
        if device != "meta":
            assert t.isnan().all()
        if device == "cpu" and t.numel() * t.element_size() >= 2 << 20:
            assert t.data_ptr() % (2 << 20) == 0
    assert llama_ext.empty_kv_cache([4]).dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match=r"size\[1\] = -1 is negative"):
        llama_ext.empty_kv_cache((2, -1), torch.float32, device)
    with pytest.raises(TypeError, match=r"dtype must be a floating-point type \(float32, float16, bfloat16 or float64\), got Int"):
        llama_ext.empty_kv_cache((2, 3), torch.int32, device)
    for size in ([2, 3], [4, 1024, 8, 128]):
        opcheck(torch.ops.llama_ext.empty_kv_cache, (size, torch.float32, torch.device(device)),
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    compiled = torch.compile(lambda: llama_ext.empty_kv_cache((2, 8, 2, 64), torch.float32, device).fill_(2),
                             fullgraph=True)
    out = compiled()
    assert out.shape == (2, 8, 2, 64) and (device == "meta" or bool((out == 2).all()))


def test_empty_kv_cache_advises_huge_pages():
    """A CPU cache of 2 MB or more lies in a mapping advised into transparent huge pages (smaps'
    VmFlags "hg": madvise(MADV_HUGEPAGE)), whether or not the kernel then finds free 2 MB pages."""
    if not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        pytest.skip("this kernel has no transparent huge pages")
    t = llama_ext.empty_kv_cache((1, 1024, 8, 128), torch.float32)  # 4 MB
    address, flags = t.data_ptr(), None
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= address < end
            elif inside and first == "VmFlags:":
                flags = line.split()[1:]
                break
    assert flags is not None and "hg" in flags, flags


# ---- gqa_attention routes decode-shaped calls to the KV-cache kernels --------------------------


def _kv_view(k):
    """k of gqa_attention as the full cache of gqa_attention_with_kvcache (nothing appended)."""
    return torch.full((k.shape[0],), k.shape[1], dtype=torch.int32, device=k.device)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("heads", GROUPINGS, ids=lambda h: "{}/{}-d{}".format(*h))
@pytest.mark.parametrize("seq_q", ["1", "3", "max"])
@pytest.mark.parametrize("seq_k", [37, 2500], ids=["short", "split"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gqa_attention_decode_shapes_route_to_kvcache(device, dtype, heads, seq_q, seq_k, causal):
    """gqa_attention with up to the routing limit of query tokens matches the float64 reference
    (out and lse), and is the KV-cache kernel's result bit for bit (it ran there); strided q/k/v
    (HF's transposed views) included."""
    n_q, n_kv, d = heads
    seq_q = {"1": 1, "3": 3, "max": DECODE_ROUTE_MAX_SEQ_Q}[seq_q]
    q = make((2, n_q, seq_q, d), device, dtype).transpose(1, 2)
    k, v = (make((2, n_kv, seq_k, d), device, dtype).transpose(1, 2) for _ in range(2))
    out, lse = llama_ext.gqa_attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = gqa_attention_reference(q, k, v, causal=causal)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, torch.float64 if dtype == torch.float64 else torch.float32, scale=2.0)
    kv_out, kv_lse = llama_ext.gqa_attention_with_kvcache(q, k, v, _kv_view(k), causal=causal, return_lse=True)
    assert torch.equal(out, kv_out) and torch.equal(lse, kv_lse)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("causal,window,softcap", [(True, (5, 0), 0.0), (False, (7, 2), 0.0), (True, (-1, -1), 30.0),
                                                   (False, (40, 3), 20.0)])
def test_gqa_attention_decode_route_window_and_softcap(device, dtype, causal, window, softcap):
    """Windows (some rows see no key when seq_q > seq_k) and softcap on the routed path."""
    for seq_q, seq_k in ((3, 300), (DECODE_ROUTE_MAX_SEQ_Q, 2)):
        q = make((2, seq_q, 8, 64), device, dtype)
        k, v = (make((2, seq_k, 2, 64), device, dtype) for _ in range(2))
        out, lse = llama_ext.gqa_attention(q, k, v, causal=causal, return_lse=True, window_size=window, softcap=softcap)
        ref_out, ref_lse = gqa_attention_reference(q, k, v, causal=causal, window_size=window, softcap=softcap)
        assert_close(out, ref_out, dtype)
        assert_close(lse, ref_lse, torch.float64 if dtype == torch.float64 else torch.float32, scale=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (3, 1), 5.0)])
def test_gqa_attention_backward_through_routed_forward(device, causal, window, softcap):
    """The backward recomputes from the routed forward's out and lse: gradcheck in float64 (CPU)
    and bf16/fp32 gradients against the float64 reference's."""
    fn = lambda q, k, v: llama_ext.gqa_attention(q, k, v, causal=causal, window_size=window, softcap=softcap)  # noqa: E731
    if device == "cpu":
        q = make((2, 2, 4, 8), device, torch.float64).requires_grad_()
        k, v = (make((2, 9, 2, 8), device, torch.float64).requires_grad_() for _ in range(2))
        assert torch.autograd.gradcheck(fn, (q, k, v))
    for dtype in (torch.float32, torch.bfloat16):
        q = make((2, 3, 8, 64), device, dtype).requires_grad_()
        k, v = (make((2, 700, 2, 64), device, dtype).requires_grad_() for _ in range(2))
        grad = make((2, 3, 8, 64), device, dtype)
        fn(q, k, v).backward(grad)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        gqa_attention_reference(q64, k64, v64, causal=causal, window_size=window, softcap=softcap)[0].backward(grad.double())
        for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            assert_close(got, ref, dtype, scale=4.0)


# ---- the prompt kernels' own PTX (SIMT and tensor-core) on contiguous and paged caches, run on the
# CPU (tools/ptx_run.py). The host side of attention.cu's make_params for the interpreter:
# AttentionParams of csrc/cuda/attention_common.cuh (checked against the kernel's parameter size).

class _Strides(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("row", ctypes.c_int64), ("head", ctypes.c_int64)]


class _KeyWindow(ctypes.Structure):
    _fields_ = [("left", ctypes.c_int64), ("right", ctypes.c_int64)]


class _AttentionParams(ctypes.Structure):
    _fields_ = [("q", ctypes.c_uint64), ("k", ctypes.c_uint64), ("v", ctypes.c_uint64), ("out", ctypes.c_uint64),
                ("lse", ctypes.c_uint64), ("q_strides", _Strides), ("k_strides", _Strides), ("v_strides", _Strides),
                ("out_strides", _Strides), ("lse_batch", ctypes.c_int64), ("lse_head", ctypes.c_int64),
                ("cu_seqlens_q", ctypes.c_uint64), ("cu_seqlens_k", ctypes.c_uint64),
                ("key_lengths", ctypes.c_uint64), ("block_table", ctypes.c_uint64),
                ("block_table_strides", ctypes.c_int64 * 2), ("block_size", ctypes.c_int32),
                ("batch", ctypes.c_int32), ("seq_q", ctypes.c_int32), ("seq_k", ctypes.c_int32),
                ("n_q_heads", ctypes.c_int32), ("n_kv_heads", ctypes.c_int32), ("group", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("scale", ctypes.c_float), ("scale_log2", ctypes.c_float),
                ("window", _KeyWindow), ("softcap_log2", ctypes.c_float), ("inv_softcap_log2", ctypes.c_float),
                ("aligned16", ctypes.c_bool), ("dout", ctypes.c_uint64), ("dout_strides", _Strides),
                ("fwd_out", ctypes.c_uint64), ("fwd_out_strides", _Strides), ("delta", ctypes.c_uint64),
                ("dq_accum", ctypes.c_uint64), ("dq", ctypes.c_uint64), ("dq_strides", _Strides),
                ("dk", ctypes.c_uint64), ("dv", ctypes.c_uint64), ("dk_strides", _Strides),
                ("dv_strides", _Strides)]


def _prompt_in_ptx(kernel, dtype, paged, window, d, block, grid_m, threads, smem=0, seq_q=3, lengths=(7, 12)):
    """A prefill kernel of attention_simt.cu / attention_fwd.cu (`kernel`: source stem and
    signature) as the kvcache route launches it over two sequences of `lengths` keys
    (key_lengths) against seq_q query rows each, 4/2 heads: a contiguous cache, or `block`-token pages in
    shuffled pool order with -1 past each sequence's pages in a strided pool. Checks out and lse
    against float64."""
    batch, heads = 2, (4, 2)
    q = torch.randn(batch, seq_q, heads[0], d).to(dtype)
    keys = [torch.randn(n, heads[1], d).to(dtype) for n in lengths]
    values = [torch.randn(n, heads[1], d).to(dtype) for n in lengths]
    run, program = ptx_kernel(*kernel)
    mem = run.DeviceMemory()
    p = _AttentionParams()
    if paged:
        pages = [-(-n // block) for n in lengths]
        order = torch.randperm(sum(pages) + 2)  # two blocks no sequence owns
        table = torch.full((batch, max(pages) + 1), -1, dtype=torch.int32)
        pool_k = torch.randn(sum(pages) + 2, block, heads[1], d + 8).to(dtype)[..., :d]  # strided rows
        pool_v = torch.randn(sum(pages) + 2, block, heads[1], d + 8).to(dtype)[..., :d]
        used = 0
        for b, n in enumerate(lengths):
            for page in range(pages[b]):
                slot = int(order[used])
                used += 1
                table[b, page] = slot
                rows = slice(page * block, min(n, (page + 1) * block))
                pool_k[slot, : rows.stop - rows.start] = keys[b][rows]
                pool_v[slot, : rows.stop - rows.start] = values[b][rows]
        k_cache, v_cache = pool_k, pool_v
        p.block_table, p.block_size = mem.upload(table, "block_table"), block
        p.block_table_strides[:] = list(table.stride())
    else:
        k_cache = torch.randn(batch, max(lengths), heads[1], d).to(dtype)
        v_cache = torch.randn(batch, max(lengths), heads[1], d).to(dtype)
        for b, n in enumerate(lengths):
            k_cache[b, :n], v_cache[b, :n] = keys[b], values[b]
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, heads[0], seq_q), float("nan"))
    p.q, p.k, p.v = mem.upload(q, "q"), mem.upload(k_cache, "k_cache"), mem.upload(v_cache, "v_cache")
    p.out, p.lse = mem.upload(out, "out"), mem.upload(lse, "lse")
    p.q_strides, p.out_strides = _Strides(*q.stride()[:3]), _Strides(*out.stride()[:3])
    p.k_strides, p.v_strides = _Strides(*k_cache.stride()[:3]), _Strides(*v_cache.stride()[:3])
    p.lse_batch, p.lse_head = lse.stride(0), lse.stride(1)
    p.key_lengths = mem.upload(torch.tensor(lengths, dtype=torch.int32), "key_lengths")
    p.batch, p.seq_q, p.seq_k = batch, seq_q, k_cache.shape[1] * (table.shape[1] if paged else 1)
    p.n_q_heads, p.n_kv_heads, p.group, p.head_dim = heads[0], heads[1], heads[0] // heads[1], d
    p.scale = d**-0.5
    p.scale_log2 = p.scale * math.log2(math.e)
    p.window.left, p.window.right = min(window, p.seq_k) if window >= 0 else -1, 0
    p.aligned16 = not paged and d % 8 == 0
    assert ctypes.sizeof(p) == program.kernel.params[0].size
    program.launch(mem, [bytes(p)], grid=(-(-seq_q // grid_m), heads[0], batch), block=(threads,),
                   dynamic_shared=smem)
    out, lse = mem.download(p.out, out), mem.download(p.lse, lse)
    for b in range(batch):
        ref_out, ref_lse = gqa_attention_reference(q[b:b + 1], keys[b][None], values[b][None], causal=True,
                                                   window_size=(window, 0))
        assert_close(out[b:b + 1], ref_out, dtype, scale=2.0)
        torch.testing.assert_close(lse[b:b + 1].double(), ref_lse, atol=1e-4, rtol=1e-5)


@emulation_only_on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged5"])
@pytest.mark.parametrize("window", [-1, 3], ids=["causal", "window3"])
def test_simt_prompt_kernel_in_ptx_matches_float64(dtype, paged, window):
    """attention_forward_simt_kernel as compiled (its embedded PTX, thread by thread in
    tools/ptx_run.py), the kernel of prefill-shaped calls on a paged cache in fp32: 5-token pages,
    head_dim 40 (lanes past it idle), causal with and without a sliding window."""
    signature = f"attention_forward_simt_kernel<{CUDA_TYPE_NAMES[dtype]}, {str(paged).lower()}>"
    _prompt_in_ptx(("attention_simt", signature), dtype, paged, window, d=40, block=5, grid_m=4, threads=128)


@emulation_only_on_cpu
@pytest.mark.parametrize("dtype,paged,tile,d", [
    (torch.float16, False, 2, 64), (torch.bfloat16, True, 2, 64), (torch.bfloat16, False, 5, 128),
    (torch.float16, True, 5, 128), (torch.bfloat16, True, 3, 80), (torch.float16, True, 7, 256)],
    ids=["fp16-contiguous-d64-q-in-registers", "bf16-paged17-d64-q-in-registers", "bf16-contiguous-d128-q-in-smem",
         "fp16-paged17-d128-q-in-smem", "bf16-paged17-d80-8-warps", "fp16-paged17-d256-64-rows"])
def test_tensor_core_prompt_kernel_in_ptx_matches_float64(dtype, paged, tile, d):
    """attention_forward_tc_kernel as compiled (mma and ldmatrix in tools/ptx_run.py), the kernel of
    prefill-shaped calls in fp16 / bf16, contiguous and over 17-token pages (which straddle its
    32-key tiles), at four of attention_fwd.cu's kFwdTiles: d = 64 (128 x 32, Q in registers),
    d = 80 (8 warps), d = 128 (Q from shared memory) and d = 256 (64 x 32), 20 query rows over 45
    and 70 keys (2 and 3 key tiles, the last partial), causal, and windowed on the paged cache."""
    block_m, block_n, warps = {2: (128, 32, 4), 3: (128, 32, 8), 5: (128, 32, 4), 7: (64, 32, 4)}[tile]  # kFwdTiles
    signature = f"attention_forward_tc_kernel<{CUDA_TYPE_NAMES[dtype]}, {d}, {tile}, {str(paged).lower()}>"
    smem = (block_m + 4 * block_n) * (d + 8) * 2
    _prompt_in_ptx(("attention_fwd", signature), dtype, paged, 6 if paged else -1, d=d, block=17, grid_m=block_m,
                   threads=32 * warps, smem=smem, seq_q=20, lengths=(45, 70))


# ---- the decode kernels' own PTX, run on the CPU (tools/ptx_run.py) --------------------------------
# The host side of kvcache_attention.cu for the interpreter: KVCacheKernelParams (checked against the
# kernels' parameter size), FastDivisor (common_math.h), and the launcher's grids and the attend
# kernel's shared memory (TcTiling::kSmemBytes).

class _FastDivisor(ctypes.Structure):
    _fields_ = [("d", ctypes.c_uint32), ("magic", ctypes.c_uint32), ("shift", ctypes.c_uint32)]

    @classmethod
    def of(cls, d):
        shift = max(0, (d - 1).bit_length())
        return cls(d, ((1 << (32 + shift)) // d - (1 << 32) + 1) & 0xFFFFFFFF, shift)


_I64x3 = ctypes.c_int64 * 3


class _KVCacheKernelParams(ctypes.Structure):
    _fields_ = [("q", ctypes.c_uint64), ("q_stride", _I64x3), ("k_cache", ctypes.c_uint64),
                ("v_cache", ctypes.c_uint64), ("k_stride", _I64x3), ("v_stride", _I64x3)] + [
        (name, ctypes.c_int32) for name in ("k_token_bytes", "v_token_bytes", "k_block_bytes", "v_block_bytes")] + [
        ("k_new", ctypes.c_uint64), ("v_new", ctypes.c_uint64), ("kn_stride", _I64x3), ("vn_stride", _I64x3),
        ("seqlens", ctypes.c_uint64), ("block_table", ctypes.c_uint64), ("bt_stride", ctypes.c_int64 * 2),
        ("bt_entry_stride", ctypes.c_int32), ("block_size", _FastDivisor), ("num_blocks", ctypes.c_int32),
        ("capacity", ctypes.c_int32), ("cos", ctypes.c_uint64), ("sin", ctypes.c_uint64),
        ("cos_stride", ctypes.c_int64), ("sin_stride", ctypes.c_int64), ("rotary_half", ctypes.c_int32),
        ("rotary_positions", ctypes.c_int32), ("interleaved", ctypes.c_bool), ("out", ctypes.c_uint64),
        ("lse", ctypes.c_uint64), ("partial_out", ctypes.c_uint64), ("partial_lse", ctypes.c_uint64)] + [
        (name, ctypes.c_int32) for name in ("batch", "seq_q", "seq_new", "n_q_heads", "n_kv_heads", "head_dim",
                                            "group", "rows", "row_tiles", "splits", "window_left", "window_right")] + [
        ("scale", ctypes.c_float), ("softcap", ctypes.c_float)]


def _kvcache_kernel_params(mem, q, k_cache, v_cache, seqlens, k, v, block_table, rotary=None):
    """kvcache_attention_cuda's KVCacheKernelParams over device copies in `mem`, without out/lse."""
    p = _KVCacheKernelParams()
    p.q, p.k_cache, p.v_cache = mem.upload(q, "q"), mem.upload(k_cache, "k_cache"), mem.upload(v_cache, "v_cache")
    p.q_stride[:], p.k_stride[:], p.v_stride[:] = q.stride()[:3], k_cache.stride()[:3], v_cache.stride()[:3]
    elem = k_cache.element_size()
    p.k_token_bytes = k_cache.stride(1) * elem if k_cache.shape[1] > 1 else 0
    p.v_token_bytes = v_cache.stride(1) * elem if v_cache.shape[1] > 1 else 0
    if k is not None:
        p.k_new, p.v_new = mem.upload(k, "k"), mem.upload(v, "v")
        p.kn_stride[:], p.vn_stride[:], p.seq_new = k.stride()[:3], v.stride()[:3], k.shape[1]
    p.seqlens = mem.upload(seqlens, "cache_seqlens")
    batch, seq_q, n_q_heads, d = q.shape
    if block_table is not None:
        p.k_block_bytes = k_cache.stride(0) * elem if k_cache.shape[0] > 1 else 0
        p.v_block_bytes = v_cache.stride(0) * elem if v_cache.shape[0] > 1 else 0
        p.block_table = mem.upload(block_table, "block_table")
        p.bt_stride[:] = block_table.stride()
        p.bt_entry_stride = 0 if block_table.shape[1] <= 1 else block_table.stride(1)
        p.num_blocks, p.capacity = k_cache.shape[0], block_table.shape[1] * k_cache.shape[1]
    else:
        p.num_blocks, p.capacity = batch, k_cache.shape[1]
    p.block_size = _FastDivisor.of(max(k_cache.shape[1], 1))
    if rotary is not None:
        cos, sin = rotary
        p.cos, p.sin = mem.upload(cos, "rotary_cos"), mem.upload(sin, "rotary_sin")
        p.cos_stride, p.sin_stride = cos.stride(0), sin.stride(0)
        p.rotary_half, p.rotary_positions = cos.shape[1], cos.shape[0]
    p.batch, p.seq_q, p.n_q_heads, p.n_kv_heads, p.head_dim = batch, seq_q, n_q_heads, k_cache.shape[2], d
    p.group = n_q_heads // k_cache.shape[2]
    p.rows = p.group * seq_q
    p.row_tiles = -(-p.rows // (8 if q.dtype == torch.float32 else 16))  # kRows, kTcRows
    p.window_left, p.window_right = -1, 0
    p.scale = d**-0.5
    return p


def _tc_smem_bytes(d, stage_budget):
    """TcTiling<T, d, stage_budget>::kSmemBytes (fp16 / bf16)."""
    pitch, warps_k = d + 8, 4 // (2 if d > 128 else 1)
    tile = 16 * warps_k * pitch
    stages = min(max(stage_budget // (2 * tile * 2), 2), 4)
    return (16 * pitch + 2 * stages * tile) * 2


def _decode_in_ptx(q, k_cache, v_cache, seqlens, k, v, block_table, rotary, splits, stage_budget):
    """append_kernel, attend_tc_kernel<T, d, stage_budget> (fp32: attend_simt_kernel<float, d>) on
    `splits` key splits and (splits > 1) combine_kernel, as the launcher runs them: (out, lse,
    k_cache', v_cache')."""
    T, d = CUDA_TYPE_NAMES[q.dtype], q.shape[3]
    simt = q.dtype == torch.float32
    attend_signature = f"attend_simt_kernel<float, {d}>(" if simt else f"attend_tc_kernel<{T}, {d}, {stage_budget}>("
    run, attend = ptx_kernel("kvcache_attention", attend_signature)
    mem = run.DeviceMemory()
    p = _kvcache_kernel_params(mem, q, k_cache, v_cache, seqlens, k, v, block_table, rotary)
    batch, seq_q, n_q_heads, _ = q.shape
    rows_total = batch * n_q_heads * seq_q
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, n_q_heads, seq_q), float("nan"))
    p.out, p.lse, p.splits = mem.upload(out, "out"), mem.upload(lse, "lse"), splits
    if splits > 1:
        p.partial_out = mem.upload(torch.full((splits, rows_total, d), float("nan")), "partial_out")
        p.partial_lse = mem.upload(torch.full((splits, rows_total), float("nan")), "partial_lse")
    assert ctypes.sizeof(p) == attend.kernel.params[0].size
    # As on sm_90 (launch overlap): the attend kernel is a dependent launch of the append and the
    # combine of the attend, each CTA up to its griddepcontrol.wait before its prior grid runs.
    append_runs = k is not None
    attend_run = attend.launch(mem, [bytes(p)], grid=(splits, p.n_kv_heads * p.row_tiles, batch), block=(128,),
                               dynamic_shared=0 if simt else _tc_smem_bytes(d, stage_budget), dependent=append_runs)
    if splits > 1:
        _, combine = ptx_kernel("kvcache_attention", f"combine_kernel<{T}>(")
        combine_run = combine.launch(mem, [bytes(p)], grid=(rows_total,), block=(128,), dependent=True)
    if append_runs:
        _, append = ptx_kernel("kvcache_attention", f"append_kernel<{T}>(")
        append.launch(mem, [bytes(p)], grid=(batch * k.shape[1], k_cache.shape[2]), block=(128,))
    attend_run.resume()
    if splits > 1:
        combine_run.resume()
    return (mem.download(p.out, out), mem.download(p.lse, lse), mem.download(p.k_cache, k_cache),
            mem.download(p.v_cache, v_cache))


@emulation_only_on_cpu
@pytest.mark.parametrize("dtype,d,stage_budget,paged,splits,rotary", [
    (torch.bfloat16, 64, 73728, True, 3, False),
    (torch.float16, 64, 73728, False, 1, True),
    (torch.bfloat16, 128, 110592, True, 2, True),   # the deep ring: three 64-key stages
    (torch.bfloat16, 128, 73728, False, 2, False),  # its ring of two
    (torch.float16, 80, 73728, False, 2, True),     # rows of 10 chunks: no column per thread
    (torch.bfloat16, 256, 73728, True, 1, False),   # two warps per key slice, splitting O
    (torch.float32, 64, None, True, 2, True),       # the CUDA-core attend kernel
], ids=["bf16-d64-paged16-3splits", "fp16-d64-contiguous-rotary", "bf16-d128-deep-ring-paged16",
        "bf16-d128-ring-of-two", "fp16-d80-contiguous-rotary", "bf16-d256-paged16", "fp32-d64-paged16-simt-rotary"])
def test_decode_kernels_in_ptx_match_float64(dtype, d, stage_budget, paged, splits, rotary):
    """The decode step's kernels as compiled (their embedded PTX, thread by thread in
    tools/ptx_run.py, mma and ldmatrix as the PTX ISA defines them): the append of a new token
    (rotated with rotary tables), the tensor-core attend kernel (and fp32's CUDA-core one) over 38
    and 71 keys (a partial last tile) split 1 to 3 ways, paged (16-token pages in shuffled order, -1 past each
    sequence's pages) and contiguous, and the combine; out, lse and the written cache slots
    against float64, the other slots untouched. Launched as on sm_90: each kernel's CTAs run up to
    their griddepcontrol.wait before the kernel they depend on runs, and the new token's cache
    slots hold NaN until the append writes them."""
    batch, heads = 2, (8, 2)
    seqlens = torch.tensor([37, 70], dtype=torch.int32)
    q = torch.randn(batch, 1, heads[0], d).to(dtype)
    k, v = (torch.randn(batch, 1, heads[1], d).to(dtype) for _ in range(2))
    if paged:
        table = torch.full((batch, 6), -1, dtype=torch.int32)
        order = torch.randperm(12).to(torch.int32)
        table[0, :3], table[1, :5] = order[:3], order[3:8]
        k_cache, v_cache = (torch.randn(12, 16, heads[1], d).to(dtype) for _ in range(2))
    else:
        table = None
        k_cache, v_cache = (torch.randn(batch, 80, heads[1], d).to(dtype) for _ in range(2))
    for b, start in enumerate(seqlens.tolist()):  # the appended token's slots: NaN until the append
        slot = (table[b, start // 16], start % 16) if paged else (b, start)
        k_cache[slot], v_cache[slot] = float("nan"), float("nan")
    tables = llama_ext.rope_cos_sin(d, 96) if rotary else None
    out, lse, k_after, v_after = _decode_in_ptx(q, k_cache, v_cache, seqlens, k, v, table, tables, splits,
                                                stage_budget)
    ref_out, ref_lse, ref_k, ref_v = gqa_attention_with_kvcache_reference(
        q, k_cache, v_cache, seqlens, k, v, table, rotary_cos=tables and tables[0], rotary_sin=tables and tables[1])
    assert_close(k_after, ref_k, dtype)  # rotated in fp32 against float64: an ulp apart at most
    assert torch.equal(v_after, ref_v)
    assert_close(out, ref_out, dtype, scale=2.0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-4)


@emulation_only_on_cpu
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged4"])
def test_key_lengths_kernel_in_ptx(paged):
    """key_lengths_kernel as compiled (the prefill route's lengths, read on the device): each
    sequence's cache_seqlens + seq_new, and on a paged cache 0 after a device-side assert for the
    sequence whose pages name a block outside the cache."""
    batch, d = 3, 32
    seqlens = torch.tensor([3, 0, 9], dtype=torch.int32)
    q = torch.randn(batch, 2, 2, d, dtype=torch.bfloat16)
    k = torch.randn(batch, 2, 1, d, dtype=torch.bfloat16)
    if paged:
        table = torch.tensor([[0, 5, -1], [1, -1, -1], [2, 3, 7]], dtype=torch.int32)  # block 7: outside
        k_cache = torch.randn(6, 4, 1, d, dtype=torch.bfloat16)
    else:
        table, k_cache = None, torch.randn(batch, 12, 1, d, dtype=torch.bfloat16)
    run, program = ptx_kernel("kvcache_attention", "key_lengths_kernel(")
    mem = run.DeviceMemory()
    p = _kvcache_kernel_params(mem, q, k_cache, k_cache, seqlens, k, k, table)
    lengths = mem.upload(torch.full((batch,), -7, dtype=torch.int32), "lengths")
    assert ctypes.sizeof(p) == program.kernel.params[0].size
    launch = program.launch(mem, [bytes(p), lengths], grid=(batch,), block=(128,), record_asserts=True)
    got = mem.download(lengths, torch.zeros(batch, dtype=torch.int32)).tolist()
    if paged:
        assert got == [5, 2, 0] and len(launch.asserts) == 1 and "CTA (2, 0, 0)" in launch.asserts[0]
    else:
        assert got == [5, 2, 11] and launch.asserts == []


@emulation_only_on_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_rotate_q_kernel_in_ptx(dtype, interleaved):
    """rotate_q_kernel as compiled (the prefill route's rotated copy of q): each query token at
    cache_seqlens[b] + i, a partial rotary dim (pass-through dims copied), strided q, and 0 for a
    position past the table after a device-side assert."""
    batch, seq_q, heads, d = 2, 3, (3, 1), 40
    q = torch.randn(batch, seq_q, heads[0], d + 8).to(dtype)[..., :d]
    seqlens = torch.tensor([5, 13], dtype=torch.int32)  # sequence 1's last token: position 15, past the table
    cos, sin = llama_ext.rope_cos_sin(24, 15)
    k_cache = torch.zeros(batch, 16, heads[1], d, dtype=dtype)
    k = torch.zeros(batch, seq_q, heads[1], d, dtype=dtype)
    run, program = ptx_kernel("kvcache_attention", f"rotate_q_kernel<{CUDA_TYPE_NAMES[dtype]}>(")
    mem = run.DeviceMemory()
    p = _kvcache_kernel_params(mem, q, k_cache, k_cache, seqlens, k, k, None, (cos, sin))
    p.interleaved = interleaved
    q_rot = torch.full((batch, seq_q, heads[0], d), float("nan"), dtype=dtype)
    address = mem.upload(q_rot, "q_rot")
    launch = program.launch(mem, [bytes(p), address], grid=(batch * seq_q,), block=(128,), record_asserts=True)
    got = mem.download(address, q_rot)
    positions = seqlens[:, None].long() + torch.arange(seq_q)
    inside = positions < cos.shape[0]
    expected = rotary_reference(q, cos, sin, positions.clamp(max=cos.shape[0] - 1), interleaved)
    assert_close(got[inside], expected[inside], dtype)
    assert torch.equal(got[~inside], torch.zeros_like(got[~inside]))
    assert launch.asserts and all("CTA (5, 0, 0)" in where for where in launch.asserts)  # that token's alone
