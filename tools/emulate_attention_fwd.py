"""Lane-level numpy emulation of the tensor-core attention forward kernel of gqa_attention.

What: a transcription, step by step and lane by lane, of `attention_forward_tc_kernel<T, D, kTile>`
(float16 / bfloat16, tensor cores) in csrc/cuda/attention_fwd.cu, for every entry of its tile
table kFwdTiles (FwdTile / FwdConfig: block_m x block_n, warps, 16 or 32 rows = 1 or 2 m-tiles
per warp, Q fragments in registers or re-read from shared memory), with what it needs around it:
`choose_forward_tile` with the SmemLimits of sm_80, sm_90 and the ~100 KB parts (sm_86/89/120)
and the file's static_asserts; the host's parameter set-up of csrc/cuda/attention.cu
(make_params: strides_of, rows_aligned16, lse strides, scale_log2, the window clamps, softcap_log2
and its inverse) and make_key_window (csrc/attention.h); attention_common.cuh's sequence /
offset / lse_offset / tiles_of / key_begin / key_end (KeyWindow, bottom-right aligned) /
tile_needs_mask / precise_tanh / capped_score / load_tile (cp.async path when aligned16, the
register path otherwise); and the kernel's stages load_kv_tile, score_tile, scale_and_mask,
online_softmax, accumulate_pv and write_back. The same kernel serves batched and varlen
(cu_seqlens) calls, and batched calls over KV caches whose sequences hold key_lengths[b] keys
(gqa_attention_with_kvcache's prefill route), contiguous or paged (kPaged: each key's row found
through the block table, blocks shuffled over a pool with NaN spares and -1 past each sequence's
last page); all are run. The warp-level helpers of csrc/cuda/mma.cuh (load_a,
load_b_pair_nk, load_b_pair_kn, pack_a_from_acc) and the PTX instructions (ldmatrix .x4
[.trans], mma.sync.m16n8k16 with fp32 accumulation, cp.async with commit/wait groups) are
tools/ptx_emu.py's, imported unchanged; nothing new is defined at the PTX level here.

As of: attention_fwd.cu as present in the working tree with this file. When the kernel, its
tile table or the host set-up change, transcribe the change here.

Shared memory is one flat float64 array of 2-byte slots per CTA (sQ [block_m][pitch], then
sK [2][block_n][pitch], sV [2][block_n][pitch], pitch = D + 8), initialised to NaN, with
ptx_emu.Smem's hazard tracking: a read of a slot never written or whose cp.async is still in
flight, or a cross-thread read/write of a slot without a __syncthreads in between, raises
`Race`. Global memory is flat numpy arrays addressed with the kernel's own strides; every global
index is bounds-checked (DeviceAssert), a cp.async source must be 16-byte aligned, and every
element the kernel must not read is NaN: the head-dim padding of strided q/k/v, guard rows past
each batched sequence (k/v allocated longer than seq_k, q longer than seq_q) and past the varlen
totals. out and lse start as NaN and every element must be written exactly once.

Three arithmetic modes, each compared with one float64 reference computed from the same
T-valued inputs (cross-checked against llama_ext/reference.py's gqa_attention_reference on
every batched case when torch is importable):
  exact : float64 everywhere (scale_log2 = scale / ln 2, softcap_log2 = softcap / ln 2 exactly);
          P and out not rounded. Must match to ~1e-13: any index, fragment, mask, key-block
          range, ring or normalisation error shows.
  fp32  : fp32 registers (numpy float32 after every operation, the host's float constants
          kLog2e / kLn2 and float scale_log2 / softcap_log2 / inv_softcap_log2; an mma = exact
          products summed in float64 and rounded once to fp32), P and out not rounded: to 1e-5.
  kernel: as fp32, plus P rounded to T (RNE, pack_a_from_acc) as the PV A fragment and out
          rounded to T (pack2): what the GPU computes, to T's rounding: |err| <= 1.5 u_T
          (sum_j p_j |v_j| + |out|) + 1e-5, u_T = 2^-8 (bf16) or 2^-11 (fp16); lse to 1e-5.
Assumptions (fp32/kernel modes, all far inside the tolerances): exp2f / __log2f / 1.f / x /
expm1f as correctly rounded fp32 (the GPU's ex2.approx, lg2.approx, rcp.approx are within a few
ulp); `rows.sum * alpha + sum` contracted to one FMA (nvcc's default).
check_mutants() re-runs small cases with one injected kernel bug at a time (MUT hooks, those of
ptx_emu plus this file's) and checks each is caught.

Run: .venv/bin/python tools/emulate_attention_fwd.py [case-name-substring ...]
(no argument: every case in every mode, then the mutants)
"""
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptx_emu  # noqa: E402
from ptx_emu import (C_COL, C_ROW, DeviceAssert, GID, LANES, MUT, Race, Smem, TIG, gload, gstore, ldmatrix, load_a,
                     load_b_pair_kn, load_b_pair_nk, mma_m16n8k16, pack_a_from_acc, rnd)

# The kernel sources this file transcribes, and their digest when it was last brought in step
# (ptx_emu.sources_digest): the tests fail when one changes, until the change is transcribed here.
TRANSCRIBED = (
    'csrc/cuda/attention_fwd.cu',
    'csrc/cuda/attention_common.cuh',
    'csrc/cuda/attention.cu',
    'csrc/cuda/mma.cuh',
    'csrc/attention_window.h',
)
TRANSCRIBED_DIGEST = '4ccfbc550efc22fb'


# ---- the tile table and its choice (attention_fwd.cu) ---------------------------------------------
class FwdTile:
    def __init__(self, head_dim, block_m, block_n, warps, q_in_registers, min_ctas_per_sm):
        self.head_dim, self.block_m, self.block_n = head_dim, block_m, block_n
        self.warps, self.q_in_registers, self.min_ctas_per_sm = warps, q_in_registers, min_ctas_per_sm

    def smem_bytes(self):
        return (self.block_m + 4 * self.block_n) * (self.head_dim + 8) * 2


class SmemLimits:
    def __init__(self, per_block, per_sm, reserved_per_block):
        self.per_block, self.per_sm, self.reserved_per_block = per_block, per_sm, reserved_per_block


kSmemSm80 = SmemLimits(163 * 1024, 164 * 1024, 1024)
kSmemSm90 = SmemLimits(227 * 1024, 228 * 1024, 1024)
kSmemSm86 = SmemLimits(99 * 1024, 100 * 1024, 1024)  # also sm_89, sm_120
LIMITS = {'sm80': kSmemSm80, 'sm90': kSmemSm90, 'sm86': kSmemSm86}

