// Blended and packed sample indices for megatron-mmbert (pybind11 module
// megatron_mmbert.data._index_builder).
//
// 1. build_blending_indices: the greedy largest-deficit interleave of megatron-core's
//    helpers_cpp.build_blending_indices, generalised to a schedule of phases, each cut into
//    segments of fixed weights (piecewise-constant annealing). For one phase of one segment with
//    positive weights the output is bit-identical to megatron-core's; the fast path below is exact
//    (it evaluates the very same floating-point expression and tie rule) but scans only the few
//    datasets that can win, instead of all L at every step.
// 2. pcg64 / permutation: numpy's PCG64 (XSL-RR 128/64) and Generator.permutation re-implemented,
//    bit for bit, so document shuffles are identical on every machine and checkable against numpy.
// 3. pack_rows: documents of one language laid into rows of seq_len tokens, over as many shuffled
//    epochs as needed, in megatron-core's GPT sample_idx representation (build_sample_idx with no
//    extra token), starting at any token position of the endless epoch stream.
//
// Every input array is dtype- and layout-checked (a wrong dtype raises TypeError: megatron's helper
// silently fills a temporary copy instead), outputs are allocated here, and the GIL is released
// while computing.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <limits>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// The deficit must be computed exactly as megatron computes it: a product rounded to double, then a
// subtraction rounded to double. A fused multiply-add (allowed by default in GCC when the target has
// FMA, e.g. -march=native) would change the last bit and break identity with megatron's output.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace py = pybind11;

namespace {

// ------------------------------------------------------------------------------------------------
// Input checking
// ------------------------------------------------------------------------------------------------

template <typename T>
const char *dtype_name() {
  if (std::is_same<T, double>::value) return "float64";
  if (std::is_same<T, int64_t>::value) return "int64";
  if (std::is_same<T, int32_t>::value) return "int32";
  if (std::is_same<T, int16_t>::value) return "int16";
  return "?";
}

// A read-only view of `obj` as a C-contiguous array of T with `ndim` dimensions, or a TypeError
// naming the argument, the dtype it has and the one it needs.
template <typename T>
py::array_t<T> require(const py::handle &obj, const char *name, int ndim) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a numpy array of " + dtype_name<T>() +
                         ", got " + std::string(py::str(py::type::handle_of(obj))));
  }
  py::array arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<T>())) {
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name<T>() + ", got " +
                         std::string(py::str(arr.dtype())) + " (convert with .astype(np." +
                         dtype_name<T>() + "))");
  }
  if (arr.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                          std::to_string(arr.ndim()) + "-D");
  }
  if (!(arr.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be C-contiguous (use np.ascontiguousarray)");
  }
  return py::reinterpret_borrow<py::array_t<T>>(arr);
}

// ------------------------------------------------------------------------------------------------
// Blending
// ------------------------------------------------------------------------------------------------

// One segment of a phase: weights fixed over local steps [start, end) of the phase.
// The target count of dataset i at local step s (using S = max(s, 1), megatron's quirk) is
//   T_i(S) = B_i + w_i * (S - start)       evaluated in doubles, left to right,
// with B_i = 0 in the first segment (so T_i = w_i * S exactly as in megatron) and B_i the value of
// the previous segment's expression at its end otherwise. The deficit is T_i(S) - count_i.
struct Segment {
  const double *w;  // [L] weights (0: inactive in this segment, never chosen)
  int64_t start;    // first local step
  int64_t end;      // one past the last local step
};

inline double deficit(double B, double w, double x, double c) {
  // x = S - start; written as megatron writes it: (w * S) - c, plus an exact 0.0 in segment 0.
  double target = B + w * x;
  return target - c;
}

struct BlendStats {
  int64_t rebuilds = 0;     // full scans (segment starts + fallbacks when the line passed the top)
  int64_t raises = 0;       // threshold raises (the hot set outgrew its cap)
  int64_t hot_scanned = 0;  // deficits evaluated on the fast path
  int64_t wakes = 0;        // sleepers taken off the calendar
  int64_t sleeps = 0;       // wake steps computed
};

