// CUDA launchers of grouped-query attention (the host templates in attention.h check the
// arguments and allocate the outputs): the CUDA limits, the kernel parameters (pointers and element strides: q, k, v are read in place, any strides
// with a contiguous last dim) and the choice of kernel:
//   fp16 / bf16 forward, every supported head_dim  -> tensor cores (attention_fwd.cu)
//   fp16 / bf16 backward, every supported head_dim -> tensor cores (attention_bwd.cu)
//   float32, and any tensor-core kernel whose shared memory the device lacks (each tensor-core
//   kernel has a tile for every built arch, chosen from the device's shared memory)
//                                                  -> SIMT (attention_simt.cu)
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <c10/util/StringUtil.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../attention.h"
#include "attention_launch.cuh"

namespace llama_ext {
namespace {

using cuda::attention::AttentionParams;
using cuda::attention::Strides;

void check_cuda_attention(const at::Tensor& q, const AttentionShape& s) {
  check_cuda_dtype(q, "q");
  const auto& dims = cuda::attention::kHeadDims;
  TORCH_CHECK_VALUE(std::find(dims.begin(), dims.end(), s.head_dim) != dims.end(), "head_dim ",
                    s.head_dim, " is not supported by the CUDA attention kernels (supported: ",
                    c10::Join(", ", dims), ")");
  TORCH_CHECK_VALUE(s.batch <= 65535 && s.n_q_heads <= 65535,
                    "the CUDA attention kernels support at most 65535 sequences and 65535 query heads, got batch = ",
                    s.batch, ", n_q_heads = ", s.n_q_heads);
  // Rows and keys are int on the device, summed as i + len_k - len_q and padded to whole tiles;
  // the backward walks a group's heads x query tiles with one int.
  TORCH_CHECK_VALUE(s.seq_q <= (int64_t{1} << 30) && s.seq_k <= (int64_t{1} << 30) && s.n_q_heads * s.seq_q <= INT_MAX,
                    "the CUDA attention kernels support sequences of at most 2^30 tokens and n_q_heads x seq_q below "
                    "2^31, got seq_q = ", s.seq_q, ", seq_k = ", s.seq_k, ", n_q_heads = ", s.n_q_heads);
}

Strides strides_of(const at::Tensor& t, bool varlen) {
  if (varlen) return Strides{0, t.stride(0), t.stride(1)};
  return Strides{t.stride(0), t.stride(1), t.stride(2)};
}

// cp.async moves 16-byte chunks: the base and every (non-head_dim) stride must keep each row
// 16-byte aligned. Otherwise the kernels stage tiles through registers instead.
bool rows_aligned16(const at::Tensor& t) {
  if (!cuda::is_aligned(t.const_data_ptr(), 16)) return false;
  const int64_t chunk = 16 / t.element_size();
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.stride(i) % chunk != 0) return false;
  }
  return true;
}

// The kernels index cu_seqlens with unit stride; the caller keeps these alive past the launches.
std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

AttentionParams make_params(const AttentionCall& call, const at::Tensor& lse,
                            const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k) {
  const at::Tensor &q = call.q, &k = call.k, &v = call.v;
  const AttentionShape& s = call.shape;
  AttentionParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_strides = strides_of(q, s.varlen);
  p.k_strides = strides_of(k, s.varlen);
  p.v_strides = strides_of(v, s.varlen);
  p.lse = lse.data_ptr<float>();
  p.lse_batch = s.varlen ? 0 : lse.stride(0);
  p.lse_head = s.varlen ? lse.stride(0) : lse.stride(1);
  p.cu_seqlens_q = s.varlen ? cu_seqlens_q->const_data_ptr<int>() : nullptr;
  p.cu_seqlens_k = s.varlen ? cu_seqlens_k->const_data_ptr<int>() : nullptr;
  p.batch = static_cast<int>(s.batch);
  p.seq_q = static_cast<int>(s.seq_q);
  p.seq_k = static_cast<int>(s.seq_k);
  p.n_q_heads = static_cast<int>(s.n_q_heads);
  p.n_kv_heads = static_cast<int>(s.n_kv_heads);
  p.group = static_cast<int>(s.group());
  p.head_dim = static_cast<int>(s.head_dim);
  p.scale = static_cast<float>(call.scale);
  p.scale_log2 = static_cast<float>(call.scale * cuda::attention::kLog2e);
  // Sides past seq_k (left) or seq_q (right) reach every key already: clamped there, the
  // kernels' int arithmetic on them cannot overflow.
  p.window.left = std::min(call.window.left, s.seq_k);
  p.window.right = std::min(call.window.right, s.seq_q);
  p.softcap_log2 = static_cast<float>(call.softcap * cuda::attention::kLog2e);
  p.inv_softcap_log2 = call.softcap > 0 ? 1.f / p.softcap_log2 : 0.f;
  p.aligned16 = rows_aligned16(q) && rows_aligned16(k) && rows_aligned16(v);
  return p;
}

