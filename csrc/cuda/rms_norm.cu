// RMSNorm and fused residual-add + RMSNorm on CUDA.
//
// Layout (every kernel, aligned or not): a row is cut into chunks of kChunk = 16 / sizeof(T)
// consecutive elements (8 bf16/fp16, 4 fp32) and handled by a group of G threads; lane l owns
// chunks l, l + G, l + 2G, ... and sums its elements in that order, then the group reduces by an
// xor butterfly (G <= 32) or warp butterflies plus one pass over the warps' sums (G = the CTA).
// G depends only on n and the dtype, and the aligned and unaligned kernels differ only in how a
// chunk is moved (16-byte LDG.E.128/STG.E.128, or element by element with zeros past n), so a
// row's bits do not depend on its address or stride. Each rounding and fused multiply-add is
// spelled out (__fmul_rn, fmaf) so that no contraction choice can differ between the two.
//   - Short rows (<= 128 chunks: n <= 1024 bf16/fp16, n <= 512 fp32; Qwen3's per-head q/k norms
//     at n = 128): G = min(32, next_pow2(chunks)) threads per row, 256 / G rows per 256-thread
//     CTA, reduced with shuffles only.
//   - Longer rows: one CTA per row, G = blockDim = about chunks / 2 threads (32..512).
// A thread keeps its chunks in registers (kCache per thread, the next power of two of what the
// layout gives it: 1, 2, 4 or 8) so x (and residual, g) are read from DRAM once; rows wider than
// the cache (forward: 4096 chunks, 32768 bf16 / 16384 fp32; backward: 2048 chunks) and the
// unaligned kernels loop and re-read the row from L1/L2 in the second pass.
//
// Forward, per row: s = x (or round(x + residual), written to residual_out), rstd =
// rsqrt(sum(s^2)/n + eps), y = round_out(w' * [round_in](s * rstd)), w' = offset + w (see
// rms_norm.h). Bytes per row: read n*(1 [+1]) input elements, write n output (+n residual),
// plus the weight (L2-resident); ~3 FLOPs per element: bandwidth-bound, so the target is the
// device's copy bandwidth.
//
// Backward: a grid sized to fill the GPU (occupancy API) strides over row blocks. Per row:
// dot = sum(g*w'*x) (group reduction), dx = rstd*g*w' - x*rstd^3*dot/n (+ grad of residual_out),
// and dweight += g * xhat (xhat = x*rstd, rounded to the input dtype when cast_before_weight) in
// fp32, each thread into its own chunks of its group's row of sums with 16-byte accesses: in
// shared memory when the CTA's rows of sums fit 32 KB (all short rows; one CTA per row up to
// 8192 elements), else in the CTA's row of the [grid, chunks*kChunk] workspace. The CTA adds its
// groups' rows in group order into its workspace row; a second kernel sums the workspace over
// CTAs in order: deterministic, no atomics. The grid is the same for the aligned and unaligned
// kernels, so dweight's bits do not depend on the layout either.
//
// ptxas -v (CUDA 13.0, setup.py's flags), registers per thread over the 7 <input, weight, out>
// dtype combinations, sm_80 / sm_90; 128 B static shared memory (block reduction), plus for the
// backward's dweight sums up to 32 KB dynamic. Occupancy: resident warps of 64 at the highest
// count, for 256-thread CTAs (short rows) / the 512-thread worst case of long rows.
//   forward  aligned   cache 1:  23-32 / 24-32    100% / 100%
//   forward  aligned   cache 2:  30-34 / 30-40     75% /  75%
//   forward  aligned   cache 4:  44-52 / 44-64     50% /  50%
//   forward  aligned   cache 8:  64-72 / 64-105    25% /  25%
//   forward  aligned   loop:     32-39 / 32-40     75% /  75%
//   forward  unaligned loop:     40-64 / 32-64     50% /  50%
//   backward aligned   cache 1:  48-75 / 48-96     25% /  25%
//   backward aligned   cache 2:  64-95 / 63-126    25% /  25%
//   backward aligned   cache 4:  94-128 / 92-128   25% /  25%
//   backward aligned   loop:     56-77 / 56-95     25% /  25%
//   backward unaligned loop:     56-96 / 56-104    25% /  25%
//   reduce_dweight:              24 / 28
// No spills in any of the 160 kernels (the backward's explicit minimum of one CTA per SM keeps
// ptxas from trading a spill for 64 registers). Every aligned kernel moves rows with
// LDG.E.128 / STG.E.128 (cuobjdump -sass).
#include <torch/library.h>
#include <ATen/ops/empty.h>

