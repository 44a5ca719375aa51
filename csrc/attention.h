// Grouped-query attention argument checks, shared by the CPU and CUDA implementations.
//
// Batched: q [batch, seq_q, n_q_heads, head_dim], k/v [batch, seq_k, n_kv_heads, head_dim].
// Varlen:  q [total_q, n_q_heads, head_dim], k/v [total_k, n_kv_heads, head_dim], with int32
//          cu_seqlens_q/k [batch + 1] (prefix sums of the sequence lengths, from 0 to total).
// Query head h reads kv head h / (n_q_heads / n_kv_heads). Every dim may be strided except
// the last, which must be contiguous.
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "common.h"

namespace llama_ext {

struct AttentionShape {
  int64_t batch;
  int64_t seq_q;  // batched: the sequence length; varlen: max_seqlen_q
  int64_t seq_k;  // batched: the sequence length; varlen: max_seqlen_k
  int64_t n_q_heads;
  int64_t n_kv_heads;
  int64_t head_dim;
  bool varlen;
  int64_t group() const { return n_q_heads / n_kv_heads; }
};

// Checks that cu_seqlens starts at 0, never decreases, ends at total and that no sequence is
// longer than max_seqlen. Reads the values on the host (a device sync for CUDA tensors).
inline void check_cu_seqlens_values(const at::Tensor& cu_seqlens, const char* name, int64_t total,
                                    int64_t max_seqlen, const char* max_name) {
  const at::Tensor host = cu_seqlens.to(at::kCPU).contiguous();
  const int32_t* c = host.const_data_ptr<int32_t>();
  const int64_t n = host.numel();
  TORCH_CHECK_VALUE(c[0] == 0, name, "[0] must be 0, got ", c[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(c[i] >= c[i - 1], name, " must be non-decreasing, but ", name, "[", i, "] = ", c[i], " < ",
                      name, "[", i - 1, "] = ", c[i - 1]);
    TORCH_CHECK_VALUE(c[i] - c[i - 1] <= max_seqlen, "sequence ", i - 1, " has length ", c[i] - c[i - 1],
                      " (from ", name, "), longer than ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(c[n - 1] == total, name, "[-1] must equal the number of packed tokens (", total, "), got ",
                    c[n - 1]);
}

inline AttentionShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale) {
  check_floating(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  check_same_device(k, "k", q, "q");
  check_same_device(v, "v", q, "q");
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
                    "cu_seqlens_q and cu_seqlens_k must be given together (varlen) or both be None (batched)");
  const bool varlen = cu_seqlens_q.has_value();
  const int64_t rank = varlen ? 3 : 4;
  const char* layout = varlen ? "[total_tokens, heads, head_dim]" : "[batch, seq, heads, head_dim]";
  TORCH_CHECK_VALUE(q.dim() == rank, "q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == rank, "k must be ", layout, ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the same shape as k (", k.sizes(), "), got ", v.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be a finite number > 0, got ", scale);

  AttentionShape s{};
  s.varlen = varlen;
  s.head_dim = q.size(-1);
  s.n_q_heads = q.size(-2);
  s.n_kv_heads = k.size(-2);
  TORCH_CHECK_VALUE(k.size(-1) == s.head_dim, "k's head_dim (", k.size(-1), ") must equal q's head_dim (", s.head_dim,
                    ")");
  TORCH_CHECK_VALUE(s.head_dim >= 8 && s.head_dim <= 256 && s.head_dim % 8 == 0,
                    "head_dim must be a multiple of 8 between 8 and 256, got ", s.head_dim);
  TORCH_CHECK_VALUE(s.n_kv_heads >= 1 && s.n_q_heads >= 1, "q and k need at least one head, got n_q_heads = ",
                    s.n_q_heads, ", n_kv_heads = ", s.n_kv_heads);
  TORCH_CHECK_VALUE(s.n_q_heads % s.n_kv_heads == 0, "n_q_heads (", s.n_q_heads,
                    ") must be a multiple of n_kv_heads (", s.n_kv_heads, ")");
  if (!varlen) {
    s.batch = q.size(0);
    s.seq_q = q.size(1);
    s.seq_k = k.size(1);
    TORCH_CHECK_VALUE(k.size(0) == s.batch, "k's batch size (", k.size(0), ") must equal q's (", s.batch, ")");
    return s;
  }
  const at::Tensor& cq = *cu_seqlens_q;
  const at::Tensor& ck = *cu_seqlens_k;
  TORCH_CHECK_TYPE(cq.scalar_type() == at::kInt, "cu_seqlens_q must be int32, got ", cq.scalar_type());
  TORCH_CHECK_TYPE(ck.scalar_type() == at::kInt, "cu_seqlens_k must be int32, got ", ck.scalar_type());
  check_same_device(cq, "cu_seqlens_q", q, "q");
  check_same_device(ck, "cu_seqlens_k", q, "q");
  TORCH_CHECK_VALUE(cq.dim() == 1 && cq.numel() >= 1, "cu_seqlens_q must be 1-dim [batch + 1], got shape ",
                    cq.sizes());
  TORCH_CHECK_VALUE(ck.sizes() == cq.sizes(), "cu_seqlens_k must have the shape of cu_seqlens_q (", cq.sizes(),
                    "), got ", ck.sizes());
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ",
                    max_seqlen_q, " and ", max_seqlen_k);
  check_cu_seqlens_values(cq, "cu_seqlens_q", q.size(0), max_seqlen_q, "max_seqlen_q");
  check_cu_seqlens_values(ck, "cu_seqlens_k", k.size(0), max_seqlen_k, "max_seqlen_k");
  s.batch = cq.numel() - 1;
  s.seq_q = max_seqlen_q;
  s.seq_k = max_seqlen_k;
  return s;
}

// The keys each query row sees: causal masking and the sliding window, aligned bottom-right.
// With i' = i + len_k - len_q, row i sees keys j in [key_begin(i), key_end(i)):
// i' - left <= j <= i' + right and 0 <= j < len_k; -1 leaves a side unbounded. Both bounds are
// non-decreasing in i, which lets kernels skip whole key blocks and query blocks. Shared by the
// CPU and CUDA kernels (I: int64_t on the CPU, int on CUDA, where every length is < 2^31 and
// make_key_window keeps left and right below len_q + len_k).
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

// Checks window_size and softcap (ValueError naming them) and folds causal into the window.
// Sides longer than both sequences together mean the same as unbounded ones and are clamped
// there, so the KeyWindow arithmetic never overflows.
inline KeyWindow make_key_window(const AttentionShape& s, bool causal, int64_t window_left, int64_t window_right,
                                 double softcap) {
  TORCH_CHECK_VALUE(window_left >= -1, "window_size[0] (window_left) must be -1 (unbounded) or >= 0, got ",
                    window_left);
  TORCH_CHECK_VALUE(window_right >= -1, "window_size[1] (window_right) must be -1 (unbounded) or >= 0, got ",
                    window_right);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, "softcap must be a finite number >= 0 (0: off), got ",
                    softcap);
  const int64_t longest = s.seq_q + s.seq_k;
  KeyWindow w;
  w.left = std::min(window_left, longest);
  w.right = causal ? 0 : std::min(window_right, longest);
  return w;
}

// Checks of the backward's extra tensors, after check_attention_args(q, k, v, ...) gave shape.
// lse: batched [batch, n_q_heads, seq_q], varlen [n_q_heads, total_q].
inline std::vector<int64_t> lse_shape(const at::Tensor& q, const AttentionShape& shape) {
  if (shape.varlen) return {shape.n_q_heads, q.size(0)};
  return {shape.batch, shape.n_q_heads, shape.seq_q};
}

inline void check_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                                          const at::Tensor& q, const AttentionShape& shape) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    check_same_dtype(t, name, q, "q");
    check_same_device(t, name, q, "q");
    TORCH_CHECK_VALUE(t.sizes() == q.sizes(), name, " must have q's shape (", q.sizes(), "), got ", t.sizes());
    check_last_dim_contiguous(t, name);
  }
  check_same_device(lse, "lse", q, "q");
  TORCH_CHECK_TYPE(lse.scalar_type() == stats_dtype(q.scalar_type()), "lse must be ", stats_dtype(q.scalar_type()),
                   ", got ", lse.scalar_type());
  const std::vector<int64_t> expected = lse_shape(q, shape);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(expected), "lse must have shape ", at::IntArrayRef(expected),
                    ", got ", lse.sizes());
}

}  // namespace llama_ext
