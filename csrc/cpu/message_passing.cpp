// CPU dispatcher of the fused composition MPNN: ISA selection, compact node
// offsets, weight transposition, the fixed block partition over
// compositions and the ordered reduction of per-chunk gradients.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dvmrl/thread_pool.h"
#include "message_passing_cpu.h"

namespace dvmrl {
namespace mp {

namespace {

// Batches below this many compositions run on the calling thread alone.
// From this size up to 2 * kSubBlock (forward) or 2 * kMinChunk (backward)
// compositions, a call is split into two halves that two threads can share.
// Each half reads all the weights, and in the backward each writes a full
// gradient that a reduction then adds, so a split costs extra memory
// traffic. With no idle core (2-core AMD EPYC VM, load average 6.4), a
// B = 16 step took 4 % (H = 64) and 15 % (H = 128) longer split than
// unsplit, and a B = 8 step 19-22 % longer. On the same VM when quiet
// (load average about 1, bench/bench_message_passing.py), a B = 16,
// H = 128 step took 1.48-1.58 ms split (2 runs) and 1.35-1.76 ms unsplit
// (4 runs): no clear gain. On a quiet 2-core Intel Xeon VM the split took
// 1.53-1.56 ms against 1.61-1.69 ms (3 runs each), a 5 % gain. So B = 16
// stays on one thread, and the split starts at 32.
constexpr int64_t kMinSplitBatch = 32;
// Minimum compositions per backward chunk above 2 * kMinChunk, and the
// maximum chunk count. Each chunk after the first keeps a private copy of
// the parameter gradients, so the count is bounded. It depends on B only,
// never on the thread count.
constexpr int64_t kMinChunk = 128;
constexpr int64_t kMaxChunks = 16;
// Forward calls with at least this many real nodes use transposed weight
// copies (outer-product matrix products); smaller ones use dot products.
// Measured forward times on a 2-core AMD EPYC VM (AVX-512), one thread,
// dot products against transposition + transposed products: 47 against
// 11 + 26 us for 16 nodes at H = 64, 97 against 48 + 59 us for 14 nodes
// at H = 128.
constexpr int64_t kTransposeNodes = 16;

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

// Buffer of at least n elements, kept per thread, per type and per Use
// between calls. The sizes depend on the model dims and B alone, and
// reusing the memory spares each call the allocation and the page faults
// of fresh pages, because glibc serves large blocks with mmap. The memory
// stays allocated until the thread exits, and a larger request replaces it.
struct ScratchUse {};
struct PartialUse {};
struct TransposedUse {};
struct NodeGradUse {};

template <class T, class Use = ScratchUse>
T* thread_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) {
    buffer.clear();
    buffer.shrink_to_fit();
    buffer.resize(static_cast<size_t>(n > 0 ? n : 1));
  }
  return buffer.data();
}

template <class T>
T* thread_scratch(int64_t n) {
  return thread_buffer<T, ScratchUse>(n);
}

// Return the float or the double variant of a kernel, by T.
template <class T, class F32, class F64>
auto pick(F32 float_variant, F64 double_variant) {
  if constexpr (std::is_same_v<T, float>) {
    return float_variant;
  } else {
    return double_variant;
  }
}

// Fill wt (TransposedLayout) with the [in, out] copies of the weights.
template <class T>
void transpose_weights(const Dims& d, const Layout& p, const TransposedLayout& tl,
                       const T* flat, T* wt) {
  const KernelSet& kernels = active_kernels();
  const TransposeFn<T> transpose = pick<T>(kernels.transpose_f32, kernels.transpose_f64);
  const int64_t h = d.hidden, hg = d.gate, hm = d.msg, wp = 2 * hg + 2 * hm;
  for (int64_t l = 0; l < d.layers; ++l) {
    const T* lp = flat + l * p.layer_size;
    T* out = wt + l * tl.layer_stride;
    // [H, 2 Hg + 2 Hm]: the gate block then the message block, per input h.
    transpose(lp + p.gate_w, 2 * hg, h, h, out + tl.layer_proj, wp);
    transpose(lp + p.msg_w1, 2 * hm, h, h, out + tl.layer_proj + 2 * hg, wp);
    transpose(lp + p.msg_w2, h, hm, hm, out + tl.layer_w2, h);
  }
  const int64_t pw = hg + hm;
  transpose(flat + p.pool_gate_w, hg, h, h, wt + tl.pool_proj, pw);
  transpose(flat + p.pool_msg_w1, hm, h, h, wt + tl.pool_proj + hg, pw);
  transpose(flat + p.pool_msg_w2, h, hm, hm, wt + tl.pool_w2, h);
  for (int64_t k = 0; k < d.depth; ++k) {
    const int64_t in = head_input_width(d, k);
    transpose(flat + p.head_w[k], d.head, in, in, wt + tl.head[k], d.head);
  }
  const int64_t last = d.depth > 0 ? d.head : h;
  transpose(flat + p.head_out_w, d.n_out, last, last, wt + tl.head_out, d.n_out);
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

// Return the compositions per forward block, which depend on B alone.
int64_t forward_block_size(int64_t batch) {
  if (batch < kMinSplitBatch) return std::max<int64_t>(batch, 1);
  if (batch < 2 * kSubBlock) return (batch + 1) / 2;
  return kSubBlock;
}

// Return the compositions per backward chunk. They depend on B alone, so
// the order of the gradient sums never depends on the thread count.
int64_t backward_chunk_size(int64_t batch) {
  if (batch < kMinSplitBatch) return std::max<int64_t>(batch, 1);
  if (batch <= 2 * kMinChunk) return (batch + 1) / 2;
  const int64_t chunk = std::max(kMinChunk, (batch + kMaxChunks - 1) / kMaxChunks);
  return (chunk + kSubBlock - 1) / kSubBlock * kSubBlock;
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


// Ask Linux to back a large buffer with transparent huge pages before its
// first write. dvmrl.ops allocates the workspace per call, and glibc maps
// fresh pages for each allocation above its mmap threshold (32 MB at most).
// The 197 MB workspace of B = 4096, H = 128 took about 34,000 page faults
// per step in 4 KB pages. The kernel ignores the advice when transparent
// huge pages are off, and pages written before keep their size.
void advise_huge_pages(uintptr_t address, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (bytes < int64_t(4 * kHugePage)) return;
  const uintptr_t begin = (address + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (address + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)address;
  (void)bytes;
#endif
}

template <class T>
void forward_typed(const Dims& d, const Buffers& buf) {
  advise_huge_pages(buf.ws, make_ws_layout(d).total * static_cast<int64_t>(sizeof(T)));
  const NodeIndex ni = build_node_index(d, reinterpret_cast<const int64_t*>(buf.index),
                                        reinterpret_cast<const bool*>(buf.mask),
                                        "model_forward");
  Ctx<T> cx = make_ctx<T>(d, buf, ni);
  if (ni.offset[d.batch] >= kTransposeNodes) {
    T* wt = thread_buffer<T, TransposedUse>(cx.tl.total);
    transpose_weights(d, cx.p, cx.tl, cx.flat, wt);
    cx.wt = wt;
  }
  const KernelSet& kernels = active_kernels();
  const ForwardFn<T> fn = pick<T>(kernels.forward_f32, kernels.forward_f64);
  const int64_t scratch_size = forward_scratch_size(d);
  const int64_t block = forward_block_size(d.batch);
  parallel_for(d.batch, block, block, [&](int64_t begin, int64_t end, int64_t) {
    T* scratch = thread_scratch<T>(scratch_size);
    fn(cx, begin, end, scratch);
  });
}

// total[i] += partial[(c - 1) * stride + i] for c = 1 .. n_chunks - 1 in
// order, for i in [begin, end): the ordered sum of the chunk gradients.
template <class T>
void add_partials(T* total, const T* partial, int64_t stride, int64_t n_chunks,
                  int64_t begin, int64_t end) {
  for (int64_t c = 1; c < n_chunks; ++c) {
    const T* p = partial + (c - 1) * stride;
    for (int64_t i = begin; i < end; ++i) total[i] += p[i];
  }
}

// Write grad_table [E, H] from the node rows' gradients node_grad
// [real nodes, H] with the same bits as the backward with grad_flat. Each
// chunk sums its nodes of a table row in node order, starting from zero,
// and the chunk sums are added in chunk order. A row that no node reads
// gets zeros. One block computes each row in a fixed order, so the result
// does not depend on the thread count.
template <class T>
void scatter_node_grads(const Dims& d, const NodeIndex& ni, const int64_t* index,
                        int64_t chunk, const T* node_grad, T* grad_table) {
  const int64_t H = d.hidden;
  const int64_t n_nodes = ni.offset[d.batch];
  // Counting sort of the node rows by table row, which keeps the nodes of
  // each table row in node order.
  std::vector<int64_t> row_start(d.rows + 1, 0);
  std::vector<int64_t> node_row(n_nodes);
  std::vector<int64_t> node_chunk(n_nodes);
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t r = ni.offset[b]; r < ni.offset[b + 1]; ++r) {
      node_row[r] = index[b * d.slots + ni.slot[r]];
      node_chunk[r] = b / chunk;
      ++row_start[node_row[r] + 1];
    }
  }
  for (int64_t e = 0; e < d.rows; ++e) row_start[e + 1] += row_start[e];
  std::vector<int64_t> fill(row_start.begin(), row_start.end() - 1);
  std::vector<int64_t> by_row(n_nodes);
  for (int64_t r = 0; r < n_nodes; ++r) by_row[fill[node_row[r]]++] = r;

  const int64_t rows_per_block = std::max<int64_t>(1, 16384 / H);
  parallel_for(d.rows, rows_per_block, 4 * rows_per_block,
               [&](int64_t begin, int64_t end, int64_t) {
    std::vector<T> partial;
    for (int64_t e = begin; e < end; ++e) {
      T* out = grad_table + e * H;
      std::fill(out, out + H, T(0));
      int64_t i = row_start[e];
      const int64_t stop = row_start[e + 1];
      bool first = true;
      while (i < stop) {
        const int64_t c = node_chunk[by_row[i]];
        // The first chunk sums straight into out: 0 + a + b + ... is the
        // sum that this chunk's own partial table holds.
        T* sum = out;
        if (!first) {
          partial.assign(static_cast<size_t>(H), T(0));
          sum = partial.data();
        }
        for (; i < stop && node_chunk[by_row[i]] == c; ++i) {
          const T* g = node_grad + by_row[i] * H;
          for (int64_t h = 0; h < H; ++h) sum[h] += g[h];
        }
        if (first) {
          first = false;
          continue;
        }
        for (int64_t h = 0; h < H; ++h) out[h] += partial[h];
      }
    }
  });
}

template <class T>
void backward_typed(const Dims& d, const Buffers& buf) {
  const NodeIndex ni = build_node_index(d, reinterpret_cast<const int64_t*>(buf.index),
                                        reinterpret_cast<const bool*>(buf.mask),
                                        "model_backward");
  Ctx<T> cx = make_ctx<T>(d, buf, ni);
  const KernelSet& kernels = active_kernels();
  const BackwardFn<T> fn = pick<T>(kernels.backward_f32, kernels.backward_f64);
  const int64_t n_params = cx.p.total;
  const int64_t n_table = d.rows * d.hidden;
  T* grad_flat = reinterpret_cast<T*>(buf.grad_flat);
  T* grad_table = reinterpret_cast<T*>(buf.grad_table);

  // Fixed partition: chunk boundaries depend on B only.
  const int64_t chunk = backward_chunk_size(d.batch);
  const int64_t n_chunks = num_blocks(d.batch, chunk);
  const int64_t scratch_size = backward_scratch_size(d);

  if (!buf.flat_grad) {
    // No parameter sums: each chunk writes its compositions' rows of
    // grad_frac and, for grad_table, its node rows of dL/dh0, which the
    // scatter then adds into the table rows.
    const int64_t n_nodes = ni.offset[d.batch];
    if (buf.table_grad && n_nodes > 0)
      cx.grad_nodes = thread_buffer<T, NodeGradUse>(n_nodes * d.hidden);
    parallel_for(n_chunks, 1, 1, [&](int64_t, int64_t, int64_t c) {
      T* scratch = thread_scratch<T>(scratch_size);
      const int64_t begin = c * chunk;
      fn(cx, begin, std::min(d.batch, begin + chunk), scratch, nullptr, nullptr);
    });
    if (buf.table_grad) {
      scatter_node_grads(d, ni, reinterpret_cast<const int64_t*>(buf.index), chunk,
                         cx.grad_nodes, grad_table);
    }
    return;
  }
  // Chunk 0 sums into grad_flat and grad_table, every later chunk into its
  // own partial buffer. The reduction then adds the partials in chunk order.
  const int64_t part = n_params + n_table;
  T* partial = n_chunks > 1 ? thread_buffer<T, PartialUse>((n_chunks - 1) * part) : nullptr;
  parallel_for(n_chunks, 1, 1, [&](int64_t, int64_t, int64_t c) {
    T* mine_flat = c == 0 ? grad_flat : partial + (c - 1) * part;
    T* mine_table = c == 0 ? grad_table : mine_flat + n_params;
    zero_bias_grads(d, cx.p, mine_flat);
    std::fill(mine_table, mine_table + n_table, T(0));
    T* scratch = thread_scratch<T>(scratch_size);
    const int64_t begin = c * chunk;
    const int64_t end = std::min(d.batch, begin + chunk);
    fn(cx, begin, end, scratch, mine_flat, mine_table);
  });
  if (n_chunks == 1) return;
  // Sum the chunks in chunk order, element by element.
  parallel_for(part, 16384, 65536, [&](int64_t begin, int64_t end, int64_t) {
    const int64_t split = std::min(std::max(begin, n_params), end);
    add_partials(grad_flat, partial, part, n_chunks, begin, split);
    add_partials(grad_table, partial + n_params, part, n_chunks, split - n_params,
                 end - n_params);
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
