// Argument checks and dispatch shared by the CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) ops,
// so that both backends reject bad input with the same message. Exception types follow
// torch: a wrong dtype raises TypeError, a wrong shape or value ValueError, anything else
// (devices, layout) RuntimeError.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/TensorUtils.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "common_math.h"

namespace llama_ext {

// float32, float16, bfloat16 and float64. CUDA kernels reject float64 before dispatching.
#define LLAMA_EXT_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

// `what` names the argument's kind in the message: a tensor, or a dtype argument ("type").
inline void check_floating(at::ScalarType dtype, const char* name, const char* what = "tensor") {
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), name, " must be a floating-point ", what,
                   " (float32, float16, bfloat16 or float64), got ", dtype);
}

inline void check_floating(const at::Tensor& t, const char* name) { check_floating(t.scalar_type(), name); }

inline void check_cuda_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() != at::kDouble, name,
                   " is float64, which the CUDA kernels do not support (use float32, float16 or bfloat16)");
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ", ref_name,
                   " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the same shape as ", ref_name, " (", ref.sizes(),
                    "), got ", t.sizes());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-dim tensor, got ", t.dim(), " dims with shape ",
                    t.sizes());
}

// Kernels index the last dim with unit stride; every other dim may be strided.
inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must be contiguous in its last dimension (stride 1), got strides ", t.strides());
}

// ---- attention arguments: gqa_attention and gqa_attention_with_kvcache alike ----------------

// head_dim a multiple of 8 in [8, 256] (the CPU kernels' vector chunks and the CUDA kernels'
// 16-byte rows; the CUDA kernels further take only the dims of attention_launch.cuh's list), the
// same in the kv tensor, at least one head of each kind, and whole GQA groups. kv names the tensor
// that holds the kv heads ("k", "k_cache").
inline void check_attention_heads(int64_t head_dim, int64_t kv_head_dim, int64_t n_q_heads, int64_t n_kv_heads,
                                  const char* kv) {
  TORCH_CHECK_VALUE(kv_head_dim == head_dim, kv, "'s head_dim (", kv_head_dim, ") must equal q's head_dim (", head_dim,
                    ")");
  TORCH_CHECK_VALUE(head_dim >= 8 && head_dim <= 256 && head_dim % 8 == 0,
                    "head_dim must be a multiple of 8 between 8 and 256, got ", head_dim);
  TORCH_CHECK_VALUE(n_kv_heads >= 1 && n_q_heads >= 1, "q and ", kv, " need at least one head, got n_q_heads = ",
                    n_q_heads, ", n_kv_heads = ", n_kv_heads);
  TORCH_CHECK_VALUE(n_q_heads % n_kv_heads == 0, "n_q_heads (", n_q_heads, ") must be a multiple of n_kv_heads (",
                    n_kv_heads, ", ", kv, "'s heads)");
}

inline void check_attention_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be a finite number > 0, got ", scale);
}

// window_size sides: -1 (unbounded) or >= 0; softcap: finite, >= 0 (0: off).
inline void check_window_softcap(int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK_VALUE(window_left >= -1, "window_size[0] (window_left) must be -1 (unbounded) or >= 0, got ",
                    window_left);
  TORCH_CHECK_VALUE(window_right >= -1, "window_size[1] (window_right) must be -1 (unbounded) or >= 0, got ",
                    window_right);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, "softcap must be a finite number >= 0 (0: off), got ",
                    softcap);
}

