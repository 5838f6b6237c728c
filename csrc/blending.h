// The greedy largest-deficit interleave (megatron-core's helpers_cpp.build_blending_indices),
// generalised to segments of fixed weights, and an exact fast path for thousands of datasets.
// Included by index_builder.cpp (the bindings, input checks and the phase/segment driver).
//
// The rule. At step s of a segment, every active dataset i has the deficit
//   d_i(s) = (B_i + w_i * x) - c_i,    x = max(s, 1) - start (doubles, evaluated left to right),
// B_i the target carried from the segment before (0 in a phase's first segment, where the
// expression is megatron's w_i * max(s, 1) - c_i bit for bit), c_i the dataset's count so far.
// The dataset with the largest deficit is chosen (the lowest index on ties), and its count grows.
// Megatron evaluates all L deficits at every step: O(N x L).
//
// The fast path (BlockBlender) evaluates the very same expressions, but only for datasets that can
// win. Two facts make that exact:
//   * between two of its own picks a dataset's deficit never falls (w >= 0; rounding is monotone),
//     so its deficit at the last step of a block of steps bounds it over the whole block;
//   * a dataset that is not picked during the block keeps that bound.
// So for a block of steps [t, e) we keep the candidates whose bound U_i = d_i(e - 1) is at or above
// a cutoff, and remember BND, the largest bound left out. Inside the block the winner among the
// candidates is the true winner whenever its deficit is > BND: everything left out is <= BND. When
// that check fails (rare: the cutoff was too tight) the block stops at that step and is rebuilt
// with a looser cutoff. The cutoff sits a margin delta below the last winning deficit; delta adapts
// per level (x1.25 when that level was to blame for a stop, x0.993 per completed block).
//
// Selecting candidates from all L datasets is itself O(L), so selections are nested: level 1 picks
// from all active datasets for blocks of 432 steps, level 2 from level 1 for 72 steps, level 3
// from level 2 for 12 steps (the default lengths grow x6 outwards while they stay well below L).
// The innermost set holds ~20 datasets; its counts live in SIMD registers (AVX-512/AVX2), and each
// step is a few vector operations: the next step's two possible deficit vectors (picked last step
// or not) are computed while the current maximum is being reduced, so the step-to-step dependency
// is a blend, a max-reduction and a compare. Counts of the outer levels are updated on each pick
// through each candidate's slot in its parent level.
//
// Measured at L = 1833, N = 10M (benchmarks/RESULTS.md): ~19 deficits read per step to select and
// ~20 candidates compared, instead of 1833; 63-67x megatron's loop with the AVX-512 kernel, 51x
// with AVX2, 13x with the portable scalar kernel (any CPU). Kernels are chosen at run time; each
// produces the scan's output exactly (tests/test_index_builder.py).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMBERT_HAVE_X86_KERNELS 1  // AVX-512 and AVX2 kernels, compiled for their targets only
#include <immintrin.h>
#else
#define MMBERT_HAVE_X86_KERNELS 0
#endif

// The deficit must be computed exactly as megatron computes it: a product rounded to double, then a
// subtraction rounded to double. A fused multiply-add (GCC's default contraction when the target has
// FMA, which every AVX-512 kernel does) would change the last bit: contraction is off here and in
// setup.py's flags.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace blending {

constexpr double kInf = std::numeric_limits<double>::infinity();

// One segment of a phase: weights fixed over local steps [start, end) of the phase.
struct Segment {
  const double *w;  // [L] weights (0: inactive in this segment, never chosen)
  int64_t start;    // first local step
  int64_t end;      // one past the last local step
};

inline double xval(int64_t s, int64_t start) {
  return static_cast<double>(std::max<int64_t>(s, 1)) - static_cast<double>(start);
}

inline double deficit(double B, double w, double x, double c) {
  double target = B + w * x;
  return target - c;
}

// Reference implementation: a full scan of all active datasets at every step (megatron's loop).
template <typename IdxT>
void blend_segment_scan(const Segment &seg, int L, const double *B, int64_t *count_phase,
                        double *count_phase_d, int64_t *count_global, IdxT *out_idx,
                        int64_t *out_sample, int64_t out_offset, int64_t begin = -1) {
  // begin: the first step to run (default seg.start): a segment may be run in pieces [begin, end)
  // of its steps, the targets still counted from seg.start (the same output, block by block).
  // Megatron's case (first segment: B = 0, every weight positive) runs megatron's very loop:
  // (0 + w * x) - c is w * x - c exactly, so only the extra load and add are saved.
  bool plain = true;
  for (int i = 0; i < L; ++i) plain = plain && seg.w[i] > 0.0 && B[i] == 0.0;
  for (int64_t s = begin < 0 ? seg.start : begin; s < seg.end; ++s) {
    const double x = xval(s, seg.start);
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
    if (out_sample) out_sample[out_offset + s] = count_global[best];  // null: not wanted
    count_global[best] += 1;
    count_phase[best] += 1;
    count_phase_d[best] = static_cast<double>(count_phase[best]);
  }
}

