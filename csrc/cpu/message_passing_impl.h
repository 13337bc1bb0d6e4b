// CPU kernels of the fused composition MPNN, compiled once per ISA.
//
// Each message_passing_<isa>.cpp includes this file inside its own
// namespace after defining `Simd<float>` and `Simd<double>`: a GCC vector
// type V with W lanes, its integer twin VI, and madd(a, b, c) = a * b + c
// (fused in the AVX2 and AVX-512 variants), and hsum(v), the sum of the
// lanes in a fixed order. The includer also includes
// <cmath>, <cstdint> and <cstring> and the headers named below first.
//
// Every output element of a matrix product accumulates its terms in the
// order of the reduction index, whatever the tile it falls in, so a
// composition's result does not depend on the thread count.
// NOTE: results do differ in the last bits between the ISA variants
// (vector width of the lane sums, fused multiply-add), despite the
// project-wide -ffp-contract=off.

template <class T>
using Vec = typename Simd<T>::V;

template <class T>
static inline Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class T>
static inline void vstore(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Every lane set to x. x - 0 is exact for every x, so it compiles to a plain
// broadcast; 0 + x is not (0 + -0 = +0) and cost a scalar add and a shuffle.
template <class T>
static inline Vec<T> vset(T x) {
  return x - Vec<T>{};
}

template <class T>
static inline T hsum(Vec<T> v) {
  return Simd<T>::hsum(v);
}

// exp(x) for float lanes: the range reduction and polynomial of Cephes
// expf. Inputs are clamped to [-87, 88], so results stay finite.
static inline Vec<float> vexp(Vec<float> x) {
  using V = Vec<float>;
  using VI = typename Simd<float>::VI;
  const V lo = vset<float>(-87.0f), hi = vset<float>(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = vset<float>(12582912.0f);  // 1.5 * 2^23 rounds to an integer
  V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = vset<float>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  return p * (V)bits;
}

// exp(x) for double lanes: Taylor series to degree 13 on |r| <= ln(2)/2,
// whose first omitted term is below 5e-18 relative. Inputs are clamped to
// [-708, 709].
static inline Vec<double> vexp(Vec<double> x) {
  using V = Vec<double>;
  using VI = typename Simd<double>::VI;
  const V lo = vset<double>(-708.0), hi = vset<double>(709.0);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = vset<double>(6755399441055744.0);  // 1.5 * 2^52
  V n = (x * 1.4426950408889634074 + magic) - magic;
  V r = x - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  V p = vset<double>(1.0 / 6227020800.0);  // 1 / 13!
  const double inv_fact[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                             1.0 / 362880.0,    1.0 / 40320.0,    1.0 / 5040.0,
                             1.0 / 720.0,       1.0 / 120.0,      1.0 / 24.0,
                             1.0 / 6.0,         0.5,              1.0,
                             1.0};
  for (double c : inv_fact) p = p * r + c;
  VI bits = (__builtin_convertvector(n, VI) + 1023) << 52;
  return p * (V)bits;
}

template <class T>
static inline Vec<T> vsigmoid(Vec<T> z) {
  return T(1) / (T(1) + vexp(-z));
}

template <class T>
static inline T sigmoid_scalar(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

template <class T>
static inline T exp_scalar(T x) {
  return std::exp(x);
}

struct ScalarExp {
  template <class T>
  T operator()(T x) const {
    return std::exp(x);
  }
};

// ---------------------------------------------------------------------------
// Matrix products on row-major buffers.

// Tile of RR rows by VV vectors: C[n, m] (+)= sum_k A(n, k) B[k, m], with
// A(n, k) = A[n * sa_n + k * sa_k].
template <class T, int RR, int VV>
static inline void micro_nn(int64_t kd, const T* a, int64_t sa_n, int64_t sa_k,
                            const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  constexpr int W = Simd<T>::W;
  Vec<T> acc[RR][VV];
  for (int r = 0; r < RR; ++r)
    for (int v = 0; v < VV; ++v)
      acc[r][v] = accumulate ? vload(c + r * ldc + v * W) : Vec<T>{};
  for (int64_t k = 0; k < kd; ++k) {
    Vec<T> bv[VV];
    for (int v = 0; v < VV; ++v) bv[v] = vload(b + k * ldb + v * W);
    for (int r = 0; r < RR; ++r) {
      const Vec<T> av = vset(a[r * sa_n + k * sa_k]);
      for (int v = 0; v < VV; ++v) acc[r][v] = Simd<T>::madd(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int v = 0; v < VV; ++v) vstore(c + r * ldc + v * W, acc[r][v]);
}

template <class T, int VV>
static inline void rows_nn(int64_t rows, int64_t kd, const T* a, int64_t sa_n,
                           int64_t sa_k, const T* b, int64_t ldb, T* c, int64_t ldc,
                           bool accumulate) {
  // Each pass over B serves R rows of A. 6 x 4 accumulators fit the 32
  // AVX-512 registers, and 6 x 2 fit the 16 of AVX2 with room for the two B
  // vectors and the broadcast. A 4 x 4 tile would spill to the stack there.
  constexpr int R = VV == 2 || (VV == 4 && sizeof(Vec<T>) >= 64) ? 6 : 4;
  int64_t n = 0;
  for (; n + R <= rows; n += R)
    micro_nn<T, R, VV>(kd, a + n * sa_n, sa_n, sa_k, b, ldb, c + n * ldc, ldc, accumulate);
  const T* an = a + n * sa_n;
  T* cn = c + n * ldc;
  switch (rows - n) {
    case 5:
      micro_nn<T, 5, VV>(kd, an, sa_n, sa_k, b, ldb, cn, ldc, accumulate);
      break;
    case 4:
      micro_nn<T, 4, VV>(kd, an, sa_n, sa_k, b, ldb, cn, ldc, accumulate);
      break;
    case 3:
      micro_nn<T, 3, VV>(kd, an, sa_n, sa_k, b, ldb, cn, ldc, accumulate);
      break;
    case 2:
      micro_nn<T, 2, VV>(kd, an, sa_n, sa_k, b, ldb, cn, ldc, accumulate);
      break;
    case 1:
      micro_nn<T, 1, VV>(kd, an, sa_n, sa_k, b, ldb, cn, ldc, accumulate);
      break;
    default:
      break;
  }
}

// Vectors per row tile of gemm_nn: 4 on AVX-512, 2 where only 16 vector
// registers are available (see rows_nn).
template <class T>
constexpr int kPanelVectors = sizeof(Vec<T>) >= 64 ? 4 : 2;

// Bytes of one packed panel of B in gemm_nn: 32 KB, the size of the L1 data
// cache of many x86 cores.
constexpr int64_t kPanelBytes = 32768;

// C [N, M] (+)= A [N, Kd] B [Kd, M]; A is read through strides, so A^T
// costs nothing; B and C are row-major with leading dimensions ldb, ldc.
template <class T>
static void gemm_nn(int64_t n_rows, int64_t m_cols, int64_t kd, const T* a, int64_t sa_n,
                    int64_t sa_k, const T* b, int64_t ldb, T* c, int64_t ldc,
                    bool accumulate) {
  if (n_rows <= 0 || m_cols <= 0) return;
  constexpr int W = Simd<T>::W;
  constexpr int VV = kPanelVectors<T>;
  constexpr int64_t panel_width = VV * W;
  constexpr int64_t panel_rows = kPanelBytes / int64_t(sizeof(T) * panel_width);
  // B's column blocks are copied into a contiguous panel of at most
  // kPanelBytes when more than 6 rows of A read them. Read in
  // place, a block's rows lie ldb apart, and at the usual power-of-two
  // widths (2 KB for 512 floats) they map onto a few L1 sets, so every row
  // tile streamed B again from L2. Splitting the reduction into panels
  // keeps each output's sum in order of k (the partial sum passes through C
  // between panels), so the result is bitwise that of one pass.
  const bool pack = n_rows > 6 && kd > 0 && ldb != panel_width;
  int64_t m = 0;
  for (; m + panel_width <= m_cols; m += panel_width) {
    if (!pack) {
      rows_nn<T, VV>(n_rows, kd, a, sa_n, sa_k, b + m, ldb, c + m, ldc, accumulate);
      continue;
    }
    alignas(64) T panel[panel_rows * panel_width];
    for (int64_t k0 = 0; k0 < kd; k0 += panel_rows) {
      const int64_t kc = kd - k0 < panel_rows ? kd - k0 : panel_rows;
      for (int64_t k = 0; k < kc; ++k)
        std::memcpy(panel + k * panel_width, b + (k0 + k) * ldb + m, sizeof(T) * panel_width);
      rows_nn<T, VV>(n_rows, kc, a + k0 * sa_k, sa_n, sa_k, panel, panel_width, c + m, ldc,
                    accumulate || k0 > 0);
    }
  }
  for (; m + W <= m_cols; m += W)
    rows_nn<T, 1>(n_rows, kd, a, sa_n, sa_k, b + m, ldb, c + m, ldc, accumulate);
  for (; m < m_cols; ++m) {
    for (int64_t n = 0; n < n_rows; ++n) {
      T s = accumulate ? c[n * ldc + m] : T(0);
      for (int64_t k = 0; k < kd; ++k) s += a[n * sa_n + k * sa_k] * b[k * ldb + m];
      c[n * ldc + m] = s;
    }
  }
}

// Tile of R rows of A by Q rows of W for gemm_nt: each output element is
// the lane sum of its vector accumulator, then the tail terms k >= kv in
// order, then the optional add to C, whatever tile it falls in.
template <class T, int R, int Q>
static inline void micro_nt(int64_t kd, int64_t kv, const T* a, int64_t lda, const T* w,
                            int64_t ldw, T* c, int64_t ldc, bool accumulate) {
  constexpr int W = Simd<T>::W;
  Vec<T> acc[R][Q];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) acc[r][q] = Vec<T>{};
  for (int64_t k = 0; k < kv; k += W) {
    Vec<T> wv[Q];
    for (int q = 0; q < Q; ++q) wv[q] = vload(w + q * ldw + k);
    for (int r = 0; r < R; ++r) {
      const Vec<T> av = vload(a + r * lda + k);
      for (int q = 0; q < Q; ++q) acc[r][q] = Simd<T>::madd(av, wv[q], acc[r][q]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < Q; ++q) {
      T s = hsum<T>(acc[r][q]);
      for (int64_t k = kv; k < kd; ++k) s += a[r * lda + k] * w[q * ldw + k];
      T* out = c + r * ldc + q;
      *out = accumulate ? *out + s : s;
    }
  }
}

// All rows of A against Q rows of W, R rows at a time.
template <class T, int R, int Q>
static inline void rows_nt(int64_t n_rows, int64_t kd, int64_t kv, const T* a, int64_t lda,
                           const T* w, int64_t ldw, T* c, int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + R <= n_rows; n += R)
    micro_nt<T, R, Q>(kd, kv, a + n * lda, lda, w, ldw, c + n * ldc, ldc, accumulate);
  for (; n < n_rows; ++n)
    micro_nt<T, 1, Q>(kd, kv, a + n * lda, lda, w, ldw, c + n * ldc, ldc, accumulate);
}

// C [N, M] (+)= A [N, Kd] W^T with W [M, Kd] row-major: dot products along
// rows, used for small batches where transposing W would cost more. The
// outer loop runs over groups of 4 rows of W, so W streams from memory once
// while the few rows of A stay in L1.
template <class T>
static void gemm_nt(int64_t n_rows, int64_t m_cols, int64_t kd, const T* a, int64_t lda,
                    const T* w, int64_t ldw, T* c, int64_t ldc, bool accumulate) {
  if (n_rows <= 0 || m_cols <= 0) return;
  constexpr int W = Simd<T>::W;
  // 4 x 4 accumulators fit the 32 AVX-512 registers, 2 x 4 the 16 of the others.
  constexpr int R = sizeof(Vec<T>) >= 64 ? 4 : 2;
  const int64_t kv = kd - kd % W;
  int64_t m = 0;
  for (; m + 4 <= m_cols; m += 4)
    rows_nt<T, R, 4>(n_rows, kd, kv, a, lda, w + m * ldw, ldw, c + m, ldc, accumulate);
  for (; m < m_cols; ++m)
    rows_nt<T, R, 1>(n_rows, kd, kv, a, lda, w + m * ldw, ldw, c + m, ldc, accumulate);
}

// ---------------------------------------------------------------------------
// Transposition of the weight copies: dst[c * ldd + r] = src[r * lds + c].

// 32-byte blocks (8 x 8 floats or 4 x 4 doubles) transposed in registers.
template <class T>
struct Block32 {
  static constexpr int N = 32 / sizeof(T);
  typedef T V __attribute__((vector_size(32)));
};

static inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  using V = Block32<float>::V;
  typedef int32_t M __attribute__((vector_size(32)));
  V r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * lds, sizeof(V));
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], M{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], M{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], M{0, 1, 8, 9, 4, 5, 12, 13});
      u[i + 2 * j + 1] =
          __builtin_shuffle(t[i + j], t[i + j + 2], M{2, 3, 10, 11, 6, 7, 14, 15});
    }
  }
  // u[0..3] hold columns 0-3 (low half) and 4-7 (high half) of rows 0-3,
  // u[4..7] the same for rows 4-7.
  for (int j = 0; j < 4; ++j) {
    const V lo = __builtin_shuffle(u[j], u[j + 4], M{0, 1, 2, 3, 8, 9, 10, 11});
    const V hi = __builtin_shuffle(u[j], u[j + 4], M{4, 5, 6, 7, 12, 13, 14, 15});
    std::memcpy(dst + j * ldd, &lo, sizeof(V));
    std::memcpy(dst + (j + 4) * ldd, &hi, sizeof(V));
  }
}

