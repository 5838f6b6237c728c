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
  int64_t rebuilds = 0;      // full scans (fallbacks + segment starts)
  int64_t hot_scanned = 0;   // deficits evaluated on the fast path
  int64_t wakes = 0;         // sleepers woken by the calendar
};

// Reference implementation: a full scan of all active datasets at every step (megatron's loop).
template <typename IdxT>
void blend_segment_scan(const Segment &seg, int L, const double *B, int64_t *count_phase,
                        double *count_phase_d, int64_t *count_global, IdxT *out_idx,
                        int64_t *out_sample, int64_t out_offset) {
  for (int64_t s = seg.start; s < seg.end; ++s) {
    const double x = static_cast<double>(std::max<int64_t>(s, 1)) - static_cast<double>(seg.start);
    int best = -1;
    double best_e = 0.0;
    for (int i = 0; i < L; ++i) {
      if (!(seg.w[i] > 0.0)) continue;
      double e = deficit(B[i], seg.w[i], x, count_phase_d[i]);
      if (best < 0 || e > best_e) {
        best = i;
        best_e = e;
      }
    }
    out_idx[out_offset + s] = static_cast<IdxT>(best);
    out_sample[out_offset + s] = count_global[best];
    count_global[best] += 1;
    count_phase[best] += 1;
    count_phase_d[best] = static_cast<double>(count_phase[best]);
  }
}

// Exact fast path. Idea: the winner at step s has the largest deficit. A dataset whose deficit is
// below a threshold tau cannot win while some dataset is at or above tau. Non-chosen datasets'
// deficits only grow (by w_i per step, and monotonically also in floating point), so a dataset
// below tau sleeps until the first step at which its deficit reaches tau; that step is computed
// exactly (estimate, then walk with the same expression) and kept in a calendar (a ring of buckets
// for near steps, a heap for far ones). Only the "hot" datasets (at or above tau when woken) are
// scanned, from contiguous arrays. If no hot dataset is at or above tau, the step falls back to a
// full scan that lowers tau (rebuild); if the hot set grows, tau is raised (always safe: sleepers
// then wake early and go back to sleep). Ties go to the lowest index among the hot datasets, and a
// sleeper is strictly below tau <= the winner's deficit, so the result equals the full scan's.
template <typename IdxT>
class FastBlender {
 public:
  FastBlender(int L, int hot_target)
      : L_(L), hot_target_(std::max(1, hot_target)), version_(L, 0), inv_w_(L, 0.0), e_all_(L),
        ring_(kRing) {}

  void run_segment(const Segment &seg, const double *B, int64_t *count_phase, double *count_phase_d,
                   int64_t *count_global, IdxT *out_idx, int64_t *out_sample, int64_t out_offset,
                   BlendStats &stats) {
    seg_ = &seg;
    B_ = B;
    c_ = count_phase_d;
    active_.clear();
    for (int i = 0; i < L_; ++i) {
      if (seg.w[i] > 0.0) {
        active_.push_back(i);
        inv_w_[i] = 1.0 / seg.w[i];
      }
    }
    far_ = decltype(far_)();
    for (auto &b : ring_) b.clear();
    rebuild(seg.start, stats);
    for (int64_t s = seg.start; s < seg.end; ++s) {
      const double x = xval(s);
      drain(s, x, stats);
      int k = scan(x, stats);
      if (k < 0) {
        rebuild(s, stats);
        k = scan(x, stats);
      }
      const int best = hi_[k];
      out_idx[out_offset + s] = static_cast<IdxT>(best);
      out_sample[out_offset + s] = count_global[best];
      count_global[best] += 1;
      count_phase[best] += 1;
      c_[best] = static_cast<double>(count_phase[best]);
      hc_[k] = c_[best];
      // The winner's deficit just fell by one: unless it is still at or above tau at the next
      // step, it leaves the hot set. Everyone else's deficit only grows.
      if (s + 1 < seg.end && e_at(best, xval(s + 1)) < tau_) {
        remove_hot(k);
        sleep(best, s + 1);
      }
      if (static_cast<int>(hi_.size()) > 2 * hot_target_) raise_tau(s + 1);
    }
  }

 private:
  static constexpr int64_t kRing = 4096;  // calendar buckets for near wake-ups (power of two)

  struct Entry {
    int64_t t;
    int32_t i;
    uint32_t v;
    bool operator>(const Entry &o) const { return t > o.t; }
  };

  double xval(int64_t s) const {
    return static_cast<double>(std::max<int64_t>(s, 1)) - static_cast<double>(seg_->start);
  }
  double e_at(int i, double x) const { return deficit(B_[i], seg_->w[i], x, c_[i]); }

  void add_hot(int i) {
    hi_.push_back(i);
    hB_.push_back(B_[i]);
    hw_.push_back(seg_->w[i]);
    hc_.push_back(c_[i]);
  }
  void remove_hot(size_t k) {
    const size_t last = hi_.size() - 1;
    hi_[k] = hi_[last];
    hB_[k] = hB_[last];
    hw_[k] = hw_[last];
    hc_[k] = hc_[last];
    hi_.pop_back();
    hB_.pop_back();
    hw_.pop_back();
    hc_.pop_back();
  }

