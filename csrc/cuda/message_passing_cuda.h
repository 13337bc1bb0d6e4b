// CUDA entry points of the fused composition MPNN (message_passing.cu).
#pragma once

#include <cstdint>
#include <string>

#include "../cpu/message_passing_cpu.h"

namespace dvmrl {
namespace mp {

// Run on CUDA device `device` in stream `stream` (a cudaStream_t as an
// integer; 0 is the legacy default stream). A launch that fails to start (bad
// configuration, no kernel image) raises std::runtime_error naming the op. A
// fault inside a running kernel surfaces later, at the next synchronisation.
void forward_cuda(int dtype, const Dims& d, const Buffers& buf, int device,
                  uintptr_t stream);
void backward_cuda(int dtype, const Dims& d, const Buffers& buf, int device,
                   uintptr_t stream);

// Elements of the scratch buffer (in the call's dtype) that forward_cuda and
// backward_cuda need, as Buffers::scratch.
int64_t cuda_scratch_size(const Dims& d);

// Whether the kernels can run on `device`: false, with the reason, when the
// binary has no code for the GPU's architecture.
bool cuda_kernels_available(int device, std::string* reason);

}  // namespace mp
}  // namespace dvmrl
