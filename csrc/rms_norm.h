// RMSNorm argument checks, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <tuple>

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
  TORCH_CHECK_TYPE(rstd.scalar_type() == stats_dtype(input.scalar_type()), "rstd must be ",
                   stats_dtype(input.scalar_type()), ", got ", rstd.scalar_type());
  if (grad_residual_out.has_value()) {
    check_same_dtype(*grad_residual_out, "grad_residual_out", input, "input");
    check_same_device(*grad_residual_out, "grad_residual_out", input, "input");
    check_same_shape(*grad_residual_out, "grad_residual_out", input, "input");
    check_last_dim_contiguous(*grad_residual_out, "grad_residual_out");
  }
}


// ---- host side shared by both backends --------------------------------------------------------
// Checks, output allocation, [rows, n] views and the in-place fallback are the same on CPU and
// CUDA; only the kernel launch differs. A launcher runs one backend's forward kernel on [rows, n]
// views: residual and residual_out are both defined or both undefined, rstd may be undefined.
using AddRmsNormLauncher = void (*)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& residual_out,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& y,
                                    const at::Tensor& rstd, double eps);

// rstd has the leading dims of input.
inline at::Tensor new_rstd(const at::Tensor& input) {
  return new_output(at::empty(input.sizes().slice(0, input.dim() - 1),
                              input.options().dtype(stats_dtype(input.scalar_type()))));
}

// The op implementations: each backend registers these with its launcher, e.g.
// m.impl("rms_norm", &rms_norm_forward<add_rms_norm_cpu>).
template <AddRmsNormLauncher launch>
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                                    double eps) {
  check_rms_norm_args(input, weight, eps);
  at::Tensor out = new_output(at::empty(input.sizes(), input.options()));
  at::Tensor rstd = new_rstd(input);
  launch(as_rows(input), at::Tensor(), at::Tensor(), weight, as_rows(out), rstd, eps);
  return {out, rstd};
}

template <AddRmsNormLauncher launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_forward(const at::Tensor& input,
                                                                          const at::Tensor& residual,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          double eps) {
  check_fused_add_rms_norm_args(input, residual, weight, eps);
  at::Tensor out = new_output(at::empty(input.sizes(), input.options()));
  at::Tensor residual_out = new_output(at::empty(input.sizes(), input.options()));
  at::Tensor rstd = new_rstd(input);
  launch(as_rows(input), as_rows(residual), as_rows(residual_out), weight, as_rows(out), rstd, eps);
  return {out, residual_out, rstd};
}

template <AddRmsNormLauncher launch>
void fused_add_rms_norm_inplace(const at::Tensor& input, const at::Tensor& residual,
                                const std::optional<at::Tensor>& weight, double eps) {
  check_fused_add_rms_norm_args(input, residual, weight, eps);
  // Written tensors must not alias themselves (expanded views) or each other.
  at::assert_no_internal_overlap(input);
  at::assert_no_internal_overlap(residual);
  at::assert_no_overlap(input, residual);
  if (rows_collapse(input) && rows_collapse(residual)) {
    const at::Tensor x = as_rows(input), res = as_rows(residual);
    launch(x, res, res, weight, x, at::Tensor(), eps);
    return;
  }
  // Leading dims that cannot be viewed as rows: compute out of place, then write back.
  auto [out, residual_out, rstd] = fused_add_rms_norm_forward<launch>(input, residual, weight, eps);
  residual.copy_(residual_out);
  input.copy_(out);
}

}  // namespace llama_ext