// Reference implementation: a full scan of all active datasets at every step (megatron's loop).
template <typename IdxT>
void blend_segment_scan(const Segment &seg, int L, const double *B, int64_t *count_phase,
                        double *count_phase_d, int64_t *count_global, IdxT *out_idx,
                        int64_t *out_sample, int64_t out_offset) {
  // Megatron's case (first segment: B = 0, every weight positive) runs megatron's very loop:
  // (0 + w * x) - c is w * x - c exactly, so only the extra load and add are saved.
  bool plain = true;
  for (int i = 0; i < L; ++i) plain = plain && seg.w[i] > 0.0 && B[i] == 0.0;
  for (int64_t s = seg.start; s < seg.end; ++s) {
    const double x = static_cast<double>(std::max<int64_t>(s, 1)) - static_cast<double>(seg.start);
    int best = -1;
    double best_e = 0.0;
    if (plain) {
      best = 0;
      best_e = seg.w[0] * x - count_phase_d[0];
      for (int i = 1; i < L; ++i) {
        const double e = seg.w[i] * x - count_phase_d[i];
        if (e > best_e) {
          best_e = e;
          best = i;
        }
      }
    } else {
      for (int i = 0; i < L; ++i) {
        if (!(seg.w[i] > 0.0)) continue;
        double e = deficit(B[i], seg.w[i], x, count_phase_d[i]);
        if (best < 0 || e > best_e) {
          best = i;
          best_e = e;
        }
      }
    }
    out_idx[out_offset + s] = static_cast<IdxT>(best);
    out_sample[out_offset + s] = count_global[best];
    count_global[best] += 1;
    count_phase[best] += 1;
    count_phase_d[best] = static_cast<double>(count_phase[best]);
  }
}

// Exact fast path: a falling threshold line, a small hot set and a calendar of sleepers.
//
// The winner at step s is the dataset with the largest deficit (lowest index on ties). Let
// tau(x) = T0 - slope * x (doubles, x = max(s, 1) - start as in the deficit), a line that falls a
// little every step. A dataset is "hot" once its deficit is at or above the line, else it sleeps.
// Every sleeper is strictly below the line, so as long as the largest hot deficit is at or above
// the line the hot set holds the winner and every dataset tied with it. A sleeper's deficit never
// falls (it grows by w_i per step; the rounded expression is monotone too) and the line never
// rises between raises, so "deficit >= line" is false up to one step and true from then on: that
// wake step is estimated with one multiplication and confirmed with the exact expressions (the
// same floating-point operations as megatron's loop), and the dataset sleeps in a ring of
// per-step buckets (intrusive lists; a heap for rare far wakes) until then. Each step: move the
// step's bucket into the hot set, scan the hot set (SIMD, exact deficits, ties to the lowest
// index), emit the winner, and put it (its deficit just fell by one) back to sleep.
//
// The line must stay below the top deficit (else: a full scan that re-lays it, a "rebuild", the
// only O(L) step) but close to it (else the hot set grows). It falls by `slope` times the mean
// weight per step, and when the hot set outgrows its cap it is raised to the hot_target-th
// largest hot deficit: raising is always safe (sleepers then wake early, find themselves still
// below, and sleep again), while lowering would wake sleepers late, hence the rebuild.
//
// Cost per step at L = 1833, tau = 0.3 (measured, default tuning): ~22 hot deficits scanned,
// ~2.3 wakes and ~2.7 wake-step computations (the winner, early wakes after raises, evictions),
// a rebuild every ~3000 steps. The top deficit wanders by ~17/L over 100 steps and ~43/L over
// 1000, which is what forces the raises (each makes the current sleepers wake early once) and
// rebuilds; a tighter hot set means more of both.
template <typename IdxT>
class LineBlender {
 public:
  LineBlender(int L, int hot_target, double slope)
      : L_(L), k_target_(std::max(1, hot_target)), k_max_(2 * std::max(1, hot_target) + 4),
        slope_(slope), inv_ws_(L, 0.0), next_(L, -1), wake_(L, 0), where_(L, kNone), hB_(L + 8),
        hw_(L + 8), hc_(L + 8), hx_(L + 8), hi_(L + 8), slot_(L, 0), e_all_(L), he_(L + 4) {}

  void run_segment(const Segment &seg, const double *B, int64_t *count_phase, double *count_phase_d,
                   int64_t *count_global, IdxT *out_idx, int64_t *out_sample, int64_t out_offset,
                   BlendStats &stats) {
    stats_ = &stats;
    clear_all();
    seg_ = &seg;
    w_ = seg.w;
    B_ = B;
    c_ = count_phase_d;
    active_.clear();
    double wsum = 0.0;
    for (int i = 0; i < L_; ++i) {
      if (seg.w[i] > 0.0) {
        active_.push_back(i);
        wsum += seg.w[i];
      }
    }
    if (active_.empty()) return;  // the caller checked: no samples without a positive weight
    s_ = slope_ * wsum / static_cast<double>(active_.size());
    for (int i : active_) inv_ws_[i] = 1.0 / (seg.w[i] + s_);
    // A sleeper at most ~2 below the line reaches it within 2 / slope steps: size the ring so that
    // nearly all wakes land in it.
    const double reach = 4.0 / s_;
    int64_t ring = 1024;
    while (ring < reach && ring < (int64_t(1) << 20)) ring <<= 1;
    if (static_cast<int64_t>(head_.size()) != ring) head_.assign(ring, -1);
    mask_ = ring - 1;
    hot_n_ = 0;
    raise_at_ = k_max_;
    T0_ = 0.0;
    xend_ = static_cast<double>(seg.end - seg.start);

    for (int64_t s = seg.start; s < seg.end; ++s) {
      const double x = xval(s);
      double t = tau(x);
      drain(s, x, t);
      double m;
      int k = scan(x, m);
      if (k < 0 || !(m >= t)) {
        rebuild(s);
        k = scan(x, m);
      }
      const int best = hi_[k];
      out_idx[out_offset + s] = static_cast<IdxT>(best);
      out_sample[out_offset + s] = count_global[best];
      count_global[best] += 1;
      count_phase[best] += 1;
      c_[best] = static_cast<double>(count_phase[best]);
      remove_hot(k);
      if (s + 1 < seg.end) {
        sleep(best, s + 1);
        if (hot_n_ > raise_at_) raise(s + 1);
      }
    }
    clear_all();
  }

