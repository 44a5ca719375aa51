// Attention against a KV cache (decode) on CUDA: split-KV flash-decoding, paged, with the new
// tokens' append and rotary fused in. Semantics in csrc/kvcache_attention.h. No host syncs: the
// split count comes from the SM count and the cache capacity, the lengths are read on the
// device, so a decode step captures in a CUDA graph.
//
// Kernels, in stream order:
//  1. append: one CTA per new token writes its k (rotated: pairs (i, i + half) or (2i, 2i+1),
//     fp32 math from the fp32 tables, one rounding) and v rows into their cache slots.
//  2. attend: one CTA per (key split, kv head x row tile, batch). The rows of a tile are up to
//     kRows query rows of the group (G query heads x seq_q tokens), held in shared memory in
//     fp32 (q rotated at cache_seqlens[b] + i and rounded to T, as apply_rotary would return it,
//     then pre-multiplied by scale). The CTA's key range (its split of the union of the rows'
//     visible ranges) is walked by lane groups of TPK threads, one 16-byte chunk of a K/V row
//     per thread (two for fp32 at d = 256); each group takes kKeysPerStep consecutive keys per
//     step, so every K/V element is loaded once per CTA, i.e. once per group of query heads:
//       s[r, u] = q_r . k_u     (per-thread partial dots, a shuffle butterfly over the group)
//       softcap, window/causal masks per row (bottom-right aligned), log2 domain
//       m' = max(m, s), l' = l 2^(m - m') + sum_u 2^(s - m'), O <- O 2^(m - m') + sum_u p_u v_u
//     The lane groups' (m, l, O) are merged in shared memory in a fixed order (deterministic),
//     and the CTA writes out/lse directly (one split) or an fp32 partial.
//  3. combine (splits > 1): per query row, lse = log sum_s e^(lse_s), out = sum_s
//     e^(lse_s - lse) out_s, in split order.
// Paged caches are gathered through the block table inside the kernel (any block size); a
// block index, length or rotary position that is out of range fires a device-side assert and
// the access is skipped, never made.
//
// Why CUDA cores, not tensor cores. Decode moves 2 L n_kv_heads d elements of K/V and does
// 4 L n_q_heads d FLOPs: with G = n_q_heads / n_kv_heads query heads per group, 2 G FLOPs per
// byte of bf16 K/V. The H200 streams 4.8 TB/s and its CUDA cores do 67 TFLOP/s fp32, i.e. 14
// FLOPs per byte: decode with G x seq_q <= 8 (every Llama grouping at seq_q = 1: 4, 8) stays
// under half of that, so the FMA pipes keep pace with memory and the kernel is bound by DRAM
// bandwidth as a tensor-core kernel would be, without the shared-memory staging and fragment
// layouts. The costs that do compete are the exps (one per score per key step) and the
// shuffle reductions (rows x log2 TPK per key), both bounded by kRows = 8 per CTA; longer row
// tiles (speculative decoding with many tokens) become compute-bound here and are better
// served by the prefill kernels.
//
// Bytes: K and V once per (group, row tile), q and out once; splits add 2 x rows x d fp32 of
// partials per split. Offsets are 64-bit.
#include <ATen/ops/empty.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../kvcache_attention.h"
#include "attention_launch.cuh"
#include "common.cuh"

namespace llama_ext::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRows = 8;          // query rows per CTA
constexpr int kKeysPerStep = 4;   // consecutive keys a lane group takes per step
constexpr int kMinKeysPerSplit = 256;
constexpr int kMaxSplits = 128;
using attention::kLn2;
using attention::kLog2e;

struct KVCacheKernelParams {
  const void* q;
  int64_t q_stride[3];  // batch, seq, head
  void* k_cache;
  void* v_cache;
  int64_t k_stride[3];  // block (batch), token, head
  int64_t v_stride[3];
  const void* k_new;
  const void* v_new;
  int64_t kn_stride[3];  // batch, seq, head
  int64_t vn_stride[3];
  const int32_t* seqlens;
  const int32_t* block_table;  // null: contiguous cache, block = batch row
  int64_t bt_stride[2];
  int block_size, max_blocks, num_blocks;
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
  const bool ok = start >= 0 && start + p.seq_new <= static_cast<int64_t>(p.max_blocks) * p.block_size;
  CUDA_KERNEL_ASSERT(ok && "gqa_attention_with_kvcache: cache_seqlens + seq_new exceeds the cache capacity");
  return ok;
}

// The cache block of token j of sequence b, or -1 (after a device-side assert) when the block
// table names a block outside the cache.
__device__ __forceinline__ int64_t cache_block(const KVCacheKernelParams& p, int b, int64_t j) {
  if (p.block_table == nullptr) return b;
  const int64_t blk = p.block_table[b * p.bt_stride[0] + (j / p.block_size) * p.bt_stride[1]];
  const bool ok = blk >= 0 && blk < p.num_blocks;
  CUDA_KERNEL_ASSERT(ok && "gqa_attention_with_kvcache: block_table entry outside the cache");
  return ok ? blk : -1;
}

