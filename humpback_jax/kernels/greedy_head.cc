// Greedy decoding's token choice: a vectorised argmax, and the vocabulary projection that computes
// only the logits an 8-bit bound cannot rule out (AVX-512 VNNI; a stub elsewhere).
#include "common.h"

namespace {

// Greedy decoding's argmax over the vocabulary: x [rows, n] -> out [rows], the first index of each
// row's maximum, a NaN counting as the maximum (as XLA's argmax); one vectorised pass for the
// maximum, one to find it (XLA's variadic reduce is slower; bench/RESULTS.md).
ffi::Error Argmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] < 1) return ffi::Error::InvalidArgument("argmax: expected x [rows, n >= 1]");
  const int64_t rows = xd[0], n = xd[1];
  const float* xp = x.typed_data();
  int32_t* op = out->typed_data();
  ParallelFor(pool, rows, [=](int64_t r) {
    const float* row = xp + r * n;
    __m256 vmax = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_loadu_ps(row + j);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vmax = _mm256_max_ps(vmax, v);
    }
    float best = HorizontalMax(vmax);
    bool has_nan = _mm256_movemask_ps(unordered) != 0;
    for (; j < n; ++j) {
      if (std::isnan(row[j])) has_nan = true;
      else best = std::max(best, row[j]);
    }
    int64_t at = 0;
    while (at < n - 1 && !(has_nan ? std::isnan(row[at]) : row[at] == best)) ++at;
    op[r] = static_cast<int32_t>(at);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Greedy decoding's vocabulary projection without computing every logit. The argmax of
// logits = h @ w needs only the columns that could hold the maximum. An 8-bit pass bounds every
// logit: w's columns are quantised once per decode loop (q_v = round(w_v / s_v), s_v = max|w_v| / 127),
// each step's rows likewise, except in the kOutlierDims dimensions where the rows are largest
// (trained models have a few dimensions far larger than the rest), whose products are taken in
// float32. The integer dot products (AVX-512 VNNI) give each logit an estimate and a proven error
// bound. A column whose upper bound is below the largest lower bound cannot be the argmax; the rest
// (a median of 1 per row for SmolLM2-135M's decode steps) get their exact logits, computed as PackedMatmul computes them (one fused
// multiply-add chain from zero over k, in order), so the chosen token is the one argmax over every
// exact logit picks, bit for bit: the first index of the maximum, a NaN counting as the maximum.
// Rows or heads with a non-finite value, rows whose logits could approach the float range, and a row
// whose best exact logit falls below the bound (never, if the bound holds) take every exact logit.
//
// The bound. Row h = h_O + h', h_O its outlier entries, h' = t p + rho (|p| <= kRowLevels); column
// w_v = s_v q_v + r_v. With the estimate e_v = h_O . w_v + t s_v (p . q_v), by Cauchy-Schwarz
//   |h . w_v - e_v| = |h' . r_v + rho . s_v q_v| <= |h'|_2 |r_v|_2 + |rho|_2 |s_v q_v|_2,
// plus float32 rounding: of the exact logit and of h_O . w_v, each <= gamma_k |h|_1 max|w_v|, and of
// the estimate's products and sums, <= 2^-20 (|h_O . w_v| + |t s_v p . q_v|) (16 units in the last
// place, where 3 would do). The whole bound is then scaled by 1.0001 for its own roundings.

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr int32_t kRowLevels = 127, kRowOffset = 128;  // row codes are stored as p + 128, in [1, 255]
constexpr int kHeadTileRows = 8;                        // 16 accumulators of AVX-512VL's 32 registers
// u8 x s8 products summed in fours into int32 lanes: one instruction.
inline __m256i DotQuads(__m256i acc, __m256i u, __m256i w) { return _mm256_dpbusd_epi32(acc, u, w); }
constexpr int32_t kColumnLevels = 127;
constexpr int64_t kOutlierDims = 8;
// Per column, [strips, kHeadStats, 16]: s_v, |r_v|_2, |s_v q_v|_2, max|w_v|.
enum HeadStat { kScale, kResidualNorm, kCodeNorm, kMaxAbs, kHeadStats };

// One column of w [k]: q = round(w / s) (s = max|w| / 127; any rounding of w / s would do, the
// residual below is measured, not assumed), its codes written in fours 64 bytes apart from `codes`.
struct ColumnCodes {
  float maxabs = 0, scale = 0;
  double residual2 = 0;        // sum_i (w_i - s q_i)^2
  int64_t sum = 0, square_sum = 0;  // sum_i q_i, sum_i q_i^2 (exact)
  bool finite = true;
};

ColumnCodes QuantiseColumn(const float* w, int64_t k, int8_t* codes) {
  ColumnCodes out;
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 x = _mm256_loadu_ps(w + i);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, x));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  out.maxabs = *std::max_element(lanes, lanes + 8);
  out.finite = _mm256_movemask_ps(bad) == 0;
  for (; i < k; ++i) out.finite &= std::isfinite(w[i]), out.maxabs = std::max(out.maxabs, std::fabs(w[i]));
  if (!out.finite) return out;  // the head is then never bounded (GreedyHead takes every exact logit)
  out.scale = out.maxabs / kColumnLevels;
  const float inverse = out.scale > 0 ? 1.f / out.scale : 0.f;
  const __m256 vinv = _mm256_set1_ps(inverse), vscale = _mm256_set1_ps(out.scale);
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  __m256d r2a = _mm256_setzero_pd(), r2b = _mm256_setzero_pd();
  __m256i qsum = _mm256_setzero_si256(), q2sum = _mm256_setzero_si256();
  for (i = 0; i + 8 <= k; i += 8) {
    const __m256 x = _mm256_loadu_ps(w + i);
    const __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_mul_ps(x, vinv), _MM_FROUND_TO_NEAREST_INT |
                                                                  _MM_FROUND_NO_EXC), lo), hi);
    const __m256 r = _mm256_fnmadd_ps(vscale, q, x);  // x - s q, rounded once
    const __m256d r0 = _mm256_cvtps_pd(_mm256_castps256_ps128(r)), r1 = _mm256_cvtps_pd(_mm256_extractf128_ps(r, 1));
    r2a = _mm256_fmadd_pd(r0, r0, r2a), r2b = _mm256_fmadd_pd(r1, r1, r2b);
    const __m256i qi = _mm256_cvtps_epi32(q);
    qsum = _mm256_add_epi32(qsum, qi), q2sum = _mm256_add_epi32(q2sum, _mm256_mullo_epi32(qi, qi));
    alignas(32) int32_t qs[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(qs), qi);
    for (int j = 0; j < 8; ++j) codes[((i + j) / 4) * kStrip * 4 + (i + j) % 4] = static_cast<int8_t>(qs[j]);
  }
  alignas(32) double d[4];
  _mm256_store_pd(d, _mm256_add_pd(r2a, r2b));
  out.residual2 = d[0] + d[1] + d[2] + d[3];
  alignas(32) int32_t a[8], b[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a), qsum), _mm256_store_si256(reinterpret_cast<__m256i*>(b), q2sum);
  for (int j = 0; j < 8; ++j) out.sum += a[j], out.square_sum += b[j];
  for (; i < k; ++i) {
    const float q = std::min(std::max(std::nearbyint(w[i] * inverse), -127.f), 127.f);
    const double r = std::fma(-out.scale, q, w[i]);
    out.residual2 += r * r, out.sum += static_cast<int64_t>(q), out.square_sum += static_cast<int64_t>(q * q);
    codes[(i / 4) * kStrip * 4 + i % 4] = static_cast<int8_t>(q);
  }
  // The float rounding of x - s q (relative 2^-24) is covered by the bound's 1.0001 factor.
  return out;
}

