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
// unaligned kernels loop and re-read the row from L1/L2 in the second pass. A thread issues every
// load of its cached chunks of a row before it uses any: a use between two loads makes the second
// wait for the first's round trip, leaving one chunk a thread in flight, and these kernels are
// bound by the bytes they keep in flight (on the H200 the forward read at 76% of copy with one
// chunk a thread in flight, its fused form at 91% with x and residual in flight together).
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
// fp32, each thread for its own chunks: in registers (row-ahead kernels), else in its group's row
// of sums, in shared memory when the CTA's rows of sums fit 32 KB (all short rows; one CTA per
// row up to 8192 elements) or in the CTA's row of the [grid, chunks*kChunk] workspace. The CTA
// adds its groups' sums in group order into its workspace row; a second kernel sums the
// workspace over CTAs in a fixed order (each of a CTA's warps a contiguous range of rows, then
// the warps in order): deterministic, no atomics. The grid is the same for the aligned and
// unaligned kernels, so dweight's bits do not depend on the layout either.
// Bytes per row: read 2n elements (g, x; +n grad_residual), write n (dx): bandwidth-bound. A CTA
// that waits for a row's loads and then reduces and writes it has nothing in flight for the
// second half. So with kRowAheadCache chunks per thread (rows of 257-512 and 1025-8192 bf16/fp16
// elements, 129-256 and 513-4096 fp32) a group can load its next row before it reduces the
// current one. That kernel needs more registers, and the launcher takes it only where the
// occupancy API gives it as many CTAs per SM as the plain kernel (on sm_90 at n = 4096: bf16 and
// fp16, not fp32, whose plain kernel fits twice the CTAs). Without it, on the H200 at 2802fae:
// 50% of copy at 32768 x 4096 bf16, 2 CTAs of 256 threads per SM, against the forward's 76%.
//
// ptxas -v (CUDA 13.0, setup.py's flags), registers per thread over the 7 <input, weight, out>
// dtype combinations, sm_80 / sm_90; 128 B static shared memory (block reduction), plus for the
// backward's dweight sums up to 32 KB dynamic. Occupancy: resident warps of 64 at the highest
// count, for 256-thread CTAs (short rows) / the 512-thread worst case of long rows.
//   forward  aligned   cache 1:  24-31 / 23-33     75% /  75%
//   forward  aligned   cache 2:  32-35 / 32-44     62% /  50%   (bf16 input and weight: 35 / 40)
//   forward  aligned   cache 4:  53-54 / 52-66     37% /  25%
//   forward  aligned   cache 8:  94-98 / 94-116    25% /  25%
//   forward  aligned   loop:     32-40 / 32-45     62% /  50%
//   forward  unaligned loop:     36-54 / 34-62     50% /  50%
//   backward aligned   cache 1:  48-72 / 48-80     37% /  25%
//   backward aligned   cache 2:  70-96 / 64-96     25% /  25%
//   backward row-ahead cache 2:  87-126 / 88-128   25% /  25%   (two rows' g and x, and the sums)
//   backward aligned   cache 4:  112-127 / 106-128 25% /  25%
//   backward aligned   loop:     54-72 / 56-79     37% /  25%
//   backward unaligned loop:     55-96 / 55-96     25% /  25%
//   reduce_dweight:              32 / 32
// The forward's plain and fused forms share their kernels, so the plain form holds registers for
// the residual it never loads. No spills in the 87 kernels on sm_80 to sm_120 (the backward's
// explicit minimum of one CTA per SM keeps ptxas from trading a spill for 64 registers) but two:
// on sm_90 the forward's cache-4 kernel for bf16 input, fp32 weight and bf16 output keeps an
// 8-byte value in local memory (stored once, loaded twice, no loop), which holds it at 64
// registers, two 512-thread CTAs per SM; allowed 66 it fits one. On sm_100 the fp32 forward
// without a row cache keeps 12 bytes there, at 40 registers, where sm_90 uses 32 and none.
// tests/test_attention_sass.py checks that the row-ahead kernels touch no local memory on any
// architecture, and that the cached kernels issue their row's loads first. Every aligned kernel
// moves rows with LDG.E.128 / STG.E.128 (cuobjdump -sass).
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
constexpr int kRowAheadCache = 2;        // the backward's cache that also has a row-ahead kernel
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

