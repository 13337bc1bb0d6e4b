// CPU dispatcher of the fused composition MPNN: ISA selection, compact node
// offsets, weight transposition, the fixed block partition over
// compositions and the ordered reduction of per-chunk gradients.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "dvmrl/thread_pool.h"
#include "message_passing_cpu.h"

namespace dvmrl {
namespace mp {

namespace {

// Batches up to this many compositions run on the calling thread alone:
// waking workers costs more than the work.
constexpr int64_t kSerialBatch = 64;
// Minimum compositions per backward chunk, and the maximum chunk count.
// Each chunk keeps a private copy of the parameter gradients, so the count
// is bounded; it depends on B only, never on the thread count.
constexpr int64_t kMinChunk = 128;
constexpr int64_t kMaxChunks = 16;
// Forward calls with at least this many real nodes use transposed weight
// copies (outer-product matrix products); smaller ones use dot products.
// Measured forward times on a 2-core AMD EPYC (AVX-512), H = 64: 46 us
// with dot products against 52 us transposed for about 14 nodes, but
// 193 us against 111 us for about 56 nodes.
constexpr int64_t kTransposeNodes = 24;

KernelSet detect_kernels() {
#if defined(DVMRL_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("fma"))
    return avx512_kernels();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2_kernels();
#endif
  return baseline_kernels();
}

KernelSet& active_kernels() {
  static KernelSet kernels = detect_kernels();
  return kernels;
}

struct NodeIndex {
  std::vector<int64_t> offset;  // [B + 1]
  std::vector<int8_t> slot;     // [real nodes]
};

NodeIndex build_node_index(const Dims& d, const int64_t* index, const bool* mask,
                           const char* op) {
  NodeIndex ni;
  ni.offset.resize(d.batch + 1);
  ni.slot.reserve(d.batch * d.slots);
  int64_t count = 0;
  for (int64_t b = 0; b < d.batch; ++b) {
    ni.offset[b] = count;
    for (int64_t k = 0; k < d.slots; ++k) {
      if (!mask[b * d.slots + k]) continue;
      const int64_t e = index[b * d.slots + k];
      if (e < 0 || e >= d.rows) {
        throw std::invalid_argument(
            std::string(op) + ": element_index[" + std::to_string(b) + ", " +
            std::to_string(k) + "] = " + std::to_string(e) +
            " is outside the node table with " + std::to_string(d.rows) + " rows");
      }
      ni.slot.push_back(static_cast<int8_t>(k));
      ++count;
    }
  }
  ni.offset[d.batch] = count;
  return ni;
}

// dst [cols, rows] = src [rows, cols]^T, in cache-sized tiles.
template <class T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t tile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += tile)
    for (int64_t c0 = 0; c0 < cols; c0 += tile)
      for (int64_t r = r0; r < std::min(rows, r0 + tile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + tile); ++c)
          dst[c * rows + r] = src[r * cols + c];
}

// Buffer of n elements left uninitialised: every kernel writes its scratch
// before reading it, and zeroing large buffers costs more than small
// batches compute.
template <class T>
std::unique_ptr<T[]> uninitialised(int64_t n) {
  return std::unique_ptr<T[]>(new T[n > 0 ? n : 1]);
}

// Scratch of at least n elements, kept per thread and per type between
// calls: the sizes depend on the model dims only (not on B), and reusing
// the memory spares a small batch the allocation and cold pages.
template <class T>
T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) {
    buffer.clear();
    buffer.shrink_to_fit();
    buffer.resize(static_cast<size_t>(n > 0 ? n : 1));
  }
  return buffer.data();
}

