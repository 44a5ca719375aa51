// Grouped-query attention backward on tensor cores (fp16 / bf16), FlashAttention-2 style,
// plus the delta pre-kernel shared with the SIMT path.
//
// Algorithm. With P = softmax(scale * Q K^T) recomputed from the forward's lse,
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  delta_i = rowsum(dO_i * O_i),
//   dQ = scale * dS K,  dK = scale * dS^T Q.
// A pre-kernel computes delta (fp32, lse's layout). Then one CTA owns kBlockN keys of one
// (sequence, kv head) and a share of the kv head's query heads (the group split, below), in
// 16-key slices, and keeps the slices' dK and dV rows in fp32 registers for the whole kernel.
// It walks each of its query heads' query blocks that can see one of its keys (from the first
// query whose causal / sliding window reaches key n0 to the last whose window starts before
// the block's end; the others are never loaded), streaming Q and dO tiles (kBlockM queries)
// through shared memory with cp.async. Per tile, on tensor cores (mma.sync m16n8k16, fp32
// accumulate):
//   dP^T = V dO^T
//   S^T  = K Q^T     -> P^T = exp2(S^T * scale * log2 e - lse * log2 e), masked,
//                       dS^T = P^T * (dP^T - delta)
//   dV  += P^T dO    (P^T straight from the accumulators into A fragments)
//   dK  += dS^T Q
// With a logit softcap, S^T is capped (t = tanh(S^T scale / softcap), capped score softcap t)
// before the exp2 and dS^T is multiplied by the cap's derivative 1 - t^2.
//   dS^T goes to shared memory as dS, then dQ_tile = dS K is added to an fp32 workspace with
//   atomicAdd (the standard FA2 choice: CTAs of different key blocks add into the same dQ
//   rows, so dQ's summation order, and its last bits, can vary run to run; dK and dV are
//   deterministic). The caller scales the workspace by `scale` and casts it to dQ's dtype.
//
// Two warp plans (BwdConfig::kSplitRoles):
//   * one warp per slice (D <= 128): the warp computes all of the above for its 16 keys and
//     holds dK and dV (2 x D / 2 fp32 registers per lane). dP^T is computed first, so the
//     softcap's tanh lives only within the one elementwise pass that makes P^T and dS^T.
//     Q and dO are double-buffered: tile i + 1 loads while tile i is multiplied.
//   * two warps per slice (D = 256, whose dK + dV would need 256 registers per lane): the
//     "probabilities" warp computes S^T and P^T, stores P^T (1 - t^2) in fp32 to shared memory
//     and holds dV += P^T dO; the "gradients" warp computes dP^T, then dS^T from the stored
//     P^T (1 - t^2), and holds dK += dS^T Q. Each does two of the four per-slice products and
//     holds D / 2 accumulator registers; all warps share dQ. Q and dO are single-buffered
//     (shared memory): the next tile loads while dQ is computed.
// Each configuration lists its shared memory; the launcher takes the first configuration of a
// head dim that the device's opt-in shared memory per block holds (BwdConfigs), so ~100 KB
// GPUs (sm_86/89/120) run D = 256 on 32-key blocks, and only a device holding none of them
// falls back to the SIMT path.
//
// Grid. One-dimensional, (key block, sequence, kv head, group split) with the key block
// slowest: under a causal mask the low key blocks see the most queries, so the heaviest CTAs
// start first and the light ones fill the last wave. When the (key block, sequence, kv head)
// CTAs alone make fewer than kMinWaves waves (short sequences, few kv heads), each kv head's
// group of query heads is split over `splits` CTAs (the smallest divisor of the group that
// reaches kMinWaves, else the whole group): each writes its dK, dV partial sums (fp32) to its
// own slice of a workspace, and the launcher sums the slices in split order and casts them
// to dK, dV: deterministic, with K and V read once per split. E.g. batch 1 x 8 kv heads x
// 32 query heads x seq 8192 at D = 128: 64 key blocks x 8 = 512 CTAs, under 4 waves of the
// 132 CTAs an H100 / H200 holds (one per SM), so the group is split in 2: 1024 CTAs of 2 query
// heads.
//
// Cost. 2.5x the forward's FLOPs (5 GEMMs of s_q * s_k * D instead of 2), all on tensor
// cores; global traffic is K and V once per split, Q, dO, lse, delta once per key block, and
// the fp32 dQ atomics (s_q * D * 4 bytes per key block), plus 2 x splits x 4 bytes per dK / dV
// element written and read again when the group is split.
//
// Resources (ptxas -v, CUDA 13.0; no spills on any built arch). Registers, dynamic shared
// memory, and the CTAs per SM they allow (sm_80: 64K registers, 164 KB; sm_90: 64K, 228 KB;
// sm_86 / 89 / 120: 64K, 100 KB, 99 KB per block):
//   D    keys x queries  warps  Q/dO    registers                     shared    CTAs per SM
//                               buffers sm_80 / 86 / 89 / 90 / 120    memory    sm_80 / 90 / 86, 89, 120
//   32   128 x 64        8      2       213 / 213 / 213 / 227 / 197   58 KB     1 / 1 / 1
//   64   128 x 64        8      2       223 / 223 / 223 / 223 / 235   90 KB     1 / 1 / 1
//   80   64 x 32         4      2       192 / 192 / 192 / 206 / 216   49 KB     2 / 2 / 2
//   96   128 x 32        8      2       205 / 205 / 205 / 224 / 229   87 KB     1 / 1 / 1
//   128  128 x 32        8      2       239 / 239 / 239 / 241 / 248   111 KB    1 / 1 / -
//   128  64 x 32         4      2       244 / 244 / 244 / 244 / 253   73 KB     2 / 2 / 1
//   256  64 x 64         8      1       243 / 243 / 243 / 250 / 238   159.5 KB  1 / 1 / -
//   256  32 x 32         4      1       241 / 241 / 241 / 241 / 243   73.8 KB   - / - / 1
// sm_100 (228 KB, as sm_90): 241, 241, 222, 242, 252, 255, 245 and 246 registers down the table,
// sm_90's CTAs per SM.
// The delta pre-kernel: 29-40 registers, no shared memory.
#include <ATen/ops/empty.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "attention_launch.cuh"

