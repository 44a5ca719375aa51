// Attention against a KV cache (decode) on CUDA: split-KV flash-decoding, paged, with the new
// tokens' append and rotary fused in. Semantics in csrc/kvcache_attention.h. No host syncs: the
// split count comes from the SM count, the kernel's occupancy and the cache capacity, the
// lengths are read on the device, so a decode step captures in a CUDA graph.
//
// Kernels, in stream order:
//  1. append: one CTA per (new token, kv head) writes its k row (rotated: pairs (i, i + half) or
//     (2i, 2i+1), fp32 math from the fp32 tables, one rounding) and v row into their cache slot.
//  2. attend: one CTA per (key split, kv head x row tile, batch). A row tile holds query rows of
//     one kv head's group, row = (query head in group) x seq_q + (query token), so each K/V
//     element is read once per group (per row tile when G x seq_q exceeds a tile). A CTA walks
//     its split of the union of its rows' visible key ranges.
//     The q rows go to shared memory first (stage_query_rows: rotated, rounded to T), each
//     thread taking a run of one row's elements with the loads of up to 16 in flight at once.
//     float16 / bfloat16, tensor cores (attend_tc_kernel): 16 rows (one m16 tile), 4 warps. Key
//     tiles of kKeys = 64 (32 at d = 256) keys of K and V are staged in shared memory by
//     cp.async in a kStages-deep ring (the prologue
//     fills kStages - 1, each step refills the stage freed by the previous step): each 16-byte
//     chunk of a key row is gathered through the block table on its own (in the key loop, the
//     entries fetched a tile ahead; block and offset from a FastDivisor, a multiply-high where a
//     division would cost ~20 instructions per row), so any block size works and tiles need no
//     alignment to blocks, while a contiguous cache's rows need no table; a row's address is one
//     32 x 32 -> 64-bit multiply-add per stride (the token and block strides in bytes are below
//     2^31, checked on the host); keys past the split and rows of blocks outside the cache
//     (which fire a device-side assert after the key loop) are zero-filled by the copy, never
//     read, their address kept inside the cache.
//     Warp w takes keys [16 w, 16 w + 16) of every tile (at d = 256 two warps share a key slice
//     and split O's columns, so O stays at 64 fp32 registers per thread):
//       S = Q K^T (mma.m16n8k16, Q from shared memory by ldmatrix, K by ldmatrix),
//       x = scale S, softcap tanh(x / softcap) (the precise tanh), causal/window masks per row
//       (bottom-right aligned), log2 domain; m' = max(m, rowmax), P = 2^(x - m') (quad
//       shuffles), l' = l 2^(m - m') + rowsum P, O = O 2^(m - m') + P V with P rounded to T
//       in registers as the A fragment (V by ldmatrix.trans). With 8 rows or fewer (decode at
//       G <= 8) the fragment rows 8-15 are padding and skip the softmax (P = 0); a warp
//       rescales O only when a row's max rose.
//     The warps' (m, l, O) are merged in shared memory (over the dead stages) in warp order,
//     so the result is deterministic.
//     float32, CUDA cores (attend_simt_kernel): 8 rows, lane groups of up to 32 threads per key
//     reading 16-byte chunks directly, per-thread dots with a shuffle butterfly, the same online
//     softmax per lane group, merged in group order. fp32 has no tensor-core path.
//     Either writes out/lse directly (one split) or an fp32 partial per split.
//  3. combine (splits > 1): per query row, lse = log sum_s e^(lse_s) (the splits' lse read in
//     parallel, block reductions in a fixed order), out = sum_s e^(lse_s - lse) out_s in split
//     order.
//  4. Prefill-shaped calls (kPrefillRouteMinSeqQ or more query tokens) run the prefill kernels
//     instead of 2 and 3, after the append: the sequences' lengths (their block-table entries
//     checked) and, with rotary tables, q's rotated copy come from two small kernels.
// A block index, length or rotary position that is out of range fires a device-side assert and
// the access is skipped, never made.
//
// Launch overlap (sm_90 and later): the attend kernel is a programmatic dependent launch of the
// append, and the combine of the attend (common.cuh, launch_kernel). Each is scheduled while its
// predecessor still runs and waits for it (griddepcontrol.wait) only before it touches what the
// predecessor writes: the attend before its first K/V copy (the lengths, key ranges and first
// block-table entries come first), the combine before the partials. At batch 1 the three kernels
// run for 2-23 us each (H200, context 8192: append 1.7, attend 22.5 in Nsight Compute, combine
// 3.4) in a 31.3 us step, so each launch boundary is a visible share of it.
//
// Splits: units = batch x kv_heads x row tiles CTAs per split; slots = SMs x resident CTAs per
// SM (cudaOccupancyMaxActiveBlocksPerMultiprocessor at the kernel's registers and shared
// memory); at most one split per 256 keys of capacity, at most 128. If all of those fit in one
// wave of slots, all of them; else the smallest count whose wave efficiency (CTAs / whole waves
// of slots) is within 85% of the best.
// H200 (132 SMs, 3 CTAs per SM at d = 128), 32/8 heads, context 8192: batch 1 -> 32 splits of
// 256 keys, 256 CTAs in one wave; batch 32 -> 3 splits, 768 CTAs in 1.94 waves.
// LLAMA_EXT_CUDA_DECODE_SPLITS=N overrides the rule (tests of every split count; tuning).
//
// Bytes in flight. At d = 128 a stage is 64 keys x (K + V) x 256 B = 32 KB of data (34 KB with
// the row padding); two stages: while a tile is multiplied the next one is in flight, so a CTA
// keeps 32-64 KB in flight and an H200 SM (3 CTAs) 96-192 KB, against a bandwidth-delay product
// of about 29 KB per SM (4.8 TB/s / 132 SMs x ~0.8 us). Deeper rings for smaller d (4 stages at
// d = 32 and 64, 3 at 80), within 72 KB of stages per CTA so that every sm_80+ GPU (99 KB per
// block on sm_86/89/120) runs every head dim. Bytes in flight are not what bounds it on the
// H200: at d = 128, 32-key tiles in a ring of 4 (48 KB in flight per CTA) made the batch-32
// attend 32% slower than 64-key tiles in 2 (401 us against 303, 2026-12-04): per key, twice
// the barriers and tile issues, and Q K^T made by two warps each, cost more than it gained.
//
// Deep ring (d = 128, fp16 / bf16). A step waits for its tile before it issues the next one, so a
// ring of two has one tile in flight at each wait, and a CTA pays about a load latency per tile.
// That is what a CTA of batch 1 at context 8192 does on an H200 (4 tiles: 32 splits of 256
// keys, 256 CTAs that all fit at once). A second kernel has three 64-key stages
// (kTcDeepStageBudget; 106 KB of shared memory: 2 CTAs per SM on an H100/H200, 1 on an A100,
// none on the 99 KB parts), two tiles in flight at each wait. The launcher takes it where the
// GPU holds it, its own split count is the two-stage kernel's, and all of its CTAs are resident
// at once: there the CTA per SM it costs would have run nothing. On an H200, batch 1 at context
// 8192 takes it (32 splits either way, 256 CTAs of its 264 slots); batch 32 (1.94 waves) keeps
// two stages and 3 CTAs per SM; on an A100 (1 CTA per SM) batch 1 splits differently and keeps
// two. The ring's depth moves only when tiles are loaded: the same bits.
// LLAMA_EXT_CUDA_DECODE_DEEP_RING=0/1 overrides the rule.
//
// Bytes: K and V once per (group, row tile), q and out once; splits add 2 x rows x d fp32 of
// partials per split. FLOPs: 4 x 16 x L x d per (kv head, row tile) on tensor cores; decode
// (G x seq_q <= 16) moves 2 L d x 2 bytes for them, 16 FLOPs/byte at most, far under the
// tensor cores' ratio, so the kernel is bound by DRAM bandwidth. Offsets are 64-bit, key
// indices 32-bit (capacity <= 2^30).
//
// Registers (ptxas -v, CUDA 13.0; fp16 and bf16 alike), shared memory per CTA (dynamic +
// static) and resident CTAs per SM (the least of the register, shared-memory and thread
// limits; 1 KB reserved per CTA), for sm_80 / sm_86 / sm_89 / sm_90 / sm_100 / sm_120:
//   d     tensor-core kernel (fp16, bf16)              CUDA-core kernel (fp32)
//         registers                 smem     CTAs/SM     registers                 smem     CTAs/SM
//   32    85/86/86/90/96/95         41.9 KB  3/2/2/5/5/2 141/140/140/150/161/168   3.1 KB   3 on each
//   64    111/111/111/117/131/128   74.9 KB  2/1/1/3/3/1 140/141/141/150/160/168   4.6 KB   3 on each
//   80    162/162/162/167/170/160   69.4 KB  2/1/1/3/2/1 135/136/136/148/142/145   5.4 KB   3 on each
//   96    162/158/158/164/200/182   55.9 KB  2/1/1/3/2/1 135/136/136/148/142/145   6.4 KB   3 on each
//   128   162/162/162/164/194/176   72.9 KB  2/1/1/3/2/1 133/133/133/144/143/144   8.4 KB   3 on each
//   128, deep ring (3 stages): 162/162/162/162/192/175  106.9 KB 1/0/0/2/2/0 (taken only where it fits)
//   256   162/162/162/164/194/176   74.6 KB  2/1/1/3/2/1 201/201/201/202/207/210   16.4 KB  2 on each
// The tensor-core kernel is bounded for 2 CTAs per SM, what sm_80 holds of it at d >= 64:
// without that bound ptxas may cap it at 128 registers and spill (sm_80, d = 128). At d = 96 on
// sm_90 shared memory would fit 4 CTAs per SM, the registers fit 3.
// No spills and no local memory.

