// Baseline variant of the CPU kernels: 16-byte GCC vectors (SSE2 on
// x86-64), separate multiply and add.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "message_passing_cpu.h"

namespace dvmrl {
namespace mp {
namespace baseline {

template <class T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t VI __attribute__((vector_size(16)));
  static constexpr int W = 4;
  static V madd(V a, V b, V c) { return a * b + c; }
  static float hsum(V v) {
    float sum = v[0];
    for (int i = 1; i < W; ++i) sum += v[i];
    return sum;
  }
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(16)));
  typedef int64_t VI __attribute__((vector_size(16)));
  static constexpr int W = 2;
  static V madd(V a, V b, V c) { return a * b + c; }
  static double hsum(V v) {
    double sum = v[0];
    for (int i = 1; i < W; ++i) sum += v[i];
    return sum;
  }
};

#include "message_passing_impl.h"

}  // namespace baseline

KernelSet baseline_kernels() { return baseline::make_kernel_set("baseline"); }

}  // namespace mp
}  // namespace dvmrl
