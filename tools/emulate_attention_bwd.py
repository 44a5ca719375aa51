"""Lane-level numpy emulation of the tensor-core attention backward of gqa_attention_backward.

What: a transcription, step by step and lane by lane, of csrc/cuda/attention_bwd.cu for float16 /
bfloat16: `attention_backward_delta_kernel` (delta = rowsum(dO * O), one warp per (row, head),
warp_reduce<SumOp>), `attention_backward_tc_kernel<T, C>` for every BwdConfig the launcher can pick
(BwdConfigs: D = 32 / 64 on 128 keys x 64 queries, D = 96 / 128 on 128 x 32 (8 warps), D = 80 and
D = 128 on ~100 KB parts on 64 x 32 (4 warps), one warp per 16-key slice with double-buffered
Q / dO; D = 256 with two warps per slice (kSplitRoles: the "probabilities" warp holds dV, the
"gradients" warp dK, P^T (1 - t^2) handed over in fp32 through sP) on 64 x 64 tiles (159.5 KB:
sm_80 / sm_90) or 32 x 32 (73.8 KB: ~100 KB parts)), with its
stages under their own names (load_query_tile, prob_grads_t, scores_t, probability,
probabilities_and_score_grads_t, probabilities_t, score_grads_t, store_score_grads, accumulate_dq,
write_back_grad), and the host around it: make_params' scale / window / softcap constants,
launch_first_fitting (first configuration whose shared memory fits the device's opt-in limit),
group_splits (given an SM count and an occupancy), the fp32 partials of a split group summed in
split order and cast to dK / dV, and dq = dq_accum * scale cast to T. The mask helpers
(KeyWindow of csrc/attention_window.h, key_visible, first_query_reaching / first_query_past,
tile_needs_mask, tiles_of) and load_tile (cp.async or, unaligned, through registers) are
transcribed from attention_common.cuh. The mma.cuh helpers and the PTX instructions (ldmatrix,
mma.m16n8k16, cp.async) come from tools/ptx_emu.py (shared, not modified here).

As of: the kernel as committed with this file. When attention_bwd.cu, attention_common.cuh or
the backward parts of attention.cu change, transcribe the change here.

Shared memory is one flat array of 2-byte slots per CTA laid out as the kernel lays it out (sK,
sV, sQ[buffers], sdO[buffers], sdS with their pitches, then the fp32 arrays sP (two-warp plan),
sLse2[buffers], sDelta[buffers] at kTileBytes, one float taking two slots), NaN-initialised, with
ptx_emu.Smem's hazard tracking (reads of unwritten or in-flight slots, cross-thread read/write or
write/write without a __syncthreads raise Race). Warps run one after another between barriers,
lanes as 32-wide vectors. Global memory is flat numpy arrays addressed with the kernel's strides
and bounds-checked (DeviceAssert); padding between rows (non-contiguous q / k / v / dO / O) and
the partial / dk / dv buffers start as NaN, and every dk / dv / partial element must be written
exactly once. atomicAdd into dq_accum is an fp32 add (order is the emulation's CTA order; in
exact mode the order does not matter).

Three arithmetic modes, each compared with one float64 reference (this file's `reference`, cross-
checked against torch float64 autograd through llama_ext/reference.py's gqa_attention_reference)
computed from the same T-valued q, k, v, dO:
  exact : float64 everywhere (scale log2 e, lse log2 e, exp2 exact); O and lse as the float64
          forward gives them; no rounding of P / dS to T (A fragments, sdS) nor of dK / dV / dQ.
          Must match to ~1e-13: any index, fragment, mask, tile, split or barrier error shows.
  fp32  : fp32 registers (numpy float32 after every operation; an mma = exact products summed in
          float64, rounded once to fp32; fma where nvcc contracts a * b + c: one rounding), lse as
          the fp32 buffer holds it, O not rounded to T, P / dS / outputs not rounded:
          |err| <= 1e-5 (1 + X_abs), X_abs the same sum taken over absolute values.
  kernel: as fp32, plus O rounded to T (the forward's output), P and dS rounded to T (pack2 into A
          fragments, from_float into sdS) and dQ / dK / dV rounded to T: what the GPU computes, to
          T's rounding: |err| <= 2 u_T (X_abs + |X|) + 1e-5 (1 + X_abs), where X_abs carries the
          error of delta from O rounded to T (P |1 - t^2| u_T rowsum|dO O|); u_T = 2^-8 / 2^-11.
Assumptions (not kernel code): exp2f / expm1f / the fast division of precise_tanh are modelled as
correctly rounded fp32 (the GPU's ex2.approx and __fdividef are within 2 ulp: far inside 1e-5).
check_mutants() re-runs small cases in exact mode with one injected kernel bug at a time (MUT
hooks, named where they act) and checks that each is caught: missing zero-fill, wrong Q / dO
buffer, missing dS -> dQ barrier, missing sP barrier (two-warp plan), top-left causal alignment,
query-block count rounded down, tile_needs_mask testing the window's left edge on the first row,
dropped softcap derivative, dropped delta, wrong dQ warp -> row-group map, dV partial over dK's,
and ptx_emu's swapped ldmatrix B matrices and wrong P fragment packing.

Run: .venv/bin/python tools/emulate_attention_bwd.py [case-name-substring ...]
(no argument: every case in every mode, then the mutants; ~15-25 s on one core; numpy, and torch
if importable for the cross-check of the float64 reference)
"""
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptx_emu  # noqa: E402
from ptx_emu import (DeviceAssert, GID, LANES, MUT, Smem, TIG, gload, gstore, load_a, pack_a_from_acc, rnd,
                     warp_gemm_kn, warp_gemm_nk)

# The kernel sources this file transcribes, and their digest when it was last brought in step
# (ptx_emu.sources_digest): the tests fail when one changes, until the change is transcribed here.
TRANSCRIBED = (
    'csrc/cuda/attention_bwd.cu',
    'csrc/cuda/attention_common.cuh',
    'csrc/cuda/attention.cu',
    'csrc/cuda/mma.cuh',
    'csrc/attention_window.h',
)
TRANSCRIBED_DIGEST = '066de451b6f24da3'

kLog2e_f = float(np.float32(1.4426950408889634))  # attention::kLog2e (a float constant)
UNIT_ROUNDOFF = {'bf16': 2.0 ** -8, 'fp16': 2.0 ** -11}


# ---- configurations (BwdConfig, BwdConfigs) --------------------------------------------------------
def smem_pitch(D):
    return D + 8