#include <ATen/ops/empty.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "../attention.h"
#include "../kvcache_attention.h"
#include "attention_launch.cuh"
#include "common.cuh"

namespace llama_ext::cuda {
namespace {

constexpr int kThreads = 128;     // append, combine and the CUDA-core attend kernel
constexpr int kRows = 8;          // query rows per CTA of the CUDA-core attend kernel
constexpr int kKeysPerStep = 4;   // consecutive keys one of its lane groups takes per step
constexpr int kMinKeysPerSplit = 256;
constexpr int kMaxSplits = 128;
constexpr int64_t kMaxCapacity = int64_t{1} << 30;
using attention::kLn2;
using attention::kLog2e;

struct KVCacheKernelParams {
  const void* q;
  int64_t q_stride[3];  // batch, seq, head
  void* k_cache;
  void* v_cache;
  int64_t k_stride[3];  // block (batch), token, head
  int64_t v_stride[3];
  int k_token_bytes, v_token_bytes;  // stride[1] in bytes, and a paged cache's stride[0]: below 2^31
  int k_block_bytes, v_block_bytes;  // (checked on the host), so a row is one wide multiply-add away
  const void* k_new;
  const void* v_new;
  int64_t kn_stride[3];  // batch, seq, head
  int64_t vn_stride[3];
  const int32_t* seqlens;
  const int32_t* block_table;  // null: contiguous cache, block = batch row
  int64_t bt_stride[2];
  int bt_entry_stride;  // bt_stride[1], below 2^31 (checked on the host)
  FastDivisor block_size;  // tokens per block (a contiguous cache: its capacity, 1 when that is 0)
  int num_blocks, capacity;
  const float* cos;  // null: no rotary
  const float* sin;
  int64_t cos_stride, sin_stride;
  int rotary_half, rotary_positions;
  bool interleaved;
  void* out;     // contiguous [batch, seq_q, n_q_heads, d]
  float* lse;    // contiguous [batch, n_q_heads, seq_q]
  float* partial_out;  // splits > 1: [split, batch, n_q_heads, seq_q, d]
  float* partial_lse;  // [split, batch, n_q_heads, seq_q]
  int batch, seq_q, seq_new, n_q_heads, n_kv_heads, head_dim, group, rows, row_tiles, splits;
  int window_left, window_right;
  float scale, softcap;

