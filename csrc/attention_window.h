// The sliding-window / causal key range of each query row, shared by the host checks
// (attention.h) and the CPU and CUDA kernels. Header-only and ATen-free, so device code
// includes it cheaply.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace llama_ext {

// The keys each query row sees: causal masking and the sliding window, aligned bottom-right.
// With i' = i + len_k - len_q, row i sees keys j in [key_begin(i), key_end(i)):
// i' - left <= j <= i' + right and 0 <= j < len_k; -1 leaves a side unbounded. Both bounds are
// non-decreasing in i, which lets kernels skip whole key blocks and query blocks. Shared by the
// CPU and CUDA kernels. I is int64_t on the CPU; CUDA calls the per-row bounds with int (every
// length <= 2^30, left <= seq_k and right <= seq_q, so no intermediate overflows) and the
// first_row_* block bounds with int64_t (key + left may pass 2^31).
struct KeyWindow {
  int64_t left = -1;
  int64_t right = -1;

  template <typename I>
  C10_HOST_DEVICE I key_begin(I i, I len_q, I len_k) const {
    const I ip = i + len_k - len_q;
    return left < 0 || ip <= static_cast<I>(left) ? I(0) : ip - static_cast<I>(left);
  }
  template <typename I>
  C10_HOST_DEVICE I key_end(I i, I len_q, I len_k) const {
    const I ip = i + len_k - len_q;
    const I end = right < 0 || static_cast<I>(right) >= len_k - ip ? len_k : ip + static_cast<I>(right) + 1;
    const I begin = key_begin(i, len_q, len_k);
    return end > begin ? end : begin;  // empty ranges as [begin, begin)
  }
  // The first row whose keys reach key0 or beyond (key_end > key0), in [0, len_q].
  template <typename I>
  C10_HOST_DEVICE I first_row_reaching(I key0, I len_q, I len_k) const {
    if (right < 0) return I(0);
    const I row = key0 - static_cast<I>(right) - (len_k - len_q);  // key_end(row) = key0 + 1 when unclamped
    return row < 0 ? I(0) : (row > len_q ? len_q : row);
  }
  // The first row whose keys all lie at key1 or beyond (key_begin >= key1), in [0, len_q]:
  // rows from here on see nothing of [0, key1).
  template <typename I>
  C10_HOST_DEVICE I first_row_past(I key1, I len_q, I len_k) const {
    if (left < 0) return len_q;
    const I row = key1 + static_cast<I>(left) - (len_k - len_q);  // key_begin(row) = key1 when unclamped
    return row < 0 ? I(0) : (row > len_q ? len_q : row);
  }
};

}  // namespace llama_ext
