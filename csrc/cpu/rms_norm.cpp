// RMSNorm and fused residual-add + RMSNorm on the CPU.
//
// Forward, per row of n elements: (optionally s = round(x + residual), written out) then
// one pass for sum(s^2), rstd = 1/sqrt(sum/n + eps), and one pass writing
// y = round(w' * round(s * rstd)) (cast_before_weight) or round(w' * s * rstd), w' = offset + w.
// The row is read from memory once: the second pass hits L1/L2 (a 4096-wide bf16 row is 8 KB).
// Bytes: read n*(1 [+1 residual]) + n weight (cached), write n (+n residual_out). FLOPs are
// negligible; the kernel is memory-bound. Element j of a row always lands in the same lane and
// accumulator, whatever the row's address or stride, so results do not depend on the layout.
//
// Backward, per row: dot = sum(g * w' * x), dx = rstd * g * w' - x * rstd^3 * dot / n
// (+ grad_residual_out), and dweight partial sums g * xhat (xhat = x * rstd, rounded to the
// input dtype when cast_before_weight) accumulated in the op-math type (fp32; double for double)
// per fixed chunk of rows, then reduced over chunks in order: deterministic for any thread
// count. Rows are spread over threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "cpu_vec.h"
#include "../rms_norm.h"

namespace llama_ext {
namespace {

using cpu::VecIO;

// Rows per parallel task: enough elements to amortize the task, at least one row.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

template <typename T>
const T* row_of(const void* base, int64_t stride, int64_t r) { return static_cast<const T*>(base) + r * stride; }
template <typename T>
T* row_of(void* base, int64_t stride, int64_t r) { return static_cast<T*>(base) + r * stride; }

// bf16 rows stream through Bf16Pairs (cpu_vec.h) where they round faster there: the body of
// each row in accesses of 2 x kWidth elements without shuffles, the rest (n mod 2 kWidth) in
// element order. Both round each element to nearest even alike; the pairs only put the squares
// (the backward's products g w' x, and its dweight partial sums) in other, still fixed, lanes.
// In the backward (bf16 input, weight and gradient) the pairs ran 1.2-1.4x as fast at avx2,
// 1.1-1.3x at avx512 and 1.3-1.8x at the portable level (Zen 4, 2026-12-05, 256 and 2048 rows
// of 4096, alternating in one process).
template <typename... Ts>
constexpr bool kPairs = cpu::kBf16PairsRound && (std::is_same_v<Ts, at::BFloat16> && ...);
using cpu::Bf16Pairs;

// The weight a row is multiplied by: offset + weight[j], or offset + 1 without a weight.
template <typename W>
struct AppliedWeight {
  using Vec = typename VecIO<W>::Vec;
  using acc_t = typename VecIO<W>::acc_t;
  const W* weight;  // null: ones
  bool has_offset;  // offset 0 is not added, so a -0 weight keeps its sign as in HF's product
  Vec offset;
  Vec scale;  // offset + 1, used without a weight
  AppliedWeight(const void* w, double off)
      : weight(static_cast<const W*>(w)), has_offset(off != 0.0), offset(acc_t(off)), scale(acc_t(off + 1.0)) {}
  Vec apply(Vec wv) const { return has_offset ? offset + wv : wv; }
  Vec load(int64_t j) const { return weight ? apply(VecIO<W>::load(weight + j)) : scale; }
  Vec load(int64_t j, int64_t count) const {
    return weight ? apply(VecIO<W>::load_partial(weight + j, count)) : scale;
  }
  // Elements [j, j + Bf16Pairs::kElems) of a bf16 weight as even/odd pairs.
  void load_pairs(int64_t j, Vec& even, Vec& odd) const {
    if (weight == nullptr) {
      even = odd = scale;
      return;
    }
    Bf16Pairs::load(weight + j, even, odd);
    even = apply(even);
    odd = apply(odd);
  }
};

// Sum of squares of a row with four independent accumulators (they hide the FMA latency; their
// sum order is fixed).
template <typename T>
typename VecIO<T>::acc_t sum_of_squares(const T* src, int64_t n) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  Vec acc0(acc_t(0)), acc1(acc_t(0)), acc2(acc_t(0)), acc3(acc_t(0));
  int64_t j = 0;
  if constexpr (kPairs<T>) {
    for (; j + 2 * Bf16Pairs::kElems <= n; j += 2 * Bf16Pairs::kElems) {
      Vec v0, v1, v2, v3;
      Bf16Pairs::load(src + j, v0, v1);
      Bf16Pairs::load(src + j + Bf16Pairs::kElems, v2, v3);
      acc0 = at::vec::fmadd(v0, v0, acc0);
      acc1 = at::vec::fmadd(v1, v1, acc1);
      acc2 = at::vec::fmadd(v2, v2, acc2);
      acc3 = at::vec::fmadd(v3, v3, acc3);
    }
  }
  for (; j + 4 * W <= n; j += 4 * W) {
    const Vec v0 = IO::load(src + j), v1 = IO::load(src + j + W);
    const Vec v2 = IO::load(src + j + 2 * W), v3 = IO::load(src + j + 3 * W);
    acc0 = at::vec::fmadd(v0, v0, acc0);
    acc1 = at::vec::fmadd(v1, v1, acc1);
    acc2 = at::vec::fmadd(v2, v2, acc2);
    acc3 = at::vec::fmadd(v3, v3, acc3);
  }
  for (; j + W <= n; j += W) {
    const Vec v = IO::load(src + j);
    acc0 = at::vec::fmadd(v, v, acc0);
  }
  if (j < n) {
    const Vec v = IO::load_partial(src + j, n - j);
    acc0 = at::vec::fmadd(v, v, acc0);
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, (acc0 + acc1) + (acc2 + acc3));
}

// res_out = round(x + res); returns the sum of squares of res_out (one accumulator: the row's
// store stream is the bottleneck).
template <typename T>
typename VecIO<T>::acc_t add_residual(const T* x, const T* res, T* res_out, int64_t n) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  Vec sum_sq(acc_t(0));
  int64_t j = 0;
  if constexpr (kPairs<T>) {
    Vec sum_sq_odd(acc_t(0));
    for (; j + Bf16Pairs::kElems <= n; j += Bf16Pairs::kElems) {
      Vec x_even, x_odd, r_even, r_odd;
      Bf16Pairs::load(x + j, x_even, x_odd);
      Bf16Pairs::load(res + j, r_even, r_odd);
      const auto even_high = Bf16Pairs::rounded_high(x_even + r_even);
      const auto odd_high = Bf16Pairs::rounded_high(x_odd + r_odd);
      Bf16Pairs::store_bits(res_out + j, even_high, odd_high);
      const Vec s_even = Bf16Pairs::as_float(even_high), s_odd = Bf16Pairs::as_float(odd_high);
      sum_sq = at::vec::fmadd(s_even, s_even, sum_sq);
      sum_sq_odd = at::vec::fmadd(s_odd, s_odd, sum_sq_odd);
    }
    sum_sq = sum_sq + sum_sq_odd;
  }
  for (; j + W <= n; j += W) {
    const Vec s = IO::round(IO::load(x + j) + IO::load(res + j));
    IO::store(res_out + j, s);
    sum_sq = at::vec::fmadd(s, s, sum_sq);
  }
  if (j < n) {
    const Vec s = IO::round(IO::load_partial(x + j, n - j) + IO::load_partial(res + j, n - j));
    IO::store(res_out + j, s, n - j);
    sum_sq = at::vec::fmadd(s, s, sum_sq);
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, sum_sq);
}

