// Batched projection onto {sum x = 1, lo <= x <= hi}: CPU and CUDA entry
// points behind the Python bindings. Arrays are row-major [rows, cols];
// padding entries (mask false) come back as 0.
#pragma once

#include <cstdint>

namespace dvmrl {

// The first row (lowest index) that could not be projected, or row == -1.
struct ProjectionFailure {
  int64_t row = -1;
  int32_t status = 0;  // a dvmrl::projection::Status value
  double sum_lo = 0.0;
  double sum_hi = 0.0;
};

// Projects every row on the thread pool. Rows are independent, so the
// result does not depend on the thread count.
template <typename T>
ProjectionFailure project_simplex_box_cpu(const T* x, const T* lo, const T* hi,
                                          const bool* mask, T* out, int64_t rows,
                                          int cols, double tolerance);

#if defined(DVMRL_WITH_CUDA)
// Launches one thread per row on CUDA device `device`, in `stream` (a
// cudaStream_t of that device as an integer; 0 is the legacy default
// stream), and returns without synchronising.
// status[row] receives the row's projection::Status. Pointers are device
// pointers; `is_double` selects float64, otherwise float32.
void project_simplex_box_cuda(const void* x, const void* lo, const void* hi,
                              const bool* mask, void* out, int32_t* status,
                              int64_t rows, int cols, bool is_double,
                              double tolerance, int device, std::uintptr_t stream);
#endif

}  // namespace dvmrl