  __device__ int64_t length(int b) const { return static_cast<int64_t>(seqlens[b]) + seq_new; }
};

__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Checks sequence b's length against the capacity (device-side assert); false: skip it.
__device__ __forceinline__ bool length_ok(const KVCacheKernelParams& p, int b) {
  const int64_t start = p.seqlens[b];
  const bool ok = start >= 0 && start + p.seq_new <= p.capacity;
  CUDA_KERNEL_ASSERT(ok && "gqa_attention_with_kvcache: cache_seqlens + seq_new exceeds the cache capacity");
  return ok;
}

// The block-table entry of page `page` of sequence b (a paged cache) as stored, unchecked.
__device__ __forceinline__ int64_t page_entry(const KVCacheKernelParams& p, int b, int64_t page) {
  return p.block_table[b * p.bt_stride[0] + page * p.bt_stride[1]];
}

// The block-table entry of token j of sequence b as stored, unchecked (b: a contiguous cache).
// Keys are int: a length is at most the capacity, below 2^31 (checked on the host).
__device__ __forceinline__ int64_t block_entry(const KVCacheKernelParams& p, int b, int j) {
  if (p.block_table == nullptr) return b;
  return page_entry(p, b, p.block_size.div(j));
}

__device__ __forceinline__ bool block_in_cache(const KVCacheKernelParams& p, int64_t entry) {
  return entry >= 0 && entry < p.num_blocks;
}

__device__ __forceinline__ void assert_blocks_in_cache(bool ok) {
  CUDA_KERNEL_ASSERT(ok && "gqa_attention_with_kvcache: block_table entry outside the cache");
}

// A block_entry, or -1 (after a device-side assert) when it names a block outside the cache.
__device__ __forceinline__ int64_t checked_block(const KVCacheKernelParams& p, int64_t entry) {
  if (p.block_table == nullptr) return entry;
  const bool ok = block_in_cache(p, entry);
  assert_blocks_in_cache(ok);
  return ok ? entry : -1;
}

// The cache block of token j of sequence b, or -1 (after a device-side assert).
__device__ __forceinline__ int64_t cache_block(const KVCacheKernelParams& p, int b, int j) {
  return checked_block(p, block_entry(p, b, j));
}

__device__ __forceinline__ bool position_ok(const KVCacheKernelParams& p, int64_t pos) {
  const bool ok = pos >= 0 && pos < p.rotary_positions;
  CUDA_KERNEL_ASSERT(ok && "gqa_attention_with_kvcache: position outside the rotary_cos/rotary_sin table");
  return ok;
}

// The rotary pairing of element e (rotary_dim = 2 * half): past the rotary dims e is not rotated
// (it passes through, its own partner); else its pair's index in the tables, its partner and
// whether e is the pair's first.
struct RotaryPair {
  bool rotated;
  int index, partner;
  bool first;
};

__device__ __forceinline__ RotaryPair rotary_pair(const KVCacheKernelParams& p, int e) {
  const int half = p.rotary_half;
  if (e >= 2 * half) return {false, 0, e, true};
  if (p.interleaved) {
    const bool first = e % 2 == 0;
    return {true, e / 2, first ? e + 1 : e - 1, first};
  }
  const bool first = e < half;
  return {true, first ? e : e - half, first ? e + half : e - half, first};
}

// An element paired as `pair`, rotated by its pair's table entries (c, s), from itself (xe) and
// its partner (xp).
__device__ __forceinline__ float rotate_with(const RotaryPair& pair, float xe, float xp, float c, float s) {
  if (!pair.rotated) return xe;
  return pair.first ? rotary_y1(xe, xp, c, s) : rotary_y2(xp, xe, c, s);
}

// The same, rotated by the table row at pos.
__device__ __forceinline__ float rotate_element(const KVCacheKernelParams& p, const RotaryPair& pair, float xe,
                                                float xp, int64_t pos) {
  if (!pair.rotated) return xe;
  return rotate_with(pair, xe, xp, p.cos[pos * p.cos_stride + pair.index], p.sin[pos * p.sin_stride + pair.index]);
}

// Element e of x rotated by the table row at pos (later dims pass through).
template <typename T>
__device__ __forceinline__ float rotated(const KVCacheKernelParams& p, const T* x, int e, int64_t pos) {
  const RotaryPair pair = rotary_pair(p, e);
  return rotate_element(p, pair, to_float(x[e]), to_float(x[pair.partner]), pos);
}

// ---- 1. append --------------------------------------------------------------------------------

// Elements of a head row per thread: every head dim fits one CTA's threads this many times.
constexpr int kAppendElems =
    static_cast<int>(ceil_div(*std::max_element(attention::kHeadDims.begin(), attention::kHeadDims.end()), kThreads));

// One CTA per (new token, kv head). The new k and v elements are loaded before the token's
// position is known (they do not depend on it), k is rotated before its slot is known, and
// every load comes before the first store (the cache may alias k/v and the tables as far as the
// compiler knows): the row costs two round trips of memory latency, cache_seqlens, then the
// block table and the rotary tables together, rather than one per element.
template <typename T>
__global__ void __launch_bounds__(kThreads) append_kernel(const KVCacheKernelParams p) {
  allow_dependent_launch();  // the attend kernel's start-up overlaps this one (see the host)
  const int token = blockIdx.x;  // b * seq_new + i
  const int b = token / p.seq_new, i = token % p.seq_new;
  for (int h = blockIdx.y; h < p.n_kv_heads; h += gridDim.y) {
    const T* k_src = static_cast<const T*>(p.k_new) + b * p.kn_stride[0] + i * p.kn_stride[1] + h * p.kn_stride[2];
    const T* v_src = static_cast<const T*>(p.v_new) + b * p.vn_stride[0] + i * p.vn_stride[1] + h * p.vn_stride[2];
    T k_elem[kAppendElems], k_partner[kAppendElems], v_elem[kAppendElems];
    RotaryPair pair[kAppendElems];  // without tables (rotary_half 0) no element is rotated
#pragma unroll
    for (int u = 0; u < kAppendElems; ++u) {
      const int e = threadIdx.x + u * kThreads;
      if (e < p.head_dim) {
        pair[u] = rotary_pair(p, e);
        k_elem[u] = k_src[e];
        k_partner[u] = k_src[pair[u].partner];
        v_elem[u] = v_src[e];
      }
    }
    if (!length_ok(p, b)) return;
    const int64_t pos = static_cast<int64_t>(p.seqlens[b]) + i;
    if (p.cos != nullptr && !position_ok(p, pos)) return;
    T k_out[kAppendElems];  // k as the cache holds it: rotated and rounded once, else as given
#pragma unroll
    for (int u = 0; u < kAppendElems; ++u) {
      const int e = threadIdx.x + u * kThreads;
      if (e < p.head_dim) {
        k_out[u] = p.cos != nullptr
                       ? from_float<T>(rotate_element(p, pair[u], to_float(k_elem[u]), to_float(k_partner[u]), pos))
                       : k_elem[u];
      }
    }
    const int64_t blk = cache_block(p, b, static_cast<int>(pos));
    if (blk < 0) return;
    const int64_t off = p.block_size.mod(static_cast<uint32_t>(pos));
    T* k_dst = static_cast<T*>(p.k_cache) + blk * p.k_stride[0] + off * p.k_stride[1] + h * p.k_stride[2];
    T* v_dst = static_cast<T*>(p.v_cache) + blk * p.v_stride[0] + off * p.v_stride[1] + h * p.v_stride[2];
#pragma unroll
    for (int u = 0; u < kAppendElems; ++u) {
      const int e = threadIdx.x + u * kThreads;
      if (e < p.head_dim) k_dst[e] = k_out[u], v_dst[e] = v_elem[u];
    }
  }
}

// ---- 2. attend: what both kernels share --------------------------------------------------------

// The ROWS query rows [row0, row0 + ROWS) of kv head kvh's group (row = head in group x seq_q +
// token) as the attention sees them: rotated at cache_seqlens[b] + i and rounded to T (what
// apply_rotary would return) when tables are given, else as stored; 0 for a rotary position off
// the table and for rows past nrows. store(r, e, value) takes element e of tile row r.
// Each thread takes a run of D / (THREADS / ROWS) consecutive elements of one row, so that a row's
// head, token and position are worked out once, and issues the loads of up to kQueryBatch of its
// elements (q, and with tables each element's partner and its pair's cos and sin) before it uses
// any: a load used before the next is issued puts a round trip to memory per row of the tile on
// the start of every CTA, 4 at batch 1 with 4 query heads per kv head, against the 4 key tiles
// of a CTA at context 8192.
constexpr int kQueryBatch = 16;

template <typename T, int ROWS, int D, int THREADS, typename Store>
__device__ __forceinline__ void stage_query_rows(const KVCacheKernelParams& p, int b, int kvh, int row0, int nrows,
                                                 bool valid_len, Store store) {
  constexpr int kRunsPerRow = THREADS / ROWS, kRun = D / kRunsPerRow;
  constexpr int kBatch = kRun < kQueryBatch ? kRun : kQueryBatch;
  static_assert(THREADS % ROWS == 0 && D % kRunsPerRow == 0 && kRun % kBatch == 0,
                "a thread's run is whole batches of one row");
  const int r = threadIdx.x / kRunsPerRow, e0 = threadIdx.x % kRunsPerRow * kRun;
  if (r >= nrows) {
#pragma unroll
    for (int u = 0; u < kRun; ++u) store(r, e0 + u, 0.f);
    return;
  }
  const int row = row0 + r, h = kvh * p.group + row / p.seq_q, i = row % p.seq_q;
  const T* src = static_cast<const T*>(p.q) + b * p.q_stride[0] + i * p.q_stride[1] + h * p.q_stride[2];
  const bool rotary = p.cos != nullptr && valid_len;
  const int64_t pos = rotary ? static_cast<int64_t>(p.seqlens[b]) + i : 0;
  const bool rotate = rotary && position_ok(p, pos);
#pragma unroll
  for (int u0 = 0; u0 < kRun; u0 += kBatch) {
    T x[kBatch], partner[kBatch];
    float c[kBatch], s[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = e0 + u0 + u;
      x[u] = src[e];
      if (rotate) {
        const RotaryPair pair = rotary_pair(p, e);
        partner[u] = src[pair.partner];
        const int index = pair.rotated ? pair.index : 0;  // a row's first entry: unused
        c[u] = p.cos[pos * p.cos_stride + index];
        s[u] = p.sin[pos * p.sin_stride + index];
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const RotaryPair pair = rotary_pair(p, e0 + u0 + u);  // recomputed: cheaper than held
      const float value = !rotary  ? to_float(x[u])
                          : rotate ? round_to<T>(rotate_with(pair, to_float(x[u]), to_float(partner[u]), c[u], s[u]))
                                   : 0.f;
      store(r, e0 + u0 + u, value);
    }
  }
}

// The keys [lo, hi) query row `row` sees in a sequence of L keys (bottom-right aligned causal
// mask and window); lo = hi = 0 when it sees none.
__device__ __forceinline__ void visible_keys(const KVCacheKernelParams& p, int row, int L, int& lo, int& hi) {
  const int64_t pos = static_cast<int64_t>(row % p.seq_q) + L - p.seq_q;
  const int64_t row_lo = p.window_left >= 0 ? max64(0, pos - p.window_left) : 0;
  const int64_t row_hi = p.window_right >= 0 ? min64(L, pos + p.window_right + 1) : L;
  const bool any = row_hi > row_lo;
  lo = any ? static_cast<int>(row_lo) : 0;
  hi = any ? static_cast<int>(row_hi) : 0;
}

// The softcapped score in the log2 domain: softcap tanh(x / softcap) log2(e), x = scale q.k.
// The precise tanh: --use_fast_math would make tanhf the approximate MUFU.TANH.
__device__ __forceinline__ float score_log2(const KVCacheKernelParams& p, float x) {
  if (p.softcap > 0.f) x = p.softcap * attention::precise_tanh(x / p.softcap);
  return x * kLog2e;
}

// Writes element e of query row `row`'s result, from its unnormalized output `acc` and its
// softmax statistics (row_max in log2, row_sum; row_sum = 0: no key seen): out and lse (one
// split) or this split's fp32 partial.
template <typename T>
__device__ __forceinline__ void store_result(const KVCacheKernelParams& p, int b, int kvh, int row, int split, int e,
                                             float acc, float row_max, float row_sum) {
  const int h = kvh * p.group + row / p.seq_q, i = row % p.seq_q;
  const int64_t out_row = (static_cast<int64_t>(b) * p.seq_q + i) * p.n_q_heads + h;
  const int64_t lse_idx = (static_cast<int64_t>(b) * p.n_q_heads + h) * p.seq_q + i;
  const bool any = row_sum != 0.f;  // NaN too: a NaN score makes out and lse NaN, never 0
  const float o = any ? acc / row_sum : 0.f;
  const float lse = any ? (row_max + log2f(row_sum)) * kLn2 : (p.splits == 1 ? 0.f : -INFINITY);
  if (p.splits == 1) {
    static_cast<T*>(p.out)[out_row * p.head_dim + e] = from_float<T>(o);
    if (e == 0) p.lse[lse_idx] = lse;
  } else {
    const int64_t rows_total = static_cast<int64_t>(p.batch) * p.n_q_heads * p.seq_q;
    p.partial_out[(split * rows_total + lse_idx) * p.head_dim + e] = o;
    if (e == 0) p.partial_lse[split * rows_total + lse_idx] = lse;
  }
}

// CTA key range [j_begin, j_end) of `split`: the union [tile_lo, tile_hi) of its rows' visible
// ranges, from tile_lo rounded down to `align` keys, cut into p.splits chunks of whole
// `align`-key tiles (so every tile starts at a multiple of `align`).
__device__ __forceinline__ void split_range(const KVCacheKernelParams& p, int split, int tile_lo, int tile_hi,
                                            int align, int& j_begin, int& j_end) {
  if (tile_hi <= tile_lo) {
    j_begin = j_end = 0;
    return;
  }
  const int64_t base = tile_lo / align * align;
  const int64_t span = tile_hi - base;
  const int64_t chunk = ((span + p.splits - 1) / p.splits + align - 1) / align * align;
  j_begin = static_cast<int>(min64(tile_hi, base + split * chunk));
  j_end = static_cast<int>(min64(tile_hi, static_cast<int64_t>(j_begin) + chunk));
}

// ---- 2a. attend on CUDA cores (float32) ---------------------------------------------------------

constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

template <typename T, int D>
struct SimtTiling {
  static constexpr int kVec = vec_elems<T>();                          // elements per 16-byte chunk
  static constexpr int kChunks = D / kVec;                             // chunks per K/V row
  static constexpr int kLanes = kChunks >= 32 ? 32 : pow2_at_least(kChunks);  // threads per key
  static constexpr int kChunksPerLane = (kChunks + kLanes - 1) / kLanes;
  static constexpr int kElems = kChunksPerLane * kVec;                 // elements per thread
  static constexpr int kGroups = kThreads / kLanes;                    // lane groups per CTA
  static_assert(D % kVec == 0, "head_dim must be a multiple of the 16-byte vector");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attend_simt_kernel(const KVCacheKernelParams p) {
  using Tl = SimtTiling<T, D>;
  constexpr int E = Tl::kElems, V = Tl::kVec, LANES = Tl::kLanes, NG = Tl::kGroups, U = kKeysPerStep;
  __shared__ float q_s[kRows][D];
  __shared__ float o_s[kRows][D];
  __shared__ float m_s[NG][kRows];
  __shared__ float l_s[NG][kRows];
  __shared__ float row_max_s[kRows], row_sum_s[kRows];
  __shared__ int lo_s[kRows], hi_s[kRows];

  allow_dependent_launch();  // the combine's start-up overlaps this kernel
  const int split = blockIdx.x, kvh = blockIdx.y / p.row_tiles, tile = blockIdx.y % p.row_tiles, b = blockIdx.z;
  const int row0 = tile * kRows, nrows = min(kRows, p.rows - row0);
  const bool valid_len = length_ok(p, b);
  const int L = valid_len ? static_cast<int>(p.length(b)) : 0;

  // ---- stage: q rows (rotated, rounded to T, scaled) into shared memory; visible ranges.
  stage_query_rows<T, kRows, D, kThreads>(p, b, kvh, row0, nrows, valid_len, [&](int r, int e, float value) {
    q_s[r][e] = r < nrows ? value * p.scale : 0.f;  // padding rows 0 whatever the scale
  });
  // The rows' visible ranges live in shared memory (the key loop reads them once per row and
  // step): in registers they took 16 more, and the kernel spilled on sm_120.
  static_assert(kThreads >= kRows, "a thread per row computes its visible range");
  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    int row_lo = 0, row_hi = 0;
    if (r < nrows) visible_keys(p, row0 + r, L, row_lo, row_hi);
    lo_s[r] = row_lo, hi_s[r] = row_hi;
  }
  __syncthreads();
  int tile_lo = L, tile_hi = 0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (hi_s[r] > lo_s[r]) tile_lo = min(tile_lo, lo_s[r]), tile_hi = max(tile_hi, hi_s[r]);
  }
  int j_begin, j_end;
  split_range(p, split, tile_lo, tile_hi, 1, j_begin, j_end);

  // ---- stage: stream the key range; each lane group keeps its own (m, l, O).
  // Lane groups are consecutive lanes; a warp's KPW groups take consecutive key steps, and the
  // loop count is the same for the whole warp (shuffles need every lane).
  constexpr int KPW = 32 / LANES;
  const int lane = threadIdx.x % LANES, grp = threadIdx.x / LANES, warp = threadIdx.x / 32;
  float m[kRows], l[kRows], acc[kRows][E];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY, l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[r][e] = 0.f;
  }
  const T* k_base = static_cast<const T*>(p.k_cache) + kvh * p.k_stride[2];
  const T* v_base = static_cast<const T*>(p.v_cache) + kvh * p.v_stride[2];
  wait_for_prior_kernel();  // the append's rows: q and the ranges above overlap it
  for (int jw = j_begin + warp * KPW * U; jw < j_end; jw += NG * U) {
    const int j0 = jw + (grp % KPW) * U;
    Vec<T, V> kc[U][Tl::kChunksPerLane], vc[U][Tl::kChunksPerLane];
    bool key_ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      const int64_t blk = j < j_end ? cache_block(p, b, j) : -1;
      key_ok[u] = blk >= 0;
      const int64_t off = p.block_size.mod(j);
#pragma unroll
      for (int c = 0; c < Tl::kChunksPerLane; ++c) {
        const int chunk_idx = lane + c * LANES;
        if (key_ok[u] && chunk_idx < Tl::kChunks) {
          kc[u][c] = Vec<T, V>::load(k_base + blk * p.k_stride[0] + off * p.k_stride[1] + chunk_idx * V);
          vc[u][c] = Vec<T, V>::load(v_base + blk * p.v_stride[0] + off * p.v_stride[1] + chunk_idx * V);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) kc[u][c].v[e] = vc[u][c].v[e] = from_float<T>(0.f);
        }
      }
    }
    // Scores of every row against the U keys: partial dots, then a butterfly over the group.
    float s[kRows][U];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int u = 0; u < U; ++u) s[r][u] = 0.f;
      if (r < nrows) {
#pragma unroll
        for (int c = 0; c < Tl::kChunksPerLane; ++c) {
          const int chunk_idx = lane + c * LANES;
          if (chunk_idx < Tl::kChunks) {
#pragma unroll
            for (int e = 0; e < V; ++e) {
              const float qv = q_s[r][chunk_idx * V + e];
#pragma unroll
              for (int u = 0; u < U; ++u) s[r][u] = fmaf(qv, to_float(kc[u][c].v[e]), s[r][u]);
            }
          }
        }
#pragma unroll
        for (int off = LANES / 2; off > 0; off >>= 1) {
#pragma unroll
          for (int u = 0; u < U; ++u) s[r][u] += __shfl_xor_sync(0xffffffffu, s[r][u], off);
        }
      }
    }
    // Online softmax per row, in the log2 domain; keys a row does not see get p = 0 and are
    // never multiplied in (0 * Inf would be NaN).
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= nrows) continue;
      float mx = m[r];
      bool seen[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j0 + u;
        seen[u] = key_ok[u] && j >= lo_s[r] && j < hi_s[r];
        s[r][u] = seen[u] ? score_log2(p, s[r][u]) : -INFINITY;
        mx = max_keep_nan(mx, s[r][u]);  // a NaN score makes m, p, l and the row's out NaN
      }
      if (mx == -INFINITY) continue;
      const float corr = exp2f(m[r] - mx);
      m[r] = mx;
      float psum = 0.f;
      float pu[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pu[u] = seen[u] ? exp2f(s[r][u] - mx) : 0.f;
        psum += pu[u];
      }
      l[r] = l[r] * corr + psum;
