// Rotary position embedding on CUDA: q and k rotated by one kernel launch.
//
// Algorithm. Each head of a token at position p is split into chunks of V elements (V = 16 bytes
// of the dtype: 8 half/bfloat16, 4 float). A rotate_half chunk covers x1 = x[i, i+V) and
// x2 = x[half+i, half+i+V); a GPT-J (interleaved) chunk covers the V/2 pairs in x[i, i+V). The
// thread block works on blockDim.z tokens; threadIdx.x walks the chunks of a head and threadIdx.y
// the heads (q's first, then k's), kHeadsPerThread at a time with all their loads issued before
// any store. A thread loads its chunk's cos/sin values from the table row once per token, keeps
// them in registers, and reuses them for every head it rotates:
//   y1 = x1 * cos - x2 * sin,  y2 = x2 * cos + x1 * sin   (inverse: sin -> -sin; rotary_y1/y2)
// in fp32 and rounds once on the store. Chunks past rotary_dim are copied (out of place) or left
// alone (in place).
//
// Bytes per token: read and write (n_q_heads + n_kv_heads) * head_dim elements, plus rotary_dim
// * 4 bytes of cos/sin (shared by every head, so L1/L2-resident). That is the floor for the
// op; it is fast because every q/k byte moves once, with 16-byte loads/stores (LDG.E.128 /
// STG.E.128) when all bases and strides are 16-byte aligned, and a scalar path otherwise. Offsets
// are 64-bit, so tensors past 2^31 elements are fine. Positions outside the table trip a
// device-side assert (as torch's index ops do) and are never used to read memory.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../rotary.h"
#include "common.cuh"

