// RMSNorm and fused residual-add + RMSNorm on the CPU.
//
// Forward, per row of n elements: (optionally s = round(x + residual), written out) then
// one pass for sum(s^2), rstd = 1/sqrt(sum/n + eps), and one pass writing
// y = round(w * round(s * rstd)). The row is read from memory once: the second pass hits L1/L2
// (a 4096-wide bf16 row is 8 KB). Bytes: read n*(1 [+1 residual]) + n weight (cached),
// write n (+n residual_out). FLOPs are negligible; the kernel is memory-bound.
//
// Backward, per row: dot = sum(g * w * x), dx = rstd * g * w - x * rstd^3 * dot / n
// (+ grad_residual_out), and dweight partial sums g * round(x * rstd) accumulated in fp32
// per fixed chunk of rows, then reduced over chunks in order: deterministic for any thread
// count. Rows are spread over threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

#include "cpu_vec.h"
#include "../rms_norm.h"

namespace llama_ext {
namespace {

using cpu::VecIO;

// Rows per parallel task: enough elements to amortize the task, at least one row.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// Row pointers with their strides; a null pointer means the operand is absent.
template <typename T>
struct RowsArgs {
  const T* x;                // [rows, n] input
  int64_t x_stride;
  const T* residual;         // [rows, n] or null
  int64_t residual_stride;
  T* residual_out;           // [rows, n] or null (with residual)
  int64_t residual_out_stride;
  const T* weight;           // [n] or null (ones)
  T* y;                      // [rows, n]
  int64_t y_stride;
  at::opmath_type<T>* rstd;  // [rows] or null
  int64_t n;
  double eps;
};

template <typename T>
void add_rms_norm_rows(const RowsArgs<T>& a, int64_t row_begin, int64_t row_end) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  const int64_t n = a.n;
  const int64_t n_vec = n - n % W;
  for (int64_t r = row_begin; r < row_end; ++r) {
    // src is the row that gets normalized: x itself, or round(x + residual) stored first.
    const T* src = a.x + r * a.x_stride;
    Vec sum_sq(acc_t(0));
    if (a.residual != nullptr) {
      const T* res = a.residual + r * a.residual_stride;
      T* res_out = a.residual_out + r * a.residual_out_stride;
      int64_t j = 0;
      for (; j < n_vec; j += W) {
        Vec s = IO::round(IO::load(src + j) + IO::load(res + j));
        IO::store(res_out + j, s);
        sum_sq = at::vec::fmadd(s, s, sum_sq);
      }
      if (j < n) {
        Vec s = IO::round(IO::load_partial(src + j, n - j) + IO::load_partial(res + j, n - j));
        IO::store(res_out + j, s, n - j);
        sum_sq = at::vec::fmadd(s, s, sum_sq);
      }
      src = res_out;
    } else {
      // Four independent accumulators hide the FMA latency; their sum order is fixed.
      Vec acc1(acc_t(0)), acc2(acc_t(0)), acc3(acc_t(0));
      int64_t j = 0;
      for (; j + 4 * W <= n; j += 4 * W) {
        const Vec v0 = IO::load(src + j), v1 = IO::load(src + j + W);
        const Vec v2 = IO::load(src + j + 2 * W), v3 = IO::load(src + j + 3 * W);
        sum_sq = at::vec::fmadd(v0, v0, sum_sq);
        acc1 = at::vec::fmadd(v1, v1, acc1);
        acc2 = at::vec::fmadd(v2, v2, acc2);
        acc3 = at::vec::fmadd(v3, v3, acc3);
      }
      for (; j < n_vec; j += W) {
        const Vec v = IO::load(src + j);
        sum_sq = at::vec::fmadd(v, v, sum_sq);
      }
      if (j < n) {
        const Vec v = IO::load_partial(src + j, n - j);
        sum_sq = at::vec::fmadd(v, v, sum_sq);
      }
      sum_sq = (sum_sq + acc1) + (acc2 + acc3);
    }
    const acc_t mean_sq = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, sum_sq) / acc_t(n);
    const acc_t rstd = acc_t(1) / std::sqrt(mean_sq + static_cast<acc_t>(a.eps));
    if (a.rstd != nullptr) a.rstd[r] = rstd;

