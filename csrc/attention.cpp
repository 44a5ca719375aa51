// Grouped-query attention on the CPU: a FlashAttention-2 style blocked kernel, forward and
// backward, batched and varlen through one code path.
//
// Layout. q [.., seq_q, n_q_heads, d], k/v [.., seq_k, n_kv_heads, d]; query head h reads kv
// head h / G (G = n_q_heads / n_kv_heads). A sequence is a strided view of the inputs (one
// batch row, or one cu_seqlens slice), so batched and varlen differ only in how that view is
// cut. K and V are never repeated or copied as a whole; one block at a time is read.
//
// Forward, one task per (sequence, kv head, query block), spread with at::parallel_for. A task
// packs the block's rows of all G query heads of the group into one [G * rows, d] matrix, so
// every K/V block it reads serves the whole group with one product each:
//   S = Q K_blk^T                                 [G*rows, block_k]  (BLAS)
//   online softmax per row: m' = max(m, max S), p = exp(scale (S - m')),
//   l' = l exp(scale (m - m')) + sum p,  O <- O exp(scale (m - m')) + P V_blk  (BLAS)
// and at the end out = O / l, lse = scale m + log l. Only the block's [G*rows, block_k] score
// tile exists, never [seq_q, seq_k]: memory is O(sequence). Causal masking is bottom-right
// (query i sees keys j <= i + seq_k - seq_q); key blocks entirely above the diagonal of the
// query block are never visited, partial ones mask per row by limiting the valid columns.
// A row that sees no key (seq_q > seq_k under causal, or a sequence with 0 keys) gives zeros
// and lse = 0.
//
// Backward (FlashAttention-2): one task per (sequence, kv head, chunk of key blocks). For each
// query block it recomputes S from q, k and the saved lse (P = exp(scale S - lse)), with
// D = rowsum(dO * O):
//   dV_blk += P^T dO,  dP = dO V_blk^T,  dS = P (dP - D),
//   dK_blk += scale dS^T Q,  dQ += scale dS K_blk
// dK and dV of a key block are owned by one task and summed over the group's query heads and
// all query blocks in a fixed order. dQ gets one fp32 partial per key chunk, reduced in chunk
// order afterwards. The number of chunks depends only on the shapes, so results are
// bit-identical for any thread count (deterministic).
//
// Precision: products and softmax run in fp32 (fp64 for fp64 input). bf16/fp16 blocks are
// widened to fp32 once per block (a block of K/V is reused by G*rows query rows) and the
// products go through ATen's fp32 BLAS (MKL/oneDNN): reduced-precision inputs are exact in
// fp32, so the products are exactly the fp32-accumulated ones. out and the gradients are
// rounded once to the input dtype.
//
// FLOPs: forward 4 b seq_q seq_k n_q_heads d (half of it under causal); backward 2.5x that
// (5 products instead of 2). Bytes: q, out read/written once; each K/V block is read once per
// query block of each group (G times fewer than with repeated K/V) and stays in L2 while the
// group's rows use it; the score tile ([256, 128] fp32 = 128 KB) stays in L2. The BLAS products
// run at the machine's fp32 matmul rate, and the elementwise softmax (exp per score) is
// vectorized with at::vec; that is what makes this faster than an unfused composite that
// writes and reads [seq_q, seq_k] scores several times.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "cpu_vec.h"

namespace llama_ext {
namespace {

// Rows of all G heads of a query block together: G * block_q ~ kTargetRows keeps the score
// tile in L2 and the products large enough for BLAS to run at full rate.
constexpr int64_t kTargetRows = 256;
constexpr int64_t kBlockK = 128;
// Backward: aim for this many tasks (sequences * kv heads * key chunks) so that every thread
// has work even with batch 1 and few kv heads; at most kMaxKeyChunks dQ partials.
constexpr int64_t kTargetBackwardTasks = 32;
constexpr int64_t kMaxKeyChunks = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t block_q_for(int64_t group) { return std::clamp<int64_t>(kTargetRows / group, 16, 128); }

// Visits task indices so that contiguous ranges (what at::parallel_for hands each thread) mix
// cheap and expensive causal blocks: 0, n-1, 1, n-2, ...
int64_t zigzag(int64_t p, int64_t n) { return p % 2 == 0 ? p / 2 : n - 1 - p / 2; }

// The inputs cut into per-sequence views: q/out/grads [len_q, heads, d], lse [heads, len_q].
struct Problem {
  at::Tensor q, k, v, out, lse;
  std::vector<int64_t> q_begin, k_begin;  // varlen: cu_seqlens; empty when batched
  AttentionShape shape;
  bool causal;
  double scale;

