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
  static float hsum(V v) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
  }
};

template <>
struct Simd<double> {
  using V = __m256d;
  typedef int64_t VI __attribute__((vector_size(32)));
  static constexpr int W = 4;
  static V madd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static double hsum(V v) {
    __m128d sum = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(sum, _mm_unpackhi_pd(sum, sum)));
  }
};

#include "message_passing_impl.h"

}  // namespace avx2

KernelSet avx2_kernels() { return avx2::make_kernel_set("avx2"); }

}  // namespace mp
}  // namespace dvmrl
