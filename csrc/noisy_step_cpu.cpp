// Noisy optimizer step on the CPU, over all parameters in one call:
//   g = (S + std * z) / B,  z = the Philox stream of fastdp/philox.py (csrc/philox.h) at (seed, step),
// then torch.optim.SGD (momentum, dampening, Nesterov, weight decay) or Adam/AdamW (amsgrad=False) in place.
//
// Cost per element: one Philox4x32-10 per 4 elements (20 32x32->64 multiplies), half a log, sqrt and sincos, and the
// update's streams (SGD with momentum: read p, S, buf, write p, buf = 20 bytes in float32; Adam: 28 bytes). With the
// transcendental functions vectorised (philox.h) the step is bound by memory, not by the noise.
//
// Work split: the tensors are laid end to end in the noise index e (offsets[k] is tensor k's first e); OpenMP runs
// over items cut at global multiples of kItem, and inside an item noise is drawn in blocks cut at global multiples of
// kBlock (a multiple of 4), so a Philox group is drawn once except where it straddles two tensors. The element-wise
// arithmetic follows torch.optim's single-tensor implementation operation by operation (no FMA contraction), so the
// result matches torch.optim run on g up to torch's own use of FMA in its vectorised kernels.
#include <algorithm>
#include <cmath>
#include <vector>

#include "dispatch.h"
#include "ops.h"
#include "optim_update.h"
#include "philox.h"

namespace fastdp {
namespace {

constexpr int64_t kItem = 16384;  // elements per OpenMP work item
constexpr int64_t kBlock = 256;   // elements per noise block (64 Philox groups): z stays in L1

// ---- the noise -----------------------------------------------------------------------------------------------------
// Two passes per block of <= kGroups Philox groups: the uint32 words (structure of arrays), then the normals.
// The words use explicit AVX-512 / AVX2 code where the CPU has it (GCC function multiversioning picks one at load
// time): Philox needs the high half of 32x32-bit products, which x86 gives as vpmuludq on even lanes plus a shift for
// the odd ones; the auto-vectoriser widens to 64-bit lanes instead (vpmullq, 3x the cost). The normals are plain
// loops that `#pragma omp simd` vectorises (philox.h), so every variant gives bit-identical words and normals.

constexpr int64_t kGroups = kBlock / 4;  // groups per block
constexpr int64_t kLanesMax = 16;        // widest word kernel (AVX-512); buffers are padded to a multiple of it

struct alignas(64) WordsSoA {
  uint32_t x[4][kGroups + kLanesMax];
};

// Portable words: groups g0 .. g0 + ng - 1 (any g0).
inline void words_generic(WordsSoA& w, uint64_t g0, int64_t ng, uint64_t step, uint64_t seed) {
#pragma omp simd
  for (int64_t k = 0; k < ng; ++k) {
    const philox::Words r = philox::group_words(g0 + uint64_t(k), step, seed);
    w.x[0][k] = r.x0;
    w.x[1][k] = r.x1;
    w.x[2][k] = r.x2;
    w.x[3][k] = r.x3;
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTDP_PHILOX_FMV 1
// GCC 12 flags the deliberately undefined pass-through operand of its AVX-512 shift intrinsics
// (_mm512_undefined_epi32) as maybe-uninitialized at every use
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

__attribute__((target("default"))) void philox_words_soa(WordsSoA& w, uint64_t g0, int64_t ng, uint64_t step,
                                                         uint64_t seed) {
  words_generic(w, g0, ng, step, seed);
}

// 16 groups per vector. Requires that g0 .. g0 + ng - 1 do not cross a multiple of 2^32 (the caller checks), so
// that the counter's high word is one broadcast.
__attribute__((target("avx512f"))) void philox_words_soa(WordsSoA& w, uint64_t g0, int64_t ng, uint64_t step,
                                                         uint64_t seed) {
  const __m512i m0 = _mm512_set1_epi64(philox::kM0), m1 = _mm512_set1_epi64(philox::kM1);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t k = 0; k < ng; k += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(g0 + uint64_t(k)))), iota);
    __m512i c1 = _mm512_set1_epi32(int(uint32_t((g0 + uint64_t(k)) >> 32)));
    __m512i c2 = _mm512_set1_epi32(int(uint32_t(step))), c3 = _mm512_set1_epi32(int(uint32_t(step >> 32)));
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      // hi/lo of c0 * M0 and c2 * M1: vpmuludq on the even lanes and on the odd lanes shifted down
      const __m512i e0 = _mm512_mul_epu32(c0, m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
      const __m512i e1 = _mm512_mul_epu32(c2, m1), o1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
      const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, e0, _mm512_slli_epi64(o0, 32));
      const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e0, 32), o0);
      const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, e1, _mm512_slli_epi64(o1, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(e1, 32), o1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(int(k0)), 0x96);  // three-way xor
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(int(k1)), 0x96);
      c1 = lo1;
      c3 = lo0;
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    _mm512_store_si512(reinterpret_cast<__m512i*>(&w.x[0][k]), c0);
    _mm512_store_si512(reinterpret_cast<__m512i*>(&w.x[1][k]), c1);
    _mm512_store_si512(reinterpret_cast<__m512i*>(&w.x[2][k]), c2);
    _mm512_store_si512(reinterpret_cast<__m512i*>(&w.x[3][k]), c3);
  }
}