// y = round_O(w' * [round_T](src * rstd)), branch-free per template.
template <typename T, typename W, typename O, bool kCast>
void write_normalized(const T* src, const AppliedWeight<W>& w, O* y, int64_t n, typename VecIO<T>::acc_t rstd) {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t kW = IO::kWidth;
  const Vec rstd_v(rstd);
  auto normalized = [&](Vec v) { return kCast ? IO::round(v * rstd_v) : v * rstd_v; };
  int64_t j = 0;
  if constexpr (kPairs<T, W, O>) {
    const auto normalized_pair = [&](Vec v) { return kCast ? Bf16Pairs::round(v * rstd_v) : v * rstd_v; };
    for (; j + Bf16Pairs::kElems <= n; j += Bf16Pairs::kElems) {
      Vec x_even, x_odd, w_even, w_odd;
      Bf16Pairs::load(src + j, x_even, x_odd);
      w.load_pairs(j, w_even, w_odd);
      Bf16Pairs::store(y + j, normalized_pair(x_even) * w_even, normalized_pair(x_odd) * w_odd);
    }
  }
  for (; j + kW <= n; j += kW) VecIO<O>::store(y + j, normalized(IO::load(src + j)) * w.load(j));
  if (j < n) VecIO<O>::store(y + j, normalized(IO::load_partial(src + j, n - j)) * w.load(j, n - j), n - j);
}