// ------------------------------------------------------------------------------------------------
// Nested candidate sets
// ------------------------------------------------------------------------------------------------

// One level of nested candidates (level 0: every active dataset of the segment). Arrays are
// parallel, padded past n with entries that never win (w 0, c +inf, B 0: deficit -inf).
struct Level {
  std::vector<double> w, c, B;  // weight, count (as a double), carried target (HasB only)
  std::vector<int32_t> ps;      // slot in the parent level (level 0: the dataset index)
  int n = 0;
  int K = 0;                    // block length in steps
  int64_t end = 0;              // one past the last step this selection is valid for
  double bnd = -kInf;           // the largest bound among the parent's entries left out
  double BND = -kInf;           // max of bnd over this level and all outer ones
  double delta = 0.0;           // cutoff margin below the last winning deficit
  bool full_next = false;       // next selection keeps everything (delta reached its cap)
  int64_t rebuilds = 0, aborts = 0, read = 0, full = 0;

  void allocate(int cap) {
    w.assign(cap + 16, 0.0);
    c.assign(cap + 16, kInf);
    B.assign(cap + 16, 0.0);
    ps.assign(cap + 16, 0);
  }
  void pad() {  // sentinels after n (kernels read whole vectors of 8)
    for (int k = n; k < n + 8; ++k) {
      w[k] = 0.0;
      c[k] = kInf;
      B[k] = 0.0;
      ps[k] = 0;
    }
  }
};

// Steps [t, end) on the innermost set with its counts in memory, one argmax of kernel K per step:
// the portable kernel's inner loop, and the SIMD kernels' for sets too large for registers.
// Returns the step it stopped at: end, or the step whose winner was not > BND (nothing emitted).
template <class K, class Emit>
int64_t inner_memory(Level &in, int64_t t, int64_t end, int64_t start, Emit &emit) {
  for (; t < end; ++t) {
    double m;
    const int k = K::argmax(in, xval(t, start), m);
    if (!(m > in.BND)) return t;
    in.c[k] += 1.0;
    emit(k, t, m);
  }
  return t;
}

// The portable kernels: plain loops (branch-free selection and argmax).
template <bool HasB>
struct GenericKernel {

  static double u_at(const Level &p, int k, double x) {
    return HasB ? deficit(p.B[k], p.w[k], x, p.c[k]) : p.w[k] * x - p.c[k];
  }

  // Candidates of `a` from its parent `p`: entries whose deficit at x (the block's last step) is
  // >= cutoff (all when `full`), in the parent's order (so in dataset order); a.bnd = the largest
  // deficit left out.
  static void select(const Level &p, Level &a, double x, double cutoff, bool full) {
    int n = 0;
    double bnd = -kInf;
    for (int k = 0; k < p.n; ++k) {
      const double u = u_at(p, k, x);
      const bool keep = full || u >= cutoff;
      a.w[n] = p.w[k];
      a.c[n] = p.c[k];
      if (HasB) a.B[n] = p.B[k];
      a.ps[n] = k;
      n += keep;
      bnd = keep ? bnd : std::max(bnd, u);
    }
    a.n = n;
    a.bnd = bnd;
    a.pad();
  }

  static double scan_max(const Level &a, double x) {
    double m = -kInf;
    for (int k = 0; k < a.n; ++k) m = std::max(m, u_at(a, k, x));
    return m;
  }

  // Argmax over a set (memory-resident counts): the lowest slot among equal maxima.
  static int argmax(const Level &a, double x, double &m) {
    double best = -kInf;
    int bk = 0;
    for (int k = 0; k < a.n; ++k) {
      const double d = u_at(a, k, x);
      const bool take = d > best;  // strict: the first (lowest index) of equal maxima
      best = take ? d : best;
      bk = take ? k : bk;
    }
    m = best;
    return bk;
  }

  template <class Emit>
  static int64_t inner(Level &in, int64_t t, int64_t end, int64_t start, Emit &emit) {
    return inner_memory<GenericKernel>(in, t, end, start, emit);
  }
};

#if MMBERT_HAVE_X86_KERNELS
// GCC 12's AVX-512 intrinsic headers start masked operations from an "undefined" register, which
// -Wall reports as uninitialised at every use; the warnings say nothing about this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#define MMBERT_AVX512 __attribute__((target("avx512f,avx512vl")))

inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}
inline bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

// AVX-512: 8 deficits per vector; the innermost set's counts held in up to 4 registers.
template <bool HasB>
struct Avx512Kernel {

  MMBERT_AVX512 static inline __m512d u8(const Level &p, int k, __m512d vx) {
    const __m512d wx = _mm512_mul_pd(_mm512_loadu_pd(&p.w[k]), vx);
    const __m512d t = HasB ? _mm512_add_pd(_mm512_loadu_pd(&p.B[k]), wx) : wx;
    return _mm512_sub_pd(t, _mm512_loadu_pd(&p.c[k]));
  }

  MMBERT_AVX512 static void select(const Level &p, Level &a, double x, double cutoff, bool full) {
    // Raw pointers: vector stores may alias anything, so members would be reloaded every time.
    const double *pw = p.w.data(), *pc = p.c.data(), *pB = p.B.data();
    double *aw = a.w.data(), *ac = a.c.data(), *aB = a.B.data();
    int32_t *aps = a.ps.data();
    const int pn = p.n;
    const __m512d vx = _mm512_set1_pd(x);
    const __m512d vcut = _mm512_set1_pd(full ? -kInf : cutoff);
    __m512d vb = _mm512_set1_pd(-kInf);
    __m256i slot = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i eight = _mm256_set1_epi32(8);
    int n = 0;
    // One group of 8 parent entries: compute the bounds, keep those >= cutoff (compressed to the
    // front), fold the others into the running max of left-out bounds.
#define MMBERT_SELECT_GROUP(K, VALID)                                                             \
  {                                                                                               \
    const __m512d w = _mm512_loadu_pd(pw + (K)), c = _mm512_loadu_pd(pc + (K));                   \
    __m512d t = _mm512_mul_pd(w, vx);                                                             \
    if (HasB) t = _mm512_add_pd(_mm512_loadu_pd(pB + (K)), t);                                    \
    const __m512d u = _mm512_sub_pd(t, c);                                                        \
    const __mmask8 keep = _mm512_mask_cmp_pd_mask((VALID), u, vcut, _CMP_GE_OQ);                  \
    vb = _mm512_mask_max_pd(vb, static_cast<__mmask8>((VALID) & ~keep), vb, u);                   \
    _mm512_storeu_pd(aw + n, _mm512_maskz_compress_pd(keep, w));                                  \
    _mm512_storeu_pd(ac + n, _mm512_maskz_compress_pd(keep, c));                                  \
    if (HasB) _mm512_storeu_pd(aB + n, _mm512_maskz_compress_pd(keep, _mm512_loadu_pd(pB + (K)))); \
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(aps + n), _mm256_maskz_compress_epi32(keep, slot)); \
    slot = _mm256_add_epi32(slot, eight);                                                         \
    n += __builtin_popcount(keep);                                                                \
  }
    int k = 0;
    for (; k + 8 <= pn; k += 8) MMBERT_SELECT_GROUP(k, static_cast<__mmask8>(0xFF))
    // Lanes past the parent's end are masked off (its padding is never selected or counted).
    if (k < pn) MMBERT_SELECT_GROUP(k, static_cast<__mmask8>((1u << (pn - k)) - 1u))
#undef MMBERT_SELECT_GROUP
    a.n = n;
    a.bnd = _mm512_reduce_max_pd(vb);
    // Sentinels after n (never win: deficit -inf).
    _mm512_storeu_pd(aw + n, _mm512_setzero_pd());
    _mm512_storeu_pd(ac + n, _mm512_set1_pd(kInf));
    _mm512_storeu_pd(aB + n, _mm512_setzero_pd());
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(aps + n), _mm256_setzero_si256());
  }

  MMBERT_AVX512 static double scan_max(const Level &a, double x) {
    const __m512d vx = _mm512_set1_pd(x);
    __m512d m = _mm512_set1_pd(-kInf);
    for (int k = 0; k < a.n; k += 8) m = _mm512_max_pd(m, u8(a, k, vx));  // padding: -inf
    return _mm512_reduce_max_pd(m);
  }

  // Argmax over a set of any size (memory-resident counts): the lowest slot among equal maxima.
  MMBERT_AVX512 static int argmax(const Level &a, double x, double &m) {
    const __m512d vx = _mm512_set1_pd(x);
    __m512d b = _mm512_set1_pd(-kInf);
    __m512d p = _mm512_setr_pd(0, 1, 2, 3, 4, 5, 6, 7), bi = p;
    const __m512d eight = _mm512_set1_pd(8.0);
    for (int k = 0; k < a.n; k += 8) {
      const __m512d d = u8(a, k, vx);
      const __mmask8 g = _mm512_cmp_pd_mask(d, b, _CMP_GT_OQ);  // strict: first of equals per lane
      b = _mm512_mask_mov_pd(b, g, d);
      bi = _mm512_mask_mov_pd(bi, g, p);
      p = _mm512_add_pd(p, eight);
    }
    m = _mm512_reduce_max_pd(b);
    const __mmask8 eq = _mm512_cmp_pd_mask(b, _mm512_set1_pd(m), _CMP_EQ_OQ);
    return static_cast<int>(_mm512_mask_reduce_min_pd(eq, bi));
  }

  // NV vectors of candidates with their counts in registers. Each step needs the deficits with the
  // previous step's pick applied: both versions (picked or not: w*x - c and w*x - (c + 1), each
  // rounded once like megatron's) are computed from the counts before that pick, off the critical
  // path, and blended by the pick's mask; ties (more than one lane equal to the maximum) fall back
  // to the lowest slot.
  template <int NV, class Emit>
  MMBERT_AVX512 static int64_t inner_regs(Level &in, int64_t t, int64_t end, int64_t start,
                                          Emit &emit) {
    __m512d w[NV], c[NV], bb[NV];
    __mmask8 oh[NV];
    for (int v = 0; v < NV; ++v) {
      w[v] = _mm512_loadu_pd(&in.w[8 * v]);
      c[v] = _mm512_loadu_pd(&in.c[8 * v]);
      bb[v] = HasB ? _mm512_loadu_pd(&in.B[8 * v]) : _mm512_setzero_pd();
      oh[v] = 0;
    }
    const __m512d one = _mm512_set1_pd(1.0);
    const double BND = in.BND;
    for (; t < end; ++t) {
      const __m512d vx = _mm512_set1_pd(xval(t, start));
      __m512d d[NV];
      for (int v = 0; v < NV; ++v) {
        __m512d tx = _mm512_mul_pd(w[v], vx);
        if (HasB) tx = _mm512_add_pd(bb[v], tx);
        const __m512d not_picked = _mm512_sub_pd(tx, c[v]);
        const __m512d picked = _mm512_sub_pd(tx, _mm512_add_pd(c[v], one));
        d[v] = _mm512_mask_blend_pd(oh[v], not_picked, picked);
        c[v] = _mm512_mask_add_pd(c[v], oh[v], c[v], one);
      }
      __m512d mx = d[0];
      for (int v = 1; v < NV; ++v) mx = _mm512_max_pd(mx, d[v]);
      mx = _mm512_max_pd(mx, _mm512_shuffle_f64x2(mx, mx, 0x4E));
      mx = _mm512_max_pd(mx, _mm512_shuffle_f64x2(mx, mx, 0xB1));
      mx = _mm512_max_pd(mx, _mm512_permute_pd(mx, 0x55));  // every lane: the maximum
      uint64_t eq = 0;
      for (int v = 0; v < NV; ++v) {
        oh[v] = _mm512_cmp_pd_mask(d[v], mx, _CMP_EQ_OQ);
        eq |= static_cast<uint64_t>(oh[v]) << (8 * v);
      }
      if (__builtin_expect((eq & (eq - 1)) != 0, 0)) {  // an exact tie: the lowest slot wins
        const uint64_t bit = eq & (0 - eq);
        for (int v = 0; v < NV; ++v) oh[v] = static_cast<__mmask8>(bit >> (8 * v));
      }
      const double m = _mm512_cvtsd_f64(mx);
      if (__builtin_expect(!(m > BND), 0)) {
        for (int v = 0; v < NV; ++v) _mm512_storeu_pd(&in.c[8 * v], c[v]);
        return t;
      }
      emit(__builtin_ctzll(eq), t, m);
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_pd(&in.c[8 * v], _mm512_mask_add_pd(c[v], oh[v], c[v], one));
    return t;
  }

  template <class Emit>
  MMBERT_AVX512 static int64_t inner(Level &in, int64_t t, int64_t end, int64_t start, Emit &emit) {
    switch ((in.n + 7) / 8) {
      case 0:
      case 1: return inner_regs<1>(in, t, end, start, emit);
      case 2: return inner_regs<2>(in, t, end, start, emit);
      case 3: return inner_regs<3>(in, t, end, start, emit);
      case 4: return inner_regs<4>(in, t, end, start, emit);
      default: break;
    }
    return inner_memory<Avx512Kernel>(in, t, end, start, emit);
  }
};
#undef MMBERT_AVX512

