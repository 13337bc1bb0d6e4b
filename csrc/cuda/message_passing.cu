// CUDA kernels of the fused composition MPNN.
//
// One block handles a tile of kTile compositions through the whole forward
// (or the whole backward), phase by phase with __syncthreads() between
// phases. Node rows use the padded index b * K + k, so padded rows hold
// zeros and are skipped in the attention. Weight tiles of 32 x 32 are
// staged in shared memory for every matrix product; node states and
// projections stay in the workspace in global memory (L2). Parameter and
// node-table gradients are summed with atomicAdd, so on the GPU their last
// bits can change from run to run, unlike the CPU kernels.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_util.h"
#include "dvmrl/mp_math.h"
#include "message_passing_cuda.h"

namespace dvmrl {
namespace mp {

namespace {

constexpr int kTile = 16;      // compositions per block
constexpr int kThreads = 256;  // threads per block (8 warps)
constexpr int kGemmTile = 32;  // staged weight tile edge

struct DeviceExp {
  template <class T>
  __host__ __device__ T operator()(T x) const {
    return exp(x);
  }
};

template <class T>
__device__ inline T sigmoid(T z) {
  return T(1) / (T(1) + exp(-z));
}

template <class T>
__device__ inline T silu(T z) {
  return silu_from_sigmoid(z, sigmoid(z));
}

template <class T>
__device__ inline T silu_grad(T z) {
  return silu_grad_from_sigmoid<T, T>(z, sigmoid(z));
}

template <class T>
__device__ inline T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return __shfl_sync(0xffffffffu, v, 0);
}

// C[r, n] (+)= sum_k A[r * lda + k] * Bm(k, n) for r < rows, n < ncols,
// with Bm(k, n) = W[n * ldw + k] when transposed (W is [ncols, kd], the
// usual "x W^T"), else W[k * ldw + n]. Tiles of W go through shared memory.
template <class T, bool kTransposed>
__device__ void block_gemm(int rows, int ncols, int kd, const T* A, int lda, const T* W,
                           int ldw, T* C, int ldc, bool accumulate, T* tile) {
  const int tid = threadIdx.x;
  const int lane = tid % kGemmTile;
  const int group = tid / kGemmTile;
  constexpr int kGroups = kThreads / kGemmTile;
  constexpr int kMaxRowsPerThread = (kTile * kMaxSlots + kGroups - 1) / kGroups;
  for (int n0 = 0; n0 < ncols; n0 += kGemmTile) {
    T acc[kMaxRowsPerThread];
    for (int q = 0; q < kMaxRowsPerThread; ++q) {
      const int r = group + q * kGroups;
      const int n = n0 + lane;
      acc[q] = (accumulate && r < rows && n < ncols) ? C[r * ldc + n] : T(0);
    }
    for (int k0 = 0; k0 < kd; k0 += kGemmTile) {
      __syncthreads();
      for (int e = tid; e < kGemmTile * kGemmTile; e += kThreads) {
        int nl, kl;
        T v = T(0);
        if (kTransposed) {
          nl = e / kGemmTile;
          kl = e % kGemmTile;
          if (n0 + nl < ncols && k0 + kl < kd) v = W[(n0 + nl) * ldw + k0 + kl];
        } else {
          kl = e / kGemmTile;
          nl = e % kGemmTile;
          if (n0 + nl < ncols && k0 + kl < kd) v = W[(k0 + kl) * ldw + n0 + nl];
        }
        tile[nl * (kGemmTile + 1) + kl] = v;
      }
      __syncthreads();
      const int kend = kd - k0 < kGemmTile ? kd - k0 : kGemmTile;
      for (int q = 0; q < kMaxRowsPerThread; ++q) {
        const int r = group + q * kGroups;
        if (r >= rows) break;
        const T* a = A + r * lda + k0;
        T s = acc[q];
        for (int kk = 0; kk < kend; ++kk) s += a[kk] * tile[lane * (kGemmTile + 1) + kk];
        acc[q] = s;
      }
    }
    for (int q = 0; q < kMaxRowsPerThread; ++q) {
      const int r = group + q * kGroups;
      const int n = n0 + lane;
      if (r < rows && n < ncols) C[r * ldc + n] = acc[q];
    }
  }
  __syncthreads();
}

// G[m, k] += sum_r Y[r * ldy + m] X[r * ldx + k] (atomically).
template <class T>
__device__ void block_weight_grad(int m_rows, int kd, int rows, const T* Y, int ldy,
                                  const T* X, int ldx, T* G, int ldg) {
  for (int idx = threadIdx.x; idx < m_rows * kd; idx += kThreads) {
    const int m = idx / kd;
    const int k = idx % kd;
    T s = T(0);
    for (int r = 0; r < rows; ++r) s += Y[r * ldy + m] * X[r * ldx + k];
    if (s != T(0)) atomicAdd(G + m * ldg + k, s);
  }
}

// Per-tile state shared by the phases of one block.
template <class T>
struct TileShared {
  T* tile;      // [32, 33] staged weights
  T* logits;    // [kTile K K] gate logits, node i then neighbour j
  T* att;       // [kTile K K]
  T* dlogit;    // [kTile K K]
  T* datt;      // [kTile K K]
  T* row_max;   // [kTile K]
  T* row_denom; // [kTile K]
  T* dfrac;     // [kTile K]
  int* count;   // [kTile] real nodes per composition
};

template <class T>
__device__ TileShared<T> carve_shared(int K) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* base = reinterpret_cast<T*>(smem_raw);
  TileShared<T> s;
  s.tile = base;
  base += kGemmTile * (kGemmTile + 1);
  const int pairs = kTile * K * K;
  s.logits = base;  base += pairs;
  s.att = base;     base += pairs;
  s.dlogit = base;  base += pairs;
  s.datt = base;    base += pairs;
  s.row_max = base;   base += kTile * K;
  s.row_denom = base; base += kTile * K;
  s.dfrac = base;     base += kTile * K;
  s.count = reinterpret_cast<int*>(base);
  return s;
}

template <class T>
size_t shared_bytes(int K) {
  const size_t pairs = size_t(kTile) * K * K;
  return sizeof(T) * (kGemmTile * (kGemmTile + 1) + 4 * pairs + 3 * kTile * K) +
         sizeof(int) * kTile;
}

template <class T>
struct Params {
  Dims d;
  Layout p;
  WsLayout w;
  const T* table;
  const T* flat;
  const int64_t* index;
  const T* frac;
  const bool* mask;
  const T* dropout;
  T* out;
  T* ws;
  // Scratch in global memory, rows b * K + k: agg [BK, Hm], dh [BK, H],
  // dagg [BK, Hm], dproj [BK, Wp]; per composition: 4 buffers [B, wide]
  // and daggp [B, Hm].
  T* agg;
  T* dh;
  T* dagg;
  T* dproj;
  T* xa;
  T* xb;
  T* xr;
  T* dz;
  T* daggp;
  const T* grad_out;
  T* grad_table;
  T* grad_flat;
  T* grad_frac;
  bool table_grad;  // write grad_table (else left untouched)
  bool flat_grad;   // write grad_flat (else left untouched), only with table_grad
};

// Gate logits of every ordered pair of real nodes of the tile (one warp per
// pair), then the weighted softmax of every node (one thread per node).
template <class T>
__device__ void layer_attention(const Params<T>& P, const TileShared<T>& S, int b0, int nb,
                                const T* proj, const T* lp) {
  const int K = P.d.slots, hg = P.d.gate, wp = P.w.proj_width;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* gb = lp + P.p.gate_b;
  const T* gu = lp + P.p.gate_u;
  const T gd = lp[P.p.gate_d];
  for (int pair = warp; pair < nb * K * K; pair += kThreads / 32) {
    const int bl = pair / (K * K), i = (pair / K) % K, j = pair % K;
    const int b = b0 + bl;
    const bool ok = i != j && P.mask[b * K + i] && P.mask[b * K + j];
    T acc = T(0);
    if (ok) {
      const T* pi = proj + (bl * K + i) * wp;
      const T* pj = proj + (bl * K + j) * wp + hg;
      for (int c = lane; c < hg; c += 32) acc += gu[c] * silu(pi[c] + pj[c] + gb[c]);
    }
    acc = warp_sum(acc);
    if (lane == 0) S.logits[pair] = ok ? acc + gd : T(0);
  }
  __syncthreads();
  for (int node = threadIdx.x; node < nb * K; node += kThreads) {
    const int bl = node / K, i = node % K, b = b0 + bl;
    bool valid[kMaxSlots];
    T w[kMaxSlots];
    for (int j = 0; j < K; ++j) {
      valid[j] = P.mask[b * K + i] && P.mask[b * K + j] && j != i;
      w[j] = P.frac[b * K + j];
    }
    const SoftmaxRow<T> row =
        weighted_softmax(S.logits + node * K, w, valid, K, S.att + node * K, DeviceExp{});
    S.row_max[node] = row.max;
    S.row_denom[node] = row.denom;
  }
  __syncthreads();
}

template <class T>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params<T> P) {
  const Dims& d = P.d;
  const int K = d.slots, H = d.hidden, hg = d.gate, hm = d.msg, wp = P.w.proj_width;
  const int pw = P.w.pool_width;
  const int64_t nodes = d.batch * K;
  const int b0 = blockIdx.x * kTile;
  const int nb = d.batch - b0 < kTile ? d.batch - b0 : kTile;
  const int rows = nb * K;
  const int64_t r0 = int64_t(b0) * K;
  TileShared<T> S = carve_shared<T>(K);

  if (threadIdx.x < nb) {
    int n = 0;
    for (int k = 0; k < K; ++k) n += P.mask[(b0 + threadIdx.x) * K + k] ? 1 : 0;
    S.count[threadIdx.x] = n;
  }
  T* h0 = P.ws + P.w.hs + r0 * H;
  // The kernels trust element_index: dvmrl.ops checks it against the node
  // table before a CUDA call, and direct callers of the core must do so.
  for (int e = threadIdx.x; e < rows * H; e += kThreads) {
    const int r = e / H, c = e % H;
    const int64_t g = r0 + r;
    h0[e] = P.mask[g] ? P.table[P.index[g] * H + c] : T(0);
  }
  __syncthreads();

  for (int l = 0; l < d.layers; ++l) {
    const T* lp = P.flat + l * P.p.layer_size;
    const T* hl = P.ws + P.w.hs + l * nodes * H + r0 * H;
    T* hn = P.ws + P.w.hs + (l + 1) * nodes * H + r0 * H;
    T* proj = P.ws + P.w.proj + l * nodes * wp + r0 * wp;
    block_gemm<T, true>(rows, 2 * hg, H, hl, H, lp + P.p.gate_w, H, proj, wp, false, S.tile);
    block_gemm<T, true>(rows, 2 * hm, H, hl, H, lp + P.p.msg_w1, H, proj + 2 * hg, wp, false,
                        S.tile);
    layer_attention(P, S, b0, nb, proj, lp);
    T* agg = P.agg + r0 * hm;
    const T* mb = lp + P.p.msg_b1;
    for (int e = threadIdx.x; e < rows * hm; e += kThreads) {
      const int r = e / hm, c = e % hm, bl = r / K, i = r % K;
      T s = T(0);
      for (int j = 0; j < K; ++j) {
        const T a = S.att[r * K + j];
        if (a == T(0)) continue;
        const T z = proj[r * wp + 2 * hg + c] + proj[(bl * K + j) * wp + 2 * hg + hm + c] + mb[c];
        s += a * silu(z);
      }
      agg[e] = s;
      (void)i;
    }
    for (int e = threadIdx.x; e < rows * H; e += kThreads) hn[e] = hl[e];
    __syncthreads();
    block_gemm<T, true>(rows, H, hm, agg, hm, lp + P.p.msg_w2, hm, hn, H, true, S.tile);
    for (int e = threadIdx.x; e < rows * H; e += kThreads) {
      const int r = e / H, c = e % H;
      if (P.mask[r0 + r] && S.count[r / K] > 1) hn[e] += lp[P.p.msg_b2 + c];
    }
    __syncthreads();
  }

  // Pooling.
  const T* hL = P.ws + P.w.hs + d.layers * nodes * H + r0 * H;
  T* zp = P.ws + P.w.pool + r0 * pw;
  block_gemm<T, true>(rows, hg, H, hL, H, P.flat + P.p.pool_gate_w, H, zp, pw, false, S.tile);
  block_gemm<T, true>(rows, hm, H, hL, H, P.flat + P.p.pool_msg_w1, H, zp + hg, pw, false,
                      S.tile);
  for (int e = threadIdx.x; e < rows * pw; e += kThreads) {
    const int c = e % pw;
    zp[e] += c < hg ? P.flat[P.p.pool_gate_b + c] : P.flat[P.p.pool_msg_b1 + c - hg];
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += kThreads / 32) {
    T acc = T(0);
    if (P.mask[r0 + r])
      for (int c = lane; c < hg; c += 32) acc += P.flat[P.p.pool_gate_u + c] * silu(zp[r * pw + c]);
    acc = warp_sum(acc);
    if (lane == 0) S.logits[r] = acc + P.flat[P.p.pool_gate_d];
  }
  __syncthreads();
  if (threadIdx.x < nb) {
    const int bl = threadIdx.x, b = b0 + bl;
    bool valid[kMaxSlots];
    T w[kMaxSlots];
    for (int k = 0; k < K; ++k) {
      valid[k] = P.mask[b * K + k];
      w[k] = P.frac[b * K + k];
    }
    weighted_softmax(S.logits + bl * K, w, valid, K, S.att + bl * K, DeviceExp{});
    T total = T(0);
    for (int k = 0; k < K; ++k) total += S.att[bl * K + k];
    P.ws[P.w.suma + b] = total;
  }
  __syncthreads();
  T* aggp = P.ws + P.w.aggp + int64_t(b0) * hm;
  for (int e = threadIdx.x; e < nb * hm; e += kThreads) {
    const int bl = e / hm, c = e % hm;
    T s = T(0);
    for (int k = 0; k < K; ++k) {
      const T a = S.att[bl * K + k];
      if (a != T(0)) s += a * silu(zp[(bl * K + k) * pw + hg + c]);
    }
    aggp[e] = s;
  }
  __syncthreads();
  T* pooled = P.ws + P.w.pooled + int64_t(b0) * H;
  block_gemm<T, true>(nb, H, hm, aggp, hm, P.flat + P.p.pool_msg_w2, hm, pooled, H, false,
                      S.tile);
  for (int e = threadIdx.x; e < nb * H; e += kThreads) {
    const int bl = e / H, c = e % H;
    pooled[e] += P.ws[P.w.suma + b0 + bl] * P.flat[P.p.pool_msg_b2 + c];
  }
  __syncthreads();

  // Head.
  const int wide = H > d.head ? H : d.head;
  const T* x = pooled;
  int width = H;
  for (int k = 0; k < d.depth; ++k) {
    T* z = P.ws + P.w.zh + (int64_t(k) * d.batch + b0) * d.head;
    block_gemm<T, true>(nb, d.head, width, x, width, P.flat + P.p.head_w[k], width, z, d.head,
                        false, S.tile);
    T* xn = (k % 2 == 0 ? P.xa : P.xb) + int64_t(b0) * wide;
    for (int e = threadIdx.x; e < nb * d.head; e += kThreads) {
      const int bl = e / d.head, c = e % d.head;
      z[e] += P.flat[P.p.head_b[k] + c];
      T v = silu(z[e]);
      if (P.dropout != nullptr) v *= P.dropout[(int64_t(k) * d.batch + b0 + bl) * d.head + c];
      xn[bl * d.head + c] = v;
    }
    __syncthreads();
    x = xn;
    width = d.head;
  }
  T* out = P.out + int64_t(b0) * d.n_out;
  block_gemm<T, true>(nb, d.n_out, width, x, width, P.flat + P.p.head_out_w, width, out,
                      d.n_out, false, S.tile);
  for (int e = threadIdx.x; e < nb * d.n_out; e += kThreads)
    out[e] += P.flat[P.p.head_out_b + e % d.n_out];
}

