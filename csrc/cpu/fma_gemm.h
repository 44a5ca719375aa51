// fp32 tile products on AVX2 FMA with pre-packed B panels, for the CPU attention forward at the
// avx2 level.
//
// Why. Below avx512_bf16 the attention forward multiplies fp32 tiles (bf16 and fp16 widened,
// exact in fp32). Through ATen's sgemm every [G*rows, d] x [d, 128] block product packs K^T or
// V again, although a key block serves every query block of its kv head; and on AMD Zen cores
// MKL's AVX2 sgemm reaches only part of the FMA rate on these small shapes. Here the policy
// packs each key block once per kv head (K^T and V as 16-column panels) and this register
// tile multiplies straight from the panels.
//
// Register tile: 6 rows x 16 columns = 12 ymm accumulators + 2 B vectors + 1 broadcast (of 16
// ymm). Per k: 2 loads of B, 6 broadcasts of A, 12 FMAs (6 cycles of the two FMA ports, 4 of
// the load ports): FMA-bound. The panel-outer loop keeps one B panel (d x 16 fp32 = 8 KB at
// d = 128) in L1 while every row tile of A streams past it from L2. FLOPs 2 M N K; bytes per
// panel: the panel once, A once.
//
// Layout. B [K, N] is packed in panels of kPanel columns: element (k, n) at
// (n / kPanel) * kPanel * ldk + k * kPanel + n % kPanel, where ldk >= K is the panel's k
// extent (a panel may hold more k than a product uses). A is row-major with row stride lda.
//
// Contract: N is a multiple of kPanel; the order over k is fixed, so results are
// deterministic. A row tile computes only its span (Span) of a product: the columns of S its
// rows see, or the k of P V where its rows' probabilities are not zero.
#pragma once

#if defined(CPU_CAPABILITY_AVX2)
#define LLAMA_EXT_FMA_GEMM 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace llama_ext::cpu::fma_gemm {

constexpr int64_t kPanel = 16;  // columns per B panel: two ymm of fp32
constexpr int kTileRows = 6;

// C[R, 16] (+)= A[R, K] B_panel[K, 16]. The accumulators are named registers, not an array:
// GCC keeps an array of __m256 on the stack and stores it every k.
template <int R>
__attribute__((always_inline)) inline void tile(const float* a, int64_t lda, const float* b, int64_t K, float* c,
                                                int64_t ldc, bool accumulate) {
  static_assert(R >= 1 && R <= kTileRows);
#define LLAMA_EXT_FMA_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define LLAMA_EXT_FMA_INIT(r)                                                   \
  __m256 lo##r = _mm256_setzero_ps(), hi##r = _mm256_setzero_ps();             \
  if constexpr (R > r) {                                                        \
    if (accumulate) {                                                           \
      lo##r = _mm256_loadu_ps(c + r * ldc);                                     \
      hi##r = _mm256_loadu_ps(c + r * ldc + 8);                                 \
    }                                                                           \
  }
#define LLAMA_EXT_FMA_STEP(r)                                                   \
  if constexpr (R > r) {                                                        \
    const __m256 x = _mm256_broadcast_ss(a + r * lda + k);                      \
    lo##r = _mm256_fmadd_ps(x, b_lo, lo##r);                                    \
    hi##r = _mm256_fmadd_ps(x, b_hi, hi##r);                                    \
  }
#define LLAMA_EXT_FMA_STORE(r)                                                  \
  if constexpr (R > r) {                                                        \
    _mm256_storeu_ps(c + r * ldc, lo##r);                                       \
    _mm256_storeu_ps(c + r * ldc + 8, hi##r);                                   \
  }
  LLAMA_EXT_FMA_ROWS(LLAMA_EXT_FMA_INIT)
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b_lo = _mm256_loadu_ps(b + k * kPanel), b_hi = _mm256_loadu_ps(b + k * kPanel + 8);
    LLAMA_EXT_FMA_ROWS(LLAMA_EXT_FMA_STEP)
  }
  LLAMA_EXT_FMA_ROWS(LLAMA_EXT_FMA_STORE)
#undef LLAMA_EXT_FMA_STORE
#undef LLAMA_EXT_FMA_STEP
#undef LLAMA_EXT_FMA_INIT
#undef LLAMA_EXT_FMA_ROWS
}

// The part of a product a row tile needs: [begin, end) of S's columns, or of P V's k (P is zero
// elsewhere in the tile's rows); begin >= end: nothing. Causal and windowed rows see only part
// of a key block, so the tiles skip what no row of theirs sees.
struct Span {
  int64_t begin, end;
};

// The union of the rows' visible [lo, hi) column ranges, per row tile of kTileRows rows.
inline void tile_spans(const std::pair<int64_t, int64_t>* rows, int64_t M, std::vector<Span>& spans) {
  spans.assign((M + kTileRows - 1) / kTileRows, Span{std::numeric_limits<int64_t>::max(), 0});
  for (int64_t r = 0; r < M; ++r) {
    if (rows[r].first >= rows[r].second) continue;
    Span& span = spans[r / kTileRows];
    span.begin = std::min(span.begin, rows[r].first);
    span.end = std::max(span.end, rows[r].second);
  }
}

// Runs tile_fn(n0, m0, rows, span) for every row tile with a non-empty span, panel by panel (n0), so that one B panel
// stays in L1 while the row tiles stream past it.
template <typename TileFn>
inline void for_each_tile(int64_t M, int64_t N, const std::vector<Span>& spans, const TileFn& tile_fn) {
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    for (int64_t m0 = 0, t = 0; m0 < M; m0 += kTileRows, ++t) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, M - m0));
      if (spans[t].begin < spans[t].end) tile_fn(n0, m0, rows, spans[t]);
    }
  }
}

