// Indexing, masking and tile staging shared by every CUDA attention kernel (tensor-core
// forward/backward in attention_fwd.cu / attention_bwd.cu, SIMT path in attention_simt.cu),
// so the semantics (GQA head mapping, bottom-right causal / sliding-window mask, logit softcap,
// varlen offsets, strides, lse layout) are written once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "../attention_window.h"
#include "common.cuh"
#include "mma.cuh"

namespace llama_ext::cuda::attention {

// Scores go to exp2 as s * scale * log2(e); lse = (max + log2(sum)) * ln(2).
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.69314718055994531f;

// Element strides of one [.., seq, heads, head_dim] operand. The element (b, row, head, d)
// of sequence b lives at b * batch + (seq_start(b) + row) * row + head * head + d; varlen
// operands have batch = 0 and seq_start = cu_seqlens[b], batched ones seq_start = 0.
struct Strides {
  int64_t batch;
  int64_t row;
  int64_t head;
};

struct AttentionParams {
  // Forward inputs/outputs.
  const void* q;
  const void* k;
  const void* v;
  void* out;  // forward: out; backward: unused
  float* lse;
  Strides q_strides, k_strides, v_strides, out_strides;
  // lse (and delta, same layout) at b * lse_batch + head * lse_head + seq_start_q(b) + row.
  int64_t lse_batch;
  int64_t lse_head;
  // Varlen prefix sums (nullptr when batched).
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  // Batched calls over whole KV caches (gqa_attention_with_kvcache's prefill route): sequence b
  // holds key_lengths[b] <= seq_k keys, read on the device, so no host sync is needed. nullptr:
  // every sequence holds seq_k.
  const int* key_lengths;
  // A paged KV cache (that route, forward only): key n of sequence b is row n % block_size of
  // cache block block_table[b * block_table_strides[0] + (n / block_size) * block_table_strides[1]]
  // (paged_key below), a block's element stride k_strides.batch (v_strides.batch). The route
  // checks the entries of each sequence's keys on the device first. nullptr: key n is row n of
  // sequence b.
  const int* block_table;
  int64_t block_table_strides[2];
  int block_size;
  int batch;
  int seq_q;  // batched: the length; varlen: max_seqlen_q
  int seq_k;
  int n_q_heads;
  int n_kv_heads;
  int group;  // n_q_heads / n_kv_heads: query head h reads kv head h / group
  int head_dim;
  float scale;
  float scale_log2;  // scale * log2(e): scores go to exp2 directly
  KeyWindow window;  // causal folded in; left <= seq_k, right <= seq_q (attention.cu clamps)
  float softcap_log2;      // softcap * log2(e), 0 when off
  float inv_softcap_log2;  // its inverse (0 when off)
  bool aligned16;  // every row of q, k, v (and dout, out in the backward) starts 16-byte aligned

