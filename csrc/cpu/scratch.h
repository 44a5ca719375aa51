// Scratch tensors of the CPU attention kernels and the memory of CPU KV caches
// (csrc/kv_cache_memory.cpp): uninitialized, large ones in transparent huge pages.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common.h"

namespace llama_ext::cpu {

inline constexpr int64_t kHugePageBytes = int64_t{2} << 20;

// A fresh, uninitialized tensor. Allocated like an output (new_output), so that under the test
// suite's LLAMA_EXT_POISON_OUTPUTS=1 it starts as NaN: a kernel that reads an element nothing
// wrote fails the comparison instead of reading zeros by luck.
//
// From 2 MB on, on Linux, its memory is 2 MB-aligned and advised into transparent huge pages
// (madvise(MADV_HUGEPAGE), which THP's common "madvise" mode needs), as PyTorch's own allocator
// does only under THP_MEM_ALLOC_ENABLE=1. Allocations above glibc's mmap threshold (32 MB at
// most) are fresh pages on every call, each 4 KB page a fault and a zeroing: the backward's dq
// partials (64 MB fp32 at 1K tokens, 32 heads x 128, 4 key chunks) took a quarter of a bf16
// backward so (Emerald Rapids, 2026-12-05); in 2 MB pages, 1/512 of the faults.
// That memory bypasses PyTorch's CPU allocator, so it is reported to the profiler here, as the
// allocator reports its own: torch.profiler's memory trace (and the benchmark's peak MB, which
// reads it) sees it allocated and freed. The totals reported with it are this helper's alone.
namespace detail {
inline std::atomic<int64_t>& huge_scratch_live_bytes() {
  static std::atomic<int64_t> live{0};
  return live;
}
inline void report_huge_scratch(void* data, int64_t bytes) {
  const int64_t live = huge_scratch_live_bytes().fetch_add(bytes) + bytes;
  if (c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(data, bytes, static_cast<size_t>(live), static_cast<size_t>(live),
                                     c10::Device(c10::DeviceType::CPU));
  }
}
}  // namespace detail

inline at::Tensor scratch(at::IntArrayRef shape, const at::TensorOptions& opts) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t bytes = static_cast<int64_t>(opts.dtype().itemsize());
  bool valid = true;  // sizes >= 0 whose product fits: otherwise at::empty below raises
  for (const int64_t size : shape) valid = valid && size >= 0 && !__builtin_mul_overflow(bytes, size, &bytes);
  if (valid && bytes >= kHugePageBytes && bytes <= std::numeric_limits<int64_t>::max() - kHugePageBytes) {
    const int64_t padded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    std::unique_ptr<void, void (*)(void*)> data(std::aligned_alloc(kHugePageBytes, padded), std::free);
    TORCH_CHECK_WITH(OutOfMemoryError, data != nullptr, "llama_ext: cannot allocate ", padded,
                     " bytes of CPU scratch");
    madvise(data.get(), padded, MADV_HUGEPAGE);  // advice only: where THP is off, 4 KB pages as before
    const auto release = [padded](void* p) {
      detail::report_huge_scratch(p, -padded);
      std::free(p);
    };
    at::Tensor t = at::from_blob(data.get(), shape, release, opts);
    detail::report_huge_scratch(data.release(), padded);  // t owns it now
    return new_output(std::move(t));
  }
#endif
  return new_output(at::empty(shape, opts));
}

}  // namespace llama_ext::cpu
