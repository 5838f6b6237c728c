// Blended and packed sample indices for megatron-mmbert (pybind11 module
// megatron_mmbert.data._index_builder).
//
// 1. build_blending_indices: the greedy largest-deficit interleave of megatron-core's
//    helpers_cpp.build_blending_indices, generalised to a schedule of phases, each cut into
//    segments of fixed weights (piecewise-constant annealing). For one phase of one segment with
//    positive weights the output is bit-identical to megatron-core's; the fast path (blending.h)
//    is exact (the very same floating-point expression and tie rule) but evaluates only the few
//    datasets that can win, instead of all L at every step.
// 2. pcg64 / permutation: numpy's PCG64 (XSL-RR 128/64) and Generator.permutation re-implemented,
//    bit for bit, so document shuffles are identical on every machine and checkable against numpy.
// 3. pack_rows: documents of one language laid into rows of seq_len tokens, over as many shuffled
//    epochs as needed, in megatron-core's GPT sample_idx representation (build_sample_idx with no
//    extra token), starting at any token position of the endless epoch stream.
// 4. pack_best_fit: <bos> ... <eos> pieces of documents best-fit packed into rows of
//    bin_rows x seq_len tokens, padding where no piece fits (data.packing: best_fit); concat_stats:
//    the same statistics for pack_rows' rows.
//
// Every input array is dtype- and layout-checked (a wrong dtype raises TypeError: megatron's helper
// silently fills a temporary copy instead), outputs are allocated here, and the GIL is released
// while computing.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "blending.h"  // also turns floating-point contraction off for this file

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
  if (std::is_same<T, int8_t>::value) return "int8";
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

struct LevelTotals {
  int64_t rebuilds = 0, aborts = 0, read = 0, full = 0;
};

// Runs one segment with the block blender for kernel K, adding its per-level work to `totals`.
template <typename IdxT, bool HasB, template <bool> class K>
void run_block(const blending::Segment &seg, const std::vector<int> &lengths,
               const std::vector<int> &active, const double *B, double *count_phase_d,
               int64_t *count_phase, int64_t *count_global, IdxT *out_idx, int64_t *out_sample,
               int64_t out_offset, double max_margin, std::vector<LevelTotals> &totals,
               int64_t begin) {
  blending::BlockBlender<IdxT, HasB, K> blender(seg, lengths, active, B, count_phase_d,
                                               count_phase, count_global, out_idx + out_offset,
                                               out_sample ? out_sample + out_offset : nullptr,
                                               max_margin, begin);
  blender.run();
  const auto &lv = blender.levels();
  if (totals.size() < lv.size() - 1) totals.resize(lv.size() - 1);
  for (size_t q = 1; q < lv.size(); ++q) {
    totals[q - 1].rebuilds += lv[q].rebuilds;
    totals[q - 1].aborts += lv[q].aborts;
    totals[q - 1].read += lv[q].read;
    totals[q - 1].full += lv[q].full;
  }
}

// Steps [begin, seg.end) of one segment (targets from seg.start), written to out_idx[out_offset +
// step]: megatron's scan below a few active datasets (or with algorithm "scan"), the block blender
// otherwise. Returns whether the block blender ran.
template <typename IdxT>
bool blend_steps(const blending::Segment &seg, int64_t begin, int L, double *B, int64_t *count_phase,
                 double *count_phase_d, int64_t *count_global, IdxT *out_idx, int64_t *out_sample,
                 int64_t out_offset, const std::string &algorithm, int fast_min_datasets,
                 const std::vector<int> &lengths_given, const std::string &kernel, double max_margin,
                 std::vector<LevelTotals> &totals, std::vector<int> &active) {
  active.clear();
  bool has_b = seg.start != 0;
  for (int i = 0; i < L; ++i) {
    if (seg.w[i] > 0.0) active.push_back(i);
    has_b = has_b || B[i] != 0.0;
  }
  const int n = static_cast<int>(active.size());
  // Below a few datasets megatron's plain loop is as fast as the block machinery: ~16
  // with the AVX-512 kernels, more with the others (benchmarks: portable 0.9x at 60).
  const int min_n = fast_min_datasets >= 0 ? fast_min_datasets
                                           : (kernel == "avx512" ? 16 : kernel == "avx2" ? 32 : 128);
  if (algorithm == "scan" || n < min_n) {
    blending::blend_segment_scan<IdxT>(seg, L, B, count_phase, count_phase_d, count_global, out_idx,
                                       out_sample, out_offset, begin);
    return false;
  }
  const std::vector<int> lengths =
      lengths_given.empty() ? blending::default_block_lengths(n) : lengths_given;
  auto go = [&](auto run) {
    run(seg, lengths, active, B, count_phase_d, count_phase, count_global, out_idx, out_sample,
        out_offset, max_margin, totals, begin);
  };
#if MMBERT_HAVE_X86_KERNELS
  if (kernel == "avx512") {
    if (has_b) go(run_block<IdxT, true, blending::Avx512Kernel>);
    else go(run_block<IdxT, false, blending::Avx512Kernel>);
    return true;
  }
  if (kernel == "avx2") {
    if (has_b) go(run_block<IdxT, true, blending::Avx2Kernel>);
    else go(run_block<IdxT, false, blending::Avx2Kernel>);
    return true;
  }
#endif
  if (has_b) go(run_block<IdxT, true, blending::GenericKernel>);
  else go(run_block<IdxT, false, blending::GenericKernel>);
  return true;
}

