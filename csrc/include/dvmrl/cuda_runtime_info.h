// Queries of the CUDA runtime that also work without a GPU or driver.
#pragma once

#include <string>

namespace dvmrl {

// Number of usable CUDA devices; 0 when the build lacks CUDA or when no
// driver or GPU is present. `error` receives the runtime's reason for 0.
int cuda_device_count(std::string* error);

// Raise std::runtime_error naming `op` unless a CUDA device is usable.
void require_cuda(const char* op);

}  // namespace dvmrl
