// One-pass statistics of a (B, T, C) activation: the kernel behind outlier_study.stats.fused.FusedReducer.
//
// Per window, the rows are split into one lane per thread (at::parallel_for: torch's own OpenMP pool, so
// no second thread pool competes with the model). A lane reads its rows once, in blocks of kRows rows by
// kTile channels, and keeps:
//   - the key of each |a|: the bit pattern of |a| as an unsigned integer, whose order is the order of
//     the non-negative floats; masked and non-finite entries become kInf (nan / inf counted first);
//   - per channel: the window's column max key; the count and the sums S1..S4 of (a - shift) in float64,
//     the shift being the lane's first valid value of that channel (exact enough when mean >> spread);
//   - for the exact median: the count of keys below a bracket [lo, hi] and every key inside it. The
//     bracket is the previous window's median +- an adaptive spread (or two quantiles of a sample of
//     this window), so it usually holds the median and only a few percent of the keys are written (a
//     vector compress-store on AVX-512). When it misses, one more pass with a bracket from a sample;
//     when that misses too, a histogram pass on the top 16 key bits and a gather pass of the median's
//     bin: the value is exact on every path.
// After a window: the lower median by selection among the bracket's keys; the MA count from the
// count above floor(ma_abs) or, for the ratio rule, from the few columns whose max reaches the
// threshold; the top-k candidates from the columns whose max reaches the k-th largest column max.
// After all windows: per-channel (count, mean, M2) and global (n, mean, M2, M3, M4) of the update from the
// shifted sums (exact binomial algebra in float64), merged into the tap's running state with the reference
// reducer's merge rules, as is the running top-k, so one update costs Python a single call.
//
// Portability: built with -O3 and no -march; on x86-64 with GCC the hot loops are cloned for x86-64-v4
// (AVX-512) and v3 (AVX2) and picked at load time, so one build runs on any node of a cluster. On AVX-512
// the main pass's keys, counts, column maxima and bracket gather of float rows are one hand-written loop
// (`keys_avx512`); OUTLIER_STUDY_FUSED_PORTABLE turns it off, so the tests hold both to the reference.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define OS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OS_CLONES
#endif
#define OS_INLINE inline __attribute__((always_inline))
#define OS_LAMBDA_INLINE __attribute__((always_inline))

namespace {

// A block is kRows rows by up to kTile channels: whole rows of most models, so a block is one contiguous
// stretch of memory that the prefetcher follows; its keys stay in L1/L2, its moment sums in registers.
// (Measured on Zen 4: 4 x 4096 beats 8 x 512 by 1.2-1.6x on tensors that come from L3; 16 rows spill.)
#ifndef OS_ROWS
#define OS_ROWS 4
#endif
#ifndef OS_TILE
#define OS_TILE 4096
#endif
constexpr int kRows = OS_ROWS;
constexpr int64_t kTile = OS_TILE;
constexpr int64_t kLaneMin = 1 << 15;   // below this many elements per lane a window gets fewer lanes
constexpr int kPilot = 8192;            // sampled keys that bracket the median of a window without a hint
constexpr int kPilotRows = 256;         // ... read as runs of channels from this many evenly spaced rows
constexpr int kSelectBins = 4096;       // histogram bins that narrow the median's selection to one bin
// The median bracket around the previous window's median is +-spread (relative): the caller passes the
// spread back in; it doubles after a miss and shrinks by 10% after a hit, within these bounds.
constexpr double kSpreadMin = 1.0 / 64.0, kSpreadMax = 1.0 / 4.0;
// Above this |a| (or shift) a block's moment sums are taken in float64: (a - shift)^4 stays below
// 16 * kWide^4, far inside float's range (the reference reducer's limit too).
constexpr double kWide = 1e8;
constexpr int64_t kFlush = 64;  // rows of float partial moment sums between moves into float64

template <typename W>
struct Bits;
template <>
struct Bits<float> {
  using Key = uint32_t;
  using SKey = int32_t;
  static constexpr int kShift = 16;
  static constexpr Key kInf = 0x7F800000u;
  static constexpr Key kAbs = 0x7FFFFFFFu;
};
template <>
struct Bits<double> {
  using Key = uint64_t;
  using SKey = int64_t;
  static constexpr int kShift = 48;
  static constexpr Key kInf = 0x7FF0000000000000ull;
  static constexpr Key kAbs = 0x7FFFFFFFFFFFFFFFull;
};

template <typename W>
OS_INLINE typename Bits<W>::Key key_of(W v) {
  typename Bits<W>::Key k;
  std::memcpy(&k, &v, sizeof k);
  return k & Bits<W>::kAbs;
}

template <typename W>
W value_of(typename Bits<W>::Key k) {
  W v;
  std::memcpy(&v, &k, sizeof v);
  return v;
}

// The smallest W >= value (ceil) or the largest W <= value (floor), as numpy's dtype rounding then a step.
template <typename W>
W round_to(double value, bool ceil) {
  if (value > static_cast<double>(std::numeric_limits<W>::max())) {
    return ceil ? std::numeric_limits<W>::infinity() : std::numeric_limits<W>::max();
  }
  if (value < -static_cast<double>(std::numeric_limits<W>::max())) {
    return ceil ? -std::numeric_limits<W>::max() : -std::numeric_limits<W>::infinity();
  }
  W v = static_cast<W>(value);
  if (ceil && static_cast<double>(v) < value) v = std::nextafter(v, std::numeric_limits<W>::infinity());
  if (!ceil && static_cast<double>(v) > value) v = std::nextafter(v, -std::numeric_limits<W>::infinity());
  return v;
}

// Per-lane accumulators, kept between calls (per calling thread) so that the hot path allocates nothing.
template <typename W>
struct Lane {
  using Key = typename Bits<W>::Key;
  using SKey = typename Bits<W>::SKey;
  std::vector<Key> keys;          // kRows x kTile keys of the current block
  std::vector<W> vals;            // kRows x kTile converted values (non-float32 or strided input)
  std::vector<uint8_t> mrow;      // kTile mask bytes (broadcast or strided mask)
  std::vector<double> acc;        // 5 x C: count, S1..S4 of (a - shift) per channel, this update
  std::vector<W> part;            // 5 x C: the same over the last < kFlush rows (block_sums)
  std::vector<W> shift;           // C
  std::vector<Key> pending;       // C: 1 while the channel has no shift yet
  int64_t n_pending = 0;
  std::vector<SKey> colmax;       // C: this window's column max key, -1: none
  std::vector<Key> gather;        // keys inside the median bracket (or the median's bin)
  int64_t n_gather = 0;
  std::vector<uint32_t> hist;     // fallback histogram of the top 16 key bits
  int64_t n_nan = 0, n_inf = 0;   // this update
  int64_t n_good = 0, n_below = 0, n_ma = 0, n_hits = 0;  // this window
  bool wide_shift = false;        // a shift above kWide: this update's moment sums go float64
};

template <typename W>
struct Workspace {
  using Key = typename Bits<W>::Key;
  using SKey = typename Bits<W>::SKey;
  std::vector<Lane<W>> lanes;
  std::vector<SKey> wcol;      // C: window column max over lanes
  std::vector<SKey> ucol;      // C: update column max (channel absmax)
  std::vector<SKey> order;     // C: scratch for the k-th column max
  std::vector<Key> select;     // the sample, or the gathered keys of the median's bin
  std::vector<int64_t> bins;   // histogram of the gathered keys (select_gathered)
  std::vector<int64_t> cols;   // candidate columns
};

template <typename W>
Workspace<W>& workspace() {
  static thread_local Workspace<W> ws;
  return ws;
}

template <typename In, typename W>
struct Ctx {
  using Key = typename Bits<W>::Key;
  const In* x;
  int64_t sb, st, sc;
  const uint8_t* m;  // nullptr: every entry valid
  int64_t mb, mt, mc;
  int64_t B, T, C;
  Key lo = 0, span = 0;           // gather keys with key - lo <= span (unsigned)
  Key below = 0;                  // count keys < below
  Key ma_lo = 0, ma_span = 0;     // count keys with key - ma_lo < ma_span: |a| > floor(ma_abs)
  Key wide = 0;                   // the key of kWide
};

template <typename In, typename W>
OS_INLINE const W* load_row(const Ctx<In, W>& cx, W* buf, int64_t b, int64_t t, int64_t c0, int64_t nc) {
  const In* p = cx.x + b * cx.sb + t * cx.st + c0 * cx.sc;
  if constexpr (std::is_same_v<In, W>) {
    if (cx.sc == 1) return p;
  }
  if (cx.sc == 1) {
    for (int64_t c = 0; c < nc; ++c) buf[c] = static_cast<W>(p[c]);
  } else {
    for (int64_t c = 0; c < nc; ++c) buf[c] = static_cast<W>(p[c * cx.sc]);
  }
  return buf;
}

template <typename In, typename W>
OS_INLINE const uint8_t* load_mask(const Ctx<In, W>& cx, uint8_t* buf, int64_t b, int64_t t, int64_t c0,
                                   int64_t nc) {
  const uint8_t* p = cx.m + b * cx.mb + t * cx.mt + c0 * cx.mc;
  if (cx.mc == 1) return p;
  if (cx.mc == 0) {
    std::memset(buf, *p, nc);
  } else {
    for (int64_t c = 0; c < nc; ++c) buf[c] = p[c * cx.mc];
  }
  return buf;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OS_AVX512_GATHER 1
// Keys k[0:n] with key - lo <= span appended to out (16 slots of slack): 16 compares and one compress per
// step, where the scalar loop would take a branch per key. Compress to a register, then a plain store:
// a compressing store to memory is microcoded (slow) on AMD Zen 4.
__attribute__((target("avx512f"))) int64_t gather_avx512(const uint32_t* k, int64_t n, uint32_t lo,
                                                          uint32_t span, uint32_t* out) {
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
  const __m512i vspan = _mm512_set1_epi32(static_cast<int>(span));
  int64_t ng = 0, c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512i v = _mm512_loadu_si512(k + c);
    const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(v, vlo), vspan);
    _mm512_storeu_si512(out + ng, _mm512_maskz_compress_epi32(in, v));
    ng += __builtin_popcount(in);
  }
  for (; c < n; ++c) {
    out[ng] = k[c];
    ng += static_cast<uint32_t>(k[c] - lo) <= span;
  }
  return ng;
}