static inline void transpose_block(const double* src, int64_t lds, double* dst, int64_t ldd) {
  using V = Block32<double>::V;
  typedef int64_t M __attribute__((vector_size(32)));
  V r[4];
  for (int i = 0; i < 4; ++i) std::memcpy(&r[i], src + i * lds, sizeof(V));
  const V t0 = __builtin_shuffle(r[0], r[1], M{0, 4, 2, 6});
  const V t1 = __builtin_shuffle(r[0], r[1], M{1, 5, 3, 7});
  const V t2 = __builtin_shuffle(r[2], r[3], M{0, 4, 2, 6});
  const V t3 = __builtin_shuffle(r[2], r[3], M{1, 5, 3, 7});
  const V c[4] = {__builtin_shuffle(t0, t2, M{0, 1, 4, 5}), __builtin_shuffle(t1, t3, M{0, 1, 4, 5}),
                  __builtin_shuffle(t0, t2, M{2, 3, 6, 7}), __builtin_shuffle(t1, t3, M{2, 3, 6, 7})};
  for (int j = 0; j < 4; ++j) std::memcpy(dst + j * ldd, &c[j], sizeof(V));
}

// dst [cols, rows] (leading dimension ldd) = src [rows, cols]^T (leading
// dimension lds), in register blocks, scalar at the edges. The outer loop
// runs over blocks of destination rows, so the stores stream along N rows
// while the strided loads stay within a few KB that L1 keeps; tiles that
// store across many destination rows were 5x slower at H = 128, where the
// power-of-two stride (2 KB) maps those rows onto a few L1 sets.
template <class T>
static void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst,
                      int64_t ldd) {
  constexpr int N = Block32<T>::N;
  const int64_t rows_v = rows - rows % N, cols_v = cols - cols % N;
  for (int64_t c = 0; c < cols_v; c += N)
    for (int64_t r = 0; r < rows_v; r += N)
      transpose_block(src + r * lds + c, lds, dst + c * ldd + r, ldd);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c_begin = r < rows_v ? cols_v : 0;
    for (int64_t c = c_begin; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

// C = A W^T for the forward: through the transposed copy when there is one.
template <class T>
static void project(const Ctx<T>& cx, int64_t n_rows, int64_t m_cols, int64_t kd,
                    const T* a, int64_t lda, const T* w, int64_t wt_offset, T* c,
                    int64_t ldc, bool accumulate) {
  if (cx.wt != nullptr) {
    gemm_nn(n_rows, m_cols, kd, a, lda, int64_t(1), cx.wt + wt_offset, m_cols, c, ldc,
            accumulate);
  } else {
    gemm_nt(n_rows, m_cols, kd, a, lda, w, kd, c, ldc, accumulate);
  }
}

// ---------------------------------------------------------------------------
// Vector loops over one hidden dimension.

// Return d + sum_c u_c silu(x_c + y_c + b_c); store silu and its derivative
// when those pointers are not null. y and b may be null (read as zeros).
template <class T>
static inline T gate_logit(const T* x, const T* y, const T* b, const T* u, T d, int64_t n,
                           T* silu_out, T* grad_out) {
  constexpr int W = Simd<T>::W;
  Vec<T> acc{};
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    Vec<T> z = vload(x + c);
    if (y != nullptr) z = z + vload(y + c);
    if (b != nullptr) z = z + vload(b + c);
    const Vec<T> s = vsigmoid<T>(z);
    const Vec<T> act = mp::silu_from_sigmoid(z, s);
    if (silu_out != nullptr) vstore(silu_out + c, act);
    if (grad_out != nullptr) vstore(grad_out + c, mp::silu_grad_from_sigmoid<Vec<T>, T>(z, s));
    acc = Simd<T>::madd(vload(u + c), act, acc);
  }
  T sum = hsum<T>(acc);
  for (; c < n; ++c) {
    T z = x[c];
    if (y != nullptr) z = z + y[c];
    if (b != nullptr) z = z + b[c];
    const T s = sigmoid_scalar(z);
    const T act = mp::silu_from_sigmoid(z, s);
    if (silu_out != nullptr) silu_out[c] = act;
    if (grad_out != nullptr) grad_out[c] = mp::silu_grad_from_sigmoid<T, T>(z, s);
    sum += u[c] * act;
  }
  return sum + d;
}

// out_c = silu(x_c + y_c + b_c), with y and b optional like in gate_logit;
// grad_out_c = silu'(.) when grad_out is not null.
template <class T>
static inline void silu_rows(const T* x, const T* y, const T* b, int64_t n, T* out,
                             T* grad_out) {
  constexpr int W = Simd<T>::W;
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    Vec<T> z = vload(x + c);
    if (y != nullptr) z = z + vload(y + c);
    if (b != nullptr) z = z + vload(b + c);
    const Vec<T> s = vsigmoid<T>(z);
    vstore(out + c, mp::silu_from_sigmoid(z, s));
    if (grad_out != nullptr) vstore(grad_out + c, mp::silu_grad_from_sigmoid<Vec<T>, T>(z, s));
  }
  for (; c < n; ++c) {
    T z = x[c];
    if (y != nullptr) z = z + y[c];
    if (b != nullptr) z = z + b[c];
    const T s = sigmoid_scalar(z);
    out[c] = mp::silu_from_sigmoid(z, s);
    if (grad_out != nullptr) grad_out[c] = mp::silu_grad_from_sigmoid<T, T>(z, s);
  }
}

