// Grouped-query attention forward on tensor cores (fp16 / bf16), FlashAttention-2 style.
//
// Algorithm. One CTA owns block_m query rows of one (sequence, query head); each warp owns 16 or
// 32 of them (one or two 16-row m-tiles). The CTA streams the K/V tiles of the head's kv head
// (h / group: K and V are read in place, never repeated) through shared memory, block_n keys at
// a time, double-buffered with cp.async so tile j + 1 lands while tile j is multiplied:
//   S = Q K_j^T            mma.sync m16n8k16; Q fragments held in registers or re-read from
//                          shared memory (FwdTile::q_in_registers), K via ldmatrix, each K
//                          fragment multiplied into every m-tile of the warp
//   online softmax         fp32, base 2: s * scale * log2(e), running row max m and sum l, the
//                          old O rescaled by exp2(m_old - m_new)
//   O += P V_j             P converted from the S accumulators straight into A fragments
//                          (no shared-memory round trip), V via ldmatrix.trans
// At the end O / l is written and lse = (m + log2 l) * ln 2. Key tiles outside every row's
// causal / sliding window are never loaded (the key loop runs from the tile holding the first
// row's first key to the last row's last key); only tiles crossing the diagonal, a window
// edge or the key tail pay for per-element masking, against each row's [begin, end), computed
// on those tiles only. With a logit softcap the fp32 scores become softcap tanh(s / softcap) (in
// base 2, attention_common.cuh) before masking. Query/key tails are zero-filled by the loads
// and masked, so any sequence length works. Over a paged KV cache (kPaged: the prefill route of
// gqa_attention_with_kvcache) each K/V row is found through the block table as it is staged;
// everything else is the same kernel (registers within -18..+5 of the contiguous one's below, no
// spills).
//
// Cost. 4 * s_q * s_k * D FLOPs per head (halved causal), all on tensor cores. Global traffic is
// Q and O once plus K and V once per CTA: block_m FLOPs per byte of K/V (L2 serves the repeats
// across the CTAs of a head group); the [s_q, s_k] score matrix never exists in memory.
// Shared-memory reads, which bound mma.sync kernels on A100/H100: per key tile a warp reads K
// and V (2 * block_n * D * 2 bytes, by ldmatrix) and, unless held in registers, its rows of Q
// (rows * D * 2) for 4 * rows * block_n * D FLOPs (rows = 16 * m-tiles), i.e. bytes per FLOP
//   Q in registers:          1 / (16 * m-tiles)
//   Q from shared memory:    (1 + rows / (2 * block_n)) / (16 * m-tiles)
// FlashAttention-2 (128 x 64 tiles, 4 warps of 32 rows, Q from shared memory) reads 1/25.6. Here:
// D = 32, 64: 32 rows per warp, Q in registers: 1/32; D = 128: 32 rows, Q from shared memory,
// 32-key tiles (64-key tiles spill at 255 registers): 1/21.3; D = 80, 96: 16 rows, Q from shared
// memory, 32-key tiles: 1/12.8, at two CTAs of 8 warps per SM (32 rows need over 230 registers
// there, halving the warps per SM, and Q in registers spills on sm_120 within the 128 registers
// of two CTAs); D = 256: 16 rows, Q from shared memory: 1/12.8 (the 16 x 256 fp32 O alone takes
// 128 registers).
//
// Tiles (kFwdTiles, chosen per device at run time by choose_forward_tile from its shared memory;
// rows padded by 16 bytes for conflict-free ldmatrix) and resources (ptxas -v, CUDA 13.0, no
// spills; registers sm_80 = sm_86 = sm_89 / sm_90 / sm_120; CTAs per SM from registers and
// shared memory: 64K registers everywhere, 164 KB sm_80, 228 KB sm_90, 100 KB sm_86/89/120):
//   D    block_m x block_n  warps x rows  Q     smem    registers        CTAs/SM (warps)
//   32   128 x 64           4 x 32        regs  30 KB   168 / 167 / 168  3 (12) everywhere
//   64   128 x 64           4 x 32        regs  54 KB   242 / 246 / 255  2 (8) sm_80, sm_90
//   64   128 x 32           4 x 32        regs  36 KB   192 / 186 / 243  2 (8) 100 KB parts
//   80   128 x 32           8 x 16        smem  44 KB   117 / 120 / 128  2 (16) everywhere
//   96   128 x 32           8 x 16        smem  52 KB   127 / 128 / 128  2 (16) sm_80, sm_90; 1 (8) 100 KB parts
//   128  128 x 32           4 x 32        smem  68 KB   249 / 251 / 255  2 (8) sm_80, sm_90
//   128  128 x 32           8 x 16        regs  68 KB   184 / 188 / 208  1 (8) 100 KB parts
//   256  64 x 32            4 x 16        smem  99 KB   242 / 243 / 255  1 (4) sm_80, 100 KB parts; 2 (8) sm_90
// sm_100 (228 KB, as sm_90) takes sm_90's tiles at sm_90's CTAs per SM, without spills: 168, 255,
// 235, 128, 128, 254, 206 and 255 registers down the table.
#include "attention_launch.cuh"