  // The hot slot holding the largest deficit at x (lowest dataset index on ties) if that deficit
  // is at or above tau, else -1.
  int scan(double x, BlendStats &stats) {
    const size_t n = hi_.size();
    stats.hot_scanned += n;
    if (n == 0) return -1;
    const double *hB = hB_.data(), *hw = hw_.data(), *hc = hc_.data();
    const int *hi = hi_.data();
    size_t k = 0;
    double m;
    // Pass 1: the largest deficit. Pass 2: the lowest dataset index holding it. The deficits are
    // recomputed rather than stored (cheaper than a store/reload round trip); each SIMD lane
    // rounds exactly like the scalar expression.
#if defined(__SSE2__)
    const __m128d vx = _mm_set1_pd(x);
    auto dv = [&](size_t j) {
      return _mm_sub_pd(_mm_add_pd(_mm_loadu_pd(hB + j), _mm_mul_pd(_mm_loadu_pd(hw + j), vx)),
                        _mm_loadu_pd(hc + j));
    };
    if (n >= 4) {
      __m128d a = dv(0), b = dv(2);
      for (k = 4; k + 4 <= n; k += 4) {
        a = _mm_max_pd(a, dv(k));
        b = _mm_max_pd(b, dv(k + 2));
      }
      a = _mm_max_pd(a, b);
      double lanes[2];
      _mm_storeu_pd(lanes, a);
      m = lanes[0] > lanes[1] ? lanes[0] : lanes[1];
    } else {
      m = deficit(hB[0], hw[0], x, hc[0]);
      k = 1;
    }
    for (; k < n; ++k) {
      const double e = deficit(hB[k], hw[k], x, hc[k]);
      m = e > m ? e : m;
    }
    if (!(m >= tau_)) return -1;
    int best = -1;
    int best_i = std::numeric_limits<int>::max();
    const __m128d vm = _mm_set1_pd(m);
    for (k = 0; k + 2 <= n; k += 2) {
      const int mask = _mm_movemask_pd(_mm_cmpeq_pd(dv(k), vm));
      if (mask) {
        if ((mask & 1) && hi[k] < best_i) best_i = hi[k], best = static_cast<int>(k);
        if ((mask & 2) && hi[k + 1] < best_i) best_i = hi[k + 1], best = static_cast<int>(k + 1);
      }
    }
    if (k < n && deficit(hB[k], hw[k], x, hc[k]) == m && hi[k] < best_i) {
      best_i = hi[k];
      best = static_cast<int>(k);
    }
    return best;
#else
    m = deficit(hB[0], hw[0], x, hc[0]);
    for (k = 1; k < n; ++k) {
      const double e = deficit(hB[k], hw[k], x, hc[k]);
      m = e > m ? e : m;
    }
    if (!(m >= tau_)) return -1;
    int best = -1;
    int best_i = std::numeric_limits<int>::max();
    for (k = 0; k < n; ++k) {
      if (deficit(hB[k], hw[k], x, hc[k]) == m && hi[k] < best_i) {
        best_i = hi[k];
        best = static_cast<int>(k);
      }
    }
    return best;
#endif
  }

  // Full scan at step s: tau becomes the hot_target-th largest deficit; everything at or above it
  // is hot, the rest sleeps with fresh wake-up steps (older calendar entries are invalidated).
  void rebuild(int64_t s, BlendStats &stats) {
    ++stats.rebuilds;
    const double x = xval(s);
    const size_t n = active_.size();
    for (size_t j = 0; j < n; ++j) e_all_[j] = e_at(active_[j], x);
    const size_t k = std::min<size_t>(static_cast<size_t>(hot_target_), n);
    tmp_.assign(e_all_.begin(), e_all_.begin() + n);
    std::nth_element(tmp_.begin(), tmp_.begin() + (k - 1), tmp_.end(), std::greater<double>());
    tau_ = tmp_[k - 1];
    hi_.clear();
    hB_.clear();
    hw_.clear();
    hc_.clear();
    for (size_t j = 0; j < n; ++j) {
      const int i = active_[j];
      ++version_[i];
      if (e_all_[j] >= tau_) {
        add_hot(i);
      } else {
        sleep_below(i, s);
      }
    }
  }

  // The hot set grew: raise tau to its hot_target-th largest deficit at step s and put the members
  // below it to sleep.
  void raise_tau(int64_t s) {
    const double x = xval(s);
    const size_t n = hi_.size();
    he_.resize(n);
    for (size_t k = 0; k < n; ++k) he_[k] = deficit(hB_[k], hw_[k], x, hc_[k]);
    tmp_.assign(he_.begin(), he_.begin() + n);
    const size_t k = static_cast<size_t>(hot_target_);
    std::nth_element(tmp_.begin(), tmp_.begin() + (k - 1), tmp_.end(), std::greater<double>());
    tau_ = std::max(tau_, tmp_[k - 1]);
    for (size_t j = n; j-- > 0;) {
      if (he_[j] < tau_) {
        const int i = hi_[j];
        remove_hot(j);
        he_[j] = he_[hi_.size()];
        sleep(i, s);
      }
    }
  }