namespace llama_ext::cuda::attention {
namespace {

// A tile configuration: kBlockN keys per CTA in 16-key slices, kBlockM queries per tile, one
// warp per slice or two (kSplitRoles, see the file comment).
template <int D, int BlockN, int BlockM, bool SplitRoles>
struct BwdConfig {
  static constexpr int kD = D;
  static constexpr int kBlockN = BlockN;
  static constexpr int kBlockM = BlockM;
  static constexpr bool kSplitRoles = SplitRoles;
  static constexpr int kSlices = kBlockN / 16;
  static constexpr int kWarps = kSplitRoles ? 2 * kSlices : kSlices;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kQueryBuffers = kSplitRoles ? 1 : 2;
  static constexpr int kPitch = smem_pitch<D>();
  static constexpr int kDsPitch = kBlockN + 8;  // 2 N + 16 bytes = 4 (mod 32) words for N = 32, 64, 128: conflict-free
  // fp32 P^T (1 - t^2) rows [key][query]: 8 (mod 32) words, so the float2 stores and loads of a
  // half-warp (4 keys x 4 query pairs) fall on 32 distinct banks.
  static constexpr int kPPitch = kBlockM + 8;
  static constexpr int kDTiles = D / 8;
  static constexpr int kDChunks = D / 16;
  static constexpr int kMTiles = kBlockM / 8;    // n-tiles of S^T (8 queries each)
  static constexpr int kMChunks = kBlockM / 16;  // k-chunks of P^T dO (16 queries each)
  static constexpr int kRowGroups = kBlockM / 16;            // dQ: 16-row groups of the tile
  static constexpr int kDimSplits = kWarps / kRowGroups;     // dQ: warps sharing one row group
  static constexpr int kDqTiles = kDTiles / kDimSplits;      // dQ: n-tiles per warp
  // Shared memory, in bytes (T is 2 bytes): K, V, Q[buffers], dO[buffers], dS, then fp32
  // P^T (1 - t^2) (two-warp plan only), lse * log2 e [buffers], delta [buffers].
  static constexpr int kTileBytes = (2 * kBlockN + 2 * kQueryBuffers * kBlockM) * kPitch * 2 + kBlockM * kDsPitch * 2;
  static constexpr int kPBytes = kSplitRoles ? kBlockN * kPPitch * 4 : 0;
  static constexpr int kSmemBytes = kTileBytes + kPBytes + 2 * kQueryBuffers * kBlockM * 4;
  static_assert(kTileBytes % 16 == 0, "the fp32 arrays after the tiles stay aligned");
  static_assert(kBlockN % 16 == 0 && kBlockM % 16 == 0, "tiles are whole mma shapes");
  static_assert(kWarps % kRowGroups == 0 && kDTiles % kDimSplits == 0, "dQ work splits evenly over warps");
  static_assert(kDTiles % 2 == 0 && kMTiles % 2 == 0, "B fragments are loaded in n-tile pairs");
};

// The configurations of each head dim, preferred first. One warp per slice keeps dK + dV
// (D fp32 registers per lane) plus S^T and dP^T under 255 registers up to D = 128 with
// kBlockM = 64 for D <= 64, 32 above. Key blocks are 128 keys on 8 warps where the dQ stage's
// n-tiles split evenly over them, as FlashAttention-2's backward: against 64-key blocks that
// halves the dQ atomics and the Q / dO / lse / delta loads per key, with the same per-warp
// work and at least as many warps per SM (one CTA of 8 where two of 4 fitted). D = 128's 128-key
// block needs 111 KB, so ~100 KB GPUs (sm_86/89/120) run its 64-key block; D = 80 (10 dQ n-tiles,
// not a multiple of the 4 dim splits 8 warps give) stays on 64 keys. D = 256 takes two warps
// per slice: 64 x 64 tiles (159.5 KB: sm_80, sm_90), else 32 x 32 (73.8 KB: ~100 KB GPUs).
template <typename... C>
struct BwdConfigList {};
template <int D>
struct BwdConfigs {
  using type = BwdConfigList<BwdConfig<D, 128, D <= 64 ? 64 : 32, false>>;
};
template <>
struct BwdConfigs<80> {
  using type = BwdConfigList<BwdConfig<80, 64, 32, false>>;
};
template <>
struct BwdConfigs<128> {
  using type = BwdConfigList<BwdConfig<128, 128, 32, false>, BwdConfig<128, 64, 32, false>>;
};
template <>
struct BwdConfigs<256> {
  using type = BwdConfigList<BwdConfig<256, 64, 64, true>, BwdConfig<256, 32, 32, true>>;
};

// How a CTA's share of the GQA group is found and where its dK, dV go. With splits == 1 the CTA
// owns the whole group and writes dk, dv (T) itself; otherwise split s of kv head h takes
// query heads h * group + s * heads .. + heads - 1 and writes dK (scaled) and dV in fp32 to
// partial + s * partial_split (dK) and + partial_split / 2 more (dV), dk's strides.
struct GroupSplit {
  int splits;
  int heads;  // group / splits
  float* partial;
  int64_t partial_split;
};

// The query tile of one iteration of a CTA's loop: query head `head`, rows [m0, m0 + kBlockM).
// Iteration `it` takes query head head0 + it / m_blocks and query block m_block_begin + it % m_blocks.
struct QueryTile {
  int head;
  int m0;
};

template <typename C>
__device__ __forceinline__ QueryTile query_tile(int head0, int m_block_begin, int m_blocks, int it) {
  return QueryTile{head0 + it / m_blocks, (m_block_begin + it % m_blocks) * C::kBlockM};
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

// Stage: dP^T = V dO^T for the slice's 16 keys (from kw) x kBlockM queries. Element e of m-tile
// mt is key kw + g + 8 * (e / 2), query mt * 8 + 2t + e % 2 (both local to the tile), as in
// every [kMTiles][4] array below.
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

// Stage: S^T = K Q^T for the slice's 16 keys x kBlockM queries (unscaled).
template <typename T, typename C>
__device__ __forceinline__ void scores_t(float (&s_t)[C::kMTiles][4], const T* sK, const T* q_tile, int kw, int lane) {
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s_t[mt][e] = 0.f;
  }
  mma::warp_gemm_nk<T, C::kDChunks, C::kMTiles>(s_t, mma::ATileRows<T>{sK, C::kPitch, kw}, q_tile, C::kPitch, 0, lane);
}

// One element of P^T from its unscaled score: exp2(capped(s * scale * log2(e)) - lse * log2(e)),
// 0 where the key is invisible to the query; `slope` gets the softcap's derivative 1 - t^2
// (t = tanh(s scale / softcap)), 1 without a cap.
__device__ __forceinline__ float probability(float s, float lse2, bool visible, const AttentionParams& p,
                                             float& slope) {
  const float s2 = s * p.scale_log2;
  float prob;
  slope = 1.f;
  if (p.softcap_log2 > 0.f) {
    const float th = softcap_tanh(s2, p);
    prob = exp2f(p.softcap_log2 * th - lse2);
    slope = 1.f - th * th;
  } else {
    prob = exp2f(s2 - lse2);
  }
  return visible ? prob : 0.f;
}

// Stage (one warp per slice): S^T = K Q^T, then in one elementwise pass P^T and dS^T =
// P^T * (dP^T - delta) * (1 - t^2). ds_t holds dP^T on entry and dS^T on return.
template <typename T, typename C>
__device__ __forceinline__ void probabilities_and_score_grads_t(float (&p_t)[C::kMTiles][4],
                                                                float (&ds_t)[C::kMTiles][4], const T* sK,
                                                                const T* q_tile, const float* lse2, const float* delta,
                                                                const AttentionParams& p, const Seq& seq, int m0,
                                                                int n0, int kw, int lane) {
  const int g = lane / 4, t = lane % 4;
  scores_t<T, C>(p_t, sK, q_tile, kw, lane);
  const bool masked = tile_needs_mask(m0, C::kBlockM, n0, C::kBlockN, seq, p.window);
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int query = mt * 8 + 2 * t + e % 2;
      const int key = kw + g + 8 * (e / 2);
      const bool visible = !masked || key_visible(m0 + query, n0 + key, seq, p.window);
      float slope;
      p_t[mt][e] = probability(p_t[mt][e], lse2[query], visible, p, slope);
      ds_t[mt][e] = p_t[mt][e] * (ds_t[mt][e] - delta[query]) * slope;
    }
  }
}

