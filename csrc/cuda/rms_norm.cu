// RMSNorm and fused residual-add + RMSNorm on CUDA.
//
// Forward: one CTA per row. Each thread loads its share of the row with 16-byte vector loads
// (8 bf16/fp16 or 4 fp32 per LDG.128) and keeps it in registers, so x (and residual) are read
// from DRAM exactly once: sum of squares -> block reduction (warp shuffles + 32 floats of
// shared memory) -> rstd -> scale, round, multiply by weight, store. Rows too wide for the
// register cache (more than 8 vectors per thread at 512 threads: 32768 bf16 or 16384 fp32) re-read the row in a second
// pass, which hits L2. Rows whose base or stride is not 16-byte aligned take the same code with
// 1-element accesses. Bytes per row: read n*(1 [+1 residual]) elements, write n (+n residual),
// plus the weight (L2-resident across rows); ~3 FLOPs per element, so the kernel is purely
// bandwidth-bound and the target is the device's copy bandwidth.
//
// Backward: a fixed grid of CTAs strides over rows. Per row: dot = sum(g*w*x) (block
// reduction), dx = rstd*g*w - x*rstd^3*dot/n (+ grad of residual_out). dweight = sum over rows
// of g*round(x*rstd) accumulates per CTA, in registers for cached rows or in that CTA's private
// fp32 row of a [grid, n] workspace otherwise, and a second kernel sums the workspace over CTAs
// in a fixed order: deterministic, no atomics.
#include <torch/library.h>
#include <ATen/ops/empty.h>

#include <limits>

#include "../rms_norm.h"
#include "common.cuh"

namespace llama_ext::cuda {
namespace {

// 512 threads x (<= 128 registers) fits the 64K-register file of every sm_80+ SM; the launch
// bounds make ptxas guarantee it, so no launch can fail for lack of registers.
constexpr int kMaxThreads = 512;
constexpr int kMaxCachedVecsFwd = 8;  // register cache per thread, forward
constexpr int kMaxCachedVecsBwd = 2;  // backward holds g, x and the dweight partials (4 spills on sm_90)

// Operands of one forward launch, each [rows, n] with its own row stride. Pointers may alias
// (in-place form: y == x, residual_out == residual), hence no __restrict__.
template <typename T>
struct FwdParams {
  const T* x;
  int64_t x_stride;
  const T* residual;  // null: plain RMSNorm
  int64_t residual_stride;
  T* residual_out;
  int64_t residual_out_stride;
  const T* weight;  // null: ones
  T* y;
  int64_t y_stride;
  float* rstd;  // null: not saved
  int64_t n;
  float eps;
};

// kWidth elements per access (16 bytes, or 1 on the unaligned path). kCache > 0: the row lives
// in registers, kCache accesses per thread at most; 0: a second pass re-reads it.
template <typename T, int kWidth, int kCache, bool kResidual>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_fwd_kernel(FwdParams<T> p) {
  using V = Vec<T, kWidth>;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = p.x + row * p.x_stride;
  const T* res = kResidual ? p.residual + row * p.residual_stride : nullptr;
  T* res_out = kResidual ? p.residual_out + row * p.residual_out_stride : nullptr;
  const int64_t n_access = p.n / kWidth;

  // Pass 1: (x + residual) rounded to T, sum of squares in fp32.
  V cache[kCache > 0 ? kCache : 1];
  float sum_sq = 0.f;
  auto load_sum = [&](int64_t a) {
    V v = V::load(x + a * kWidth);
    if constexpr (kResidual) {
      const V r = V::load(res + a * kWidth);
#pragma unroll
      for (int e = 0; e < kWidth; ++e) v.v[e] = from_float<T>(to_float(v.v[e]) + to_float(r.v[e]));
      v.store(res_out + a * kWidth);
    }
#pragma unroll
    for (int e = 0; e < kWidth; ++e) sum_sq += to_float(v.v[e]) * to_float(v.v[e]);
    return v;
  };
  if constexpr (kCache > 0) {
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const int64_t a = threadIdx.x + int64_t(i) * blockDim.x;
      if (a < n_access) cache[i] = load_sum(a);
    }
  } else {
    for (int64_t a = threadIdx.x; a < n_access; a += blockDim.x) load_sum(a);
  }
  const float rstd = rsqrtf(block_reduce_sum(sum_sq, scratch) / float(p.n) + p.eps);
  if (p.rstd != nullptr && threadIdx.x == 0) p.rstd[row] = rstd;