// y += alpha * x
template <class T>
static inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  constexpr int W = Simd<T>::W;
  const Vec<T> av = vset(alpha);
  int64_t c = 0;
  for (; c + W <= n; c += W) vstore(y + c, vload(y + c) + av * vload(x + c));
  for (; c < n; ++c) y[c] += alpha * x[c];
}

template <class T>
static inline void add_to(const T* x, T* y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) y[c] += x[c];
}

template <class T>
static inline T dot(const T* x, const T* y, int64_t n) {
  constexpr int W = Simd<T>::W;
  Vec<T> acc{};
  int64_t c = 0;
  for (; c + W <= n; c += W) acc = Simd<T>::madd(vload(x + c), vload(y + c), acc);
  T s = hsum<T>(acc);
  for (; c < n; ++c) s += x[c] * y[c];
  return s;
}

// ---------------------------------------------------------------------------
// Forward.

// Message-passing aggregation of one composition with n nodes (rows of
// proj); writes agg [n, Hm] and has_neighbour [n].
template <class T>
static void layer_edges_forward(const Ctx<T>& cx, const T* lp, const T* proj, const T* w,
                                int n, T* agg, T* has_nb) {
  const Dims& d = cx.d;
  const int64_t hg = d.gate, hm = d.msg, wp = cx.w.proj_width;
  const T* gb = lp + cx.p.gate_b;
  const T* gu = lp + cx.p.gate_u;
  const T gd = lp[cx.p.gate_d];
  const T* mb = lp + cx.p.msg_b1;
  T logits[kMaxSlots], att[kMaxSlots];
  bool valid[kMaxSlots];
  for (int i = 0; i < n; ++i) {
    T* ai = agg + i * hm;
    for (int64_t c = 0; c < hm; ++c) ai[c] = T(0);
    has_nb[i] = n > 1 ? T(1) : T(0);
    if (n == 1) continue;
    const T* pi = proj + i * wp;
    for (int j = 0; j < n; ++j) {
      valid[j] = j != i;
      logits[j] = j == i ? T(0)
                         : gate_logit(pi, proj + j * wp + hg, gb, gu, gd, hg,
                                      static_cast<T*>(nullptr), static_cast<T*>(nullptr));
    }
    mp::weighted_softmax(logits, w, valid, n, att, ScalarExp{});
    constexpr int W = Simd<T>::W;
    for (int j = 0; j < n; ++j) {
      if (j == i) continue;
      const T* x = pi + 2 * hg;
      const T* y = proj + j * wp + 2 * hg + hm;
      const Vec<T> aj = vset(att[j]);
      int64_t c = 0;
      for (; c + W <= hm; c += W) {
        const Vec<T> z = vload(x + c) + vload(y + c) + vload(mb + c);
        const Vec<T> act = mp::silu_from_sigmoid(z, vsigmoid<T>(z));
        vstore(ai + c, Simd<T>::madd(aj, act, vload(ai + c)));
      }
      for (; c < hm; ++c) {
        const T z = x[c] + y[c] + mb[c];
        ai[c] += att[j] * mp::silu_from_sigmoid(z, sigmoid_scalar(z));
      }
    }
  }
}

