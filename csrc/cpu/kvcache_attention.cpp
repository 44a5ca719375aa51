// Attention against a KV cache (decode) on the CPU: split-KV, paged, with the new tokens'
// append and rotary fused in. Semantics in csrc/kvcache_attention.h.
//
// Stages, per call:
//  1. Values check (before anything is written): cache_seqlens[b] + seq_new within the
//     capacity, the block_table entries a sequence uses within the cache, rotary positions
//     within the table.
//  2. Append: each new k/v row is written to its cache slot (k rotated by the table row of
//     its position, with the rotary op's own code: rotary_head.h), in parallel over tokens.
//  3. Attention, one task per (batch, kv-head group, row tile, key split), spread over the
//     threads by cost (parallel.h: sequences of other lengths in a batch keep every thread
//     busy). A task packs the rows of all G query heads (x seq_q) of each of its kv heads into
//     one fp32 [rows, d] matrix (q rotated at positions cache_seqlens[b] + i and rounded to
//     q's dtype first, as apply_rotary would give it, then pre-multiplied by the scale; the
//     VDPBF16PS path keeps q in bf16 and scales S), and walks its key range in blocks of
//     kKeyBlock keys. A task takes several kv heads when their rows fit (decode: all of them;
//     with few units a thread, as many as divide the kv heads into equal groups; at amx_bf16,
//     where the next block is prefetched from 16 rows a head, one: see run()): the heads of
//     one token lie side by side in the cache, so the task reads its K/V in
//     address order, a stream the hardware prefetchers follow, where one head's rows would be
//     n_kv_heads x d elements apart. Where keys lie under a page apart (bf16/fp16), the tiles
//     below, which read several keys' rows side by side, would read each page out of order: a
//     block that every row sees whole is read in phase order (PhaseOrder: keys a page apart
//     first), any other block is first read line by line in address order (touch_rows). Where
//     keys lie a page or more apart (fp32), the first lines of the rows a few keys ahead are
//     prefetched (prefetch_row_starts).
//     K and V rows are widened to fp32 in registers, chunk by chunk, and each chunk serves
//     several rows of the group at once (no fp32 copy of the cache is ever stored); bf16 on
//     AVX2 and AVX-512 is widened in even/odd pairs (namespace pairs), with q and O kept in that
//     order:
//       S[r, j] = q_r . k_j        register tiles of 4 rows x 2 keys (2 x 4, 1 x 8 for what
//                                  is left of the rows; twice the keys on AVX-512's pairs
//                                  path and for fp32 on AVX-512: kScoreAcc): 8 or 16 accumulators,
//                                  reduced to their scores by transposing hadd trees
//       softcap: S = c tanh(S / c); masks: causal / window per row (bottom-right aligned)
//       online softmax (online_softmax.h, as the prefill kernel): m' = max(m, max_j S) per row,
//       then e^(m - m') across rows, then p = exp(S - m') and l' = l e^(m - m') + sum p per
//       row over its visible columns (exp to bf16's grade for bf16: 4e-6 relative). In that
//       order rather than row by row (the scalar exp and the two reductions of one row a
//       chain): 1.07-1.14x at b1 1024-4096 bf16 from DRAM, 1.11-1.21x in L3, fp32 and fp16
//       1.02-1.03x (Zen 5, 2026-12-04)
//       O_r <- O_r e^(m - m') + sum_j p[r, j] v_j   (strips of 4 rows x 2 vectors held in
//                                  registers over a pass of keys, p broadcast per key)
//     bf16 at the avx512_bf16 level scores on VDPBF16PS instead (namespace dot):
//     bf16 q and K as they lie, 32 products per instruction, no widening; amx_bf16 scores whole
//     tiles on AMX (namespace amx_tiles): per 16 keys and sub-tile of up to 16 rows of a kv head
//     one TDPBF16PS tile product per 32 elements of d, K tile-loaded straight from the cache (a
//     block in phase order as four tiles of keys four apart; from 16 rows, and from 7 on paged
//     caches whose blocks end within key blocks, the next block prefetched over this one's
//     math instead: PacedPrefetch), and off the tiles the pairs path's FMAs,
//     and from kAmxPvMinRows rows per kv head runs P V on the tiles too, P split into two bf16
//     parts (exact to 2^-16 of itself). At avx512_bf16, P V runs on
//     VDPBF16PS too, two keys per instruction with P rounded to bf16 (as the prefill kernel at
//     this level and FlashAttention do): 1.06-1.21x with the cache in L3, 1.03-1.11x evicted
//     (Zen 4, b1 4096 / b1 1024 / paged16 / b8 1024). Elsewhere P V stays on the FMAs, P in fp32
//     (at amx_bf16, on Sapphire Rapids, VDPBF16PS issues at half the FMA rate: no faster).
//     On CPUs where they pay (Zen 5; the loader chooses, "Key-major tiles"), a task that covers
//     every kv head of a contiguous cache, with d of 64, 128 or 256 and 1, 2, 4 or 8 heads and
//     rows per head, runs key-major tiles instead: bf16 at avx512_bf16 (namespace dot), fp32 at
//     the AVX-512 levels where a key's row is at most a page (namespace fma_key_major). Each
//     key's row is read whole, key after key, with a software prefetch ahead of it, so that the
//     math overlaps the stream from DRAM.
//     Paged caches are gathered through the block table: the rows' addresses are resolved
//     once per key block by walking the pages, never by a division per key.
//     Prefill-shaped calls (kPrefillRouteMinSeqQ or more query tokens), and from
//     kDecodeRouteMaxSeqQ + 1 tokens those of many rows per kv head where the prefill kernel is
//     faster and has a task for every thread (runs_on_prefill_kernel), run on the prefill kernel
//     instead, one batched call per run of consecutive sequences that hold the same number of
//     tokens, a paged cache's K/V read through the block table.
//  4. Combine: with more than one split, each split leaves its normalized output and lse
//     (fp32) in a scratch buffer; lse = log sum_s e^(lse_s), out = sum_s e^(lse_s - lse) out_s.
//     A row that sees no key gets zeros and lse = 0.
// The task shape and split count depend only on the shapes, the lengths and the thread count
// (see run()), so a call's result does not depend on scheduling.
//
// Bytes: every visible K and V element is read once per (group, row tile): 2 L n_kv_heads d
// elements per sequence, the floor for decode; q and out are negligible. FLOPs: 4 L n_q_heads d
// per query token, one exp per score. With G query heads sharing each widened K/V row, a
// decode step is bound by memory (fp32) or by the widening and FMAs (bf16/fp16 at 2 bytes per
// element): the kernel streams the cache in address order with the math in L1/L2-resident
// buffers. On a Sapphire Rapids VM (benchmarks/RESULTS.md) bf16 runs only 1.28x faster per key
// than fp32 at half the bytes: the FMAs, the widening and the loads' latency bound it (on Zen 4,
// streaming from DRAM, the out-of-order reads within pages were most of the gap: PhaseOrder). There
// VDPBF16PS issues at half the FMA rate (no faster than the pairs path); on Zen 4 it issues at the
// FMA rate, and the scores on it make a b1 decode step 1.07x faster with the cache in L2/L3
// (no change when it streams from DRAM). Software prefetch instead of touch_rows' loads gained
// less and not reliably on Zen 4: the next phase's rows, 0.97-1.12x (0.92x in cache); four to
// eight keys ahead, 1.0-1.13x; the next block's lines in address order, paced over the current
// block's tiles, 0.80x with the cache evicted; all of the block's lines up front, 0.71-0.78x.
// Scores on AMX make
// a b1 decode step 1.06-1.14x faster (a 16-key x 4-row tile product takes ~6 ns, but the tile
// unit runs in order; K rows pulled into L1 before their tile loads did not make it faster:
// benchmarks/RESULTS.md, 2026-12-05). P V on AMX needs V
// repacked into key pairs through memory (a tile load of rows vector stores have just written
// stalls ~13 ns, so the repack runs a head ahead); at 4 rows per kv head it adds too little over
// the AMX scores: with P rounded to bf16 2-10%, with P exact as two bf16 parts 0.94x. The FMAs'
// share grows with the rows and the tiles' does not, so from 7 rows it pays (amx_tiles,
// 2026-12-06, b1 4096 x 128: in one process alternating with the FMAs, 6 rows 1.02x at 48/8,
// 7 rows 1.07-1.09x, 8 rows 1.05-1.07x, 16 rows 1.14x; builds alternating, 6 rows 0.93-0.96x at
// 12/2 and 0.96x at 48/8 x 256, 7 rows 1.02x at 14/2, 1.08-1.11x at 28/4 and 56/8, 8 rows
// 1.01x at 16/2 and 1.05x at 64/8 x 256). Without the repack (V rows as B tiles
// straight from the cache, contracted over key x element parity against P rows with zeros in
// the other parity's slots) it is slower still at 4 rows: 0.88x, every V tile load stalls the
// tile unit; staged through L1 one tile ahead, 0.94-1.04x.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "../kvcache_attention.h"
#include "amx_dot.h"
#include "attention_forward.h"
#include "bf16_dot.h"
#include "cpu_vec.h"
#include "online_softmax.h"
#include "parallel.h"
#include "rotary_head.h"

namespace llama_ext {
namespace {

using cpu::VecIO;

constexpr int64_t kKeyBlock = 64;         // keys per online-softmax update
constexpr int64_t kScoreKeys = 16;        // the most keys of one score tile: blocks pad to it
constexpr int64_t kMaxRows = 64;          // query rows (G heads x seq_q tokens) per task, a multiple of 4
constexpr int64_t kMinKeyRowsPerSplit = 256;  // keys x kv heads of one split, at least
constexpr int64_t kPvKeys = 8;            // keys per P V pass over every head of a task (at least)
constexpr int64_t kPageBytes = 4096;      // the unit within which hardware prefetchers follow a stream
constexpr int64_t kPrefetchKeys = 8;      // how far ahead prefetch_row_starts reads, in keys
constexpr int64_t kKeyMajorPvKeys = 8;    // keys per P V step of the key-major tiles
static_assert(kScoreKeys % kKeyMajorPvKeys == 0, "blocks pad to whole key-major P V steps");
constexpr int64_t kRowsAhead = 40;        // rows resolved past a block: the key-major prefetches' reach

template <typename T>
struct KVCacheCpuParams {
  using acc_t = at::opmath_type<T>;
  const T* q;
  int64_t q_stride[3];  // batch, seq, head
  const T* k_cache;
  const T* v_cache;
  int64_t k_stride[3];  // block (batch), token, head
  int64_t v_stride[3];
  const int32_t* seqlens;
  const int32_t* block_table;  // null: contiguous cache, block = batch row
  int64_t bt_stride[2];
  int64_t block_size;
  const acc_t* cos;  // null: no rotary
  const acc_t* sin;
  int64_t cos_stride, sin_stride;
  int64_t rotary_half;
  bool interleaved;
  T* out;      // contiguous [batch, seq_q, n_q_heads, d]
  acc_t* lse;  // contiguous [batch, n_q_heads, seq_q]
  int64_t batch, seq_q, seq_new, n_q_heads, n_kv_heads, head_dim, dpad;
  int64_t window_left, window_right;
  acc_t scale, softcap;
  int64_t row_tiles;
  int64_t heads_per_task, head_groups;  // a task's kv heads: ceil(n_kv_heads / heads_per_task) groups
  // Unit u = (batch, head group, row tile) is split into tasks [unit_tasks[u], unit_tasks[u + 1]).
  const int64_t* unit_tasks;
  acc_t* partial_out;  // units of several tasks: [task][kMaxRows][dpad] normalized outputs
  acc_t* partial_lse;  // [task][kMaxRows]

  int64_t splits(int64_t unit) const { return unit_tasks[unit + 1] - unit_tasks[unit]; }

  int64_t group() const { return n_q_heads / n_kv_heads; }
  int64_t rows() const { return group() * seq_q; }
  int64_t length(int64_t b) const { return static_cast<int64_t>(seqlens[b]) + seq_new; }
  // (query head, query index) of row `row` of kv head kvh's group: rows run over the G heads,
  // seq_q tokens each.
  std::pair<int64_t, int64_t> query_of(int64_t kvh, int64_t row) const {
    return {kvh * group() + row / seq_q, row % seq_q};
  }
  int64_t block_of(int64_t b, int64_t page) const {
    return block_table == nullptr ? b : block_table[b * bt_stride[0] + page * bt_stride[1]];
  }
  // Visible keys [lo, hi) of the query at index i of sequence b (length L).
  std::pair<int64_t, int64_t> visible(int64_t i, int64_t L) const {
    const int64_t pos = i + L - seq_q;
    const int64_t lo = window_left >= 0 ? std::max<int64_t>(0, pos - window_left) : 0;
    const int64_t hi = window_right >= 0 ? std::min<int64_t>(L, pos + window_right + 1) : L;
    return {lo, std::max(lo, hi)};
  }
};

// ---- stage 1: values --------------------------------------------------------------------------

void check_values(const KVCacheAttentionParams& p) {
  const at::Tensor seqlens = p.cache_seqlens.contiguous();
  const int32_t* sl = seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < p.batch; ++b) {
    TORCH_CHECK_VALUE(sl[b] >= 0, "cache_seqlens[", b, "] = ", sl[b], " is negative");
    TORCH_CHECK_VALUE(sl[b] + p.seq_new <= p.capacity, "cache_seqlens[", b, "] + seq_new = ", sl[b], " + ", p.seq_new,
                      " exceeds the cache capacity of ", p.capacity, " tokens",
                      p.paged ? " (block_table columns x block_size)" : "");
    const int64_t L = sl[b] + p.seq_new;
    if (p.paged) {
      const at::Tensor& bt = *p.block_table;
      const int32_t* t = bt.const_data_ptr<int32_t>();
      for (int64_t page = 0; page * p.block_size < L; ++page) {
        const int64_t blk = t[b * bt.stride(0) + page * bt.stride(1)];
        TORCH_CHECK_INDEX(blk >= 0 && blk < p.num_blocks, "block_table[", b, ", ", page, "] = ", blk,
                          " is outside the cache's ", p.num_blocks, " blocks");
      }
    }
    if (p.rotary_half > 0) {
      const int64_t last = sl[b] + std::max(p.seq_q, p.seq_new) - 1;
      TORCH_CHECK_INDEX(last < p.rotary_positions, "position ", last, " (cache_seqlens[", b,
                        "] + new tokens) is outside the rotary_cos/rotary_sin table of ", p.rotary_positions,
                        " positions");
    }
  }
}

// ---- stage 2: append --------------------------------------------------------------------------

template <typename T>
inline void rotate_head(const KVCacheCpuParams<T>& a, const T* src, T* dst, int64_t pos) {
  const auto* cos = a.cos + pos * a.cos_stride;
  const auto* sin = a.sin + pos * a.sin_stride;
  if (a.interleaved) {
    cpu::rotate_interleaved_head<T>(src, dst, cos, sin, a.rotary_half, false);
  } else {
    cpu::rotate_half_head<T>(src, dst, cos, sin, a.rotary_half, false);
  }
  const int64_t rotary_dim = 2 * a.rotary_half;
  if (src != dst && rotary_dim < a.head_dim) {
    std::memcpy(dst + rotary_dim, src + rotary_dim, static_cast<size_t>(a.head_dim - rotary_dim) * sizeof(T));
  }
}

template <typename T>
void append_new_tokens(const KVCacheCpuParams<T>& a, const at::Tensor& k, const at::Tensor& v) {
  T* k_cache = const_cast<T*>(a.k_cache);
  T* v_cache = const_cast<T*>(a.v_cache);
  const T* k_src = k.const_data_ptr<T>();
  const T* v_src = v.const_data_ptr<T>();
  const int64_t heads = a.n_kv_heads, d = a.head_dim;
  const size_t row_bytes = static_cast<size_t>(d) * sizeof(T);
  at::parallel_for(0, a.batch * a.seq_new * heads, std::max<int64_t>(1, 4096 / d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % heads, i = t / heads % a.seq_new, b = t / (heads * a.seq_new);
      const int64_t pos = a.seqlens[b] + i;
      const int64_t blk = a.block_of(b, pos / a.block_size), off = pos % a.block_size;
      T* kd = k_cache + blk * a.k_stride[0] + off * a.k_stride[1] + h * a.k_stride[2];
      T* vd = v_cache + blk * a.v_stride[0] + off * a.v_stride[1] + h * a.v_stride[2];
      const T* ks = k_src + b * k.stride(0) + i * k.stride(1) + h * k.stride(2);
      const T* vs = v_src + b * v.stride(0) + i * v.stride(1) + h * v.stride(2);
      if (a.cos != nullptr) {
        rotate_head<T>(a, ks, kd, pos);
      } else {
        std::memcpy(kd, ks, row_bytes);
      }
      std::memcpy(vd, vs, row_bytes);
    }
  });
}