#include <utility>

namespace llama_ext::cuda::attention {
namespace {

// One forward tile configuration: block_m query rows per CTA over `warps` warps (16 or 32 rows
// each), block_n keys per K/V tile, Q fragments kept in registers or re-read from shared memory,
// and the CTAs per SM that __launch_bounds__ asks registers for.
struct FwdTile {
  int head_dim;
  int block_m;
  int block_n;
  int warps;
  bool q_in_registers;
  int min_ctas_per_sm;

  // Q, then K and V double-buffered, 16-bit elements, rows padded (smem_pitch).
  constexpr int64_t smem_bytes() const { return int64_t{block_m + 4 * block_n} * (head_dim + 8) * 2; }
};

// The shared memory of the built archs (SmemLimits: attention_common.cuh).
inline constexpr SmemLimits kSmemSm80{163 * 1024, 164 * 1024, 1024};
inline constexpr SmemLimits kSmemSm90{227 * 1024, 228 * 1024, 1024};  // also sm_100
inline constexpr SmemLimits kSmemSm86{99 * 1024, 100 * 1024, 1024};  // also sm_89, sm_120

// The forward's tile configurations, each head dim's in order of preference (the opening comment
// says why each): a head dim's second entry serves the ~100 KB parts, whose shared memory holds
// fewer CTAs of the first than its registers allow.
inline constexpr FwdTile kFwdTiles[] = {
    // D    M    N  warps  Q in regs  CTAs/SM
    {32, 128, 64, 4, true, 3},
    {64, 128, 64, 4, true, 2},
    {64, 128, 32, 4, true, 2},
    {80, 128, 32, 8, false, 2},
    {96, 128, 32, 8, false, 2},
    {128, 128, 32, 4, false, 2},
    {128, 128, 32, 8, true, 1},
    {256, 64, 32, 4, false, 1},
};
inline constexpr int kNumFwdTiles = static_cast<int>(sizeof(kFwdTiles) / sizeof(kFwdTiles[0]));

// Index into kFwdTiles of the configuration launched for head_dim on a device with these limits:
// the first whose CTAs per SM (those its registers were bounded for) fit the SM's shared memory,
// else the first of which one CTA fits; -1 when none does (the SIMT kernel runs instead).
constexpr int choose_forward_tile(int head_dim, const SmemLimits& smem) {
  int fits_one = -1;
  for (int i = 0; i < kNumFwdTiles; ++i) {
    const FwdTile& c = kFwdTiles[i];
    if (c.head_dim != head_dim || c.smem_bytes() > smem.per_block) continue;
    if (c.min_ctas_per_sm * (c.smem_bytes() + smem.reserved_per_block) <= smem.per_sm) return i;
    if (fits_one < 0) fits_one = i;
  }
  return fits_one;
}

// The choice for the built archs, checked at compile time: every head dim on tensor cores
// everywhere; on sm_80 / sm_90 at the occupancy its registers allow.
constexpr bool every_head_dim_on_tensor_cores(const SmemLimits& smem, bool at_full_occupancy) {
  for (int d : kHeadDims) {
    const int i = choose_forward_tile(d, smem);
    if (i < 0) return false;
    const FwdTile& c = kFwdTiles[i];
    if (at_full_occupancy && c.min_ctas_per_sm * (c.smem_bytes() + smem.reserved_per_block) > smem.per_sm) return false;
  }
  return true;
}
static_assert(every_head_dim_on_tensor_cores(kSmemSm80, true) && every_head_dim_on_tensor_cores(kSmemSm90, true) &&
              every_head_dim_on_tensor_cores(kSmemSm86, false));
static_assert(kFwdTiles[choose_forward_tile(64, kSmemSm86)].block_n == 32 &&
              kFwdTiles[choose_forward_tile(128, kSmemSm80)].warps == 4 &&
              kFwdTiles[choose_forward_tile(128, kSmemSm86)].warps == 8);
static_assert(choose_forward_tile(128, SmemLimits{64 * 1024, 64 * 1024, 1024}) == -1 &&
              choose_forward_tile(48, kSmemSm90) == -1);

template <int kTile>
struct FwdConfig {
  static constexpr FwdTile kCfg = kFwdTiles[kTile];
  static constexpr int kD = kCfg.head_dim;
  static constexpr int kBlockM = kCfg.block_m;
  static constexpr int kBlockN = kCfg.block_n;
  static constexpr int kWarps = kCfg.warps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kBlockM / kWarps;
  static constexpr int kMTiles = kRowsPerWarp / 16;  // 16-row m-tiles per warp
  static constexpr int kMinCtasPerSm = kCfg.min_ctas_per_sm;
  static constexpr bool kQInRegisters = kCfg.q_in_registers;
  static constexpr int kPitch = smem_pitch<kD>();
  static constexpr int kDTiles = kD / 8;         // n-tiles of O (8 dims each)
  static constexpr int kDChunks = kD / 16;       // k-chunks of Q K^T (16 dims each)
  static constexpr int kNTiles = kBlockN / 8;    // n-tiles of S (8 keys each)
  static constexpr int kNChunks = kBlockN / 16;  // k-chunks of P V (16 keys each)
  static constexpr int kQFragChunks = kQInRegisters ? kDChunks : 1;  // Q's k-chunks held in registers
  static constexpr int kSmemElems = (kBlockM + 4 * kBlockN) * kPitch;  // Q, K[2], V[2]
  static_assert(kPitch == kD + 8 && kCfg.smem_bytes() == 2 * int64_t{kSmemElems}, "FwdTile::smem_bytes is the layout's");
  static_assert(kRowsPerWarp * kWarps == kBlockM && kMTiles * 16 == kRowsPerWarp, "warps own whole m-tiles");
  static_assert(kD % 16 == 0 && kBlockN % 16 == 0, "tiles are whole mma shapes");
  static_assert(kDTiles % 2 == 0 && kNTiles % 2 == 0, "B fragments are loaded in n-tile pairs");
};

// The online-softmax state of this thread's two rows of one 16-row m-tile (rows g and g + 8), in
// base 2: the running max of the scaled scores and this thread's share of the running sum (its
// 2 of every 8 columns; the other 3 lanes of its quad hold the rest).
struct SoftmaxRows {
  float max[2];
  float sum[2];
};

// Stage: load key/value tile `block` (kBlockN keys from key block * kBlockN) into buffer `buf`;
// keys past the sequence are zero-filled. k and v point at the sequence's kv head: its key 0, or
// with kPaged its element 0 in cache block 0, the sequence's keys found through its row of the
// block table (`pages`). A paged tile's rows may lie in several cache blocks (block_size below
// kBlockN, or not a multiple of it), so each row is looked up: one table entry and one division
// per row a thread stages, shared by its K and V chunks. The route checked the entries of keys
// below len_k; no other is read. Paged rows are 16-byte aligned (kvcache_attention.cu checks the
// caches), so they always go by cp.async, whatever q's alignment.
template <typename T, typename C, bool kPaged>
__device__ __forceinline__ void load_kv_tile(T* sK, T* sV, const T* k, const T* v, const int* pages,
                                             const AttentionParams& p, const Seq& seq, int block, int buf) {
  const int n0 = block * C::kBlockN;
  T* k_tile = sK + buf * C::kBlockN * C::kPitch;
  T* v_tile = sV + buf * C::kBlockN * C::kPitch;
  if constexpr (kPaged) {
    constexpr int kChunksPerRow = C::kD * static_cast<int>(sizeof(T)) / 16;
    constexpr int kElems = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int c = threadIdx.x; c < C::kBlockN * kChunksPerRow; c += C::kThreads) {
      const int r = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * kElems;
      const int key = n0 + r;
      const bool valid = key < seq.len_k;
      int64_t k_at = 0, v_at = 0;  // zero-filled rows pass the (aligned) kv head base, unread
      if (valid) {
        const PagedKey at = paged_key(pages, p, key);
        k_at = paged_offset(p.k_strides, at) + col;
        v_at = paged_offset(p.v_strides, at) + col;
      }
      mma::cp_async_16(k_tile + r * C::kPitch + col, k + k_at, valid);
      mma::cp_async_16(v_tile + r * C::kPitch + col, v + v_at, valid);
    }
  } else {
    load_tile<T, C::kD, C::kBlockN, C::kThreads>(k_tile, k + n0 * p.k_strides.row, p.k_strides.row, seq.len_k - n0,
                                                 p.aligned16);
    load_tile<T, C::kD, C::kBlockN, C::kThreads>(v_tile, v + n0 * p.v_strides.row, p.v_strides.row, seq.len_k - n0,
                                                 p.aligned16);
  }
}

// Stage: S = Q K^T for the warp's kMTiles x 16 rows x kBlockN keys (fp32 accumulators,
// unscaled). Each K fragment pair is loaded once and multiplied into every m-tile of the warp:
// that reuse is what more rows per warp buys. Q's A fragments come from registers (q_frag) or
// from the warp's rows of sQ.
template <typename T, typename C>
__device__ __forceinline__ void score_tile(float (&s)[C::kMTiles][C::kNTiles][4],
                                           const uint32_t (&q_frag)[C::kMTiles][C::kQFragChunks][4], const T* sQ,
                                           int warp_row0, const T* k_tile, int lane) {
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < C::kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
    }
  }