// 8 groups per vector, same scheme with AVX2.
__attribute__((target("avx2"))) void philox_words_soa(WordsSoA& w, uint64_t g0, int64_t ng, uint64_t step,
                                                      uint64_t seed) {
  const __m256i m0 = _mm256_set1_epi64x(philox::kM0), m1 = _mm256_set1_epi64x(philox::kM1);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t k = 0; k < ng; k += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(g0 + uint64_t(k)))), iota);
    __m256i c1 = _mm256_set1_epi32(int(uint32_t((g0 + uint64_t(k)) >> 32)));
    __m256i c2 = _mm256_set1_epi32(int(uint32_t(step))), c3 = _mm256_set1_epi32(int(uint32_t(step >> 32)));
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      const __m256i e0 = _mm256_mul_epu32(c0, m0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
      const __m256i e1 = _mm256_mul_epu32(c2, m1), o1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
      const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(int(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(&w.x[0][k]), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(&w.x[1][k]), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(&w.x[2][k]), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(&w.x[3][k]), c3);
  }
}
#pragma GCC diagnostic pop
#endif

inline void philox_words_block(WordsSoA& w, uint64_t g0, int64_t ng, uint64_t step, uint64_t seed) {
#ifdef FASTDP_PHILOX_FMV
  if ((g0 & 0xffffffffu) + uint64_t(ng) <= (uint64_t(1) << 32)) {  // counter high word constant over the block
    philox_words_soa(w, g0, ng, step, seed);
    return;
  }
#endif
  words_generic(w, g0, ng, step, seed);
}

// From the groups' words w and their extension words e (the radii's low words).
FASTDP_CPU_CLONES void normals_from_words(float* __restrict z, const WordsSoA& w, const WordsSoA& e, int64_t ng) {
  const uint32_t* __restrict x0 = w.x[0];
  const uint32_t* __restrict x1 = w.x[1];
  const uint32_t* __restrict x2 = w.x[2];
  const uint32_t* __restrict x3 = w.x[3];
  const uint32_t* __restrict y0 = e.x[0];
  const uint32_t* __restrict y2 = e.x[2];
#pragma omp simd
  for (int64_t k = 0; k < ng; ++k) {
    const philox::Normals n =
        philox::normals(philox::Words{x0[k], x1[k], x2[k], x3[k]}, philox::Words{y0[k], 0u, y2[k], 0u});
    z[4 * k] = n.z0;
    z[4 * k + 1] = n.z1;
    z[4 * k + 2] = n.z2;
    z[4 * k + 3] = n.z3;
  }
}

// z[0 .. 4 ng) = the normals of groups g0 .. g0 + ng - 1 (ng <= kGroups).
inline void normals_block(float* z, uint64_t g0, int64_t ng, uint64_t step, uint64_t seed) {
  WordsSoA w, e;
  philox_words_block(w, g0, ng, step, seed);
  philox_words_block(e, g0 | philox::kExtension, ng, step, seed);
  normals_from_words(z, w, e, ng);
}

