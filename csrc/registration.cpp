// Every llama_ext operator schema, in one place. The kernels register themselves per
// backend (TORCH_LIBRARY_IMPL in csrc/cpu/<op>.cpp for CPU, csrc/cuda/<op>.cu for CUDA);
// autograd and fake (meta) kernels live in llama_ext/ops.py. The Python module itself is
// csrc/module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(llama_ext, m) {
  // ---- RMSNorm ------------------------------------------------------------------------
  // rstd = rsqrt(mean(x^2) + eps) per row (float32; float64 for float64 input), w' = offset +
  // weight (ones when None). cast_before_weight: out = w' * (x * rstd).to(x.dtype) in the
  // promoted dtype (HF Llama); otherwise out = (w' * x * rstd).to(x.dtype) (Gemma, OLMo 2).
  // weight has input's dtype or, with float16/bfloat16 input, float32.
  m.def(
      "rms_norm(Tensor input, Tensor? weight, float eps, float offset=0., bool cast_before_weight=True)"
      " -> (Tensor out, Tensor rstd)");
  // residual_out = input + residual; out = rms_norm(residual_out).
  m.def(
      "fused_add_rms_norm(Tensor input, Tensor residual, Tensor? weight, float eps, float offset=0.,"
      " bool cast_before_weight=True) -> (Tensor out, Tensor residual_out, Tensor rstd)");
  // Inference form: residual <- input + residual, input <- rms_norm(residual).
  m.def(
      "fused_add_rms_norm_(Tensor(a!) input, Tensor(b!) residual, Tensor? weight, float eps, float offset=0.,"
      " bool cast_before_weight=True) -> ()");
  // Shared backward of both forms: grad_input = d rms_norm / d input (+ grad_residual_out
  // when given, the residual branch of fused_add_rms_norm); grad_weight (weight's dtype) is
  // reduced over rows in fp32 and is an empty tensor when weight is None or compute_grad_weight
  // is false.
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor rstd,"
      " Tensor? grad_residual_out, bool compute_grad_weight, float offset=0., bool cast_before_weight=True)"
      " -> (Tensor grad_input, Tensor grad_weight)");

  // ---- Rotary position embedding ------------------------------------------------------
  // q [batch, seq, n_q_heads, head_dim], k [batch, seq, n_kv_heads, head_dim],
  // cos/sin float32 [max_position, rotary_dim / 2], positions int32/int64 [batch, seq] or [seq].
  // inverse=True rotates by -theta (the backward of the forward rotation).
  m.def(
      "apply_rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? positions,"
      " bool interleaved, bool inverse) -> (Tensor q_out, Tensor k_out)");
  m.def(
      "apply_rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor? positions,"
      " bool interleaved, bool inverse) -> ()");

  // ---- Grouped-query attention --------------------------------------------------------
  // Batched: q [batch, seq_q, n_q_heads, d], k/v [batch, seq_k, n_kv_heads, d], cu_seqlens None.
  // Varlen:  q [total_q, n_q_heads, d], k/v [total_k, n_kv_heads, d], int32 cu_seqlens_q/k
  //          [batch + 1], max_seqlen_q/k bound the per-sequence lengths.
  // out has q's shape; lse is float32 [batch, n_q_heads, seq_q] (varlen: [n_q_heads, total_q]).
  // Masks align bottom-right: with i' = i + seq_k - seq_q, query i sees keys j with
  // i' - window_left <= j <= i' + window_right (-1: that side unbounded); causal makes
  // window_right 0. softcap > 0 maps scores s = scale q.k to softcap tanh(s / softcap) before
  // masking; 0 turns it off.
  m.def(
      "gqa_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k,"
      " int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left, int window_right,"
      " float softcap) -> (Tensor out, Tensor lse)");
  m.def(
      "gqa_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
      " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal,"
      " float scale, int window_left, int window_right, float softcap)"
      " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // ---- Attention against a KV cache (decode), csrc/kvcache_attention.h ------------------------
  // q [batch, seq_q, n_q_heads, d]; k_cache/v_cache [batch, capacity, n_kv_heads, d] or, with an
  // int32 block_table [batch, max_blocks], paged [num_blocks, block_size, n_kv_heads, d]; int32
  // cache_seqlens [batch]. k/v [batch, seq_new, n_kv_heads, d] (optional, together) are written
  // into the caches at cache_seqlens (k rotated with rotary_cos/sin), then q (rotated at
  // cache_seqlens + i) attends over cache_seqlens + seq_new tokens. window_left/right: -1 is
  // unbounded; softcap 0 is off. lse is float32 [batch, n_q_heads, seq_q].
  m.def(
      "gqa_attention_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens,"
      " Tensor? k, Tensor? v, Tensor? block_table, bool causal, float scale, Tensor? rotary_cos,"
      " Tensor? rotary_sin, bool rotary_interleaved, int window_left, int window_right, float softcap)"
      " -> (Tensor out, Tensor lse)");
  // An uninitialized floating-point tensor for a KV cache: on the CPU, from 2 MB on, in 2 MB
  // transparent huge pages (csrc/kv_cache_memory.cpp); elsewhere as torch.empty.
  m.def("empty_kv_cache(int[] size, ScalarType dtype, Device device) -> Tensor");
}
