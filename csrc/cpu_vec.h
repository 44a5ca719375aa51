// at::vec helpers for the CPU kernels: load any floating dtype into vectors of its op-math
// type (float for float/half/bfloat16, double for double), store back with one rounding.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace llama_ext::cpu {

template <typename T>
struct VecIO {
  using acc_t = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<T>;
  static constexpr int64_t kWidth = Vec::size();

  // Loads kWidth elements starting at p.
  static Vec load(const T* p) {
    if constexpr (kReduced) {
      Vec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    } else {
      return Vec::loadu(p);
    }
  }

  // Loads count < kWidth elements starting at p; the other lanes are zero.
  static Vec load_partial(const T* p, int64_t count) {
    if constexpr (kReduced) {
      acc_t buf[kWidth] = {};
      for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<acc_t>(p[i]);
      return Vec::loadu(buf);
    } else {
      return Vec::loadu(p, count);
    }
  }

  // Stores count (default kWidth) elements, each rounded once to T.
  static void store(T* p, Vec v, int64_t count = kWidth) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(v, v).store(p, count);
    } else {
      v.store(p, count);
    }
  }

  // Rounds every lane to T and back: the value a tensor of dtype T would hold.
  static Vec round(Vec v) {
    if constexpr (kReduced) {
      auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v));
      (void)hi;
      return lo;
    } else {
      return v;
    }
  }
};

}  // namespace llama_ext::cpu
