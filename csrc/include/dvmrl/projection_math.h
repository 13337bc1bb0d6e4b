// Exact Euclidean projection of one row onto {sum_k y_k = 1, lo <= y <= hi}.
//
// The projection is y_k = clamp(x_k - t, lo_k, hi_k) for the threshold t at
// which the clamped sum equals 1. That sum is piecewise linear and
// non-increasing in t, with breakpoints x_k - hi_k and x_k - lo_k. Sorting
// the breakpoints finds the linear piece that crosses 1, and on that piece
// the free entries (strictly between their bounds) give t in closed form:
//
//     t = (sum_free x_k + sum_at_lo lo_k + sum_at_hi hi_k - 1) / n_free
//
// so the result is exact up to rounding, with no iteration. All arithmetic
// is in double, also for float inputs. The same code runs on the CPU and,
// compiled by nvcc, in a CUDA thread.
#pragma once

#include <cstdint>

#ifndef DVMRL_HD
#if defined(__CUDACC__)
#define DVMRL_HD __host__ __device__
#else
#define DVMRL_HD
#endif
#endif

namespace dvmrl {
namespace projection {

// Largest number of real entries in one row; the callers reject wider rows.
constexpr int kMaxEntries = 32;
// Largest finite double, the floor of a shifted entry in project_row.
constexpr double kDoubleMax = 1.7976931348623157e308;

// Outcome of projecting one row.
enum Status : int32_t {
  kOk = 0,
  kSumLowerAboveOne = 1,   // sum of lo over real entries > 1: no feasible point
  kSumUpperBelowOne = 2,   // sum of hi over real entries < 1: no feasible point
  kLowerAboveUpper = 3,    // some lo_k > hi_k
  kNotFinite = 4,          // a NaN or infinite x, lo or hi
  kNoRealEntries = 5,      // the mask has no true entry
  kTooManyEntries = 6,     // more than kMaxEntries real entries
};

DVMRL_HD inline double clamp_to(double v, double lo, double hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

DVMRL_HD inline bool is_finite(double v) {
  // NaN fails both comparisons; +-inf fails one of them.
  return v > -1.7976931348623157e308 && v < 1.7976931348623157e308;
}

// Finds the linear piece (t_left, t_right) of the clamped sum that crosses 1
// by sorting the breakpoints and walking the pieces. Needs
// sum_lo < 1 < sum_hi. (Evaluating the sum at every breakpoint without
// sorting was 20 % slower for K = 3 with g++ 12 -O3.)
DVMRL_HD inline void find_piece(const double* xs, const double* lower,
                                const double* upper, int n, double sum_hi,
                                double* t_left, double* t_right) {
  // Each breakpoint carries the change of the free count: an entry becomes
  // free at x - hi (coming down from hi) and stops at x - lo (reaching lo).
  double brk[2 * kMaxEntries];
  int step[2 * kMaxEntries];
  const int m = 2 * n;
  for (int i = 0; i < n; ++i) {
    brk[2 * i] = xs[i] - upper[i];
    step[2 * i] = 1;
    brk[2 * i + 1] = xs[i] - lower[i];
    step[2 * i + 1] = -1;
  }
  for (int i = 1; i < m; ++i) {  // insertion sort: m <= 64
    const double v = brk[i];
    const int d = step[i];
    int j = i - 1;
    while (j >= 0 && brk[j] > v) {
      brk[j + 1] = brk[j];
      step[j + 1] = step[j];
      --j;
    }
    brk[j + 1] = v;
    step[j + 1] = d;
  }
  // Walk the pieces from brk[0], where every entry is at hi (sum_hi > 1),
  // to the first breakpoint at which the clamped sum drops to 1 or below.
  // The running sum only locates the piece; t itself comes from the exact
  // classification in project_row, so its rounding cannot accumulate into y.
  int right = m - 1;
  double g = sum_hi;
  int free_count = step[0];
  for (int j = 1; j < m; ++j) {
    g -= free_count * (brk[j] - brk[j - 1]);
    if (g <= 1.0) {
      right = j;
      break;
    }
    free_count += step[j];
  }
  *t_left = brk[right - 1];
  *t_right = brk[right];
}

// Projects the real entries of one row (mask[k] true) and writes 0 to the
// padding entries. `tolerance` is the slack allowed on sum lo <= 1 <= sum hi
// for rounding in the caller's dtype; within it the row snaps to lo or hi.
// Reports the two bound sums through sum_lo_out / sum_hi_out for messages.
template <typename T>
DVMRL_HD inline int32_t project_row(const T* x, const T* lo, const T* hi,
                                    const bool* mask, T* out, int k_slots,
                                    double tolerance, double* sum_lo_out,
                                    double* sum_hi_out) {
  double xs[kMaxEntries], lower[kMaxEntries], upper[kMaxEntries];
  int slot[kMaxEntries];
  int n = 0;
  double sum_lo = 0.0, sum_hi = 0.0;
  int32_t status = kOk;
  for (int k = 0; k < k_slots; ++k) {
    out[k] = T(0);
    if (!mask[k]) continue;
    if (n == kMaxEntries) {
      status = kTooManyEntries;
      break;
    }
    const double xv = static_cast<double>(x[k]);
    const double lv = static_cast<double>(lo[k]);
    const double hv = static_cast<double>(hi[k]);
    if (!is_finite(xv) || !is_finite(lv) || !is_finite(hv)) {
      status = kNotFinite;
      break;
    }
    if (lv > hv) {
      status = kLowerAboveUpper;
      break;
    }
    xs[n] = xv;
    lower[n] = lv;
    upper[n] = hv;
    slot[n] = k;
    sum_lo += lv;
    sum_hi += hv;
    ++n;
  }
  *sum_lo_out = sum_lo;
  *sum_hi_out = sum_hi;
  if (status != kOk) return status;
  if (n == 0) return kNoRealEntries;
  if (sum_lo > 1.0 + tolerance) return kSumLowerAboveOne;
  if (sum_hi < 1.0 - tolerance) return kSumUpperBelowOne;
  if (sum_lo >= 1.0) {
    for (int i = 0; i < n; ++i) out[slot[i]] = static_cast<T>(lower[i]);
    return kOk;
  }
  if (sum_hi <= 1.0) {
    for (int i = 0; i < n; ++i) out[slot[i]] = static_cast<T>(upper[i]);
    return kOk;
  }
  // Adding one constant to every entry of x leaves the projection unchanged
  // (the sum of y is fixed). Shifting x so that its largest entry is 0 keeps
  // x - lo, x - hi and x - t exact enough for |x| of 1e12 and more, where
  // they would otherwise cancel catastrophically. Entries far below the
  // largest end at their lower bound either way, so a shift that overflows
  // is held at -kDoubleMax.
  double x_max = xs[0];
  for (int i = 1; i < n; ++i) x_max = xs[i] > x_max ? xs[i] : x_max;
  for (int i = 0; i < n; ++i) {
    const double shifted = xs[i] - x_max;
    xs[i] = shifted < -kDoubleMax ? -kDoubleMax : shifted;
  }

  // Now sum_lo < 1 < sum_hi, so the crossing lies strictly inside the
  // breakpoints and its linear piece (t_left, t_right) has at least one
  // free entry.
  double t_left, t_right;
  find_piece(xs, lower, upper, n, sum_hi, &t_left, &t_right);
  // On (t_left, t_right) no breakpoint lies inside, so each entry is at hi,
  // at lo or free throughout the piece.
  double rest = -1.0;
  int n_free = 0;
  for (int i = 0; i < n; ++i) {
    if (xs[i] - upper[i] >= t_right) {
      rest += upper[i];
    } else if (xs[i] - lower[i] <= t_left) {
      rest += lower[i];
    } else {
      rest += xs[i];
      ++n_free;
    }
  }
  if (n_free == 0) {
    // Unreachable in exact arithmetic. Rounding gets here when the piece is
    // a single point, as when entries of x lie 1e16 and more apart (after
    // centring), where x - hi rounds to x - lo. Then x - t cannot be trusted
    // either (it rounds every entry to one bound), so each entry takes the
    // bound it was classified at.
    for (int i = 0; i < n; ++i) {
      out[slot[i]] = static_cast<T>(xs[i] - upper[i] >= t_right ? upper[i] : lower[i]);
    }
    return kOk;
  }
  const double t = rest / n_free;
  for (int i = 0; i < n; ++i) out[slot[i]] = static_cast<T>(clamp_to(xs[i] - t, lower[i], upper[i]));
  return kOk;
}

}  // namespace projection
}  // namespace dvmrl
