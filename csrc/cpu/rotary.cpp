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
#include "../rotary.h"

namespace llama_ext {
namespace {

using cpu::VecIO;

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
  const table_t* cos;
  const table_t* sin;
  int64_t cos_stride, sin_stride;
  const void* positions;  // null: position = seq index
  bool positions_int64;
  int64_t pos_batch_stride, pos_seq_stride;
  int64_t seq, head_dim, half;
  bool copy_pass_through;  // out of place: dims past rotary_dim are copied to dst

  int64_t position(int64_t b, int64_t s) const {
    if (positions == nullptr) return s;
    const int64_t offset = b * pos_batch_stride + s * pos_seq_stride;
    return positions_int64 ? static_cast<const int64_t*>(positions)[offset]
                           : static_cast<const int32_t*>(positions)[offset];
  }
};

// Vectorized<T>::size() elements of T as fp32 (fp64) vectors: one for float/double, two for
// half/bfloat16, whose 16-lane vectors load and store as a whole (a partial store is far slower).
template <typename T>
struct Chunk {
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  static constexpr int64_t kVecs = IO::kReduced ? 2 : 1;
  static constexpr int64_t kSize = kVecs * IO::kWidth;
  Vec v[kVecs];

  static Chunk load(const T* p) {
    Chunk c;
    if constexpr (IO::kReduced) {
      std::tie(c.v[0], c.v[1]) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    } else {
      c.v[0] = Vec::loadu(p);
    }
    return c;
  }
  void store(T* p) const {
    if constexpr (IO::kReduced) {
      at::vec::convert_from_float<T>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
};

// y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s on one vector of pairs (s already negated for inverse).
template <typename Vec>
inline std::pair<Vec, Vec> rotate(const Vec& x1, const Vec& x2, const Vec& c, const Vec& s) {
  return {at::vec::fmsub(x1, c, x2 * s), at::vec::fmadd(x2, c, x1 * s)};
}

template <typename Vec>
inline Vec load_sin(const typename Vec::value_type* p, int64_t count, bool inverse) {
  const Vec s = Vec::loadu(p, count);
  return inverse ? s.neg() : s;
}

// Rotates one head: rotate_half pairing (i, i + half). Whole chunks first, then a W-wide tail.
template <typename T>
inline void rotate_half_head(const T* src, T* dst, const at::opmath_type<T>* cos, const at::opmath_type<T>* sin,
                             int64_t half, bool inverse) {
  using C = Chunk<T>;
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  int64_t i = 0;
  for (; i + C::kSize <= half; i += C::kSize) {
    C x1 = C::load(src + i), x2 = C::load(src + half + i);
    for (int64_t j = 0; j < C::kVecs; ++j) {
      const Vec c = Vec::loadu(cos + i + j * W);
      const Vec s = load_sin<Vec>(sin + i + j * W, W, inverse);
      std::tie(x1.v[j], x2.v[j]) = rotate(x1.v[j], x2.v[j], c, s);
    }
    x1.store(dst + i);
    x2.store(dst + half + i);
  }
  for (; i < half; i += W) {
    const int64_t count = std::min(W, half - i);
    const Vec x1 = IO::load_partial(src + i, count);
    const Vec x2 = IO::load_partial(src + half + i, count);
    const auto [y1, y2] = rotate(x1, x2, Vec::loadu(cos + i, count), load_sin<Vec>(sin + i, count, inverse));
    IO::store(dst + i, y1, count);
    IO::store(dst + half + i, y2, count);
  }
}

// Rotates one head: GPT-J pairing (2i, 2i + 1). deinterleave2 splits two vectors of pairs into
// even and odd lanes, the rotation runs as above, and interleave2 puts them back.
template <typename T>
inline void rotate_interleaved_head(const T* src, T* dst, const at::opmath_type<T>* cos,
                                    const at::opmath_type<T>* sin, int64_t half, bool inverse) {
  using C = Chunk<T>;
  using IO = VecIO<T>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  int64_t i = 0;  // pair index; pairs [i, i + kSize) are elements [2i, 2i + 2 kSize): two chunks
  for (; i + C::kSize <= half; i += C::kSize) {
    C lo = C::load(src + 2 * i), hi = C::load(src + 2 * i + C::kSize);
    // Elements in float vectors, in order: lo.v[0..kVecs), hi.v[0..kVecs); vectors 2j, 2j+1 hold W pairs.
    Vec* v[2 * C::kVecs];
    for (int64_t j = 0; j < C::kVecs; ++j) v[j] = &lo.v[j], v[C::kVecs + j] = &hi.v[j];
    for (int64_t j = 0; j < C::kVecs; ++j) {
      const auto [even, odd] = at::vec::deinterleave2(*v[2 * j], *v[2 * j + 1]);
      const auto [y_even, y_odd] =
          rotate(even, odd, Vec::loadu(cos + i + j * W), load_sin<Vec>(sin + i + j * W, W, inverse));
      std::tie(*v[2 * j], *v[2 * j + 1]) = at::vec::interleave2(y_even, y_odd);
    }
    lo.store(dst + 2 * i);
    hi.store(dst + 2 * i + C::kSize);
  }
  for (; i < half; i += W) {
    const int64_t pairs = std::min(W, half - i);
    const int64_t lo_count = std::min(W, 2 * pairs);  // elements in the first vector
    const int64_t hi_count = 2 * pairs - lo_count;    // elements in the second
    const T* p = src + 2 * i;
    const Vec a = IO::load_partial(p, lo_count);
    const Vec b = hi_count > 0 ? IO::load_partial(p + W, hi_count) : Vec(0);
    const auto [even, odd] = at::vec::deinterleave2(a, b);
    const auto [y_even, y_odd] = rotate(even, odd, Vec::loadu(cos + i, pairs), load_sin<Vec>(sin + i, pairs, inverse));
    const auto [ya, yb] = at::vec::interleave2(y_even, y_odd);
    IO::store(dst + 2 * i, ya, lo_count);
    if (hi_count > 0) IO::store(dst + 2 * i + W, yb, hi_count);
  }
}

// Rotates one head of one token (a "row").
template <typename T>
inline void rotate_row(const RotaryArgs<T>& a, bool interleaved, bool inverse, int64_t b, int64_t s, int64_t head) {
  const int64_t pos = a.position(b, s);
  const auto* cos = a.cos + pos * a.cos_stride;
  const auto* sin = a.sin + pos * a.sin_stride;
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
    a.cos = cos_t.const_data_ptr<table_t>();
    a.sin = sin_t.const_data_ptr<table_t>();
    a.cos_stride = cos_t.stride(0);
    a.sin_stride = sin_t.stride(0);
    if (positions.has_value()) {
      a.positions = positions->const_data_ptr();
      a.positions_int64 = positions->scalar_type() == at::kLong;
      std::tie(a.pos_batch_stride, a.pos_seq_stride) = positions_strides(*positions);
    }
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
