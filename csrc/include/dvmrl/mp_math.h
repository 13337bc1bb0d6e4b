// Per-element math of the composition MPNN, shared by the CPU and the CUDA
// kernels: activations, the weighted max-subtracted softmax over the (at
// most 8) slots of one composition, and offsets into the flat parameter
// buffer. The templates work on scalars and on GCC vector types alike.
// Every function has internal linkage (static), so the copies compiled
// with AVX2 or AVX-512 flags never replace the baseline copy at link time.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DVMRL_HD __host__ __device__
#else
#define DVMRL_HD
#endif

namespace dvmrl {
namespace mp {

// Largest K (element slots per composition) the kernels accept.
constexpr int kMaxSlots = 8;
// Largest head depth D the kernels accept.
constexpr int kMaxHeadDepth = 16;

// silu(z) = z * sigmoid(z), given s = sigmoid(z).
template <class V>
DVMRL_HD static inline V silu_from_sigmoid(V z, V s) {
  return z * s;
}

// d silu / dz = s (1 + z (1 - s)), given s = sigmoid(z).
template <class V, class T>
DVMRL_HD static inline V silu_grad_from_sigmoid(V z, V s) {
  return s * (T(1) + z * (T(1) - s));
}

// Sizes of the model and of one batch.
struct Dims {
  int64_t batch;   // B
  int64_t slots;   // K
  int64_t rows;    // E, rows of the node table
  int64_t hidden;  // H
  int64_t gate;    // Hg
  int64_t msg;     // Hm
  int64_t layers;  // L
  int64_t head;    // Hh
  int64_t depth;   // D
  int64_t n_out;
};

// Offsets of the parameters in the flat buffer (docs/architecture.md,
// "Flat parameter buffer"; dvmrl.layout.parameter_layout in Python).
struct Layout {
  int64_t layer_size;
  // Within layer l, relative to l * layer_size.
  int64_t gate_w, gate_b, gate_u, gate_d, msg_w1, msg_b1, msg_w2, msg_b2;
  // Absolute offsets.
  int64_t pool_gate_w, pool_gate_b, pool_gate_u, pool_gate_d;
  int64_t pool_msg_w1, pool_msg_b1, pool_msg_w2, pool_msg_b2;
  int64_t head_w[kMaxHeadDepth], head_b[kMaxHeadDepth];
  int64_t head_out_w, head_out_b;
  int64_t total;
};

DVMRL_HD static inline int64_t head_input_width(const Dims& d, int64_t depth) {
  return depth == 0 ? d.hidden : d.head;
}

DVMRL_HD static inline Layout make_layout(const Dims& d) {
  Layout p{};
  const int64_t h = d.hidden, hg = d.gate, hm = d.msg;
  int64_t o = 0;
  p.gate_w = o;  o += 2 * hg * h;  // gate_w_i then gate_w_j: one [2 Hg, H] matrix
  p.gate_b = o;  o += hg;
  p.gate_u = o;  o += hg;
  p.gate_d = o;  o += 1;
  p.msg_w1 = o;  o += 2 * hm * h;  // msg_w1_i then msg_w1_j: one [2 Hm, H] matrix
  p.msg_b1 = o;  o += hm;
  p.msg_w2 = o;  o += h * hm;
  p.msg_b2 = o;  o += h;
  p.layer_size = o;
  o = d.layers * p.layer_size;
  p.pool_gate_w = o;  o += hg * h;
  p.pool_gate_b = o;  o += hg;
  p.pool_gate_u = o;  o += hg;
  p.pool_gate_d = o;  o += 1;
  p.pool_msg_w1 = o;  o += hm * h;
  p.pool_msg_b1 = o;  o += hm;
  p.pool_msg_w2 = o;  o += h * hm;
  p.pool_msg_b2 = o;  o += h;
  for (int64_t k = 0; k < d.depth && k < kMaxHeadDepth; ++k) {
    p.head_w[k] = o;  o += d.head * head_input_width(d, k);
    p.head_b[k] = o;  o += d.head;
  }
  const int64_t last = d.depth > 0 ? d.head : h;
  p.head_out_w = o;  o += d.n_out * last;
  p.head_out_b = o;  o += d.n_out;
  p.total = o;
  return p;
}

// Offsets (in elements) of the activations that the forward saves for the
// backward, in one workspace buffer. Every per-node array has B * K rows.
// The CPU kernels use compact rows (the real slots of composition b are
// rows node_offset[b] .. node_offset[b + 1] - 1), and the CUDA kernels use
// the padded row b * K + k.
struct WsLayout {
  int64_t proj_width;  // 2 Hg + 2 Hm: columns [G_a h | G_b h | M_a h | M_b h]
  int64_t pool_width;  // Hg + Hm: pooling gate and message pre-activations
  int64_t hs;          // L + 1 arrays [B K, H]: input of each layer, then the output
  int64_t proj;        // L arrays [B K, 2 Hg + 2 Hm], without biases
  int64_t pool;        // [B K, Hg + Hm], with biases
  int64_t aggp;        // [B, Hm]: attention-weighted pooled message hidden state
  int64_t suma;        // [B]: sum of the pooling attention (1, or 0 if no weight)
  int64_t pooled;      // [B, H]
  int64_t zh;          // D arrays [B, Hh]: head pre-activations
  int64_t total;
};

DVMRL_HD static inline WsLayout make_ws_layout(const Dims& d) {
  WsLayout w{};
  const int64_t nodes = d.batch * d.slots;
  w.proj_width = 2 * d.gate + 2 * d.msg;
  w.pool_width = d.gate + d.msg;
  int64_t o = 0;
  w.hs = o;      o += (d.layers + 1) * nodes * d.hidden;
  w.proj = o;    o += d.layers * nodes * w.proj_width;
  w.pool = o;    o += nodes * w.pool_width;
  w.aggp = o;    o += d.batch * d.msg;
  w.suma = o;    o += d.batch;
  w.pooled = o;  o += d.batch * d.hidden;
  w.zh = o;      o += d.depth * d.batch * d.head;
  w.total = o;
  return w;
}

// Softmax state of one row: a_j = w_j exp(g_j - max) / denom.
template <class T>
struct SoftmaxRow {
  T max;  // max of g over valid entries (0 when there are none)
  // Sum of w_j exp(g_j - max) when it is > 0, else -1: the row was then
  // divided by 1, so a_j = w_j exp(g_j - max) (zero or negative weights).
  T denom;
};

// Weighted softmax over entries j < n with valid[j]; invalid entries get
// a_j = 0. `expf_` is the exponential to use. Matches the reference: the
// max is subtracted first and a denominator that is not > 0 is replaced
// by 1.
template <class T, class Exp>
DVMRL_HD static inline SoftmaxRow<T> weighted_softmax(const T* g, const T* w, const bool* valid,
                                               int n, T* a, Exp expf_) {
  SoftmaxRow<T> row{T(0), T(0)};
  bool any = false;
  for (int j = 0; j < n; ++j) {
    if (!valid[j]) continue;
    if (!any || g[j] > row.max) row.max = g[j];
    any = true;
  }
  if (!any) row.max = T(0);
  T denom = T(0);
  for (int j = 0; j < n; ++j) {
    a[j] = valid[j] ? w[j] * expf_(g[j] - row.max) : T(0);
    denom += a[j];
  }
  row.denom = denom > T(0) ? denom : T(-1);
  const T divisor = denom > T(0) ? denom : T(1);
  for (int j = 0; j < n; ++j) a[j] = a[j] / divisor;
  return row;
}

// Backward of weighted_softmax: given a and dL/da, write dL/dg and add
// dL/dw to dw (both for valid entries only).
template <class T, class Exp>
DVMRL_HD static inline void weighted_softmax_backward(const T* g, const T* w, const bool* valid,
                                               int n, const T* a, const T* da,
                                               SoftmaxRow<T> row, T* dg, T* dw,
                                               Exp expf_) {
  const bool normalized = row.denom > T(0);
  T dot = T(0);
  for (int j = 0; j < n; ++j) dot += a[j] * da[j];
  for (int j = 0; j < n; ++j) {
    if (!valid[j]) {
      dg[j] = T(0);
      continue;
    }
    // score_j = w_j e_j with e_j = exp(g_j - max); a_j = score_j / denom,
    // or a_j = score_j where the denominator was replaced by 1.
    const T dscore = normalized ? (da[j] - dot) / row.denom : da[j];
    const T e = expf_(g[j] - row.max);
    dw[j] += dscore * e;
    dg[j] = dscore * w[j] * e;
  }
  if (normalized) return;
  // Without the division a_j = w_j exp(g_j - max) depends on the max
  // itself, with d a_j / d max = -a_j. The max's gradient goes to the
  // entries that attain it, in equal shares, as torch.amax's does.
  int ties = 0;
  for (int j = 0; j < n; ++j) ties += valid[j] && g[j] == row.max ? 1 : 0;
  if (ties == 0) return;
  const T share = -dot / T(ties);
  for (int j = 0; j < n; ++j) {
    if (valid[j] && g[j] == row.max) dg[j] += share;
  }
}

}  // namespace mp
}  // namespace dvmrl
