// The shifted ghost norm's summed Gram matrix on CUDA (maths: shifted_gram_cpu.cpp, ops.h):
//
//   S[b, k1, t, k2, s] = sum_o X[b, k1, t + a_o, k2, s + a_o]
//
// Layout: a block row (threadIdx.y) owns one output row (t, k2) of the planes (b, k1) grid y walks, a run of O
// contiguous outputs, and its threadIdx.x lanes stride over s: consecutive lanes take consecutive s, so every
// offset's reads of X are coalesced and the k^n reads of one source element by neighbouring outputs hit L1/L2. The
// row's index arithmetic is done once per thread, and whether t + a_o is inside the input is the same for the whole
// row (no divergence); only s is decomposed per output. All of it in 32-bit (64-bit division is a called routine
// on the GPU, and its register saves spilled), the flat indices into X and S in 64-bit. Memory traffic is one write of S and about one read of X, where the
// torch path's 2k box additions pass over the Gram chunk 2k times, each a launch. The offsets are added in the order
// of the CPU kernel (o_1 outermost), with no contraction possible (additions only): both give the same bits.
// No torch headers (raw pointers from bindings.cpp via ops.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>

#include "cuda_check.cuh"
#include "dispatch.h"
#include "ops.h"

namespace fastdp {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) shifted_gram_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                                 const ShiftGeometry g, int64_t planes) {
  // spatial sizes, offsets and positions in 32-bit (a side is far below 2^31), flat indices in 64-bit
  const int O = int(g.out_numel), K = int(g.views);
  const int64_t I = g.in_numel, stride = int64_t(K) * I;
  // the row within its plane: r = t * K + k2 (a plane is one (b, k1): K O rows of O outputs)
  const int r = int(blockIdx.x) * int(blockDim.y) + int(threadIdx.y);
  if (r >= K * O) return;
  const int k2 = r % K, t = r / K;
  const int in0 = int(g.in[0]), in1 = int(g.in[1]), in2 = int(g.in[2]), out1 = int(g.out[1]), out2 = int(g.out[2]);
  const int t0 = t / (out1 * out2), t1 = (t / out2) % out1, t2 = t % out2;
  for (int64_t bk = blockIdx.y; bk < planes; bk += gridDim.y) {
    // X[b, k1, :, k2, :] and the output row
    const T* __restrict__ base = x + bk * I * stride + int64_t(k2) * I;
    T* __restrict__ dst = out + (bk * K * O + r) * int64_t(O);
    for (int s = threadIdx.x; s < O; s += blockDim.x) {
      const int s0 = s / (out1 * out2), s1 = (s / out2) % out1, s2 = s % out2;
      T acc = T(0);
      // not unrolled: k^n is small and a run-time value, and unrolled copies of the three loops spilled registers
#pragma unroll 1
      for (int o0 = 0; o0 < int(g.kernel[0]); ++o0) {
        const int a0 = o0 * int(g.dilation[0]) - int(g.padding[0]), u0 = t0 + a0, v0 = s0 + a0;
        if (u0 < 0 || u0 >= in0 || v0 < 0 || v0 >= in0) continue;
#pragma unroll 1
        for (int o1 = 0; o1 < int(g.kernel[1]); ++o1) {
          const int a1 = o1 * int(g.dilation[1]) - int(g.padding[1]), u1 = t1 + a1, v1 = s1 + a1;
          if (u1 < 0 || u1 >= in1 || v1 < 0 || v1 >= in1) continue;
#pragma unroll 1
          for (int o2 = 0; o2 < int(g.kernel[2]); ++o2) {
            const int a2 = o2 * int(g.dilation[2]) - int(g.padding[2]), u2 = t2 + a2, v2 = s2 + a2;
            if (u2 < 0 || u2 >= in2 || v2 < 0 || v2 >= in2) continue;
            const int u = (u0 * in1 + u1) * in2 + u2, v = (v0 * in1 + v1) * in2 + v2;
            acc += base[int64_t(u) * stride + v];
          }
        }
      }
      dst[s] = acc;
    }
  }
}

template <typename T>
void launch(const void* gram, void* out, const ShiftGeometry& g, int64_t n, cudaStream_t stream) {
  const int64_t planes = n * g.views, plane_rows = g.views * g.out_numel;
  if (planes == 0 || plane_rows == 0) return;
  // the 32-bit row index r < K O (bindings.cpp bounds a side of S, K O, below 2^31)
  if (plane_rows > int64_t(INT32_MAX)) throw std::invalid_argument("shifted_gram_cuda: a side of S exceeds 2^31 - 1");
  // lanes over s (whole warps), rows filling the rest of the block; planes over grid y (a loop beyond 65535)
  const int lanes = int(std::min<int64_t>(kThreads, (g.out_numel + 31) / 32 * 32));
  const int rows_per_block = kThreads / lanes;
  const int64_t blocks_x = (plane_rows + rows_per_block - 1) / rows_per_block;
  const dim3 grid(unsigned(blocks_x), unsigned(std::min<int64_t>(planes, 65535)));
  shifted_gram_kernel<T><<<grid, dim3(lanes, rows_per_block), 0, stream>>>(static_cast<const T*>(gram),
                                                                           static_cast<T*>(out), g, planes);
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