// Whether the AVX-512 loops run: on a CPU that has it, unless OUTLIER_STUDY_FUSED_PORTABLE is set (the
// portable loops then run everywhere: how the tests hold the two equal on an AVX-512 machine).
bool has_avx512() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f")) &&
                          std::getenv("OUTLIER_STUDY_FUSED_PORTABLE") == nullptr;
  return yes;
}

// What `row_keys` (kStats, no mask) and `gather_block` do to one float row segment, in one loop: the keys
// (stored for the moments), the counts below the bracket and above floor(ma_abs), the column maxima, and
// the bracket's keys appended to out, so no key is read back. Returns how many were appended; n_bad gets
// the non-finite entries (kInf keys).
__attribute__((target("avx512f"))) int64_t keys_avx512(const float* v, int64_t nc, uint32_t* k, int32_t* cm,
                                                       const uint32_t (&lim)[5], uint32_t* out, int64_t& n_below,
                                                       int64_t& n_ma, int64_t& n_bad) {
  const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i below = _mm512_set1_epi32(static_cast<int>(lim[0]));
  const __m512i ma_lo = _mm512_set1_epi32(static_cast<int>(lim[1])), ma_span = _mm512_set1_epi32(static_cast<int>(lim[2]));
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(lim[3])), span = _mm512_set1_epi32(static_cast<int>(lim[4]));
  const __m512i ones = _mm512_set1_epi32(-1);
  __m512i vbelow = _mm512_setzero_si512(), vma = _mm512_setzero_si512();
  __mmask16 bad_any = 0;
  int64_t ng = 0;
  for (int64_t c = 0; c < nc; c += 16) {
    const __mmask16 t = nc - c >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (nc - c)) - 1u);
    const __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi32(t, v + c), abs_bits);
    const __m512i kc = _mm512_min_epu32(a, inf);  // nan -> kInf
    _mm512_mask_storeu_epi32(k + c, t, kc);
    const __mmask16 bad = _mm512_mask_cmpeq_epu32_mask(t, kc, inf);
    bad_any |= bad;
    vbelow = _mm512_mask_sub_epi32(vbelow, _mm512_mask_cmplt_epu32_mask(t, kc, below), vbelow, ones);
    vma = _mm512_mask_sub_epi32(vma, _mm512_mask_cmplt_epu32_mask(t, _mm512_sub_epi32(kc, ma_lo), ma_span), vma, ones);
    const __m512i s = _mm512_mask_mov_epi32(kc, bad, ones);  // kInf -> -1: no element
    _mm512_mask_storeu_epi32(cm + c, t, _mm512_max_epi32(_mm512_maskz_loadu_epi32(t, cm + c), s));
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(t, _mm512_sub_epi32(kc, lo), span);
    _mm512_storeu_si512(out + ng, _mm512_maskz_compress_epi32(in, kc));
    ng += __builtin_popcount(in);
  }
  n_below += _mm512_reduce_add_epi32(vbelow);
  n_ma += _mm512_reduce_add_epi32(vma);
  n_bad = 0;
  if (bad_any) {
    for (int64_t c = 0; c < nc; ++c) n_bad += k[c] == 0x7f800000u;
  }
  return ng;
}
#endif

// Whether the main pass's rows go through `keys_avx512`, which also gathers the bracket's keys: float rows
// (float32 input, or 16-bit input converted) without a mask, on a CPU with AVX-512.
template <typename W, bool kMask>
OS_INLINE bool fused_rows() {
#ifdef OS_AVX512_GATHER
  if constexpr (!kMask && std::is_same_v<W, float>) return has_avx512();
#endif
  return false;
}

// Keys of one row segment: masked and non-finite entries become kInf. With kStats (the main pass only, so
// nothing is counted twice) the same loop counts valid entries, finite ones, keys below the bracket and
// above floor(ma_abs), and raises the column maxima `cm`; nan and inf are told apart in a second loop only
// in a row that has some. (Bitwise selects and no more reductions than these: GCC vectorizes it so.)
// Where `fused_rows` holds, `keys_avx512` does all of this and the bracket's gather in one loop.
template <typename In, typename W, bool kMask, bool kStats>
OS_INLINE void row_keys(const Ctx<In, W>& cx, Lane<W>& L, const W* __restrict__ v, const uint8_t* __restrict__ m,
                        int64_t c0, int64_t nc, typename Bits<W>::Key* __restrict__ k) {
  using Key = typename Bits<W>::Key;
  using SKey = typename Bits<W>::SKey;
  constexpr Key kInf = Bits<W>::kInf;
  const Key below_key = cx.below, ma_lo = cx.ma_lo, ma_span = cx.ma_span;
#ifdef OS_AVX512_GATHER
  if constexpr (kStats && !kMask && std::is_same_v<W, float>) {
    if (fused_rows<W, kMask>()) {
      const int64_t need = L.n_gather + nc + 16;  // the compressing stores write 16 slots
      if (need > static_cast<int64_t>(L.gather.size())) {
        L.gather.resize(std::max<int64_t>(2 * L.gather.size(), need));
      }
      const uint32_t lim[5] = {below_key, ma_lo, ma_span, cx.lo, cx.span};
      int64_t bad = 0;
      L.n_gather += keys_avx512(v, nc, k, L.colmax.data() + c0, lim, L.gather.data() + L.n_gather, L.n_below,
                                L.n_ma, bad);
      L.n_good += nc - bad;
      if (bad) {
        int64_t nan = 0;
        for (int64_t c = 0; c < nc; ++c) nan += key_of(v[c]) > kInf;
        L.n_nan += nan;
        L.n_inf += bad - nan;
      }
      return;
    }
  }
#endif
  SKey* __restrict__ cm = L.colmax.data() + c0;
  Key valid = 0, good = 0, below = 0, ma = 0;
  for (int64_t c = 0; c < nc; ++c) {
    const Key a = key_of(v[c]);
    const Key ok = kMask ? static_cast<Key>(m[c] != 0) : Key(1);
    const Key kc = (ok & static_cast<Key>(a < kInf)) ? a : kInf;
    k[c] = kc;
    if constexpr (kStats) {
      valid += ok;
      good += static_cast<Key>(kc != kInf);
      below += static_cast<Key>(kc < below_key);
      ma += static_cast<Key>(static_cast<Key>(kc - ma_lo) < ma_span);
      const SKey s = static_cast<SKey>(kc) | -static_cast<SKey>(kc == kInf);  // kInf -> -1: no element
      cm[c] = std::max(cm[c], s);
    }
  }
  if constexpr (kStats) {
    L.n_good += static_cast<int64_t>(good);
    L.n_below += static_cast<int64_t>(below);
    L.n_ma += static_cast<int64_t>(ma);
    if (valid != good) {  // non-finite valid entries in this row
      Key nan = 0;
      for (int64_t c = 0; c < nc; ++c) {
        const Key ok = kMask ? static_cast<Key>(m[c] != 0) : Key(1);
        nan += ok & static_cast<Key>(key_of(v[c]) > kInf);
      }
      L.n_nan += static_cast<int64_t>(nan);
      L.n_inf += static_cast<int64_t>(valid - good - nan);
    }
  }
}

