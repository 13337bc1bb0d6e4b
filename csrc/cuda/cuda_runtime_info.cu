// CUDA builds: ask the statically linked runtime, which opens libcuda only
// now, so a machine without a driver gets an error code, not a load failure.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "dvmrl/cuda_runtime_info.h"

namespace dvmrl {

int cuda_device_count(std::string* error) {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    if (error != nullptr) {
      *error = cudaGetErrorString(status);
      // The runtime reports a missing driver the same way as an old one.
      if (status == cudaErrorInsufficientDriver) {
        *error = "no NVIDIA driver found, or one older than the CUDA runtime dvmrl "
                 "was built with (" + *error + ")";
      }
    }
    cudaGetLastError();  // reset the last-error state so later calls start clean
    return 0;
  }
  if (count == 0 && error != nullptr) *error = "no CUDA device found";
  return count;
}

void require_cuda(const char* op) {
  std::string reason;
  if (cuda_device_count(&reason) == 0) {
    throw std::runtime_error(std::string(op) + "(): no usable CUDA GPU (" + reason +
                             "); run on a GPU node or pass device='cpu'");
  }
}

}  // namespace dvmrl