#pragma unroll
  for (int kc = 0; kc < C::kDChunks; ++kc) {
    uint32_t a[C::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < C::kMTiles; ++mt) {
      if constexpr (C::kQInRegisters) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[mt][i] = q_frag[mt][kc][i];
      } else {
        mma::load_a(a[mt], sQ, C::kPitch, warp_row0 + mt * 16, kc * 16, lane);
      }
    }
#pragma unroll
    for (int nt = 0; nt < C::kNTiles; nt += 2) {
      uint32_t b0[2], b1[2];
      mma::load_b_pair_nk(b0, b1, k_tile, C::kPitch, nt * 8, kc * 16, lane);
#pragma unroll
      for (int mt = 0; mt < C::kMTiles; ++mt) {
        mma::mma_16x8x16<T>(s[mt][nt], a[mt], b0);
        mma::mma_16x8x16<T>(s[mt][nt + 1], a[mt], b1);
      }
    }
  }
}

// Stage: scale into base 2, apply the logit softcap (fp32), and, on tiles that cross the
// causal diagonal, a window edge or the key tail, set invisible scores to -inf. Each row's key
// range [begin, end) is computed here, on masked tiles only, rather than kept live across the
// key loop, to leave the registers to the accumulators. Accumulator element e of n-tile nt is
// row rows[e / 2], key n0 + nt * 8 + 2t + e % 2.
template <typename C>
__device__ __forceinline__ void scale_and_mask(float (&s)[C::kNTiles][4], const AttentionParams& p, const Seq& seq,
                                               const int (&rows)[2], int n0, bool masked, int t) {
#pragma unroll
  for (int nt = 0; nt < C::kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = capped_score(s[nt][e] * p.scale_log2, p);
  }
  if (!masked) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int lo = key_begin(rows[r], seq, p.window), hi = key_end(rows[r], seq, p.window);
#pragma unroll
    for (int nt = 0; nt < C::kNTiles; ++nt) {
#pragma unroll
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        const int key = n0 + nt * 8 + 2 * t + e % 2;
        if (key < lo || key >= hi) s[nt][e] = -INFINITY;
      }
    }
  }
}

