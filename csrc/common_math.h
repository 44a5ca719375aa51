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

}  // namespace llama_ext