kFwdTiles = [
    # D    M    N  warps  Q in regs  CTAs/SM
    FwdTile(32, 128, 64, 4, True, 3),
    FwdTile(64, 128, 64, 4, True, 2),
    FwdTile(64, 128, 32, 4, True, 2),
    FwdTile(80, 128, 32, 8, False, 2),
    FwdTile(96, 128, 32, 8, False, 2),
    FwdTile(128, 128, 32, 4, False, 2),
    FwdTile(128, 128, 32, 8, True, 1),
    FwdTile(256, 64, 32, 4, False, 1),
]
kNumFwdTiles = len(kFwdTiles)
kHeadDims = (32, 64, 80, 96, 128, 256)  # LLAMA_EXT_ATTENTION_HEAD_DIMS (attention_launch.cuh)


def choose_forward_tile(head_dim, smem):
    fits_one = -1
    for i, c in enumerate(kFwdTiles):
        if c.head_dim != head_dim or c.smem_bytes() > smem.per_block:
            continue
        if c.min_ctas_per_sm * (c.smem_bytes() + smem.reserved_per_block) <= smem.per_sm:
            return i
        if fits_one < 0:
            fits_one = i
    return fits_one


def every_head_dim_on_tensor_cores(smem, at_full_occupancy):
    for d in kHeadDims:
        i = choose_forward_tile(d, smem)
        if i < 0:
            return False
        c = kFwdTiles[i]
        if at_full_occupancy and c.min_ctas_per_sm * (c.smem_bytes() + smem.reserved_per_block) > smem.per_sm:
            return False
    return True


def static_asserts():
    assert every_head_dim_on_tensor_cores(kSmemSm80, True) and every_head_dim_on_tensor_cores(kSmemSm90, True) \
        and every_head_dim_on_tensor_cores(kSmemSm86, False)
    assert kFwdTiles[choose_forward_tile(64, kSmemSm86)].block_n == 32
    assert kFwdTiles[choose_forward_tile(128, kSmemSm80)].warps == 4
    assert kFwdTiles[choose_forward_tile(128, kSmemSm86)].warps == 8
    assert choose_forward_tile(128, SmemLimits(64 * 1024, 64 * 1024, 1024)) == -1
    assert choose_forward_tile(48, kSmemSm90) == -1
    for k in range(kNumFwdTiles):
        FwdConfig(k)


class FwdConfig:
    def __init__(self, kTile):
        c = kFwdTiles[kTile]
        self.kTile = kTile
        self.kD, self.kBlockM, self.kBlockN, self.kWarps = c.head_dim, c.block_m, c.block_n, c.warps
        self.kThreads = self.kWarps * 32
        self.kRowsPerWarp = self.kBlockM // self.kWarps
        self.kMTiles = self.kRowsPerWarp // 16
        self.kMinCtasPerSm = c.min_ctas_per_sm
        self.kQInRegisters = c.q_in_registers
        self.kPitch = self.kD + 8  # smem_pitch<kD>()
        self.kDTiles = self.kD // 8
        self.kDChunks = self.kD // 16
        self.kNTiles = self.kBlockN // 8
        self.kNChunks = self.kBlockN // 16
        self.kQFragChunks = self.kDChunks if self.kQInRegisters else 1
        self.kSmemElems = (self.kBlockM + 4 * self.kBlockN) * self.kPitch
        assert self.kPitch == self.kD + 8 and c.smem_bytes() == 2 * self.kSmemElems
        assert self.kRowsPerWarp * self.kWarps == self.kBlockM and self.kMTiles * 16 == self.kRowsPerWarp
        assert self.kD % 16 == 0 and self.kBlockN % 16 == 0
        assert self.kDTiles % 2 == 0 and self.kNTiles % 2 == 0


# ---- kernel parameters, global memory, attention_common.cuh --------------------------------------
class Params:
    """AttentionParams. Pointers are (flat numpy array, element offset)."""
    pass


class Seq:
    def __init__(self, start_q, start_k, len_q, len_k):
        self.start_q, self.start_k, self.len_q, self.len_k = start_q, start_k, len_q, len_k


def sequence(p, b):
    if p.cu_seqlens_q is None:
        return Seq(0, 0, p.seq_q, p.seq_k if p.key_lengths is None else int(p.key_lengths[b]))
    q0, k0 = int(p.cu_seqlens_q[b]), int(p.cu_seqlens_k[b])
    return Seq(q0, k0, int(p.cu_seqlens_q[b + 1]) - q0, int(p.cu_seqlens_k[b + 1]) - k0)


def offset(s, b, seq_start, row, head):
    return b * s[0] + (seq_start + row) * s[1] + head * s[2]


def lse_offset(p, b, seq, row, head):
    return b * p.lse_batch + head * p.lse_head + seq.start_q + row


def tiles_of(n, block):
    return (n + block - 1) // block


# KeyWindow (attention_window.h), vectorised over i (int64 numpy; the kernel's int never overflows).
def kw_aligned_row(i, len_q, len_k):
    """Row i's position among the keys, i' = i + len_k - len_q (bottom-right; the mutant: top-left)."""
    i = np.asarray(i, np.int64)
    return i if 'top_left' in MUT else i + len_k - len_q


def kw_key_begin(w, i, len_q, len_k):
    ip = kw_aligned_row(i, len_q, len_k)
    left = w[0]
    return np.where((left < 0) | (ip <= left), 0, ip - left)


def kw_key_end(w, i, len_q, len_k):
    ip = kw_aligned_row(i, len_q, len_k)
    right = w[1]
    end = np.where((right < 0) | (right >= len_k - ip), len_k, ip + right + 1)
    begin = kw_key_begin(w, i, len_q, len_k)
    return np.where(end > begin, end, begin)


def key_begin(query, seq, w):
    return kw_key_begin(w, query, seq.len_q, seq.len_k)


def key_end(query, seq, w):
    return kw_key_end(w, query, seq.len_q, seq.len_k)


def tile_needs_mask(q0, rows, k0, cols, seq, w):
    last = min(q0 + rows, seq.len_q) - 1
    if 'mask_tail_only' in MUT:  # only the key tail counted
        return int(key_end(q0, seq, w)) < k0 + cols and k0 + cols > seq.len_k
    return int(key_begin(last, seq, w)) > k0 or int(key_end(q0, seq, w)) < k0 + cols


def precise_tanh(x, c):
    ft = c['ft']
    with np.errstate(over='ignore'):
        em = np.expm1((ft(-2) * np.abs(x)).astype(ft)).astype(ft)
        return np.copysign((-em / (ft(2) + em).astype(ft)).astype(ft), x).astype(ft)


def capped_score(s2, p, c):
    ft = c['ft']
    if p.softcap_log2 > 0:
        return (p.softcap_log2 * precise_tanh((s2 * p.inv_softcap_log2).astype(ft), c)).astype(ft)
    return s2