// Calls fn(rows, keys, nr, c0, nc) for each block of rows [t0, t1) of window b: kRows row pointers (padded
// with the first one), and kRows x kTile keys (padding rows all kInf).
template <typename In, typename W, bool kMask, bool kStats, typename Fn>
OS_INLINE void for_blocks(const Ctx<In, W>& cx, Lane<W>& L, int64_t b, int64_t t0, int64_t t1, Fn&& fn) {
  using Key = typename Bits<W>::Key;
  Key* keys = L.keys.data();
  for (int64_t t = t0; t < t1; t += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, t1 - t));
    for (int64_t c0 = 0; c0 < cx.C; c0 += kTile) {
      const int64_t nc = std::min(kTile, cx.C - c0);
      const W* rows[kRows];
      for (int r = 0; r < nr; ++r) {
        rows[r] = load_row(cx, L.vals.data() + r * kTile, b, t + r, c0, nc);
        const uint8_t* m = kMask ? load_mask(cx, L.mrow.data(), b, t + r, c0, nc) : nullptr;
        row_keys<In, W, kMask, kStats>(cx, L, rows[r], m, c0, nc, keys + r * kTile);
      }
      for (int r = nr; r < kRows; ++r) {
        rows[r] = rows[0];
        std::fill(keys + r * kTile, keys + r * kTile + nc, Bits<W>::kInf);
      }
      fn(rows, keys, nr, c0, nc);
    }
  }
}


// Appends the keys of a block that fall in [lo, lo + span] to the lane's gather buffer.
template <typename W>
OS_INLINE void gather_block(Lane<W>& L, const typename Bits<W>::Key* keys, int nr, int64_t nc,
                            typename Bits<W>::Key lo, typename Bits<W>::Key span) {
  using Key = typename Bits<W>::Key;
  const int64_t need = L.n_gather + static_cast<int64_t>(nr) * nc + 16;
  if (need > static_cast<int64_t>(L.gather.size())) {
    L.gather.resize(std::max<int64_t>(2 * L.gather.size(), need));
  }
  Key* out = L.gather.data();
  int64_t ng = L.n_gather;
#ifdef OS_AVX512_GATHER
  if constexpr (std::is_same_v<Key, uint32_t>) {
    if (has_avx512()) {
      for (int r = 0; r < nr; ++r) ng += gather_avx512(keys + r * kTile, nc, lo, span, out + ng);
      L.n_gather = ng;
      return;
    }
  }
#endif
  for (int r = 0; r < nr; ++r) {
    const Key* k = keys + r * kTile;
    for (int64_t c = 0; c < nc; ++c) {  // branch-free: always store, advance on a hit
      out[ng] = k[c];
      ng += static_cast<Key>(k[c] - lo) <= span;
    }
  }
  L.n_gather = ng;
}

// Adds the count and the sums S1..S4 of (a - shift) of one block's valid entries, per channel, to sums
// of type A at acc (rows C apart). A is the input's own float type (16 lanes per instruction where float64
// has 8, and a sum table a quarter the size of float64 loads and stores): main_pass moves those partial sums
// into float64 every kFlush rows, so a float sum never holds more than kFlush terms, the float32 precision of
// the reference reducer's block sums. A block where |a| or a shift passes kWide sums straight into float64,
// since a float fourth power of (a - shift) could overflow there.
template <typename W, typename A>
OS_INLINE void block_sums(const W* const* rows, const typename Bits<W>::Key* __restrict__ keys,
                          const W* __restrict__ shift, A* acc, int64_t C, int64_t nc) {
  constexpr typename Bits<W>::Key kInf = Bits<W>::kInf;
  A* __restrict__ n = acc;  // restrict: A may be the input's type, and these never alias it
  A* __restrict__ s1 = acc + C;
  A* __restrict__ s2 = acc + 2 * C;
  A* __restrict__ s3 = acc + 3 * C;
  A* __restrict__ s4 = acc + 4 * C;
#pragma GCC ivdep  // the sums never alias the rows: no run-time alias checks (GCC allows 10, this needs 30)
  for (int64_t c = 0; c < nc; ++c) {
    const A sh = static_cast<A>(shift[c]);
    A bn = 0, b1 = 0, b2 = 0, b3 = 0, b4 = 0;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const bool g = keys[r * kTile + c] != kInf;
      const A v = static_cast<A>(rows[r][c]);  // loaded unconditionally: no branch
      const A d = g ? v - sh : A(0);
      const A d2 = d * d;
      bn += g ? A(1) : A(0);
      b1 += d;
      b2 += d2;
      b3 += d2 * d;
      b4 += d2 * d2;
    }
    n[c] += bn;
    s1[c] += b1;
    s2[c] += b2;
    s3[c] += b3;
    s4[c] += b4;
  }
}

// Whether a block holds a valid finite |a| above kWide.
template <typename In, typename W>
OS_INLINE bool any_wide(const Ctx<In, W>& cx, const typename Bits<W>::Key* keys, int nr, int64_t nc) {
  using Key = typename Bits<W>::Key;
  Key n = 0;
  for (int r = 0; r < nr; ++r) {
    for (int64_t c = 0; c < nc; ++c) {
      const Key k = keys[r * kTile + c];
      n += static_cast<Key>(k > cx.wide) & static_cast<Key>(k != Bits<W>::kInf);
    }
  }
  return n != 0;
}

// Moves a lane's partial sums into its float64 sums.
template <typename W>
OS_INLINE void flush_sums(Lane<W>& L) {
  double* acc = L.acc.data();
  W* part = L.part.data();
  for (size_t i = 0, n = L.part.size(); i < n; ++i) {
    acc[i] += static_cast<double>(part[i]);
    part[i] = W(0);
  }
}

// The one pass: keys, column max, counts, the median bracket's keys, and (kMoments) the shifted sums.
template <typename In, typename W, bool kMask, bool kMoments>
OS_INLINE void main_pass(const Ctx<In, W>& cx, Lane<W>& L, int64_t b, int64_t t0, int64_t t1) {
  using Key = typename Bits<W>::Key;
  constexpr Key kInf = Bits<W>::kInf;
  const int64_t C = cx.C;
  double* acc = L.acc.data();
  W* part = L.part.data();
  // A block can hold |a| > kWide only if it holds keys above floor(ma_abs) (counted anyway) when that
  // floor is below kWide; only such blocks are scanned for them.
  const bool ma_covers_wide = cx.ma_lo <= cx.wide;
  int64_t ma_seen = L.n_ma, rows_since_flush = 0;
  for_blocks<In, W, kMask, true>(cx, L, b, t0, t1, [&](const W* const* rows, const Key* keys, int nr,
                                                       int64_t c0, int64_t nc) OS_LAMBDA_INLINE {
    if constexpr (kMoments) {
      W* shift = L.shift.data() + c0;
      if (L.n_pending > 0) {
        Key* pend = L.pending.data() + c0;
        Key took = 0, wide_took = 0;
        for (int r = 0; r < nr; ++r) {
          const Key* k = keys + r * kTile;
          for (int64_t c = 0; c < nc; ++c) {
            const W v = rows[r][c];
            const Key take = static_cast<Key>(k[c] != kInf) & pend[c];
            shift[c] = take ? v : shift[c];
            pend[c] &= take ^ Key(1);
            took += take;
            wide_took |= take & static_cast<Key>(k[c] > cx.wide);
          }
        }
        L.n_pending -= static_cast<int64_t>(took);
        L.wide_shift = L.wide_shift || wide_took != 0;
      }
      const bool wide = L.wide_shift || ((L.n_ma != ma_seen || !ma_covers_wide) && any_wide(cx, keys, nr, nc));
      ma_seen = L.n_ma;
      if (wide) {
        block_sums<W, double>(rows, keys, shift, acc + c0, C, nc);
      } else {
        block_sums<W, W>(rows, keys, shift, part + c0, C, nc);
      }
      if (c0 + nc == C && (rows_since_flush += kRows) >= kFlush) {
        flush_sums(L);
        rows_since_flush = 0;
      }
    }
    if (!fused_rows<W, kMask>()) gather_block(L, keys, nr, nc, cx.lo, cx.span);
  });
  if constexpr (kMoments) flush_sums(L);
}