// A chunk of an aligned row as the 16-byte vectors it is loaded in, kept packed (two bf16/fp16
// elements a register) until it is used.
template <typename E, int N>
struct PackedChunk {
  uint4 words[sizeof(E) * N / kVecBytes];

  __device__ __forceinline__ static PackedChunk load(const E* row, int64_t c) {
    PackedChunk out;
#pragma unroll
    for (int q = 0; q < int(sizeof(E)) * N / kVecBytes; ++q)
      out.words[q] = *reinterpret_cast<const uint4*>(row + c * N + q * vec_elems<E>());
    return out;
  }
  __device__ __forceinline__ Chunk<E, N> unpack() const {
    Chunk<E, N> out;
    static_assert(sizeof(out) == sizeof(words), "a chunk is whole 16-byte vectors");
    memcpy(&out, words, sizeof(out));
    return out;
  }
};

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
__device__ __forceinline__ Chunk<T, N> sum_input(const FwdRow<T>& r, int64_t c, int64_t n, const Chunk<T, N>& x,
                                                 const Chunk<T, N>& residual, float& sum_sq) {
  Chunk<T, N> s = x;
  if (r.residual != nullptr) {
#pragma unroll
    for (int e = 0; e < N; ++e) s.v[e] = from_float<T>(__fadd_rn(to_float(x.v[e]), to_float(residual.v[e])));
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
    // Every load of the row is issued before any is used (a use between two loads would make the
    // second wait for the first's round trip), and kept packed as loaded until used.
    static_assert(kAligned, "register-cached rows are aligned");
    PackedChunk<T, N> x[kCache], residual[kCache];
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const int64_t c = slot.lane + int64_t(i) * group;
      if (c < slot.n_chunks) {
        x[i] = PackedChunk<T, N>::load(r.x, c);
        if (r.residual != nullptr) residual[i] = PackedChunk<T, N>::load(r.residual, c);
      }
    }
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const int64_t c = slot.lane + int64_t(i) * group;
      if (c < slot.n_chunks) cache[i] = sum_input<kAligned, N>(r, c, p.n, x[i].unpack(), residual[i].unpack(), sum_sq);
    }
  } else {
    for (int64_t c = slot.lane; c < slot.n_chunks; c += group) {
      const Chunk<T, N> x = load_chunk<kAligned, N>(r.x, c, p.n);
      Chunk<T, N> residual;
      if (r.residual != nullptr) residual = load_chunk<kAligned, N>(r.residual, c, p.n);
      sum_input<kAligned, N>(r, c, p.n, x, residual, sum_sq);
    }
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

// Stage 2: chunk c's share of dot = sum(g * w' * x), w its applied weight.
template <int N, typename T, typename O>
__device__ __forceinline__ void add_dot(const float (&w)[N], const Chunk<O, N>& g, const Chunk<T, N>& x, float& dot) {
#pragma unroll
  for (int e = 0; e < N; ++e) dot = fmaf(__fmul_rn(to_float(g.v[e]), w[e]), to_float(x.v[e]), dot);
}

// Stage 3: dx = rstd*g*w' + x_coef*x (+ grad_residual) of one chunk; with want_dw, adds g * xhat
// to dw.
template <int N, typename T, typename O>
__device__ __forceinline__ Chunk<T, N> chunk_dx(const float (&w)[N], const Chunk<O, N>& g, const Chunk<T, N>& x,
                                               bool has_gres, const Chunk<T, N>& gres, float rstd, float x_coef,
                                               bool cast, bool want_dw, float (&dw)[N]) {
  Chunk<T, N> out;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const float gf = to_float(g.v[e]), xf = to_float(x.v[e]);
    float d = fmaf(x_coef, xf, __fmul_rn(rstd, __fmul_rn(gf, w[e])));
    if (has_gres) d = __fadd_rn(d, to_float(gres.v[e]));
    out.v[e] = from_float<T>(d);
    if (want_dw) {
      float xhat = __fmul_rn(xf, rstd);
      if (cast) xhat = round_to<T>(xhat);
      dw[e] = fmaf(gf, xhat, dw[e]);
    }
  }
  return out;
}

