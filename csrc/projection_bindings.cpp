// Bindings of the batched projection onto {sum x = 1, lo <= x <= hi}.
//
// The CPU entry takes numpy arrays (zero-copy views of CPU tensors); the
// CUDA entry takes raw device pointers, because the core does not link
// libtorch. Both report failing rows instead of raising, so the Python
// wrapper words one message for both devices.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dvmrl/projection.h"
#include "dvmrl/projection_math.h"
#include "dvmrl/registry.h"

namespace py = pybind11;

namespace dvmrl {
namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

void check_2d(const py::array& a, const char* name, int64_t rows, int64_t cols) {
  if (a.ndim() != 2 || a.shape(0) != rows || a.shape(1) != cols) {
    throw std::invalid_argument(std::string("project_simplex_box: ") + name +
                                " must have shape [" + std::to_string(rows) + ", " +
                                std::to_string(cols) + "] like x");
  }
}

template <typename T>
py::tuple project_cpu(CArray<T> x, CArray<T> lo, CArray<T> hi, CArray<bool> mask,
                      double tolerance) {
  if (x.ndim() != 2) {
    throw std::invalid_argument("project_simplex_box: x must be 2-D [rows, cols], got " +
                                std::to_string(x.ndim()) + "-D");
  }
  const int64_t rows = x.shape(0);
  const int64_t cols = x.shape(1);
  check_2d(lo, "lo", rows, cols);
  check_2d(hi, "hi", rows, cols);
  check_2d(mask, "mask", rows, cols);
  CArray<T> out({rows, cols});
  ProjectionFailure failure;
  {
    py::gil_scoped_release release;
    failure = project_simplex_box_cpu<T>(x.data(), lo.data(), hi.data(), mask.data(),
                                         out.mutable_data(), rows, static_cast<int>(cols),
                                         tolerance);
  }
  return py::make_tuple(out, failure.row, failure.status, failure.sum_lo, failure.sum_hi);
}

}  // namespace

void register_projection(py::module_& m) {
  m.attr("projection_max_entries") = projection::kMaxEntries;
  const char* doc =
      "Project each row of x onto {sum over real entries = 1, lo <= y <= hi}.\n\n"
      "Arrays are C-contiguous [rows, cols] of one float dtype, mask is bool.\n"
      "Returns (y, failed_row, status, sum_lo, sum_hi): failed_row is the first\n"
      "row that could not be projected, or -1, with its status code and bound\n"
      "sums. Padding entries of y are 0.";
  m.def("project_simplex_box", &project_cpu<double>, py::arg("x"), py::arg("lo"),
        py::arg("hi"), py::arg("mask"), py::arg("tolerance"), doc);
  m.def("project_simplex_box", &project_cpu<float>, py::arg("x"), py::arg("lo"),
        py::arg("hi"), py::arg("mask"), py::arg("tolerance"), doc);
#if defined(DVMRL_WITH_CUDA)
  m.def(
      "project_simplex_box_cuda",
      [](std::uintptr_t x, std::uintptr_t lo, std::uintptr_t hi, std::uintptr_t mask,
         std::uintptr_t out, std::uintptr_t status, int64_t rows, int cols, bool is_double,
         double tolerance, int device, std::uintptr_t stream) {
        project_simplex_box_cuda(reinterpret_cast<const void*>(x),
                                 reinterpret_cast<const void*>(lo),
                                 reinterpret_cast<const void*>(hi),
                                 reinterpret_cast<const bool*>(mask),
                                 reinterpret_cast<void*>(out),
                                 reinterpret_cast<int32_t*>(status), rows, cols, is_double,
                                 tolerance, device, stream);
      },
      py::arg("x"), py::arg("lo"), py::arg("hi"), py::arg("mask"), py::arg("out"),
      py::arg("status"), py::arg("rows"), py::arg("cols"), py::arg("is_double"),
      py::arg("tolerance"), py::arg("device"), py::arg("stream"),
      "Launch the projection on device pointers (contiguous [rows, cols]) of CUDA\n"
      "device `device`, on one of its streams; status[row] (int32) receives 0 or\n"
      "the failure code.");
#endif
}

}  // namespace dvmrl
