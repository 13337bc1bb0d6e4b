// CUDA projection onto {sum x = 1, lo <= x <= hi}: one thread per row runs
// the same row routine as the CPU path, so both give the same bits.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_util.h"
#include "dvmrl/projection.h"
#include "dvmrl/projection_math.h"

namespace dvmrl {
namespace {

template <typename T>
__global__ void project_rows_kernel(const T* __restrict__ x, const T* __restrict__ lo,
                                    const T* __restrict__ hi, const bool* __restrict__ mask,
                                    T* __restrict__ out, int32_t* __restrict__ status,
                                    int64_t rows, int cols, double tolerance) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += stride) {
    const int64_t off = r * cols;
    double sum_lo = 0.0, sum_hi = 0.0;
    status[r] = projection::project_row<T>(x + off, lo + off, hi + off, mask + off,
                                           out + off, cols, tolerance, &sum_lo, &sum_hi);
  }
}

}  // namespace

void project_simplex_box_cuda(const void* x, const void* lo, const void* hi,
                              const bool* mask, void* out, int32_t* status,
                              int64_t rows, int cols, bool is_double,
                              double tolerance, int device, std::uintptr_t stream) {
  if (rows <= 0) return;
  // The launch goes to the current device, which must be the one that contains
  // the tensors and the stream.
  cuda_util::DeviceGuard guard(device, "project_simplex_box_cuda");
  constexpr int kThreads = 128;
  int64_t blocks64 = (rows + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks64 < 65535 ? blocks64 : 65535);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (is_double) {
    project_rows_kernel<double><<<blocks, kThreads, 0, s>>>(
        static_cast<const double*>(x), static_cast<const double*>(lo),
        static_cast<const double*>(hi), mask, static_cast<double*>(out), status, rows,
        cols, tolerance);
  } else {
    project_rows_kernel<float><<<blocks, kThreads, 0, s>>>(
        static_cast<const float*>(x), static_cast<const float*>(lo),
        static_cast<const float*>(hi), mask, static_cast<float*>(out), status, rows, cols,
        tolerance);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("project_simplex_box_cuda: kernel launch failed (") +
                             cudaGetErrorString(err) + ")");
  }
}

}  // namespace dvmrl