  // Pass 2: y = round(w * round(s * rstd)).
  T* y = p.y + row * p.y_stride;
  const T* src = kResidual ? res_out : x;  // pass 1 wrote res_out from this same thread
  auto normalize_store = [&](int64_t a, V v) {
    V out;
    if (p.weight != nullptr) {
      const V w = V::load(p.weight + a * kWidth);
#pragma unroll
      for (int e = 0; e < kWidth; ++e)
        out.v[e] = from_float<T>(round_to<T>(to_float(v.v[e]) * rstd) * to_float(w.v[e]));
    } else {
#pragma unroll
      for (int e = 0; e < kWidth; ++e) out.v[e] = from_float<T>(to_float(v.v[e]) * rstd);
    }
    out.store(y + a * kWidth);
  };
  if constexpr (kCache > 0) {
#pragma unroll
    for (int i = 0; i < kCache; ++i) {
      const int64_t a = threadIdx.x + int64_t(i) * blockDim.x;
      if (a < n_access) normalize_store(a, cache[i]);
    }
  } else {
    for (int64_t a = threadIdx.x; a < n_access; a += blockDim.x) normalize_store(a, V::load(src + a * kWidth));
  }
}

// Threads per row: about two accesses per thread, a whole number of warps, 32..kMaxThreads.
inline int threads_for(int64_t n_access) {
  const int64_t t = ceil_div(ceil_div(n_access, 2), 32) * 32;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, t)));
}

inline int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename T, bool kResidual>
void launch_fwd(const FwdParams<T>& p, int64_t rows, bool vectorizable, cudaStream_t stream) {
  constexpr int kVec = vec_elems<T>();
  if (vectorizable) {
    const int64_t n_access = p.n / kVec;
    const int threads = threads_for(n_access);
    if (ceil_div(n_access, threads) <= kMaxCachedVecsFwd) {
      rms_norm_fwd_kernel<T, kVec, kMaxCachedVecsFwd, kResidual><<<rows, threads, 0, stream>>>(p);
    } else {
      rms_norm_fwd_kernel<T, kVec, 0, kResidual><<<rows, threads, 0, stream>>>(p);
    }
  } else {
    rms_norm_fwd_kernel<T, 1, 0, kResidual><<<rows, threads_for(p.n), 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x/residual/residual_out/y are [rows, n] views; residual (and residual_out) may be undefined.
void add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& residual_out,
                       const std::optional<at::Tensor>& weight, const at::Tensor& y, const at::Tensor& rstd,
                       double eps) {
  check_cuda_dtype(x, "input");
  const int64_t rows = x.size(0);
  if (rows == 0) return;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "rms_norm: more than 2^31 - 1 rows is not supported");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LLAMA_EXT_DISPATCH_CUDA_FLOATING(x.scalar_type(), "rms_norm", [&] {
    FwdParams<scalar_t> p{};
    const int elem = sizeof(scalar_t);
    const int64_t n = x.size(1);
    p.x = const_data_ptr<scalar_t>(x);
    p.x_stride = x.stride(0);
    p.y = data_ptr<scalar_t>(y);
    p.y_stride = y.stride(0);
    p.weight = weight.has_value() ? const_data_ptr<scalar_t>(*weight) : nullptr;
    p.rstd = rstd.defined() ? data_ptr<float>(rstd) : nullptr;
    p.n = n;
    p.eps = static_cast<float>(eps);
    bool vectorizable = rows_vectorizable(p.x, p.x_stride, n, elem) && rows_vectorizable(p.y, p.y_stride, n, elem) &&
                        (p.weight == nullptr || is_aligned(p.weight, kVecBytes));
    if (residual.defined()) {
      p.residual = const_data_ptr<scalar_t>(residual);
      p.residual_stride = residual.stride(0);
      p.residual_out = data_ptr<scalar_t>(residual_out);
      p.residual_out_stride = residual_out.stride(0);
      vectorizable = vectorizable && rows_vectorizable(p.residual, p.residual_stride, n, elem) &&
                     rows_vectorizable(p.residual_out, p.residual_out_stride, n, elem);
      launch_fwd<scalar_t, true>(p, rows, vectorizable, stream);
    } else {
      launch_fwd<scalar_t, false>(p, rows, vectorizable, stream);
    }
  });
}

// ---- backward -------------------------------------------------------------------------------

template <typename T>
struct BwdParams {
  const T* grad_out;
  int64_t grad_out_stride;
  const T* x;
  int64_t x_stride;
  const T* weight;  // null: ones
  const float* rstd;
  const T* grad_residual;  // null: none
  int64_t grad_residual_stride;
  T* grad_x;
  int64_t grad_x_stride;
  float* dweight_partial;  // [gridDim.x, n] fp32, or null when dweight is not wanted
  int64_t rows;
  int64_t n;
};

