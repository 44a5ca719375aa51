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

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "common_math.h"

namespace llama_ext {

// float32, float16, bfloat16 and float64. CUDA kernels reject float64 before dispatching.
#define LLAMA_EXT_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
                   t.scalar_type());
}

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

// Tensors an op writes in place must not alias themselves (an expanded view) or each other, or
// an element would be read after it was overwritten. Views ATen cannot resolve (non-dense ones
// of one buffer) go unchecked, as in torch's own in-place ops.
inline void check_no_internal_overlap(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              " is written in place, so no two of its elements may share memory (an expanded view), got strides ",
              t.strides());
}

inline void check_no_overlap(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, a_name, " and ", b_name,
              " overlap in memory, but one is written while the other is read: pass separate tensors");
}

}  // namespace llama_ext
