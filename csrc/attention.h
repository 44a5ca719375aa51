// Grouped-query attention: argument checks and the host templates shared by the CPU and CUDA
// implementations.
//
// Batched: q [batch, seq_q, n_q_heads, head_dim], k/v [batch, seq_k, n_kv_heads, head_dim].
// Varlen:  q [total_q, n_q_heads, head_dim], k/v [total_k, n_kv_heads, head_dim], with int32
//          cu_seqlens_q/k [batch + 1] (prefix sums of the sequence lengths, from 0 to total).
// Query head h reads kv head h / (n_q_heads / n_kv_heads). Every dim may be strided except
// the last, which must be contiguous.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "attention_window.h"
#include "common.h"

namespace llama_ext {

struct AttentionShape {
  int64_t batch;
  int64_t seq_q;  // batched: the sequence length; varlen: max_seqlen_q
  int64_t seq_k;  // batched: the sequence length; varlen: max_seqlen_k
  int64_t n_q_heads;
  int64_t n_kv_heads;
  int64_t head_dim;
  bool varlen;
  int64_t group() const { return n_q_heads / n_kv_heads; }
};

// Checks that cu_seqlens starts at 0, never decreases, ends at total and that no sequence is
// longer than max_seqlen. Reads the values on the host (a device sync for CUDA tensors).
inline void check_cu_seqlens_values(const at::Tensor& cu_seqlens, const char* name, int64_t total,
                                    int64_t max_seqlen, const char* max_name) {
  const at::Tensor host = cu_seqlens.to(at::kCPU).contiguous();
  const int32_t* c = host.const_data_ptr<int32_t>();
  const int64_t n = host.numel();
  TORCH_CHECK_VALUE(c[0] == 0, name, "[0] must be 0, got ", c[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(c[i] >= c[i - 1], name, " must be non-decreasing, but ", name, "[", i, "] = ", c[i], " < ",
                      name, "[", i - 1, "] = ", c[i - 1]);
    TORCH_CHECK_VALUE(c[i] - c[i - 1] <= max_seqlen, "sequence ", i - 1, " has length ", c[i] - c[i - 1],
                      " (from ", name, "), longer than ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(c[n - 1] == total, name, "[-1] must equal the number of packed tokens (", total, "), got ",
                    c[n - 1]);
}

inline AttentionShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                           const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                           int64_t max_seqlen_k, double scale) {
  check_floating(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  check_same_device(k, "k", q, "q");
  check_same_device(v, "v", q, "q");
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
                    "cu_seqlens_q and cu_seqlens_k must be given together (varlen) or both be None (batched)");
  const bool varlen = cu_seqlens_q.has_value();
  const int64_t rank = varlen ? 3 : 4;
  const char* layout = varlen ? "[total_tokens, heads, head_dim]" : "[batch, seq, heads, head_dim]";
  TORCH_CHECK_VALUE(q.dim() == rank, "q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == rank, "k must be ", layout, ", got shape ", k.sizes());
  check_same_shape(v, "v", k, "k");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_attention_scale(scale);

  AttentionShape s{};
  s.varlen = varlen;
  s.head_dim = q.size(-1);
  s.n_q_heads = q.size(-2);
  s.n_kv_heads = k.size(-2);
  check_attention_heads(s.head_dim, k.size(-1), s.n_q_heads, s.n_kv_heads, "k");
  if (!varlen) {
    s.batch = q.size(0);
    s.seq_q = q.size(1);
    s.seq_k = k.size(1);
    TORCH_CHECK_VALUE(k.size(0) == s.batch, "k's batch size (", k.size(0), ") must equal q's (", s.batch, ")");
    return s;
  }
  const at::Tensor& cq = *cu_seqlens_q;
  const at::Tensor& ck = *cu_seqlens_k;
  TORCH_CHECK_TYPE(cq.scalar_type() == at::kInt, "cu_seqlens_q must be int32, got ", cq.scalar_type());
  TORCH_CHECK_TYPE(ck.scalar_type() == at::kInt, "cu_seqlens_k must be int32, got ", ck.scalar_type());
  check_same_device(cq, "cu_seqlens_q", q, "q");
  check_same_device(ck, "cu_seqlens_k", q, "q");
  TORCH_CHECK_VALUE(cq.dim() == 1 && cq.numel() >= 1, "cu_seqlens_q must be 1-dim [batch + 1], got shape ",
                    cq.sizes());
  TORCH_CHECK_VALUE(ck.sizes() == cq.sizes(), "cu_seqlens_k must have the shape of cu_seqlens_q (", cq.sizes(),
                    "), got ", ck.sizes());
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ",
                    max_seqlen_q, " and ", max_seqlen_k);
  check_cu_seqlens_values(cq, "cu_seqlens_q", q.size(0), max_seqlen_q, "max_seqlen_q");
  check_cu_seqlens_values(ck, "cu_seqlens_k", k.size(0), max_seqlen_k, "max_seqlen_k");
  s.batch = cq.numel() - 1;
  s.seq_q = max_seqlen_q;
  s.seq_k = max_seqlen_k;
  return s;
}

// Checks window_size and softcap and folds causal into the window.
// Sides longer than both sequences together mean the same as unbounded ones and are clamped
// there, so the KeyWindow arithmetic never overflows.
inline KeyWindow make_key_window(const AttentionShape& s, bool causal, int64_t window_left, int64_t window_right,
                                 double softcap) {
  check_window_softcap(window_left, window_right, softcap);
  const int64_t longest = s.seq_q + s.seq_k;
  KeyWindow w;
  w.left = std::min(window_left, longest);
  w.right = causal ? 0 : std::min(window_right, longest);
  return w;
}

// Checks of the backward's extra tensors, after check_attention_args(q, k, v, ...) gave shape.
// lse: batched [batch, n_q_heads, seq_q], varlen [n_q_heads, total_q].
inline std::vector<int64_t> lse_shape(const at::Tensor& q, const AttentionShape& shape) {
  if (shape.varlen) return {shape.n_q_heads, q.size(0)};
  return {shape.batch, shape.n_q_heads, shape.seq_q};
}

inline void check_attention_backward_args(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                                          const at::Tensor& q, const AttentionShape& shape) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    check_same_dtype(t, name, q, "q");
    check_same_device(t, name, q, "q");
    check_same_shape(t, name, q, "q");
    check_last_dim_contiguous(t, name);
  }
  check_same_device(lse, "lse", q, "q");
  TORCH_CHECK_TYPE(lse.scalar_type() == stats_dtype(q.scalar_type()), "lse must be ", stats_dtype(q.scalar_type()),
                   ", got ", lse.scalar_type());
  const std::vector<int64_t> expected = lse_shape(q, shape);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(expected), "lse must have shape ", at::IntArrayRef(expected),
                    ", got ", lse.sizes());
}

