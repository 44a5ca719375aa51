// RMSNorm argument checks, shared by the CPU and CUDA implementations.
#pragma once

#include <cmath>
#include <optional>

#include "common.h"

namespace llama_ext {

inline void check_rms_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& weight, double eps) {
  check_floating(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1,
                    "input must have at least 1 dimension (the hidden dim to normalize), got a 0-dim tensor");
  TORCH_CHECK_VALUE(input.size(-1) >= 1, "input's last dimension (the hidden size) must be at least 1, got shape ",
                    input.sizes());
  check_last_dim_contiguous(input, "input");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", eps);
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    check_same_dtype(w, "weight", input, "input");
    check_same_device(w, "weight", input, "input");
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == input.size(-1), "weight must have shape [", input.size(-1),
                      "] (the hidden size of input), got ", w.sizes());
    check_last_dim_contiguous(w, "weight");
  }
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the same shape as ", ref_name, " (", ref.sizes(),
                    "), got ", t.sizes());
}

inline void check_fused_add_rms_norm_args(const at::Tensor& input, const at::Tensor& residual,
                                          const std::optional<at::Tensor>& weight, double eps) {
  check_rms_norm_args(input, weight, eps);
  check_same_dtype(residual, "residual", input, "input");
  check_same_device(residual, "residual", input, "input");
  check_same_shape(residual, "residual", input, "input");
  check_last_dim_contiguous(residual, "residual");
}

inline void check_rms_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                         const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                         const std::optional<at::Tensor>& grad_residual_out) {
  check_rms_norm_args(input, weight, 0.0);
  check_same_dtype(grad_out, "grad_out", input, "input");
  check_same_device(grad_out, "grad_out", input, "input");
  check_same_shape(grad_out, "grad_out", input, "input");
  check_last_dim_contiguous(grad_out, "grad_out");
  TORCH_CHECK_VALUE(rstd.numel() * input.size(-1) == input.numel(), "rstd must hold one value per row of input (",
                    input.numel() / input.size(-1), "), got shape ", rstd.sizes());
  check_same_device(rstd, "rstd", input, "input");
  if (grad_residual_out.has_value()) {
    check_same_dtype(*grad_residual_out, "grad_residual_out", input, "input");
    check_same_device(*grad_residual_out, "grad_residual_out", input, "input");
    check_same_shape(*grad_residual_out, "grad_residual_out", input, "input");
    check_last_dim_contiguous(*grad_residual_out, "grad_residual_out");
  }
}

// rstd is float32 for every input dtype except float64 (gradcheck), where it is float64.
inline at::ScalarType rstd_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace llama_ext