def load_tile(sm, dst, src, row_stride, valid_rows, D, kRows, kThreads, async_, c):
    """load_tile<T, D, kRows, kThreads>: thread threadIdx.x takes chunks threadIdx.x + i kThreads,
    all chunks at once here (one vector per chunk of 8 elements)."""
    kChunksPerRow = D * 2 // 16
    kChunks = kRows * kChunksPerRow
    kPitch = D + 8
    kElems = 8
    cc = np.arange(kChunks)
    tid = cc % kThreads
    r, col = cc // kChunksPerRow, (cc % kChunksPerRow) * kElems
    d = dst + r * kPitch + col
    valid = r < valid_rows
    if 'no_zero_fill' in MUT:
        valid = r >= 0
    el = np.arange(kElems)
    vals = np.zeros((kChunks, kElems))
    gidx = (r * row_stride + col)[valid]
    if async_ and not valid.all():  # src-size 0: nothing read, but `src` (the tile base) is passed
        if not (0 <= src[1] < src[0].size) or src[1] % kElems:
            raise DeviceAssert('cp.async zero-fill source (the tile base) outside its buffer or misaligned')
    if valid.any():
        if async_ and ((src[1] + gidx) % kElems).any():
            raise DeviceAssert('cp.async from a global address not 16-byte aligned')
        vals[valid] = gload(src, gidx[:, None] + el)
    st = c['stats']
    st['zero_filled_rows'] += int((~valid).sum()) // kChunksPerRow
    if async_:
        st['async_loads'] += 1
        sm.cp_async(d[:, None] + el, vals, tid[:, None])
    else:
        st['sync_loads'] += 1
        sm.write(d[:, None] + el, vals, tid[:, None])


# ---- the kernel's stages -----------------------------------------------------------------------
def load_kv_tile(sm, sK, sV, k, v, pages, p, seq, block, buf, C, c):
    n0 = block * C.kBlockN
    if pages is not None:  # kPaged: each row's cache block and row (paged_key), one lookup for K and V
        kChunksPerRow, kElems = C.kD * 2 // 16, 8
        cc = np.arange(C.kBlockN * kChunksPerRow)
        tid = cc % C.kThreads
        r, col = cc // kChunksPerRow, (cc % kChunksPerRow) * kElems
        key = n0 + r
        valid = key < seq.len_k
        page = key // p.block_size
        el = np.arange(kElems)
        st = c['stats']
        st['zero_filled_rows'] += 2 * int((~valid).sum()) // kChunksPerRow
        st['paged_rows'] += 2 * int(valid.sum()) // kChunksPerRow
        for base, src, strides in ((sK, k, p.k_strides), (sV, v, p.v_strides)):
            d = base + buf * C.kBlockN * C.kPitch + r * C.kPitch + col
            at = np.zeros(cc.size, np.int64)
            if valid.any():
                cache_block = gload(pages, page[valid] * p.block_table_strides[1]).astype(np.int64)
                row = key[valid] - page[valid] * p.block_size if 'paged_row' not in MUT else key[valid]
                at[valid] = cache_block * strides[0] + row * strides[1] + col[valid]
            # cp.async whatever p.aligned16 (q's alignment): the route checked the caches' rows.
            vals = np.zeros((cc.size, kElems))
            if not (0 <= src[1] < src[0].size) or src[1] % kElems or ((src[1] + at) % kElems).any():
                raise DeviceAssert('cp.async source outside its buffer or not 16-byte aligned')
            if valid.any():
                vals[valid] = gload(src, at[valid][:, None] + el)
            st['async_loads'] += 1
            sm.cp_async(d[:, None] + el, vals, tid[:, None])
        return
    load_tile(sm, sK + buf * C.kBlockN * C.kPitch, (k[0], k[1] + n0 * p.k_strides[1]), p.k_strides[1],
              seq.len_k - n0, C.kD, C.kBlockN, C.kThreads, p.aligned16, c)
    load_tile(sm, sV + buf * C.kBlockN * C.kPitch, (v[0], v[1] + n0 * p.v_strides[1]), p.v_strides[1],
              seq.len_k - n0, C.kD, C.kBlockN, C.kThreads, p.aligned16, c)


def score_tile(sm, q_frag, sQ, warp_row0, k_tile, warp, C, c):
    """S = Q K^T: s[mt][nt] = (4, 32) accumulators of m-tile mt, n-tile nt."""
    ft = c['ft']
    s = np.zeros((C.kMTiles, C.kNTiles, 4, 32), ft)
    for kc in range(C.kDChunks):
        a = []
        for mt in range(C.kMTiles):
            if C.kQInRegisters:
                a.append(q_frag[mt][kc])
            else:
                a.append(load_a(sm, sQ, C.kPitch, warp_row0 + mt * 16, kc * 16, warp))
        for nt in range(0, C.kNTiles, 2):
            b0, b1 = load_b_pair_nk(sm, k_tile, C.kPitch, nt * 8, kc * 16, warp)
            for mt in range(C.kMTiles):
                s[mt][nt] = mma_m16n8k16(s[mt][nt], a[mt], b0, ft)
                s[mt][nt + 1] = mma_m16n8k16(s[mt][nt + 1], a[mt], b1, ft)
    return s


def scale_and_mask(s, p, seq, rows, n0, masked, C, c):
    """s: (kNTiles, 4, 32) of one m-tile; rows: (2, 32) this lane's rows g, g + 8."""
    ft = c['ft']
    with np.errstate(invalid='ignore', over='ignore'):
        s2 = (s * p.scale_log2).astype(ft)
    s[:] = capped_score(s2, p, c) if 'cap_after_mask' not in MUT else s2
    if not masked:
        return
    for r in range(2):
        lo, hi = key_begin(rows[r], seq, p.window), key_end(rows[r], seq, p.window)
        if 'mask_lo' in MUT:
            lo = np.zeros_like(lo)
        for nt in range(C.kNTiles):
            for e in range(2 * r, 2 * r + 2):
                key = n0 + nt * 8 + 2 * TIG + e % 2
                s[nt][e] = np.where((key < lo) | (key >= hi), ft(-np.inf), s[nt][e])
    if 'cap_after_mask' in MUT:  # the softcap applied after the mask: masked scores become -softcap
        with np.errstate(invalid='ignore', over='ignore'):
            s[:] = capped_score(s, p, c)


def online_softmax(s, state, o_acc, C, c):
    """s: (kNTiles, 4, 32); state: dict max/sum (2, 32); o_acc: (kDTiles, 4, 32), all of one m-tile."""
    ft = c['ft']
    for r in range(2):
        mx = state['max'][r].copy()
        for nt in range(C.kNTiles):
            mx = np.fmax(mx, np.fmax(s[nt][2 * r], s[nt][2 * r + 1]))
        if 'no_quad_max' not in MUT:
            mx = np.fmax(mx, mx[LANES ^ 1])  # __shfl_xor_sync(.., 1)
            mx = np.fmax(mx, mx[LANES ^ 2])
        base = np.where(mx == -np.inf, ft(0), mx).astype(ft)
        with np.errstate(invalid='ignore'):
            alpha = np.exp2((state['max'][r] - base).astype(ft)).astype(ft)
        state['max'][r] = mx
        ssum = np.zeros(32, ft)
        for nt in range(C.kNTiles):
            with np.errstate(invalid='ignore'):
                s[nt][2 * r] = np.exp2((s[nt][2 * r] - base).astype(ft)).astype(ft)
                s[nt][2 * r + 1] = np.exp2((s[nt][2 * r + 1] - base).astype(ft)).astype(ft)
            ssum = (ssum + (s[nt][2 * r] + s[nt][2 * r + 1]).astype(ft)).astype(ft)
        # rows.sum * alpha + sum: one FMA (the product exact in float64, one rounding to ft)
        state['sum'][r] = (state['sum'][r].astype(np.float64) * alpha.astype(np.float64) + ssum).astype(ft)
        if 'no_alpha' not in MUT:
            o_acc[:, 2 * r] = (o_acc[:, 2 * r] * alpha).astype(ft)
            o_acc[:, 2 * r + 1] = (o_acc[:, 2 * r + 1] * alpha).astype(ft)


