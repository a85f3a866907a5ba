// Clip-and-reduce on the CPU: S[j] = sum_i c_i G[i, j] for kept per-example gradients G (B, P), weights c (B,).
//
// Cost: B*P multiply-adds against B*P*sizeof(G) bytes read and P*sizeof(S) written; memory-bound (0.5 flop/byte in
// float32), so the goal is one streaming pass over G at the machine's bandwidth.
// Layout of the work: OpenMP over column chunks of kChunk elements; each chunk keeps an Acc accumulator of kChunk
// values in L1 and streams four rows of G at a time through it (four independent load streams per pass, a quarter of
// the accumulator loads/stores). Accumulation is in float32 for float32/bfloat16 G and float64 for float64 G; the sum
// over i runs in the same order for every column whatever the chunking, so results do not depend on the thread count.
// Rows of weight exactly 0 are not read: a dropped (non-finite) example may hold NaN, and 0 * nan = nan. They are
// left out of a list of the rows to read, made once per call, so the streaming loop stays branch-free.
#include <algorithm>
#include <vector>

#include "dispatch.h"
#include "ops.h"

namespace fastdp {
namespace {

constexpr int64_t kChunk = 2048;  // 8 KB of float32 accumulator (16 KB float64): stays in L1 next to the row streams

template <typename T, typename O>
FASTDP_HD void reduce_chunk(const T* __restrict g, const Acc<T>* __restrict c, const int64_t* __restrict rows,
                            O* __restrict out, int64_t B, int64_t P, int64_t j0, int64_t n) {
  using A = Acc<T>;
  alignas(64) A acc[kChunk];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] = A(0);
  int64_t i = 0;
  for (; i + 4 <= B; i += 4) {
    const T* __restrict g0 = g + rows[i] * P + j0;
    const T* __restrict g1 = g + rows[i + 1] * P + j0;
    const T* __restrict g2 = g + rows[i + 2] * P + j0;
    const T* __restrict g3 = g + rows[i + 3] * P + j0;
    const A c0 = c[rows[i]], c1 = c[rows[i + 1]], c2 = c[rows[i + 2]], c3 = c[rows[i + 3]];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      acc[j] += ((c0 * to_acc(g0[j]) + c1 * to_acc(g1[j])) + c2 * to_acc(g2[j])) + c3 * to_acc(g3[j]);
    }
  }
  for (; i < B; ++i) {
    const T* __restrict gi = g + rows[i] * P + j0;
    const A ci = c[rows[i]];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += ci * to_acc(gi[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j0 + j] = from_acc<O>(acc[j]);
}

// One chunk per call; the ISA clones are resolved once per process.
#define FASTDP_CLIP_REDUCE_CHUNK(NAME, T, O)                                                                 \
  FASTDP_CPU_CLONES void NAME(const T* g, const Acc<T>* c, const int64_t* rows, O* out, int64_t B, int64_t P, \
                              int64_t j0, int64_t n) {                                                       \
    reduce_chunk<T, O>(g, c, rows, out, B, P, j0, n);                                                        \
  }
FASTDP_CLIP_REDUCE_CHUNK(chunk_f32, float, float)
FASTDP_CLIP_REDUCE_CHUNK(chunk_f64, double, double)
FASTDP_CLIP_REDUCE_CHUNK(chunk_bf16, bf16, bf16)
FASTDP_CLIP_REDUCE_CHUNK(chunk_bf16_f32, bf16, float)
#undef FASTDP_CLIP_REDUCE_CHUNK

template <typename T, typename O, typename F>
void run(F chunk_fn, const void* grads, const void* weights, void* out, int64_t B, int64_t P, int num_threads) {
  const T* g = static_cast<const T*>(grads);
  const Acc<T>* c = static_cast<const Acc<T>*>(weights);
  O* o = static_cast<O*>(out);
  std::vector<int64_t> rows;  // the rows of nonzero weight, in order: B below is their count
  rows.reserve(B);
  for (int64_t i = 0; i < B; ++i) {
    if (c[i] != Acc<T>(0)) rows.push_back(i);
  }
  B = static_cast<int64_t>(rows.size());
  const int64_t nchunks = (P + kChunk - 1) / kChunk;
  // below ~64K multiply-adds a parallel region costs more than it saves
  const bool parallel = num_threads > 1 && nchunks > 1 && B * P >= (int64_t(1) << 16);
  (void)parallel;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t k = 0; k < nchunks; ++k) {
    const int64_t j0 = k * kChunk;
    chunk_fn(g, c, rows.data(), o, B, P, j0, std::min(kChunk, P - j0));
  }
}

}  // namespace

void clip_reduce_cpu(DType grads_dtype, DType out_dtype, const void* grads, const void* weights, void* out, int64_t B,
                     int64_t P, int num_threads) {
  num_threads = std::max(num_threads, 1);
  if (grads_dtype == DType::Float32 && out_dtype == DType::Float32) {
    run<float, float>(chunk_f32, grads, weights, out, B, P, num_threads);
  } else if (grads_dtype == DType::Float64 && out_dtype == DType::Float64) {
    run<double, double>(chunk_f64, grads, weights, out, B, P, num_threads);
  } else if (grads_dtype == DType::BFloat16 && out_dtype == DType::BFloat16) {
    run<bf16, bf16>(chunk_bf16, grads, weights, out, B, P, num_threads);
  } else if (grads_dtype == DType::BFloat16 && out_dtype == DType::Float32) {
    run<bf16, float>(chunk_bf16_f32, grads, weights, out, B, P, num_threads);
  } else {
    throw std::invalid_argument(std::string("clip_reduce_cpu: unsupported dtypes grads ") + dtype_name(grads_dtype) +
                                ", out " + dtype_name(out_dtype));
  }
}

}  // namespace fastdp