// Stage (probabilities warp): S^T = K Q^T, then P^T, and P^T (1 - t^2) in fp32 to sP
// [key][query] for the gradients warp of the slice, whose lane l reads what lane l wrote.
template <typename T, typename C>
__device__ __forceinline__ void probabilities_t(float (&p_t)[C::kMTiles][4], float* sP, const T* sK,
                                                const T* q_tile, const float* lse2, const AttentionParams& p,
                                                const Seq& seq, int m0, int n0, int kw, int lane) {
  const int g = lane / 4, t = lane % 4;
  scores_t<T, C>(p_t, sK, q_tile, kw, lane);
  const bool masked = tile_needs_mask(m0, C::kBlockM, n0, C::kBlockN, seq, p.window);
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = kw + g + 8 * r;
      float ps[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int query = mt * 8 + 2 * t + c;
        const bool visible = !masked || key_visible(m0 + query, n0 + key, seq, p.window);
        float slope;
        p_t[mt][2 * r + c] = probability(p_t[mt][2 * r + c], lse2[query], visible, p, slope);
        ps[c] = p_t[mt][2 * r + c] * slope;
      }
      *reinterpret_cast<float2*>(sP + key * C::kPPitch + mt * 8 + 2 * t) = make_float2(ps[0], ps[1]);
    }
  }
}