// N fp32 sums of chunk c in a row of sums, moved as 16-byte vectors (N is 4 or 8).
template <int N>
__device__ __forceinline__ void load_sums(const float* sums_row, int64_t c, float (&s)[N]) {
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    const Vec<float> v = Vec<float>::load(sums_row + c * N + q * 4);
#pragma unroll
    for (int e = 0; e < 4; ++e) s[q * 4 + e] = v.v[e];
  }
}
template <int N>
__device__ __forceinline__ void store_sums(float* sums_row, int64_t c, const float (&s)[N]) {
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    Vec<float> v;
#pragma unroll
    for (int e = 0; e < 4; ++e) v.v[e] = s[q * 4 + e];
    v.store(sums_row + c * N + q * 4);
  }
}

// One row of the backward as this thread sees it: its index (row 0 past the last row, which has
// no chunks) and rstd. The rows' pointers are formed where they are used, from the kernel's
// parameters, so that a row loaded ahead costs no registers for them.
struct BwdRow {
  int64_t row;
  bool valid;
  float rstd;
};

template <int N>
__device__ __forceinline__ BwdRow bwd_row(const RMSNormBackwardParams& p, int64_t row_block, int group) {
  const RowSlot slot = row_slot(row_block, group, p.rows, p.n, N);
  const int64_t row = slot.valid ? slot.row : 0;
  return {row, slot.valid, slot.valid ? static_cast<const float*>(p.rstd)[row] : 0.f};
}

// The chunks of g and x of one aligned row that a thread owns (lane + i * group, i < kCache).
template <typename T, typename O, int N, int kCache>
struct RowChunks {
  PackedChunk<O, N> g[kCache];
  PackedChunk<T, N> x[kCache];
};

template <typename T, typename O, int N, int kCache>
__device__ __forceinline__ void load_row_chunks(const RMSNormBackwardParams& p, const BwdRow& r, int lane, int group,
                                                int64_t n_chunks, RowChunks<T, O, N, kCache>& out) {
  if (!r.valid) return;
  const O* g = row_ptr<O>(p.grad_out, p.grad_out_stride, r.row);
  const T* x = row_ptr<T>(p.x, p.x_stride, r.row);
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int c = lane + i * group;
    if (c < n_chunks) {
      out.g[i] = PackedChunk<O, N>::load(g, c);
      out.x[i] = PackedChunk<T, N>::load(x, c);
    }
  }
}

