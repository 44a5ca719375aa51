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
#include "attention_launch.cuh"

namespace llama_ext::cuda::attention {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct BwdConfig {
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
  static_assert(D <= 128, "dK + dV of D = 256 do not fit in registers");
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdConfig<D>::kThreads)
    attention_backward_tc_kernel(const AttentionParams p) {
  using C = BwdConfig<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + C::kBlockN * C::kPitch;
  T* sQ = sV + C::kBlockN * C::kPitch;     // [2][kBlockM][kPitch]
  T* sdO = sQ + 2 * C::kBlockM * C::kPitch;  // [2][kBlockM][kPitch]
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
  const int g = lane / 4, t = lane % 4;

  const T* k = static_cast<const T*>(p.k) + offset(p.k_strides, b, seq.start_k, n0, kv_head);
  const T* v = static_cast<const T*>(p.v) + offset(p.v_strides, b, seq.start_k, n0, kv_head);
  load_tile<T, D, C::kBlockN, C::kThreads>(sK, k, p.k_strides.row, seq.len_k - n0, p.aligned16);
  load_tile<T, D, C::kBlockN, C::kThreads>(sV, v, p.v_strides.row, seq.len_k - n0, p.aligned16);

  // Query blocks that can see a key of this block: from the first query whose window reaches
  // key n0 to the last whose window starts before n0 + kBlockN.
  const int m_block_begin = first_query_reaching(n0, seq, p.window) / C::kBlockM;
  const int m_blocks = tiles_of(first_query_past(n0 + C::kBlockN, seq, p.window), C::kBlockM) - m_block_begin;
  const int n_iters = m_blocks > 0 ? p.group * m_blocks : 0;

  // Iteration `it` handles query head kv_head * group + it / m_blocks, query block
  // m_block_begin + it % m_blocks.
  auto load_q_block = [&](int it, int buf) {
    const int head = kv_head * p.group + it / m_blocks;
    const int m0 = (m_block_begin + it % m_blocks) * C::kBlockM;
    const T* q = static_cast<const T*>(p.q) + offset(p.q_strides, b, seq.start_q, m0, head);
    const T* dout = static_cast<const T*>(p.dout) + offset(p.dout_strides, b, seq.start_q, m0, head);
    load_tile<T, D, C::kBlockM, C::kThreads>(sQ + buf * C::kBlockM * C::kPitch, q, p.q_strides.row,
                                             seq.len_q - m0, p.aligned16);
    load_tile<T, D, C::kBlockM, C::kThreads>(sdO + buf * C::kBlockM * C::kPitch, dout, p.dout_strides.row,
                                             seq.len_q - m0, p.aligned16);
    for (int i = threadIdx.x; i < C::kBlockM; i += C::kThreads) {
      const bool valid = m0 + i < seq.len_q;
      const int64_t at = lse_offset(p, b, seq, m0 + i, head);
      // Query rows past the sequence get lse = +inf, so their P (and dS) is exactly 0.
      sLse2[buf * C::kBlockM + i] = valid ? p.lse[at] * kLog2e : INFINITY;
      sDelta[buf * C::kBlockM + i] = valid ? p.delta[at] : 0.f;
    }
  };
  if (n_iters > 0) load_q_block(0, 0);
  mma::cp_async_commit();

  const int kw = warp * 16;  // the warp's keys within the block
  float dk_acc[C::kDTiles][4] = {};
  float dv_acc[C::kDTiles][4] = {};

  for (int it = 0; it < n_iters; ++it) {
    mma::cp_async_wait<0>();
    __syncthreads();  // block `it` visible; everyone is done with the other buffer and with sdS
    if (it + 1 < n_iters) load_q_block(it + 1, (it + 1) % 2);
    mma::cp_async_commit();

    const int buf = it % 2;
    const int head = kv_head * p.group + it / m_blocks;
    const int m0 = (m_block_begin + it % m_blocks) * C::kBlockM;
    const T* q_tile = sQ + buf * C::kBlockM * C::kPitch;
    const T* do_tile = sdO + buf * C::kBlockM * C::kPitch;
    const float* lse2 = sLse2 + buf * C::kBlockM;
    const float* delta = sDelta + buf * C::kBlockM;

    // dP^T = V dO^T: the warp's 16 keys x kBlockM queries. Element e of m-tile mt is key
    // kw + g + 8 * (e / 2), query mt * 8 + 2t + e % 2 (both local to the tile); S^T below too.
    float ds_t[C::kMTiles][4] = {};
#pragma unroll
    for (int kc = 0; kc < C::kDChunks; ++kc) {
      uint32_t a[4];
      mma::load_a(a, sV, C::kPitch, kw, kc * 16, lane);
#pragma unroll
      for (int mt = 0; mt < C::kMTiles; mt += 2) {
        uint32_t b0[2], b1[2];
        mma::load_b_pair_nk(b0, b1, do_tile, C::kPitch, mt * 8, kc * 16, lane);
        mma::mma_16x8x16<T>(ds_t[mt], a, b0);
        mma::mma_16x8x16<T>(ds_t[mt + 1], a, b1);
      }
    }

    // S^T = K Q^T.
    float p_t[C::kMTiles][4] = {};
#pragma unroll
    for (int kc = 0; kc < C::kDChunks; ++kc) {
      uint32_t a[4];
      mma::load_a(a, sK, C::kPitch, kw, kc * 16, lane);
#pragma unroll
      for (int mt = 0; mt < C::kMTiles; mt += 2) {
        uint32_t b0[2], b1[2];
        mma::load_b_pair_nk(b0, b1, q_tile, C::kPitch, mt * 8, kc * 16, lane);
        mma::mma_16x8x16<T>(p_t[mt], a, b0);
        mma::mma_16x8x16<T>(p_t[mt + 1], a, b1);
      }
    }

    // P^T (masked) and dS^T = P^T * (dP^T - delta) [* (1 - t^2) under softcap], in place.
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

    // dV += P^T dO.
#pragma unroll
    for (int kc = 0; kc < C::kMChunks; ++kc) {
      uint32_t a[4];
      mma::pack_a_from_acc<T>(a, p_t[2 * kc], p_t[2 * kc + 1]);
#pragma unroll
      for (int dt = 0; dt < C::kDTiles; dt += 2) {
        uint32_t b0[2], b1[2];
        mma::load_b_pair_kn(b0, b1, do_tile, C::kPitch, kc * 16, dt * 8, lane);
        mma::mma_16x8x16<T>(dv_acc[dt], a, b0);
        mma::mma_16x8x16<T>(dv_acc[dt + 1], a, b1);
      }
    }

    // dK += dS^T Q.
#pragma unroll
    for (int kc = 0; kc < C::kMChunks; ++kc) {
      uint32_t a[4];
      mma::pack_a_from_acc<T>(a, ds_t[2 * kc], ds_t[2 * kc + 1]);
#pragma unroll
      for (int dt = 0; dt < C::kDTiles; dt += 2) {
        uint32_t b0[2], b1[2];
        mma::load_b_pair_kn(b0, b1, q_tile, C::kPitch, kc * 16, dt * 8, lane);
        mma::mma_16x8x16<T>(dk_acc[dt], a, b0);
        mma::mma_16x8x16<T>(dk_acc[dt + 1], a, b1);
      }
    }

    // dS (queries x keys) to shared memory for dQ = dS K, which needs all 64 keys per row.
#pragma unroll
    for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        sdS[(mt * 8 + 2 * t + e % 2) * C::kDsPitch + kw + g + 8 * (e / 2)] = from_float<T>(ds_t[mt][e]);
    }
    __syncthreads();

    // dQ tile += dS K: warp -> 16 query rows (row_group) x kDqTiles n-tiles of dims (dim_split).
    const int row_group = warp % C::kRowGroups;
    const int dim0 = (warp / C::kRowGroups) * C::kDqTiles * 8;
    float dq_acc[C::kDqTiles][4] = {};
#pragma unroll
    for (int kc = 0; kc < C::kBlockN / 16; ++kc) {
      uint32_t a[4];
      mma::load_a(a, sdS, C::kDsPitch, row_group * 16, kc * 16, lane);
#pragma unroll
      for (int nt = 0; nt < C::kDqTiles; ++nt) {
        uint32_t bf[2];
        mma::load_b_kn(bf, sK, C::kPitch, kc * 16, dim0 + nt * 8, lane);
        mma::mma_16x8x16<T>(dq_acc[nt], a, bf);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + row_group * 16 + g + 8 * r;
      if (row >= seq.len_q) continue;
      float* dq_row = p.dq_accum + offset(p.dq_strides, b, seq.start_q, row, head) + dim0 + 2 * t;
#pragma unroll
      for (int nt = 0; nt < C::kDqTiles; ++nt) {
        atomicAdd(dq_row + nt * 8, dq_acc[nt][2 * r]);
        atomicAdd(dq_row + nt * 8 + 1, dq_acc[nt][2 * r + 1]);
      }
    }
  }
  mma::cp_async_wait<0>();

  // Store the warp's 16 rows of dK (scaled) and dV; dk/dv are allocated contiguous, so each
  // pair of adjacent elements is 4-byte aligned.
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

}  // namespace

template <typename T, int D>
bool launch_backward_tc(const AttentionParams& p, int batch, int n_kv_heads, cudaStream_t stream) {
  using C = BwdConfig<D>;
  const size_t smem_bytes = C::kSmemElems * sizeof(T) + 4 * C::kBlockM * sizeof(float);
  if (!smem_fits(smem_bytes)) return false;
  auto kernel = attention_backward_tc_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seq_k, C::kBlockN)), n_kv_heads, batch);
  if (grid_empty(grid)) return true;
  kernel<<<grid, C::kThreads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
