// bf16 x bf16 -> fp32 tile products on AVX512-BF16 (VDPBF16PS), for the CPU attention kernel.
//
// Why. ATen exports no bf16-in / fp32-out GEMM for small tiles, so the attention kernel would
// otherwise widen bf16 tiles to fp32 and multiply at the fp32 FMA rate. VDPBF16PS multiplies
// 16 pairs of bf16 from each operand and adds each pair's two products into one fp32 lane,
//   c[i] += a[2i] b[2i] + a[2i+1] b[2i+1],
// which is 64 FLOPs per instruction, twice an fp32 FMA of the same width: on this machine's
// cores (Zen 4, one 512-bit FP op per cycle) that is ~64 FLOP/cycle against ~32 for fp32.
// Numerics: the instruction treats bf16 subnormal inputs as zero, flushes subnormal results,
// and rounds each of the two products' additions to fp32 separately (round to nearest even),
// whatever MXCSR says; on attention's O(1) scores and probabilities none of that is visible.
//
// Layout. The instruction contracts over pairs of k, so B is packed "VNNI": [K/2][ldb][2],
// element (k, n) at ((k/2) ldb + n) 2 + k%2; one 64-byte load is 16 columns x one pair of k.
// A(m, k/2) is one 32-bit word (two consecutive k of row m) broadcast to all lanes. A is read
// through (row, pair) strides in elements, so both a row-major [M, K] matrix (lda, 2) and a
// VNNI-packed [K/2][M][2] one (2, 2 M) serve as A: the second is the transpose of a packed B,
// which lets the attention backward use P^T and dS^T without transposing them.
//
// Register tile: 6 rows x 64 columns = 24 zmm accumulators + 4 B vectors + 1 broadcast (of 32).
// Per pair of k: 4 loads of B, 6 broadcasts, 24 VDPBF16PS; the 64-column panel of B (16 KB
// at K = 128) stays in L1 while all row tiles of A stream past it.
//
// Contract: N (the columns computed) is a multiple of 16, ldb and ldc are at least N, and K is
// even (callers zero-pad odd K; a zero pair contributes nothing). Accumulation is fp32; the
// order over k is fixed, so results are deterministic.
//
// At the amx_bf16 level, gemm() runs on AMX tiles (amx_dot.h) whenever A is row-major and K is
// a multiple of 32: callers that size k as a multiple of kAlignK get AMX for those products.
#pragma once

#include "amx_dot.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define LLAMA_EXT_BF16_DOT 1

#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace llama_ext::cpu::bf16_dot {

using bf16 = c10::BFloat16;

constexpr int64_t kLanes = 16;  // fp32 lanes per zmm: the column granularity
#if defined(LLAMA_EXT_AMX)
constexpr int64_t kAlignK = amx::kTileK;  // a k that fills whole AMX tiles
#else
constexpr int64_t kAlignK = kLanes;
#endif
constexpr int kTileRows = 6;
constexpr int kTileVecs = 4;

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// A(m, p) = the two bf16 at data + m * row_stride + p * pair_stride.
struct AOperand {
  const bf16* data;
  int64_t row_stride;
  int64_t pair_stride;
};

inline __m512bh broadcast_pair(const bf16* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  return (__m512bh)_mm512_set1_epi32(word);
}

// C[MR, 16 NV] (+)= A[MR, 2 k_pairs] B[2 k_pairs, 16 NV].
template <int MR, int NV>
void tile(AOperand a, const bf16* b, int64_t ldb, int64_t k_pairs, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) {
      acc[m][v] = accumulate ? _mm512_loadu_ps(c + m * ldc + v * kLanes) : _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < k_pairs; ++p) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + (p * ldb + v * kLanes) * 2);
    const bf16* a_pair = a.data + p * a.pair_stride;
    for (int m = 0; m < MR; ++m) {
      const __m512bh av = broadcast_pair(a_pair + m * a.row_stride);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], av, bv[v]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + m * ldc + v * kLanes, acc[m][v]);
  }
}