void attention_forward_cuda(const AttentionCall& call, const int* key_lengths,
                            const std::optional<at::Tensor>& block_table) {
  const AttentionShape& s = call.shape;
  const c10::cuda::CUDAGuard guard(call.q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto cu_q = contiguous_or_none(call.cu_seqlens_q), cu_k = contiguous_or_none(call.cu_seqlens_k);
  AttentionParams p = make_params(call, call.lse, cu_q, cu_k);
  p.key_lengths = key_lengths;
  p.out = call.out.data_ptr();
  p.out_strides = strides_of(call.out, s.varlen);
  if (block_table.has_value()) {  // k, v: [num_blocks, block_size, n_kv_heads, d]
    // The tensor-core kernel's paged loads are cp.async only (attention_fwd.cu): the route checked
    // the caches' rows.
    TORCH_INTERNAL_ASSERT(rows_aligned16(call.k) && rows_aligned16(call.v), "paged caches with unaligned rows");
    p.block_table = block_table->const_data_ptr<int>();
    p.block_table_strides[0] = block_table->stride(0);
    p.block_table_strides[1] = block_table->stride(1);
    p.block_size = static_cast<int>(call.k.size(1));
  }
  LLAMA_EXT_DISPATCH_CUDA_FLOATING(call.q.scalar_type(), "gqa_attention_forward", [&] {
    bool launched = false;
    if constexpr (!std::is_same_v<scalar_t, float>) launched = cuda::attention::launch_forward_tc<scalar_t>(p, stream);
    if (!launched) cuda::attention::launch_forward_simt<scalar_t>(p, stream);
  });
}

void attention_backward_cuda(const AttentionCall& call) {
  const AttentionShape& s = call.shape;
  const c10::cuda::CUDAGuard guard(call.q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lse = call.lse.contiguous();  // the kernels index lse rows with unit stride
  at::Tensor delta = at::empty_like(lse);
  const auto cu_q = contiguous_or_none(call.cu_seqlens_q), cu_k = contiguous_or_none(call.cu_seqlens_k);
  AttentionParams p = make_params(call, lse, cu_q, cu_k);
  p.dout = call.grad_out.const_data_ptr();
  p.dout_strides = strides_of(call.grad_out, s.varlen);
  p.fwd_out = call.out.const_data_ptr();
  p.fwd_out_strides = strides_of(call.out, s.varlen);
  p.aligned16 = p.aligned16 && rows_aligned16(call.grad_out);
  p.delta = delta.data_ptr<float>();
  p.dq_strides = strides_of(call.dq, s.varlen);
  p.dk = call.dk.data_ptr();
  p.dv = call.dv.data_ptr();
  p.dk_strides = strides_of(call.dk, s.varlen);
  p.dv_strides = strides_of(call.dv, s.varlen);
  LLAMA_EXT_DISPATCH_CUDA_FLOATING(call.q.scalar_type(), "gqa_attention_backward", [&] {
    cuda::attention::launch_backward_delta<scalar_t>(p, stream);
    bool launched = false;
    if constexpr (!std::is_same_v<scalar_t, float>) {
      // dq is summed over key blocks with fp32 atomics (see attention_bwd.cu), then scaled.
      at::Tensor dq_accum = at::zeros(call.q.sizes(), call.q.options().dtype(at::kFloat));
      p.dq_accum = dq_accum.data_ptr<float>();
      launched = cuda::attention::launch_backward_tc<scalar_t>(p, call.dk, call.dv, stream);
      if (launched) call.dq.copy_(dq_accum.mul_(call.scale));
    }
    if (!launched) {
      p.dq = call.dq.data_ptr();
      cuda::attention::launch_backward_simt<scalar_t>(p, stream);
    }
  });
}

void attention_forward_cuda(const AttentionCall& call) { attention_forward_cuda(call, nullptr, std::nullopt); }

}  // namespace

void cuda::check_attention_limits(const at::Tensor& q, const AttentionShape& shape) { check_cuda_attention(q, shape); }

void cuda::attention_forward_on_cache(const AttentionCall& call, const int* key_lengths,
                                      const std::optional<at::Tensor>& block_table) {
  attention_forward_cuda(call, key_lengths, block_table);
}

TORCH_LIBRARY_IMPL(llama_ext, CUDA, m) {
  m.impl("gqa_attention_forward", &gqa_attention_forward<check_cuda_attention, attention_forward_cuda>);
  m.impl("gqa_attention_backward", &gqa_attention_backward<check_cuda_attention, attention_backward_cuda>);
}

}  // namespace llama_ext