// Stage (gradients warp): dS^T = P^T (1 - t^2) * (dP^T - delta), P^T (1 - t^2) from sP. ds_t
// holds dP^T on entry and dS^T on return.
template <typename C>
__device__ __forceinline__ void score_grads_t(float (&ds_t)[C::kMTiles][4], const float* sP, const float* delta,
                                              int kw, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int query = mt * 8 + 2 * t;
      const float2 ps = *reinterpret_cast<const float2*>(sP + (kw + g + 8 * r) * C::kPPitch + query);
      ds_t[mt][2 * r] = ps.x * (ds_t[mt][2 * r] - delta[query]);
      ds_t[mt][2 * r + 1] = ps.y * (ds_t[mt][2 * r + 1] - delta[query + 1]);
    }
  }
}

// Stage: dS (queries x keys) to shared memory, rounded to T: dQ = dS K needs all keys of a row.
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

// dQ n-tiles per pass of accumulate_dq: at most 8, for registers. D = 128 on 128-key blocks
// holds 128 dK + dV registers per lane beside an 8-chunk dQ product; there ptxas (CUDA 13.0)
// spills with 4 tiles per pass on sm_120 and with 2 on sm_80 / 90, so sm_120 takes 2. A pass
// groups output columns only: every dQ element sums the same products in the same order.
template <typename C>
__device__ constexpr int dq_pass_tiles() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1200
  if (C::kD == 128 && C::kBlockN == 128) return 2;