// ---- stage 3: attention -----------------------------------------------------------------------

// dst[0, d) <- src[0, d) widened to acc_t.
template <typename T>
inline void widen_row(const T* src, at::opmath_type<T>* dst, int64_t d) {
  using IO = VecIO<T>;
  constexpr int64_t W = IO::kWidth;
  int64_t c = 0;
  for (; c + W <= d; c += W) IO::load(src + c).store(dst + c);
  if (c < d) IO::load_partial(src + c, d - c).store(dst + c, d - c);
}

// Brings a key block's rows into cache in address order: one word of every 64-byte line of the
// rows rows[j] + hh head_stride (row_bytes each), keys j < n, heads hh < nh: for the blocks that
// PhaseOrder does not take. The score tiles read four keys' rows side by side (and the P V
// strips several), so where several keys' rows share a 4 KB page the page is read out of order,
// and the L2 stream prefetcher, which tracks ascending lines within a page, gives up: a bf16
// block then streams from DRAM at about a third of a linear read. Read linearly first, the block
// (2 x 64 keys x the task's heads, 256 KB at 8 x 128 bf16) is then served from L2. On Zen 4
// (2026-12-02, b1 32/8 x 128 bf16, cache evicted before each call as in a many-layer model) this
// made a decode step 1.45-1.52x faster at 4096 keys than the tiles alone (1.33x paged, 1.41x at
// b8 x 1024; 1.30-1.47x at the avx2 and avx512 levels); a cache that is already in L2/L3 pays
// for the extra pass, 10-16% at 512-2048 keys, which phase order does not.
template <typename T>
inline void touch_rows(const T* const* rows, int64_t n, int64_t nh, int64_t head_stride, int64_t row_bytes) {
  uint64_t sink = 0;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t hh = 0; hh < nh; ++hh) {
      const char* row = reinterpret_cast<const char*>(rows[j] + hh * head_stride);
      for (int64_t byte = 0; byte < row_bytes; byte += 64) {
        uint64_t word;
        std::memcpy(&word, row + byte, sizeof(word));
        sink ^= word;
      }
    }
  asm volatile("" : : "r"(sink));  // the loads are the point: keep them
}

// The next key block's K and V lines (rows [from, to) of k and of v, the task's nh heads each,
// row_bytes a head), prefetched to L2 (PREFETCHT1) a few at a time over this block's math, where
// it outlasts the block's reads (AMX P V, see attend), K's rows first, each row's heads in address
// order. Each of the block's three stages (BlockStage) issues a third of the lines, in as many
// parts as it has steps: after(stage, i, n) issues its share up to step i of n. The steps are a
// sub-tile's score tiles, a row's softmax, a 32-column chunk of a sub-tile's P V: tens of lines
// at most. A prefetch that finds the core's fill buffers taken waits for one, and so bursts wait
// on each other: with a burst per score group and per head's P V, perf put a fifth of the
// block's time on the prefetches, and steps this fine made an 8-token b1 4096 x 32/8 x 128 bf16
// verify step 1.13-1.16x faster (Emerald Rapids, 2026-12-06).
enum BlockStage : int64_t { kScoreStage, kSoftmaxStage, kPvStage };

template <typename T>
class PacedPrefetch {
 public:
  PacedPrefetch() = default;
  PacedPrefetch(const T* const* k, const T* const* v, int64_t from, int64_t to, int64_t nh, int64_t k_head_stride,
                int64_t v_head_stride, int64_t row_bytes)
      : rows_{k, v}, head_stride_{k_head_stride, v_head_stride}, from_(from), to_(to), nh_(nh),
        row_bytes_(row_bytes), row_(from), total_(2 * std::max<int64_t>(to - from, 0) * nh * (row_bytes / 64)) {}

  __attribute__((always_inline)) void after(BlockStage stage, int64_t i, int64_t n) { until(stage * n + i, 3 * n); }

 private:
  __attribute__((always_inline)) void until(int64_t share, int64_t of) {
    if (issued_ == total_) return;  // all issued, or none to issue: no division on other paths
    for (const int64_t target = total_ * share / of; issued_ < target; ++issued_) {
      __builtin_prefetch(reinterpret_cast<const char*>(rows_[kv_][row_] + head_ * head_stride_[kv_]) + byte_, 0, 2);
      if ((byte_ += 64) < row_bytes_) continue;
      byte_ = 0;
      if (++head_ < nh_) continue;
      head_ = 0;
      if (++row_ < to_) continue;
      row_ = from_, kv_ = 1;
    }
  }

  const T* const* rows_[2] = {nullptr, nullptr};
  int64_t head_stride_[2] = {0, 0};
  int64_t from_ = 0, to_ = 0, nh_ = 0, row_bytes_ = 64;
  int64_t kv_ = 0, row_ = 0, head_ = 0, byte_ = 0, issued_ = 0, total_ = 0;
};

// Where keys lie a page or more apart (fp32 rows of 8 heads x 128 are 4 KB), each key's row starts
// a page, and the L2 stream prefetcher, which does not cross pages, has to learn every row's stream
// from demand misses. A prefetch (to L2) of the first four lines of the rows kPrefetchKeys keys
// ahead starts those streams early: on Zen 4 (2026-12-02, fp32 32/8 x 128, in one process,
// alternating call by call) 1.06-1.14x at b1 4096 keys, paged16 and b8 x 1024, with the cache
// evicted or in L3. Whole rows instead: 0.80-0.90x; bf16 blocks in phase order: no change. Whole
// rows paced with the tiles (2026-12-03: each head's slice of the rows one score step or P V
// pass ahead, PREFETCHT1): 1.19-1.32x at 4096 keys in a slow spell of the shared VM, 0.98-1.04x
// in the three rounds after it (PREFETCHT0, T2 and NTA, or two and three steps ahead, no better).
// always_inline: GCC 12 judges an out-of-line function of prefetches alone free of side effects
// and deletes its calls.
template <typename T>
__attribute__((always_inline)) inline void prefetch_row_starts(const T* const* rows, int64_t from, int64_t to) {
  for (int64_t j = from; j < to; ++j) {
    const char* row = reinterpret_cast<const char*>(rows[j]);
    for (int64_t line = 0; line < 4; ++line) __builtin_prefetch(row + 64 * line, 0, 2);  // PREFETCHT1 on x86
  }
}

// The phase order of a key block, where keys lie under a page apart (bf16/fp16 rows of 8 heads x
// 128 are 2 KB: two keys a page). The score tiles read several keys' rows side by side and sweep
// the task's heads, and the P V strips do the same, so in address order every page is read out of
// order (row 0's head 0, row 1's head 0, row 0's head 1, ...), and the L2 stream prefetcher, which
// follows ascending lines within a page, drops it. In phase order the block is read in
// `phases` phases of kKeyBlock / phases keys, phase p taking keys p, p + phases, p + 2 phases, ...:
// as the keys per page divide `phases`, a phase reads at most one row of each page, and a page's
// rows in ascending phases, so every page is read in ascending order, in as many streams as a
// phase has keys. Phases are the P V passes, and whole score tiles. On Zen 4 (2026-12-02, 32/8 x
// 128 bf16, in one process, alternating call by call), against touch_rows and address order:
// - b1 4096 keys: 1.14-1.25x with the cache evicted before each call, 1.23-1.35x with it in L3
//   (touch_rows' extra pass costs there), against 8-key P V passes; against whole-block passes
//   after touch_rows, 1.03-1.06x evicted and 1.08-1.23x in L3 (1024 and 4096 keys);
// - paged16 1.14-1.23x, b8 x 1024 1.05-1.16x, fp16 1.07x, the avx512 level 1.08-1.15x, avx2
//   1.0-1.09x (the last four against whole-block passes).
// Eight phases beat four (1.06-1.12x) and sixteen (1.09-1.20x); two, 32 streams per P V pass,
// fall to 0.8x.
struct PhaseOrder {
  int64_t phases = 1;  // 1: address order
  // Key (within the block) of position i of the phase order.
  int64_t key(int64_t i) const {
    const int64_t per_phase = kKeyBlock / phases;
    return i / per_phase + i % per_phase * phases;
  }
};

// Vectors that start on a cache line (so do their rows, where a row is whole lines): the
// key-major tiles load and store whole O rows, and rows split across lines made them 1.26x slower
// with the cache in L3 and lost their overlap with DRAM (Zen 5, 2026-12-03/04). Their elements
// are default-initialized, which for these arithmetic types means not written at all: attend
// writes every element before it reads it (zeroing only the rows' padding), where zero-filling
// the ~100 KB of a task's buffers (bf16 element by element) took a fifth of a short decode call.
template <typename E>
struct CacheLineAllocator {
  using value_type = E;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  E* allocate(size_t n) { return static_cast<E*>(::operator new(n * sizeof(E), std::align_val_t(64))); }
  void deallocate(E* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  void construct(U* p) noexcept {
    static_assert(std::is_trivially_default_constructible_v<U>, "left unwritten: trivial types only");
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
};
template <typename E>
using AlignedVector = std::vector<E, CacheLineAllocator<E>>;

// Per-thread buffers of one task, rows padded to whole vectors (attend zeroes the padding of the q
// rows it writes). Made per call, left unwritten (CacheLineAllocator): kept across calls
// (thread_local) they saved about 2 us a call when they were zero-filled (2 threads, Zen 4:
// 1.13-1.22x at 16 keys, 1.03-1.07x at 100, none from 1K keys), too little for buffers that
// outlive the call.
template <typename T>
struct TaskBuffers {
  using acc_t = at::opmath_type<T>;
  AlignedVector<acc_t> q, o, s, m, l;
  std::vector<int64_t> lo, hi;
  AlignedVector<T> q_bits;       // the VDPBF16PS score path's q rows: as given (rotated), unscaled
  AlignedVector<T> p_bits;       // P rounded: [kMaxRows, kKeyBlock] (the VDPBF16PS and AMX P V paths)
  AlignedVector<T> p_rest;       // P - p_bits rounded, [kMaxRows, kKeyBlock] (AMX P V)
  AlignedVector<T> v_pairs;      // a block's V of two heads as AMX key pairs (AMX P V)
  AlignedVector<acc_t> scratch;  // the AMX score path's q tiles, sized on first use
  TaskBuffers(int64_t dpad)
      : q(kMaxRows * dpad), o(kMaxRows * dpad), s(kMaxRows * kKeyBlock), m(kMaxRows),
        l(kMaxRows), lo(kMaxRows), hi(kMaxRows) {}
};

template <typename T>
inline const T* cache_row(const T* base, const int64_t* stride, int64_t blk, int64_t off, int64_t h) {
  return base + blk * stride[0] + off * stride[1] + h * stride[2];
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Lane sums of eight fp32 vectors, lane i = sum of the lanes of acc[i]: one transposing hadd
// tree (AVX2, and AVX-512 after folding each vector's halves) instead of eight horizontal sums.
// always_inline (and lane_sums8): GCC 12 called it out of line, so the score tiles kept their
// accumulators on the stack, every FMA a load and a store (perf, Zen 3 at avx2).
__attribute__((always_inline)) inline __m256 lane_sums8_m256(const at::vec::Vectorized<float>* acc) {
  __m256 v[8];
  for (int i = 0; i < 8; ++i) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 x = acc[i];
    v[i] = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
#else
    v[i] = acc[i];
#endif
  }
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // s0123 = [0 1 2 3 | 0 1 2 3] (sums of the low and high 128-bit halves), likewise s4567.
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}
#endif

// Lane sums of eight vectors: out[i] = sum of the lanes of acc[i].
template <typename acc_t>
__attribute__((always_inline)) inline void lane_sums8(const at::vec::Vectorized<acc_t>* acc, acc_t* out) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    _mm256_storeu_ps(out, lane_sums8_m256(acc));
    return;
  }
#endif
  using Vec = at::vec::Vectorized<acc_t>;
  for (int i = 0; i < 8; ++i) {
    Vec x = acc[i];
    out[i] = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, x);
  }
}

// Elements [c, c + W) of a K/V row in acc_t (the row ends at d: a tail chunk is zero-padded).
template <typename T>
inline at::vec::Vectorized<at::opmath_type<T>> load_chunk(const T* row, int64_t c, int64_t d) {
  using IO = VecIO<T>;
  return c + IO::kWidth <= d ? IO::load(row + c) : IO::load_partial(row + c, d - c);
}

// Accumulators of score_tile: 16 (4 rows x 4 keys for a GQA group of 4, so that each q chunk
// serves four keys) for fp32 on AVX-512's 32 registers, 1.09-1.21x faster in decode than 4 x 2
// (Zen 4, b1 1024-4096 keys, cache in L3 or evicted); 8 elsewhere: AVX2 has 16 registers, and
// fp16, which widens each K chunk first, is 0.94x with 16.
template <typename T>
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kScoreAcc = std::is_same_v<T, float> ? 16 : 8;
#else
constexpr int kScoreAcc = 8;
#endif
static_assert(kScoreAcc<float> <= kScoreKeys, "a score tile of one row reads kScoreAcc keys");

// Scores of R query rows (q, dpad apart, scaled) against N / R keys: s[r * ld + t] = q_r . k_t,
// k_t = k[t] + off. Each K chunk is widened once in registers and serves all R rows.
template <typename T, int R, int N>
inline void score_tile(const at::opmath_type<T>* q, int64_t dpad, const T* const* k, int64_t off, int64_t d,
                       at::opmath_type<T>* s, int64_t ld) {
  using acc_t = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int J = N / R;
  constexpr int64_t W = Vec::size();
  const T* kt[J];
  for (int t = 0; t < J; ++t) kt[t] = k[t] + off;
  Vec acc[N];
  for (int i = 0; i < N; ++i) acc[i] = Vec(0);
  for (int64_t c = 0; c < d; c += W) {
    Vec kc[J];
    for (int t = 0; t < J; ++t) kc[t] = load_chunk<T>(kt[t], c, d);
    for (int r = 0; r < R; ++r) {
      const Vec qc = Vec::loadu(q + r * dpad + c);
      for (int t = 0; t < J; ++t) acc[r * J + t] = at::vec::fmadd(qc, kc[t], acc[r * J + t]);
    }
  }
  acc_t sums[N];
  for (int i = 0; i < N; i += 8) lane_sums8<acc_t>(acc + i, sums + i);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < J; ++t) s[r * ld + t] = sums[r * J + t];
}

// O_r[c, c + C W) += sum_j p[r, j] v_j[c, c + C W) for R rows (o and p rows ld_o / ld_p apart)
// over keys [0, n), v_j = v[j] + off: the output strip stays in registers over the keys, and each
// V chunk is widened once in registers and serves all R rows. kFull: the strip lies within the
// row's d elements (no partial loads).
template <typename T, int R, int C, bool kFull>
inline void pv_strip(const at::opmath_type<T>* p, int64_t ld_p, const T* const* v, int64_t off, int64_t n, int64_t c,
                     int64_t d, at::opmath_type<T>* o, int64_t ld_o) {
  using acc_t = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  using IO = VecIO<T>;
  constexpr int64_t W = Vec::size();
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int cc = 0; cc < C; ++cc) acc[r][cc] = Vec::loadu(o + r * ld_o + c + cc * W);
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v[j] + off + c;
    Vec vc[C];
    for (int cc = 0; cc < C; ++cc) vc[cc] = kFull ? IO::load(vj + cc * W) : load_chunk<T>(vj - c, c + cc * W, d);
    for (int r = 0; r < R; ++r) {
      const Vec pr(p[r * ld_p + j]);
      for (int cc = 0; cc < C; ++cc) acc[r][cc] = at::vec::fmadd(pr, vc[cc], acc[r][cc]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int cc = 0; cc < C; ++cc) acc[r][cc].store(o + r * ld_o + c + cc * W);
}

// The strips of a P V pass over a row of dpad elements: strip(c, chunks, full) for strips of two
// chunks of kChunkElems elements from c (one for what is left), chunks and full compile-time
// constants, full where the strip lies within the row's d elements (no partial loads).
template <int64_t kChunkElems, typename Strip>
inline void for_strips(int64_t d, int64_t dpad, const Strip& strip) {
  int64_t c = 0;
  for (; c + 2 * kChunkElems <= dpad; c += 2 * kChunkElems) {
    if (c + 2 * kChunkElems <= d) strip(c, std::integral_constant<int, 2>{}, std::true_type{});
    else strip(c, std::integral_constant<int, 2>{}, std::false_type{});
  }
  if (c < dpad) {
    if (c + kChunkElems <= d) strip(c, std::integral_constant<int, 1>{}, std::true_type{});
    else strip(c, std::integral_constant<int, 1>{}, std::false_type{});
  }
}

