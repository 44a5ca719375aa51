// Grouped-query attention on the CPU: a FlashAttention-2 style blocked kernel, forward and
// backward, batched and varlen through one code path.
//
// Layout. q [.., seq_q, n_q_heads, d], k/v [.., seq_k, n_kv_heads, d]; query head h reads kv
// head h / G (G = n_q_heads / n_kv_heads). A sequence is a strided view of the inputs (one
// batch row, or one cu_seqlens slice), so batched and varlen differ only in how that view is
// cut; the forward also reads the K/V of a paged KV cache page by page (KeyRows,
// attention_forward.h). K and V are never repeated per query head nor gathered: the tile
// policies pack or copy the blocks they read, per thread.
//
// Forward, one task per (sequence, kv head, query block), spread over the threads by cost
// (parallel.h), so that varlen sequences of any lengths keep every thread busy. A task packs
// the block's rows of all G query heads of the group into one [G * rows, d] matrix, so every
// K/V block it reads serves the whole group with one product each:
//   S = Q K_blk^T                                 [G*rows, block_k]  (tile product)
//   online softmax per row: m' = max(m, max S), p = exp(scale (S - m')),
//   l' = l exp(scale (m - m')) + sum p,  O <- O exp(scale (m - m')) + P V_blk  (tile product)
// and at the end out = O / l, lse = scale m + log l. Only the block's [G*rows, block_k] score
// tile exists, never [seq_q, seq_k]: memory is O(sequence). Causal masking and the sliding
// window are bottom-right (KeyWindow, attention.h: row i sees keys [key_begin(i), key_end(i)),
// both non-decreasing in i): a query block visits only keys from its first row's begin to its
// last row's end, so key blocks outside every row's window are never read and the cost tracks
// the window, not the sequence; partial blocks mask per row by the row's valid column range.
// A row that sees no key (seq_q > seq_k under causal, an empty window, or a sequence with
// 0 keys) gives zeros and lse = 0.
//
// Logit softcap c > 0 (Gemma 2): the visible columns of the fp32 score tile become
// s' = c tanh(scale s / c) before the softmax, which then runs with scale 1 (m, lse are in
// units of s'). The backward recomputes t = tanh(scale s / c), P = exp(c t - lse) and
// multiplies dS by ds'/d(scale s) = 1 - t^2; the trailing scale of dK and dQ stays. tanh is
// Sleef's 1-ulp vector tanh.
//
// Backward (FlashAttention-2): one task per (sequence, kv head, chunk of key blocks). For each
// query block it recomputes S from q, k and the saved lse (P = exp(scale S - lse)), with
// D = rowsum(dO * O):
//   dV_blk += P^T dO,  dP = dO V_blk^T,  dS = P (dP - D)  [times 1 - t^2 under softcap],
//   dK_blk += scale dS^T Q,  dQ += scale dS K_blk
// A chunk visits only the query blocks whose rows can see one of its keys (first_row_reaching
// to first_row_past). dK and dV of a key block are owned by one task and summed over the
// group's query heads and all query blocks in a fixed order. dQ gets one op-math (fp32, fp64
// for fp64) partial per key chunk, written only on the rows the chunk reaches and reduced over
// the chunks that reached each row, in chunk order, afterwards (RowsReached, sum_partials). The
// number of chunks depends only on the shapes, so results are bit-identical for any thread count
// (deterministic).
//
// Tile products come from a policy (attention_tiles.h), so the loops above are
// written once:
//  - bf16 at the avx512_bf16 and amx_bf16 CPU levels: bf16 tiles stay bf16 and multiply on
//    VDPBF16PS (bf16_dot.h, twice the fp32 FMA rate) or, at amx_bf16, on AMX tiles (amx_dot.h)
//    wherever the A operand is row-major. As FlashAttention does on GPUs, the probabilities P
//    (forward) and P, dS (backward) are rounded to bf16 to enter the second product; scores,
//    softmax statistics and all accumulators are fp32.
//  - the forward at the avx2 level (fp32, fp16, bf16): each K/V block is widened to fp32 and
//    packed as 16-column panels once per kv head, and multiplied on an AVX2 FMA register tile
//    (fma_gemm.h), which on these shapes outruns ATen's sgemm (it packs both operands per call).
//  - everything else (fp64, and fp32, fp16, bf16 elsewhere and in the backward): K/V rows are
//    copied in the op-math type, block by block on first use in the forward (a thread keeps
//    16 MB of them, or its share of the call's keys: PackedKeyBlocks), once per key chunk in the
//    backward, and multiplied by ATen's BLAS.
//  Reduced-precision inputs are exact in fp32, so the fp32 products are exactly the
//  fp32-accumulated ones.
// out and the gradients are rounded once to the input dtype; lse stays fp32 (fp64 for fp64).
//
// FLOPs: forward 4 b seq_q seq_k n_q_heads d (half of it under causal); backward 2.5x that
// (5 products instead of 2). Bytes: q, out read/written once; each K/V block is read once per
// query block of each group (G times fewer than with repeated K/V) and stays in L2 while the
// group's rows use it; the score tile ([256, 128] fp32 = 128 KB) stays in L2. Why it is fast:
// the products run at the machine's matmul rate for the dtype, the elementwise softmax (one
// exp per score) is vectorized with at::vec, and no [seq_q, seq_k] tensor is ever written and
// read back, as an unfused composite does several times.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention.h"
#include "attention_forward.h"
#include "attention_tiles.h"
#include "cpu_vec.h"
#include "online_softmax.h"
#include "parallel.h"