#endif
  return C::kDqTiles < 8 ? C::kDqTiles : 8;
}

// Stage: dQ tile += dS K into the fp32 workspace with atomicAdd. Warp w takes 16 query rows
// (row group w % kRowGroups) x kDqTiles n-tiles of dims (from dim0), dq_pass_tiles at a time.
template <typename T, typename C>
__device__ __forceinline__ void accumulate_dq(const T* sdS, const T* sK, const AttentionParams& p, const Seq& seq,
                                              int b, const QueryTile& tile, int warp, int lane) {
  constexpr int kPassTiles = dq_pass_tiles<C>();
  static_assert(C::kDqTiles % kPassTiles == 0, "dQ passes are equal");
  const int g = lane / 4, t = lane % 4;
  const int row_group = warp % C::kRowGroups;
#pragma unroll
  for (int pass = 0; pass < C::kDqTiles / kPassTiles; ++pass) {
    const int dim0 = ((warp / C::kRowGroups) * C::kDqTiles + pass * kPassTiles) * 8;
    float dq_acc[kPassTiles][4] = {};
    mma::warp_gemm_kn<T, C::kBlockN / 16, kPassTiles>(
        dq_acc, mma::ATileRows<T>{sdS, C::kDsPitch, row_group * 16}, sK, C::kPitch, dim0, lane);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = tile.m0 + row_group * 16 + g + 8 * r;
      if (row >= seq.len_q) continue;
      float* dq_row = p.dq_accum + offset(p.dq_strides, b, seq.start_q, row, tile.head) + dim0 + 2 * t;
#pragma unroll
      for (int nt = 0; nt < kPassTiles; ++nt) {
        atomicAdd(dq_row + nt * 8, dq_acc[nt][2 * r]);
        atomicAdd(dq_row + nt * 8 + 1, dq_acc[nt][2 * r + 1]);
      }
    }
  }
}

// Stage: store the slice's 16 rows of one gradient (dK: scale = p.scale; dV: 1), to T in
// `out` (dk or dv) when the CTA owns the whole group, else in fp32 to its split's partial at
// `partial` (same element offsets: dk and dv are allocated contiguous with k's shape, so
// each pair of adjacent elements is 4-byte aligned in T and 8-byte aligned in fp32). The
// sequence's offsets are read again here rather than kept live in registers across the loop.
template <typename T, typename C>
__device__ __forceinline__ void write_back_grad(const float (&acc)[C::kDTiles][4], void* out, float* partial,
                                                float scale, const AttentionParams& p, int b, int kv_head, int n0,
                                                int kw, int lane) {
  const Seq seq = sequence(p, b);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + kw + g + 8 * r;
    if (key >= seq.len_k) continue;
    const int64_t row = offset(p.dk_strides, b, seq.start_k, key, kv_head);
#pragma unroll
    for (int dt = 0; dt < C::kDTiles; ++dt) {
      const float lo = acc[dt][2 * r] * scale, hi = acc[dt][2 * r + 1] * scale;
      if (partial != nullptr) {
        *reinterpret_cast<float2*>(partial + row + dt * 8 + 2 * t) = make_float2(lo, hi);
      } else {
        *reinterpret_cast<uint32_t*>(static_cast<T*>(out) + row + dt * 8 + 2 * t) = mma::pack2<T>(lo, hi);
      }
    }
  }
}