template <class T>
__global__ void __launch_bounds__(kThreads) backward_kernel(Params<T> P) {
  const Dims& d = P.d;
  const int K = d.slots, H = d.hidden, hg = d.gate, hm = d.msg, wp = P.w.proj_width;
  const int pw = P.w.pool_width;
  const int64_t nodes = d.batch * K;
  const int b0 = blockIdx.x * kTile;
  const int nb = d.batch - b0 < kTile ? d.batch - b0 : kTile;
  const int rows = nb * K;
  const int64_t r0 = int64_t(b0) * K;
  const int wide = H > d.head ? H : d.head;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  TileShared<T> S = carve_shared<T>(K);
  T* gflat = P.grad_flat;
  const bool pg = P.flat_grad;  // uniform over the grid

  if (threadIdx.x < nb) {
    int n = 0;
    for (int k = 0; k < K; ++k) n += P.mask[(b0 + threadIdx.x) * K + k] ? 1 : 0;
    S.count[threadIdx.x] = n;
  }
  for (int e = threadIdx.x; e < rows; e += kThreads) S.dfrac[e] = T(0);
  __syncthreads();

  // Head.
  const T* g = P.grad_out + int64_t(b0) * d.n_out;
  const T* pooled = P.ws + P.w.pooled + int64_t(b0) * H;
  T* xr = P.xr + int64_t(b0) * wide;
  T* dz = P.dz + int64_t(b0) * wide;
  T* dx = P.xa + int64_t(b0) * wide;
  T* dx_next = P.xb + int64_t(b0) * wide;
  auto head_input = [&](int k) -> const T* {
    // Input of head layer k: pooled, or silu(z_{k-1}) * mask_{k-1} in xr.
    if (k == 0) return pooled;
    const T* zk = P.ws + P.w.zh + (int64_t(k - 1) * d.batch + b0) * d.head;
    for (int e = threadIdx.x; e < nb * d.head; e += kThreads) {
      const int bl = e / d.head, c = e % d.head;
      T v = silu(zk[e]);
      if (P.dropout != nullptr) v *= P.dropout[(int64_t(k - 1) * d.batch + b0 + bl) * d.head + c];
      xr[e] = v;
    }
    __syncthreads();
    return xr;
  };
  int width = d.depth > 0 ? d.head : H;
  {
    if (pg) {
      const T* x_last = head_input(d.depth);
      block_weight_grad(d.n_out, width, nb, g, d.n_out, x_last, width, gflat + P.p.head_out_w,
                        width);
    }
    for (int o = threadIdx.x; pg && o < d.n_out; o += kThreads) {
      T s = T(0);
      for (int bl = 0; bl < nb; ++bl) s += g[bl * d.n_out + o];
      atomicAdd(gflat + P.p.head_out_b + o, s);
    }
    block_gemm<T, false>(nb, width, d.n_out, g, d.n_out, P.flat + P.p.head_out_w, width, dx,
                         width, false, S.tile);
  }
  for (int k = d.depth - 1; k >= 0; --k) {
    const int in = head_input_width(d, k);
    const T* zk = P.ws + P.w.zh + (int64_t(k) * d.batch + b0) * d.head;
    for (int e = threadIdx.x; e < nb * d.head; e += kThreads) {
      const int bl = e / d.head, c = e % d.head;
      T up = dx[e];
      if (P.dropout != nullptr) up *= P.dropout[(int64_t(k) * d.batch + b0 + bl) * d.head + c];
      dz[e] = up * silu_grad(zk[e]);
    }
    __syncthreads();
    if (pg) {
      const T* x_in = head_input(k);
      block_weight_grad(d.head, in, nb, dz, d.head, x_in, in, gflat + P.p.head_w[k], in);
    }
    for (int c = threadIdx.x; pg && c < d.head; c += kThreads) {
      T s = T(0);
      for (int bl = 0; bl < nb; ++bl) s += dz[bl * d.head + c];
      atomicAdd(gflat + P.p.head_b[k] + c, s);
    }
    block_gemm<T, false>(nb, in, d.head, dz, d.head, P.flat + P.p.head_w[k], in, dx_next, in,
                         false, S.tile);
    T* t = dx;
    dx = dx_next;
    dx_next = t;
  }
  const T* dpooled = dx;

  // Pooling.
  const T* aggp = P.ws + P.w.aggp + int64_t(b0) * hm;
  const T* suma = P.ws + P.w.suma + b0;
  T* daggp = P.daggp + int64_t(b0) * hm;
  block_gemm<T, false>(nb, hm, H, dpooled, H, P.flat + P.p.pool_msg_w2, hm, daggp, hm, false,
                       S.tile);
  if (pg) block_weight_grad(H, hm, nb, dpooled, H, aggp, hm, gflat + P.p.pool_msg_w2, hm);
  for (int c = threadIdx.x; pg && c < H; c += kThreads) {
    T s = T(0);
    for (int bl = 0; bl < nb; ++bl) s += suma[bl] * dpooled[bl * H + c];
    atomicAdd(gflat + P.p.pool_msg_b2 + c, s);
  }
  const T* zp = P.ws + P.w.pool + r0 * pw;
  for (int r = warp; r < rows; r += kThreads / 32) {
    const int bl = r / K;
    T acc = T(0), dA = T(0), bias = T(0);
    if (P.mask[r0 + r]) {
      for (int c = lane; c < hg; c += 32) acc += P.flat[P.p.pool_gate_u + c] * silu(zp[r * pw + c]);
      for (int c = lane; c < hm; c += 32) dA += silu(zp[r * pw + hg + c]) * daggp[bl * hm + c];
      for (int c = lane; c < H; c += 32) bias += dpooled[bl * H + c] * P.flat[P.p.pool_msg_b2 + c];
    }
    acc = warp_sum(acc);
    dA = warp_sum(dA);
    bias = warp_sum(bias);
    if (lane == 0) {
      S.logits[r] = acc + P.flat[P.p.pool_gate_d];
      S.datt[r] = dA + bias;
    }
  }
  __syncthreads();
  if (threadIdx.x < nb) {
    const int bl = threadIdx.x, b = b0 + bl;
    bool valid[kMaxSlots];
    T w[kMaxSlots], dw[kMaxSlots];
    for (int k = 0; k < K; ++k) {
      valid[k] = P.mask[b * K + k];
      w[k] = P.frac[b * K + k];
      dw[k] = T(0);
    }
    const SoftmaxRow<T> row =
        weighted_softmax(S.logits + bl * K, w, valid, K, S.att + bl * K, DeviceExp{});
    weighted_softmax_backward(S.logits + bl * K, w, valid, K, S.att + bl * K, S.datt + bl * K,
                              row, S.dlogit + bl * K, dw, DeviceExp{});
    for (int k = 0; k < K; ++k) S.dfrac[bl * K + k] += dw[k];
  }
  __syncthreads();
  T* dzp = P.dproj + r0 * wp;  // rows of width pw inside the dproj buffer
  for (int e = threadIdx.x; e < rows * pw; e += kThreads) {
    const int r = e / pw, c = e % pw, bl = r / K;
    T v = T(0);
    if (P.mask[r0 + r]) {
      if (c < hg) {
        const T z = zp[r * pw + c];
        const T dl = S.dlogit[r];
        v = dl * P.flat[P.p.pool_gate_u + c] * silu_grad(z);
        if (pg) {
          atomicAdd(gflat + P.p.pool_gate_u + c, dl * silu(z));
          atomicAdd(gflat + P.p.pool_gate_b + c, v);
        }
      } else {
        const T z = zp[r * pw + c];
        v = S.att[r] * daggp[bl * hm + c - hg] * silu_grad(z);
        if (pg) atomicAdd(gflat + P.p.pool_msg_b1 + c - hg, v);
      }
    }
    dzp[r * pw + c] = v;
  }
  if (pg && threadIdx.x == 0) {
    T s = T(0);
    for (int r = 0; r < rows; ++r) s += P.mask[r0 + r] ? S.dlogit[r] : T(0);
    atomicAdd(gflat + P.p.pool_gate_d, s);
  }
  __syncthreads();
  const T* hL = P.ws + P.w.hs + d.layers * nodes * H + r0 * H;
  T* dh = P.dh + r0 * H;
  block_gemm<T, false>(rows, H, hg, dzp, pw, P.flat + P.p.pool_gate_w, H, dh, H, false, S.tile);
  block_gemm<T, false>(rows, H, hm, dzp + hg, pw, P.flat + P.p.pool_msg_w1, H, dh, H, true,
                       S.tile);
  if (pg) {
    block_weight_grad(hg, H, rows, dzp, pw, hL, H, gflat + P.p.pool_gate_w, H);
    block_weight_grad(hm, H, rows, dzp + hg, pw, hL, H, gflat + P.p.pool_msg_w1, H);
  }
  __syncthreads();

  // Message-passing layers, last to first.
  T* dagg = P.dagg + r0 * hm;
  T* agg = P.agg + r0 * hm;
  T* dproj = P.dproj + r0 * wp;
  for (int l = d.layers - 1; l >= 0; --l) {
    const T* lp = P.flat + l * P.p.layer_size;
    T* glp = pg ? gflat + l * P.p.layer_size : nullptr;
    const T* hl = P.ws + P.w.hs + l * nodes * H + r0 * H;
    const T* proj = P.ws + P.w.proj + l * nodes * wp + r0 * wp;
    const T* mb = lp + P.p.msg_b1;
    block_gemm<T, false>(rows, hm, H, dh, H, lp + P.p.msg_w2, hm, dagg, hm, false, S.tile);
    for (int c = threadIdx.x; pg && c < H; c += kThreads) {
      T s = T(0);
      for (int r = 0; r < rows; ++r)
        if (P.mask[r0 + r] && S.count[r / K] > 1) s += dh[r * H + c];
      atomicAdd(glp + P.p.msg_b2 + c, s);
    }
    layer_attention(P, S, b0, nb, proj, lp);
    // agg (recomputed) and dL/da_ij = silu(zm_ij) . dagg_i, one warp per pair.
    for (int e = threadIdx.x; e < rows * hm; e += kThreads) {
      const int r = e / hm, c = e % hm, bl = r / K;
      T s = T(0);
      for (int j = 0; j < K; ++j) {
        const T a = S.att[r * K + j];
        if (a == T(0)) continue;
        s += a * silu(proj[r * wp + 2 * hg + c] + proj[(bl * K + j) * wp + 2 * hg + hm + c] + mb[c]);
      }
      agg[e] = s;
    }
    for (int pair = warp; pair < rows * K; pair += kThreads / 32) {
      const int r = pair / K, j = pair % K, bl = r / K;
      T s = T(0);
      if (S.att[pair] != T(0) || (P.mask[r0 + r] && P.mask[r0 + bl * K + j] && r % K != j)) {
        for (int c = lane; c < hm; c += 32) {
          const T z = proj[r * wp + 2 * hg + c] + proj[(bl * K + j) * wp + 2 * hg + hm + c] + mb[c];
          s += silu(z) * dagg[r * hm + c];
        }
      }
      s = warp_sum(s);
      if (lane == 0) S.datt[pair] = s;
    }
    __syncthreads();
    for (int node = threadIdx.x; node < rows; node += kThreads) {
      const int bl = node / K, i = node % K, b = b0 + bl;
      bool valid[kMaxSlots];
      T w[kMaxSlots], dw[kMaxSlots];
      for (int j = 0; j < K; ++j) {
        valid[j] = P.mask[b * K + i] && P.mask[b * K + j] && j != i;
        w[j] = P.frac[b * K + j];
        dw[j] = T(0);
      }
      SoftmaxRow<T> row{S.row_max[node], S.row_denom[node]};
      weighted_softmax_backward(S.logits + node * K, w, valid, K, S.att + node * K,
                                S.datt + node * K, row, S.dlogit + node * K, dw, DeviceExp{});
      for (int j = 0; j < K; ++j) S.datt[node * K + j] = dw[j];  // reuse: dL/dw_j from node i
    }
    __syncthreads();
    if (threadIdx.x < nb) {
      const int bl = threadIdx.x;
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) S.dfrac[bl * K + j] += S.datt[(bl * K + i) * K + j];
    }
    // dproj: gate part (dG_a for node i, dG_b for node j) and message part.
    for (int e = threadIdx.x; e < rows * hg; e += kThreads) {
      const int r = e / hg, c = e % hg, bl = r / K, me = r % K;
      T d_as_i = T(0), d_as_j = T(0), du = T(0), dgb = T(0);
      for (int o = 0; o < K; ++o) {
        const int ri = bl * K + o;
        // r as node i, o as neighbour j.
        const T dl_i = S.dlogit[r * K + o];
        if (dl_i != T(0)) {
          const T z = proj[r * wp + c] + proj[ri * wp + hg + c] + lp[P.p.gate_b + c];
          const T t = dl_i * lp[P.p.gate_u + c] * silu_grad(z);
          d_as_i += t;
          dgb += t;
          du += dl_i * silu(z);
        }
        // r as neighbour j of node o.
        const T dl_j = S.dlogit[ri * K + me];
        if (dl_j != T(0)) {
          const T z = proj[ri * wp + c] + proj[r * wp + hg + c] + lp[P.p.gate_b + c];
          d_as_j += dl_j * lp[P.p.gate_u + c] * silu_grad(z);
        }
      }
      dproj[r * wp + c] = d_as_i;
      dproj[r * wp + hg + c] = d_as_j;
      if (pg && dgb != T(0)) atomicAdd(glp + P.p.gate_b + c, dgb);
      if (pg && du != T(0)) atomicAdd(glp + P.p.gate_u + c, du);
    }
    for (int e = threadIdx.x; e < rows * hm; e += kThreads) {
      const int r = e / hm, c = e % hm, bl = r / K, me = r % K;
      T d_as_i = T(0), d_as_j = T(0);
      for (int o = 0; o < K; ++o) {
        const int ro = bl * K + o;
        const T a_i = S.att[r * K + o];
        if (a_i != T(0)) {
          const T z = proj[r * wp + 2 * hg + c] + proj[ro * wp + 2 * hg + hm + c] + mb[c];
          d_as_i += a_i * dagg[r * hm + c] * silu_grad(z);
        }
        const T a_j = S.att[ro * K + me];
        if (a_j != T(0)) {
          const T z = proj[ro * wp + 2 * hg + c] + proj[r * wp + 2 * hg + hm + c] + mb[c];
          d_as_j += a_j * dagg[ro * hm + c] * silu_grad(z);
        }
      }
      dproj[r * wp + 2 * hg + c] = d_as_i;
      dproj[r * wp + 2 * hg + hm + c] = d_as_j;
      if (pg && d_as_i != T(0)) atomicAdd(glp + P.p.msg_b1 + c, d_as_i);
    }
    if (pg && threadIdx.x == 0) {
      T s = T(0);
      for (int e = 0; e < rows * K; ++e) s += S.dlogit[e];
      atomicAdd(glp + P.p.gate_d, s);
    }
    __syncthreads();
    if (pg) {
      block_weight_grad(H, hm, rows, dh, H, agg, hm, glp + P.p.msg_w2, hm);
      block_weight_grad(2 * hg, H, rows, dproj, wp, hl, H, glp + P.p.gate_w, H);
      block_weight_grad(2 * hm, H, rows, dproj + 2 * hg, wp, hl, H, glp + P.p.msg_w1, H);
    }
    __syncthreads();
    block_gemm<T, false>(rows, H, 2 * hg, dproj, wp, lp + P.p.gate_w, H, dh, H, true, S.tile);
    block_gemm<T, false>(rows, H, 2 * hm, dproj + 2 * hg, wp, lp + P.p.msg_w1, H, dh, H, true,
                         S.tile);
  }

  for (int e = threadIdx.x; P.table_grad && e < rows * H; e += kThreads) {
    const int r = e / H, c = e % H;
    if (P.mask[r0 + r]) atomicAdd(P.grad_table + P.index[r0 + r] * H + c, dh[e]);
  }
  for (int e = threadIdx.x; e < rows; e += kThreads)
    P.grad_frac[r0 + e] = P.mask[r0 + e] ? S.dfrac[e] : T(0);
}