template <class T>
static void forward_block(const Ctx<T>& cx, int64_t b0, int64_t b1, T* scratch) {
  const Dims& d = cx.d;
  const Layout& p = cx.p;
  const WsLayout& w = cx.w;
  const int64_t H = d.hidden, hg = d.gate, hm = d.msg, wp = w.proj_width;
  const int64_t nodes_total = d.batch * d.slots;
  const int64_t n0 = cx.node_offset[b0];
  const int64_t n_rows = cx.node_offset[b1] - n0;
  const int64_t s_rows = b1 - b0;
  const int64_t wide = H > d.head ? H : d.head;

  T* agg = scratch;                      // [N, Hm]
  T* has_nb = agg + kSubBlock * d.slots * hm;  // [N]
  T* xa = has_nb + kSubBlock * d.slots;  // [S, wide]
  T* xb = xa + kSubBlock * wide;         // [S, wide]

  // Node states of layer 0.
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t r = cx.node_offset[b]; r < cx.node_offset[b + 1]; ++r) {
      const int64_t k = cx.node_slot[r];
      const int64_t e = cx.index[b * d.slots + k];
      std::memcpy(cx.ws + w.hs + r * H, cx.table + e * H, sizeof(T) * H);
    }
  }

  for (int64_t l = 0; l < d.layers; ++l) {
    const T* lp = cx.flat + l * p.layer_size;
    const T* hl = cx.ws + w.hs + l * nodes_total * H + n0 * H;
    T* hn = cx.ws + w.hs + (l + 1) * nodes_total * H + n0 * H;
    T* proj = cx.ws + w.proj + l * nodes_total * wp + n0 * wp;
    const int64_t wt_l = l * cx.tl.layer_stride;
    if (cx.wt != nullptr) {
      gemm_nn(n_rows, wp, H, hl, H, int64_t(1), cx.wt + wt_l + cx.tl.layer_proj, wp, proj,
              wp, false);
    } else {
      gemm_nt(n_rows, 2 * hg, H, hl, H, lp + p.gate_w, H, proj, wp, false);
      gemm_nt(n_rows, 2 * hm, H, hl, H, lp + p.msg_w1, H, proj + 2 * hg, wp, false);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = cx.node_offset[b] - n0;
      const int n = static_cast<int>(cx.node_offset[b + 1] - cx.node_offset[b]);
      T wts[kMaxSlots];
      for (int j = 0; j < n; ++j) wts[j] = cx.frac[b * d.slots + cx.node_slot[n0 + r0 + j]];
      layer_edges_forward(cx, lp, proj + r0 * wp, wts, n, agg + r0 * hm, has_nb + r0);
    }
    std::memcpy(hn, hl, sizeof(T) * n_rows * H);
    project(cx, n_rows, H, hm, agg, hm, lp + p.msg_w2, wt_l + cx.tl.layer_w2, hn, H, true);
    for (int64_t r = 0; r < n_rows; ++r)
      if (has_nb[r] != T(0)) add_to(lp + p.msg_b2, hn + r * H, H);
  }

  // Pooling.
  const T* hl = cx.ws + w.hs + d.layers * nodes_total * H + n0 * H;
  T* zp = cx.ws + w.pool + n0 * w.pool_width;
  const int64_t pw = w.pool_width;
  if (cx.wt != nullptr) {
    gemm_nn(n_rows, pw, H, hl, H, int64_t(1), cx.wt + cx.tl.pool_proj, pw, zp, pw, false);
  } else {
    gemm_nt(n_rows, hg, H, hl, H, cx.flat + p.pool_gate_w, H, zp, pw, false);
    gemm_nt(n_rows, hm, H, hl, H, cx.flat + p.pool_msg_w1, H, zp + hg, pw, false);
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    add_to(cx.flat + p.pool_gate_b, zp + r * pw, hg);
    add_to(cx.flat + p.pool_msg_b1, zp + r * pw + hg, hm);
  }
  T* aggp = cx.ws + w.aggp + b0 * hm;
  T* suma = cx.ws + w.suma + b0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t r0 = cx.node_offset[b] - n0;
    const int n = static_cast<int>(cx.node_offset[b + 1] - cx.node_offset[b]);
    T logits[kMaxSlots], att[kMaxSlots], wts[kMaxSlots];
    bool valid[kMaxSlots];
    T* msg = agg;  // reuse: [n, Hm] message hidden states of this composition
    for (int i = 0; i < n; ++i) {
      const T* zi = zp + (r0 + i) * pw;
      valid[i] = true;
      wts[i] = cx.frac[b * d.slots + cx.node_slot[n0 + r0 + i]];
      // zp already contains the biases.
      logits[i] = gate_logit(zi, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                             cx.flat + p.pool_gate_u, cx.flat[p.pool_gate_d], hg,
                             static_cast<T*>(nullptr), static_cast<T*>(nullptr));
      silu_rows(zi + hg, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), hm,
                msg + i * hm, static_cast<T*>(nullptr));
    }
    mp::weighted_softmax(logits, wts, valid, n, att, ScalarExp{});
    T* ab = aggp + (b - b0) * hm;
    for (int64_t c = 0; c < hm; ++c) ab[c] = T(0);
    T total = T(0);
    for (int i = 0; i < n; ++i) {
      axpy(att[i], msg + i * hm, ab, hm);
      total += att[i];
    }
    suma[b - b0] = total;
  }
  T* pooled = cx.ws + w.pooled + b0 * H;
  project(cx, s_rows, H, hm, aggp, hm, cx.flat + p.pool_msg_w2, cx.tl.pool_w2, pooled, H,
          false);
  for (int64_t s = 0; s < s_rows; ++s) axpy(suma[s], cx.flat + p.pool_msg_b2, pooled + s * H, H);

  // Head.
  const T* x = pooled;
  int64_t width = H;
  for (int64_t k = 0; k < d.depth; ++k) {
    T* z = cx.ws + w.zh + k * d.batch * d.head + b0 * d.head;
    project(cx, s_rows, d.head, width, x, width, cx.flat + p.head_w[k], cx.tl.head[k], z,
            d.head, false);
    T* xn = (k % 2 == 0) ? xa : xb;
    for (int64_t s = 0; s < s_rows; ++s) {
      add_to(cx.flat + p.head_b[k], z + s * d.head, d.head);
      silu_rows(z + s * d.head, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                d.head, xn + s * d.head, static_cast<T*>(nullptr));
      if (cx.dropout != nullptr) {
        const T* m = cx.dropout + (k * d.batch + b0 + s) * d.head;
        for (int64_t c = 0; c < d.head; ++c) xn[s * d.head + c] *= m[c];
      }
    }
    x = xn;
    width = d.head;
  }
  T* out = cx.out + b0 * d.n_out;
  project(cx, s_rows, d.n_out, width, x, width, cx.flat + p.head_out_w, cx.tl.head_out, out,
          d.n_out, false);
  for (int64_t s = 0; s < s_rows; ++s) add_to(cx.flat + p.head_out_b, out + s * d.n_out, d.n_out);
}