namespace llama_ext {
namespace {

using namespace cpu::attention;

// Backward: aim for this many tasks (sequences * kv heads * key chunks) so that every thread
// has work even with batch 1 and few kv heads; at most kMaxKeyChunks dQ partials.
constexpr int64_t kTargetBackwardTasks = 32;
constexpr int64_t kMaxKeyChunks = 8;

// Visits task indices as 0, n-1, 1, n-2, ...: neighbouring tasks pair a cheap causal block
// with an expensive one, so the cost cuts between the threads' runs of tasks (parallel.h) fall
// where the running cost grows evenly.
int64_t zigzag(int64_t p, int64_t n) { return p % 2 == 0 ? p / 2 : n - 1 - p / 2; }

std::vector<int64_t> host_offsets(const std::optional<at::Tensor>& cu_seqlens) {
  if (!cu_seqlens.has_value()) return {};
  const at::Tensor host = cu_seqlens->to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* p = host.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + host.numel());
}

// The call's tensors cut into per-sequence views: q/out/grads [len_q, heads, d], lse [heads, len_q].
struct AttentionParams {
  at::Tensor q, k, v, out, lse;
  std::optional<at::Tensor> block_table;  // the forward's keys from a paged cache (attention_forward.h)
  std::vector<int64_t> q_begin, k_begin;  // varlen: cu_seqlens on the host; empty when batched
  AttentionShape shape;
  KeyWindow window;  // causal folded in
  double scale;
  double softcap;  // 0: off

  explicit AttentionParams(const AttentionCall& call, const std::optional<at::Tensor>& block_table = std::nullopt)
      : q(call.q),
        k(call.k),
        v(call.v),
        out(call.out),
        lse(call.lse),
        block_table(block_table),
        q_begin(host_offsets(call.cu_seqlens_q)),
        k_begin(host_offsets(call.cu_seqlens_k)),
        shape(call.shape),
        window(call.window),
        scale(call.scale),
        softcap(call.softcap) {}

