// at::vec helpers for the CPU kernels: load any floating dtype into vectors of its op-math
// type (float for float/half/bfloat16, double for double), store back with one rounding.
#pragma once

#include "capability.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace llama_ext::cpu {

// One float vector of bfloat16/float16 values <-> their bits through a single full-width
// access. at::vec's own reduced-float vectors hold twice the lanes of a float vector and
// fall back to memcpy for a half-width store, which costs more than the math here.
#if defined(CPU_CAPABILITY_AVX512)
#define LLAMA_EXT_FAST_REDUCED_IO 1
using FloatReg = __m512;
using HalfBits = __m256i;
inline HalfBits load_half_bits(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store_half_bits(void* p, HalfBits b) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b); }
#elif defined(CPU_CAPABILITY_AVX2)
#define LLAMA_EXT_FAST_REDUCED_IO 1
using FloatReg = __m256;
using HalfBits = __m128i;
inline HalfBits load_half_bits(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline void store_half_bits(void* p, HalfBits b) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), b); }
#endif

#if defined(LLAMA_EXT_FAST_REDUCED_IO)
template <typename T>
inline HalfBits float_to_bits(FloatReg v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    // VCVTNEPS2BF16: round to nearest even in one instruction. It flushes denormals (|x| below
    // 1.2e-38) to zero, unlike c10::BFloat16; every normal value converts identically.
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
    return at::vec::cvtfp32_bf16(v);  // round to nearest even, NaN preserved, as c10::BFloat16
#endif
  } else {
    return at::vec::cvtfp32_fp16(v);
  }
}

template <typename T>
inline FloatReg bits_to_float(HalfBits bits) {
  FloatReg out;
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    at::vec::cvtbf16_fp32(bits, out);
  } else {
    at::vec::cvtfp16_fp32(bits, out);
  }
  return out;
}
#endif

template <typename T>
struct VecIO {
  using acc_t = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<T>;
  static constexpr int64_t kWidth = Vec::size();

  // Loads kWidth elements starting at p.
  static Vec load(const T* p) {
    if constexpr (kReduced) {
#if defined(LLAMA_EXT_FAST_REDUCED_IO)
      return Vec(bits_to_float<T>(load_half_bits(p)));
#else
      Vec out;
      at::vec::load_to_float<T>(p, out);
      return out;
#endif
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
#if defined(LLAMA_EXT_FAST_REDUCED_IO)
      const HalfBits bits = float_to_bits<T>(v);
      if (count == kWidth) {
        store_half_bits(p, bits);
      } else {
        alignas(64) T buf[kWidth];
        store_half_bits(buf, bits);
        for (int64_t i = 0; i < count; ++i) p[i] = buf[i];
      }
#else
      at::vec::convert_from_float<T>(v, v).store(p, count);
#endif
    } else {
      v.store(p, count);
    }
  }

  // Rounds every lane to T and back: the value a tensor of dtype T would hold.
  static Vec round(Vec v) {
    if constexpr (kReduced) {
#if defined(LLAMA_EXT_FAST_REDUCED_IO)
      return Vec(bits_to_float<T>(float_to_bits<T>(v)));
#else
      auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v));
      (void)hi;
      return lo;
#endif
    } else {
      return v;
    }
  }
};

// exp with ~1 ulp error in fp32 (Sleef u20 variant: faster than the u10 one); plain exp in fp64.
inline at::vec::Vectorized<float> exp_fast(const at::vec::Vectorized<float>& x) { return x.exp_u20(); }
inline at::vec::Vectorized<double> exp_fast(const at::vec::Vectorized<double>& x) { return x.exp(); }

// exp for values that are rounded to bf16 next (attention probabilities on the bf16 tile
// products): 4e-6 relative error, 500x below bf16's rounding, in 8 instructions instead of
// exp_u20's ~20. exp(x) = 2^n 2^f with n = round(x log2 e) and f in [-1/2, 1/2], 2^f a degree-4
// fit on Chebyshev nodes, 2^n applied by VSCALEFPS (which flushes to 0 and overflows to Inf as
// exp does). x log2 e is clamped below at -150 (exp is 0 there) so that -Inf gives 0, not
// -Inf - -Inf = NaN; a NaN stays NaN (VMAXPS returns its second operand when one is NaN).
// Other levels use exp_fast.
inline at::vec::Vectorized<float> exp_bf16_grade(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-150.0f), _mm512_mul_ps(__m512(x), _mm512_set1_ps(1.44269504f)));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(0.00967603710f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0559220356f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240221074f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693121034f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000008f));
  return _mm512_scalef_ps(p, n);
#else
  return exp_fast(x);
#endif
}

}  // namespace llama_ext::cpu