// Fallback passes over a lane's rows: a new bracket (count below, gather inside), a histogram of the top
// key bits, a gather of one key range, a count.
template <typename In, typename W, bool kMask>
OS_INLINE void bracket_pass(const Ctx<In, W>& cx, Lane<W>& L, int64_t b, int64_t t0, int64_t t1) {
  using Key = typename Bits<W>::Key;
  for_blocks<In, W, kMask, false>(cx, L, b, t0, t1, [&](const W* const*, const Key* keys, int nr, int64_t, int64_t nc)
                                                 OS_LAMBDA_INLINE {
    Key below = 0;
    for (int r = 0; r < nr; ++r) {
      for (int64_t c = 0; c < nc; ++c) below += static_cast<Key>(keys[r * kTile + c] < cx.below);
    }
    L.n_below += below;
    gather_block(L, keys, nr, nc, cx.lo, cx.span);
  });
}

template <typename In, typename W, bool kMask>
OS_INLINE void hist_pass(const Ctx<In, W>& cx, Lane<W>& L, int64_t b, int64_t t0, int64_t t1) {
  using Key = typename Bits<W>::Key;
  uint32_t* h = L.hist.data();
  for_blocks<In, W, kMask, false>(cx, L, b, t0, t1, [&](const W* const*, const Key* keys, int nr, int64_t, int64_t nc) OS_LAMBDA_INLINE {
    for (int r = 0; r < nr; ++r) {
      for (int64_t c = 0; c < nc; ++c) ++h[keys[r * kTile + c] >> Bits<W>::kShift];
    }
  });
}

template <typename In, typename W, bool kMask>
OS_INLINE void gather_pass(const Ctx<In, W>& cx, Lane<W>& L, int64_t b, int64_t t0, int64_t t1) {
  using Key = typename Bits<W>::Key;
  for_blocks<In, W, kMask, false>(cx, L, b, t0, t1, [&](const W* const*, const Key* keys, int nr, int64_t, int64_t nc) OS_LAMBDA_INLINE {
    gather_block(L, keys, nr, nc, cx.lo, cx.span);
  });
}

template <typename In, typename W, bool kMask>
OS_INLINE void count_pass(const Ctx<In, W>& cx, Lane<W>& L, int64_t b, int64_t t0, int64_t t1) {
  using Key = typename Bits<W>::Key;
  for_blocks<In, W, kMask, false>(cx, L, b, t0, t1, [&](const W* const*, const Key* keys, int nr, int64_t, int64_t nc) OS_LAMBDA_INLINE {
    Key hits = 0;
    for (int r = 0; r < nr; ++r) {
      for (int64_t c = 0; c < nc; ++c) {
        hits += static_cast<Key>(static_cast<Key>(keys[r * kTile + c] - cx.ma_lo) < cx.ma_span);
      }
    }
    L.n_hits += hits;
  });
}

// Entry points per pass: non-template functions cloned per ISA (template bodies are inlined into them).
enum class Pass { kMain, kMainNoMoments, kBracket, kHist, kGather, kCount };

template <typename In, typename W, bool kMask>
OS_INLINE void run_pass_impl(Pass pass, const Ctx<In, W>& cx, Lane<W>& L, int64_t b, int64_t t0, int64_t t1) {
  switch (pass) {
    case Pass::kMain:
      main_pass<In, W, kMask, true>(cx, L, b, t0, t1);
      break;
    case Pass::kMainNoMoments:
      main_pass<In, W, kMask, false>(cx, L, b, t0, t1);
      break;
    case Pass::kBracket:
      bracket_pass<In, W, kMask>(cx, L, b, t0, t1);
      break;
    case Pass::kHist:
      hist_pass<In, W, kMask>(cx, L, b, t0, t1);
      break;
    case Pass::kGather:
      gather_pass<In, W, kMask>(cx, L, b, t0, t1);
      break;
    case Pass::kCount:
      count_pass<In, W, kMask>(cx, L, b, t0, t1);
      break;
  }
}

#define OS_PASS_ENTRY(NAME, IN, W)                                                                      \
  OS_CLONES void NAME(Pass pass, const Ctx<IN, W>& cx, Lane<W>& L, int64_t b, int64_t t0, int64_t t1) { \
    if (cx.m) {                                                                                         \
      run_pass_impl<IN, W, true>(pass, cx, L, b, t0, t1);                                               \
    } else {                                                                                            \
      run_pass_impl<IN, W, false>(pass, cx, L, b, t0, t1);                                              \
    }                                                                                                   \
  }
OS_PASS_ENTRY(pass_f32, float, float)
OS_PASS_ENTRY(pass_f64, double, double)
OS_PASS_ENTRY(pass_f16, c10::Half, float)
OS_PASS_ENTRY(pass_bf16, c10::BFloat16, float)
#undef OS_PASS_ENTRY

inline void run_pass(Pass p, const Ctx<float, float>& cx, Lane<float>& L, int64_t b, int64_t t0, int64_t t1) {
  pass_f32(p, cx, L, b, t0, t1);
}
inline void run_pass(Pass p, const Ctx<double, double>& cx, Lane<double>& L, int64_t b, int64_t t0, int64_t t1) {
  pass_f64(p, cx, L, b, t0, t1);
}
inline void run_pass(Pass p, const Ctx<c10::Half, float>& cx, Lane<float>& L, int64_t b, int64_t t0, int64_t t1) {
  pass_f16(p, cx, L, b, t0, t1);
}
inline void run_pass(Pass p, const Ctx<c10::BFloat16, float>& cx, Lane<float>& L, int64_t b, int64_t t0,
                     int64_t t1) {
  pass_bf16(p, cx, L, b, t0, t1);
}

// Runs `pass` on every lane's rows of window b, one lane per thread.
template <typename In, typename W>
void on_lanes(Pass pass, const Ctx<In, W>& cx, Workspace<W>& ws, int64_t n_lanes, int64_t b) {
  auto body = [&](int64_t l) {
    const int64_t t0 = cx.T * l / n_lanes, t1 = cx.T * (l + 1) / n_lanes;
    run_pass(pass, cx, ws.lanes[l], b, t0, t1);
  };
  if (n_lanes == 1) {
    body(0);
  } else {
    at::parallel_for(0, n_lanes, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t l = lo; l < hi; ++l) body(l);
    });
  }
}

template <typename In, typename W>
OS_INLINE bool entry(const Ctx<In, W>& cx, int64_t b, int64_t t, int64_t c, W& v) {
  if (cx.m && !cx.m[b * cx.mb + t * cx.mt + c * cx.mc]) return false;
  v = static_cast<W>(cx.x[b * cx.sb + t * cx.st + c * cx.sc]);
  return key_of(v) < Bits<W>::kInf;
}

// A bracket [lo, hi] of keys that likely holds the median of window b, between two quantiles of a sample
// of the window: runs of channels from kPilotRows evenly spaced rows, each run starting where the golden
// ratio puts it, so the sample spans tokens and channels and is read as a few cache lines per row (a
// scattered sample costs a cache miss per key). No randomness. False: too few valid entries in the sample.
template <typename In, typename W>
bool sample_bracket(const Ctx<In, W>& cx, int64_t b, typename Bits<W>::Key& lo, typename Bits<W>::Key& hi,
                    std::vector<typename Bits<W>::Key>& sample) {
  const int64_t rows = std::min<int64_t>(kPilotRows, cx.T);
  const int64_t run = std::min<int64_t>(cx.C, (kPilot + rows - 1) / rows);
  sample.clear();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = cx.T * i / rows;
    const int64_t c0 = static_cast<int64_t>(static_cast<double>(i) * 0.6180339887498949 * cx.C) % cx.C;
    for (int64_t j = 0; j < run; ++j) {
      const int64_t c = c0 + j < cx.C ? c0 + j : c0 + j - cx.C;
      W v;
      if (entry(cx, b, t, c, v)) sample.push_back(key_of(v));
    }
  }
  const int64_t s = static_cast<int64_t>(sample.size());
  if (s < 64) return false;
  const double margin = 4.0 * std::sqrt(0.25 / s) + 2.0 / s;  // 4 standard errors of the sample median
  const int64_t rlo = std::max<int64_t>(0, static_cast<int64_t>(std::floor((0.5 - margin) * s)));
  const int64_t rhi = std::min<int64_t>(s - 1, static_cast<int64_t>(std::ceil((0.5 + margin) * s)));
  std::nth_element(sample.begin(), sample.begin() + rlo, sample.end());
  lo = sample[rlo];
  std::nth_element(sample.begin() + rlo, sample.begin() + rhi, sample.end());
  hi = sample[rhi];
  return true;
}

