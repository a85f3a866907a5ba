// The counter-based noise stream of fastdp/philox.py, for host and device (no torch).
//
// Noise element e of step `step` (e counts over all noised parameters laid end to end):
//   g = e / 4, lane = e % 4
//   (x0, x1, x2, x3) = Philox4x32-10(counter = (g_lo, g_hi, step_lo, step_hi), key = (seed_lo, seed_hi))
//   (y0, _, y2, _)   = the same for counter g + 2^63: the low words of the radius uniforms
//   v_j = fl32(((y_j + 0.5) 2^-32 + x_j) 2^-32)  in float64 operations: 64 random bits, as small as 2^-65
//   u_j = (x_j + 0.5) * 2^-32            rounded once to float32 (computed exactly in float64 first)
//   r = sqrt(-2 ln v0), s = sqrt(-2 ln v2), t = fl32(2 pi) * u1, w = fl32(2 pi) * u3   (float32 ops)
//   z = (r cos t, r sin t, s cos w, s sin w)[lane]
// Cost per group of 4 normals: 40 32x32->64 multiplies (two Philox blocks), 2 log, 2 sqrt, 2 sincos.
// A radius from one 32-bit word would truncate the Gaussian at sqrt(66 ln 2) = 6.77 sigma, which costs the Gaussian
// mechanism a share of delta (fastdp/philox.py says how much); from 64 bits it reaches 9.49 sigma.
//
// The uint32 words are bit-exact on every backend (integer arithmetic). The normals use the Cephes log/sin/cos
// polynomials below on both host and device, without FMA contraction, so the C++ and CUDA normals are bit-identical
// to each other; against the torch reference (libm/SLEEF log, sin, cos) they differ by a few float32 ulp (3 ulp
// measured over 2^22 draws). The polynomials are branch-free so that `#pragma omp simd` vectorises them (libm calls
// would not vectorise without -ffast-math).
#pragma once

#include <cmath>
#include <cstdint>

#include "dispatch.h"

namespace fastdp {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key schedule (golden ratio, sqrt(3) - 1)
constexpr float kTwoPi = 6.28318548202514648f;           // fl32(2 pi): torch rounds the Python scalar to float32

struct Words {
  uint32_t x0, x1, x2, x3;
};

FASTDP_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
#if defined(__CUDA_ARCH__)
    const uint32_t hi0 = __umulhi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = __umulhi(kM1, c2), lo1 = kM1 * c2;
#else
    const uint64_t p0 = uint64_t(kM0) * c0, p1 = uint64_t(kM1) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
#endif
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;  // the bump after the last round is never used
    k1 += kW1;
  }
  return Words{c0, c1, c2, c3};
}

// Words of group g at `step` under `seed` (the counter layout of fastdp/philox.py).
FASTDP_HD Words group_words(uint64_t g, uint64_t step, uint64_t seed) {
  return philox4x32_10(uint32_t(g), uint32_t(g >> 32), uint32_t(step), uint32_t(step >> 32), uint32_t(seed),
                       uint32_t(seed >> 32));
}

// Added to a group's counter for the words that extend its radius uniforms (groups stay below 2^61).
constexpr uint64_t kExtension = uint64_t(1) << 63;

// (x + 0.5) * 2^-32 is exact in float64 (33 significant bits); one rounding to float32, as the reference.
FASTDP_HD float uniform(uint32_t x) { return float((double(x) + 0.5) * 0x1p-32); }

// ((y + 0.5) 2^-32 + x) 2^-32: the scalings are exact (powers of two), the addition rounds once in float64 (so an
// FMA contraction of the first product with the addition gives the same bits), then one rounding to float32.
FASTDP_HD float uniform64(uint32_t x, uint32_t y) { return float(((double(y) + 0.5) * 0x1p-32 + double(x)) * 0x1p-32); }

// Float32 arithmetic without FMA contraction, so that the host (built with -ffp-contract=off) and the device (nvcc
// contracts a * b + c into an FMA unless told not to) round every step identically: the normals below are then
// bit-identical on the CPU and the GPU, not just close.
#if defined(__CUDA_ARCH__)
FASTDP_HD float mul(float a, float b) { return __fmul_rn(a, b); }
FASTDP_HD float add(float a, float b) { return __fadd_rn(a, b); }
#else
FASTDP_HD float mul(float a, float b) { return a * b; }
FASTDP_HD float add(float a, float b) { return a + b; }
#endif