#define MMBERT_AVX2 __attribute__((target("avx2,popcnt")))

// Tables for AVX2 compression (AVX2 has no compress instruction): for each 4-bit keep mask, the
// permutation that moves the kept doubles (pairs of 32-bit lanes) to the front, and the byte
// shuffle that does the same for four int32 slots.
struct Avx2Tables {
  alignas(32) int32_t dbl[16][8];
  alignas(16) uint8_t i32[16][16];
  Avx2Tables() {
    for (int m = 0; m < 16; ++m) {
      int n = 0;
      for (int l = 0; l < 4; ++l) {
        if (!((m >> l) & 1)) continue;
        dbl[m][2 * n] = 2 * l;
        dbl[m][2 * n + 1] = 2 * l + 1;
        for (int b = 0; b < 4; ++b) i32[m][4 * n + b] = static_cast<uint8_t>(4 * l + b);
        ++n;
      }
      for (; n < 4; ++n) {  // the tail is overwritten by the next group (or is padding)
        dbl[m][2 * n] = 0;
        dbl[m][2 * n + 1] = 1;
        for (int b = 0; b < 4; ++b) i32[m][4 * n + b] = static_cast<uint8_t>(b);
      }
    }
  }
};
inline const Avx2Tables &avx2_tables() {
  static const Avx2Tables t;
  return t;
}

