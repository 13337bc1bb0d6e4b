// Each kernel family adds its bindings to the module through one function,
// so families can live in separate files without touching bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace dvmrl {

void register_message_passing(pybind11::module_& m);
void register_projection(pybind11::module_& m);

}  // namespace dvmrl