// ---- host side shared by both backends --------------------------------------------------------
// Checks, output allocation and the calls with no work are the same on CPU and CUDA; only the
// launch differs. A launcher receives one checked call with its outputs allocated, and only
// when both q and k hold at least one token.
struct AttentionCall {
  at::Tensor q, k, v;
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;  // both set (varlen) or both empty
  AttentionShape shape;
  bool causal;
  double scale;
  KeyWindow window;  // the keys each row sees, causal folded in
  double softcap;    // 0: off
  at::Tensor out, lse;               // forward: written; backward: read
  at::Tensor grad_out, dq, dk, dv;   // backward only: grad_out read, the gradients written
};

// A backend's own limits, checked after the shared ones and before anything is allocated.
using AttentionLimits = void (*)(const at::Tensor& q, const AttentionShape& shape);
using AttentionLauncher = void (*)(const AttentionCall& call);

// The CPU kernels take everything check_attention_args accepts.
inline void no_backend_limits(const at::Tensor&, const AttentionShape&) {}

// ---- decode-shaped calls on the KV-cache kernels -----------------------------------------------
// A batched call with a few query tokens per sequence is a decode step: the prefill kernels tile
// queries by dozens of rows and do not split the keys, so they leave most of the machine idle
// (one query-row tile per (batch, kv head)). The KV-cache kernels (csrc/kvcache_attention.h)
// pack all query heads of a group into one tile, split the keys over threads / CTAs and combine
// by lse, with the same semantics: k/v act as a full cache (cache_seqlens = seq_k, nothing
// appended, nothing written), the mask and window aligned bottom-right, rows without keys
// zero with lse 0. Forward only: the backward recomputes from out and lse as for any forward.
//
// The seq_q limit: on the CPU (32/8 heads x 128, 4K keys, bf16, side by side with the prefill
// kernel) the KV-cache kernel is 1.9x faster at 1 query token and 1.5x at 4, and slower from
// 16 on, where the prefill tiles become GEMMs; on CUDA the KV-cache kernel is built for a few
// rows per group (flash-decoding), the prefill kernels' 64- and 128-row tiles take over beyond.
// The other way round, the KV-cache kernels hand prefill-shaped calls (many query tokens) to the
// prefill kernels (kPrefillRouteMinSeqQ, csrc/kvcache_attention.h), and the CPU's also calls of
// more than kDecodeRouteMaxSeqQ tokens with many rows per kv head (csrc/cpu/kvcache_attention.cpp).
inline constexpr int64_t kDecodeRouteMaxSeqQ = 4;

