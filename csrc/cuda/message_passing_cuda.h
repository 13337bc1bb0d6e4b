// CUDA entry points of the fused composition MPNN (message_passing.cu).
#pragma once

#include <cstdint>

#include "../cpu/message_passing_cpu.h"

namespace dvmrl {
namespace mp {

// Run on CUDA device `device` in stream `stream` (a cudaStream_t as an
// integer; 0 is the legacy default stream). Every launch is checked, and a
// failure raises std::runtime_error naming the op.
void forward_cuda(int dtype, const Dims& d, const Buffers& buf, int device,
                  uintptr_t stream);
void backward_cuda(int dtype, const Dims& d, const Buffers& buf, int device,
                   uintptr_t stream);

}  // namespace mp
}  // namespace dvmrl
