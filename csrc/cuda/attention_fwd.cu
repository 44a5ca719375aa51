// Grouped-query attention forward on tensor cores (fp16 / bf16), FlashAttention-2 style.
//
// Algorithm. One CTA owns kBlockM query rows of one (sequence, query head); each of its
// kBlockM / 16 warps owns 16 rows. The CTA streams the K/V tiles of the head's kv head
// (h / group: K and V are read in place, never repeated) through shared memory, kBlockN keys
// at a time, double-buffered with cp.async so tile j + 1 lands while tile j is multiplied:
//   S = Q K_j^T            mma.sync m16n8k16, Q fragments in registers (D <= 128), K via ldmatrix
//   online softmax         fp32, base 2: s * scale * log2(e), running row max m and sum l, the
//                          old O rescaled by exp2(m_old - m_new)
//   O += P V_j             P converted from the S accumulators straight into A fragments
//                          (no shared-memory round trip), V via ldmatrix.trans
// At the end O / l is written and lse = (m + log2 l) * ln 2. Key tiles outside every row's
// causal / sliding window are never loaded (the key loop runs from the tile holding the first
// row's first key to the last row's last key); only tiles crossing the diagonal, a window
// edge or the key tail pay for per-element masking, against each row's [begin, end) computed
// once per CTA. With a logit softcap the fp32 scores become softcap tanh(s / softcap) (in
// base 2, attention_common.cuh) before masking. Query/key tails are zero-filled by the loads
// and masked, so any sequence length works.
//
// Tiles. D <= 128: kBlockM = 128 (8 warps), kBlockN = 64, Q in registers (D / 16 x 4 regs);
// D = 256: kBlockM = 64 (4 warps), kBlockN = 32, Q fragments re-read from shared memory to
// leave registers for the 16 x 256 fp32 O accumulator. Shared memory: Q + 2 x (K + V) tiles,
// rows padded by 16 bytes (conflict-free ldmatrix): 102 KB at D = 128, 99 KB at D = 256.
//
// Cost. 4 * s_q * s_k * D FLOPs per head (halved causal), all on tensor cores; global traffic
// is Q and O once plus K and V once per CTA: each key costs 2 * D * 2 bytes (its K and V rows,
// 16-bit) and brings 4 * kBlockM * D FLOPs, i.e. kBlockM FLOPs per byte of K/V read (128, or 64
// at D = 256; L2 serves the repeats across the CTAs of a head group): compute-bound on
// A100/H100, and the [s_q, s_k] score matrix never exists in memory.
#include "attention_launch.cuh"