// AVX2: 4 deficits per vector; the innermost set's counts held in up to 8 registers (24+ ymm
// values in flight: the compiler spills some, off the step-to-step path).
template <bool HasB>
struct Avx2Kernel {

  MMBERT_AVX2 static inline __m256d u4(const double *w, const double *c, const double *B, int k,
                                       __m256d vx) {
    const __m256d wx = _mm256_mul_pd(_mm256_loadu_pd(w + k), vx);
    const __m256d t = HasB ? _mm256_add_pd(_mm256_loadu_pd(B + k), wx) : wx;
    return _mm256_sub_pd(t, _mm256_loadu_pd(c + k));
  }

  MMBERT_AVX2 static void select(const Level &p, Level &a, double x, double cutoff, bool full) {
    const Avx2Tables &tab = avx2_tables();
    const double *pw = p.w.data(), *pc = p.c.data(), *pB = p.B.data();
    double *aw = a.w.data(), *ac = a.c.data(), *aB = a.B.data();
    int32_t *aps = a.ps.data();
    const int pn = p.n;
    const __m256d vx = _mm256_set1_pd(x);
    const __m256d vcut = _mm256_set1_pd(full ? -kInf : cutoff);
    const __m256d ninf = _mm256_set1_pd(-kInf);
    __m256d vb = ninf;
    __m128i slot = _mm_setr_epi32(0, 1, 2, 3);
    const __m128i four = _mm_set1_epi32(4);
    int n = 0;
    for (int k = 0; k < pn; k += 4) {
      // Lanes past the parent's end (its padding: deficit -inf) are never kept; as left-out bounds
      // they are -inf, which leaves the maximum alone.
      const int valid = pn - k >= 4 ? 0xF : (1 << (pn - k)) - 1;
      const __m256d u = u4(pw, pc, pB, k, vx);
      const __m256d keep = _mm256_cmp_pd(u, vcut, _CMP_GE_OQ);
      const int mk = _mm256_movemask_pd(keep) & valid;
      vb = _mm256_max_pd(vb, _mm256_blendv_pd(u, ninf, keep));
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i *>(tab.dbl[mk]));
      _mm256_storeu_pd(aw + n, _mm256_castps_pd(_mm256_permutevar8x32_ps(
                                   _mm256_castpd_ps(_mm256_loadu_pd(pw + k)), perm)));
      _mm256_storeu_pd(ac + n, _mm256_castps_pd(_mm256_permutevar8x32_ps(
                                   _mm256_castpd_ps(_mm256_loadu_pd(pc + k)), perm)));
      if (HasB) {
        _mm256_storeu_pd(aB + n, _mm256_castps_pd(_mm256_permutevar8x32_ps(
                                     _mm256_castpd_ps(_mm256_loadu_pd(pB + k)), perm)));
      }
      const __m128i sh = _mm_load_si128(reinterpret_cast<const __m128i *>(tab.i32[mk]));
      _mm_storeu_si128(reinterpret_cast<__m128i *>(aps + n), _mm_shuffle_epi8(slot, sh));
      slot = _mm_add_epi32(slot, four);
      n += __builtin_popcount(mk);
    }
    a.n = n;
    vb = _mm256_max_pd(vb, _mm256_permute2f128_pd(vb, vb, 1));
    vb = _mm256_max_pd(vb, _mm256_permute_pd(vb, 5));
    a.bnd = _mm256_cvtsd_f64(vb);
    a.pad();
  }

  MMBERT_AVX2 static double scan_max(const Level &a, double x) {
    const __m256d vx = _mm256_set1_pd(x);
    __m256d m = _mm256_set1_pd(-kInf);
    for (int k = 0; k < a.n; k += 4) m = _mm256_max_pd(m, u4(a.w.data(), a.c.data(), a.B.data(), k, vx));
    m = _mm256_max_pd(m, _mm256_permute2f128_pd(m, m, 1));
    m = _mm256_max_pd(m, _mm256_permute_pd(m, 5));
    return _mm256_cvtsd_f64(m);
  }

  // Argmax over a set of any size (memory-resident counts): the lowest slot among equal maxima.
  MMBERT_AVX2 static int argmax(const Level &a, double x, double &m) {
    const double *w = a.w.data(), *c = a.c.data(), *B = a.B.data();
    const __m256d vx = _mm256_set1_pd(x);
    __m256d b = _mm256_set1_pd(-kInf);
    __m256d p = _mm256_setr_pd(0, 1, 2, 3), bi = p;
    const __m256d step = _mm256_set1_pd(4.0);
    for (int k = 0; k < a.n; k += 4) {
      const __m256d d = u4(w, c, B, k, vx);
      const __m256d g = _mm256_cmp_pd(d, b, _CMP_GT_OQ);  // strict: first of equals per lane
      b = _mm256_blendv_pd(b, d, g);
      bi = _mm256_blendv_pd(bi, p, g);
      p = _mm256_add_pd(p, step);
    }
    double v[4], i[4];
    _mm256_storeu_pd(v, b);
    _mm256_storeu_pd(i, bi);
    int best = 0;
    for (int l = 1; l < 4; ++l) {
      if (v[l] > v[best] || (v[l] == v[best] && i[l] < i[best])) best = l;
    }
    m = v[best];
    return static_cast<int>(i[best]);
  }

  // As Avx512Kernel::inner_regs: both possible deficit vectors precomputed, blended by the last
  // pick's lane mask; the maximum broadcast to every lane; ties fall back to the lowest slot.
  template <int NV, class Emit>
  MMBERT_AVX2 static int64_t inner_regs(Level &in, int64_t t, int64_t end, int64_t start,
                                        Emit &emit) {
    __m256d w[NV], c[NV], bb[NV], oh[NV];
    for (int v = 0; v < NV; ++v) {
      w[v] = _mm256_loadu_pd(&in.w[4 * v]);
      c[v] = _mm256_loadu_pd(&in.c[4 * v]);
      bb[v] = HasB ? _mm256_loadu_pd(&in.B[4 * v]) : _mm256_setzero_pd();
      oh[v] = _mm256_setzero_pd();
    }
    const __m256d one = _mm256_set1_pd(1.0);
    const __m256i lane_bit = _mm256_setr_epi64x(1, 2, 4, 8);
    const double BND = in.BND;
    for (; t < end; ++t) {
      const __m256d vx = _mm256_set1_pd(xval(t, start));
      __m256d d[NV];
      for (int v = 0; v < NV; ++v) {
        __m256d tx = _mm256_mul_pd(w[v], vx);
        if (HasB) tx = _mm256_add_pd(bb[v], tx);
        const __m256d not_picked = _mm256_sub_pd(tx, c[v]);
        const __m256d picked = _mm256_sub_pd(tx, _mm256_add_pd(c[v], one));
        d[v] = _mm256_blendv_pd(not_picked, picked, oh[v]);
        c[v] = _mm256_add_pd(c[v], _mm256_and_pd(oh[v], one));
      }
      __m256d mx = d[0];
      for (int v = 1; v < NV; ++v) mx = _mm256_max_pd(mx, d[v]);
      mx = _mm256_max_pd(mx, _mm256_permute2f128_pd(mx, mx, 1));
      mx = _mm256_max_pd(mx, _mm256_permute_pd(mx, 5));  // every lane: the maximum
      uint32_t eq = 0;
      for (int v = 0; v < NV; ++v) {
        oh[v] = _mm256_cmp_pd(d[v], mx, _CMP_EQ_OQ);
        eq |= static_cast<uint32_t>(_mm256_movemask_pd(oh[v])) << (4 * v);
      }
      if (__builtin_expect((eq & (eq - 1)) != 0, 0)) {  // an exact tie: the lowest slot wins
        const uint32_t bit = eq & (0u - eq);
        for (int v = 0; v < NV; ++v) {
          const __m256i bits = _mm256_set1_epi64x(static_cast<int64_t>((bit >> (4 * v)) & 0xF));
          oh[v] = _mm256_castsi256_pd(
              _mm256_cmpeq_epi64(_mm256_and_si256(bits, lane_bit), lane_bit));
        }
      }
      const double m = _mm256_cvtsd_f64(mx);
      if (__builtin_expect(!(m > BND), 0)) {
        for (int v = 0; v < NV; ++v) _mm256_storeu_pd(&in.c[4 * v], c[v]);
        return t;
      }
      emit(__builtin_ctz(eq), t, m);
    }
    for (int v = 0; v < NV; ++v) {
      _mm256_storeu_pd(&in.c[4 * v], _mm256_add_pd(c[v], _mm256_and_pd(oh[v], one)));
    }
    return t;
  }

  template <class Emit>
  MMBERT_AVX2 static int64_t inner(Level &in, int64_t t, int64_t end, int64_t start, Emit &emit) {
    switch ((in.n + 3) / 4) {
      case 0:
      case 1: return inner_regs<1>(in, t, end, start, emit);
      case 2: return inner_regs<2>(in, t, end, start, emit);
      case 3: return inner_regs<3>(in, t, end, start, emit);
      case 4: return inner_regs<4>(in, t, end, start, emit);
      case 5: return inner_regs<5>(in, t, end, start, emit);
      case 6: return inner_regs<6>(in, t, end, start, emit);
      case 7: return inner_regs<7>(in, t, end, start, emit);
      case 8: return inner_regs<8>(in, t, end, start, emit);
      default: break;
    }
    return inner_memory<Avx2Kernel>(in, t, end, start, emit);
  }
};
#undef MMBERT_AVX2
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#else
inline bool cpu_has_avx512() { return false; }
inline bool cpu_has_avx2() { return false; }
#endif

