// RMSNorm: the contract both backends share. Argument checks, output dtypes and allocation,
// [rows, n] views, the in-place fallback, and the kernel arguments (RMSNormParams,
// RMSNormBackwardParams) live here once; a backend only supplies a launcher that dispatches on
// the dtypes and runs its kernels.
//
// Numerics, per row s (x, or round(x + residual) for the fused form), in fp32 (fp64 for fp64
// input): rstd = 1 / sqrt(mean(s^2) + eps), xhat = s * rstd, w' = offset + weight (ones when
// weight is None), and
//   cast_before_weight:  y = round_out(w' * round_in(xhat))   (HF Llama, Qwen, Mistral)
//   otherwise:           y = round_out(w' * xhat)             (Gemma, OLMo 2)
// The weight is input's dtype or, with float16/bfloat16 input, float32. The output dtype is the
// one HF's module returns for those dtypes: promote(input, weight) in the first order (Llama
// multiplies the rounded value by the weight in the promoted dtype), input's dtype in the second.
#pragma once

#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common.h"

namespace llama_ext {

// ---- checks --------------------------------------------------------------------------------

inline void check_rms_norm_args(const at::Tensor& input, const std::optional<at::Tensor>& weight, double eps,
                                double offset) {
  check_floating(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 1,
                    "input must have at least 1 dimension (the hidden dim to normalize), got a 0-dim tensor");
  TORCH_CHECK_VALUE(input.size(-1) >= 1, "input's last dimension (the hidden size) must be at least 1, got shape ",
                    input.sizes());
  check_last_dim_contiguous(input, "input");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(offset), "offset must be a finite number, got ", offset);
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    const bool reduced_input = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
    TORCH_CHECK_TYPE(w.scalar_type() == input.scalar_type() || (reduced_input && w.scalar_type() == at::kFloat),
                     "weight must have the same dtype as input (", input.scalar_type(),
                     ") or, with float16/bfloat16 input, be float32; got ", w.scalar_type());
    check_same_device(w, "weight", input, "input");
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == input.size(-1), "weight must have shape [", input.size(-1),
                      "] (the hidden size of input), got ", w.sizes());
    check_last_dim_contiguous(w, "weight");
  }
}

inline void check_fused_add_rms_norm_args(const at::Tensor& input, const at::Tensor& residual,
                                          const std::optional<at::Tensor>& weight, double eps, double offset) {
  check_rms_norm_args(input, weight, eps, offset);
  check_same_dtype(residual, "residual", input, "input");
  check_same_device(residual, "residual", input, "input");
  check_same_shape(residual, "residual", input, "input");
  check_last_dim_contiguous(residual, "residual");
}

// The dtype of out (and of grad_out in the backward).
inline at::ScalarType rms_norm_out_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                         bool cast_before_weight) {
  return cast_before_weight && weight.has_value() ? c10::promoteTypes(input.scalar_type(), weight->scalar_type())
                                                  : input.scalar_type();
}

inline void check_rms_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& input,
                                         const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                         const std::optional<at::Tensor>& grad_residual_out, double offset,
                                         bool cast_before_weight) {
  check_rms_norm_args(input, weight, 0.0, offset);
  const at::ScalarType out_dtype = rms_norm_out_dtype(input, weight, cast_before_weight);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == out_dtype, "grad_out must have the forward output's dtype (", out_dtype,
                   "), got ", grad_out.scalar_type());
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

// ---- kernel arguments ----------------------------------------------------------------------
// Both backends' kernels take these. Row operands are [rows, n] with their own row strides
// (elements) and unit column stride; pointers are typed by the kernels from the dtypes.

struct RMSNormParams {
  const void* x;  // input dtype
  int64_t x_stride;
  const void* residual;  // input dtype; null: plain RMSNorm
  int64_t residual_stride;
  void* residual_out;  // input dtype, with residual; equals residual in the in-place form
  int64_t residual_out_stride;
  const void* weight;  // [n] weight dtype; null: ones
  void* y;             // out dtype; equals x in the in-place form
  int64_t y_stride;
  void* rstd;  // [rows] stats dtype; null: not saved
  int64_t rows;
  int64_t n;
  double eps;
  double offset;
  bool cast_before_weight;
  at::ScalarType dtype;  // of x, residual, residual_out
  at::ScalarType weight_dtype;
  at::ScalarType out_dtype;  // of y
};