#include <limits>

#include "../rms_norm.h"
#include "common.cuh"

namespace llama_ext::cuda {
namespace {

// 512 threads x (<= 128 registers) fits the 64K-register file of every sm_80+ SM; the launch
// bounds make ptxas guarantee it, so no launch can fail for lack of registers.
constexpr int kMaxThreads = 512;
constexpr int kShortRowThreads = 256;   // CTA size of the short-row layout
constexpr int kShortRowMaxChunks = 128;  // 32 lanes x 4 chunks
constexpr int kMaxCacheFwd = 8;          // chunks per thread kept in registers, forward
constexpr int kMaxCacheBwd = 4;          // backward holds g and x per chunk
constexpr int64_t kMaxSmemSums = 32 * 1024;  // bytes of fp32 dweight sums a backward CTA keeps on chip

// ---- layout ---------------------------------------------------------------------------------

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// Threads per row (group), threads per CTA, and register chunks per thread (0: loop).
struct RowLayout {
  int group;
  int threads;
  int cache;
  int rows_per_cta() const { return threads / group; }
};

inline RowLayout row_layout(int64_t n, int chunk_elems, int max_cache) {
  const int64_t chunks = ceil_div(n, chunk_elems);
  if (chunks <= kShortRowMaxChunks) {
    const int group = std::min(32, next_pow2(chunks));
    return {group, kShortRowThreads, next_pow2(ceil_div(chunks, group))};
  }
  // About two chunks per thread, a whole number of warps, at most kMaxThreads.
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div(ceil_div(chunks, 2), 32) * 32));
  const int64_t per_thread = ceil_div(chunks, threads);
  return {threads, threads, per_thread <= max_cache ? next_pow2(per_thread) : 0};
}

// This thread's row and lane under a layout; rows past the end get no chunks, so their threads
// still take part in the group's shuffles.
struct RowSlot {
  int64_t row;
  int lane;
  int64_t n_chunks;
  bool valid;
};

__device__ __forceinline__ RowSlot row_slot(int64_t row_block, int group, int64_t rows, int64_t n, int chunk) {
  RowSlot s;
  s.row = row_block * (blockDim.x / group) + threadIdx.x / group;
  s.lane = threadIdx.x % group;
  s.valid = s.row < rows;
  s.n_chunks = s.valid ? (n + chunk - 1) / chunk : 0;
  return s;
}

