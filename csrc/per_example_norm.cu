// Per-example squared norm of a linear layer's weight gradient on CUDA, without materialising it:
//   a (B, T, d) layer inputs, delta (B, T, p) output gradients:  out[b] = ||G_b||_F^2,  G_b = delta_b^T a_b  (p x d).
//
// Cost: 2 T d p flops per example (the same as the ordinary weight gradient) and one read of a and delta per output
// tile row/column; no B*p*d memory unless the caller asks for G (instantiate+keep: the tile is also written).
// Layout: block (tile, b) computes a kTileP x kTileD tile of G_b by walking T in steps of kTileT: delta[b, t0:t0+16,
// p-tile] and a[b, t0:t0+16, d-tile] are staged in shared memory (converted to Acc), and each of the 256 threads keeps
// a 4 x 4 sub-tile in registers (rows ty + 16 i, columns tx + 16 j: conflict-free shared reads and 64-byte coalesced
// writes of G). Out-of-range rows/columns are loaded as zeros, so they add nothing to the tile's sum of squares. The
// tile's sum is reduced in the block (warp shuffles) into workspace[b, tile]; a second kernel adds each example's
// tile sums in tile order (deterministic, no atomics). Accumulation in float32 (float64 for float64 inputs).
// No torch headers (raw pointers from bindings.cpp via ops.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_check.cuh"
#include "dispatch.h"
#include "ops.h"

namespace fastdp {
namespace {

constexpr int kTileP = 64, kTileD = 64, kTileT = 16;
static_assert(kTileP == kTileD, "the staging loop fills both tiles with one index");
constexpr int kThreads = 256;  // 16 x 16, each thread 4 x 4 outputs
constexpr int kMaxGridY = 65535;

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename A>
__device__ A block_sum(A x, A* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  A total = A(0);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  }
  return total;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    linear_sq_norm_tiles(const T* __restrict__ a, const T* __restrict__ delta, T* __restrict__ grads,
                         Acc<T>* __restrict__ partial, int64_t b0, int64_t T_, int64_t d, int64_t p) {
  using A = Acc<T>;
  __shared__ A sd[kTileT][kTileP];
  __shared__ A sa[kTileT][kTileD];
  __shared__ A scratch[kThreads / 32];

  const int64_t tiles_d = cdiv(d, kTileD);
  const int64_t tile = blockIdx.x;
  const int64_t p0 = (tile / tiles_d) * kTileP, d0 = (tile % tiles_d) * kTileD;
  const int64_t b = b0 + blockIdx.y;
  const T* ab = a + b * T_ * d;
  const T* db = delta + b * T_ * p;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  }

  for (int64_t t0 = 0; t0 < T_; t0 += kTileT) {
    // stage 16 x 64 of delta and of a: 1024 elements each, 4 per thread, consecutive threads on consecutive columns
#pragma unroll
    for (int r = 0; r < (kTileT * kTileP) / kThreads; ++r) {
      const int idx = threadIdx.x + r * kThreads;
      const int tt = idx / kTileP, cc = idx % kTileP;
      const int64_t t = t0 + tt;
      sd[tt][cc] = (t < T_ && p0 + cc < p) ? to_acc(db[t * p + p0 + cc]) : A(0);
      sa[tt][cc] = (t < T_ && d0 + cc < d) ? to_acc(ab[t * d + d0 + cc]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileT; ++k) {
      A dv[4], av[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) dv[i] = sd[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) av[j] = sa[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += dv[i] * av[j];
      }
    }
    __syncthreads();
  }

  A sq = A(0);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) sq += acc[i][j] * acc[i][j];
  }
  if (grads != nullptr) {
    T* gb = grads + b * p * d;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = p0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = d0 + tx + 16 * j;
        if (row < p && col < d) gb[row * d + col] = from_acc<T>(acc[i][j]);
      }
    }
  }
  const A total = block_sum(sq, scratch);
  if (threadIdx.x == 0) partial[b * gridDim.x + tile] = total;
}

// out[b] = sum over tiles of partial[b, :], one warp per example, fixed order: deterministic.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_tiles(const A* __restrict__ partial, A* __restrict__ out, int64_t B, int64_t tiles) {
  const int64_t b = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;
  A x = A(0);
  for (int64_t k = lane; k < tiles; k += 32) x += partial[b * tiles + k];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  if (lane == 0) out[b] = x;
}

template <typename T>
void launch(const void* a, const void* delta, void* grads, void* out, void* workspace, int64_t B, int64_t T_,
            int64_t d, int64_t p, cudaStream_t stream) {
  using A = Acc<T>;
  const int64_t tiles = cdiv(p, kTileP) * cdiv(d, kTileD);
  A* partial = static_cast<A*>(workspace);
  for (int64_t b0 = 0; tiles > 0 && b0 < B; b0 += kMaxGridY) {  // gridDim.y is at most 65535
    const dim3 grid(unsigned(tiles), unsigned(std::min<int64_t>(kMaxGridY, B - b0)));
    linear_sq_norm_tiles<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(delta),
                                                           static_cast<T*>(grads), partial, b0, T_, d, p);
    check_launch("linear_sq_norms tile kernel launch");
  }
  sum_tiles<A><<<unsigned(cdiv(B, kThreads / 32)), kThreads, 0, stream>>>(partial, static_cast<A*>(out), B, tiles);
  check_launch("linear_sq_norms reduction kernel launch");
}

}  // namespace

int64_t linear_sq_norm_workspace_elems(int64_t B, int64_t d, int64_t p) {
  return B * cdiv(p, kTileP) * cdiv(d, kTileD);
}

void linear_sq_norm_cuda(DType dtype, const void* a, const void* delta, void* grads, void* out, void* workspace,
                         int64_t B, int64_t T_, int64_t d, int64_t p, void* stream) {
  if (B == 0) return;
  FASTDP_DISPATCH_FLOATING(dtype, "linear_sq_norm_cuda", [&] {
    launch<scalar_t>(a, delta, grads, out, workspace, B, T_, d, p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace fastdp