#pragma unroll
      for (int c = 0; c < Tl::kChunksPerLane; ++c) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          float a = acc[r][c * V + e] * corr;
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (seen[u]) a = fmaf(pu[u], to_float(vc[u][c].v[e]), a);
          }
          acc[r][c * V + e] = a;
        }
      }
    }
  }

  // ---- stage: merge the lane groups in a fixed order.
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) m_s[grp][r] = m[r], l_s[grp][r] = l[r];
  }
  for (int t = threadIdx.x; t < kRows * D; t += blockDim.x) o_s[t / D][t % D] = 0.f;
  __syncthreads();
  // Row statistics in registers (compile-time row indices) for the merge, in shared memory for
  // the write-out, whose row index is a run-time value.
  float row_max[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    for (int g = 0; g < NG; ++g) row_max[r] = fmaxf(row_max[r], m_s[g][r]);
  }
  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    float mx = -INFINITY, sum = 0.f;
    for (int g = 0; g < NG; ++g) mx = fmaxf(mx, m_s[g][r]);
    for (int g = 0; g < NG; ++g) {
      if (m_s[g][r] != -INFINITY) sum += l_s[g][r] * exp2f(m_s[g][r] - mx);
    }
    row_max_s[r] = mx, row_sum_s[r] = sum;
  }
  for (int g = 0; g < NG; ++g) {
    if (grp == g) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float f = m[r] == -INFINITY ? 0.f : exp2f(m[r] - row_max[r]);
#pragma unroll
        for (int c = 0; c < Tl::kChunksPerLane; ++c) {
          const int chunk_idx = lane + c * LANES;
          if (chunk_idx < Tl::kChunks) {
#pragma unroll
            for (int e = 0; e < V; ++e) o_s[r][chunk_idx * V + e] += f * acc[r][c * V + e];
          }
        }
      }
    }
    __syncthreads();
  }

  // ---- stage: write out/lse (one split) or this split's partial.
  for (int t = threadIdx.x; t < nrows * D; t += blockDim.x) {
    const int r = t / D, e = t % D;
    store_result<T>(p, b, kvh, row0 + r, split, e, o_s[r][e], row_max_s[r], row_sum_s[r]);
  }
}

// ---- 2b. attend on tensor cores (float16 / bfloat16) ------------------------------------------

constexpr int kTcRows = 16;                 // query rows per CTA: one m16 tile
constexpr int kTcThreads = 128;             // 4 warps
constexpr int kTcStageBudget = 72 * 1024;   // bytes of K/V stages per CTA
constexpr int kTcMinCtasPerSm = 2;          // sm_80's shared memory holds 2 at d >= 64 (header)
// The deep ring: at d = kDeepRingHeadDim a second kernel with kTcDeepStageBudget of stages, 3
// where the budget gives 2, for grids that fit one wave of its CTAs (the header's "Deep ring").
constexpr int kDeepRingHeadDim = 128;
constexpr int kTcDeepStageBudget = 108 * 1024;

template <typename T, int D, int kStageBudget = kTcStageBudget>
struct TcTiling {
  static constexpr int kWarps = kTcThreads / 32;
  static constexpr int kWarpsN = D > 128 ? 2 : 1;   // warps sharing a key slice, splitting O's columns
  static constexpr int kWarpsK = kWarps / kWarpsN;  // key slices of 16 keys per tile
  static constexpr int kKeys = 16 * kWarpsK;        // keys per tile
  static constexpr int kPitch = attention::smem_pitch<D>();
  static constexpr int kTileElems = kKeys * kPitch;  // one K or V tile in shared memory
  static constexpr int kStageBytes = 2 * kTileElems * static_cast<int>(sizeof(T));
  static constexpr int kStages = std::clamp(kStageBudget / kStageBytes, 2, 4);
  static constexpr int kOCols = D / kWarpsN;        // O columns per warp
  static constexpr int kONTiles = kOCols / 8;
  static constexpr int kVec = vec_elems<T>();
  static constexpr int kChunksPerRow = D / kVec;
  static constexpr int kChunksPerThread = kKeys * kChunksPerRow / kTcThreads;
  // Chunk i of a thread's share of a tile is chunk threadIdx.x + i kTcThreads of the tile's rows.
  // When a row's chunks divide the threads (d = 32, 64, 128, 256) that is one column for all of a
  // thread's chunks, rows kRowStep apart, and is spelled so: the compiler kept the general form's
  // rows and columns in a register per chunk.
  static constexpr bool kColumnPerThread = kTcThreads % kChunksPerRow == 0;
  static constexpr int kRowStep = kColumnPerThread ? kTcThreads / kChunksPerRow : 0;
  static constexpr size_t kSmemBytes = static_cast<size_t>(kTcRows * kPitch + 2 * kStages * kTileElems) * sizeof(T);
  static_assert(kKeys * kChunksPerRow % kTcThreads == 0, "a tile is whole 16-byte chunks per thread");
  static_assert(kONTiles % 2 == 0 && D % 16 == 0, "P V takes n-tile pairs, Q K^T 16-wide k-chunks");
  static_assert(static_cast<size_t>(kWarpsK) * kTcRows * D * sizeof(float) <= 2 * kStages * kTileElems * sizeof(T),
                "the merge buffer overlays the K/V stages");
};

