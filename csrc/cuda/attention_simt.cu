// Grouped-query attention on CUDA cores (SIMT): the path for float32 inputs (no fp32 tensor
// core op is exact enough to match a float32 reference), and for the backward at head_dim 256
// in fp16 / bf16 (whose dK + dV rows do not fit the tensor-core kernel's registers).
//
// Algorithm. One warp per row, the row's head_dim spread over the lanes (lane l holds dims
// l, l + 32, ..., up to 8 slots for head_dim 256), fp32 math whatever the storage type:
//   forward: one query row; for each key it sees (the row's causal / sliding-window range) the
//            dot product q.k is reduced across the warp, capped under a logit softcap, then
//            the same online softmax as the tensor-core kernel (base 2, running max and sum,
//            O rescaled) accumulates O in registers. Over a paged KV cache (kPaged:
//            gqa_attention_with_kvcache's prefill-shaped calls in float32, or where the device
//            has no tensor-core tile) each key's row comes through the block table (paged_key).
//   dq:      one query row; P and dS are recomputed per key from lse and delta, dq += dS k
//            (dS times 1 - t^2 under softcap).
//   dk, dv:  one key row; it loops over every query head of its group and every query that
//            sees the key, dv += P dO and dk += dS q, so the group sum happens in registers and
//            nothing is written twice (deterministic, no atomics).
// It shares AttentionParams, the sequence/stride offsets, the mask and softcap helpers with the
// tensor-core kernels (attention_common.cuh), so both paths mask and index identically.
//
// Cost. The same FLOPs as the tensor-core kernels (plus a second score recompute in the
// backward) at CUDA-core rate, with a 5-step shuffle reduction per dot product and K/V read
// from L2 by every row: correct and memory-light (O(sequence)), not fast.
//
// Resources (ptxas -v, CUDA 13.0, sm_80; 128 threads, no shared memory, no spills): forward 56
// registers, contiguous or paged (9 CTAs = 36 warps per SM), dq 56-62 (8-9 CTAs), dk/dv 91 (5 CTAs).
#include "attention_launch.cuh"

namespace llama_ext::cuda::attention {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kSlots = 8;  // head_dim <= 256 = 8 slots x 32 lanes

// Lane `lane` holds dims lane + 32 * i of a row, zero past head_dim.
template <typename T>
__device__ __forceinline__ void load_row(float (&dst)[kSlots], const T* row, int head_dim, int lane, float mul = 1.f) {
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int d = lane + 32 * i;
    dst[i] = d < head_dim ? to_float(row[d]) * mul : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_row(T* row, const float (&src)[kSlots], int head_dim, int lane, float mul) {
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) row[d] = from_float<T>(src[i] * mul);
  }
}

// The dot product of a register row with a global row, summed over the warp (all lanes get it).
template <typename T>
__device__ __forceinline__ float dot_row(const float (&x)[kSlots], const T* row, int head_dim, int lane) {
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) sum += x[i] * to_float(row[d]);
  }
  return warp_reduce(sum);
}

// P = exp2(capped s2 - lse2) of a base-2 score s2; slope = d capped / d s2 (1 without softcap).
__device__ __forceinline__ float probability(float s2, float lse2, const AttentionParams& p, float& slope) {
  if (p.softcap_log2 > 0.f) {
    const float th = softcap_tanh(s2, p);
    slope = 1.f - th * th;
    return exp2f(p.softcap_log2 * th - lse2);
  }
  slope = 1.f;
  return exp2f(s2 - lse2);
}