// O_r += sum_j p[r, j] v_j for R rows over keys [0, n), in strips of two vectors (one for what
// is left of dpad).
template <typename T, int R>
inline void pv_rows(const at::opmath_type<T>* p, int64_t ld_p, const T* const* v, int64_t off, int64_t n, int64_t d,
                    int64_t dpad, at::opmath_type<T>* o, int64_t ld_o) {
  for_strips<at::vec::Vectorized<at::opmath_type<T>>::size()>(d, dpad, [&](int64_t c, auto chunks, auto full) {
    pv_strip<T, R, decltype(chunks)::value, decltype(full)::value>(p, ld_p, v, off, n, c, d, o, ld_o);
  });
}

// Row tiles of 4 rows (then 2, then 1 for what is left) of nr rows: body(r, R) with R a
// compile-time constant.
template <typename Body>
inline void for_row_tiles(int64_t nr, const Body& body) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) body(r, std::integral_constant<int, 4>{});
  if (r + 2 <= nr) body(r, std::integral_constant<int, 2>{}), r += 2;
  if (r < nr) body(r, std::integral_constant<int, 1>{});
}

namespace pairs {
constexpr int64_t kChunk = cpu::Bf16Pairs::kElems;  // bf16 per full-width load: 32 on AVX-512, 16 on AVX2
// Accumulators of a score tile, R rows x kAcc / R keys: on AVX-512, 4 x 4 for a GQA group of 4,
// so that each q chunk serves four keys and each step has four keys' loads in flight (6-7% faster
// in decode at 4096 keys than 4 x 2); AVX2's 16 registers hold 4 x 2.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kAcc = 16;
#else
constexpr int kAcc = 8;
#endif
}  // namespace pairs
static_assert(pairs::kAcc <= kScoreKeys, "a score tile of one row reads kAcc keys");

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// ---- bf16 widened in pairs (AVX-512 and AVX2) --------------------------------------------------
// A full-width load holds 2 W bf16 (W fp32 lanes), widened as even/odd pairs (cpu_vec.h's
// Bf16Pairs): a shift and a mask widen them, where widening them in order takes two VPMOVZXWD
// (shuffles, which compete with the FMAs' port on Intel cores) and two shifts. The products are
// indifferent to the order within a chunk, so q is stored with each chunk's even elements first,
// then its odd ones (pair_order), the scores pair them with K's as they come, and O is
// accumulated in that order and put back into natural order once per task (natural_order). d
// pads to whole chunks. On Zen 3 at avx2 (2026-12-02, 32/8 x 128, in one process alternating call
// by call with element order, three rounds): 1.00-1.28x (mostly 1.04-1.16x) at b1 1024 and 4096
// keys, paged16 and b8 x 1024, with the cache in L3 or evicted.
namespace pairs {

using bf16 = c10::BFloat16;
using cpu::Bf16Pairs;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();

// Elements [0, count) of a chunk (count <= kChunk), zeros past count.
inline Bf16Pairs::Bits load_raw(const bf16* p, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  return count >= kChunk ? _mm512_loadu_si512(p)
                         : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t(1) << count) - 1), p);
#else
  if (count >= kChunk) return Bf16Pairs::load_bits(p);
  alignas(32) bf16 part[kChunk] = {};
  std::memcpy(part, p, count * sizeof(bf16));
  return Bf16Pairs::load_bits(part);
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// Each 32-element chunk of row[0, dpad), as halves a and b, becomes (a, b)[first] then
// (a, b)[second] (indices into the pair, as VPERMT2PS reads them).
inline void permute_chunks(float* row, int64_t dpad, __m512i first, __m512i second) {
  for (int64_t c = 0; c < dpad; c += kChunk) {
    const __m512 a = _mm512_loadu_ps(row + c), b = _mm512_loadu_ps(row + c + 16);
    _mm512_storeu_ps(row + c, _mm512_permutex2var_ps(a, first, b));
    _mm512_storeu_ps(row + c + 16, _mm512_permutex2var_ps(a, second, b));
  }
}

// row[0, dpad) in place: each chunk's elements 0, 2, .., 30 then 1, 3, .., 31.
inline void pair_order(float* row, int64_t dpad) {
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  permute_chunks(row, dpad, evens, _mm512_add_epi32(evens, _mm512_set1_epi32(1)));
}

// The inverse of pair_order.
inline void natural_order(float* row, int64_t dpad) {
  const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  permute_chunks(row, dpad, low, _mm512_add_epi32(low, _mm512_set1_epi32(8)));
}
#else
// row[0, dpad) in place: each 16-element chunk's elements 0, 2, .., 14 then 1, 3, .., 15.
inline void pair_order(float* row, int64_t dpad) {
  for (int64_t c = 0; c < dpad; c += kChunk) {
    const __m256 a = _mm256_loadu_ps(row + c), b = _mm256_loadu_ps(row + c + 8);
    // Per 128-bit half: [a0 a2 b0 b2 | a4 a6 b4 b6] (and the odd ones); quarters 0 2 1 3 then
    // put a's before b's.
    const __m256 even = _mm256_shuffle_ps(a, b, 0x88), odd = _mm256_shuffle_ps(a, b, 0xDD);
    _mm256_storeu_ps(row + c, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xD8)));
    _mm256_storeu_ps(row + c + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(odd), 0xD8)));
  }
}

