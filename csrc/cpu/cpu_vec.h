// at::vec helpers for the CPU kernels: load any floating dtype into vectors of its op-math
// type (float for float/half/bfloat16, double for double), store back with one rounding.
#pragma once

#include "capability.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <cstring>

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
// v, made to live in a register. A compiler may fold a vector's load into each instruction that
// uses it (a memory operand), so a value loaded once for several FMAs is read from L1 once per FMA,
// and the loads rather than the FMAs can bound a loop.
template <typename Raw>
__attribute__((always_inline)) inline Raw in_register(Raw v) {
  asm("" : "+v"(v));
  return v;
}
__attribute__((always_inline)) inline at::vec::Vectorized<float> in_register(at::vec::Vectorized<float> v) {
  return in_register(static_cast<FloatReg>(v));
}

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

// bf16 as even/odd pairs. One full-width access holds 2 x kWidth bf16, its 32-bit lanes the
// pairs (2i, 2i + 1): shifting the lanes left by 16 gives the even elements as fp32, masking
// off their low halves the odd ones, and rounding back (round to nearest even on the integer
// bits) and re-pairing are lane-wise too. Widening in element order instead (VPMOVZXWD) and
// packing back (VPACKUSDW + VPERMQ) put three shuffles per vector on the one shuffle port.
// For kernels indifferent to the order of elements within an access: elementwise math, and
// sums whose lane of each element is fixed.
//
// Where the CPU rounds to bf16 in one instruction (AVX512-BF16's VCVTNEPS2BF16), rounding in
// element order beats rounding the pairs' integer bits (RMSNorm's forward: ~10% slower in pairs
// on a Sapphire Rapids VM, against 1.5x faster in pairs at the AVX2 level):
// kBf16PairsRound says whether kernels that round should use the pairs.
#if defined(__AVX512BF16__)
inline constexpr bool kBf16PairsRound = false;
#else
inline constexpr bool kBf16PairsRound = true;
#endif
struct Bf16Pairs {
  using Vec = at::vec::Vectorized<float>;
  static constexpr int64_t kElems = 2 * Vec::size();  // bf16 per access
#if defined(CPU_CAPABILITY_AVX512)
  using Bits = __m512i;
  static Bits load_bits(const c10::BFloat16* p) { return _mm512_loadu_si512(p); }
  static Vec even(Bits b) { return _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)); }
  static Vec odd(Bits b) { return _mm512_castsi512_ps(_mm512_and_si512(b, _mm512_set1_epi32(-65536))); }
  // Each lane's value rounded to bf16 (c10::BFloat16's rounding: to nearest even, NaN to
  // 0xFFFF), in the lane's high half; the low half is zero.
  static Bits rounded_high(Vec v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_blend_epi32(nan, _mm512_and_si512(sum, _mm512_set1_epi32(-65536)), _mm512_set1_epi32(-65536));
  }
  static void store_bits(c10::BFloat16* p, Bits even_high, Bits odd_high) {
    _mm512_storeu_si512(p, _mm512_or_si512(_mm512_srli_epi32(even_high, 16), odd_high));
  }
  static Vec as_float(Bits b) { return _mm512_castsi512_ps(b); }
#elif defined(CPU_CAPABILITY_AVX2)
  using Bits = __m256i;
  static Bits load_bits(const c10::BFloat16* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static Vec even(Bits b) { return _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)); }
  static Vec odd(Bits b) { return _mm256_castsi256_ps(_mm256_and_si256(b, _mm256_set1_epi32(-65536))); }
  static Bits rounded_high(Vec v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_or_si256(_mm256_and_si256(sum, _mm256_set1_epi32(-65536)), _mm256_and_si256(nan, _mm256_set1_epi32(-65536)));
  }
  static void store_bits(c10::BFloat16* p, Bits even_high, Bits odd_high) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_or_si256(_mm256_srli_epi32(even_high, 16), odd_high));
  }
  static Vec as_float(Bits b) { return _mm256_castsi256_ps(b); }