template <class T>
std::unique_ptr<T[]> transposed_weights(const Dims& d, const Layout& p,
                                        const TransposedLayout& tl, const T* flat) {
  std::unique_ptr<T[]> buffer = uninitialised<T>(tl.total);
  T* wt = buffer.get();
  const int64_t h = d.hidden, hg = d.gate, hm = d.msg, wp = 2 * hg + 2 * hm;
  for (int64_t l = 0; l < d.layers; ++l) {
    const T* lp = flat + l * p.layer_size;
    T* out = wt + l * tl.layer_stride;
    // [H, 2 Hg + 2 Hm]: the gate block then the message block, per input h.
    std::vector<T> gate_t(h * 2 * hg), msg_t(h * 2 * hm);
    transpose(lp + p.gate_w, 2 * hg, h, gate_t.data());
    transpose(lp + p.msg_w1, 2 * hm, h, msg_t.data());
    for (int64_t i = 0; i < h; ++i) {
      std::memcpy(out + tl.layer_proj + i * wp, gate_t.data() + i * 2 * hg,
                  sizeof(T) * 2 * hg);
      std::memcpy(out + tl.layer_proj + i * wp + 2 * hg, msg_t.data() + i * 2 * hm,
                  sizeof(T) * 2 * hm);
    }
    transpose(lp + p.msg_w2, h, hm, out + tl.layer_w2);
  }
  {
    const int64_t pw = hg + hm;
    std::vector<T> gate_t(h * hg), msg_t(h * hm);
    transpose(flat + p.pool_gate_w, hg, h, gate_t.data());
    transpose(flat + p.pool_msg_w1, hm, h, msg_t.data());
    for (int64_t i = 0; i < h; ++i) {
      std::memcpy(wt + tl.pool_proj + i * pw, gate_t.data() + i * hg, sizeof(T) * hg);
      std::memcpy(wt + tl.pool_proj + i * pw + hg, msg_t.data() + i * hm,
                  sizeof(T) * hm);
    }
    transpose(flat + p.pool_msg_w2, h, hm, wt + tl.pool_w2);
  }
  for (int64_t k = 0; k < d.depth; ++k)
    transpose(flat + p.head_w[k], d.head, head_input_width(d, k), wt + tl.head[k]);
  transpose(flat + p.head_out_w, d.n_out, d.depth > 0 ? d.head : h, wt + tl.head_out);
  return buffer;
}

// Zero every gradient entry of the flat buffer except the weight matrices,
// which the first sub-block of a backward chunk writes without reading:
// zeroing the whole buffer (400 KB at H = 64) cost about a third of a
// one-composition backward.
template <class T>
void zero_bias_grads(const Dims& d, const Layout& p, T* g) {
  auto zero = [g](int64_t offset, int64_t n) { std::fill(g + offset, g + offset + n, T(0)); };
  for (int64_t l = 0; l < d.layers; ++l) {
    const int64_t o = l * p.layer_size;
    zero(o + p.gate_b, p.msg_w1 - p.gate_b);  // gate_b, gate_u, gate_d
    zero(o + p.msg_b1, p.msg_w2 - p.msg_b1);
    zero(o + p.msg_b2, p.layer_size - p.msg_b2);
  }
  zero(p.pool_gate_b, p.pool_msg_w1 - p.pool_gate_b);  // pool_gate_b, _u, _d
  zero(p.pool_msg_b1, p.pool_msg_w2 - p.pool_msg_b1);
  const int64_t after_pool = p.pool_msg_b2 + d.hidden;
  zero(p.pool_msg_b2, after_pool - p.pool_msg_b2);
  for (int64_t k = 0; k < d.depth; ++k) zero(p.head_b[k], d.head);
  zero(p.head_out_b, p.total - p.head_out_b);
}

template <class T>
Ctx<T> make_ctx(const Dims& d, const Buffers& buf, const NodeIndex& ni) {
  Ctx<T> cx{};
  cx.d = d;
  cx.p = make_layout(d);
  cx.w = make_ws_layout(d);
  cx.tl = make_transposed_layout(d);
  cx.table = reinterpret_cast<const T*>(buf.table);
  cx.flat = reinterpret_cast<const T*>(buf.flat);
  cx.index = reinterpret_cast<const int64_t*>(buf.index);
  cx.frac = reinterpret_cast<const T*>(buf.frac);
  cx.mask = reinterpret_cast<const bool*>(buf.mask);
  cx.dropout = reinterpret_cast<const T*>(buf.dropout);
  cx.out = reinterpret_cast<T*>(buf.out);
  cx.ws = reinterpret_cast<T*>(buf.ws);
  cx.node_offset = ni.offset.data();
  cx.node_slot = ni.slot.data();
  cx.grad_out = reinterpret_cast<const T*>(buf.grad_out);
  cx.grad_frac = reinterpret_cast<T*>(buf.grad_frac);
  return cx;
}

template <class T>
ForwardFn<T> pick_forward(const KernelSet& k);
template <>
ForwardFn<float> pick_forward<float>(const KernelSet& k) { return k.forward_f32; }
template <>
ForwardFn<double> pick_forward<double>(const KernelSet& k) { return k.forward_f64; }
template <class T>
BackwardFn<T> pick_backward(const KernelSet& k);
template <>
BackwardFn<float> pick_backward<float>(const KernelSet& k) { return k.backward_f32; }
template <>
BackwardFn<double> pick_backward<double>(const KernelSet& k) { return k.backward_f64; }

