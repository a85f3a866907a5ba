// Noisy optimizer step on CUDA, all parameters in one launch (multi_tensor_apply.cuh):
//   g = (S + std * z) / B,  z = the Philox stream of fastdp/philox.py (philox.h) at (seed, step),
// then torch.optim.SGD / Adam(W) in place (optim_update.h, shared with the CPU kernel).
//
// Cost: memory-bound. Per element SGD+momentum reads p, S, buf and writes p, buf (20 bytes in float32), Adam 28 bytes;
// the noise is one Philox4x32-10 (20 IMAD.HI/IMUL) + 2 logf + 2 sqrtf + 2 sincosf per 4 elements, well under the
// bandwidth time on sm_80/sm_90.
// Layout: a thread owns one Philox group g (global elements 4g .. 4g+3) of its block's chunk; where the tensor's noise
// offset is a multiple of 4 and the pointers are 16-byte aligned (the common case) the four elements move as one
// 16-byte vector per array, otherwise element by element (groups that straddle two tensors or chunk ends are drawn by
// both sides, identically).
// No torch headers: bindings.cpp passes raw pointers (ops.h); CMakeLists.txt compiles this file with plain nvcc.
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <vector>

#include "cuda_check.cuh"
#include "dispatch.h"
#include "multi_tensor_apply.cuh"
#include "ops.h"
#include "optim_update.h"
#include "philox.h"

