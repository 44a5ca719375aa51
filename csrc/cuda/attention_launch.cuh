// Host entry points of the CUDA attention kernels, called by attention.cu. Each is defined
// (and explicitly instantiated for the supported head dims and dtypes) in its own .cu so the
// files compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include "attention_common.cuh"

namespace llama_ext::cuda::attention {

// Tensor cores (T = __half / __nv_bfloat16), D in {32, 64, 80, 96, 128, 256}. Returns false,
// launching nothing, when the device lacks the kernel's shared memory (the caller falls back
// to the SIMT kernels).
template <typename T, int D>
bool launch_forward_tc(const AttentionParams& p, int batch, cudaStream_t stream);

// Tensor cores, D in {32, 64, 80, 96, 128}: dk and dv written, dq accumulated into p.dq_accum
// (fp32, zeroed by the caller, unscaled: the caller multiplies by p.scale). Needs p.delta.
// Returns false, launching nothing, when the device lacks the kernel's shared memory.
template <typename T, int D>
bool launch_backward_tc(const AttentionParams& p, int batch, int n_kv_heads, cudaStream_t stream);

// delta = rowsum(dout * out) in fp32, lse's layout. T = float / __half / __nv_bfloat16.
template <typename T>
void launch_backward_delta(const AttentionParams& p, int batch, cudaStream_t stream);

// SIMT path (T = float / __half / __nv_bfloat16, any supported head_dim at run time).
template <typename T>
void launch_forward_simt(const AttentionParams& p, int batch, cudaStream_t stream);
// Writes dq (T, contiguous in q's shape: p.dq_strides), dk and dv as final values. Needs p.delta.
template <typename T>
void launch_backward_simt(const AttentionParams& p, int batch, int n_kv_heads, void* dq, cudaStream_t stream);

}  // namespace llama_ext::cuda::attention