namespace llama_ext::cuda::attention {
namespace {

template <int D>
struct FwdConfig {
  static constexpr int kBlockM = D <= 128 ? 128 : 64;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr bool kQInRegisters = D <= 128;
  static constexpr int kPitch = smem_pitch<D>();
  static constexpr int kDTiles = D / 8;   // n-tiles of O (8 dims each)
  static constexpr int kDChunks = D / 16;  // k-chunks of Q K^T (16 dims each)
  static constexpr int kNTiles = kBlockN / 8;   // n-tiles of S (8 keys each)
  static constexpr int kNChunks = kBlockN / 16;  // k-chunks of P V (16 keys each)
  static constexpr int kSmemElems = (kBlockM + 4 * kBlockN) * kPitch;  // Q, K[2], V[2]
  static_assert(D % 16 == 0 && kBlockN % 16 == 0 && kBlockM % 16 == 0, "tiles are whole mma shapes");
  static_assert(kDTiles % 2 == 0 && kNTiles % 2 == 0, "B fragments are loaded in n-tile pairs");
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdConfig<D>::kThreads)
    attention_forward_tc_kernel(const AttentionParams p) {
  using C = FwdConfig<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + C::kBlockM * C::kPitch;     // [2][kBlockN][kPitch]
  T* sV = sK + 2 * C::kBlockN * C::kPitch;  // [2][kBlockN][kPitch]

  const int b = blockIdx.z;
  const int head = blockIdx.y;
  const Seq seq = sequence(p, b);
  // Highest query blocks first: under a causal mask they have the most keys, and launching
  // them early lets the short low blocks fill the last wave instead of trailing it.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * C::kBlockM;
  if (m0 >= seq.len_q) return;  // varlen: this sequence is shorter than max_seqlen_q
  const int kv_head = head / p.group;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  const T* q = static_cast<const T*>(p.q) + offset(p.q_strides, b, seq.start_q, m0, head);
  const T* k = static_cast<const T*>(p.k) + offset(p.k_strides, b, seq.start_k, 0, kv_head);
  const T* v = static_cast<const T*>(p.v) + offset(p.v_strides, b, seq.start_k, 0, kv_head);

  const int rows_end = min(m0 + C::kBlockM, seq.len_q);
  const int first_key_block = key_begin(m0, seq, p.window) / C::kBlockN;
  const int n_key_blocks = max(0, tiles_of(key_end(rows_end - 1, seq, p.window), C::kBlockN) - first_key_block);

  auto load_kv = [&](int it, int buf) {
    const int block = first_key_block + it;
    const int n0 = block * C::kBlockN;
    load_tile<T, D, C::kBlockN, C::kThreads>(sK + buf * C::kBlockN * C::kPitch, k + n0 * p.k_strides.row,
                                             p.k_strides.row, seq.len_k - n0, p.aligned16);
    load_tile<T, D, C::kBlockN, C::kThreads>(sV + buf * C::kBlockN * C::kPitch, v + n0 * p.v_strides.row,
                                             p.v_strides.row, seq.len_k - n0, p.aligned16);
  };
  load_tile<T, D, C::kBlockM, C::kThreads>(sQ, q, p.q_strides.row, seq.len_q - m0, p.aligned16);
  if (n_key_blocks > 0) load_kv(0, 0);
  mma::cp_async_commit();

  // This thread's two rows of every 16-row fragment: g and g + 8 of the warp's 16.
  const int row0 = m0 + warp * 16 + g;
  const int rows[2] = {row0, row0 + 8};
  float o_acc[C::kDTiles][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // base-2 scaled scores
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sums (its 2 of 8 columns per n-tile)
  const int key_lo[2] = {key_begin(rows[0], seq, p.window), key_begin(rows[1], seq, p.window)};
  const int key_hi[2] = {key_end(rows[0], seq, p.window), key_end(rows[1], seq, p.window)};
  uint32_t q_frag[C::kQInRegisters ? C::kDChunks : 1][4];

  for (int it = 0; it < n_key_blocks; ++it) {
    mma::cp_async_wait<0>();
    __syncthreads();  // tile `it` is visible to all; everyone is done with buffer (it + 1) % 2
    if (C::kQInRegisters && it == 0) {
#pragma unroll
      for (int kc = 0; kc < (C::kQInRegisters ? C::kDChunks : 0); ++kc)
        mma::load_a(q_frag[kc], sQ, C::kPitch, warp * 16, kc * 16, lane);
    }
    if (it + 1 < n_key_blocks) load_kv(it + 1, (it + 1) % 2);
    mma::cp_async_commit();

    const T* k_tile = sK + (it % 2) * C::kBlockN * C::kPitch;
    const T* v_tile = sV + (it % 2) * C::kBlockN * C::kPitch;
    const int n0 = (first_key_block + it) * C::kBlockN;

    // S = Q K^T for the warp's 16 rows x kBlockN keys.
    float s[C::kNTiles][4] = {};
#pragma unroll
    for (int kc = 0; kc < C::kDChunks; ++kc) {
      uint32_t a[4];
      if constexpr (C::kQInRegisters) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = q_frag[kc][i];
      } else {
        mma::load_a(a, sQ, C::kPitch, warp * 16, kc * 16, lane);
      }
#pragma unroll
      for (int nt = 0; nt < C::kNTiles; nt += 2) {
        uint32_t b0[2], b1[2];
        mma::load_b_pair_nk(b0, b1, k_tile, C::kPitch, nt * 8, kc * 16, lane);
        mma::mma_16x8x16<T>(s[nt], a, b0);
        mma::mma_16x8x16<T>(s[nt + 1], a, b1);
      }
    }

    // Scale into base 2, cap, and mask. Accumulator element e of n-tile nt is row rows[e / 2],
    // key n0 + nt * 8 + 2t + e % 2.
    const bool masked = tile_needs_mask(m0, C::kBlockM, n0, C::kBlockN, seq, p.window);
#pragma unroll
    for (int nt = 0; nt < C::kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = capped_score(s[nt][e] * p.scale_log2, p);
        const int key = n0 + nt * 8 + 2 * t + e % 2;
        if (masked && (key < key_lo[e / 2] || key >= key_hi[e / 2])) s[nt][e] = -INFINITY;
      }
    }

    // Online softmax. A row's 8 * kNTiles columns are spread over the 4 lanes of a quad.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < C::kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row that has seen no visible key yet keeps max -inf; subtract 0 instead so that
      // exp2 gives 0 for its (masked) scores rather than NaN.
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(row_max[r] - base);  // 0 on the first visible tile
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < C::kNTiles; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < C::kDTiles; ++dt) {
        o_acc[dt][2 * r] *= alpha;
        o_acc[dt][2 * r + 1] *= alpha;
      }
    }