template <typename T, typename W, typename O>
void rms_norm_rows(const RMSNormParams& p, int64_t row_begin, int64_t row_end) {
  using acc_t = typename VecIO<T>::acc_t;
  const int64_t n = p.n;
  const AppliedWeight<W> w(p.weight, p.offset);
  // Without a weight and offset the cast order cannot change a bit: skip the extra rounding.
  const bool cast = p.cast_before_weight && (p.weight != nullptr || p.offset != 0.0);
  for (int64_t r = row_begin; r < row_end; ++r) {
    // src is the row that gets normalized: x itself, or round(x + residual) stored first.
    const T* src = row_of<T>(p.x, p.x_stride, r);
    acc_t sum_sq;
    if (p.residual != nullptr) {
      T* res_out = row_of<T>(p.residual_out, p.residual_out_stride, r);
      sum_sq = add_residual<T>(src, row_of<T>(p.residual, p.residual_stride, r), res_out, n);
      src = res_out;
    } else {
      sum_sq = sum_of_squares<T>(src, n);
    }
    const acc_t rstd = acc_t(1) / std::sqrt(sum_sq / acc_t(n) + static_cast<acc_t>(p.eps));
    if (p.rstd != nullptr) static_cast<acc_t*>(p.rstd)[r] = rstd;
    O* y = row_of<O>(p.y, p.y_stride, r);
    if (cast) {
      write_normalized<T, W, O, true>(src, w, y, n, rstd);
    } else {
      write_normalized<T, W, O, false>(src, w, y, n, rstd);
    }
  }
}

void rms_norm_cpu(const RMSNormParams& p) {
  LLAMA_EXT_DISPATCH_FLOATING(p.dtype, "rms_norm_cpu", [&] {
    dispatch_weight_and_out<scalar_t>(p.dtype, p.weight_dtype, p.out_dtype, [&]<typename W, typename O>() {
      at::parallel_for(0, p.rows, row_grain(p.n),
                       [&](int64_t begin, int64_t end) { rms_norm_rows<scalar_t, W, O>(p, begin, end); });
    });
  });
}

// ---- backward -------------------------------------------------------------------------------

// A fixed number of row chunks (not the thread count) keeps the dweight sum order, and so its
// bits, independent of how many threads run.
constexpr int64_t kWeightGradChunks = 32;

// Rows whose g * xhat a pass adds in registers before it reads and writes the dweight partial
// sums once, rather than the fp32 [n] partial (16 KB at n = 4096) going through L1 once a row.
// The rows are added in their order, so the bits are those of one row at a time. With the
// flags hoisted and the partial never zeroed, the backward with dweight ran 1.36-1.43x as fast
// at the benchmark's 1024-2048 x 4096 and 2.5-2.8x with 256 rows in L3 at avx512_bf16, and
// 1.24-1.47x and 1.7-2.4x at avx2 (Zen 4, 2026-12-05, fp32 and bf16, alternating in one process).
constexpr int64_t kGradRows = 4;

