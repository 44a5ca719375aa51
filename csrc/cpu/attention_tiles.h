// The tile products of the CPU attention kernel (attention.cpp), as interchangeable policies
// with one interface, and the row copies that pack blocks for them:
//  - BlasTiles<T>: tiles in the op-math type multiplied by ATen's BLAS (fp64 always; fp32, fp16,
//    and bf16 below the avx512_bf16 level, except the avx2 forward). K and V are copied into
//    op-math rows side by side (widened from fp16/bf16), block by block on first use in the
//    forward (PackedKeyBlocks), once per key chunk in the backward.
//    Reduced-precision inputs are exact in fp32, so these are exactly the fp32-accumulated
//    products.
//  - FmaTiles<T>: the forward at the avx2 level (fp32, fp16, bf16), fp32 tiles on an AVX2 FMA
//    register tile (fma_gemm.h) with K^T and V packed as panels, block by block on first use
//    (PackedKeyBlocks).
//  - Bf16DotTiles: bf16 tiles multiplied on AVX512-BF16 VDPBF16PS (bf16_dot.h), or on AMX tiles
//    at the amx_bf16 level for the products whose A operand is row-major; P (and dS) are
//    rounded to bf16 before the second product, as FlashAttention does on GPUs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common.h"
#include "bf16_dot.h"
#include "cpu_vec.h"
#include "fma_gemm.h"
#include "scratch.h"

namespace llama_ext::cpu::attention {

// Keys per block: a [rows, kBlockK] fp32 score tile of a few hundred rows stays in L2.
inline constexpr int64_t kBlockK = 128;

// How many packed (or copied) K/V blocks of one (sequence, kv head) a forward thread keeps for
// its next query blocks. A thread's tasks are mostly query blocks of one kv head, each of which
// reads every key block up to its diagonal: kept, a block is packed once per kv head, not once
// per query block, which takes the packing (and its reads of strided rows or of pages) out of
// the inner loop. Packed again on every use instead, a forward took 1.02-1.11x as long (1x2048
// and 1x4096, 32/8 x 128, every dtype and tile policy, Emerald Rapids, 2026-12-06). But kept
// whole, the blocks would grow with the sequence on every thread: 4 d bytes a key in bf16
// tiles, 8 d in fp32 ones, 64 MB a thread at 128K tokens and d = 128; on 64 threads that is 8x
// a bf16 cache of 8 kv heads. So a thread keeps kKeptKeyBytes of blocks, or its share of the
// call's keys (all sequences' and kv heads' keys over the threads) where that is more: the
// threads together keep at most 16 MB each or one packed copy of the call's K and V.
inline constexpr int64_t kKeptKeyBytes = int64_t{16} << 20;
// What a forward thread may keep: `bytes` of packed blocks, or the blocks that hold `keys` keys
// where that is more.
struct KeptKeys {
  int64_t bytes = kKeptKeyBytes;
  int64_t keys = 0;
};

// The K or V rows [0, len) of one (sequence, kv head) as the forward reads them: row t at
// base + t * stride, or, from a paged KV cache, row t % page_size of page
// pages[(t / page_size) * page_step], the page at base + page * page_stride.
template <typename T>
struct KeyRows {
  const T* base = nullptr;
  int64_t len = 0, stride = 0;
  const int32_t* pages = nullptr;  // null: not paged
  int64_t page_step = 0, page_size = 0, page_stride = 0;

  // A [len, d] view's rows.
  static KeyRows of(const at::Tensor& seq) { return {seq.const_data_ptr<T>(), seq.size(0), seq.stride(0)}; }

