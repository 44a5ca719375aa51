"""Lane-level numpy emulation of the PTX instructions llama_ext's tensor-core CUDA kernels use
(ldmatrix .x1/.x2/.x4 with and without .trans, mma.sync.m16n8k16 with fp32 accumulation, cp.async
with commit/wait groups), written from the PTX ISA's fragment layouts, not from mma.cuh's
comments, and the warp-level helpers of csrc/cuda/mma.cuh on top of them. Shared memory (Smem)
tracks hazards: a read of a slot never written or whose cp.async is in flight, and a cross-thread
read/write or write/write without a barrier, raise Race.

The kernel transcriptions (tools/emulate_*.py) import this module; MUT holds the mutation hooks
their check_mutants() switch on one at a time to show that a kind of kernel bug is caught."""
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

# ---- PTX semantics (PTX ISA: ldmatrix; mma.m16n8k16 .f32.{f16,bf16}; cp.async) ----------------
# Lane = 4 * groupID + threadID_in_group.
LANES = np.arange(32)
GID, TIG = LANES >> 2, LANES & 3


# Mutation hooks, all off: check_mutants() turns one on at a time to show that the emulation
# catches that kind of kernel bug (each is named where it acts).
MUT = set()


class Race(AssertionError):
    pass


class DeviceAssert(AssertionError):
    pass


def rnd(x, T):
    """Round to nearest even in T ('bf16' or 'fp16'), from float64 (or float32) values; the
    result as float64. float16 by numpy's direct double->half conversion (RNE); bfloat16 by
    quantising at 2^(e - 8) (8 significant bits; subnormal quantum 2^-133)."""
    x = np.asarray(x, dtype=np.float64)
    if T == 'fp16':
        return x.astype(np.float16).astype(np.float64)
    with np.errstate(invalid='ignore', over='ignore'):
        _, e = np.frexp(x)
        q = np.where(e - 1 < -126, 2.0 ** -133, np.ldexp(1.0, e - 8))
        r = np.round(x / q) * q  # np.round rounds half to even
    return np.where(np.isfinite(x), r, x)