// Tables of w [k, n], read as wt = w^T [n, k]: codes [strips, ceil(k / 4), 16, 4] int8 (column c of
// a strip's k-quad j holds q[4j .. 4j + 3] of that column), w's float32 strips [strips, k, 16] (the
// layout PackWeightStrips writes; rows of the outlier dimensions are read from them), stats
// [strips, kHeadStats, 16], offsets [strips, 16] int32 (kRowOffset sum_i q_iv: what the row codes'
// offset adds to a dot product) and head_max [1] = max|w| (infinite where w holds a NaN or an
// infinity). Columns past n are zero.
ffi::Error GreedyHeadTables(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> wt, ffi::ResultBuffer<ffi::S8> codes,
                            ffi::ResultBuffer<ffi::F32> strips_out, ffi::ResultBuffer<ffi::F32> stats,
                            ffi::ResultBuffer<ffi::S32> offsets, ffi::ResultBuffer<ffi::F32> head_max) {
  auto wd = wt.dimensions(), cd = codes->dimensions(), fd = strips_out->dimensions();
  if (wd.size() != 2 || cd.size() != 4 || cd[0] != (wd[0] + kStrip - 1) / kStrip || cd[1] != (wd[1] + 3) / 4 ||
      cd[2] != kStrip || cd[3] != 4 || fd.size() != 3 || fd[0] != cd[0] || fd[1] != wd[1] || fd[2] != kStrip)
    return ffi::Error::InvalidArgument(
        "greedy_head_tables: expected wt [n, k] -> codes [n / 16, k / 4, 16, 4], strips [n / 16, k, 16]");
  const int64_t n = wd[0], k = wd[1], strips = cd[0], quads = cd[1];
  const float* wp = wt.typed_data();
  int8_t* qp = codes->typed_data();
  float *fp = strips_out->typed_data(), *sp = stats->typed_data();
  int32_t* op = offsets->typed_data();
  std::vector<float> strip_max(strips, 0.f);
  float* smp = strip_max.data();
  ParallelFor(pool, (strips + kStripsPerChunk - 1) / kStripsPerChunk, [=](int64_t chunk) {
    for (int64_t s = chunk * kStripsPerChunk; s < std::min(strips, (chunk + 1) * kStripsPerChunk); ++s) {
      int8_t* strip = qp + s * quads * kStrip * 4;
      float *fs = fp + s * k * kStrip, *st = sp + s * kHeadStats * kStrip;
      const int64_t cols = std::min(kStrip, n - s * kStrip);
      if (cols < kStrip || k % 4) std::fill(strip, strip + quads * kStrip * 4, 0);  // padding: zero codes
      if (cols < kStrip) std::fill(fs, fs + k * kStrip, 0.f);
      std::fill(st, st + kHeadStats * kStrip, 0.f);
      std::fill(op + s * kStrip, op + (s + 1) * kStrip, 0);
      for (int64_t c = 0; c < cols; ++c) {
        const float* column = wp + (s * kStrip + c) * k;
        const ColumnCodes q = QuantiseColumn(column, k, strip + c * 4);
        smp[s] = q.finite ? std::max(smp[s], q.maxabs) : INFINITY;
        for (int64_t i = 0; i < k; ++i) fs[i * kStrip + c] = column[i];
        st[kScale * kStrip + c] = q.scale;
        st[kResidualNorm * kStrip + c] = static_cast<float>(std::sqrt(q.residual2));
        st[kCodeNorm * kStrip + c] = static_cast<float>(q.scale * std::sqrt(double(q.square_sum)));
        st[kMaxAbs * kStrip + c] = q.maxabs;
        op[s * kStrip + c] = static_cast<int32_t>(kRowOffset * q.sum);
      }
    }
  });
  head_max->typed_data()[0] = *std::max_element(strip_max.begin(), strip_max.end());
  return ffi::Error::Success();
}

