// Attention against a KV cache (decode), argument checks and the host side shared by the CPU
// (csrc/cpu/kvcache_attention.cpp) and CUDA (csrc/cuda/kvcache_attention.cu) kernels.
//
// q [batch, seq_q, n_q_heads, d]; k_cache/v_cache [batch, capacity, n_kv_heads, d] or, paged,
// [num_blocks, block_size, n_kv_heads, d] with an int32 block_table [batch, max_blocks] naming
// the cache block of each block_size tokens of a sequence; int32 cache_seqlens [batch] counts the
// tokens already cached. Optional k/v [batch, seq_new, n_kv_heads, d] are first written (k
// rotated when rotary tables are given) at positions cache_seqlens[b] .. cache_seqlens[b] +
// seq_new - 1; then q (rotated at positions cache_seqlens[b] + i) attends over the first
// L_b = cache_seqlens[b] + seq_new tokens, the causal mask and the window aligned bottom-right
// (query i sits at position i' = i + L_b - seq_q). cache_seqlens is not advanced.
#pragma once

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "common.h"

namespace llama_ext {

struct KVCacheAttentionParams {
  at::Tensor q, k_cache, v_cache, cache_seqlens;
  std::optional<at::Tensor> k, v, block_table, rotary_cos, rotary_sin;
  at::Tensor out;  // [batch, seq_q, n_q_heads, d], q's dtype, contiguous
  at::Tensor lse;  // [batch, n_q_heads, seq_q], float32 (float64 for float64 q)
  int64_t batch, seq_q, seq_new, n_q_heads, n_kv_heads, head_dim;
  bool paged;
  int64_t num_blocks;   // paged: blocks in the cache; contiguous: batch
  int64_t block_size;   // paged: tokens per block; contiguous: capacity
  int64_t max_blocks;   // paged: block_table columns; contiguous: 1
  int64_t capacity;     // tokens a sequence can hold: max_blocks * block_size
  bool causal;
  double scale;
  int64_t window_left, window_right;  // -1: unbounded; causal forces window_right = 0
  double softcap;                     // 0: off
  int64_t rotary_half;                // 0: no rotary
  int64_t rotary_positions;           // rows of the rotary tables
  bool rotary_interleaved;
  int64_t group() const { return n_q_heads / n_kv_heads; }
  bool has_new() const { return k.has_value(); }
};

// Everything that does not need tensor values. The values (cache_seqlens + seq_new within the
// capacity, block_table entries within the cache, rotary positions within the table) are
// checked by the CPU launcher before it writes and by device-side asserts on CUDA.
inline KVCacheAttentionParams check_kvcache_attention_args(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& block_table, bool causal, double scale,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
    int64_t window_left, int64_t window_right, double softcap) {
  check_floating(q, "q");
  check_same_dtype(k_cache, "k_cache", q, "q");
  check_same_dtype(v_cache, "v_cache", q, "q");
  check_same_device(k_cache, "k_cache", q, "q");
  check_same_device(v_cache, "v_cache", q, "q");
  check_same_device(cache_seqlens, "cache_seqlens", q, "q");
  check_dim(q, "q", 4);
  check_dim(k_cache, "k_cache", 4);
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache (", k_cache.sizes(),
                    "), got ", v_cache.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  check_attention_scale(scale);
  check_window_softcap(window_left, window_right, softcap);

  KVCacheAttentionParams p{};
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.cache_seqlens = cache_seqlens;
  p.k = k;
  p.v = v;
  p.block_table = block_table;
  p.rotary_cos = rotary_cos;
  p.rotary_sin = rotary_sin;
  p.batch = q.size(0);
  p.seq_q = q.size(1);
  p.n_q_heads = q.size(2);
  p.head_dim = q.size(3);
  p.n_kv_heads = k_cache.size(2);
  p.causal = causal;
  p.scale = scale;
  p.softcap = softcap;
  p.window_left = window_left;
  p.window_right = causal ? 0 : window_right;
  p.rotary_interleaved = rotary_interleaved;

  check_attention_heads(p.head_dim, k_cache.size(3), p.n_q_heads, p.n_kv_heads, "k_cache");

  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ",
                   cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == p.batch,
                    "cache_seqlens must be [batch] = [", p.batch, "], got shape ", cache_seqlens.sizes());

  p.paged = block_table.has_value();
  if (p.paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK_TYPE(bt.scalar_type() == at::kInt, "block_table must be int32, got ", bt.scalar_type());
    check_same_device(bt, "block_table", q, "q");
    TORCH_CHECK_VALUE(bt.dim() == 2 && bt.size(0) == p.batch, "block_table must be [batch, max_blocks] with batch ",
                      p.batch, ", got shape ", bt.sizes());
    p.num_blocks = k_cache.size(0);
    p.block_size = k_cache.size(1);
    p.max_blocks = bt.size(1);
    TORCH_CHECK_VALUE(p.block_size >= 1, "a paged k_cache needs block_size >= 1, got shape ", k_cache.sizes());
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == p.batch, "k_cache must be [batch, capacity, n_kv_heads, head_dim] with q's "
                      "batch ", p.batch, " (or pass block_table for a paged cache), got shape ", k_cache.sizes());
    p.num_blocks = p.batch;
    p.block_size = k_cache.size(1);
    p.max_blocks = 1;
  }
  p.capacity = p.max_blocks * p.block_size;
  // A window side longer than the capacity plus the query tokens already reaches every key: clamped
  // there (as make_key_window does for gqa_attention), the kernels' window arithmetic never overflows.
  p.window_left = std::min(p.window_left, p.capacity + p.seq_q);
  p.window_right = std::min(p.window_right, p.capacity + p.seq_q);

  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), "k and v must be given together (new tokens) or both be None");
  p.seq_new = 0;
  if (k.has_value()) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*k, "k"}, {*v, "v"}}) {
      check_same_dtype(t, name, q, "q");
      check_same_device(t, name, q, "q");
      check_dim(t, name, 4);
      TORCH_CHECK_VALUE(t.size(0) == p.batch && t.size(2) == p.n_kv_heads && t.size(3) == p.head_dim, name,
                        " must be [batch, seq_new, n_kv_heads, head_dim] = [", p.batch, ", seq_new, ", p.n_kv_heads,
                        ", ", p.head_dim, "], got shape ", t.sizes());
      check_last_dim_contiguous(t, name);
    }
    TORCH_CHECK_VALUE(v->sizes() == k->sizes(), "v must have the shape of k (", k->sizes(), "), got ", v->sizes());
    p.seq_new = k->size(1);
    // The caches are written: they must not alias themselves, each other, or the new tokens.
    check_no_internal_overlap(k_cache, "k_cache");
    check_no_internal_overlap(v_cache, "v_cache");
    check_no_overlap(k_cache, "k_cache", v_cache, "v_cache");
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*k, "k"}, {*v, "v"}}) {
      check_no_overlap(k_cache, "k_cache", t, name);
      check_no_overlap(v_cache, "v_cache", t, name);
    }
  }
  TORCH_CHECK_VALUE(p.seq_new <= p.capacity, "k has ", p.seq_new, " new tokens, more than the cache capacity of ",
                    p.capacity);

  TORCH_CHECK_VALUE(rotary_cos.has_value() == rotary_sin.has_value(),
                    "rotary_cos and rotary_sin must be given together or both be None");
  p.rotary_half = 0;
  p.rotary_positions = 0;
  if (rotary_cos.has_value()) {
    const at::Tensor& cos = *rotary_cos;
    const at::Tensor& sin = *rotary_sin;
    TORCH_CHECK_VALUE(k.has_value(), "rotary_cos/rotary_sin rotate the new k and q at their positions: they need k "
                      "and v (the cached keys are already rotated)");
    check_same_device(cos, "rotary_cos", q, "q");
    check_same_device(sin, "rotary_sin", q, "q");
    const bool table_dtype_ok =
        cos.scalar_type() == at::kFloat || (cos.scalar_type() == at::kDouble && q.scalar_type() == at::kDouble);
    TORCH_CHECK_TYPE(table_dtype_ok, "rotary_cos must be float32 (or float64 when q is float64), got ",
                     cos.scalar_type(), " with q ", q.scalar_type());
    check_same_dtype(sin, "rotary_sin", cos, "rotary_cos");
    check_dim(cos, "rotary_cos", 2);
    TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "rotary_sin must have the shape of rotary_cos (", cos.sizes(),
                      "), got ", sin.sizes());
    check_last_dim_contiguous(cos, "rotary_cos");
    check_last_dim_contiguous(sin, "rotary_sin");
    p.rotary_half = cos.size(1);
    p.rotary_positions = cos.size(0);
    TORCH_CHECK_VALUE(p.rotary_half >= 1 && 2 * p.rotary_half <= p.head_dim,
                      "rotary_cos must be [max_position, rotary_dim / 2] with 2 <= rotary_dim <= head_dim (",
                      p.head_dim, "), got shape ", cos.sizes());
  }
  return p;
}

