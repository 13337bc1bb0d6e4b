// Interface between the CPU dispatcher (message_passing.cpp) and the
// ISA-specific kernel variants (message_passing_{base,avx2,avx512}.cpp).
//
// The variants only compute on raw pointers. Allocation, threading and the
// reduction of per-chunk gradients stay in the baseline translation unit,
// so the linker cannot pick a std:: template compiled with AVX-512 flags
// for code that runs on an older CPU.
#pragma once

#include <cstdint>

#include "dvmrl/mp_math.h"

namespace dvmrl {
namespace mp {

// Compositions per sub-block: the unit of the node-level matrix products.
constexpr int64_t kSubBlock = 32;

// Offsets of the transposed weight copies ([in, out] row-major) that the
// forward uses for large batches.
struct TransposedLayout {
  int64_t layer_stride;  // per layer: proj [H, 2 Hg + 2 Hm] then w2 [Hm, H]
  int64_t layer_proj, layer_w2;
  int64_t pool_proj;  // [H, Hg + Hm]
  int64_t pool_w2;    // [Hm, H]
  int64_t head[kMaxHeadDepth];  // [in_d, Hh]
  int64_t head_out;             // [in, n_out]
  int64_t total;
};

static inline TransposedLayout make_transposed_layout(const Dims& d) {
  TransposedLayout t{};
  const int64_t wp = 2 * d.gate + 2 * d.msg;
  t.layer_proj = 0;
  t.layer_w2 = d.hidden * wp;
  t.layer_stride = t.layer_w2 + d.msg * d.hidden;
  int64_t o = d.layers * t.layer_stride;
  t.pool_proj = o;  o += d.hidden * (d.gate + d.msg);
  t.pool_w2 = o;    o += d.msg * d.hidden;
  for (int64_t k = 0; k < d.depth; ++k) {
    t.head[k] = o;
    o += head_input_width(d, k) * d.head;
  }
  t.head_out = o;
  o += (d.depth > 0 ? d.head : d.hidden) * d.n_out;
  t.total = o;
  return t;
}

template <class T>
struct Ctx {
  Dims d;
  Layout p;
  WsLayout w;
  TransposedLayout tl;
  const T* table;          // [E, H]
  const T* flat;           // [P]
  const int64_t* index;    // [B, K]
  const T* frac;           // [B, K]
  const bool* mask;        // [B, K]
  const T* dropout;        // [D, B, Hh] or nullptr
  T* out;                  // [B, n_out] (forward)
  T* ws;                   // saved activations, WsLayout
  const int64_t* node_offset;  // [B + 1]
  const int8_t* node_slot;     // [B K]: slot of each compact node row
  const T* wt;             // transposed weights, or nullptr for the dot form
  const T* grad_out;       // [B, n_out] (backward)
  T* grad_frac;            // [B, K] (backward)
  // [real nodes, H]: the backward stores dL/dh0 of every compact node row
  // here when it is not null (the node-table gradient without grad_flat).
  T* grad_nodes;
};

// Scratch elements one forward sub-block or one backward chunk needs.
static inline int64_t forward_scratch_size(const Dims& d) {
  const int64_t n = kSubBlock * d.slots;
  const int64_t wide = d.hidden > d.head ? d.hidden : d.head;
  return n * d.msg + n + 2 * kSubBlock * wide + 4 * kMaxSlots * kMaxSlots;
}

static inline int64_t backward_scratch_size(const Dims& d) {
  const int64_t n = kSubBlock * d.slots;
  const int64_t wp = 2 * d.gate + 2 * d.msg;
  const int64_t wide = d.hidden > d.head ? d.hidden : d.head;
  const int64_t per_edge = kMaxSlots * (2 * d.gate + 2 * d.msg);
  return n * (d.hidden + 2 * d.msg + wp + 1) + 4 * kSubBlock * wide +
         kSubBlock * d.msg + per_edge + 16 * kMaxSlots * kMaxSlots;
}

template <class T>
using ForwardFn = void (*)(const Ctx<T>&, int64_t begin, int64_t end, T* scratch);
// grad_flat [P] and grad_table [E, H] are the chunk's partial sums; the
// caller zeroes them and reduces the chunks in order.
template <class T>
using BackwardFn = void (*)(const Ctx<T>&, int64_t begin, int64_t end, T* scratch,
                            T* grad_flat, T* grad_table);

// dst [cols, rows] = src [rows, cols]^T, with leading dimensions lds and ldd.
template <class T>
using TransposeFn = void (*)(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst,
                             int64_t ldd);

struct KernelSet {
  const char* isa;
  ForwardFn<float> forward_f32;
  ForwardFn<double> forward_f64;
  BackwardFn<float> backward_f32;
  BackwardFn<double> backward_f64;
  TransposeFn<float> transpose_f32;
  TransposeFn<double> transpose_f64;
};

// Raw addresses of the tensors of one call (0 for an absent tensor).
// The backward always writes grad_frac. It writes grad_table when
// table_grad is set and grad_flat when flat_grad is set, and flat_grad
// requires table_grad. A gradient that is not requested is left untouched
// and its address may be 0.
struct Buffers {
  uintptr_t table, flat, index, frac, mask, dropout, out, ws;
  uintptr_t grad_out, grad_table, grad_flat, grad_frac;
  bool table_grad, flat_grad;
  // CUDA only: temporaries of one call, cuda_scratch_size(d) elements. The
  // CPU kernels keep their own per-thread buffers.
  uintptr_t scratch = 0;
  int64_t scratch_numel = 0;
};

// Data type codes shared with dvmrl.ops.
constexpr int kFloat32 = 0;
constexpr int kFloat64 = 1;

// Run the forward (out, ws) or the backward (grad_table, grad_flat,
// grad_frac) on the CPU; the sizes have been checked by the caller.
void forward_cpu(int dtype, const Dims& d, const Buffers& buf);
void backward_cpu(int dtype, const Dims& d, const Buffers& buf);

// Name of the ISA variant in use, and a way to force one ("baseline",
// "avx2", "avx512" or "auto"); std::invalid_argument when unsupported.
const char* cpu_isa();
void set_cpu_isa(const char* name);

KernelSet baseline_kernels();
#if defined(DVMRL_X86)
KernelSet avx2_kernels();
KernelSet avx512_kernels();
#endif

}  // namespace mp
}  // namespace dvmrl