// z[0 .. eb - e) = noise elements e .. eb - 1 (eb - e <= kBlock, e .. eb inside one kBlock-aligned block).
// Returns a pointer into buf (kBlock + 4 floats).
inline const float* noise_block(float* buf, int64_t e, int64_t eb, uint64_t step, uint64_t seed) {
  const int64_t g0 = e >> 2, g1 = (eb - 1) >> 2;
  normals_block(buf, uint64_t(g0), g1 - g0 + 1, step, seed);
  return buf + (e & 3);
}

// ---- the updates (one clone set per optimizer and dtype; the element maths is optim_update.h) ----------------------

template <typename T, bool kMomentum>
FASTDP_HD void sgd_elems(T* __restrict p, const T* __restrict s, T* __restrict buf, const float* __restrict z,
                         int64_t n, const SgdCoef<T>& h) {
  T unused = T(0);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) sgd_update<T, kMomentum>(p[j], s[j], kMomentum ? buf[j] : unused, z[j], h);
}

template <typename T>
FASTDP_HD void adam_elems(T* __restrict p, const T* __restrict s, T* __restrict m, T* __restrict v,
                          const float* __restrict z, int64_t n, const AdamCoef<T>& h) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) adam_update<T>(p[j], s[j], m[j], v[j], z[j], h);
}

FASTDP_CPU_CLONES void sgd_f32(float* p, const float* s, float* b, const float* z, int64_t n,
                               const SgdCoef<float>& h) {
  sgd_elems<float, false>(p, s, b, z, n, h);
}
FASTDP_CPU_CLONES void sgd_mom_f32(float* p, const float* s, float* b, const float* z, int64_t n,
                                   const SgdCoef<float>& h) {
  sgd_elems<float, true>(p, s, b, z, n, h);
}
FASTDP_CPU_CLONES void sgd_f64(double* p, const double* s, double* b, const float* z, int64_t n,
                               const SgdCoef<double>& h) {
  sgd_elems<double, false>(p, s, b, z, n, h);
}
FASTDP_CPU_CLONES void sgd_mom_f64(double* p, const double* s, double* b, const float* z, int64_t n,
                                   const SgdCoef<double>& h) {
  sgd_elems<double, true>(p, s, b, z, n, h);
}
FASTDP_CPU_CLONES void adam_f32(float* p, const float* s, float* m, float* v, const float* z, int64_t n,
                                const AdamCoef<float>& h) {
  adam_elems<float>(p, s, m, v, z, n, h);
}
FASTDP_CPU_CLONES void adam_f64(double* p, const double* s, double* m, double* v, const float* z, int64_t n,
                                const AdamCoef<double>& h) {
  adam_elems<double>(p, s, m, v, z, n, h);
}

inline void update(float* p, const float* s, float* b, float*, const float* z, int64_t n, const SgdCoef<float>& h) {
  b ? sgd_mom_f32(p, s, b, z, n, h) : sgd_f32(p, s, b, z, n, h);
}
inline void update(double* p, const double* s, double* b, double*, const float* z, int64_t n,
                   const SgdCoef<double>& h) {
  b ? sgd_mom_f64(p, s, b, z, n, h) : sgd_f64(p, s, b, z, n, h);
}
inline void update(float* p, const float* s, float* m, float* v, const float* z, int64_t n,
                   const AdamCoef<float>& h) {
  adam_f32(p, s, m, v, z, n, h);
}
inline void update(double* p, const double* s, double* m, double* v, const float* z, int64_t n,
                   const AdamCoef<double>& h) {
  adam_f64(p, s, m, v, z, n, h);
}

// ---- the driver ---------------------------------------------------------------------------------------------------

struct Item {
  int64_t tensor, begin, end;  // local element range [begin, end) of one tensor
};

std::vector<Item> work_items(const StepTensors& t) {
  std::vector<Item> items;
  for (size_t k = 0; k < t.params.size(); ++k) {
    const int64_t off = t.offsets[k], n = t.numels[k];
    for (int64_t j = 0; j < n;) {
      const int64_t je = std::min(n, ((off + j) / kItem + 1) * kItem - off);  // cut at a global multiple of kItem
      items.push_back(Item{int64_t(k), j, je});
      j = je;
    }
  }
  return items;
}