template <typename T, int D, int kStageBudget = kTcStageBudget>
__global__ void __launch_bounds__(kTcThreads, kTcMinCtasPerSm) attend_tc_kernel(const KVCacheKernelParams p) {
  using Tl = TcTiling<T, D, kStageBudget>;
  constexpr int P = Tl::kPitch, KEYS = Tl::kKeys, S = Tl::kStages, WK = Tl::kWarpsK;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [kTcRows][P]
  T* k_s = q_s + kTcRows * P;               // [S][KEYS][P]
  T* v_s = k_s + S * Tl::kTileElems;        // [S][KEYS][P]
  float* o_merge = reinterpret_cast<float*>(k_s);  // [WK][kTcRows][D], after the key loop
  __shared__ float m_s[WK][kTcRows], l_s[WK][kTcRows], row_max_s[kTcRows], row_sum_s[kTcRows];

  allow_dependent_launch();  // the combine's start-up overlaps this kernel
  const int split = blockIdx.x, kvh = blockIdx.y / p.row_tiles, tile = blockIdx.y % p.row_tiles, b = blockIdx.z;
  const int row0 = tile * kTcRows, nrows = min(kTcRows, p.rows - row0);
  const bool valid_len = length_ok(p, b);
  const int L = valid_len ? static_cast<int>(p.length(b)) : 0;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wk = warp / Tl::kWarpsN, wn = warp % Tl::kWarpsN, g = lane / 4, tq = lane % 4;

  // ---- stage: the visible ranges of the tile and of this thread's two fragment rows, g and g + 8.
  int tile_lo = L, tile_hi = 0;
  for (int r = 0; r < nrows; ++r) {
    int lo, hi;
    visible_keys(p, row0 + r, L, lo, hi);
    if (hi > lo) tile_lo = min(tile_lo, lo), tile_hi = max(tile_hi, hi);
  }
  int lo[2], hi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    lo[h] = hi[h] = 0;
    if (g + 8 * h < nrows) visible_keys(p, row0 + g + 8 * h, L, lo[h], hi[h]);
  }
  int j_begin, j_end;
  split_range(p, split, tile_lo, tile_hi, KEYS, j_begin, j_end);
  const int n_tiles = (j_end - j_begin + KEYS - 1) / KEYS;

  // ---- stage: K/V tiles [jt, jt + KEYS) into shared memory with cp.async, each key row
  // gathered through the block table; keys past j_end (and unreadable blocks) are zero-filled,
  // so the products never meet the cache's unwritten slots. From the prologue's last tile on,
  // the block-table entries of a tile's rows are fetched one tile ahead of its copies
  // (next_block): their latency then overlaps a tile's products instead of standing before
  // every copy of a paged cache.
  // Byte addresses: a row of a tile (contiguous) or of a block (paged) is a 32-bit index times a
  // 32-bit stride added to a 64-bit base, one IMAD.WIDE.U32, where 64-bit element arithmetic cost
  // about six instructions per address.
  auto row_at = [](const char* base, int index, int stride_bytes) {  // both at least 0
    return base + static_cast<uint64_t>(static_cast<uint32_t>(index)) * static_cast<uint32_t>(stride_bytes);
  };
  auto chunk_row = [](int i) {
    const int c = threadIdx.x + i * kTcThreads;
    return Tl::kColumnPerThread ? static_cast<int>(threadIdx.x) / Tl::kChunksPerRow + i * Tl::kRowStep
                                : c / Tl::kChunksPerRow;
  };
  auto chunk_col = [](int i) {
    const int c = Tl::kColumnPerThread ? threadIdx.x : threadIdx.x + i * kTcThreads;
    return c % Tl::kChunksPerRow * Tl::kVec;
  };
  const char* k_base = static_cast<const char*>(p.k_cache) + kvh * p.k_stride[2] * static_cast<int64_t>(sizeof(T));
  const char* v_base = static_cast<const char*>(p.v_cache) + kvh * p.v_stride[2] * static_cast<int64_t>(sizeof(T));
  // A contiguous cache: sequence b's rows; a paged one: sequence b's row of the block table.
  const char* k_seq = k_base + b * p.k_stride[0] * static_cast<int64_t>(sizeof(T));
  const char* v_seq = v_base + b * p.v_stride[0] * static_cast<int64_t>(sizeof(T));
  const bool contiguous = p.block_table == nullptr;
  const int32_t* table_row = contiguous ? nullptr : p.block_table + b * p.bt_stride[0];
  static_assert(Tl::kChunksPerThread <= 32, "one bit per chunk in next_past");
  int32_t next_block[Tl::kChunksPerThread];  // the entries of this thread's chunks in the next tile issued
  uint32_t next_past = 0;                    // bit i: chunk i's key is past j_end (no entry)
  // An entry outside the cache zero-fills its row and is asserted on once, after the key loop:
  // a branch to the assert per gathered row cost as much as the row's addressing.
  bool blocks_ok = true;
  // A contiguous cache's key j is row j of sequence b's cache (j < L <= capacity): no block table
  // to fetch, no division. A paged chunk past the split loads the entry of the tile's first key
  // (jt < j_end), unused, so that every entry's load and address are unconditional.
  auto fetch_blocks = [&](int jt) {
    if (contiguous) return;
    next_past = 0;
#pragma unroll
    for (int i = 0; i < Tl::kChunksPerThread; ++i) {
      const int j = jt + chunk_row(i);
      const bool past = j >= j_end;
      const uint32_t table_index = p.block_size.div(past ? jt : j);
      next_block[i] = table_row[static_cast<uint64_t>(table_index) * static_cast<uint32_t>(p.bt_entry_stride)];
      next_past |= static_cast<uint32_t>(past) << i;
    }
  };
  // A zero-filled chunk still gets an address inside the cache (the tile's first row, block 0),
  // picked by a 32-bit select of its row rather than a 64-bit one per pointer.
  auto load_kv = [&](int stage, int jt) {  // paged: from next_block, fetched for jt
    T* k_dst = k_s + stage * Tl::kTileElems;
    T* v_dst = v_s + stage * Tl::kTileElems;
    if (contiguous) {
#pragma unroll
      for (int i = 0; i < Tl::kChunksPerThread; ++i) {
        const int r = chunk_row(i), col = chunk_col(i);
        const bool ok = jt + r < j_end;
        const int row = ok ? jt + r : jt;
        const uint32_t col_bytes = col * sizeof(T);
        mma::cp_async_16(k_dst + r * P + col, row_at(k_seq + col_bytes, row, p.k_token_bytes), ok);
        mma::cp_async_16(v_dst + r * P + col, row_at(v_seq + col_bytes, row, p.v_token_bytes), ok);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < Tl::kChunksPerThread; ++i) {
      const int r = chunk_row(i), col = chunk_col(i);
      const int32_t blk = next_block[i];
      const bool in_split = !(next_past >> i & 1u), ok = in_split && block_in_cache(p, blk);
      blocks_ok &= ok || !in_split;
      const int block = ok ? blk : 0;
      const int off = ok ? static_cast<int>(p.block_size.mod(jt + r)) : 0;
      const uint32_t col_bytes = col * sizeof(T);
      mma::cp_async_16(k_dst + r * P + col,
                       row_at(row_at(k_base + col_bytes, block, p.k_block_bytes), off, p.k_token_bytes), ok);
      mma::cp_async_16(v_dst + r * P + col,
                       row_at(row_at(v_base + col_bytes, block, p.v_block_bytes), off, p.v_token_bytes), ok);
    }
  };
  // The append writes cache rows this kernel reads from here on: the lengths, the ranges and
  // the first tile's block-table entries overlap it.
  if (n_tiles > 0) fetch_blocks(j_begin);
  wait_for_prior_kernel();
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s > 0 && s < n_tiles) fetch_blocks(j_begin + s * KEYS);
    if (s < n_tiles) load_kv(s, j_begin + s * KEYS);
    mma::cp_async_commit();
  }
  if (S - 1 < n_tiles) fetch_blocks(j_begin + (S - 1) * KEYS);

  // ---- stage: the 16 query rows (rotated, rounded to T) into shared memory, while the first
  // tiles are in flight (the first key-loop barrier publishes them).
  stage_query_rows<T, kTcRows, D, kTcThreads>(p, b, kvh, row0, nrows, valid_len,
                                              [&](int r, int e, float value) { q_s[r * P + e] = from_float<T>(value); });

  // ---- stage: the key loop. Warp (wk, wn) takes keys [16 wk, 16 wk + 16) of each tile and
  // O's columns [wn kOCols, (wn + 1) kOCols): S = Q K^T (16 x 16), masks and the online
  // softmax in the log2 domain, O = O corr + P V with P rounded to T in registers.
  float o[Tl::kONTiles][4];