def accumulate_pv(o_acc, s, sm, v_tile, warp, C, c):
    """o_acc: (kMTiles, kDTiles, 4, 32); s: (kMTiles, kNTiles, 4, 32) probabilities."""
    ft = c['ft']
    for kc in range(C.kNChunks):
        a = [pack_a_from_acc(s[mt][2 * kc], s[mt][2 * kc + 1], c['T'], c['round']) for mt in range(C.kMTiles)]
        for dt in range(0, C.kDTiles, 2):
            b0, b1 = load_b_pair_kn(sm, v_tile, C.kPitch, kc * 16, dt * 8, warp)
            for mt in range(C.kMTiles):
                o_acc[mt][dt] = mma_m16n8k16(o_acc[mt][dt], a[mt], b0, ft)
                o_acc[mt][dt + 1] = mma_m16n8k16(o_acc[mt][dt + 1], a[mt], b1, ft)


def write_back(o_acc, state, p, b, head, rows, C, c):
    """One m-tile: o_acc (kDTiles, 4, 32), state max/sum (2, 32), rows (2, 32)."""
    ft = c['ft']
    seq = sequence(p, b)
    for r in range(2):
        ssum = state['sum'][r]
        if 'no_quad_sum' not in MUT:
            ssum = (ssum + ssum[LANES ^ 1]).astype(ft)
            ssum = (ssum + ssum[LANES ^ 2]).astype(ft)
        live = rows[r] < seq.len_q  # `continue` for the others
        if not live.any():
            continue
        saw = ssum != 0
        with np.errstate(divide='ignore', invalid='ignore'):
            inv = (ft(1) / ssum).astype(ft)
        out_row = offset(p.out_strides, b, seq.start_q, rows[r], head)  # (32,)
        for dt in range(C.kDTiles):
            for j in range(2):
                with np.errstate(invalid='ignore'):
                    val = (o_acc[dt][2 * r + j] * inv).astype(ft)
                val = rnd(val, c['T']) if c['round'] else val.astype(np.float64)  # pack2<T>
                val = np.where(saw, val, 0.0)
                idx = out_row + dt * 8 + 2 * TIG + j
                gstore(p.out, idx[live], val[live], p.out_count)
        with np.errstate(divide='ignore', invalid='ignore'):
            lg = np.log2(ssum).astype(ft)  # __log2f
            lse = ((state['max'][r] + lg).astype(ft) * (c['ln2'] if 'lse_no_ln2' not in MUT else ft(1))).astype(ft)
        lse = np.where(saw, lse, ft(0))
        sel = live & (TIG == 0)
        gstore(p.lse, lse_offset(p, b, seq, rows[r][sel], head), lse[sel], p.lse_count)


def attention_forward_cta(p, C, blockIdx, gridDim_x, c):
    """One CTA of attention_forward_tc_kernel<T, D, kTile>; warps run one after another between
    barriers, lanes as 32-wide vectors; every thread's cp.async of a stage issued together."""
    ft = c['ft']
    st = c['stats']
    P = C.kPitch
    sm = Smem(C.kSmemElems, 'smem_raw')
    sQ = 0
    sK = sQ + C.kBlockM * P
    sV = sK + 2 * C.kBlockN * P

    bx, head, b = blockIdx
    seq = sequence(p, b)
    m0 = (gridDim_x - 1 - bx) * C.kBlockM
    if m0 >= seq.len_q:
        st['idle_ctas'] += 1
        return
    st['ctas'] += 1
    kv_head = head // p.group
    q = (p.q[0], p.q[1] + offset(p.q_strides, b, seq.start_q, m0, head))
    pages = None
    if p.block_table is not None:  # kPaged: the kv head's element 0 in cache block 0
        k = (p.k[0], p.k[1] + kv_head * p.k_strides[2])
        v = (p.v[0], p.v[1] + kv_head * p.v_strides[2])
        pages = (p.block_table, b * p.block_table_strides[0])
    else:
        k = (p.k[0], p.k[1] + offset(p.k_strides, b, seq.start_k, 0, kv_head))
        v = (p.v[0], p.v[1] + offset(p.v_strides, b, seq.start_k, 0, kv_head))

    rows_end = min(m0 + C.kBlockM, seq.len_q)
    first_key_block = int(key_begin(m0, seq, p.window)) // C.kBlockN
    last_row = rows_end - 1 if 'last_row_m0' not in MUT else m0
    n_key_blocks = max(0, tiles_of(int(key_end(last_row, seq, p.window)), C.kBlockN) - first_key_block)
    st['partial_row_tile'] += rows_end - m0 < C.kBlockM
    st['skipped_lead_blocks'] += first_key_block > 0
    st['no_key_ctas'] += n_key_blocks == 0
    st['tiles'] += n_key_blocks
    st['key_tail'] += n_key_blocks > 0 and (first_key_block + n_key_blocks) * C.kBlockN > seq.len_k

    load_tile(sm, sQ, q, p.q_strides[1], seq.len_q - m0, C.kD, C.kBlockM, C.kThreads, p.aligned16, c)
    if n_key_blocks > 0:
        load_kv_tile(sm, sK, sV, k, v, pages, p, seq, first_key_block, 0, C, c)
    sm.commit()

    rows, o_acc, state, q_frag = [], [], [], []
    for warp in range(C.kWarps):
        warp_row0 = warp * C.kRowsPerWarp
        r_ = np.empty((C.kMTiles, 2, 32), np.int64)
        for mt in range(C.kMTiles):
            r_[mt][0] = m0 + warp_row0 + mt * 16 + GID
            r_[mt][1] = r_[mt][0] + 8
        rows.append(r_)
        o_acc.append(np.zeros((C.kMTiles, C.kDTiles, 4, 32), ft))
        state.append([dict(max=np.full((2, 32), -np.inf, ft), sum=np.zeros((2, 32), ft)) for _ in range(C.kMTiles)])
        q_frag.append(None)
        st['blind_rows'] += int(((r_ < seq.len_q) & (key_end(r_, seq, p.window) <= key_begin(r_, seq, p.window)))
                                [:, :, TIG == 0].sum())

    if 'q_frag_early' in MUT and C.kQInRegisters and n_key_blocks > 0:  # before the first wait + barrier
        for warp in range(C.kWarps):
            q_frag[warp] = [[load_a(sm, sQ, P, warp * C.kRowsPerWarp + mt * 16, kc * 16, warp)
                             for kc in range(C.kDChunks)] for mt in range(C.kMTiles)]
    for it in range(n_key_blocks):
        if 'no_wait' not in MUT:
            sm.wait(0)
        sm.barrier()  # __syncthreads()
        if C.kQInRegisters and it == 0 and 'q_frag_early' not in MUT:
            for warp in range(C.kWarps):
                warp_row0 = warp * C.kRowsPerWarp
                q_frag[warp] = [[load_a(sm, sQ, P, warp_row0 + mt * 16, kc * 16, warp) for kc in range(C.kDChunks)]
                                for mt in range(C.kMTiles)]
        if it + 1 < n_key_blocks:
            buf = (it + 1) % 2 if 'ring_stage' not in MUT else it % 2
            load_kv_tile(sm, sK, sV, k, v, pages, p, seq, first_key_block + it + 1, buf, C, c)
        sm.commit()

        k_tile = sK + (it % 2) * C.kBlockN * P
        v_tile = sV + (it % 2) * C.kBlockN * P
        n0 = (first_key_block + it) * C.kBlockN
        masked = tile_needs_mask(m0, C.kBlockM, n0, C.kBlockN, seq, p.window)
        st['masked_tiles'] += masked
        st['unmasked_tiles'] += not masked
        for warp in range(C.kWarps):
            warp_row0 = warp * C.kRowsPerWarp
            s = score_tile(sm, q_frag[warp], sQ, warp_row0, k_tile, warp, C, c)
            for mt in range(C.kMTiles):
                scale_and_mask(s[mt], p, seq, rows[warp][mt], n0, masked, C, c)
                online_softmax(s[mt], state[warp][mt], o_acc[warp][mt], C, c)
            accumulate_pv(o_acc[warp], s, sm, v_tile, warp, C, c)
    sm.wait(0)
    for warp in range(C.kWarps):
        for mt in range(C.kMTiles):
            write_back(o_acc[warp][mt], state[warp][mt], p, b, head, rows[warp][mt], C, c)