// The key of rank r among the keys the lanes gathered (all in [lo, hi]). A histogram of (key - lo) over at
// most kSelectBins bins finds the bin that holds rank r; selection then runs on that bin's keys alone, a
// small fraction of a bracket that can hold several percent of the window.
template <typename W>
typename Bits<W>::Key select_gathered(Workspace<W>& ws, int64_t n_lanes, typename Bits<W>::Key lo,
                                      typename Bits<W>::Key hi, int64_t r) {
  using Key = typename Bits<W>::Key;
  int shift = 0;
  while (((hi - lo) >> shift) >= static_cast<Key>(kSelectBins)) ++shift;
  std::vector<int64_t>& bins = ws.bins;
  bins.assign(static_cast<size_t>((hi - lo) >> shift) + 1, 0);
  for (int64_t l = 0; l < n_lanes; ++l) {
    const Key* g = ws.lanes[l].gather.data();
    for (int64_t i = 0, n = ws.lanes[l].n_gather; i < n; ++i) ++bins[(g[i] - lo) >> shift];
  }
  Key bin = 0;
  for (; r >= bins[bin]; ++bin) r -= bins[bin];
  std::vector<Key>& sel = ws.select;
  sel.clear();
  for (int64_t l = 0; l < n_lanes; ++l) {
    const Key* g = ws.lanes[l].gather.data();
    for (int64_t i = 0, n = ws.lanes[l].n_gather; i < n; ++i) {
      if (((g[i] - lo) >> shift) == bin) sel.push_back(g[i]);
    }
  }
  std::nth_element(sel.begin(), sel.begin() + r, sel.end());
  return sel[r];
}

// hint * (1 -+ spread) as keys: the bracket when a recent median of this tap is known.
template <typename W>
void hint_bracket(double hint, double spread, typename Bits<W>::Key& lo, typename Bits<W>::Key& hi) {
  lo = key_of(static_cast<W>(hint * (1.0 - spread)));
  hi = std::min<typename Bits<W>::Key>(key_of(static_cast<W>(hint * (1.0 + spread))), Bits<W>::kInf - 1);
}

struct TopRow {
  uint64_t key;
  int64_t b, t, c;
  double value;
};

// Total order of top-k candidates: larger |a| first, then the earlier (window, token, channel).
inline bool before(const TopRow& a, const TopRow& b) {
  if (a.key != b.key) return a.key > b.key;
  if (a.b != b.b) return a.b < b.b;
  if (a.t != b.t) return a.t < b.t;
  return a.c < b.c;
}

// Keeps the k first rows in `before` order among those offered.
inline void offer(std::vector<TopRow>& keep, int64_t k, const TopRow& row) {
  if (static_cast<int64_t>(keep.size()) == k && !before(row, keep.back())) return;
  auto it = std::upper_bound(keep.begin(), keep.end(), row, before);
  keep.insert(it, row);
  if (static_cast<int64_t>(keep.size()) > k) keep.pop_back();
}

struct Options {
  double ma_abs, ma_ratio, hint, spread;
  int64_t top_k, offset;
  bool moments, channels;
};

struct Totals {
  int64_t n_good = 0, ma = 0, misses = 0, fallbacks = 0;
  double spread = 0.0;
  double max_abs = -1.0;
  double hint = std::numeric_limits<double>::quiet_NaN();  // the last window median: the next hint
};

