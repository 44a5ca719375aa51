// Rotation of one head by one cos/sin table row, vectorized with at::vec: shared by the rotary
// op (rotary.cpp) and the KV-cache attention (kvcache_attention.cpp), which rotates the new k
// and q with exactly the op's numerics.
#pragma once

#include <algorithm>
#include <tuple>
#include <utility>

#include "cpu_vec.h"

namespace llama_ext::cpu {

// Vectorized<T>::size() elements of T as fp32 (fp64) vectors: one for float/double, two for
// half/bfloat16, whose 16-lane vectors load and store as a whole (a partial store is far slower).
template <typename T>
struct Chunk {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  static constexpr int64_t kVecs = IO::kReduced ? 2 : 1;
  static constexpr int64_t kSize = kVecs * IO::kWidth;
  Vec v[kVecs];

  static Chunk load(const T* p) {
    Chunk c;
    if constexpr (IO::kReduced) {
      std::tie(c.v[0], c.v[1]) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    } else {
      c.v[0] = Vec::loadu(p);
    }
    return c;
  }
  void store(T* p) const {
    if constexpr (IO::kReduced) {
      at::vec::convert_from_float<T>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
};

// y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s on one vector of pairs (s already negated for inverse).
template <typename Vec>
inline std::pair<Vec, Vec> rotate(const Vec& x1, const Vec& x2, const Vec& c, const Vec& s) {
  return {at::vec::fmsub(x1, c, x2 * s), at::vec::fmadd(x2, c, x1 * s)};
}

template <typename Vec>
inline Vec load_sin(const typename Vec::value_type* p, int64_t count, bool inverse) {
  const Vec s = Vec::loadu(p, count);
  return inverse ? s.neg() : s;
}

// Rotates one head: rotate_half pairing (i, i + half). Whole chunks first, then a W-wide tail.
template <typename T>
inline void rotate_half_head(const T* src, T* dst, const at::opmath_type<T>* cos, const at::opmath_type<T>* sin,
                             int64_t half, bool inverse) {
  using C = Chunk<T>;
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  int64_t i = 0;
  for (; i + C::kSize <= half; i += C::kSize) {
    C x1 = C::load(src + i), x2 = C::load(src + half + i);
    for (int64_t j = 0; j < C::kVecs; ++j) {
      const Vec c = Vec::loadu(cos + i + j * W);
      const Vec s = load_sin<Vec>(sin + i + j * W, W, inverse);
      std::tie(x1.v[j], x2.v[j]) = rotate(x1.v[j], x2.v[j], c, s);
    }
    x1.store(dst + i);
    x2.store(dst + half + i);
  }
  for (; i < half; i += W) {
    const int64_t count = std::min(W, half - i);
    const Vec x1 = IO::load_partial(src + i, count);
    const Vec x2 = IO::load_partial(src + half + i, count);
    const auto [y1, y2] = rotate(x1, x2, Vec::loadu(cos + i, count), load_sin<Vec>(sin + i, count, inverse));
    IO::store(dst + i, y1, count);
    IO::store(dst + half + i, y2, count);
  }
}

// Rotates one head: GPT-J pairing (2i, 2i + 1). deinterleave2 splits two vectors of pairs into
// even and odd lanes, the rotation runs as above, and interleave2 puts them back.
template <typename T>
inline void rotate_interleaved_head(const T* src, T* dst, const at::opmath_type<T>* cos,
                                    const at::opmath_type<T>* sin, int64_t half, bool inverse) {
  using C = Chunk<T>;
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  int64_t i = 0;  // pair index; pairs [i, i + kSize) are elements [2i, 2i + 2 kSize): two chunks
  for (; i + C::kSize <= half; i += C::kSize) {
    C lo = C::load(src + 2 * i), hi = C::load(src + 2 * i + C::kSize);
    // Elements in float vectors, in order: lo.v[0..kVecs), hi.v[0..kVecs); vectors 2j, 2j+1 hold W pairs.
    Vec* v[2 * C::kVecs];
    for (int64_t j = 0; j < C::kVecs; ++j) v[j] = &lo.v[j], v[C::kVecs + j] = &hi.v[j];
    for (int64_t j = 0; j < C::kVecs; ++j) {
      const auto [even, odd] = at::vec::deinterleave2(*v[2 * j], *v[2 * j + 1]);
      const auto [y_even, y_odd] =
          rotate(even, odd, Vec::loadu(cos + i + j * W), load_sin<Vec>(sin + i + j * W, W, inverse));
      std::tie(*v[2 * j], *v[2 * j + 1]) = at::vec::interleave2(y_even, y_odd);
    }
    lo.store(dst + 2 * i);
    hi.store(dst + 2 * i + C::kSize);
  }
  for (; i < half; i += W) {
    const int64_t pairs = std::min(W, half - i);
    const int64_t lo_count = std::min(W, 2 * pairs);  // elements in the first vector
    const int64_t hi_count = 2 * pairs - lo_count;    // elements in the second
    const T* p = src + 2 * i;
    const Vec a = IO::load_partial(p, lo_count);
    const Vec b = hi_count > 0 ? IO::load_partial(p + W, hi_count) : Vec(0);
    const auto [even, odd] = at::vec::deinterleave2(a, b);
    const auto [y_even, y_odd] = rotate(even, odd, Vec::loadu(cos + i, pairs), load_sin<Vec>(sin + i, pairs, inverse));
    const auto [ya, yb] = at::vec::interleave2(y_even, y_odd);
    IO::store(dst + 2 * i, ya, lo_count);
    if (hi_count > 0) IO::store(dst + 2 * i + W, yb, hi_count);
  }
}

}  // namespace llama_ext::cpu