  bool paged() const { return pages != nullptr; }
  // Whether both are the rows of one (sequence, kv head).
  bool same_rows(const KeyRows& other) const {
    return base == other.base && pages == other.pages && len == other.len;
  }
  // Calls run(first, src) for each run [first, first + count) of rows [k0, k0 + n) that lie
  // stride apart from src (the whole range, or the part of it in one page): one lookup a page.
  template <typename Run>
  void for_each_run(int64_t k0, int64_t n, const Run& run) const {
    if (!paged()) {
      run(k0, base + k0 * stride, n);
      return;
    }
    for (int64_t t = k0, end = k0 + n; t < end;) {
      const int64_t in_page = t % page_size, count = std::min(page_size - in_page, end - t);
      run(t, base + pages[t / page_size * page_step] * page_stride + in_page * stride, count);
      t += count;
    }
  }
};

// Row copies between strided T rows and packed rows of U (T, or its op-math type), converting
// with at::vec (cheaper than a TensorIterator copy_ for the small blocks here, which run once
// per tile).
template <typename T, typename U>
void load_rows(const T* src, int64_t src_stride, U* dst, int64_t rows, int64_t d) {
  if constexpr (std::is_same_v<T, U>) {
    for (int64_t r = 0; r < rows; ++r) std::copy(src + r * src_stride, src + r * src_stride + d, dst + r * d);
  } else {
    using IO = cpu::VecIO<T>;
    constexpr int64_t W = IO::kWidth;
    for (int64_t r = 0; r < rows; ++r) {
      const T* in = src + r * src_stride;
      U* out = dst + r * d;
      int64_t c = 0;
      for (; c + W <= d; c += W) IO::load(in + c).store(out + c);
      if (c < d) IO::load_partial(in + c, d - c).store(out + c, d - c);
    }
  }
}

// Rows [k0, k0 + n) of `rows` into dst, d elements apart.
template <typename T, typename U>
void load_rows(const KeyRows<T>& rows, int64_t k0, int64_t n, U* dst, int64_t d) {
  rows.for_each_run(k0, n, [&](int64_t first, const T* src, int64_t count) {
    load_rows<T, U>(src, rows.stride, dst + (first - k0) * d, count, d);
  });
}

// Rows [k0, k0 + n) of `rows` as U rows (pointer, row stride): where they are, when they lie
// stride apart (not paged) and are U already; else copied into stage ([n, d]).
template <typename U, typename T>
std::pair<const U*, int64_t> rows_as(const KeyRows<T>& rows, int64_t k0, int64_t n, int64_t d, U* stage) {
  if constexpr (std::is_same_v<T, U>) {
    if (!rows.paged()) return {rows.base + k0 * rows.stride, rows.stride};
  }
  load_rows<T, U>(rows, k0, n, stage, d);
  return {stage, d};
}

template <typename T>
void store_rows(const at::opmath_type<T>* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t rows,
                int64_t d) {
  using IO = cpu::VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  for (int64_t r = 0; r < rows; ++r) {
    const at::opmath_type<T>* in = src + r * src_stride;
    T* out = dst + r * dst_stride;
    int64_t c = 0;
    for (; c + W <= d; c += W) IO::store(out + c, Vec::loadu(in + c));
    if (c < d) IO::store(out + c, Vec::loadu(in + c, d - c), d - c);
  }
}

// Packs group_rows(seq, ...) into a contiguous [G * rows, d] matrix of U (head-major).
template <typename T, typename U>
void pack_group_rows(const at::Tensor& seq, int64_t kvh, int64_t group, int64_t row0, int64_t rows, U* dst) {
  const int64_t d = seq.size(2);
  const T* base = seq.const_data_ptr<T>() + row0 * seq.stride(0);
  for (int64_t g = 0; g < group; ++g) {
    load_rows<T, U>(base + (kvh * group + g) * seq.stride(1), seq.stride(0), dst + g * rows * d, rows, d);
  }
}

// The inverse of pack_group_rows: writes [G * rows, d] acc_t rows (row stride src_stride) into
// seq, rounding to T.
template <typename T>
void unpack_group_rows(const at::opmath_type<T>* src, int64_t src_stride, const at::Tensor& seq, int64_t kvh,
                       int64_t group, int64_t row0, int64_t rows) {
  const int64_t d = seq.size(2);
  T* base = seq.mutable_data_ptr<T>() + row0 * seq.stride(0);
  for (int64_t g = 0; g < group; ++g) {
    store_rows<T>(src + g * rows * src_stride, src_stride, base + (kvh * group + g) * seq.stride(1), seq.stride(0),
                  rows, d);
  }
}

// ---- tile products ----------------------------------------------------------------------------
//
// The policies of the file comment, with one interface:
// load the query-side rows of a block, S (and dP) for a key block, then accumulate P V (or
// the three gradient products). A policy's score tiles are fp32 rows of stride
// score_stride(n) >= n; columns past n hold scores of zero-padded keys and are masked like any
// key the row cannot see. The forward's S is only read on each row's visible columns, which
// forward_scores is given: a policy may leave the others unwritten. The softmax writes
// probabilities through probs(row, n), in place over the scores or into the policy's bf16 tile.

// The key blocks of one (sequence, kv head) that a forward policy has packed, block_keys keys
// and block_bytes each, in `kept` slots that keep their blocks (KeptKeys' worth) and, when the
// sequence has more blocks, one more that does not, the spare. Block blk takes slot blk % kept
// when that slot is free or holds it already: it is packed there on first use and kept. Else it
// is packed again on each use into the spare, slot `kept`. A thread's blocks are a few runs of
// consecutive ones (the key ranges of its query blocks), so they collide only when its keys
// outnumber its slots; then the first blocks to come stay.
template <typename T>
struct PackedKeyBlocks {
  int64_t block_keys, block_bytes;
  KeptKeys budget;
  KeyRows<T> k_src, v_src;
  int64_t blocks = 0, kept = 0;
  std::vector<int64_t> held;  // the block each kept slot holds; -1: none

  PackedKeyBlocks(int64_t block_keys, int64_t block_bytes, const KeptKeys& budget)
      : block_keys(block_keys), block_bytes(block_bytes), budget(budget) {}

