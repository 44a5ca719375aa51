// Rotary position embedding argument checks and geometry, shared by the CPU and CUDA
// implementations.
#pragma once

#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace llama_ext {

// Sizes of one apply_rotary call. q is [batch, seq, q_heads, head_dim], k is
// [batch, seq, k_heads, head_dim], cos/sin are [max_position, half], rotary_dim = 2 * half.
struct RotaryGeometry {
  int64_t batch;
  int64_t seq;
  int64_t q_heads;
  int64_t k_heads;
  int64_t head_dim;
  int64_t half;
  int64_t max_position;
  int64_t tokens() const { return batch * seq; }
};

// Checks everything that does not need the values of `positions` (whose range the CPU checks on
// the host and CUDA with a device-side assert) and returns the geometry.
inline RotaryGeometry check_rotary_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                        const at::Tensor& sin, const std::optional<at::Tensor>& positions) {
  check_floating(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_device(k, "k", q, "q");
  check_same_device(cos, "cos", q, "q");
  check_same_device(sin, "sin", q, "q");
  check_dim(q, "q", 4);
  check_dim(k, "k", 4);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
                    "k must be [batch, seq, n_kv_heads, head_dim] with the batch, seq and head_dim of q ",
                    q.sizes(), ", got ", k.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");

  // float32 tables for every q dtype; float64 q may also take float64 tables (gradcheck).
  const bool table_dtype_ok =
      cos.scalar_type() == at::kFloat || (cos.scalar_type() == at::kDouble && q.scalar_type() == at::kDouble);
  TORCH_CHECK_TYPE(table_dtype_ok, "cos must be float32 (or float64 when q is float64), got ", cos.scalar_type(),
                   " with q ", q.scalar_type());
  check_same_dtype(sin, "sin", cos, "cos");
  check_dim(cos, "cos", 2);
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "sin must have the same shape as cos (", cos.sizes(), "), got ",
                    sin.sizes());
  check_last_dim_contiguous(cos, "cos");
  check_last_dim_contiguous(sin, "sin");

  RotaryGeometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), cos.size(1), cos.size(0)};
  TORCH_CHECK_VALUE(g.half >= 1 && 2 * g.half <= g.head_dim,
                    "cos/sin must be [max_position, rotary_dim / 2] with 2 <= rotary_dim <= head_dim (", g.head_dim,
                    "), got cos of shape ", cos.sizes());

  if (positions.has_value()) {
    const at::Tensor& p = *positions;
    TORCH_CHECK_TYPE(p.scalar_type() == at::kInt || p.scalar_type() == at::kLong,
                     "positions must be int32 or int64, got ", p.scalar_type());
    check_same_device(p, "positions", q, "q");
    const bool shape_ok = (p.dim() == 1 && p.size(0) == g.seq) ||
                          (p.dim() == 2 && p.size(0) == g.batch && p.size(1) == g.seq);
    TORCH_CHECK_VALUE(shape_ok, "positions must be [batch, seq] = [", g.batch, ", ", g.seq, "] or [seq] = [", g.seq,
                      "], got ", p.sizes());
  } else {
    TORCH_CHECK_INDEX(g.seq == 0 || g.seq <= g.max_position, "positions (None, i.e. 0..", g.seq - 1,
                      ") are out of range for the cos/sin table of ", g.max_position, " positions");
  }
  return g;
}

// Strides of positions as [batch, seq] (batch stride 0 for a [seq] tensor).
inline std::pair<int64_t, int64_t> positions_strides(const at::Tensor& positions) {
  return positions.dim() == 1 ? std::pair<int64_t, int64_t>{0, positions.stride(0)}
                              : std::pair<int64_t, int64_t>{positions.stride(0), positions.stride(1)};
}

// The cos/sin tables and positions of one call as both backends' kernels read them. Table is
// float (float64 on the CPU for float64 q).
template <typename Table>
struct RotaryTables {
  const Table* cos;
  const Table* sin;
  int64_t cos_stride, sin_stride;
  const void* positions;  // null: position = seq index
  bool positions_int64;
  int64_t pos_batch_stride, pos_seq_stride;

  C10_HOST_DEVICE int64_t position(int64_t b, int64_t s) const {
    if (positions == nullptr) return s;
    const int64_t offset = b * pos_batch_stride + s * pos_seq_stride;
    return positions_int64 ? static_cast<const int64_t*>(positions)[offset]
                           : static_cast<const int32_t*>(positions)[offset];
  }
};

template <typename Table>
RotaryTables<Table> rotary_tables(const at::Tensor& cos, const at::Tensor& sin,
                                  const std::optional<at::Tensor>& positions) {
  RotaryTables<Table> t{cos.const_data_ptr<Table>(), sin.const_data_ptr<Table>(), cos.stride(0), sin.stride(0),
                        nullptr, false, 0, 0};
  if (positions.has_value()) {
    t.positions = positions->const_data_ptr();
    t.positions_int64 = positions->scalar_type() == at::kLong;
    std::tie(t.pos_batch_stride, t.pos_seq_stride) = positions_strides(*positions);
  }
  return t;
}

// ---- host side shared by both backends --------------------------------------------------------
// A launcher rotates q and k into q_out and k_out (which may be q and k themselves).
using RotaryLauncher = void (*)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved,
                                bool inverse, const at::Tensor& q_out, const at::Tensor& k_out,
                                const RotaryGeometry& g);

// The op implementations: each backend registers these with its launcher, e.g.
// m.impl("apply_rotary", &apply_rotary_forward<rotary_cpu>).
template <RotaryLauncher launch>
std::tuple<at::Tensor, at::Tensor> apply_rotary_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                        const at::Tensor& sin,
                                                        const std::optional<at::Tensor>& positions, bool interleaved,
                                                        bool inverse) {
  const RotaryGeometry g = check_rotary_args(q, k, cos, sin, positions);
  // Outputs keep the inputs' layout (empty_like): HF's transposed views stay transposed.
  at::Tensor q_out = new_output(at::empty_like(q));
  at::Tensor k_out = new_output(at::empty_like(k));
  launch(q, k, cos, sin, positions, interleaved, inverse, q_out, k_out, g);
  return {q_out, k_out};
}

template <RotaryLauncher launch>
void apply_rotary_inplace(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                          const std::optional<at::Tensor>& positions, bool interleaved, bool inverse) {
  const RotaryGeometry g = check_rotary_args(q, k, cos, sin, positions);
  // Written tensors must not alias themselves (expanded views) or each other.
  check_no_internal_overlap(q, "q");
  check_no_internal_overlap(k, "k");
  check_no_overlap(q, "q", k, "k");
  launch(q, k, cos, sin, positions, interleaved, inverse, q, k, g);
}

}  // namespace llama_ext