// dx for NR consecutive rows from r0; with dweight_partial, also adds g * xhat of those rows to
// it, or writes their sum there for a chunk's first rows (no partial is zeroed first). Per row:
// dot = sum(g * w' * x) in one pass; then dx and g * xhat in a second pass over the NR rows
// together, which loads w' and the partial sums once for all of them.
template <typename T, typename W, typename O, int NR>
void rms_norm_backward_row_block(const RMSNormBackwardParams& p, int64_t r0, const AppliedWeight<W>& w,
                                 typename VecIO<T>::acc_t* dweight_partial /* [n] or null */, bool first) {
  using IO = VecIO<T>;
  using OIO = VecIO<O>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kW = IO::kWidth;
  const int64_t n = p.n;
  const acc_t* rstds = static_cast<const acc_t*>(p.rstd);
  const O* g[NR];
  const T* x[NR];
  const T* gres[NR];
  T* dx[NR];
  Vec rstd_v[NR], x_coef[NR];
  for (int r = 0; r < NR; ++r) {
    g[r] = row_of<O>(p.grad_out, p.grad_out_stride, r0 + r);
    x[r] = row_of<T>(p.x, p.x_stride, r0 + r);
    gres[r] = p.grad_residual != nullptr ? row_of<T>(p.grad_residual, p.grad_residual_stride, r0 + r) : nullptr;
    dx[r] = row_of<T>(p.grad_x, p.grad_x_stride, r0 + r);
    const acc_t rstd = rstds[r0 + r];
    Vec dot(acc_t(0));
    int64_t j = 0;
    if constexpr (kPairs<T, W, O>) {
      Vec dot_odd(acc_t(0));
      for (; j + Bf16Pairs::kElems <= n; j += Bf16Pairs::kElems) {
        Vec g_even, g_odd, w_even, w_odd, x_even, x_odd;
        Bf16Pairs::load(g[r] + j, g_even, g_odd);
        w.load_pairs(j, w_even, w_odd);
        Bf16Pairs::load(x[r] + j, x_even, x_odd);
        dot = at::vec::fmadd(g_even * w_even, x_even, dot);
        dot_odd = at::vec::fmadd(g_odd * w_odd, x_odd, dot_odd);
      }
      dot = dot + dot_odd;
    }
    for (; j < n; j += kW) {
      const int64_t count = std::min(kW, n - j);
      const bool full = count == kW;
      const Vec gw = (full ? OIO::load(g[r] + j) : OIO::load_partial(g[r] + j, count)) *
                     (full ? w.load(j) : w.load(j, count));
      dot = at::vec::fmadd(gw, full ? IO::load(x[r] + j) : IO::load_partial(x[r] + j, count), dot);
    }
    const acc_t dot_sum = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, dot);
    rstd_v[r] = Vec(rstd);
    x_coef[r] = Vec(-rstd * rstd * rstd * dot_sum / acc_t(n));
  }
  // The flags as locals: the stores to dx could alias p, which would reload them every step.
  const bool residual = p.grad_residual != nullptr, grad = dweight_partial != nullptr, cast = p.cast_before_weight;
  // Row r's dx at one vector of its values (gres: grad_residual's, read only with a residual),
  // and their g * xhat added to dweight; round_in rounds to the input dtype.
  const auto dx_and_dweight = [&](int r, Vec gv, Vec xv, Vec wv, Vec gres_v, Vec& dweight, auto round_in)
      __attribute__((always_inline)) {
    Vec d = at::vec::fmadd(xv, x_coef[r], gv * wv * rstd_v[r]);
    if (residual) d = d + gres_v;
    if (grad) dweight = at::vec::fmadd(gv, cast ? round_in(xv * rstd_v[r]) : xv * rstd_v[r], dweight);
    return d;
  };
  const auto step = [&](int64_t j, int64_t count) __attribute__((always_inline)) {
    const bool full = count == kW;
    const auto load = [&](const auto* row) {
      using E = std::remove_cv_t<std::remove_pointer_t<decltype(row)>>;
      return full ? VecIO<E>::load(row + j) : VecIO<E>::load_partial(row + j, count);
    };
    const Vec wv = full ? w.load(j) : w.load(j, count);
    Vec dweight = grad && !first ? Vec::loadu(dweight_partial + j, count) : Vec(acc_t(0));
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const Vec d = dx_and_dweight(r, load(g[r]), load(x[r]), wv, residual ? load(gres[r]) : Vec(acc_t(0)), dweight,
                                   [](Vec v) { return IO::round(v); });
      IO::store(dx[r] + j, d, count);
    }
    if (grad) dweight.store(dweight_partial + j, count);
  };
  int64_t j = 0;
  if constexpr (kPairs<T, W, O>) {
    // The body in pairs; a step's partial sums lie even elements first, then odd ones (the
    // reduction below undoes it).
    for (; j + Bf16Pairs::kElems <= n; j += Bf16Pairs::kElems) {
      Vec w_even, w_odd;
      w.load_pairs(j, w_even, w_odd);
      Vec dweight_even(acc_t(0)), dweight_odd(acc_t(0));
      if (grad && !first) {
        dweight_even = Vec::loadu(dweight_partial + j);
        dweight_odd = Vec::loadu(dweight_partial + j + kW);
      }
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        Vec g_even, g_odd, x_even, x_odd, res_even(acc_t(0)), res_odd(acc_t(0));
        Bf16Pairs::load(g[r] + j, g_even, g_odd);
        Bf16Pairs::load(x[r] + j, x_even, x_odd);
        if (residual) Bf16Pairs::load(gres[r] + j, res_even, res_odd);
        const auto round_in = [](Vec v) { return Bf16Pairs::round(v); };
        Bf16Pairs::store(dx[r] + j, dx_and_dweight(r, g_even, x_even, w_even, res_even, dweight_even, round_in),
                         dx_and_dweight(r, g_odd, x_odd, w_odd, res_odd, dweight_odd, round_in));
      }
      if (grad) {
        dweight_even.store(dweight_partial + j);
        dweight_odd.store(dweight_partial + j + kW);
      }
    }
  }
  for (; j + kW <= n; j += kW) step(j, kW);
  if (j < n) step(j, n - j);
}