template <typename T, int kWidth, int kCache>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_bwd_kernel(BwdParams<T> p) {
  using V = Vec<T, kWidth>;
  __shared__ float scratch[32];
  const int64_t n_access = p.n / kWidth;
  const float inv_n = 1.f / float(p.n);
  float* partial = p.dweight_partial != nullptr ? p.dweight_partial + blockIdx.x * p.n : nullptr;
  float dw_acc[kCache > 0 ? kCache : 1][kWidth];
  if constexpr (kCache > 0) {
#pragma unroll
    for (int i = 0; i < kCache; ++i)
#pragma unroll
      for (int e = 0; e < kWidth; ++e) dw_acc[i][e] = 0.f;
  } else if (partial != nullptr) {
    for (int64_t j = threadIdx.x; j < p.n; j += blockDim.x) partial[j] = 0.f;
    __syncthreads();  // the accumulation below maps elements to threads differently
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* g = p.grad_out + row * p.grad_out_stride;
    const T* x = p.x + row * p.x_stride;
    const float rstd = p.rstd[row];
    V g_cache[kCache > 0 ? kCache : 1], x_cache[kCache > 0 ? kCache : 1];
    float dot = 0.f;
    auto accumulate_dot = [&](const V& gv, const V& xv, int64_t a) {
      if (p.weight != nullptr) {
        const V w = V::load(p.weight + a * kWidth);
#pragma unroll
        for (int e = 0; e < kWidth; ++e) dot += to_float(gv.v[e]) * to_float(w.v[e]) * to_float(xv.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < kWidth; ++e) dot += to_float(gv.v[e]) * to_float(xv.v[e]);
      }
    };
    if constexpr (kCache > 0) {
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        const int64_t a = threadIdx.x + int64_t(i) * blockDim.x;
        if (a < n_access) {
          g_cache[i] = V::load(g + a * kWidth);
          x_cache[i] = V::load(x + a * kWidth);
          accumulate_dot(g_cache[i], x_cache[i], a);
        }
      }
    } else {
      for (int64_t a = threadIdx.x; a < n_access; a += blockDim.x)
        accumulate_dot(V::load(g + a * kWidth), V::load(x + a * kWidth), a);
    }
    const float x_coef = -rstd * rstd * rstd * block_reduce_sum(dot, scratch) * inv_n;

    T* dx = p.grad_x + row * p.grad_x_stride;
    const T* gres = p.grad_residual != nullptr ? p.grad_residual + row * p.grad_residual_stride : nullptr;
    // dx for one access; returns round(x * rstd) per element for the dweight sum through xhat.
    auto write_dx = [&](const V& gv, const V& xv, int64_t a, float (&xhat)[kWidth]) {
      V w, gr, out;
      if (p.weight != nullptr) w = V::load(p.weight + a * kWidth);
      if (gres != nullptr) gr = V::load(gres + a * kWidth);
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        const float xf = to_float(xv.v[e]);
        const float gw = p.weight != nullptr ? to_float(gv.v[e]) * to_float(w.v[e]) : to_float(gv.v[e]);
        float d = rstd * gw + x_coef * xf;
        if (gres != nullptr) d += to_float(gr.v[e]);
        out.v[e] = from_float<T>(d);
        xhat[e] = round_to<T>(xf * rstd);
      }
      out.store(dx + a * kWidth);
    };
    if constexpr (kCache > 0) {
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        const int64_t a = threadIdx.x + int64_t(i) * blockDim.x;
        if (a < n_access) {
          float xhat[kWidth];
          write_dx(g_cache[i], x_cache[i], a, xhat);
#pragma unroll
          for (int e = 0; e < kWidth; ++e) dw_acc[i][e] += to_float(g_cache[i].v[e]) * xhat[e];
        }
      }
    } else {
      for (int64_t a = threadIdx.x; a < n_access; a += blockDim.x) {
        const V gv = V::load(g + a * kWidth);
        float xhat[kWidth];
        write_dx(gv, V::load(x + a * kWidth), a, xhat);
        if (partial != nullptr) {
#pragma unroll
          for (int e = 0; e < kWidth; ++e) partial[a * kWidth + e] += to_float(gv.v[e]) * xhat[e];
        }
      }
    }
  }
  if constexpr (kCache > 0) {
    if (partial != nullptr) {
#pragma unroll
      for (int i = 0; i < kCache; ++i) {
        const int64_t a = threadIdx.x + int64_t(i) * blockDim.x;
        if (a < n_access) {
#pragma unroll
          for (int e = 0; e < kWidth; ++e) partial[a * kWidth + e] = dw_acc[i][e];
        }
      }
    }
  }
}