// The inverse of pair_order.
inline void natural_order(float* row, int64_t dpad) {
  for (int64_t c = 0; c < dpad; c += kChunk) {
    const __m256 even = _mm256_loadu_ps(row + c), odd = _mm256_loadu_ps(row + c + 8);
    // [x0 x1 x2 x3 | x8 x9 x10 x11] and [x4 x5 x6 x7 | x12 x13 x14 x15]
    const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
    _mm256_storeu_ps(row + c, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(row + c + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}
#endif

// score_tile on pair-ordered q, with kAcc accumulators: R rows x kAcc / R keys. Each q and K
// chunk is loaded once into a register (cpu::in_register): GCC 12 folded them into the FMAs at
// AVX2, 20 loads per 16 FMAs of a 4 x 2 tile (two 256-bit loads a cycle: 10 cycles against the
// FMAs' 8), where 10 suffice. On Zen 4 at avx2 (2026-12-05, b1 32/8 x 128 bf16, one process,
// alternating, 8 rounds) 1.05-1.08x with the cache in L3 (1024 and 4096 keys), 1.01x from DRAM
// (the stream bounds it there); no change at the avx512 level.
template <int R>
inline void score_tile(const float* q, int64_t dpad, const bf16* const* k, int64_t off, int64_t d, float* s,
                       int64_t ld) {
  constexpr int J = kAcc / R;
  const bf16* kt[J];
  for (int t = 0; t < J; ++t) kt[t] = k[t] + off;
  const float* qr[R];
  for (int r = 0; r < R; ++r) qr[r] = q + r * dpad;
  Vec sum[kAcc];
  for (int i = 0; i < kAcc; ++i) sum[i] = Vec(0.f);
  const auto accumulate = [&](int64_t c, int64_t count) {
    Vec ke[J], ko[J];
    for (int t = 0; t < J; ++t) {
      const Bf16Pairs::Bits raw = cpu::in_register(load_raw(kt[t] + c, count));
      ke[t] = Bf16Pairs::even(raw);
      ko[t] = Bf16Pairs::odd(raw);
    }
    for (int r = 0; r < R; ++r) {
      const Vec qe = cpu::in_register(Vec::loadu(qr[r] + c)), qo = cpu::in_register(Vec::loadu(qr[r] + c + W));
      for (int t = 0; t < J; ++t) {
        sum[r * J + t] = at::vec::fmadd(qe, ke[t], sum[r * J + t]);
        sum[r * J + t] = at::vec::fmadd(qo, ko[t], sum[r * J + t]);
      }
    }
  };
  int64_t c = 0;
  for (; c + kChunk <= d; c += kChunk) accumulate(c, kChunk);
  if (c < d) accumulate(c, d - c);
  float sums[kAcc];
  for (int i = 0; i < kAcc; i += 8) lane_sums8<float>(sum + i, sums + i);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < J; ++t) s[r * ld + t] = sums[r * J + t];
}

// pv_strip on pair-ordered O: columns [c, c + kChunk C), C chunks. always_inline: GCC 12 called
// it out of line at AVX2, with its accumulators on the stack.
template <int R, int C, bool kFull>
__attribute__((always_inline)) inline void pv_strip(const float* p, int64_t ld_p, const bf16* const* v, int64_t off,
                                                    int64_t n, int64_t c, int64_t d, float* o, int64_t ld_o) {
  Vec acc[R][2 * C];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2 * C; ++h) acc[r][h] = Vec::loadu(o + r * ld_o + c + W * h);
  for (int64_t j = 0; j < n; ++j) {
    const bf16* vj = v[j] + off;
    Vec ve[C], vo[C];
    for (int cc = 0; cc < C; ++cc) {
      const int64_t at = c + cc * kChunk;
      const Bf16Pairs::Bits raw = kFull ? Bf16Pairs::load_bits(vj + at) : load_raw(vj + at, d - at);
      ve[cc] = Bf16Pairs::even(raw);
      vo[cc] = Bf16Pairs::odd(raw);
    }
    for (int r = 0; r < R; ++r) {
      const Vec pr(p[r * ld_p + j]);
      for (int cc = 0; cc < C; ++cc) {
        acc[r][2 * cc] = at::vec::fmadd(pr, ve[cc], acc[r][2 * cc]);
        acc[r][2 * cc + 1] = at::vec::fmadd(pr, vo[cc], acc[r][2 * cc + 1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2 * C; ++h) acc[r][h].store(o + r * ld_o + c + W * h);
}

// Strips of two chunks (one for what is left) where the registers hold their 4 R accumulators
// (AVX-512's 32); on AVX2's 16, one chunk at a time.
template <int R>
inline void pv_rows(const float* p, int64_t ld_p, const bf16* const* v, int64_t off, int64_t n, int64_t d,
                    int64_t dpad, float* o, int64_t ld_o) {
  for_strips<kChunk>(d, dpad, [&](int64_t c, auto chunks, auto full) {
    constexpr int kChunks = decltype(chunks)::value;
    constexpr bool kFull = decltype(full)::value;
#if defined(CPU_CAPABILITY_AVX512)
    pv_strip<R, kChunks, kFull>(p, ld_p, v, off, n, c, d, o, ld_o);
#else
    for (int cc = 0; cc < kChunks; ++cc) pv_strip<R, 1, kFull>(p, ld_p, v, off, n, c + cc * kChunk, d, o, ld_o);
#endif
  });
}

}  // namespace pairs
#else
namespace pairs {
// No pairs path at this level (kPairs is false): declared for the discarded branches only (as
// templates, which need no definition).
template <typename = void>
void pair_order(float* row, int64_t dpad);
template <typename = void>
void natural_order(float* row, int64_t dpad);
template <int R>
void score_tile(const float* q, int64_t dpad, const c10::BFloat16* const* k, int64_t off, int64_t d, float* s,
                int64_t ld);
template <int R>
void pv_rows(const float* p, int64_t ld_p, const c10::BFloat16* const* v, int64_t off, int64_t n, int64_t d,
             int64_t dpad, float* o, int64_t ld_o);
}  // namespace pairs
#endif

// ---- Key-major tiles: decode with the cache streaming from DRAM ------------------------------
// The tiles above read a few keys' rows side by side, head by head, and leave the streaming to
// the hardware prefetchers (phase order); the math and the memory stalls then barely overlap (a
// step from DRAM takes about its L3 time plus a plain read's). Where a task covers every kv head
// of a contiguous cache (whole rows, heads side by side, keys one after the other) and its shape
// is one compiled below, it reads each key's row whole instead, key after key: the scores take
// one key against every head and row, the P V eight keys against every head and row, and a
// software prefetch runs ~16 KB ahead in the same order (the block's K rows, its V rows, the next
// block's K rows): one ascending run, which the core keeps in flight while it multiplies. The
// shape (d, heads, rows, and so the head stride) must be compile-time: with the head stride
// alone a run-time value the overlap was lost. Against the other tiles (Zen 5, 2 threads, bf16,
// 2026-12-04, alternating in one process; benchmarks/RESULTS.md), from DRAM: b1 4096 32/8 x 128
// 1.09-1.16x, b1 2048 1.19x, b1 1024 1.11x, b1 16384 1.06x, 32/8 x 64 1.12x, 64/8 x 128 1.07x,
// 16/8 x 256 1.07x, b8 x 1024 1.01-1.02x; with the cache resident in L3 0.90-0.97x (b1 1024-4096),
// but in a model's decode step the weights evict a layer's cache between two steps. A paged
// cache's blocks break the run (paged16: 0.91-0.98x), so paged caches keep the other tiles.

// fp32 takes them at the AVX-512 levels where a key's row (every head) is at most a page, on the
// FMAs (namespace fma_key_major): against the other tiles (Zen 5, 2026-12-04, one process, 8-10
// rounds) from DRAM b1 4096 32/8 x 128 1.12-1.15x, b1 1024 1.09x, b1 2048 1.10x, b8 x 1024 1.14x,
// b1 16384 1.20x, 32/8 x 64 1.11x, 64/8 x 128 1.22x, 32/4 x 128 1.49x, 16/4 x 256 1.09x; in L3
// 0.87-0.96x at b1; 8 KB rows (8 heads x 256) lost, 0.90-0.96x from DRAM. bf16 takes them at
// avx512_bf16 on VDPBF16PS (namespace dot). At the avx2 level they lost: the same tiles on 8-float
// vectors (scores of up to 8 head x row accumulators per key, P V strips of 4 rows x 2 vectors),
// fp32 and bf16 widened in pairs, with the prefetch and without, ran 0.55-0.75x as fast as the
// other tiles on Zen 3 (2026-12-04, 2 threads, alternating in one process: b1 4096 32/8 x 128
// bf16 0.74x in L3 and 0.60x from DRAM, fp32 0.64x and 0.62x, b8 x 1024 0.64x, b1 16384 0.65x).

// On Zen 4 they lose everywhere (2026-12-05, a 2-core VM of AMD family 25 model 17, DRAM copy 36-52
// GB/s; the same contiguous caches read by both tiles in alternation in one process, 12 rounds;
// benchmarks/RESULTS.md): from DRAM, bf16 b1 4096 32/8 x 128 0.68-0.74x, b1 1024 0.73x, b1 16384
// 0.70x, b8 x 1024 0.72x, 32/8 x 64 0.70x, 64/8 x 128 0.67x, 16/8 x 256 0.87x; fp32 b1 4096
// 0.72-0.73x, b1 1024 0.73x, b1 16384 0.74x, b8 x 1024 0.75x, 32/4 x 128 0.65x; in L3 bf16
// 0.82-0.83x. There the other tiles' phase order already overlaps the stream with the math (bf16 b1
// 4096 at 0.54-0.62 ms from DRAM, 0.31-0.33 ms in L3), and the software prefetch costs: the
// key-major tiles without it took 0.70 ms against 0.83, with PREFETCHT1 0.60 ms; 2-8 KB ahead
// instead of 16 KB changed nothing. So the tiles run where they were measured to win, AMD family
// 0x1A (Zen 5) and later, and the other tiles everywhere else (Zen 4, and Intel, where neither was
// measured against the other). The loader chooses (llama_ext/_cpu_kernels.py);
// LLAMA_EXT_CPU_DECODE_KEY_MAJOR=1 or 0 overrides it, which the tests use to run both on any
// AVX-512 CPU. The two give the same bits in fp32 and agree within bf16's rounding of P.

// Whether decode takes the key-major tiles where they apply: set by the loader at import, before
// any op runs (llama_ext_cpu_decode_key_major below).
std::atomic<bool> g_key_major_tiles{false};

// Calls f(D, NH, R) (integral constants) for the shapes the key-major tiles compile, head dim D
// of 64, 128 or 256 and NH heads, R rows per head of 1, 2, 4 or 8, and returns true; false for
// any other shape.
template <typename F>
bool with_key_major_shape(int64_t d, int64_t nh, int64_t nr, F&& f) {
  const auto by_rows = [&](auto dd, auto h) {
    switch (nr) {
      case 1: return f(dd, h, std::integral_constant<int, 1>{}), true;
      case 2: return f(dd, h, std::integral_constant<int, 2>{}), true;
      case 4: return f(dd, h, std::integral_constant<int, 4>{}), true;
      case 8: return f(dd, h, std::integral_constant<int, 8>{}), true;
      default: return false;
    }
  };
  const auto by_heads = [&](auto dd) {
    switch (nh) {
      case 1: return by_rows(dd, std::integral_constant<int, 1>{});
      case 2: return by_rows(dd, std::integral_constant<int, 2>{});
      case 4: return by_rows(dd, std::integral_constant<int, 4>{});
      case 8: return by_rows(dd, std::integral_constant<int, 8>{});
      default: return false;
    }
  };
  switch (d) {
    case 64: return by_heads(std::integral_constant<int, 64>{});
    case 128: return by_heads(std::integral_constant<int, 128>{});
    case 256: return by_heads(std::integral_constant<int, 256>{});
    default: return false;
  }
}

// q of a key-major task, per head and 64-byte chunk (kChunk elements of T): element e of row r
// of head x at ((x C + e / kChunk) R + r) kChunk + e % kChunk with C = d / kChunk, so that a
// tile's q chunks lie at constant offsets.
template <typename T>
inline int64_t key_major_q_offset(int64_t x, int64_t r, int64_t e, int64_t nr, int64_t d) {
  constexpr int64_t kChunk = 64 / sizeof(T);
  return ((x * (d / kChunk) + e / kChunk) * nr + r) * kChunk + e % kChunk;
}

// Keys the prefetch runs ahead of the scores and the P V: about 16 KB of rows, an even count.
constexpr int64_t key_major_ahead(int64_t row_bytes) { return std::clamp<int64_t>(16384 / row_bytes, 2, 32) / 2 * 2; }

// Every line of one key's row (kRowBytes, every head), to L1 (PREFETCHT0). always_inline: GCC 12
// deletes the calls of an out-of-line function of prefetches alone.
template <int64_t kRowBytes>
__attribute__((always_inline)) inline void prefetch_row(const void* row) {
  for (int64_t line = 0; line < kRowBytes; line += 64) __builtin_prefetch(static_cast<const char*>(row) + line, 0, 3);
}

#if defined(CPU_CAPABILITY_AVX512)
// s[(x R + r) ld] = scale (q_{x,r} . k_x) for one key (its row at k, head x at x D elements:
// the heads side by side), every head x < NH and row r < R, q in key_major_q_offset's layout:
// tiles of HT heads x R rows (8 accumulators at most), each 64-byte K chunk loaded once for the
// R rows of its head; madd(acc, q chunk, k chunk) adds a chunk's products into acc.
template <int D, int NH, int R, typename E, typename Madd>
__attribute__((always_inline)) inline void key_major_scores(const E* q, const E* k, float scale, float* s, int64_t ld,
                                                            Madd madd) {
  constexpr int kChunk = 64 / sizeof(E), C = D / kChunk, HT = std::min(NH, 8 / R);
  static_assert(NH % HT == 0, "whole tiles of heads");
  for (int x0 = 0; x0 < NH; x0 += HT) {
    __m512 acc[HT * R];
    for (int i = 0; i < HT * R; ++i) acc[i] = _mm512_setzero_ps();
    for (int c = 0; c < C; ++c)
      for (int h = 0; h < HT; ++h) {
        const __m512i kc = _mm512_loadu_si512(k + ((x0 + h) * C + c) * kChunk);
        for (int r = 0; r < R; ++r)
          acc[h * R + r] = madd(acc[h * R + r], _mm512_loadu_si512(q + (((x0 + h) * C + c) * R + r) * kChunk), kc);
      }
    // Eight sums by one transposing tree rather than eight horizontal sums: 1.05-1.11x with the
    // cache in L3, 1.03-1.06x from DRAM (bf16, b1 1024/4096, 64/8 and 32/8 x 128, Zen 5,
    // 2026-12-04).
    if constexpr (HT * R == 8) {
      at::vec::Vectorized<float> sums8[8];
      for (int i = 0; i < 8; ++i) sums8[i] = acc[i];
      alignas(32) float sums[8];
      _mm256_store_ps(sums, _mm256_mul_ps(lane_sums8_m256(sums8), _mm256_set1_ps(scale)));
      for (int i = 0; i < 8; ++i) s[(x0 * R + i) * ld] = sums[i];
    } else {
      for (int i = 0; i < HT * R; ++i) s[(x0 * R + i) * ld] = _mm512_reduce_add_ps(acc[i]) * scale;
    }
  }
}

// fp32 key-major tiles on the FMAs: the bf16 ones of namespace dot with 16-float chunks.
namespace fma_key_major {

// s[(x R + r) ld] = q_{x,r} . k_x (q pre-scaled) for one key, every head x < NH and row r < R
// (key_major_scores).
template <int D, int NH, int R>
__attribute__((always_inline)) inline void key_scores(const float* q, const float* k, float* s, int64_t ld) {
  key_major_scores<D, NH, R>(q, k, 1.0f, s, ld, [](__m512 acc, __m512i qc, __m512i kc) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(qc), _mm512_castsi512_ps(kc), acc);
  });
}

// O_{x,r} += sum_j p[x R + r, j] v_j over P keys (rows v[j], head x at x D elements), every head
// x < NH and row r < R: p rows ld_p apart, O rows D apart; strips of up to 16 accumulators held
// over the P keys, each broadcast p serving a strip's vectors.
template <int D, int NH, int R, int P>
__attribute__((always_inline)) inline void keys_pv(const float* p, int64_t ld_p, const float* const* v, float* o) {
  constexpr int C = D / 16, kStrip = std::min(C, 16 / R);
  for (int x = 0; x < NH; ++x)
    for (int c = 0; c < C; c += kStrip) {
      __m512 acc[R][kStrip];
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < kStrip; ++u) acc[r][u] = _mm512_loadu_ps(o + (x * R + r) * D + (c + u) * 16);
      for (int j = 0; j < P; ++j) {
        __m512 vc[kStrip];
        for (int u = 0; u < kStrip; ++u) vc[u] = _mm512_loadu_ps(v[j] + x * D + (c + u) * 16);
        for (int r = 0; r < R; ++r) {
          const __m512 pr = _mm512_set1_ps(p[(x * R + r) * ld_p + j]);
          for (int u = 0; u < kStrip; ++u) acc[r][u] = _mm512_fmadd_ps(pr, vc[u], acc[r][u]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < kStrip; ++u) _mm512_storeu_ps(o + (x * R + r) * D + (c + u) * 16, acc[r][u]);
    }
}

}  // namespace fma_key_major
#else
namespace fma_key_major {
// No AVX-512 at this level (kFmaKeyMajor is false): declared for the discarded branches only.
template <int D, int NH, int R>
void key_scores(const float* q, const float* k, float* s, int64_t ld);
template <int D, int NH, int R, int P>
void keys_pv(const float* p, int64_t ld_p, const float* const* v, float* o);
}  // namespace fma_key_major
#endif

#if defined(LLAMA_EXT_BF16_DOT)
// ---- bf16 scores (and P V) on VDPBF16PS (avx512_bf16 and amx_bf16) ----------------------------
// One VDPBF16PS multiplies 32 bf16 of q by 32 of K as they lie in memory and adds them into 16
// fp32 lanes in pairs: 32 products per instruction with no widening, against 16 per FMA after
// one. Where it issues at the FMA rate (Zen 4: one 512-bit instruction per cycle either way) the
// scores take half the FMA port; on Sapphire Rapids it issues at half that rate, no faster
// than the pairs path, and amx_bf16 scores whole tiles on AMX anyway. q is taken as given
// (rotated and rounded, unscaled, zero past d) and the scale multiplies S. The products are
// exact in fp32 and accumulate in fp32; bf16 subnormal inputs read as zero (as on AMX).
namespace dot {

using bf16 = c10::BFloat16;

// s[r * ld + t] = scale (q_r . k_t) for R rows (q rows dpad apart) x kAcc / R keys.
template <int R>
inline void score_tile(const bf16* q, int64_t dpad, const bf16* const* k, int64_t off, int64_t d, float scale,
                       float* s, int64_t ld) {
  constexpr int J = pairs::kAcc / R;
  const bf16* kt[J];
  for (int t = 0; t < J; ++t) kt[t] = k[t] + off;
  __m512 sum[pairs::kAcc];
  for (int i = 0; i < pairs::kAcc; ++i) sum[i] = _mm512_setzero_ps();
  const auto accumulate = [&](int64_t c, int64_t count) {
    __m512bh kc[J];
    for (int t = 0; t < J; ++t) kc[t] = (__m512bh)pairs::load_raw(kt[t] + c, count);
    for (int r = 0; r < R; ++r) {
      const __m512bh qc = (__m512bh)_mm512_loadu_si512(q + r * dpad + c);
      for (int t = 0; t < J; ++t) sum[r * J + t] = _mm512_dpbf16_ps(sum[r * J + t], qc, kc[t]);
    }
  };
  int64_t c = 0;
  for (; c + pairs::kChunk <= d; c += pairs::kChunk) accumulate(c, pairs::kChunk);
  if (c < d) accumulate(c, d - c);
  at::vec::Vectorized<float> acc[pairs::kAcc];
  for (int i = 0; i < pairs::kAcc; ++i) acc[i] = sum[i];
  // The 16 sums, row-major (r * J + t), stay in registers, scaled as one vector: through memory,
  // a 512-bit load of two 256-bit stores waits for them (store forwarding fails; 1.02-1.05x with
  // the cache in L3).
  static_assert(pairs::kAcc == 16, "the scale multiplies the sums as one vector");
  const __m512 sums = _mm512_mul_ps(
      _mm512_insertf32x8(_mm512_castps256_ps512(lane_sums8_m256(acc)), lane_sums8_m256(acc + 8), 1),
      _mm512_set1_ps(scale));
  if constexpr (R == 4) {  // rows of 4 keys
    _mm_storeu_ps(s, _mm512_castps512_ps128(sums));
    _mm_storeu_ps(s + ld, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(s + 2 * ld, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(s + 3 * ld, _mm512_extractf32x4_ps(sums, 3));
  } else if constexpr (R == 2) {  // rows of 8 keys
    _mm256_storeu_ps(s, _mm512_castps512_ps256(sums));
    _mm256_storeu_ps(s + ld, _mm512_extractf32x8_ps(sums, 1));
  } else {
    static_assert(R == 1, "score tiles have 4, 2 or 1 rows");
    _mm512_storeu_ps(s, sums);
  }
}

// P V on VDPBF16PS: O_r += sum_j p[r, j] v_j with P rounded to bf16, two keys per instruction.
// The rows of keys j and j + 1 are interleaved element by element (VPUNPCKLWD/HWD, within each
// 128-bit lane), so each 32-bit lane holds (v_j[e], v_{j+1}[e]) and meets the pair
// (p[r, j], p[r, j + 1]) broadcast to every lane: 32 products per instruction, with no widening,
// against 16 per FMA. The unpacks leave a 32-element chunk's elements in lane order
// 0-3, 8-11, 16-19, 24-27 (first vector), 4-7, 12-15, 20-23, 28-31 (second): O is accumulated in
// that order and put back once per task (natural_order).

// O_r[chunks c .. c + C) for R rows over key pairs [0, n) (n even), p rows ld_p apart (bf16),
// v_j = v[j] + off.
template <int R, int C, bool kFull>
inline void pv_strip(const bf16* p, int64_t ld_p, const bf16* const* v, int64_t off, int64_t n, int64_t c, int64_t d,
                     float* o, int64_t ld_o) {
  __m512 acc[R][2 * C];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2 * C; ++h) acc[r][h] = _mm512_loadu_ps(o + r * ld_o + c + 16 * h);
  for (int64_t j = 0; j < n; j += 2) {
    const bf16* v0 = v[j] + off;
    const bf16* v1 = v[j + 1] + off;
    __m512i lo[C], hi[C];
    for (int cc = 0; cc < C; ++cc) {
      const int64_t at = c + cc * pairs::kChunk;
      const __m512i r0 = kFull ? _mm512_loadu_si512(v0 + at) : pairs::load_raw(v0 + at, d - at);
      const __m512i r1 = kFull ? _mm512_loadu_si512(v1 + at) : pairs::load_raw(v1 + at, d - at);
      lo[cc] = _mm512_unpacklo_epi16(r0, r1);
      hi[cc] = _mm512_unpackhi_epi16(r0, r1);
    }
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, p + r * ld_p + j, sizeof(pair));
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int cc = 0; cc < C; ++cc) {
        acc[r][2 * cc] = _mm512_dpbf16_ps(acc[r][2 * cc], (__m512bh)lo[cc], pr);
        acc[r][2 * cc + 1] = _mm512_dpbf16_ps(acc[r][2 * cc + 1], (__m512bh)hi[cc], pr);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2 * C; ++h) _mm512_storeu_ps(o + r * ld_o + c + 16 * h, acc[r][h]);
}

template <int R>
inline void pv_rows(const bf16* p, int64_t ld_p, const bf16* const* v, int64_t off, int64_t n, int64_t d,
                    int64_t dpad, float* o, int64_t ld_o) {
  for_strips<pairs::kChunk>(d, dpad, [&](int64_t c, auto chunks, auto full) {
    pv_strip<R, decltype(chunks)::value, decltype(full)::value>(p, ld_p, v, off, n, c, d, o, ld_o);
  });
}

// row[0, dpad) in place, from the unpacks' order (above) to natural order.
inline void natural_order(float* row, int64_t dpad) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  pairs::permute_chunks(row, dpad, first, _mm512_add_epi32(first, _mm512_set1_epi32(8)));
}

// The bf16 key-major tiles (see "Key-major tiles" above), C 64-byte chunks a head (d = 32 C).

// s[(x R + r) ld] = scale (q_{x,r} . k_x) for one key, every head x < NH and row r < R
// (key_major_scores), two products a lane per VDPBF16PS.
template <int C, int NH, int R>
__attribute__((always_inline)) inline void key_scores(const bf16* q, const bf16* k, float scale, float* s, int64_t ld) {
  key_major_scores<C * 32, NH, R>(q, k, scale, s, ld, [](__m512 acc, __m512i qc, __m512i kc) {
    return _mm512_dpbf16_ps(acc, (__m512bh)qc, (__m512bh)kc);
  });
}

// O_{x,r} += sum_j p[x R + r, j] v_j over the 2P keys j of P key pairs (rows v[j], head x at
// x d elements), every head x < NH and row r < R: p rows ld_p apart, O rows d apart. pv_strip
// per head and strip of chunks, so each O strip stays in registers over the P pairs (their rows
// are in L1 by then): through L1 for every pair, the step was 0.74-0.97x as fast in L3.
template <int C, int NH, int R, int P>
__attribute__((always_inline)) inline void key_pairs_pv(const bf16* p, int64_t ld_p, const bf16* const* v, float* o) {
  constexpr int64_t d = C * pairs::kChunk;
  // Two chunks a strip where their 4 R accumulators fit (with the unpacked V pairs) in the 32
  // registers, so that each broadcast p pair serves four products: 1.03-1.06x from DRAM (b1
  // 1024/4096, d 64/128/256), the same in L3 (Zen 5, 2026-12-04).
  constexpr int kStripChunks = (R <= 4 && C % 2 == 0) ? 2 : 1;
  for (int x = 0; x < NH; ++x)
    for (int c = 0; c < C; c += kStripChunks)
      pv_strip<R, kStripChunks, true>(p + x * R * ld_p, ld_p, v, x * d, 2 * P, c * pairs::kChunk, d, o + x * R * d, d);
}

}  // namespace dot
#else
namespace dot {
// No VDPBF16PS at this level (kDot is false): declared for the discarded branches only (as
// templates, which need no definition).
template <int R>
void score_tile(const c10::BFloat16* q, int64_t dpad, const c10::BFloat16* const* k, int64_t off, int64_t d,
                float scale, float* s, int64_t ld);
template <int R>
void pv_rows(const c10::BFloat16* p, int64_t ld_p, const c10::BFloat16* const* v, int64_t off, int64_t n, int64_t d,
             int64_t dpad, float* o, int64_t ld_o);
template <typename = void>
void natural_order(float* row, int64_t dpad);
template <int C, int NH, int R>
void key_scores(const c10::BFloat16* q, const c10::BFloat16* k, float scale, float* s, int64_t ld);
template <int C, int NH, int R, int P>
void key_pairs_pv(const c10::BFloat16* p, int64_t ld_p, const c10::BFloat16* const* v, float* o);
}  // namespace dot
#endif

constexpr int64_t kAmxPvMinRows = 7;  // rows per kv head from which P V runs on AMX (amx_tiles)
constexpr int64_t kPrefetchNextMinRows = 16;  // and from which the next block is prefetched (see attend)
constexpr int64_t kAmxTileRows = 16;  // rows of a head an AMX tile holds: S^T's columns, O's rows

// A head's nr rows (up to kMaxRows) on AMX tiles: `count` sub-tiles of `rows` rows each, padded by
// fewer than `count` rows, which see no key and are never stored. More than 16 rows a head (G x
// seq_q: 5 query tokens of a group of 4, 3 of a group of 8) keep the tiles instead of falling back
// to the FMAs, and each K/V block, read once, serves every sub-tile.
struct AmxRowTiles {
  int64_t count, rows;
  explicit AmxRowTiles(int64_t nr)
      : count(std::max<int64_t>(1, (nr + kAmxTileRows - 1) / kAmxTileRows)), rows((nr + count - 1) / count) {}
  int64_t head_rows() const { return count * rows; }
};

#if defined(LLAMA_EXT_AMX)
// ---- bf16 scores on AMX tiles (amx_bf16) ------------------------------------------------------
// S^T[key, r] = K q^T: per 16 keys and sub-tile of a kv head's rows (AmxRowTiles), one C tile
// [16 keys, cols] (fp32; cols: its rows rounded up to a power of two, score_columns), d/32
// TDPBF16PS with 16 K rows as A, tile-loaded straight from the cache (one row stride), and the
// bf16 q rows as B (VNNI pairs, unscaled: the scale multiplies S). The products are exact and
// accumulate in fp32, as on FMAs (bf16 subnormals read as zero, as TDPBF16PS does). The task's
// heads are taken one after another for each 16 keys, so the K block is still read in address
// order. A tile that is not 16 equally spaced rows (a paged block boundary, the padded tail) is
// scored on FMAs.
//
// P V on AMX where a head has kAmxPvMinRows rows or more (namespace amx_tiles, pv): O [nr, 16
// columns] C tiles += P [nr, 32 keys] x V [32 keys, 16 columns]. V is restaged into key pairs
// (stage_v: two rows' 64-byte chunks into a chunk's even and odd columns, a shift and a blend
// each), the columns of pair order (pairs::pair_order), so O keeps the FMA path's order and a task
// may mix the two. P is exact to about 2^-16 of itself: its bf16 rounding plus the rounded rest
// (split_p), two products each. The FMAs' cost grows with the rows, the tiles' hardly: P V on
// them takes 4 R FMAs per key and 32-element chunk, the tiles a product per 32 keys and 16
// columns whatever the rows (up to 16), plus the restaging of V. A tile load of rows that vector
// stores have just written stalls (~13 ns): each head's V is staged while the last head's
// products run, and P is split for every head before the first product.
namespace amx_tiles {

using bf16 = c10::BFloat16;
constexpr int64_t kKeys = 16;     // keys per S^T tile
constexpr int64_t kChunk = 32;    // bf16 per 64-byte tile row
constexpr int64_t kPvKeys = 32;   // keys per P V product (a B tile's pairs)
// Tile registers: the tile intrinsics paste their numbers into the assembly. V's odd columns
// take K's tile, which has V's shape (16 rows of 64 bytes) and is idle during P V.
#define LLAMA_EXT_TMM_S 0       // S^T, fp32 [16 keys, cols]
#define LLAMA_EXT_TMM_K 1       // K, bf16 [16 keys, 32]; in P V, V's odd columns
#define LLAMA_EXT_TMM_Q 2       // q, bf16 pairs [16, cols, 2]
#define LLAMA_EXT_TMM_P_HI 3    // P rounded to bf16 [nr, 32 keys] (nr: a sub-tile's rows)
#define LLAMA_EXT_TMM_P_LO 4    // P - P_HI rounded to bf16
#define LLAMA_EXT_TMM_V_EVEN 5  // V's even columns, bf16 key pairs [16, 16, 2]
#define LLAMA_EXT_TMM_O_EVEN 6  // O, fp32 [nr, 16]: a chunk's even columns (pair order: its first 16)
#define LLAMA_EXT_TMM_O_ODD 7   // and its odd ones
#define LLAMA_EXT_TMM_V_ODD LLAMA_EXT_TMM_K

// The score tiles (S^T with `cols` columns, score_columns(nr)), and with pv the P V tiles too,
// for sub-tiles of nr rows (AmxRowTiles::rows).
inline void configure(int64_t nr, int64_t cols, bool pv) {
  cpu::amx::TileConfig cfg;
  const auto set = [&](int tile, int64_t rows, int64_t bytes) {
    cfg.rows[tile] = static_cast<uint8_t>(rows);
    cfg.bytes_per_row[tile] = static_cast<uint16_t>(bytes);
  };
  set(LLAMA_EXT_TMM_S, kKeys, 4 * cols);
  set(LLAMA_EXT_TMM_K, kKeys, 64);
  set(LLAMA_EXT_TMM_Q, kChunk / 2, 4 * cols);
  if (pv) {
    set(LLAMA_EXT_TMM_P_HI, nr, 64);
    set(LLAMA_EXT_TMM_P_LO, nr, 64);
    set(LLAMA_EXT_TMM_V_EVEN, kPvKeys / 2, 64);
    set(LLAMA_EXT_TMM_O_EVEN, nr, 64);
    set(LLAMA_EXT_TMM_O_ODD, nr, 64);
  }
  cpu::amx::load_config(cfg);
}

// The columns of the S^T tiles for nr rows per head: nr rounded up to a power of two, so that
// store_rows_of_columns transposes them by unzipping registers (a row past nr is a column of
// zeros in q, its scores never stored).
inline int64_t score_columns(int64_t nr) {
  int64_t cols = 1;
  while (cols < nr) cols *= 2;
  return cols;
}

// q row n (< cols) of head hh as B tiles of `cols` columns: the pair (q[2i], q[2i + 1]) of chunk
// c at qb[((hh * chunks + c) * 16 + i) * cols + n] (pairs of bf16), with chunks = d / 32; d is a
// multiple of 32. Chunk c's pair i is the row's pair p = 16 c + i, so pair p lands in pair row
// hh * d / 2 + p, whole pairs copied as 4 bytes (q's rows may start at any bf16).
inline void store_q(const bf16* q, int64_t d, int64_t hh, int64_t n, int64_t cols, bf16* qb) {
  static_assert(kChunk % 2 == 0, "a chunk holds whole pairs");
  bf16* dst = qb + 2 * (hh * (d / 2) * cols + n);
  for (int64_t p = 0; p < d / 2; ++p) std::memcpy(dst + 2 * p * cols, q + 2 * p, 2 * sizeof(bf16));
}

// s[r ld + t] = scale st[t NR + r] for rows r < nr: S^T [16 keys, NR] (rows NR apart) transposed,
// for NR a power of two up to 16. log2(NR) rounds unzip pairs of registers into their even and
// odd elements, the evens to the first half: each round halves the rows interleaved in a
// register, and register r ends as row r. NR log2(NR) two-register permutes, where a gather per
// row loads 16 elements one by one. At 4 rows (32/8 x 128 bf16, b1, 1024-4096 keys, contiguous
// and paged16, in one process alternating with the gathers, Emerald Rapids) a decode step ran
// 1.01-1.07x as fast.
template <int NR>
inline void store_rows_of_columns(const float* st, __m512 scale, float* s, int64_t ld, int64_t nr) {
  static_assert(NR >= 1 && NR <= 16 && (NR & (NR - 1)) == 0, "rows: a power of two up to 16");
  __m512 z[NR];
  for (int i = 0; i < NR; ++i) z[i] = _mm512_load_ps(st + 16 * i);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int interleaved = NR; interleaved > 1; interleaved /= 2) {
    __m512 unzipped[NR];
    for (int i = 0; i < NR / 2; ++i) {
      unzipped[i] = _mm512_permutex2var_ps(z[2 * i], even, z[2 * i + 1]);
      unzipped[NR / 2 + i] = _mm512_permutex2var_ps(z[2 * i], odd, z[2 * i + 1]);
    }
    for (int i = 0; i < NR; ++i) z[i] = unzipped[i];
  }
  for (int r = 0; r < NR; ++r)
    if (r < nr) _mm512_storeu_ps(s + r * ld, _mm512_mul_ps(z[r], scale));
}

// s[(hh tiles.head_rows() + r) ld + t] = scale (q_r . k_t) for the 16 keys k_t = k[t] + hh head
// strides (rows k_row_stride elements apart) of each head hh < nh, its rows r in sub-tiles of
// tiles.rows; q as store_q wrote it, `cols` columns (score_columns(tiles.rows)) a sub-tile.
// noinline: inlined into attend, the b1 4 rows-a-head decode step ran ~1% slower.
template <typename Between>
__attribute__((noinline)) void scores(const bf16* qb, AmxRowTiles tiles, int64_t cols, int64_t nh, const bf16* k,
                                      int64_t k_head_stride, int64_t k_row_stride, int64_t d, float scale, float* s,
                                      int64_t ld, Between&& between) {
  const int64_t chunks = d / kChunk, nr = tiles.rows;
  alignas(64) float st[kKeys * kAmxTileRows];  // S^T [16 keys, cols], rows cols apart
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t hh = 0; hh < nh; ++hh) {
    const bf16* kh = k + hh * k_head_stride;
    for (int64_t ht = hh * tiles.count; ht < (hh + 1) * tiles.count; ++ht) {  // the head's sub-tiles
      const bf16* qh = qb + ht * chunks * kChunk * cols;
      _tile_zero(LLAMA_EXT_TMM_S);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(LLAMA_EXT_TMM_K, kh + c * kChunk, k_row_stride * 2);
        _tile_loadd(LLAMA_EXT_TMM_Q, qh + c * kChunk * cols, 4 * cols);
        _tile_dpbf16ps(LLAMA_EXT_TMM_S, LLAMA_EXT_TMM_K, LLAMA_EXT_TMM_Q);
      }
      _tile_stored(LLAMA_EXT_TMM_S, st, 4 * cols);
      float* const sh = s + ht * nr * ld;
      switch (cols) {
        case 1: store_rows_of_columns<1>(st, scale_v, sh, ld, nr); break;
        case 2: store_rows_of_columns<2>(st, scale_v, sh, ld, nr); break;
        case 4: store_rows_of_columns<4>(st, scale_v, sh, ld, nr); break;
        case 8: store_rows_of_columns<8>(st, scale_v, sh, ld, nr); break;
        default: store_rows_of_columns<16>(st, scale_v, sh, ld, nr); break;
      }
      between(ht + 1, nh * tiles.count);
    }
  }
}