  int64_t len_q(int64_t b) const { return shape.varlen ? q_begin[b + 1] - q_begin[b] : shape.seq_q; }
  int64_t len_k(int64_t b) const { return shape.varlen ? k_begin[b + 1] - k_begin[b] : shape.seq_k; }
  // Token t of q's [batch * seq_q] or [total_q] rows as (sequence, row within it).
  std::pair<int64_t, int64_t> token_row(int64_t t) const {
    if (!shape.varlen) return {t / shape.seq_q, t % shape.seq_q};
    const int64_t b = std::upper_bound(q_begin.begin(), q_begin.end(), t) - q_begin.begin() - 1;
    return {b, t - q_begin[b]};
  }
  // Token-major tensors [batch, seq, ...] or [total, ...]: the sequence's [len, ...] view.
  at::Tensor q_rows(const at::Tensor& t, int64_t b) const {
    return shape.varlen ? t.narrow(0, q_begin[b], len_q(b)) : t.select(0, b);
  }
  at::Tensor k_rows(const at::Tensor& t, int64_t b) const {
    return shape.varlen ? t.narrow(0, k_begin[b], len_k(b)) : t.select(0, b);
  }
  // The forward's rows of kv head kvh in sequence b of t (k or v): of its [len_k, heads, d]
  // view, or of the pages its block table names in the pool t [num_blocks, block_size, heads, d].
  template <typename T>
  KeyRows<T> key_rows(const at::Tensor& t, int64_t b, int64_t kvh) const {
    if (!block_table.has_value()) return KeyRows<T>::of(k_rows(t, b).select(1, kvh));
    KeyRows<T> rows;
    rows.base = t.const_data_ptr<T>() + kvh * t.stride(2);
    rows.len = len_k(b);
    rows.stride = t.stride(1);
    rows.pages = block_table->const_data_ptr<int32_t>() + b * block_table->stride(0);
    rows.page_step = block_table->stride(1);
    rows.page_size = t.size(1);
    rows.page_stride = t.stride(0);
    return rows;
  }
  // lse [batch, heads, seq_q] or [heads, total_q]: the sequence's [heads, len_q] view.
  at::Tensor lse_rows(const at::Tensor& t, int64_t b) const {
    return shape.varlen ? t.narrow(1, q_begin[b], len_q(b)) : t.select(0, b);
  }
  // Backward, keys [key0, key1) of sequence b: the rows of the query blocks that see one of
  // them, [first, end) in whole blocks of block_q. Rows before the first one whose window
  // reaches key0, and from the first one whose window starts at key1 or later, see none.
  std::pair<int64_t, int64_t> query_blocks_seeing(int64_t b, int64_t key0, int64_t key1, int64_t block_q) const {
    const int64_t lq = len_q(b), lk = len_k(b);
    const int64_t first_row = window.first_row_reaching(key0, lq, lk);
    const int64_t row_end = window.first_row_past(key1, lq, lk);
    const int64_t first = first_row - first_row % block_q;
    return {first, std::clamp(ceil_div(row_end, block_q) * block_q, first, lq)};
  }
  // The keys of [key0, key1) that rows [q0, q0 + rows) of sequence b see, as one range.
  std::pair<int64_t, int64_t> keys_seen(int64_t b, int64_t q0, int64_t rows, int64_t key0, int64_t key1) const {
    const int64_t lq = len_q(b), lk = len_k(b);
    return {std::max(key0, window.key_begin(q0, lq, lk)), std::min(key1, window.key_end(q0 + rows - 1, lq, lk))};
  }
  // Columns [lo, hi) of the key block [k0, k0 + n) that row i sees.
  std::pair<int64_t, int64_t> visible_columns(int64_t i, int64_t lq, int64_t lk, int64_t k0, int64_t n) const {
    const int64_t lo = std::clamp<int64_t>(window.key_begin(i, lq, lk) - k0, 0, n);
    return {lo, std::clamp<int64_t>(window.key_end(i, lq, lk) - k0, lo, n)};
  }
};

// Rows [row0, row0 + rows) of the G heads of kv head kvh in a [len, heads, d] view, as
// [G, rows, d].
at::Tensor group_rows(const at::Tensor& seq, int64_t kvh, int64_t group, int64_t row0, int64_t rows) {
  return seq.narrow(0, row0, rows).narrow(1, kvh * group, group).transpose(0, 1);
}

// D = rowsum(dO * O) of the group rows in pack_group_rows order: out[g * rows + r] is the
// fp32 (fp64) dot product of row q0 + r of head kvh * G + g in a_seq and b_seq [len, heads, d].
template <typename T>
void group_row_dots(const at::Tensor& a_seq, const at::Tensor& b_seq, int64_t kvh, int64_t group, int64_t row0,
                    int64_t rows, at::opmath_type<T>* out) {
  using IO = cpu::VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  const int64_t d = a_seq.size(2);
  for (int64_t g = 0; g < group; ++g) {
    const int64_t head = kvh * group + g;
    for (int64_t r = 0; r < rows; ++r) {
      const T* a = a_seq.const_data_ptr<T>() + (row0 + r) * a_seq.stride(0) + head * a_seq.stride(1);
      const T* b = b_seq.const_data_ptr<T>() + (row0 + r) * b_seq.stride(0) + head * b_seq.stride(1);
      Vec sum(0);
      int64_t c = 0;
      for (; c + W <= d; c += W) sum = at::vec::fmadd(IO::load(a + c), IO::load(b + c), sum);
      if (c < d) sum = at::vec::fmadd(IO::load_partial(a + c, d - c), IO::load_partial(b + c, d - c), sum);
      out[g * rows + r] = at::vec::vec_reduce_all<at::opmath_type<T>>([](Vec& x, Vec& y) { return x + y; }, sum);
    }
  }
}

// Backward of one row of a tile, on its visible columns [lo, hi) (0 elsewhere):
// p <- P = exp(scale s - lse), dp <- dS = P (dP - D); under softcap (kSoftcap, cap > 0)
// P = exp(cap t - lse) and dS = P (dP - D) (1 - t^2) with t = tanh(scale s / cap). P and dS
// enter the gradient products as prob_t.
template <bool kSoftcap, typename prob_t, typename acc_t>
void probs_and_grad_row(acc_t* p, acc_t* dp, int64_t n, int64_t lo, int64_t hi, acc_t scale, acc_t cap, acc_t lse,
                        acc_t delta) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec scale_v(scale), neg_lse_v(-lse), delta_v(delta), one_v(acc_t(1));
  const Vec in_v(kSoftcap ? scale / cap : acc_t(0)), cap_v(cap);
  const auto grad = [&](const Vec& s, const Vec& dpv, Vec& pv, Vec& dsv) {
    if constexpr (kSoftcap) {
      const Vec t = (s * in_v).tanh();
      pv = cpu::exp_for<prob_t>(at::vec::fmadd(t, cap_v, neg_lse_v));
      dsv = pv * (dpv - delta_v) * (one_v - t * t);
    } else {
      pv = cpu::exp_for<prob_t>(at::vec::fmadd(s, scale_v, neg_lse_v));
      dsv = pv * (dpv - delta_v);
    }
  };
  int64_t j = lo;
  Vec pv, dsv;
  for (; j + W <= hi; j += W) {
    grad(Vec::loadu(p + j), Vec::loadu(dp + j), pv, dsv);
    pv.store(p + j);
    dsv.store(dp + j);
  }
  if (j < hi) {
    const int64_t count = hi - j;
    grad(Vec::loadu(p + j, count), Vec::loadu(dp + j, count), pv, dsv);
    pv.store(p + j, count);
    dsv.store(dp + j, count);
  }
  std::fill(p, p + lo, acc_t(0));
  std::fill(dp, dp + lo, acc_t(0));
  std::fill(p + hi, p + n, acc_t(0));
  std::fill(dp + hi, dp + n, acc_t(0));
}