// The kernels this CPU can run, fastest first ("generic" always).
inline std::vector<std::string> available_kernels() {
  std::vector<std::string> k;
  if (cpu_has_avx512()) k.push_back("avx512");
  if (cpu_has_avx2()) k.push_back("avx2");
  k.push_back("generic");
  return k;
}

// Default block lengths for n active datasets, outermost first: 12 innermost, x6 outwards while a
// level's block stays under a twelfth of n (1833 datasets: 432, 72, 12).
inline std::vector<int> default_block_lengths(int n) {
  std::vector<int> ks{12};
  while (static_cast<int64_t>(ks.back()) * 12 < n) ks.push_back(ks.back() * 6);
  std::reverse(ks.begin(), ks.end());
  return ks;
}

// One pick at step t: slot k of the innermost level (whose own count the kernel has updated),
// with deficit m. The outer levels' counts follow through each slot's parent slot, down to level 0
// (whose slots map to dataset indices). The depth is a template parameter (1-4 levels; 0: deeper
// schedules, a run-time loop) so the walk unrolls and its pointers stay in registers; they point
// into the levels' arrays, which never move.
template <typename IdxT, int Depth>
struct Emitter {
  int D;
  int32_t *ps[8];
  double *c[8];
  IdxT *out_idx;
  int64_t *out_sample;
  const int64_t *base;  // per level-0 slot: the dataset's global count minus its phase count
  double mlast;         // the last winning deficit

