// Clip-and-reduce on CUDA: S[j] = sum_i c_i G[i, j] for kept per-example gradients G (B, P), weights c (B,).
//
// Cost: B*P multiply-adds against B*P*sizeof(G) bytes read: memory-bound (0.5 flop/byte in float32), so the kernel is
// one coalesced streaming pass over G. Each thread owns kVec consecutive columns (16-byte loads of float32 when P and
// the pointers allow; bfloat16 moves 8 bytes, float64 two 16-byte loads) and walks the B rows, keeping kVec Acc
// accumulators in registers (float32 for float32/bfloat16 G, float64 for float64); the row loop is unrolled so that
// several rows' loads are in flight. The weights are read through the read-only cache (every thread of a warp reads
// the same c_i: one broadcast). The sum over i runs in row order for every column: deterministic. A row of weight
// exactly 0 is skipped, not multiplied (a dropped, non-finite example may hold NaN and 0 * nan = nan); c_i is the same
// for the whole grid, so the branch never diverges.
// No torch headers (raw pointers from bindings.cpp via ops.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.cuh"
#include "dispatch.h"
#include "ops.h"

namespace fastdp {
namespace {

constexpr int kThreads = 256;

template <int kVec, typename T>
struct Loader;

template <typename T>
struct Loader<1, T> {
  __device__ static void load(const T* p, Acc<T> (&x)[1]) { x[0] = to_acc(p[0]); }
};
template <>
struct Loader<4, float> {
  __device__ static void load(const float* p, float (&x)[4]) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  }
};
template <>
struct Loader<4, double> {
  __device__ static void load(const double* p, double (&x)[4]) {
    const double2 a = __ldg(reinterpret_cast<const double2*>(p)), b = __ldg(reinterpret_cast<const double2*>(p) + 1);
    x[0] = a.x;
    x[1] = a.y;
    x[2] = b.x;
    x[3] = b.y;
  }
};
template <>
struct Loader<4, bf16> {
  __device__ static void load(const bf16* p, float (&x)[4]) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));  // 4 bfloat16 = 8 bytes
    x[0] = bits_to_float(v.x << 16);
    x[1] = bits_to_float(v.x & 0xffff0000u);
    x[2] = bits_to_float(v.y << 16);
    x[3] = bits_to_float(v.y & 0xffff0000u);
  }
};

template <typename T, typename O, int kVec>
__global__ void __launch_bounds__(kThreads)
    clip_reduce_kernel(const T* __restrict__ g, const Acc<T>* __restrict__ c, O* __restrict__ out, int64_t B,
                       int64_t P) {
  using A = Acc<T>;
  const int64_t j = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (j >= P) return;
  A acc[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) acc[v] = A(0);
  const T* col = g + j;
#pragma unroll 4
  for (int64_t i = 0; i < B; ++i) {
    const A ci = __ldg(c + i);
    if (ci == A(0)) continue;
    A x[kVec];
    Loader<kVec, T>::load(col + i * P, x);
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] += ci * x[v];
  }
#pragma unroll
  for (int v = 0; v < kVec; ++v) out[j + v] = from_acc<O>(acc[v]);
}

template <typename T, typename O>
void launch(const void* grads, const void* weights, void* out, int64_t B, int64_t P, cudaStream_t stream) {
  const T* g = static_cast<const T*>(grads);
  const Acc<T>* c = static_cast<const Acc<T>*>(weights);
  O* o = static_cast<O*>(out);
  // 4 columns per thread need P % 4 == 0 (every row starts aligned) and the base pointer aligned to 4 elements
  const uintptr_t align = 4 * sizeof(T);
  const bool vec = P % 4 == 0 && reinterpret_cast<uintptr_t>(g) % align == 0;
  if (vec) {
    const int64_t blocks = (P / 4 + kThreads - 1) / kThreads;
    clip_reduce_kernel<T, O, 4><<<unsigned(blocks), kThreads, 0, stream>>>(g, c, o, B, P);
  } else {
    const int64_t blocks = (P + kThreads - 1) / kThreads;
    clip_reduce_kernel<T, O, 1><<<unsigned(blocks), kThreads, 0, stream>>>(g, c, o, B, P);
  }
  check_launch("clip_reduce kernel launch");
}

}  // namespace

void clip_reduce_cuda(DType grads_dtype, DType out_dtype, const void* grads, const void* weights, void* out,
                      int64_t B, int64_t P, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (grads_dtype == DType::Float32 && out_dtype == DType::Float32) {
    launch<float, float>(grads, weights, out, B, P, s);
  } else if (grads_dtype == DType::Float64 && out_dtype == DType::Float64) {
    launch<double, double>(grads, weights, out, B, P, s);
  } else if (grads_dtype == DType::BFloat16 && out_dtype == DType::BFloat16) {
    launch<bf16, bf16>(grads, weights, out, B, P, s);
  } else if (grads_dtype == DType::BFloat16 && out_dtype == DType::Float32) {
    launch<bf16, float>(grads, weights, out, B, P, s);
  } else {
    throw std::invalid_argument(std::string("clip_reduce_cuda: unsupported dtypes grads ") + dtype_name(grads_dtype) +
                                ", out " + dtype_name(out_dtype));
  }
}

}  // namespace fastdp
