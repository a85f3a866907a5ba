// The shifted ghost norm's summed Gram matrix on the CPU (fastdp/rules/conv_ghost.py, shifted_ghost):
//
//   S[b, k1, t, k2, s] = sum_o X[b, k1, t + a_o, k2, s + a_o]      a_o = o * dilation - padding (per spatial axis)
//
// where X (n, K, I, K, I) is the Gram matrix of a stride-1 convolution's unpadded input over channels (K views of I
// input positions each), t and s run over the O output positions and a term is zero when t + a_o or s + a_o falls
// in the padding. S is then a_t . a_s, the dot product of the input patches of output positions t and s.
//
// One pass: each output row (b, k1, t) stays in L1/L2 while the k^n source rows it sums are read once each, where
// the torch path makes 2k box additions, each a pass over the whole Gram chunk (so it had to keep chunks small enough
// for cache, and paid ~2k launches per chunk). The sum over offsets runs in the same order (o_1 outermost) for every
// element, whatever the thread count: results are reproducible, and the CUDA kernel (shifted_gram.cu) adds in the
// same order, so both give the same bits.
#include <algorithm>
#include <vector>

#include "dispatch.h"
#include "ops.h"

namespace fastdp {
namespace {

// The offsets of the kernel, with what each row of the output needs of them.
struct Offsets {
  std::vector<int64_t> a;      // (k^3, 3): a_o per axis
  std::vector<int64_t> lo, hi;  // (k^3, 3): per axis, the output positions s with s + a_o inside the input
  std::vector<int64_t> flat;   // a_o as a flat index shift (only where the input and output positions coincide)
  std::vector<int64_t> range;  // (k^3, 2): the flat output positions [start, end) that hold every valid s
  // (k^3, O): whether s + a_o is inside the input (the masks of the flat loop)
  std::vector<float> valid;
  // whether every position in [start, end) is valid (no shift along the last axis): a plain loop, no mask
  std::vector<unsigned char> dense;
};

// Whether input and output positions coincide ('same' padding): then a shift is one flat index offset and a row's
// terms are one contiguous loop with a mask, instead of a loop per line of the output.
bool same_positions(const ShiftGeometry& g) {
  return g.in[0] == g.out[0] && g.in[1] == g.out[1] && g.in[2] == g.out[2];
}

Offsets offsets_of(const ShiftGeometry& g) {
  Offsets o;
  const int64_t n = g.kernel[0] * g.kernel[1] * g.kernel[2];
  const bool same = same_positions(g);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t oc[3] = {i / (g.kernel[1] * g.kernel[2]), (i / g.kernel[2]) % g.kernel[1], i % g.kernel[2]};
    int64_t a[3], lo[3], hi[3];
    for (int j = 0; j < 3; ++j) {
      a[j] = oc[j] * g.dilation[j] - g.padding[j];
      lo[j] = std::max<int64_t>(0, -a[j]);
      hi[j] = std::min(g.out[j], g.in[j] - a[j]);
      o.a.push_back(a[j]);
      o.lo.push_back(lo[j]);
      o.hi.push_back(hi[j]);
    }
    o.flat.push_back((a[0] * g.in[1] + a[1]) * g.in[2] + a[2]);
    const bool empty = lo[0] >= hi[0] || lo[1] >= hi[1] || lo[2] >= hi[2];
    // the first and last valid s: every index read between them is inside the input (the extreme reads are valid)
    o.range.push_back(empty ? 0 : (lo[0] * g.out[1] + lo[1]) * g.out[2] + lo[2]);
    o.range.push_back(empty ? 0 : ((hi[0] - 1) * g.out[1] + hi[1] - 1) * g.out[2] + hi[2]);
    if (!same) continue;
    bool dense = true;
    for (int64_t s = 0; s < g.out_numel; ++s) {
      const int64_t sc[3] = {s / (g.out[1] * g.out[2]), (s / g.out[2]) % g.out[1], s % g.out[2]};
      bool ok = true;
      for (int j = 0; j < 3; ++j) ok = ok && sc[j] >= lo[j] && sc[j] < hi[j];
      o.valid.push_back(ok);
      dense = dense && (ok || s < o.range[2 * i] || s >= o.range[2 * i + 1]);
    }
    o.dense.push_back(dense);
  }
  return o;
}

template <typename T>
FASTDP_HD void shift_row(const T* __restrict x, T* __restrict out, const ShiftGeometry& g, const Offsets& off,
                         int64_t row) {
  // row = (b * K + k1) * O + t; the output row holds (k2, s) for s over the O output positions
  const int64_t t = row % g.out_numel, bk = row / g.out_numel;
  const int64_t tc[3] = {t / (g.out[1] * g.out[2]), (t / g.out[2]) % g.out[1], t % g.out[2]};
  const int64_t row_len = g.views * g.out_numel, src_len = g.views * g.in_numel;
  const bool same = same_positions(g);
  for (int64_t j = 0; j < row_len; ++j) out[j] = T(0);
  const int64_t n = g.kernel[0] * g.kernel[1] * g.kernel[2];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* a = off.a.data() + 3 * i;
    const int64_t u[3] = {tc[0] + a[0], tc[1] + a[1], tc[2] + a[2]};
    if (u[0] < 0 || u[0] >= g.in[0] || u[1] < 0 || u[1] >= g.in[1] || u[2] < 0 || u[2] >= g.in[2]) continue;
    const int64_t start = off.range[2 * i], end = off.range[2 * i + 1];
    // the source row: X[b, k1, t + a, :, :]
    const T* __restrict src = x + (bk * g.in_numel + (u[0] * g.in[1] + u[1]) * g.in[2] + u[2]) * src_len;
    for (int64_t k2 = 0; k2 < g.views; ++k2) {
      T* __restrict dst = out + k2 * g.out_numel;
      const T* __restrict in = src + k2 * g.in_numel;
      if (same) {
        // one flat loop over [start, end): the positions between two valid ones that are not valid themselves
        // (their shift wraps to the next line) read inside the input and are masked out, not multiplied (a
        // dropped example's Gram may hold NaN)
        const float* __restrict m = off.valid.data() + i * g.out_numel;
        const T* __restrict shifted = in + off.flat[i];
        if (off.dense[i]) {
#pragma omp simd
          for (int64_t s = start; s < end; ++s) dst[s] += shifted[s];
          continue;
        }
#pragma omp simd
        for (int64_t s = start; s < end; ++s) dst[s] += m[s] != 0.0f ? shifted[s] : T(0);
        continue;
      }
      const int64_t* lo = off.lo.data() + 3 * i;
      const int64_t* hi = off.hi.data() + 3 * i;
      for (int64_t s0 = lo[0]; s0 < hi[0]; ++s0) {
        for (int64_t s1 = lo[1]; s1 < hi[1]; ++s1) {
          T* __restrict line = dst + (s0 * g.out[1] + s1) * g.out[2];
          const T* __restrict from = in + ((s0 + a[0]) * g.in[1] + (s1 + a[1])) * g.in[2] + a[2];
#pragma omp simd
          for (int64_t s2 = lo[2]; s2 < hi[2]; ++s2) line[s2] += from[s2];
        }
      }
    }
  }
}