  int64_t len_q(int64_t b) const { return shape.varlen ? q_begin[b + 1] - q_begin[b] : shape.seq_q; }
  int64_t len_k(int64_t b) const { return shape.varlen ? k_begin[b + 1] - k_begin[b] : shape.seq_k; }
  // Token-major tensors [batch, seq, ...] or [total, ...]: the sequence's [len, ...] view.
  at::Tensor q_rows(const at::Tensor& t, int64_t b) const {
    return shape.varlen ? t.narrow(0, q_begin[b], len_q(b)) : t.select(0, b);
  }
  at::Tensor k_rows(const at::Tensor& t, int64_t b) const {
    return shape.varlen ? t.narrow(0, k_begin[b], len_k(b)) : t.select(0, b);
  }
  // lse [batch, heads, seq_q] or [heads, total_q]: the sequence's [heads, len_q] view.
  at::Tensor lse_rows(const at::Tensor& t, int64_t b) const {
    return shape.varlen ? t.narrow(1, q_begin[b], len_q(b)) : t.select(0, b);
  }
  // Key positions a query row may see: [0, keys_visible(i)).
  int64_t keys_visible(int64_t i, int64_t lq, int64_t lk) const {
    return causal ? std::clamp<int64_t>(i + lk - lq + 1, 0, lk) : lk;
  }
};

std::vector<int64_t> host_offsets(const std::optional<at::Tensor>& cu_seqlens) {
  if (!cu_seqlens.has_value()) return {};
  const at::Tensor host = cu_seqlens->to(at::kCPU).to(at::kLong).contiguous();
  const int64_t* p = host.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + host.numel());
}

// Rows [row0, row0 + rows) of the G heads of kv head kvh in a [len, heads, d] view, as
// [G, rows, d].
at::Tensor group_rows(const at::Tensor& seq, int64_t kvh, int64_t group, int64_t row0, int64_t rows) {
  return seq.narrow(0, row0, rows).narrow(1, kvh * group, group).transpose(0, 1);
}

// Row copies between strided T rows and packed acc_t rows, converting with at::vec (cheaper
// than a TensorIterator copy_ for the small blocks here, which run once per tile).
template <typename T>
void load_rows(const T* src, int64_t src_stride, at::opmath_type<T>* dst, int64_t rows, int64_t d) {
  using IO = cpu::VecIO<T>;
  constexpr int64_t W = IO::kWidth;
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * src_stride;
    at::opmath_type<T>* out = dst + r * d;
    int64_t c = 0;
    for (; c + W <= d; c += W) IO::load(in + c).store(out + c);
    if (c < d) IO::load_partial(in + c, d - c).store(out + c, d - c);
  }
}

template <typename T>
void store_rows(const at::opmath_type<T>* src, T* dst, int64_t dst_stride, int64_t rows, int64_t d) {
  using IO = cpu::VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  for (int64_t r = 0; r < rows; ++r) {
    const at::opmath_type<T>* in = src + r * d;
    T* out = dst + r * dst_stride;
    int64_t c = 0;
    for (; c + W <= d; c += W) IO::store(out + c, Vec::loadu(in + c));
    if (c < d) IO::store(out + c, Vec::loadu(in + c, d - c), d - c);
  }
}

