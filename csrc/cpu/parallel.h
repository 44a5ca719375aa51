// Tasks of unequal cost spread over threads, shared by the CPU attention and decode kernels.
//
// at::parallel_for cuts a range of tasks into runs of equal count, one per thread. Where the
// tasks' costs differ widely (a long sequence packed with short ones, the key splits of
// sequences of other lengths), the thread whose run holds the expensive tasks works alone while
// the others wait: on 2 threads, varlen attention over one 2048-token sequence and fifteen of
// 128 ran at about one thread's speed. parallel_for_by_cost cuts the tasks instead where the
// running sum of their costs crosses each thread's equal share, so the runs stay contiguous
// (each thread still takes its tasks in the caller's order, which groups what they share) and
// each differs from the share by at most one task's cost.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace llama_ext::cpu {

// The threads parallel_for_by_cost runs n tasks on: one inside a parallel region.
inline int64_t threads_for(int64_t n) {
  return at::in_parallel_region() ? 1 : std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(n, 1));
}

// Runs body(begin, end) over runs of the tasks [0, n) that together cover each task once, one
// run per thread, cut by cost(task) >= 0 (an estimate in any unit; only the ratios count).
template <typename Cost, typename Body>
void parallel_for_by_cost(int64_t n, const Cost& cost, const Body& body) {
  if (n <= 0) return;
  const int64_t threads = threads_for(n);
  if (threads <= 1) {
    body(0, n);
    return;
  }
  std::vector<double> prefix(n + 1, 0.0);  // prefix[i]: cost of tasks [0, i)
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + static_cast<double>(cost(i));
  std::vector<int64_t> cut(threads + 1, n);
  cut[0] = 0;
  for (int64_t t = 1; t < threads; ++t) {
    const double share = prefix[n] * static_cast<double>(t) / static_cast<double>(threads);
    // The cut nearest the share, at or after the previous one.
    int64_t i = std::lower_bound(prefix.begin() + cut[t - 1], prefix.end(), share) - prefix.begin();
    if (i > cut[t - 1] && share - prefix[i - 1] < prefix[std::min(i, n)] - share) --i;
    cut[t] = std::min(i, n);
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (cut[t] < cut[t + 1]) body(cut[t], cut[t + 1]);
    }
  });
}

}  // namespace llama_ext::cpu