#define FASTDP_SHIFT_ROWS(NAME, T)                                                                    \
  FASTDP_CPU_CLONES void NAME(const T* x, T* out, const ShiftGeometry& g, const Offsets& off, int64_t begin, \
                              int64_t end) {                                                          \
    const int64_t row_len = g.views * g.out_numel;                                                    \
    for (int64_t r = begin; r < end; ++r) shift_row<T>(x, out + r * row_len, g, off, r);              \
  }
FASTDP_SHIFT_ROWS(shift_rows_f32, float)
FASTDP_SHIFT_ROWS(shift_rows_f64, double)
#undef FASTDP_SHIFT_ROWS

template <typename T, typename F>
void run(F rows_fn, const void* gram, void* out, const ShiftGeometry& g, int64_t n, int num_threads) {
  const T* x = static_cast<const T*>(gram);
  T* o = static_cast<T*>(out);
  const Offsets off = offsets_of(g);
  const int64_t rows = n * g.views * g.out_numel;
  // blocks of rows: each thread's share is contiguous, and a block is at least ~64K additions
  const int64_t per_row = std::max<int64_t>(1, g.views * g.out_numel * g.kernel[0] * g.kernel[1] * g.kernel[2]);
  const int64_t block = std::max<int64_t>(1, (int64_t(1) << 16) / per_row);
  const int64_t nblocks = (rows + block - 1) / block;
  const bool parallel = num_threads > 1 && nblocks > 1;
  (void)parallel;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t k = 0; k < nblocks; ++k) rows_fn(x, o, g, off, k * block, std::min(rows, (k + 1) * block));
}

}  // namespace

void shifted_gram_cpu(DType dtype, const void* gram, void* out, const ShiftGeometry& g, int64_t n, int num_threads) {
  num_threads = std::max(num_threads, 1);
  if (dtype == DType::Float32) {
    run<float>(shift_rows_f32, gram, out, g, n, num_threads);
  } else if (dtype == DType::Float64) {
    run<double>(shift_rows_f64, gram, out, g, n, num_threads);
  } else {
    throw std::invalid_argument(std::string("shifted_gram_cpu: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace fastdp