// dweight[j] = sum over CTAs b of partial[b, j], in order b = 0, 1, ...: deterministic.
template <typename T>
__global__ void reduce_dweight_kernel(const float* __restrict__ partial, int64_t n_partials, int64_t n,
                                      T* __restrict__ dweight) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= n) return;
  float sum = 0.f;
  for (int64_t b = 0; b < n_partials; ++b) sum += partial[b * n + j];
  dweight[j] = from_float<T>(sum);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& rstd,
                                                          const std::optional<at::Tensor>& grad_residual_out,
                                                          bool compute_grad_weight) {
  check_rms_norm_backward_args(grad_out, input, weight, rstd, grad_residual_out);
  check_cuda_dtype(input, "input");
  const bool want_dweight = compute_grad_weight && weight.has_value();
  const int64_t n = input.size(-1);
  at::Tensor grad_input = new_output(at::empty(input.sizes(), input.options()));
  at::Tensor grad_weight = new_output(at::empty({want_dweight ? n : 0}, input.options()));
  const at::Tensor x = as_rows(input), g = as_rows(grad_out), dx = as_rows(grad_input);
  const at::Tensor rstd_flat = rstd.contiguous();
  const at::Tensor gres = grad_residual_out.has_value() ? as_rows(*grad_residual_out) : at::Tensor();
  const int64_t rows = x.size(0);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (rows == 0) {
    if (want_dweight) grad_weight.zero_();
    return {grad_input, grad_weight};
  }

  LLAMA_EXT_DISPATCH_CUDA_FLOATING(input.scalar_type(), "rms_norm_backward", [&] {
    constexpr int kVec = vec_elems<scalar_t>();
    const int elem = sizeof(scalar_t);
    BwdParams<scalar_t> p{};
    p.grad_out = const_data_ptr<scalar_t>(g);
    p.grad_out_stride = g.stride(0);
    p.x = const_data_ptr<scalar_t>(x);
    p.x_stride = x.stride(0);
    p.weight = weight.has_value() ? const_data_ptr<scalar_t>(*weight) : nullptr;
    p.rstd = const_data_ptr<float>(rstd_flat);
    p.grad_x = data_ptr<scalar_t>(dx);
    p.grad_x_stride = dx.stride(0);
    p.rows = rows;
    p.n = n;
    bool vectorizable = rows_vectorizable(p.grad_out, p.grad_out_stride, n, elem) &&
                        rows_vectorizable(p.x, p.x_stride, n, elem) &&
                        rows_vectorizable(p.grad_x, p.grad_x_stride, n, elem) &&
                        (p.weight == nullptr || is_aligned(p.weight, kVecBytes));
    if (gres.defined()) {
      p.grad_residual = const_data_ptr<scalar_t>(gres);
      p.grad_residual_stride = gres.stride(0);
      vectorizable = vectorizable && rows_vectorizable(p.grad_residual, p.grad_residual_stride, n, elem);
    }
    // Two CTAs per SM stride over the rows; each owns one row of the dweight workspace.
    const int64_t grid = std::min<int64_t>(rows, 2 * sm_count(input.get_device()));
    at::Tensor partial;
    if (want_dweight) {
      partial = at::empty({grid, n}, input.options().dtype(at::kFloat));
      p.dweight_partial = data_ptr<float>(partial);
    }
    if (vectorizable) {
      const int64_t n_access = n / kVec;
      const int threads = threads_for(n_access);
      if (ceil_div(n_access, threads) <= kMaxCachedVecsBwd) {
        rms_norm_bwd_kernel<scalar_t, kVec, kMaxCachedVecsBwd><<<grid, threads, 0, stream>>>(p);
      } else {
        rms_norm_bwd_kernel<scalar_t, kVec, 0><<<grid, threads, 0, stream>>>(p);
      }
    } else {
      rms_norm_bwd_kernel<scalar_t, 1, 0><<<grid, threads_for(n), 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (want_dweight) {
      constexpr int kThreads = 256;
      reduce_dweight_kernel<scalar_t><<<ceil_div(n, kThreads), kThreads, 0, stream>>>(
          p.dweight_partial, grid, n, data_ptr<scalar_t>(grad_weight));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_input, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CUDA, m) {
  m.impl("rms_norm", &rms_norm_forward<add_rms_norm_cuda>);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_forward<add_rms_norm_cuda>);
  m.impl("fused_add_rms_norm_", &fused_add_rms_norm_inplace<add_rms_norm_cuda>);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

}  // namespace llama_ext::cuda