 private:
  enum : int8_t { kNone = 0, kHot = 1, kRing = 2, kFar = 3 };

  double xval(int64_t s) const {
    return static_cast<double>(std::max<int64_t>(s, 1)) - static_cast<double>(seg_->start);
  }
  double tau(double x) const { return T0_ - s_ * x; }
  double e_at(int i, double x) const { return deficit(B_[i], w_[i], x, c_[i]); }
  bool above(int i, int64_t s) const {
    const double x = xval(s);
    return e_at(i, x) >= tau(x);
  }

  // The hot slot with the largest deficit at x, the lowest dataset index among equal largest
  // deficits, or -1 when the hot set is empty. One pass, no branches on the data: four SIMD lanes
  // each keep the best (deficit, index) pair in that order (each lane rounds exactly like the
  // scalar expression; dataset indices ride along as exact doubles), then the lanes are merged.
  int scan(double x, double &m) {
    const int n = hot_n_;
    stats_->hot_scanned += n;
    if (n == 0) return -1;
    const double *hB = hB_.data(), *hw = hw_.data(), *hc = hc_.data(), *hx = hx_.data();
    int k = 0;
    double best = -std::numeric_limits<double>::infinity();
    double bi = std::numeric_limits<double>::infinity();
#if defined(__SSE2__)
    // Pad to a multiple of four with slots that never win (deficit -inf, index +inf).
    for (int j = n; j < n + 4; ++j) {
      hB_[j] = -std::numeric_limits<double>::infinity();
      hw_[j] = 0.0;
      hc_[j] = 0.0;
      hx_[j] = std::numeric_limits<double>::infinity();
    }
    const __m128d vx = _mm_set1_pd(x);
    __m128d a = _mm_set1_pd(best), b = a, ia = _mm_set1_pd(bi), ib = ia;
    // (d, i) beats (a, ia): a larger deficit, or an equal one with a lower index.
    auto beats = [](__m128d d, __m128d i, __m128d a, __m128d ia) {
      return _mm_or_pd(_mm_cmpgt_pd(d, a), _mm_and_pd(_mm_cmpeq_pd(d, a), _mm_cmplt_pd(i, ia)));
    };
    auto pick = [](__m128d g, __m128d u, __m128d v) {
      return _mm_or_pd(_mm_and_pd(g, u), _mm_andnot_pd(g, v));
    };
    for (; k < n; k += 4) {
      const __m128d d0 = _mm_sub_pd(
          _mm_add_pd(_mm_loadu_pd(hB + k), _mm_mul_pd(_mm_loadu_pd(hw + k), vx)),
          _mm_loadu_pd(hc + k));
      const __m128d d1 = _mm_sub_pd(
          _mm_add_pd(_mm_loadu_pd(hB + k + 2), _mm_mul_pd(_mm_loadu_pd(hw + k + 2), vx)),
          _mm_loadu_pd(hc + k + 2));
      const __m128d x0 = _mm_loadu_pd(hx + k), x1 = _mm_loadu_pd(hx + k + 2);
      const __m128d g0 = beats(d0, x0, a, ia), g1 = beats(d1, x1, b, ib);
      a = pick(g0, d0, a);
      ia = pick(g0, x0, ia);
      b = pick(g1, d1, b);
      ib = pick(g1, x1, ib);
    }
    const __m128d g = beats(b, ib, a, ia);
    a = pick(g, b, a);
    ia = pick(g, ib, ia);
    double v[2], s[2];
    _mm_storeu_pd(v, a);
    _mm_storeu_pd(s, ia);
    const bool take = (v[1] > v[0]) | ((v[1] == v[0]) & (s[1] < s[0]));
    best = take ? v[1] : v[0];
    bi = take ? s[1] : s[0];
#else
    for (; k < n; ++k) {
      const double e = deficit(hB[k], hw[k], x, hc[k]);
      const bool take = e > best || (e == best && hx[k] < bi);
      best = take ? e : best;
      bi = take ? hx[k] : bi;
    }
#endif
    m = best;
    return slot_[static_cast<int>(bi)];
  }