using TileFn = void (*)(AOperand, const bf16*, int64_t, int64_t, float*, int64_t, bool);

template <int MR>
constexpr TileFn tile_for_vecs(int vecs) {
  return vecs == 1 ? &tile<MR, 1> : vecs == 2 ? &tile<MR, 2> : vecs == 3 ? &tile<MR, 3> : &tile<MR, 4>;
}

inline TileFn tile_for(int rows, int vecs) {
  switch (rows) {
    case 1: return tile_for_vecs<1>(vecs);
    case 2: return tile_for_vecs<2>(vecs);
    case 3: return tile_for_vecs<3>(vecs);
    case 4: return tile_for_vecs<4>(vecs);
    case 5: return tile_for_vecs<5>(vecs);
    default: return tile_for_vecs<6>(vecs);
  }
}

// C[M, N] (+)= A[M, 2 k_pairs] B[2 k_pairs, N], B packed [k_pairs][ldb][2]; N % 16 == 0.
inline void gemm(int64_t M, int64_t N, int64_t k_pairs, AOperand a, const bf16* b, int64_t ldb, float* c, int64_t ldc,
                 bool accumulate) {
#if defined(LLAMA_EXT_AMX)
  if (a.pair_stride == 2 && k_pairs % (amx::kTileK / 2) == 0) {
    amx::gemm(M, N, k_pairs, a.data, a.row_stride, b, ldb, c, ldc, accumulate);
    return;
  }
#endif
  constexpr int64_t kPanel = kTileVecs * kLanes;
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int vecs = static_cast<int>(std::min<int64_t>(kPanel, N - n0) / kLanes);
    for (int64_t m0 = 0; m0 < M; m0 += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m0));
      const AOperand a_rows{a.data + m0 * a.row_stride, a.row_stride, a.pair_stride};
      tile_for(rows, vecs)(a_rows, b + n0 * 2, ldb, k_pairs, c + m0 * ldc + n0, ldc, accumulate);
    }
  }
}

// ---- packing ----------------------------------------------------------------------------------

// Transposes the 16 x 16 matrix of 32-bit words held in r[0..15] (row i in r[i]).
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  // Within each 128-bit lane L: after these two steps r[4g + c] holds column 4L + c of rows
  // 4g .. 4g+3.
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Gather lane L of r[c], r[4 + c], r[8 + c], r[12 + c] into output row 4L + c.
  for (int c = 0; c < 4; ++c) {
    const __m512i even01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);  // lanes 0, 2 of r[c], r[4+c]
    const __m512i odd01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);   // lanes 1, 3
    const __m512i even23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i odd23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_i32x4(even01, even23, 0x88);       // lane 0
    t[4 + c] = _mm512_shuffle_i32x4(odd01, odd23, 0x88);     // lane 1
    t[8 + c] = _mm512_shuffle_i32x4(even01, even23, 0xdd);   // lane 2
    t[12 + c] = _mm512_shuffle_i32x4(odd01, odd23, 0xdd);    // lane 3
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// B = src^T for src [rows, K] (row stride src_stride, K even): dst [K/2][ldb][2], i.e. the
// 32-bit word (src row j, pair p) goes to dst word p * ldb + j. Columns [rows, ldb) are zero;
// ldb is a multiple of 16. Moves 16 x 16 word blocks through registers: a word-by-word copy
// reads one cache line per word, with the K rows' large stride aliasing in L1.
inline void pack_transposed(const bf16* src, int64_t src_stride, int64_t rows, int64_t K, bf16* dst, int64_t ldb) {
  const int64_t pairs = K / 2;
  auto* out = reinterpret_cast<int32_t*>(dst);
  for (int64_t j0 = 0; j0 < ldb; j0 += kLanes) {
    for (int64_t p0 = 0; p0 < pairs; p0 += kLanes) {
      const int64_t block_pairs = std::min<int64_t>(kLanes, pairs - p0);
      const auto mask = static_cast<__mmask16>((1u << block_pairs) - 1);
      __m512i r[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        const int64_t j = j0 + i;
        r[i] = j < rows ? _mm512_maskz_loadu_epi32(mask, src + j * src_stride + 2 * p0) : _mm512_setzero_si512();
      }
      transpose16x16(r);
      for (int64_t c = 0; c < block_pairs; ++c) _mm512_storeu_si512(out + (p0 + c) * ldb + j0, r[c]);
    }
  }
}

