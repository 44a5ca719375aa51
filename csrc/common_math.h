// Arithmetic helpers that host code, the CUDA kernels and the CPU kernels share (one definition
// for every backend).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace llama_ext {

// Ceiling of a / b for a >= 0, b > 0: tile, block and grid counts.
C10_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// max that keeps a NaN from either side (fmaxf drops it, std::max keeps only its first
// argument's): the softmax statistics that must carry a NaN score into the row's out and lse.
// x != x is the NaN test of both compilers (no flag of this build assumes finite values; nvcc's
// --use_fast_math does not).
template <typename F>
C10_HOST_DEVICE inline F max_keep_nan(F a, F b) { return a != a || a > b ? a : b; }

// n / d and n % d for 0 <= n < 2^31 by a divisor d in [1, 2^31) fixed at launch: one
// multiply-high, an add and a shift, where a run-time `/` compiles to a ~20-instruction sequence
// on the GPU (per gathered key row of a paged cache, the decode kernel's hottest integer work).
// Granlund & Montgomery, "Division by invariant integers using multiplication" (1994), theorem
// 4.2 with N = 32: l = ceil(log2 d), m = floor(2^(32 + l) / d) - 2^32 + 1 (< 2^32), and
// n / d = (mulhi(m, n) + n) >> l; n < 2^31 keeps the sum within 32 bits. Checked on samples at
// compile time (common_math.cpp).
class FastDivisor {
 public:
  constexpr FastDivisor() = default;  // d = 1
  C10_HOST_DEVICE constexpr explicit FastDivisor(uint32_t d) : d_(d) {
    while ((uint64_t{1} << shift_) < d) ++shift_;
    magic_ = static_cast<uint32_t>((uint64_t{1} << (32 + shift_)) / d - (uint64_t{1} << 32) + 1);
  }
  C10_HOST_DEVICE constexpr uint32_t div(uint32_t n) const {
    const auto mulhi = static_cast<uint32_t>(static_cast<uint64_t>(magic_) * n >> 32);
    return (mulhi + n) >> shift_;
  }
  C10_HOST_DEVICE constexpr uint32_t mod(uint32_t n) const { return n - div(n) * d_; }

 private:
  uint32_t d_ = 1, magic_ = 1, shift_ = 0;
};

}  // namespace llama_ext
