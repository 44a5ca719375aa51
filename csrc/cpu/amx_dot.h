// bf16 x bf16 -> fp32 tile products on AMX (TDPBF16PS), for the amx_bf16 CPU level.
//
// Why. On CPUs with AMX (Intel Sapphire Rapids and later) one TDPBF16PS multiplies a
// [16, 32] bf16 tile by a [32, 16] one into a [16, 16] fp32 tile: 16384 FLOPs per instruction,
// issued every 16 cycles, so ~1024 FLOP/cycle against 64 for VDPBF16PS on one port. ATen's own
// bf16 matmul and SDPA use AMX on these CPUs (through oneDNN), so without it the attention
// kernel would run at a fraction of the machine's bf16 rate.
//
// Numerics: as VDPBF16PS (bf16_dot.h): products of bf16 pairs accumulated in fp32, bf16
// subnormal inputs read as zero, round to nearest even. The order over k is fixed.
//
// Layout. The same operands as bf16_dot::gemm, restricted to what a tile load reads:
//  - A [M, K] row-major (row stride lda elements): an A tile is 16 rows x 32 bf16 (64 bytes).
//  - B packed "VNNI" [K/2][ldb][2] (bf16_dot.h): a B tile is 16 pairs of k x 16 columns, one
//    64-byte row per pair, rows ldb pairs apart.
//  - C [M, N] fp32 (row stride ldc): a C tile is 16 rows x 16 columns.
// Register blocking: C blocks of up to 32 x 32 in tmm0-3 (row tile i, column tile j in
// tmm 2i + j), A row tiles in tmm4-5, B column tiles in tmm6-7; per 32 k: 4 tile loads and
// 4 TDPBF16PS. Row tails are tiles configured with fewer rows (a tile load or store touches
// only its configured rows), so A and C need no padding rows.
//
// Contract: K % 32 == 0 (callers pad k with zeros), N % 16 == 0, ldb >= N, ldc >= N.
// The process must hold the OS permission for AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM,
// requested by csrc/module.cpp before this level is chosen).
#pragma once

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define LLAMA_EXT_AMX 1

#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

namespace llama_ext::cpu::amx {

using bf16 = c10::BFloat16;

constexpr int64_t kTileRows = 16;   // rows of an A or C tile
constexpr int64_t kTileK = 32;      // k per A tile row (64 bytes of bf16)
constexpr int64_t kTileCols = 16;   // fp32 columns of a C tile
constexpr int64_t kTileBytes = 64;  // bytes per tile row

// The LDTILECFG operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// LDTILECFG with the whole 64-byte configuration as its operand. GCC 12's _tile_loadconfig
// declares only the first 8 bytes as read, so the compiler may drop the stores of the rows and
// bytes per row of a local configuration as dead (it does once configure() is constant-folded):
// the tiles are then unconfigured and the first tile instruction raises SIGILL.
inline void load_config(const TileConfig& config) { __asm__ volatile("ldtilecfg %0" : : "m"(config)); }

// Configures the tiles for a block of row tiles with rows0 and rows1 rows (rows1 = 0: one row
// tile; its tiles stay unconfigured and unused).
inline void configure(int rows0, int rows1) {
  TileConfig config;
  const int rows[2] = {rows0, rows1};
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      config.rows[2 * i + j] = static_cast<uint8_t>(rows[i]);  // C
      config.bytes_per_row[2 * i + j] = rows[i] ? kTileBytes : 0;
    }
    config.rows[4 + i] = static_cast<uint8_t>(rows[i]);  // A
    config.bytes_per_row[4 + i] = rows[i] ? kTileBytes : 0;
    config.rows[6 + i] = kTileK / 2;  // B: one row per pair of k
    config.bytes_per_row[6 + i] = kTileBytes;
  }
  load_config(config);
}

// C[MT row tiles, NT column tiles] (+)= A B over K = 2 k_pairs (tile numbers are immediates,
// hence the template).
template <int MT, int NT>
void block(const bf16* a, int64_t lda, const bf16* b, int64_t ldb, int64_t k_pairs, float* c, int64_t ldc,
           bool accumulate) {
  const int64_t a_stride = lda * static_cast<int64_t>(sizeof(bf16));
  const int64_t b_stride = ldb * 2 * static_cast<int64_t>(sizeof(bf16));
  const int64_t c_stride = ldc * static_cast<int64_t>(sizeof(float));
  float* c1 = c + kTileRows * ldc;  // second row tile
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    if constexpr (NT == 2) _tile_loadd(1, c + kTileCols, c_stride);
    if constexpr (MT == 2) _tile_loadd(2, c1, c_stride);
    if constexpr (MT == 2 && NT == 2) _tile_loadd(3, c1 + kTileCols, c_stride);
  } else {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  }
  // Each load is issued just before the first product that needs it, so that products start
  // while the later tiles load, and the next step's first loads wait only on early products.
  for (int64_t p = 0; p < k_pairs; p += kTileK / 2) {
    const bf16* a_k = a + 2 * p;
    const bf16* b_k = b + p * ldb * 2;
    _tile_loadd(4, a_k, a_stride);
    _tile_loadd(6, b_k, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) {
      _tile_loadd(7, b_k + kTileCols * 2, b_stride);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MT == 2) {
      _tile_loadd(5, a_k + kTileRows * lda, a_stride);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_stride);
  if constexpr (NT == 2) _tile_stored(1, c + kTileCols, c_stride);
  if constexpr (MT == 2) _tile_stored(2, c1, c_stride);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, c1 + kTileCols, c_stride);
}

// C[M, N] (+)= A[M, 2 k_pairs] B[2 k_pairs, N]; see the contract above.
inline void gemm(int64_t M, int64_t N, int64_t k_pairs, const bf16* a, int64_t lda, const bf16* b, int64_t ldb,
                 float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kBlockRows = 2 * kTileRows, kBlockCols = 2 * kTileCols;
  int configured[2] = {-1, -1};
  for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
    const int rows0 = static_cast<int>(std::min(kTileRows, M - m0));
    const int rows1 = static_cast<int>(std::clamp<int64_t>(M - m0 - kTileRows, 0, kTileRows));
    if (rows0 != configured[0] || rows1 != configured[1]) {
      configure(rows0, rows1);
      configured[0] = rows0;
      configured[1] = rows1;
    }
    const bf16* a_rows = a + m0 * lda;
    float* c_rows = c + m0 * ldc;
    for (int64_t n0 = 0; n0 < N; n0 += kBlockCols) {
      const bool two_cols = N - n0 >= kBlockCols;
      const bf16* b_cols = b + n0 * 2;
      if (rows1 > 0) {
        (two_cols ? &block<2, 2> : &block<2, 1>)(a_rows, lda, b_cols, ldb, k_pairs, c_rows + n0, ldc, accumulate);
      } else {
        (two_cols ? &block<1, 2> : &block<1, 1>)(a_rows, lda, b_cols, ldb, k_pairs, c_rows + n0, ldc, accumulate);
      }
    }
  }
  // Leaves the thread without tile state: a context switch then saves no 8 KB of tiles, and
  // other AMX code (oneDNN) configures its own.
  _tile_release();
}

}  // namespace llama_ext::cpu::amx

#endif