namespace fastdp {
namespace {

constexpr int kThreads = 256;

struct NoiseKey {
  uint64_t seed, step;
  bool draw;
};

// Four consecutive elements, 16-byte moves (float4; two double2 for float64).
__device__ __forceinline__ void load4(const float* p, float (&x)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x;
  x[1] = v.y;
  x[2] = v.z;
  x[3] = v.w;
}
__device__ __forceinline__ void store4(float* p, const float (&x)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}
__device__ __forceinline__ void load4(const double* p, double (&x)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
  x[0] = a.x;
  x[1] = a.y;
  x[2] = b.x;
  x[3] = b.y;
}
__device__ __forceinline__ void store4(double* p, const double (&x)[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(x[0], x[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(x[2], x[3]);
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Optimizer-specific part: DEPTH addresses per tensor and the update of 1 or 4 elements.
template <typename T, bool kMomentum>
struct SgdOp {
  static constexpr int kDepth = kMomentum ? 3 : 2;  // param, sum, [momentum buffer]
  using Coef = SgdCoef<T>;

  __device__ static void one(void* const* ptr, int64_t j, float z, const Coef& h) {
    const T* s = static_cast<const T*>(ptr[1]);
    T unused = T(0);
    T* buf = &unused;
    if constexpr (kMomentum) buf = static_cast<T*>(ptr[2]) + j;
    sgd_update<T, kMomentum>(static_cast<T*>(ptr[0])[j], s ? s[j] : T(0), *buf, z, h);
  }
  __device__ static void four(void* const* ptr, int64_t j, const float (&z)[4], const Coef& h) {
    T p[4], s[4] = {T(0), T(0), T(0), T(0)}, b[4] = {T(0), T(0), T(0), T(0)};
    load4(static_cast<T*>(ptr[0]) + j, p);
    if (ptr[1]) load4(static_cast<const T*>(ptr[1]) + j, s);
    if constexpr (kMomentum) {
      if (!h.first_step) load4(static_cast<T*>(ptr[2]) + j, b);
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) sgd_update<T, kMomentum>(p[l], s[l], b[l], z[l], h);
    store4(static_cast<T*>(ptr[0]) + j, p);
    if constexpr (kMomentum) store4(static_cast<T*>(ptr[2]) + j, b);
  }
};

template <typename T>
struct AdamOp {
  static constexpr int kDepth = 4;  // param, sum, exp_avg, exp_avg_sq
  using Coef = AdamCoef<T>;

  __device__ static void one(void* const* ptr, int64_t j, float z, const Coef& h) {
    const T* s = static_cast<const T*>(ptr[1]);
    adam_update<T>(static_cast<T*>(ptr[0])[j], s ? s[j] : T(0), static_cast<T*>(ptr[2])[j],
                   static_cast<T*>(ptr[3])[j], z, h);
  }
  __device__ static void four(void* const* ptr, int64_t j, const float (&z)[4], const Coef& h) {
    T p[4], s[4] = {T(0), T(0), T(0), T(0)}, m[4], v[4];
    load4(static_cast<T*>(ptr[0]) + j, p);
    if (ptr[1]) load4(static_cast<const T*>(ptr[1]) + j, s);
    load4(static_cast<T*>(ptr[2]) + j, m);
    load4(static_cast<T*>(ptr[3]) + j, v);
#pragma unroll
    for (int l = 0; l < 4; ++l) adam_update<T>(p[l], s[l], m[l], v[l], z[l], h);
    store4(static_cast<T*>(ptr[0]) + j, p);
    store4(static_cast<T*>(ptr[2]) + j, m);
    store4(static_cast<T*>(ptr[3]) + j, v);
  }
};

template <typename Op>
__global__ void __launch_bounds__(kThreads)
    noisy_step_kernel(mta::Table<Op::kDepth> table, int64_t chunk, typename Op::Coef h, NoiseKey key) {
  constexpr int D = Op::kDepth;
  const int t = table.block_tensor[blockIdx.x];
  const int64_t n = table.numel[t], off = table.offset[t];
  const int64_t j0 = int64_t(table.block_chunk[blockIdx.x]) * chunk;
  const int64_t j1 = j0 + chunk < n ? j0 + chunk : n;
  void* ptr[D];
  bool vec = (off & 3) == 0;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    ptr[d] = table.ptr[d][t];
    vec = vec && aligned16(ptr[d]);  // nullptr (no sum) is aligned
  }
  const int64_t g_first = (off + j0) >> 2, g_last = (off + j1 - 1) >> 2;
  for (int64_t g = g_first + threadIdx.x; g <= g_last; g += kThreads) {
    float z[4] = {0.f, 0.f, 0.f, 0.f};
    if (key.draw) {
      const philox::Normals r = philox::group_normals(uint64_t(g), key.step, key.seed);
      z[0] = r.z0;
      z[1] = r.z1;
      z[2] = r.z2;
      z[3] = r.z3;
    }
    const int64_t jb = 4 * g - off;  // local index of the group's lane 0
    if (vec && jb >= j0 && jb + 4 <= j1) {
      Op::four(ptr, jb, z, h);
    } else {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (jb + l >= j0 && jb + l < j1) Op::one(ptr, jb + l, z[l], h);
      }
    }
  }
}

template <typename Op>
void launch_step(const StepTensors& t, const typename Op::Coef& h, const NoiseArgs& noise, cudaStream_t stream,
                 const char* what) {
  constexpr int D = Op::kDepth;
  std::vector<std::array<void*, D>> ptrs(t.params.size());
  for (size_t k = 0; k < t.params.size(); ++k) {
    ptrs[k][0] = t.params[k];
    ptrs[k][1] = const_cast<void*>(t.sums[k]);
    if constexpr (D > 2) ptrs[k][2] = t.state1[k];
    if constexpr (D > 3) ptrs[k][3] = t.state2[k];
  }
  const NoiseKey key{noise.seed, noise.step, noise.std != 0.0};
  mta::apply<D>(ptrs, t.numels, t.offsets, [&](const mta::Table<D>& table, int nblocks, int64_t chunk) {
    noisy_step_kernel<Op><<<nblocks, kThreads, 0, stream>>>(table, chunk, h, key);
    check_launch(what);
  });
}

__global__ void __launch_bounds__(kThreads)
    philox_normal_kernel(float* out, int64_t n, uint64_t seed, uint64_t step, int64_t offset) {
  const int64_t g_first = offset >> 2, g_last = (offset + n - 1) >> 2;
  for (int64_t g = g_first + int64_t(blockIdx.x) * kThreads + threadIdx.x; g <= g_last;
       g += int64_t(gridDim.x) * kThreads) {
    const philox::Normals r = philox::group_normals(uint64_t(g), step, seed);
    const float z[4] = {r.z0, r.z1, r.z2, r.z3};
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t k = 4 * g + l - offset;
      if (k >= 0 && k < n) out[k] = z[l];
    }
  }
}

}  // namespace

void noisy_sgd_step_cuda(const StepTensors& t, const NoiseArgs& noise, const SgdArgs& a, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool momentum = a.momentum != 0.0;
  FASTDP_DISPATCH_FP32_FP64(t.dtype, "noisy_sgd_step_cuda", [&] {
    const SgdCoef<scalar_t> h = SgdCoef<scalar_t>::make(noise, a);
    if (momentum) {
      launch_step<SgdOp<scalar_t, true>>(t, h, noise, s, "noisy_sgd_step_ (momentum) kernel launch");
    } else {
      launch_step<SgdOp<scalar_t, false>>(t, h, noise, s, "noisy_sgd_step_ kernel launch");
    }
  });
}

void noisy_adam_step_cuda(const StepTensors& t, const NoiseArgs& noise, const AdamArgs& a, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  FASTDP_DISPATCH_FP32_FP64(t.dtype, "noisy_adam_step_cuda", [&] {
    launch_step<AdamOp<scalar_t>>(t, AdamCoef<scalar_t>::make(noise, a), noise, s, "noisy_adam_step_ kernel launch");
  });
}

void philox_normal_cuda(float* out, int64_t n, uint64_t seed, uint64_t step, int64_t offset, void* stream) {
  if (n <= 0) return;
  const int64_t groups = ((offset + n - 1) >> 2) - (offset >> 2) + 1;
  const int64_t blocks = std::min<int64_t>((groups + kThreads - 1) / kThreads, 65535);
  philox_normal_kernel<<<int(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(out, n, seed, step, offset);
  check_launch("philox_normal_ kernel launch");
}

}  // namespace fastdp