// ---- forward --------------------------------------------------------------------------------

// What each of `threads` forward threads may keep of its packed key blocks (PackedKeyBlocks):
// kKeptKeyBytes, or its share of the call's keys (every sequence's and kv head's) where that is
// more. LLAMA_EXT_CPU_KEPT_KEY_MB=N, read at each call, makes it N MB exactly: for the tests of
// the blocks past it, and for a machine short of memory.
KeptKeys kept_keys_per_thread(const AttentionParams& pb, int64_t threads) {
  if (const char* mb = std::getenv("LLAMA_EXT_CPU_KEPT_KEY_MB")) {
    char* end = nullptr;
    const long long value = std::strtoll(mb, &end, 10);
    TORCH_CHECK_VALUE(end != mb && *end == '\0' && value >= 0 && value < (1LL << 30),
                      "LLAMA_EXT_CPU_KEPT_KEY_MB must be a whole number of MB, 0 or more, got '", mb, "'");
    return {static_cast<int64_t>(value) << 20, 0};
  }
  int64_t keys = 0;
  for (int64_t b = 0; b < pb.shape.batch; ++b) keys += pb.len_k(b);
  return {kKeptKeyBytes, ceil_div(keys * pb.shape.n_kv_heads, threads)};
}

template <typename T, typename Tiles>
void forward_block(const AttentionParams& pb, int64_t b, int64_t kvh, int64_t qb, int64_t block_q, Tiles& tiles) {
  using acc_t = at::opmath_type<T>;
  const int64_t G = pb.shape.group(), d = pb.shape.head_dim;
  const int64_t lq = pb.len_q(b), lk = pb.len_k(b);
  const int64_t q0 = qb * block_q;
  if (q0 >= lq) return;
  const int64_t rows = std::min(block_q, lq - q0);
  const int64_t M = G * rows;
  const KeyRows<T> k_seq = pb.key_rows<T>(pb.k, b, kvh);
  const KeyRows<T> v_seq = pb.key_rows<T>(pb.v, b, kvh);

  tiles.load_queries(pb.q_rows(pb.q, b), kvh, G, q0, rows);
  const int64_t acc_stride = tiles.acc_stride();
  at::Tensor acc = tiles.acc.narrow(0, 0, M);
  acc.zero_();
  acc_t* acc_ptr = acc.mutable_data_ptr<acc_t>();
  std::vector<acc_t> m(M, -std::numeric_limits<acc_t>::infinity()), l(M, acc_t(0)), tile_max(M), alpha(M);
  std::vector<std::pair<int64_t, int64_t>> visible(M);
  const acc_t scale = static_cast<acc_t>(pb.scale), cap = static_cast<acc_t>(pb.softcap);
  // Capped scores enter the softmax as they are: its statistics are in units of s'.
  const acc_t softmax_scale = cap > 0 ? acc_t(1) : scale;

  // Keys before the first row's window or past the last row's are masked for the whole
  // block: never visited. Key blocks of the policy's kForwardKeys start at multiples of it
  // (from the one holding the first row's first key), so that a policy can pack each key
  // block once per kv head.
  constexpr int64_t kKeys = Tiles::kForwardKeys;
  const int64_t k_begin = pb.window.key_begin(q0, lq, lk);
  const int64_t k_end = pb.window.key_end(q0 + rows - 1, lq, lk);
  for (int64_t k0 = k_begin - k_begin % kKeys; k0 < k_end; k0 += kKeys) {
    const int64_t n = std::min(kKeys, k_end - k0);
    for (int64_t r = 0; r < M; ++r) visible[r] = pb.visible_columns(q0 + r % rows, lq, lk, k0, n);
    tiles.forward_scores(k_seq, v_seq, k0, n, visible.data());
    const int64_t stride = tiles.score_stride(n);
    acc_t* s = tiles.scores();
    for (int64_t r = 0; r < M; ++r) {
      const auto [lo, hi] = visible[r];
      if (cap > 0) cpu::softcap_row<acc_t>(s + r * stride, lo, hi, scale, cap);
      tile_max[r] = cpu::row_max<acc_t>(s + r * stride, lo, hi);
    }
    cpu::update_maxima<acc_t>(m.data(), tile_max.data(), alpha.data(), M, softmax_scale);
    for (int64_t r = 0; r < M; ++r) {
      const auto [lo, hi] = visible[r];
      l[r] = l[r] * alpha[r] +
             cpu::exp_row<T>(s + r * stride, tiles.probs(r, n), stride, lo, hi, softmax_scale, -m[r] * softmax_scale);
      if (alpha[r] != acc_t(1)) {
        acc_t* o = acc_ptr + r * acc_stride;
        for (int64_t c = 0; c < d; ++c) o[c] *= alpha[r];
      }
    }
    tiles.accumulate_values(n);
  }

  at::Tensor lse_block = at::empty({M}, acc.options().dtype(stats_dtype(pb.q.scalar_type())));
  auto* lse_ptr = lse_block.mutable_data_ptr<acc_t>();
  for (int64_t r = 0; r < M; ++r) {
    // l == 0 only when the row saw no key: output zeros and lse = 0 (finite) by convention,
    // written as such, since the row's accumulator may hold 0 * Inf = NaN from a non-finite V
    // row that the tile product multiplied by its zero probability.
    acc_t* o = acc_ptr + r * acc_stride;
    if (l[r] != 0) {  // NaN too: a NaN score makes the row NaN
      const acc_t inv = acc_t(1) / l[r];
      for (int64_t c = 0; c < d; ++c) o[c] *= inv;
      lse_ptr[r] = m[r] * softmax_scale + std::log(l[r]);
    } else {
      std::fill(o, o + d, acc_t(0));
      lse_ptr[r] = acc_t(0);
    }
  }
  unpack_group_rows<T>(acc_ptr, acc_stride, pb.q_rows(pb.out, b), kvh, G, q0, rows);
  pb.lse_rows(pb.lse, b).narrow(0, kvh * G, G).narrow(1, q0, rows).copy_(lse_block.view({G, rows}));
}

}  // namespace