class BwdConfig:
    def __init__(self, D, BlockN, BlockM, SplitRoles):
        self.kD, self.kBlockN, self.kBlockM, self.kSplitRoles = D, BlockN, BlockM, SplitRoles
        self.kSlices = BlockN // 16
        self.kWarps = 2 * self.kSlices if SplitRoles else self.kSlices
        self.kThreads = self.kWarps * 32
        self.kQueryBuffers = 1 if SplitRoles else 2
        self.kPitch = smem_pitch(D)
        self.kDsPitch = BlockN + 8
        self.kPPitch = BlockM + 8
        self.kDTiles = D // 8
        self.kDChunks = D // 16
        self.kMTiles = BlockM // 8
        self.kMChunks = BlockM // 16
        self.kRowGroups = BlockM // 16
        self.kDimSplits = self.kWarps // self.kRowGroups
        self.kDqTiles = self.kDTiles // self.kDimSplits
        # dq_pass_tiles() as sm_80 / 90 compile it. sm_120 takes 2 for D = 128 on 128-key blocks; a
        # pass groups output columns only (same products, same order per element), and that
        # configuration (111 KB) cannot launch on sm_120's 99 KB anyway.
        self.kDqPassTiles = self.kDqTiles if self.kDqTiles < 8 else 8
        self.kTileBytes = (2 * BlockN + 2 * self.kQueryBuffers * BlockM) * self.kPitch * 2 + BlockM * self.kDsPitch * 2
        self.kPBytes = BlockN * self.kPPitch * 4 if SplitRoles else 0
        self.kSmemBytes = self.kTileBytes + self.kPBytes + 2 * self.kQueryBuffers * BlockM * 4
        assert self.kTileBytes % 16 == 0
        assert BlockN % 16 == 0 and BlockM % 16 == 0
        assert self.kWarps % self.kRowGroups == 0 and self.kDTiles % self.kDimSplits == 0
        assert self.kDqTiles % self.kDqPassTiles == 0
        assert self.kDTiles % 2 == 0 and self.kMTiles % 2 == 0

    def __repr__(self):
        return f'BwdConfig<{self.kD}, {self.kBlockN}, {self.kBlockM}, {str(self.kSplitRoles).lower()}>'


HEAD_DIMS = (32, 64, 80, 96, 128, 256)  # LLAMA_EXT_ATTENTION_HEAD_DIMS


def bwd_configs(D):
    if D == 256:
        return [BwdConfig(256, 64, 64, True), BwdConfig(256, 32, 32, True)]
    if D == 80:
        return [BwdConfig(80, 64, 32, False)]
    if D == 128:
        return [BwdConfig(128, 128, 32, False), BwdConfig(128, 64, 32, False)]
    return [BwdConfig(D, 128, 64 if D <= 64 else 32, False)]


# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) and the CTAs per SM of
# each configuration (the file comment's ptxas table: what cudaOccupancyMaxActiveBlocksPerMultiprocessor
# gives there), per device kind.
DEVICES = {'sm80': dict(smem=163 * 1024, sms=108, col=0), 'sm90': dict(smem=227 * 1024, sms=132, col=1),
           'sm86': dict(smem=99 * 1024, sms=84, col=2)}
CTAS_PER_SM = {(32, 128): (1, 1, 1), (64, 128): (1, 1, 1), (80, 64): (2, 2, 2), (96, 128): (1, 1, 1),
               (128, 128): (1, 1, 0), (128, 64): (2, 2, 1), (256, 64): (1, 1, 0), (256, 32): (1, 1, 1)}


def launch_first_fitting(D, device):
    """launch_first_fitting: the first configuration whose kSmemBytes fits (smem_fits)."""
    for C in bwd_configs(D):
        if C.kSmemBytes <= DEVICES[device]['smem']:
            return C
    return None  # SIMT fallback


kMinWaves = 4


def group_splits(ctas, group, wave):
    for splits in range(1, group):
        if group % splits == 0 and ctas * splits >= kMinWaves * wave:
            return splits
    return group


# ---- the mask (attention_window.h KeyWindow, attention_common.cuh), vectorised over int arrays ----
class KeyWindow:
    def __init__(self, left, right):
        self.left, self.right = left, right

    def key_begin(self, i, len_q, len_k):
        ip = np.asarray(i, np.int64) + len_k - len_q
        if 'top_left' in MUT:
            ip = np.asarray(i, np.int64)
        return np.where((self.left < 0) | (ip <= self.left), 0, ip - self.left)

    def key_end(self, i, len_q, len_k):
        ip = np.asarray(i, np.int64) + len_k - len_q
        if 'top_left' in MUT:
            ip = np.asarray(i, np.int64)
        end = np.where((self.right < 0) | (self.right >= len_k - ip), len_k, ip + self.right + 1)
        begin = self.key_begin(i, len_q, len_k)
        return np.where(end > begin, end, begin)

    def first_row_reaching(self, key0, len_q, len_k):
        if self.right < 0:
            return 0
        row = key0 - self.right - (len_k - len_q)
        return 0 if row < 0 else (len_q if row > len_q else row)

    def first_row_past(self, key1, len_q, len_k):
        if self.left < 0:
            return len_q
        row = key1 + self.left - (len_k - len_q)
        return 0 if row < 0 else (len_q if row > len_q else row)


def key_visible(query, key, seq, w):
    return (key >= w.key_begin(query, seq.len_q, seq.len_k)) & (key < w.key_end(query, seq.len_q, seq.len_k))


def first_query_reaching(key0, seq, w):
    return int(w.first_row_reaching(key0, seq.len_q, seq.len_k))


def first_query_past(key1, seq, w):
    return int(w.first_row_past(key1, seq.len_q, seq.len_k))


def tiles_of(n, block):
    if 'm_blocks_floor' in MUT:
        return n // block
    return (n + block - 1) // block


def tile_needs_mask(q0, rows, k0, cols, seq, w):
    last = min(q0 + rows, seq.len_q) - 1
    if 'mask_first_row' in MUT:  # the window's left edge checked on the first row instead of the last
        last = q0
    return bool(w.key_begin(last, seq.len_q, seq.len_k) > k0 or w.key_end(q0, seq.len_q, seq.len_k) < k0 + cols)


# ---- global memory, parameters --------------------------------------------------------------------
class Params:
    """AttentionParams (+ GroupSplit). Pointers are (flat numpy array, element offset)."""
    pass


class Seq:
    def __init__(self, start_q, start_k, len_q, len_k):
        self.start_q, self.start_k, self.len_q, self.len_k = start_q, start_k, len_q, len_k


def atomic_add(ptr, idx, vals, ft):
    """atomicAdd(float*) of one warp instruction: distinct addresses, one fp32 add each."""
    arr, base = ptr
    idx = base + np.asarray(idx, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= arr.size):
        raise DeviceAssert(f'atomicAdd outside its buffer: [{idx.min()}, {idx.max()}] of {arr.size}')
    assert np.unique(idx).size == idx.size
    arr[idx] = (arr[idx].astype(ft) + np.asarray(vals, ft)).astype(ft)


def sequence(p, b):
    """attention_common.cuh's; the backward's calls never set key_lengths (make_params leaves it
    null: only gqa_attention_with_kvcache's forward route sets it)."""
    if p.cu_seqlens_q is None:
        return Seq(0, 0, p.seq_q, p.seq_k)
    q0, k0 = int(p.cu_seqlens_q[b]), int(p.cu_seqlens_k[b])
    return Seq(q0, k0, int(p.cu_seqlens_q[b + 1]) - q0, int(p.cu_seqlens_k[b + 1]) - k0)


def offset(s, b, seq_start, row, head):
    return b * s[0] + (seq_start + np.asarray(row, np.int64)) * s[1] + head * s[2]


def lse_offset(p, b, seq, row, head):
    return b * p.lse_batch + head * p.lse_head + seq.start_q + np.asarray(row, np.int64)


