// Warp-level tensor-core building blocks for sm_80+ (inline PTX): cp.async, ldmatrix and
// mma.sync.aligned.m16n8k16 with fp32 accumulation, for __half and __nv_bfloat16.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type").
// In a warp, lane = 4 * g + t with g = lane / 4 (the "groupID", 0..7) and t = lane % 4.
//   A, 16x16 row-major, 4 x .b32 (each two 16-bit values, low half = lower column):
//     a[0] = A[g    ][2t, 2t+1]   a[1] = A[g + 8][2t, 2t+1]
//     a[2] = A[g    ][2t+8, +9]   a[3] = A[g + 8][2t+8, +9]
//   B, 16x8 (k x n), 2 x .b32:
//     b[0] = B[2t, 2t+1][g]       b[1] = B[2t+8, 2t+9][g]
//   C/D, 16x8 fp32, 4 floats:
//     c[0], c[1] = C[g][2t, 2t+1]  c[2], c[3] = C[g + 8][2t, 2t+1]
// ldmatrix.m8n8 (.x1/.x2/.x4): lane 8 * i + r supplies the shared address of row r of matrix
// i (16 contiguous bytes); lane 4 * g + t receives, in register i, row g elements 2t, 2t+1 of
// matrix i. With .trans it receives column g, rows 2t and 2t+1 instead.
// From these, two facts the kernels rely on:
//   * an accumulator pair C[g][2t, 2t+1] of n-tiles 2j and 2j+1 is exactly the A fragment of
//     k-chunk j of the same rows (pack_a_from_acc), so P never leaves registers;
//   * for B = X^T with X stored [n][k] row-major (K in Q K^T), plain ldmatrix of X's rows gives
//     b[] (row g = n, elements 2t = k); for B = X with X stored [k][n] (V in P V), ldmatrix
//     .trans of X's rows gives b[] (column g = n, rows 2t = k).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace llama_ext::cuda::mma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- cp.async (LDGSTS) ----------------------------------------------------------------------

// Copies 16 bytes global -> shared without staging in registers. When !valid, src-size 0
// makes the hardware write 16 zero bytes and read nothing (src must still be a legal
// address, callers pass the tensor's base).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `kPending` committed groups of this thread are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- ldmatrix (LDSM) --------------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

// Shared-memory tiles are row-major with `ld` elements per row (ld * 2 bytes a multiple of 16).
// Each helper computes, for the calling lane, the row address ldmatrix wants (see the header).

// A fragment of the 16x16 block at (row0, col0) of a [rows][ld] tile:
// matrices 0..3 = (rows +0..7, cols +0..7), (rows +8..15, cols +0..7), (rows +0..7, cols +8..15),
// (rows +8..15, cols +8..15), i.e. lane l addresses row row0 + l % 16, column col0 + (l / 16) * 8.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int ld, int row0, int col0, int lane) {
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * ld + col0 + (lane >> 4) * 8);
}