// A tile of 1..kTileRows rows (fewer only for the last M % 6 rows).
inline void run_tile(int rows, const float* a, int64_t lda, const float* b, int64_t K, float* c, int64_t ldc,
                     bool accumulate) {
  switch (rows) {
    case 1: return tile<1>(a, lda, b, K, c, ldc, accumulate);
    case 2: return tile<2>(a, lda, b, K, c, ldc, accumulate);
    case 3: return tile<3>(a, lda, b, K, c, ldc, accumulate);
    case 4: return tile<4>(a, lda, b, K, c, ldc, accumulate);
    case 5: return tile<5>(a, lda, b, K, c, ldc, accumulate);
    default: return tile<kTileRows>(a, lda, b, K, c, ldc, accumulate);
  }
}

// S[M, N] = A[M, K] B[K, N] (B packed, k extent ldk; N % kPanel == 0) on the panels that meet
// each row tile's span; S's other columns are not written.
inline void gemm_visible_columns(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
                                 int64_t ldk, float* c, int64_t ldc, const std::vector<Span>& spans) {
  for_each_tile(M, N, spans, [&](int64_t n0, int64_t m0, int rows, Span span) {
    if (n0 + kPanel <= span.begin || n0 >= span.end) return;
    run_tile(rows, a + m0 * lda, lda, b + n0 * ldk, K, c + m0 * ldc + n0, ldc, /*accumulate=*/false);
  });
}

// C[M, N] += A[M, K] B[K, N] (B packed, k extent ldk; N % kPanel == 0), each row tile
// contracting over the k of its span only: A must be zero elsewhere in the tile's rows.
inline void gemm_visible_k(int64_t M, int64_t N, const float* a, int64_t lda, const float* b, int64_t ldk, float* c,
                           int64_t ldc, const std::vector<Span>& spans) {
  for_each_tile(M, N, spans, [&](int64_t n0, int64_t m0, int rows, Span span) {
    run_tile(rows, a + m0 * lda + span.begin, lda, b + n0 * ldk + span.begin * kPanel, span.end - span.begin,
             c + m0 * ldc + n0, ldc, /*accumulate=*/true);
  });
}

// ---- packing ----------------------------------------------------------------------------------

// B = src^T for fp32 src [rows, K] (row stride src_stride): panels over the rows, k extent K;
// columns [rows, round_up(rows, kPanel)) are zero.
inline void pack_transposed(const float* src, int64_t src_stride, int64_t rows, int64_t K, float* dst) {
  for (int64_t n0 = 0; n0 < rows; n0 += kPanel) {
    float* panel = dst + n0 * K;
    const int64_t width = std::min(kPanel, rows - n0);
    for (int64_t k = 0; k < K; ++k) {
      float* out = panel + k * kPanel;
      for (int64_t i = 0; i < width; ++i) out[i] = src[(n0 + i) * src_stride + k];
      std::fill(out + width, out + kPanel, 0.0f);
    }
  }
}

// B = src for fp32 src [rows, N] (row stride src_stride): panels over the columns, k extent ldk
// >= rows; columns [N, round_up(N, kPanel)) are zero, rows [rows, ldk) are left as they are.
inline void pack_rows(const float* src, int64_t src_stride, int64_t rows, int64_t N, float* dst, int64_t ldk) {
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    float* panel = dst + n0 * ldk;
    const int64_t width = std::min(kPanel, N - n0);
    for (int64_t k = 0; k < rows; ++k) {
      float* out = panel + k * kPanel;
      std::copy(src + k * src_stride + n0, src + k * src_stride + n0 + width, out);
      std::fill(out + width, out + kPanel, 0.0f);
    }
  }
}

}  // namespace llama_ext::cpu::fma_gemm

#endif
