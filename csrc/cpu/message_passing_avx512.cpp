// AVX-512 variant of the CPU kernels (compiled with -mavx512f and friends).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "message_passing_cpu.h"

namespace dvmrl {
namespace mp {
namespace avx512 {

template <class T>
struct Simd;

template <>
struct Simd<float> {
  using V = __m512;
  typedef int32_t VI __attribute__((vector_size(64)));
  static constexpr int W = 16;
  static V madd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
};

template <>
struct Simd<double> {
  using V = __m512d;
  typedef int64_t VI __attribute__((vector_size(64)));
  static constexpr int W = 8;
  static V madd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static double hsum(V v) { return _mm512_reduce_add_pd(v); }
};

#include "message_passing_impl.h"

}  // namespace avx512

KernelSet avx512_kernels() { return avx512::make_kernel_set("avx512"); }

}  // namespace mp
}  // namespace dvmrl
