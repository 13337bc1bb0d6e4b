// Bindings of the fused message-passing kernels.
#include "dvmrl/registry.h"

namespace dvmrl {

void register_message_passing(pybind11::module_& m) { (void)m; }

}  // namespace dvmrl
