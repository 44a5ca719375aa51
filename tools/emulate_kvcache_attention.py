"""Lane-level numpy emulation of the tensor-core decode kernel of gqa_attention_with_kvcache.

What: a transcription, step by step and lane by lane, of `attend_tc_kernel<T, D, kStageBudget>`
(float16 / bfloat16, tensor cores; at d = 128 both rings) in csrc/cuda/kvcache_attention.cu, with
what it needs around it: the host's parameter set-up and grid, `append_kernel` (new tokens
written into the cache, k rotated), `stage_query_rows` / `rotated` / `visible_keys` /
`split_range` / `cache_block` / `store_result`, `combine_kernel` (splits > 1), and
`choose_splits` (host split count, given an SM count and an occupancy). The warp-level helpers
of csrc/cuda/mma.cuh (load_a, load_b_pair_nk, load_b_pair_kn, load_b_kn, pack_a_from_acc,
warp_gemm_nk, warp_gemm_kn) run on an emulation of the PTX
instructions (ldmatrix .x1/.x2/.x4 with and without .trans, mma.sync.m16n8k16 with fp32
accumulation, cp.async with commit/wait groups) written from the PTX ISA's fragment layouts, not
from mma.cuh's comments.

Prefill-shaped calls on a contiguous cache (kPrefillRouteMinSeqQ or more query tokens) leave
these kernels for the prefill kernels, whose emulation (tools/emulate_attention_fwd.py) runs a
case over KV caches with per-sequence key_lengths; the cases here stay below that.

As of: the kernel as committed with this file. When attend_tc_kernel, combine_kernel, the
append or the split choice change, transcribe the change here; tests/test_kvcache_attention.py
runs this emulation (test_tensor_core_kernel_emulation).

Shared memory is one flat float64 array of 2-byte slots per CTA (q_s, the K/V stage ring, and the
fp32 merge buffer overlaid on the ring, one float taking two slots), initialised to NaN, with
hazard tracking: a read of a slot never written, of a slot whose cp.async is still in flight,
or a read/write of a slot another thread wrote (or read, for a write) since the last
__syncthreads raises `Race`. Global memory is flat numpy arrays addressed with the kernel's own
strides; every global index is bounds-checked, cache slots past each sequence's length and unused
blocks hold NaN, and block-table entries past a sequence's blocks hold an out-of-range id (a
device-side assert in the emulation), so a read past a sequence fails loudly or shows as NaN.

Three arithmetic modes, each compared with a float64 reference computed from the same T-valued
inputs (q and the appended k rotated and rounded to T, as the kernel's round_to<T> /
from_float<T> do: in float64 for the exact mode; in fp32 as the kernel rotates for the other two,
rotate_as_kernel). The float64 reference is cross-checked against llama_ext/reference.py's, whose
rotated values torch rounds to T through fp32 (rotate_as_torch):
  exact : float64 everywhere; only the kernel's roundings of what it *stores* in T (q_s, the
          appended cache rows) kept; P and out not rounded. Must match to ~1e-13 (observed
          <= 1e-15): any index, fragment, mask, split, ring or merge error shows.
  fp32  : fp32 registers (numpy float32 after every operation; an mma = exact products summed in
          float64 and rounded once to fp32), P and out not rounded: the fp32 path, to 1e-5.
  kernel: as fp32, plus P rounded to T (RNE, pack2) as the PV A fragment and out rounded to T
          (from_float): what the GPU computes, to T's rounding: |err| <= 1.5 u_T (sum_j p_j |v_j|
          + |out|) + 1e-5, u_T = 2^-8 (bf16) or 2^-11 (fp16).
check_mutants() re-runs small cases with one injected kernel bug at a time (MUT hooks) and
checks each is caught: missing zero-fill, wrong ring stage, too shallow cp.async wait, missing
merge barrier, dropped window-start mask, top-left causal alignment, swapped ldmatrix matrices,
wrong P fragment packing, missing rescale of O, block-table entries not fetched ahead (a tile
copied through the previous tile's blocks), K/V copies issued before wait_for_prior_kernel()
(which, run ahead of the append, read the new tokens' slots before they are written), the
padding half's skip applied to tiles of more than 8 rows, O's rescale voted on by lane 0 alone,
a zero-filled chunk addressed at its own row or block entry (outside the cache) rather than
at the tile's first row or block 0, Q K^T's second chain reading K's first half of d, a chunk
past the split loading its own key's block-table entry (past the table row) rather than the
tile's first key's.

Run: .venv/bin/python tools/emulate_kvcache_attention.py [case-name-substring ...]
(no argument: every case in every mode, then the mutants; ~20 s on one core), or
.venv/bin/python tools/emulate_kvcache_attention.py --random COUNT [SEED] (random_cases: COUNT
random shapes, each at three split counts in every mode; ~1 s a case)
(numpy only; torch, if importable, cross-checks this file's float64 reference against
llama_ext/reference.py's on every case).
"""
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptx_emu  # noqa: E402
from ptx_emu import (C_COL, C_ROW, DeviceAssert, GID, LANES, MUT, Race, Smem, TIG, gload, gstore, ldmatrix, load_a,
                     load_b_kn, load_b_pair_kn, load_b_pair_nk, mma_m16n8k16, pack_a_from_acc, rnd, warp_gemm_kn,
                     warp_gemm_nk)

# The kernel sources this file transcribes, and their digest when it was last brought in step
# (ptx_emu.sources_digest): the tests fail when one changes, until the change is transcribed here.
TRANSCRIBED = (
    'csrc/cuda/kvcache_attention.cu',
    'csrc/cuda/common.cuh',  # rotary_y1, rotary_y2
    'csrc/cuda/mma.cuh',
    'csrc/common_math.h',  # max_keep_nan
)
TRANSCRIBED_DIGEST = '47bf519a8956a334'


# ---- kernel parameters, global memory ----------------------------------------------------------
class Params:
    """KVCacheKernelParams. Pointers are (flat numpy array, element offset)."""
    pass


class FastDivisor:
    """common_math.h's FastDivisor: n / d as (mulhi(magic, n) + n) >> shift in uint32 arithmetic
    (vectorised over n)."""

    def __init__(self, d):
        self.d, self.shift = d, 0
        while (1 << self.shift) < d:
            self.shift += 1
        self.magic = (1 << (32 + self.shift)) // d - (1 << 32) + 1
        assert 0 < self.magic < 1 << 32

    def div(self, n):
        n = np.asarray(n, np.int64)
        assert ((n >= 0) & (n < 1 << 31)).all(), 'FastDivisor takes 0 <= n < 2^31'
        mulhi = (n.astype(np.uint64) * np.uint64(self.magic)) >> np.uint64(32)
        total = (mulhi + n.astype(np.uint64)) & np.uint64(0xffffffff)  # the uint32 sum (no wrap: n < 2^31)
        return (total >> np.uint64(self.shift)).astype(np.int64)

    def mod(self, n):
        return np.asarray(n, np.int64) - self.div(n) * self.d


def length_ok(p, b):
    start = int(gload(p.seqlens, b))
    ok = start >= 0 and start + p.seq_new <= p.capacity
    if not ok:
        raise DeviceAssert('cache_seqlens + seq_new exceeds the cache capacity')
    return ok


def block_entry(p, b, j):
    """Vectorised over j (only j of keys the kernel asks for): the entry as stored, unchecked."""
    j = np.asarray(j, np.int64)
    if p.block_table is None:
        return np.full(j.shape, b, np.int64)
    return gload(p.block_table, b * p.bt_stride[0] + p.block_size.div(j) * p.bt_stride[1]).astype(np.int64)


def block_in_cache(p, entry):
    return (entry >= 0) & (entry < p.num_blocks)


def assert_blocks_in_cache(ok):
    if not ok:
        raise DeviceAssert('block_table entry outside the cache')


def checked_block(p, entry):
    if p.block_table is None:
        return entry
    ok = block_in_cache(p, entry)
    assert_blocks_in_cache(ok.all())
    return np.where(ok, entry, -1)


def cache_block(p, b, j):
    return checked_block(p, block_entry(p, b, j))


def position_ok(p, pos):
    if not (0 <= pos < p.rotary_positions):
        raise DeviceAssert('position outside the rotary table')
    return True


def fma(a, b, c, ft):
    """fmaf(a, b, c) in float32: the float64 product of two floats is exact, and the float64 sum
    is exact too unless the exponents are over 29 bits apart; then one rounding to float32. In
    float64 (exact mode) plain arithmetic."""
    if ft == np.float32:
        return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)
    return a * b + c