namespace llama_ext::cuda {
namespace {

template <typename T>
struct Operand {
  const T* src;
  T* dst;
  int64_t src_stride[3];  // batch, seq, head
  int64_t dst_stride[3];
  int heads;
};

template <typename T>
struct RotaryParams {
  Operand<T> q, k;
  RotaryTables<float> tables;
  int64_t tokens, seq, max_position;
  int head_dim, half;
  int rotary_chunks, pass_chunks;  // per head
  bool inverse;
  bool copy_pass_through;  // out of place: dims past rotary_dim are copied to dst
};

// Elements per chunk: 16 bytes on the vector path; one element (rotate_half) or one pair
// (interleaved) on the scalar path.
template <typename T, bool kVectorized, bool kInterleaved>
constexpr int chunk_elems() {
  return kVectorized ? vec_elems<T>() : (kInterleaved ? 2 : 1);
}

// A chunk as loaded (one 16-byte load on the vector path), kept packed until it is rotated.
template <typename T, int N, bool kVectorized>
__device__ __forceinline__ Vec<T, N> load_chunk(const T* p) {
  if constexpr (kVectorized) {
    return Vec<T, N>::load(p);
  } else {
    Vec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = p[i];
    return v;
  }
}

template <typename T, int N, bool kVectorized>
__device__ __forceinline__ void store_chunk(T* p, const float (&in)[N]) {
  if constexpr (kVectorized) {
    Vec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = from_float<T>(in[i]);
    v.store(p);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(in[i]);
  }
}

__device__ __forceinline__ int64_t head_offset(const int64_t (&stride)[3], int64_t b, int64_t s, int64_t h) {
  return b * stride[0] + s * stride[1] + h * stride[2];
}

// Heads each thread rotates per chunk, their loads issued together: the kernel waits on its
// loads (ncu on the H200: most of a warp's cycles stalled on L1TEX), so each thread keeps two
// heads' chunks in flight instead of one.
constexpr int kHeadsPerThread = 2;

template <typename T, bool kVectorized, bool kInterleaved>
__global__ void rotary_kernel(const RotaryParams<T> p) {
  constexpr int V = chunk_elems<T, kVectorized, kInterleaved>();
  constexpr int kPairs = kInterleaved ? V / 2 : V;  // cos/sin values per chunk
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.z + threadIdx.z;
  if (token >= p.tokens) return;
  const int64_t b = token / p.seq, s = token % p.seq;
  const int64_t pos = p.tables.position(b, s);
  CUDA_KERNEL_ASSERT(pos >= 0 && pos < p.max_position && "apply_rotary: position outside the cos/sin table");
  if (pos < 0 || pos >= p.max_position) return;  // never index the table out of bounds
  const float* cos_row = p.tables.cos + pos * p.tables.cos_stride;
  const float* sin_row = p.tables.sin + pos * p.tables.sin_stride;
  const int heads = p.q.heads + p.k.heads;
  const int rotary_dim = 2 * p.half;

  for (int c = threadIdx.x; c < p.rotary_chunks; c += blockDim.x) {
    float cos_v[kPairs], sin_v[kPairs];
    const int pair0 = c * kPairs;  // first pair (= table column) of the chunk
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      cos_v[i] = cos_row[pair0 + i];
      sin_v[i] = p.inverse ? -sin_row[pair0 + i] : sin_row[pair0 + i];
    }
    // A thread's kHeadsPerThread heads: every load before the first store (in place, src is dst).
    for (int h0 = threadIdx.y * kHeadsPerThread; h0 < heads; h0 += blockDim.y * kHeadsPerThread) {
      T* dst[kHeadsPerThread];
      Vec<T, V> c1[kHeadsPerThread], c2[kHeadsPerThread];  // x1 and x2 chunks; interleaved: c1 only
#pragma unroll
      for (int u = 0; u < kHeadsPerThread; ++u) {
        const int h = h0 + u;
        if (h >= heads) break;
        const bool is_q = h < p.q.heads;
        const Operand<T>& op = is_q ? p.q : p.k;
        const int64_t head = is_q ? h : h - p.q.heads;
        const T* src = op.src + head_offset(op.src_stride, b, s, head);
        dst[u] = op.dst + head_offset(op.dst_stride, b, s, head);
        if constexpr (kInterleaved) {
          c1[u] = load_chunk<T, V, kVectorized>(src + 2 * pair0);
        } else {
          c1[u] = load_chunk<T, V, kVectorized>(src + pair0);
          c2[u] = load_chunk<T, V, kVectorized>(src + p.half + pair0);
        }
      }
#pragma unroll
      for (int u = 0; u < kHeadsPerThread; ++u) {
        if (h0 + u >= heads) break;
        if constexpr (kInterleaved) {
          float y[V];
#pragma unroll
          for (int i = 0; i < kPairs; ++i) {
            const float a = to_float(c1[u].v[2 * i]), b2 = to_float(c1[u].v[2 * i + 1]);
            y[2 * i] = rotary_y1(a, b2, cos_v[i], sin_v[i]);
            y[2 * i + 1] = rotary_y2(a, b2, cos_v[i], sin_v[i]);
          }
          store_chunk<T, V, kVectorized>(dst[u] + 2 * pair0, y);
        } else {
          float y1[V], y2[V];
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const float a = to_float(c1[u].v[i]), b2 = to_float(c2[u].v[i]);
            y1[i] = rotary_y1(a, b2, cos_v[i], sin_v[i]);
            y2[i] = rotary_y2(a, b2, cos_v[i], sin_v[i]);
          }
          store_chunk<T, V, kVectorized>(dst[u] + pair0, y1);
          store_chunk<T, V, kVectorized>(dst[u] + p.half + pair0, y2);
        }
      }
    }
  }

  // Pass-through dims [rotary_dim, head_dim): copied, V elements at a time on the vector path.
  constexpr int P = kVectorized ? V : 1;
  for (int c = threadIdx.x; c < p.pass_chunks; c += blockDim.x) {
    const int col = rotary_dim + c * P;
    for (int h = threadIdx.y; h < heads; h += blockDim.y) {
      const bool is_q = h < p.q.heads;
      const Operand<T>& op = is_q ? p.q : p.k;
      const int64_t head = is_q ? h : h - p.q.heads;
      const T* src = op.src + head_offset(op.src_stride, b, s, head) + col;
      T* dst = op.dst + head_offset(op.dst_stride, b, s, head) + col;
      if constexpr (kVectorized) {
        Vec<T, P>::load(src).store(dst);
      } else {
        *dst = *src;
      }
    }
  }
}

// Strides of a [batch, seq, heads, head_dim] tensor; a size-1 dim's stride is never used, so it
// is zeroed and does not block the vector path.
void strides_of(const at::Tensor& t, int64_t (&out)[3]) {
  for (int d = 0; d < 3; ++d) out[d] = t.size(d) == 1 ? 0 : t.stride(d);
}

