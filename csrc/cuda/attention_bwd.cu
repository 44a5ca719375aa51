// Grouped-query attention backward on tensor cores (fp16 / bf16), FlashAttention-2 style,
// plus the delta pre-kernel shared with the SIMT path.
//
// Algorithm. With P = softmax(scale * Q K^T) recomputed from the forward's lse,
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  delta_i = rowsum(dO_i * O_i),
//   dQ = scale * dS K,  dK = scale * dS^T Q.
// A pre-kernel computes delta (fp32, lse's layout). Then one CTA owns kBlockN = 64 keys of one
// (sequence, kv head); each of its 4 warps owns 16 keys and keeps their dK and dV rows in fp32
// registers for the whole kernel. The CTA walks every query head of the kv head's group and
// query block that can see one of its keys (from the first query whose causal / sliding window
// reaches key n0 to the last whose window starts before the block's end; the others are never
// loaded), streaming Q and dO tiles (kBlockM queries) through shared memory with cp.async
// double buffering. Per tile, on tensor cores (mma.sync m16n8k16, fp32 accumulate):
//   dP^T = V dO^T
//   S^T  = K Q^T     -> P^T = exp2(S^T * scale * log2 e - lse * log2 e), masked,
//                       dS^T = P^T * (dP^T - delta)
//   dV  += P^T dO    (P^T straight from the accumulators into A fragments)
//   dK  += dS^T Q
// With a logit softcap, S^T is capped (t = tanh(S^T scale / softcap), capped score softcap t)
// before the exp2 and dS^T is multiplied by the cap's derivative 1 - t^2; computing dP^T
// first keeps t out of registers (P^T and dS^T are finished in one elementwise pass).
//   dS^T goes to shared memory as dS, then dQ_tile = dS K is added to an fp32 workspace with
//   atomicAdd (the standard FA2 choice: CTAs of different key blocks add into the same dQ
//   rows, so dQ's summation order, and its last bits, can vary run to run; dK and dV are
//   deterministic). The caller scales the workspace by `scale` and casts it to dQ's dtype.
// Because the loop over the group's query heads is inside the CTA, dK and dV are summed over
// the group in registers: K and V are never repeated and no reduction kernel is needed.
//
// Tiles. kBlockN = 64 keys, 4 warps; kBlockM = 64 queries for D <= 64, 32 for D = 80..128
// (keeps dK + dV (2 x D / 2 regs per lane) plus S^T and dP^T under 255 registers).
// D = 256 does not fit this register plan and takes the SIMT path (attention.cu).
//
// Cost. 2.5x the forward's FLOPs (5 GEMMs of s_q * s_k * D instead of 2), all on tensor
// cores; global traffic is K and V once, Q, dO, lse, delta once per key block, and the fp32
// dQ atomics (s_q * D * 4 bytes per key block).
//
// Resources (ptxas -v, CUDA 13.0; 128 threads; no spills). Dynamic shared memory and the CTAs per
// SM that registers and shared memory allow (sm_80: 64K registers, 164 KB; sm_90: 64K, 228 KB):
//   D      registers sm_80 / sm_90   shared memory   CTAs per SM sm_80 / sm_90
//   32     162 / 168                 40 KB           3 / 3
//   64     189 / 194                 64 KB           2 / 2
//   80     171 / 166                 49 KB           2 / 3
//   96     177 / 182                 57 KB           2 / 2
//   128    240 / 234                 73 KB           2 / 2
// The delta pre-kernel: 29-30 registers, no shared memory.
#include "attention_launch.cuh"

