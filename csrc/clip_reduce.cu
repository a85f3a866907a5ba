// Clip-and-reduce on CUDA: S[j] = sum_i c_i G[i, j] for kept per-example gradients G (B, P), weights c (B,).
//
// Cost: B*P multiply-adds against B*P*sizeof(G) bytes read: memory-bound (0.5 flop/byte in float32), so the kernel is
// one coalesced streaming pass over G, parallel over columns *and* rows.
// Layout: a block is 32 lanes x 8 row groups. Lane l owns kVec consecutive columns of the block's 32*kVec (16-byte
// loads of float32 when P and the pointers allow; bfloat16 moves 8 bytes, float64 two 16-byte loads): a warp reads
// 512 contiguous bytes of one row. Row group r walks rows lo + r, lo + r + 8, ... of the block's row range, keeping
// kVec Acc accumulators in registers (float32 for float32/bfloat16 G, float64 for float64); several rows' loads are
// in flight (unrolled). The 8 groups' sums are added in group order through shared memory. When the column blocks
// alone cannot fill the GPU (a bias of 16 to 512 entries, a small layer), the rows are split over gridDim.y (at
// least kMinRowsPerSplit rows each, ~4 blocks per SM): each split writes its fp32 partial row to a (splits, P)
// workspace and a second kernel adds the partials in split order. A thread never walks more than
// ceil(B / (8 splits)) rows (the previous kernel walked all B rows in one thread: 4096 serial loads for a bias over a
// batch of 4096). Every sum runs in a fixed order for every column: deterministic, no atomics. A row of weight exactly
// 0 is skipped, not multiplied (a dropped, non-finite example may hold NaN and 0 * nan = nan); a warp's lanes read
// the same row, so the branch never diverges.
// No torch headers (raw pointers from bindings.cpp via ops.h).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.cuh"
#include "dispatch.h"
#include "ops.h"

namespace fastdp {
namespace {

constexpr int kLanes = 32, kRowGroups = 8, kThreads = kLanes * kRowGroups;
// a split's rows: enough that the fp32 partials (4 bytes per column per split, written and read once) stay a few
// percent of the traffic of G itself
constexpr int64_t kMinRowsPerSplit = 64;
constexpr int64_t kMaxGridY = 65535;

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
    clip_reduce_kernel(const T* __restrict__ g, const Acc<T>* __restrict__ c, O* __restrict__ out,
                       Acc<T>* __restrict__ partial, int64_t B, int64_t P, int64_t rows_per_split) {
  using A = Acc<T>;
  // [group - 1][v][lane]: lanes on consecutive words, no bank conflicts
  __shared__ A sums[kRowGroups - 1][kVec][kLanes];
  const int lane = threadIdx.x % kLanes, group = threadIdx.x / kLanes;
  const int64_t j = (int64_t(blockIdx.x) * kLanes + lane) * kVec;
  const int64_t lo = int64_t(blockIdx.y) * rows_per_split;
  const int64_t hi = lo + rows_per_split < B ? lo + rows_per_split : B;
  A acc[kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) acc[v] = A(0);
  if (j < P) {  // kVec = 4 only when P % 4 == 0: a lane's columns are all in range or all out
    const T* col = g + j;
#pragma unroll 4
    for (int64_t i = lo + group; i < hi; i += kRowGroups) {
      const A ci = __ldg(c + i);
      if (ci == A(0)) continue;
      A x[kVec];
      Loader<kVec, T>::load(col + i * P, x);
#pragma unroll
      for (int v = 0; v < kVec; ++v) acc[v] += ci * x[v];
    }
  }
  if (group > 0) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) sums[group - 1][v][lane] = acc[v];
  }
  __syncthreads();
  if (group != 0 || j >= P) return;
#pragma unroll
  for (int r = 0; r < kRowGroups - 1; ++r) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[v] += sums[r][v][lane];
  }
  if (partial != nullptr) {
#pragma unroll
    for (int v = 0; v < kVec; ++v) partial[int64_t(blockIdx.y) * P + j + v] = acc[v];
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) out[j + v] = from_acc<O>(acc[v]);
  }
}

