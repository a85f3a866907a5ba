// The shifted ghost norm's summed Gram matrix on CUDA (maths: shifted_gram_cpu.cpp, ops.h):
//
//   S[b, k1, t, k2, s] = sum_o X[b, k1, t + a_o, k2, s + a_o]
//
// One thread per output element, in a grid-stride loop; consecutive threads take consecutive s, so every offset's
// reads of X are coalesced rows, and the k^n reads of one source element by neighbouring outputs hit L1/L2. Memory
// traffic is one write of S and about one read of X, where the torch path's 2k box additions pass over the Gram
// chunk 2k times, each a launch. The offsets are added in the order of the CPU kernel (o_1 outermost), with no
// contraction possible (additions only): both give the same bits.
// No torch headers (raw pointers from bindings.cpp via ops.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_check.cuh"
#include "dispatch.h"
#include "ops.h"

namespace fastdp {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) shifted_gram_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                                 const ShiftGeometry g, int64_t total) {
  const int64_t O = g.out_numel, I = g.in_numel, K = g.views;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t s = e % O, k2 = (e / O) % K, t = (e / (K * O)) % O, bk = e / (K * O * O);
    const int64_t t0 = t / (g.out[1] * g.out[2]), t1 = (t / g.out[2]) % g.out[1], t2 = t % g.out[2];
    const int64_t s0 = s / (g.out[1] * g.out[2]), s1 = (s / g.out[2]) % g.out[1], s2 = s % g.out[2];
    const T* __restrict__ base = x + bk * I * K * I + k2 * I;
    T acc = T(0);
    for (int64_t o0 = 0; o0 < g.kernel[0]; ++o0) {
      const int64_t a0 = o0 * g.dilation[0] - g.padding[0], u0 = t0 + a0, v0 = s0 + a0;
      if (u0 < 0 || u0 >= g.in[0] || v0 < 0 || v0 >= g.in[0]) continue;
      for (int64_t o1 = 0; o1 < g.kernel[1]; ++o1) {
        const int64_t a1 = o1 * g.dilation[1] - g.padding[1], u1 = t1 + a1, v1 = s1 + a1;
        if (u1 < 0 || u1 >= g.in[1] || v1 < 0 || v1 >= g.in[1]) continue;
        for (int64_t o2 = 0; o2 < g.kernel[2]; ++o2) {
          const int64_t a2 = o2 * g.dilation[2] - g.padding[2], u2 = t2 + a2, v2 = s2 + a2;
          if (u2 < 0 || u2 >= g.in[2] || v2 < 0 || v2 >= g.in[2]) continue;
          const int64_t u = (u0 * g.in[1] + u1) * g.in[2] + u2, v = (v0 * g.in[1] + v1) * g.in[2] + v2;
          acc += base[u * K * I + v];
        }
      }
    }
    out[e] = acc;
  }
}

template <typename T>
void launch(const void* gram, void* out, const ShiftGeometry& g, int64_t n, cudaStream_t stream) {
  const int64_t total = n * g.views * g.out_numel * g.views * g.out_numel;
  if (total == 0) return;
  int device = 0, sms = 1;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  // enough blocks to fill every SM several times over; the grid-stride loop takes the rest
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(sms) * 32);
  shifted_gram_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(static_cast<const T*>(gram), static_cast<T*>(out),
                                                                     g, total);
  check_launch("shifted_gram_kernel");
}

}  // namespace

void shifted_gram_cuda(DType dtype, const void* gram, void* out, const ShiftGeometry& g, int64_t n, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (dtype == DType::Float32) {
    launch<float>(gram, out, g, n, s);
  } else if (dtype == DType::Float64) {
    launch<double>(gram, out, g, n, s);
  } else {
    throw std::invalid_argument(std::string("shifted_gram_cuda: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace fastdp