// Sum over the group of `group` threads holding this row; every lane gets the same bits.
__device__ __forceinline__ float group_reduce_sum(float x, int group, float* scratch) {
  if (group <= 32) {
    for (int offset = group / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
  }
  return block_reduce(x, scratch);
}

// ---- chunk access -----------------------------------------------------------------------------

template <typename E, int N>
struct Chunk {
  E v[N];
};

// Elements [c*N, c*N + N) of a row. Aligned: 16-byte vectors (row and n are multiples of 16
// bytes); else element by element, zeros past n.
template <bool kAligned, int N, typename E>
__device__ __forceinline__ Chunk<E, N> load_chunk(const E* row, int64_t c, int64_t n) {
  Chunk<E, N> out;
  const int64_t base = c * N;
  if constexpr (kAligned) {
    constexpr int kPiece = vec_elems<E>();
    static_assert(N % kPiece == 0, "a chunk is whole 16-byte vectors");
#pragma unroll
    for (int q = 0; q < N / kPiece; ++q) {
      const Vec<E> v = Vec<E>::load(row + base + q * kPiece);
#pragma unroll
      for (int e = 0; e < kPiece; ++e) out.v[q * kPiece + e] = v.v[e];
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out.v[e] = base + e < n ? row[base + e] : from_float<E>(0.f);
  }
  return out;
}

template <bool kAligned, int N, typename E>
__device__ __forceinline__ void store_chunk(E* row, int64_t c, int64_t n, const Chunk<E, N>& in) {
  const int64_t base = c * N;
  if constexpr (kAligned) {
    constexpr int kPiece = vec_elems<E>();
#pragma unroll
    for (int q = 0; q < N / kPiece; ++q) {
      Vec<E> v;
#pragma unroll
      for (int e = 0; e < kPiece; ++e) v.v[e] = in.v[q * kPiece + e];
      v.store(row + base + q * kPiece);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (base + e < n) row[base + e] = in.v[e];
  }
}

// The weight applied, offset + weight[j] (ones without a weight), as fp32.
template <typename W>
struct AppliedWeight {
  const W* weight;  // null: ones
  float offset;
  bool has_offset;  // offset 0 is not added, so a -0 weight keeps its sign as in HF's product
  float scale;      // offset + 1, used without a weight

  __host__ __device__ AppliedWeight(const void* w, double off)
      : weight(static_cast<const W*>(w)), offset(float(off)), has_offset(off != 0.0), scale(float(off + 1.0)) {}

  template <bool kAligned, int N>
  __device__ __forceinline__ void load(int64_t c, int64_t n, float (&out)[N]) const {
    if (weight == nullptr) {
#pragma unroll
      for (int e = 0; e < N; ++e) out[e] = scale;
      return;
    }
    const Chunk<W, N> w = load_chunk<kAligned, N>(weight, c, n);
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = has_offset ? __fadd_rn(offset, to_float(w.v[e])) : to_float(w.v[e]);
  }
};

template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, int64_t stride, int64_t row) {
  return static_cast<const T*>(base) + row * stride;
}
template <typename T>
__device__ __forceinline__ T* row_ptr(void* base, int64_t stride, int64_t row) {
  return static_cast<T*>(base) + row * stride;
}

// ---- forward ----------------------------------------------------------------------------------

template <typename T>
struct FwdRow {
  const T* x;
  const T* residual;  // null: plain
  T* residual_out;
};

// Stage 1: chunk c of s = x or round(x + residual) (stored to residual_out); adds its squares.
template <bool kAligned, int N, typename T>
__device__ __forceinline__ Chunk<T, N> load_input(const FwdRow<T>& r, int64_t c, int64_t n, float& sum_sq) {
  Chunk<T, N> s = load_chunk<kAligned, N>(r.x, c, n);
  if (r.residual != nullptr) {
    const Chunk<T, N> res = load_chunk<kAligned, N>(r.residual, c, n);
#pragma unroll
    for (int e = 0; e < N; ++e) s.v[e] = from_float<T>(__fadd_rn(to_float(s.v[e]), to_float(res.v[e])));
    store_chunk<kAligned, N>(r.residual_out, c, n, s);
  }
#pragma unroll
  for (int e = 0; e < N; ++e) sum_sq = fmaf(to_float(s.v[e]), to_float(s.v[e]), sum_sq);
  return s;
}

// Stage 3: y = round_out(w' * [round_in](s * rstd)) for chunk c.
template <bool kAligned, int N, typename T, typename W, typename O>
__device__ __forceinline__ void write_normalized(O* y, const AppliedWeight<W>& aw, bool cast, int64_t c, int64_t n,
                                                 const Chunk<T, N>& s, float rstd) {
  float w[N];
  aw.template load<kAligned, N>(c, n, w);
  Chunk<O, N> out;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    float h = __fmul_rn(to_float(s.v[e]), rstd);
    if (cast) h = round_to<T>(h);
    out.v[e] = from_float<O>(__fmul_rn(h, w[e]));
  }
  store_chunk<kAligned, N>(y, c, n, out);
}

// One CTA per row block (rows_per_cta rows of `group` threads). kCache > 0: chunks stay in
// registers between the passes; 0: the second pass re-reads them (residual_out, written by this
// same thread, when fused).
template <typename T, typename W, typename O, bool kAligned, int kCache>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_fwd_kernel(const RMSNormParams p, const int group) {
  constexpr int N = vec_elems<T>();
  __shared__ float scratch[32];
  const RowSlot slot = row_slot(blockIdx.x, group, p.rows, p.n, N);
  const int64_t row = slot.valid ? slot.row : 0;
  FwdRow<T> r{row_ptr<T>(p.x, p.x_stride, row), nullptr, nullptr};
  if (p.residual != nullptr) {
    r.residual = row_ptr<T>(p.residual, p.residual_stride, row);
    r.residual_out = row_ptr<T>(p.residual_out, p.residual_out_stride, row);
  }

  Chunk<T, N> cache[kCache > 0 ? kCache : 1];
  float sum_sq = 0.f;
  if constexpr (kCache > 0) {
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const int64_t c = slot.lane + int64_t(i) * group;
      if (c < slot.n_chunks) cache[i] = load_input<kAligned, N>(r, c, p.n, sum_sq);
    }
  } else {
    for (int64_t c = slot.lane; c < slot.n_chunks; c += group) load_input<kAligned, N>(r, c, p.n, sum_sq);
  }

  // Stage 2: the row's rstd, identical in every lane.
  const float rstd = rsqrtf(group_reduce_sum(sum_sq, group, scratch) / float(p.n) + float(p.eps));
  if (p.rstd != nullptr && slot.valid && slot.lane == 0) static_cast<float*>(p.rstd)[row] = rstd;

  O* y = row_ptr<O>(p.y, p.y_stride, row);
  const AppliedWeight<W> aw(p.weight, p.offset);
  // Without a weight and offset the cast order cannot change a bit: skip the extra rounding.
  const bool cast = p.cast_before_weight && (p.weight != nullptr || p.offset != 0.0);
  if constexpr (kCache > 0) {
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const int64_t c = slot.lane + int64_t(i) * group;
      if (c < slot.n_chunks) write_normalized<kAligned, N>(y, aw, cast, c, p.n, cache[i], rstd);
    }
  } else {
    const T* src = r.residual != nullptr ? r.residual_out : r.x;
    for (int64_t c = slot.lane; c < slot.n_chunks; c += group)
      write_normalized<kAligned, N>(y, aw, cast, c, p.n, load_chunk<kAligned, N>(src, c, p.n), rstd);
  }
}