void launch_backward_delta(const AttentionParams& p, int batch, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seq_q, kDeltaWarps)), p.n_q_heads, batch);
  if (grid_empty(grid)) return;
  attention_backward_delta_kernel<T><<<grid, kDeltaWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define LLAMA_EXT_INSTANTIATE_BWD(T)                                                \
  template bool launch_backward_tc<T, 32>(const AttentionParams&, int, int, cudaStream_t);  \
  template bool launch_backward_tc<T, 64>(const AttentionParams&, int, int, cudaStream_t);  \
  template bool launch_backward_tc<T, 80>(const AttentionParams&, int, int, cudaStream_t);  \
  template bool launch_backward_tc<T, 96>(const AttentionParams&, int, int, cudaStream_t);  \
  template bool launch_backward_tc<T, 128>(const AttentionParams&, int, int, cudaStream_t);
LLAMA_EXT_INSTANTIATE_BWD(__half)
LLAMA_EXT_INSTANTIATE_BWD(__nv_bfloat16)
#undef LLAMA_EXT_INSTANTIATE_BWD

template void launch_backward_delta<float>(const AttentionParams&, int, cudaStream_t);
template void launch_backward_delta<__half>(const AttentionParams&, int, cudaStream_t);
template void launch_backward_delta<__nv_bfloat16>(const AttentionParams&, int, cudaStream_t);

}  // namespace llama_ext::cuda::attention