  // Backward only.
  const void* dout;
  Strides dout_strides;
  const void* fwd_out;  // the forward's output, read by the delta pre-kernel
  Strides fwd_out_strides;
  float* delta;     // rowsum(dout * out), lse's layout
  float* dq_accum;  // tensor cores: fp32, q's shape, contiguous (dq_strides)
  void* dq;         // SIMT: dq itself, contiguous (dq_strides)
  Strides dq_strides;
  void* dk;
  void* dv;
  Strides dk_strides, dv_strides;  // dk and dv share k's (contiguous) shape
};

// Where sequence b lives and how long it is.
struct Seq {
  int64_t start_q;
  int64_t start_k;
  int len_q;
  int len_k;
};

__device__ __forceinline__ Seq sequence(const AttentionParams& p, int b) {
  if (p.cu_seqlens_q == nullptr) return Seq{0, 0, p.seq_q, p.key_lengths != nullptr ? p.key_lengths[b] : p.seq_k};
  const int q0 = p.cu_seqlens_q[b];
  const int k0 = p.cu_seqlens_k[b];
  return Seq{q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
}

// Element offset of (b, row, head, 0) of one operand, with row relative to the sequence start.
__device__ __forceinline__ int64_t offset(const Strides& s, int b, int64_t seq_start, int64_t row, int head) {
  return b * s.batch + (seq_start + row) * s.row + head * s.head;
}

__device__ __forceinline__ int64_t lse_offset(const AttentionParams& p, int b, const Seq& seq, int64_t row, int head) {
  return b * p.lse_batch + head * p.lse_head + seq.start_q + row;
}

// ---- paged KV caches (AttentionParams::block_table) ----------------------------------------
// Key `key` of a sequence whose block-table row is `pages`: its cache block and its row in it,
// one table entry and one division. A forward kernel's k and v point at the kv head's element 0
// in cache block 0, so the key's row is at paged_offset(k_strides, at) from k.
struct PagedKey {
  int64_t block;
  int64_t row;
};

__device__ __forceinline__ PagedKey paged_key(const int* pages, const AttentionParams& p, int key) {
  const int page = key / p.block_size;
  return PagedKey{pages[page * p.block_table_strides[1]], key - page * p.block_size};
}

__device__ __forceinline__ int64_t paged_offset(const Strides& s, const PagedKey& at) {
  return at.block * s.batch + at.row * s.row;
}

// Number of `block`-sized tiles covering n >= 0 items (device code; common.cuh's ceil_div is host-only).
__device__ __forceinline__ int tiles_of(int n, int block) { return (n + block - 1) / block; }

// ---- the mask: causal and sliding window, aligned bottom-right (KeyWindow) ---------------------
// Row `query` sees keys [key_begin(query), key_end(query)); both bounds are non-decreasing.

__device__ __forceinline__ int key_begin(int query, const Seq& seq, const KeyWindow& w) {
  return w.key_begin(query, seq.len_q, seq.len_k);
}
__device__ __forceinline__ int key_end(int query, const Seq& seq, const KeyWindow& w) {
  return w.key_end(query, seq.len_q, seq.len_k);
}

__device__ __forceinline__ bool key_visible(int query, int key, const Seq& seq, const KeyWindow& w) {
  return key >= key_begin(query, seq, w) && key < key_end(query, seq, w);
}

// Queries [first, end) are the only ones that may see a key of [key0, key1).
__device__ __forceinline__ int first_query_reaching(int key0, const Seq& seq, const KeyWindow& w) {
  return static_cast<int>(w.first_row_reaching<int64_t>(key0, seq.len_q, seq.len_k));
}
__device__ __forceinline__ int first_query_past(int key1, const Seq& seq, const KeyWindow& w) {
  return static_cast<int>(w.first_row_past<int64_t>(key1, seq.len_q, seq.len_k));
}

// True when some (query, key) of the tile [q0, q0 + rows) x [k0, k0 + cols) is invisible, so
// the tile needs per-element masking (the key tail, the causal diagonal, a window edge): the
// last row must see from k0 on and the first row up to the tile's last key.
__device__ __forceinline__ bool tile_needs_mask(int q0, int rows, int k0, int cols, const Seq& seq,
                                                const KeyWindow& w) {
  const int last = min(q0 + rows, seq.len_q) - 1;
  return key_begin(last, seq, w) > k0 || key_end(q0, seq, w) < k0 + cols;
}

// ---- the logit softcap, on base-2 scores s2 = scale log2(e) q.k --------------------------------
// softcap tanh(scale q.k / softcap) in base 2 is softcap_log2 tanh(s2 / softcap_log2).
// --use_fast_math compiles tanhf to MUFU.TANH (about 2^-11 relative error, far outside the
// fp32 tolerance), so tanh is built from expm1f, a full-precision libdevice function also for
// small |x|: tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)), a few ulp with the fast division.
__device__ __forceinline__ float precise_tanh(float x) {
  const float em = expm1f(-2.f * fabsf(x));
  return copysignf(-em / (2.f + em), x);
}

// t = tanh(s2 / softcap_log2): the capped score is softcap_log2 t, its derivative 1 - t^2.
__device__ __forceinline__ float softcap_tanh(float s2, const AttentionParams& p) {
  return precise_tanh(s2 * p.inv_softcap_log2);
}
__device__ __forceinline__ float capped_score(float s2, const AttentionParams& p) {
  return p.softcap_log2 > 0.f ? p.softcap_log2 * softcap_tanh(s2, p) : s2;
}

// A launch with a zero grid dimension is an error: launchers skip empty work (seq 0, batch 0).
inline bool grid_empty(const dim3& grid) { return grid.x == 0 || grid.y == 0 || grid.z == 0; }

// ---- one warp per row: the SIMT kernels and the backward's delta pre-kernel -------------------
// Grid (ceil(rows / kWarps), heads, sequences) of kWarps-warp CTAs: warp w of CTA x owns row
// x * kWarps + w (a query, or a key) of head blockIdx.y (a query or kv head) of sequence blockIdx.z.
struct WarpRow {
  int b;
  int head;
  int row;
  int lane;
};

template <int kWarps>
__device__ __forceinline__ WarpRow warp_row() {
  return WarpRow{static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.y),
                 static_cast<int>(blockIdx.x * kWarps + threadIdx.x / 32), static_cast<int>(threadIdx.x % 32)};
}

template <int kWarps>
dim3 warp_row_grid(int64_t rows, int heads, int batch) {
  return dim3(static_cast<unsigned>(ceil_div(rows, kWarps)), heads, batch);
}

// What a device grants in shared memory: per CTA (cudaDevAttrMaxSharedMemoryPerBlockOptin), per
// SM (cudaDevAttrMaxSharedMemoryPerMultiprocessor) and reserved by the system per CTA: 163 / 164 KB
// on sm_80, 227 / 228 KB on sm_90, 99 / 100 KB on sm_86/89/120, where the sm_80 binary also runs.
struct SmemLimits {
  int64_t per_block;
  int64_t per_sm;
  int64_t reserved_per_block;
};

// The current device's limits. LLAMA_EXT_CUDA_SMEM_KB=N caps them at N KB per SM and N - 1 KB per
// CTA, as every supported part pairs them, so that a large-memory GPU launches the configurations
// a smaller one would (100: those of sm_86/89/120) and one GPU run can test them all.
inline SmemLimits device_smem_limits() {
  int device = 0, per_block = 0, per_sm = 0, reserved = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
  SmemLimits limits{per_block, per_sm, reserved};
  if (const char* cap = std::getenv("LLAMA_EXT_CUDA_SMEM_KB")) {
    const int64_t kb = std::atoll(cap);
    TORCH_CHECK_VALUE(kb >= 2, "LLAMA_EXT_CUDA_SMEM_KB must be a number of KB >= 2, got '", cap, "'");
    limits.per_sm = std::min(limits.per_sm, kb * 1024);
    limits.per_block = std::min(limits.per_block, (kb - 1) * 1024);
  }
  return limits;
}

// Whether the current device can give one CTA `bytes` of dynamic shared memory.
inline bool smem_fits(size_t bytes) { return static_cast<int64_t>(bytes) <= device_smem_limits().per_block; }

// ---- staging [rows, D] tiles into shared memory ----------------------------------------------

// Row pitch of a shared tile: 16 bytes of padding, so the 8 rows one ldmatrix phase reads fall
// on 8 distinct 16-byte bank groups. The pitch is 2D + 16 bytes = 20, 36, 44, 52, 68, 132 words
// for D = 32, 64, 80, 96, 128, 256, i.e. 20, 4, 12, 20, 4, 4 (mod 32): a multiple of 4 words whose
// 8 multiples (mod 32) are the 8 distinct groups {0, 4, ..., 28}.
template <int D>
constexpr int smem_pitch() { return D + 8; }

// Copies rows [0, rows) of a global tile (row r at src + r * row_stride, D contiguous elements)
// into smem [rows][pitch]; rows >= valid_rows are zero-filled. With `async` (every row 16-byte
// aligned) it issues cp.async (the caller commits and waits); otherwise it loads through
// registers element by element, correct for any alignment. Either way the data is visible
// after the caller's next __syncthreads().
template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_tile(T* smem, const T* src, int64_t row_stride, int valid_rows, bool async) {
  constexpr int kChunksPerRow = D * static_cast<int>(sizeof(T)) / 16;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(D * sizeof(T) % 16 == 0, "rows must be whole 16-byte chunks");
  constexpr int kPitch = smem_pitch<D>();
  constexpr int kElems = 16 / static_cast<int>(sizeof(T));
#pragma unroll
  for (int c = threadIdx.x; c < kChunks; c += kThreads) {
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * kElems;
    T* dst = smem + r * kPitch + col;
    const bool valid = r < valid_rows;
    if (async) {
      mma::cp_async_16(dst, valid ? src + r * row_stride + col : src, valid);
    } else {
      alignas(16) T tmp[kElems];
#pragma unroll
      for (int e = 0; e < kElems; ++e) tmp[e] = valid ? src[r * row_stride + col + e] : from_float<T>(0.f);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
    }
  }
}

}  // namespace llama_ext::cuda::attention