// Packs group_rows(seq, ...) into a contiguous [G * rows, d] acc_t matrix (head-major).
template <typename T>
void pack_group_rows(const at::Tensor& seq, int64_t kvh, int64_t group, int64_t row0, int64_t rows,
                     at::opmath_type<T>* dst) {
  const int64_t d = seq.size(2);
  const T* base = seq.const_data_ptr<T>() + row0 * seq.stride(0);
  for (int64_t g = 0; g < group; ++g) {
    load_rows<T>(base + (kvh * group + g) * seq.stride(1), seq.stride(0), dst + g * rows * d, rows, d);
  }
}

// The inverse of pack_group_rows: writes [G * rows, d] acc_t rows into seq, rounding to T.
template <typename T>
void unpack_group_rows(const at::opmath_type<T>* src, const at::Tensor& seq, int64_t kvh, int64_t group, int64_t row0,
                       int64_t rows) {
  const int64_t d = seq.size(2);
  T* base = seq.mutable_data_ptr<T>() + row0 * seq.stride(0);
  for (int64_t g = 0; g < group; ++g) {
    store_rows<T>(src + g * rows * d, base + (kvh * group + g) * seq.stride(1), seq.stride(0), rows, d);
  }
}

// exp with ~1 ulp error in fp32 (Sleef u20 variant: faster than the u10 one); plain exp in fp64.
inline at::vec::Vectorized<float> exp_fast(const at::vec::Vectorized<float>& x) { return x.exp_u20(); }
inline at::vec::Vectorized<double> exp_fast(const at::vec::Vectorized<double>& x) { return x.exp(); }

// Backward of one row of a tile: p[0, n) <- P = exp(scale s - lse) on the first `valid`
// columns (0 after), dp[0, n) <- dS = P (dP - D).
template <typename acc_t>
void probs_and_grad_row(acc_t* p, acc_t* dp, int64_t n, int64_t valid, acc_t scale, acc_t lse, acc_t delta) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec scale_v(scale), neg_lse_v(-lse), delta_v(delta);
  int64_t j = 0;
  for (; j + W <= valid; j += W) {
    const Vec pv = exp_fast(at::vec::fmadd(Vec::loadu(p + j), scale_v, neg_lse_v));
    pv.store(p + j);
    (pv * (Vec::loadu(dp + j) - delta_v)).store(dp + j);
  }
  if (j < valid) {
    const int64_t count = valid - j;
    const Vec pv = exp_fast(at::vec::fmadd(Vec::loadu(p + j, count), scale_v, neg_lse_v));
    pv.store(p + j, count);
    (pv * (Vec::loadu(dp + j, count) - delta_v)).store(dp + j, count);
  }
  std::fill(p + valid, p + n, acc_t(0));
  std::fill(dp + valid, dp + n, acc_t(0));
}

// ---- forward --------------------------------------------------------------------------------

// Online-softmax update of one score row: turns s[0, n) into probabilities exp(scale (s - m'))
// for the first `valid` columns and 0 after, updates the running max m and sum l, and returns
// the factor by which the row's output accumulator must be rescaled.
template <typename acc_t>
acc_t online_softmax_row(acc_t* s, int64_t n, int64_t valid, acc_t scale, acc_t& m, acc_t& l) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  if (valid == 0) {
    std::fill(s, s + n, acc_t(0));
    return acc_t(1);
  }
  const int64_t valid_vec = valid - valid % W;
  Vec max_v(-std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < valid_vec; j += W) max_v = at::vec::maximum(max_v, Vec::loadu(s + j));
  acc_t tile_max = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, max_v);
  for (int64_t j = valid_vec; j < valid; ++j) tile_max = std::max(tile_max, s[j]);
  const acc_t m_new = std::max(m, tile_max);
  const acc_t alpha = std::exp((m - m_new) * scale);  // 0 on the first visited block (m = -inf)
  const Vec scale_v(scale), shift_v(-m_new * scale);
  Vec sum_v(acc_t(0));
  int64_t j = 0;
  for (; j + W <= valid; j += W) {
    const Vec p = exp_fast(at::vec::fmadd(Vec::loadu(s + j), scale_v, shift_v));
    p.store(s + j);
    sum_v = sum_v + p;
  }
  if (j < valid) {
    const Vec p = exp_fast(at::vec::fmadd(Vec::loadu(s + j, valid - j), scale_v, shift_v));
    p.store(s + j, valid - j);
    sum_v = sum_v + Vec::set(Vec(acc_t(0)), p, valid - j);
  }
  std::fill(s + valid, s + n, acc_t(0));
  l = l * alpha + at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum_v);
  m = m_new;
  return alpha;
}