template <typename In, typename W>
void run(const Ctx<In, W>& cx0, const Options& opt, double* medians, Totals& tot, std::vector<TopRow>& top,
         double* ch, double* gm) {
  using Key = typename Bits<W>::Key;
  using SKey = typename Bits<W>::SKey;
  constexpr Key kInf = Bits<W>::kInf;
  Ctx<In, W> cx = cx0;
  const int64_t C = cx.C, T = cx.T;
  Workspace<W>& ws = workspace<W>();
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t n_lanes = std::max<int64_t>(1, std::min<int64_t>({threads, T, (T * C) / kLaneMin}));
  if (static_cast<int64_t>(ws.lanes.size()) < n_lanes) ws.lanes.resize(n_lanes);
  for (int64_t l = 0; l < n_lanes; ++l) {
    Lane<W>& L = ws.lanes[l];
    L.keys.resize(kRows * kTile);
    L.vals.resize(kRows * kTile);
    L.mrow.resize(kTile);
    L.n_nan = L.n_inf = 0;
    if (opt.moments) {
      L.acc.assign(5 * C, 0.0);
      L.part.assign(5 * C, W(0));
      L.shift.assign(C, W(0));
      L.pending.assign(C, typename Bits<W>::Key(1));
      L.n_pending = C;
      L.wide_shift = false;
    }
    L.colmax.resize(C);
  }
  ws.wcol.resize(C);
  ws.ucol.assign(C, SKey(-1));

  // |a| > floor(ma_abs): the MA candidates of the absolute rule (every valid entry when that is < 0).
  const W ma_floor = round_to<W>(opt.ma_abs, false);
  cx.ma_lo = ma_floor < W(0) ? Key(0) : key_of(ma_floor) + 1;
  cx.ma_span = kInf > cx.ma_lo ? kInf - cx.ma_lo : Key(0);
  cx.wide = key_of(static_cast<W>(kWide));
  // Only entries that reach the running top-k's last |a| can enter it (ties: `before` decides).
  const auto full = static_cast<int64_t>(top.size()) == opt.top_k;
  const Key top_floor = full && opt.top_k > 0 ? static_cast<Key>(top.back().key) : Key(0);
  const Pass main = opt.moments ? Pass::kMain : Pass::kMainNoMoments;
  double hint = opt.hint;
  double spread = std::clamp(opt.spread, kSpreadMin, kSpreadMax);
  std::vector<TopRow> keep;

  for (int64_t b = 0; b < cx.B; ++b) {
    Key lo = 0, hi = 0;
    const bool hinted = std::isfinite(hint) && hint >= 0.0;
    if (hinted) hint_bracket<W>(hint, spread, lo, hi);
    const bool bracketed = hinted || sample_bracket(cx, b, lo, hi, ws.select);
    // Without a bracket the main pass gathers only |a| == max finite (harmless) and the fallback decides.
    cx.lo = bracketed ? lo : kInf - 1;
    cx.span = bracketed ? hi - lo : Key(0);
    cx.below = bracketed ? lo : Key(0);
    for (int64_t l = 0; l < n_lanes; ++l) {
      Lane<W>& L = ws.lanes[l];
      std::fill(L.colmax.begin(), L.colmax.end(), SKey(-1));
      L.n_good = L.n_below = L.n_ma = L.n_gather = 0;
    }
    on_lanes(main, cx, ws, n_lanes, b);

    int64_t n_good = 0, n_below = 0, n_in = 0, n_ma = 0;
    SKey* wcol = ws.wcol.data();
    std::copy(ws.lanes[0].colmax.begin(), ws.lanes[0].colmax.end(), wcol);
    for (int64_t l = 0; l < n_lanes; ++l) {
      const Lane<W>& L = ws.lanes[l];
      n_good += L.n_good;
      n_below += L.n_below;
      n_in += L.n_gather;
      n_ma += L.n_ma;
      if (l > 0) {
        for (int64_t c = 0; c < C; ++c) wcol[c] = std::max(wcol[c], L.colmax[c]);
      }
    }
    SKey wmax = -1;
    for (int64_t c = 0; c < C; ++c) {
      wmax = std::max(wmax, wcol[c]);
      ws.ucol[c] = std::max(ws.ucol[c], wcol[c]);
    }
    tot.n_good += n_good;
    if (n_good == 0) {
      medians[b] = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    const double wmax_v = static_cast<double>(value_of<W>(static_cast<Key>(wmax)));
    tot.max_abs = std::max(tot.max_abs, wmax_v);

    // Exact lower median: the key of rank (n - 1) / 2 among the window's valid keys.
    const int64_t rank = (n_good - 1) / 2;
    bool hit = bracketed && n_below <= rank && rank < n_below + n_in;
    if (hinted) spread = hit ? std::max(kSpreadMin, 0.9 * spread) : std::min(kSpreadMax, 2.0 * spread);
    if (!hit) ++tot.misses;
    if (!hit && hinted && sample_bracket(cx, b, lo, hi, ws.select)) {  // one more pass, bracket from a sample
      cx.lo = lo;
      cx.span = hi - lo;
      cx.below = lo;
      for (int64_t l = 0; l < n_lanes; ++l) ws.lanes[l].n_below = ws.lanes[l].n_gather = 0;
      on_lanes(Pass::kBracket, cx, ws, n_lanes, b);
      n_below = n_in = 0;
      for (int64_t l = 0; l < n_lanes; ++l) {
        n_below += ws.lanes[l].n_below;
        n_in += ws.lanes[l].n_gather;
      }
      hit = n_below <= rank && rank < n_below + n_in;
    }
    if (!hit) {  // two more passes: a histogram on the top key bits, then a gather of the median's bin
      ++tot.fallbacks;
      constexpr int64_t bins = static_cast<int64_t>(kInf >> Bits<W>::kShift) + 1;
      for (int64_t l = 0; l < n_lanes; ++l) ws.lanes[l].hist.assign(bins, 0u);
      on_lanes(Pass::kHist, cx, ws, n_lanes, b);
      int64_t cum = 0, bin = 0;
      for (; bin < bins; ++bin) {
        int64_t here = 0;
        for (int64_t l = 0; l < n_lanes; ++l) here += ws.lanes[l].hist[bin];
        if (cum + here > rank) break;
        cum += here;
      }
      cx.lo = static_cast<Key>(bin) << Bits<W>::kShift;
      cx.span = (Key(1) << Bits<W>::kShift) - 1;
      for (int64_t l = 0; l < n_lanes; ++l) ws.lanes[l].n_gather = 0;
      on_lanes(Pass::kGather, cx, ws, n_lanes, b);
      n_below = cum;
      n_in = 0;
      for (int64_t l = 0; l < n_lanes; ++l) n_in += ws.lanes[l].n_gather;
      lo = cx.lo;
      hi = cx.lo + cx.span;
    }
    Key med;
    if (lo == hi) {
      med = lo;
    } else {
      med = select_gathered(ws, n_lanes, lo, hi, rank - n_below);
    }
    const double median = static_cast<double>(value_of<W>(med));
    medians[b] = median;
    hint = median;

    // MA count: |a| > ma_abs and |a| >= ma_ratio * median, with the threshold rounded to W as the reference.
    if (wmax_v > opt.ma_abs) {
      const double ratio_thr = opt.ma_ratio * median;
      if (ratio_thr > opt.ma_abs) {
        const W thr = round_to<W>(ratio_thr, true);
        const Key tk = key_of(thr);  // thr > ma_abs > floor(ma_abs): positive
        ws.cols.clear();
        for (int64_t c = 0; c < C; ++c) {
          if (wcol[c] >= 0 && static_cast<Key>(wcol[c]) >= tk) ws.cols.push_back(c);
        }
        int64_t hits = 0;
        if (static_cast<int64_t>(ws.cols.size()) * 8 <= C || C <= 64) {
          for (int64_t c : ws.cols) {
            for (int64_t t = 0; t < T; ++t) {
              W v;
              if (entry(cx, b, t, c, v) && key_of(v) >= tk) ++hits;
            }
          }
        } else {
          cx.ma_lo = tk;
          cx.ma_span = kInf > tk ? kInf - tk : Key(0);
          for (int64_t l = 0; l < n_lanes; ++l) ws.lanes[l].n_hits = 0;
          on_lanes(Pass::kCount, cx, ws, n_lanes, b);
          for (int64_t l = 0; l < n_lanes; ++l) hits += ws.lanes[l].n_hits;
          cx.ma_lo = ma_floor < W(0) ? Key(0) : key_of(ma_floor) + 1;
          cx.ma_span = kInf > cx.ma_lo ? kInf - cx.ma_lo : Key(0);
        }
        tot.ma += hits;
      } else {
        tot.ma += n_ma;
      }
    }

    // Top-k: every entry that can rank among the k largest lies in a column whose max reaches the k-th
    // largest column max; with ties all such columns are read, so the order is exactly `before`.
    if (opt.top_k > 0 && static_cast<Key>(wmax) >= top_floor) {
      std::vector<SKey>& order = ws.order;
      order.assign(wcol, wcol + C);
      const int64_t k = std::min<int64_t>(opt.top_k, C);
      std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), std::greater<SKey>());
      const SKey kth = std::max<SKey>(order[k - 1], 0);
      const Key thr = std::max<Key>(static_cast<Key>(kth), top_floor);
      ws.cols.clear();
      for (int64_t c = 0; c < C; ++c) {
        if (wcol[c] >= 0 && static_cast<Key>(wcol[c]) >= thr) ws.cols.push_back(c);
      }
      keep.clear();
      for (int64_t c : ws.cols) {
        for (int64_t t = 0; t < T; ++t) {
          W v;
          if (entry(cx, b, t, c, v) && key_of(v) >= thr) {
            offer(keep, opt.top_k,
                  TopRow{static_cast<uint64_t>(key_of(v)), opt.offset + b, t, c, static_cast<double>(v)});
          }
        }
      }
      for (const TopRow& row : keep) offer(top, opt.top_k, row);
    }
  }

  int64_t n_nan = 0, n_inf = 0;
  for (int64_t l = 0; l < n_lanes; ++l) {
    n_nan += ws.lanes[l].n_nan;
    n_inf += ws.lanes[l].n_inf;
  }
  tot.spread = spread;
  tot.hint = hint;
  gm[5] = static_cast<double>(n_nan);
  gm[6] = static_cast<double>(n_inf);
  if (opt.channels) {
    for (int64_t c = 0; c < C; ++c) {
      ch[3 * C + c] = ws.ucol[c] >= 0 ? static_cast<double>(value_of<W>(static_cast<Key>(ws.ucol[c]))) : -1.0;
    }
  }
  if (!opt.moments) return;

  // Shifted sums of every (lane, channel) group -> channel (count, mean, M2) and global central moments.
  double n_tot = 0.0, first = 0.0;
  for (int64_t l = 0; l < n_lanes; ++l) {
    const double* a = ws.lanes[l].acc.data();
    const W* sh = ws.lanes[l].shift.data();
    for (int64_t c = 0; c < C; ++c) {
      n_tot += a[c];
      first += a[c] * static_cast<double>(sh[c]) + a[C + c];
    }
  }
  gm[0] = n_tot;
  if (n_tot > 0.0) {
    const double mean = first / n_tot;
    double m2 = 0.0, m3 = 0.0, m4 = 0.0;
    for (int64_t l = 0; l < n_lanes; ++l) {
      const double* a = ws.lanes[l].acc.data();
      const W* sh = ws.lanes[l].shift.data();
      for (int64_t c = 0; c < C; ++c) {
        const double n = a[c], s1 = a[C + c], s2 = a[2 * C + c], s3 = a[3 * C + c], s4 = a[4 * C + c];
        const double f = static_cast<double>(sh[c]) - mean, f2 = f * f, f3 = f2 * f;
        m2 += s2 + 2.0 * f * s1 + n * f2;
        m3 += s3 + 3.0 * f * s2 + 3.0 * f2 * s1 + n * f3;
        m4 += s4 + 4.0 * f * s3 + 6.0 * f2 * s2 + 4.0 * f3 * s1 + n * f2 * f2;
      }
    }
    gm[1] = mean;
    gm[2] = m2;
    gm[3] = m3;
    gm[4] = m4;
  }
  if (!opt.channels) return;
  for (int64_t c = 0; c < C; ++c) {
    double n = 0.0, s = 0.0;
    for (int64_t l = 0; l < n_lanes; ++l) {
      const double* a = ws.lanes[l].acc.data();
      n += a[c];
      s += a[c] * static_cast<double>(ws.lanes[l].shift[c]) + a[C + c];
    }
    const double mean = n > 0.0 ? s / n : 0.0;
    double m2 = 0.0;
    for (int64_t l = 0; l < n_lanes; ++l) {
      const double* a = ws.lanes[l].acc.data();
      const double f = static_cast<double>(ws.lanes[l].shift[c]) - mean;
      m2 += a[2 * C + c] + f * (2.0 * a[C + c] + a[c] * f);
    }
    ch[c] = n;
    ch[C + c] = mean;
    ch[2 * C + c] = std::max(m2, 0.0);
  }
}

template <typename In, typename W>
Ctx<In, W> context(const at::Tensor& x, const c10::optional<at::Tensor>& valid) {
  Ctx<In, W> cx;
  cx.x = reinterpret_cast<const In*>(x.data_ptr());
  cx.sb = x.stride(0);
  cx.st = x.stride(1);
  cx.sc = x.stride(2);
  cx.B = x.size(0);
  cx.T = x.size(1);
  cx.C = x.size(2);
  cx.m = nullptr;
  cx.mb = cx.mt = cx.mc = 0;
  if (valid.has_value()) {
    const at::Tensor& m = *valid;
    cx.m = reinterpret_cast<const uint8_t*>(m.data_ptr());
    cx.mb = m.stride(0);
    cx.mt = m.stride(1);
    cx.mc = m.stride(2);
  }
  return cx;
}

