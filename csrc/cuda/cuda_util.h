// Device selection and error checks shared by the CUDA entry points.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace dvmrl {
namespace cuda_util {

// Throws std::runtime_error naming the op and the CUDA call when `status`
// is an error, after clearing it so that the next call does not report it.
inline void check_cuda(cudaError_t status, const char* op, const char* call) {
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string(op) + ": " + call + " failed: " +
                             cudaGetErrorString(status));
  }
}

// Selects the device for the duration of a call and restores the old one.
// It switches only when the device differs: since CUDA 12, cudaSetDevice
// creates the device's primary context, so an unconditional restore could
// create a context on a device the process never used.
// NOTE: a restore to a device without a context still creates one, such as
// device 0 in a thread that used only another GPU. Only the driver API can
// tell whether a device has a context.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    check_cuda(cudaGetDevice(&previous_), op, "cudaGetDevice");
    if (previous_ != device) {
      check_cuda(cudaSetDevice(device), op, "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    // A destructor cannot throw, so a failed restore is cleared here rather
    // than left for the next call's cudaGetLastError to misreport.
    if (switched_ && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace cuda_util
}  // namespace dvmrl