template <typename T, typename C>
__global__ void __launch_bounds__(C::kThreads, 1) attention_backward_tc_kernel(const AttentionParams p,
                                                                               const GroupSplit split) {
  static_assert(sizeof(T) == 2, "tensor-core element types are 16-bit");
  constexpr int D = C::kD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + C::kBlockN * C::kPitch;
  T* sQ = sV + C::kBlockN * C::kPitch;                          // [kQueryBuffers][kBlockM][kPitch]
  T* sdO = sQ + C::kQueryBuffers * C::kBlockM * C::kPitch;      // [kQueryBuffers][kBlockM][kPitch]
  T* sdS = sdO + C::kQueryBuffers * C::kBlockM * C::kPitch;     // [kBlockM][kDsPitch]
  float* sP = reinterpret_cast<float*>(smem_raw + C::kTileBytes);  // [kBlockN][kPPitch], two-warp plan
  float* sLse2 = sP + C::kPBytes / 4;                           // [kQueryBuffers][kBlockM], lse * log2 e
  float* sDelta = sLse2 + C::kQueryBuffers * C::kBlockM;        // [kQueryBuffers][kBlockM]

  // blockIdx.x = ((key block * batch + b) * n_kv_heads + kv_head) * splits + s: key blocks slowest.
  const int per_key_block = p.batch * p.n_kv_heads * split.splits;
  const int key_block = blockIdx.x / per_key_block;
  int rest = blockIdx.x % per_key_block;
  const int s = rest % split.splits;
  rest /= split.splits;
  const int kv_head = rest % p.n_kv_heads;
  const int b = rest / p.n_kv_heads;
  const Seq seq = sequence(p, b);
  const int n0 = key_block * C::kBlockN;
  if (n0 >= seq.len_k) return;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int head0 = kv_head * p.group + s * split.heads;

  const T* k = static_cast<const T*>(p.k) + offset(p.k_strides, b, seq.start_k, n0, kv_head);
  const T* v = static_cast<const T*>(p.v) + offset(p.v_strides, b, seq.start_k, n0, kv_head);
  load_tile<T, D, C::kBlockN, C::kThreads>(sK, k, p.k_strides.row, seq.len_k - n0, p.aligned16);
  load_tile<T, D, C::kBlockN, C::kThreads>(sV, v, p.v_strides.row, seq.len_k - n0, p.aligned16);

  // Query blocks that can see a key of this block: from the first query whose window reaches
  // key n0 to the last whose window starts before n0 + kBlockN.
  const int m_block_begin = first_query_reaching(n0, seq, p.window) / C::kBlockM;
  const int m_blocks = tiles_of(first_query_past(n0 + C::kBlockN, seq, p.window), C::kBlockM) - m_block_begin;
  const int n_iters = m_blocks > 0 ? split.heads * m_blocks : 0;
  if (n_iters > 0) {
    load_query_tile<T, C>(sQ, sdO, sLse2, sDelta, p, seq, b, query_tile<C>(head0, m_block_begin, m_blocks, 0), 0);
  }
  mma::cp_async_commit();

  const int slice = warp % C::kSlices;
  const int kw = slice * 16;  // the slice's keys within the block
  if constexpr (!C::kSplitRoles) {
    float dk_acc[C::kDTiles][4] = {};
    float dv_acc[C::kDTiles][4] = {};
    for (int it = 0; it < n_iters; ++it) {
      mma::cp_async_wait<0>();
      __syncthreads();  // tile `it` visible; everyone is done with the other buffer and with sdS
      if (it + 1 < n_iters) {
        load_query_tile<T, C>(sQ, sdO, sLse2, sDelta, p, seq, b, query_tile<C>(head0, m_block_begin, m_blocks, it + 1),
                              (it + 1) % 2);
      }
      mma::cp_async_commit();

      const int buf = it % 2;
      const QueryTile tile = query_tile<C>(head0, m_block_begin, m_blocks, it);
      const T* q_tile = sQ + buf * C::kBlockM * C::kPitch;
      const T* do_tile = sdO + buf * C::kBlockM * C::kPitch;

      float ds_t[C::kMTiles][4];
      prob_grads_t<T, C>(ds_t, sV, do_tile, kw, lane);
      float p_t[C::kMTiles][4];
      probabilities_and_score_grads_t<T, C>(p_t, ds_t, sK, q_tile, sLse2 + buf * C::kBlockM,
                                            sDelta + buf * C::kBlockM, p, seq, tile.m0, n0, kw, lane);
      // dV += P^T dO
      mma::warp_gemm_kn<T, C::kMChunks, C::kDTiles>(dv_acc, mma::AAccumulators<T, C::kMTiles>{p_t}, do_tile,
                                                    C::kPitch, 0, lane);
      // dK += dS^T Q
      mma::warp_gemm_kn<T, C::kMChunks, C::kDTiles>(dk_acc, mma::AAccumulators<T, C::kMTiles>{ds_t}, q_tile,
                                                    C::kPitch, 0, lane);
      store_score_grads<T, C>(sdS, ds_t, kw, lane);
      __syncthreads();
      accumulate_dq<T, C>(sdS, sK, p, seq, b, tile, warp, lane);
    }
    mma::cp_async_wait<0>();
    const int64_t at = s * split.partial_split;
    const bool partial = split.partial != nullptr;
    write_back_grad<T, C>(dk_acc, p.dk, partial ? split.partial + at : nullptr, p.scale, p, b, kv_head, n0, kw, lane);
    write_back_grad<T, C>(dv_acc, p.dv, partial ? split.partial + at + split.partial_split / 2 : nullptr, 1.f, p, b,
                          kv_head, n0, kw, lane);
  } else {
    // Warp role: 0 = probabilities (holds dV), 1 = gradients (holds dK); uniform per warp.
    const bool gradients = warp >= C::kSlices;
    float acc[C::kDTiles][4] = {};
    for (int it = 0; it < n_iters; ++it) {
      mma::cp_async_wait<0>();
      __syncthreads();  // tile `it` visible; everyone is done with sdS and sP
      const QueryTile tile = query_tile<C>(head0, m_block_begin, m_blocks, it);
      float x_t[C::kMTiles][4];  // probabilities: P^T; gradients: dP^T, then dS^T
      if (!gradients) {
        probabilities_t<T, C>(x_t, sP, sK, sQ, sLse2, p, seq, tile.m0, n0, kw, lane);
      } else {
        prob_grads_t<T, C>(x_t, sV, sdO, kw, lane);
      }
      __syncthreads();  // sP complete
      if (!gradients) {
        // dV += P^T dO
        mma::warp_gemm_kn<T, C::kMChunks, C::kDTiles>(acc, mma::AAccumulators<T, C::kMTiles>{x_t}, sdO, C::kPitch,
                                                      0, lane);
      } else {
        score_grads_t<C>(x_t, sP, sDelta, kw, lane);
        store_score_grads<T, C>(sdS, x_t, kw, lane);
        // dK += dS^T Q
        mma::warp_gemm_kn<T, C::kMChunks, C::kDTiles>(acc, mma::AAccumulators<T, C::kMTiles>{x_t}, sQ, C::kPitch,
                                                      0, lane);
      }
      __syncthreads();  // sdS complete; Q, dO, lse and delta free for the next tile
      if (it + 1 < n_iters) {
        load_query_tile<T, C>(sQ, sdO, sLse2, sDelta, p, seq, b, query_tile<C>(head0, m_block_begin, m_blocks, it + 1),
                              0);
      }
      mma::cp_async_commit();
      accumulate_dq<T, C>(sdS, sK, p, seq, b, tile, warp, lane);
    }
    mma::cp_async_wait<0>();
    const int64_t at = s * split.partial_split + (gradients ? 0 : split.partial_split / 2);
    write_back_grad<T, C>(acc, gradients ? p.dk : p.dv, split.partial != nullptr ? split.partial + at : nullptr,
                          gradients ? p.scale : 1.f, p, b, kv_head, n0, kw, lane);
  }
}