// kPaged: k and v are a paged KV cache (gqa_attention_with_kvcache's prefill route), each key's
// row found through the sequence's row of the block table, whose entries below len_k the route
// checked on the device.
template <typename T, bool kPaged>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) attention_forward_simt_kernel(const AttentionParams p) {
  const auto [b, head, row, lane] = warp_row<kWarpsPerBlock>();
  const Seq seq = sequence(p, b);
  if (row >= seq.len_q) return;
  const int kv_head = head / p.group;
  // The sequence's key 0, or with kPaged the kv head's element 0 in cache block 0.
  const T* k = static_cast<const T*>(p.k) +
               (kPaged ? kv_head * p.k_strides.head : offset(p.k_strides, b, seq.start_k, 0, kv_head));
  const T* v = static_cast<const T*>(p.v) +
               (kPaged ? kv_head * p.v_strides.head : offset(p.v_strides, b, seq.start_k, 0, kv_head));
  const int* pages = kPaged ? p.block_table + b * p.block_table_strides[0] : nullptr;

  float q[kSlots], o[kSlots] = {};
  load_row(q, static_cast<const T*>(p.q) + offset(p.q_strides, b, seq.start_q, row, head), p.head_dim, lane,
           p.scale_log2);
  float row_max = -INFINITY, row_sum = 0.f;
  const int key_hi = key_end(row, seq, p.window);
  for (int j = key_begin(row, seq, p.window); j < key_hi; ++j) {
    int64_t k_at = j * p.k_strides.row, v_at = j * p.v_strides.row;
    if constexpr (kPaged) {
      const PagedKey at = paged_key(pages, p, j);
      k_at = paged_offset(p.k_strides, at);
      v_at = paged_offset(p.v_strides, at);
    }
    const float s = capped_score(dot_row(q, k + k_at, p.head_dim, lane), p);
    const float new_max = fmaxf(row_max, s);
    const float alpha = exp2f(row_max - new_max);  // 0 for the first key (row_max = -inf)
    const float pj = exp2f(s - new_max);
    row_sum = row_sum * alpha + pj;
    const T* v_row = v + v_at;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int d = lane + 32 * i;
      o[i] = o[i] * alpha + (d < p.head_dim ? pj * to_float(v_row[d]) : 0.f);
    }
    row_max = new_max;
  }
  // A row that sees no key (row_sum 0) gets output 0 and lse 0, as in the tensor-core kernel; a
  // NaN score (row_sum NaN) makes both NaN.
  const bool saw_keys = row_sum != 0.f;
  store_row(static_cast<T*>(p.out) + offset(p.out_strides, b, seq.start_q, row, head), o, p.head_dim, lane,
            saw_keys ? 1.f / row_sum : 0.f);
  if (lane == 0) {
    p.lse[lse_offset(p, b, seq, row, head)] = saw_keys ? (row_max + __log2f(row_sum)) / kLog2e : 0.f;
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) attention_backward_dq_simt_kernel(const AttentionParams p) {
  const auto [b, head, row, lane] = warp_row<kWarpsPerBlock>();
  const Seq seq = sequence(p, b);
  if (row >= seq.len_q) return;
  const int kv_head = head / p.group;
  const T* k = static_cast<const T*>(p.k) + offset(p.k_strides, b, seq.start_k, 0, kv_head);
  const T* v = static_cast<const T*>(p.v) + offset(p.v_strides, b, seq.start_k, 0, kv_head);

  float q[kSlots], dout[kSlots], acc[kSlots] = {};
  load_row(q, static_cast<const T*>(p.q) + offset(p.q_strides, b, seq.start_q, row, head), p.head_dim, lane,
           p.scale_log2);
  load_row(dout, static_cast<const T*>(p.dout) + offset(p.dout_strides, b, seq.start_q, row, head), p.head_dim,
           lane);
  const int64_t at = lse_offset(p, b, seq, row, head);
  const float lse2 = p.lse[at] * kLog2e;
  const float delta = p.delta[at];
  const int key_hi = key_end(row, seq, p.window);
  for (int j = key_begin(row, seq, p.window); j < key_hi; ++j) {
    const T* k_row = k + j * p.k_strides.row;
    float slope;
    const float pj = probability(dot_row(q, k_row, p.head_dim, lane), lse2, p, slope);
    const float ds = pj * (dot_row(dout, v + j * p.v_strides.row, p.head_dim, lane) - delta) * slope;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int d = lane + 32 * i;
      if (d < p.head_dim) acc[i] += ds * to_float(k_row[d]);
    }
  }
  store_row(static_cast<T*>(p.dq) + offset(p.dq_strides, b, seq.start_q, row, head), acc, p.head_dim, lane, p.scale);
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) attention_backward_dkdv_simt_kernel(const AttentionParams p) {
  const auto [b, kv_head, key, lane] = warp_row<kWarpsPerBlock>();
  const Seq seq = sequence(p, b);
  if (key >= seq.len_k) return;

  float k[kSlots], v[kSlots], dk[kSlots] = {}, dv[kSlots] = {};
  load_row(k, static_cast<const T*>(p.k) + offset(p.k_strides, b, seq.start_k, key, kv_head), p.head_dim, lane,
           p.scale_log2);
  load_row(v, static_cast<const T*>(p.v) + offset(p.v_strides, b, seq.start_k, key, kv_head), p.head_dim, lane);
  // The queries that see the key: [query_begin, query_end), as both window bounds are monotone.
  const int query_begin = first_query_reaching(key, seq, p.window);
  const int query_end = first_query_past(key + 1, seq, p.window);
  for (int head = kv_head * p.group; head < (kv_head + 1) * p.group; ++head) {
    const T* q = static_cast<const T*>(p.q) + offset(p.q_strides, b, seq.start_q, 0, head);
    const T* dout = static_cast<const T*>(p.dout) + offset(p.dout_strides, b, seq.start_q, 0, head);
    for (int i = query_begin; i < query_end; ++i) {
      const int64_t at = lse_offset(p, b, seq, i, head);
      const T* q_row = q + i * p.q_strides.row;
      const T* do_row = dout + i * p.dout_strides.row;
      float slope;
      const float pi = probability(dot_row(k, q_row, p.head_dim, lane), p.lse[at] * kLog2e, p, slope);
      const float ds = pi * (dot_row(v, do_row, p.head_dim, lane) - p.delta[at]) * slope;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const int d = lane + 32 * s;
        if (d < p.head_dim) {
          dv[s] += pi * to_float(do_row[d]);
          dk[s] += ds * to_float(q_row[d]);
        }
      }
    }
  }
  store_row(static_cast<T*>(p.dk) + offset(p.dk_strides, b, seq.start_k, key, kv_head), dk, p.head_dim, lane,
            p.scale);
  store_row(static_cast<T*>(p.dv) + offset(p.dv_strides, b, seq.start_k, key, kv_head), dv, p.head_dim, lane, 1.f);
}

}  // namespace

