// CPU-only builds: CUDA queries report no device.
#include <stdexcept>
#include <string>

#include "dvmrl/cuda_runtime_info.h"

#ifndef DVMRL_WITH_CUDA
namespace dvmrl {

int cuda_device_count(std::string* error) {
  if (error != nullptr) *error = "dvmrl._core was built without CUDA";
  return 0;
}

void require_cuda(const char* op) {
  throw std::runtime_error(std::string(op) +
                           "(): dvmrl._core was built without CUDA; reinstall with "
                           "DVMRL_CUDA=ON pip install . on a machine with nvcc");
}

}  // namespace dvmrl
#endif
