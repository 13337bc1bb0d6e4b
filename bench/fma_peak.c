/* Peak float32 FMA rate of one core, for reading the kernel benchmarks.

bench_message_passing.py reports floor_fraction against PyTorch's measured
2048^2 matmul rate. That rate is what a library reaches, not what the core
can do. This program measures the core's own ceiling with 12 independent
chains of fused multiply-adds, so neither FMA latency nor memory limits the
rate. It runs them on 256-bit (AVX2) registers and, where the CPU has
AVX-512F, on 512-bit ones.

Build and run (one thread; pin it with taskset to choose the core):
    cc -O2 -o /tmp/fma_peak bench/fma_peak.c && /tmp/fma_peak

Prints one line per register width in GFLOP/s (2 FLOPs per lane per FMA).
*/
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12
#define STEPS 20000000L

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

__attribute__((target("avx2,fma"))) static double ymm_rate(float *sink) {
  __m256 acc[CHAINS];
  const __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; ++i) acc[i] = _mm256_set1_ps((float)i);
  const double start = seconds();
  for (long k = 0; k < STEPS; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  const double elapsed = seconds() - start;
  float lanes[8];
  for (int i = 0; i < CHAINS; ++i) {
    _mm256_storeu_ps(lanes, acc[i]);
    for (int j = 0; j < 8; ++j) *sink += lanes[j];  // so the chains are not removed
  }
  return (double)STEPS * CHAINS * 8 * 2 / elapsed / 1e9;
}

__attribute__((target("avx512f"))) static double zmm_rate(float *sink) {
  __m512 acc[CHAINS];
  const __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_set1_ps((float)i);
  const double start = seconds();
  for (long k = 0; k < STEPS; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  const double elapsed = seconds() - start;
  for (int i = 0; i < CHAINS; ++i) *sink += _mm512_reduce_add_ps(acc[i]);
  return (double)STEPS * CHAINS * 16 * 2 / elapsed / 1e9;
}

int main(void) {
  float sink = 0.0f;
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    printf("this CPU lacks AVX2 or FMA\n");
    return 1;
  }
  printf("AVX2 (256-bit) FMA: %.1f GFLOP/s\n", ymm_rate(&sink));
  if (__builtin_cpu_supports("avx512f"))
    printf("AVX-512 (512-bit) FMA: %.1f GFLOP/s\n", zmm_rate(&sink));
  else
    printf("AVX-512 (512-bit) FMA: not supported by this CPU\n");
  return sink == 12345.0f;  // a use of sink, so the loops stay
}