  // Starts over when the rows are another (sequence, kv head)'s; true when it did (the caller
  // then makes room for slots() slots).
  bool follow(const KeyRows<T>& k_seq, const KeyRows<T>& v_seq) {
    const int64_t n_blocks = ceil_div(k_seq.len, block_keys);
    if (k_seq.same_rows(k_src) && v_seq.same_rows(v_src) && blocks == n_blocks) return false;
    k_src = k_seq;
    v_src = v_seq;
    blocks = n_blocks;
    // Where the spare slot is needed, it comes out of the budget.
    const int64_t keep = std::max(budget.bytes / block_bytes, ceil_div(budget.keys, block_keys));
    kept = n_blocks <= keep ? std::max<int64_t>(n_blocks, 1) : std::max<int64_t>(keep - 1, 1);
    held.assign(kept, -1);
    return true;
  }
  int64_t slots() const { return kept + (blocks > kept ? 1 : 0); }
  // Block blk's slot, and whether the caller must pack the block into it now.
  std::pair<int64_t, bool> slot(int64_t blk) {
    int64_t& holder = held[blk % kept];
    if (holder == blk) return {blk % kept, false};
    if (holder < 0) {
      holder = blk;
      return {blk % kept, true};
    }
    return {kept, true};
  }
};

enum class Pass { kForward, kBackward };

template <typename T>
struct BlasTiles {
  using acc_t = at::opmath_type<T>;
  using prob_t = acc_t;  // the softmax writes P over the scores, in place
  static constexpr int64_t kForwardKeys = kBlockK;  // keys per forward block
  static constexpr bool kWiden = !std::is_same_v<T, acc_t>;

  int64_t d, M = 0;
  at::Tensor q, s;            // [max_rows, d] packed query rows; [max_rows * kBlockK] S / P tile
  at::Tensor acc;             // forward: [max_rows, d] output accumulator
  at::Tensor k_blk, v_blk;    // forward: the current [n, d] block
  // Forward: the op-math copies of the K and V blocks of the (sequence, kv head) the last
  // block came from, [kBlockK, d] a slot (PackedKeyBlocks), copied on first use. fp32 too: the
  // BLAS products on its [n, d] rows ran 1.02-1.15x as fast as on the inputs' rows,
  // n_kv_heads x d apart (gqa_attention forward, 1K-4K tokens, 32/8 x 128 and 16/16 x 64,
  // Emerald Rapids, 2026-12-05). A block that finds no slot of its own is copied into the spare
  // one on each use, or, fp32 / fp64 and not paged, read where it lies.
  at::Tensor k_wide, v_wide;  // [slots * kBlockK, d]
  PackedKeyBlocks<T> blocks_copied;
  at::Tensor dout, dp, dq;    // backward: packed dO rows, dP / dS tile, dq accumulator
  at::Tensor k_chunk, v_chunk, dk, dv;  // backward: [chunk keys, d], copied in acc_t once per chunk

  BlasTiles(Pass pass, int64_t max_rows, int64_t head_dim, const at::TensorOptions& acc_opts,
            const KeptKeys& kept_keys = {})
      : d(head_dim), blocks_copied(kBlockK, 2 * kBlockK * head_dim * int64_t{sizeof(acc_t)}, kept_keys) {
    q = scratch({max_rows, d}, acc_opts);
    s = scratch({max_rows * kBlockK}, acc_opts);
    if (pass == Pass::kForward) {
      acc = scratch({max_rows, d}, acc_opts);
    } else {
      dout = scratch({max_rows, d}, acc_opts);
      dp = scratch({max_rows * kBlockK}, acc_opts);
      dq = scratch({max_rows, d}, acc_opts);
    }
  }
  int64_t score_stride(int64_t n) const { return n; }
  int64_t acc_stride() const { return d; }
  acc_t* scores() { return s.mutable_data_ptr<acc_t>(); }
  acc_t* grad_scores() { return dp.mutable_data_ptr<acc_t>(); }
  prob_t* probs(int64_t row, int64_t n) { return scores() + row * n; }
  at::Tensor tile(const at::Tensor& buf, int64_t n) { return buf.narrow(0, 0, M * n).view({M, n}); }