using cuda_util::check_cuda;
using cuda_util::DeviceGuard;

template <class T>
Params<T> make_params(const Dims& d, const Buffers& buf) {
  Params<T> P{};
  P.d = d;
  P.p = make_layout(d);
  P.w = make_ws_layout(d);
  P.table = reinterpret_cast<const T*>(buf.table);
  P.flat = reinterpret_cast<const T*>(buf.flat);
  P.index = reinterpret_cast<const int64_t*>(buf.index);
  P.frac = reinterpret_cast<const T*>(buf.frac);
  P.mask = reinterpret_cast<const bool*>(buf.mask);
  P.dropout = reinterpret_cast<const T*>(buf.dropout);
  P.out = reinterpret_cast<T*>(buf.out);
  P.ws = reinterpret_cast<T*>(buf.ws);
  P.grad_out = reinterpret_cast<const T*>(buf.grad_out);
  P.grad_table = reinterpret_cast<T*>(buf.grad_table);
  P.grad_flat = reinterpret_cast<T*>(buf.grad_flat);
  P.grad_frac = reinterpret_cast<T*>(buf.grad_frac);
  P.table_grad = buf.table_grad;
  P.flat_grad = buf.flat_grad;
  return P;
}

// Scratch elements of one call, carved into the Params pointers.
template <class T>
int64_t carve_scratch(Params<T>& P, T* base) {
  const Dims& d = P.d;
  const int64_t nodes = d.batch * d.slots;
  const int64_t wide = d.hidden > d.head ? d.hidden : d.head;
  int64_t o = 0;
  auto take = [&](int64_t n) {
    T* p = base == nullptr ? nullptr : base + o;
    o += n;
    return p;
  };
  P.agg = take(nodes * d.msg);
  P.dh = take(nodes * d.hidden);
  P.dagg = take(nodes * d.msg);
  P.dproj = take(nodes * P.w.proj_width);
  P.xa = take(d.batch * wide);
  P.xb = take(d.batch * wide);
  P.xr = take(d.batch * wide);
  P.dz = take(d.batch * wide);
  P.daggp = take(d.batch * d.msg);
  return o;
}