# ---- host ----------------------------------------------------------------------------------------
COVERAGE = ['ctas', 'idle_ctas', 'tiles', 'masked_tiles', 'unmasked_tiles', 'skipped_lead_blocks', 'no_key_ctas',
            'key_tail', 'zero_filled_rows', 'blind_rows', 'partial_row_tile', 'async_loads', 'sync_loads', 'paged_rows']


def attention_forward_tc(case, mode):
    """attention_forward_cuda -> launch_forward_tc<T>: make_params, choose_forward_tile on the
    case's device limits, the grid (ceil(seq_q / block_m), n_q_heads, batch) of CTAs.
    Returns (out buffer, lse buffer, params)."""
    ft = np.float64 if mode == 'exact' else np.float32
    c = dict(ft=ft, round=mode == 'kernel', T=case['T'], stats=dict.fromkeys(COVERAGE, 0))
    pr = case['params']
    p = Params()
    for k_, v_ in pr.items():
        setattr(p, k_, v_)
    bufs = case['buffers']
    p.q, p.k, p.v = (bufs['q'], pr['q_base']), (bufs['k'], pr['k_base']), (bufs['v'], pr['v_base'])
    p.cu_seqlens_q, p.cu_seqlens_k = bufs.get('cu_q'), bufs.get('cu_k')
    p.key_lengths = bufs.get('key_lengths')
    # attention_forward_cuda: a paged cache's table and block size (k's dim 1).
    p.block_table = bufs.get('block_table')
    p.block_table_strides = pr.get('block_table_strides')
    p.block_size = pr.get('block_size')
    scale, softcap = pr['scale'], pr['softcap']
    if mode == 'exact':
        p.scale_log2 = scale / math.log(2)
        p.softcap_log2 = softcap / math.log(2)
        p.inv_softcap_log2 = 1 / p.softcap_log2 if softcap > 0 else 0.0
        c['ln2'] = math.log(2)
    else:
        kLog2e = float(np.float32(1.4426950408889634))
        p.scale_log2 = np.float32(scale * kLog2e)
        p.softcap_log2 = np.float32(softcap * kLog2e)
        p.inv_softcap_log2 = np.float32(np.float32(1) / p.softcap_log2) if softcap > 0 else np.float32(0)
        c['ln2'] = np.float32(0.69314718055994531)
    # make_key_window (longest = seq_q + seq_k) then make_params' clamps to seq_k / seq_q.
    left, right = pr['window']
    right = 0 if pr['causal'] else right
    longest = p.seq_q + p.seq_k
    left, right = min(left, longest), min(right, longest)
    p.window = (min(left, p.seq_k), min(right, p.seq_q))
    p.aligned16 = all(rows_aligned16(pr[n + '_base'], pr[n + '_strides'], pr['varlen']) for n in 'qkv')
    p.tile = choose_forward_tile(p.head_dim, LIMITS[case['arch']])
    assert p.tile >= 0
    C = FwdConfig(p.tile)
    out = np.full(bufs['out_size'], np.nan)
    lse = np.full(bufs['lse_size'], np.nan)
    p.out, p.lse = (out, 0), (lse, 0)
    p.out_count, p.lse_count = np.zeros(out.size, int), np.zeros(lse.size, int)
    grid = (tiles_of(p.seq_q, C.kBlockM), p.n_q_heads, p.batch)
    if not (grid[0] == 0 or grid[1] == 0 or grid[2] == 0):  # grid_empty
        for bz in range(grid[2]):
            for by in range(grid[1]):
                for bx in range(grid[0]):
                    attention_forward_cta(p, C, (bx, by, bz), grid[0], c)
    p.stats = c['stats']
    p.C = C
    return out, lse, p


def rows_aligned16(base, strides, varlen):
    """rows_aligned16: base 16-byte aligned (buffers are) and every non-head_dim stride a multiple
    of 8 elements; varlen tensors have no batch stride."""
    st = strides[1:] if varlen else strides
    return base % 8 == 0 and all(s % 8 == 0 for s in st)