#pragma unroll
  for (int nt = 0; nt < Tl::kONTiles; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  // Decode packs G x seq_q rows, 8 or fewer for most models (G = 4 to 8 at seq_q = 1): then the
  // fragment rows g + 8 are all padding, and their softmax and rescale are skipped (P = 0).
  const int row_halves = nrows > 8 ? 2 : 1;
  for (int t = 0; t < n_tiles; ++t) {
    mma::cp_async_wait<S - 2>();
    __syncthreads();  // tile t landed for every thread; every warp is done with tile t - 1's stage
    if (t + S - 1 < n_tiles) {
      load_kv((t + S - 1) % S, j_begin + (t + S - 1) * KEYS);
      if (t + S < n_tiles) fetch_blocks(j_begin + (t + S) * KEYS);
    }
    mma::cp_async_commit();

    const T* k_tile = k_s + (t % S) * Tl::kTileElems + wk * 16 * P;
    const T* v_tile = v_s + (t % S) * Tl::kTileElems + wk * 16 * P;
    // S = Q K^T as two chains of mma over the halves of d, summed: a decode tile's path is
    // serial (few warps per scheduler), and the chains halve its dependent mma latency.
    constexpr int kChunksQK = D / 16, kChunksLow = (kChunksQK + 1) / 2;
    float s[2][4] = {}, s_high[2][4] = {};
    mma::warp_gemm_nk<T, kChunksLow, 2>(s, mma::ATileRows<T>{q_s, P, 0}, k_tile, P, 0, lane);
    mma::warp_gemm_nk<T, kChunksQK - kChunksLow, 2>(s_high, mma::ATileRows<T>{q_s + 16 * kChunksLow, P, 0},
                                                     k_tile + 16 * kChunksLow, P, 0, lane);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] += s_high[nt][i];
    }

    const int key0 = j_begin + t * KEYS + wk * 16;
    float corr[2] = {1.f, 1.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h >= row_halves) {
        s[0][2 * h] = s[0][2 * h + 1] = s[1][2 * h] = s[1][2 * h + 1] = 0.f;
        continue;
      }
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int j = key0 + 8 * nt + 2 * tq + c;
          const bool seen = j < j_end && j >= lo[h] && j < hi[h];
          float& x = s[nt][2 * h + c];
          x = seen ? score_log2(p, x * p.scale) : -INFINITY;
          mx = max_keep_nan(mx, x);  // a NaN score makes m, p, l and the row's out NaN
        }
      }
      mx = max_keep_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = max_keep_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = max_keep_nan(m[h], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no key yet: exp2(-inf - 0) = 0, not NaN
      corr[h] = exp2f(m[h] - m_use);
      m[h] = m_new;
      float psum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& x = s[nt][2 * h + c];
          x = exp2f(x - m_use);
          psum += x;
        }
      }
      l[h] = l[h] * corr[h] + psum;
    }
    // Once the running max has settled most tiles leave it, and multiplying by 1 changes no bit:
    // the warp rescales O only when one of its rows' max rose (or is NaN).
    if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
      for (int nt = 0; nt < Tl::kONTiles; ++nt) {
        o[nt][0] *= corr[0], o[nt][1] *= corr[0], o[nt][2] *= corr[1], o[nt][3] *= corr[1];
      }
    }
    mma::warp_gemm_kn<T, 1, Tl::kONTiles>(o, mma::AAccumulators<T, 2>{s}, v_tile, P, wn * Tl::kOCols, lane);
  }

  assert_blocks_in_cache(blocks_ok);

  // ---- stage: merge the key slices in a fixed order (deterministic); the merge buffer
  // overlays the stages once every copy has landed and every warp is done with them.
  mma::cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    if (wn == 0 && tq == 0) m_s[wk][g + 8 * h] = m[h], l_s[wk][g + 8 * h] = l[h];
  }
  float* o_w = o_merge + wk * kTcRows * D;
#pragma unroll
  for (int nt = 0; nt < Tl::kONTiles; ++nt) {
    const int col = wn * Tl::kOCols + 8 * nt + 2 * tq;
    *reinterpret_cast<float2*>(o_w + g * D + col) = make_float2(o[nt][0], o[nt][1]);
    *reinterpret_cast<float2*>(o_w + (g + 8) * D + col) = make_float2(o[nt][2], o[nt][3]);
  }
  __syncthreads();
  if (threadIdx.x < kTcRows) {
    const int r = threadIdx.x;
    float mx = -INFINITY, sum = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) mx = fmaxf(mx, m_s[w][r]);
#pragma unroll
    for (int w = 0; w < WK; ++w) {
      if (m_s[w][r] != -INFINITY) sum += l_s[w][r] * exp2f(m_s[w][r] - mx);
    }
    row_max_s[r] = mx, row_sum_s[r] = sum;
  }
  __syncthreads();

  // ---- stage: write out/lse (one split) or this split's partial.
  for (int t = threadIdx.x; t < nrows * D; t += kTcThreads) {
    const int r = t / D, e = t % D;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) {
      if (m_s[w][r] != -INFINITY) acc += exp2f(m_s[w][r] - row_max_s[r]) * o_merge[(w * kTcRows + r) * D + e];
    }
    store_result<T>(p, b, kvh, row0 + r, split, e, acc, row_max_s[r], row_sum_s[r]);
  }
}

// ---- 3. combine -------------------------------------------------------------------------------

// One CTA per query row. The splits' lse values are read at once, one per thread (one thread
// reading them in turn would put two passes of global-load latency per split on every row's
// path), then their max and the weights' sum by block reductions, in a fixed order; each thread
// then sums its dims of the splits' partial outputs in split order, the loads unrolled ahead of
// the sums, the first batch of them issued with the lse loads.
static_assert(kMaxSplits <= kThreads, "one thread per split's lse");

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const KVCacheKernelParams p) {
  __shared__ float weight[kThreads];  // thread s's split's weight, 0 for s past the last split
  __shared__ float scratch[32];
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.n_q_heads * p.seq_q;
  const int64_t lse_idx = blockIdx.x;  // (b, h, i) in lse order
  const int i = lse_idx % p.seq_q, h = lse_idx / p.seq_q % p.n_q_heads, b = lse_idx / (p.seq_q * p.n_q_heads);

  // lse = log sum_s e^(lse_s), from max m: m + log sum_s e^(lse_s - m). A split that saw no key
  // has lse -inf and weight 0; a NaN lse is passed over by the max and makes its weight, the sum
  // and so lse and out NaN.
  const int s = threadIdx.x;
  const float* partial = p.partial_out + lse_idx * p.head_dim;
  const int64_t split_stride = rows_total * p.head_dim;
  // Splits whose loads are issued together. A batch costs about a round trip to L2: 32 take
  // batch 1's split counts (32 on an H200 at context 8192) in two (ptxas keeps 10-20 loads
  // ahead of the sums), where batches of 8 took four; the repeated loads past the last split
  // hit L1.
  constexpr int kBatch = 32;
  static_assert((kMaxSplits + kBatch - 1) / kBatch * kBatch <= kThreads, "each split of a batch has a weight slot");
  auto load_batch = [&](float (&v)[kBatch], int t0, int e) {
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {  // past the last split: its load again, weighted 0 below
      v[u] = __ldg(partial + min(t0 + u, p.splits - 1) * split_stride + e);
    }
  };
  wait_for_prior_kernel();  // the attend kernel's partials
  const float lse_s = s < p.splits ? p.partial_lse[s * rows_total + lse_idx] : -INFINITY;
  // The first batch of this thread's first dim goes out with the lse values: it waits for the
  // attend kernel, not for the weights, so the reductions below overlap its round trip.
  float first[kBatch];
  if (threadIdx.x < p.head_dim) load_batch(first, 0, threadIdx.x);
  const float mx = block_reduce<MaxOp>(lse_s, scratch);
  const float weight_s = lse_s == -INFINITY ? 0.f : expf(lse_s - mx);
  weight[s] = weight_s;  // every slot a batch reads is written: the loads need no bounds
  const float total = block_reduce<SumOp>(weight_s, scratch);  // its barriers publish weight[]
  if (threadIdx.x == 0) p.lse[lse_idx] = total != 0.f ? mx + logf(total) : 0.f;  // NaN too

  const float inv = total != 0.f ? 1.f / total : 0.f;
  const int64_t out_row = (static_cast<int64_t>(b) * p.seq_q + i) * p.n_q_heads + h;
  auto add_batch = [&](float& o, const float (&v)[kBatch], int t0) {
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const float w = weight[t0 + u];
      o = w != 0.f ? fmaf(w, v[u], o) : o;  // a split without keys adds nothing, even an inf of V
    }
  };
  for (int e = threadIdx.x; e < p.head_dim; e += blockDim.x) {
    float o = 0.f;
    for (int t0 = 0; t0 < p.splits; t0 += kBatch) {
      if (e == threadIdx.x && t0 == 0) {
        add_batch(o, first, 0);
      } else {
        float v[kBatch];
        load_batch(v, t0, e);
        add_batch(o, v, t0);
      }
    }
    static_cast<T*>(p.out)[out_row * p.head_dim + e] = from_float<T>(o * inv);
  }
}

// ---- 4. prefill-shaped calls on the prefill kernels -------------------------------------------
// (kvcache_attention.h, kPrefillRouteMinSeqQ.) The attend kernels' 16-row tiles (8 rows in fp32)
// read each K/V row once per 16 rows of a group: 512 times per kv head for a 2048-token prompt at
// G = 4, and their grid's n_kv_heads x row tiles stops at 65535 (a 32K-token prompt at 32/8
// heads). The prefill kernels (attention.cu) read each K/V row once per 64-128 query tokens of a
// head. A contiguous cache's sequence b is rows [0, L_b) of k_cache[b] and v_cache[b], which the
// prefill kernels read in place, L_b coming from the device (AttentionParams::key_lengths); with
// rotary tables, q is rotated into a copy first, each element as the attend kernels see it
// (stage_query_rows). A paged cache is read through the block table (by the tensor-core kernel
// or, in fp32 and where the device has no tensor-core tile, the SIMT one), each sequence's
// entries checked first by key_lengths_kernel.

// L_b for the prefill kernels, or 0 (after a device-side assert) when it exceeds the capacity or,
// paged, a block-table entry of its first L_b tokens names a block outside the cache: they then
// read nothing of that sequence, never past its cache rows. One CTA per sequence, its threads
// over the sequence's pages.
__global__ void __launch_bounds__(kThreads) key_lengths_kernel(const KVCacheKernelParams p, int* lengths) {
  const int b = blockIdx.x;
  // Thread 0 checks (and asserts) once; every thread learns the verdict.
  const bool length_fits = __syncthreads_or(threadIdx.x == 0 && length_ok(p, b));
  const int length = length_fits ? static_cast<int>(p.length(b)) : 0;
  bool blocks_fit = true;
  if (p.block_table != nullptr) {
    const int pages = length > 0 ? static_cast<int>(p.block_size.div(length - 1)) + 1 : 0;
    for (int page = threadIdx.x; page < pages; page += blockDim.x) {
      blocks_fit &= block_in_cache(p, page_entry(p, b, page));
    }
  }
  blocks_fit = __syncthreads_and(blocks_fit);
  if (threadIdx.x == 0) {
    assert_blocks_in_cache(blocks_fit);
    lengths[b] = blocks_fit ? length : 0;
  }
}