// weights: [M, L] float64, one row per segment; seg_sizes: [M] int64 (samples per segment);
// seg_phase: [M] int64, non-decreasing: segments of one phase are consecutive, and every phase
// starts its deficits afresh (its targets count from its own first sample), while
// dataset_sample_index keeps counting across phases (each dataset is read on, never restarted).
template <typename IdxT>
py::tuple blend_impl(const double *W, const int64_t *seg_sizes, const int64_t *seg_phase, int M,
                     int L, const std::string &algorithm, int fast_min_datasets,
                     const std::vector<int> &lengths_given, const std::string &kernel, double max_margin,
                     bool with_sample_index) {
  int64_t N = 0;
  for (int m = 0; m < M; ++m) N += seg_sizes[m];
  py::array_t<IdxT> dataset_index(N);
  // Without it (an empty array is returned) the output is 2 bytes a sample, not 10: callers that
  // stream a long phase to disk derive it from dataset_index chunk by chunk.
  py::array_t<int64_t> dataset_sample_index(with_sample_index ? N : 0);
  int num_phases = M == 0 ? 0 : static_cast<int>(seg_phase[M - 1] - seg_phase[0] + 1);
  py::array_t<int64_t> counts({static_cast<py::ssize_t>(std::max(num_phases, 0)),
                               static_cast<py::ssize_t>(L)});
  IdxT *out_idx = dataset_index.mutable_data();
  int64_t *out_sample = with_sample_index ? dataset_sample_index.mutable_data() : nullptr;
  int64_t *counts_out = counts.mutable_data();
  std::fill(counts_out, counts_out + static_cast<int64_t>(num_phases) * L, 0);
  std::vector<LevelTotals> totals;
  int64_t scanned_steps = 0, block_steps = 0;
  {
    py::gil_scoped_release release;
    std::vector<int64_t> count_global(L, 0), count_phase(L, 0);
    std::vector<double> count_phase_d(L, 0.0), B(L, 0.0);
    std::vector<int> active;
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
        blending::Segment seg{W + static_cast<int64_t>(m) * L, local, local + seg_sizes[m]};
        if (seg.end > seg.start) {
          const bool block = blend_steps<IdxT>(seg, seg.start, L, B.data(), count_phase.data(),
                                               count_phase_d.data(), count_global.data(), out_idx,
                                               out_sample, phase_offset, algorithm, fast_min_datasets,
                                               lengths_given, kernel, max_margin, totals, active);
          (block ? block_steps : scanned_steps) += seg.end - seg.start;
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
  info["kernel"] = algorithm == "scan" ? "scan" : kernel;
  info["scanned_steps"] = scanned_steps;
  info["block_steps"] = block_steps;
  py::list rebuilds, aborts, read, full;
  for (const auto &t : totals) {
    rebuilds.append(t.rebuilds);
    aborts.append(t.aborts);
    read.append(t.read);
    full.append(t.full);
  }
  info["level_rebuilds"] = rebuilds;  // selections made, per level (outermost first)
  info["level_aborts"] = aborts;      // blocks stopped early because this level left out too much
  info["level_read"] = read;          // deficits evaluated to select (and to find who to blame)
  info["level_full"] = full;          // selections that kept everything (the margin hit its cap)
  return py::make_tuple(dataset_index, dataset_sample_index, counts, info);
}

// Segment sizes >= 0, phases non-decreasing without gaps, weights finite and >= 0, a positive one in
// every segment with samples (ValueError naming the segment otherwise).
void check_segments(const double *W, const int64_t *S, const int64_t *P, py::ssize_t M, py::ssize_t L) {
  for (py::ssize_t m = 0; m < M; ++m) {
    if (S[m] < 0) throw py::value_error("segment_sizes must be >= 0");
    if (P && m > 0 && P[m] < P[m - 1]) throw py::value_error("segment_phase must be non-decreasing");
    if (P && m > 0 && P[m] > P[m - 1] + 1) throw py::value_error("segment_phase must not skip phases");
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
}

// The fastest kernel this CPU runs (what kernel="auto" picks).
std::string auto_kernel() { return blending::available_kernels().front(); }

py::tuple build_blending_indices(const py::object &weights_obj, const py::object &sizes_obj,
                                 const py::object &phase_obj, const std::string &algorithm,
                                 int fast_min_datasets, const std::vector<int> &block_lengths,
                                 const std::string &kernel, double max_margin, bool sample_index) {
  auto weights = require<double>(weights_obj, "weights", 2);
  auto sizes = require<int64_t>(sizes_obj, "segment_sizes", 1);
  auto phases = require<int64_t>(phase_obj, "segment_phase", 1);
  const py::ssize_t M = weights.shape(0), L = weights.shape(1);
  if (sizes.shape(0) != M || phases.shape(0) != M) {
    throw py::value_error("segment_sizes and segment_phase must have one entry per weights row (" +
                          std::to_string(M) + ")");
  }
  if (L < 1) throw py::value_error("weights must have at least one dataset column");
  if (L > std::numeric_limits<int32_t>::max() - 64) throw py::value_error("too many datasets");
  if (algorithm != "fast" && algorithm != "scan") {
    throw py::value_error("algorithm must be 'fast' or 'scan', got '" + algorithm + "'");
  }
  if (block_lengths.size() > 7) {
    throw py::value_error("block_lengths: at most 7 levels, got " +
                          std::to_string(block_lengths.size()));
  }
  for (int k : block_lengths) {
    if (k < 1) {
      throw py::value_error("block_lengths must be positive step counts (outermost first), got " +
                            std::to_string(k));
    }
  }
  if (!(max_margin > 0.0) || !std::isfinite(max_margin)) {
    throw py::value_error("max_margin must be a finite number > 0, got " + std::to_string(max_margin));
  }
  const std::vector<std::string> kernels = blending::available_kernels();
  if (kernel != "auto" && kernel != "avx512" && kernel != "avx2" && kernel != "generic") {
    throw py::value_error("kernel must be 'auto', 'avx512', 'avx2' or 'generic', got '" + kernel +
                          "'");
  }
  if (kernel != "auto" && std::find(kernels.begin(), kernels.end(), kernel) == kernels.end()) {
    throw py::value_error("kernel='" + kernel + "' needs a CPU with " +
                          (kernel == "avx512" ? "AVX-512F and AVX-512VL" : "AVX2") +
                          " (this one has not); use kernel='auto'");
  }
  const std::string use = kernel == "auto" ? kernels.front() : kernel;
  const double *W = weights.data();
  const int64_t *S = sizes.data();
  const int64_t *P = phases.data();
  check_segments(W, S, P, M, L);
  if (L <= std::numeric_limits<int16_t>::max()) {
    return blend_impl<int16_t>(W, S, P, static_cast<int>(M), static_cast<int>(L), algorithm,
                               fast_min_datasets, block_lengths, use, max_margin, sample_index);
  }
  return blend_impl<int32_t>(W, S, P, static_cast<int>(M), static_cast<int>(L), algorithm,
                             fast_min_datasets, block_lengths, use, max_margin, sample_index);
}


// One phase's blending, block by block: next(n) returns the phase's next n dataset_index entries
// (int16, int32 beyond 32767 datasets), the same values as build_blending_indices over the phase
// (its segments, one phase), which it runs in pieces: a block may end inside a segment, whose steps
// then resume with the same targets (counted from the segment's start). The state between blocks:
// the segment and step reached, the carried targets B and the phase's counts. Memory: one block.
class PhaseBlender {
 public:
  PhaseBlender(const py::object &weights_obj, const py::object &sizes_obj) {
    auto weights = require<double>(weights_obj, "weights", 2);
    auto sizes = require<int64_t>(sizes_obj, "segment_sizes", 1);
    M_ = weights.shape(0);
    L_ = weights.shape(1);
    if (sizes.shape(0) != M_) throw py::value_error("segment_sizes must have one entry per weights row");
    if (L_ < 1) throw py::value_error("weights must have at least one dataset column");
    if (L_ > std::numeric_limits<int32_t>::max() - 64) throw py::value_error("too many datasets");
    check_segments(weights.data(), sizes.data(), nullptr, M_, L_);
    W_.assign(weights.data(), weights.data() + M_ * L_);
    S_.assign(sizes.data(), sizes.data() + M_);
    for (int64_t x : S_) total_ += x;
    B_.assign(L_, 0.0);
    count_phase_d_.assign(L_, 0.0);
    count_phase_.assign(L_, 0);
    count_global_.assign(L_, 0);
    kernel_ = auto_kernel();
  }

  py::array next(int64_t n) {
    if (n < 1) throw py::value_error("next(n) needs n >= 1");
    n = std::min(n, total_ - done_);
    if (L_ <= std::numeric_limits<int16_t>::max()) return run<int16_t>(n);
    return run<int32_t>(n);
  }
  int64_t remaining() const { return total_ - done_; }
  py::array_t<int64_t> counts() const {
    py::array_t<int64_t> out(L_);
    std::copy(count_phase_.begin(), count_phase_.end(), out.mutable_data());
    return out;
  }

 private:
  template <typename IdxT>
  py::array run(int64_t n) {
    py::array_t<IdxT> out(n);
    IdxT *o = out.mutable_data();
    {
      py::gil_scoped_release release;
      int64_t made = 0;
      while (made < n || (m_ < M_ && t_ == seg_start_ + S_[m_])) {
        const blending::Segment seg{W_.data() + m_ * L_, seg_start_, seg_start_ + S_[m_]};
        const int64_t stop = std::min(seg.end, t_ + (n - made));
        if (stop > t_) {
          // Full segment: seg.end bounds the steps; a block ending inside it runs a shortened copy
          // with the same start (the targets' origin), resumed at t_ next time.
          const blending::Segment part{seg.w, seg.start, stop};
          blend_steps<IdxT>(part, t_, static_cast<int>(L_), B_.data(), count_phase_.data(),
                            count_phase_d_.data(), count_global_.data(), o, nullptr, made - t_,
                            "fast", -1, {}, kernel_, 8.0, totals_, active_);
          made += stop - t_;
          t_ = stop;
        }
        if (t_ == seg.end) {  // carry the target to the next segment, as blend_impl does
          const double x = static_cast<double>(seg.end) - static_cast<double>(seg.start);
          for (int64_t i = 0; i < L_; ++i) B_[i] = B_[i] + seg.w[i] * x;
          seg_start_ = seg.end;
          ++m_;
        }
      }
    }
    done_ += n;
    return out;
  }

  py::ssize_t M_ = 0, L_ = 0;
  std::vector<double> W_, B_, count_phase_d_;
  std::vector<int64_t> S_, count_phase_, count_global_;
  int64_t total_ = 0, done_ = 0, m_ = 0, seg_start_ = 0, t_ = 0;
  std::string kernel_;
  std::vector<LevelTotals> totals_;
  std::vector<int> active_;
};

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
  // Fisher-Yates from the top (numpy's shuffle). Each swap's partner j is random: the draws are
  // made kAhead swaps early (the same draws in the same order) and their entries prefetched, so the
  // cache misses of a large permutation overlap instead of following one another.
  constexpr int64_t kAhead = 16;
  int64_t js[kAhead];
  int64_t next = n - 1;  // the next i to draw j for
  auto draw = [&]() {
    const int64_t j = static_cast<int64_t>(g.interval(static_cast<uint64_t>(next)));
    __builtin_prefetch(out + j);
    js[next % kAhead] = j;
    --next;
  };
  for (int64_t k = 0; k < kAhead && next >= 1; ++k) draw();
  for (int64_t i = n - 1; i >= 1; --i) {
    const int64_t j = js[i % kAhead];
    if (next >= 1) draw();  // for i - kAhead: the slot just read
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
// Output: doc_index int32 [epochs * D] (the concatenated permutations of the epochs touched) and
// sample_idx int64 [num_rows + 1, 2] ((position in doc_index, token offset) where each row starts;
// row r spans sample_idx[r] .. sample_idx[r + 1], megatron GPT convention).
// Resumable in blocks: next(max_rows) returns the next rows' sample_idx entries (the first call
// also entry 0) and the permutations of the epochs they entered (the first call the first epoch's);
// between calls the state is the current epoch's permutation and the walk's (position, offset).
class RowPacker {
 public:
  RowPacker(const py::object &sizes_obj, int64_t seq_len, int64_t num_rows, int64_t start_token,
            uint64_t seed, uint64_t stream)
      : sizes_arr_(require<int32_t>(sizes_obj, "sizes", 1)), seq_len_(seq_len), num_rows_(num_rows),
        start_token_(start_token), seed_(seed), stream_(stream) {
    D_ = sizes_arr_.shape(0);
    sizes_ = sizes_arr_.data();
    if (seq_len < 1) throw py::value_error("seq_len must be >= 1");
    if (num_rows < 0 || start_token < 0) throw py::value_error("num_rows and start_token must be >= 0");
    if (D_ > std::numeric_limits<int32_t>::max()) throw py::value_error("too many documents for int32");
    for (int64_t d = 0; d < D_; ++d) {
      if (sizes_[d] < 0) throw py::value_error("sizes must be >= 0");
      tpe_ += sizes_[d];
    }
    if (num_rows > 0 && tpe_ <= 0) throw py::value_error("cannot pack rows from a dataset with no tokens");
    first_epoch_ = tpe_ > 0 ? start_token / tpe_ : 0;
  }

  py::tuple next(int64_t max_rows) {
    if (max_rows < 1) throw py::value_error("next(max_rows) needs max_rows >= 1");
    const int64_t n = std::min(max_rows, num_rows_ - r_);
    const bool first = r_ == 0 && !started_;
    std::vector<int32_t> docs;  // the permutations of the epochs entered in this block
    py::array_t<int64_t> sample_idx({static_cast<py::ssize_t>(n + (first ? 1 : 0)), static_cast<py::ssize_t>(2)});
    int64_t *si = sample_idx.mutable_data();
    {
      py::gil_scoped_release release;
      if (first) {
        start(docs);
        si[0] = pos_;
        si[1] = off_;
        si += 2;
      }
      for (int64_t r = 0; r < n; ++r) {
        walk_row(docs);
        si[2 * r] = pos_;
        si[2 * r + 1] = off_;
      }
    }
    r_ += n;
    py::array_t<int32_t> doc_index(static_cast<py::ssize_t>(docs.size()));
    std::copy(docs.begin(), docs.end(), doc_index.mutable_data());
    return py::make_tuple(doc_index, sample_idx);
  }
  bool done() const { return started_ && r_ == num_rows_; }
  int64_t first_epoch() const { return first_epoch_; }

 private:
  void load(std::vector<int32_t> &docs) {  // the next epoch: kept, and emitted
    Pcg64 g = seeded_pcg64(seed_, stream_, static_cast<uint64_t>(first_epoch_ + loaded_));
    perm_.resize(D_);
    permute_into(g, perm_.data(), D_);
    base_ = loaded_ * D_;
    ++loaded_;
    docs.insert(docs.end(), perm_.begin(), perm_.end());
  }
  int32_t doc_at(int64_t pos, std::vector<int32_t> &docs) {
    if (pos >= base_ + D_) load(docs);
    return perm_[pos - base_];
  }
  void start(std::vector<int32_t> &docs) {  // skip whole documents of the first epoch before start_token
    started_ = true;
    if (num_rows_ == 0) return;
    load(docs);
    int64_t skip = start_token_ - first_epoch_ * tpe_;
    while (skip > 0) {
      const int64_t len = sizes_[perm_[pos_]];
      if (skip < len) {
        off_ = skip;
        skip = 0;
      } else {
        skip -= len;
        ++pos_;
      }
    }
  }
  // megatron-core build_sample_idx's walk with add_extra_token_to_sequence = 0: a row that ends
  // exactly at a document's end is recorded as (that document, its length).
  void walk_row(std::vector<int32_t> &docs) {
    int64_t remaining = seq_len_;
    while (remaining != 0) {
      const int64_t len = sizes_[doc_at(pos_, docs)] - off_;
      remaining -= len;
      if (remaining <= 0) {
        off_ += remaining + len;
        remaining = 0;
      } else {
        ++pos_;
        off_ = 0;
      }
    }
  }

  py::array_t<int32_t> sizes_arr_;  // held: read between calls
  const int32_t *sizes_ = nullptr;
  int64_t D_ = 0, tpe_ = 0, seq_len_, num_rows_, start_token_;
  uint64_t seed_, stream_;
  int64_t first_epoch_ = 0, loaded_ = 0, base_ = 0, pos_ = 0, off_ = 0, r_ = 0;
  bool started_ = false;
  std::vector<int32_t> perm_;
};

// All rows in one call: (doc_index int32 [epochs * D], sample_idx int64 [num_rows + 1, 2], first_epoch).
py::tuple pack_rows(const py::object &sizes_obj, int64_t seq_len, int64_t num_rows,
                    int64_t start_token, uint64_t seed, uint64_t stream) {
  RowPacker packer(sizes_obj, seq_len, num_rows, start_token, seed, stream);
  py::tuple t = packer.next(std::max<int64_t>(num_rows, 1));
  return py::make_tuple(t[0], t[1], packer.first_epoch());
}


// ------------------------------------------------------------------------------------------------
// Best-fit packing (mmBERT / ModernBERT / Ettin GreedyBestFitSequencePacker,
// github.com/AnswerDotAI/ModernBERT src/sequence_packer.py), deterministic and resumable
// ------------------------------------------------------------------------------------------------

// Document framing flags (input, one per document): what the shards already hold.
constexpr int8_t kStoredBos = 1;  // the stored document starts with <bos>
constexpr int8_t kStoredEos = 2;  // ... and ends with <eos>
// Piece flags (output, one per piece): what the reader adds around the stored tokens.
constexpr int8_t kAddBos = 1;  // prepend <bos>
constexpr int8_t kAddEos = 2;  // append <eos>

// A language's documents as the best-fit packer reads them: stored tokens and framing flags
// (kStoredBos | kStoredEos) per document. Either two arrays (sizes int32 [D], framing int8 [D]: 5 bytes
// a document) or one compact array (uint16 [D]: the framing in bits 14-15, the stored length in bits
// 0-13, kLongSize where the length is kLongSize or more and stands in `long_rows`, int64 [n, 2]
// (document, length) rows in increasing document order: 2 bytes a document, the table the build
// holds for each language being packed, beside one epoch's permutation).
struct DocTable {
  static constexpr uint16_t kLongSize = 0x3FFF;
  const int32_t *sizes = nullptr;
  const int8_t *framing = nullptr;
  const uint16_t *packed = nullptr;
  const int64_t *long_rows = nullptr;
  int64_t n_long = 0;

  int32_t size(int64_t d) const {
    if (!packed) return sizes[d];
    const int32_t s = packed[d] & kLongSize;
    return s != kLongSize ? s : long_size(d);
  }
  int8_t frame(int64_t d) const { return packed ? static_cast<int8_t>(packed[d] >> 14) : framing[d]; }
  void prefetch(int64_t d) const {
    if (packed) {
      __builtin_prefetch(packed + d);
    } else {
      __builtin_prefetch(sizes + d);
      __builtin_prefetch(framing + d);
    }
  }
  int32_t long_size(int64_t d) const {  // binary search of the (rare) long documents' rows
    int64_t lo = 0, hi = n_long;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (long_rows[2 * mid] < d) lo = mid + 1; else hi = mid;
    }
    return static_cast<int32_t>(long_rows[2 * lo + 1]);  // present: checked by the packer's constructor
  }
};

// The document stream of one language from stream token `start_token` (which must fall on a
// document boundary of the epoch stream): epoch e = permutation(D, seed, stream, e).
struct DocStream {
  static constexpr int64_t kPrefetch = 16;
  DocTable table;
  int64_t D, tpe;
  uint64_t seed, stream;
  int64_t epoch = 0, pos = 0;  // next document: perm[pos] of `epoch`
  int64_t token = 0;           // stream tokens of the documents taken so far
  std::vector<int32_t> perm;

  DocStream(const DocTable &tb, int64_t d, int64_t t, uint64_t sd, uint64_t st, int64_t start_token)
      : table(tb), D(d), tpe(t), seed(sd), stream(st), perm(d) {
    epoch = start_token / tpe;
    load();
    int64_t skip = start_token - epoch * tpe;
    while (skip > 0) {
      skip -= table.size(perm[pos]);
      ++pos;
    }
    if (skip < 0) {
      throw py::value_error("start_token " + std::to_string(start_token) +
                            " is not at a document boundary of the stream: best_fit streams advance by "
                            "whole documents (was this position made by data.packing: concat?)");
    }
    token = start_token;
    if (pos == D) next_epoch();
  }
  void load() {
    Pcg64 g = seeded_pcg64(seed, stream, static_cast<uint64_t>(epoch));
    permute_into(g, perm.data(), D);
    pos = 0;
  }
  void next_epoch() {
    ++epoch;
    load();
  }
  int32_t take() {  // the next document (any size, zero included)
    // The documents come in a random order: ask for a later one's size (and framing) now, so its
    // cache miss overlaps this one's work (a large language's arrays are far bigger than the cache).
    if (pos + kPrefetch < D) table.prefetch(perm[pos + kPrefetch]);
    const int32_t d = perm[pos++];
    token += table.size(d);
    if (pos == D) next_epoch();
    return d;
  }
};

struct Piece {
  int32_t doc, offset, length;  // stored tokens [offset, offset + length) of document doc
  int8_t flags;                 // kAddBos | kAddEos: framing tokens the shards lack here
  int64_t total() const { return length + (flags & kAddBos ? 1 : 0) + (flags & kAddEos ? 1 : 0); }
};

// The packer's whole state between two windows (issue: resumable in blocks): where the document
// stream is, and the pieces read but not yet placed (deferred ones first, in stream order).
struct BestFitState {
  DocStream docs;
  std::vector<Piece> pending;
};

// Pieces of document d, each framed <bos> content <eos> (the reference's framing): the stored
// content (without the document's own <bos> / <eos>, flags `framing[d]`) is cut every seq_len - 2
// tokens; a piece reuses the stored <bos> / <eos> where it has them and gets one added otherwise.
// Non-first pieces with fewer than min_piece content tokens are dropped (mmBERT); a document with no
// content gives no piece (the reference skips empty sequences).
void cut_document(int32_t d, const DocTable &table, int64_t seq_len, int64_t min_piece,
                  std::vector<Piece> &out, int64_t &dropped_short) {
  const int32_t n = table.size(d);
  const int8_t fr = table.frame(d);
  const int32_t c0 = (fr & kStoredBos) && n > 0 ? 1 : 0;
  const int32_t c1 = (fr & kStoredEos) && n > c0 ? n - 1 : n;
  if (c1 <= c0) {
    dropped_short += n;
    return;
  }
  const int32_t cmax = static_cast<int32_t>(seq_len - 2);
  for (int32_t a = c0; a < c1;) {
    const int32_t b = static_cast<int32_t>(std::min<int64_t>(c1, static_cast<int64_t>(a) + cmax));
    if (a > c0 && b - a < min_piece) {
      dropped_short += b - a;
    } else {
      const bool own_bos = a == c0 && (fr & kStoredBos);
      const bool own_eos = b == c1 && (fr & kStoredEos);
      const int32_t lo = own_bos ? 0 : a, hi = own_eos ? n : b;
      out.push_back(Piece{d, lo, hi - lo,
                          static_cast<int8_t>((own_bos ? 0 : kAddBos) | (own_eos ? 0 : kAddEos))});
    }
    a = b;
  }
}

// Packed rows of bin_rows x seq_len tokens from whole pieces (each at most seq_len tokens, framed
// by cut_document): with bin_rows = micro_batch_size a packed row is one micro-batch, as the
// reference's (out_pseq_len = micro_batch_size x max_seq_len); bin_rows = 1 keeps seq_len rows.
// Rows are made `window` at a time, all of them open together: each piece (the deferred ones first,
// then new ones from the stream) goes into the open row with the least room that still holds it
// (ties: the lowest row), or is deferred to the next window. A window closes when all its rows are
// full, `buffer` pieces wait deferred (the reference's buffer_size), or `lookahead` seq_len-rows'
// worth of tokens plus half the room of the rows after the window do. The room left in a row is
// padding. Pieces still deferred when the rows are done are dropped, so the stream advances by
// whole documents and the next packer (next phase, or a branch starting there) starts with nothing
// pending.
// Resumable in blocks: next(max_rows) makes the next whole windows (at most max_rows packed rows,
// at least one window) and returns them; between calls the state is the BestFitState (stream
// position, pieces deferred or not yet tried), the rows made and the statistics, so the blocks
// concatenated are the rows of one call for all of them.
class BestFitPacker {
 public:
  BestFitPacker(const py::object &sizes_obj, const py::object &framing_obj, int64_t seq_len,
                int64_t num_rows, int64_t start_token, uint64_t seed, uint64_t stream, int64_t bin_rows,
                int64_t window, int64_t buffer, int64_t lookahead, int64_t min_piece,
                const py::object &long_obj = py::none())
      : seq_len_(seq_len), num_rows_(num_rows), bin_rows_(bin_rows), window_(window), buffer_(buffer),
        lookahead_(lookahead), min_piece_(min_piece), end_token_(start_token) {
    const int64_t D = hold_table(sizes_obj, framing_obj, long_obj);
    if (seq_len < 3) throw py::value_error("seq_len must be >= 3 for best_fit (<bos>, a token, <eos>)");
    if (bin_rows < 1) throw py::value_error("bin_rows must be >= 1");
    if (num_rows < 0 || start_token < 0) throw py::value_error("num_rows and start_token must be >= 0");
    if (window < 1 || buffer < 1) throw py::value_error("need window >= 1 and buffer >= 1");
    if (lookahead < 0) throw py::value_error("lookahead must be >= 0");
    if (min_piece < 0) throw py::value_error("min_piece must be >= 0");
    int64_t tpe = 0;
    bool has_content = false;
    for (int64_t d = 0; d < D; ++d) {
      const int32_t n = table_.size(d);
      if (n < 0) throw py::value_error("sizes must be >= 0");
      tpe += n;
      has_content = has_content || n - ((table_.frame(d) & kStoredBos) ? 1 : 0) -
                                       ((table_.frame(d) & kStoredEos) ? 1 : 0) > 0;
    }
    if (num_rows > 0 && tpe <= 0) throw py::value_error("cannot pack rows from a dataset with no tokens");
    if (num_rows > 0 && !has_content) {
      throw py::value_error("no document has a token besides its <bos> / <eos>");
    }
    capacity_ = bin_rows * seq_len;
    if (num_rows > 0) {
      py::gil_scoped_release release;  // the first epoch's permutation
      st_.reset(new BestFitState{DocStream(table_, D, tpe, seed, stream, start_token), {}});
    }
  }

  // (pieces int32 [P, 3], piece_flags int8 [P], row_ends int64 [R]: the pieces before the end of each
  // packed row, counted from the phase's first piece of this language).
  py::tuple next(int64_t max_rows) {
    if (max_rows < 1) throw py::value_error("next(max_rows) needs max_rows >= 1");
    std::vector<Piece> out;
    std::vector<int64_t> ends;
    {
      py::gil_scoped_release release;
      const int64_t windows = std::max<int64_t>(1, max_rows / window_);
      for (int64_t w = 0; w < windows && r0_ < num_rows_; ++w) run_window(out, ends);
      if (r0_ == num_rows_ && st_) finish();
    }
    return to_arrays(out, ends);
  }
  bool done() const { return r0_ == num_rows_; }
  int64_t end_token() const { return end_token_; }
  py::dict stats() const {
    py::dict d;
    d["row_tokens"] = num_rows_ * capacity_;
    d["pad_tokens"] = pad_;
    d["fragment_tokens"] = fragment_;
    d["segments"] = segments_;
    d["bos_segments"] = bos_segments_;
    d["eos_segments"] = eos_segments_;
    d["documents"] = documents_;
    d["dropped_short_tokens"] = dropped_short_;
    d["dropped_pending_tokens"] = dropped_left_;
    return d;
  }

 private:
  // One window of rows r0_ .. r0_ + W: fill it, append its rows to `out` / `ends`, keep the rest.
  void run_window(std::vector<Piece> &out, std::vector<int64_t> &ends) {
    std::vector<Piece> &pending = st_->pending;
    const int64_t W = std::min(window_, num_rows_ - r0_);
    rows_.assign(W, {});
    room_.assign(W, capacity_);
    deferred_.clear();
    int64_t full = 0, deferred_tokens = 0;
    // Read ahead at most `lookahead` rows' worth of tokens that did not fit, plus half the room of
    // the rows still to come after this window: what is still pending when the rows are done is
    // dropped, so a language with few rows in a phase must not pull many documents for them,
    // while a window with many rows after it may read far ahead (its deferred pieces go first
    // into those rows), as the reference's buffer does.
    const int64_t max_deferred = lookahead_ * seq_len_ + (num_rows_ - r0_ - W) * capacity_ / 2;
    size_t head = 0;  // first piece of `pending` not yet tried in this window
    // The most room of any row: a piece longer than it is deferred without a search (most deferred
    // pieces, retried every window while the rows fill, are); recomputed when that row takes a piece.
    int64_t most_room = capacity_;
    while (full < W && static_cast<int64_t>(deferred_.size()) < buffer_) {
      if (head == pending.size()) {
        if (deferred_tokens >= max_deferred) break;
        pending.clear();
        head = 0;
        ++documents_;
        cut_document(st_->docs.take(), table_, seq_len_, min_piece_, pending, dropped_short_);
        continue;
      }
      const Piece p = pending[head++];
      const int64_t t = p.total();
      int64_t best = -1;
      if (t <= most_room) {
        for (int64_t r = 0; r < W; ++r) {
          if (room_[r] >= t && (best < 0 || room_[r] < room_[best])) best = r;
        }
      }
      if (best < 0) {
        deferred_.push_back(p);
        deferred_tokens += t;
      } else {
        const bool was_most = room_[best] == most_room;
        rows_[best].push_back(p);
        room_[best] -= t;
        if (room_[best] == 0) ++full;
        if (was_most) most_room = *std::max_element(room_.begin(), room_.begin() + W);
      }
    }
    // Deferred pieces go before the untried ones for the next window.
    deferred_.insert(deferred_.end(), pending.begin() + static_cast<int64_t>(head), pending.end());
    pending.swap(deferred_);
    for (int64_t r = 0; r < W; ++r) {
      for (const Piece &p : rows_[r]) {
        out.push_back(p);
        count(p);
      }
      pad_ += room_[r];
      ends.push_back(pieces_before_ + static_cast<int64_t>(out.size()));
    }
    r0_ += W;
  }

  void count(const Piece &p) {
    ++segments_;
    const int32_t n = table_.size(p.doc);
    const int8_t fr = table_.frame(p.doc);
    bos_segments_ += ((p.flags & kAddBos) || (p.offset == 0 && (fr & kStoredBos))) ? 1 : 0;
    eos_segments_ += ((p.flags & kAddEos) || (p.offset + p.length == n && (fr & kStoredEos))) ? 1 : 0;
    if (!(p.offset == 0 && p.length == n)) fragment_ += p.total();
  }

  void finish() {  // what still waits is dropped; the stream stands after the documents taken
    for (const Piece &p : st_->pending) dropped_left_ += p.length;
    end_token_ = st_->docs.token;
    st_.reset();
  }

  py::tuple to_arrays(const std::vector<Piece> &out, const std::vector<int64_t> &ends) {
    const py::ssize_t P = static_cast<py::ssize_t>(out.size());
    py::array_t<int32_t> pieces({P, static_cast<py::ssize_t>(3)});
    py::array_t<int8_t> piece_flags(P);
    py::array_t<int64_t> row_ends(static_cast<py::ssize_t>(ends.size()));
    int32_t *pp = pieces.mutable_data();
    int8_t *pf = piece_flags.mutable_data();
    for (py::ssize_t i = 0; i < P; ++i) {
      pp[3 * i] = out[i].doc;
      pp[3 * i + 1] = out[i].offset;
      pp[3 * i + 2] = out[i].length;
      pf[i] = out[i].flags;
    }
    std::copy(ends.begin(), ends.end(), row_ends.mutable_data());
    pieces_before_ += P;
    return py::make_tuple(pieces, piece_flags, row_ends);
  }

  // The documents' arrays, checked, held (the packer reads them between calls) and viewed by table_;
  // returns D. sizes int32 with framing int8, or sizes uint16 (DocTable's compact form) with framing
  // None and long_documents int64 [n, 2].
  int64_t hold_table(const py::object &sizes_obj, const py::object &framing_obj, const py::object &long_obj) {
    if (py::isinstance<py::array>(sizes_obj) &&
        py::reinterpret_borrow<py::array>(sizes_obj).dtype().is(py::dtype::of<uint16_t>())) {
      auto packed = require<uint16_t>(sizes_obj, "sizes", 1);
      if (!framing_obj.is_none()) throw py::value_error("compact uint16 sizes carry the framing: pass framing=None");
      if (long_obj.is_none()) throw py::value_error("compact uint16 sizes need long_documents (int64 [n, 2])");
      auto rows = require<int64_t>(long_obj, "long_documents", 2);
      if (rows.shape(1) != 2) throw py::value_error("long_documents must be int64 [n, 2] (document, length)");
      held_ = {packed, rows};
      table_.packed = packed.data();
      table_.long_rows = rows.data();
      table_.n_long = rows.shape(0);
      const int64_t D = packed.shape(0);
      int64_t j = 0;  // every long document has its row, in increasing order, and no other has one
      for (int64_t d = 0; d < D; ++d) {
        if ((table_.packed[d] & DocTable::kLongSize) != DocTable::kLongSize) continue;
        if (j == table_.n_long || table_.long_rows[2 * j] != d || table_.long_rows[2 * j + 1] < DocTable::kLongSize ||
            table_.long_rows[2 * j + 1] > std::numeric_limits<int32_t>::max()) {
          throw py::value_error("long_documents must hold (document, length >= 16383) for each document "
                                "marked long in sizes, in increasing document order, and nothing else");
        }
        ++j;
      }
      if (j != table_.n_long) throw py::value_error("long_documents has rows for documents not marked long");
      return D;
    }
    auto sizes = require<int32_t>(sizes_obj, "sizes", 1);
    auto framing = require<int8_t>(framing_obj, "framing", 1);
    if (framing.shape(0) != sizes.shape(0)) throw py::value_error("framing must have one entry per document");
    if (!long_obj.is_none()) throw py::value_error("long_documents goes with compact uint16 sizes only");
    held_ = {sizes, framing};
    table_.sizes = sizes.data();
    table_.framing = framing.data();
    return sizes.shape(0);
  }

  std::vector<py::object> held_;
  DocTable table_;
  int64_t seq_len_, num_rows_, bin_rows_, window_, buffer_, lookahead_, min_piece_, capacity_ = 0;
  std::unique_ptr<BestFitState> st_;
  int64_t r0_ = 0, pieces_before_ = 0, end_token_;
  int64_t pad_ = 0, fragment_ = 0, segments_ = 0, bos_segments_ = 0, eos_segments_ = 0,
          dropped_short_ = 0, dropped_left_ = 0, documents_ = 0;
  std::vector<std::vector<Piece>> rows_;  // scratch of run_window
  std::vector<int64_t> room_;
  std::vector<Piece> deferred_;
};

// All rows in one call: (pieces int32 [P, 3] (doc, offset, stored length), piece_flags int8 [P]
// (kAddBos | kAddEos), row_ptr int64 [rows + 1] (packed row r = pieces row_ptr[r] .. row_ptr[r + 1]),
// end_token, stats).
py::tuple pack_best_fit(const py::object &sizes_obj, const py::object &framing_obj, int64_t seq_len,
                        int64_t num_rows, int64_t start_token, uint64_t seed, uint64_t stream,
                        int64_t bin_rows, int64_t window, int64_t buffer, int64_t lookahead,
                        int64_t min_piece) {
  BestFitPacker packer(sizes_obj, framing_obj, seq_len, num_rows, start_token, seed, stream, bin_rows,
                       window, buffer, lookahead, min_piece);
  py::array_t<int32_t> pieces(std::vector<py::ssize_t>{0, 3});
  py::array_t<int8_t> flags(0);
  py::array_t<int64_t> ptr(static_cast<py::ssize_t>(num_rows + 1));
  ptr.mutable_data()[0] = 0;
  if (num_rows > 0) {
    py::tuple t = packer.next(num_rows + window);
    pieces = t[0].cast<py::array_t<int32_t>>();
    flags = t[1].cast<py::array_t<int8_t>>();
    auto ends = t[2].cast<py::array_t<int64_t>>();
    std::copy(ends.data(), ends.data() + num_rows, ptr.mutable_data() + 1);
  }
  return py::make_tuple(pieces, flags, ptr, packer.end_token(), packer.stats());
}

// The same statistics for concat rows (pack_rows' doc_index / sample_idx): segments are the
// non-empty pieces of documents inside rows; a segment starts with <bos> when it is a document's
// start and the shard holds a <bos> there (ends with <eos>: a document's end with a stored <eos>);
// fragment tokens are those of pieces that are not a whole document.
py::dict concat_stats(const py::object &sizes_obj, const py::object &framing_obj,
                      const py::object &doc_index_obj, const py::object &sample_idx_obj) {
  auto sizes_arr = require<int32_t>(sizes_obj, "sizes", 1);
  auto framing_arr = require<int8_t>(framing_obj, "framing", 1);
  auto di_arr = require<int32_t>(doc_index_obj, "doc_index", 1);
  auto si_arr = require<int64_t>(sample_idx_obj, "sample_idx", 2);
  const int32_t *sizes = sizes_arr.data();
  const int8_t *framing = framing_arr.data();
  const int32_t *di = di_arr.data();
  const int64_t *si = si_arr.data();
  const int64_t R = si_arr.shape(0) - 1;
  int64_t segments = 0, bos_segments = 0, eos_segments = 0, fragment = 0, tokens = 0;
  {
    py::gil_scoped_release release;
    for (int64_t r = 0; r < R; ++r) {
      int64_t p = si[2 * r], o = si[2 * r + 1];
      const int64_t p1 = si[2 * r + 2], o1 = si[2 * r + 3];
      while (p < p1 || (p == p1 && o < o1)) {
        const int32_t d = di[p];
        const int64_t end = p == p1 ? o1 : sizes[d];
        if (end > o) {
          ++segments;
          tokens += end - o;
          bos_segments += (o == 0 && (framing[d] & kStoredBos)) ? 1 : 0;
          eos_segments += (end == sizes[d] && (framing[d] & kStoredEos)) ? 1 : 0;
          if (!(o == 0 && end == sizes[d])) fragment += end - o;
        }
        ++p;
        o = 0;
      }
    }
  }
  py::dict stats;
  stats["row_tokens"] = tokens;
  stats["pad_tokens"] = 0;
  stats["fragment_tokens"] = fragment;
  stats["segments"] = segments;
  stats["bos_segments"] = bos_segments;
  stats["eos_segments"] = eos_segments;
  return stats;
}

// ------------------------------------------------------------------------------------------------
// Tokens of a .bin
// ------------------------------------------------------------------------------------------------

template <typename T>
int64_t token_at(const char *base) {
  T v;
  std::memcpy(&v, base, sizeof(T));
  return static_cast<int64_t>(v);
}

// A token type from numpy's dtype.str of a little-endian integer ('<u2', '<i4', '|u1', ...): its size in
// bytes and signedness; anything else refused naming the caller.
struct TokenType {
  int64_t size;
  bool is_signed;
};

static TokenType token_type(const std::string &dtype, const char *caller) {
  if (dtype.size() != 3 || (dtype[0] != '<' && dtype[0] != '|' && dtype[0] != '=') ||
      (dtype[1] != 'i' && dtype[1] != 'u') || (dtype[2] != '1' && dtype[2] != '2' && dtype[2] != '4' && dtype[2] != '8')) {
    throw py::value_error(std::string(caller) + ": dtype must be a little-endian integer dtype.str such as '<i4', got '" +
                          dtype + "'");
  }
  return TokenType{dtype[2] - '0', dtype[1] == 'i'};
}

// The token at each byte offset `pointers` (increasing) of the token file `path` (a megatron-core
// .bin), as int64; dtype: numpy's dtype.str of an integer token type ('<u2', '<i4', '|u1', ...).
// The file is mapped `window` bytes at a time and unmapped after each (the pages a read touches
// count in the RSS while mapped), with the GIL released for the whole read, offsets checked against
// the file (numpy's gather on a memmap, which this replaces, frees the GIL only around the gather:
// one language's chunks on two threads 0.87 s here vs 0.97 s, benchmarks/RESULTS.md).
py::array_t<int64_t> tokens_at(const std::string &path, const py::object &pointers_obj, const std::string &dtype,
                               int64_t window) {
  auto ptr_arr = require<int64_t>(pointers_obj, "pointers", 1);
  const TokenType token = token_type(dtype, "tokens_at");
  const int64_t size = token.size;
  const bool is_signed = token.is_signed;
  const int64_t n = ptr_arr.shape(0);
  const int64_t *p = ptr_arr.data();
  py::array_t<int64_t> out(n);
  int64_t *o = out.mutable_data();
  std::string err;
  {
    py::gil_scoped_release release;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || ::fstat(fd, &st) != 0) {
      err = "cannot open " + path + ": " + std::strerror(errno);
    } else {
      const int64_t page = ::sysconf(_SC_PAGESIZE);
      const int64_t file_size = st.st_size;
      int64_t a = 0;
      while (a < n && err.empty()) {
        if (p[a] < 0 || p[a] + size > file_size || (a > 0 && p[a] < p[a - 1])) {
          err = path + ": token offset " + std::to_string(p[a]) + " is outside the file (" +
                std::to_string(file_size) + " bytes) or out of order; is the .idx the one of this .bin?";
          break;
        }
        const int64_t lo = p[a] / page * page;
        int64_t b = a + 1;
        while (b < n && p[b] >= p[b - 1] && p[b] + size <= file_size && p[b] + size - lo <= window) ++b;
        const int64_t len = p[b - 1] + size - lo;
        void *m = ::mmap(nullptr, static_cast<size_t>(len), PROT_READ, MAP_SHARED, fd, static_cast<off_t>(lo));
        if (m == MAP_FAILED) {
          err = "cannot map " + path + ": " + std::strerror(errno);
          break;
        }
        const char *base = static_cast<const char *>(m) - lo;
        for (int64_t i = a; i < b; ++i) {
          const char *at = base + p[i];
          switch (size) {
            case 1: o[i] = is_signed ? token_at<int8_t>(at) : token_at<uint8_t>(at); break;
            case 2: o[i] = is_signed ? token_at<int16_t>(at) : token_at<uint16_t>(at); break;
            case 4: o[i] = is_signed ? token_at<int32_t>(at) : token_at<uint32_t>(at); break;
            default: o[i] = token_at<int64_t>(at); break;  // uint64 ids above 2^63 do not occur
          }
        }
        ::munmap(m, static_cast<size_t>(len));
        a = b;
      }
    }
    if (fd >= 0) ::close(fd);
  }
  if (!err.empty()) throw py::value_error(err);
  return out;
}


// The tokens at byte `offsets` (any order) of a .bin, one pread each, the GIL released once for all
// (a pread per Python call hands the GIL to another thread and back each time). Returns (values,
// -1) or, where a read fails or falls short (a negative offset, past the end), (values so far, its index).
py::tuple pread_tokens(const std::string &path, const py::object &offsets_obj, const std::string &dtype) {
  auto off_arr = require<int64_t>(offsets_obj, "offsets", 1);
  const TokenType token = token_type(dtype, "pread_tokens");
  const int64_t size = token.size;
  const bool is_signed = token.is_signed;
  const int64_t n = off_arr.shape(0);
  const int64_t *p = off_arr.data();
  py::array_t<int64_t> out(n);
  int64_t *o = out.mutable_data();
  int64_t bad = -1;
  std::string err;
  {
    py::gil_scoped_release release;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      err = "cannot open " + path + ": " + std::strerror(errno);
    } else {
      char buf[8];
      for (int64_t i = 0; i < n; ++i) {
        if (p[i] < 0 || ::pread(fd, buf, static_cast<size_t>(size), static_cast<off_t>(p[i])) != size) {
          bad = i;
          break;
        }
        switch (size) {
          case 1: o[i] = is_signed ? token_at<int8_t>(buf) : token_at<uint8_t>(buf); break;
          case 2: o[i] = is_signed ? token_at<int16_t>(buf) : token_at<uint16_t>(buf); break;
          case 4: o[i] = is_signed ? token_at<int32_t>(buf) : token_at<uint32_t>(buf); break;
          default: o[i] = token_at<int64_t>(buf); break;
        }
      }
      ::close(fd);
    }
  }
  if (!err.empty()) throw py::value_error(err);
  return py::make_tuple(out, bad);
}

}  // namespace