template <class T>
void run(bool forward, const Dims& d, const Buffers& buf, int device, uintptr_t stream_id) {
  const char* op = forward ? "model_forward" : "model_backward";
  DeviceGuard guard(device, op);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_id);
  Params<T> P = make_params<T>(d, buf);
  // The caller allocates the scratch (dvmrl.ops takes it from PyTorch's
  // caching allocator, on the same stream), so it counts in PyTorch's memory
  // statistics and its blocks are reused between calls.
  carve_scratch<T>(P, reinterpret_cast<T*>(buf.scratch));
  const size_t smem = shared_bytes<T>(static_cast<int>(d.slots));
  const unsigned blocks = static_cast<unsigned>((d.batch + kTile - 1) / kTile);
  if (forward) {
    forward_kernel<T><<<blocks, kThreads, smem, stream>>>(P);
  } else {
    if (P.flat_grad) {
      check_cuda(cudaMemsetAsync(P.grad_flat, 0, sizeof(T) * P.p.total, stream), op,
                 "cudaMemsetAsync of grad_flat");
    }
    if (P.table_grad) {
      check_cuda(cudaMemsetAsync(P.grad_table, 0, sizeof(T) * d.rows * d.hidden, stream), op,
                 "cudaMemsetAsync of grad_node_table");
    }
    backward_kernel<T><<<blocks, kThreads, smem, stream>>>(P);
  }
  check_cuda(cudaGetLastError(), op,
             forward ? "launch of forward_kernel" : "launch of backward_kernel");
}

}  // namespace