// ---------------------------------------------------------------------------
// Backward.

// Per-edge buffers of one node i: silu and silu' of the gate and message
// pre-activations towards each neighbour j.
template <class T>
struct EdgeBuffers {
  T* gate_act;   // [K, Hg]
  T* gate_grad;  // [K, Hg]
  T* msg_act;    // [K, Hm]
  T* msg_grad;   // [K, Hm]
};

// Backward of the aggregation of one composition: reads dagg [n, Hm],
// writes agg [n, Hm] (recomputed), adds to dproj [n, Wp], to the bias,
// gate_u and gate_d gradients of the layer (glp, skipped when null) and to
// dfrac [n].
template <class T>
static void layer_edges_backward(const Ctx<T>& cx, const T* lp, T* glp, const T* proj,
                                 const T* w, int n, const T* dagg, T* agg, T* dproj,
                                 T* dw, const EdgeBuffers<T>& eb) {
  constexpr int W = Simd<T>::W;
  const int64_t hg = cx.d.gate, hm = cx.d.msg, wp = cx.w.proj_width;
  const T* gb = lp + cx.p.gate_b;
  const T* gu = lp + cx.p.gate_u;
  const T gd = lp[cx.p.gate_d];
  const T* mb = lp + cx.p.msg_b1;
  const bool pg = glp != nullptr;
  T* g_gb = pg ? glp + cx.p.gate_b : nullptr;
  T* g_gu = pg ? glp + cx.p.gate_u : nullptr;
  T* g_mb = pg ? glp + cx.p.msg_b1 : nullptr;
  T logits[kMaxSlots], att[kMaxSlots], datt[kMaxSlots], dlogit[kMaxSlots];
  bool valid[kMaxSlots];
  for (int i = 0; i < n; ++i) {
    T* ai = agg + i * hm;
    for (int64_t c = 0; c < hm; ++c) ai[c] = T(0);
    if (n == 1) continue;
    const T* pi = proj + i * wp;
    const T* dai = dagg + i * hm;
    T* dpi = dproj + i * wp;
    for (int j = 0; j < n; ++j) {
      valid[j] = j != i;
      logits[j] = j == i ? T(0)
                         : gate_logit(pi, proj + j * wp + hg, gb, gu, gd, hg,
                                      eb.gate_act + j * hg, eb.gate_grad + j * hg);
    }
    const mp::SoftmaxRow<T> row = mp::weighted_softmax(logits, w, valid, n, att, ScalarExp{});
    for (int j = 0; j < n; ++j) {
      datt[j] = T(0);
      if (j == i) continue;
      T* sm = eb.msg_act + j * hm;
      T* smg = eb.msg_grad + j * hm;
      silu_rows(pi + 2 * hg, proj + j * wp + 2 * hg + hm, mb, hm, sm, smg);
      axpy(att[j], sm, ai, hm);
      datt[j] = dot(sm, dai, hm);
      T* dpi_m = dpi + 2 * hg;
      T* dpj_m = dproj + j * wp + 2 * hg + hm;
      const Vec<T> av = vset(att[j]);
      int64_t c = 0;
      for (; c + W <= hm; c += W) {
        const Vec<T> t = av * vload(dai + c) * vload(smg + c);
        vstore(dpi_m + c, vload(dpi_m + c) + t);
        vstore(dpj_m + c, vload(dpj_m + c) + t);
        if (pg) vstore(g_mb + c, vload(g_mb + c) + t);
      }
      for (; c < hm; ++c) {
        const T t = att[j] * dai[c] * smg[c];
        dpi_m[c] += t;
        dpj_m[c] += t;
        if (pg) g_mb[c] += t;
      }
    }
    mp::weighted_softmax_backward(logits, w, valid, n, att, datt, row, dlogit, dw,
                                  ScalarExp{});
    for (int j = 0; j < n; ++j) {
      if (j == i) continue;
      const T* sg = eb.gate_act + j * hg;
      const T* sgg = eb.gate_grad + j * hg;
      T* dpj_g = dproj + j * wp + hg;
      const Vec<T> dv = vset(dlogit[j]);
      int64_t c = 0;
      for (; c + W <= hg; c += W) {
        const Vec<T> t = dv * vload(gu + c) * vload(sgg + c);
        vstore(dpi + c, vload(dpi + c) + t);
        vstore(dpj_g + c, vload(dpj_g + c) + t);
        if (pg) {
          vstore(g_gb + c, vload(g_gb + c) + t);
          vstore(g_gu + c, vload(g_gu + c) + dv * vload(sg + c));
        }
      }
      for (; c < hg; ++c) {
        const T t = dlogit[j] * gu[c] * sgg[c];
        dpi[c] += t;
        dpj_g[c] += t;
        if (pg) {
          g_gb[c] += t;
          g_gu[c] += dlogit[j] * sg[c];
        }
      }
      if (pg) glp[cx.p.gate_d] += dlogit[j];
    }
  }
}

