// AVX2 + FMA variant of the CPU kernels (compiled with -mavx2 -mfma).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "message_passing_cpu.h"

namespace dvmrl {
namespace mp {
namespace avx2 {

template <class T>
struct Simd;

template <>
struct Simd<float> {
  using V = __m256;
  typedef int32_t VI __attribute__((vector_size(32)));
  static constexpr int W = 8;
  static V madd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};

template <>
struct Simd<double> {
  using V = __m256d;
  typedef int64_t VI __attribute__((vector_size(32)));
  static constexpr int W = 4;
  static V madd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};

#include "message_passing_impl.h"

}  // namespace avx2

KernelSet avx2_kernels() { return avx2::make_kernel_set("avx2"); }

}  // namespace mp
}  // namespace dvmrl