// Stage: online softmax of one m-tile. Turns the scaled scores into probabilities exp2(s - max),
// updates each row's max and sum, and rescales the row's output accumulators by
// exp2(old max - new max). A row's 8 * kNTiles columns are spread over the 4 lanes of a quad.
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

// Stage: O += P V. k-chunk kc of an m-tile's P is the accumulators of its n-tiles 2kc and
// 2kc + 1 of S, rounded to T in registers; each V fragment pair serves every m-tile of the warp.
template <typename T, typename C>
__device__ __forceinline__ void accumulate_pv(float (&o_acc)[C::kMTiles][C::kDTiles][4],
                                              const float (&s)[C::kMTiles][C::kNTiles][4], const T* v_tile, int lane) {
#pragma unroll
  for (int kc = 0; kc < C::kNChunks; ++kc) {
    uint32_t a[C::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < C::kMTiles; ++mt) mma::pack_a_from_acc<T>(a[mt], s[mt][2 * kc], s[mt][2 * kc + 1]);
#pragma unroll
    for (int dt = 0; dt < C::kDTiles; dt += 2) {
      uint32_t b0[2], b1[2];
      mma::load_b_pair_kn(b0, b1, v_tile, C::kPitch, kc * 16, dt * 8, lane);
#pragma unroll
      for (int mt = 0; mt < C::kMTiles; ++mt) {
        mma::mma_16x8x16<T>(o_acc[mt][dt], a[mt], b0);
        mma::mma_16x8x16<T>(o_acc[mt][dt + 1], a[mt], b1);
      }
    }
  }
}