int64_t cuda_scratch_size(const Dims& d) {
  Params<float> P{};
  P.d = d;
  P.w = make_ws_layout(d);
  return carve_scratch<float>(P, nullptr);
}

bool cuda_kernels_available(int device, std::string* reason) {
  DeviceGuard guard(device, "cuda_kernels_available");
  // cudaFuncGetAttributes fails when the binary has neither code for this
  // device's architecture nor PTX that the driver can compile for it.
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, forward_kernel<float>);
  if (status == cudaSuccess) return true;
  cudaGetLastError();
  if (reason != nullptr) {
    cudaDeviceProp prop{};
    std::string arch = "unknown";
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
      arch = std::to_string(prop.major) + std::to_string(prop.minor);
    } else {
      cudaGetLastError();
    }
    *reason = std::string(cudaGetErrorString(status)) + "; the GPU has compute capability " +
              arch + ", dvmrl was built for " + DVMRL_CUDA_ARCHITECTURES;
  }
  return false;
}

void forward_cuda(int dtype, const Dims& d, const Buffers& buf, int device, uintptr_t stream) {
  if (d.batch == 0) return;
  if (dtype == kFloat32) {
    run<float>(true, d, buf, device, stream);
  } else {
    run<double>(true, d, buf, device, stream);
  }
}

void backward_cuda(int dtype, const Dims& d, const Buffers& buf, int device,
                   uintptr_t stream) {
  if (d.batch == 0) return;
  if (dtype == kFloat32) {
    run<float>(false, d, buf, device, stream);
  } else {
    run<double>(false, d, buf, device, stream);
  }
}

}  // namespace mp
}  // namespace dvmrl