  inline void operator()(int k, int64_t t, double m) {
    const int d = Depth > 0 ? Depth : D;
    for (int q = d; q >= 1; --q) {
      k = ps[q][k];
      c[q - 1][k] += 1.0;
    }
    out_idx[t] = static_cast<IdxT>(ps[0][k]);
    if (out_sample) out_sample[t] = base[k] + static_cast<int64_t>(c[0][k]) - 1;  // null: not wanted
    mlast = m;
  }
};

template <typename IdxT, bool HasB, template <bool> class KernelT>
class BlockBlender {
  using Kernel = KernelT<HasB>;

 public:
  // lengths: block length per level, outermost first (at least one level). The caller's count
  // arrays are read here and written back by run(); outputs go to out_idx/out_sample[t] for the
  // segment's local steps t (already offset to the phase).
  BlockBlender(const Segment &seg, const std::vector<int> &lengths, const std::vector<int> &active,
               const double *B, double *count_phase_d, int64_t *count_phase, int64_t *count_global,
               IdxT *out_idx, int64_t *out_sample, double max_margin, int64_t begin = -1)
      : seg_(seg), begin_(begin < 0 ? seg.start : begin), D_(static_cast<int>(lengths.size())), max_margin_(max_margin), count_phase_d_(count_phase_d),
        count_phase_(count_phase), count_global_(count_global), out_idx_(out_idx),
        out_sample_(out_sample), lv_(lengths.size() + 1) {
    if (D_ < 1 || D_ > 7) throw std::invalid_argument("between 1 and 7 block levels");
    const int n0 = static_cast<int>(active.size());
    for (auto &l : lv_) l.allocate(n0);
    Level &root = lv_[0];
    base_.resize(n0);
    for (int k = 0; k < n0; ++k) {
      const int i = active[k];
      root.w[k] = seg.w[i];
      root.c[k] = count_phase_d[i];
      root.B[k] = B[i];
      root.ps[k] = i;
      base_[k] = count_global[i] - count_phase[i];  // sample index = base + count in the phase
    }
    root.n = n0;
    root.pad();
    root.end = seg.end;
    for (int q = 1; q <= D_; ++q) {
      lv_[q].K = std::max(1, lengths[q - 1]);
      lv_[q].delta = std::min(8.0 / std::max(n0, 1), max_margin_);
    }
  }