void cpu::attention_forward(const AttentionCall& call, const std::optional<at::Tensor>& block_table) {
  // The tile products below are ATen ops on views of the inputs: keep autograd out of them.
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  TORCH_INTERNAL_ASSERT(!block_table.has_value() || !call.shape.varlen, "a block table needs a batched call");
  const AttentionParams pb(call, block_table);
  const AttentionShape& shape = pb.shape;
  const int64_t G = shape.group(), d = shape.head_dim;
  const int64_t block_q = block_q_for(G);
  const int64_t q_blocks = ceil_div(shape.seq_q, block_q);
  const int64_t tasks_per_seq = shape.n_kv_heads * q_blocks;
  const int64_t tasks = shape.batch * tasks_per_seq;
  // Task t: (sequence, kv head, query block), the blocks of one kv head in zigzag order.
  const auto forward_task = [&](int64_t t) {
    const int64_t b = t / tasks_per_seq, rest = t % tasks_per_seq;
    return std::array<int64_t, 3>{b, rest / q_blocks, zigzag(rest % q_blocks, q_blocks)};
  };
  // Its cost: the block's rows times the keys they visit, plus a key block's worth for its
  // packing and output; a block past its sequence's end (varlen) costs nothing.
  const auto forward_cost = [&](int64_t t) -> int64_t {
    const auto [b, kvh, qb] = forward_task(t);
    const int64_t lq = pb.len_q(b), lk = pb.len_k(b), q0 = qb * block_q;
    if (q0 >= lq) return 0;
    const int64_t rows = std::min(block_q, lq - q0);
    const int64_t keys = pb.window.key_end(q0 + rows - 1, lq, lk) - pb.window.key_begin(q0, lq, lk);
    return rows * (std::max<int64_t>(keys, 0) + kBlockK);
  };
  const KeptKeys kept_keys = kept_keys_per_thread(pb, cpu::threads_for(tasks));

  LLAMA_EXT_DISPATCH_FLOATING(pb.q.scalar_type(), "gqa_attention_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = pb.q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    cpu::parallel_for_by_cost(tasks, forward_cost, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView no_autograd;  // per worker thread
      with_tiles<Pass::kForward, scalar_t>(G * block_q, d, acc_opts, kept_keys, [&](auto& tiles) {
        for (int64_t t = begin; t < end; ++t) {
          const auto [b, kvh, qb] = forward_task(t);
          forward_block<scalar_t>(pb, b, kvh, qb, block_q, tiles);
        }
      });
    });
  });
}