class Smem:
    """Shared memory of one CTA: `n` slots (2 bytes each for the dynamic buffer, or one float for
    a static __shared__ array), with the hazard tracking described at the top."""

    def __init__(self, n, name):
        self.n, self.name = n, name
        self.val = np.full(n, np.nan)
        self.init = np.zeros(n, bool)
        self.pend = np.full(n, -1, np.int64)   # cp.async group in flight to this slot, -1: none
        self.pval = np.zeros(n)
        self.ptid = np.full(n, -1, np.int64)
        self.group = 0                          # the open (uncommitted) cp.async group
        self.barrier()

    def barrier(self):
        self.wr = np.full(self.n, -1, np.int64)   # writer thread since the last barrier
        self.rd = np.full(self.n, -1, np.int64)   # a reader thread since the last barrier
        self.rdm = np.zeros(self.n, bool)         # more than one reader thread

    def _idx(self, idx, tid):
        idx = np.asarray(idx, np.int64)
        tid = np.broadcast_to(np.asarray(tid, np.int64), idx.shape)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise Race(f'{self.name}: access outside shared memory: [{idx.min()}, {idx.max()}] of {self.n}')
        return idx.ravel(), tid.ravel(), idx.shape

    def read(self, idx, tid):
        i, t, shape = self._idx(idx, tid)
        if (self.pend[i] >= 0).any():
            raise Race(f'{self.name}: read of a slot whose cp.async is in flight')
        if not self.init[i].all():
            raise Race(f'{self.name}: read of an unwritten slot {i[~self.init[i]][:4]}')
        w = self.wr[i]
        if ((w >= 0) & (w != t)).any():
            raise Race(f'{self.name}: read of a slot another thread wrote without a barrier')
        r = self.rd[i]
        self.rdm[i] |= (r >= 0) & (r != t)
        self.rd[i] = np.where(r < 0, t, r)
        self.rdm[i] |= self.rd[i] != t  # two threads of this access
        return self.val[i].reshape(shape)

    def _write_hazards(self, i, t):
        w, r = self.wr[i], self.rd[i]
        if ((w >= 0) & (w != t)).any():
            raise Race(f'{self.name}: write of a slot another thread wrote without a barrier')
        if (((r >= 0) & (r != t)) | self.rdm[i]).any():
            raise Race(f'{self.name}: write of a slot another thread read without a barrier')
        self.wr[i] = t
        if (self.wr[i] != t).any():
            raise Race(f'{self.name}: two threads write one slot')

    def write(self, idx, vals, tid):
        i, t, shape = self._idx(idx, tid)
        if (self.pend[i] >= 0).any():
            raise Race(f'{self.name}: store to a slot whose cp.async is in flight')
        self._write_hazards(i, t)
        self.val[i] = np.broadcast_to(np.asarray(vals, np.float64), shape).ravel()
        self.init[i] = True

    # cp.async.cg.shared.global [dst], [src], 16, src_size: 16 bytes, src_size 0 -> zeros. The
    # write may land any time between the issue and the cp.async.wait_group that covers it: the
    # slot counts as written from the issue on (hazards) and as unreadable until the wait.
    def cp_async(self, idx, vals, tid):
        i, t, shape = self._idx(idx, tid)
        if (self.pend[i] >= 0).any():
            raise Race(f'{self.name}: cp.async to a slot with a cp.async in flight')
        self._write_hazards(i, t)
        self.pend[i] = self.group
        self.pval[i] = np.broadcast_to(np.asarray(vals, np.float64), shape).ravel()
        self.ptid[i] = t

    def commit(self):  # cp.async.commit_group (every thread commits the same sequence of groups)
        self.group += 1

    def wait(self, n):  # cp.async.wait_group n: all but the n most recent committed groups landed
        i = np.nonzero((self.pend >= 0) & (self.pend < self.group - n))[0]
        self.val[i] = self.pval[i]
        self.init[i] = True
        self.pend[i] = -1
        self.wr[i] = np.where(self.wr[i] < 0, self.ptid[i], self.wr[i])


def ldmatrix(sm, addrs, n, trans, warp):
    """ldmatrix.sync.aligned.m8n8.x{n}[.trans].shared.b16: lanes 8i..8i+7 give the (16-byte
    aligned) addresses of rows 0..7 of matrix i (other lanes' addresses are ignored for n < 4);
    lane 4g+t receives in register i elements (g, 2t), (g, 2t+1) of matrix i, of its transpose
    with .trans. Returns regs[n][32][2] (low, high half of each .b32)."""
    rows = np.asarray(addrs, np.int64)[: 8 * n].reshape(n, 8)
    if (rows % 8).any():
        raise Race('ldmatrix: row address not 16-byte aligned')
    tids = warp * 32 + np.arange(8 * n).reshape(n, 8, 1)
    M = sm.read(rows[:, :, None] + np.arange(8), tids)  # [n][row][col]
    if trans:
        M = M.transpose(0, 2, 1)
    return np.stack([M[:, GID, 2 * TIG], M[:, GID, 2 * TIG + 1]], axis=-1)