namespace llama_ext::cuda::attention {
namespace {

template <int D>
struct BwdConfig {
  static constexpr int kD = D;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = D <= 64 ? 64 : 32;
  static constexpr int kPitch = smem_pitch<D>();
  static constexpr int kDsPitch = kBlockN + 8;  // 144 bytes = 4 (mod 32) words: conflict-free
  static constexpr int kDTiles = D / 8;
  static constexpr int kDChunks = D / 16;
  static constexpr int kMTiles = kBlockM / 8;    // n-tiles of S^T (8 queries each)
  static constexpr int kMChunks = kBlockM / 16;  // k-chunks of P^T dO (16 queries each)
  static constexpr int kRowGroups = kBlockM / 16;            // dQ: 16-row groups of the tile
  static constexpr int kDimSplits = kWarps / kRowGroups;     // dQ: warps sharing one row group
  static constexpr int kDqTiles = kDTiles / kDimSplits;      // dQ: n-tiles per warp
  // T elements: K, V, Q[2], dO[2], dS; then 4 * kBlockM floats (lse and delta, double-buffered).
  static constexpr int kSmemElems = 2 * kBlockN * kPitch + 4 * kBlockM * kPitch + kBlockM * kDsPitch;
  static_assert(kSmemElems * 2 % 16 == 0, "the float arrays after the tiles stay aligned");
  static_assert(kBlockN == 16 * kWarps, "each warp owns 16 keys");
  static_assert(kWarps % kRowGroups == 0 && kDTiles % kDimSplits == 0, "dQ work splits evenly over warps");
  static_assert(kDTiles % 2 == 0 && kMTiles % 2 == 0, "B fragments are loaded in n-tile pairs");
  static_assert(D <= kMaxBackwardTcHeadDim, "dK + dV of larger head dims do not fit in registers");
};

// The query tile of one iteration of a CTA's loop: query head `head`, rows [m0, m0 + kBlockM).
// Iteration `it` takes query head kv_head * group + it / m_blocks and query block
// m_block_begin + it % m_blocks.
struct QueryTile {
  int head;
  int m0;
};

template <typename C>
__device__ __forceinline__ QueryTile query_tile(const AttentionParams& p, int kv_head, int m_block_begin, int m_blocks,
                                                int it) {
  return QueryTile{kv_head * p.group + it / m_blocks, (m_block_begin + it % m_blocks) * C::kBlockM};
}

// Stage: load the Q and dO rows of a query tile into buffer `buf`, with lse * log2(e) and delta.
// Rows past the sequence are zero-filled and get lse = +inf, so their P (and dS) is exactly 0.
template <typename T, typename C>
__device__ __forceinline__ void load_query_tile(T* sQ, T* sdO, float* sLse2, float* sDelta, const AttentionParams& p,
                                                const Seq& seq, int b, const QueryTile& tile, int buf) {
  const T* q = static_cast<const T*>(p.q) + offset(p.q_strides, b, seq.start_q, tile.m0, tile.head);
  const T* dout = static_cast<const T*>(p.dout) + offset(p.dout_strides, b, seq.start_q, tile.m0, tile.head);
  load_tile<T, C::kD, C::kBlockM, C::kThreads>(sQ + buf * C::kBlockM * C::kPitch, q, p.q_strides.row,
                                               seq.len_q - tile.m0, p.aligned16);
  load_tile<T, C::kD, C::kBlockM, C::kThreads>(sdO + buf * C::kBlockM * C::kPitch, dout, p.dout_strides.row,
                                               seq.len_q - tile.m0, p.aligned16);
  for (int i = threadIdx.x; i < C::kBlockM; i += C::kThreads) {
    const bool valid = tile.m0 + i < seq.len_q;
    const int64_t at = lse_offset(p, b, seq, tile.m0 + i, tile.head);
    sLse2[buf * C::kBlockM + i] = valid ? p.lse[at] * kLog2e : INFINITY;
    sDelta[buf * C::kBlockM + i] = valid ? p.delta[at] : 0.f;
  }
}

// Stage: dP^T = V dO^T for the warp's 16 keys (from kw) x kBlockM queries. Computed before S^T,
// so that the softcap's tanh, which both P^T and dS^T need, lives only within one elementwise
// pass. Element e of m-tile mt is key kw + g + 8 * (e / 2), query mt * 8 + 2t + e % 2 (both
// local to the tile), as in every [kMTiles][4] array below.
template <typename T, typename C>
__device__ __forceinline__ void prob_grads_t(float (&dp_t)[C::kMTiles][4], const T* sV, const T* do_tile, int kw,
                                             int lane) {
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dp_t[mt][e] = 0.f;
  }
  mma::warp_gemm_nk<T, C::kDChunks, C::kMTiles>(dp_t, mma::ATileRows<T>{sV, C::kPitch, kw}, do_tile, C::kPitch, 0,
                                                lane);
}

// Stage: S^T = K Q^T, then in one elementwise pass P^T = exp2(capped(S^T * scale * log2(e)) -
// lse * log2(e)), 0 where the key is invisible to the query, and dS^T = P^T * (dP^T - delta),
// times the softcap's derivative 1 - t^2 (t = tanh(S^T scale / softcap)) when capped. ds_t holds
// dP^T on entry and dS^T on return.
template <typename T, typename C>
__device__ __forceinline__ void probabilities_and_score_grads_t(float (&p_t)[C::kMTiles][4],
                                                                float (&ds_t)[C::kMTiles][4], const T* sK,
                                                                const T* q_tile, const float* lse2, const float* delta,
                                                                const AttentionParams& p, const Seq& seq, int m0,
                                                                int n0, int kw, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) p_t[mt][e] = 0.f;
  }
  mma::warp_gemm_nk<T, C::kDChunks, C::kMTiles>(p_t, mma::ATileRows<T>{sK, C::kPitch, kw}, q_tile, C::kPitch, 0, lane);
  const bool masked = tile_needs_mask(m0, C::kBlockM, n0, C::kBlockN, seq, p.window);
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int query = mt * 8 + 2 * t + e % 2;
      const int key = kw + g + 8 * (e / 2);
      const bool visible = !masked || key_visible(m0 + query, n0 + key, seq, p.window);
      const float s2 = p_t[mt][e] * p.scale_log2;
      float prob, slope = 1.f;
      if (p.softcap_log2 > 0.f) {
        const float th = softcap_tanh(s2, p);
        prob = exp2f(p.softcap_log2 * th - lse2[query]);
        slope = 1.f - th * th;
      } else {
        prob = exp2f(s2 - lse2[query]);
      }
      p_t[mt][e] = visible ? prob : 0.f;
      ds_t[mt][e] = p_t[mt][e] * (ds_t[mt][e] - delta[query]) * slope;
    }
  }
}