namespace {

void attention_forward_cpu(const AttentionCall& call) { cpu::attention_forward(call, std::nullopt); }

// ---- backward -------------------------------------------------------------------------------

// The query rows [first, end) of a sequence that can see one of a key chunk's keys, in whole
// query blocks of block_q (the same for every kv head): the rows whose dq partial the chunk's
// tasks write. The others' they never touch, and sum_partials skips them: under causal masking
// the rows before the chunk's first key, 3/8 of all partial rows with 4 key chunks. Without their
// zeros (written, summed, and their pages faulted in) a b1 32/8 x 128 backward ran 1.07-1.18x as
// fast in bf16 and 1.03-1.08x in fp32 at 1K-4K tokens, its resident growth at 2K tokens in bf16
// 110 MB against 156 (Emerald Rapids, 2026-12-06).
struct RowsReached {
  int64_t first = 0, end = 0;
  bool has(int64_t row) const { return first <= row && row < end; }
};

// One task: keys [key0, key1) of kv head kvh in sequence b, which query rows `reached` see. dk/dv
// of these keys are written here; the task's share of dq goes to dq_partial (its own chunk
// slice), on those rows.
template <typename T, typename Tiles>
void backward_chunk(const AttentionParams& pb, const at::Tensor& dout, const at::Tensor& dq_partial,
                    const at::Tensor& dk, const at::Tensor& dv, int64_t b, int64_t kvh, int64_t key0, int64_t key1,
                    const RowsReached& reached, int64_t block_q, Tiles& tiles) {
  using acc_t = at::opmath_type<T>;
  const int64_t G = pb.shape.group();
  const int64_t lq = pb.len_q(b), lk = pb.len_k(b);
  key1 = std::min(key1, lk);
  const at::Tensor dq_seq = pb.q_rows(dq_partial, b);
  if (key0 >= key1) return;  // no keys in this chunk: it contributes nothing to dq
  tiles.load_key_chunk(pb.k_rows(pb.k, b).select(1, kvh).narrow(0, key0, key1 - key0),
                       pb.k_rows(pb.v, b).select(1, kvh).narrow(0, key0, key1 - key0));
  const acc_t scale = static_cast<acc_t>(pb.scale), cap = static_cast<acc_t>(pb.softcap);

  const at::Tensor q_seq = pb.q_rows(pb.q, b), out_seq = pb.q_rows(pb.out, b);
  const at::Tensor dout_seq = pb.q_rows(dout, b);
  std::vector<acc_t> delta(G * block_q);
  const at::Tensor lse_seq = pb.lse_rows(pb.lse, b);
  // Query blocks that see no key of this chunk get nothing from it: they are skipped.
  for (int64_t q0 = reached.first; q0 < reached.end; q0 += block_q) {
    const int64_t rows = std::min(block_q, lq - q0);
    const int64_t M = G * rows;
    tiles.load_query_grads(q_seq, dout_seq, kvh, G, q0, rows);
    group_row_dots<T>(dout_seq, out_seq, kvh, G, q0, rows, delta.data());
    const at::Tensor lse = lse_seq.narrow(0, kvh * G, G).narrow(1, q0, rows).contiguous();
    const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
    at::Tensor dq_acc = tiles.dq.narrow(0, 0, M);
    dq_acc.zero_();

    // The block's keys within the chunk, from the key block holding its first row's first
    // key (tiles address the chunk by whole key blocks).
    const auto [k_begin, k_end] = pb.keys_seen(b, q0, rows, key0, key1);
    for (int64_t k0 = key0 + (k_begin - key0) / kBlockK * kBlockK; k0 < k_end; k0 += kBlockK) {
      const int64_t n = std::min(kBlockK, k_end - k0);
      tiles.backward_scores(k0 - key0, n);
      const int64_t stride = tiles.score_stride(n);
      acc_t* p_ptr = tiles.scores();
      acc_t* dp_ptr = tiles.grad_scores();
      for (int64_t r = 0; r < M; ++r) {
        const auto [lo, hi] = pb.visible_columns(q0 + r % rows, lq, lk, k0, n);
        using prob_t = typename Tiles::prob_t;
        if (cap > 0) {
          probs_and_grad_row<true, prob_t>(p_ptr + r * stride, dp_ptr + r * stride, stride, lo, hi, scale, cap,
                                           lse_ptr[r], delta[r]);
        } else {
          probs_and_grad_row<false, prob_t>(p_ptr + r * stride, dp_ptr + r * stride, stride, lo, hi, scale, cap,
                                            lse_ptr[r], delta[r]);
        }
      }
      tiles.accumulate_grads(k0 - key0, n);
    }
    dq_acc.mul_(scale);
    unpack_group_rows<acc_t>(dq_acc.const_data_ptr<acc_t>(), tiles.acc_stride(), dq_seq, kvh, G, q0, rows);
  }
  pb.k_rows(dk, b).select(1, kvh).narrow(0, key0, key1 - key0).copy_(tiles.key_grad(tiles.dk).mul_(scale));
  pb.k_rows(dv, b).select(1, kvh).narrow(0, key0, key1 - key0).copy_(tiles.key_grad(tiles.dv));
}

// out = the sum over key chunks c of partials[c] (contiguous [chunks, ...out's shape], acc_t) on
// the rows each chunk reached (reached[sequence * chunks + c]), added in chunk order and rounded
// once to T: the fixed order keeps dq bit-identical for any thread count. A row that no chunk
// reached (it sees no key) is 0.
template <typename T>
void sum_partials(const AttentionParams& pb, const at::Tensor& partials, const std::vector<RowsReached>& reached,
                  const at::Tensor& out) {
  using acc_t = at::opmath_type<T>;
  using IO = cpu::VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  const int64_t chunks = partials.size(0), numel = out.numel();
  const int64_t token_elems = pb.shape.n_q_heads * pb.shape.head_dim, tokens = numel / token_elems;
  const acc_t* in = partials.const_data_ptr<acc_t>();
  T* dst = out.mutable_data_ptr<T>();
  at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / token_elems), [&](int64_t begin, int64_t end) {
    std::vector<const acc_t*> src(chunks);
    for (int64_t t = begin; t < end; ++t) {
      const auto [b, row] = pb.token_row(t);
      const int64_t offset = t * token_elems;
      int64_t n_src = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        if (reached[b * chunks + c].has(row)) src[n_src++] = in + c * numel + offset;
      }
      const auto sum_at = [&](int64_t e, int64_t n) {
        const auto load = [&](const acc_t* p) { return n == W ? Vec::loadu(p + e) : Vec::loadu(p + e, n); };
        Vec sum = n_src > 0 ? load(src[0]) : Vec(acc_t(0));
        for (int64_t i = 1; i < n_src; ++i) sum = sum + load(src[i]);
        IO::store(dst + offset + e, sum, n);
      };
      int64_t e = 0;
      for (; e + W <= token_elems; e += W) sum_at(e, W);
      if (e < token_elems) sum_at(e, token_elems - e);
    }
  });
}