// dx for rows [row_begin, row_end); with dweight_partial, also the sum of g * xhat over those rows
// there.
template <typename T, typename W, typename O>
void rms_norm_backward_rows(const RMSNormBackwardParams& p, int64_t row_begin, int64_t row_end,
                            typename VecIO<T>::acc_t* dweight_partial /* [n] or null */) {
  const AppliedWeight<W> w(p.weight, p.offset);
  int64_t r = row_begin;
  for (; r + kGradRows <= row_end; r += kGradRows)
    rms_norm_backward_row_block<T, W, O, kGradRows>(p, r, w, dweight_partial, r == row_begin);
  for (; r < row_end; ++r) rms_norm_backward_row_block<T, W, O, 1>(p, r, w, dweight_partial, r == row_begin);
}

template <typename T, typename W, typename O>
void rms_norm_backward_typed(const RMSNormBackwardParams& p, const at::TensorOptions& options) {
  using acc_t = typename VecIO<T>::acc_t;
  const int64_t rows = p.rows, n = p.n;
  if (p.grad_weight == nullptr) {
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      rms_norm_backward_rows<T, W, O>(p, begin, end, nullptr);
    });
    return;
  }
  // kWeightGradChunks chunks at most, none empty: each writes its whole partial row.
  const int64_t rows_per_chunk = (rows + kWeightGradChunks - 1) / kWeightGradChunks;
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  at::Tensor partial = at::empty({chunks, n}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
  // Small inputs stay on one thread: a task gets at least row_grain(n) rows' worth of chunks.
  const int64_t chunk_grain = std::max<int64_t>(1, row_grain(n) / rows_per_chunk);
  at::parallel_for(0, chunks, chunk_grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t r0 = std::min(rows, c * rows_per_chunk);
      const int64_t r1 = std::min(rows, r0 + rows_per_chunk);
      rms_norm_backward_rows<T, W, O>(p, r0, r1, partial_ptr + c * n);
    }
  });
  // dweight = the chunks' partial sums added in chunk order, a vector of columns at a time, in
  // units of the row blocks' steps (pairs: the even elements' sums, then the odd ones'). Each
  // sum is cast to W alone: c10's rounding, NaN and subnormals included.
  using Vec = typename VecIO<T>::Vec;
  constexpr int64_t kW = VecIO<T>::kWidth, kUnit = kPairs<T, W, O> ? Bf16Pairs::kElems : kW;
  W* dw = static_cast<W*>(p.grad_weight);
  // The sums of the partials' columns [j, j + count), written to dw[first + i * step].
  const auto reduce_columns = [&](int64_t j, int64_t count, int64_t first, int64_t step) {
    Vec sum(acc_t(0));
    for (int64_t c = 0; c < chunks; ++c) sum = sum + Vec::loadu(partial_ptr + c * n + j, count);
    acc_t sums[kW];
    sum.store(sums, count);
    for (int64_t i = 0; i < count; ++i) dw[first + i * step] = static_cast<W>(sums[i]);
  };
  at::parallel_for(0, (n + kUnit - 1) / kUnit, 4096 / kUnit, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t j0 = u * kUnit;
      if (kPairs<T, W, O> && j0 + kUnit <= n) {
        reduce_columns(j0, kW, j0, 2);
        reduce_columns(j0 + kW, kW, j0 + 1, 2);
        continue;
      }
      for (int64_t j = j0; j < std::min(n, j0 + kUnit); j += kW) reduce_columns(j, std::min(kW, n - j), j, 1);
    }
  });
}

void rms_norm_backward_cpu(const RMSNormBackwardParams& p, const at::TensorOptions& options) {
  LLAMA_EXT_DISPATCH_FLOATING(p.dtype, "rms_norm_backward_cpu", [&] {
    dispatch_weight_and_out<scalar_t>(p.dtype, p.weight_dtype, p.out_dtype, [&]<typename W, typename O>() {
      rms_norm_backward_typed<scalar_t, W, O>(p, options);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CPU, m) {
  m.impl("rms_norm", &rms_norm_forward<rms_norm_cpu>);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_forward<rms_norm_cpu>);
  m.impl("fused_add_rms_norm_", &fused_add_rms_norm_inplace<rms_norm_cpu>);
  m.impl("rms_norm_backward", &rms_norm_backward<rms_norm_backward_cpu>);
}

}  // namespace llama_ext