  void insert_hot(int i) {
    const int k = hot_n_++;
    hB_[k] = B_[i];
    hw_[k] = w_[i];
    hc_[k] = c_[i];
    hx_[k] = static_cast<double>(i);
    hi_[k] = i;
    slot_[i] = k;
    where_[i] = kHot;
  }
  void remove_hot(int k) {  // the last slot moves into k
    where_[hi_[k]] = kNone;
    const int last = --hot_n_;
    move_hot(last, k);
  }
  // Every per-slot array of the hot set moves together (one place to extend when one is added).
  void move_hot(int from, int to) {
    hB_[to] = hB_[from];
    hw_[to] = hw_[from];
    hc_[to] = hc_[from];
    hx_[to] = hx_[from];
    hi_[to] = hi_[from];
    slot_[hi_[to]] = to;
  }

  // Put dataset i (below the line at step lo - 1, or not hot) to sleep until the first step
  // t >= lo at which its deficit is at or above the line; not at all if that is past the segment.
  void sleep(int i, int64_t lo) {
    ++stats_->sleeps;
    // Steps t >= lo >= 1 have x = t - start (the max(s, 1) quirk only touches step 0), so the walk
    // runs on x directly; every x here is an integer held exactly in a double.
    const double xlo = static_cast<double>(lo - seg_->start);
    const double xend = xend_;
    const double b = B_[i], w = w_[i], c = c_[i];
    // Deficit at or above the line: the same expressions as deficit() and tau().
    auto above_x = [&](double x) { return (b + w * x) - c >= T0_ - s_ * x; };
    // The real-valued solution of b + w x - c = T0 - slope x, rounded up into [xlo, xend];
    // exactness comes from the walk.
    double xu = (c - b + T0_) * inv_ws_[i];
    if (!(xu > xlo)) {
      xu = xlo;
    } else if (!(xu < xend)) {
      xu = xend;
    } else {
      const double f = static_cast<double>(static_cast<int64_t>(xu));
      xu = f < xu ? f + 1.0 : f;
    }
    while (xu > xlo && above_x(xu - 1.0)) xu -= 1.0;
    while (xu < xend && !above_x(xu)) xu += 1.0;
    if (!(xu < xend)) {
      where_[i] = kNone;
      return;
    }
    const int64_t t = seg_->start + static_cast<int64_t>(xu);
    wake_[i] = t;
    if (t - lo < mask_) {  // lo - 1 is the current step: t is less than a ring turn ahead
      int32_t &head = head_[t & mask_];
      next_[i] = head;
      head = i;
      where_[i] = kRing;
    } else {
      far_.push(std::make_pair(t, i));
      where_[i] = kFar;
    }
  }

  void wake(int i, int64_t s, double x, double t) {
    ++stats_->wakes;
    if (e_at(i, x) >= t) {
      insert_hot(i);
    } else {
      sleep(i, s + 1);  // woken early: the line was raised since it fell asleep
    }
  }

  void drain(int64_t s, double x, double t) {
    int32_t &head = head_[s & mask_];
    int i = head;
    head = -1;
    while (i >= 0) {
      const int nxt = next_[i];
      wake(i, s, x, t);
      i = nxt;
    }
    while (!far_.empty() && far_.top().first <= s) {
      const int j = far_.top().second;
      far_.pop();
      wake(j, s, x, t);
    }
  }

  // Lay T0 so that the line at x is the largest double <= v (v itself when representable so).
  void lay_line(double v, double x) {
    T0_ = v + s_ * x;
    while (tau(x) > v) T0_ = std::nextafter(T0_, -std::numeric_limits<double>::infinity());
  }

  // Full scan at step s: the line through the hot_target-th largest deficit; everything at or
  // above it is hot, the rest sleeps with fresh wake steps.
  void rebuild(int64_t s) {
    ++stats_->rebuilds;
    clear_all();
    const double x = xval(s);
    const size_t n = active_.size();
    for (size_t j = 0; j < n; ++j) e_all_[j] = e_at(active_[j], x);
    const size_t k = std::min<size_t>(static_cast<size_t>(k_target_), n);
    tmp_.assign(e_all_.begin(), e_all_.begin() + n);
    std::nth_element(tmp_.begin(), tmp_.begin() + (k - 1), tmp_.end(), std::greater<double>());
    lay_line(tmp_[k - 1], x);
    const double t = tau(x);
    for (size_t j = 0; j < n; ++j) {
      const int i = active_[j];
      if (e_all_[j] >= t) {
        insert_hot(i);
      } else {
        sleep(i, s + 1);
      }
    }
    raise_at_ = std::max(k_max_, hot_n_ + k_target_);
  }