// q rotated at positions cache_seqlens[b] + i and rounded to T, [batch, seq_q, n_q_heads, d]
// contiguous: one CTA per query token (prefill-shaped calls only, once per call). 0 for a
// position off the table (after the device-side assert).
template <typename T>
__global__ void __launch_bounds__(kThreads) rotate_q_kernel(const KVCacheKernelParams p, T* q_rot) {
  const int token = blockIdx.x;  // b * seq_q + i
  const int b = token / p.seq_q, i = token % p.seq_q;
  const int64_t pos = static_cast<int64_t>(p.seqlens[b]) + i;
  const bool ok = position_ok(p, pos);
  const T* src = static_cast<const T*>(p.q) + b * p.q_stride[0] + i * p.q_stride[1];
  T* dst = q_rot + static_cast<int64_t>(token) * p.n_q_heads * p.head_dim;
  for (int t = threadIdx.x; t < p.n_q_heads * p.head_dim; t += blockDim.x) {
    const int h = t / p.head_dim, e = t % p.head_dim;
    dst[t] = from_float<T>(ok ? rotated(p, src + h * p.q_stride[2], e, pos) : 0.f);
  }
}

// The route's call: q (or its rotated copy, written by rotate_q_kernel) over the whole caches,
// into the op's out and lse. Made before anything is written, so its limits are checked first.
AttentionCall prefill_call(const KVCacheAttentionParams& a) {
  AttentionCall call{};
  call.q = a.rotary_half > 0 ? at::empty(a.q.sizes(), a.q.options()) : a.q;
  call.k = a.k_cache;
  call.v = a.v_cache;
  call.shape = AttentionShape{a.batch, a.seq_q, a.capacity, a.n_q_heads, a.n_kv_heads, a.head_dim, false};
  call.causal = a.causal;
  call.scale = a.scale;
  call.window = make_key_window(call.shape, a.causal, a.window_left, a.window_right, a.softcap);
  call.softcap = a.softcap;
  call.out = a.out;
  call.lse = a.lse;
  return call;
}