    // O += P V: k-chunk kc of P is the S accumulators of n-tiles 2kc and 2kc + 1.
#pragma unroll
    for (int kc = 0; kc < C::kNChunks; ++kc) {
      uint32_t a[4];
      mma::pack_a_from_acc<T>(a, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
      for (int dt = 0; dt < C::kDTiles; dt += 2) {
        uint32_t b0[2], b1[2];
        mma::load_b_pair_kn(b0, b1, v_tile, C::kPitch, kc * 16, dt * 8, lane);
        mma::mma_16x8x16<T>(o_acc[dt], a, b0);
        mma::mma_16x8x16<T>(o_acc[dt + 1], a, b1);
      }
    }
  }
  mma::cp_async_wait<0>();  // nothing may be in flight when the CTA exits

  // Normalize and store. Rows that saw no key (causal with len_q > len_k, an empty window, or len_k = 0) have
  // row_sum 0: they get output 0 and lse 0.
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (rows[r] >= seq.len_q) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    T* out_row = out + offset(p.out_strides, b, seq.start_q, rows[r], head);
#pragma unroll
    for (int dt = 0; dt < C::kDTiles; ++dt) {
      // Two adjacent elements; out is allocated contiguous, so the pair is 4-byte aligned.
      *reinterpret_cast<uint32_t*>(out_row + dt * 8 + 2 * t) =
          mma::pack2<T>(o_acc[dt][2 * r] * inv, o_acc[dt][2 * r + 1] * inv);
    }
    if (t == 0) {
      p.lse[lse_offset(p, b, seq, rows[r], head)] = sum > 0.f ? (row_max[r] + __log2f(sum)) * 0.69314718055994531f : 0.f;
    }
  }
}

}  // namespace

template <typename T, int D>
bool launch_forward_tc(const AttentionParams& p, int batch, cudaStream_t stream) {
  using C = FwdConfig<D>;
  const size_t smem_bytes = C::kSmemElems * sizeof(T);
  if (!smem_fits(smem_bytes)) return false;
  auto kernel = attention_forward_tc_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seq_q, C::kBlockM)), p.n_q_heads, batch);
  if (grid_empty(grid)) return true;
  kernel<<<grid, C::kThreads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

#define LLAMA_EXT_INSTANTIATE_FWD(T)                                          \
  template bool launch_forward_tc<T, 32>(const AttentionParams&, int, cudaStream_t);  \
  template bool launch_forward_tc<T, 64>(const AttentionParams&, int, cudaStream_t);  \
  template bool launch_forward_tc<T, 80>(const AttentionParams&, int, cudaStream_t);  \
  template bool launch_forward_tc<T, 96>(const AttentionParams&, int, cudaStream_t);  \
  template bool launch_forward_tc<T, 128>(const AttentionParams&, int, cudaStream_t); \
  template bool launch_forward_tc<T, 256>(const AttentionParams&, int, cudaStream_t);
LLAMA_EXT_INSTANTIATE_FWD(__half)
LLAMA_EXT_INSTANTIATE_FWD(__nv_bfloat16)
#undef LLAMA_EXT_INSTANTIATE_FWD

}  // namespace llama_ext::cuda::attention