  // The hot set outgrew its cap: raise the line (never lower it) to the hot_target-th largest hot
  // deficit at step s and put the hot datasets below it to sleep.
  void raise(int64_t s) {
    ++stats_->raises;
    const double x = xval(s);
    const int n = hot_n_;
    tmp_.resize(n);
    for (int k = 0; k < n; ++k) he_[k] = tmp_[k] = deficit(hB_[k], hw_[k], x, hc_[k]);
    const int k = std::min(k_target_, n);
    std::nth_element(tmp_.begin(), tmp_.begin() + (k - 1), tmp_.end(), std::greater<double>());
    const double old = T0_;
    lay_line(tmp_[k - 1], x);
    if (T0_ < old) T0_ = old;
    const double t = tau(x);
    int kept = 0;
    for (int j = 0; j < n; ++j) {
      if (he_[j] >= t) {
        move_hot(j, kept);
        ++kept;
      } else {
        sleep(hi_[j], s);
      }
    }
    hot_n_ = kept;
    // Ties can keep the hot set above its cap; do not retry before it grows again.
    raise_at_ = std::max(k_max_, hot_n_ + k_target_);
  }

  // Empty the hot set and the calendar (ring buckets are cleared through their sleepers).
  void clear_all() {
    for (int i = 0; i < L_; ++i) {
      if (where_[i] == kRing) head_[wake_[i] & mask_] = -1;
      where_[i] = kNone;
    }
    far_ = decltype(far_)();
    hot_n_ = 0;
  }

  int L_;
  int k_target_, k_max_;
  double slope_;
  const Segment *seg_ = nullptr;
  const double *w_ = nullptr;
  const double *B_ = nullptr;
  double *c_ = nullptr;
  BlendStats *stats_ = nullptr;
  double s_ = 0.0;   // the line's fall per step
  double T0_ = 0.0;  // the line at x = 0
  double xend_ = 0.0;  // x of the segment's end
  int raise_at_ = 0;
  std::vector<int> active_;
  std::vector<double> inv_ws_;  // 1 / (w_i + s_)
  std::vector<int32_t> head_;   // ring of per-step buckets: first sleeper, or -1
  int64_t mask_ = 0;
  std::vector<int32_t> next_;   // next sleeper in the same bucket
  std::vector<int64_t> wake_;   // the step a sleeper wakes at
  std::vector<int8_t> where_;   // kNone / kHot / kRing / kFar
  std::vector<double> hB_, hw_, hc_;  // the hot set (unordered): B, w, count, ...
  std::vector<double> hx_;            // ... dataset index as a double (for the SIMD tie rule) ...
  std::vector<int32_t> hi_;           // ... and as an int
  std::vector<int32_t> slot_;         // slot of a hot dataset
  int hot_n_ = 0;
  std::vector<double> e_all_, tmp_, he_;
  std::priority_queue<std::pair<int64_t, int>, std::vector<std::pair<int64_t, int>>,
                      std::greater<std::pair<int64_t, int>>>
      far_;
};

// weights: [M, L] float64, one row per segment; seg_sizes: [M] int64 (samples per segment);
// seg_phase: [M] int64, non-decreasing: segments of one phase are consecutive, and every phase
// starts its deficits afresh (its targets count from its own first sample), while
// dataset_sample_index keeps counting across phases (each dataset is read on, never restarted).
template <typename IdxT>
py::tuple blend_impl(const double *W, const int64_t *seg_sizes, const int64_t *seg_phase, int M,
                     int L, const std::string &algorithm, int hot_target, int fast_min_datasets,
                     double slope) {
  int64_t N = 0;
  for (int m = 0; m < M; ++m) N += seg_sizes[m];
  py::array_t<IdxT> dataset_index(N);
  py::array_t<int64_t> dataset_sample_index(N);
  int num_phases = M == 0 ? 0 : static_cast<int>(seg_phase[M - 1] - seg_phase[0] + 1);
  py::array_t<int64_t> counts({static_cast<py::ssize_t>(std::max(num_phases, 0)),
                               static_cast<py::ssize_t>(L)});
  IdxT *out_idx = dataset_index.mutable_data();
  int64_t *out_sample = dataset_sample_index.mutable_data();
  int64_t *counts_out = counts.mutable_data();
  std::fill(counts_out, counts_out + static_cast<int64_t>(num_phases) * L, 0);
  BlendStats stats;
  {
    py::gil_scoped_release release;
    std::vector<int64_t> count_global(L, 0), count_phase(L, 0);
    std::vector<double> count_phase_d(L, 0.0), B(L, 0.0);
    LineBlender<IdxT> fast(L, hot_target, slope);
    int64_t phase_offset = 0;  // global position of the current phase's first sample
    int m = 0;
    int phase_no = 0;
    while (m < M) {
      const int64_t phase = seg_phase[m];
      std::fill(count_phase.begin(), count_phase.end(), 0);
      std::fill(count_phase_d.begin(), count_phase_d.end(), 0.0);
      std::fill(B.begin(), B.end(), 0.0);
      int64_t local = 0;
      for (; m < M && seg_phase[m] == phase; ++m) {
        Segment seg{W + static_cast<int64_t>(m) * L, local, local + seg_sizes[m]};
        if (seg.end > seg.start) {
          // Below ~64 datasets megatron's plain loop is already as fast as the threshold machinery.
          if (algorithm == "scan" || L < fast_min_datasets) {
            blend_segment_scan<IdxT>(seg, L, B.data(), count_phase.data(), count_phase_d.data(),
                                     count_global.data(), out_idx, out_sample, phase_offset);
          } else {
            fast.run_segment(seg, B.data(), count_phase.data(), count_phase_d.data(),
                             count_global.data(), out_idx, out_sample, phase_offset, stats);
          }
        }
        // Carry the target to the next segment: the same expression at this segment's end.
        const double x = static_cast<double>(seg.end) - static_cast<double>(seg.start);
        for (int i = 0; i < L; ++i) B[i] = B[i] + seg.w[i] * x;
        local = seg.end;
      }
      std::copy(count_phase.begin(), count_phase.end(),
                counts_out + static_cast<int64_t>(phase_no) * L);
      phase_offset += local;
      ++phase_no;
    }
  }
  py::dict info;
  info["rebuilds"] = stats.rebuilds;
  info["hot_scanned"] = stats.hot_scanned;
  info["wakes"] = stats.wakes;
  info["raises"] = stats.raises;
  info["sleeps"] = stats.sleeps;
  return py::make_tuple(dataset_index, dataset_sample_index, counts, info);
}