  // Dataset i, below tau at step s, sleeps until the first step whose deficit reaches tau.
  void sleep(int i, int64_t s) {
    ++version_[i];
    sleep_below(i, s);
  }
  void sleep_below(int i, int64_t s) {
    const int64_t t = wake_step(i, s);
    if (t >= seg_->end) return;  // not before the segment ends: the next segment rebuilds
    const Entry en{t, i, version_[i]};
    if (t - s < kRing) {
      ring_[t & (kRing - 1)].push_back(en);
    } else {
      far_.push(en);
    }
  }

  // First step t > s with deficit(t) >= tau (or the segment end). The deficit is monotone in t.
  int64_t wake_step(int i, int64_t s) const {
    const double w = seg_->w[i];
    const int64_t lo = s + 1, end = seg_->end;
    const double start = static_cast<double>(seg_->start);
    const double need = (tau_ + c_[i] - B_[i]) * inv_w_[i];  // x where the deficit reaches tau
    if (!(need < 9.0e18)) return end;
    int64_t up = need > 0.0 ? static_cast<int64_t>(need) : 0;  // ceil without a libm call
    if (static_cast<double>(up) < need) ++up;
    int64_t t = seg_->start + up;
    if (t < lo) t = lo;
    if (t > end) t = end;
    auto e = [&](int64_t tt) { return deficit(B_[i], w, static_cast<double>(tt) - start, c_[i]); };
    while (t > lo && e(t - 1) >= tau_) --t;
    while (t < end && e(t) < tau_) ++t;
    return t;
  }

  // Wake the datasets whose step has come: hot if at or above tau at x, else back to sleep.
  void drain(int64_t s, double x, BlendStats &stats) {
    auto &bucket = ring_[s & (kRing - 1)];
    for (const Entry &en : bucket) {
      if (en.v == version_[en.i] && en.t == s) wake(en.i, s, x, stats);
    }
    bucket.clear();
    while (!far_.empty() && far_.top().t <= s) {
      const Entry en = far_.top();
      far_.pop();
      if (en.v == version_[en.i]) wake(en.i, s, x, stats);
    }
  }

  void wake(int i, int64_t s, double x, BlendStats &stats) {
    ++version_[i];
    ++stats.wakes;
    if (e_at(i, x) >= tau_) {
      add_hot(i);
    } else {
      sleep_below(i, s);  // woken early (tau was raised since it fell asleep)
    }
  }

  int L_;
  int hot_target_;
  const Segment *seg_ = nullptr;
  const double *B_ = nullptr;
  double *c_ = nullptr;
  double tau_ = 0.0;
  std::vector<int> active_;
  std::vector<int> hi_;                    // hot datasets ...
  std::vector<double> hB_, hw_, hc_, he_;  // ... and their B, w, count, deficit (contiguous)
  std::vector<uint32_t> version_;
  std::vector<double> inv_w_;
  std::vector<double> e_all_, tmp_;
  std::vector<std::vector<Entry>> ring_;
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> far_;
};

// weights: [M, L] float64, one row per segment; seg_sizes: [M] int64 (samples per segment);
// seg_phase: [M] int64, non-decreasing: segments of one phase are consecutive, and every phase
// starts its deficits afresh (its targets count from its own first sample), while
// dataset_sample_index keeps counting across phases (each dataset is read on, never restarted).
template <typename IdxT>
py::tuple blend_impl(const double *W, const int64_t *seg_sizes, const int64_t *seg_phase, int M,
                     int L, const std::string &algorithm, int hot_target, int fast_min_datasets) {
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
    FastBlender<IdxT> fast(L, hot_target);
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
          // Below ~128 datasets megatron's plain loop is already as fast as the hot-set machinery.
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
  return py::make_tuple(dataset_index, dataset_sample_index, counts, info);
}

py::tuple build_blending_indices(const py::object &weights_obj, const py::object &sizes_obj,
                                 const py::object &phase_obj, const std::string &algorithm,
                                 int hot_target, int fast_min_datasets) {
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
                               hot_target, fast_min_datasets);
  }
  return blend_impl<int32_t>(W, S, P, static_cast<int>(M), static_cast<int>(L), algorithm,
                             hot_target, fast_min_datasets);
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
        py::arg("hot_target") = 32, py::arg("fast_min_datasets") = 128,
        "Greedy largest-deficit interleave over a schedule of segments.\n\n"
        "weights float64 [M, L]; segment_sizes int64 [M]; segment_phase int64 [M] (non-decreasing).\n"
        "Returns (dataset_index int16 (int32 when L > 32767) [N], dataset_sample_index int64 [N],\n"
        "counts int64 [phases, L], stats dict). algorithm='scan' is the O(N x L) reference;\n"
        "'fast' (same output) falls back to it below fast_min_datasets datasets.");
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
