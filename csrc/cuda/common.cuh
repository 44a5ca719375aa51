// Shared CUDA building blocks: dtype dispatch to native half types, 16-byte vector access,
// warp and block reductions, launches. Kept light (no ATen/cuda/CUDAContext.h, no cuBLAS
// headers) so every .cu compiles fast.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "../common_math.h"  // ceil_div, max_keep_nan

namespace llama_ext::cuda {

// ---- dtypes -------------------------------------------------------------------------------

// Dispatches float32 / float16 / bfloat16 to `scalar_t` = float / __half / __nv_bfloat16
// (native types: their intrinsics are what the kernels want, not c10's wrappers).
#define LLAMA_EXT_DISPATCH_CUDA_FLOATING(TYPE, NAME, ...)                                   \
  [&] {                                                                                    \
    switch (TYPE) {                                                                        \
      case at::ScalarType::Float: {                                                        \
        using scalar_t = float;                                                            \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      case at::ScalarType::Half: {                                                         \
        using scalar_t = __half;                                                           \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      case at::ScalarType::BFloat16: {                                                     \
        using scalar_t = __nv_bfloat16;                                                    \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      default:                                                                             \
        TORCH_CHECK_TYPE(false, NAME, ": CUDA kernels support float32, float16 and bfloat16, got ", TYPE); \
    }                                                                                      \
  }()

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The value a tensor of dtype T holds after storing x: one round-to-nearest-even.
template <typename T>
__device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// One rotary pair (x1, x2) turned by (c, s): y1 = x1 c - x2 s, y2 = x2 c + x1 s, each as one
// rounded product and one fused multiply-add, the rounding of the CPU kernels' FMA levels.
// Spelled out because nvcc's contraction of `a * b - c * d` may fuse either product: written
// plainly, apply_rotary and the KV-cache op's fused rotation could differ in the last bit.
__device__ __forceinline__ float rotary_y1(float x1, float x2, float c, float s) { return fmaf(x1, c, -__fmul_rn(x2, s)); }
__device__ __forceinline__ float rotary_y2(float x1, float x2, float c, float s) { return fmaf(x2, c, __fmul_rn(x1, s)); }

// Pointer to a tensor's data as the native element type.
template <typename T>
T* data_ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
template <typename T>
const T* const_data_ptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); }

// ---- 16-byte vectors ------------------------------------------------------------------------

constexpr int kVecBytes = 16;

template <typename T>
constexpr int vec_elems() { return kVecBytes / static_cast<int>(sizeof(T)); }

// N elements moved as one 16-byte load/store (LDG.128 / STG.128) when the address is aligned.
template <typename T, int N = vec_elems<T>()>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
  __device__ __forceinline__ static Vec load(const T* p) { return *reinterpret_cast<const Vec*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Vec*>(p) = *this; }
};

inline bool is_aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// A [rows, n] operand can take the vector path when its base is 16-byte aligned and every row
// starts 16-byte aligned: the row stride (in elements) is a multiple of the vector width.
inline bool rows_vectorizable(const void* base, int64_t row_stride, int64_t n, int elem_bytes) {
  const int64_t vec = kVecBytes / elem_bytes;
  return is_aligned(base, kVecBytes) && row_stride % vec == 0 && n % vec == 0;
}

// ---- reductions ---------------------------------------------------------------------------

struct SumOp {
  static constexpr float kIdentity = 0.f;
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// fmaxf: a NaN operand gives the other one.
struct MaxOp {
  static constexpr float kIdentity = -INFINITY;
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op = SumOp>
__device__ __forceinline__ float warp_reduce(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = Op()(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Op over the whole block (blockDim.x a multiple of 32, at most 1024), in a fixed order; every
// thread gets the result. `scratch` is 32 floats of shared memory, reusable after the call returns.
template <typename Op = SumOp>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int n_warps = blockDim.x / 32;
  x = warp_reduce<Op>(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < n_warps ? scratch[lane] : Op::kIdentity;
  return warp_reduce<Op>(x);
}

// ---- launches -----------------------------------------------------------------------------

// Lets `kernel` launch with `smem` bytes of dynamic shared memory on the current device
// (cudaFuncAttributeMaxDynamicSharedMemorySize). The attribute is a ceiling, so the largest
// size granted per (kernel, device) is kept and the driver call is made only for a larger one:
// a decode step calls its launcher once per layer, and the call cost host time on each.
template <typename... Params>
void allow_dynamic_smem(void (*kernel)(Params...), size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& ceiling = granted[{reinterpret_cast<const void*>(kernel), device}];
  if (smem <= ceiling) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  ceiling = smem;
}

// Resident CTAs per SM of `kernel` at `threads` threads and `smem` bytes of dynamic shared memory
// on the current device, and its SM count. Each (kernel, device, threads, smem) is asked of the
// runtime once and kept, off the host path of every later call (a decode step's whole budget is
// tens of microseconds).
struct Residency {
  int sms;
  int ctas_per_sm;
  // CTAs the device holds at once; one per SM for a kernel that fits none (its launch then
  // fails on its own, with the runtime's error).
  int64_t slots() const { return static_cast<int64_t>(sms) * (ctas_per_sm > 0 ? ctas_per_sm : 1); }
};

template <typename... Params>
Residency kernel_residency(void (*kernel)(Params...), int threads, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, Residency> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, threads, smem);
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  Residency r{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&r.sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r.ctas_per_sm, kernel, threads, smem));
  known.emplace(key, r);
  return r;
}

// Programmatic dependent launch (sm_90 and later): a kernel launched with `overlap_prior` may be
// scheduled while the stream's previous kernel still runs, once every CTA of that kernel has
// called allow_dependent_launch() (or exited). Such a kernel must call wait_for_prior_kernel(),
// in every thread, before it reads what the previous kernel writes or writes what it reads;
// the wait returns once that kernel has completed and its writes are visible. What comes before
// the wait (launch, index math, loads of inputs no earlier kernel of the op writes) overlaps the
// previous kernel's tail. Both are no-ops before sm_90 and in a kernel launched without it.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prior_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// A launcher's 0/1 override from the environment (a kernel choice forced for tests of both
// kernels on one GPU and for side-by-side timings), read at each call: kUnset when `name` is not
// set, a ValueError naming it for anything but 0 or 1.
enum class EnvSwitch { kUnset, kOff, kOn };

inline EnvSwitch env_switch(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr) return EnvSwitch::kUnset;
  TORCH_CHECK_VALUE(std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0, name, " must be 0 or 1, got '",
                    value, "'");
  return value[0] == '1' ? EnvSwitch::kOn : EnvSwitch::kOff;
}

// Whether launches on `stream`'s device may overlap the previous kernel: compute capability 9.0
// or later, unless LLAMA_EXT_CUDA_PDL=0 (read at every call, so that one process can time both:
// scripts/decode_splits.py). CUDA graphs capture such launches from CUDA 12.3 on; a build against
// an older runtime launches one after another while the stream is being captured.
inline bool dependent_launch_supported(cudaStream_t stream) {
  const char* setting = std::getenv("LLAMA_EXT_CUDA_PDL");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return false;
#if CUDART_VERSION < 12030
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return false;
#else
  (void)stream;
#endif
  return true;
}

// Whether the image of `kernel` that runs on the current device was compiled for sm_90 or later,
// and so holds wait_for_prior_kernel()'s instruction: an sm_90 GPU runs a build whose newest image
// is older (TORCH_CUDA_ARCH_LIST="8.0+PTX") from that PTX, without the wait, and such a kernel
// launched overlapping its predecessor would race it. Asked of the runtime once per (kernel,
// device).
template <typename... Params>
bool compiled_with_dependent_launch(void (*kernel)(Params...)) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, bool> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return known.emplace(key, attributes.ptxVersion >= 90).first->second;
}

// kernel<<<grid, block, smem, stream>>>(args...), checked; with `overlap_prior` (the caller has
// checked dependent_launch_supported()) as a programmatic dependent launch where the kernel's
// image holds the wait (compiled_with_dependent_launch). The overlap only saves time: where the
// runtime refuses it (a launch that fails launches nothing), the kernel is launched plainly,
// after one warning. An error left by earlier work fails both and is raised.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   bool overlap_prior, const Args&... args) {
  overlap_prior = overlap_prior && compiled_with_dependent_launch(kernel);
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = overlap_prior ? &overlap : nullptr;
  config.numAttrs = overlap_prior ? 1 : 0;
  cudaError_t status = cudaLaunchKernelEx(&config, kernel, args...);
  if (status != cudaSuccess && overlap_prior) {
    (void)cudaGetLastError();  // the refused launch's error, not a sticky one (which the retry meets again)
    TORCH_WARN_ONCE("llama_ext: a programmatic dependent launch failed (", cudaGetErrorString(status),
                    "); launching without the overlap");
    config.attrs = nullptr;
    config.numAttrs = 0;
    status = cudaLaunchKernelEx(&config, kernel, args...);
  }
  C10_CUDA_CHECK(status);
}

}  // namespace llama_ext::cuda