// gflat and gtable are null unless the parameter gradients are requested.
// With them, the first sub-block of a chunk (first) writes the weight-matrix
// gradients instead of adding to them, and the caller zeroes the rest
// (zero_bias_grads) and gtable. Without them, cx.grad_nodes (when not null)
// receives dL/dh0 of every node row for the caller's deterministic scatter.
template <class T>
static void backward_block(const Ctx<T>& cx, int64_t b0, int64_t b1, T* scratch, T* gflat,
                           T* gtable, bool first) {
  const Dims& d = cx.d;
  const Layout& p = cx.p;
  const WsLayout& w = cx.w;
  const int64_t H = d.hidden, hg = d.gate, hm = d.msg, wp = w.proj_width, pw = w.pool_width;
  const int64_t K = d.slots;
  const int64_t nodes_total = d.batch * K;
  const int64_t n0 = cx.node_offset[b0];
  const int64_t n_rows = cx.node_offset[b1] - n0;
  const int64_t s_rows = b1 - b0;
  const int64_t wide = H > d.head ? H : d.head;
  const int64_t nmax = kSubBlock * K;

  T* dh = scratch;                  // [N, H]
  T* dagg = dh + nmax * H;          // [N, Hm]
  T* agg = dagg + nmax * hm;        // [N, Hm]
  T* dproj = agg + nmax * hm;       // [N, Wp]
  T* dxa = dproj + nmax * wp + nmax;  // [S, wide]
  T* dxb = dxa + kSubBlock * wide;
  T* xr = dxb + kSubBlock * wide;
  T* dz = xr + kSubBlock * wide;
  T* daggp = dz + kSubBlock * wide;  // [S, Hm]
  EdgeBuffers<T> eb;
  eb.gate_act = daggp + kSubBlock * hm;
  eb.gate_grad = eb.gate_act + kMaxSlots * hg;
  eb.msg_act = eb.gate_grad + kMaxSlots * hg;
  eb.msg_grad = eb.msg_act + kMaxSlots * hm;
  T* dfrac = eb.msg_grad + kMaxSlots * hm;  // [S, K]
  for (int64_t c = 0; c < s_rows * K; ++c) dfrac[c] = T(0);
  const bool pg = gflat != nullptr;
  const bool acc = !first;  // weight gradients: add to the earlier sub-blocks

  // Head.
  const T* g = cx.grad_out + b0 * d.n_out;
  const T* pooled = cx.ws + w.pooled + b0 * H;
  int64_t width = d.depth > 0 ? d.head : H;
  const T* x_last = pooled;
  if (pg && d.depth > 0) {
    const T* z = cx.ws + w.zh + (d.depth - 1) * d.batch * d.head + b0 * d.head;
    for (int64_t s = 0; s < s_rows; ++s) {
      silu_rows(z + s * d.head, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                d.head, xr + s * d.head, static_cast<T*>(nullptr));
      if (cx.dropout != nullptr) {
        const T* m = cx.dropout + ((d.depth - 1) * d.batch + b0 + s) * d.head;
        for (int64_t c = 0; c < d.head; ++c) xr[s * d.head + c] *= m[c];
      }
    }
    x_last = xr;
  }
  if (pg) {
    gemm_nn(d.n_out, width, s_rows, g, int64_t(1), d.n_out, x_last, width,
            gflat + p.head_out_w, width, acc);
    for (int64_t s = 0; s < s_rows; ++s)
      add_to(g + s * d.n_out, gflat + p.head_out_b, d.n_out);
  }
  T* dx = dxa;
  T* dx_next = dxb;
  gemm_nn(s_rows, width, d.n_out, g, d.n_out, int64_t(1), cx.flat + p.head_out_w, width, dx,
          width, false);
  for (int64_t k = d.depth - 1; k >= 0; --k) {
    const int64_t in = head_input_width(d, k);
    const T* z = cx.ws + w.zh + k * d.batch * d.head + b0 * d.head;
    for (int64_t s = 0; s < s_rows; ++s) {
      silu_rows(z + s * d.head, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                d.head, xr + s * d.head, dz + s * d.head);
      const T* m = cx.dropout != nullptr
                       ? cx.dropout + (k * d.batch + b0 + s) * d.head
                       : nullptr;
      for (int64_t c = 0; c < d.head; ++c) {
        const T upstream = m != nullptr ? dx[s * d.head + c] * m[c] : dx[s * d.head + c];
        dz[s * d.head + c] *= upstream;
      }
    }
    const T* x_in = pooled;
    if (pg && k > 0) {
      const T* zp = cx.ws + w.zh + (k - 1) * d.batch * d.head + b0 * d.head;
      for (int64_t s = 0; s < s_rows; ++s) {
        silu_rows(zp + s * d.head, static_cast<const T*>(nullptr),
                  static_cast<const T*>(nullptr), d.head, xr + s * d.head,
                  static_cast<T*>(nullptr));
        if (cx.dropout != nullptr) {
          const T* m = cx.dropout + ((k - 1) * d.batch + b0 + s) * d.head;
          for (int64_t c = 0; c < d.head; ++c) xr[s * d.head + c] *= m[c];
        }
      }
      x_in = xr;
    }
    if (pg) {
      gemm_nn(d.head, in, s_rows, dz, int64_t(1), d.head, x_in, in, gflat + p.head_w[k], in,
              acc);
      for (int64_t s = 0; s < s_rows; ++s)
        add_to(dz + s * d.head, gflat + p.head_b[k], d.head);
    }
    gemm_nn(s_rows, in, d.head, dz, d.head, int64_t(1), cx.flat + p.head_w[k], in, dx_next,
            in, false);
    T* t = dx;
    dx = dx_next;
    dx_next = t;
  }
  const T* dpooled = dx;  // [S, H]

  // Pooling.
  const T* aggp = cx.ws + w.aggp + b0 * hm;
  const T* suma = cx.ws + w.suma + b0;
  gemm_nn(s_rows, hm, H, dpooled, H, int64_t(1), cx.flat + p.pool_msg_w2, hm, daggp, hm,
          false);
  if (pg) {
    gemm_nn(H, hm, s_rows, dpooled, int64_t(1), H, aggp, hm, gflat + p.pool_msg_w2, hm, acc);
    for (int64_t s = 0; s < s_rows; ++s)
      axpy(suma[s], dpooled + s * H, gflat + p.pool_msg_b2, H);
  }
  const T* zp = cx.ws + w.pool + n0 * pw;
  T* dzp = dproj;  // [N, Hg + Hm]
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = b - b0;
    const int64_t r0 = cx.node_offset[b] - n0;
    const int n = static_cast<int>(cx.node_offset[b + 1] - cx.node_offset[b]);
    T logits[kMaxSlots], att[kMaxSlots], datt[kMaxSlots], dlogit[kMaxSlots],
        wts[kMaxSlots], dwts[kMaxSlots];
    bool valid[kMaxSlots];
    const T* da = daggp + s * hm;
    const T bias_term = dot(dpooled + s * H, cx.flat + p.pool_msg_b2, H);
    for (int i = 0; i < n; ++i) {
      const T* zi = zp + (r0 + i) * pw;
      valid[i] = true;
      wts[i] = cx.frac[b * K + cx.node_slot[n0 + r0 + i]];
      dwts[i] = T(0);
      logits[i] = gate_logit(zi, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                             cx.flat + p.pool_gate_u, cx.flat[p.pool_gate_d], hg,
                             eb.gate_act + i * hg, eb.gate_grad + i * hg);
      silu_rows(zi + hg, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), hm,
                eb.msg_act + i * hm, eb.msg_grad + i * hm);
    }
    const mp::SoftmaxRow<T> row =
        mp::weighted_softmax(logits, wts, valid, n, att, ScalarExp{});
    for (int i = 0; i < n; ++i) {
      datt[i] = dot(eb.msg_act + i * hm, da, hm) + bias_term;
      T* dzm = dzp + (r0 + i) * pw + hg;
      const T* smg = eb.msg_grad + i * hm;
      for (int64_t c = 0; c < hm; ++c) dzm[c] = att[i] * da[c] * smg[c];
      if (pg) add_to(dzm, gflat + p.pool_msg_b1, hm);
    }
    mp::weighted_softmax_backward(logits, wts, valid, n, att, datt, row, dlogit, dwts,
                                  ScalarExp{});
    const T* u = cx.flat + p.pool_gate_u;
    for (int i = 0; i < n; ++i) {
      T* dzg = dzp + (r0 + i) * pw;
      const T* sgg = eb.gate_grad + i * hg;
      for (int64_t c = 0; c < hg; ++c) dzg[c] = dlogit[i] * u[c] * sgg[c];
      if (pg) {
        add_to(dzg, gflat + p.pool_gate_b, hg);
        axpy(dlogit[i], eb.gate_act + i * hg, gflat + p.pool_gate_u, hg);
        gflat[p.pool_gate_d] += dlogit[i];
      }
      dfrac[s * K + cx.node_slot[n0 + r0 + i]] += dwts[i];
    }
  }
  const T* h_last = cx.ws + w.hs + d.layers * nodes_total * H + n0 * H;
  gemm_nn(n_rows, H, hg, dzp, pw, int64_t(1), cx.flat + p.pool_gate_w, H, dh, H, false);
  gemm_nn(n_rows, H, hm, dzp + hg, pw, int64_t(1), cx.flat + p.pool_msg_w1, H, dh, H, true);
  if (pg) {
    gemm_nn(hg, H, n_rows, dzp, int64_t(1), pw, h_last, H, gflat + p.pool_gate_w, H, acc);
    gemm_nn(hm, H, n_rows, dzp + hg, int64_t(1), pw, h_last, H, gflat + p.pool_msg_w1, H, acc);
  }

  // Message-passing layers, last to first.
  for (int64_t l = d.layers - 1; l >= 0; --l) {
    const T* lp = cx.flat + l * p.layer_size;
    T* glp = pg ? gflat + l * p.layer_size : nullptr;
    const T* hl = cx.ws + w.hs + l * nodes_total * H + n0 * H;
    const T* proj = cx.ws + w.proj + l * nodes_total * wp + n0 * wp;
    gemm_nn(n_rows, hm, H, dh, H, int64_t(1), lp + p.msg_w2, hm, dagg, hm, false);
    for (int64_t c = 0; c < n_rows * wp; ++c) dproj[c] = T(0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b - b0;
      const int64_t r0 = cx.node_offset[b] - n0;
      const int n = static_cast<int>(cx.node_offset[b + 1] - cx.node_offset[b]);
      T wts[kMaxSlots], dwts[kMaxSlots];
      for (int j = 0; j < n; ++j) {
        wts[j] = cx.frac[b * K + cx.node_slot[n0 + r0 + j]];
        dwts[j] = T(0);
      }
      if (pg && n > 1) {
        for (int j = 0; j < n; ++j) add_to(dh + (r0 + j) * H, glp + p.msg_b2, H);
      }
      layer_edges_backward(cx, lp, glp, proj + r0 * wp, wts, n, dagg + r0 * hm,
                           agg + r0 * hm, dproj + r0 * wp, dwts, eb);
      for (int j = 0; j < n; ++j) dfrac[s * K + cx.node_slot[n0 + r0 + j]] += dwts[j];
    }
    if (pg) {
      gemm_nn(H, hm, n_rows, dh, int64_t(1), H, agg, hm, glp + p.msg_w2, hm, acc);
      gemm_nn(2 * hg, H, n_rows, dproj, int64_t(1), wp, hl, H, glp + p.gate_w, H, acc);
      gemm_nn(2 * hm, H, n_rows, dproj + 2 * hg, int64_t(1), wp, hl, H, glp + p.msg_w1, H,
              acc);
    }
    gemm_nn(n_rows, H, 2 * hg, dproj, wp, int64_t(1), lp + p.gate_w, H, dh, H, true);
    gemm_nn(n_rows, H, 2 * hm, dproj + 2 * hg, wp, int64_t(1), lp + p.msg_w1, H, dh, H, true);
  }

  // Node table rows, in node order.
  for (int64_t b = gtable != nullptr ? b0 : b1; b < b1; ++b) {
    for (int64_t r = cx.node_offset[b]; r < cx.node_offset[b + 1]; ++r) {
      const int64_t e = cx.index[b * K + cx.node_slot[r]];
      add_to(dh + (r - n0) * H, gtable + e * H, H);
    }
  }
  if (cx.grad_nodes != nullptr && n_rows > 0)
    std::memcpy(cx.grad_nodes + n0 * H, dh, sizeof(T) * n_rows * H);
  for (int64_t s = 0; s < s_rows; ++s)
    for (int64_t k = 0; k < K; ++k) cx.grad_frac[(b0 + s) * K + k] = dfrac[s * K + k];
}

template <class T>
static void forward_range(const Ctx<T>& cx, int64_t begin, int64_t end, T* scratch) {
  for (int64_t b = begin; b < end; b += kSubBlock)
    forward_block(cx, b, b + kSubBlock < end ? b + kSubBlock : end, scratch);
}

template <class T>
static void backward_range(const Ctx<T>& cx, int64_t begin, int64_t end, T* scratch,
                           T* grad_flat, T* grad_table) {
  for (int64_t b = begin; b < end; b += kSubBlock)
    backward_block(cx, b, b + kSubBlock < end ? b + kSubBlock : end, scratch, grad_flat,
                   grad_table, b == begin);
}

static KernelSet make_kernel_set(const char* isa) {
  KernelSet k;
  k.isa = isa;
  k.forward_f32 = &forward_range<float>;
  k.forward_f64 = &forward_range<double>;
  k.backward_f32 = &backward_range<float>;
  k.backward_f64 = &backward_range<double>;
  k.transpose_f32 = &transpose<float>;
  k.transpose_f64 = &transpose<double>;
  return k;
}