// Natural log of a positive normal float (u >= 2^-65 here). Cephes logf: x = z * 2^k with z in [sqrt(1/2), sqrt(2)),
// ln x = k ln 2 + ln z, ln z = f - f^2/2 + f^3 P(f) with f = z - 1 (exact); ln 2 in two parts so k ln 2 adds exactly.
// The reduction is integer-only (musl's form: subtract the bits of sqrt(1/2), the arithmetic shift gives k): no select,
// so AVX2 vectorises it as well as AVX-512. ~1 ulp.
FASTDP_HD float logf_cephes(float x) {
  const uint32_t ix = float_to_bits(x);
  const int32_t k = int32_t(ix - 0x3f3504f3u) >> 23;  // 0x3f3504f3 = fl32(sqrt(1/2))
  const float f = add(bits_to_float(ix - (uint32_t(k) << 23)), -1.0f);
  const float z = mul(f, f);
  float y = 7.0376836292e-2f;
  y = add(mul(y, f), -1.1514610310e-1f);
  y = add(mul(y, f), 1.1676998740e-1f);
  y = add(mul(y, f), -1.2420140846e-1f);
  y = add(mul(y, f), 1.4249322787e-1f);
  y = add(mul(y, f), -1.6668057665e-1f);
  y = add(mul(y, f), 2.0000714765e-1f);
  y = add(mul(y, f), -2.4999993993e-1f);
  y = add(mul(y, f), 3.3333331174e-1f);
  y = mul(mul(y, f), z);
  const float fk = float(k);
  y = add(y, mul(-2.12194440e-4f, fk));
  y = add(y, mul(-0.5f, z));
  return add(add(f, y), mul(0.693359375f, fk));
}

// sin and cos of t in [0, 2 pi]. Cephes sinf/cosf: j = t * 4/pi truncated and rounded up to even, x = t - j pi/4 in
// three parts (DP1 and DP2 have few bits, so j*DP1 and j*DP2 are exact for j <= 8), the minimax polynomials on
// [-pi/4, pi/4], then the quadrant's swap and signs. ~1 ulp, and no large-argument path (CUDA's sincosf keeps one, in
// local memory).
FASTDP_HD void sincosf_cephes(float t, float* s_out, float* c_out) {
  int j = int(mul(t, 1.27323954473516f));
  j += j & 1;
  const float y = float(j);
  const float x = add(add(add(t, mul(y, -0.78515625f)), mul(y, -2.4187564849853515625e-4f)),
                      mul(y, -3.77489497744594108e-8f));
  const float z = mul(x, x);
  // sin(x) = x + x z P(z), cos(x) = 1 - z/2 + z^2 Q(z) on [-pi/4, pi/4]
  float sp = add(mul(-1.9515295891e-4f, z), 8.3321608736e-3f);
  sp = add(mul(sp, z), -1.6666654611e-1f);
  sp = add(mul(mul(sp, z), x), x);
  float cp = add(mul(2.443315711809948e-5f, z), -1.388731625493765e-3f);
  cp = add(mul(cp, z), 4.166664568298827e-2f);
  cp = add(add(mul(mul(cp, z), z), mul(-0.5f, z)), 1.0f);
  const int q = (j >> 1) & 3;  // quadrant: t = x + q pi/2
  const bool swap = (q & 1) != 0;
  const float s = swap ? cp : sp, c = swap ? sp : cp;
  *s_out = (q & 2) ? -s : s;        // sin(x + q pi/2): q=0 s, 1 c, 2 -s, 3 -c
  *c_out = ((q + 1) & 2) ? -c : c;  // cos(x + q pi/2): q=0 c, 1 -s, 2 -c, 3 s
}

struct Normals {
  float z0, z1, z2, z3;
};

// The four normals of one group (lane order) from its words x and its extension words y. By value throughout:
// inside `#pragma omp simd` loops an address-taken local becomes a per-lane array in memory and the loop no longer
// vectorises.
FASTDP_HD Normals normals(Words x, Words y) {
  const float v0 = uniform64(x.x0, y.x0), u1 = uniform(x.x1), v2 = uniform64(x.x2, y.x2), u3 = uniform(x.x3);
  const float r01 = sqrtf(mul(-2.0f, logf_cephes(v0)));  // sqrtf is correctly rounded on both sides
  const float r23 = sqrtf(mul(-2.0f, logf_cephes(v2)));
  float s01, c01, s23, c23;
  sincosf_cephes(mul(kTwoPi, u1), &s01, &c01);
  sincosf_cephes(mul(kTwoPi, u3), &s23, &c23);
  return Normals{mul(r01, c01), mul(r01, s01), mul(r23, c23), mul(r23, s23)};
}

// The four normals of group g.
FASTDP_HD Normals group_normals(uint64_t g, uint64_t step, uint64_t seed) {
  return normals(group_words(g, step, seed), group_words(g | kExtension, step, seed));
}

// Noise element e (one lane). Kernels that need a whole group use group_normals instead.
FASTDP_HD float normal_at(uint64_t e, uint64_t step, uint64_t seed) {
  const Normals z = group_normals(e >> 2, step, seed);
  const uint32_t lane = uint32_t(e & 3);
  return lane == 0 ? z.z0 : lane == 1 ? z.z1 : lane == 2 ? z.z2 : z.z3;
}

}  // namespace philox
}  // namespace fastdp
