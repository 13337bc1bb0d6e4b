// Bindings of the batched projection onto {sum x = 1, lo <= x <= hi}.
#include "dvmrl/registry.h"

namespace dvmrl {

void register_projection(pybind11::module_& m) { (void)m; }

}  // namespace dvmrl