// Stage: dS (queries x keys) to shared memory, rounded to T: dQ = dS K needs all 64 keys of a row.
template <typename T, typename C>
__device__ __forceinline__ void store_score_grads(T* sdS, const float (&ds_t)[C::kMTiles][4], int kw, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      sdS[(mt * 8 + 2 * t + e % 2) * C::kDsPitch + kw + g + 8 * (e / 2)] = from_float<T>(ds_t[mt][e]);
  }
}

// Stage: dQ tile += dS K into the fp32 workspace with atomicAdd. Warp w takes 16 query rows
// (row group w % kRowGroups) x kDqTiles n-tiles of dims (from dim0).
template <typename T, typename C>
__device__ __forceinline__ void accumulate_dq(const T* sdS, const T* sK, const AttentionParams& p, const Seq& seq,
                                              int b, const QueryTile& tile, int warp, int lane) {
  const int g = lane / 4, t = lane % 4;
  const int row_group = warp % C::kRowGroups;
  const int dim0 = (warp / C::kRowGroups) * C::kDqTiles * 8;
  float dq_acc[C::kDqTiles][4] = {};
  mma::warp_gemm_kn<T, C::kBlockN / 16, C::kDqTiles>(dq_acc, mma::ATileRows<T>{sdS, C::kDsPitch, row_group * 16}, sK,
                                                     C::kPitch, dim0, lane);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = tile.m0 + row_group * 16 + g + 8 * r;
    if (row >= seq.len_q) continue;
    float* dq_row = p.dq_accum + offset(p.dq_strides, b, seq.start_q, row, tile.head) + dim0 + 2 * t;
#pragma unroll
    for (int nt = 0; nt < C::kDqTiles; ++nt) {
      atomicAdd(dq_row + nt * 8, dq_acc[nt][2 * r]);
      atomicAdd(dq_row + nt * 8 + 1, dq_acc[nt][2 * r + 1]);
    }
  }
}