bool operand_vectorizable(const at::Tensor& t, int64_t head_dim, int elem_bytes) {
  int64_t strides[3];
  strides_of(t, strides);
  for (int64_t stride : strides) {
    if (!rows_vectorizable(t.const_data_ptr(), stride, head_dim, elem_bytes)) return false;
  }
  return true;
}

template <typename T>
Operand<T> make_operand(const at::Tensor& src, const at::Tensor& dst) {
  Operand<T> op{};
  op.src = const_data_ptr<T>(src);
  op.dst = data_ptr<T>(dst);
  strides_of(src, op.src_stride);
  strides_of(dst, op.dst_stride);
  op.heads = static_cast<int>(src.size(2));
  return op;
}

template <typename T, bool kVectorized, bool kInterleaved>
void launch(const RotaryParams<T>& base, cudaStream_t stream) {
  constexpr int V = chunk_elems<T, kVectorized, kInterleaved>();
  constexpr int P = kVectorized ? V : 1;
  RotaryParams<T> p = base;
  p.rotary_chunks = (kInterleaved ? 2 * p.half : p.half) / V;
  const int pass_dims = p.head_dim - 2 * p.half;
  p.pass_chunks = p.copy_pass_through ? pass_dims / P : 0;

  // x over chunks (at most 128), y over groups of kHeadsPerThread heads with an even share per
  // thread (at most 512 threads per token), z over tokens to fill small blocks up to 128 threads.
  const int heads = p.q.heads + p.k.heads;
  const int head_groups = static_cast<int>(ceil_div(heads, kHeadsPerThread));
  const int chunks = std::max(p.rotary_chunks, p.pass_chunks);
  const int bx = std::min(chunks, 128);
  const int max_by = std::max(1, 512 / bx);
  const int rounds = static_cast<int>(ceil_div(head_groups, max_by));
  const int by = static_cast<int>(ceil_div(head_groups, rounds));
  const int bz = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({p.tokens, 128 / (bx * by), 64})));  // blockDim.z <= 64
  const dim3 block(bx, by, bz);
  const int64_t blocks = ceil_div(p.tokens, bz);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "apply_rotary: too many tokens (", p.tokens, ")");
  rotary_kernel<T, kVectorized, kInterleaved><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rotary_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                 const std::optional<at::Tensor>& positions, bool interleaved, bool inverse, const at::Tensor& q_out,
                 const at::Tensor& k_out, const RotaryGeometry& g) {
  check_cuda_dtype(q, "q");
  if (g.tokens() == 0 || g.q_heads + g.k_heads == 0) return;
  TORCH_CHECK(g.q_heads + g.k_heads <= std::numeric_limits<int32_t>::max() && g.head_dim <= (1 << 30),
              "apply_rotary: head count or head_dim too large");
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  LLAMA_EXT_DISPATCH_CUDA_FLOATING(q.scalar_type(), "apply_rotary", [&] {
    RotaryParams<scalar_t> p{};
    p.q = make_operand<scalar_t>(q, q_out);
    p.k = make_operand<scalar_t>(k, k_out);
    p.tables = rotary_tables<float>(cos, sin, positions);
    p.tokens = g.tokens();
    p.seq = g.seq;
    p.max_position = g.max_position;
    p.head_dim = static_cast<int>(g.head_dim);
    p.half = static_cast<int>(g.half);
    p.inverse = inverse;
    p.copy_pass_through = !q_out.is_same(q);

    constexpr int kVec = vec_elems<scalar_t>();
    const int elem_bytes = sizeof(scalar_t);
    const int64_t rotary_span = interleaved ? 2 * g.half : g.half;  // chunked dim of the rotation
    const bool vectorized = rotary_span % kVec == 0 && operand_vectorizable(q, g.head_dim, elem_bytes) &&
                            operand_vectorizable(k, g.head_dim, elem_bytes) &&
                            operand_vectorizable(q_out, g.head_dim, elem_bytes) &&
                            operand_vectorizable(k_out, g.head_dim, elem_bytes);
    if (vectorized) {
      interleaved ? launch<scalar_t, true, true>(p, stream) : launch<scalar_t, true, false>(p, stream);
    } else {
      interleaved ? launch<scalar_t, false, true>(p, stream) : launch<scalar_t, false, false>(p, stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(llama_ext, CUDA, m) {
  m.impl("apply_rotary", &apply_rotary_forward<rotary_cuda>);
  m.impl("apply_rotary_", &apply_rotary_inplace<rotary_cuda>);
}

}  // namespace llama_ext::cuda