# ---- test cases and the float64 reference -------------------------------------------------------
def make_case(name, T, D, arch, n_kv, G, lens_q, lens_k, varlen=False, causal=False, window=(-1, -1), softcap=0.0,
              scale=None, q_pad=0, kv_pad=0, guard=3, seed=0, capacity=None, block_size=None):
    """Batched (varlen=False): every sequence has lens_q[0] / lens_k[0]; q [B, seq_q + guard, H,
    D + q_pad], k/v [B, seq_k + guard, KV, D + kv_pad], the guard rows and pad columns NaN.
    With a capacity: KV caches (gqa_attention_with_kvcache's prefill route), seq_k = capacity and
    sequence b holds key_lengths[b] = lens_k[b] keys, its rows past them NaN; with a block_size
    too, paged: k/v [num_blocks, block_size, KV, D + kv_pad], the ceil(capacity / block_size)
    pages of each sequence shuffled over the pool with two NaN spare blocks, block_table
    [B, max_blocks] (-1 past each sequence's last page: never to be read).
    Varlen: q [total_q + guard, H, D + q_pad] etc., cu_seqlens from the lengths."""
    rng = np.random.default_rng(seed)
    B = len(lens_q)
    H = n_kv * G
    scale = D ** -0.5 if scale is None else scale
    rt = lambda *shape: rnd(rng.standard_normal(shape), T)
    qs = [rt(lq, H, D) for lq in lens_q]
    ks = [rt(lk, n_kv, D) for lk in lens_k]
    vs = [rt(lk, n_kv, D) for lk in lens_k]
    bufs, pr = {}, {}
    if not varlen:
        assert len(set(lens_q)) == 1 and (capacity is not None or len(set(lens_k)) == 1)
        seq_q, seq_k = lens_q[0], (lens_k[0] if capacity is None else capacity)
        if capacity is not None:
            assert max(lens_k) <= capacity
            bufs['key_lengths'] = np.array(lens_k, np.int64)
        for n, xs, L, heads, pad in (('q', qs, seq_q, H, q_pad), ('k', ks, seq_k, n_kv, kv_pad),
                                     ('v', vs, seq_k, n_kv, kv_pad)):
            buf = np.full((B, L + guard, heads, D + pad), np.nan)
            for b in range(B):
                buf[b, :len(xs[b]), :, :D] = xs[b]
            bufs[n] = buf.reshape(-1)
            pr[n + '_strides'] = ((L + guard) * heads * (D + pad), heads * (D + pad), D + pad)
            pr[n + '_base'] = 0
        if block_size is not None:
            assert capacity is not None
            max_blocks = -(-capacity // block_size)
            num_blocks = B * max_blocks + 2
            perm = rng.permutation(num_blocks)[:B * max_blocks].reshape(B, max_blocks)
            table = np.full((B, max_blocks), -1, np.int64)
            for n, xs in (('k', ks), ('v', vs)):
                pool = np.full((num_blocks, block_size, n_kv, D + kv_pad), np.nan)
                for b in range(B):
                    for page in range(-(-len(xs[b]) // block_size)):
                        rows = xs[b][page * block_size:(page + 1) * block_size]
                        pool[perm[b, page], :len(rows), :, :D] = rows
                        table[b, page] = perm[b, page]
                bufs[n] = pool.reshape(-1)
                pr[n + '_strides'] = (block_size * n_kv * (D + kv_pad), n_kv * (D + kv_pad), D + kv_pad)
            bufs['block_table'] = table.reshape(-1)
            pr.update(block_table_strides=(max_blocks, 1), block_size=block_size)
        pr['out_strides'] = (seq_q * H * D, H * D, D)
        bufs['out_size'] = B * seq_q * H * D
        bufs['lse_size'] = B * H * seq_q
        pr.update(lse_batch=H * seq_q, lse_head=seq_q)
    else:
        seq_q, seq_k = max(lens_q), max(lens_k)  # max_seqlen_q / max_seqlen_k
        cu_q, cu_k = np.concatenate([[0], np.cumsum(lens_q)]), np.concatenate([[0], np.cumsum(lens_k)])
        for n, xs, tot, heads, pad in (('q', qs, cu_q[-1], H, q_pad), ('k', ks, cu_k[-1], n_kv, kv_pad),
                                       ('v', vs, cu_k[-1], n_kv, kv_pad)):
            buf = np.full((tot + guard, heads, D + pad), np.nan)
            if tot:
                buf[:tot, :, :D] = np.concatenate(xs)
            bufs[n] = buf.reshape(-1)
            pr[n + '_strides'] = (0, heads * (D + pad), D + pad)
            pr[n + '_base'] = 0
        bufs['cu_q'], bufs['cu_k'] = cu_q.astype(np.int64), cu_k.astype(np.int64)
        total_q = int(cu_q[-1])
        pr['out_strides'] = (0, H * D, D)
        bufs['out_size'] = total_q * H * D
        bufs['lse_size'] = H * total_q
        pr.update(lse_batch=0, lse_head=total_q)
    pr.update(T=T, batch=B, seq_q=seq_q, seq_k=seq_k, n_q_heads=H, n_kv_heads=n_kv, group=G, head_dim=D, scale=scale,
              softcap=softcap, window=window, causal=causal, varlen=varlen)
    ref = dict(qs=qs, ks=ks, vs=vs, G=G, causal=causal, window=window, softcap=softcap, scale=scale)
    return dict(name=name, T=T, arch=arch, buffers=bufs, params=pr, ref=ref)


def reference(rf):
    """float64 per sequence: (out [len_q, H, D], lse [H, len_q], out_abs [len_q, H, D]), the
    semantics of attention.h / attention_window.h: bottom-right causal / window, softcap, rows
    that see nothing give 0 and lse 0. out_abs = sum_j p_j |v_j| / l (the scale of P's rounding)."""
    res = []
    left, right = rf['window']
    right = 0 if rf['causal'] else right
    for q, k, v in zip(rf['qs'], rf['ks'], rf['vs']):
        Lq, H, D = q.shape
        Lk = k.shape[0]
        out, lse, oabs = np.zeros((Lq, H, D)), np.zeros((H, Lq)), np.zeros((Lq, H, D))
        ii = np.arange(Lq)[:, None] + Lk - Lq
        jj = np.arange(Lk)[None, :]
        vis = np.ones((Lq, Lk), bool)
        if left >= 0:
            vis &= jj >= ii - left
        if right >= 0:
            vis &= jj <= ii + right
        seen = vis.any(1)
        for h in range(H):
            kh, vh = k[:, h // rf['G']], v[:, h // rf['G']]
            s = rf['scale'] * q[:, h] @ kh.T
            if rf['softcap'] > 0:
                s = rf['softcap'] * np.tanh(s / rf['softcap'])
            s = np.where(vis, s, -np.inf)
            mx = np.where(seen, s.max(1, initial=-np.inf), 0)
            pp = np.where(vis, np.exp(s - mx[:, None]), 0)
            l = np.where(seen, pp.sum(1), 1)
            out[:, h] = np.where(seen[:, None], pp @ vh / l[:, None], 0)
            oabs[:, h] = np.where(seen[:, None], pp @ np.abs(vh) / l[:, None], 0)
            lse[h] = np.where(seen, mx + np.log(l), 0)
        res.append((out, lse, oabs))
    return res


def torch_reference(case):
    """llama_ext/reference.py's gqa_attention_reference on the same (batched) inputs
    (ptx_emu.reference_module)."""
    import torch
    mod = ptx_emu.reference_module()
    rf = case['ref']
    t = lambda xs: torch.from_numpy(np.stack(xs))
    out, lse = mod.gqa_attention_reference(t(rf['qs']), t(rf['ks']), t(rf['vs']), causal=rf['causal'],
                                           scale=rf['scale'], window_size=tuple(rf['window']), softcap=rf['softcap'])
    return out.numpy(), lse.numpy()


def gather(case, out, lse):
    """The emulated out / lse per sequence, in the reference's layout."""
    pr, bufs = case['params'], case['buffers']
    H, D, B = pr['n_q_heads'], pr['head_dim'], pr['batch']
    res = []
    for b in range(B):
        if pr['varlen']:
            q0, q1 = int(bufs['cu_q'][b]), int(bufs['cu_q'][b + 1])
            total = int(bufs['cu_q'][-1])
            o = out.reshape(total, H, D)[q0:q1]
            l_ = lse.reshape(H, total)[:, q0:q1]
        else:
            o = out.reshape(B, pr['seq_q'], H, D)[b]
            l_ = lse.reshape(B, H, pr['seq_q'])[b]
        res.append((o, l_))
    return res


def cases():
    C = []
    # One case (at least) per entry of kFwdTiles: sm80 (= sm90's choice) and sm86 (~100 KB parts).
    # tile 0: D = 32, 128 x 64, 4 warps x 32 rows, Q in registers. Causal, seq_q == seq_k = 150
    # (neither a multiple of 128 nor of 64), GQA group 2.
    C.append(make_case('t0 d32 sm80 causal G2 150/150', 'bf16', 32, 'sm80', 1, 2, [150], [150], causal=True, seed=1))
    # tile 1: D = 64, 128 x 64 (sm80/sm90). Bottom-right causal with seq_q < seq_k, batch 2, fp16.
    C.append(make_case('t1 d64 sm80 causal 70/200 B2', 'fp16', 64, 'sm80', 1, 1, [70, 70], [200, 200], causal=True,
                       seed=2))
    # tile 2: D = 64, 128 x 32 (100 KB parts). seq_q > seq_k causal (rows that see nothing), G3.
    C.append(make_case('t2 d64 sm86 causal seq_q>seq_k 140/45 G3', 'bf16', 64, 'sm86', 1, 3, [140], [45],
                       causal=True, seed=3))
    # tile 3: D = 80, 8 warps x 16 rows, Q from smem. Non-causal window (20, 7), softcap, 100/90.
    C.append(make_case('t3 d80 sm86 window(20,7) softcap30 100/90', 'fp16', 80, 'sm86', 2, 1, [100], [90],
                       window=(20, 7), softcap=30.0, seed=4))
    # tile 4: D = 96. Varlen, 3 sequences (one with no keys, one empty query), causal, softcap 5.
    C.append(make_case('t4 d96 sm80 varlen causal softcap5', 'bf16', 96, 'sm80', 1, 2, [37, 0, 5, 100],
                       [60, 5, 0, 91], varlen=True, causal=True, softcap=5.0, seed=5))
    # tile 5: D = 128, 4 warps x 32 rows, Q from smem (sm80/sm90). Causal + window 40, G2, 160/170.
    C.append(make_case('t5 d128 sm80 causal window40 G2 160/170', 'bf16', 128, 'sm80', 1, 2, [160], [170],
                       causal=True, window=(40, -1), seed=6))
    # tile 6: D = 128, 8 warps x 16 rows, Q in registers (100 KB parts). Non-causal, 20/77,
    # q rows padded by 4 elements: rows not 16-byte aligned, so every tile loads through registers.
    C.append(make_case('t6 d128 sm86 noncausal unaligned 20/77', 'fp16', 128, 'sm86', 2, 1, [20], [77], q_pad=4,
                       seed=7))
    # tile 7: D = 256, 64 x 32, 4 warps x 16 rows. Causal, softcap, 70/70, k/v head-dim padding.
    C.append(make_case('t7 d256 sm90 causal softcap20 70/70 kvpad', 'bf16', 256, 'sm90', 1, 1, [70], [70],
                       causal=True, softcap=20.0, kv_pad=8, seed=8))
    # tile 5 again on sm90 limits, non-causal window (0, 3) (right only), varlen G4.
    C.append(make_case('t5 d128 sm90 varlen window(0,3) G4', 'fp16', 128, 'sm90', 1, 4, [33, 9], [40, 70],
                       varlen=True, window=(0, 3), seed=9))
    # tile 1 over KV caches (the prefill route of gqa_attention_with_kvcache): capacity 160, each
    # sequence its own length read from key_lengths (one longer than seq_q, one empty, one shorter,
    # whose first rows see nothing), causal with a window; the cache rows past each length NaN.
    C.append(make_case('t1 d64 sm90 cache lengths [150, 0, 37] cap 160 causal window50', 'bf16', 64, 'sm90', 2, 2,
                       [130, 130, 130], [150, 0, 37], causal=True, window=(50, -1), capacity=160, seed=11))
    # The same over a paged cache of 17-token blocks (a 64-key tile spans 4-5 of them, none
    # aligned to it), 10 pages per sequence, unused entries -1.
    C.append(make_case('t1 d64 sm90 paged17 lengths [150, 0, 37] cap 160 causal window50', 'fp16', 64, 'sm90', 2, 2,
                       [130, 130, 130], [150, 0, 37], causal=True, window=(50, -1), capacity=160, block_size=17,
                       seed=12))
    # tile 6 over a paged cache of 16-token blocks (2 per 32-key tile), q rows unaligned (q through
    # registers, the paged K/V still by cp.async), non-causal, a sequence ending mid-block.
    C.append(make_case('t6 d128 sm86 paged16 unaligned q lengths [77, 64]', 'bf16', 128, 'sm86', 2, 1, [40, 40],
                       [77, 64], capacity=96, block_size=16, q_pad=4, seed=13))
    # tile 2 again: D = 64 on a 100 KB part, non-causal, seq_k = 1, plain.
    C.append(make_case('t2 d64 sm86 noncausal 50/1 B2', 'fp16', 64, 'sm86', 2, 1, [50, 50], [1, 1], seed=10))
    return C


UNIT_ROUNDOFF = {'bf16': 2.0 ** -8, 'fp16': 2.0 ** -11}


def compare(case, out, lse, p, refs, mode):
    """exact: |err| <= 1e-13; fp32: <= 1e-5; kernel: out |err| <= 1.5 u_T (out_abs + |out|) + 1e-5,
    lse <= 1e-5; every out/lse element written exactly once."""
    eo = el = 0.0
    nan = 0
    ok = bool((p.out_count == 1).all() and (p.lse_count == 1).all())
    for (o, l_), (ro, rl, rabs) in zip(gather(case, out, lse), refs):
        if mode == 'exact':
            bound, ltol = 1e-13, 1e-13
        elif mode == 'fp32':
            bound, ltol = 1e-5, 1e-5
        else:
            bound, ltol = 1.5 * UNIT_ROUNDOFF[case['T']] * (rabs + np.abs(ro)) + 1e-5, 1e-5
        err = np.abs(o - ro)
        nan += int(np.isnan(o).sum() + np.isnan(l_).sum())
        if o.size:
            eo = max(eo, float(np.nan_to_num(err, nan=np.inf).max()))
            ok &= bool((err <= bound).all())
        if l_.size:
            e2 = float(np.nan_to_num(np.abs(l_ - rl), nan=np.inf).max())
            el = max(el, e2)
            ok &= e2 <= ltol
    ok &= nan == 0
    return ok, eo, el, nan


def ptx_selftest():
    """The fragment facts the kernel relies on, on ptx_emu's instructions: S's accumulators of
    n-tiles 2j, 2j + 1 are the A fragment of k-chunk j (pack_a_from_acc), and ldmatrix.x4 of K
    rows / .x4.trans of V rows give B of Q K^T / P V."""
    rng = np.random.default_rng(321)
    ld = 24
    sm = Smem(2 * 16 * ld, 'selftest')
    Q, K = rng.standard_normal((16, 16)), rng.standard_normal((16, 16))
    idx = np.arange(16)[:, None] * ld + np.arange(16)
    sm.write(idx, Q, 0); sm.write(16 * ld + idx, K, 0)
    sm.barrier()
    a = load_a(sm, 0, ld, 0, 0, 0)
    S = np.zeros((2, 4, 32))
    b0, b1 = load_b_pair_nk(sm, 16 * ld, ld, 0, 0, 0)
    S[0], S[1] = mma_m16n8k16(S[0], a, b0, np.float64), mma_m16n8k16(S[1], a, b1, np.float64)
    full = np.empty((16, 16))
    full[C_ROW, C_COL], full[C_ROW, C_COL + 8] = S[0], S[1]
    assert np.allclose(full, Q @ K.T, atol=1e-12)
    pa = pack_a_from_acc(S[0], S[1], 'bf16', False)
    O = np.zeros((2, 4, 32))
    c0, c1 = load_b_pair_kn(sm, 16 * ld, ld, 0, 0, 0)
    O[0], O[1] = mma_m16n8k16(O[0], pa, c0, np.float64), mma_m16n8k16(O[1], pa, c1, np.float64)
    full[C_ROW, C_COL], full[C_ROW, C_COL + 8] = O[0], O[1]
    assert np.allclose(full, (Q @ K.T) @ K, atol=1e-10)


def run_cases(names=None, modes=('exact', 'fp32', 'kernel'), verbose=True):
    t0 = time.time()
    static_asserts()
    ptx_selftest()
    failures, results = [], []
    if verbose:
        for arch, lim in LIMITS.items():
            print(f'     {arch}: ' + ', '.join(f'D={d}: tile {choose_forward_tile(d, lim)}' for d in kHeadDims))
    all_cases = cases()
    if names:
        all_cases = [cs for cs in all_cases if any(n in cs['name'] for n in names)]
    tiles_run = set()
    have_torch = True
    coverage = dict.fromkeys(COVERAGE, 0)
    for case in all_cases:
        refs = reference(case['ref'])
        if have_torch and not case['params']['varlen'] and 'key_lengths' not in case['buffers']:
            try:
                to, tl_ = torch_reference(case)
            except ImportError:
                have_torch = False
            else:
                ro = np.stack([r[0] for r in refs]); rl = np.stack([r[1] for r in refs])
                d = max(np.abs(to - ro).max(), np.abs(tl_ - rl).max())
                if not d <= 1e-12:
                    failures.append(f"{case['name']}: this file's reference != llama_ext/reference.py's by {d:.1e}")
                if verbose:
                    print(f"     {case['name']:<46} reference vs llama_ext/reference.py: {d:.1e}")
        for mode in modes:
            t1 = time.time()
            try:
                out, lse, p = attention_forward_tc(case, mode)
            except AssertionError as ex:
                failures.append(f"{case['name']} {mode}: {type(ex).__name__}: {ex}")
                if verbose:
                    print(f"FAIL {case['name']} {mode}: {type(ex).__name__}: {ex}")
                continue
            ok, eo, el, nan = compare(case, out, lse, p, refs, mode)
            tiles_run.add(p.tile)
            for k_ in COVERAGE:
                coverage[k_] += p.stats[k_]
            results.append((case['name'], p.tile, mode, eo, el, nan, ok))
            if verbose:
                C = p.C
                print(f"{'ok  ' if ok else 'FAIL'} {case['name']:<46} {case['T']} tile {p.tile} ({C.kBlockM}x{C.kBlockN} "
                      f"{C.kWarps}w x {C.kRowsPerWarp} {'qreg' if C.kQInRegisters else 'qsmem'}) {mode:<6} "
                      f"out {eo:.1e} lse {el:.1e} nan={nan} ctas={p.stats['ctas']} tiles={p.stats['tiles']} "
                      f"({time.time() - t1:.2f}s)", flush=True)
            if not ok:
                failures.append(f"{case['name']} {mode}: out {eo:.2e} lse {el:.2e} nan {nan}")
    if verbose:
        for mode in modes:
            rs = [r for r in results if r[2] == mode]
            if rs:
                print(f'     {mode:<6}: max out err {max(r[3] for r in rs):.1e}, max lse err {max(r[4] for r in rs):.1e}')
    every = set(range(kNumFwdTiles))
    unrun = [f'tile configurations never run: {sorted(every - tiles_run)}'] if tiles_run != every else []
    return ptx_emu.finish_runs(results, failures, coverage, t0, not names, unrun, verbose)


MUTANTS = ['no_zero_fill', 'ring_stage', 'no_wait', 'q_frag_early', 'mask_lo', 'top_left', 'mask_tail_only',
           'last_row_m0', 'cap_after_mask', 'no_quad_max', 'no_alpha', 'no_quad_sum', 'lse_no_ln2', 'ldm_b_addr',
           'p_layout', 'paged_row']


def check_mutants(verbose=True):
    """Each injected bug must make some small case fail (error, race, assert, NaN or mismatch)."""
    picks = [cs for cs in cases() if cs['name'].startswith(('t2 d64 sm86 causal', 't3 ', 't1 '))]
    refs = [reference(cs['ref']) for cs in picks]

    def find_failure(mut):
        for cs, ref in zip(picks, refs):
            try:
                out, lse, p = attention_forward_tc(cs, 'exact')
            except AssertionError as ex:
                return f"{type(ex).__name__}: {str(ex)[:70]} ({cs['name'][:14]})"
            ok, eo, el, nan = compare(cs, out, lse, p, ref, 'exact')
            if not ok:
                return f"out err {eo:.1e}, lse err {el:.1e}, nan {nan} ({cs['name'][:14]})"
        return None

    return ptx_emu.check_mutants(MUTANTS, find_failure, verbose)


if __name__ == '__main__':
    ptx_emu.main(run_cases, check_mutants)