// Pebay's pairwise merge of (n, mean, M2, M3, M4) b into a: the operations of
// stats.moments.merge_moments in its order (this function is not cloned per ISA, so no FMA contracts
// them), so the running moments are those the reference merge would give, bit for bit.
void merge_moments(double* a, const double* b) {
  const double na = a[0], ma = a[1], m2a = a[2], m3a = a[3], m4a = a[4];
  const double nb = b[0], mb = b[1], m2b = b[2], m3b = b[3], m4b = b[4];
  if (nb == 0) return;
  if (na == 0) {
    std::copy(b, b + 5, a);
    return;
  }
  const double n = na + nb, delta = mb - ma, dn = delta / n;
  a[0] = n;
  a[1] = ma + nb * dn;
  a[2] = m2a + m2b + delta * dn * na * nb;
  a[3] = m3a + m3b + delta * dn * dn * na * nb * (na - nb) + 3.0 * dn * (na * m2b - nb * m2a);
  a[4] = m4a + m4b + delta * std::pow(dn, 3.0) * na * nb * (na * na - na * nb + nb * nb) +
         6.0 * dn * dn * (na * na * m2b + nb * nb * m2a) + 4.0 * dn * (na * m3b - nb * m3a);
}

// Chan's per-channel merge of an update's (count, mean, M2) b (3, C) into a: the operations of
// stats.moments.merge_channel_moments in its order. With `absmax` both hold a fourth row, |a| max.
void merge_channels(double* a, const double* b, int64_t C, bool absmax) {
  for (int64_t c = 0; c < C; ++c) {
    const double na = a[c], nb = b[c];
    const double total = na + nb;
    const double frac = nb / std::max(total, 1.0);
    const double delta = b[C + c] - a[C + c];
    a[c] = total;
    a[C + c] = a[C + c] + delta * frac;
    a[2 * C + c] = a[2 * C + c] + b[2 * C + c] + delta * delta * na * frac;
    if (absmax) a[3 * C + c] = std::max(a[3 * C + c], b[3 * C + c]);
  }
}

// The running state of a tap (float64, `state`): what the caller sets once, then what each update adds to.
enum State : int64_t {
  kN, kMean, kM2, kM3, kM4,  // central moments of every valid finite entry (n = 0: none yet)
  kNan, kInfs, kGood, kMa,   // counts: nan, +-inf, valid finite entries, massive activations
  kMisses,                   // windows whose median fell outside the hinted bracket
  kMaxAbs,                   // max |a| (-1: none yet)
  kSpread,                   // the hinted bracket's relative half-width (adapted here)
  kFallbacks,                // windows whose median needed the histogram passes
  kHint,                     // the last window median (nan: none yet): brackets the next one
  kTopCount,                 // rows of the running top-k held in `top`
  kChannels,                 // C of every update (0: none yet; the caller sets it at the first)
  kMaAbs, kMaRatio,          // the MA rule
  kTopK,                     // k of the top-k (0: none kept)
  kMoments,                  // 1: moments (global, and per channel with kChannelStats) are taken
  kChannelStats,
  kStateSize
};

// Whether `update` reads x as it is: a non-empty (B, T, C) CPU tensor of a type it reads, with the tap's
// channel count, and a mask that is None or a bool tensor of x's shape. Anything else (a tap's first
// update included) the caller checks, converts and hands back.
bool takes(const at::Tensor& x, const c10::optional<at::Tensor>& valid, const double* st) {
  if (x.dim() != 3 || !x.device().is_cpu() || x.numel() == 0) return false;
  const auto dt = x.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble && dt != at::kHalf && dt != at::kBFloat16) return false;
  if (static_cast<double>(x.size(2)) != st[kChannels]) return false;
  return !valid.has_value() || (valid->scalar_type() == at::kBool && valid->sizes() == x.sizes());
}

// One update of a tap's running statistics from a (B, T, C) tensor, `offset` the global index of its first
// window: merges into `state` (kStateSize, see State), the running top-k `top` (k, 5: |a|, value, window,
// token, channel; the first state[kTopCount] rows held, in `before` order) and, with channel statistics,
// ch (4, C: count, mean, M2 and |a| max (-1: none) per channel). Returns each window's median |a| (nan: no
// valid element) as a list, or None when `takes` does not (nothing is read or changed then).
py::object update(const at::Tensor& x, const c10::optional<at::Tensor>& valid, int64_t offset, at::Tensor state,
                  at::Tensor top, at::Tensor ch) {
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.is_contiguous() && state.numel() == kStateSize,
              "fused: state");
  double* st = state.data_ptr<double>();
  if (!takes(x, valid, st)) return py::none();
  const auto top_k = static_cast<int64_t>(st[kTopK]);
  const bool moments = st[kMoments] != 0.0, channels = moments && st[kChannelStats] != 0.0;
  TORCH_CHECK(top.scalar_type() == at::kDouble && top.is_contiguous() && top.numel() >= 5 * top_k, "fused: top");
  TORCH_CHECK(!channels || (ch.scalar_type() == at::kDouble && ch.is_contiguous() && ch.numel() == 4 * x.size(2)),
              "fused: ch");
  Options opt{st[kMaAbs], st[kMaRatio], st[kHint], st[kSpread], top_k, offset, moments, channels};
  double g[7] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  static thread_local std::vector<double> upd_ch;  // this update's per-channel statistics
  if (channels) upd_ch.assign(4 * x.size(2), 0.0);
  Totals tot;
  tot.spread = st[kSpread];
  tot.hint = st[kHint];
  const bool wide = x.scalar_type() == at::kDouble;
  double* tp = top.data_ptr<double>();
  std::vector<TopRow> rows;  // the running top-k, then merged with this update's candidates
  for (int64_t i = 0; i < static_cast<int64_t>(st[kTopCount]); ++i) {
    const double* r = tp + 5 * i;
    const uint64_t key = wide ? key_of<double>(r[0]) : key_of<float>(static_cast<float>(r[0]));
    rows.push_back(TopRow{key, static_cast<int64_t>(r[2]), static_cast<int64_t>(r[3]), static_cast<int64_t>(r[4]),
                          r[1]});
  }
  std::vector<double> med(x.size(0));  // each window's median
  double* chp = channels ? upd_ch.data() : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat:
      run(context<float, float>(x, valid), opt, med.data(), tot, rows, chp, g);
      break;
    case at::kDouble:
      run(context<double, double>(x, valid), opt, med.data(), tot, rows, chp, g);
      break;
    case at::kHalf:
      run(context<c10::Half, float>(x, valid), opt, med.data(), tot, rows, chp, g);
      break;
    default:
      run(context<c10::BFloat16, float>(x, valid), opt, med.data(), tot, rows, chp, g);
  }
  merge_moments(st, g);
  st[kNan] += g[5];
  st[kInfs] += g[6];
  st[kGood] += static_cast<double>(tot.n_good);
  st[kMa] += static_cast<double>(tot.ma);
  st[kMisses] += static_cast<double>(tot.misses);
  st[kMaxAbs] = std::max(st[kMaxAbs], tot.max_abs);
  st[kSpread] = tot.spread;
  st[kFallbacks] += static_cast<double>(tot.fallbacks);
  st[kHint] = tot.hint;
  if (channels) merge_channels(ch.data_ptr<double>(), upd_ch.data(), x.size(2), true);
  for (size_t i = 0; i < rows.size(); ++i) {
    const TopRow& r = rows[i];
    tp[5 * i] = wide ? value_of<double>(r.key) : static_cast<double>(value_of<float>(static_cast<uint32_t>(r.key)));
    tp[5 * i + 1] = r.value;
    tp[5 * i + 2] = static_cast<double>(r.b);
    tp[5 * i + 3] = static_cast<double>(r.t);
    tp[5 * i + 4] = static_cast<double>(r.c);
  }
  st[kTopCount] = static_cast<double>(rows.size());
  py::list medians(med.size());
  for (size_t b = 0; b < med.size(); ++b) medians[b] = med[b];
  return medians;
}

// ------------------------------------------------------------------ per-channel moments alone (CO profiles)
//
// Channel-wise outlier detection needs each channel's (count, mean, M2) and nothing else: one read of the
// tensor, in which each lane keeps per channel the sums S1 and S2 of (a - shift) in float64 (and a count
// under a mask). The shift is the channel's running mean (in a tap's first update, the value of its first
// row), so the sums stay small where a mean dwarfs its spread. Masked entries are left out; non-finite ones
// are kept, as the reference ChannelReducer keeps them (they make that channel's moments non-finite).

struct ChanLane {
  std::vector<double> n, s1, s2;  // C each: this update's sums of this lane
  std::vector<float> vals_f;      // kRows x C converted values (16-bit or strided input) ...
  std::vector<double> vals_d;     // ... of a float64 one
  std::vector<uint8_t> mrows;     // kRows x C mask bytes (broadcast or strided mask)
  int64_t rows = 0;               // rows read (the count of every channel when nothing is masked)

  template <typename W>
  W* vals() {
    if constexpr (std::is_same_v<W, double>) {
      return vals_d.data();
    } else {
      return vals_f.data();
    }
  }
};

struct ChanWork {
  std::vector<ChanLane> lanes;
  std::vector<double> shift, upd;  // C; 3 x C: this update's (count, mean, M2)
};