// B fragments of two consecutive n-tiles (n0..n0+7 and n0+8..n0+15), k-chunk k0..k0+15, for
// B = X^T with X stored [n][k] (row n = one key of K, say). Matrices: (n +0..7, k +0..7) -> b0
// of tile 0, (n +0..7, k +8..15) -> b1 of tile 0, (n +8..15, k +0..7) -> b0 of tile 1,
// (n +8..15, k +8..15) -> b1 of tile 1. Lane l addresses row n0 + l % 8 + (l / 16) * 8,
// column k0 + ((l / 8) % 2) * 8.
template <typename T>
__device__ __forceinline__ void load_b_pair_nk(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* tile, int ld, int n0,
                                               int k0, int lane) {
  uint32_t r[4];
  ldmatrix_x4(r, tile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// B fragments of two consecutive n-tiles for B = X with X stored [k][n] (row k = one key of V,
// columns = head dims), loaded transposed. Matrices: (k +0..7, n +0..7) -> b0 of tile 0,
// (k +8..15, n +0..7) -> b1 of tile 0, (k +0..7, n +8..15) -> b0 of tile 1, (k +8..15,
// n +8..15) -> b1 of tile 1. Lane l addresses row k0 + l % 16, column n0 + (l / 16) * 8.
template <typename T>
__device__ __forceinline__ void load_b_pair_kn(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* tile, int ld, int k0,
                                               int n0, int lane) {
  uint32_t r[4];
  ldmatrix_x4_trans(r, tile + (k0 + (lane & 15)) * ld + n0 + (lane >> 4) * 8);
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// One n-tile of the above (lanes 16..31 repeat the addresses of lanes 0..15, which .x2 ignores).
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[2], const T* tile, int ld, int k0, int n0, int lane) {
  ldmatrix_x2_trans(b, tile + (k0 + (lane & 15)) * ld + n0);
}

// ---- mma.sync ---------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                           const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two floats -> one .b32 of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The A fragment of k-chunk j (columns 16j..16j+15) from the fp32 accumulators of n-tiles 2j
// (`lo`) and 2j+1 (`hi`) of the same 16 rows: a[0] = C_lo[g][2t..], a[1] = C_lo[g+8][2t..],
// a[2] = C_hi[g][2t..] (= column 2t + 8 of the chunk), a[3] = C_hi[g+8][2t..].
template <typename T>
__device__ __forceinline__ void pack_a_from_acc(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// ---- warp-level GEMM ----------------------------------------------------------------------------
// One warp accumulates a 16 x (8 * kNTiles) fp32 tile, acc += A B, with A 16 x (16 * kKChunks)
// and B read from a shared tile. The accumulator layout is the C/D fragment of the header:
// acc[nt] holds n-tile nt (columns 8 nt .. 8 nt + 7). A comes one k-chunk at a time from one of
// the sources below: a shared tile, fragments already in registers, or the accumulators of a
// previous product (P from S, without leaving registers).

// A fragments of 16 rows (from row0) of a [rows][ld] shared tile.
template <typename T>
struct ATileRows {
  const T* tile;
  int ld;
  int row0;
  __device__ __forceinline__ void operator()(uint32_t (&a)[4], int kc, int lane) const {
    load_a(a, tile, ld, row0, kc * 16, lane);
  }
};

// A fragments held in registers, one per k-chunk.
template <int kKChunks>
struct ARegisters {
  const uint32_t (&frag)[kKChunks][4];
  __device__ __forceinline__ void operator()(uint32_t (&a)[4], int kc, int) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = frag[kc][i];
  }
};

// A fragments rounded to T from fp32 accumulators [2 * kKChunks][4] of the same 16 rows.
template <typename T, int kAccTiles>
struct AAccumulators {
  const float (&acc)[kAccTiles][4];
  __device__ __forceinline__ void operator()(uint32_t (&a)[4], int kc, int) const {
    pack_a_from_acc<T>(a, acc[2 * kc], acc[2 * kc + 1]);
  }
};

// acc += A X^T for X stored [n][k] in shared memory (row n is column n of B: K in Q K^T),
// n-tiles from column n0 of B. B fragments come two n-tiles per ldmatrix.x4.
template <typename T, int kKChunks, int kNTiles, typename ASource>
__device__ __forceinline__ void warp_gemm_nk(float (&acc)[kNTiles][4], const ASource& a_source, const T* x, int ld,
                                             int n0, int lane) {
  static_assert(kNTiles % 2 == 0, "B fragments of X^T are loaded in n-tile pairs");
#pragma unroll
  for (int kc = 0; kc < kKChunks; ++kc) {
    uint32_t a[4];
    a_source(a, kc, lane);
#pragma unroll
    for (int nt = 0; nt < kNTiles; nt += 2) {
      uint32_t b0[2], b1[2];
      load_b_pair_nk(b0, b1, x, ld, n0 + nt * 8, kc * 16, lane);
      mma_16x8x16<T>(acc[nt], a, b0);
      mma_16x8x16<T>(acc[nt + 1], a, b1);
    }
  }
}

// acc += A X for X stored [k][n] in shared memory (row k is row k of B: V in P V), n-tiles from
// column n0. B fragments come two n-tiles per ldmatrix.x4.trans, an odd last one by .x2.trans.
template <typename T, int kKChunks, int kNTiles, typename ASource>
__device__ __forceinline__ void warp_gemm_kn(float (&acc)[kNTiles][4], const ASource& a_source, const T* x, int ld,
                                             int n0, int lane) {
#pragma unroll
  for (int kc = 0; kc < kKChunks; ++kc) {
    uint32_t a[4];
    a_source(a, kc, lane);
#pragma unroll
    for (int nt = 0; nt + 1 < kNTiles; nt += 2) {
      uint32_t b0[2], b1[2];
      load_b_pair_kn(b0, b1, x, ld, kc * 16, n0 + nt * 8, lane);
      mma_16x8x16<T>(acc[nt], a, b0);
      mma_16x8x16<T>(acc[nt + 1], a, b1);
    }
    if constexpr (kNTiles % 2 == 1) {
      uint32_t b[2];
      load_b_kn(b, x, ld, kc * 16, n0 + (kNTiles - 1) * 8, lane);
      mma_16x8x16<T>(acc[kNTiles - 1], a, b);
    }
  }
}

}  // namespace llama_ext::cuda::mma
