// The online softmax of score rows on the CPU, shared by the attention kernel (attention.cpp)
// and the decode kernel (kvcache_attention.cpp): softcap, row maxima, running-max updates
// vectorized across rows, and the probabilities with their sums, each graded by the dtype the
// probabilities are rounded to next (exp_for).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_vec.h"

namespace llama_ext::cpu {

// Softcap of the visible columns [lo, hi) of a score row, in place: s <- c tanh(scale s / c).
template <typename acc_t>
void softcap_row(acc_t* s, int64_t lo, int64_t hi, acc_t scale, acc_t cap) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec in_v(scale / cap), cap_v(cap);
  int64_t j = lo;
  for (; j + W <= hi; j += W) ((Vec::loadu(s + j) * in_v).tanh() * cap_v).store(s + j);
  if (j < hi) ((Vec::loadu(s + j, hi - j) * in_v).tanh() * cap_v).store(s + j, hi - j);
}

// exp of scores whose results are rounded to grade_t next (bf16 probabilities entering a
// product, or the output of a bf16 attention): those need only bf16's precision.
template <typename grade_t, typename acc_t>
at::vec::Vectorized<acc_t> exp_for(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<grade_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    return exp_bf16_grade(x);
  } else {
    return exp_fast(x);
  }
}

// The online softmax of a score tile runs in three steps, so that the per-row scalar work (the
// new running max and its rescale factor, one exp per row) vectorizes across rows:
//   1. row_max: the max of each row's visible columns (-inf when it has none);
//   2. update_maxima: m' = max(m, tile max) and alpha = exp(scale (m - m')) for all rows (1
//      where m' == m: the max did not grow, or the row has seen no key yet);
//   3. exp_row: p = exp(scale (s - m')) on the visible columns, 0 elsewhere, and its sum; the
//      caller updates l' = l alpha + sum and rescales the row's output accumulator by alpha.
template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t lo, int64_t hi) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec lowest(-std::numeric_limits<acc_t>::infinity());
  const auto max = [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); };
  Vec max0 = lowest, max1 = lowest;  // two chains: the max's latency, not its throughput, would bound one
  int64_t j = lo;
  for (; j + 2 * W <= hi; j += 2 * W) {
    max0 = max(max0, Vec::loadu(s + j));
    max1 = max(max1, Vec::loadu(s + j + W));
  }
  if (j + W <= hi) {
    max0 = max(max0, Vec::loadu(s + j));
    j += W;
  }
  if (j < hi) max1 = max(max1, Vec::set(lowest, Vec::loadu(s + j, hi - j), hi - j));
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, max(max0, max1));
}

template <typename acc_t>
void update_maxima(acc_t* m, const acc_t* tile_max, acc_t* alpha, int64_t rows, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec scale_v(scale), one(acc_t(1));
  const auto update = [&](int64_t r, int64_t count) {
    const Vec m_old = Vec::loadu(m + r, count);
    const Vec m_new = at::vec::maximum(m_old, Vec::loadu(tile_max + r, count));
    // exp(-inf) = 0 on a row's first visited block; exp(-inf - -inf) would be NaN, hence the blend.
    const Vec a = Vec::blendv(exp_fast((m_old - m_new) * scale_v), one, m_old == m_new);
    m_new.store(m + r, count);
    a.store(alpha + r, count);
  };
  int64_t r = 0;
  for (; r + W <= rows; r += W) update(r, W);
  if (r < rows) update(r, rows - r);
}

// Writes p[j] = exp(scale s[j] + shift) (p may alias s) for the visible columns [lo, hi) and 0
// elsewhere in [0, n); returns the sum of the probabilities before any rounding to prob_t. T is
// the attention's dtype, which grades the exp (exp_for).
template <typename T, typename acc_t, typename prob_t>
acc_t exp_row(const acc_t* s, prob_t* p, int64_t n, int64_t lo, int64_t hi, acc_t scale, acc_t shift) {
  using IO = VecIO<prob_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  static_assert(IO::kWidth == W, "probabilities are stored one score vector at a time");
  const Vec scale_v(scale), shift_v(shift);
  Vec sum_v(acc_t(0));
  int64_t j = lo;
  for (; j + W <= hi; j += W) {
    const Vec e = exp_for<T>(at::vec::fmadd(Vec::loadu(s + j), scale_v, shift_v));
    IO::store(p + j, e);
    sum_v = sum_v + e;
  }
  if (j < hi) {
    const Vec e = exp_for<T>(at::vec::fmadd(Vec::loadu(s + j, hi - j), scale_v, shift_v));
    IO::store(p + j, e, hi - j);
    sum_v = sum_v + Vec::set(Vec(acc_t(0)), e, hi - j);
  }
  std::fill(p, p + lo, prob_t(0));
  std::fill(p + hi, p + n, prob_t(0));
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum_v);
}

}  // namespace llama_ext::cpu
