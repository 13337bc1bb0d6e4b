// Module entry point: build information, thread settings, and the kernel
// families registered from their own files.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cpu/message_passing_cpu.h"
#include "dvmrl/cuda_runtime_info.h"
#include "dvmrl/registry.h"
#include "dvmrl/thread_pool.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = DVMRL_VERSION;
  info["compiler"] = DVMRL_CXX_COMPILER;
  info["cxx_standard"] = 17;
  info["thread_backend"] = "std::thread pool (no OpenMP)";
  info["num_threads"] = dvmrl::ThreadPool::instance().num_threads();
  // The variant the dispatcher runs: the best the CPU supports (AVX-512
  // needs F, DQ, VL and BW), or the one a test forced.
  info["cpu_isa"] = std::string(dvmrl::mp::cpu_isa());
#if defined(DVMRL_WITH_CUDA)
  info["cuda_compiled"] = true;
  info["cuda_architectures"] = std::string(DVMRL_CUDA_ARCHITECTURES);
  info["cuda_compiler"] = DVMRL_CUDA_COMPILER;
#else
  info["cuda_compiled"] = false;
  info["cuda_architectures"] = "";
  info["cuda_compiler"] = "";
#endif
  std::string reason;
  int devices = dvmrl::cuda_device_count(&reason);
  info["cuda_device_count"] = devices;
  info["cuda_unavailable_reason"] = devices > 0 ? std::string() : reason;
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "dvmrl compiled core: fused message-passing and projection kernels";
  m.def("build_info", &build_info, "Compiler, threads, ISA and CUDA facts of this build.");
  m.def("get_num_threads", [] { return dvmrl::ThreadPool::instance().num_threads(); },
        "Threads the CPU kernels use, the calling thread included.");
  m.def("set_num_threads", [](int n) { dvmrl::ThreadPool::instance().set_num_threads(n); },
        py::arg("n"), "Set the threads the CPU kernels use (n >= 1).");
  m.def("default_num_threads", &dvmrl::default_num_threads,
        "OMP_NUM_THREADS when it is a positive integer, else the cores this "
        "process may run on.");
  dvmrl::register_message_passing(m);
  dvmrl::register_projection(m);
}