// Stage: write O / l and lse = (max + log2 l) * ln 2 of this thread's two rows of one m-tile.
// Rows that saw no key (causal with len_q > len_k, an empty window, or len_k = 0) have l = 0:
// they get output 0 and lse 0, written as such, since their O may hold 0 * Inf = NaN from a
// non-finite V row of a tile they shared. The sequence's offsets are read again here rather
// than kept live in registers across the key loop.
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

template <typename T, int D, int kTile, bool kPaged>
__global__ void __launch_bounds__(FwdConfig<kTile>::kThreads, FwdConfig<kTile>::kMinCtasPerSm)
    attention_forward_tc_kernel(const AttentionParams p) {
  using C = FwdConfig<kTile>;
  static_assert(C::kD == D, "the kernel's name carries its tile's head dim");
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
  // Paged: the kv head's element 0 in cache block 0, the keys' blocks from the sequence's row of
  // the block table (the route's calls are batched, start_k = 0).
  const T* k = static_cast<const T*>(p.k) +
               (kPaged ? kv_head * p.k_strides.head : offset(p.k_strides, b, seq.start_k, 0, kv_head));
  const T* v = static_cast<const T*>(p.v) +
               (kPaged ? kv_head * p.v_strides.head : offset(p.v_strides, b, seq.start_k, 0, kv_head));
  const int* pages = kPaged ? p.block_table + b * p.block_table_strides[0] : nullptr;

  const int rows_end = min(m0 + C::kBlockM, seq.len_q);
  const int first_key_block = key_begin(m0, seq, p.window) / C::kBlockN;
  const int n_key_blocks = max(0, tiles_of(key_end(rows_end - 1, seq, p.window), C::kBlockN) - first_key_block);

  load_tile<T, D, C::kBlockM, C::kThreads>(sQ, q, p.q_strides.row, seq.len_q - m0, p.aligned16);
  if (n_key_blocks > 0) load_kv_tile<T, C, kPaged>(sK, sV, k, v, pages, p, seq, first_key_block, 0);
  mma::cp_async_commit();

  // The warp's rows are warp_row0 + [0, kRowsPerWarp) of the tile; this thread holds rows g and
  // g + 8 of each of its 16-row m-tiles.
  const int warp_row0 = warp * C::kRowsPerWarp;
  int rows[C::kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) {
    rows[mt][0] = m0 + warp_row0 + mt * 16 + g;
    rows[mt][1] = rows[mt][0] + 8;
  }
  float o_acc[C::kMTiles][C::kDTiles][4] = {};
  SoftmaxRows state[C::kMTiles];
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) state[mt] = SoftmaxRows{{-INFINITY, -INFINITY}, {0.f, 0.f}};
  uint32_t q_frag[C::kMTiles][C::kQFragChunks][4];

  for (int it = 0; it < n_key_blocks; ++it) {
    mma::cp_async_wait<0>();
    __syncthreads();  // tile `it` is visible to all; everyone is done with buffer (it + 1) % 2
    if constexpr (C::kQInRegisters) {
      if (it == 0) {
#pragma unroll
        for (int mt = 0; mt < C::kMTiles; ++mt) {
#pragma unroll
          for (int kc = 0; kc < C::kDChunks; ++kc) {
            mma::load_a(q_frag[mt][kc], sQ, C::kPitch, warp_row0 + mt * 16, kc * 16, lane);
          }
        }
      }
    }
    if (it + 1 < n_key_blocks) {
      load_kv_tile<T, C, kPaged>(sK, sV, k, v, pages, p, seq, first_key_block + it + 1, (it + 1) % 2);
    }
    mma::cp_async_commit();

    const T* k_tile = sK + (it % 2) * C::kBlockN * C::kPitch;
    const T* v_tile = sV + (it % 2) * C::kBlockN * C::kPitch;
    const int n0 = (first_key_block + it) * C::kBlockN;

    float s[C::kMTiles][C::kNTiles][4];
    score_tile<T, C>(s, q_frag, sQ, warp_row0, k_tile, lane);
    const bool masked = tile_needs_mask(m0, C::kBlockM, n0, C::kBlockN, seq, p.window);
#pragma unroll
    for (int mt = 0; mt < C::kMTiles; ++mt) {
      scale_and_mask<C>(s[mt], p, seq, rows[mt], n0, masked, t);
      online_softmax<C>(s[mt], state[mt], o_acc[mt]);
    }
    accumulate_pv<T, C>(o_acc, s, v_tile, lane);
  }
  mma::cp_async_wait<0>();  // nothing may be in flight when the CTA exits