    T* y = a.y + r * a.y_stride;
    const Vec rstd_v(rstd);
    int64_t j = 0;
    // Branch-free full-width loops; the weight test is hoisted out of them.
    if (a.weight != nullptr) {
      for (; j < n_vec; j += W) IO::store(y + j, IO::round(IO::load(src + j) * rstd_v) * IO::load(a.weight + j));
    } else {
      for (; j < n_vec; j += W) IO::store(y + j, IO::load(src + j) * rstd_v);
    }
    if (j < n) {
      Vec h = IO::round(IO::load_partial(src + j, n - j) * rstd_v);
      if (a.weight != nullptr) h = h * IO::load_partial(a.weight + j, n - j);
      IO::store(y + j, h, n - j);
    }
  }
}

template <typename T>
void launch_add_rms_norm(const RowsArgs<T>& args, int64_t rows) {
  at::parallel_for(0, rows, row_grain(args.n),
                   [&](int64_t begin, int64_t end) { add_rms_norm_rows<T>(args, begin, end); });
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// Runs the forward on [rows, n] views; residual/residual_out/rstd may be undefined.
void add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& residual_out,
                      const std::optional<at::Tensor>& weight, const at::Tensor& y, const at::Tensor& rstd,
                      double eps) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.size(0);
  LLAMA_EXT_DISPATCH_FLOATING(x.scalar_type(), "add_rms_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RowsArgs<scalar_t> args{};
    args.x = x.const_data_ptr<scalar_t>();
    args.x_stride = x.stride(0);
    if (residual.defined()) {
      args.residual = residual.const_data_ptr<scalar_t>();
      args.residual_stride = residual.stride(0);
      args.residual_out = residual_out.mutable_data_ptr<scalar_t>();
      args.residual_out_stride = residual_out.stride(0);
    }
    args.weight = optional_ptr<scalar_t>(weight);
    args.y = y.mutable_data_ptr<scalar_t>();
    args.y_stride = y.stride(0);
    args.rstd = rstd.defined() ? rstd.mutable_data_ptr<acc_t>() : nullptr;
    args.n = n;
    args.eps = eps;
    launch_add_rms_norm<scalar_t>(args, rows);
  });
}

// ---- backward -------------------------------------------------------------------------------

// A fixed number of row chunks (not the thread count) keeps the dweight sum order, and so its
// bits, independent of how many threads run.
constexpr int64_t kWeightGradChunks = 32;

template <typename T>
struct BackwardArgs {
  const T* grad_out;                   // [rows, n]
  int64_t grad_out_stride;
  const T* x;                          // [rows, n]
  int64_t x_stride;
  const T* weight;                     // [n] or null
  const at::opmath_type<T>* rstd;      // [rows]
  const T* grad_residual;              // [rows, n] or null
  int64_t grad_residual_stride;
  T* grad_x;                           // [rows, n]
  int64_t grad_x_stride;
  int64_t n;
};