template <typename T>
void attend_on_prefill_kernels(const KVCacheKernelParams& p, const AttentionCall& call,
                               const std::optional<at::Tensor>& block_table, cudaStream_t stream) {
  const at::Tensor lengths = at::empty({p.batch}, call.q.options().dtype(at::kInt));
  key_lengths_kernel<<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(p, lengths.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.cos != nullptr) {
    rotate_q_kernel<T><<<static_cast<unsigned>(p.batch * p.seq_q), kThreads, 0, stream>>>(
        p, static_cast<T*>(call.q.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  attention_forward_on_cache(call, lengths.const_data_ptr<int>(), block_table);
}

// ---- host -------------------------------------------------------------------------------------

// The prefill kernels' head dims (attention_launch.cuh's one list).
void check_head_dim(int64_t head_dim) {
  const auto& dims = attention::kHeadDims;
  TORCH_CHECK_VALUE(std::find(dims.begin(), dims.end(), head_dim) != dims.end(), "head_dim ", head_dim,
                    " is not supported by the CUDA kvcache attention kernels (supported: ",
                    c10::Join(", ", dims), ")");
}

void check_cache_alignment(const at::Tensor& cache, const char* name) {
  const int64_t vec = kVecBytes / cache.element_size();
  TORCH_CHECK(rows_in_16byte_vectors(cache), name, " must start 16-byte aligned with 16-byte aligned rows (strides ",
              "multiple of ", vec, " elements), got strides ", cache.strides());
}

// The cache's stride along dim in bytes, which the attend kernels take as a 32-bit factor (0
// along a dim of one element, whose index is always 0).
int stride_bytes_32(const at::Tensor& cache, int dim, const char* name) {
  if (cache.size(dim) <= 1) return 0;
  const int64_t bytes = cache.stride(dim) * cache.element_size();
  TORCH_CHECK_VALUE(bytes >= 0 && bytes <= std::numeric_limits<int32_t>::max(), name, ": the CUDA kernels take the ",
                    dim == 0 ? "block" : "token", " stride (dim ", dim, ") below 2^31 bytes, got ", bytes, " bytes");
  return static_cast<int>(bytes);
}

// LLAMA_EXT_CUDA_DECODE_SPLITS=N forces N key splits (1 to kMaxSplits), whatever the GPU and the
// shapes: so that one GPU's tests run every split count, and the rule below can be tuned by
// measurement (scripts/decode_splits.py). 0: not set. Read before anything is launched.
int forced_decode_splits() {
  const char* forced = std::getenv("LLAMA_EXT_CUDA_DECODE_SPLITS");
  if (forced == nullptr) return 0;
  char* end = nullptr;
  const long n = std::strtol(forced, &end, 10);
  TORCH_CHECK_VALUE(end != forced && *end == '\0' && n >= 1 && n <= kMaxSplits,
                    "LLAMA_EXT_CUDA_DECODE_SPLITS must be a split count from 1 to ", kMaxSplits, ", got '", forced, "'");
  return static_cast<int>(n);
}

// LLAMA_EXT_CUDA_DECODE_DEEP_RING=1 runs the deep-ring kernel at d = kDeepRingHeadDim (raising,
// before anything is written, where the GPU's shared memory does not hold it), 0 never
// (env_switch); unset, where it fits, its split count is the two-stage kernel's and the whole
// grid is resident at once. The ring's depth moves only when tiles are loaded, so the bits are
// the same: for tests of both kernels on one GPU and for measuring the rule
// (scripts/decode_splits.py).
constexpr const char* kDeepRingVariable = "LLAMA_EXT_CUDA_DECODE_DEEP_RING";

// Key splits per (batch, kv head, row tile) unit, at most one per kMinKeysPerSplit keys of the
// capacity (the lengths themselves live on the device). When every split fits in one wave of
// the GPU's resident slots (SMs x CTAs per SM at this kernel's registers and shared memory),
// all of them: shorter CTAs, all running at once. Otherwise the smallest count within 85% of
// the best wave efficiency (CTAs / whole waves of slots).
int choose_splits(void (*kernel)(KVCacheKernelParams), int threads, size_t smem, int64_t units, int64_t capacity) {
  const int64_t slots = kernel_residency(kernel, threads, smem).slots();
  const int max_splits = static_cast<int>(std::clamp<int64_t>(capacity / kMinKeysPerSplit, 1, kMaxSplits));
  units = std::max<int64_t>(units, 1);
  if (units * max_splits <= slots) return max_splits;
  auto efficiency = [&](int s) {
    const int64_t ctas = units * s;
    return static_cast<double>(ctas) / static_cast<double>(ceil_div(ctas, slots) * slots);
  };
  double best = 0.0;
  for (int s = 1; s <= max_splits; ++s) best = std::max(best, efficiency(s));
  for (int s = 1; s <= max_splits; ++s) {
    if (efficiency(s) >= 0.85 * best) return s;
  }
  return 1;
}

void kvcache_attention_cuda(const KVCacheAttentionParams& a) {
  check_cuda_dtype(a.q, "q");
  check_head_dim(a.head_dim);
  check_cache_alignment(a.k_cache, "k_cache");
  check_cache_alignment(a.v_cache, "v_cache");
  // Key indices are int32 on the device, with a tile of headroom past the length; so is the block
  // size, a FastDivisor's divisor (below 2^31), which a table of no columns leaves unbounded.
  TORCH_CHECK_VALUE(a.capacity <= kMaxCapacity && a.block_size <= kMaxCapacity &&
                        a.num_blocks <= std::numeric_limits<int32_t>::max(),
                    "the cache holds more than 2^30 tokens per sequence or per block, or 2^31 blocks (k_cache shape ",
                    a.k_cache.sizes(), ", block_table columns ", a.max_blocks, ")");
  // Query rows (batch x n_q_heads x seq_q: the combine's grid, and a group's rows as int) and new
  // tokens (the append's grid) are counted in 31 bits.
  TORCH_CHECK_VALUE(a.batch * a.n_q_heads * a.seq_q <= std::numeric_limits<int32_t>::max() &&
                        a.batch * a.seq_new <= std::numeric_limits<int32_t>::max(),
                    "batch x n_q_heads x seq_q and batch x seq_new must be below 2^31, got batch = ", a.batch,
                    ", n_q_heads = ", a.n_q_heads, ", seq_q = ", a.seq_q, ", seq_new = ", a.seq_new);
  const int forced_splits = forced_decode_splits();
  const EnvSwitch deep_ring = env_switch(kDeepRingVariable);  // read before anything is launched
  const c10::cuda::CUDAGuard guard(a.q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  KVCacheKernelParams p{};
  p.q = a.q.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = a.q.stride(i);
    p.k_stride[i] = a.k_cache.stride(i);
    p.v_stride[i] = a.v_cache.stride(i);
  }
  p.k_token_bytes = stride_bytes_32(a.k_cache, 1, "k_cache");
  p.v_token_bytes = stride_bytes_32(a.v_cache, 1, "v_cache");
  if (a.paged) {
    p.k_block_bytes = stride_bytes_32(a.k_cache, 0, "k_cache");
    p.v_block_bytes = stride_bytes_32(a.v_cache, 0, "v_cache");
  }
  p.k_cache = a.k_cache.data_ptr();
  p.v_cache = a.v_cache.data_ptr();
  if (a.has_new()) {
    p.k_new = a.k->const_data_ptr();
    p.v_new = a.v->const_data_ptr();
    for (int i = 0; i < 3; ++i) p.kn_stride[i] = a.k->stride(i), p.vn_stride[i] = a.v->stride(i);
  }
  const at::Tensor seqlens = a.cache_seqlens.contiguous();  // an expanded scalar has stride 0
  p.seqlens = seqlens.const_data_ptr<int32_t>();
  if (a.paged) {
    p.block_table = a.block_table->const_data_ptr<int32_t>();
    p.bt_stride[0] = a.block_table->stride(0);
    p.bt_stride[1] = a.block_table->stride(1);
    const bool one_entry = a.block_table->size(1) <= 1;  // its index is always 0
    TORCH_CHECK_VALUE(one_entry || p.bt_stride[1] <= std::numeric_limits<int32_t>::max(), "block_table: the CUDA ",
                      "kernels take its stride along blocks (dim 1) below 2^31 entries, got ", p.bt_stride[1]);
    p.bt_entry_stride = one_entry ? 0 : static_cast<int>(p.bt_stride[1]);
  }
  // A contiguous cache of capacity 0 holds no key to divide, and its divisor must not be 0.
  p.block_size = FastDivisor(static_cast<uint32_t>(std::max<int64_t>(a.block_size, 1)));
  p.capacity = static_cast<int>(a.capacity);
  p.num_blocks = static_cast<int>(a.num_blocks);
  if (a.rotary_half > 0) {
    p.cos = a.rotary_cos->const_data_ptr<float>();
    p.sin = a.rotary_sin->const_data_ptr<float>();
    p.cos_stride = a.rotary_cos->stride(0);
    p.sin_stride = a.rotary_sin->stride(0);
  }
  p.rotary_half = static_cast<int>(a.rotary_half);
  p.rotary_positions = static_cast<int>(std::min<int64_t>(a.rotary_positions, std::numeric_limits<int32_t>::max()));
  p.interleaved = a.rotary_interleaved;
  p.out = a.out.data_ptr();
  p.lse = a.lse.data_ptr<float>();
  p.batch = static_cast<int>(a.batch);
  p.seq_q = static_cast<int>(a.seq_q);
  p.seq_new = static_cast<int>(a.seq_new);
  p.n_q_heads = static_cast<int>(a.n_q_heads);
  p.n_kv_heads = static_cast<int>(a.n_kv_heads);
  p.head_dim = static_cast<int>(a.head_dim);
  p.group = static_cast<int>(a.group());
  p.rows = static_cast<int>(a.group() * a.seq_q);
  const bool tensor_cores = a.q.scalar_type() != at::kFloat;
  p.row_tiles = static_cast<int>(ceil_div(p.rows, tensor_cores ? kTcRows : kRows));
  p.window_left = static_cast<int>(std::min<int64_t>(a.window_left, std::numeric_limits<int32_t>::max()));
  p.window_right = static_cast<int>(std::min<int64_t>(a.window_right, std::numeric_limits<int32_t>::max()));
  p.scale = static_cast<float>(a.scale);
  p.softcap = static_cast<float>(a.softcap);

  const bool prefill = prefill_shaped(a);
  AttentionCall call;  // the prefill route's
  if (prefill) {
    call = prefill_call(a);
    check_attention_limits(call.q, call.shape);
  } else {
    TORCH_CHECK_VALUE(a.batch <= 65535 && a.n_kv_heads * p.row_tiles <= 65535, "batch and n_kv_heads x ceil(n_q_heads / "
                      "n_kv_heads x seq_q / ", tensor_cores ? kTcRows : kRows, ") must be at most 65535");
  }
  const int64_t rows_total = a.batch * a.n_q_heads * a.seq_q;
  const size_t deep_ring_smem = TcTiling<__half, kDeepRingHeadDim, kTcDeepStageBudget>::kSmemBytes;
  TORCH_CHECK_VALUE(deep_ring != EnvSwitch::kOn || prefill || !tensor_cores || a.head_dim != kDeepRingHeadDim ||
                        rows_total == 0 || attention::smem_fits(deep_ring_smem),
                    "LLAMA_EXT_CUDA_DECODE_DEEP_RING=1: the deep-ring kernel's ", deep_ring_smem,
                    " bytes of shared memory exceed this GPU's per-block limit");
  // The tensor-core attend kernel's shared memory (the same for fp16 and bf16), checked before
  // the append writes anything.
  if (!prefill && tensor_cores && rows_total > 0) {
    attention::dispatch_head_dim(static_cast<int>(a.head_dim), [&](auto d) {
      constexpr size_t smem = TcTiling<__half, decltype(d)::value>::kSmemBytes;
      static_assert(smem == TcTiling<__nv_bfloat16, decltype(d)::value>::kSmemBytes);
      TORCH_CHECK(attention::smem_fits(smem), "gqa_attention_with_kvcache: the ", smem,
                  " bytes of shared memory of the tensor-core decode kernel exceed this GPU's per-block limit");
      return true;
    });
  }
  // The attend kernel overlaps the append's tail and the combine the attend's (sm_90+): each
  // waits for its predecessor before touching what that one writes. The append itself follows
  // whatever the stream ran before, which may read or write the cache: it waits for all of it.
  const bool overlap = dependent_launch_supported(stream);
  LLAMA_EXT_DISPATCH_CUDA_FLOATING(a.q.scalar_type(), "gqa_attention_with_kvcache_cuda", [&] {
    const bool append = a.seq_new > 0 && a.batch > 0;
    if (append) {
      const dim3 grid(static_cast<unsigned>(a.batch * a.seq_new),
                      static_cast<unsigned>(std::min<int64_t>(a.n_kv_heads, 65535)));
      launch_kernel(append_kernel<scalar_t>, grid, kThreads, 0, stream, /*overlap_prior=*/false, p);
    }
    if (rows_total == 0) return;
    if (prefill) return attend_on_prefill_kernels<scalar_t>(p, call, a.block_table, stream);
    attention::dispatch_head_dim(static_cast<int>(a.head_dim), [&](auto d) {
      constexpr int D = decltype(d)::value;
      // The attend kernel of this dtype and head dim, its block and dynamic shared memory.
      void (*kernel)(KVCacheKernelParams);
      int threads;
      size_t smem;
      if constexpr (std::is_same_v<scalar_t, float>) {
        kernel = attend_simt_kernel<float, D>, threads = kThreads, smem = 0;
      } else {
        kernel = attend_tc_kernel<scalar_t, D>, threads = kTcThreads, smem = TcTiling<scalar_t, D>::kSmemBytes;
        allow_dynamic_smem(kernel, smem);  // it fits: checked before the append
      }
      const int64_t units = a.batch * a.n_kv_heads * p.row_tiles;
      p.splits = forced_splits > 0 ? forced_splits : choose_splits(kernel, threads, smem, units, a.capacity);
      if constexpr (!std::is_same_v<scalar_t, float> && D == kDeepRingHeadDim) {
        // Deep ring: a CTA keeps two tiles in flight instead of one, at fewer CTAs per SM (2 on
        // an H100/H200 instead of 3). Where every CTA of the grid is resident at once either way
        // (batch 1 at long contexts), the CTA it costs would have run nothing.
        using Deep = TcTiling<scalar_t, D, kTcDeepStageBudget>;
        static_assert(Deep::kStages == 3 && TcTiling<scalar_t, D>::kStages == 2, "the deep ring adds a stage");
        void (*const deep_kernel)(KVCacheKernelParams) = attend_tc_kernel<scalar_t, D, kTcDeepStageBudget>;
        // =1 fits: checked before the append.
        const bool fits = deep_ring == EnvSwitch::kOn || attention::smem_fits(Deep::kSmemBytes);
        if (deep_ring != EnvSwitch::kOff && fits) allow_dynamic_smem(deep_kernel, Deep::kSmemBytes);
        bool deep = deep_ring == EnvSwitch::kOn;
        if (deep_ring == EnvSwitch::kUnset && fits) {
          const int deep_splits = forced_splits > 0
                                      ? forced_splits
                                      : choose_splits(deep_kernel, threads, Deep::kSmemBytes, units, a.capacity);
          const Residency deep_residency = kernel_residency(deep_kernel, threads, Deep::kSmemBytes);
          // The same split count, all of its CTAs resident at once.
          deep = deep_residency.ctas_per_sm > 0 && deep_splits == p.splits &&
                 units * deep_splits <= deep_residency.slots();
        }
        if (deep) kernel = deep_kernel, smem = Deep::kSmemBytes;
      }
      at::Tensor partial_out, partial_lse;
      if (p.splits > 1) {
        partial_out = at::empty({p.splits, rows_total, a.head_dim}, a.q.options().dtype(at::kFloat));
        partial_lse = at::empty({p.splits, rows_total}, a.q.options().dtype(at::kFloat));
        p.partial_out = partial_out.data_ptr<float>();
        p.partial_lse = partial_lse.data_ptr<float>();
      }
      const dim3 grid(p.splits, static_cast<unsigned>(a.n_kv_heads * p.row_tiles), static_cast<unsigned>(a.batch));
      launch_kernel(kernel, grid, threads, smem, stream, overlap && append, p);
      if (p.splits > 1) {
        launch_kernel(combine_kernel<scalar_t>, static_cast<unsigned>(rows_total), kThreads, 0, stream, overlap, p);
      }
      return true;
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CUDA, m) {
  m.impl("gqa_attention_with_kvcache", &gqa_attention_with_kvcache<kvcache_attention_cuda>);
}

}  // namespace llama_ext::cuda