def rotary_pair(p, e):
    """rotary_pair(), vectorised over e: (rotated, pair index i, partner, first) as RotaryPair's
    fields; an unpaired e (past the rotary dims) gets i = 0, itself as partner, first."""
    e = np.asarray(e, np.int64)
    half = p.rotary_half
    if p.interleaved:
        i, first = e // 2, e % 2 == 0
        partner = np.where(first, e + 1, e - 1)
    else:
        first = e < half
        i = np.where(first, e, e - half)
        partner = np.where(first, e + half, e - half)
    rot = e < 2 * half
    return rot, np.where(rot, i, 0), np.where(rot, partner, e), np.where(rot, first, True)


def rotate_element(p, pair, xe, xp, pos, ft):
    """rotate_element(): elements paired as `pair` (rotary_pair's) from themselves (xe) and their
    partners (xp) by the table row at pos; fp32 math (ft), rounded as rotary_y1 / rotary_y2
    (common.cuh): one rounded product, one fused multiply-add. Unpaired elements pass through."""
    rot, i, _, first = pair
    c = gload(p.cos, pos * p.cos_stride + i).astype(ft)
    s = gload(p.sin, pos * p.sin_stride + i).astype(ft)
    xe, xp = xe.astype(ft), xp.astype(ft)
    r = np.where(first, fma(xe, c, -(xp * s), ft), fma(xe, c, xp * s, ft))
    return np.where(rot, r, xe)


def rotated(p, xptr, e, pos, ft):
    """rotated(): element(s) e of the row at xptr rotated at pos."""
    pair = rotary_pair(p, e)
    return rotate_element(p, pair, gload(xptr, e), gload(xptr, pair[2]), pos, ft)


def append_kernel(p, ft):
    """append_kernel: one CTA per (new token, kv head), threads over head_dim; the new k/v
    elements (and k's rotary partners) loaded before the position is read, k rotated before its
    slot is looked up, every load before the first store."""
    for token in range(p.batch * p.seq_new):
        b, i = token // p.seq_new, token % p.seq_new
        for h in range(p.n_kv_heads):
            e = np.arange(p.head_dim)
            k_row = (p.k_new[0], p.k_new[1] + b * p.kn_stride[0] + i * p.kn_stride[1] + h * p.kn_stride[2])
            v_row = b * p.vn_stride[0] + i * p.vn_stride[1] + h * p.vn_stride[2]
            pair = rotary_pair(p, e)  # without tables (rotary_half 0) no element is rotated
            k_raw, v_val = gload(k_row, e), gload(p.v_new, v_row + e)
            k_partner = gload(k_row, pair[2])
            if not length_ok(p, b):
                break  # the CTA returns
            pos = int(gload(p.seqlens, b)) + i
            if p.cos is not None and not position_ok(p, pos):
                break
            k_out = rnd(rotate_element(p, pair, k_raw, k_partner, pos, ft), p.T) if p.cos is not None else k_raw
            blk = int(cache_block(p, b, pos))
            if blk < 0:
                break
            off = int(p.block_size.mod(pos))
            gstore(p.k_cache, blk * p.k_stride[0] + off * p.k_stride[1] + h * p.k_stride[2] + e, k_out)
            gstore(p.v_cache, blk * p.v_stride[0] + off * p.v_stride[1] + h * p.v_stride[2] + e, v_val)


def query_element(p, b, kvh, row, e, valid_len, ft):
    """Vectorised over (row, e): the query element as stage_query_rows gives it (before from_float)."""
    row, e = np.broadcast_arrays(np.asarray(row, np.int64), np.asarray(e, np.int64))
    h, i = kvh * p.group + row // p.seq_q, row % p.seq_q
    src = b * p.q_stride[0] + i * p.q_stride[1] + h * p.q_stride[2]
    if p.cos is not None and valid_len:
        out = np.empty(row.shape)
        for ii in np.unique(i):
            pos = int(gload(p.seqlens, b)) + int(ii)
            sel = i == ii
            if not position_ok(p, pos):
                out[sel] = 0.0
                continue
            for ss in np.unique(src[sel]):  # one query row (one head) at a time
                s2 = sel & (src == ss)
                out[s2] = rnd(rotated(p, (p.q[0], p.q[1] + ss), e[s2], pos, ft), p.T)  # round_to<T>
        return out
    return gload(p.q, src + e)


def stage_query_rows(p, b, kvh, row0, nrows, valid_len, ft, rows, threads, D):
    """stage_query_rows(): (r, e, thread, value) for every element of a tile of `rows` query rows.
    Thread t takes a run of D / (threads / rows) consecutive elements of tile row t / (threads /
    rows); rows past nrows are 0."""
    runs_per_row = threads // rows
    run = D // runs_per_row
    assert threads % rows == 0 and D % runs_per_row == 0
    t = np.arange(rows * D)
    r, e = t // D, t % D
    value = np.zeros(t.shape)
    live = r < nrows
    value[live] = query_element(p, b, kvh, row0 + r[live], e[live], valid_len, ft)
    return r, e, r * runs_per_row + e // run, value


def visible_keys(p, row, L):
    row = np.asarray(row, np.int64)
    pos = row % p.seq_q + L - p.seq_q
    if 'top_left' in MUT:
        pos = row % p.seq_q
    row_lo = np.maximum(0, pos - p.window_left) if p.window_left >= 0 else np.zeros_like(pos)
    row_hi = np.minimum(L, pos + p.window_right + 1) if p.window_right >= 0 else np.full_like(pos, L)
    any_ = row_hi > row_lo
    return np.where(any_, row_lo, 0), np.where(any_, row_hi, 0)