template <typename T>
void rms_norm_backward_rows(const BackwardArgs<T>& a, int64_t row_begin, int64_t row_end,
                            at::opmath_type<T>* dweight_partial /* [n] or null */) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  const int64_t n = a.n;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* g = a.grad_out + r * a.grad_out_stride;
    const T* x = a.x + r * a.x_stride;
    const acc_t rstd = a.rstd[r];
    Vec dot(acc_t(0));
    for (int64_t j = 0; j < n; j += W) {
      const int64_t count = std::min(W, n - j);
      const bool full = count == W;
      Vec gw = full ? IO::load(g + j) : IO::load_partial(g + j, count);
      if (a.weight != nullptr) gw = gw * (full ? IO::load(a.weight + j) : IO::load_partial(a.weight + j, count));
      dot = at::vec::fmadd(gw, full ? IO::load(x + j) : IO::load_partial(x + j, count), dot);
    }
    const acc_t dot_sum = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, dot);
    const Vec rstd_v(rstd);
    const Vec x_coef(-rstd * rstd * rstd * dot_sum / acc_t(n));
    T* dx = a.grad_x + r * a.grad_x_stride;
    const T* gres = a.grad_residual != nullptr ? a.grad_residual + r * a.grad_residual_stride : nullptr;
    for (int64_t j = 0; j < n; j += W) {
      const int64_t count = std::min(W, n - j);
      const bool full = count == W;
      const Vec gv = full ? IO::load(g + j) : IO::load_partial(g + j, count);
      const Vec xv = full ? IO::load(x + j) : IO::load_partial(x + j, count);
      Vec gw = gv;
      if (a.weight != nullptr) gw = gw * (full ? IO::load(a.weight + j) : IO::load_partial(a.weight + j, count));
      Vec d = at::vec::fmadd(xv, x_coef, gw * rstd_v);
      if (gres != nullptr) d = d + (full ? IO::load(gres + j) : IO::load_partial(gres + j, count));
      IO::store(dx + j, d, count);
      if (dweight_partial != nullptr) {
        const Vec acc = Vec::loadu(dweight_partial + j, count);
        at::vec::fmadd(gv, IO::round(xv * rstd_v), acc).store(dweight_partial + j, count);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                         const std::optional<at::Tensor>& weight,
                                                         const at::Tensor& rstd,
                                                         const std::optional<at::Tensor>& grad_residual_out,
                                                         bool compute_grad_weight) {
  check_rms_norm_backward_args(grad_out, input, weight, rstd, grad_residual_out);
  const bool want_dweight = compute_grad_weight && weight.has_value();
  const int64_t n = input.size(-1);
  at::Tensor grad_input = new_output(at::empty(input.sizes(), input.options()));
  at::Tensor grad_weight = new_output(at::empty({want_dweight ? n : 0}, input.options()));
  const at::Tensor x = as_rows(input), g = as_rows(grad_out), dx = as_rows(grad_input);
  const at::Tensor rstd_flat = rstd.contiguous();
  const at::Tensor gres = grad_residual_out.has_value() ? as_rows(*grad_residual_out) : at::Tensor();
  const int64_t rows = x.size(0);

  LLAMA_EXT_DISPATCH_FLOATING(input.scalar_type(), "rms_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> args{};
    args.grad_out = g.const_data_ptr<scalar_t>();
    args.grad_out_stride = g.stride(0);
    args.x = x.const_data_ptr<scalar_t>();
    args.x_stride = x.stride(0);
    args.weight = optional_ptr<scalar_t>(weight);
    args.rstd = rstd_flat.const_data_ptr<acc_t>();
    if (gres.defined()) {
      args.grad_residual = gres.const_data_ptr<scalar_t>();
      args.grad_residual_stride = gres.stride(0);
    }
    args.grad_x = dx.mutable_data_ptr<scalar_t>();
    args.grad_x_stride = dx.stride(0);
    args.n = n;
    if (!want_dweight) {
      at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
        rms_norm_backward_rows<scalar_t>(args, begin, end, nullptr);
      });
      return;
    }
    const int64_t chunks = std::max<int64_t>(1, std::min(rows, kWeightGradChunks));
    const int64_t rows_per_chunk = rows == 0 ? 0 : (rows + chunks - 1) / chunks;
    at::Tensor partial = at::zeros({chunks, n}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
    // Small inputs stay on one thread: a task gets at least row_grain(n) rows' worth of chunks.
    const int64_t chunk_grain = std::max<int64_t>(1, row_grain(n) / std::max<int64_t>(1, rows_per_chunk));
    at::parallel_for(0, chunks, chunk_grain, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t r0 = std::min(rows, c * rows_per_chunk);
        const int64_t r1 = std::min(rows, r0 + rows_per_chunk);
        rms_norm_backward_rows<scalar_t>(args, r0, r1, partial_ptr + c * n);
      }
    });
    scalar_t* dw = grad_weight.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        acc_t sum = 0;
        for (int64_t c = 0; c < chunks; ++c) sum += partial_ptr[c * n + j];
        dw[j] = static_cast<scalar_t>(sum);
      }
    });
  });
  return {grad_input, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CPU, m) {
  m.impl("rms_norm", &rms_norm_forward<add_rms_norm_cpu>);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_forward<add_rms_norm_cpu>);
  m.impl("fused_add_rms_norm_", &fused_add_rms_norm_inplace<add_rms_norm_cpu>);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace llama_ext