  void load_queries(const at::Tensor& q_seq, int64_t kvh, int64_t G, int64_t q0, int64_t rows) {
    M = G * rows;
    pack_group_rows<T, acc_t>(q_seq, kvh, G, q0, rows, q.mutable_data_ptr<acc_t>());
  }
  // Forward: S = Q K_blk^T for keys [k0, k0 + n) (every column), k0 a multiple of kBlockK.
  void forward_scores(const KeyRows<T>& k_seq, const KeyRows<T>& v_seq, int64_t k0, int64_t n,
                      const std::pair<int64_t, int64_t>* /*visible*/) {
    const bool restarted = blocks_copied.follow(k_seq, v_seq);
    const int64_t rows = blocks_copied.slots() * kBlockK;
    if (restarted && (!k_wide.defined() || k_wide.size(0) < rows)) {  // grows to the longest sequence's slots
      k_wide = scratch({rows, d}, q.options());
      v_wide = scratch({rows, d}, q.options());
    }
    const auto [slot, copy] = blocks_copied.slot(k0 / kBlockK);
    if (!kWiden && !k_seq.paged() && slot == blocks_copied.kept) {  // used once: read where it lies
      const auto in_place = [&](const KeyRows<T>& rows) {
        return at::from_blob(const_cast<T*>(rows.base + k0 * rows.stride), {n, d}, {rows.stride, 1}, q.options());
      };
      k_blk = in_place(k_seq);
      v_blk = in_place(v_seq);
    } else {
      const int64_t keys = std::min(kBlockK, k_seq.len - k0);  // the block's keys; the task uses n of them
      acc_t* k_rows = k_wide.mutable_data_ptr<acc_t>() + slot * kBlockK * d;
      acc_t* v_rows = v_wide.mutable_data_ptr<acc_t>() + slot * kBlockK * d;
      if (copy) {
        load_rows<T, acc_t>(k_seq, k0, keys, k_rows, d);
        load_rows<T, acc_t>(v_seq, k0, keys, v_rows, d);
      }
      k_blk = k_wide.narrow(0, slot * kBlockK, n);
      v_blk = v_wide.narrow(0, slot * kBlockK, n);
    }
    at::Tensor out = tile(s, n);
    at::mm_out(out, q.narrow(0, 0, M), k_blk.t());
  }
  void accumulate_values(int64_t n) { acc.narrow(0, 0, M).addmm_(tile(s, n), v_blk); }