template <class T>
void forward_typed(const Dims& d, const Buffers& buf) {
  const NodeIndex ni = build_node_index(d, reinterpret_cast<const int64_t*>(buf.index),
                                        reinterpret_cast<const bool*>(buf.mask),
                                        "model_forward");
  Ctx<T> cx = make_ctx<T>(d, buf, ni);
  std::unique_ptr<T[]> wt;
  if (ni.offset[d.batch] >= kTransposeNodes) {
    wt = transposed_weights(d, cx.p, cx.tl, cx.flat);
    cx.wt = wt.get();
  }
  const ForwardFn<T> fn = pick_forward<T>(active_kernels());
  const int64_t scratch_size = forward_scratch_size(d);
  parallel_for(d.batch, kSubBlock, kSerialBatch, [&](int64_t begin, int64_t end, int64_t) {
    T* scratch = thread_scratch<T>(scratch_size);
    fn(cx, begin, end, scratch);
  });
}

template <class T>
void backward_typed(const Dims& d, const Buffers& buf) {
  const NodeIndex ni = build_node_index(d, reinterpret_cast<const int64_t*>(buf.index),
                                        reinterpret_cast<const bool*>(buf.mask),
                                        "model_backward");
  const Ctx<T> cx = make_ctx<T>(d, buf, ni);
  const BackwardFn<T> fn = pick_backward<T>(active_kernels());
  const int64_t n_params = cx.p.total;
  const int64_t n_table = d.rows * d.hidden;
  T* grad_flat = reinterpret_cast<T*>(buf.grad_flat);
  T* grad_table = reinterpret_cast<T*>(buf.grad_table);

  // Fixed partition: chunk boundaries depend on B only.
  int64_t chunk = std::max(kMinChunk, (d.batch + kMaxChunks - 1) / kMaxChunks);
  chunk = (chunk + kSubBlock - 1) / kSubBlock * kSubBlock;
  const int64_t n_chunks = num_blocks(d.batch, chunk);
  const int64_t scratch_size = backward_scratch_size(d);

  if (!buf.param_grads) {
    // Only grad_frac: each chunk writes its compositions' rows, no reduction.
    parallel_for(n_chunks, 1, 1, [&](int64_t, int64_t, int64_t c) {
      T* scratch = thread_scratch<T>(scratch_size);
      const int64_t begin = c * chunk;
      fn(cx, begin, std::min(d.batch, begin + chunk), scratch, nullptr, nullptr);
    });
    return;
  }
  if (n_chunks <= 1) {
    zero_bias_grads(d, cx.p, grad_flat);
    std::fill(grad_table, grad_table + n_table, T(0));
    T* scratch = thread_scratch<T>(scratch_size);
    fn(cx, 0, d.batch, scratch, grad_flat, grad_table);
    return;
  }
  const int64_t part = n_params + n_table;
  std::unique_ptr<T[]> partial_buffer = uninitialised<T>(n_chunks * part);
  T* partial = partial_buffer.get();
  parallel_for(n_chunks, 1, 1, [&](int64_t, int64_t, int64_t c) {
    T* mine = partial + c * part;
    zero_bias_grads(d, cx.p, mine);
    std::fill(mine + n_params, mine + part, T(0));
    T* scratch = thread_scratch<T>(scratch_size);
    const int64_t begin = c * chunk;
    const int64_t end = std::min(d.batch, begin + chunk);
    fn(cx, begin, end, scratch, mine, mine + n_params);
  });
  // Sum the chunks in chunk order, element by element.
  parallel_for(part, 16384, 65536, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t i = begin; i < end; ++i) {
      T s = partial[i];
      for (int64_t c = 1; c < n_chunks; ++c) s += partial[c * part + i];
      if (i < n_params) {
        grad_flat[i] = s;
      } else {
        grad_table[i - n_params] = s;
      }
    }
  });
}

}  // namespace

void forward_cpu(int dtype, const Dims& d, const Buffers& buf) {
  if (dtype == kFloat32) {
    forward_typed<float>(d, buf);
  } else {
    forward_typed<double>(d, buf);
  }
}

void backward_cpu(int dtype, const Dims& d, const Buffers& buf) {
  if (dtype == kFloat32) {
    backward_typed<float>(d, buf);
  } else {
    backward_typed<double>(d, buf);
  }
}

const char* cpu_isa() { return active_kernels().isa; }

void set_cpu_isa(const char* name) {
  const std::string want(name);
  KernelSet best = detect_kernels();
  if (want == "auto") {
    active_kernels() = best;
    return;
  }
  if (want == "baseline") {
    active_kernels() = baseline_kernels();
    return;
  }
#if defined(DVMRL_X86)
  const std::string have(best.isa);
  if (want == "avx2" && (have == "avx2" || have == "avx512")) {
    active_kernels() = avx2_kernels();
    return;
  }
  if (want == "avx512" && have == "avx512") {
    active_kernels() = avx512_kernels();
    return;
  }
#endif
  throw std::invalid_argument("set_cpu_isa: '" + want +
                              "' is unknown or not supported by this CPU (best: '" +
                              best.isa + "'); use auto, baseline, avx2 or avx512");
}

}  // namespace mp
}  // namespace dvmrl
