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
// At the end O / l is written and lse = (m + log2 l) * ln 2. Causal tiles past the diagonal
// are never loaded (the key loop stops at the last visible key of the CTA's last row); only
// tiles crossing the diagonal or the key tail pay for per-element masking. Query/key tails
// are zero-filled by the loads and masked, so any sequence length works.
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
//
// Resources (ptxas -v, CUDA 13.0; no spills). Registers, dynamic shared memory and the CTAs per
// SM they allow (sm_80: 64K registers, 164 KB; sm_90: 64K, 228 KB):
//   D      threads   registers sm_80 / sm_90   shared memory   CTAs per SM sm_80 / sm_90
//   32     256       105 / 106                 30 KB           2 / 2
//   64     256       128 / 125                 54 KB           2 / 2
//   80     256       128 / 128                 66 KB           2 / 2
//   96     256       166 / 169                 78 KB           1 / 1
//   128    256       197 / 197                 102 KB          1 / 1
//   256    128       234 / 234                 99 KB           1 / 2
#include "attention_launch.cuh"

namespace llama_ext::cuda::attention {
namespace {

template <int D>
struct FwdConfig {
  static constexpr int kD = D;
  static constexpr int kBlockM = D <= 128 ? 128 : 64;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  // Two CTAs per SM up to D = 80: ptxas must then fit 65536 / (2 * 256) = 128 registers. At
  // D = 96 that bound spills (40 bytes), so D = 96 keeps one CTA per SM (166-169 registers).
  static constexpr int kMinCtasPerSm = D <= 80 ? 2 : 1;
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

// The online-softmax state of this thread's two rows of the warp's 16 (rows g and g + 8), in
// base 2: the running max of the scaled scores and this thread's share of the running sum (its
// 2 of every 8 columns; the other 3 lanes of its quad hold the rest).
struct SoftmaxRows {
  float max[2];
  float sum[2];
};

// Stage: load key/value tile `block` (kBlockN keys from key block * kBlockN) into buffer `buf`;
// keys past the sequence are zero-filled.
template <typename T, typename C>
__device__ __forceinline__ void load_kv_tile(T* sK, T* sV, const T* k, const T* v, const AttentionParams& p,
                                             const Seq& seq, int block, int buf) {
  const int n0 = block * C::kBlockN;
  load_tile<T, C::kD, C::kBlockN, C::kThreads>(sK + buf * C::kBlockN * C::kPitch, k + n0 * p.k_strides.row,
                                               p.k_strides.row, seq.len_k - n0, p.aligned16);
  load_tile<T, C::kD, C::kBlockN, C::kThreads>(sV + buf * C::kBlockN * C::kPitch, v + n0 * p.v_strides.row,
                                               p.v_strides.row, seq.len_k - n0, p.aligned16);
}

// Stage: S = Q K^T for the warp's 16 rows x kBlockN keys (fp32 accumulators, unscaled).
template <typename T, typename C, typename QSource>
__device__ __forceinline__ void score_tile(float (&s)[C::kNTiles][4], const QSource& q, const T* k_tile, int lane) {
#pragma unroll
  for (int nt = 0; nt < C::kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
  }
  mma::warp_gemm_nk<T, C::kDChunks, C::kNTiles>(s, q, k_tile, C::kPitch, 0, lane);
}

// Stage: scale into base 2 and, on tiles that cross the causal diagonal or the key tail, set
// invisible scores to -inf. Accumulator element e of n-tile nt is row rows[e / 2], key
// n0 + nt * 8 + 2t + e % 2.
template <typename C>
__device__ __forceinline__ void scale_and_mask(float (&s)[C::kNTiles][4], const AttentionParams& p, const Seq& seq,
                                               const int (&rows)[2], int n0, bool masked, int t) {
#pragma unroll
  for (int nt = 0; nt < C::kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] *= p.scale_log2;
      if (masked && !key_visible(rows[e / 2], n0 + nt * 8 + 2 * t + e % 2, seq, p.causal)) s[nt][e] = -INFINITY;
    }
  }
}

// Stage: online softmax. Turns the scaled scores into probabilities exp2(s - max), updates each
// row's max and sum, and rescales the row's output accumulators by exp2(old max - new max). A
// row's 8 * kNTiles columns are spread over the 4 lanes of a quad.
template <typename C>
__device__ __forceinline__ void online_softmax(float (&s)[C::kNTiles][4], SoftmaxRows& rows,
                                               float (&o_acc)[C::kDTiles][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = rows.max[r];
#pragma unroll
    for (int nt = 0; nt < C::kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // A row that has seen no visible key yet keeps max -inf; subtract 0 instead so that
    // exp2 gives 0 for its (masked) scores rather than NaN.
    const float base = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(rows.max[r] - base);  // 0 on the first visible tile
    rows.max[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < C::kNTiles; ++nt) {
      s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
      s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    rows.sum[r] = rows.sum[r] * alpha + sum;
#pragma unroll
    for (int dt = 0; dt < C::kDTiles; ++dt) {
      o_acc[dt][2 * r] *= alpha;
      o_acc[dt][2 * r + 1] *= alpha;
    }
  }
}

// Stage: O += P V. k-chunk kc of P is the accumulators of n-tiles 2kc and 2kc + 1 of S, rounded
// to T in registers.
template <typename T, typename C>
__device__ __forceinline__ void accumulate_pv(float (&o_acc)[C::kDTiles][4], const float (&s)[C::kNTiles][4],
                                              const T* v_tile, int lane) {
  mma::warp_gemm_kn<T, C::kNChunks, C::kDTiles>(o_acc, mma::AAccumulators<T, C::kNTiles>{s}, v_tile, C::kPitch, 0,
                                                lane);
}

// Stage: write O / l and lse = (max + log2 l) * ln 2 of this thread's rows. Rows that saw no key
// (causal with len_q > len_k, or len_k = 0) have l = 0: they get output 0 and lse 0, written as
// such, since their O may hold 0 * Inf = NaN from a non-finite V row of a tile they shared. The
// sequence's offsets are read again here rather than kept live in registers across the key loop.
template <typename T, typename C>
__device__ __forceinline__ void write_back(const float (&o_acc)[C::kDTiles][4], const SoftmaxRows& rows_state,
                                           const AttentionParams& p, int b, int head, const int (&rows)[2], int t) {
  const Seq seq = sequence(p, b);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = rows_state.sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (rows[r] >= seq.len_q) continue;
    const bool saw_keys = sum != 0.f;  // NaN too: a NaN score makes the row NaN
    const float inv = 1.f / sum;
    T* out_row = out + offset(p.out_strides, b, seq.start_q, rows[r], head);
#pragma unroll
    for (int dt = 0; dt < C::kDTiles; ++dt) {
      // Two adjacent elements; out is allocated contiguous, so the pair is 4-byte aligned.
      *reinterpret_cast<uint32_t*>(out_row + dt * 8 + 2 * t) =
          saw_keys ? mma::pack2<T>(o_acc[dt][2 * r] * inv, o_acc[dt][2 * r + 1] * inv) : 0u;
    }
    if (t == 0) {
      p.lse[lse_offset(p, b, seq, rows[r], head)] = saw_keys ? (rows_state.max[r] + __log2f(sum)) * kLn2 : 0.f;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(FwdConfig<D>::kThreads, FwdConfig<D>::kMinCtasPerSm)
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
  const int n_key_blocks = tiles_of(key_end(rows_end, seq, p.causal), C::kBlockN);

  load_tile<T, D, C::kBlockM, C::kThreads>(sQ, q, p.q_strides.row, seq.len_q - m0, p.aligned16);
  if (n_key_blocks > 0) load_kv_tile<T, C>(sK, sV, k, v, p, seq, 0, 0);
  mma::cp_async_commit();

  // This thread's two rows of every 16-row fragment: g and g + 8 of the warp's 16.
  const int row0 = m0 + warp * 16 + g;
  const int rows[2] = {row0, row0 + 8};
  float o_acc[C::kDTiles][4] = {};
  SoftmaxRows state{{-INFINITY, -INFINITY}, {0.f, 0.f}};
  uint32_t q_frag[C::kQInRegisters ? C::kDChunks : 1][4];

  for (int block = 0; block < n_key_blocks; ++block) {
    mma::cp_async_wait<0>();
    __syncthreads();  // tile `block` is visible to all; everyone is done with buffer (block + 1) % 2
    if constexpr (C::kQInRegisters) {
      if (block == 0) {
#pragma unroll
        for (int kc = 0; kc < C::kDChunks; ++kc) mma::load_a(q_frag[kc], sQ, C::kPitch, warp * 16, kc * 16, lane);
      }
    }
    if (block + 1 < n_key_blocks) load_kv_tile<T, C>(sK, sV, k, v, p, seq, block + 1, (block + 1) % 2);
    mma::cp_async_commit();

    const T* k_tile = sK + (block % 2) * C::kBlockN * C::kPitch;
    const T* v_tile = sV + (block % 2) * C::kBlockN * C::kPitch;
    const int n0 = block * C::kBlockN;

    float s[C::kNTiles][4];
    if constexpr (C::kQInRegisters) {
      score_tile<T, C>(s, mma::ARegisters<C::kDChunks>{q_frag}, k_tile, lane);
    } else {
      score_tile<T, C>(s, mma::ATileRows<T>{sQ, C::kPitch, warp * 16}, k_tile, lane);
    }
    scale_and_mask<C>(s, p, seq, rows, n0, tile_needs_mask(m0, n0, C::kBlockN, seq, p.causal), t);
    online_softmax<C>(s, state, o_acc);
    accumulate_pv<T, C>(o_acc, s, v_tile, lane);
  }
  mma::cp_async_wait<0>();  // nothing may be in flight when the CTA exits
  write_back<T, C>(o_acc, state, p, b, head, rows, t);
}

template <typename T, int D>
bool launch_forward_kernel(const AttentionParams& p, cudaStream_t stream) {
  using C = FwdConfig<D>;
  const size_t smem_bytes = C::kSmemElems * sizeof(T);
  if (!smem_fits(smem_bytes)) return false;
  auto kernel = attention_forward_tc_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seq_q, C::kBlockM)), p.n_q_heads, p.batch);
  if (grid_empty(grid)) return true;
  kernel<<<grid, C::kThreads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace

template <typename T>
bool launch_forward_tc(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_head_dim(p.head_dim, [&](auto d) { return launch_forward_kernel<T, decltype(d)::value>(p, stream); });
}

#define LLAMA_EXT_INSTANTIATE_FWD(T) template bool launch_forward_tc<T>(const AttentionParams&, cudaStream_t);
LLAMA_EXT_ATTENTION_TC_TYPES(LLAMA_EXT_INSTANTIATE_FWD)
#undef LLAMA_EXT_INSTANTIATE_FWD

}  // namespace llama_ext::cuda::attention