ChanWork& chan_work() {
  static thread_local ChanWork w;
  return w;
}

// Adds R rows (pointers to their C values, and their mask bytes) to the sums: R = kRows keeps the block's
// sums in registers, one load and store of each channel's sums per block.
template <int R, typename W, bool kMask, bool kAbs>
OS_INLINE void channel_block(const W* const* rows, const uint8_t* const* masks, const double* __restrict__ shift,
                             double* __restrict__ n, double* __restrict__ s1, double* __restrict__ s2, int64_t C) {
#pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    const double sh = shift[c];
    double bn = 0.0, b1 = 0.0, b2 = 0.0;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      double v = static_cast<double>(rows[i][c]);
      if constexpr (kAbs) v = std::abs(v);
      double d = v - sh;
      if constexpr (kMask) {
        const bool ok = masks[i][c] != 0;
        d = ok ? d : 0.0;
        bn += ok ? 1.0 : 0.0;
      }
      b1 += d;
      b2 += d * d;
    }
    if constexpr (kMask) n[c] += bn;
    s1[c] += b1;
    s2[c] += b2;
  }
}

// One lane's rows [r0, r1) of the flattened (B * T) rows.
template <typename In, typename W, bool kMask, bool kAbs>
OS_INLINE void channel_pass(const Ctx<In, W>& cx, ChanLane& L, const double* shift, int64_t r0, int64_t r1) {
  const int64_t C = cx.C;
  const W* rows[kRows];
  const uint8_t* masks[kRows] = {};
  for (int64_t r = r0; r < r1; r += kRows) {
    const int nr = static_cast<int>(std::min<int64_t>(kRows, r1 - r));
    for (int i = 0; i < nr; ++i) {
      const int64_t b = (r + i) / cx.T, t = (r + i) % cx.T;
      rows[i] = load_row(cx, L.template vals<W>() + i * C, b, t, 0, C);
      if constexpr (kMask) masks[i] = load_mask(cx, L.mrows.data() + i * C, b, t, 0, C);
    }
    if (nr == kRows) {
      channel_block<kRows, W, kMask, kAbs>(rows, masks, shift, L.n.data(), L.s1.data(), L.s2.data(), C);
    } else {
      for (int i = 0; i < nr; ++i) {
        channel_block<1, W, kMask, kAbs>(rows + i, masks + i, shift, L.n.data(), L.s1.data(), L.s2.data(), C);
      }
    }
    L.rows += nr;
  }
}

#define OS_CHANNEL_ENTRY(NAME, IN, W)                                                                       \
  OS_CLONES void NAME(const Ctx<IN, W>& cx, ChanLane& L, const double* shift, bool absolute, int64_t r0,     \
                      int64_t r1) {                                                                         \
    if (cx.m) {                                                                                             \
      absolute ? channel_pass<IN, W, true, true>(cx, L, shift, r0, r1)                                      \
               : channel_pass<IN, W, true, false>(cx, L, shift, r0, r1);                                    \
    } else {                                                                                                \
      absolute ? channel_pass<IN, W, false, true>(cx, L, shift, r0, r1)                                     \
               : channel_pass<IN, W, false, false>(cx, L, shift, r0, r1);                                   \
    }                                                                                                       \
  }
OS_CHANNEL_ENTRY(channels_f32, float, float)
OS_CHANNEL_ENTRY(channels_f64, double, double)
OS_CHANNEL_ENTRY(channels_f16, c10::Half, float)
OS_CHANNEL_ENTRY(channels_bf16, c10::BFloat16, float)
#undef OS_CHANNEL_ENTRY

inline void run_channels(const Ctx<float, float>& cx, ChanLane& L, const double* sh, bool a, int64_t r0, int64_t r1) {
  channels_f32(cx, L, sh, a, r0, r1);
}
inline void run_channels(const Ctx<double, double>& cx, ChanLane& L, const double* sh, bool a, int64_t r0,
                         int64_t r1) {
  channels_f64(cx, L, sh, a, r0, r1);
}
inline void run_channels(const Ctx<c10::Half, float>& cx, ChanLane& L, const double* sh, bool a, int64_t r0,
                         int64_t r1) {
  channels_f16(cx, L, sh, a, r0, r1);
}
inline void run_channels(const Ctx<c10::BFloat16, float>& cx, ChanLane& L, const double* sh, bool a, int64_t r0,
                         int64_t r1) {
  channels_bf16(cx, L, sh, a, r0, r1);
}

template <typename In, typename W>
void channel_run(const Ctx<In, W>& cx, bool absolute, double* state) {
  const int64_t C = cx.C, rows = cx.B * cx.T;
  ChanWork& w = chan_work();
  w.shift.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    double first = static_cast<double>(static_cast<W>(cx.x[c * cx.sc]));  // row 0 of window 0
    first = absolute ? std::abs(first) : first;
    const double mean = state[C + c];
    w.shift[c] = state[c] > 0.0 && std::isfinite(mean) ? mean : (std::isfinite(first) ? first : 0.0);
  }
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t n_lanes = std::max<int64_t>(1, std::min<int64_t>({threads, rows, (rows * C) / kLaneMin}));
  if (static_cast<int64_t>(w.lanes.size()) < n_lanes) w.lanes.resize(n_lanes);
  for (int64_t l = 0; l < n_lanes; ++l) {
    ChanLane& L = w.lanes[l];
    L.n.assign(C, 0.0);
    L.s1.assign(C, 0.0);
    L.s2.assign(C, 0.0);
    if constexpr (std::is_same_v<W, double>) {
      L.vals_d.resize(kRows * C);
    } else {
      L.vals_f.resize(kRows * C);
    }
    L.mrows.resize(kRows * C);
    L.rows = 0;
  }
  auto body = [&](int64_t l) {
    run_channels(cx, w.lanes[l], w.shift.data(), absolute, rows * l / n_lanes, rows * (l + 1) / n_lanes);
  };
  if (n_lanes == 1) {
    body(0);
  } else {
    at::parallel_for(0, n_lanes, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t l = lo; l < hi; ++l) body(l);
    });
  }
  w.upd.assign(3 * C, 0.0);
  double* upd = w.upd.data();
  for (int64_t c = 0; c < C; ++c) {
    double n = 0.0, s1 = 0.0, s2 = 0.0;
    for (int64_t l = 0; l < n_lanes; ++l) {
      const ChanLane& L = w.lanes[l];
      n += cx.m ? L.n[c] : static_cast<double>(L.rows);
      s1 += L.s1[c];
      s2 += L.s2[c];
    }
    upd[c] = n;
    upd[C + c] = n > 0.0 ? w.shift[c] + s1 / n : 0.0;
    upd[2 * C + c] = n > 0.0 ? std::max(s2 - s1 * s1 / n, 0.0) : 0.0;
  }
  merge_channels(state, upd, C, false);
}

// Merges the per-channel (count, mean, M2) of a (B, T, C) tensor (of |a| with `absolute`; entries where
// `valid` is false left out) into state (3, C).
void channel_update(const at::Tensor& x, const c10::optional<at::Tensor>& valid, bool absolute, at::Tensor state) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu(), "fused: expected a (B, T, C) CPU tensor");
  TORCH_CHECK(!valid.has_value() || (valid->scalar_type() == at::kBool && valid->sizes() == x.sizes()),
              "fused: the mask must be a bool tensor of the input's shape");
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.is_contiguous() && state.numel() == 3 * x.size(2),
              "fused: channel state");
  if (x.numel() == 0) return;
  double* st = state.data_ptr<double>();
  switch (x.scalar_type()) {
    case at::kFloat:
      channel_run(context<float, float>(x, valid), absolute, st);
      break;
    case at::kDouble:
      channel_run(context<double, double>(x, valid), absolute, st);
      break;
    case at::kHalf:
      channel_run(context<c10::Half, float>(x, valid), absolute, st);
      break;
    case at::kBFloat16:
      channel_run(context<c10::BFloat16, float>(x, valid), absolute, st);
      break;
    default:
      TORCH_CHECK(false, "fused: unsupported dtype ", x.scalar_type());
  }
}

// Frees this thread's workspace (the buffers grow to the largest tap seen and are otherwise kept).
void release() {
  workspace<float>() = Workspace<float>();
  workspace<double>() = Workspace<double>();
  chan_work() = ChanWork();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("update", &update, "merge one (B, T, C) update into a tap's running statistics (see fused.cpp)");
  m.def("channel_update", &channel_update, "merge a (B, T, C) tensor's per-channel moments (see fused.cpp)");
  m.def("release", &release, "free this thread's workspace");
  m.attr("STATE_SIZE") = static_cast<int64_t>(kStateSize);
}