template <typename T>
void launch_forward_simt(const AttentionParams& p, cudaStream_t stream) {
  const dim3 grid = warp_row_grid<kWarpsPerBlock>(p.seq_q, p.n_q_heads, p.batch);
  if (grid_empty(grid)) return;
  const auto kernel = p.block_table != nullptr ? attention_forward_simt_kernel<T, true>
                                               : attention_forward_simt_kernel<T, false>;
  kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_backward_simt(const AttentionParams& p, cudaStream_t stream) {
  const dim3 dq_grid = warp_row_grid<kWarpsPerBlock>(p.seq_q, p.n_q_heads, p.batch);
  if (!grid_empty(dq_grid)) {
    attention_backward_dq_simt_kernel<T><<<dq_grid, kWarpsPerBlock * 32, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const dim3 dkdv_grid = warp_row_grid<kWarpsPerBlock>(p.seq_k, p.n_kv_heads, p.batch);
  if (!grid_empty(dkdv_grid)) {
    attention_backward_dkdv_simt_kernel<T><<<dkdv_grid, kWarpsPerBlock * 32, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define LLAMA_EXT_INSTANTIATE_SIMT(T)                                     \
  template void launch_forward_simt<T>(const AttentionParams&, cudaStream_t); \
  template void launch_backward_simt<T>(const AttentionParams&, cudaStream_t);
LLAMA_EXT_ATTENTION_TYPES(LLAMA_EXT_INSTANTIATE_SIMT)
#undef LLAMA_EXT_INSTANTIATE_SIMT

}  // namespace llama_ext::cuda::attention