// Grid-stride over row blocks; every thread owns the same chunks of each of its rows. With
// p.grad_weight, each group of threads sums g * xhat over its rows in row order, each thread for
// the chunks it owns; the CTA's result goes to workspace[blockIdx.x], its groups' sums added in
// group order (through shared memory, sums_in_smem: rows_per_cta x ws_stride floats, ws_stride =
// chunks * N).
//   kRowAhead (kCache = kRowAheadCache, aligned rows): a thread's chunks of g and x stay in
//     registers between the dot and dx, and so do its dweight sums over all its rows. A row's g
//     and x are loaded while the row before it is reduced and written: a group keeps a row's
//     loads in flight through the whole of the row before, where it would otherwise have none
//     from its loads' arrival to its next row. grad_residual (fused), which only dx reads, is
//     loaded at the row's start.
//   Else the row's chunks are loaded at its start, kept in registers (kCache > 0) or re-read
//     (from L1/L2) for dx (kCache == 0: rows wider than the cache, unaligned rows), and the sums
//     live in the CTA's shared memory or, when they do not fit it (one row per CTA then), in its
//     workspace row.
// The per-element arithmetic and the order of every sum are the same on every path, so the bits
// do not depend on the row's alignment or on the kernel the launcher picks.
template <typename T, typename W, typename O, bool kAligned, int kCache, bool kRowAhead>
__global__ void __launch_bounds__(kMaxThreads, 1)
    rms_norm_bwd_kernel(const RMSNormBackwardParams p, const int group, float* __restrict__ workspace,
                        const int64_t ws_stride, const bool sums_in_smem) {
  constexpr int N = vec_elems<T>();
  __shared__ float scratch[32];
  extern __shared__ float4 smem_sums[];  // float4: 16-byte aligned
  const bool want_dw = p.grad_weight != nullptr;
  const bool has_gres = p.grad_residual != nullptr;
  const float inv_n = 1.f / float(p.n);
  const AppliedWeight<W> aw(p.weight, p.offset);
  const int rows_per_cta = blockDim.x / group;
  const int64_t n_row_blocks = (p.rows + rows_per_cta - 1) / rows_per_cta;
  const int64_t n_chunks = (p.n + N - 1) / N;
  const int lane = threadIdx.x % group;
  // The CTA's workspace row; this group's row of sums in shared memory (formed where used: no
  // registers held through the row loop).
  auto ws_row = [&] { return workspace + blockIdx.x * ws_stride; };
  auto smem_row = [&] { return reinterpret_cast<float*>(smem_sums) + (threadIdx.x / group) * ws_stride; };
  // Stage 2's reduction: the row's coefficient of x, identical in every lane.
  auto x_coef_of = [&](const BwdRow& r, float dot) {
    return -r.rstd * r.rstd * r.rstd * group_reduce_sum(dot, group, scratch) * inv_n;
  };
  // Stage 3 for one chunk: dx stored, g * xhat added to dw.
  auto write_dx = [&](const BwdRow& r, int64_t c, const Chunk<O, N>& g, const Chunk<T, N>& x, const Chunk<T, N>& gres,
                      float x_coef, float(&dw)[N]) {
    float w[N];
    aw.template load<kAligned, N>(c, p.n, w);
    store_chunk<kAligned, N>(row_ptr<T>(p.grad_x, p.grad_x_stride, r.row), c, p.n,
                             chunk_dx(w, g, x, has_gres, gres, r.rstd, x_coef, p.cast_before_weight, want_dw, dw));
  };
  auto dot_of_chunk = [&](int64_t c, const Chunk<O, N>& g, const Chunk<T, N>& x, float& dot) {
    float w[N];
    aw.template load<kAligned, N>(c, p.n, w);
    add_dot(w, g, x, dot);
  };

  if constexpr (kRowAhead) {
    static_assert(kAligned && kCache > 0, "the row-ahead kernel holds 16-byte vectors of aligned rows");
    float dw[kCache][N];
#pragma unroll
    for (int i = 0; i < kCache; ++i)
#pragma unroll
      for (int e = 0; e < N; ++e) dw[i][e] = 0.f;

    BwdRow r = bwd_row<N>(p, blockIdx.x, group), r_next{0, false, 0.f};
    RowChunks<T, O, N, kCache> cur, next{};
    load_row_chunks(p, r, lane, group, n_chunks, cur);
    for (int64_t rb = blockIdx.x; rb < n_row_blocks; rb += gridDim.x) {
      // Stage 1: the next row's chunks, in flight through this row's reduction and stores.
      if (rb + gridDim.x < n_row_blocks) {
        r_next = bwd_row<N>(p, rb + gridDim.x, group);
        load_row_chunks(p, r_next, lane, group, n_chunks, next);
      }
      const int row_chunks = r.valid ? int(n_chunks) : 0;  // at most kCache x kMaxThreads
      // grad_residual joins only dx: this row's, in flight through its reduction.
      Chunk<T, N> gres[kCache];
      if (has_gres) {
        const T* gres_row = row_ptr<T>(p.grad_residual, p.grad_residual_stride, r.row);
#pragma unroll
        for (int i = 0; i < kCache; ++i) {
          const int c = lane + i * group;
          if (c < row_chunks) gres[i] = load_chunk<kAligned, N>(gres_row, c, p.n);
        }
      }

      // Stage 2: dot over the row.
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        const int c = lane + i * group;
        if (c < row_chunks) dot_of_chunk(c, cur.g[i].unpack(), cur.x[i].unpack(), dot);
      }
      const float x_coef = x_coef_of(r, dot);

      // Stage 3: dx, and the dweight sums.
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        const int c = lane + i * group;
        if (c < row_chunks) write_dx(r, c, cur.g[i].unpack(), cur.x[i].unpack(), gres[i], x_coef, dw[i]);
      }
      r = r_next;
      cur = next;
    }

    // Stage 4: the sums out of the registers; with one row per CTA they are the CTA's.
    if (!want_dw) return;
    float* dest = rows_per_cta == 1 ? ws_row() : smem_row();
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const int c = lane + i * group;
      if (c < n_chunks) store_sums<N>(dest, c, dw[i]);
    }
    if (rows_per_cta == 1) return;
  } else {
    float* sums = want_dw ? (sums_in_smem ? smem_row() : ws_row()) : nullptr;
    // Stage 0: zero the sums of the chunks this thread owns.
    if (want_dw) {
      const float zeros[N] = {};
      for (int64_t c = lane; c < n_chunks; c += group) store_sums<N>(sums, c, zeros);
    }
    for (int64_t rb = blockIdx.x; rb < n_row_blocks; rb += gridDim.x) {
      const BwdRow r = bwd_row<N>(p, rb, group);
      const int64_t row_chunks = r.valid ? n_chunks : 0;
      const O* g = row_ptr<O>(p.grad_out, p.grad_out_stride, r.row);
      const T* x = row_ptr<T>(p.x, p.x_stride, r.row);
      // Stages 1 and 2: the row's chunks (kept for stage 3 when cached) and dot. Cached, every
      // load of the row is issued before any is used (a use between two loads would make the
      // second wait for the first's round trip).
      RowChunks<T, O, N, (kCache > 0 ? kCache : 1)> cached;
      float dot = 0.f;
      if constexpr (kCache > 0) {
        load_row_chunks(p, r, lane, group, n_chunks, cached);
#pragma unroll
        for (int i = 0; i < kCache; ++i) {
          const int64_t c = lane + int64_t(i) * group;
          if (c < row_chunks) dot_of_chunk(c, cached.g[i].unpack(), cached.x[i].unpack(), dot);
        }
      } else {
#pragma unroll 1
        for (int64_t c = lane; c < row_chunks; c += group)
          dot_of_chunk(c, load_chunk<kAligned, N>(g, c, p.n), load_chunk<kAligned, N>(x, c, p.n), dot);
      }
      const float x_coef = x_coef_of(r, dot);

      // Stage 3: dx, and the dweight sums.
      auto write = [&](int64_t c, const Chunk<O, N>& g_chunk, const Chunk<T, N>& x_chunk) {
        Chunk<T, N> gres;
        if (has_gres)
          gres = load_chunk<kAligned, N>(row_ptr<T>(p.grad_residual, p.grad_residual_stride, r.row), c, p.n);
        float dw[N];
        if (want_dw) load_sums<N>(sums, c, dw);
        write_dx(r, c, g_chunk, x_chunk, gres, x_coef, dw);
        if (want_dw) store_sums<N>(sums, c, dw);
      };
      if constexpr (kCache > 0) {
#pragma unroll
        for (int i = 0; i < kCache; ++i) {
          const int64_t c = lane + int64_t(i) * group;
          if (c < row_chunks) write(c, cached.g[i].unpack(), cached.x[i].unpack());
        }
      } else {
#pragma unroll 1
        for (int64_t c = lane; c < row_chunks; c += group)
          write(c, load_chunk<kAligned, N>(g, c, p.n), load_chunk<kAligned, N>(x, c, p.n));
      }
    }
    if (!want_dw || !sums_in_smem) return;
  }

  // Stage 5: the CTA's groups' sums, added in group order, to its workspace row.
  __syncthreads();
  const float* all_sums = reinterpret_cast<const float*>(smem_sums);
  for (int64_t j = threadIdx.x; j < ws_stride; j += blockDim.x) {
    float sum = all_sums[j];
    for (int gi = 1; gi < rows_per_cta; ++gi) sum = __fadd_rn(sum, all_sums[gi * ws_stride + j]);
    ws_row()[j] = sum;
  }
}