// P's rows [0, rows), keys [0, keys) (a multiple of 16), as p_hi (P rounded to bf16) and p_lo
// (the rest, rounded): p = p_hi + p_lo within 2^-16 p (bf16 subnormal rests read as zero in the
// products, below 2^-126 absolute). Rows ld_s (s) and ld_p (p_hi, p_lo) apart.
inline void split_p(const float* s, int64_t ld_s, int64_t rows, int64_t keys, bf16* p_hi, bf16* p_lo, int64_t ld_p) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < keys; j += 16) {
      const __m512 x = _mm512_loadu_ps(s + r * ld_s + j);
      const __m256i hi = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
      // widened: each 32-bit lane's bf16 moved to its upper half by a byte shift
      const __m512 hi_f = _mm512_castsi512_ps(_mm512_bslli_epi128(_mm512_cvtepu16_epi32(hi), 2));
      const __m256i lo = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(x, hi_f)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p_hi + r * ld_p + j), hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p_lo + r * ld_p + j), lo);
    }
}

// V rows v[j] + off, keys [0, keys) (a multiple of kPvKeys), as B tiles of key pairs in pair
// order: for 32 keys t, chunk c and parity e, the tile at vb + ((t chunks + c) 2 + e) 512 holds in
// row i, column n the pair (V[32 t + 2 i][32 c + 2 n + e], V[32 t + 2 i + 1][32 c + 2 n + e]).
inline void stage_v(const bf16* const* v, int64_t off, int64_t keys, int64_t d, bf16* vb) {
  const int64_t chunks = d / kChunk;
  constexpr int64_t kTileElems = kPvKeys / 2 * kChunk;  // 512 bf16, 1 KB
  for (int64_t t = 0; t < keys / kPvKeys; ++t)
    for (int64_t i = 0; i < kPvKeys / 2; ++i) {
      const bf16* first = v[kPvKeys * t + 2 * i] + off;
      const bf16* second = v[kPvKeys * t + 2 * i + 1] + off;
      for (int64_t c = 0; c < chunks; ++c) {
        // 32-bit lane n of a row's chunk holds its elements 2n (low half) and 2n + 1. The byte
        // shifts move each element to its neighbour's half of the lane (across lanes too, but
        // the blends keep only the halves that came from within it).
        const __m512i a = _mm512_loadu_si512(first + kChunk * c), b = _mm512_loadu_si512(second + kChunk * c);
        const __m512i even = _mm512_mask_blend_epi16(0xAAAAAAAA, a, _mm512_bslli_epi128(b, 2));
        const __m512i odd = _mm512_mask_blend_epi16(0xAAAAAAAA, _mm512_bsrli_epi128(a, 2), b);
        bf16* tile = vb + (t * chunks + c) * 2 * kTileElems + i * kChunk;
        _mm512_store_si512(tile, even);
        _mm512_store_si512(tile + kTileElems, odd);
      }
    }
}

// O rows (pair order, ld_o floats apart) += (p_hi + p_lo) V over keys [0, keys): P rows ld_p bf16
// apart, V staged by stage_v.
template <typename Between>
inline void pv(const bf16* p_hi, const bf16* p_lo, int64_t ld_p, const bf16* vb, int64_t keys, int64_t d, float* o,
               int64_t ld_o, Between&& between) {
  const int64_t chunks = d / kChunk;
  constexpr int64_t kTileElems = kPvKeys / 2 * kChunk;
  for (int64_t c = 0; c < chunks; ++c) {
    float* oc = o + kChunk * c;
    _tile_loadd(LLAMA_EXT_TMM_O_EVEN, oc, 4 * ld_o);
    _tile_loadd(LLAMA_EXT_TMM_O_ODD, oc + kChunk / 2, 4 * ld_o);
    for (int64_t t = 0; t < keys / kPvKeys; ++t) {
      const bf16* tiles = vb + (t * chunks + c) * 2 * kTileElems;
      _tile_loadd(LLAMA_EXT_TMM_P_HI, p_hi + kPvKeys * t, 2 * ld_p);
      _tile_loadd(LLAMA_EXT_TMM_P_LO, p_lo + kPvKeys * t, 2 * ld_p);
      _tile_loadd(LLAMA_EXT_TMM_V_EVEN, tiles, 64);
      _tile_loadd(LLAMA_EXT_TMM_V_ODD, tiles + kTileElems, 64);
      _tile_dpbf16ps(LLAMA_EXT_TMM_O_EVEN, LLAMA_EXT_TMM_P_HI, LLAMA_EXT_TMM_V_EVEN);
      _tile_dpbf16ps(LLAMA_EXT_TMM_O_ODD, LLAMA_EXT_TMM_P_HI, LLAMA_EXT_TMM_V_ODD);
      _tile_dpbf16ps(LLAMA_EXT_TMM_O_EVEN, LLAMA_EXT_TMM_P_LO, LLAMA_EXT_TMM_V_EVEN);
      _tile_dpbf16ps(LLAMA_EXT_TMM_O_ODD, LLAMA_EXT_TMM_P_LO, LLAMA_EXT_TMM_V_ODD);
    }
    _tile_stored(LLAMA_EXT_TMM_O_EVEN, oc, 4 * ld_o);
    _tile_stored(LLAMA_EXT_TMM_O_ODD, oc + kChunk / 2, 4 * ld_o);
    between(c + 1, chunks);
  }
}

#undef LLAMA_EXT_TMM_S
#undef LLAMA_EXT_TMM_K
#undef LLAMA_EXT_TMM_Q
#undef LLAMA_EXT_TMM_P_HI
#undef LLAMA_EXT_TMM_P_LO
#undef LLAMA_EXT_TMM_V_EVEN
#undef LLAMA_EXT_TMM_V_ODD
#undef LLAMA_EXT_TMM_O_EVEN
#undef LLAMA_EXT_TMM_O_ODD

}  // namespace amx_tiles
#else
namespace amx_tiles {
// No AMX at this level (kAmx is false): declared for the discarded branches only (as templates,
// which need no definition).
constexpr int64_t kKeys = 16, kPvKeys = 32;
template <typename = void>
int64_t score_columns(int64_t nr);
template <typename = void>
void configure(int64_t nr, int64_t cols, bool pv);
template <typename = void>
void split_p(const float* s, int64_t ld_s, int64_t rows, int64_t keys, c10::BFloat16* p_hi, c10::BFloat16* p_lo,
             int64_t ld_p);
template <typename = void>
void stage_v(const c10::BFloat16* const* v, int64_t off, int64_t keys, int64_t d, c10::BFloat16* vb);
template <typename Between>
void pv(const c10::BFloat16* p_hi, const c10::BFloat16* p_lo, int64_t ld_p, const c10::BFloat16* vb, int64_t keys,
        int64_t d, float* o, int64_t ld_o, Between&& between);
template <typename = void>
void store_q(const c10::BFloat16* q, int64_t d, int64_t hh, int64_t n, int64_t cols, c10::BFloat16* qb);
template <typename Between>
void scores(const c10::BFloat16* qb, AmxRowTiles tiles, int64_t cols, int64_t nh, const c10::BFloat16* k,
            int64_t k_head_stride, int64_t k_row_stride, int64_t d, float scale, float* s, int64_t ld,
            Between&& between);
}  // namespace amx_tiles
#endif