py::tuple build_blending_indices(const py::object &weights_obj, const py::object &sizes_obj,
                                 const py::object &phase_obj, const std::string &algorithm,
                                 int hot_target, int fast_min_datasets, double slope) {
  auto weights = require<double>(weights_obj, "weights", 2);
  auto sizes = require<int64_t>(sizes_obj, "segment_sizes", 1);
  auto phases = require<int64_t>(phase_obj, "segment_phase", 1);
  const py::ssize_t M = weights.shape(0), L = weights.shape(1);
  if (sizes.shape(0) != M || phases.shape(0) != M) {
    throw py::value_error("segment_sizes and segment_phase must have one entry per weights row (" +
                          std::to_string(M) + ")");
  }
  if (L < 1) throw py::value_error("weights must have at least one dataset column");
  if (L > std::numeric_limits<int32_t>::max()) throw py::value_error("too many datasets");
  if (algorithm != "fast" && algorithm != "scan") {
    throw py::value_error("algorithm must be 'fast' or 'scan', got '" + algorithm + "'");
  }
  if (!(slope > 0.0) || !std::isfinite(slope)) {
    throw py::value_error("slope must be a finite number > 0 (the threshold's fall per step, in "
                          "mean weights), got " + std::to_string(slope));
  }
  const double *W = weights.data();
  const int64_t *S = sizes.data();
  const int64_t *P = phases.data();
  for (py::ssize_t m = 0; m < M; ++m) {
    if (S[m] < 0) throw py::value_error("segment_sizes must be >= 0");
    if (m > 0 && P[m] < P[m - 1]) throw py::value_error("segment_phase must be non-decreasing");
    if (m > 0 && P[m] > P[m - 1] + 1) throw py::value_error("segment_phase must not skip phases");
    bool any = false;
    for (py::ssize_t i = 0; i < L; ++i) {
      const double w = W[m * L + i];
      if (!std::isfinite(w) || w < 0.0) {
        throw py::value_error("weights must be finite and >= 0 (segment " + std::to_string(m) +
                              ", dataset " + std::to_string(i) + ")");
      }
      any = any || w > 0.0;
    }
    if (S[m] > 0 && !any) {
      throw py::value_error("segment " + std::to_string(m) + " has samples but no dataset with a "
                            "positive weight");
    }
  }
  if (L <= std::numeric_limits<int16_t>::max()) {
    return blend_impl<int16_t>(W, S, P, static_cast<int>(M), static_cast<int>(L), algorithm,
                               hot_target, fast_min_datasets, slope);
  }
  return blend_impl<int32_t>(W, S, P, static_cast<int>(M), static_cast<int>(L), algorithm,
                             hot_target, fast_min_datasets, slope);
}

// ------------------------------------------------------------------------------------------------
// PCG64 (numpy's pcg64.h: 128-bit LCG, XSL-RR output, step then output) and numpy's
// Generator.permutation (Fisher-Yates from the end, masked rejection sampling).
// ------------------------------------------------------------------------------------------------

typedef unsigned __int128 u128;