  // Backward.
  // Copies the chunk's K/V rows side by side in acc_t (fp32 too: as in the forward, the BLAS
  // products ran faster on them, 1.04-1.27x in the fp32 backward at 1K-2K tokens, 32/8, 16/16
  // and 32/32 heads of 64 and 128, Emerald Rapids, 2026-12-05).
  void load_key_chunk(const at::Tensor& k_rows, const at::Tensor& v_rows) {
    k_chunk = k_rows.to(q.options(), /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
    v_chunk = v_rows.to(q.options(), /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
    dk = at::zeros(k_chunk.sizes(), q.options());
    dv = at::zeros(v_chunk.sizes(), q.options());
  }
  // The [chunk keys, d] view of the dK or dV accumulator.
  at::Tensor key_grad(const at::Tensor& acc) const { return acc; }
  void load_query_grads(const at::Tensor& q_seq, const at::Tensor& dout_seq, int64_t kvh, int64_t G, int64_t q0,
                        int64_t rows) {
    load_queries(q_seq, kvh, G, q0, rows);
    pack_group_rows<T, acc_t>(dout_seq, kvh, G, q0, rows, dout.mutable_data_ptr<acc_t>());
  }
  // S = Q K^T and dP = dO V^T for chunk keys [k0, k0 + n).
  void backward_scores(int64_t k0, int64_t n) {
    at::Tensor s_tile = tile(s, n), dp_tile = tile(dp, n);
    at::mm_out(s_tile, q.narrow(0, 0, M), k_chunk.narrow(0, k0, n).t());
    at::mm_out(dp_tile, dout.narrow(0, 0, M), v_chunk.narrow(0, k0, n).t());
  }
  // dV += P^T dO, dK += dS^T Q, dQ += dS K (the softmax scale is applied by the caller).
  void accumulate_grads(int64_t k0, int64_t n) {
    const at::Tensor p_tile = tile(s, n), ds_tile = tile(dp, n);
    dv.narrow(0, k0, n).addmm_(p_tile.t(), dout.narrow(0, 0, M));
    dk.narrow(0, k0, n).addmm_(ds_tile.t(), q.narrow(0, 0, M));
    dq.narrow(0, 0, M).addmm_(ds_tile, k_chunk.narrow(0, k0, n));
  }
};

#if defined(LLAMA_EXT_FMA_GEMM)
// The forward at the avx2 level for fp32, fp16 and bf16: fp32 tiles on fma_gemm.h's register
// tile instead of ATen's sgemm. Each key block of the (sequence, kv head) is widened and packed
// on first use (PackedKeyBlocks), K^T and V as 16-column panels (kBlockK keys each, zero
// columns past d and past the sequence's last key).
template <typename T>
struct FmaTiles {
  using acc_t = float;
  using prob_t = float;  // the softmax writes P over the scores, in place
  static constexpr int64_t kForwardKeys = kBlockK;
  static constexpr int64_t kPanel = cpu::fma_gemm::kPanel;

  int64_t d, d_pad, M = 0;
  at::Tensor q, s, acc;  // [max_rows, d] query rows; [max_rows, kBlockK] S / P tile; [max_rows, d_pad] output
  at::Tensor stage;      // [kBlockK, d] one key block's K or V rows in fp32 (T != float, or paged)
  // Per slot (PackedKeyBlocks): K^T panels [kBlockK / 16][d][16], then V panels
  // [d_pad / 16][kBlockK][16].
  at::Tensor packed;
  PackedKeyBlocks<T> blocks_packed;
  const float* v_block = nullptr;  // the current block's V panels
  std::vector<cpu::fma_gemm::Span> spans;  // the current block's visible columns, per row tile

  FmaTiles(int64_t max_rows, int64_t head_dim, const at::TensorOptions& acc_opts, const KeptKeys& kept_keys)
      : d(head_dim),
        d_pad(ceil_div(head_dim, kPanel) * kPanel),
        blocks_packed(kBlockK, block_floats() * int64_t{sizeof(float)}, kept_keys) {
    q = scratch({max_rows, d}, acc_opts);
    s = scratch({max_rows * kBlockK}, acc_opts);
    acc = scratch({max_rows, d_pad}, acc_opts);
    stage = scratch({kBlockK, d}, acc_opts);
  }
  static int64_t score_stride(int64_t n) { return ceil_div(n, kPanel) * kPanel; }
  int64_t acc_stride() const { return d_pad; }
  int64_t block_floats() const { return kBlockK * (d + d_pad); }
  float* scores() { return s.mutable_data_ptr<float>(); }
  prob_t* probs(int64_t row, int64_t n) { return scores() + row * score_stride(n); }

  void load_queries(const at::Tensor& q_seq, int64_t kvh, int64_t G, int64_t q0, int64_t rows) {
    M = G * rows;
    pack_group_rows<T, float>(q_seq, kvh, G, q0, rows, q.mutable_data_ptr<float>());
  }
  // Keys [k0, k0 + n), k0 a multiple of kBlockK; only the row tiles' visible columns are
  // computed.
  void forward_scores(const KeyRows<T>& k_seq, const KeyRows<T>& v_seq, int64_t k0, int64_t n,
                      const std::pair<int64_t, int64_t>* visible) {
    const bool restarted = blocks_packed.follow(k_seq, v_seq);
    const int64_t slots = blocks_packed.slots();
    if (restarted && (!packed.defined() || packed.numel() < slots * block_floats())) {
      packed = scratch({slots * block_floats()}, s.options());  // grows to the longest sequence's slots
    }
    const auto [slot, pack] = blocks_packed.slot(k0 / kBlockK);
    float* k_panels = packed.mutable_data_ptr<float>() + slot * block_floats();
    float* v_panels = k_panels + kBlockK * d;
    if (pack) {
      const int64_t keys = std::min(kBlockK, k_seq.len - k0);  // the block's keys; the task uses n of them
      const auto [k_rows, k_stride] = rows_as<float>(k_seq, k0, keys, d, stage.mutable_data_ptr<float>());
      cpu::fma_gemm::pack_transposed(k_rows, k_stride, keys, d, k_panels);
      const auto [v_rows, v_stride] = rows_as<float>(v_seq, k0, keys, d, stage.mutable_data_ptr<float>());
      cpu::fma_gemm::pack_rows(v_rows, v_stride, keys, d, v_panels, kBlockK);
    }
    v_block = v_panels;
    cpu::fma_gemm::tile_spans(visible, M, spans);
    const int64_t stride = score_stride(n);
    cpu::fma_gemm::gemm_visible_columns(M, stride, d, q.const_data_ptr<float>(), d, k_panels, d, scores(), stride,
                                        spans);
  }
  // O += P V over the keys each row tile sees (within the n of the task: the panels' later rows
  // are never read).
  void accumulate_values(int64_t n) {
    cpu::fma_gemm::gemm_visible_k(M, d_pad, scores(), score_stride(n), v_block, kBlockK, acc.mutable_data_ptr<float>(),
                                  d_pad, spans);
  }
};
#endif

#if defined(LLAMA_EXT_BF16_DOT)
struct Bf16DotTiles {
  using acc_t = float;
  using prob_t = at::BFloat16;  // the softmax rounds P to bf16 for the P V product
  using bf16 = at::BFloat16;
  static constexpr int64_t kLanes = cpu::bf16_dot::kLanes;

  int64_t d, d_pad, M = 0;
  at::Tensor q;     // [max_rows, d] bf16 query rows (A of Q K^T)
  // Keys per forward block: twice the backward's, which halves the per-row work of the online
  // softmax (maxima, sums, rescaling) per key; the [max_rows, 256] fp32 score tile and its bf16
  // probabilities still stay in L2.
  static constexpr int64_t kForwardKeys = 2 * kBlockK;

  at::Tensor s;     // [max_rows, kForwardKeys] fp32 score tile
  at::Tensor k_t;   // K^T packed one [d/2][B][2] block per B keys (B of Q K^T): B = kForwardKeys
                    // in the forward, kBlockK in the backward
  // Forward: bf16 P [max_rows, n_pad]; V packed one [kForwardKeys/2][d_pad][2] block per
  // kForwardKeys keys (B of P V), and a zero-padded copy of one block (v_part); fp32 output
  // accumulator [max_rows, d_pad]. The K^T and V blocks are those of one (sequence, kv head),
  // a block a slot (PackedKeyBlocks).
  at::Tensor p, v_pairs, v_part, acc;
  PackedKeyBlocks<bf16> blocks_packed;
  at::Tensor stage;  // [kForwardKeys, d] one block's K or V rows side by side (a paged cache's)
  const bf16* v_block = nullptr;  // the B operand of the current block's P V
  // Backward: dO rows (A of dO V^T); Q and dO as row pairs [ceil(max_rows / 2)][d_pad][2] (B of
  // dS^T Q and P^T dO); the fp32 dP / dS tile; bf16 P and dS as row pairs (A of P^T dO, dS^T Q
  // with strides (2, 2 n_pad)) and dS row-major (A of dS K); dq accumulator [max_rows, d_pad];
  // per block of the chunk: V^T packed like k_t (B of dO V^T) and K packed
  // [kBlockK/2][d_pad][2] (B of dS K); dK and dV accumulators [chunk keys, d_pad].
  at::Tensor dout, q_pairs, dout_pairs, dp, p_pairs, ds_pairs, ds, dq, v_t, k_pairs, dk, dv;
#if defined(LLAMA_EXT_AMX)
  // At the amx_bf16 level dK and dV accumulate transposed, [d_pad, chunk keys rounded to
  // kBlockK], as dK^T += Q^T dS and dV^T += dO^T P: their A operands Q^T and dO^T
  // ([d_pad, M_pad], M_pad = M rounded to kAlignK, zeros past M) are row-major, as AMX tiles
  // need, and P, dS enter as the row-pair layouts (B, over M_pad rows). Q^T is the word
  // transpose of q_pairs (word (pair p, column c) = Q rows 2p, 2p+1 at c), built once per query
  // block.
  static constexpr bool kTransposedKeyGrads = true;
#else
  static constexpr bool kTransposedKeyGrads = false;
#endif
  at::Tensor q_t, dout_t;
  int64_t chunk_keys = 0, M_pad = 0;

  Bf16DotTiles(Pass pass, int64_t max_rows, int64_t head_dim, const at::TensorOptions& acc_opts,
               const KeptKeys& kept_keys = {})
      : d(head_dim),
        d_pad(cpu::bf16_dot::round_up(head_dim, kLanes)),
        blocks_packed(kForwardKeys, (d + d_pad) * kForwardKeys * int64_t{sizeof(bf16)}, kept_keys) {
    const auto bf16_opts = acc_opts.dtype(at::kBFloat16);
    const int64_t rows_pad = cpu::bf16_dot::round_up(max_rows, cpu::bf16_dot::kAlignK);
    q = scratch({max_rows * d}, bf16_opts);
    s = scratch({max_rows * kForwardKeys}, acc_opts);
    stage = scratch({kForwardKeys * d}, bf16_opts);
    if (pass == Pass::kForward) {
      p = scratch({max_rows * kForwardKeys}, bf16_opts);
      v_part = scratch({kForwardKeys * d_pad}, bf16_opts);
      acc = scratch({max_rows, d_pad}, acc_opts);
    } else {
      dout = scratch({max_rows * d}, bf16_opts);
      q_pairs = scratch({rows_pad * d_pad}, bf16_opts);
      dout_pairs = scratch({rows_pad * d_pad}, bf16_opts);
      dp = scratch({max_rows * kBlockK}, acc_opts);
      p_pairs = scratch({rows_pad * kBlockK}, bf16_opts);
      ds_pairs = scratch({rows_pad * kBlockK}, bf16_opts);
      if (kTransposedKeyGrads) {
        q_t = scratch({d_pad * rows_pad}, bf16_opts);
        dout_t = scratch({d_pad * rows_pad}, bf16_opts);
      }
      ds = scratch({max_rows * kBlockK}, bf16_opts);
      dq = scratch({max_rows, d_pad}, acc_opts);
    }
  }
  static bf16* bf16_ptr(const at::Tensor& t) { return t.mutable_data_ptr<bf16>(); }
  static float* fp32_ptr(const at::Tensor& t) { return t.mutable_data_ptr<float>(); }
  // Whole k steps of the fast P V product (bf16_dot::kAlignK); a multiple of kLanes.
  static int64_t score_stride(int64_t n) { return cpu::bf16_dot::round_up(n, cpu::bf16_dot::kAlignK); }
  int64_t acc_stride() const { return d_pad; }
  float* scores() { return fp32_ptr(s); }
  float* grad_scores() { return fp32_ptr(dp); }
  prob_t* probs(int64_t row, int64_t n) { return bf16_ptr(p) + row * score_stride(n); }

  void load_queries(const at::Tensor& q_seq, int64_t kvh, int64_t G, int64_t q0, int64_t rows) {
    M = G * rows;
    pack_group_rows<bf16, bf16>(q_seq, kvh, G, q0, rows, bf16_ptr(q));
  }
  // Packs keys [k0, k0 + n) as the B operand of X K^T.
  void pack_keys_transposed(const KeyRows<bf16>& rows, int64_t k0, int64_t n, bf16* dst, int64_t ldb) const {
    const auto [src, stride] = rows_as<bf16>(rows, k0, n, d, bf16_ptr(stage));
    cpu::bf16_dot::pack_transposed(src, stride, n, d, dst, ldb);
  }
  // Packs keys [k0, k0 + n) as the B operand of X K (K rows padded to ldk).
  void pack_keys_as_rows(const KeyRows<bf16>& rows, int64_t k0, int64_t n, int64_t ldk, bf16* dst) const {
    const auto [src, stride] = rows_as<bf16>(rows, k0, n, d, bf16_ptr(stage));
    cpu::bf16_dot::pack_row_pairs(src, stride, n, d, dst, ldk / 2, d_pad);
  }
  // out[M, n_pad] = x[M, d] Y^T with Y^T packed (ldb columns).
  void product_with_keys(const at::Tensor& x, const bf16* y_t, int64_t ldb, int64_t n, float* out) const {
    const int64_t n_pad = score_stride(n);
    cpu::bf16_dot::gemm(M, n_pad, d / 2, {bf16_ptr(x), d, 2}, y_t, ldb, out, n_pad, /*accumulate=*/false);
  }

  // Keys [k0, k0 + n), k0 a multiple of kForwardKeys (every column).
  void forward_scores(const KeyRows<bf16>& k_seq, const KeyRows<bf16>& v_seq, int64_t k0, int64_t n,
                      const std::pair<int64_t, int64_t>* /*visible*/) {
    const bool restarted = blocks_packed.follow(k_seq, v_seq);
    const int64_t slots = blocks_packed.slots();
    if (restarted && (!k_t.defined() || k_t.numel() < slots * d * kForwardKeys)) {  // grows to the longest's slots
      k_t = scratch({slots * d * kForwardKeys}, s.options().dtype(at::kBFloat16));
      v_pairs = scratch({slots * kForwardKeys * d_pad}, s.options().dtype(at::kBFloat16));
    }
    const int64_t keys = std::min(kForwardKeys, k_seq.len - k0);  // the block's keys; the task uses n of them
    const auto [slot, pack] = blocks_packed.slot(k0 / kForwardKeys);
    bf16* k_block = bf16_ptr(k_t) + slot * d * kForwardKeys;
    bf16* v_pairs_block = bf16_ptr(v_pairs) + slot * kForwardKeys * d_pad;
    if (pack) {
      pack_keys_transposed(k_seq, k0, keys, k_block, kForwardKeys);
      pack_keys_as_rows(v_seq, k0, keys, kForwardKeys, v_pairs_block);
    }
    v_block = v_pairs_block;
    if (n < keys) {
      // The P V product reads V rows up to n_pad: past n they must be zeros, not the block's
      // later keys, which may be non-finite (0 * Inf is NaN) and which the task must not read.
      pack_keys_as_rows(v_seq, k0, n, kForwardKeys, bf16_ptr(v_part));
      v_block = bf16_ptr(v_part);
    }
    product_with_keys(q, k_block, kForwardKeys, n, fp32_ptr(s));
  }
  void accumulate_values(int64_t n) {
    const int64_t n_pad = score_stride(n);
    cpu::bf16_dot::gemm(M, d_pad, n_pad / 2, {bf16_ptr(p), n_pad, 2}, v_block, d_pad, fp32_ptr(acc), d_pad,
                        /*accumulate=*/true);
  }

  void load_key_chunk(const at::Tensor& k_chunk, const at::Tensor& v_chunk) {
    const auto k_rows = KeyRows<bf16>::of(k_chunk), v_rows = KeyRows<bf16>::of(v_chunk);
    const int64_t keys = k_rows.len, blocks = ceil_div(keys, kBlockK);
    const auto bf16_opts = s.options().dtype(at::kBFloat16);
    if (!k_t.defined() || k_t.numel() < blocks * d * kBlockK) {  // grows to the largest chunk
      k_t = scratch({blocks * d * kBlockK}, bf16_opts);
      v_t = scratch({blocks * d * kBlockK}, bf16_opts);
      k_pairs = scratch({blocks * kBlockK * d_pad}, bf16_opts);
    }
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t k0 = blk * kBlockK, n = std::min(kBlockK, keys - k0);
      pack_keys_transposed(k_rows, k0, n, bf16_ptr(k_t) + blk * d * kBlockK, kBlockK);
      pack_keys_transposed(v_rows, k0, n, bf16_ptr(v_t) + blk * d * kBlockK, kBlockK);
      pack_keys_as_rows(k_rows, k0, n, kBlockK, bf16_ptr(k_pairs) + blk * kBlockK * d_pad);
    }
    chunk_keys = keys;
    const auto shape =
        kTransposedKeyGrads ? std::vector<int64_t>{d_pad, blocks * kBlockK} : std::vector<int64_t>{keys, d_pad};
    dk = at::zeros(shape, s.options());
    dv = at::zeros(shape, s.options());
  }
  // The [chunk keys, d] view of the dK or dV accumulator.
  at::Tensor key_grad(const at::Tensor& acc) const {
    return kTransposedKeyGrads ? acc.narrow(0, 0, d).narrow(1, 0, chunk_keys).t() : acc.narrow(1, 0, d);
  }
  void load_query_grads(const at::Tensor& q_seq, const at::Tensor& dout_seq, int64_t kvh, int64_t G, int64_t q0,
                        int64_t rows) {
    load_queries(q_seq, kvh, G, q0, rows);
    pack_group_rows<bf16, bf16>(dout_seq, kvh, G, q0, rows, bf16_ptr(dout));
    const int64_t row_pairs = ceil_div(M, 2);
    cpu::bf16_dot::pack_row_pairs(bf16_ptr(q), d, M, d, bf16_ptr(q_pairs), row_pairs, d_pad);
    cpu::bf16_dot::pack_row_pairs(bf16_ptr(dout), d, M, d, bf16_ptr(dout_pairs), row_pairs, d_pad);
    M_pad = cpu::bf16_dot::round_up(M, cpu::bf16_dot::kAlignK);
    if (kTransposedKeyGrads) {
      cpu::bf16_dot::pack_transposed(bf16_ptr(q_pairs), 2 * d_pad, row_pairs, 2 * d_pad, bf16_ptr(q_t), M_pad / 2);
      cpu::bf16_dot::pack_transposed(bf16_ptr(dout_pairs), 2 * d_pad, row_pairs, 2 * d_pad, bf16_ptr(dout_t),
                                     M_pad / 2);
    }
  }
  // k0 is a multiple of kBlockK (chunks are whole blocks); n <= kBlockK.
  void backward_scores(int64_t k0, int64_t n) {
    const int64_t block_offset = (k0 / kBlockK) * d * kBlockK;
    product_with_keys(q, bf16_ptr(k_t) + block_offset, kBlockK, n, fp32_ptr(s));
    product_with_keys(dout, bf16_ptr(v_t) + block_offset, kBlockK, n, fp32_ptr(dp));
  }
  void accumulate_grads(int64_t k0, int64_t n) {
    namespace dot = cpu::bf16_dot;
    // The transposed products contract over M_pad rows (zeros past M); the others over M.
    const int64_t n_pad = score_stride(n), row_pairs = kTransposedKeyGrads ? M_pad / 2 : ceil_div(M, 2);
    dot::round_row_pairs(fp32_ptr(s), n_pad, M, n_pad, bf16_ptr(p_pairs), row_pairs);
    dot::round_row_pairs(fp32_ptr(dp), n_pad, M, n_pad, bf16_ptr(ds_pairs), row_pairs);
    dot::round_rows(fp32_ptr(dp), n_pad, M, n_pad, bf16_ptr(ds), n_pad);
    if (kTransposedKeyGrads) {
      const int64_t ldk = dk.size(1);
      dot::gemm(d_pad, n_pad, row_pairs, {bf16_ptr(dout_t), M_pad, 2}, bf16_ptr(p_pairs), n_pad, fp32_ptr(dv) + k0,
                ldk, /*accumulate=*/true);
      dot::gemm(d_pad, n_pad, row_pairs, {bf16_ptr(q_t), M_pad, 2}, bf16_ptr(ds_pairs), n_pad, fp32_ptr(dk) + k0, ldk,
                /*accumulate=*/true);
    } else {
      // As A operands with strides (2, 2 n_pad) the row-pair layouts read as P^T and dS^T.
      dot::gemm(n, d_pad, row_pairs, {bf16_ptr(p_pairs), 2, 2 * n_pad}, bf16_ptr(dout_pairs), d_pad,
                fp32_ptr(dv) + k0 * d_pad, d_pad, /*accumulate=*/true);
      dot::gemm(n, d_pad, row_pairs, {bf16_ptr(ds_pairs), 2, 2 * n_pad}, bf16_ptr(q_pairs), d_pad,
                fp32_ptr(dk) + k0 * d_pad, d_pad, /*accumulate=*/true);
    }
    const bf16* k_block_pairs = bf16_ptr(k_pairs) + (k0 / kBlockK) * kBlockK * d_pad;
    dot::gemm(M, d_pad, n_pad / 2, {bf16_ptr(ds), n_pad, 2}, k_block_pairs, d_pad, fp32_ptr(dq), d_pad,
              /*accumulate=*/true);
  }
};
#endif

// Runs body with the tile policy for dtype T and the pass; kept_keys: what a forward thread may
// keep of its packed key blocks.
template <Pass kPass, typename T, typename Body>
void with_tiles(int64_t max_rows, int64_t d, const at::TensorOptions& acc_opts, const KeptKeys& kept_keys,
                const Body& body) {
#if defined(LLAMA_EXT_BF16_DOT)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    Bf16DotTiles tiles(kPass, max_rows, d, acc_opts, kept_keys);
    body(tiles);
    return;
  }
#endif
#if defined(LLAMA_EXT_FMA_GEMM)
  if constexpr (kPass == Pass::kForward && std::is_same_v<at::opmath_type<T>, float>) {
    FmaTiles<T> tiles(max_rows, d, acc_opts, kept_keys);
    body(tiles);
    return;
  }
#endif
  BlasTiles<T> tiles(kPass, max_rows, d, acc_opts, kept_keys);
  body(tiles);
}

}  // namespace llama_ext::cpu::attention