inline bool routes_to_kvcache(const AttentionCall& call) {
  const AttentionShape& s = call.shape;
  if (s.varlen) return false;
  if (call.q.is_cuda()) {
    // The CUDA KV-cache kernels read whole 16-byte vectors of the cache rows and index their
    // grid by batch and n_kv_heads x row tiles (at most 65535 each; n_q_heads x seq_q bounds the
    // latter).
    return s.seq_q <= kDecodeRouteMaxSeqQ && s.batch <= 65535 && s.n_q_heads * s.seq_q <= 65535 &&
           rows_in_16byte_vectors(call.k) && rows_in_16byte_vectors(call.v);
  }
  return s.seq_q <= kDecodeRouteMaxSeqQ;
}

// Runs the call on this backend's gqa_attention_with_kvcache kernel (through the dispatcher, at
// the backend's own key: the call is already below autograd and every tracing layer).
inline std::tuple<at::Tensor, at::Tensor> attention_on_kvcache_kernels(const AttentionCall& call) {
  using Signature = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, int64_t, int64_t, double);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("llama_ext::gqa_attention_with_kvcache", "").typed<Signature>();
  const at::Tensor seqlens = at::full({call.shape.batch}, call.shape.seq_k, call.q.options().dtype(at::kInt));
  const c10::DispatchKeySet backend(call.q.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
  return op.redispatch(backend, call.q, call.k, call.v, seqlens, std::nullopt, std::nullopt, std::nullopt, call.causal,
                       call.scale, std::nullopt, std::nullopt, false, call.window.left, call.window.right,
                       call.softcap);
}

// The op implementations: each backend registers these with its limits and launchers, e.g.
// m.impl("gqa_attention_forward", &gqa_attention_forward<no_backend_limits, attention_forward_cpu>).
template <AttentionLimits check_limits, AttentionLauncher launch>
std::tuple<at::Tensor, at::Tensor> gqa_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const std::optional<at::Tensor>& cu_seqlens_q,
                                                         const std::optional<at::Tensor>& cu_seqlens_k,
                                                         int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                         double scale, int64_t window_left, int64_t window_right,
                                                         double softcap) {
  AttentionCall call{q, k, v, cu_seqlens_q, cu_seqlens_k, {}, causal, scale, {}, softcap};
  call.shape = check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  call.window = make_key_window(call.shape, causal, window_left, window_right, softcap);
  check_limits(q, call.shape);
  if (q.numel() > 0 && k.numel() > 0 && routes_to_kvcache(call)) return attention_on_kvcache_kernels(call);
  call.out = new_output(at::empty(q.sizes(), q.options()));
  call.lse = new_output(at::empty(lse_shape(q, call.shape), q.options().dtype(stats_dtype(q.scalar_type()))));
  if (q.numel() == 0) return {call.out, call.lse};
  if (k.numel() == 0) return {call.out.zero_(), call.lse.zero_()};  // no row sees a key
  launch(call);
  return {call.out, call.lse};
}

template <AttentionLimits check_limits, AttentionLauncher launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gqa_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale, int64_t window_left, int64_t window_right, double softcap) {
  AttentionCall call{q, k, v, cu_seqlens_q, cu_seqlens_k, {}, causal, scale, {}, softcap, out, lse, grad_out};
  call.shape = check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  call.window = make_key_window(call.shape, causal, window_left, window_right, softcap);
  check_attention_backward_args(grad_out, out, lse, q, call.shape);
  check_limits(q, call.shape);
  call.dq = new_output(at::empty(q.sizes(), q.options()));
  call.dk = new_output(at::empty(k.sizes(), k.options()));
  call.dv = new_output(at::empty(v.sizes(), v.options()));
  if (q.numel() == 0 || k.numel() == 0) return {call.dq.zero_(), call.dk.zero_(), call.dv.zero_()};
  launch(call);
  return {call.dq, call.dk, call.dv};
}

}  // namespace llama_ext