// Stage: store the warp's 16 rows of dK (scaled) and dV; dk/dv are allocated contiguous, so each
// pair of adjacent elements is 4-byte aligned. The sequence's offsets are read again here rather
// than kept live in registers across the main loop.
template <typename T, typename C>
__device__ __forceinline__ void write_back_dkdv(const float (&dk_acc)[C::kDTiles][4],
                                                const float (&dv_acc)[C::kDTiles][4], const AttentionParams& p, int b,
                                                int kv_head, int n0, int kw, int lane) {
  const Seq seq = sequence(p, b);
  const int g = lane / 4, t = lane % 4;
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + kw + g + 8 * r;
    if (key >= seq.len_k) continue;
    T* dk_row = dk + offset(p.dk_strides, b, seq.start_k, key, kv_head);
    T* dv_row = dv + offset(p.dv_strides, b, seq.start_k, key, kv_head);
#pragma unroll
    for (int dt = 0; dt < C::kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(dk_row + dt * 8 + 2 * t) =
          mma::pack2<T>(dk_acc[dt][2 * r] * p.scale, dk_acc[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_row + dt * 8 + 2 * t) = mma::pack2<T>(dv_acc[dt][2 * r], dv_acc[dt][2 * r + 1]);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdConfig<D>::kThreads)
    attention_backward_tc_kernel(const AttentionParams p) {
  using C = BwdConfig<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + C::kBlockN * C::kPitch;
  T* sQ = sV + C::kBlockN * C::kPitch;        // [2][kBlockM][kPitch]
  T* sdO = sQ + 2 * C::kBlockM * C::kPitch;   // [2][kBlockM][kPitch]
  T* sdS = sdO + 2 * C::kBlockM * C::kPitch;  // [kBlockM][kDsPitch]
  float* sLse2 = reinterpret_cast<float*>(sdS + C::kBlockM * C::kDsPitch);  // [2][kBlockM], lse * log2 e
  float* sDelta = sLse2 + 2 * C::kBlockM;                                   // [2][kBlockM]

  const int b = blockIdx.z;
  const int kv_head = blockIdx.y;
  const Seq seq = sequence(p, b);
  const int n0 = blockIdx.x * C::kBlockN;
  if (n0 >= seq.len_k) return;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  const T* k = static_cast<const T*>(p.k) + offset(p.k_strides, b, seq.start_k, n0, kv_head);
  const T* v = static_cast<const T*>(p.v) + offset(p.v_strides, b, seq.start_k, n0, kv_head);
  load_tile<T, D, C::kBlockN, C::kThreads>(sK, k, p.k_strides.row, seq.len_k - n0, p.aligned16);
  load_tile<T, D, C::kBlockN, C::kThreads>(sV, v, p.v_strides.row, seq.len_k - n0, p.aligned16);

  // Query blocks that can see a key of this block: from the first query whose window reaches
  // key n0 to the last whose window starts before n0 + kBlockN.
  const int m_block_begin = first_query_reaching(n0, seq, p.window) / C::kBlockM;
  const int m_blocks = tiles_of(first_query_past(n0 + C::kBlockN, seq, p.window), C::kBlockM) - m_block_begin;
  const int n_iters = m_blocks > 0 ? p.group * m_blocks : 0;
  if (n_iters > 0) {
    load_query_tile<T, C>(sQ, sdO, sLse2, sDelta, p, seq, b, query_tile<C>(p, kv_head, m_block_begin, m_blocks, 0), 0);
  }
  mma::cp_async_commit();

  const int kw = warp * 16;  // the warp's keys within the block
  float dk_acc[C::kDTiles][4] = {};
  float dv_acc[C::kDTiles][4] = {};

  for (int it = 0; it < n_iters; ++it) {
    mma::cp_async_wait<0>();
    __syncthreads();  // tile `it` visible; everyone is done with the other buffer and with sdS
    if (it + 1 < n_iters) {
      load_query_tile<T, C>(sQ, sdO, sLse2, sDelta, p, seq, b,
                            query_tile<C>(p, kv_head, m_block_begin, m_blocks, it + 1), (it + 1) % 2);
    }
    mma::cp_async_commit();

    const int buf = it % 2;
    const QueryTile tile = query_tile<C>(p, kv_head, m_block_begin, m_blocks, it);
    const T* q_tile = sQ + buf * C::kBlockM * C::kPitch;
    const T* do_tile = sdO + buf * C::kBlockM * C::kPitch;

    float ds_t[C::kMTiles][4];
    prob_grads_t<T, C>(ds_t, sV, do_tile, kw, lane);
    float p_t[C::kMTiles][4];
    probabilities_and_score_grads_t<T, C>(p_t, ds_t, sK, q_tile, sLse2 + buf * C::kBlockM, sDelta + buf * C::kBlockM,
                                          p, seq, tile.m0, n0, kw, lane);
    // dV += P^T dO
    mma::warp_gemm_kn<T, C::kMChunks, C::kDTiles>(dv_acc, mma::AAccumulators<T, C::kMTiles>{p_t}, do_tile, C::kPitch,
                                                  0, lane);
    // dK += dS^T Q
    mma::warp_gemm_kn<T, C::kMChunks, C::kDTiles>(dk_acc, mma::AAccumulators<T, C::kMTiles>{ds_t}, q_tile, C::kPitch,
                                                  0, lane);
    store_score_grads<T, C>(sdS, ds_t, kw, lane);
    __syncthreads();
    accumulate_dq<T, C>(sdS, sK, p, seq, b, tile, warp, lane);
  }
  mma::cp_async_wait<0>();
  write_back_dkdv<T, C>(dk_acc, dv_acc, p, b, kv_head, n0, kw, lane);
}

// delta_i = sum_d dO[i, d] * O[i, d] in fp32: one warp per (row, head).
constexpr int kDeltaWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32) attention_backward_delta_kernel(const AttentionParams p) {
  const int b = blockIdx.z;
  const int head = blockIdx.y;
  const Seq seq = sequence(p, b);
  const int row = blockIdx.x * kDeltaWarps + threadIdx.x / 32;
  if (row >= seq.len_q) return;
  const int lane = threadIdx.x % 32;
  const T* dout = static_cast<const T*>(p.dout) + offset(p.dout_strides, b, seq.start_q, row, head);
  const T* out = static_cast<const T*>(p.fwd_out) + offset(p.fwd_out_strides, b, seq.start_q, row, head);
  float sum = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) sum += to_float(dout[d]) * to_float(out[d]);
  sum = warp_reduce_sum(sum);
  if (lane == 0) p.delta[lse_offset(p, b, seq, row, head)] = sum;
}

