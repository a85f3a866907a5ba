// Torch-free dtype tags, bfloat16 storage and the dtype dispatch macro shared by the CPU (.cpp) and CUDA (.cu)
// kernel files. bindings.cpp maps at::ScalarType to fastdp::DType once, after its input checks; the kernel files
// never see a torch header, so CI can compile the .cu files with plain nvcc (CMakeLists.txt).
//
// bfloat16 is the top half of a float32: widening is a 16-bit shift (exact); narrowing rounds to nearest even.
// All arithmetic happens in Acc<T> (float32 for float32/bfloat16, float64 for float64).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FASTDP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTDP_HD inline __attribute__((always_inline))
#else
#define FASTDP_HD inline
#endif

// CPU ISA dispatch: hot CPU loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and the loader
// picks one per machine (GCC ifunc). The loops are written so that all clones round identically (the kernel files are
// built with -ffp-contract=off: no FMA contraction), so results do not depend on the machine or thread count.
#if defined(FASTDP_CPU_CLONES)
// set on the command line (benchmarks of one ISA)
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && !defined(__CUDACC__)
#if __GNUC__ >= 12  // "arch=x86-64-v3/v4" (AVX2+FMA+BMI, AVX-512 F/BW/DQ/VL) in target attributes: GCC 12+
#define FASTDP_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define FASTDP_CPU_CLONES
#endif

namespace fastdp {

enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32:
      return "float32";
    case DType::Float64:
      return "float64";
    case DType::BFloat16:
      return "bfloat16";
  }
  return "unknown";
}

// bfloat16 storage: arithmetic always goes through float (to_acc / from_acc).
struct bf16 {
  uint16_t bits;
};

FASTDP_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FASTDP_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

template <typename T>
struct AccOf {
  using type = T;
};
template <>
struct AccOf<bf16> {
  using type = float;
};
template <typename T>
using Acc = typename AccOf<T>::type;

FASTDP_HD float to_acc(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
FASTDP_HD float to_acc(float x) { return x; }
FASTDP_HD double to_acc(double x) { return x; }

// float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN, infinities stay infinite.
FASTDP_HD bf16 bf16_from_float(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

template <typename T>
struct Convert {
  template <typename A>
  FASTDP_HD static T from(A x) {
    return static_cast<T>(x);
  }
};
template <>
struct Convert<bf16> {
  FASTDP_HD static bf16 from(float x) { return bf16_from_float(x); }
};

template <typename T, typename A>
FASTDP_HD T from_acc(A x) {
  return Convert<T>::from(x);
}

}  // namespace fastdp

// FASTDP_DISPATCH_FLOATING(dtype, "op", [&] { kernel<scalar_t>(...); }): runs the lambda with scalar_t bound to
// float, double or fastdp::bf16. The binding checks dtypes first, so the throw is a programming error.
#define FASTDP_DISPATCH_CASE_(ENUM, TYPE, ...) \
  case ::fastdp::DType::ENUM: {                \
    using scalar_t = TYPE;                     \
    return __VA_ARGS__();                      \
  }

#define FASTDP_DISPATCH_FLOATING(DTYPE, NAME, ...)                                                            \
  [&] {                                                                                                       \
    switch (DTYPE) {                                                                                          \
      FASTDP_DISPATCH_CASE_(Float32, float, __VA_ARGS__)                                                      \
      FASTDP_DISPATCH_CASE_(Float64, double, __VA_ARGS__)                                                     \
      FASTDP_DISPATCH_CASE_(BFloat16, ::fastdp::bf16, __VA_ARGS__)                                            \
    }                                                                                                         \
    throw std::invalid_argument(std::string(NAME) + ": unsupported dtype " + ::fastdp::dtype_name(DTYPE)); \
  }()

// float32 and float64 only (the optimizer step keeps parameters and state in one of these).
#define FASTDP_DISPATCH_FP32_FP64(DTYPE, NAME, ...)                                                           \
  [&] {                                                                                                       \
    switch (DTYPE) {                                                                                          \
      FASTDP_DISPATCH_CASE_(Float32, float, __VA_ARGS__)                                                      \
      FASTDP_DISPATCH_CASE_(Float64, double, __VA_ARGS__)                                                     \
      default:                                                                                                \
        break;                                                                                                \
    }                                                                                                         \
    throw std::invalid_argument(std::string(NAME) + ": unsupported dtype " + ::fastdp::dtype_name(DTYPE)); \
  }()