// out[j] = sum over splits s (in order) of partial[s, j]
template <typename A, typename O>
__global__ void __launch_bounds__(kThreads)
    sum_splits(const A* __restrict__ partial, O* __restrict__ out, int64_t splits, int64_t P) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= P) return;
  A s = A(0);
  for (int64_t k = 0; k < splits; ++k) s += partial[k * P + j];
  out[j] = from_acc<O>(s);
}

// Row splits for (B, P) on the current device: ~4 blocks per SM in all, at least kMinRowsPerSplit rows each.
int64_t row_splits(int64_t B, int64_t P) {
  int device = 0, sms = 1;
  cuda_check(cudaGetDevice(&device), "clip_reduce: cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "clip_reduce: SM count");
  const int64_t col_blocks = cdiv(P, kLanes * 4);
  int64_t splits = cdiv(4 * int64_t(sms), col_blocks);
  splits = splits < cdiv(B, kMinRowsPerSplit) ? splits : cdiv(B, kMinRowsPerSplit);
  splits = splits < kMaxGridY ? splits : kMaxGridY;
  return splits > 1 ? splits : 1;
}

template <typename T, typename O>
void launch(const void* grads, const void* weights, void* out, void* workspace, int64_t B, int64_t P,
            cudaStream_t stream) {
  using A = Acc<T>;
  const T* g = static_cast<const T*>(grads);
  const A* c = static_cast<const A*>(weights);
  O* o = static_cast<O*>(out);
  // B == 0: one split of no rows writes zeros
  const int64_t rows = B > 0 ? cdiv(B, row_splits(B, P)) : 1;
  const int64_t splits = B > 0 ? cdiv(B, rows) : 1;
  A* partial = splits > 1 ? static_cast<A*>(workspace) : nullptr;
  // 4 columns per lane need P % 4 == 0 (every row starts aligned) and the base pointer aligned to 4 elements
  const uintptr_t align = 4 * sizeof(T);
  const bool vec = P % 4 == 0 && reinterpret_cast<uintptr_t>(g) % align == 0;
  if (vec) {
    const dim3 grid(unsigned(cdiv(P, kLanes * 4)), unsigned(splits));
    clip_reduce_kernel<T, O, 4><<<grid, kThreads, 0, stream>>>(g, c, o, partial, B, P, rows);
  } else {
    const dim3 grid(unsigned(cdiv(P, kLanes)), unsigned(splits));
    clip_reduce_kernel<T, O, 1><<<grid, kThreads, 0, stream>>>(g, c, o, partial, B, P, rows);
  }
  check_launch("clip_reduce kernel launch");
  if (partial != nullptr) {
    sum_splits<A, O><<<unsigned(cdiv(P, kThreads)), kThreads, 0, stream>>>(partial, o, splits, P);
    check_launch("clip_reduce split-sum kernel launch");
  }
}

}  // namespace

int64_t clip_reduce_workspace_elems(int64_t B, int64_t P) {
  if (B == 0 || P == 0) return 0;
  const int64_t splits = cdiv(B, cdiv(B, row_splits(B, P)));  // as launch() splits
  return splits > 1 ? splits * P : 0;
}

void clip_reduce_cuda(DType grads_dtype, DType out_dtype, const void* grads, const void* weights, void* out,
                      void* workspace, int64_t B, int64_t P, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (grads_dtype == DType::Float32 && out_dtype == DType::Float32) {
    launch<float, float>(grads, weights, out, workspace, B, P, s);
  } else if (grads_dtype == DType::Float64 && out_dtype == DType::Float64) {
    launch<double, double>(grads, weights, out, workspace, B, P, s);
  } else if (grads_dtype == DType::BFloat16 && out_dtype == DType::BFloat16) {
    launch<bf16, bf16>(grads, weights, out, workspace, B, P, s);
  } else if (grads_dtype == DType::BFloat16 && out_dtype == DType::Float32) {
    launch<bf16, float>(grads, weights, out, workspace, B, P, s);
  } else {
    throw std::invalid_argument(std::string("clip_reduce_cuda: unsupported dtypes grads ") + dtype_name(grads_dtype) +
                                ", out " + dtype_name(out_dtype));
  }
}

}  // namespace fastdp