// Row statistics (RMSNorm's rstd, attention's lse) are float32, float64 for float64 inputs.
inline at::ScalarType stats_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Every op allocates its outputs through this. With LLAMA_EXT_POISON_OUTPUTS=1 (the test suite
// sets it) they start as NaN, so an element a kernel forgets to write fails the comparison
// with the reference instead of passing by luck with whatever memory held.
inline at::Tensor new_output(at::Tensor t) {
  static const bool poison = [] {
    const char* v = std::getenv("LLAMA_EXT_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  if (poison && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Whether t starts 16-byte aligned and its strides over dims 0..2 are whole 16-byte vectors:
// the rows of a [batch, seq, heads, head_dim] tensor can be read as 16-byte vectors (the CUDA
// KV-cache kernels read cache rows so).
inline bool rows_in_16byte_vectors(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.stride(0) % vec == 0 &&
         t.stride(1) % vec == 0 && t.stride(2) % vec == 0;
}

// True when all leading dims of t collapse into one strided row dimension without a copy.
inline bool rows_collapse(const at::Tensor& t) {
  const int64_t cols = t.size(-1);
  const int64_t rows = cols == 0 ? 0 : t.numel() / cols;
  return at::detail::computeStride(t.sizes(), t.strides(), at::IntArrayRef{rows, cols}).has_value();
}

// t as [rows, cols] with one row stride: a view when the leading dims collapse, else a copy.
inline at::Tensor as_rows(const at::Tensor& t) {
  const int64_t cols = t.size(-1);
  const int64_t rows = cols == 0 ? 0 : t.numel() / cols;
  return rows_collapse(t) ? t.view({rows, cols}) : t.contiguous().view({rows, cols});
}

// Element offsets of strided views as sums: offset + sum_k x_k w_k over terms w_k > 0 (the dims
// of one or two views merged by |stride|), x_k in [lo_k, hi_k]. solve() says whether some choice
// of the x_k makes the sum `delta` (with `nonzero`, one with some x_k != 0), from the largest term
// down, each keeping only the x_k that leave a remainder the smaller terms can still make: for
// views of one [.., heads, d] buffer (slices of a fused qkv, transposed views) that is one or two
// candidates per term. nullopt when the search would exceed its budget of candidates.
class StrideSums {
 public:
  // An index along a dim of `size` elements of stride `stride`, counted with `sign` (+1: view a's,
  // -1: view b's); dims of one |stride| merge into one term.
  void add(int64_t size, int64_t stride, int sign) {
    if (size <= 1 || stride == 0) return;
    const bool positive = (stride > 0) == (sign > 0);
    insert(std::abs(stride), positive ? 0 : -(size - 1), positive ? size - 1 : 0);
  }
  // The difference of two indices along a dim of one view; two such dims of one |stride| make a
  // nonzero difference that sums to 0 (repeated()).
  void add_difference(int64_t size, int64_t stride) {
    if (size <= 1 || stride == 0) return;
    repeated_ |= insert(std::abs(stride), -(size - 1), size - 1);
  }
  bool repeated() const { return repeated_; }

  std::optional<bool> solve(int64_t delta, bool nonzero) {
    std::sort(terms_.begin(), terms_.end(), [](const Term& x, const Term& y) { return x.w > y.w; });
    reach_.assign(terms_.size() + 1, {0, 0});
    for (size_t k = terms_.size(); k-- > 0;) {
      reach_[k] = {reach_[k + 1].first + terms_[k].lo * terms_[k].w, reach_[k + 1].second + terms_[k].hi * terms_[k].w};
    }
    budget_ = int64_t{1} << 16;
    return search(0, delta, nonzero);
  }

 private:
  struct Term {
    int64_t w, lo, hi;
  };

  // Adds [lo, hi] to the term of weight w, or a new term; whether the term was there.
  bool insert(int64_t w, int64_t lo, int64_t hi) {
    for (Term& t : terms_) {
      if (t.w == w) {
        t.lo += lo, t.hi += hi;
        return true;
      }
    }
    terms_.push_back({w, lo, hi});
    return false;
  }

  static int64_t floor_div(int64_t x, int64_t y) { return x / y - ((x % y != 0) && ((x < 0) != (y < 0))); }

  std::optional<bool> search(size_t k, int64_t rest, bool nonzero) {
    if (k == terms_.size()) return rest == 0 && !nonzero;
    const Term& t = terms_[k];
    const auto [least, most] = reach_[k + 1];
    // x with least <= rest - x w <= most.
    const int64_t x_lo = std::max(t.lo, -floor_div(most - rest, t.w));
    const int64_t x_hi = std::min(t.hi, floor_div(rest - least, t.w));
    for (int64_t x = x_lo; x <= x_hi; ++x) {
      if (--budget_ < 0) return std::nullopt;
      const std::optional<bool> found = search(k + 1, rest - x * t.w, nonzero && x == 0);
      if (!found.has_value() || *found) return found;
    }
    return false;
  }

  std::vector<Term> terms_;
  std::vector<std::pair<int64_t, int64_t>> reach_;
  int64_t budget_ = 0;
  bool repeated_ = false;
};

// Whether some element of strided view a is one of b (offsets in elements of one size): a's index
// minus b's along each stride.
inline std::optional<bool> views_share_an_element(const at::Tensor& a, const at::Tensor& b) {
  StrideSums sums;
  for (int64_t d = 0; d < a.dim(); ++d) sums.add(a.size(d), a.stride(d), +1);
  for (int64_t d = 0; d < b.dim(); ++d) sums.add(b.size(d), b.stride(d), -1);
  return sums.solve(b.storage_offset() - a.storage_offset(), /*nonzero=*/false);
}

// Whether two elements of strided view t share an offset: a nonzero difference of indices whose
// sum over the strides is 0 (each dim's difference in [-(size - 1), size - 1]).
inline std::optional<bool> view_overlaps_itself(const at::Tensor& t) {
  StrideSums sums;
  for (int64_t d = 0; d < t.dim(); ++d) sums.add_difference(t.size(d), t.stride(d));
  if (sums.repeated()) return true;
  return sums.solve(0, /*nonzero=*/true);
}

// Tensors an op writes in place must not alias themselves (an expanded view) or each other, or
// an element would be read after it was overwritten. Non-dense views, which ATen cannot resolve,
// are resolved by view_overlaps_itself and views_share_an_element (two of one element size); what
// those cannot resolve within their budget goes unchecked, as in torch's own in-place ops.
inline void check_no_internal_overlap(const at::Tensor& t, const char* name) {
  const at::MemOverlap status = at::has_internal_overlap(t);
  const bool overlap =
      status == at::MemOverlap::Yes || (status == at::MemOverlap::TooHard && view_overlaps_itself(t).value_or(false));
  TORCH_CHECK(!overlap, name, " is written in place, so no two of its elements may share memory (an expanded or ",
              "self-overlapping view), got sizes ", t.sizes(), " and strides ", t.strides());
}

inline void check_no_overlap(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  bool overlap = status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  if (status == at::MemOverlapStatus::TooHard && a.numel() > 0 && b.numel() > 0 && a.has_storage() &&
      b.has_storage() && a.storage().is_alias_of(b.storage()) && a.element_size() == b.element_size()) {
    overlap = views_share_an_element(a, b).value_or(false);
  }
  TORCH_CHECK(!overlap, a_name, " and ", b_name,
              " overlap in memory, but one is written while the other is read: pass separate tensors");
}

}  // namespace llama_ext