// The bf16 paths this level compiles: each level has those of the levels below it.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kLevelAvx512 = true;
#else
constexpr bool kLevelAvx512 = false;
#endif
#if defined(LLAMA_EXT_AMX)
constexpr bool kLevelPairs = true, kLevelDot = true, kLevelAmx = true;
#elif defined(LLAMA_EXT_BF16_DOT)
constexpr bool kLevelPairs = true, kLevelDot = true, kLevelAmx = false;
#elif defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kLevelPairs = true, kLevelDot = false, kLevelAmx = false;
#else
constexpr bool kLevelPairs = false, kLevelDot = false, kLevelAmx = false;
#endif
template <typename T>
constexpr bool kPairs = kLevelPairs && std::is_same_v<T, at::BFloat16>;  // widening in pairs
template <typename T>
constexpr bool kDot = kLevelDot && std::is_same_v<T, at::BFloat16>;  // bf16 where the level has VDPBF16PS
template <typename T>
constexpr bool kAmx = kLevelAmx && std::is_same_v<T, at::BFloat16>;  // score tiles on AMX
// Score tiles and P V on VDPBF16PS (P rounded to bf16): the avx512_bf16 level. CPUs with AMX issue
// VDPBF16PS at half the FMA rate; there the tiles off AMX are the pairs path's, on the FMAs (a b1
// 4096 x 32/8 x 128 bf16 paged16 decode step, 4 rows per kv head, in L3: 0.49 ms with VDPBF16PS
// scores, 0.42 on the FMAs; Emerald Rapids, 2026-12-06).
template <typename T>
constexpr bool kDotTiles = kDot<T> && !kLevelAmx;
#if defined(CPU_CAPABILITY_AVX512)
template <typename T>
constexpr bool kFmaKeyMajor = std::is_same_v<T, float>;  // fp32 key-major tiles on the FMAs
#else
template <typename T>
constexpr bool kFmaKeyMajor = false;
#endif
template <typename T>
constexpr bool kKeyMajor = kDotTiles<T> || kFmaKeyMajor<T>;  // key-major tiles compiled for T

// Whether a paged cache's blocks end within key blocks (block_size not a multiple of kKeyBlock):
// its key blocks then span cache blocks, and AMX S^T tiles (16 keys at one stride) cannot take a
// block's keys in phase order.
template <typename T>
bool pages_split_blocks(const KVCacheCpuParams<T>& a) {
  return a.block_table != nullptr && a.block_size % kKeyBlock != 0;
}

// Whether a call's tasks score on AMX tiles (bf16 at amx_bf16, head dims of whole 32-element
// chunks), and so the buffer rows a task gives each kv head: its nr rows, padded to whole AMX
// sub-tiles (AmxRowTiles) there. The rows of a task's head hh lie at hh * task_head_rows + r.
// Below kAmxPvMinRows rows per kv head (P V on the FMAs) a paged cache whose key blocks span
// cache blocks runs the pairs path instead, its blocks in phase order: a b1 4096 x 32/8 x 128
// paged16 decode step ran 1.17-1.26x faster in L3 and 1.10-1.18x with each call on another of 16
// layers' caches than on AMX tiles after touch_rows; at 8 rows the tiles were 1.08x faster
// (Emerald Rapids, 2026-12-06).
template <typename T>
bool on_amx(const KVCacheCpuParams<T>& a) {
  return kAmx<T> && a.head_dim % 32 == 0 && (a.rows() >= kAmxPvMinRows || !pages_split_blocks(a));
}
// Whether a task of nr rows per kv head prefetches the next key block over this one's math
// (PacedPrefetch; see attend): with P V on AMX, where K's and V's rows lie within a page, from
// kPrefetchNextMinRows rows, and from kAmxPvMinRows where a paged cache's blocks end within key
// blocks (no phase order on the tiles).
template <typename T>
bool prefetches_next_block(const KVCacheCpuParams<T>& a, int64_t nr) {
  constexpr int64_t bytes = sizeof(T);
  return on_amx(a) && nr >= kAmxPvMinRows && (nr >= kPrefetchNextMinRows || pages_split_blocks(a)) &&
         a.k_stride[1] * bytes < kPageBytes && a.v_stride[1] * bytes < kPageBytes;
}

template <typename T>
int64_t task_head_rows(const KVCacheCpuParams<T>& a, int64_t nr) {
  return on_amx(a) ? AmxRowTiles(nr).head_rows() : nr;
}

// The task's rows: nr rows [r0, r0 + nr) of the group of each kv head [h0, h0 + nh), row
// hh * task_head_rows + r for head h0 + hh (query head (h0 + hh) G + (r0 + r) / seq_q, query index
// (r0 + r) % seq_q), against keys [j0, j1) of sequence b: fills o (unnormalized), m and l of each
// row.
template <typename T>
void attend(const KVCacheCpuParams<T>& a, TaskBuffers<T>& buf, int64_t b, int64_t h0, int64_t nh,
            int64_t r0, int64_t nr, int64_t j0, int64_t j1) {
  using acc_t = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  // bf16 scores on AMX: d is whole tile rows; a head's rows in sub-tiles (AmxRowTiles), each
  // head's rows hr apart in the buffers (rows past nr: padding that sees no key).
  const bool amx = on_amx(a);
  const bool amx_pv = amx && nr >= kAmxPvMinRows;  // and P V
  const AmxRowTiles tiles(amx ? nr : 0);
  const int64_t hr = task_head_rows(a, nr);
  const int64_t d = a.head_dim, dpad = a.dpad, L = a.length(b), rows = nh * hr;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // q rows: rotated (rounded to T, as apply_rotary would return them), widened, scaled.
  alignas(64) T qrot[256];
  T* qb = nullptr;
  int64_t cols = 0;  // of the S^T tiles
  if constexpr (kAmx<T>) {
    if (amx) {
      cols = amx_tiles::score_columns(tiles.rows);
      const size_t q_elems = nh * tiles.count * cols * d;  // bf16
      buf.scratch.resize(std::max<size_t>(buf.scratch.size(), q_elems / 2 + 16));
      qb = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buf.scratch.data()) + 63) & ~uintptr_t(63));
      // The columns of padding rows: their scores are never used, but the tiles read them.
      if (cols * tiles.count != nr) std::fill(qb, qb + q_elems, T(0.f));
    }
  }
  if (amx_pv && buf.p_rest.empty()) {
    buf.p_bits.resize(kMaxRows * kKeyBlock);
    buf.p_rest.resize(kMaxRows * kKeyBlock);
    buf.v_pairs.resize(2 * kKeyBlock * d);
  }
  if constexpr (kDotTiles<T>) {
    if (buf.q_bits.empty()) buf.q_bits.resize(kMaxRows * dpad);
  }
  if constexpr (kDotTiles<T>) {
    if (buf.p_bits.empty()) buf.p_bits.resize(kMaxRows * kKeyBlock);
  }
  // The key-major tiles (see "Key-major tiles") where the CPU takes them and the task reads whole
  // cache rows: bf16 at avx512_bf16, fp32 where a row is at most a page.
  bool key_major = false;
  if constexpr (kKeyMajor<T>) {
    key_major = g_key_major_tiles.load(std::memory_order_relaxed) && a.block_table == nullptr && !amx &&
                nh == a.n_kv_heads && a.k_stride[2] == d && a.v_stride[2] == d &&
                (kDotTiles<T> || nh * d * static_cast<int64_t>(sizeof(T)) <= kPageBytes) &&
                with_key_major_shape(d, nh, nr, [](auto, auto, auto) {});
  }
  for (int64_t rr = 0; rr < rows; ++rr) {
    if (rr % hr >= nr) {  // a padding row (AMX sub-tiles): q stays zero, it sees no key
      std::fill(buf.o.data() + rr * dpad, buf.o.data() + (rr + 1) * dpad, acc_t(0));
      buf.m[rr] = neg_inf;
      buf.l[rr] = 0;
      buf.lo[rr] = buf.hi[rr] = 0;
      continue;
    }
    const auto [h, i] = a.query_of(h0 + rr / hr, r0 + rr % hr);
    const T* src = a.q + b * a.q_stride[0] + i * a.q_stride[1] + h * a.q_stride[2];
    if (a.cos != nullptr) {
      rotate_head<T>(a, src, qrot, a.seqlens[b] + i);
      src = qrot;
    }
    if constexpr (kAmx<T>) {
      if (amx) amx_tiles::store_q(src, d, rr / tiles.rows, rr % tiles.rows, cols, qb);
    }
    if constexpr (kDotTiles<T>) {
      if (key_major) {
        for (int64_t e = 0; e < d; e += pairs::kChunk)
          std::copy(src + e, src + e + pairs::kChunk,
                    buf.q_bits.data() + key_major_q_offset<T>(rr / nr, rr % nr, e, nr, d));
      } else {
        std::copy(src, src + d, buf.q_bits.data() + rr * dpad);
        std::fill(buf.q_bits.data() + rr * dpad + d, buf.q_bits.data() + (rr + 1) * dpad, T(0.f));
      }
    } else if (key_major) {  // fp32: scaled
      for (int64_t e = 0; e < d; ++e) buf.q[key_major_q_offset<T>(rr / nr, rr % nr, e, nr, d)] = src[e] * a.scale;
    } else {
      acc_t* qr = buf.q.data() + rr * dpad;
      widen_row<T>(src, qr, d);
      std::fill(qr + d, qr + dpad, acc_t(0));
      for (int64_t c = 0; c < dpad; c += W) (Vec::loadu(qr + c) * Vec(a.scale)).store(qr + c);
      if constexpr (kPairs<T>) pairs::pair_order(qr, dpad);
    }
    std::fill(buf.o.data() + rr * dpad, buf.o.data() + (rr + 1) * dpad, acc_t(0));
    buf.m[rr] = neg_inf;
    buf.l[rr] = 0;
    std::tie(buf.lo[rr], buf.hi[rr]) = a.visible(i, L);
  }

  // Row addresses of head h0 for the keys [jb, jb + n), walking the pages, padded to `padded`
  // with copies of the last one (their scores are masked to -inf, so their probabilities are 0);
  // head h0 + hh is hh head strides further.
  const auto resolve = [&](int64_t jb, int64_t n, int64_t padded, const T** kp, const T** vp) {
    int64_t page = jb / a.block_size, off = jb % a.block_size, blk = a.block_of(b, page);
    for (int64_t j = 0; j < n; ++j) {
      kp[j] = cache_row(a.k_cache, a.k_stride, blk, off, h0);
      vp[j] = cache_row(a.v_cache, a.v_stride, blk, off, h0);
      if (++off == a.block_size && j + 1 < n) off = 0, blk = a.block_of(b, ++page);
    }
    for (int64_t j = n; j < padded; ++j) kp[j] = kp[n - 1], vp[j] = vp[n - 1];
  };
  if constexpr (kAmx<T>) {
    if (amx) amx_tiles::configure(tiles.rows, cols, amx_pv);
  }
  // The block's rows in address order, and the next ones (the next block's with prefetch_next).
  const T* kn[kKeyBlock + std::max(kRowsAhead, kKeyBlock)];
  const T* vn[kKeyBlock + std::max(kRowsAhead, kKeyBlock)];
  const T* kph[kKeyBlock];  // and in phase order
  const T* vph[kKeyBlock];
  constexpr int64_t acc_n = kPairs<T> ? pairs::kAcc : kScoreAcc<T>;  // a score tile's rows x keys
  const int64_t step = nr % 4 == 0 ? acc_n / 4 : acc_n;  // keys per score step
  // How each block is read where keys share pages (see PhaseOrder): a block that every row sees
  // whole (no mask: the order of its columns does not matter) in phase order, where the keys per
  // page of K and V divide the phases; on AMX, four phases of 16 keys, a phase an S^T tile of rows
  // four keys apart, for a block within one cache block; other blocks and rows that do not tile a
  // page are first read line by line in address order (touch_rows), then served from L2, or where
  // the next block is prefetched (prefetch_next), read as they are. Against touch_rows, AMX tiles
  // in phase order made a b1 4096 x 32/8 x 128 bf16 decode step 1.27-1.33x faster (4 rows per kv
  // head, in L3; 1.21-1.28x with each call on another of 16 layers' caches), 1.14-1.17x at 8 rows
  // (1 and 2 query tokens), 1.23-1.30x paged64; at 32 rows, with the next block prefetched,
  // 0.92-0.95x, so not there (Emerald Rapids, 2026-12-06).
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  const int64_t k_row_stride = a.k_stride[1] * static_cast<int64_t>(sizeof(T));
  const int64_t v_row_stride = a.v_stride[1] * static_cast<int64_t>(sizeof(T));
  const bool touch_k = !key_major && k_row_stride < kPageBytes, touch_v = !key_major && v_row_stride < kPageBytes;
  const bool prefetch = !key_major && !touch_k && !touch_v;  // a row a page (see prefetch_row_starts)
  // With P V on AMX the block's math takes several times its reads: the next block is prefetched
  // during this one's (PacedPrefetch: a third over the scores, a third over the softmax's rows, a
  // third over the heads' P V), and only a task's first block is read by touch_rows. From
  // kPrefetchNextMinRows rows, and where blocks cannot be read in phase order on the tiles (a paged
  // cache's blocks that end within key blocks) from kAmxPvMinRows: at 8 and 12 rows, against
  // touch_rows, paged16 and paged32 ran 1.07-1.10x faster, while against phase order contiguous
  // caches ran 0.95x at 8 rows and 0.89x at 12 (b1 4096 x 128 bf16, Emerald Rapids, 2026-12-06).
  const bool prefetch_next = prefetches_next_block(a, nr);
  PhaseOrder phase;
  phase.phases = amx ? kKeyBlock / kScoreKeys : kKeyBlock / std::max(kPvKeys, step);
  const auto pages_divide_phases = [&](int64_t stride) {
    return stride > 0 && stride < kPageBytes && kPageBytes % stride == 0 && phase.phases % (kPageBytes / stride) == 0;
  };
  const bool phased_rows =
      !key_major && !prefetch_next && pages_divide_phases(k_row_stride) && pages_divide_phases(v_row_stride);
  int64_t seen_lo = 0, seen_hi = L;  // keys every row sees
  for (int64_t rr = 0; rr < rows; ++rr) seen_lo = std::max(seen_lo, buf.lo[rr]), seen_hi = std::min(seen_hi, buf.hi[rr]);
  acc_t* const s = buf.s.data();
  for (int64_t jb = j0; jb < j1; jb += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, j1 - jb);
    const int64_t npad = (n + kScoreKeys - 1) / kScoreKeys * kScoreKeys;  // whole score tiles
    const int64_t rows_ahead = prefetch ? kPrefetchKeys : key_major ? kRowsAhead : prefetch_next ? kKeyBlock : 0;
    const int64_t n_ahead = std::min(n + rows_ahead, j1 - jb);  // rows resolved
    // AMX P V reads whole products of kPvKeys keys (p = 0 past n).
    const int64_t pv_pad = amx_pv ? (n + amx_tiles::kPvKeys - 1) / amx_tiles::kPvKeys * amx_tiles::kPvKeys : npad;
    resolve(jb, n_ahead, std::max(pv_pad, n_ahead), kn, vn);
    const bool phased = phased_rows && n == kKeyBlock && seen_lo <= jb && jb + n <= seen_hi &&
                        (!amx || jb % a.block_size + n <= a.block_size);
    const T* const* kp = kn;
    const T* const* vp = vn;
    PacedPrefetch<T> next;  // none: no line to prefetch
    if (prefetch_next) next = PacedPrefetch<T>(kn, vn, n, n_ahead, nh, a.k_stride[2], a.v_stride[2], row_bytes);
    if (phased) {
      for (int64_t i = 0; i < kKeyBlock; ++i) kph[i] = kn[phase.key(i)], vph[i] = vn[phase.key(i)];
      kp = kph, vp = vph;
    } else if (!prefetch_next || jb == j0) {  // (a block after the first: prefetched)
      if (touch_k) touch_rows(kn, n, nh, a.k_stride[2], row_bytes);
      if (touch_v) touch_rows(vn, n, nh, a.v_stride[2], row_bytes);
    }
    // Scores S[r, j] = q_r . k_j, a few keys at a time for every head of the task: the task's
    // heads lie side by side in a cache row, so the K block is read key by key in address order
    // where keys lie a page or more apart, and in phase order or from L2 where they share pages.
    if constexpr (kKeyMajor<T>) {
      if (key_major) {
        // One key at a time, every head and row; the prefetch runs ahead through this block's K
        // rows into its V rows (padding copies past n: a short block prefetches less).
        with_key_major_shape(d, nh, nr, [&](auto dd, auto h, auto r) {
          constexpr int D = decltype(dd)::value, NH = decltype(h)::value, R = decltype(r)::value;
          constexpr int64_t kRowBytes = NH * D * sizeof(T), ahead = key_major_ahead(kRowBytes);
          for (int64_t j = 0; j < n; ++j) {
            prefetch_row<kRowBytes>(j + ahead < n ? kn[j + ahead] : vn[std::min(j + ahead - n, n - 1)]);
            if constexpr (kDotTiles<T>) {
              dot::key_scores<D / 32, NH, R>(buf.q_bits.data(), kp[j], a.scale, s + j, kKeyBlock);
            } else {
              fma_key_major::key_scores<D, NH, R>(buf.q.data(), kp[j], s + j, kKeyBlock);
            }
          }
        });
      }
    }
    const int64_t groups = npad / kScoreKeys;  // of 16 keys
    for (int64_t j = 0; j < (key_major ? 0 : npad); j += step) {
      if (prefetch) prefetch_row_starts(kn, std::min(j + kPrefetchKeys, n_ahead), std::min(j + kPrefetchKeys + step, n_ahead));
      if constexpr (kAmx<T>) {
        static_assert(amx_tiles::kKeys == kScoreKeys, "AMX score tiles are the blocks' padding unit");
        // 16 keys at one stride (consecutive rows of a cache block, or a phase's rows four keys
        // apart; none of them padding, whose copies repeat a row): an S^T tile per head. j is a
        // multiple of 16 here.
        const auto one_stride = [&] {
          for (int64_t t = 1; t < kScoreKeys; ++t)
            if (kp[j + t] - kp[j + t - 1] != kp[j + 1] - kp[j]) return false;
          return kp[j + 1] - kp[j] > 0;
        };
        if (amx && j % kScoreKeys == 0 && one_stride()) {
          amx_tiles::scores(qb, tiles, cols, nh, kp[j], a.k_stride[2], kp[j + 1] - kp[j], d, a.scale, s + j, kKeyBlock,
                            [&](int64_t t, int64_t of) {
                              next.after(kScoreStage, j / kScoreKeys * of + t, groups * of);
                            });
          j += kScoreKeys - step;
          continue;
        }
      }
      if (j % kScoreKeys == 0) next.after(kScoreStage, j / kScoreKeys + 1, groups);
      for (int64_t hh = 0; hh < nh; ++hh) {
        for_row_tiles(nr, [&](int64_t r, auto tile) {
          constexpr int R = decltype(tile)::value;
          const int64_t rr = hh * hr + r;
          for (int64_t t = 0; t < step; t += acc_n / R) {
            if constexpr (kDotTiles<T>) {
              dot::score_tile<R>(buf.q_bits.data() + rr * dpad, dpad, kp + j + t, hh * a.k_stride[2], d, a.scale,
                                 s + rr * kKeyBlock + j + t, kKeyBlock);
            } else if constexpr (kPairs<T>) {
              pairs::score_tile<R>(buf.q.data() + rr * dpad, dpad, kp + j + t, hh * a.k_stride[2], d,
                                   s + rr * kKeyBlock + j + t, kKeyBlock);
            } else {
              score_tile<T, R, kScoreAcc<T>>(buf.q.data() + rr * dpad, dpad, kp + j + t, hh * a.k_stride[2], d,
                                             s + rr * kKeyBlock + j + t, kKeyBlock);
            }
          }
        });
      }
    }
    // Softcap and the online softmax (online_softmax.h) over each row's visible columns of the
    // block, in three steps so that the running max's update and its exp run across rows: the
    // row maxima, the new maxima and rescale factors, then p with its sum. p is 0 on every other
    // column up to kKeyBlock (the padding keys past n included, which the P V reads); it
    // overwrites s, or at kDotPv goes to p_bits rounded to bf16. A NaN score (a NaN in q or in a
    // key the row sees) makes the row's max NaN, and so its p, l, out and lse; an Inf one gives
    // Inf - Inf = NaN in p. A row that sees none of the block keeps m and l (alpha = 1).
    const auto visible_columns = [&](int64_t rr) {
      return std::pair{std::clamp(buf.lo[rr] - jb, int64_t(0), n), std::clamp(buf.hi[rr] - jb, int64_t(0), n)};
    };
    alignas(64) acc_t block_max[kMaxRows];
    alignas(64) acc_t alpha[kMaxRows];
    for (int64_t rr = 0; rr < rows; ++rr) {
      const auto [lo, hi] = visible_columns(rr);
      if (a.softcap > 0) cpu::softcap_row<acc_t>(s + rr * kKeyBlock, lo, hi, acc_t(1), a.softcap);
      block_max[rr] = cpu::row_max<acc_t>(s + rr * kKeyBlock, lo, hi);
    }
    cpu::update_maxima<acc_t>(buf.m.data(), block_max, alpha, rows, acc_t(1));
    for (int64_t rr = 0; rr < rows; ++rr) {
      const auto [lo, hi] = visible_columns(rr);
      acc_t* sr = s + rr * kKeyBlock;
      acc_t sum;
      if constexpr (kDotTiles<T>) {
        sum = cpu::exp_row<T>(sr, buf.p_bits.data() + rr * kKeyBlock, kKeyBlock, lo, hi, acc_t(1), -buf.m[rr]);
      } else {
        sum = cpu::exp_row<T>(sr, sr, kKeyBlock, lo, hi, acc_t(1), -buf.m[rr]);
      }
      buf.l[rr] = buf.l[rr] * alpha[rr] + sum;
      next.after(kSoftmaxStage, rr + 1, rows);
      if (alpha[rr] != acc_t(1)) {
        acc_t* o = buf.o.data() + rr * dpad;
        const Vec al(alpha[rr]);
        for (int64_t c = 0; c < dpad; c += W) (Vec::loadu(o + c) * al).store(o + c);
      }
    }
    // O_r += sum_j p[r, j] v_j, a pass of keys at a time for every head, in the scores' order:
    // kPvKeys keys where V is read in address order, a phase in phase order, and the whole block
    // from L2 after touch_rows (the output strips are then loaded and stored once per block:
    // 1.04-1.09x). Keys a row does not see have p = 0 and lie within the sequence (finite
    // values), so they add nothing.
    if constexpr (kKeyMajor<T>) {
      if (key_major) {
        // kKeyMajorPvKeys keys at a time (those past n, up to npad, are rows with p = 0), every
        // head and row; the prefetch runs ahead through this block's V rows into the next
        // block's K rows.
        with_key_major_shape(d, nh, nr, [&](auto dd, auto h, auto r) {
          constexpr int D = decltype(dd)::value, NH = decltype(h)::value, R = decltype(r)::value;
          constexpr int64_t kRowBytes = NH * D * sizeof(T), ahead = key_major_ahead(kRowBytes);
          for (int64_t j = 0; j < n; j += kKeyMajorPvKeys) {
            for (int64_t t = j + ahead; t < j + ahead + kKeyMajorPvKeys; ++t)
              prefetch_row<kRowBytes>(t < n ? vn[t] : kn[std::min(t, n_ahead - 1)]);
            if constexpr (kDotTiles<T>) {
              dot::key_pairs_pv<D / 32, NH, R, kKeyMajorPvKeys / 2>(buf.p_bits.data() + j, kKeyBlock, vp + j,
                                                                    buf.o.data());
            } else {
              fma_key_major::keys_pv<D, NH, R, kKeyMajorPvKeys>(s + j, kKeyBlock, vp + j, buf.o.data());
            }
          }
        });
      }
    }
    if constexpr (kAmx<T>) {
      if (amx_pv) {
        // Each head's V is staged while the last head's products run (see amx_tiles).
        amx_tiles::split_p(s, kKeyBlock, rows, pv_pad, buf.p_bits.data(), buf.p_rest.data(), kKeyBlock);
        T* const staged[2] = {buf.v_pairs.data(), buf.v_pairs.data() + kKeyBlock * d};
        amx_tiles::stage_v(vp, 0, pv_pad, d, staged[0]);
        for (int64_t hh = 0; hh < nh; ++hh) {
          if (hh + 1 < nh) amx_tiles::stage_v(vp, (hh + 1) * a.v_stride[2], pv_pad, d, staged[(hh + 1) % 2]);
          for (int64_t r = hh * hr, st = 0; r < (hh + 1) * hr; r += tiles.rows, ++st)  // each sub-tile's rows
            amx_tiles::pv(buf.p_bits.data() + r * kKeyBlock, buf.p_rest.data() + r * kKeyBlock, kKeyBlock,
                          staged[hh % 2], pv_pad, d, buf.o.data() + r * dpad, dpad, [&](int64_t c, int64_t chunks) {
                            const int64_t steps = nh * tiles.count * chunks;
                            next.after(kPvStage, (hh * tiles.count + st) * chunks + c, steps);
                          });
        }
        continue;
      }
    }
    const int64_t pv_keys = phased ? kKeyBlock / phase.phases : touch_v ? kKeyBlock : kPvKeys;
    for (int64_t j = 0; j < (key_major ? 0 : n); j += pv_keys) {
      const int64_t nj = std::min(pv_keys, n - j);
      if (prefetch) prefetch_row_starts(vn, std::min(j + kPrefetchKeys, n_ahead), std::min(j + kPrefetchKeys + nj, n_ahead));
      for (int64_t hh = 0; hh < nh; ++hh) {
        for_row_tiles(nr, [&](int64_t r, auto tile) {
          constexpr int R = decltype(tile)::value;
          const int64_t rr = hh * hr + r;
          if constexpr (kDotTiles<T>) {
            // Whole key pairs: a block's columns past n are padding rows with p = 0.
            dot::pv_rows<R>(buf.p_bits.data() + rr * kKeyBlock + j, kKeyBlock, vp + j, hh * a.v_stride[2],
                            (nj + 1) / 2 * 2, d, dpad, buf.o.data() + rr * dpad, dpad);
          } else if constexpr (kPairs<T>) {
            pairs::pv_rows<R>(s + rr * kKeyBlock + j, kKeyBlock, vp + j, hh * a.v_stride[2], nj, d, dpad,
                              buf.o.data() + rr * dpad, dpad);
          } else {
            pv_rows<T, R>(s + rr * kKeyBlock + j, kKeyBlock, vp + j, hh * a.v_stride[2], nj, d, dpad,
                          buf.o.data() + rr * dpad, dpad);
          }
        });
      }
    }
  }