#else  // portable: the same lanes in memory (x86 is little-endian: lane i is p[2i] | p[2i + 1] << 16)
  using Bits = std::array<uint32_t, Vec::size()>;
  static Bits load_bits(const c10::BFloat16* p) {
    Bits b;
    std::memcpy(b.data(), p, sizeof(b));
    return b;
  }
  static Vec as_float(const Bits& b) {
    float f[Vec::size()];
    std::memcpy(f, b.data(), sizeof(f));
    return Vec::loadu(f);
  }
  static Vec even(Bits b) {
    for (uint32_t& lane : b) lane <<= 16;
    return as_float(b);
  }
  static Vec odd(Bits b) {
    for (uint32_t& lane : b) lane &= 0xffff0000u;
    return as_float(b);
  }
  static Bits rounded_high(Vec v) {
    float f[Vec::size()];
    v.store(f);
    Bits b;
    for (size_t i = 0; i < b.size(); ++i) b[i] = uint32_t(c10::BFloat16(f[i]).x) << 16;
    return b;
  }
  static void store_bits(c10::BFloat16* p, const Bits& even_high, const Bits& odd_high) {
    Bits b;
    for (size_t i = 0; i < b.size(); ++i) b[i] = (even_high[i] >> 16) | odd_high[i];
    std::memcpy(p, b.data(), sizeof(b));
  }
#endif
  static void load(const c10::BFloat16* p, Vec& even_out, Vec& odd_out) {
    const Bits b = load_bits(p);
    even_out = even(b);
    odd_out = odd(b);
  }
  // The value a bf16 tensor would hold.
  static Vec round(Vec v) { return as_float(rounded_high(v)); }
  // Stores the pairs (even[i], odd[i]) at p[2i], p[2i + 1], each rounded once to bf16.
  static void store(c10::BFloat16* p, Vec even_in, Vec odd_in) {
    store_bits(p, rounded_high(even_in), rounded_high(odd_in));
  }
};

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

// 2^f for f in [-1/2, 1/2]: exp_bf16_grade's degree-4 fit on Chebyshev nodes.
inline at::vec::Vectorized<float> exp2_fraction(const at::vec::Vectorized<float>& f) {
  using Vec = at::vec::Vectorized<float>;
  Vec p(0.00967603710f);
  p = at::vec::fmadd(p, f, Vec(0.0559220356f));
  p = at::vec::fmadd(p, f, Vec(0.240221074f));
  p = at::vec::fmadd(p, f, Vec(0.693121034f));
  return at::vec::fmadd(p, f, Vec(1.00000008f));
}

// exp for values that are rounded to bf16 next (attention probabilities on the bf16 tile
// products, or the output of a bf16 attention): 4e-6 relative error, 500x below bf16's
// rounding, in 8-10 instructions instead of exp_u20's ~20. exp(x) = 2^n 2^f with
// n = round(x log2 e) and f in [-1/2, 1/2], 2^f a degree-4 fit on Chebyshev nodes
// (exp2_fraction). A NaN stays NaN (MAXPS/MINPS return their second operand when
// one is NaN, and the fit of a NaN f is NaN).
//  - AVX-512: 2^n applied by VSCALEFPS (which flushes to 0 and overflows to Inf as exp does);
//    x log2 e clamped below at -150 (exp is 0 there) so that -Inf gives 0, not -Inf - -Inf.
//  - AVX2: 2^n built as the float with biased exponent n + 127, x log2 e clamped to
//    [-127, 127]: n = -127 builds +0, so exp flushes to 0 below ~2^-126.5 (-Inf included) and
//    saturates at ~2^127.5 instead of overflowing (softmax arguments are <= 0).
// Other levels use exp_fast.
inline at::vec::Vectorized<float> exp_bf16_grade(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-150.0f), _mm512_mul_ps(__m512(x), _mm512_set1_ps(1.44269504f)));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_fraction(_mm512_sub_ps(t, n)), n);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 scaled = _mm256_mul_ps(__m256(x), _mm256_set1_ps(1.44269504f));
  const __m256 t = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), scaled));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(exp2_fraction(_mm256_sub_ps(t, n)), _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
#else
  return exp_fast(x);
#endif
}

}  // namespace llama_ext::cpu
