// Host entry points of the CUDA attention kernels, called by attention.cu, and the one list of
// what they cover. Each is defined in its own .cu, explicitly instantiated for the dtypes below,
// so the files compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <optional>
#include <type_traits>

#include "attention_common.cuh"

// The head dims of the CUDA kernels. Every one has a tensor-core forward and backward. The
// argument check, the kernel dispatch and tests/test_attention_sass.py's expected
// instantiations all read this one list.
#define LLAMA_EXT_ATTENTION_HEAD_DIMS(X) X(32) X(64) X(80) X(96) X(128) X(256)
// The element types of the tensor-core kernels; float32 runs on the SIMT kernels only.
#define LLAMA_EXT_ATTENTION_TC_TYPES(X) X(__half) X(__nv_bfloat16)
#define LLAMA_EXT_ATTENTION_TYPES(X) X(float) LLAMA_EXT_ATTENTION_TC_TYPES(X)

namespace llama_ext::cuda::attention {

#define LLAMA_EXT_ATTENTION_LIST_ITEM(D) D,
inline constexpr std::array kHeadDims{LLAMA_EXT_ATTENTION_HEAD_DIMS(LLAMA_EXT_ATTENTION_LIST_ITEM)};
#undef LLAMA_EXT_ATTENTION_LIST_ITEM

// Returns f(std::integral_constant<int, D>{}) for the listed D equal to head_dim (which the
// argument check has already restricted to the list).
template <typename F>
bool dispatch_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
#define LLAMA_EXT_ATTENTION_HEAD_DIM_CASE(D) \
  case D:                                    \
    return f(std::integral_constant<int, D>{});
    LLAMA_EXT_ATTENTION_HEAD_DIMS(LLAMA_EXT_ATTENTION_HEAD_DIM_CASE)
#undef LLAMA_EXT_ATTENTION_HEAD_DIM_CASE
  }
  C10_THROW_ERROR(Error, c10::str("internal error: no CUDA attention kernel for head_dim ", head_dim));
}

// Tensor cores (T = __half / __nv_bfloat16). Returns false, launching nothing, when the device
// lacks the kernel's shared memory (the caller falls back to the SIMT kernels).
template <typename T>
bool launch_forward_tc(const AttentionParams& p, cudaStream_t stream);

// Tensor cores: dk and dv (p.dk, p.dv; the tensors themselves for the deterministic sum of
// the group split's partials) written, dq accumulated into p.dq_accum (fp32, zeroed by the
// caller, unscaled: the caller multiplies by p.scale). Needs p.delta. Returns false, launching
// nothing, when the device lacks the shared memory of every configuration of the head dim.
template <typename T>
bool launch_backward_tc(const AttentionParams& p, const at::Tensor& dk, const at::Tensor& dv, cudaStream_t stream);

// delta = rowsum(dout * out) in fp32, lse's layout. T = float / __half / __nv_bfloat16.
template <typename T>
void launch_backward_delta(const AttentionParams& p, cudaStream_t stream);

// SIMT path (T = float / __half / __nv_bfloat16, any listed head_dim at run time).
template <typename T>
void launch_forward_simt(const AttentionParams& p, cudaStream_t stream);
// Writes dq (p.dq: T, p.dq_strides), dk and dv as final values. Needs p.delta.
template <typename T>
void launch_backward_simt(const AttentionParams& p, cudaStream_t stream);

}  // namespace llama_ext::cuda::attention

namespace llama_ext {
struct AttentionCall;  // attention.h
struct AttentionShape;
namespace cuda {
// gqa_attention_with_kvcache's prefill route (kvcache_attention.cu), over the caches as they lie,
// with no host sync (attention.cu): the CUDA attention kernels' limits, checked before the route
// writes anything, then the forward of a checked batched call whose sequence b holds
// key_lengths[b] of k's and v's rows (device int32 [batch], each at most shape.seq_k). With a
// block_table (int32 [batch, max_blocks], its entries for each sequence's keys checked), k and v
// are paged caches [num_blocks, block_size, n_kv_heads, d] with 16-byte aligned rows.
void check_attention_limits(const at::Tensor& q, const AttentionShape& shape);
void attention_forward_on_cache(const AttentionCall& call, const int* key_lengths,
                                const std::optional<at::Tensor>& block_table);
}  // namespace cuda
}  // namespace llama_ext