// Per-thread scratch, allocated once per at::parallel_for range.
struct ForwardScratch {
  at::Tensor q;       // [G * block_q, d] packed query rows
  at::Tensor acc;     // [G * block_q, d] output accumulator
  at::Tensor scores;  // [G * block_q * kBlockK] score / probability tile
  at::Tensor k, v;    // [kBlockK, d] widened K/V block (reduced dtypes only)
};

template <typename T>
void forward_block(const Problem& pb, int64_t b, int64_t kvh, int64_t qb, int64_t block_q, ForwardScratch& ws) {
  using acc_t = at::opmath_type<T>;
  constexpr bool kWiden = !std::is_same_v<T, acc_t>;
  const int64_t G = pb.shape.group(), d = pb.shape.head_dim;
  const int64_t lq = pb.len_q(b), lk = pb.len_k(b);
  const int64_t q0 = qb * block_q;
  if (q0 >= lq) return;
  const int64_t rows = std::min(block_q, lq - q0);
  const int64_t M = G * rows;
  const at::Tensor q_seq = pb.q_rows(pb.q, b);
  const at::Tensor k_seq = pb.k_rows(pb.k, b).select(1, kvh);  // [lk, d]
  const at::Tensor v_seq = pb.k_rows(pb.v, b).select(1, kvh);

  at::Tensor q_pack = ws.q.narrow(0, 0, M);
  pack_group_rows<T>(q_seq, kvh, G, q0, rows, q_pack.mutable_data_ptr<acc_t>());
  at::Tensor acc = ws.acc.narrow(0, 0, M);
  acc.zero_();
  std::vector<acc_t> m(M, -std::numeric_limits<acc_t>::infinity()), l(M, acc_t(0));
  acc_t* acc_ptr = acc.mutable_data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(pb.scale);

  // Keys beyond the last row's diagonal are masked for the whole block: never visited.
  const int64_t k_end = pb.keys_visible(q0 + rows - 1, lq, lk);
  for (int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
    const int64_t n = std::min(kBlockK, k_end - k0);
    at::Tensor k_blk = k_seq.narrow(0, k0, n), v_blk = v_seq.narrow(0, k0, n);
    if constexpr (kWiden) {
      load_rows<T>(k_blk.const_data_ptr<T>(), k_blk.stride(0), ws.k.mutable_data_ptr<acc_t>(), n, d);
      load_rows<T>(v_blk.const_data_ptr<T>(), v_blk.stride(0), ws.v.mutable_data_ptr<acc_t>(), n, d);
      k_blk = ws.k.narrow(0, 0, n);
      v_blk = ws.v.narrow(0, 0, n);
    }
    at::Tensor scores = ws.scores.narrow(0, 0, M * n).view({M, n});
    at::mm_out(scores, q_pack, k_blk.t());
    acc_t* s = scores.mutable_data_ptr<acc_t>();
    for (int64_t r = 0; r < M; ++r) {
      const int64_t i = q0 + r % rows;
      const int64_t valid = std::clamp<int64_t>(pb.keys_visible(i, lq, lk) - k0, 0, n);
      const acc_t alpha = online_softmax_row<acc_t>(s + r * n, n, valid, scale, m[r], l[r]);
      if (alpha != acc_t(1)) {
        acc_t* o = acc_ptr + r * d;
        for (int64_t c = 0; c < d; ++c) o[c] *= alpha;
      }
    }
    acc.addmm_(scores, v_blk);
  }

  at::Tensor lse_block = at::empty({M}, acc.options().dtype(stats_dtype(pb.q.scalar_type())));
  auto* lse_ptr = lse_block.mutable_data_ptr<acc_t>();
  for (int64_t r = 0; r < M; ++r) {
    // l == 0 only when the row saw no key: output zeros and lse = 0 (finite) by convention.
    const acc_t inv = l[r] > 0 ? acc_t(1) / l[r] : acc_t(0);
    acc_t* o = acc_ptr + r * d;
    for (int64_t c = 0; c < d; ++c) o[c] *= inv;
    lse_ptr[r] = l[r] > 0 ? m[r] * scale + std::log(l[r]) : acc_t(0);
  }
  unpack_group_rows<T>(acc_ptr, pb.q_rows(pb.out, b), kvh, G, q0, rows);
  pb.lse_rows(pb.lse, b).narrow(0, kvh * G, G).narrow(1, q0, rows).copy_(lse_block.view({G, rows}));
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                     const AttentionShape& shape, bool causal, double scale) {
  Problem pb;
  pb.q = q;
  pb.k = k;
  pb.v = v;
  pb.shape = shape;
  pb.causal = causal;
  pb.scale = scale;
  pb.q_begin = host_offsets(cu_seqlens_q);
  pb.k_begin = host_offsets(cu_seqlens_k);
  return pb;
}