// Calls f.template operator()<kCache>() for a cache size of the layout.
template <typename F>
void with_cache(int cache, F&& f) {
  switch (cache) {
    case 0: return f.template operator()<0>();
    case 1: return f.template operator()<1>();
    case 2: return f.template operator()<2>();
    case 4: return f.template operator()<4>();
    case 8: return f.template operator()<8>();
    default: TORCH_CHECK(false, "rms_norm: no kernel for a register cache of ", cache, " chunks");
  }
}

template <typename T, typename W, typename O>
void launch_forward(const RMSNormParams& p, cudaStream_t stream) {
  constexpr int N = vec_elems<T>();
  const bool aligned = rows_vectorizable(p.x, p.x_stride, p.n, sizeof(T)) &&
                       rows_vectorizable(p.y, p.y_stride, p.n, sizeof(O)) &&
                       (p.weight == nullptr || is_aligned(p.weight, kVecBytes)) &&
                       (p.residual == nullptr || (rows_vectorizable(p.residual, p.residual_stride, p.n, sizeof(T)) &&
                                                  rows_vectorizable(p.residual_out, p.residual_out_stride, p.n,
                                                                    sizeof(T))));
  const RowLayout layout = row_layout(p.n, N, kMaxCacheFwd);
  const int64_t grid = ceil_div(p.rows, layout.rows_per_cta());
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), "rms_norm: ", p.rows, " rows is more than supported");
  if (aligned) {
    with_cache(layout.cache, [&]<int kCache>() {
      rms_norm_fwd_kernel<T, W, O, true, kCache><<<unsigned(grid), layout.threads, 0, stream>>>(p, layout.group);
    });
  } else {
    rms_norm_fwd_kernel<T, W, O, false, 0><<<unsigned(grid), layout.threads, 0, stream>>>(p, layout.group);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rms_norm_cuda(const RMSNormParams& p) {
  TORCH_CHECK_TYPE(p.dtype != at::kDouble,
                   "input is float64, which the CUDA kernels do not support (use float32, float16 or bfloat16)");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LLAMA_EXT_DISPATCH_CUDA_FLOATING(p.dtype, "rms_norm", [&] {
    dispatch_weight_and_out<scalar_t>(p.dtype, p.weight_dtype, p.out_dtype, [&]<typename W, typename O>() {
      launch_forward<scalar_t, W, O>(p, stream);
    });
  });
}

// ---- backward -------------------------------------------------------------------------------

template <typename T, typename O>
struct BwdRow {
  const O* g;
  const T* x;
  const T* grad_residual;  // null: none
  T* dx;
  float rstd;
};

// Stage 1: chunk c's share of dot = sum(g * w' * x).
template <bool kAligned, int N, typename T, typename W, typename O>
__device__ __forceinline__ void add_dot(const AppliedWeight<W>& aw, int64_t c, int64_t n, const Chunk<O, N>& g,
                                        const Chunk<T, N>& x, float& dot) {
  float w[N];
  aw.template load<kAligned, N>(c, n, w);
#pragma unroll
  for (int e = 0; e < N; ++e) dot = fmaf(__fmul_rn(to_float(g.v[e]), w[e]), to_float(x.v[e]), dot);
}

// Stage 3: dx = rstd*g*w' + x_coef*x (+ grad_residual) for chunk c; with want_dw, adds g * xhat
// to dw.
template <bool kAligned, int N, typename T, typename W, typename O>
__device__ __forceinline__ void write_dx(const BwdRow<T, O>& r, const AppliedWeight<W>& aw, bool cast, int64_t c,
                                         int64_t n, const Chunk<O, N>& g, const Chunk<T, N>& x, float x_coef,
                                         bool want_dw, float (&dw)[N]) {
  float w[N];
  aw.template load<kAligned, N>(c, n, w);
  Chunk<T, N> gres;
  if (r.grad_residual != nullptr) gres = load_chunk<kAligned, N>(r.grad_residual, c, n);
  Chunk<T, N> out;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const float gf = to_float(g.v[e]), xf = to_float(x.v[e]);
    float d = fmaf(x_coef, xf, __fmul_rn(r.rstd, __fmul_rn(gf, w[e])));
    if (r.grad_residual != nullptr) d = __fadd_rn(d, to_float(gres.v[e]));
    out.v[e] = from_float<T>(d);
    if (want_dw) {
      float xhat = __fmul_rn(xf, r.rstd);
      if (cast) xhat = round_to<T>(xhat);
      dw[e] = fmaf(gf, xhat, dw[e]);
    }
  }
  store_chunk<kAligned, N>(r.dx, c, n, out);
}