#if defined(LLAMA_EXT_AMX)
  // Leaves the thread without tile state (as amx_dot.h's gemm does).
  if (amx) _tile_release();
#endif
}

// Stores the task's rows (attend's order): out and lse directly (one split) or the split's
// partial.
template <typename T>
void store_rows(const KVCacheCpuParams<T>& a, TaskBuffers<T>& buf, int64_t task, bool partial, int64_t b,
                int64_t h0, int64_t nh, int64_t r0, int64_t nr) {
  using acc_t = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  using IO = VecIO<T>;
  constexpr int64_t W = Vec::size();
  const int64_t d = a.head_dim, hr = task_head_rows(a, nr);
  for (int64_t rr = 0; rr < nh * hr; ++rr) {
    if (rr % hr >= nr) continue;  // padding
    const acc_t l = buf.l[rr];
    const bool saw_keys = l != 0;  // NaN too: a NaN score makes out and lse NaN, never 0
    const acc_t inv = saw_keys ? acc_t(1) / l : acc_t(0);
    acc_t* o = buf.o.data() + rr * a.dpad;
    if constexpr (kDotTiles<T>) {
      dot::natural_order(o, a.dpad);
    } else if constexpr (kPairs<T>) {
      pairs::natural_order(o, a.dpad);
    }
    if (partial) {
      acc_t* dst = a.partial_out + (task * kMaxRows + rr) * a.dpad;
      for (int64_t c = 0; c < a.dpad; c += W) (Vec::loadu(o + c) * Vec(inv)).store(dst + c);
      a.partial_lse[task * kMaxRows + rr] = saw_keys ? buf.m[rr] + std::log(l) : -std::numeric_limits<acc_t>::infinity();
      continue;
    }
    const auto [h, i] = a.query_of(h0 + rr / hr, r0 + rr % hr);
    T* dst = a.out + ((b * a.seq_q + i) * a.n_q_heads + h) * d;
    for (int64_t c = 0; c < d; c += W) IO::store(dst + c, Vec::loadu(o + c) * Vec(inv), std::min(W, d - c));
    a.lse[(b * a.n_q_heads + h) * a.seq_q + i] = saw_keys ? buf.m[rr] + std::log(l) : acc_t(0);
  }
}

// ---- stage 4: combine -------------------------------------------------------------------------

template <typename T>
void combine_splits(const KVCacheCpuParams<T>& a) {
  using acc_t = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  using IO = VecIO<T>;
  constexpr int64_t W = Vec::size();
  const int64_t d = a.head_dim, R = a.rows();
  at::parallel_for(0, a.batch * a.n_kv_heads * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(a.dpad);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = t % R, bh = t / R, tile = row / kMaxRows, r = row % kMaxRows;
      const int64_t b = bh / a.n_kv_heads, kvh = bh % a.n_kv_heads;
      const int64_t nr = std::min(kMaxRows, R - tile * kMaxRows);
      const int64_t hg = kvh / a.heads_per_task, hh = kvh % a.heads_per_task;
      const int64_t unit = (b * a.head_groups + hg) * a.row_tiles + tile;
      const int64_t task0 = a.unit_tasks[unit], splits = a.splits(unit);
      if (splits == 1) continue;  // its task wrote out and lse
      const int64_t slot = hh * task_head_rows(a, nr) + r;  // the row's index in its task (attend's order)
      // A split whose lse is NaN (a NaN score) makes the row NaN: mx and then every weight.
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t s = 0; s < splits; ++s) {
        const acc_t ls = a.partial_lse[(task0 + s) * kMaxRows + slot];
        mx = max_keep_nan(ls, mx);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t sum = 0;
      if (mx != -std::numeric_limits<acc_t>::infinity()) {
        for (int64_t s = 0; s < splits; ++s) {
          const acc_t ls = a.partial_lse[(task0 + s) * kMaxRows + slot];
          if (ls == -std::numeric_limits<acc_t>::infinity()) continue;
          const acc_t w = std::exp(ls - mx);
          sum += w;
          const acc_t* src = a.partial_out + ((task0 + s) * kMaxRows + slot) * a.dpad;
          for (int64_t c = 0; c < a.dpad; c += W) at::vec::fmadd(Vec(w), Vec::loadu(src + c), Vec::loadu(&acc[c])).store(&acc[c]);
        }
      }
      const bool saw_keys = sum != 0;  // NaN too
      const acc_t inv = saw_keys ? acc_t(1) / sum : acc_t(0);
      const auto [h, i] = a.query_of(kvh, row);
      T* dst = a.out + ((b * a.seq_q + i) * a.n_q_heads + h) * d;
      for (int64_t c = 0; c < d; c += W) IO::store(dst + c, Vec::loadu(&acc[c]) * Vec(inv), std::min(W, d - c));
      a.lse[(b * a.n_q_heads + h) * a.seq_q + i] = saw_keys ? mx + std::log(sum) : acc_t(0);
    }
  });
}

// ---- prefill-shaped calls on the prefill kernel --------------------------------------------------
// (kvcache_attention.h, kPrefillRouteMinSeqQ.) This kernel's register tiles read each K/V row
// once per 64 rows of a group, while the prefill kernel's tiles are GEMMs (csrc/cpu/attention.cpp).
// Side by side (32/8 x 128, 2 threads, Zen 4) the prefill kernel was faster from 128 query tokens
// on in bf16: 1.37x at 128 over 128 keys, 1.84x at 2048 over 2048, 2.08x at 512 over 4096; fp32
// 0.90x, 1.08x and 1.34x. Consecutive sequences b0 .. b1 - 1 that hold the same L tokens are then
// one batched call on their first L rows: all of a static cache's prompts in one call, a batch of
// other lengths in one call per run (each call parallel within), written straight into out and
// lse. A contiguous cache's rows are k_cache[b0:b1, :L] and v_cache[b0:b1, :L], views; a paged
// cache's are read where they lie through the block table (attention_forward.h), with no gathered
// copy of the cache: the prefill kernel packs or copies each block from its pages, per thread,
// as it does a contiguous cache's.

// Calls fn(b0, b1) for each run b0 .. b1 - 1 of consecutive sequences that hold the same number
// of tokens, in batch order: the prefill kernel's calls.
template <typename T, typename Fn>
void for_each_equal_length_run(const KVCacheCpuParams<T>& a, Fn&& fn) {
  for (int64_t b0 = 0, b1 = 0; b0 < a.batch; b0 = b1) {
    while (b1 < a.batch && a.length(b1) == a.length(b0)) ++b1;
    fn(b0, b1);
  }
}

