// Rotary position embedding on the CPU: q and k rotated in one pass.
//
// For a token at position p, each (x1, x2) pair of a head is rotated by theta = p * inv_freq[i]:
//   y1 = x1 * cos - x2 * sin,   y2 = x2 * cos + x1 * sin      (inverse: sin -> -sin)
// with the pair (i, i + rotary_dim/2) (rotate_half, Llama/NeoX) or (2i, 2i+1) (GPT-J). cos/sin
// come from a precomputed [max_position, rotary_dim/2] table row, so the kernel does no
// transcendentals: 2 FMAs + 2 multiplies per pair, in fp32 (fp64 for float64), rounded once on
// the store. Dims past rotary_dim are copied (out of place) or left alone (in place).
//
// Bytes per token: read and write (n_q_heads + n_kv_heads) * head_dim elements, plus one table row
// of cos and sin (rotary_dim * 4 bytes, L1/L2-resident). That is the minimum any out-of-place
// rotation moves, so the kernel is memory-bound. It is fast because it touches q and k exactly
// once (HF's eager code materializes rotate_half, q * cos, ...: about five q-sized temporaries),
// keeps each vector in registers between load and store, walks the rows in memory order for both
// [b, s, h, d] and HF's [b, h, s, d] layouts (see rotate_all), and spreads them over threads
// with at::parallel_for. bf16/fp16 move as whole 16-lane vectors (partial stores are far slower);
// GPT-J pairs are split into even/odd lanes with deinterleave2 so the same vector math applies.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstring>

#include "cpu_vec.h"
#include "rotary_head.h"
#include "../rotary.h"

namespace llama_ext {
namespace {

using cpu::VecIO;
using cpu::rotate_half_head;
using cpu::rotate_interleaved_head;

// One of q / k: source and destination (the same pointer in place) with their strides.
template <typename T>
struct RotaryOperand {
  const T* src;
  int64_t src_batch_stride, src_seq_stride, src_head_stride;
  T* dst;
  int64_t dst_batch_stride, dst_seq_stride, dst_head_stride;
  int64_t heads;
};

template <typename T>
struct RotaryArgs {
  using table_t = at::opmath_type<T>;
  RotaryOperand<T> q, k;
  RotaryTables<table_t> tables;
  int64_t seq, head_dim, half;
  bool copy_pass_through;  // out of place: dims past rotary_dim are copied to dst
};

// Rotates one head of one token (a "row").
template <typename T>
inline void rotate_row(const RotaryArgs<T>& a, bool interleaved, bool inverse, int64_t b, int64_t s, int64_t head) {
  const int64_t pos = a.tables.position(b, s);
  const auto* cos = a.tables.cos + pos * a.tables.cos_stride;
  const auto* sin = a.tables.sin + pos * a.tables.sin_stride;
  const bool is_q = head < a.q.heads;
  const RotaryOperand<T>& op = is_q ? a.q : a.k;
  const int64_t h = is_q ? head : head - a.q.heads;
  const T* x = op.src + b * op.src_batch_stride + s * op.src_seq_stride + h * op.src_head_stride;
  T* y = op.dst + b * op.dst_batch_stride + s * op.dst_seq_stride + h * op.dst_head_stride;
  if (interleaved) {
    rotate_interleaved_head<T>(x, y, cos, sin, a.half, inverse);
  } else {
    rotate_half_head<T>(x, y, cos, sin, a.half, inverse);
  }
  const int64_t rotary_dim = 2 * a.half;
  if (a.copy_pass_through && rotary_dim < a.head_dim) {
    std::memcpy(y + rotary_dim, x + rotary_dim, static_cast<size_t>(a.head_dim - rotary_dim) * sizeof(T));
  }
}

// Spreads the rows over threads in memory order. Token-major ([batch, seq, head], the natural
// layout of q/k projections): a token's heads are adjacent and share its cos/sin row from L1.
// Head-major ([batch, head, seq], HF's transposed views): each head streams through memory in
// order. (Tiling tokens to reuse cos/sin rows across heads measured slower: breaking the
// sequential streams costs more than re-reading the table from L2/L3.)
template <typename T>
void rotate_all(const RotaryArgs<T>& a, int64_t batch, bool head_major, bool interleaved, bool inverse) {
  const int64_t heads = a.q.heads + a.k.heads;
  const int64_t seq = a.seq;
  // Rows per task: about 16K elements, at least one row.
  const int64_t grain = std::max<int64_t>(1, 16384 / a.head_dim);
  at::parallel_for(0, batch * seq * heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (head_major) {
        rotate_row<T>(a, interleaved, inverse, row / (heads * seq), row % seq, row / seq % heads);
      } else {
        rotate_row<T>(a, interleaved, inverse, row / (heads * seq), row / heads % seq, row % heads);
      }
    }
  });
}