  void run() {
    switch (D_) {
      case 1: return run_depth<1>();
      case 2: return run_depth<2>();
      case 3: return run_depth<3>();
      case 4: return run_depth<4>();
      default: return run_depth<0>();
    }
  }

  const std::vector<Level> &levels() const { return lv_; }

 private:
  template <int Depth>
  void run_depth() {
    Emitter<IdxT, Depth> emit;
    emit.D = D_;
    for (int q = 0; q <= D_; ++q) {
      emit.ps[q] = lv_[q].ps.data();
      emit.c[q] = lv_[q].c.data();
    }
    emit.out_idx = out_idx_;
    emit.out_sample = out_sample_;
    emit.base = base_.data();
    const int64_t start = seg_.start;
    int64_t t = begin_;  // targets count from start; steps run from begin_
    emit.mlast = Kernel::scan_max(lv_[0], xval(t, start));
    int valid = 0;  // levels 1..valid hold current selections
    while (t < seg_.end) {
      int d = 1;
      while (d <= valid && lv_[d].end > t) ++d;
      for (int q = d; q <= valid; ++q) {
        if (lv_[q].end <= t) lv_[q].delta = std::max(lv_[q].delta * kShrink, kDeltaMin);
      }
      for (int q = d; q <= D_; ++q) rebuild(q, t, emit.mlast);
      valid = D_;
      Level &in = lv_[D_];
      const int64_t stop = Kernel::inner(in, t, in.end, start, emit);
      if (stop < in.end) {
        // Which level left out too much? The innermost level q whose own set still certifies its
        // maximum (> its BND) holds the winner; the level just inside it is to blame.
        const double x = xval(stop, start);
        int q = D_ - 1;
        for (; q >= 1; --q) {
          lv_[q].read += lv_[q].n;
          if (Kernel::scan_max(lv_[q], x) > lv_[q].BND) break;
        }
        Level &blame = lv_[q + 1];
        ++blame.aborts;
        if (blame.delta >= max_margin_) {
          blame.full_next = true;
        } else {
          blame.delta = std::min(blame.delta * kGrow, max_margin_);
        }
        valid = q;
      }
      t = stop;
    }
    // Level 0 counted every pick (exact integers in doubles): hand the counts back.
    const Level &root = lv_[0];
    for (int k = 0; k < root.n; ++k) {
      const int i = root.ps[k];
      count_phase_d_[i] = root.c[k];
      count_phase_[i] = static_cast<int64_t>(root.c[k]);
      count_global_[i] = base_[k] + count_phase_[i];
    }
  }

  // Tuned at L = 1833 (benchmarks/index_builder_throughput.py): stops cost little, so the margin
  // may run tight (about one block in 300 stops early at each level).
  static constexpr double kGrow = 1.25, kShrink = 0.993;
  static constexpr double kDeltaMin = 1e-12;

  void rebuild(int q, int64_t t, double mlast) {
    Level &a = lv_[q];
    const Level &p = lv_[q - 1];
    a.end = std::min(std::min(t + a.K, p.end), seg_.end);
    const double x = xval(a.end - 1, seg_.start);
    Kernel::select(p, a, x, mlast - a.delta, a.full_next);
    a.full += a.full_next;
    a.full_next = false;
    a.BND = std::max(a.bnd, p.BND);
    ++a.rebuilds;
    a.read += p.n;
  }

  const Segment seg_;
  const int64_t begin_;  // the first step run() takes (seg_.start unless resumed mid-segment)
  const int D_;
  // The margin's cap: a level blamed with its margin there keeps everything in its next selection
  // (so every step makes progress whatever the input). Deficits stay within about one of each other
  // (the prefix bound), so the default of 8 is never reached in practice.
  const double max_margin_;
  double *count_phase_d_;
  int64_t *count_phase_, *count_global_;
  IdxT *out_idx_;
  int64_t *out_sample_;
  std::vector<Level> lv_;
  std::vector<int64_t> base_;  // per level-0 slot: the dataset's global count minus its phase count
};

}  // namespace blending