// One row's codes (its entries in the outlier dimensions coded 0) and the scalars of its bound.
struct HeadRow {
  float scale = 0, rest_norm = 0, residual_norm = 0, rounding = 0;  // t, |h'|_2, |rho|_2, 2 gamma_k |h|_1
  double abs_sum = 0;                                                // |h|_1
  bool finite = true;
};

HeadRow QuantiseRow(const float* h, int64_t k, int64_t quads, const std::vector<int64_t>& outlier_dims,
                    float gamma, uint8_t* codes) {
  HeadRow row;
  std::vector<float> rest(h, h + k);
  for (int64_t i : outlier_dims) rest[i] = 0.f;
  float maxabs = 0;
  for (int64_t i = 0; i < k; ++i) row.finite &= std::isfinite(h[i]), maxabs = std::max(maxabs, std::fabs(rest[i]));
  row.scale = maxabs / kRowLevels;
  double rest2 = 0, residual2 = 0, abs_sum = 0;
  for (int64_t i = 0; i < quads * 4; ++i) {
    const float x = i < k ? rest[i] : 0.f;
    const float p = row.scale > 0 ? std::min(std::max(std::nearbyint(x / row.scale), float(-kRowLevels)),
                                             float(kRowLevels)) : 0.f;
    const double r = double(x) - double(row.scale) * p;
    rest2 += double(x) * x, residual2 += r * r, abs_sum += i < k ? std::fabs(h[i]) : 0.0;
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(p) + kRowOffset);
  }
  row.rest_norm = static_cast<float>(std::sqrt(rest2));
  row.residual_norm = static_cast<float>(std::sqrt(residual2));
  row.rounding = static_cast<float>(2 * gamma * abs_sum);
  row.abs_sum = abs_sum;
  return row;
}