std::tuple<at::Tensor, at::Tensor> gqa_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const std::optional<at::Tensor>& cu_seqlens_q,
                                                             const std::optional<at::Tensor>& cu_seqlens_k,
                                                             int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                             double scale) {
  const AttentionShape shape =
      check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  // The tile products below are ATen ops on views of the inputs: keep autograd out of them.
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  Problem pb = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, shape, causal, scale);
  const auto lse_opts = q.options().dtype(stats_dtype(q.scalar_type()));
  pb.out = new_output(at::empty(q.sizes(), q.options()));
  pb.lse = new_output(at::empty(lse_shape(q, shape), lse_opts));
  const int64_t G = shape.group(), d = shape.head_dim;
  const int64_t block_q = block_q_for(G);
  const int64_t q_blocks = ceil_div(shape.seq_q, block_q);
  const int64_t tasks_per_seq = shape.n_kv_heads * q_blocks;
  const int64_t tasks = shape.batch * tasks_per_seq;
  if (tasks == 0) return {pb.out, pb.lse};

  LLAMA_EXT_DISPATCH_FLOATING(q.scalar_type(), "gqa_attention_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView no_autograd;  // per worker thread
      ForwardScratch ws;
      ws.q = at::empty({G * block_q, d}, acc_opts);
      ws.acc = at::empty({G * block_q, d}, acc_opts);
      ws.scores = at::empty({G * block_q * kBlockK}, acc_opts);
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        ws.k = at::empty({kBlockK, d}, acc_opts);
        ws.v = at::empty({kBlockK, d}, acc_opts);
      }
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / tasks_per_seq, rest = t % tasks_per_seq;
        const int64_t kvh = rest / q_blocks, qb = zigzag(rest % q_blocks, q_blocks);
        forward_block<scalar_t>(pb, b, kvh, qb, block_q, ws);
      }
    });
  });
  return {pb.out, pb.lse};
}

// ---- backward -------------------------------------------------------------------------------

struct BackwardScratch {
  at::Tensor q, dout, dq;  // [G * block_q, d] packed query-side rows (acc dtype)
  at::Tensor p, dp;        // [G * block_q * kBlockK] probability and dP / dS tiles
};