__device__ __forceinline__ bool position_ok(const KVCacheKernelParams& p, int64_t pos) {
  const bool ok = pos >= 0 && pos < p.rotary_positions;
  CUDA_KERNEL_ASSERT(ok && "gqa_attention_with_kvcache: position outside the rotary_cos/rotary_sin table");
  return ok;
}

// Element e of x rotated by the table row at pos (rotary_dim = 2 * half; later dims pass through).
template <typename T>
__device__ __forceinline__ float rotated(const KVCacheKernelParams& p, const T* x, int e, int64_t pos) {
  const int half = p.rotary_half;
  if (e >= 2 * half) return to_float(x[e]);
  int i, partner;
  bool first;
  if (p.interleaved) {
    i = e / 2, first = e % 2 == 0, partner = first ? e + 1 : e - 1;
  } else {
    first = e < half, i = first ? e : e - half, partner = first ? e + half : e - half;
  }
  const float c = p.cos[pos * p.cos_stride + i], s = p.sin[pos * p.sin_stride + i];
  const float xe = to_float(x[e]), xp = to_float(x[partner]);
  return first ? xe * c - xp * s : xe * c + xp * s;
}

// ---- 1. append --------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) append_kernel(const KVCacheKernelParams p) {
  const int token = blockIdx.x;  // b * seq_new + i
  const int b = token / p.seq_new, i = token % p.seq_new;
  if (!length_ok(p, b)) return;
  const int64_t pos = static_cast<int64_t>(p.seqlens[b]) + i;
  if (p.cos != nullptr && !position_ok(p, pos)) return;
  const int64_t blk = cache_block(p, b, pos);
  if (blk < 0) return;
  const int64_t off = pos % p.block_size;
  const T* k_src = static_cast<const T*>(p.k_new) + b * p.kn_stride[0] + i * p.kn_stride[1];
  const T* v_src = static_cast<const T*>(p.v_new) + b * p.vn_stride[0] + i * p.vn_stride[1];
  T* k_dst = static_cast<T*>(p.k_cache) + blk * p.k_stride[0] + off * p.k_stride[1];
  T* v_dst = static_cast<T*>(p.v_cache) + blk * p.v_stride[0] + off * p.v_stride[1];
  for (int t = threadIdx.x; t < p.n_kv_heads * p.head_dim; t += blockDim.x) {
    const int h = t / p.head_dim, e = t % p.head_dim;
    const T* k_row = k_src + h * p.kn_stride[2];
    k_dst[h * p.k_stride[2] + e] = p.cos != nullptr ? from_float<T>(rotated(p, k_row, e, pos)) : k_row[e];
    v_dst[h * p.v_stride[2] + e] = v_src[h * p.vn_stride[2] + e];
  }
}

// ---- 2. attend --------------------------------------------------------------------------------

constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }

