// empty_kv_cache: the memory of a KV cache (KVCache, PagedKVCache, or a caller's own buffers for
// gqa_attention_with_kvcache). One kernel for every device (CompositeExplicitAutograd: the op has
// no tensor argument to dispatch on).
//
// On the CPU a decode step reads the whole cache, and a cache row of 8 kv heads x 128 is a 4 KB
// page in fp32 (two rows a page in bf16): in 4 KB pages nearly every page the step reads is a
// TLB miss, whose walk in a virtual machine goes through the host's page tables as well. So
// from 2 MB on the cache lies in 2 MB transparent huge pages (cpu::scratch), as PyTorch's own
// allocator puts every tensor only under THP_MEM_ALLOC_ENABLE=1. In the decode benchmark
// (provider llama_ext_2mb beside llama_ext, b1 4096 x 32/8 x 128, 2 threads, five runs on a 2-vCPU
// Xeon VM with AMX, 2026-12-06): a call on another of 8 (fp32) or 16 (bf16) layers' caches each
// time, as in a model's decode step, 1.14-1.25x (fp32) and 1.01-1.18x (bf16); the cache in L3,
// 1.01-1.08x with llama_ext alone in the rounds but 0.92-0.98x with eager, SDPA and
// torch.compile's calls between (paged16 1.00-1.09x); 8 query tokens 1.03-1.12x (fp32),
// 0.93-1.12x (bf16). Elsewhere (CUDA, meta) it is at::empty.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/scratch.h"

namespace llama_ext {
namespace {

at::Tensor empty_kv_cache(at::IntArrayRef size, at::ScalarType dtype, at::Device device) {
  for (size_t i = 0; i < size.size(); ++i) {
    TORCH_CHECK_VALUE(size[i] >= 0, "empty_kv_cache: size[", i, "] = ", size[i], " is negative (size ", size, ")");
  }
  // The caches gqa_attention_with_kvcache reads are floating point; under the test suite's
  // LLAMA_EXT_POISON_OUTPUTS=1 a fresh cache starts as NaN, so that a kernel that reads a slot
  // nothing wrote fails.
  check_floating(dtype, "empty_kv_cache: dtype", "type");
  const auto options = at::TensorOptions().dtype(dtype).device(device);
  if (device.is_cpu()) return cpu::scratch(size, options);
  return new_output(at::empty(size, options));
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CompositeExplicitAutograd, m) { m.impl("empty_kv_cache", &empty_kv_cache); }

}  // namespace llama_ext