struct Pcg64 {
  u128 state;
  u128 inc;
  bool has_uint32 = false;
  uint32_t uinteger = 0;

  static u128 multiplier() {
    return (static_cast<u128>(2549297995355413924ULL) << 64) | 4865540595714422341ULL;
  }
  uint64_t next64() {
    state = state * multiplier() + inc;
    const uint64_t x = static_cast<uint64_t>(state >> 64) ^ static_cast<uint64_t>(state);
    const unsigned rot = static_cast<unsigned>(state >> 122);
    return (x >> rot) | (x << ((-rot) & 63u));
  }
  uint32_t next32() {
    if (has_uint32) {
      has_uint32 = false;
      return uinteger;
    }
    const uint64_t n = next64();
    has_uint32 = true;
    uinteger = static_cast<uint32_t>(n >> 32);
    return static_cast<uint32_t>(n & 0xffffffffULL);
  }
  // numpy's random_interval(max): a uniform integer in [0, max] by masked rejection sampling
  // (what Generator.shuffle / permutation use).
  uint64_t interval(uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    uint64_t value;
    if (max <= 0xffffffffULL) {
      while ((value = (next32() & mask)) > max) {
      }
    } else {
      while ((value = (next64() & mask)) > max) {
      }
    }
    return value;
  }
};

inline uint64_t splitmix64(uint64_t &x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The generator for (seed, stream, epoch): state and increment from splitmix64 over the three
// words (increment forced odd, as PCG requires). Documented so any implementation can reproduce it.
Pcg64 seeded_pcg64(uint64_t seed, uint64_t stream, uint64_t epoch) {
  uint64_t x = seed;
  uint64_t a = splitmix64(x);
  x ^= stream * 0xd1b54a32d192ed03ULL;
  uint64_t b = splitmix64(x);
  x ^= epoch * 0x8cb92ba72f3d8dd7ULL;
  uint64_t c = splitmix64(x);
  uint64_t d = splitmix64(x);
  Pcg64 g;
  g.state = (static_cast<u128>(a) << 64) | b;
  g.inc = ((static_cast<u128>(c) << 64) | d) | 1;
  return g;
}

template <typename T>
void permute_into(Pcg64 &g, T *out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(i);
  for (int64_t i = n - 1; i >= 1; --i) {
    const int64_t j = static_cast<int64_t>(g.interval(static_cast<uint64_t>(i)));
    std::swap(out[i], out[j]);
  }
}

py::tuple pcg64_state(uint64_t seed, uint64_t stream, uint64_t epoch) {
  Pcg64 g = seeded_pcg64(seed, stream, epoch);
  auto to_int = [](u128 v) {
    py::int_ hi(static_cast<uint64_t>(v >> 64)), lo(static_cast<uint64_t>(v));
    return py::int_(hi.attr("__lshift__")(64).attr("__or__")(lo));
  };
  return py::make_tuple(to_int(g.state), to_int(g.inc));
}

py::array_t<int64_t> pcg64_random_raw(uint64_t seed, uint64_t stream, uint64_t epoch, int64_t n) {
  Pcg64 g = seeded_pcg64(seed, stream, epoch);
  py::array_t<int64_t> out(n);
  auto *p = reinterpret_cast<uint64_t *>(out.mutable_data());
  for (int64_t i = 0; i < n; ++i) p[i] = g.next64();
  return out;
}

py::array_t<int64_t> permutation(int64_t n, uint64_t seed, uint64_t stream, uint64_t epoch) {
  if (n < 0) throw py::value_error("permutation size must be >= 0");
  py::array_t<int64_t> out(n);
  int64_t *p = out.mutable_data();
  {
    py::gil_scoped_release release;
    Pcg64 g = seeded_pcg64(seed, stream, epoch);
    permute_into(g, p, n);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Packing
// ------------------------------------------------------------------------------------------------

// Rows [start_token, start_token + num_rows * seq_len) of the endless token stream of one language:
// epoch e is the documents in the order permutation(D, seed, stream, e), epochs back to back.
// Returns (doc_index int32 [epochs * D]: the concatenated permutations of the epochs touched,
// sample_idx int64 [num_rows + 1, 2]: (position in doc_index, token offset) where each row starts;
// row r spans sample_idx[r] .. sample_idx[r + 1], megatron GPT convention, first_epoch).
py::tuple pack_rows(const py::object &sizes_obj, int64_t seq_len, int64_t num_rows,
                    int64_t start_token, uint64_t seed, uint64_t stream) {
  auto sizes_arr = require<int32_t>(sizes_obj, "sizes", 1);
  const int64_t D = sizes_arr.shape(0);
  const int32_t *sizes = sizes_arr.data();
  if (seq_len < 1) throw py::value_error("seq_len must be >= 1");
  if (num_rows < 0 || start_token < 0) throw py::value_error("num_rows and start_token must be >= 0");
  if (D > std::numeric_limits<int32_t>::max()) throw py::value_error("too many documents for int32");
  int64_t tpe = 0;
  for (int64_t d = 0; d < D; ++d) {
    if (sizes[d] < 0) throw py::value_error("sizes must be >= 0");
    tpe += sizes[d];
  }
  if (num_rows > 0 && tpe <= 0) {
    throw py::value_error("cannot pack rows from a dataset with no tokens");
  }
  const int64_t end_token = start_token + num_rows * seq_len;
  const int64_t first_epoch = tpe > 0 ? start_token / tpe : 0;
  const int64_t last_epoch = (num_rows > 0) ? (end_token - 1) / tpe : first_epoch;
  const int64_t n_epochs = num_rows > 0 ? last_epoch - first_epoch + 1 : 0;
  py::array_t<int32_t> doc_index(n_epochs * D);
  py::array_t<int64_t> sample_idx({static_cast<py::ssize_t>(num_rows + 1), static_cast<py::ssize_t>(2)});
  int32_t *di = doc_index.mutable_data();
  int64_t *si = sample_idx.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t e = 0; e < n_epochs; ++e) {
      Pcg64 g = seeded_pcg64(seed, stream, static_cast<uint64_t>(first_epoch + e));
      permute_into(g, di + e * D, D);
    }
    // Find the start: skip whole documents of the first epoch before start_token.
    int64_t pos = 0, off = 0;
    if (num_rows > 0) {
      int64_t skip = start_token - first_epoch * tpe;
      while (skip > 0) {
        const int64_t len = sizes[di[pos]];
        if (skip < len) {
          off = skip;
          skip = 0;
        } else {
          skip -= len;
          ++pos;
        }
      }
    }
    si[0] = pos;
    si[1] = off;
    const int64_t n_pos = n_epochs * D;
    for (int64_t r = 1; r <= num_rows; ++r) {
      // megatron-core build_sample_idx's walk with add_extra_token_to_sequence = 0: a row that ends
      // exactly at a document's end is recorded as (that document, its length).
      int64_t remaining = seq_len;
      while (remaining != 0) {
        const int64_t len = sizes[di[pos]] - off;
        remaining -= len;
        if (remaining <= 0) {
          off += remaining + len;
          remaining = 0;
        } else {
          ++pos;
          off = 0;
          if (pos >= n_pos) throw std::logic_error("pack_rows ran past its epochs (bug)");
        }
      }
      si[2 * r] = pos;
      si[2 * r + 1] = off;
    }
  }
  return py::make_tuple(doc_index, sample_idx, first_epoch);
}

}  // namespace

