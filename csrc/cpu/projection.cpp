// CPU projection onto {sum x = 1, lo <= x <= hi}, one row per call of the
// shared row routine, rows spread over the thread pool.
#include <vector>

#include "dvmrl/projection.h"
#include "dvmrl/projection_math.h"
#include "dvmrl/thread_pool.h"

namespace dvmrl {

template <typename T>
ProjectionFailure project_simplex_box_cpu(const T* x, const T* lo, const T* hi,
                                          const bool* mask, T* out, int64_t rows,
                                          int cols, double tolerance) {
  constexpr int64_t kBlock = 512;
  std::vector<ProjectionFailure> failures(static_cast<size_t>(num_blocks(rows, kBlock)));
  parallel_for(rows, kBlock, 2 * kBlock, [&](int64_t begin, int64_t end, int64_t block) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * cols;
      double sum_lo = 0.0, sum_hi = 0.0;
      const int32_t status = projection::project_row<T>(
          x + off, lo + off, hi + off, mask + off, out + off, cols, tolerance, &sum_lo,
          &sum_hi);
      if (status != projection::kOk && failures[block].row < 0) {
        failures[block] = ProjectionFailure{r, status, sum_lo, sum_hi};
      }
    }
  });
  // Blocks cover rows in order, so the first failing block has the first row.
  for (const ProjectionFailure& f : failures) {
    if (f.row >= 0) return f;
  }
  return ProjectionFailure{};
}

template ProjectionFailure project_simplex_box_cpu<float>(const float*, const float*,
                                                          const float*, const bool*,
                                                          float*, int64_t, int, double);
template ProjectionFailure project_simplex_box_cpu<double>(const double*, const double*,
                                                           const double*, const bool*,
                                                           double*, int64_t, int, double);

}  // namespace dvmrl