PYBIND11_MODULE(_index_builder, m) {
  m.doc() = "Blended and packed sample indices for megatron-mmbert (see csrc/index_builder.cpp).";
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"),
        py::arg("segment_sizes"), py::arg("segment_phase"), py::arg("algorithm") = "fast",
        py::arg("fast_min_datasets") = -1, py::arg("block_lengths") = std::vector<int>{},
        py::arg("kernel") = "auto", py::arg("max_margin") = 8.0, py::arg("sample_index") = true,
        "Greedy largest-deficit interleave over a schedule of segments.\n\n"
        "weights float64 [M, L]; segment_sizes int64 [M]; segment_phase int64 [M] (non-decreasing).\n"
        "Returns (dataset_index int16 (int32 when L > 32767) [N], dataset_sample_index int64 [N],\n"
        "counts int64 [phases, L], stats dict). algorithm='scan' is the O(N x L) reference;\n"
        "'fast' (same output, see csrc/blending.h) falls back to it below fast_min_datasets active\n"
        "datasets (-1: 16 with the AVX-512 kernel, 32 with AVX2, 128 with the portable one). Speed only, never the output: block_lengths (steps per nested candidate level,\n"
        "outermost first; [] = defaults), kernel ('auto': the fastest this CPU runs, 'avx512',\n"
        "'avx2', 'generic') and max_margin (the candidate margin's cap; a level that reaches it keeps all).\n"
        "sample_index=False: dataset_sample_index is returned empty (not computed, not allocated).");
  m.def("available_kernels", &blending::available_kernels,
        "The blending kernels this CPU can run, fastest first ('generic' always).");
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
  m.def("pack_best_fit", &pack_best_fit, py::arg("sizes"), py::arg("framing"), py::arg("seq_len"),
        py::arg("num_rows"), py::arg("start_token"), py::arg("seed"), py::arg("stream"), py::arg("bin_rows"),
        py::arg("window"), py::arg("buffer"), py::arg("lookahead"), py::arg("min_piece"),
        "Best-fit packed rows of bin_rows x seq_len tokens of one language: (pieces int32 [P, 3] (doc,\n"
        "offset, length), piece_flags int8 [P] (1: prepend <bos>, 2: append <eos>), row_ptr int64 [rows+1],\n"
        "end_token, stats dict). framing int8 [D]: 1 where a document starts with <bos>, 2 ends with <eos>.");
  py::class_<PhaseBlender>(m, "PhaseBlender",
                           "One phase's blending in blocks: PhaseBlender(weights float64 [M, L], segment_sizes\n"
                           "int64 [M]); next(n) -> the next n dataset_index entries (as build_blending_indices\n"
                           "over the phase's segments); counts() -> int64 [L] samples per dataset so far.")
      .def(py::init<const py::object &, const py::object &>(), py::arg("weights"), py::arg("segment_sizes"))
      .def("next", &PhaseBlender::next, py::arg("n"))
      .def("counts", &PhaseBlender::counts)
      .def_property_readonly("remaining", &PhaseBlender::remaining);
  py::class_<RowPacker>(m, "RowPacker",
                        "pack_rows in blocks: next(max_rows) -> (doc_index part int32, sample_idx part int64\n"
                        "[n, 2]); the parts concatenated are pack_rows' arrays (the first call adds entry 0).")
      .def(py::init<const py::object &, int64_t, int64_t, int64_t, uint64_t, uint64_t>(), py::arg("sizes"),
           py::arg("seq_len"), py::arg("num_rows"), py::arg("start_token"), py::arg("seed"), py::arg("stream"))
      .def("next", &RowPacker::next, py::arg("max_rows"))
      .def_property_readonly("done", &RowPacker::done)
      .def_property_readonly("first_epoch", &RowPacker::first_epoch);
  py::class_<BestFitPacker>(m, "BestFitPacker",
                            "pack_best_fit in blocks of whole windows: next(max_rows) -> (pieces int32 [P, 3],\n"
                            "piece_flags int8 [P], row_ends int64 [R]: pieces before each packed row's end,\n"
                            "from the phase's first); end_token and stats() once done. sizes: int32 [D] with\n"
                            "framing int8 [D], or compact uint16 [D] (bits 0-13 the length, 16383: see\n"
                            "long_documents int64 [n, 2] (document, length); bits 14-15 the framing) with framing=None.")
      .def(py::init<const py::object &, const py::object &, int64_t, int64_t, int64_t, uint64_t, uint64_t,
                    int64_t, int64_t, int64_t, int64_t, int64_t, const py::object &>(),
           py::arg("sizes"), py::arg("framing"), py::arg("seq_len"), py::arg("num_rows"), py::arg("start_token"),
           py::arg("seed"), py::arg("stream"), py::arg("bin_rows"), py::arg("window"), py::arg("buffer"),
           py::arg("lookahead"), py::arg("min_piece"), py::arg("long_documents") = py::none())
      .def("next", &BestFitPacker::next, py::arg("max_rows"))
      .def_property_readonly("done", &BestFitPacker::done)
      .def_property_readonly("end_token", &BestFitPacker::end_token)
      .def("stats", &BestFitPacker::stats);
  m.def("tokens_at", &tokens_at, py::arg("path"), py::arg("pointers"), py::arg("dtype"), py::arg("window"),
        "int64 [N]: the token at each (increasing) byte offset of a .bin, mapped `window` bytes at a time "
        "(GIL released)");
  m.def("pread_tokens", &pread_tokens, py::arg("path"), py::arg("offsets"), py::arg("dtype"),
        "(int64 [N], first failed index or -1): the token at each byte offset of a .bin, a pread each "
        "(GIL released once)");
  m.def("concat_stats", &concat_stats, py::arg("sizes"), py::arg("framing"), py::arg("doc_index"),
        py::arg("sample_idx"), "Segment / <bos> / fragment counts of pack_rows' rows.");
}