# ---- the delta pre-kernel ---------------------------------------------------------------------------
kDeltaWarps = 4


def attention_backward_delta_kernel(p, c):
    """grid (ceil(seq_q / 4), n_q_heads, batch), one warp per row; vectorised over the rows of a
    (b, head) and the 32 lanes."""
    ft = c['ft']
    for b in range(p.batch):
        for head in range(p.n_q_heads):
            seq = sequence(p, b)
            rows = np.arange(-(-p.seq_q // kDeltaWarps) * kDeltaWarps)
            rows = rows[rows < seq.len_q]  # if (row >= seq.len_q) return;
            if not rows.size:
                continue
            dout = offset(p.dout_strides, b, seq.start_q, rows, head)[:, None]
            out = offset(p.fwd_out_strides, b, seq.start_q, rows, head)[:, None]
            s = np.zeros((rows.size, 32), ft)
            for d0 in range(0, p.head_dim, 32):
                d = d0 + LANES
                on = d < p.head_dim
                dd = np.where(on, d, 0)[None, :]
                prod = (gload(p.dout, dout + dd).astype(ft) * gload(p.fwd_out, out + dd).astype(ft)).astype(ft)
                s = np.where(on[None, :], (s + prod).astype(ft), s)  # exact products: fma or not alike
            for off in (16, 8, 4, 2, 1):  # warp_reduce<SumOp>
                s = (s + s[:, LANES ^ off]).astype(ft)
            gstore(p.delta, lse_offset(p, b, seq, rows, head), s[:, 0], p.delta_count)


# ---- the tensor-core backward kernel -----------------------------------------------------------------
def precise_tanh(x, ft):
    em = np.expm1((ft(-2) * np.abs(x)).astype(ft)).astype(ft)
    return np.copysign((-em / (ft(2) + em).astype(ft)).astype(ft), x)


def fma(a, b, c_, ft):
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c_, np.float64)).astype(ft)


def probability(s, lse2, visible, p, ft):
    """probability(): returns (P^T element, slope = 1 - t^2)."""
    s2 = (s * p.scale_log2).astype(ft)
    with np.errstate(invalid='ignore', over='ignore'):
        if p.softcap_log2 > 0:
            th = precise_tanh((s2 * p.inv_softcap_log2).astype(ft), ft)
            prob = np.exp2(fma(p.softcap_log2, th, -lse2, ft)).astype(ft)
            slope = fma(-th, th, 1.0, ft)
        else:
            prob = np.exp2(fma(s, p.scale_log2, -lse2, ft)).astype(ft)  # s2 - lse2, s2 used once: contracted
            slope = np.ones_like(s2)
    if 'no_slope' in MUT:
        slope = np.ones_like(s2)
    return np.where(visible, prob, ft(0)), slope


def load_tile(sm, dst, src, row_stride, kRows, valid_rows, aligned16, C, ft):
    """load_tile<T, D, kRows, kThreads>: 16-byte chunks, chunk c by thread c % kThreads."""
    kChunksPerRow = C.kD * 2 // 16
    c = np.arange(kRows * kChunksPerRow)
    tid = c % C.kThreads
    r, col = c // kChunksPerRow, (c % kChunksPerRow) * 8
    valid = r < valid_rows
    if 'no_zero_fill' in MUT:
        valid = r >= 0
    vals = np.zeros((c.size, 8))
    el = np.arange(8)
    if valid.any():
        vals[valid] = gload(src, (r * row_stride + col)[valid, None] + el)
    idx = (dst + r * C.kPitch + col)[:, None] + el
    if aligned16:
        sm.cp_async(idx, vals, tid[:, None])
    else:
        sm.write(idx, vals, tid[:, None])


