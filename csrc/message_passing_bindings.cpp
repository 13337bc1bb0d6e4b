// Bindings of the fused message-passing kernels.
//
// Tensors cross as raw addresses (tensor.data_ptr()) with their sizes, so
// the core never links libtorch. dvmrl.ops validates dtypes, devices and
// shapes; the sizes are checked again here, and a mismatch raises
// ValueError naming the op and the sizes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/message_passing_cpu.h"
#include "dvmrl/checks.h"
#include "dvmrl/registry.h"
#if defined(DVMRL_WITH_CUDA)
#include "cuda/message_passing_cuda.h"
#endif

namespace py = pybind11;

namespace dvmrl {

namespace {

// dims: [B, K, E, H, Hg, Hm, L, Hh, D, n_out].
mp::Dims parse_dims(const char* op, const std::vector<int64_t>& v) {
  if (v.size() != 10) {
    throw std::invalid_argument(std::string(op) +
                                ": dims must be [B, K, E, H, Hg, Hm, L, Hh, D, n_out], got " +
                                std::to_string(v.size()) + " values");
  }
  mp::Dims d{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]};
  check_at_least(op, "B (batch)", d.batch, 0);
  check_range(op, "K (slots)", d.slots, 1, mp::kMaxSlots);
  check_at_least(op, "E (node table rows)", d.rows, 1);
  check_at_least(op, "H (hidden)", d.hidden, 1);
  check_at_least(op, "Hg (gate_hidden)", d.gate, 1);
  check_at_least(op, "Hm (msg_hidden)", d.msg, 1);
  check_at_least(op, "L (layers)", d.layers, 0);
  check_at_least(op, "Hh (head_hidden)", d.head, 1);
  check_range(op, "D (head_layers)", d.depth, 0, mp::kMaxHeadDepth);
  check_at_least(op, "n_out", d.n_out, 1);
  return d;
}

int check_dtype(const char* op, int dtype) {
  if (dtype != mp::kFloat32 && dtype != mp::kFloat64) {
    throw std::invalid_argument(std::string(op) + ": dtype code must be 0 (float32) or 1 "
                                "(float64), got " + std::to_string(dtype));
  }
  return dtype;
}

void check_common(const char* op, const mp::Dims& d, int64_t table_numel,
                  int64_t flat_numel, int64_t ws_numel) {
  check_numel(op, "node_table", table_numel, d.rows * d.hidden);
  check_numel(op, "flat", flat_numel, mp::make_layout(d).total);
  const int64_t ws = mp::make_ws_layout(d).total;
  if (ws_numel < ws) {
    throw std::invalid_argument(std::string(op) + ": workspace has " +
                                std::to_string(ws_numel) + " elements, expected at least " +
                                std::to_string(ws));
  }
}

void run(bool forward, int dtype, int device, uintptr_t stream, const mp::Dims& d,
         const mp::Buffers& buf, const char* op) {
  if (d.batch == 0) return;  // nothing to compute, no launch
  if (device < 0) {
    py::gil_scoped_release release;
    if (forward) {
      mp::forward_cpu(dtype, d, buf);
    } else {
      mp::backward_cpu(dtype, d, buf);
    }
    return;
  }
#if defined(DVMRL_WITH_CUDA)
  const int64_t scratch = mp::cuda_scratch_size(d);
  if (buf.scratch == 0 || buf.scratch_numel < scratch) {
    throw std::invalid_argument(std::string(op) + ": a CUDA call needs a scratch buffer of " +
                                std::to_string(scratch) + " elements on the device, got " +
                                std::to_string(buf.scratch_numel) +
                                "; pass scratch and scratch_numel (see mp_cuda_scratch_size)");
  }
  py::gil_scoped_release release;
  if (forward) {
    mp::forward_cuda(dtype, d, buf, device, stream);
  } else {
    mp::backward_cuda(dtype, d, buf, device, stream);
  }
#else
  (void)stream;
  throw std::runtime_error(std::string(op) +
                           ": this build of dvmrl._core has no CUDA backend; rebuild with "
                           "DVMRL_CUDA=ON pip install .");
#endif
}

}  // namespace