#pragma unroll
  for (int mt = 0; mt < C::kMTiles; ++mt) write_back<T, C>(o_acc[mt], state[mt], p, b, head, rows[mt], t);
}

template <typename T, int kTile>
void launch_forward_kernel(const AttentionParams& p, cudaStream_t stream) {
  using C = FwdConfig<kTile>;
  constexpr size_t smem_bytes = C::kSmemElems * sizeof(T);
  auto kernel = p.block_table != nullptr ? attention_forward_tc_kernel<T, C::kD, kTile, true>
                                         : attention_forward_tc_kernel<T, C::kD, kTile, false>;
  allow_dynamic_smem(kernel, smem_bytes);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.seq_q, C::kBlockM)), p.n_q_heads, p.batch);
  if (grid_empty(grid)) return;
  kernel<<<grid, C::kThreads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls launch_forward_kernel<T, tile> for the run-time index `tile` of kFwdTiles.
template <typename T, int... kTiles>
void launch_forward_tile(int tile, const AttentionParams& p, cudaStream_t stream,
                         std::integer_sequence<int, kTiles...>) {
  ((tile == kTiles ? launch_forward_kernel<T, kTiles>(p, stream) : void()), ...);
}

}  // namespace

template <typename T>
bool launch_forward_tc(const AttentionParams& p, cudaStream_t stream) {
  static_assert(sizeof(T) == 2, "FwdTile::smem_bytes counts 16-bit elements");
  const int tile = choose_forward_tile(p.head_dim, device_smem_limits());
  if (tile < 0) return false;
  launch_forward_tile<T>(tile, p, stream, std::make_integer_sequence<int, kNumFwdTiles>{});
  return true;
}

#define LLAMA_EXT_INSTANTIATE_FWD(T) template bool launch_forward_tc<T>(const AttentionParams&, cudaStream_t);
LLAMA_EXT_ATTENTION_TC_TYPES(LLAMA_EXT_INSTANTIATE_FWD)
#undef LLAMA_EXT_INSTANTIATE_FWD

}  // namespace llama_ext::cuda::attention