def bwd_cta(p, C, split, block, c):
    """One CTA of attention_backward_tc_kernel<T, C>."""
    ft, T = c['ft'], p.T
    st = c['stats']
    P = C.kPitch
    sm = Smem(C.kSmemBytes // 2, 'smem_raw')
    sK = 0
    sV = sK + C.kBlockN * P
    sQ = sV + C.kBlockN * P
    sdO = sQ + C.kQueryBuffers * C.kBlockM * P
    sdS = sdO + C.kQueryBuffers * C.kBlockM * P
    fbase = C.kTileBytes // 2  # float f at slots fbase + 2 f, + 1
    sP = 0
    sLse2 = sP + C.kPBytes // 4
    sDelta = sLse2 + C.kQueryBuffers * C.kBlockM
    assert sdS + C.kBlockM * C.kDsPitch <= fbase

    def st_float(f, vals, tid):
        f = np.asarray(f, np.int64)
        tid = np.broadcast_to(tid, f.shape)
        sm.write(np.stack([fbase + 2 * f, fbase + 2 * f + 1]), np.stack([vals, vals]), np.stack([tid, tid]))

    def ld_float(f, tid):
        f = np.asarray(f, np.int64)
        tid = np.broadcast_to(tid, f.shape)
        v = sm.read(np.stack([fbase + 2 * f, fbase + 2 * f + 1]), np.stack([tid, tid]))
        assert np.array_equal(v[0], v[1], equal_nan=True)
        return v[0].astype(ft)

    def syncthreads():
        sm.barrier()

    per_key_block = p.batch * p.n_kv_heads * split.splits
    key_block = block // per_key_block
    rest = block % per_key_block
    s = rest % split.splits
    rest //= split.splits
    kv_head = rest % p.n_kv_heads
    b = rest // p.n_kv_heads
    seq = sequence(p, b)
    n0 = key_block * C.kBlockN
    if n0 >= seq.len_k:
        st['ctas_past_len_k'] += 1
        return
    head0 = kv_head * p.group + s * split.heads

    def arr(name, off):
        return (getattr(p, name)[0], getattr(p, name)[1] + int(off))

    load_tile(sm, sK, arr('k', offset(p.k_strides, b, seq.start_k, n0, kv_head)), p.k_strides[1], C.kBlockN,
              seq.len_k - n0, p.aligned16, C, ft)
    load_tile(sm, sV, arr('v', offset(p.v_strides, b, seq.start_k, n0, kv_head)), p.v_strides[1], C.kBlockN,
              seq.len_k - n0, p.aligned16, C, ft)

    m_block_begin = first_query_reaching(n0, seq, p.window) // C.kBlockM
    m_blocks = tiles_of(first_query_past(n0 + C.kBlockN, seq, p.window), C.kBlockM) - m_block_begin
    n_iters = split.heads * m_blocks if m_blocks > 0 else 0

    def query_tile(it):
        return head0 + it // m_blocks, (m_block_begin + it % m_blocks) * C.kBlockM

    def load_query_tile(tile, buf):
        head, m0 = tile
        load_tile(sm, sQ + buf * C.kBlockM * P, arr('q', offset(p.q_strides, b, seq.start_q, m0, head)),
                  p.q_strides[1], C.kBlockM, seq.len_q - m0, p.aligned16, C, ft)
        load_tile(sm, sdO + buf * C.kBlockM * P, arr('dout', offset(p.dout_strides, b, seq.start_q, m0, head)),
                  p.dout_strides[1], C.kBlockM, seq.len_q - m0, p.aligned16, C, ft)
        i = np.arange(C.kBlockM)
        valid = m0 + i < seq.len_q
        if 'lse_tail' in MUT:
            valid = i >= 0
        at = lse_offset(p, b, seq, m0 + i, head)
        lse2 = np.full(i.size, np.inf)
        dl = np.zeros(i.size)
        if valid.any():
            lse2[valid] = (gload(p.lse, at[valid]).astype(ft) * p.kLog2e).astype(ft)
            dl[valid] = gload(p.delta, at[valid])
        st_float(sLse2 + buf * C.kBlockM + i, lse2, i % C.kThreads)
        st_float(sDelta + buf * C.kBlockM + i, dl, i % C.kThreads)

    st['ctas'] += 1
    st['key_tail'] += seq.len_k - n0 < C.kBlockN
    st['empty_ctas'] += n_iters == 0
    st['heads_per_cta>1'] += split.heads > 1
    st['unaligned'] += not p.aligned16
    if n_iters > 0:
        load_query_tile(query_tile(0), 0)
    sm.commit()

    def lane_tids(warp):
        return warp * 32 + LANES

    def prob_grads_t(warp, do_tile, kw):
        dp_t = np.zeros((C.kMTiles, 4, 32), ft)
        warp_gemm_nk(sm, dp_t, lambda kc: load_a(sm, sV, P, kw, kc * 16, warp), do_tile, P, 0, C.kDChunks,
                     C.kMTiles, warp, ft)
        return dp_t

    def scores_t(warp, q_tile, kw):
        s_t = np.zeros((C.kMTiles, 4, 32), ft)
        warp_gemm_nk(sm, s_t, lambda kc: load_a(sm, sK, P, kw, kc * 16, warp), q_tile, P, 0, C.kDChunks,
                     C.kMTiles, warp, ft)
        return s_t

    def visibility(m0, kw, masked):
        """[kMTiles][4][32]: key kw + g + 8 (e / 2), query mt * 8 + 2t + e % 2 of the tile."""
        mt = np.arange(C.kMTiles)[:, None, None]
        e = np.arange(4)[None, :, None]
        query = mt * 8 + 2 * TIG[None, None, :] + e % 2
        key = kw + GID[None, None, :] + 8 * (e // 2)
        if not masked:
            return query, np.ones(query.shape, bool)
        return query, key_visible(m0 + query, n0 + key, seq, p.window)

    def masked_probabilities_t(warp, q_tile, lse2, m0, kw):
        """S^T, then P^T and the softcap slope of every element (both warp plans): (query, tid,
        p_t, slope)."""
        s_t = scores_t(warp, q_tile, kw)
        masked = tile_needs_mask(m0, C.kBlockM, n0, C.kBlockN, seq, p.window)
        st['masked_tiles' if masked else 'unmasked_tiles'] += 1
        query, visible = visibility(m0, kw, masked)
        tid = np.broadcast_to(lane_tids(warp), query.shape)
        p_t, slope = probability(s_t, ld_float(lse2 + query, tid), visible, p, ft)
        return query, tid, p_t, slope

    def probabilities_and_score_grads_t(warp, ds_t, q_tile, lse2, delta, m0, kw):
        query, tid, p_t, slope = masked_probabilities_t(warp, q_tile, lse2, m0, kw)
        dl = ld_float(delta + query, tid)
        if 'ds_no_delta' in MUT:
            dl = dl * 0
        ds_t = ((p_t * (ds_t - dl).astype(ft)).astype(ft) * slope).astype(ft)
        return p_t, ds_t

    def probabilities_t(warp, q_tile, m0, kw):
        query, tid, p_t, slope = masked_probabilities_t(warp, q_tile, sLse2, m0, kw)
        ps = (p_t * slope).astype(ft)
        key = kw + GID[None, None, :] + 8 * (np.arange(4)[None, :, None] // 2)
        for mt in range(C.kMTiles):
            for r in range(2):  # one float2 store: 8-byte aligned
                f = sP + key[0, 2 * r] * C.kPPitch + mt * 8 + 2 * TIG
                assert (f % 2 == 0).all()
                st_float(f, ps[mt, 2 * r], lane_tids(warp))
                st_float(f + 1, ps[mt, 2 * r + 1], lane_tids(warp))
        return p_t

    def score_grads_t(warp, ds_t, kw):
        tid = lane_tids(warp)
        for mt in range(C.kMTiles):
            for r in range(2):
                query = mt * 8 + 2 * TIG
                f = sP + (kw + GID + 8 * r) * C.kPPitch + query
                psx, psy = ld_float(f, tid), ld_float(f + 1, tid)
                d0, d1 = ld_float(sDelta + query, tid), ld_float(sDelta + query + 1, tid)
                if 'ds_no_delta' in MUT:
                    d0, d1 = d0 * 0, d1 * 0
                ds_t[mt, 2 * r] = (psx * (ds_t[mt, 2 * r] - d0).astype(ft)).astype(ft)
                ds_t[mt, 2 * r + 1] = (psy * (ds_t[mt, 2 * r + 1] - d1).astype(ft)).astype(ft)
        return ds_t

    def store_score_grads(warp, ds_t, kw):
        for mt in range(C.kMTiles):
            for e in range(4):
                idx = sdS + (mt * 8 + 2 * TIG + e % 2) * C.kDsPitch + kw + GID + 8 * (e // 2)
                sm.write(idx, rnd(ds_t[mt, e], T) if c['round'] else ds_t[mt, e], lane_tids(warp))

    def accumulate_dq(tile, warp):
        head, m0 = tile
        row_group = warp % C.kRowGroups
        if 'dq_row_group' in MUT:
            row_group = warp // C.kDimSplits % C.kRowGroups
        for pass_ in range(C.kDqTiles // C.kDqPassTiles):
            dim0 = ((warp // C.kRowGroups) * C.kDqTiles + pass_ * C.kDqPassTiles) * 8
            dq_acc = np.zeros((C.kDqPassTiles, 4, 32), ft)
            warp_gemm_kn(sm, dq_acc, lambda kc: load_a(sm, sdS, C.kDsPitch, row_group * 16, kc * 16, warp), sK, P,
                         dim0, C.kBlockN // 16, C.kDqPassTiles, warp, ft)
            for r in range(2):
                row = m0 + row_group * 16 + GID + 8 * r
                on = row < seq.len_q
                if not on.any():
                    continue
                dq_row = offset(p.dq_strides, b, seq.start_q, row[on], head) + dim0 + 2 * TIG[on]
                for nt in range(C.kDqPassTiles):
                    atomic_add(p.dq_accum, dq_row + nt * 8, dq_acc[nt, 2 * r][on], ft)
                    atomic_add(p.dq_accum, dq_row + nt * 8 + 1, dq_acc[nt, 2 * r + 1][on], ft)

    def write_back_grad(acc, out, partial, scale, kw, count):
        seq_ = sequence(p, b)
        for r in range(2):
            key = n0 + kw + GID + 8 * r
            on = key < seq_.len_k
            if not on.any():
                continue
            row = offset(p.dk_strides, b, seq_.start_k, key[on], kv_head)
            for dt in range(C.kDTiles):
                lo = (acc[dt, 2 * r][on] * scale).astype(ft)
                hi = (acc[dt, 2 * r + 1][on] * scale).astype(ft)
                at = row + dt * 8 + 2 * TIG[on]
                if partial is not None:
                    assert ((partial[1] + at) % 2 == 0).all()  # float2 store
                    gstore(partial, at, lo, p.partial_count)
                    gstore(partial, at + 1, hi, p.partial_count)
                else:
                    lo, hi = (rnd(lo, T), rnd(hi, T)) if c['round'] else (lo, hi)  # pack2<T>
                    gstore(out, at, lo, count)
                    gstore(out, at + 1, hi, count)

    def partial_at(off):
        return (p.partial[0], p.partial[1] + off) if p.partial is not None else None

    if not C.kSplitRoles:
        dk_acc = [np.zeros((C.kDTiles, 4, 32), ft) for _ in range(C.kWarps)]
        dv_acc = [np.zeros((C.kDTiles, 4, 32), ft) for _ in range(C.kWarps)]
        for it in range(n_iters):
            sm.wait(0)
            syncthreads()
            if it + 1 < n_iters:
                load_query_tile(query_tile(it + 1), (it + 1) % 2 if 'buffer_index' not in MUT else it % 2)
            sm.commit()
            buf = it % 2
            tile = query_tile(it)
            st['tiles'] += 1
            st['query_tail'] += seq.len_q - tile[1] < C.kBlockM
            q_tile = sQ + buf * C.kBlockM * P
            do_tile = sdO + buf * C.kBlockM * P
            for warp in range(C.kWarps):
                kw = (warp % C.kSlices) * 16
                ds_t = prob_grads_t(warp, do_tile, kw)
                p_t, ds_t = probabilities_and_score_grads_t(warp, ds_t, q_tile, sLse2 + buf * C.kBlockM,
                                                            sDelta + buf * C.kBlockM, tile[1], kw)
                # dV += P^T dO
                warp_gemm_kn(sm, dv_acc[warp], lambda kc: pack_a_from_acc(p_t[2 * kc], p_t[2 * kc + 1], T, c['round']),
                             do_tile, P, 0, C.kMChunks, C.kDTiles, warp, ft)
                # dK += dS^T Q
                warp_gemm_kn(sm, dk_acc[warp], lambda kc: pack_a_from_acc(ds_t[2 * kc], ds_t[2 * kc + 1], T, c['round']),
                             q_tile, P, 0, C.kMChunks, C.kDTiles, warp, ft)
                store_score_grads(warp, ds_t, kw)
            if 'dq_barrier' not in MUT:
                syncthreads()
            for warp in range(C.kWarps):
                accumulate_dq(tile, warp)
        sm.wait(0)
        at = s * p.partial_split
        for warp in range(C.kWarps):
            kw = (warp % C.kSlices) * 16
            write_back_grad(dk_acc[warp], p.dk, partial_at(at), p.scale, kw, p.dk_count)
            write_back_grad(dv_acc[warp], p.dv, partial_at(at + p.partial_split // 2), ft(1), kw, p.dv_count)
    else:
        acc = [np.zeros((C.kDTiles, 4, 32), ft) for _ in range(C.kWarps)]
        for it in range(n_iters):
            sm.wait(0)
            syncthreads()
            tile = query_tile(it)
            st['tiles'] += 1
            st['query_tail'] += seq.len_q - tile[1] < C.kBlockM
            x_t = [None] * C.kWarps
            for warp in range(C.kWarps):
                kw = (warp % C.kSlices) * 16
                if warp < C.kSlices:
                    x_t[warp] = probabilities_t(warp, sQ, tile[1], kw)
                else:
                    x_t[warp] = prob_grads_t(warp, sdO, kw)
            if 'sp_barrier' not in MUT:
                syncthreads()  # sP complete
            for warp in range(C.kWarps):
                kw = (warp % C.kSlices) * 16
                x = x_t[warp]
                if warp < C.kSlices:
                    warp_gemm_kn(sm, acc[warp], lambda kc: pack_a_from_acc(x[2 * kc], x[2 * kc + 1], T, c['round']),
                                 sdO, P, 0, C.kMChunks, C.kDTiles, warp, ft)
                else:
                    x = score_grads_t(warp, x, kw)
                    store_score_grads(warp, x, kw)
                    warp_gemm_kn(sm, acc[warp], lambda kc: pack_a_from_acc(x[2 * kc], x[2 * kc + 1], T, c['round']),
                                 sQ, P, 0, C.kMChunks, C.kDTiles, warp, ft)
            if 'dq_barrier' not in MUT:
                syncthreads()  # sdS complete; Q, dO, lse and delta free for the next tile
            if it + 1 < n_iters:
                load_query_tile(query_tile(it + 1), 0)
            sm.commit()
            for warp in range(C.kWarps):
                accumulate_dq(tile, warp)
        sm.wait(0)
        for warp in range(C.kWarps):
            gradients = warp >= C.kSlices
            kw = (warp % C.kSlices) * 16
            at = s * p.partial_split + (0 if gradients else p.partial_split // 2)
            if 'partial_offset' in MUT:
                at = s * p.partial_split
            write_back_grad(acc[warp], p.dk if gradients else p.dv, partial_at(at), p.scale if gradients else ft(1),
                            kw, p.dk_count if gradients else p.dv_count)


COVERAGE = ['ctas', 'tiles', 'masked_tiles', 'unmasked_tiles', 'key_tail', 'query_tail', 'empty_ctas',
            'ctas_past_len_k', 'heads_per_cta>1', 'unaligned', 'split_groups', 'blind_rows']


def attention_backward_tc(case, mode, splits=None):
    """attention_backward_cuda for T in {fp16, bf16}: the delta pre-kernel, launch_backward_tc
    (configuration, group split, grid, partial sums), dq = dq_accum * scale. Returns (dq, dk, dv
    in the inputs' logical shapes, the configuration, splits, stats)."""
    ft = np.float64 if mode == 'exact' else np.float32
    c = dict(ft=ft, round=mode == 'kernel', stats=dict.fromkeys(COVERAGE, 0))
    rf = case['ref']
    p = Params()
    for k_, v_ in case['params'].items():
        setattr(p, k_, v_)
    bufs = {name: arr.copy() for name, arr in case['buffers'].items()}
    if mode == 'kernel':  # the forward's output as stored in T
        bufs['out'] = np.where(np.isnan(bufs['out']), np.nan, rnd(np.nan_to_num(bufs['out']), p.T))
    if mode != 'exact':  # lse as the fp32 buffer holds it
        bufs['lse'] = bufs['lse'].astype(np.float32).astype(np.float64)
    for name in ('q', 'k', 'v', 'dout', 'lse'):
        setattr(p, name, (bufs[name], 0))
    p.fwd_out = (bufs['out'], 0)
    # make_params
    scale, softcap = rf['scale'], rf['softcap']
    if mode == 'exact':
        p.scale, p.scale_log2, p.kLog2e = scale, scale / math.log(2), 1 / math.log(2)
        p.softcap_log2 = softcap / math.log(2)
        p.inv_softcap_log2 = 1 / p.softcap_log2 if softcap > 0 else 0.0
    else:
        p.scale, p.scale_log2, p.kLog2e = np.float32(scale), np.float32(scale * kLog2e_f), np.float32(kLog2e_f)
        p.softcap_log2 = np.float32(softcap * kLog2e_f)
        p.inv_softcap_log2 = np.float32(1) / p.softcap_log2 if softcap > 0 else np.float32(0)
    p.window = KeyWindow(min(p.wleft, p.seq_k), min(p.wright, p.seq_q))
    n_lse = bufs['lse'].size
    p.delta = (np.full(n_lse, np.nan), 0)
    p.delta_count = np.zeros(n_lse, int)
    attention_backward_delta_kernel(p, c)
    # launch_backward_tc
    C = launch_first_fitting(p.head_dim, case['device'])
    assert C is not None
    nq, nk = rf['q_numel'], rf['k_numel']
    p.dq_accum = (np.zeros(nq), 0)  # at::zeros
    dk, dv = np.full(nk, np.nan), np.full(nk, np.nan)
    p.dk, p.dv = (dk, 0), (dv, 0)
    p.dk_count, p.dv_count = np.zeros(nk, int), np.zeros(nk, int)
    ctas = -(-p.seq_k // C.kBlockN) * p.batch * p.n_kv_heads
    dev = DEVICES[case['device']]
    auto = group_splits(ctas, p.group, dev['sms'] * max(CTAS_PER_SM[(C.kD, C.kBlockN)][dev['col']], 1))
    split = Params()
    split.splits = auto if splits in (None, 'auto') else splits
    assert p.group % split.splits == 0
    split.heads = p.group // split.splits
    p.partial, p.partial_split = None, 0
    if split.splits > 1:
        part = np.full(split.splits * 2 * nk, np.nan)
        p.partial, p.partial_split = (part, 0), 2 * nk
        p.partial_count = np.zeros(part.size, int)
        c['stats']['split_groups'] += 1
    if ctas > 0:
        for block in range(ctas * split.splits):
            bwd_cta(p, C, split, block, c)
    if split.splits > 1:
        assert (p.partial_count == 1).all(), 'dK / dV partials not written exactly once'
        pk = part.reshape(split.splits, 2, nk)
        sk, sv = pk[0, 0].astype(ft), pk[0, 1].astype(ft)
        for s_ in range(1, split.splits):  # partial.select(1, i).sum(0), in split order
            sk, sv = (sk + pk[s_, 0]).astype(ft), (sv + pk[s_, 1]).astype(ft)
        dk[:], dv[:] = (rnd(sk, p.T), rnd(sv, p.T)) if c['round'] else (sk, sv)  # dk.copy_
    else:
        assert (p.dk_count == 1).all() and (p.dv_count == 1).all(), 'dK / dV not written exactly once'
    dq = (p.dq_accum[0].astype(ft) * ft(p.scale)).astype(ft)  # dq_accum.mul_(scale)
    dq = rnd(dq, p.T) if c['round'] else dq  # call.dq.copy_
    c['stats']['blind_rows'] = rf['blind_rows']
    return dq.reshape(rf['q_shape']), dk.reshape(rf['k_shape']), dv.reshape(rf['k_shape']), C, split.splits, c['stats']


# ---- test cases and the float64 reference -------------------------------------------------------------
def make_case(name, T, D, n_kv, G, seq_q, seq_k, batch=1, varlen=None, causal=False, window=(-1, -1), softcap=0.0,
              device='sm90', splits=(1,), pad=0, scale=None, seed=0):
    """Global buffers ([.., seq, heads, D + pad] rows, padding NaN; varlen: varlen = (lens_q, lens_k))
    and the float64 reference (forward O and lse, gradients, and the absolute-value sums of the
    kernel-mode tolerance)."""
    rng = np.random.default_rng(seed)
    H = n_kv * G
    scale = D ** -0.5 if scale is None else scale
    if varlen:
        lens_q, lens_k = list(varlen[0]), list(varlen[1])
        batch = len(lens_q)
        cu_q, cu_k = np.concatenate([[0], np.cumsum(lens_q)]), np.concatenate([[0], np.cumsum(lens_k)])
        seq_q, seq_k = max(lens_q), max(lens_k)  # max_seqlen
        tq, tk = int(cu_q[-1]), int(cu_k[-1])
        qshape, kshape = (tq, H, D), (tk, n_kv, D)
    else:
        lens_q, lens_k = [seq_q] * batch, [seq_k] * batch
        cu_q, cu_k = None, None
        qshape, kshape = (batch, seq_q, H, D), (batch, seq_k, n_kv, D)
    rt = lambda shape: rnd(rng.standard_normal(shape), T)
    q, k, v, dout = rt(qshape), rt(kshape), rt(kshape), rt(qshape)
    left, right = window[0], 0 if causal else window[1]
    u = UNIT_ROUNDOFF[T]
    out = np.zeros(qshape)
    lse = np.zeros((H, tq) if varlen else (batch, H, seq_q))
    g = {x: np.zeros(sh) for x, sh in (('dq', qshape), ('dk', kshape), ('dv', kshape))}
    ga = {x: np.zeros(sh) for x, sh in (('dq', qshape), ('dk', kshape), ('dv', kshape))}
    gd = {x: np.zeros(sh) for x, sh in (('dq', qshape), ('dk', kshape), ('dv', kshape))}
    blind = 0
    for b in range(batch):
        if varlen:
            sq_, sk_ = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            sel_q = lambda x, h: x[sq_, h]
            sel_k = lambda x, h: x[sk_, h]
        else:
            sel_q = lambda x, h: x[b, :, h]
            sel_k = lambda x, h: x[b, :, h]
        Lq, Lk = lens_q[b], lens_k[b]
        ii = np.arange(Lq)[:, None] + Lk - Lq
        jj = np.arange(Lk)[None, :]
        vis = np.ones((Lq, Lk), bool)
        if left >= 0:
            vis &= jj >= ii - left
        if right >= 0:
            vis &= jj <= ii + right
        seen = vis.any(1)
        blind += int((~seen).sum()) * H
        for h in range(H):
            kv = h // G
            qh, kh, vh, doh = sel_q(q, h), sel_k(k, kv), sel_k(v, kv), sel_q(dout, h)
            s = scale * qh @ kh.T
            slope = np.ones_like(s)
            if softcap > 0:
                t = np.tanh(s / softcap)
                s, slope = softcap * t, 1 - t * t
            sm_ = np.where(vis, s, -np.inf)
            mx = np.where(seen, sm_.max(1, initial=-np.inf), 0)
            l_ = np.where(seen, mx + np.log(np.where(vis, np.exp(sm_ - mx[:, None]), 0).sum(1) + ~seen), 0)
            pr = np.where(vis, np.exp(np.where(vis, s, 0) - l_[:, None]), 0)
            o = pr @ vh
            delta = (doh * o).sum(1)
            dabs = np.abs(doh * o).sum(1)
            ds = pr * (doh @ vh.T - delta[:, None]) * slope
            dsd = pr * np.abs(slope) * dabs[:, None]
            sel_q(out, h)[...] = o
            if varlen:
                lse[h, sq_] = l_
            else:
                lse[b, h] = l_
            sel_q(g['dq'], h)[...] = scale * ds @ kh
            sel_q(ga['dq'], h)[...] = scale * np.abs(ds) @ np.abs(kh)
            sel_q(gd['dq'], h)[...] = scale * dsd @ np.abs(kh)
            sel_k(g['dk'], kv)[...] += scale * ds.T @ qh
            sel_k(ga['dk'], kv)[...] += scale * np.abs(ds).T @ np.abs(qh)
            sel_k(gd['dk'], kv)[...] += scale * dsd.T @ np.abs(qh)
            sel_k(g['dv'], kv)[...] += pr.T @ doh
            sel_k(ga['dv'], kv)[...] += pr.T @ np.abs(doh)

    def padded(x):
        buf = np.full(x.shape[:-1] + (D + pad,), np.nan)
        buf[..., :D] = x
        return buf.reshape(-1)

    def strides(shape):
        row = shape[-2] * (D + pad)
        return (0, row, D + pad) if varlen else (shape[1] * row, row, D + pad)

    def contiguous(shape):
        row = shape[-2] * D
        return (0, row, D) if varlen else (shape[1] * row, row, D)

    bufs = dict(q=padded(q), k=padded(k), v=padded(v), dout=padded(dout), out=padded(out), lse=lse.reshape(-1))
    params = dict(T=T, batch=batch, seq_q=seq_q, seq_k=seq_k, n_q_heads=H, n_kv_heads=n_kv, group=G, head_dim=D,
                  q_strides=strides(qshape), k_strides=strides(kshape), v_strides=strides(kshape),
                  dout_strides=strides(qshape), fwd_out_strides=strides(qshape), dq_strides=contiguous(qshape),
                  dk_strides=contiguous(kshape), dv_strides=contiguous(kshape),
                  lse_batch=0 if varlen else H * seq_q, lse_head=tq if varlen else seq_q,
                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, wleft=left, wright=right, aligned16=pad % 8 == 0)
    ref = dict(q=q, k=k, v=v, dout=dout, out=out, lse=lse, grads=g, abs=ga, dabs=gd, scale=scale, softcap=softcap,
               causal=causal, window=window, varlen=varlen and (cu_q, cu_k), q_numel=q.size, k_numel=k.size,
               q_shape=qshape, k_shape=kshape, blind_rows=blind)
    return dict(name=name, T=T, device=device, splits=splits, buffers=bufs, params=params, ref=ref)


def torch_reference(case):
    """Gradients by torch float64 autograd through llama_ext/reference.py's gqa_attention_reference
    (ptx_emu.reference_module), and its (out, lse)."""
    import torch
    mod = ptx_emu.reference_module()
    rf = case['ref']
    t = {x: torch.from_numpy(rf[x]).requires_grad_(x != 'dout') for x in ('q', 'k', 'v', 'dout')}
    kw = dict(causal=rf['causal'], scale=rf['scale'], window_size=rf['window'], softcap=rf['softcap'])
    if rf['varlen']:
        cu_q, cu_k = (torch.from_numpy(np.asarray(x)).int() for x in rf['varlen'])
        out, lse = mod.gqa_attention_varlen_reference(t['q'], t['k'], t['v'], cu_q, cu_k, **kw)
    else:
        out, lse = mod.gqa_attention_reference(t['q'], t['k'], t['v'], **kw)
    out.backward(t['dout'])
    grads = {x: np.nan_to_num(t[x[1]].grad.numpy()) for x in ('dq', 'dk', 'dv')}
    return out.detach().numpy(), lse.detach().numpy(), grads


def cases():
    """Small on purpose (an emulated ldmatrix / mma costs ~0.1 ms): every configuration, each path once.
    The first entry of `splits` runs in every mode, the others in exact mode."""
    C = []
    # D = 32 (128 x 64): non-causal, 70 queries x 64 keys (unmasked tiles, a query tail), group 2, 2 sequences.
    C.append(make_case('d32 fp16 70x64 G2 B2', 'fp16', 32, 1, 2, 70, 64, batch=2, splits=(1, 2), seed=1))
    # D = 64 (128 x 64): non-causal window (40, -1) bottom-right, seq_q < seq_k (3 key blocks, the
    # first seen by no query): in the last block the window's left edge cuts the last rows of a tile
    # whose first row sees every key; group 1, 2 kv heads.
    C.append(make_case('d64 bf16 window(40,-1) 100x384 G1', 'bf16', 64, 2, 1, 100, 384, window=(40, -1), seed=2))
    # D = 80 (64 x 32, kDqTiles 5: the .x2.trans tail): causal, seq_q > seq_k (rows that see
    # nothing), group 3 split in 3 (fp32 partials summed and cast in every mode), softcap.
    C.append(make_case('d80 fp16 causal 90x40 G3 softcap', 'fp16', 80, 1, 3, 90, 40, causal=True, softcap=15.0,
                       splits=(3, 1), seed=3))
    # D = 96 (128 x 32, kDqTiles 3): sliding window (20, 5) non-causal, unaligned rows (load through registers).
    C.append(make_case('d96 bf16 window(20,5) 60x60 G2 unaligned', 'bf16', 96, 1, 2, 60, 60,
                       window=(20, 5), pad=4, splits=(1, 2), seed=4))
    # D = 128 (128 x 32): causal + window 30, softcap, group 4 (splits 1, 2 and the launcher's),
    # padded (non-contiguous, aligned) rows.
    C.append(make_case('d128 fp16 causal window30 40x40 G4 softcap', 'fp16', 128, 1, 4, 40, 40, causal=True,
                       window=(30, -1), softcap=20.0, splits=(1, 2, 'auto'), pad=8, seed=5))
    # D = 128 on ~100 KB parts (64 x 32, 4 warps): causal 70 x 150 (3 key blocks adding into the
    # same dQ rows, seq_q < seq_k), group 2.
    C.append(make_case('d128 bf16 causal 70x150 G2 (64x32 sm86)', 'bf16', 128, 1, 2, 70, 150, causal=True,
                       device='sm86', splits=(1, 2), seed=9))
    # D = 64 varlen (q 37 / 20, k 37 / 300): causal + window 40: key blocks past a sequence's end,
    # a key block no query reaches (n_iters 0), several key blocks adding into one dQ row.
    C.append(make_case('d64 bf16 varlen causal window40 G2', 'bf16', 64, 1, 2, 0, 0, varlen=([37, 20], [37, 300]),
                       causal=True, window=(40, -1), splits=(1, 2), seed=6))
    # D = 256 (64 x 64, two warps per slice: sm_80 / sm_90): causal 40 x 40, group 2.
    C.append(make_case('d256 bf16 causal 40x40 G2 (64x64)', 'bf16', 256, 1, 2, 40, 40, causal=True,
                       splits=(1, 2), seed=7))
    # D = 256 (32 x 32, two warps per slice: ~100 KB parts): window (16, -1) + softcap, 40 x 50:
    # 2 key blocks, query blocks per key block from the window.
    C.append(make_case('d256 fp16 window16 softcap 40x50 G2 (32x32 sm86)', 'fp16', 256, 1, 2, 40, 50,
                       window=(16, -1), softcap=10.0, device='sm86', splits=(2, 1), seed=8))
    return C


def compare(res, case, mode):
    """Max |err| over dq, dk, dv and whether every element is within its bound (see the docstring)."""
    rf = case['ref']
    u = UNIT_ROUNDOFF[case['T']]
    errs, ok = [], True
    for x, got in zip(('dq', 'dk', 'dv'), res):
        ref, xa, xd = rf['grads'][x], rf['abs'][x], rf['dabs'][x]
        if mode == 'exact':
            bound = 1e-13 * (1 + xa)
        elif mode == 'fp32':
            bound = 1e-5 * (1 + xa)
        else:
            bound = 2 * u * (xa + xd + np.abs(ref)) + 1e-5 * (1 + xa)
        err = np.abs(got - ref)
        nan = np.isnan(got).any()
        ok &= (not nan) and bool((err <= bound).all())
        errs.append(float(np.nanmax(err)) if err.size else 0.0)
        errs.append(float(np.nanmax(err / bound)) if err.size else 0.0)
    return ok, errs


def run_cases(names=None, modes=('exact', 'fp32', 'kernel'), verbose=True):
    t0 = time.time()
    # The file comment's example: 8 kv heads x 32 query heads x 8192 keys at D = 128 on an H100 / H200
    # (132 SMs x 1 CTA): 512 CTAs, split in 2.
    assert group_splits(8192 // 128 * 8, 4, 132 * 1) == 2
    # The file comment's shared memory column (KB).
    assert [C.kSmemBytes / 1024 for D in HEAD_DIMS for C in bwd_configs(D)] == [58, 90, 49, 87, 111, 73, 159.5, 73.75]
    assert launch_first_fitting(256, 'sm90').kBlockN == 64 and launch_first_fitting(256, 'sm80').kBlockN == 64
    assert launch_first_fitting(256, 'sm86').kBlockN == 32
    assert [launch_first_fitting(128, dev).kBlockN for dev in ('sm80', 'sm90', 'sm86')] == [128, 128, 64]
    assert all(launch_first_fitting(d, 'sm86').kBlockN == 128 for d in (32, 64, 96))
    if verbose:
        for D in HEAD_DIMS:
            for C in bwd_configs(D):
                print(f'     {C!r:<32} warps {C.kWarps}, smem {C.kSmemBytes} B = {C.kSmemBytes / 1024:.1f} KB, dq '
                      f'{C.kRowGroups} row groups x {C.kDimSplits} dim splits x {C.kDqTiles} n-tiles')
    all_cases = cases()
    if names:
        all_cases = [cs for cs in all_cases if any(n in cs['name'] for n in names)]
    failures, results = [], []
    coverage = dict.fromkeys(COVERAGE, 0)
    configs = set()
    have_torch = True
    for case in all_cases:
        rf = case['ref']
        if have_torch:
            try:
                to, tl, tg = torch_reference(case)
            except ImportError:
                have_torch = False
            else:
                d = max(np.abs(to - rf['out']).max(), np.abs(tl - rf['lse'].reshape(tl.shape)).max(),
                        *(np.abs(tg[x] - rf['grads'][x]).max() for x in tg))
                if d > 1e-12:
                    failures.append(f"{case['name']}: this file's reference != torch autograd on llama_ext/reference.py by {d:.1e}")
                if verbose:
                    print(f"     {case['name']:<52} reference vs torch autograd (reference.py): {d:.1e}")
        runs = [(case['splits'][0], m) for m in modes] + [(sp, 'exact') for sp in case['splits'][1:] if 'exact' in modes]
        for splits, mode in runs:
            if True:
                t1 = time.time()
                try:
                    dq, dk, dv, C, ns, stats = attention_backward_tc(case, mode, splits)
                except AssertionError as ex:
                    failures.append(f"{case['name']} splits={splits} {mode}: {type(ex).__name__}: {ex}")
                    if verbose:
                        print(f"FAIL {case['name']} splits={splits} {mode}: {type(ex).__name__}: {ex}")
                    continue
                configs.add(repr(C))
                ok, errs = compare((dq, dk, dv), case, mode)
                for k_ in COVERAGE:
                    coverage[k_] += stats[k_]
                results.append((case['name'], repr(C), ns, mode, *errs, ok))
                if verbose:
                    print(f"{'ok  ' if ok else 'FAIL'} {case['name']:<50} {C!r:<28} splits={ns} {mode:<6} "
                          f"dq {errs[0]:.1e} dk {errs[2]:.1e} dv {errs[4]:.1e} (max err/bound "
                          f"{max(errs[1::2]):.2f}) tiles={stats['tiles']} ({time.time() - t1:.2f}s)", flush=True)
                if not ok:
                    failures.append(f"{case['name']} splits={ns} {mode}: errors {errs}")
    every = {repr(C) for D in HEAD_DIMS for C in bwd_configs(D)}
    unrun = [f'configurations never run: {sorted(every - configs)}'] if configs != every else []
    return ptx_emu.finish_runs(results, failures, coverage, t0, not names, unrun, verbose)


# Each injected bug (MUT hook) and the case that must catch it (exact mode, the case's splits in order).
# Not a mutant: dropping the key tail from tile_needs_mask is harmless by construction (zero-filled
# K / V rows give dP = 0 and add K = 0 rows into dQ; write_back_grad skips keys past len_k).
MUTANTS = {
    'no_zero_fill': 'd32',        # load_tile: rows past the sequence read instead of zero-filled
    'buffer_index': 'd32',        # the next tile loaded into the buffer being multiplied
    'dq_barrier': 'd32',          # no __syncthreads between the sdS stores and accumulate_dq
    'sp_barrier': 'd256 fp16',    # two-warp plan: no "sP complete" barrier
    'top_left': 'd80',            # causal / window aligned top-left
    'm_blocks_floor': 'd32',      # tiles_of rounding down: the last partial query block skipped
    'mask_first_row': 'd64 bf16 window',      # tile_needs_mask: window's left edge tested on the tile's first row
    'no_slope': 'd80',            # the softcap's derivative 1 - t^2 dropped
    'ds_no_delta': 'd32',         # dS = P dP (delta dropped)
    'dq_row_group': 'd80',        # accumulate_dq: wrong warp -> row-group map
    'partial_offset': 'd256 fp16',  # dV's partial written over dK's
    'ldm_b_addr': 'd32',          # ptx_emu: ldmatrix.x4 B matrices 1 and 2 swapped
    'p_layout': 'd32',            # ptx_emu: P / dS accumulators packed into the wrong A registers
}


def check_mutants(verbose=True):
    """Each injected bug must make its case fail (mismatch, race, assert or NaN), exact mode."""
    all_cases = cases()

    def find_failure(mut):
        for cs in [cs for cs in all_cases if cs['name'].startswith(MUTANTS[mut])]:
            for splits in cs['splits']:
                try:
                    res = attention_backward_tc(cs, 'exact', splits)
                except AssertionError as ex:
                    return f"{type(ex).__name__}: {str(ex)[:70]} ({cs['name'][:12]}, splits={splits})"
                ok, errs = compare(res[:3], cs, 'exact')
                if not ok:
                    return f"err dq {errs[0]:.1e} dk {errs[2]:.1e} dv {errs[4]:.1e} ({cs['name'][:12]}, splits={splits})"
        return None

    return ptx_emu.check_mutants(MUTANTS, find_failure, verbose)


if __name__ == '__main__':
    ptx_emu.main(run_cases, check_mutants)