// ---- prefill-shaped calls ----------------------------------------------------------------------
// Many query tokens per sequence (a prompt written into a static cache, chunked prefill) are a
// prefill: the KV-cache kernels tile the rows of one group (G x seq_q of them) by a few (16 on
// CUDA, 64 on the CPU) and read each K/V row once per tile, where the prefill kernels' tiles are
// GEMMs over 64-128 query tokens. From this many query tokens on, a call runs on the prefill
// kernels after the append: q (rotated as the KV-cache kernels rotate it) attends over each
// sequence's first L_b cache tokens with the same scale, mask, window and softcap. The CPU makes
// one batched call per run of consecutive sequences of equal L (k_cache[b0:b1, :L]), CUDA one
// call for all (the prefill kernels read each L_b on the device); both read a paged cache's rows
// through the block table. The CPU measurements behind the threshold, and the CPU's own rule for
// fewer query tokens (runs_on_prefill_kernel): csrc/cpu/kvcache_attention.cpp.
inline constexpr int64_t kPrefillRouteMinSeqQ = 128;

inline bool prefill_shaped(const KVCacheAttentionParams& p) { return p.seq_q >= kPrefillRouteMinSeqQ; }

// ---- host side shared by both backends --------------------------------------------------------
// A launcher writes the new tokens into the caches, then fills p.out and p.lse. It checks the
// tensor values it depends on before writing anything (CPU) or asserts them on the device (CUDA).
using KVCacheAttentionLauncher = void (*)(const KVCacheAttentionParams& p);

// The op implementation: each backend registers it with its launcher, e.g.
// m.impl("gqa_attention_with_kvcache", &gqa_attention_with_kvcache<kvcache_attention_cpu>).
template <KVCacheAttentionLauncher launch>
std::tuple<at::Tensor, at::Tensor> gqa_attention_with_kvcache(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& block_table, bool causal, double scale,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
    int64_t window_left, int64_t window_right, double softcap) {
  KVCacheAttentionParams p =
      check_kvcache_attention_args(q, k_cache, v_cache, cache_seqlens, k, v, block_table, causal, scale, rotary_cos,
                                   rotary_sin, rotary_interleaved, window_left, window_right, softcap);
  p.out = new_output(at::empty({p.batch, p.seq_q, p.n_q_heads, p.head_dim}, q.options()));
  p.lse = new_output(at::empty({p.batch, p.n_q_heads, p.seq_q}, q.options().dtype(stats_dtype(q.scalar_type()))));
  launch(p);
  return {p.out, p.lse};
}

}  // namespace llama_ext