template <typename T, int D>
struct Tiling {
  static constexpr int kVec = vec_elems<T>();                          // elements per 16-byte chunk
  static constexpr int kChunks = D / kVec;                             // chunks per K/V row
  static constexpr int kLanes = kChunks >= 32 ? 32 : pow2_at_least(kChunks);  // threads per key
  static constexpr int kChunksPerLane = (kChunks + kLanes - 1) / kLanes;
  static constexpr int kElems = kChunksPerLane * kVec;                 // elements per thread
  static constexpr int kGroups = kThreads / kLanes;                    // lane groups per CTA
  static_assert(D % kVec == 0, "head_dim must be a multiple of the 16-byte vector");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attend_kernel(const KVCacheKernelParams p) {
  using Tl = Tiling<T, D>;
  constexpr int E = Tl::kElems, V = Tl::kVec, LANES = Tl::kLanes, NG = Tl::kGroups, U = kKeysPerStep;
  __shared__ float q_s[kRows][D];
  __shared__ float o_s[kRows][D];
  __shared__ float m_s[NG][kRows];
  __shared__ float l_s[NG][kRows];

  const int split = blockIdx.x, kvh = blockIdx.y / p.row_tiles, tile = blockIdx.y % p.row_tiles, b = blockIdx.z;
  const int row0 = tile * kRows, nrows = min(kRows, p.rows - row0);
  const bool valid_len = length_ok(p, b);
  const int64_t L = valid_len ? p.length(b) : 0;
  const int64_t start = p.seqlens[b];

  // ---- stage: q rows (rotated, rounded to T, scaled) into shared memory; visible ranges.
  for (int t = threadIdx.x; t < kRows * D; t += blockDim.x) {
    const int r = t / D, e = t % D;
    float x = 0.f;
    if (r < nrows) {
      const int row = row0 + r, h = kvh * p.group + row / p.seq_q, i = row % p.seq_q;
      const T* src = static_cast<const T*>(p.q) + b * p.q_stride[0] + i * p.q_stride[1] + h * p.q_stride[2];
      if (p.cos != nullptr && valid_len) {
        x = position_ok(p, start + i) ? round_to<T>(rotated(p, src, e, start + i)) : 0.f;
      } else {
        x = to_float(src[e]);
      }
    }
    q_s[r][e] = x * p.scale;
  }
  // Visible keys [lo, hi) of each row; L <= capacity < 2^31 (checked on the host), so int32.
  int lo[kRows], hi[kRows];
  int64_t tile_lo = L, tile_hi = 0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t pos = (row0 + r) % p.seq_q + L - p.seq_q;
    const int64_t row_lo = p.window_left >= 0 ? max64(0, pos - p.window_left) : 0;
    const int64_t row_hi = p.window_right >= 0 ? min64(L, pos + p.window_right + 1) : L;
    const bool any = r < nrows && row_hi > row_lo;
    lo[r] = any ? static_cast<int>(row_lo) : 0;
    hi[r] = any ? static_cast<int>(row_hi) : 0;
    if (any) tile_lo = min64(tile_lo, row_lo), tile_hi = max64(tile_hi, row_hi);
  }
  const int64_t span = max64(0, tile_hi - tile_lo);
  const int64_t chunk = (span + p.splits - 1) / p.splits;
  const int64_t j_begin = min64(tile_hi, tile_lo + split * chunk);
  const int64_t j_end = min64(tile_hi, j_begin + chunk);
  __syncthreads();

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
  for (int64_t jw = j_begin + warp * KPW * U; jw < j_end; jw += NG * U) {
    const int64_t j0 = jw + (grp % KPW) * U;
    Vec<T, V> kc[U][Tl::kChunksPerLane], vc[U][Tl::kChunksPerLane];
    bool key_ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = j0 + u;
      const int64_t blk = j < j_end ? cache_block(p, b, j) : -1;
      key_ok[u] = blk >= 0;
      const int64_t off = j % p.block_size;
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
        const int64_t j = j0 + u;
        seen[u] = key_ok[u] && j >= lo[r] && j < hi[r];
        float x = s[r][u];
        // The precise tanh: --use_fast_math would make tanhf the approximate MUFU.TANH.
        if (p.softcap > 0.f) x = p.softcap * attention::precise_tanh(x / p.softcap);
        s[r][u] = seen[u] ? x * kLog2e : -INFINITY;
        mx = fmaxf(mx, s[r][u]);
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
  float row_max[kRows], row_sum[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    for (int g = 0; g < NG; ++g) row_max[r] = fmaxf(row_max[r], m_s[g][r]);
    row_sum[r] = 0.f;
    for (int g = 0; g < NG; ++g) {
      if (m_s[g][r] != -INFINITY) row_sum[r] += l_s[g][r] * exp2f(m_s[g][r] - row_max[r]);
    }
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
    const int row = row0 + r, h = kvh * p.group + row / p.seq_q, i = row % p.seq_q;
    const int64_t out_row = (static_cast<int64_t>(b) * p.seq_q + i) * p.n_q_heads + h;
    const int64_t lse_idx = (static_cast<int64_t>(b) * p.n_q_heads + h) * p.seq_q + i;
    const bool any = row_sum[r] > 0.f;
    const float o = any ? o_s[r][e] / row_sum[r] : 0.f;
    if (p.splits == 1) {
      static_cast<T*>(p.out)[out_row * D + e] = from_float<T>(o);
      if (e == 0) p.lse[lse_idx] = any ? (row_max[r] + log2f(row_sum[r])) * kLn2 : 0.f;
    } else {
      const int64_t rows_total = static_cast<int64_t>(p.batch) * p.n_q_heads * p.seq_q;
      p.partial_out[(split * rows_total + lse_idx) * D + e] = o;
      if (e == 0) p.partial_lse[split * rows_total + lse_idx] = any ? (row_max[r] + log2f(row_sum[r])) * kLn2 : -INFINITY;
    }
  }
}

// ---- 3. combine -------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const KVCacheKernelParams p) {
  __shared__ float weight[kMaxSplits];
  __shared__ float total;
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.n_q_heads * p.seq_q;
  const int64_t lse_idx = blockIdx.x;  // (b, h, i) in lse order
  const int i = lse_idx % p.seq_q, h = lse_idx / p.seq_q % p.n_q_heads, b = lse_idx / (p.seq_q * p.n_q_heads);
  if (threadIdx.x == 0) {
    float mx = -INFINITY;
    for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.partial_lse[s * rows_total + lse_idx]);
    float sum = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const float ls = p.partial_lse[s * rows_total + lse_idx];
      weight[s] = ls == -INFINITY ? 0.f : expf(ls - mx);
      sum += weight[s];
    }
    total = sum;
    p.lse[lse_idx] = sum > 0.f ? mx + logf(sum) : 0.f;
  }
  __syncthreads();
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const int64_t out_row = (static_cast<int64_t>(b) * p.seq_q + i) * p.n_q_heads + h;
  for (int e = threadIdx.x; e < p.head_dim; e += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      if (weight[s] != 0.f) o += weight[s] * p.partial_out[(s * rows_total + lse_idx) * p.head_dim + e];
    }
    static_cast<T*>(p.out)[out_row * p.head_dim + e] = from_float<T>(o * inv);
  }
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
  const bool ok = is_aligned(cache.const_data_ptr(), kVecBytes) && cache.stride(0) % vec == 0 &&
                  cache.stride(1) % vec == 0 && cache.stride(2) % vec == 0;
  TORCH_CHECK(ok, name, " must start 16-byte aligned with 16-byte aligned rows (strides multiple of ", vec,
              " elements), got strides ", cache.strides());
}