// N fp32 sums of chunk c in a workspace row, moved as 16-byte vectors (N is 4 or 8).
template <int N>
__device__ __forceinline__ void load_sums(const float* ws_row, int64_t c, float (&s)[N]) {
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    const Vec<float> v = Vec<float>::load(ws_row + c * N + q * 4);
#pragma unroll
    for (int e = 0; e < 4; ++e) s[q * 4 + e] = v.v[e];
  }
}
template <int N>
__device__ __forceinline__ void store_sums(float* ws_row, int64_t c, const float (&s)[N]) {
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    Vec<float> v;
#pragma unroll
    for (int e = 0; e < 4; ++e) v.v[e] = s[q * 4 + e];
    v.store(ws_row + c * N + q * 4);
  }
}

// Grid-stride over row blocks. With p.grad_weight, each group of threads adds g * xhat of its
// rows into its own fp32 row of sums, each thread into the chunks it owns: in shared memory
// (sums_in_smem: rows_per_cta x ws_stride floats, ws_stride = chunks * N) when that fits,
// else straight into the CTA's workspace row (one row per CTA then). The CTA's result goes to
// workspace[blockIdx.x]: its groups' rows added in group order.
template <typename T, typename W, typename O, bool kAligned, int kCache>
__global__ void __launch_bounds__(kMaxThreads, 1)
    rms_norm_bwd_kernel(const RMSNormBackwardParams p, const int group, float* __restrict__ workspace,
                        const int64_t ws_stride, const bool sums_in_smem) {
  constexpr int N = vec_elems<T>();
  __shared__ float scratch[32];
  extern __shared__ float4 smem_sums[];  // float4: 16-byte aligned
  const bool want_dw = p.grad_weight != nullptr;
  const float inv_n = 1.f / float(p.n);
  const AppliedWeight<W> aw(p.weight, p.offset);
  const int rows_per_cta = blockDim.x / group;
  const int64_t n_row_blocks = (p.rows + rows_per_cta - 1) / rows_per_cta;
  const int64_t n_chunks = (p.n + N - 1) / N;
  const int lane = threadIdx.x % group;
  float* ws_row = want_dw ? workspace + blockIdx.x * ws_stride : nullptr;
  float* sums = sums_in_smem ? reinterpret_cast<float*>(smem_sums) + (threadIdx.x / group) * ws_stride : ws_row;

  // Stage 0: zero the sums of the chunks this thread owns.
  if (want_dw) {
    const float zeros[N] = {};
    for (int64_t c = lane; c < n_chunks; c += group) store_sums<N>(sums, c, zeros);
  }

  for (int64_t rb = blockIdx.x; rb < n_row_blocks; rb += gridDim.x) {
    const RowSlot slot = row_slot(rb, group, p.rows, p.n, N);
    const int64_t row = slot.valid ? slot.row : 0;
    BwdRow<T, O> r{row_ptr<O>(p.grad_out, p.grad_out_stride, row), row_ptr<T>(p.x, p.x_stride, row),
                   p.grad_residual != nullptr ? row_ptr<T>(p.grad_residual, p.grad_residual_stride, row) : nullptr,
                   row_ptr<T>(p.grad_x, p.grad_x_stride, row), slot.valid ? static_cast<const float*>(p.rstd)[row] : 0.f};

    // Stage 1: dot over the row (cached chunks stay for stage 3).
    Chunk<O, N> g_cache[kCache > 0 ? kCache : 1];
    Chunk<T, N> x_cache[kCache > 0 ? kCache : 1];
    float dot = 0.f;
    if constexpr (kCache > 0) {
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        const int64_t c = slot.lane + int64_t(i) * group;
        if (c < slot.n_chunks) {
          g_cache[i] = load_chunk<kAligned, N>(r.g, c, p.n);
          x_cache[i] = load_chunk<kAligned, N>(r.x, c, p.n);
          add_dot<kAligned, N>(aw, c, p.n, g_cache[i], x_cache[i], dot);
        }
      }
    } else {
#pragma unroll 1
      for (int64_t c = slot.lane; c < slot.n_chunks; c += group)
        add_dot<kAligned, N>(aw, c, p.n, load_chunk<kAligned, N>(r.g, c, p.n), load_chunk<kAligned, N>(r.x, c, p.n),
                             dot);
    }

    // Stage 2: the row's coefficient of x, identical in every lane.
    const float x_coef = -r.rstd * r.rstd * r.rstd * group_reduce_sum(dot, group, scratch) * inv_n;

    // Stage 3: dx, and the dweight sums.
    auto write = [&](int64_t c, const Chunk<O, N>& g, const Chunk<T, N>& x) {
      float dw[N];
      if (want_dw) load_sums<N>(sums, c, dw);
      write_dx<kAligned, N>(r, aw, p.cast_before_weight, c, p.n, g, x, x_coef, want_dw, dw);
      if (want_dw) store_sums<N>(sums, c, dw);
    };
    if constexpr (kCache > 0) {
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        const int64_t c = slot.lane + int64_t(i) * group;
        if (c < slot.n_chunks) write(c, g_cache[i], x_cache[i]);
      }
    } else {
#pragma unroll 1
      for (int64_t c = slot.lane; c < slot.n_chunks; c += group)
        write(c, load_chunk<kAligned, N>(r.g, c, p.n), load_chunk<kAligned, N>(r.x, c, p.n));
    }
  }

  // Stage 4: the CTA's sums to its workspace row, groups added in order.
  if (!want_dw || !sums_in_smem) return;
  __syncthreads();
  const float* all_sums = reinterpret_cast<const float*>(smem_sums);
  for (int64_t j = threadIdx.x; j < ws_stride; j += blockDim.x) {
    float sum = all_sums[j];
    for (int gi = 1; gi < rows_per_cta; ++gi) sum = __fadd_rn(sum, all_sums[gi * ws_stride + j]);
    ws_row[j] = sum;
  }
}