PYBIND11_MODULE(_index_builder, m) {
  m.doc() = "Blended and packed sample indices for megatron-mmbert (see csrc/index_builder.cpp).";
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"),
        py::arg("segment_sizes"), py::arg("segment_phase"), py::arg("algorithm") = "fast",
        py::arg("hot_target") = 16, py::arg("fast_min_datasets") = 64, py::arg("slope") = 0.05,
        "Greedy largest-deficit interleave over a schedule of segments.\n\n"
        "weights float64 [M, L]; segment_sizes int64 [M]; segment_phase int64 [M] (non-decreasing).\n"
        "Returns (dataset_index int16 (int32 when L > 32767) [N], dataset_sample_index int64 [N],\n"
        "counts int64 [phases, L], stats dict). algorithm='scan' is the O(N x L) reference;\n"
        "'fast' (same output) falls back to it below fast_min_datasets datasets. Tuning of 'fast'\n"
        "(speed only, never the output): hot_target, the hot set kept after a raise or rescan (it\n"
        "is raised past 2 * hot_target + 4); slope, the threshold's fall per step in mean weights.");
  m.def("permutation", &permutation, py::arg("n"), py::arg("seed"), py::arg("stream"),
        py::arg("epoch"),
        "numpy Generator(PCG64).permutation(n) for the generator seeded by (seed, stream, epoch).");
  m.def("pcg64_state", &pcg64_state, py::arg("seed"), py::arg("stream"), py::arg("epoch"),
        "(state, inc) of the PCG64 generator for (seed, stream, epoch), as numpy's PCG64 state.");
  m.def("pcg64_random_raw", &pcg64_random_raw, py::arg("seed"), py::arg("stream"),
        py::arg("epoch"), py::arg("n"), "The first n raw 64-bit outputs (as int64 bit patterns).");
  m.def("pack_rows", &pack_rows, py::arg("sizes"), py::arg("seq_len"), py::arg("num_rows"),
        py::arg("start_token"), py::arg("seed"), py::arg("stream"),
        "Packed rows of one language: (doc_index int32, sample_idx int64 [rows+1, 2], first_epoch).");
}
