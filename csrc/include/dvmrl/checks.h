// Size and argument checks shared by the kernel entry points. They throw
// std::invalid_argument, which pybind11 turns into ValueError.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dvmrl {

// Raise unless `value` is >= `minimum`.
inline void check_at_least(const char* op, const char* name, int64_t value,
                           int64_t minimum) {
  if (value < minimum) {
    throw std::invalid_argument(std::string(op) + ": " + name + " must be >= " +
                                std::to_string(minimum) + ", got " +
                                std::to_string(value));
  }
}

// Raise unless `value` lies in [lo, hi].
inline void check_range(const char* op, const char* name, int64_t value, int64_t lo,
                        int64_t hi) {
  if (value < lo || value > hi) {
    throw std::invalid_argument(std::string(op) + ": " + name + " must be in [" +
                                std::to_string(lo) + ", " + std::to_string(hi) +
                                "], got " + std::to_string(value));
  }
}

// Raise unless a buffer has exactly `expected` elements.
inline void check_numel(const char* op, const char* name, int64_t actual,
                        int64_t expected) {
  if (actual != expected) {
    throw std::invalid_argument(std::string(op) + ": " + name + " has " +
                                std::to_string(actual) + " elements, expected " +
                                std::to_string(expected));
  }
}

// Raise for a null pointer where data is required.
inline void check_pointer(const char* op, const char* name, uintptr_t ptr) {
  if (ptr == 0) {
    throw std::invalid_argument(std::string(op) + ": " + name +
                                " is a null pointer; pass a tensor with storage");
  }
}

}  // namespace dvmrl