// The kOutlierDims dimensions (fewer when k is smaller) where the finite rows of h [m, k] reach
// their largest magnitudes, ascending.
std::vector<int64_t> OutlierDims(const float* h, int64_t m, int64_t k) {
  std::vector<float> peak(k, 0.f);
  for (int64_t r = 0; r < m; ++r)
    if (std::all_of(h + r * k, h + (r + 1) * k, [](float x) { return std::isfinite(x); }))
      for (int64_t i = 0; i < k; ++i) peak[i] = std::max(peak[i], std::fabs(h[r * k + i]));
  std::vector<int64_t> dims(k);
  for (int64_t i = 0; i < k; ++i) dims[i] = i;
  const int64_t count = std::min(kOutlierDims, k);
  std::partial_sort(dims.begin(), dims.begin() + count, dims.end(),
                    [&](int64_t a, int64_t b) { return peak[a] > peak[b] || (peak[a] == peak[b] && a < b); });
  dims.resize(count);
  std::sort(dims.begin(), dims.end());
  return dims;
}

// Integer dot products of R rows' codes with one strip of column codes -> 16 int32 per row. The
// first tile of a strip prefetches the next strip (`ahead`), one line per k-quad.
template <int R>
void CodeTile(const uint8_t* u, int64_t quads, const int8_t* strip, const int8_t* ahead, __m256i* out) {
  __m256i acc[2 * R];
  for (int r = 0; r < 2 * R; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t j = 0; j < quads; ++j) {
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + j * 64), _MM_HINT_T0);
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(strip + j * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(strip + j * 64 + 32));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t quad;
      std::memcpy(&quad, u + r * quads * 4 + j * 4, 4);
      const __m256i x = _mm256_set1_epi32(quad);
      acc[2 * r] = DotQuads(acc[2 * r], x, w0);
      acc[2 * r + 1] = DotQuads(acc[2 * r + 1], x, w1);
    }
  }
  for (int r = 0; r < 2 * R; ++r) out[r] = acc[r];
}

template <int R>
void CodeTileOfRows(int64_t rows, const uint8_t* u, int64_t quads, const int8_t* strip, const int8_t* ahead,
                    __m256i* out) {
  if (rows == R) return CodeTile<R>(u, quads, strip, ahead, out);
  if constexpr (R > 1) CodeTileOfRows<R - 1>(rows, u, quads, strip, ahead, out);
}

inline float MaxOfLanes(__m256 v) {  // max of 8 lanes, none NaN
  v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_max_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm256_cvtss_f32(_mm256_max_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1))));
}