void kvcache_attention_cuda(const KVCacheAttentionParams& a) {
  check_cuda_dtype(a.q, "q");
  check_head_dim(a.head_dim);
  check_cache_alignment(a.k_cache, "k_cache");
  check_cache_alignment(a.v_cache, "v_cache");
  TORCH_CHECK_VALUE(a.capacity <= std::numeric_limits<int32_t>::max() && a.num_blocks <= std::numeric_limits<int32_t>::max(),
                    "the cache holds more than 2^31 tokens per sequence or blocks");
  const c10::cuda::CUDAGuard guard(a.q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  KVCacheKernelParams p{};
  p.q = a.q.const_data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = a.q.stride(i);
    p.k_stride[i] = a.k_cache.stride(i);
    p.v_stride[i] = a.v_cache.stride(i);
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
  }
  p.block_size = static_cast<int>(a.block_size);
  p.max_blocks = static_cast<int>(a.max_blocks);
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
  p.row_tiles = static_cast<int>(ceil_div(p.rows, kRows));
  p.window_left = static_cast<int>(std::min<int64_t>(a.window_left, std::numeric_limits<int32_t>::max()));
  p.window_right = static_cast<int>(std::min<int64_t>(a.window_right, std::numeric_limits<int32_t>::max()));
  p.scale = static_cast<float>(a.scale);
  p.softcap = static_cast<float>(a.softcap);

  TORCH_CHECK_VALUE(a.batch <= 65535 && a.n_kv_heads * p.row_tiles <= 65535,
                    "batch and n_kv_heads x ceil(n_q_heads / n_kv_heads x seq_q / 8) must be at most 65535");
  // Splits: enough CTAs to fill the GPU twice over, never fewer than kMinKeysPerSplit keys of
  // the capacity per split (the lengths themselves live on the device).
  int device_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&device_sms, cudaDevAttrMultiProcessorCount, a.q.device().index()));
  const int64_t units = std::max<int64_t>(1, a.batch * a.n_kv_heads * p.row_tiles);
  const int64_t want = ceil_div(2 * device_sms, units);
  p.splits = static_cast<int>(std::clamp<int64_t>(std::min(want, a.capacity / kMinKeysPerSplit), 1, kMaxSplits));
  at::Tensor partial_out, partial_lse;
  const int64_t rows_total = a.batch * a.n_q_heads * a.seq_q;
  if (p.splits > 1 && rows_total > 0) {
    partial_out = at::empty({p.splits, rows_total, a.head_dim}, a.q.options().dtype(at::kFloat));
    partial_lse = at::empty({p.splits, rows_total}, a.q.options().dtype(at::kFloat));
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }

  LLAMA_EXT_DISPATCH_CUDA_FLOATING(a.q.scalar_type(), "gqa_attention_with_kvcache_cuda", [&] {
    if (a.seq_new > 0 && a.batch > 0) {
      append_kernel<scalar_t><<<static_cast<unsigned>(a.batch * a.seq_new), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (rows_total == 0) return;
    const dim3 grid(p.splits, static_cast<unsigned>(a.n_kv_heads * p.row_tiles), static_cast<unsigned>(a.batch));
    attention::dispatch_head_dim(static_cast<int>(a.head_dim), [&](auto d) {
      attend_kernel<scalar_t, decltype(d)::value><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return true;
    });
    if (p.splits > 1) {
      combine_kernel<scalar_t><<<static_cast<unsigned>(a.batch * a.n_q_heads * a.seq_q), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CUDA, m) {
  m.impl("gqa_attention_with_kvcache", &gqa_attention_with_kvcache<kvcache_attention_cuda>);
}

}  // namespace llama_ext::cuda