// Raises IndexError naming the first position outside [0, max_position).
void check_positions_in_table(const at::Tensor& positions, const RotaryGeometry& g) {
  const at::Tensor p = positions.dim() == 1 ? positions.view({1, g.seq}) : positions;
  AT_DISPATCH_INDEX_TYPES(p.scalar_type(), "check_positions_in_table", [&] {
    const index_t* data = p.const_data_ptr<index_t>();
    for (int64_t b = 0; b < p.size(0); ++b) {
      for (int64_t s = 0; s < p.size(1); ++s) {
        const int64_t pos = data[b * p.stride(0) + s * p.stride(1)];
        TORCH_CHECK_INDEX(pos >= 0 && pos < g.max_position, "positions", positions.dim() == 1 ? "" : "[b, s]",
                          " has a value ", pos, " (at batch ", b, ", seq ", s,
                          ") outside the cos/sin table of ", g.max_position, " positions");
      }
    }
  });
}

template <typename T>
RotaryOperand<T> make_operand(const at::Tensor& src, const at::Tensor& dst) {
  return {src.const_data_ptr<T>(), src.stride(0), src.stride(1), src.stride(2),
          dst.mutable_data_ptr<T>(), dst.stride(0), dst.stride(1), dst.stride(2), src.size(2)};
}

// Rotates q -> q_out and k -> k_out (q_out may be q, k_out may be k).
void rotary_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                const std::optional<at::Tensor>& positions, bool interleaved, bool inverse, const at::Tensor& q_out,
                const at::Tensor& k_out, const RotaryGeometry& g) {
  if (positions.has_value()) check_positions_in_table(*positions, g);
  if (g.tokens() == 0 || g.q_heads + g.k_heads == 0 || g.head_dim == 0) return;
  // float64 inputs compute in float64: widen float32 tables once (they are small).
  const at::ScalarType table_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor cos_t = cos.to(table_dtype), sin_t = sin.to(table_dtype);
  const bool copy_pass_through = !q_out.is_same(q);
  LLAMA_EXT_DISPATCH_FLOATING(q.scalar_type(), "apply_rotary_cpu", [&] {
    using table_t = at::opmath_type<scalar_t>;
    RotaryArgs<scalar_t> a{};
    a.q = make_operand<scalar_t>(q, q_out);
    a.k = make_operand<scalar_t>(k, k_out);
    a.tables = rotary_tables<table_t>(cos_t, sin_t, positions);
    a.seq = g.seq;
    a.head_dim = g.head_dim;
    a.half = g.half;
    a.copy_pass_through = copy_pass_through;
    const bool head_major = g.seq > 1 && q.size(2) > 1 && q.stride(1) < q.stride(2);
    rotate_all<scalar_t>(a, g.batch, head_major, interleaved, inverse);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CPU, m) {
  m.impl("apply_rotary", &apply_rotary_forward<rotary_cpu>);
  m.impl("apply_rotary_", &apply_rotary_inplace<rotary_cpu>);
}

}  // namespace llama_ext