def split_range(p, split, tile_lo, tile_hi, align):
    if tile_hi <= tile_lo:
        return 0, 0
    base = tile_lo // align * align
    span = tile_hi - base
    chunk = ((span + p.splits - 1) // p.splits + align - 1) // align * align
    j_begin = min(tile_hi, base + split * chunk)
    j_end = min(tile_hi, j_begin + chunk)
    return j_begin, j_end


def max_keep_nan(a, b):
    """common_math.h's max_keep_nan: a NaN in either operand wins (np.fmax would drop it)."""
    return np.where(np.isnan(a) | (a > b), a, b)


def store_result(p, b, kvh, row, split, e, acc, row_max, row_sum, c):
    """Vectorised over (row, e). c: the arithmetic constants (ft, ln2, rounding)."""
    ft = c['ft']
    h, i = kvh * p.group + row // p.seq_q, row % p.seq_q
    out_row = (b * p.seq_q + i) * p.n_q_heads + h
    lse_idx = (b * p.n_q_heads + h) * p.seq_q + i
    any_ = row_sum != 0  # NaN too
    with np.errstate(invalid='ignore', divide='ignore'):
        o = np.where(any_, (acc / np.where(any_, row_sum, 1)).astype(ft), ft(0))
        lse = np.where(any_, ((row_max + np.log2(np.where(any_, row_sum, 1)).astype(ft)) * c['ln2']).astype(ft),
                       ft(0) if p.splits == 1 else ft(-np.inf))
    e0 = e == 0
    if p.splits == 1:
        gstore(p.out, out_row * p.head_dim + e, rnd(o, p.T) if c['round'] else o, p.out_count)
        gstore(p.lse, lse_idx[e0], lse[e0], p.lse_count)
    else:
        rows_total = p.batch * p.n_q_heads * p.seq_q
        gstore(p.partial_out, (split * rows_total + lse_idx) * p.head_dim + e, o, p.pout_count)
        gstore(p.partial_lse, split * rows_total + lse_idx[e0], lse[e0], p.plse_count)


# ---- 2b. attend on tensor cores ------------------------------------------------------------------
kTcRows, kTcThreads, kTcStageBudget = 16, 128, 72 * 1024
kDeepRingHeadDim, kTcDeepStageBudget = 128, 108 * 1024


class TcTiling:
    def __init__(self, D, sizeof_T=2, stage_budget=kTcStageBudget):
        self.kWarps = kTcThreads // 32
        self.kWarpsN = 2 if D > 128 else 1
        self.kWarpsK = self.kWarps // self.kWarpsN
        self.kKeys = 16 * self.kWarpsK
        self.kPitch = D + 8  # attention::smem_pitch<D>()
        self.kTileElems = self.kKeys * self.kPitch
        self.kStageBytes = 2 * self.kTileElems * sizeof_T
        self.kStages = min(max(stage_budget // self.kStageBytes, 2), 4)
        self.kOCols = D // self.kWarpsN
        self.kONTiles = self.kOCols // 8
        self.kVec = 16 // sizeof_T
        self.kChunksPerRow = D // self.kVec
        self.kChunksPerThread = self.kKeys * self.kChunksPerRow // kTcThreads
        self.kSmemBytes = (kTcRows * self.kPitch + 2 * self.kStages * self.kTileElems) * sizeof_T
        assert self.kKeys * self.kChunksPerRow % kTcThreads == 0
        assert self.kONTiles % 2 == 0 and D % 16 == 0
        assert self.kWarpsK * kTcRows * D * 4 <= 2 * self.kStages * self.kTileElems * sizeof_T


def attend_tc_cta(p, D, blockIdx, c):
    """One CTA of attend_tc_kernel<T, D>; warps run one after another between barriers, lanes
    as 32-wide vectors. A generator: it yields once, at wait_for_prior_kernel() (the launcher runs
    every CTA's work before the wait ahead of the append, the earliest a programmatic dependent
    launch may run it)."""
    Tl = TcTiling(D, stage_budget=p.stage_budget)
    ft = c['ft']
    P, KEYS, S, WK = Tl.kPitch, Tl.kKeys, Tl.kStages, Tl.kWarpsK
    sm = Smem(Tl.kSmemBytes // 2, 'smem_raw')  # 2-byte slots
    q_s = 0
    k_s = q_s + kTcRows * P
    v_s = k_s + S * Tl.kTileElems
    o_merge = k_s  # float f lives in slots k_s + 2f, k_s + 2f + 1
    m_s, l_s = Smem(WK * kTcRows, 'm_s'), Smem(WK * kTcRows, 'l_s')
    row_max_s, row_sum_s = Smem(kTcRows, 'row_max_s'), Smem(kTcRows, 'row_sum_s')
    statics = [m_s, l_s, row_max_s, row_sum_s]

    def syncthreads():
        for x in [sm] + statics:
            x.barrier()

    def st_float(idx, vals, tid):  # a float store into the 2-byte-slot buffer
        idx = np.asarray(idx, np.int64)
        sm.write(np.stack([o_merge + 2 * idx, o_merge + 2 * idx + 1]), np.stack([vals, vals]), np.stack([tid, tid]))

    def ld_float(idx, tid):
        idx = np.asarray(idx, np.int64)
        v = sm.read(np.stack([o_merge + 2 * idx, o_merge + 2 * idx + 1]), np.stack([tid, tid]))
        assert np.array_equal(v[0], v[1], equal_nan=True)
        return v[0]

    split, by, b = blockIdx
    kvh, tile = by // p.row_tiles, by % p.row_tiles
    row0 = tile * kTcRows
    nrows = min(kTcRows, p.rows - row0)
    valid_len = length_ok(p, b)
    L = int(gload(p.seqlens, b)) + p.seq_new if valid_len else 0
    tid_all = np.arange(kTcThreads)
    g_all = (tid_all % 32) // 4

    # ---- stage: visible ranges.
    tile_lo, tile_hi = L, 0
    for rr in range(nrows):
        lo1, hi1 = visible_keys(p, row0 + rr, L)
        if hi1 > lo1:
            tile_lo, tile_hi = min(tile_lo, int(lo1)), max(tile_hi, int(hi1))
    lo, hi = np.zeros((2, kTcThreads), np.int64), np.zeros((2, kTcThreads), np.int64)
    for h in range(2):
        rows_h = g_all + 8 * h
        ok = rows_h < nrows
        vl, vh = visible_keys(p, row0 + rows_h, L)
        lo[h], hi[h] = np.where(ok, vl, 0), np.where(ok, vh, 0)
    j_begin, j_end = split_range(p, split, tile_lo, tile_hi, KEYS)
    n_tiles = (j_end - j_begin + KEYS - 1) // KEYS
    st = c['stats']  # coverage counters (not kernel state)
    st['tiles'] += n_tiles
    st['ring_wrap'] += n_tiles > S
    st['midtile_start'] += n_tiles > 0 and j_begin < tile_lo
    st['split_tail'] += n_tiles > 0 and j_end < j_begin + n_tiles * KEYS
    st['empty_split'] += n_tiles == 0 and tile_hi > tile_lo
    st['blind_rows'] += sum(int(a >= b_) for a, b_ in zip(*visible_keys(p, row0 + np.arange(nrows), L)))
    st['partial_row_tile'] += nrows < kTcRows
    st['second_row_tile'] += tile > 0

    # ---- stage: K/V tiles by cp.async, gathered through the block table, zero-filled past j_end.
    k_base = (p.k_cache[0], p.k_cache[1] + kvh * p.k_stride[2])
    v_base = (p.v_cache[0], p.v_cache[1] + kvh * p.v_stride[2])

    next_block = [None] * Tl.kChunksPerThread  # per chunk: (in split, entry) of the next tile issued
    contiguous = p.block_table is None
    blocks_ok = [True]  # asserted once, after the key loop

    def fetch_blocks(jt):
        if contiguous:
            return
        for i in range(Tl.kChunksPerThread):
            j = jt + (tid_all + i * kTcThreads) // Tl.kChunksPerRow
            inr = j < j_end if 'no_zero_fill' not in MUT else j >= 0  # every key of the tile read
            # A chunk past the split loads the entry of the tile's first key, unused.
            entry = block_entry(p, b, np.where(inr, j, jt) if 'unclamped_entry' not in MUT else j)
            next_block[i] = (inr, entry)

    def load_kv(stage, jt):  # paged: from next_block, fetched for jt
        k_dst = k_s + stage * Tl.kTileElems
        v_dst = v_s + stage * Tl.kTileElems
        for i in range(Tl.kChunksPerThread):
            cc = tid_all + i * kTcThreads
            rr, col = cc // Tl.kChunksPerRow, cc % Tl.kChunksPerRow * Tl.kVec
            j = jt + rr
            # A zero-filled chunk's address stays inside the cache: row jt (contiguous), block 0.
            if contiguous:  # row j of sequence b's cache
                ok = j < j_end if 'no_zero_fill' not in MUT else j >= 0
                row = np.where(ok, j, jt) if 'unclamped_fill' not in MUT else j
                k_off = b * p.k_stride[0] + row * p.k_stride[1] + col
                v_off = b * p.v_stride[0] + row * p.v_stride[1] + col
            else:
                inr, blk = next_block[i]
                ok = inr & block_in_cache(p, blk)
                blocks_ok[0] &= bool((ok | ~inr).all())
                block = np.where(ok, blk, 0) if 'unclamped_fill' not in MUT else blk
                off = np.where(ok, p.block_size.mod(j), 0)
                k_off = block * p.k_stride[0] + off * p.k_stride[1] + col
                v_off = block * p.v_stride[0] + off * p.v_stride[1] + col
            if (~ok).any():  # src_size 0 reads nothing, but the address is the cache's
                gload(k_base, k_off[~ok, None] + np.arange(Tl.kVec))
                gload(v_base, v_off[~ok, None] + np.arange(Tl.kVec))
            c['stats']['zero_filled_rows'] += int((~ok).sum())
            kv = np.zeros((kTcThreads, Tl.kVec)); vv = np.zeros((kTcThreads, Tl.kVec))
            el = np.arange(Tl.kVec)
            if ok.any():  # src_size 16: 16 bytes read; src_size 0: nothing read, zeros written
                kv[ok] = gload(k_base, k_off[ok, None] + el)
                vv[ok] = gload(v_base, v_off[ok, None] + el)
            sm.cp_async((k_dst + rr * P + col)[:, None] + el, kv, tid_all[:, None])
            sm.cp_async((v_dst + rr * P + col)[:, None] + el, vv, tid_all[:, None])

    # The append writes cache rows read from here on; the first tile's entries come before.
    if n_tiles > 0:
        fetch_blocks(j_begin)
    if 'kv_before_wait' not in MUT:
        yield  # wait_for_prior_kernel()
    for s_ in range(S - 1):
        if 0 < s_ < n_tiles:
            fetch_blocks(j_begin + s_ * KEYS)
        if s_ < n_tiles:
            load_kv(s_, j_begin + s_ * KEYS)
        sm.commit()
    if 'kv_before_wait' in MUT:
        yield  # the wait after the first copies: they may read rows before the append writes them
    if S - 1 < n_tiles:
        fetch_blocks(j_begin + (S - 1) * KEYS)

    # ---- stage: q rows (rotated, rounded to T) into shared memory, the first tiles in flight.
    r, e, thread, qv = stage_query_rows(p, b, kvh, row0, nrows, valid_len, ft, kTcRows, kTcThreads, D)
    sm.write(q_s + r * P + e, rnd(qv, p.T), thread)  # from_float<T>

    # ---- stage: the key loop.
    o = [np.zeros((Tl.kONTiles, 4, 32), ft) for _ in range(Tl.kWarps)]
    m = [np.full((2, 32), -np.inf, ft) for _ in range(Tl.kWarps)]
    l = [np.zeros((2, 32), ft) for _ in range(Tl.kWarps)]
    row_halves = 2 if nrows > 8 and 'one_half' not in MUT else 1
    for t in range(n_tiles):
        sm.wait(S - 2 if 'wait_depth' not in MUT else S - 1)
        syncthreads()
        if t + S - 1 < n_tiles:
            load_kv((t + S - 1) % S if 'ring_stage' not in MUT else t % S, j_begin + (t + S - 1) * KEYS)
            if t + S < n_tiles and 'stale_blocks' not in MUT:
                fetch_blocks(j_begin + (t + S) * KEYS)
        sm.commit()
        for warp in range(Tl.kWarps):
            wk, wn = warp // Tl.kWarpsN, warp % Tl.kWarpsN
            k_tile = k_s + (t % S) * Tl.kTileElems + wk * 16 * P
            v_tile = v_s + (t % S) * Tl.kTileElems + wk * 16 * P
            # Q K^T as two mma chains over the halves of d, summed.
            low = (D // 16 + 1) // 2
            s = np.zeros((2, 4, 32), ft)
            s_high = np.zeros((2, 4, 32), ft)
            warp_gemm_nk(sm, s, lambda kc: load_a(sm, q_s, P, 0, kc * 16, warp), k_tile, P, 0, low, 2, warp, ft)
            if D // 16 > low:
                warp_gemm_nk(sm, s_high, lambda kc: load_a(sm, q_s + 16 * low, P, 0, kc * 16, warp),
                             k_tile + 16 * low * ('high_chain_k' not in MUT), P, 0, D // 16 - low, 2, warp, ft)
            s = (s + s_high).astype(ft)
            key0 = j_begin + t * KEYS + wk * 16
            lo_w, hi_w = lo[:, warp * 32 + LANES], hi[:, warp * 32 + LANES]
            corr = [np.ones(32, ft), np.ones(32, ft)]
            for h in range(2):
                if h >= row_halves:  # rows g + 8 are padding: P = 0
                    for nt in range(2):
                        s[nt][2 * h] = s[nt][2 * h + 1] = 0
                    continue
                mx = np.full(32, -np.inf, ft)
                for nt in range(2):
                    for ci in range(2):
                        j = key0 + 8 * nt + 2 * TIG + ci
                        seen = (j < j_end) & (j >= lo_w[h]) & (j < hi_w[h])
                        if 'mask_lo' in MUT:
                            seen = (j < j_end) & (j < hi_w[h])
                        x = s[nt][2 * h + ci]
                        with np.errstate(invalid='ignore', over='ignore'):
                            xs = (x * p.scale).astype(ft)
                            if p.softcap > 0:
                                y = (xs / p.softcap).astype(ft)
                                em = np.expm1((ft(-2) * np.abs(y)).astype(ft)).astype(ft)  # precise_tanh
                                th = np.copysign((-em / (ft(2) + em)).astype(ft), y)
                                xs = (p.softcap * th).astype(ft)
                            xs = (xs * c['log2e']).astype(ft)
                        s[nt][2 * h + ci] = np.where(seen, xs, ft(-np.inf))
                        mx = max_keep_nan(mx, s[nt][2 * h + ci])
                mx = max_keep_nan(mx, mx[LANES ^ 1])  # __shfl_xor_sync(.., 1)
                mx = max_keep_nan(mx, mx[LANES ^ 2])
                m_new = max_keep_nan(m[warp][h], mx)
                m_use = np.where(m_new == -np.inf, ft(0), m_new)
                corr[h] = np.exp2((m[warp][h] - m_use).astype(ft)).astype(ft)
                m[warp][h] = m_new
                psum = np.zeros(32, ft)
                for nt in range(2):
                    for ci in range(2):
                        x = np.exp2((s[nt][2 * h + ci] - m_use).astype(ft)).astype(ft)
                        s[nt][2 * h + ci] = x
                        psum = (psum + x).astype(ft)
                l[warp][h] = (l[warp][h] * corr[h] + psum).astype(ft)
            rescale = bool(((corr[0] != 1) | (corr[1] != 1)).any())  # __any_sync
            if 'corr_first_lane' in MUT:  # the vote of lane 0 alone
                rescale = bool(corr[0][0] != 1 or corr[1][0] != 1)
            if rescale and 'no_corr' not in MUT:
                for h in range(2):
                    o[warp][:, 2 * h] = (o[warp][:, 2 * h] * corr[h]).astype(ft)
                    o[warp][:, 2 * h + 1] = (o[warp][:, 2 * h + 1] * corr[h]).astype(ft)
            warp_gemm_kn(sm, o[warp], lambda kc: pack_a_from_acc(s[2 * kc], s[2 * kc + 1], p.T, c['round']),
                         v_tile, P, wn * Tl.kOCols, 1, Tl.kONTiles, warp, ft)

    assert_blocks_in_cache(blocks_ok[0])

    # ---- stage: merge the key slices in warp order over the dead stages.
    sm.wait(0)
    syncthreads()
    for warp in range(Tl.kWarps):
        wk, wn = warp // Tl.kWarpsN, warp % Tl.kWarpsN
        tid = warp * 32 + LANES
        for h in range(2):
            lh = l[warp][h]
            lh = (lh + lh[LANES ^ 1]).astype(ft)
            lh = (lh + lh[LANES ^ 2]).astype(ft)
            l[warp][h] = lh
            if wn == 0:
                sel = TIG == 0
                m_s.write(wk * kTcRows + GID[sel] + 8 * h, m[warp][h][sel], tid[sel])
                l_s.write(wk * kTcRows + GID[sel] + 8 * h, lh[sel], tid[sel])
        o_w = wk * kTcRows * D
        for nt in range(Tl.kONTiles):
            col = wn * Tl.kOCols + 8 * nt + 2 * TIG
            for j in range(2):  # float2 store: 8-byte aligned
                assert ((o_w + GID * D + col) % 2 == 0).all()
                st_float(o_w + GID * D + col + j, o[warp][nt][j], tid)
                st_float(o_w + (GID + 8) * D + col + j, o[warp][nt][2 + j], tid)
    if 'merge_barrier' not in MUT:
        syncthreads()
    rr = np.arange(kTcRows)  # threads 0..15
    mx = np.full(kTcRows, -np.inf, ft); ssum = np.zeros(kTcRows, ft)
    for w in range(WK):
        mx = np.fmax(mx, m_s.read(w * kTcRows + rr, rr))
    for w in range(WK):
        mw = m_s.read(w * kTcRows + rr, rr)
        with np.errstate(invalid='ignore'):
            term = (l_s.read(w * kTcRows + rr, rr) * np.exp2((mw - mx).astype(ft)).astype(ft)).astype(ft)
        ssum = np.where(mw != -np.inf, (ssum + term).astype(ft), ssum)
    row_max_s.write(rr, mx, rr); row_sum_s.write(rr, ssum, rr)
    syncthreads()

    # ---- stage: write out/lse (one split) or this split's partial.
    t = np.arange(nrows * D)
    tid = t % kTcThreads
    r, e = t // D, t % D
    acc = np.zeros(t.shape, ft)
    rmax = row_max_s.read(r, tid).astype(ft)
    for w in range(WK):
        mw = m_s.read(w * kTcRows + r, tid).astype(ft)
        ow = ld_float((w * kTcRows + r) * D + e, tid).astype(ft)
        with np.errstate(invalid='ignore'):
            term = (np.exp2((mw - rmax).astype(ft)).astype(ft) * ow).astype(ft)
        acc = np.where(mw != -np.inf, (acc + term).astype(ft), acc)
    store_result(p, b, kvh, row0 + r, split, e, acc, rmax, row_sum_s.read(r, tid).astype(ft), c)


kThreads = 128  # the combine's CTA


def block_reduce(values, op, identity):
    """block_reduce<Op> (common.cuh) over a kThreads-thread CTA, thread t holding values[t] (the
    identity past them): each warp's xor butterfly, then one butterfly over the warps' results, the
    lanes past the warp count holding the identity. Butterfly partners combine the same two values
    (op is commutative), so every lane ends with lane 0's bits: lane 0's are returned."""
    x = list(values) + [np.full_like(values[0], identity)] * (kThreads - len(values))

    def butterfly(v):
        for off in (16, 8, 4, 2, 1):
            v = [op(v[lane], v[lane ^ off]) for lane in range(32)]
        return v[0]

    warps = [butterfly(x[32 * w:32 * w + 32]) for w in range(kThreads // 32)]
    return butterfly(warps + [np.full_like(values[0], identity)] * (32 - len(warps)))


def combine_kernel(p, c):
    """combine_kernel, vectorised over its CTAs (one per lse_idx) and threads (e)."""
    ft = c['ft']
    rows_total = p.batch * p.n_q_heads * p.seq_q
    lse_idx = np.arange(rows_total)
    i, h, b = lse_idx % p.seq_q, lse_idx // p.seq_q % p.n_q_heads, lse_idx // (p.seq_q * p.n_q_heads)
    assert p.splits <= kThreads
    ls = [gload(p.partial_lse, s * rows_total + lse_idx).astype(ft) for s in range(p.splits)]  # thread s
    mx = block_reduce(ls, lambda a, b_: np.fmax(a, b_), -np.inf)
    weight = []
    for s in range(p.splits):
        with np.errstate(invalid='ignore'):
            weight.append(np.where(ls[s] == -np.inf, ft(0), np.exp((ls[s] - mx).astype(ft)).astype(ft)))
    total = block_reduce(weight, lambda a, b_: (a + b_).astype(ft), 0)
    weight += [np.zeros(rows_total, ft)] * (kThreads - p.splits)  # the threads past the last split
    with np.errstate(invalid='ignore', divide='ignore'):
        saw = total != 0  # NaN too
        lse = np.where(saw, (mx + np.log(np.where(saw, total, 1)).astype(ft)).astype(ft), ft(0))
        inv = np.where(saw, (ft(1) / np.where(saw, total, 1)).astype(ft), ft(0))
    gstore(p.lse, lse_idx, lse, p.lse_count)
    out_row = (b * p.seq_q + i) * p.n_q_heads + h
    e = np.arange(p.head_dim)
    oo = np.zeros((rows_total, p.head_dim), ft)
    kBatch = 32
    for t0 in range(0, p.splits, kBatch):
        # A batch's loads past the last split load the last split again; their weight is 0.
        parts = [gload(p.partial_out, (min(t0 + u, p.splits - 1) * rows_total + lse_idx)[:, None] * p.head_dim + e)
                 .astype(ft) for u in range(kBatch)]
        for u in range(kBatch):
            w = weight[t0 + u]
            with np.errstate(invalid='ignore'):
                fused = (w[:, None].astype(np.float64) * parts[u] + oo).astype(ft)  # fmaf: one rounding
            oo = np.where((w != 0)[:, None], fused, oo)
    res = (oo * inv[:, None]).astype(ft)
    gstore(p.out, out_row[:, None] * p.head_dim + e, rnd(res, p.T) if c['round'] else res, p.out_count)


# ---- host -----------------------------------------------------------------------------------------
kMinKeysPerSplit, kMaxSplits = 256, 128


def choose_splits(units, capacity, sms, per_sm):
    """choose_splits, with the SM count and the occupancy given (cudaOccupancy... on a GPU)."""
    slots = sms * max(per_sm, 1)
    max_splits = min(max(capacity // kMinKeysPerSplit, 1), kMaxSplits)
    units = max(units, 1)
    if units * max_splits <= slots:
        return max_splits
    eff = lambda s: (units * s) / (-(-units * s // slots) * slots)
    best = max(eff(s) for s in range(1, max_splits + 1))
    for s in range(1, max_splits + 1):
        if eff(s) >= 0.85 * best:
            return s
    return 1


COVERAGE = ['ctas', 'tiles', 'ring_wrap', 'midtile_start', 'split_tail', 'zero_filled_rows', 'empty_split',
            'blind_rows', 'partial_row_tile', 'second_row_tile']


def kvcache_attention_tc(case, splits, mode):
    """The launcher's attend path for T in {fp16, bf16}: append, attend_tc_kernel over the grid,
    combine. Returns (out [B, seq_q, H, D], lse [B, H, seq_q], kernel parameters)."""
    c = dict(ft=np.float64 if mode == 'exact' else np.float32, round=mode == 'kernel', stats=dict.fromkeys(COVERAGE, 0))
    c['log2e'] = c['ft'](1.4426950408889634 if mode != 'exact' else 1 / math.log(2))
    c['ln2'] = c['ft'](0.69314718055994531 if mode != 'exact' else math.log(2))
    ft = c['ft']
    p = Params()
    for k_, v_ in case['params'].items():
        setattr(p, k_, v_)
    p.capacity = p.max_blocks * p.block_size
    p.block_size = FastDivisor(max(p.block_size, 1))
    # Fresh copies of the written buffers (the append writes the cache).
    bufs = {name: arr.copy() for name, arr in case['buffers'].items()}
    ptr = lambda pr: None if pr is None else (bufs[pr[0]], pr[1])
    for name in ('q', 'k_cache', 'v_cache', 'k_new', 'v_new', 'seqlens', 'block_table', 'cos', 'sin'):
        setattr(p, name, ptr(case['ptrs'].get(name)))
    p.scale, p.softcap = ft(case['params']['scale']), ft(case['params']['softcap'])
    p.rows = p.group * p.seq_q
    p.row_tiles = -(-p.rows // kTcRows)
    # The deep-ring kernel (d = kDeepRingHeadDim, 3 stages), as the launcher runs it.
    p.stage_budget = kTcDeepStageBudget if case.get('deep_ring') else kTcStageBudget
    assert not case.get('deep_ring') or p.head_dim == kDeepRingHeadDim
    if splits == 'auto':
        splits = choose_splits(p.batch * p.n_kv_heads * p.row_tiles, p.capacity, 132,
                               case.get('per_sm', 3))
    p.splits = splits
    rows_total = p.batch * p.n_q_heads * p.seq_q
    out = np.full(p.batch * p.seq_q * p.n_q_heads * p.head_dim, np.nan)
    lse = np.full(rows_total, np.nan)
    p.out, p.lse = (out, 0), (lse, 0)
    p.out_count, p.lse_count = np.zeros(out.size, int), np.zeros(lse.size, int)
    if p.splits > 1:
        po, pl = np.full(p.splits * rows_total * p.head_dim, np.nan), np.full(p.splits * rows_total, np.nan)
        p.partial_out, p.partial_lse = (po, 0), (pl, 0)
        p.pout_count, p.plse_count = np.zeros(po.size, int), np.zeros(pl.size, int)
    # Launch overlap: every attend CTA runs up to its wait_for_prior_kernel() before the append
    # (the earliest a programmatic dependent launch allows), the rest after it. The combine waits
    # first thing, so it runs after the attend as a whole.
    ctas = []
    if rows_total:
        for bz in range(p.batch):
            for by in range(p.n_kv_heads * p.row_tiles):
                for bx in range(p.splits):
                    ctas.append(attend_tc_cta(p, p.head_dim, (bx, by, bz), c))
                    c['stats']['ctas'] += 1
    for cta in ctas:
        next(cta)  # to the wait
    if p.seq_new > 0 and p.batch > 0:
        append_kernel(p, ft)
    for cta in ctas:
        for _ in cta:
            raise AssertionError('an attend CTA waits twice')
    if rows_total:
        if p.splits > 1:
            assert (p.pout_count == 1).all() and (p.plse_count == 1).all(), 'partials not written exactly once'
            combine_kernel(p, c)
    assert (p.out_count == 1).all() and (p.lse_count == 1).all(), 'out/lse not written exactly once'
    p.stats = c['stats']
    return (out.reshape(p.batch, p.seq_q, p.n_q_heads, p.head_dim), lse.reshape(p.batch, p.n_q_heads, p.seq_q), p)


# ---- test cases and the float64 reference ---------------------------------------------------------
def make_case(name, T, D, batch, n_kv, G, seq_q, seqlens, seq_new=0, block_size=None, capacity=None,
              causal=False, window=(-1, -1), softcap=0.0, rotary=None, kv_interleaved=False, q_pad=0,
              splits=(1,), scale=None, seed=0):
    """Builds the global buffers (cache slots past each length and unused blocks = NaN) and the
    logical float64 inputs of the reference. block_size None: contiguous cache of `capacity`."""
    rng = np.random.default_rng(seed)
    H = n_kv * G
    seqlens = list(seqlens)
    lens = [s + seq_new for s in seqlens]
    scale = D ** -0.5 if scale is None else scale
    rt = lambda *shape: rnd(rng.standard_normal(shape), T)
    # Logical sequences (cached part); new tokens separate.
    kseq = [rt(s, n_kv, D) for s in seqlens]
    vseq = [rt(s, n_kv, D) for s in seqlens]
    q = rt(batch, seq_q, H, D)
    k_new = rt(batch, seq_new, n_kv, D) if seq_new else None
    v_new = rt(batch, seq_new, n_kv, D) if seq_new else None
    paged = block_size is not None
    if paged:
        max_blocks = max(1, max(-(-L // block_size) for L in lens) + 1)
        num_blocks = batch * max_blocks + 3
        bs = block_size
    else:
        capacity = capacity or max(lens) + 5
        max_blocks, num_blocks, bs = 1, batch, capacity
    # Cache storage: [num_blocks, bs, (2,) n_kv, D]; kv_interleaved puts k and v in one tensor.
    if kv_interleaved:
        store = np.full((num_blocks, bs, 2, n_kv, D), np.nan)
        k_ptr, v_ptr = ('kv', 0), ('kv', n_kv * D)
        kst = (bs * 2 * n_kv * D, 2 * n_kv * D, D)
        bufs = {'kv': store.reshape(-1)}
        kview, vview = store[:, :, 0], store[:, :, 1]
    else:
        ks, vs = np.full((num_blocks, bs, n_kv, D), np.nan), np.full((num_blocks, bs, n_kv, D), np.nan)
        k_ptr, v_ptr = ('k', 0), ('v', 0)
        kst = (bs * n_kv * D, n_kv * D, D)
        bufs = {'k': ks.reshape(-1), 'v': vs.reshape(-1)}
        kview, vview = ks, vs
    bt = None
    if paged:
        perm = rng.permutation(num_blocks)
        bt = np.full((batch, max_blocks), 10 ** 6, np.int64)  # past a sequence's blocks: out of range
        n = 0
        for b, L in enumerate(lens):
            nb = -(-L // bs)
            bt[b, :nb] = perm[n:n + nb]
            n += nb
    for b, s in enumerate(seqlens):
        for j in range(s):
            blk, off = (bt[b, j // bs], j % bs) if paged else (b, j)
            kview[blk, off], vview[blk, off] = kseq[b][j], vseq[b][j]
    qst = (seq_q * H * (D + q_pad), H * (D + q_pad), D + q_pad)
    qbuf = np.full((batch, seq_q, H, D + q_pad), np.nan)
    qbuf[..., :D] = q
    bufs['q'] = qbuf.reshape(-1)
    bufs['seqlens'] = np.array(seqlens, np.int64)
    ptrs = dict(q=('q', 0), k_cache=k_ptr, v_cache=v_ptr, seqlens=('seqlens', 0))
    params = dict(T=T, batch=batch, seq_q=seq_q, seq_new=seq_new, n_q_heads=H, n_kv_heads=n_kv, head_dim=D,
                  group=G, q_stride=qst, k_stride=kst, v_stride=kst, block_size=bs, max_blocks=max_blocks,
                  num_blocks=num_blocks, bt_stride=(max_blocks, 1), scale=scale, softcap=softcap,
                  window_left=window[0], window_right=0 if causal else window[1],
                  kn_stride=(0, 0, 0), vn_stride=(0, 0, 0), rotary_half=0, rotary_positions=0, interleaved=False,
                  cos_stride=0, sin_stride=0)
    if paged:
        bufs['bt'] = bt.reshape(-1)
        ptrs['block_table'] = ('bt', 0)
    if seq_new:
        bufs['k_new'], bufs['v_new'] = k_new.reshape(-1), v_new.reshape(-1)
        ptrs['k_new'], ptrs['v_new'] = ('k_new', 0), ('v_new', 0)
        nst = (seq_new * n_kv * D, n_kv * D, D)
        params.update(kn_stride=nst, vn_stride=nst)
    cos = sin = None
    if rotary:
        half, interleaved = rotary
        npos = max(lens) + 2
        theta = np.arange(npos)[:, None] * (10000.0 ** (-np.arange(half) / half))[None]
        cos, sin = np.cos(theta).astype(np.float32).astype(np.float64), np.sin(theta).astype(np.float32).astype(np.float64)
        bufs['cos'], bufs['sin'] = cos.reshape(-1), sin.reshape(-1)
        ptrs['cos'], ptrs['sin'] = ('cos', 0), ('sin', 0)
        params.update(rotary_half=half, rotary_positions=npos, interleaved=interleaved, cos_stride=half, sin_stride=half)
    ref = dict(q=q, kseq=kseq, vseq=vseq, k_new=k_new, v_new=v_new, cos=cos, sin=sin, rotary=rotary, causal=causal,
               window=window, softcap=softcap, scale=scale, seqlens=seqlens, seq_new=seq_new, T=T, G=G)
    return dict(name=name, T=T, buffers=bufs, ptrs=ptrs, params=params, ref=ref, splits=splits,
                torch_layout=dict(kview=kview, vview=vview, bt=bt))


def rotate64(x, cos, sin, pos, interleaved):
    """float64 rotation of x [..., D] by table row pos (rotary_reference's formula)."""
    half = cos.shape[1]
    c, s = cos[pos], sin[pos]
    x = x.copy()
    if interleaved:
        x1, x2 = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = x1 * c - x2 * s, x2 * c + x1 * s
    else:
        x1, x2 = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half], x[..., half:2 * half] = x1 * c - x2 * s, x2 * c + x1 * s
    return x


def rotate_as_kernel(x, cos, sin, pos, interleaved):
    """x [..., D] rotated by table row pos as the kernel rotates it (rotate_element): in fp32, one
    rounded product and one fused multiply-add per element (rotary_y1 / rotary_y2, common.cuh).
    Rounded to T, it can differ from rotate64's rounding by one unit of T, which moves the scores
    by far more than fp32's rounding: the fp32 and kernel modes are held to a reference that
    rotates this way (the exact mode's float64 rotation is rotate64's)."""
    half = cos.shape[1]
    c, s = cos[pos].astype(np.float32), sin[pos].astype(np.float32)
    x = x.copy()
    lo, hi = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else (slice(0, half), slice(half, 2 * half))
    x1, x2 = x[..., lo].astype(np.float32), x[..., hi].astype(np.float32)
    x[..., lo] = fma(x1, c, -(x2 * s), np.float32)
    x[..., hi] = fma(x2, c, x1 * s, np.float32)
    return x


def rotate_as_torch(x, cos, sin, pos, interleaved):
    """rotate64 rounded to fp32: llama_ext/reference.py rotates in float64 too, but torch converts
    float64 to bf16/fp16 through fp32, so where that first rounding lands on a tie of T the two
    roundings differ from one (rnd). The cross-check with it rotates this way."""
    return rotate64(x, cos, sin, pos, interleaved).astype(np.float32).astype(np.float64)


def reference(rf, rotate=rotate64):
    """float64 (out [B, seq_q, H, D], lse [B, H, seq_q], out_abs): the semantics of
    kvcache_attention.h, q and the new k rotated by `rotate` and rounded to T; out_abs = sum_j p_j
    |v_j|, the scale of the error that rounding P to T can make (|sum_j (rnd(p_j) - p_j) v_j| <=
    u_T out_abs)."""
    q, T, G = rf['q'], rf['T'], rf['G']
    B, seq_q, H, D = q.shape
    out, lse = np.zeros((B, seq_q, H, D)), np.zeros((B, H, seq_q))
    out_abs = np.zeros((B, seq_q, H, D))
    left, right = rf['window']
    right = 0 if rf['causal'] else right
    for b in range(B):
        k, v = rf['kseq'][b], rf['vseq'][b]
        start = rf['seqlens'][b]
        qb = q[b]
        if rf['seq_new']:
            kn = rf['k_new'][b]
            if rf['rotary']:
                kn = np.stack([rnd(rotate(kn[i], rf['cos'], rf['sin'], start + i, rf['rotary'][1]), T)
                               for i in range(rf['seq_new'])])
            k, v = np.concatenate([k, kn]), np.concatenate([v, rf['v_new'][b]])
        if rf['rotary']:
            qb = np.stack([rnd(rotate(qb[i], rf['cos'], rf['sin'], start + i, rf['rotary'][1]), T)
                           for i in range(seq_q)])
        L = k.shape[0]
        ii = np.arange(seq_q)[:, None] + L - seq_q
        jj = np.arange(L)[None, :]
        vis = np.ones((seq_q, L), bool)
        if left >= 0:
            vis &= jj >= ii - left
        if right >= 0:
            vis &= jj <= ii + right
        for h in range(H):
            s = rf['scale'] * qb[:, h] @ k[:, h // G].T
            if rf['softcap'] > 0:
                s = rf['softcap'] * np.tanh(s / rf['softcap'])
            s = np.where(vis, s, -np.inf)
            seen = vis.any(1)
            mx = np.where(seen, s.max(1, initial=-np.inf), 0)
            pr = np.where(vis, np.exp(s - mx[:, None]), 0)
            l = pr.sum(1)
            out[b, :, h] = np.where(seen[:, None], pr @ v[:, h // G] / np.where(seen, l, 1)[:, None], 0)
            out_abs[b, :, h] = np.where(seen[:, None], pr @ np.abs(v[:, h // G]) / np.where(seen, l, 1)[:, None], 0)
            lse[b, h] = np.where(seen, mx + np.log(np.where(seen, l, 1)), 0)
    return out, lse, out_abs


def torch_reference(case):
    """llama_ext/reference.py's gqa_attention_with_kvcache_reference on the same inputs
    (ptx_emu.reference_module)."""
    import torch
    mod = ptx_emu.reference_module()
    rf, tl, pr = case['ref'], case['torch_layout'], case['params']
    dt = torch.bfloat16 if rf['T'] == 'bf16' else torch.float16
    kc = torch.from_numpy(np.nan_to_num(tl['kview'].copy())).to(dt)
    vc = torch.from_numpy(np.nan_to_num(tl['vview'].copy())).to(dt)
    bt = None if tl['bt'] is None else torch.from_numpy(np.where(tl['bt'] >= pr['num_blocks'], 0, tl['bt'])).int()
    kw = dict(k=None, v=None)
    if rf['seq_new']:
        kw = dict(k=torch.from_numpy(rf['k_new']).to(dt), v=torch.from_numpy(rf['v_new']).to(dt))
    if rf['rotary']:
        kw.update(rotary_cos=torch.from_numpy(rf['cos']).float(), rotary_sin=torch.from_numpy(rf['sin']).float(),
                  rotary_interleaved=rf['rotary'][1])
    out, lse, _, _ = mod.gqa_attention_with_kvcache_reference(
        torch.from_numpy(rf['q']).to(dt), kc, vc, torch.tensor(rf['seqlens'], dtype=torch.int32), block_table=bt,
        causal=rf['causal'], scale=rf['scale'], window_size=rf['window'], softcap=rf['softcap'], **kw)
    return out.numpy(), lse.numpy()


def cases():
    C = []
    # d = 32: one row (G = 1, seq_q = 1); lengths 0, 1, odd, 3 tiles; contiguous cache.
    C.append(make_case('d32 rows1 contiguous L=0,1,37,130', 'bf16', 32, 4, 1, 1, 1, [0, 1, 37, 130],
                       splits=(1, 3), seed=1))
    # d = 64: 4 rows (G = 4); paged, block 16, shuffled; several tiles and splits; fp16.
    C.append(make_case('d64 rows4 paged16 L=203,17', 'fp16', 64, 2, 2, 4, 1, [203, 17], block_size=16,
                       splits=(1, 4), seed=2))
    # d = 80 (kONTiles = 10, 3 stages): 16 rows (G = 8, seq_q = 2), causal, paged block 48.
    C.append(make_case('d80 rows16 causal paged48 L=150,33', 'bf16', 80, 2, 1, 8, 2, [150, 33], block_size=48,
                       causal=True, splits=(1, 2), seed=3))
    # d = 96: 20 rows (2 row tiles), causal + window, k/v interleaved in one tensor, q row padding.
    C.append(make_case('d96 rows20 causal window45 kv-interleaved L=171,6', 'fp16', 96, 2, 2, 5, 4, [171, 6],
                       causal=True, window=(45, -1), kv_interleaved=True, q_pad=8, splits=(1, 3), seed=4))
    # d = 128: 12 rows, softcap, window (20, 1) non-causal, paged block 64.
    C.append(make_case('d128 rows12 softcap20 window(20,1) paged64 L=257,64', 'bf16', 128, 2, 1, 4, 3, [257, 64],
                       block_size=64, softcap=20.0, window=(20, 1), splits=(1, 5), seed=5))
    # d = 256 (two warps per key slice, 32-key tiles): 18 rows (2 row tiles), causal, paged block 16,
    # 9 new tokens appended with partial rotate-half rotary (192 of 256 dims); L = 0 + 9 too.
    C.append(make_case('d256 rows18 causal paged16 append9 rotary L=69,9', 'bf16', 256, 2, 1, 2, 9, [60, 0],
                       seq_new=9, block_size=16, causal=True, rotary=(96, False), splits=(1, 2), seed=6))
    # d = 64, window 70 of 300 keys: the range starts mid-tile (key 229 of the tile at 192); 3 splits
    # leave one split empty; 1 new token with interleaved rotary; odd block size 7.
    C.append(make_case('d64 rows3 window70 mid-tile paged7 append1 rotary-interleaved L=300', 'fp16', 64, 1, 1, 3,
                       1, [299], seq_new=1, block_size=7, window=(70, -1), rotary=(24, True), splits=(1, 2, 3),
                       seed=7))
    # d = 32: seq_q > L (causal rows that see nothing), L = 0 sequence, 10 rows.
    C.append(make_case('d32 rows10 causal seq_q>L L=2,0,5', 'bf16', 32, 3, 1, 2, 5, [2, 0, 5], causal=True,
                       splits=(1, 2), seed=8))
    # d = 128: one long sequence, many tiles, splits 1, 6, 11 (the combine's second batch of 8
    # loads, its last 4 splits empty) and the host's choice (H200: 132 SMs x 3).
    C.append(make_case('d128 rows1 paged64 L=777', 'bf16', 128, 1, 1, 1, 1, [777], block_size=64,
                       splits=(1, 6, 11, 'auto'), seed=9))
    # d = 80: 32 rows (2 full row tiles), window (10, 5) non-causal, paged block 48.
    C.append(make_case('d80 rows32 window(10,5) paged48 L=90', 'fp16', 80, 1, 1, 16, 2, [90], block_size=48,
                       window=(10, 5), splits=(1, 2), seed=10))
    # More tiles than ring stages at 4 and 3 stages (d = 64 and 32: 4, d = 80: 3), so the key loop
    # itself fetches block entries ahead (paged) and addresses whole tiles (contiguous); block size
    # 17, a FastDivisor magic number near 2^32.
    C.append(make_case('d64 rows2 paged16 ring-wrap L=600', 'fp16', 64, 1, 1, 2, 1, [600], block_size=16,
                       splits=(1,), seed=11))
    C.append(make_case('d80 rows1 paged17 ring-wrap L=500', 'bf16', 80, 1, 1, 1, 1, [500], block_size=17,
                       splits=(1, 2), seed=12))
    C.append(make_case('d32 rows2 contiguous ring-wrap append1 rotary L=700', 'bf16', 32, 1, 1, 2, 1, [699],
                       seq_new=1, rotary=(16, False), splits=(1,), seed=13))
    # The deep-ring kernel at d = 128 (3 stages, 2 CTAs per SM for the host's choice): more tiles
    # than stages, paged and contiguous, the contiguous one with an appended, rotated token.
    C.append(make_case('d128 rows1 paged64 deep-ring L=777', 'bf16', 128, 1, 1, 1, 1, [777], block_size=64,
                       splits=(1, 6, 'auto'), seed=14))
    C.append(make_case('d128 rows4 contiguous deep-ring append1 rotary L=300,5', 'fp16', 128, 2, 1, 4, 1, [299, 4],
                       seq_new=1, rotary=(64, True), splits=(1, 2), seed=15))
    for case in C[-2:]:
        case.update(deep_ring=True, per_sm=2)
    return C


def random_cases(count, seed=0):
    """`count` cases drawn at random over the knobs the fixed cases pick by hand: dtype, head
    dim, 1-3 sequences of 0-400 tokens, 1-2 kv heads, groups of 1-16 (up to 40 rows), query and
    new tokens, contiguous or paged (blocks of 1, 5, 16, 17, 32, 64), causal, a window on either
    side, softcap, rotary of either pairing (its table covers the new tokens' positions plus
    two), k/v interleaved in one tensor, q row padding; split counts 1, one of 2-9, and the
    host's choice."""
    rng = np.random.default_rng(seed)
    pick = lambda options: options[int(rng.integers(len(options)))]
    out = []
    for n in range(count):
        T, D = pick(['bf16', 'fp16']), pick([32, 64, 80, 96, 128, 256])
        batch, n_kv, G = int(rng.integers(1, 4)), int(rng.integers(1, 3)), pick([1, 2, 3, 4, 5, 7, 8, 16])
        seq_q = pick([1, 1, 2, 3, 4, 5, 8]) if G <= 5 else 1
        seq_new = int(rng.integers(0, seq_q + 1))
        seqlens = [int(rng.integers(0, pick([1, 41, 401]))) for _ in range(batch)]
        side = lambda: pick([-1, -1, 0, int(rng.integers(0, 61))])
        rotary = None
        if seq_new and seq_q <= seq_new + 2 and rng.random() < 0.5:
            rotary = (int(rng.integers(1, D // 2 + 1)), bool(rng.random() < 0.5))
        out.append(make_case(
            f'random{n} seed{seed}', T, D, batch, n_kv, G, seq_q, seqlens, seq_new=seq_new,
            block_size=pick([None, None, 1, 5, 16, 17, 32, 64]), causal=bool(rng.random() < 0.5),
            window=(side(), side()), softcap=pick([0.0, 0.0, 5.0, 30.0]), rotary=rotary,
            kv_interleaved=bool(rng.random() < 0.2), q_pad=pick([0, 0, 8]),
            splits=(1, int(rng.integers(2, 10)), 'auto'), seed=int(rng.integers(1 << 30))))
    return out


def ptx_selftest():
    """ldmatrix x1/x2/x4 (.trans) and mma against plain matrix products."""
    rng = np.random.default_rng(123)
    A, B = rng.standard_normal((16, 16)), rng.standard_normal((16, 8))
    X = rng.standard_normal((16, 16))  # B = X^T stored [n][k] (16 n = two n-tiles)
    ld = 24
    sm = Smem(3 * 16 * ld, 'selftest')
    idx = np.arange(16)[:, None] * ld + np.arange(16)
    sm.write(idx, A, 0); sm.write(16 * ld + idx[:, :8], B, 0); sm.write(32 * ld + idx, X, 0)
    sm.barrier()
    a = load_a(sm, 0, ld, 0, 0, 0)
    b = load_b_kn(sm, 16 * ld, ld, 0, 0, 0)  # .x2.trans
    c = mma_m16n8k16(np.zeros((4, 32)), a, b, np.float64)
    D = np.empty((16, 8)); D[C_ROW, C_COL] = c
    assert np.allclose(D, A @ B, atol=1e-12)
    b0, b1 = load_b_pair_nk(sm, 32 * ld, ld, 0, 0, 0)  # .x4
    for nt, bb in enumerate((b0, b1)):
        D[C_ROW, C_COL] = mma_m16n8k16(np.zeros((4, 32)), a, bb, np.float64)
        assert np.allclose(D, A @ X[8 * nt: 8 * nt + 8].T, atol=1e-12)
    b0, b1 = load_b_pair_kn(sm, 32 * ld, ld, 0, 0, 0)  # .x4.trans: B = X stored [k][n]
    for nt, bb in enumerate((b0, b1)):
        D[C_ROW, C_COL] = mma_m16n8k16(np.zeros((4, 32)), a, bb, np.float64)
        assert np.allclose(D, A @ X[:, 8 * nt: 8 * nt + 8], atol=1e-12)
    x1 = ldmatrix(sm, np.arange(32) * 0 + (np.arange(32) % 8) * ld, 1, False, 0)[0]  # .x1: rows 0..7 of A
    assert np.array_equal(x1[:, 0], A[GID, 2 * TIG]) and np.array_equal(x1[:, 1], A[GID, 2 * TIG + 1])
    x1t = ldmatrix(sm, (np.arange(32) % 8) * ld, 1, True, 0)[0]
    assert np.array_equal(x1t[:, 0], A[2 * TIG, GID]) and np.array_equal(x1t[:, 1], A[2 * TIG + 1, GID])


UNIT_ROUNDOFF = {'bf16': 2.0 ** -8, 'fp16': 2.0 ** -11}


def compare(out, lse, ref, mode, T):
    """exact: |err| <= 1e-13; fp32: <= 1e-5; kernel: out |err| <= 1.5 u_T (out_abs + |out|) + 1e-5
    (P rounded to T, then out rounded to T), lse (never rounded to T) <= 1e-5."""
    ro, rl, rabs = ref
    if mode == 'exact':
        bound, ltol = np.full(ro.shape, 1e-13), 1e-13
    elif mode == 'fp32':
        bound, ltol = np.full(ro.shape, 1e-5), 1e-5
    else:
        bound, ltol = 1.5 * UNIT_ROUNDOFF[T] * (rabs + np.abs(ro)) + 1e-5, 1e-5
    err = np.abs(out - ro)
    eo = float(err.max()) if out.size else 0.0
    el = float(np.abs(lse - rl).max()) if lse.size else 0.0
    nan = int(np.isnan(out).sum() + np.isnan(lse).sum())
    ok = nan == 0 and bool((err <= bound).all()) and el <= ltol
    return ok, eo, el, nan


def check_block_assert():
    """An entry outside the cache among a sequence's blocks: the attend kernel asserts (once its
    key loop is done, the row zero-filled meanwhile) at every split count."""
    case = next(cs for cs in cases() if cs['name'].startswith('d64 rows4 paged16'))
    case = dict(case, buffers=dict(case['buffers']))
    bt = case['buffers']['bt'] = case['buffers']['bt'].copy()
    bt[2] = case['params']['num_blocks']  # sequence 0, keys 32..47
    for splits in case['splits']:
        try:
            kvcache_attention_tc(case, splits, 'kernel')
        except DeviceAssert:
            continue
        raise AssertionError(f'a block_table entry outside the cache, splits={splits}: no device-side assert')


def run_cases(names=None, modes=('exact', 'fp32', 'kernel'), verbose=True, case_list=None):
    """Runs cases() (those whose names contain one of `names`), or case_list, at each of their
    split counts in each mode."""
    t0 = time.time()
    ptx_selftest()
    check_block_assert()
    assert choose_splits(8, 8192, 132, 3) == 32 and choose_splits(256, 8192, 132, 3) == 3  # the file's H200 example
    # The deep ring's (2 CTAs per SM): the same 32 splits at batch 1, all 256 CTAs resident; not batch 32.
    assert choose_splits(8, 8192, 132, 2) == 32 and 8 * 32 <= 132 * 2 and choose_splits(256, 8192, 132, 2) != 3
    failures, results = [], []
    if verbose:
        for D in (32, 64, 80, 96, 128, 256):
            Tl = TcTiling(D)
            static = (2 * Tl.kWarpsK * kTcRows + 2 * kTcRows) * 4
            print(f'     D={D:<3}: keys/tile {Tl.kKeys}, warps sharing a key slice {Tl.kWarpsN}, stages {Tl.kStages}, '
                  f'O n-tiles/warp {Tl.kONTiles}, smem {Tl.kSmemBytes} + {static} B = {(Tl.kSmemBytes + static) / 1024:.1f} KB')
    all_cases = cases() if case_list is None else case_list
    if names:
        all_cases = [cs for cs in all_cases if any(n in cs['name'] for n in names)]
    have_torch = True
    coverage = dict.fromkeys(COVERAGE, 0)
    for case in all_cases:
        ref = reference(case['ref'])
        rotary = case['ref']['rotary']
        ref_as_kernel = reference(case['ref'], rotate_as_kernel) if rotary else ref
        if have_torch:
            ro, rl = (reference(case['ref'], rotate_as_torch) if rotary else ref)[:2]
            try:
                to, tlse = torch_reference(case)
            except ImportError:
                have_torch = False
            else:
                d = max(np.abs(to - ro).max(), np.abs(tlse - rl).max())
                if d > 1e-12:
                    failures.append(f"{case['name']}: this file's reference != llama_ext/reference.py's by {d:.1e}")
                if verbose:
                    print(f"     {case['name']:<67} reference vs llama_ext/reference.py: {d:.1e}")
        for splits in case['splits']:
            for mode in modes:
                t1 = time.time()
                try:
                    out, lse, p = kvcache_attention_tc(case, splits, mode)
                except AssertionError as ex:
                    failures.append(f"{case['name']} splits={splits} {mode}: {type(ex).__name__}: {ex}")
                    if verbose:
                        print(f"FAIL {case['name']} splits={splits} {mode}: {type(ex).__name__}: {ex}")
                    continue
                ok, eo, el, nan = compare(out, lse, ref if mode == 'exact' else ref_as_kernel, mode, case['T'])
                for k_ in COVERAGE:
                    coverage[k_] += p.stats[k_]
                results.append((case['name'], p.splits, mode, eo, el, nan, ok))
                if verbose:
                    print(f"{'ok  ' if ok else 'FAIL'} {case['name']:<67} {case['T']} splits={p.splits:<2} {mode:<6} "
                          f"out {eo:.1e} lse {el:.1e} nan={nan} ctas={p.stats['ctas']} tiles={p.stats['tiles']} "
                          f"({time.time() - t1:.2f}s)", flush=True)
                if not ok:
                    failures.append(f"{case['name']} splits={p.splits} {mode}: out {eo:.2e} lse {el:.2e} nan {nan}")
    return ptx_emu.finish_runs(results, failures, coverage, t0, not names and case_list is None, verbose=verbose,
                               label='CTAs / tiles / rows, all runs')


MUTANTS = ['no_zero_fill', 'ring_stage', 'wait_depth', 'merge_barrier', 'mask_lo', 'top_left', 'ldm_b_addr',
           'p_layout', 'no_corr', 'stale_blocks', 'kv_before_wait', 'one_half', 'corr_first_lane', 'unclamped_fill',
           'high_chain_k', 'unclamped_entry']


def check_mutants(verbose=True):
    """Each injected bug must make some small case fail (error, race, assert or NaN)."""
    # The ring-wrap cases and d128 rows1: more tiles than ring stages, blocks fetched in the key loop.
    picks = [cs for cs in cases()
             if cs['name'].startswith(('d64 rows4', 'd80 rows16', 'd32 rows10', 'd64 rows3', 'd128 rows1',
                                       'd64 rows2'))]
    refs = [reference(cs['ref']) for cs in picks]

    def find_failure(mut):
        for cs, ref in zip(picks, refs):
            for splits in cs['splits']:
                try:
                    out, lse, _ = kvcache_attention_tc(cs, splits, 'exact')
                except AssertionError as ex:
                    return f"{type(ex).__name__}: {str(ex)[:70]} ({cs['name'][:12]}, splits={splits})"
                ok, eo, el, nan = compare(out, lse, ref, 'exact', cs['T'])
                if not ok:
                    return f"out err {eo:.1e}, lse err {el:.1e}, nan {nan} ({cs['name'][:12]}, splits={splits})"
        return None

    return ptx_emu.check_mutants(MUTANTS, find_failure, verbose)


if __name__ == '__main__':
    if sys.argv[1:2] == ['--random']:
        count, seed = int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
        run_cases(case_list=random_cases(count, seed), verbose=False)
        print(f'{count} random cases (seed {seed}): every split count and mode matches')
    else:
        ptx_emu.main(run_cases, check_mutants)