// Exact logits of `count` columns (rows of wt [n, k]) for one row h, as PackedMatmul computes them.
void ExactLogits(const float* h, const float* wt, int64_t k, const int32_t* columns, int64_t count, float* out) {
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) {  // four chains at once: a fused multiply-add has latency 4
    const float *w0 = wt + columns[c] * k, *w1 = wt + columns[c + 1] * k, *w2 = wt + columns[c + 2] * k,
                *w3 = wt + columns[c + 3] * k;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int64_t i = 0; i < k; ++i) {
      a0 = std::fma(h[i], w0[i], a0), a1 = std::fma(h[i], w1[i], a1);
      a2 = std::fma(h[i], w2[i], a2), a3 = std::fma(h[i], w3[i], a3);
    }
    out[c] = a0, out[c + 1] = a1, out[c + 2] = a2, out[c + 3] = a3;
  }
  for (; c < count; ++c) {
    float a = 0;
    for (int64_t i = 0; i < k; ++i) a = std::fma(h[i], wt[columns[c] * k + i], a);
    out[c] = a;
  }
}

// The first index of the maximum (a NaN counting as the maximum) of logits[0, count).
int64_t FirstMaxIndex(const float* logits, int64_t count) {
  int64_t best = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (std::isnan(logits[i])) return i;
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

// argmax over every exact logit of one row.
int32_t ExactArgmax(const float* h, const float* wt, int64_t k, int64_t n) {
  std::vector<int32_t> all(n);
  std::vector<float> logits(n);
  for (int64_t v = 0; v < n; ++v) all[v] = static_cast<int32_t>(v);
  ExactLogits(h, wt, k, all.data(), n, logits.data());
  return static_cast<int32_t>(FirstMaxIndex(logits.data(), n));
}

// One row's logits over one strip (16 columns, `cols` of them real), from its integer dot products
// `dots`, its outlier entries `outliers` [num_outliers] and the strip's outlier rows `exact_rows`
// [num_outliers, 16]: upper bounds stored to `upper` [16], lower bounds folded into `lower_max`.
void BoundStrip(const __m256i* dots, const HeadRow& row, const float* outliers, int64_t num_outliers,
                const float* exact_rows, const float* st, const int32_t* offsets, int64_t cols, float* upper,
                __m256& lower_max) {
  const __m256 sign = _mm256_set1_ps(-0.f), tiny = _mm256_set1_ps(std::ldexp(1.f, -20));
  for (int half = 0; half < 2; ++half) {
    const float* col = st + half * 8;
    const __m256i integer =
        _mm256_sub_epi32(dots[half], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offsets + half * 8)));
    const __m256 coded = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(integer), _mm256_set1_ps(row.scale)),
                                       _mm256_loadu_ps(col + kScale * kStrip));
    __m256 exact = _mm256_setzero_ps();
    for (int64_t j = 0; j < num_outliers; ++j)
      exact = _mm256_fmadd_ps(_mm256_set1_ps(outliers[j]), _mm256_loadu_ps(exact_rows + j * kStrip + half * 8), exact);
    const __m256 estimate = _mm256_add_ps(coded, exact);
    __m256 bound = _mm256_mul_ps(_mm256_set1_ps(row.rounding), _mm256_loadu_ps(col + kMaxAbs * kStrip));
    bound = _mm256_fmadd_ps(_mm256_set1_ps(row.residual_norm), _mm256_loadu_ps(col + kCodeNorm * kStrip), bound);
    bound = _mm256_fmadd_ps(_mm256_set1_ps(row.rest_norm), _mm256_loadu_ps(col + kResidualNorm * kStrip), bound);
    bound = _mm256_fmadd_ps(bound, _mm256_set1_ps(1.0001f),
                            _mm256_mul_ps(_mm256_add_ps(_mm256_andnot_ps(sign, coded), _mm256_andnot_ps(sign, exact)), tiny));
    __m256 up = _mm256_add_ps(estimate, bound), low = _mm256_sub_ps(estimate, bound);
    if (cols < kStrip) {  // the last strip: columns past n are never candidates
      const __m256 real = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
          _mm256_set1_epi32(static_cast<int32_t>(cols - half * 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      up = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), up, real);
      low = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), low, real);
    }
    _mm256_storeu_ps(upper + half * 8, up);
    lower_max = _mm256_max_ps(lower_max, low);
  }
}