// One task: keys [key0, key1) of kv head kvh in sequence b. dk/dv of these keys are written
// here; the task's share of dq goes to dq_partial (its own chunk slice; rows it does not reach
// are zeroed).
// delta is D = rowsum(dO * O) laid out like q without its last dim.
template <typename T>
void backward_chunk(const Problem& pb, const at::Tensor& dout, const at::Tensor& delta, const at::Tensor& dq_partial,
                    const at::Tensor& dk, const at::Tensor& dv, int64_t b, int64_t kvh, int64_t key0, int64_t key1,
                    int64_t block_q, BackwardScratch& ws) {
  using acc_t = at::opmath_type<T>;
  const int64_t G = pb.shape.group(), d = pb.shape.head_dim;
  const int64_t lq = pb.len_q(b), lk = pb.len_k(b);
  key1 = std::min(key1, lk);
  const at::Tensor dq_seq = pb.q_rows(dq_partial, b);
  if (key0 >= key1) {  // no keys in this chunk: it contributes nothing to dq
    group_rows(dq_seq, kvh, G, 0, lq).zero_();
    return;
  }
  const auto acc_opts = ws.q.options();
  // Widened K/V of the chunk, read once; dK/dV accumulators of the chunk.
  const at::Tensor k_chunk = pb.k_rows(pb.k, b).select(1, kvh).narrow(0, key0, key1 - key0).to(acc_opts.dtype());
  const at::Tensor v_chunk = pb.k_rows(pb.v, b).select(1, kvh).narrow(0, key0, key1 - key0).to(acc_opts.dtype());
  at::Tensor dk_acc = at::zeros({key1 - key0, d}, acc_opts);
  at::Tensor dv_acc = at::zeros({key1 - key0, d}, acc_opts);
  const acc_t scale = static_cast<acc_t>(pb.scale);

  const at::Tensor q_seq = pb.q_rows(pb.q, b), delta_seq = pb.q_rows(delta, b);
  const at::Tensor dout_seq = pb.q_rows(dout, b);
  const at::Tensor lse_seq = pb.lse_rows(pb.lse, b);
  // Under causal, query rows before the first one that sees key0 get nothing from this chunk.
  const int64_t first_row = pb.causal ? std::clamp<int64_t>(key0 - (lk - lq), 0, lq) : 0;
  const int64_t first_block_row = first_row - first_row % block_q;
  group_rows(dq_seq, kvh, G, 0, first_block_row).zero_();  // rows this chunk never reaches
  for (int64_t q0 = first_block_row; q0 < lq; q0 += block_q) {
    const int64_t rows = std::min(block_q, lq - q0);
    const int64_t M = G * rows;
    at::Tensor q_pack = ws.q.narrow(0, 0, M), do_pack = ws.dout.narrow(0, 0, M);
    pack_group_rows<T>(q_seq, kvh, G, q0, rows, q_pack.mutable_data_ptr<acc_t>());
    pack_group_rows<T>(dout_seq, kvh, G, q0, rows, do_pack.mutable_data_ptr<acc_t>());
    const at::Tensor delta_blk = delta_seq.narrow(0, q0, rows).narrow(1, kvh * G, G).t().contiguous();  // [G, rows]
    const at::Tensor lse = lse_seq.narrow(0, kvh * G, G).narrow(1, q0, rows).contiguous();
    const acc_t* delta_ptr = delta_blk.const_data_ptr<acc_t>();
    const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
    at::Tensor dq_acc = ws.dq.narrow(0, 0, M);
    dq_acc.zero_();

    const int64_t k_end = std::min(key1, pb.keys_visible(q0 + rows - 1, lq, lk));
    for (int64_t k0 = key0; k0 < k_end; k0 += kBlockK) {
      const int64_t n = std::min(kBlockK, k_end - k0);
      const at::Tensor k_blk = k_chunk.narrow(0, k0 - key0, n), v_blk = v_chunk.narrow(0, k0 - key0, n);
      at::Tensor p = ws.p.narrow(0, 0, M * n).view({M, n});
      at::Tensor dp = ws.dp.narrow(0, 0, M * n).view({M, n});
      at::mm_out(p, q_pack, k_blk.t());
      at::mm_out(dp, do_pack, v_blk.t());
      acc_t* p_ptr = p.mutable_data_ptr<acc_t>();
      acc_t* dp_ptr = dp.mutable_data_ptr<acc_t>();
      for (int64_t r = 0; r < M; ++r) {
        const int64_t i = q0 + r % rows;
        const int64_t valid = std::clamp<int64_t>(pb.keys_visible(i, lq, lk) - k0, 0, n);
        probs_and_grad_row<acc_t>(p_ptr + r * n, dp_ptr + r * n, n, valid, scale, lse_ptr[r], delta_ptr[r]);
      }
      dv_acc.narrow(0, k0 - key0, n).addmm_(p.t(), do_pack);
      dk_acc.narrow(0, k0 - key0, n).addmm_(dp.t(), q_pack, /*beta=*/1, /*alpha=*/scale);
      dq_acc.addmm_(dp, k_blk, /*beta=*/1, /*alpha=*/scale);
    }
    unpack_group_rows<acc_t>(dq_acc.const_data_ptr<acc_t>(), dq_seq, kvh, G, q0, rows);
  }
  pb.k_rows(dk, b).select(1, kvh).narrow(0, key0, key1 - key0).copy_(dk_acc);
  pb.k_rows(dv, b).select(1, kvh).narrow(0, key0, key1 - key0).copy_(dv_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gqa_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale) {
  const AttentionShape shape =
      check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  // The tile products below are ATen ops on views of the inputs: keep autograd out of them.
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  check_attention_backward_args(grad_out, out, lse, q, shape);
  Problem pb = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, shape, causal, scale);
  pb.out = out;
  pb.lse = lse;
  at::Tensor dk = new_output(at::empty(k.sizes(), k.options()));
  at::Tensor dv = new_output(at::empty(v.sizes(), v.options()));
  const int64_t G = shape.group(), d = shape.head_dim;
  const int64_t block_q = block_q_for(G);
  const int64_t key_blocks = ceil_div(shape.seq_k, kBlockK);
  const int64_t seq_heads = shape.batch * shape.n_kv_heads;
  // Depends on the shapes only (never on the thread count): the dq sum order is fixed.
  const int64_t chunks = std::clamp<int64_t>(ceil_div(kTargetBackwardTasks, std::max<int64_t>(seq_heads, 1)), 1,
                                             std::min(kMaxKeyChunks, std::max<int64_t>(key_blocks, 1)));
  const int64_t chunk_keys = ceil_div(std::max<int64_t>(key_blocks, 1), chunks) * kBlockK;
  const int64_t tasks = seq_heads * chunks;

  at::Tensor dq;
  LLAMA_EXT_DISPATCH_FLOATING(q.scalar_type(), "gqa_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    std::vector<int64_t> partial_shape{chunks};
    partial_shape.insert(partial_shape.end(), q.sizes().begin(), q.sizes().end());
    const at::Tensor dq_partial = new_output(at::empty(partial_shape, acc_opts));  // every row written by its task
    // D = rowsum(dO * O) in the accumulation dtype, once for all chunks: [.., seq, n_q_heads].
    const at::Tensor delta = grad_out.to(acc_opts.dtype()).mul(out.to(acc_opts.dtype())).sum(-1);
    if (tasks > 0) {
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        const at::AutoDispatchBelowADInplaceOrView no_autograd;  // per worker thread
        BackwardScratch ws;
        ws.q = at::empty({G * block_q, d}, acc_opts);
        ws.dout = at::empty({G * block_q, d}, acc_opts);
        ws.dq = at::empty({G * block_q, d}, acc_opts);
        ws.p = at::empty({G * block_q * kBlockK}, acc_opts);
        ws.dp = at::empty({G * block_q * kBlockK}, acc_opts);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t sh = t / chunks, c = zigzag(t % chunks, chunks);
          const int64_t b = sh / shape.n_kv_heads, kvh = sh % shape.n_kv_heads;
          backward_chunk<scalar_t>(pb, grad_out, delta, dq_partial.select(0, c), dk, dv, b, kvh, c * chunk_keys,
                                   (c + 1) * chunk_keys, block_q, ws);
        }
      });
    }
    // Sum the chunk partials in chunk order.
    at::Tensor dq_sum = dq_partial.select(0, 0).clone();
    for (int64_t c = 1; c < chunks; ++c) dq_sum.add_(dq_partial.select(0, c));
    dq = dq_sum.to(q.scalar_type());
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CPU, m) {
  m.impl("gqa_attention_forward", &gqa_attention_forward_cpu);
  m.impl("gqa_attention_backward", &gqa_attention_backward_cpu);
}

}  // namespace llama_ext