template <typename T, typename Coef>
void run_step(const StepTensors& t, const NoiseArgs& noise, const Coef& h, int num_threads) {
  const std::vector<Item> items = work_items(t);
  const bool draw = noise.std != 0.0;
  const int64_t nitems = int64_t(items.size());
  const bool parallel = num_threads > 1 && nitems > 1;
  (void)parallel;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (parallel)
  for (int64_t w = 0; w < nitems; ++w) {
    const Item it = items[size_t(w)];
    const size_t k = size_t(it.tensor);
    const int64_t off = t.offsets[k];
    T* p = static_cast<T*>(t.params[k]);
    const T* s = static_cast<const T*>(t.sums[k]);
    T* s1 = t.state1.empty() ? nullptr : static_cast<T*>(t.state1[k]);
    T* s2 = t.state2.empty() ? nullptr : static_cast<T*>(t.state2[k]);
    alignas(64) float zbuf[kBlock + 4];
    alignas(64) T zeros_t[kBlock];
    const float* z = zbuf;
    if (!draw) std::fill(zbuf, zbuf + kBlock, 0.0f);
    if (s == nullptr) std::fill(zeros_t, zeros_t + kBlock, T(0));
    for (int64_t j = it.begin; j < it.end;) {
      const int64_t e = off + j;
      const int64_t je = std::min(it.end, (e / kBlock + 1) * kBlock - off);
      if (draw) z = noise_block(zbuf, e, off + je, noise.step, noise.seed);
      update(p + j, s ? s + j : zeros_t, s1 ? s1 + j : nullptr, s2 ? s2 + j : nullptr, z, je - j, h);
      j = je;
    }
  }
}

}  // namespace

void noisy_sgd_step_cpu(const StepTensors& t, const NoiseArgs& noise, const SgdArgs& a, int num_threads) {
  num_threads = std::max(num_threads, 1);
  FASTDP_DISPATCH_FP32_FP64(t.dtype, "noisy_sgd_step_cpu", [&] {
    // a momentum of 0 is plain SGD (torch keeps no buffer)
    StepTensors u = t;
    if (a.momentum == 0.0) u.state1.clear();
    run_step<scalar_t>(u, noise, SgdCoef<scalar_t>::make(noise, a), num_threads);
  });
}

void noisy_adam_step_cpu(const StepTensors& t, const NoiseArgs& noise, const AdamArgs& a, int num_threads) {
  num_threads = std::max(num_threads, 1);
  FASTDP_DISPATCH_FP32_FP64(t.dtype, "noisy_adam_step_cpu",
                            [&] { run_step<scalar_t>(t, noise, AdamCoef<scalar_t>::make(noise, a), num_threads); });
}

void philox_normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t step, int64_t offset, int num_threads) {
  num_threads = std::max(num_threads, 1);
  const int64_t nblocks = n <= 0 ? 0 : ((offset + n - 1) / kBlock - offset / kBlock + 1);
  const bool parallel = num_threads > 1 && n >= kItem;
  (void)parallel;
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads) if (parallel)
  for (int64_t b = 0; b < nblocks; ++b) {
    alignas(64) float zbuf[kBlock + 4];
    const int64_t blk = offset / kBlock + b;
    const int64_t e = std::max(offset, blk * kBlock), eb = std::min(offset + n, (blk + 1) * kBlock);
    const float* z = noise_block(zbuf, e, eb, step, seed);
    std::copy(z, z + (eb - e), out + (e - offset));
  }
}

void philox_words_cpu(int64_t* out, int64_t ngroups, uint64_t seed, uint64_t step, int64_t group_offset) {
  // through the same (SIMD) word kernels as the step, so that a bit-exact test of these words covers them
  WordsSoA w;
  for (int64_t k0 = 0; k0 < ngroups; k0 += kGroups) {
    const int64_t ng = std::min(kGroups, ngroups - k0);
    philox_words_block(w, uint64_t(group_offset + k0), ng, step, seed);
    for (int64_t k = 0; k < ng; ++k) {
      for (int j = 0; j < 4; ++j) out[4 * (k0 + k) + j] = w.x[j][k];
    }
  }
}

}  // namespace fastdp