void attention_backward_cpu(const AttentionCall& call) {
  // The tile products below are ATen ops on views of the inputs: keep autograd out of them.
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  const AttentionParams pb(call);
  const AttentionShape& shape = pb.shape;
  const int64_t G = shape.group(), d = shape.head_dim;
  const int64_t block_q = cpu::block_q_for(G);
  const int64_t key_blocks = ceil_div(shape.seq_k, kBlockK);
  const int64_t seq_heads = shape.batch * shape.n_kv_heads;
  // Depends on the shapes only (never on the thread count): the dq sum order is fixed. More
  // chunks where varlen packs a long sequence with short ones (enough that each of its tasks
  // holds 1/32 of all keys) were 0.91x on 2 threads (2048 + 15 x 128 tokens, bf16): the extra
  // dq partials and per-chunk query passes cost more than the finer tasks gain there.
  const int64_t chunks = std::clamp<int64_t>(ceil_div(kTargetBackwardTasks, std::max<int64_t>(seq_heads, 1)), 1,
                                             std::min(kMaxKeyChunks, std::max<int64_t>(key_blocks, 1)));
  const int64_t chunk_keys = ceil_div(std::max<int64_t>(key_blocks, 1), chunks) * kBlockK;
  const int64_t tasks = seq_heads * chunks;
  const auto chunk_keys_of = [&](int64_t b, int64_t c) {
    return std::pair<int64_t, int64_t>{c * chunk_keys, std::min((c + 1) * chunk_keys, pb.len_k(b))};
  };
  std::vector<RowsReached> reached(shape.batch * chunks);  // [sequence * chunks + chunk]
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t c = 0; c < chunks; ++c) {
      const auto [key0, key1] = chunk_keys_of(b, c);
      if (key0 >= key1) continue;
      const auto [first, end] = pb.query_blocks_seeing(b, key0, key1, block_q);
      reached[b * chunks + c] = {first, end};
    }
  }
  // Task t: (sequence, kv head, key chunk), the chunks of one kv head in zigzag order.
  const auto backward_task = [&](int64_t t) {
    const int64_t sh = t / chunks;
    return std::array<int64_t, 3>{sh / shape.n_kv_heads, sh % shape.n_kv_heads, zigzag(t % chunks, chunks)};
  };
  // Its cost: the rows of each query block it visits times the chunk's keys they see, plus a
  // key block's worth per block for the packing and dq, and one for the chunk's dk and dv.
  const auto backward_cost = [&](int64_t t) -> int64_t {
    const auto [b, kvh, c] = backward_task(t);
    const auto [key0, key1] = chunk_keys_of(b, c);
    if (key0 >= key1) return 0;
    int64_t cost = (key1 - key0) * kBlockK;
    const RowsReached& rows_reached = reached[b * chunks + c];
    for (int64_t q0 = rows_reached.first; q0 < rows_reached.end; q0 += block_q) {
      const int64_t rows = std::min(block_q, pb.len_q(b) - q0);
      const auto [k_begin, k_end] = pb.keys_seen(b, q0, rows, key0, key1);
      cost += rows * (std::max<int64_t>(k_end - k_begin, 0) + kBlockK);
    }
    return cost;
  };

  LLAMA_EXT_DISPATCH_FLOATING(pb.q.scalar_type(), "gqa_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = pb.q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    std::vector<int64_t> partial_shape{chunks};
    partial_shape.insert(partial_shape.end(), pb.q.sizes().begin(), pb.q.sizes().end());
    const at::Tensor dq_partial = cpu::scratch(partial_shape, acc_opts);  // written on the rows reached
    cpu::parallel_for_by_cost(tasks, backward_cost, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView no_autograd;  // per worker thread
      with_tiles<Pass::kBackward, scalar_t>(G * block_q, d, acc_opts, KeptKeys{}, [&](auto& tiles) {
        for (int64_t t = begin; t < end; ++t) {
          const auto [b, kvh, c] = backward_task(t);
          const auto [key0, key1] = chunk_keys_of(b, c);
          backward_chunk<scalar_t>(pb, call.grad_out, dq_partial.select(0, c), call.dk, call.dv, b, kvh, key0, key1,
                                   reached[b * chunks + c], block_q, tiles);
        }
      });
    });
    sum_partials<scalar_t>(pb, dq_partial, reached, call.dq);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CPU, m) {
  m.impl("gqa_attention_forward", &gqa_attention_forward<no_backend_limits, attention_forward_cpu>);
  m.impl("gqa_attention_backward", &gqa_attention_backward<no_backend_limits, attention_backward_cpu>);
}

}  // namespace llama_ext