struct RMSNormBackwardParams {
  const void* grad_out;  // out dtype
  int64_t grad_out_stride;
  const void* x;  // input dtype: the normalized rows (residual_out for the fused form)
  int64_t x_stride;
  const void* weight;  // [n] weight dtype; null: ones
  const void* rstd;    // [rows] stats dtype, contiguous
  const void* grad_residual;  // input dtype; null: none (plain RMSNorm)
  int64_t grad_residual_stride;
  void* grad_x;  // input dtype
  int64_t grad_x_stride;
  void* grad_weight;  // [n] weight dtype; null: not wanted
  int64_t rows;
  int64_t n;
  double offset;
  bool cast_before_weight;
  at::ScalarType dtype;
  at::ScalarType weight_dtype;
  at::ScalarType out_dtype;
};

// Runs f.template operator()<W, O>() with the weight and output element types that go with input
// element type T: <T, T> (weight of input's dtype) or, for a float32 weight, <float, float> or
// <float, T> as the output dtype says. Both backends dispatch the input dtype to T first.
template <typename T, typename F>
void dispatch_weight_and_out(at::ScalarType dtype, at::ScalarType weight_dtype, at::ScalarType out_dtype, F&& f) {
  if constexpr (sizeof(T) == 2) {
    if (weight_dtype != dtype) {
      if (out_dtype == at::kFloat) {
        f.template operator()<float, float>();
      } else {
        f.template operator()<float, T>();
      }
      return;
    }
  }
  f.template operator()<T, T>();
}

// ---- host side shared by both backends ---------------------------------------------------------
// A launcher runs one backend's kernels on the params (rows > 0 guaranteed); the backward one
// gets input's options for its fp32 workspace.
using RMSNormLauncher = void (*)(const RMSNormParams& p);
using RMSNormBackwardLauncher = void (*)(const RMSNormBackwardParams& p, const at::TensorOptions& options);

// rstd has the leading dims of input.
inline at::Tensor new_rstd(const at::Tensor& input) {
  return new_output(at::empty(input.sizes().slice(0, input.dim() - 1),
                              input.options().dtype(stats_dtype(input.scalar_type()))));
}

inline const void* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

// Params over [rows, n] views; residual/residual_out/rstd may be undefined.
inline RMSNormParams rms_norm_params(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& residual_out,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& y,
                                     const at::Tensor& rstd, double eps, double offset, bool cast_before_weight) {
  RMSNormParams p{};
  p.x = x.const_data_ptr();
  p.x_stride = x.stride(0);
  if (residual.defined()) {
    p.residual = residual.const_data_ptr();
    p.residual_stride = residual.stride(0);
    p.residual_out = residual_out.data_ptr();
    p.residual_out_stride = residual_out.stride(0);
  }
  p.weight = optional_data(weight);
  p.y = y.data_ptr();
  p.y_stride = y.stride(0);
  p.rstd = rstd.defined() ? rstd.data_ptr() : nullptr;
  p.rows = x.size(0);
  p.n = x.size(1);
  p.eps = eps;
  p.offset = offset;
  p.cast_before_weight = cast_before_weight;
  p.dtype = x.scalar_type();
  p.weight_dtype = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  p.out_dtype = y.scalar_type();
  return p;
}

template <RMSNormLauncher launch>
void run_rms_norm(const RMSNormParams& p, const at::Tensor& input) {
  if (p.rows == 0) return;
  const c10::OptionalDeviceGuard guard(input.device());
  launch(p);
}

// The op implementations: each backend registers these with its launchers, e.g.
// m.impl("rms_norm", &rms_norm_forward<rms_norm_cpu>).
template <RMSNormLauncher launch>
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                                    double eps, double offset, bool cast_before_weight) {
  check_rms_norm_args(input, weight, eps, offset);
  at::Tensor out = new_output(
      at::empty(input.sizes(), input.options().dtype(rms_norm_out_dtype(input, weight, cast_before_weight))));
  at::Tensor rstd = new_rstd(input);
  run_rms_norm<launch>(rms_norm_params(as_rows(input), at::Tensor(), at::Tensor(), weight, as_rows(out),
                                       rstd, eps, offset, cast_before_weight),
                       input);
  return {out, rstd};
}