// delta_i = sum_d dO[i, d] * O[i, d] in fp32: one warp per (row, head).
constexpr int kDeltaWarps = 4;

template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32) attention_backward_delta_kernel(const AttentionParams p) {
  const auto [b, head, row, lane] = warp_row<kDeltaWarps>();
  const Seq seq = sequence(p, b);
  if (row >= seq.len_q) return;
  const T* dout = static_cast<const T*>(p.dout) + offset(p.dout_strides, b, seq.start_q, row, head);
  const T* out = static_cast<const T*>(p.fwd_out) + offset(p.fwd_out_strides, b, seq.start_q, row, head);
  float sum = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) sum += to_float(dout[d]) * to_float(out[d]);
  sum = warp_reduce(sum);
  if (lane == 0) p.delta[lse_offset(p, b, seq, row, head)] = sum;
}

// Waves of CTAs below which a kv head's group is split over several CTAs.
constexpr int kMinWaves = 4;

// The group split: the smallest divisor of the group that gives kMinWaves waves of `ctas`
// (the CTAs of one split per kv head), else the whole group.
int group_splits(int64_t ctas, int group, int64_t wave) {
  for (int splits = 1; splits < group; ++splits) {
    if (group % splits == 0 && ctas * splits >= kMinWaves * wave) return splits;
  }
  return group;
}