constexpr int64_t kHeadStripsPerChunk = 48;

// ids [m] = argmax over columns of h [m, k] @ w, from GreedyHeadTables' outputs and wt = w^T [n, k].
ffi::Error GreedyHead(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::S8> codes,
                      ffi::Buffer<ffi::F32> fstrips, ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::S32> offsets,
                      ffi::Buffer<ffi::F32> head_max, ffi::Buffer<ffi::F32> wt, ffi::ResultBuffer<ffi::S32> ids) {
  auto hd = h.dimensions(), cd = codes.dimensions(), td = wt.dimensions();
  if (hd.size() != 2 || td.size() != 2 || cd.size() != 4 || td[1] != hd[1] || cd[1] != (hd[1] + 3) / 4 ||
      cd[0] != (td[0] + kStrip - 1) / kStrip || ids->dimensions()[0] != hd[0])
    return ffi::Error::InvalidArgument("greedy_head: expected h [m, k], the tables of w [k, n], wt [n, k]");
  const int64_t m = hd[0], k = hd[1], n = td[0], strips = cd[0], quads = cd[1];
  const float *hp = h.typed_data(), *fp = fstrips.typed_data(), *sp = stats.typed_data(), *wtp = wt.typed_data();
  const int8_t* qp = codes.typed_data();
  const int32_t* op = offsets.typed_data();
  int32_t* out = ids->typed_data();
  const float w_max = head_max.typed_data()[0];
  if (!std::isfinite(w_max)) {
    ParallelFor(pool, m, [=](int64_t r) { out[r] = ExactArgmax(hp + r * k, wtp, k, n); });
    return ffi::Error::Success();
  }
  // The rows' codes, and the outlier dimensions' entries of h and rows of w [strips, outliers, 16].
  const float gamma = 1.01f * k * std::ldexp(1.f, -24);  // float32 rounding of a k-term dot product
  const std::vector<int64_t> dims = OutlierDims(hp, m, k);
  const int64_t num_outliers = dims.size();
  std::vector<uint8_t> row_codes(m * quads * 4);
  std::vector<HeadRow> rows(m);
  std::vector<float> outliers(m * num_outliers), exact_rows(strips * num_outliers * kStrip);
  for (int64_t r = 0; r < m; ++r) {
    rows[r] = QuantiseRow(hp + r * k, k, quads, dims, gamma, row_codes.data() + r * quads * 4);
    // With |h|_1 max|w| far below the float range no product, sum or bound overflows; else every
    // exact logit, as argmax would see them.
    rows[r].finite &= rows[r].abs_sum * w_max < 1e30;
    for (int64_t j = 0; j < num_outliers; ++j) outliers[r * num_outliers + j] = hp[r * k + dims[j]];
  }
  float* xp = exact_rows.data();
  ParallelFor(pool, (strips + kHeadStripsPerChunk - 1) / kHeadStripsPerChunk, [=, &dims](int64_t chunk) {
    for (int64_t s = chunk * kHeadStripsPerChunk; s < std::min(strips, (chunk + 1) * kHeadStripsPerChunk); ++s)
      for (int64_t j = 0; j < num_outliers; ++j)
        std::copy_n(fp + (s * k + dims[j]) * kStrip, kStrip, xp + (s * num_outliers + j) * kStrip);
  });
  // Bounds of every logit: upper bounds [m, strips * 16], the largest lower bound per (chunk, row).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = RoundUp((strips + kHeadStripsPerChunk - 1) / kHeadStripsPerChunk, threads);
  thread_local std::vector<float> upper_bounds_buffer;  // reused: 6 MB for SmolLM2 at batch 32
  upper_bounds_buffer.resize(m * strips * kStrip);
  float* upper_bounds = upper_bounds_buffer.data();
  std::vector<__m256> lower_max(chunks * m, _mm256_set1_ps(-INFINITY));
  {
    const uint8_t* up = row_codes.data();
    const HeadRow* rp = rows.data();
    const float* ol = outliers.data();
    float* ub = upper_bounds;
    __m256* lm = lower_max.data();
    ParallelFor(pool, chunks, [=](int64_t chunk) {
      __m256i dots[2 * kHeadTileRows];
      const int64_t end = (chunk + 1) * strips / chunks;
      for (int64_t s = chunk * strips / chunks; s < end; ++s) {
        const int8_t* strip = qp + s * quads * kStrip * 4;
        const int64_t cols = std::min(kStrip, n - s * kStrip);
        for (int64_t r0 = 0; r0 < m; r0 += kHeadTileRows) {
          const int64_t tile = std::min<int64_t>(kHeadTileRows, m - r0);
          const int8_t* ahead = r0 == 0 && s + 1 < end ? strip + quads * kStrip * 4 : nullptr;
          CodeTileOfRows<kHeadTileRows>(tile, up + r0 * quads * 4, quads, strip, ahead, dots);
          for (int64_t t = 0, r = r0; t < tile; ++t, ++r)
            BoundStrip(dots + 2 * t, rp[r], ol + r * num_outliers, num_outliers, xp + s * num_outliers * kStrip,
                       sp + s * kHeadStats * kStrip, op + s * kStrip, cols, ub + (r * strips + s) * kStrip,
                       lm[chunk * m + r]);
        }
      }
    });
  }
  // Per row: the columns whose upper bound reaches the largest lower bound, then their exact logits.
  ParallelFor(pool, m, [&](int64_t r) {
    const float* hr = hp + r * k;
    if (!rows[r].finite) {
      out[r] = ExactArgmax(hr, wtp, k, n);
      return;
    }
    __m256 lows = _mm256_set1_ps(-INFINITY);
    for (int64_t c = 0; c < chunks; ++c) lows = _mm256_max_ps(lows, lower_max[c * m + r]);
    const float bar = MaxOfLanes(lows);
    const __m256 vbar = _mm256_set1_ps(bar);
    const float* ur = upper_bounds + r * strips * kStrip;
    std::vector<int32_t> columns;
    for (int64_t v = 0; v < strips * kStrip; v += 8)
      for (uint32_t pass = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(ur + v), vbar, _CMP_GE_OQ)); pass;
           pass &= pass - 1)
        columns.push_back(static_cast<int32_t>(v + __builtin_ctz(pass)));
    std::vector<float> logits(columns.size());
    ExactLogits(hr, wtp, k, columns.data(), columns.size(), logits.data());
    const int64_t best = columns.empty() ? -1 : FirstMaxIndex(logits.data(), columns.size());
    const bool proven = best >= 0 && !std::isnan(logits[best]) && logits[best] >= bar;
    out[r] = proven ? columns[best] : ExactArgmax(hr, wtp, k, n);
  });
  return ffi::Error::Success();
}

extern "C" int HumpbackGreedyHeadBuilt() { return 1; }
#else
extern "C" int HumpbackGreedyHeadBuilt() { return 0; }
// Without AVX-512 VNNI the 8-bit pass gains nothing over every logit in float32 (AVX2's maddubs path
// measured slower than the float32 head: bench/RESULTS.md), so cpu.py never calls these (it asks
// HumpbackGreedyHeadBuilt first).
ffi::Error GreedyHeadTables(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::ResultBuffer<ffi::S8>,
                            ffi::ResultBuffer<ffi::F32>, ffi::ResultBuffer<ffi::F32>, ffi::ResultBuffer<ffi::S32>,
                            ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "greedy_head_tables needs AVX-512 VNNI");
}

ffi::Error GreedyHead(ffi::ThreadPool, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::S8>, ffi::Buffer<ffi::F32>,
                      ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                      ffi::ResultBuffer<ffi::S32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "greedy_head needs AVX-512 VNNI");
}
#endif  // AVX-512 VNNI

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackArgmax, Argmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackGreedyHeadTables, GreedyHeadTables,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackGreedyHead, GreedyHead,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