// The backward launcher runs its row-ahead kernel where it fits as many CTAs per SM as the plain
// kernel: a CTA with its next row in flight moves a row per load latency; two CTAs that each wait
// for their row's loads move two rows per latency plus reduction, so the row-ahead kernel (more
// registers) must not cost a CTA. LLAMA_EXT_CUDA_ROW_AHEAD=1 runs it wherever the layout has one,
// 0 never (env_switch), on the rule's grid either way, so every result keeps its bits: for tests
// of both kernels on one GPU and for measuring the rule side by side (scripts/row_ahead.py).
constexpr const char* kRowAheadVariable = "LLAMA_EXT_CUDA_ROW_AHEAD";

// dweight[j] = sum over CTAs b of workspace[b, j] (ws: [n_partials, ws_stride] floats). A CTA takes
// 32 columns; warp w sums rows [w * per_warp, (w + 1) * per_warp) in order, and warp 0 adds the
// warps' sums in warp order: deterministic. Split over kReduceWarps warps, so that n / 32 CTAs
// of 16 warps, each thread with a few of the partials' loads in flight, read the workspace
// (4.3 MB at 4096 x 264 CTAs on an H200): one thread per column reading all its rows would
// leave 16 CTAs at n = 4096 to read it.
constexpr int kReduceWarps = 16;