# mma.m16n8k16 fragments (PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type"):
#   A (16x16, .row): a_i (i = 0..3) holds row g + 8 (i % 2), columns 2t + 8 (i // 2) + {0, 1}.
#   B (16x8, .col):  b_i (i = 0..1) holds rows (k) 2t + 8 i + {0, 1}, column (n) g.
#   C/D (16x8 f32):  c_i (i = 0..3) holds row g + 8 (i // 2), column 2t + i % 2.
_R4 = np.arange(4)[:, None, None]
_R2 = np.arange(2)[:, None, None]
_J = np.arange(2)[None, None, :]
A_ROW = np.broadcast_to(GID[None, :, None] + 8 * (_R4 % 2), (4, 32, 2))
A_COL = np.broadcast_to(2 * TIG[None, :, None] + 8 * (_R4 // 2) + _J, (4, 32, 2))
B_ROW = np.broadcast_to(2 * TIG[None, :, None] + 8 * _R2 + _J, (2, 32, 2))
B_COL = np.broadcast_to(GID[None, :, None], (2, 32, 2))
C_ROW = GID[None, :] + 8 * (np.arange(4)[:, None] // 2)
C_COL = 2 * TIG[None, :] + np.arange(4)[:, None] % 2
for _r, _c, _n in ((A_ROW, A_COL, (16, 16)), (B_ROW, B_COL, (16, 8)), (C_ROW, C_COL, (16, 8))):
    assert np.bincount((_r * _n[1] + _c).ravel(), minlength=_n[0] * _n[1]).tolist() == [1] * (_n[0] * _n[1])


def mma_m16n8k16(c, a, b, ft):
    """mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 d, a, b, c (d = c):
    D = A B + C. Assumption: the products are exact and the sum is rounded once to fp32 (the
    hardware's internal accumulation order/precision is unspecified; within ~1 ulp)."""
    A = np.empty((16, 16)); B = np.empty((16, 8)); C = np.empty((16, 8))
    A[A_ROW, A_COL] = a
    B[B_ROW, B_COL] = b
    C[C_ROW, C_COL] = c
    D = C + A @ B
    return D[C_ROW, C_COL].astype(ft)


# ---- csrc/cuda/mma.cuh helpers, transcribed (addresses in T elements = smem slots) ------------
def load_a(sm, tile, ld, row0, col0, warp):
    return ldmatrix(sm, tile + (row0 + (LANES & 15)) * ld + col0 + (LANES >> 4) * 8, 4, False, warp)


def load_b_pair_nk(sm, tile, ld, n0, k0, warp):
    if 'ldm_b_addr' in MUT:  # matrices 1 and 2 swapped
        r = ldmatrix(sm, tile + (n0 + (LANES & 7) + ((LANES >> 3) & 1) * 8) * ld + k0 + (LANES >> 4) * 8, 4, False, warp)
        return r[0:2], r[2:4]
    r = ldmatrix(sm, tile + (n0 + (LANES & 7) + (LANES >> 4) * 8) * ld + k0 + ((LANES >> 3) & 1) * 8, 4, False, warp)
    return r[0:2], r[2:4]


def load_b_pair_kn(sm, tile, ld, k0, n0, warp):
    r = ldmatrix(sm, tile + (k0 + (LANES & 15)) * ld + n0 + (LANES >> 4) * 8, 4, True, warp)
    return r[0:2], r[2:4]


def load_b_kn(sm, tile, ld, k0, n0, warp):
    return ldmatrix(sm, tile + (k0 + (LANES & 15)) * ld + n0, 2, True, warp)


def pack_a_from_acc(lo, hi, T, round_p):
    """pack2<T> = __floats2{half,bfloat16}2_rn: RNE to T (skipped in exact mode)."""
    a = np.stack([np.stack([lo[0], lo[1]], -1), np.stack([lo[2], lo[3]], -1),
                  np.stack([hi[0], hi[1]], -1), np.stack([hi[2], hi[3]], -1)]).astype(np.float64)
    if 'p_layout' in MUT:
        a = a[[0, 2, 1, 3]]
    return rnd(a, T) if round_p else a


def warp_gemm_nk(sm, acc, a_source, x, ld, n0, kKChunks, kNTiles, warp, ft):
    assert kNTiles % 2 == 0
    for kc in range(kKChunks):
        a = a_source(kc)
        for nt in range(0, kNTiles, 2):
            b0, b1 = load_b_pair_nk(sm, x, ld, n0 + nt * 8, kc * 16, warp)
            acc[nt] = mma_m16n8k16(acc[nt], a, b0, ft)
            acc[nt + 1] = mma_m16n8k16(acc[nt + 1], a, b1, ft)


def warp_gemm_kn(sm, acc, a_source, x, ld, n0, kKChunks, kNTiles, warp, ft):
    for kc in range(kKChunks):
        a = a_source(kc)
        nt = 0
        while nt + 1 < kNTiles:
            b0, b1 = load_b_pair_kn(sm, x, ld, kc * 16, n0 + nt * 8, warp)
            acc[nt] = mma_m16n8k16(acc[nt], a, b0, ft)
            acc[nt + 1] = mma_m16n8k16(acc[nt + 1], a, b1, ft)
            nt += 2
        if kNTiles % 2 == 1:
            b = load_b_kn(sm, x, ld, kc * 16, n0 + (kNTiles - 1) * 8, warp)
            acc[kNTiles - 1] = mma_m16n8k16(acc[kNTiles - 1], a, b, ft)


# ---- global memory ---------------------------------------------------------------------------
# A pointer is (flat numpy array, element offset); every access is bounds-checked (DeviceAssert),
# and a store may count the writes of each element (to check that each output is written once).
def gload(ptr, idx):
    arr, base = ptr
    idx = base + np.asarray(idx, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= arr.size):
        raise DeviceAssert(f'global read outside its buffer: [{idx.min()}, {idx.max()}] of {arr.size}')
    return arr[idx]


def gstore(ptr, idx, vals, count=None):
    arr, base = ptr
    idx = base + np.asarray(idx, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= arr.size):
        raise DeviceAssert(f'global write outside its buffer: [{idx.min()}, {idx.max()}] of {arr.size}')
    arr[idx] = vals
    if count is not None:
        np.add.at(count, idx, 1)


# ---- the sources a transcription follows -----------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def sources_digest(paths):
    """A digest of the kernel sources (paths from the project root) a transcription was written
    from: each transcription records it (TRANSCRIBED, TRANSCRIBED_DIGEST), and the tests fail when
    a source changes until the change is transcribed and the digest renewed."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.encode())
        h.update((ROOT / path).read_bytes())
    return h.hexdigest()[:16]


def reference_module():
    """llama_ext/reference.py, the float64 references each transcription cross-checks its own
    against: loaded by path from this tree (importing the llama_ext package needs the built
    extension), or from the installed package where the tree has none (a wheel's tests)."""
    import importlib
    import importlib.util

    path = ROOT / 'llama_ext' / 'reference.py'
    if not path.exists():
        return importlib.import_module('llama_ext.reference')
    spec = importlib.util.spec_from_file_location('llama_ext_reference', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- drivers shared by the transcriptions ------------------------------------------------------
def check_mutants(mutants, find_failure, verbose=True):
    """Switches each mutation hook on alone and calls find_failure(mut), which runs the
    transcription's small cases and returns why one failed (an error, a race, an assert, NaN or a
    mismatch) or None. Every mutant must be caught; returns {mutant: why}."""
    caught = {}
    for mut in mutants:
        MUT.clear()
        MUT.add(mut)
        try:
            caught[mut] = find_failure(mut)
        finally:
            MUT.clear()
        if verbose:
            print(f"mutant {mut:<16} {'caught: ' + caught[mut] if caught[mut] else 'NOT CAUGHT'}", flush=True)
    missed = [m for m, why in caught.items() if not why]
    if missed:
        raise AssertionError(f'mutants not caught: {missed}')
    return caught


def finish_runs(results, failures, coverage, t0, every_case, unrun=(), verbose=True, label='all runs'):
    """The end of a transcription's run_cases: prints the coverage counters and the totals; with
    every case run (every_case), a counter still 0 and the configurations in `unrun` (messages)
    are failures too. Raises AssertionError listing every failure, else returns results."""
    if verbose:
        print(f'coverage ({label}):', ', '.join(f'{k} {v}' for k, v in coverage.items()))
        print(f'{len(results)} runs, {len(failures)} failures, {time.time() - t0:.1f}s')
    failures = list(failures)
    if every_case:
        missing = [k for k, v in coverage.items() if v == 0]
        if missing:
            failures.append(f'cases never exercise: {missing}')
        failures += list(unrun)
    if failures:
        raise AssertionError('\n'.join(failures))
    return results


def main(run_cases, check_mutants):
    """`python tools/emulate_X.py [case-name-substring ...]`: the cases (all, or those named),
    then, with no argument, the mutants."""
    t_start = time.time()
    run_cases(sys.argv[1:] or None)
    if len(sys.argv) == 1:
        check_mutants()
    print(f'total {time.time() - t_start:.1f}s')