template <RMSNormLauncher launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_forward(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight, double eps,
    double offset, bool cast_before_weight) {
  check_fused_add_rms_norm_args(input, residual, weight, eps, offset);
  at::Tensor out = new_output(
      at::empty(input.sizes(), input.options().dtype(rms_norm_out_dtype(input, weight, cast_before_weight))));
  at::Tensor residual_out = new_output(at::empty(input.sizes(), input.options()));
  at::Tensor rstd = new_rstd(input);
  run_rms_norm<launch>(rms_norm_params(as_rows(input), as_rows(residual), as_rows(residual_out), weight,
                                       as_rows(out), rstd, eps, offset, cast_before_weight),
                       input);
  return {out, residual_out, rstd};
}

template <RMSNormLauncher launch>
void fused_add_rms_norm_inplace(const at::Tensor& input, const at::Tensor& residual,
                                const std::optional<at::Tensor>& weight, double eps, double offset,
                                bool cast_before_weight) {
  check_fused_add_rms_norm_args(input, residual, weight, eps, offset);
  TORCH_CHECK_TYPE(rms_norm_out_dtype(input, weight, cast_before_weight) == input.scalar_type(),
                   "fused_add_rms_norm_ writes the result into input, but with cast_before_weight=True a float32 "
                   "weight makes it float32 while input is ", input.scalar_type(),
                   "; use cast_before_weight=False, a weight of input's dtype, or the out-of-place form");
  // Written tensors must not alias themselves (expanded views) or each other.
  check_no_internal_overlap(input, "input");
  check_no_internal_overlap(residual, "residual");
  check_no_overlap(input, "input", residual, "residual");
  if (rows_collapse(input) && rows_collapse(residual)) {
    const at::Tensor x = as_rows(input), res = as_rows(residual);
    run_rms_norm<launch>(rms_norm_params(x, res, res, weight, x, at::Tensor(), eps, offset, cast_before_weight),
                         input);
    return;
  }
  // Leading dims that cannot be viewed as rows: compute out of place, then write back.
  auto [out, residual_out, rstd] =
      fused_add_rms_norm_forward<launch>(input, residual, weight, eps, offset, cast_before_weight);
  residual.copy_(residual_out);
  input.copy_(out);
}

template <RMSNormBackwardLauncher launch>
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                                     const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                                     const std::optional<at::Tensor>& grad_residual_out,
                                                     bool compute_grad_weight, double offset,
                                                     bool cast_before_weight) {
  check_rms_norm_backward_args(grad_out, input, weight, rstd, grad_residual_out, offset, cast_before_weight);
  const bool want_dweight = compute_grad_weight && weight.has_value();
  const int64_t n = input.size(-1);
  at::Tensor grad_input = new_output(at::empty(input.sizes(), input.options()));
  at::Tensor grad_weight =
      new_output(at::empty({want_dweight ? n : 0}, input.options().dtype(weight ? weight->scalar_type()
                                                                                : input.scalar_type())));
  const at::Tensor x = as_rows(input), g = as_rows(grad_out), dx = as_rows(grad_input);
  const at::Tensor rstd_flat = rstd.contiguous();
  const at::Tensor gres = grad_residual_out.has_value() ? as_rows(*grad_residual_out) : at::Tensor();

  RMSNormBackwardParams p{};
  p.grad_out = g.const_data_ptr();
  p.grad_out_stride = g.stride(0);
  p.x = x.const_data_ptr();
  p.x_stride = x.stride(0);
  p.weight = optional_data(weight);
  p.rstd = rstd_flat.const_data_ptr();
  if (gres.defined()) {
    p.grad_residual = gres.const_data_ptr();
    p.grad_residual_stride = gres.stride(0);
  }
  p.grad_x = dx.data_ptr();
  p.grad_x_stride = dx.stride(0);
  p.grad_weight = want_dweight ? grad_weight.data_ptr() : nullptr;
  p.rows = x.size(0);
  p.n = n;
  p.offset = offset;
  p.cast_before_weight = cast_before_weight;
  p.dtype = input.scalar_type();
  p.weight_dtype = weight.has_value() ? weight->scalar_type() : input.scalar_type();
  p.out_dtype = grad_out.scalar_type();
  if (p.rows == 0) {
    if (want_dweight) grad_weight.zero_();
    return {grad_input, grad_weight};
  }
  const c10::OptionalDeviceGuard guard(input.device());
  launch(p, input.options());
  return {grad_input, grad_weight};
}

}  // namespace llama_ext