template <typename W>
__global__ void __launch_bounds__(32 * kReduceWarps)
    reduce_dweight_kernel(const float* __restrict__ workspace, int64_t n_partials, int64_t ws_stride, int64_t n,
                          W* __restrict__ dweight) {
  __shared__ float warp_sums[kReduceWarps][32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t j = int64_t(blockIdx.x) * 32 + lane;
  const int64_t per_warp = (n_partials + kReduceWarps - 1) / kReduceWarps;
  const int64_t first = warp * per_warp;
  const int64_t last = first + per_warp < n_partials ? first + per_warp : n_partials;
  float sum = 0.f;
  if (j < n)
    for (int64_t b = first; b < last; ++b) sum = __fadd_rn(sum, workspace[b * ws_stride + j]);
  warp_sums[warp][lane] = sum;
  __syncthreads();
  if (warp != 0 || j >= n) return;
  float total = warp_sums[0][lane];
  for (int w = 1; w < kReduceWarps; ++w) total = __fadd_rn(total, warp_sums[w][lane]);
  dweight[j] = from_float<W>(total);
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
  const EnvSwitch forced = env_switch(kRowAheadVariable);  // read before anything is launched
  const RowLayout layout = row_layout(p.n, N, kMaxCacheBwd);
  const int rows_per_cta = layout.rows_per_cta();
  const bool want_dw = p.grad_weight != nullptr;
  const int64_t ws_stride = ceil_div(p.n, N) * N;
  with_cache(layout.cache, [&]<int kCache>() {
    if constexpr (kCache <= kMaxCacheBwd) {
      using Kernel = void (*)(const RMSNormBackwardParams, const int, float*, const int64_t, const bool);
      const Kernel unaligned_kernel = &rms_norm_bwd_kernel<T, W, O, false, 0, false>;
      const bool sums_in_smem = want_dw && rows_per_cta * ws_stride * int64_t(sizeof(float)) <= kMaxSmemSums;
      // Short rows need a row of sums per group, which only shared memory holds.
      TORCH_CHECK(!want_dw || rows_per_cta == 1 || sums_in_smem, "rms_norm_backward: ", rows_per_cta,
                  " rows of ", ws_stride, " sums exceed the shared memory budget");
      const size_t smem = sums_in_smem ? rows_per_cta * ws_stride * sizeof(float) : 0;
      Kernel aligned_kernel = &rms_norm_bwd_kernel<T, W, O, true, kCache, false>;
      Residency fit_aligned = kernel_residency(aligned_kernel, layout.threads, smem);
      if constexpr (kCache == kRowAheadCache) {
        const Kernel row_ahead_kernel = &rms_norm_bwd_kernel<T, W, O, true, kCache, true>;
        const Residency fit_row_ahead = kernel_residency(row_ahead_kernel, layout.threads, smem);
        const bool by_rule = fit_row_ahead.ctas_per_sm >= fit_aligned.ctas_per_sm;
        if (by_rule) fit_aligned = fit_row_ahead;  // the grid follows the rule, never the override
        if (forced == EnvSwitch::kOn || (forced == EnvSwitch::kUnset && by_rule))
          aligned_kernel = row_ahead_kernel;
      }
      // The grid, and with it the dweight summation order, must not depend on the alignment (or
      // on LLAMA_EXT_CUDA_ROW_AHEAD): size it for whichever kernel fits fewer CTAs per SM.
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
        reduce_dweight_kernel<W><<<unsigned(ceil_div(p.n, 32)), 32 * kReduceWarps, 0, stream>>>(
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