// dweight[j] = sum over CTAs b of workspace[b, j], in order b = 0, 1, ...: deterministic.
template <typename W>
__global__ void reduce_dweight_kernel(const float* __restrict__ workspace, int64_t n_partials, int64_t ws_stride,
                                      int64_t n, W* __restrict__ dweight) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= n) return;
  float sum = 0.f;
  for (int64_t b = 0; b < n_partials; ++b) sum = __fadd_rn(sum, workspace[b * ws_stride + j]);
  dweight[j] = from_float<W>(sum);
}

template <typename T, typename W, typename O>
void launch_backward(const RMSNormBackwardParams& p, const at::TensorOptions& options, cudaStream_t stream) {
  constexpr int N = vec_elems<T>();
  const bool aligned = rows_vectorizable(p.grad_out, p.grad_out_stride, p.n, sizeof(O)) &&
                       rows_vectorizable(p.x, p.x_stride, p.n, sizeof(T)) &&
                       rows_vectorizable(p.grad_x, p.grad_x_stride, p.n, sizeof(T)) &&
                       (p.weight == nullptr || is_aligned(p.weight, kVecBytes)) &&
                       (p.grad_residual == nullptr ||
                        rows_vectorizable(p.grad_residual, p.grad_residual_stride, p.n, sizeof(T)));
  const RowLayout layout = row_layout(p.n, N, kMaxCacheBwd);
  const int rows_per_cta = layout.rows_per_cta();
  const bool want_dw = p.grad_weight != nullptr;
  const int64_t ws_stride = ceil_div(p.n, N) * N;
  with_cache(layout.cache, [&]<int kCache>() {
    if constexpr (kCache <= kMaxCacheBwd) {
      using Kernel = void (*)(const RMSNormBackwardParams, const int, float*, const int64_t, const bool);
      const Kernel aligned_kernel = &rms_norm_bwd_kernel<T, W, O, true, kCache>;
      const Kernel unaligned_kernel = &rms_norm_bwd_kernel<T, W, O, false, 0>;
      const bool sums_in_smem = want_dw && rows_per_cta * ws_stride * int64_t(sizeof(float)) <= kMaxSmemSums;
      // Short rows need a row of sums per group, which only shared memory holds.
      TORCH_CHECK(!want_dw || rows_per_cta == 1 || sums_in_smem, "rms_norm_backward: ", rows_per_cta,
                  " rows of ", ws_stride, " sums exceed the shared memory budget");
      const size_t smem = sums_in_smem ? rows_per_cta * ws_stride * sizeof(float) : 0;
      // The grid, and with it the dweight summation order, must not depend on the alignment:
      // size it for whichever of the two kernels fits fewer CTAs per SM.
      const Residency fit_aligned = kernel_residency(aligned_kernel, layout.threads, smem);
      const Residency fit_unaligned = kernel_residency(unaligned_kernel, layout.threads, smem);
      const int ctas_per_sm = std::min(fit_aligned.ctas_per_sm, fit_unaligned.ctas_per_sm);
      TORCH_CHECK(ctas_per_sm > 0, "rms_norm_backward: the kernel does not fit an SM (", layout.threads,
                  " threads, ", smem, " bytes of shared memory)");
      const int64_t grid = std::min<int64_t>(ceil_div(p.rows, rows_per_cta), int64_t(ctas_per_sm) * fit_aligned.sms);
      at::Tensor workspace;
      if (want_dw) workspace = at::empty({grid, ws_stride}, options.dtype(at::kFloat));
      float* ws = want_dw ? workspace.mutable_data_ptr<float>() : nullptr;
      (aligned ? aligned_kernel : unaligned_kernel)<<<unsigned(grid), layout.threads, smem, stream>>>(
          p, layout.group, ws, ws_stride, sums_in_smem);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (want_dw) {
        constexpr int kThreads = 256;
        reduce_dweight_kernel<W><<<unsigned(ceil_div(p.n, kThreads)), kThreads, 0, stream>>>(
            ws, grid, ws_stride, p.n, static_cast<W*>(p.grad_weight));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      TORCH_CHECK(false, "rms_norm_backward: no kernel for a register cache of ", kCache, " chunks");
    }
  });
}

void rms_norm_backward_cuda(const RMSNormBackwardParams& p, const at::TensorOptions& options) {
  TORCH_CHECK_TYPE(p.dtype != at::kDouble,
                   "input is float64, which the CUDA kernels do not support (use float32, float16 or bfloat16)");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LLAMA_EXT_DISPATCH_CUDA_FLOATING(p.dtype, "rms_norm_backward", [&] {
    dispatch_weight_and_out<scalar_t>(p.dtype, p.weight_dtype, p.out_dtype, [&]<typename W, typename O>() {
      launch_backward<scalar_t, W, O>(p, options, stream);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CUDA, m) {
  m.impl("rms_norm", &rms_norm_forward<rms_norm_cuda>);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_forward<rms_norm_cuda>);
  m.impl("fused_add_rms_norm_", &fused_add_rms_norm_inplace<rms_norm_cuda>);
  m.impl("rms_norm_backward", &rms_norm_backward<rms_norm_backward_cuda>);
}

}  // namespace llama_ext::cuda