template <typename T, int D>
bool launch_backward_kernel(const AttentionParams& p, cudaStream_t stream) {
  using C = BwdConfig<D>;
  const size_t smem_bytes = C::kSmemElems * sizeof(T) + 4 * C::kBlockM * sizeof(float);
  if (!smem_fits(smem_bytes)) return false;
  auto kernel = attention_backward_tc_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seq_k, C::kBlockN)), p.n_kv_heads, p.batch);
  if (grid_empty(grid)) return true;
  kernel<<<grid, C::kThreads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

template <typename T>
bool launch_backward_tc(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_head_dim(p.head_dim, [&](auto d) {
    constexpr int D = decltype(d)::value;
    if constexpr (D <= kMaxBackwardTcHeadDim) {
      return launch_backward_kernel<T, D>(p, stream);
    } else {
      return false;
    }
  });
}

template <typename T>
void launch_backward_delta(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seq_q, kDeltaWarps)), p.n_q_heads, p.batch);
  if (grid_empty(grid)) return;
  attention_backward_delta_kernel<T><<<grid, kDeltaWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define LLAMA_EXT_INSTANTIATE_BWD_TC(T) template bool launch_backward_tc<T>(const AttentionParams&, cudaStream_t);
LLAMA_EXT_ATTENTION_TC_TYPES(LLAMA_EXT_INSTANTIATE_BWD_TC)
#undef LLAMA_EXT_INSTANTIATE_BWD_TC
#define LLAMA_EXT_INSTANTIATE_DELTA(T) template void launch_backward_delta<T>(const AttentionParams&, cudaStream_t);
LLAMA_EXT_ATTENTION_TYPES(LLAMA_EXT_INSTANTIATE_DELTA)
#undef LLAMA_EXT_INSTANTIATE_DELTA

}  // namespace llama_ext::cuda::attention
