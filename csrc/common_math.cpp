// Compile-time proofs of common_math.h's integer arithmetic, evaluated once here rather than in
// every translation unit that includes the header (nvcc's front end takes about a second per
// pass over them).
#include "common_math.h"

namespace llama_ext {
namespace {

constexpr uint32_t kTop = (uint32_t{1} << 31) - 1;  // FastDivisor's largest n

constexpr bool fast_divisor_agrees(uint32_t d, uint32_t n) {
  const FastDivisor f(d);
  return f.div(n) == n / d && f.mod(n) == n % d;
}

// Every d <= 64 against n < 512 and the 65 n up to 2^31 - 1; divisors at the ends of the range
// and primes whose magic numbers need the full 32 bits, against n at and around their
// multiples and the top.
constexpr bool fast_divisor_agrees_on_samples() {
  for (uint32_t d = 1; d <= 64; ++d) {
    for (uint32_t n = 0; n < 512; ++n) {
      if (!fast_divisor_agrees(d, n)) return false;
    }
    for (uint32_t n = kTop - 64; n <= kTop; ++n) {
      if (!fast_divisor_agrees(d, n)) return false;
    }
  }
  constexpr uint32_t kDivisors[] = {kTop, kTop - 1, uint32_t{1} << 30, (uint32_t{1} << 30) + 1,
                                    (uint32_t{1} << 30) - 1, 12345679, 641, 6700417};
  for (const uint32_t d : kDivisors) {
    const uint32_t samples[] = {0, 1, d - 1, d, d + 1, kTop / d * d - 1, kTop / d * d, kTop - 1, kTop};
    for (const uint32_t n : samples) {
      if (n <= kTop && !fast_divisor_agrees(d, n)) return false;
    }
  }
  return true;
}
static_assert(fast_divisor_agrees_on_samples(), "FastDivisor disagrees with / and %");

}  // namespace
}  // namespace llama_ext