template <typename T, typename C>
bool launch_backward_kernel(const AttentionParams& p, const at::Tensor& dk, const at::Tensor& dv,
                            cudaStream_t stream) {
  if (!smem_fits(C::kSmemBytes)) return false;
  auto kernel = attention_backward_tc_kernel<T, C>;
  allow_dynamic_smem(kernel, C::kSmemBytes);
  const int64_t ctas = ceil_div(p.seq_k, C::kBlockN) * p.batch * p.n_kv_heads;
  if (ctas == 0) return true;
  GroupSplit split{};
  split.splits = group_splits(ctas, p.group, kernel_residency(kernel, C::kThreads, C::kSmemBytes).slots());
  split.heads = p.group / split.splits;
  TORCH_CHECK(ctas * split.splits <= INT_MAX, "gqa_attention_backward: ", ctas * split.splits,
              " CTAs exceed the CUDA grid (2^31 - 1); use fewer sequences per call");
  at::Tensor partial;
  if (split.splits > 1) {
    // [splits][dK, dV][k's shape], fp32; dk's (contiguous) strides index each [k's shape] slice.
    std::vector<int64_t> shape{split.splits, 2};
    shape.insert(shape.end(), dk.sizes().begin(), dk.sizes().end());
    partial = at::empty(shape, dk.options().dtype(at::kFloat));
    split.partial = partial.data_ptr<float>();
    split.partial_split = 2 * dk.numel();
  }
  kernel<<<static_cast<unsigned>(ctas * split.splits), C::kThreads, C::kSmemBytes, stream>>>(p, split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (split.splits > 1) {
    // Summed in split order by one reduction kernel per gradient: deterministic.
    dk.copy_(partial.select(1, 0).sum(0));
    dv.copy_(partial.select(1, 1).sum(0));
  }
  return true;
}

template <typename T, typename... C>
bool launch_first_fitting(BwdConfigList<C...>, const AttentionParams& p, const at::Tensor& dk, const at::Tensor& dv,
                          cudaStream_t stream) {
  return (launch_backward_kernel<T, C>(p, dk, dv, stream) || ...);
}

}  // namespace

template <typename T>
bool launch_backward_tc(const AttentionParams& p, const at::Tensor& dk, const at::Tensor& dv, cudaStream_t stream) {
  return dispatch_head_dim(p.head_dim, [&](auto d) {
    return launch_first_fitting<T>(typename BwdConfigs<decltype(d)::value>::type{}, p, dk, dv, stream);
  });
}

template <typename T>
void launch_backward_delta(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid = warp_row_grid<kDeltaWarps>(p.seq_q, p.n_q_heads, p.batch);
  if (grid_empty(grid)) return;
  attention_backward_delta_kernel<T><<<grid, kDeltaWarps * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define LLAMA_EXT_INSTANTIATE_BWD_TC(T) \
  template bool launch_backward_tc<T>(const AttentionParams&, const at::Tensor&, const at::Tensor&, cudaStream_t);
LLAMA_EXT_ATTENTION_TC_TYPES(LLAMA_EXT_INSTANTIATE_BWD_TC)
#undef LLAMA_EXT_INSTANTIATE_BWD_TC
#define LLAMA_EXT_INSTANTIATE_DELTA(T) template void launch_backward_delta<T>(const AttentionParams&, cudaStream_t);
LLAMA_EXT_ATTENTION_TYPES(LLAMA_EXT_INSTANTIATE_DELTA)
#undef LLAMA_EXT_INSTANTIATE_DELTA

}  // namespace llama_ext::cuda::attention