template <typename T>
void attend_on_prefill_kernel(const KVCacheCpuParams<T>& a, const KVCacheAttentionParams& p) {
  at::Tensor q = p.q;
  if (a.cos != nullptr) {  // q [batch, seq_q, n_q_heads, d], rotated at positions cache_seqlens[b] + i
    q = at::empty(p.q.sizes(), p.q.options());
    T* dst = q.mutable_data_ptr<T>();
    const int64_t heads = a.n_q_heads, d = a.head_dim;
    at::parallel_for(0, a.batch * a.seq_q * heads, std::max<int64_t>(1, 4096 / d), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t h = t % heads, i = t / heads % a.seq_q, b = t / (heads * a.seq_q);
        rotate_head<T>(a, a.q + b * a.q_stride[0] + i * a.q_stride[1] + h * a.q_stride[2], dst + t * d,
                       a.seqlens[b] + i);
      }
    });
  }
  for_each_equal_length_run(a, [&](int64_t b0, int64_t b1) {
    const int64_t L = a.length(b0), n = b1 - b0;
    AttentionCall call{};
    call.q = q.narrow(0, b0, n);
    call.out = p.out.narrow(0, b0, n);
    call.lse = p.lse.narrow(0, b0, n);
    if (L == 0) {  // no row sees a key
      call.out.zero_();
      call.lse.zero_();
      return;
    }
    call.k = p.paged ? p.k_cache : p.k_cache.narrow(0, b0, n).narrow(1, 0, L);
    call.v = p.paged ? p.v_cache : p.v_cache.narrow(0, b0, n).narrow(1, 0, L);
    call.shape = AttentionShape{n, a.seq_q, L, a.n_q_heads, a.n_kv_heads, a.head_dim, /*varlen=*/false};
    call.causal = p.causal;
    call.scale = p.scale;
    call.window = make_key_window(call.shape, p.causal, p.window_left, p.window_right, p.softcap);
    call.softcap = p.softcap;
    cpu::attention_forward(call, p.paged ? std::optional(p.block_table->narrow(0, b0, n)) : std::nullopt);
  });
}

// Which calls run there: the prefill-shaped ones (kvcache_attention.h), and with fewer query
// tokens those where the prefill kernel is faster. Its tiles cost less per row than this
// kernel's from about as many rows per kv head (R = G x seq_q) on every CPU level: at R = 32,
// 48, 64 and 80 of 32/8 and 64/8 x 128 over 4096 keys (b1, 2 threads, one process, Emerald
// Rapids, 2026-12-06), this kernel's time over the prefill kernel's:
//   level        bf16                    fp16                    fp32
//   amx_bf16     1.18 1.06 1.15 1.33     0.98 1.25 1.37 1.52     0.69 0.85 0.91 1.09   (R32 R48 R64 R80)
//   avx512_bf16  0.95 1.09 1.11 1.18     0.95 1.19 1.29 1.50     0.69 0.88 0.93 1.14
//   avx512       0.73 0.94 1.03 1.18     0.96 1.18 1.29 1.48     0.76 0.87 0.94 1.15
//   avx2         0.71 0.88 0.94 1.05     0.83 1.00 1.05 1.15     0.80 0.95 0.99 1.12
// (the same within 0.1 at 64/8; 1.1-2.2x past R96). Since amx_bf16's tiles read blocks in phase
// order and prefetch the next one in steps, a task a kv head from 16 rows (2026-12-06), bf16
// there: R48 0.86 (paged16 0.79), R64 0.95-1.05 (paged16 0.97), R80 1.16-1.28 (32/8 x 12, 16
// and 20 tokens, both kernels forced). So a call runs there from 48 rows where its 2-byte
// products run on VDPBF16PS (avx512_bf16) or fp16 widened on AVX-512, and past one task's kMaxRows
// rows elsewhere (this kernel then reads K/V once per row tile).
// The prefill kernel does not split keys: its tasks are (sequence, kv head, query block), one call
// per run of equal lengths, so a call runs there only when each call gives every thread a task,
// and only past kDecodeRouteMaxSeqQ query tokens (fewer: gqa_attention takes this kernel, and a
// decode step stays on it whatever the group).
template <typename T>
constexpr int64_t kPrefillMinRows =
    (kDotTiles<T> || (std::is_same_v<T, at::Half> && kLevelAvx512)) ? 48 : kMaxRows + 1;

template <typename T>
bool runs_on_prefill_kernel(const KVCacheCpuParams<T>& a, const KVCacheAttentionParams& p) {
  if (prefill_shaped(p)) return true;
  if (p.seq_q <= kDecodeRouteMaxSeqQ || a.rows() < kPrefillMinRows<T>) return false;
  int64_t shortest_run = a.batch;  // one prefill-kernel call each
  for_each_equal_length_run(a, [&](int64_t b0, int64_t b1) { shortest_run = std::min(shortest_run, b1 - b0); });
  const int64_t q_blocks = (p.seq_q + cpu::block_q_for(a.group()) - 1) / cpu::block_q_for(a.group());
  return shortest_run * a.n_kv_heads * q_blocks >= at::get_num_threads();
}

// ---- driver -----------------------------------------------------------------------------------

template <typename T>
void run(const KVCacheAttentionParams& p) {
  using acc_t = at::opmath_type<T>;
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  KVCacheCpuParams<T> a{};
  a.q = p.q.const_data_ptr<T>();
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = p.q.stride(i);
    a.k_stride[i] = p.k_cache.stride(i);
    a.v_stride[i] = p.v_cache.stride(i);
  }
  a.k_cache = p.k_cache.const_data_ptr<T>();
  a.v_cache = p.v_cache.const_data_ptr<T>();
  const at::Tensor seqlens = p.cache_seqlens.contiguous();
  a.seqlens = seqlens.const_data_ptr<int32_t>();
  if (p.paged) {
    a.block_table = p.block_table->const_data_ptr<int32_t>();
    a.bt_stride[0] = p.block_table->stride(0);
    a.bt_stride[1] = p.block_table->stride(1);
  }
  a.block_size = p.block_size;
  at::Tensor cos_t, sin_t;
  if (p.rotary_half > 0) {
    // float64 q computes in float64: widen float32 tables (test-sized) once.
    cos_t = p.rotary_cos->to(c10::CppTypeToScalarType<acc_t>::value);
    sin_t = p.rotary_sin->to(c10::CppTypeToScalarType<acc_t>::value);
    a.cos = cos_t.const_data_ptr<acc_t>();
    a.sin = sin_t.const_data_ptr<acc_t>();
    a.cos_stride = cos_t.stride(0);
    a.sin_stride = sin_t.stride(0);
  }
  a.rotary_half = p.rotary_half;
  a.interleaved = p.rotary_interleaved;
  a.out = p.out.mutable_data_ptr<T>();
  a.lse = p.lse.mutable_data_ptr<acc_t>();
  a.batch = p.batch;
  a.seq_q = p.seq_q;
  a.seq_new = p.seq_new;
  a.n_q_heads = p.n_q_heads;
  a.n_kv_heads = p.n_kv_heads;
  a.head_dim = p.head_dim;
  const int64_t row_align = kPairs<T> ? pairs::kChunk : W;  // the pairs path reads whole chunks
  a.dpad = (p.head_dim + row_align - 1) / row_align * row_align;
  a.window_left = p.window_left;
  a.window_right = p.window_right;
  a.scale = static_cast<acc_t>(p.scale);
  a.softcap = static_cast<acc_t>(p.softcap);

  if (p.seq_new > 0) append_new_tokens<T>(a, *p.k, *p.v);
  const int64_t R = a.rows();
  if (p.batch == 0 || R == 0) return;
  if (runs_on_prefill_kernel(a, p)) return attend_on_prefill_kernel<T>(a, p);

  // A task holds up to kMaxRows rows: a tile of one kv head's rows, or the rows of several kv
  // heads, which lie side by side in each cache row and are then read in address order. Its
  // key range is split only as far as needed to give every thread two tasks' worth of keys (one
  // thread: no split), each sequence by its own length (on 2 threads, a sequence of 4000 keys
  // among seven of 100 takes 4 splits and the short ones none; eight equal ones none), and never
  // below kMinKeyRowsPerSplit key rows (keys x the task's kv heads): a split costs a task's
  // set-up, its partly filled key blocks and one [rows, d] partial write and read, 3-5 us on Zen
  // 4, the time of 13-21 keys of 8 kv heads. Four tasks a thread were 1.1-1.5x slower below 600
  // keys and no faster above (b1, 32/8 x 128, 2 threads). Short contexts take fewer heads per
  // task, so that there are still tasks for every thread.
  a.row_tiles = (R + kMaxRows - 1) / kMaxRows;
  int64_t max_len = 0, sum_len = 0;
  for (int64_t b = 0; b < p.batch; ++b) max_len = std::max(max_len, a.length(b)), sum_len += a.length(b);
  const int64_t threads = at::get_num_threads();
  const auto max_splits = [&](int64_t heads) { return std::max<int64_t>(1, max_len * heads / kMinKeyRowsPerSplit); };
  const auto head_groups = [&](int64_t heads) { return (p.n_kv_heads + heads - 1) / heads; };
  // Up to `most` kv heads a task; where a thread would have fewer than four units (sequence x
  // head group x row tile), the most that divide the kv heads into groups of equal heads. The
  // threads take runs of whole tasks, and a few tasks of unequal cost cannot be cut evenly: with
  // 8 kv heads of 12 rows (3 query tokens of 32/8) at b1, groups of 5 and 3 heads left one thread
  // idle for two fifths of the step. Groups of 4 made a b1 4096 x 128 step 1.17-1.23x faster (bf16
  // at amx_bf16, contiguous and paged16; avx512 and avx2 bf16; fp32 1.11x), and 2 heads instead
  // of 3 at 20 rows 1.05-1.07x (avx512, avx2); at b8 x 1024, 2 instead of 3 ran 0.95-0.96x
  // (Emerald Rapids, 2026-12-06).
  const auto task_heads = [&](int64_t most) {
    int64_t heads = std::clamp<int64_t>(most, 1, p.n_kv_heads);
    if (p.batch * head_groups(heads) * a.row_tiles >= 4 * threads) return heads;
    while (p.n_kv_heads % heads != 0) --heads;
    return heads;
  };
  // Where the next block is prefetched from kPrefetchNextMinRows rows, one kv head a task: its
  // buffers (scores, P's two parts, staged V, O) then stay closer to L1's size beside the K tiles.
  // At 16 and 32 rows per kv head (4 and 8 query tokens of 32/8, 2 tokens of 64/8), b1 4096
  // contiguous and paged16 and b8 x 1024, it ran 1.02-1.08x faster than tasks of up to kMaxRows
  // rows with the cache in L3, 1.02-1.05x with each call on another of 16 layers' caches; at 8
  // rows (paged16) fewer heads a task ran 0.89x (Emerald Rapids, 2026-12-06).
  const int64_t head_rows = std::min(R, kMaxRows);
  a.heads_per_task = prefetches_next_block(a, head_rows) && head_rows >= kPrefetchNextMinRows
                         ? 1
                         : task_heads(kMaxRows / task_head_rows(a, head_rows));
  while (a.heads_per_task > 1 &&
         p.batch * head_groups(a.heads_per_task) * a.row_tiles * max_splits(a.heads_per_task) < threads) {
    a.heads_per_task = task_heads((a.heads_per_task + 1) / 2);
  }
  a.head_groups = head_groups(a.heads_per_task);
  const int64_t units = p.batch * a.head_groups * a.row_tiles;
  const int64_t target_tasks = threads > 1 ? 2 * threads : 1;
  // Each unit's share of target_tasks by its length, so that every task holds at most about
  // 1 / target_tasks of all keys (target_tasks / units splits each where the lengths are
  // equal), and a short sequence batched with a long one is not split as often as the long one.
  const int64_t all_keys = std::max<int64_t>(sum_len, 1) * a.head_groups * a.row_tiles;  // over units
  std::vector<int64_t> unit_tasks(units + 1, 0);
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t L = a.length(unit / (a.head_groups * a.row_tiles));
    const int64_t want = (target_tasks * L + all_keys - 1) / all_keys;
    const int64_t most = std::max<int64_t>(1, L * a.heads_per_task / kMinKeyRowsPerSplit);
    unit_tasks[unit + 1] = unit_tasks[unit] + std::clamp<int64_t>(std::min(want, most), 1, 1024);
  }
  a.unit_tasks = unit_tasks.data();
  const int64_t tasks = unit_tasks[units];
  at::Tensor partial_out, partial_lse;
  if (tasks > units) {
    const auto opts = p.q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    partial_out = at::empty({tasks, kMaxRows, a.dpad}, opts);
    partial_lse = at::empty({tasks, kMaxRows}, opts);
    a.partial_out = partial_out.mutable_data_ptr<acc_t>();
    a.partial_lse = partial_lse.mutable_data_ptr<acc_t>();
  }

  // Task `task`: rows [r0, r0 + nr) of the group of each kv head [h0, h0 + nh) of sequence b,
  // against keys [j0, j1).
  struct Task {
    int64_t b, h0, nh, r0, nr, j0, j1;
    bool partial;  // one of several splits of its unit: leaves a partial for the combine
  };
  const auto task_of = [&](int64_t task) {
    const int64_t unit = std::upper_bound(unit_tasks.begin(), unit_tasks.end(), task) - unit_tasks.begin() - 1;
    const int64_t split = task - unit_tasks[unit], splits = a.splits(unit);
    const int64_t tile = unit % a.row_tiles, bg = unit / a.row_tiles;
    const int64_t b = bg / a.head_groups, h0 = bg % a.head_groups * a.heads_per_task;
    const int64_t r0 = tile * kMaxRows, nr = std::min(kMaxRows, R - r0);
    // The tile's key range: the union of its rows' visible ranges, cut into splits.
    const int64_t L = a.length(b);
    int64_t lo = L, hi = 0;
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const auto [l, h] = a.visible(r % a.seq_q, L);
      if (h > l) lo = std::min(lo, l), hi = std::max(hi, h);
    }
    // Split boundaries fall on whole score tiles of absolute key positions, so that a tile of a
    // paged cache lies within one page (one row stride) and scores on AMX: cut anywhere, every
    // tile of a split would straddle a page and fall back to the FMAs (8-10% slower). The tiles
    // are dealt out evenly (the splits' tile counts differ by at most one), so that the threads'
    // runs of tasks can be cut at even costs: with splits of ceil(tiles / splits) tiles, the
    // short ones last, 257 keys in 8 splits gave 2 threads 192 and 65 keys.
    const int64_t base = lo / kScoreKeys * kScoreKeys, end = std::max(lo, hi);
    const int64_t tiles = (std::max<int64_t>(0, hi - base) + kScoreKeys - 1) / kScoreKeys;
    return Task{b,
                h0,
                std::min(a.heads_per_task, p.n_kv_heads - h0),
                r0,
                nr,
                std::clamp(base + tiles * split / splits * kScoreKeys, lo, end),
                std::clamp(base + tiles * (split + 1) / splits * kScoreKeys, lo, end),
                splits > 1};
  };
  // A task's cost: its rows times their keys, plus its set-up, partial and combine, which take
  // about as long as 16 keys (above).
  const auto task_cost = [&](int64_t task) {
    const Task t = task_of(task);
    return t.nh * t.nr * (t.j1 - t.j0 + kScoreKeys);
  };
  cpu::parallel_for_by_cost(tasks, task_cost, [&](int64_t begin, int64_t end) {
    TaskBuffers<T> buf(a.dpad);
    for (int64_t task = begin; task < end; ++task) {
      const Task t = task_of(task);
      attend<T>(a, buf, t.b, t.h0, t.nh, t.r0, t.nr, t.j0, t.j1);
      store_rows<T>(a, buf, task, t.partial, t.b, t.h0, t.nh, t.r0, t.nr);
    }
  });
  if (tasks > units) combine_splits<T>(a);
}

void kvcache_attention_cpu(const KVCacheAttentionParams& p) {
  check_values(p);
  LLAMA_EXT_DISPATCH_FLOATING(p.q.scalar_type(), "gqa_attention_with_kvcache_cpu", [&] { run<scalar_t>(p); });
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CPU, m) {
  m.impl("gqa_attention_with_kvcache", &gqa_attention_with_kvcache<kvcache_attention_cpu>);
}

}  // namespace llama_ext

// For the loader (llama_ext/_cpu_kernels.py): request 1 asks decode to take the key-major tiles
// where they apply, 0 the other tiles, -1 changes nothing; returns whether the key-major tiles now
// run, which they can only at a level that compiles them (AVX-512).
extern "C" __attribute__((visibility("default"))) int llama_ext_cpu_decode_key_major(int request) {
  if (request >= 0) llama_ext::g_key_major_tiles.store(request != 0, std::memory_order_relaxed);
  return llama_ext::kKeyMajor<float> && llama_ext::g_key_major_tiles.load(std::memory_order_relaxed);
}