// Interleaves bf16 row pairs: out[2i] = even[i], out[2i+1] = odd[i] for i < 16.
inline __m512i interleave16(__m256i even, __m256i odd) {
  const __m512i index = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(index, _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1));
}

// B = src for src [rows, N] (row stride src_stride): dst [k_pairs][ldb][2] with
// element (k, n) = src[k, n] for k < rows and n < N, zero elsewhere (k < 2 k_pairs, n < ldb).
inline void pack_row_pairs(const bf16* src, int64_t src_stride, int64_t rows, int64_t N, bf16* dst, int64_t k_pairs,
                           int64_t ldb) {
  for (int64_t p = 0; p < k_pairs; ++p) {
    const int64_t k = 2 * p;
    const bf16* even = k < rows ? src + k * src_stride : nullptr;
    const bf16* odd = k + 1 < rows ? src + (k + 1) * src_stride : nullptr;
    bf16* out = dst + p * ldb * 2;
    for (int64_t n = 0; n < ldb; n += kLanes) {
      const __mmask16 mask = n < N ? static_cast<__mmask16>((1u << std::min<int64_t>(kLanes, N - n)) - 1) : 0;
      const __m256i e = even ? _mm256_maskz_loadu_epi16(mask, even + n) : _mm256_setzero_si256();
      const __m256i o = odd ? _mm256_maskz_loadu_epi16(mask, odd + n) : _mm256_setzero_si256();
      _mm512_storeu_si512(out + n * 2, interleave16(e, o));
    }
  }
}

// Rounds fp32 rows src [rows, N] (row stride src_stride, N % 16 == 0) to bf16, row-major
// into dst (row stride dst_stride).
inline void round_rows(const float* src, int64_t src_stride, int64_t rows, int64_t N, bf16* dst, int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t n = 0; n < N; n += kLanes) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * dst_stride + n),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + r * src_stride + n)));
    }
  }
}

// Rounds fp32 rows src [rows, N] (N % 16 == 0) to bf16 in the packed-B layout over rows:
// dst [k_pairs][N][2] (k_pairs >= ceil(rows / 2)), rows past `rows` zero. As an A operand with
// strides (2, 2 N) this is src^T.
inline void round_row_pairs(const float* src, int64_t src_stride, int64_t rows, int64_t N, bf16* dst,
                            int64_t k_pairs) {
  for (int64_t k = 0; k < 2 * k_pairs; k += 2) {
    const float* even = k < rows ? src + k * src_stride : nullptr;
    const float* odd = k + 1 < rows ? src + (k + 1) * src_stride : nullptr;
    bf16* out = dst + k * N;
    for (int64_t n = 0; n < N; n += kLanes) {
      const __m512 e = even ? _mm512_loadu_ps(even + n) : _mm512_setzero_ps();
      const __m512 o = odd ? _mm512_loadu_ps(odd + n) : _mm512_setzero_ps();
      const __m256i e_bits = (__m256i)_mm512_cvtneps_pbh(e), o_bits = (__m256i)_mm512_cvtneps_pbh(o);
      _mm512_storeu_si512(out + n * 2, interleave16(e_bits, o_bits));
    }
  }
}

}  // namespace llama_ext::cpu::bf16_dot

#endif