void register_message_passing(pybind11::module_& m) {
  m.def(
      "mp_workspace_size",
      [](const std::vector<int64_t>& dims) {
        return mp::make_ws_layout(parse_dims("mp_workspace_size", dims)).total;
      },
      py::arg("dims"),
      "Elements of the workspace the forward fills for the backward.");
  m.def(
      "mp_parameter_count",
      [](const std::vector<int64_t>& dims) {
        return mp::make_layout(parse_dims("mp_parameter_count", dims)).total;
      },
      py::arg("dims"), "Length of the flat parameter buffer, as the kernels read it.");
  m.def(
      "mp_forward",
      [](int dtype, int device, uintptr_t stream, const std::vector<int64_t>& dims,
         uintptr_t table, int64_t table_numel, uintptr_t flat, int64_t flat_numel,
         uintptr_t index, uintptr_t frac, uintptr_t mask, uintptr_t dropout, uintptr_t out,
         uintptr_t ws, int64_t ws_numel, uintptr_t scratch, int64_t scratch_numel) {
        const char* op = "model_forward";
        check_dtype(op, dtype);
        const mp::Dims d = parse_dims(op, dims);
        check_common(op, d, table_numel, flat_numel, ws_numel);
        if (d.batch > 0) {
          check_pointer(op, "node_table", table);
          check_pointer(op, "flat", flat);
          check_pointer(op, "element_index", index);
          check_pointer(op, "frac", frac);
          check_pointer(op, "mask", mask);
          check_pointer(op, "out", out);
          check_pointer(op, "workspace", ws);
        }
        mp::Buffers buf{table, flat, index, frac, mask, dropout, out, ws, 0, 0, 0, 0,
                        false, false, scratch, scratch_numel};
        run(true, dtype, device, stream, d, buf, op);
      },
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("dims"),
      py::arg("node_table"), py::arg("node_table_numel"), py::arg("flat"),
      py::arg("flat_numel"), py::arg("element_index"), py::arg("frac"), py::arg("mask"),
      py::arg("dropout_mask"), py::arg("out"), py::arg("workspace"),
      py::arg("workspace_numel"), py::arg("scratch") = 0, py::arg("scratch_numel") = 0,
      "Fused forward of the composition MPNN on raw addresses; device -1 is the CPU.\n"
      "A CUDA call also takes a device scratch buffer of mp_cuda_scratch_size(dims)\n"
      "elements.");
  m.def(
      "mp_backward",
      [](int dtype, int device, uintptr_t stream, const std::vector<int64_t>& dims,
         uintptr_t table, int64_t table_numel, uintptr_t flat, int64_t flat_numel,
         uintptr_t index, uintptr_t frac, uintptr_t mask, uintptr_t dropout, uintptr_t ws,
         int64_t ws_numel, uintptr_t grad_out, uintptr_t grad_table, uintptr_t grad_flat,
         uintptr_t grad_frac, bool table_grad, bool flat_grad, uintptr_t scratch,
         int64_t scratch_numel) {
        const char* op = "model_backward";
        check_dtype(op, dtype);
        if (flat_grad && !table_grad) {
          throw std::invalid_argument(std::string(op) +
                                      ": flat_grad=True requires table_grad=True, because "
                                      "the flat-gradient pass also writes grad_node_table");
        }
        const mp::Dims d = parse_dims(op, dims);
        check_common(op, d, table_numel, flat_numel, ws_numel);
        if (d.batch > 0) {
          check_pointer(op, "flat", flat);
          check_pointer(op, "element_index", index);
          check_pointer(op, "frac", frac);
          check_pointer(op, "mask", mask);
          check_pointer(op, "workspace", ws);
          check_pointer(op, "grad_out", grad_out);
          if (table_grad) check_pointer(op, "grad_node_table", grad_table);
          if (flat_grad) check_pointer(op, "grad_flat", grad_flat);
          check_pointer(op, "grad_frac", grad_frac);
        }
        mp::Buffers buf{table, flat, index, frac, mask, dropout, 0, ws,
                        grad_out, grad_table, grad_flat, grad_frac, table_grad, flat_grad,
                        scratch, scratch_numel};
        run(false, dtype, device, stream, d, buf, op);
      },
      py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("dims"),
      py::arg("node_table"), py::arg("node_table_numel"), py::arg("flat"),
      py::arg("flat_numel"), py::arg("element_index"), py::arg("frac"), py::arg("mask"),
      py::arg("dropout_mask"), py::arg("workspace"), py::arg("workspace_numel"),
      py::arg("grad_out"), py::arg("grad_node_table"), py::arg("grad_flat"),
      py::arg("grad_frac"), py::arg("table_grad") = true, py::arg("flat_grad") = true,
      py::arg("scratch") = 0, py::arg("scratch_numel") = 0,
      "Fused backward: gradients for node_table, flat and frac from grad_out.\n"
      "grad_frac is always written, grad_node_table only with table_grad and grad_flat\n"
      "only with flat_grad (which requires table_grad). An unwritten gradient's address\n"
      "may be 0. With table_grad alone the backward skips the weight-gradient sums.\n"
      "A CUDA call also takes a device scratch buffer, as mp_forward. With B = 0\n"
      "nothing runs and no buffer is written: the caller zeroes the gradients, as\n"
      "dvmrl.ops does.");
#if defined(DVMRL_WITH_CUDA)
  m.def(
      "mp_cuda_scratch_size",
      [](const std::vector<int64_t>& dims) {
        return mp::cuda_scratch_size(parse_dims("mp_cuda_scratch_size", dims));
      },
      py::arg("dims"), "Elements of the device scratch buffer of a CUDA call.");
  m.def(
      "mp_cuda_kernels_available",
      [](int device) {
        std::string reason;
        bool available;
        {
          py::gil_scoped_release release;
          available = mp::cuda_kernels_available(device, &reason);
        }
        return py::make_tuple(available, reason);
      },
      py::arg("device"),
      "(available, reason): whether this build has kernels for the GPU's architecture.");
#endif
  m.def("mp_cpu_isa", [] { return std::string(mp::cpu_isa()); },
        "ISA variant the CPU message-passing kernels run.");
  m.def(
      "mp_set_cpu_isa", [](const std::string& name) { mp::set_cpu_isa(name.c_str()); },
      py::arg("name"), "Force an ISA variant (auto, baseline, avx2, avx512), for tests.");
}

}  // namespace dvmrl
