// Attention kernels: whole sequences (train step, prefill, scoring; forward and backward) and one
// query per row over the KV cache (decode steps, with the fused rotary + cache-write variant).
#include "strided_tile.h"

namespace {

// Attention of a whole sequence (training, scoring), forward and backward, one task per (row,
// KV head): q [b, t, heads, d], k/v [b, s, kv, d], mask [b, t, s] -> out [b, t, heads, d] and
// lse [b, heads, t] (log-sum-exp of each query's logits, what the backward re-derives P from).
// Queries go in blocks of 64 that only compute logits up to their last visible key (the causal
// triangle is skipped), every product through the 6x16 tile. A query with no visible key averages
// all keys, as softmax over all-masked logits does (lse = +inf marks it).

constexpr int64_t kQueryBlock = 64;

// Packs [depth, cols] (element (i, c) at src[i * is + c * cs]) as 16-column strips [depth, 16].
void PackStrips(const float* src, int64_t is, int64_t cs, int64_t depth, int64_t cols, float* dst) {
  for (int64_t c0 = 0; c0 < cols; c0 += kStrip)
    for (int64_t i = 0; i < depth; ++i)
      for (int64_t c = c0; c < c0 + kStrip; ++c) *dst++ = c < cols ? src[i * is + c * cs] : 0.f;
}

// c[rows, cols] (+)= a [rows, depth] (strided as in StridedTile) @ strips [depth, cols], the strips
// packed `stride` deep (only their first `depth` rows are read).
void TileProduct(const float* a, int64_t ra, int64_t ia, const float* strips, int64_t stride, int64_t rows,
                 int64_t depth, int64_t cols, float* c, int64_t ldc, bool accumulate) {
  alignas(32) float edge[kPanel * kStrip];
  for (int64_t c0 = 0; c0 < cols; c0 += kStrip) {
    const float* strip = strips + (c0 / kStrip) * stride * kStrip;
    const bool full = cols - c0 >= kStrip;
    for (int64_t r0 = 0; r0 < rows; r0 += kPanel) {
      const int64_t nr = std::min(kPanel, rows - r0);
      const float* ar = a + r0 * ra;
      float* ct = full ? c + r0 * ldc + c0 : edge;
      const int64_t ld = full ? ldc : kStrip;
      const bool acc = full && accumulate;
      switch (nr) {
        case 6: StridedTileApart<6>(ar, ra, ia, strip, depth, ct, ld, acc); break;
        case 5: StridedTileApart<5>(ar, ra, ia, strip, depth, ct, ld, acc); break;
        case 4: StridedTileApart<4>(ar, ra, ia, strip, depth, ct, ld, acc); break;
        case 3: StridedTileApart<3>(ar, ra, ia, strip, depth, ct, ld, acc); break;
        case 2: StridedTileApart<2>(ar, ra, ia, strip, depth, ct, ld, acc); break;
        default: StridedTileApart<1>(ar, ra, ia, strip, depth, ct, ld, acc); break;
      }
      if (full) continue;
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < cols - c0; ++j)
          c[(r0 + r) * ldc + c0 + j] = (accumulate ? c[(r0 + r) * ldc + c0 + j] : 0.f) + edge[r * kStrip + j];
    }
  }
}

struct AttentionShape {
  int64_t b, t, heads, d, s, kv, g;
  int64_t q_row() const { return heads * d; }  // floats between consecutive positions of q, out
  int64_t k_row() const { return kv * d; }
};

// Keys a block of queries needs: up to the last visible key of any of them (all when one sees none).
int64_t KeysNeeded(const bool* mask, const AttentionShape& sh, int64_t i0, int64_t rows) {
  int64_t end = 0;
  for (int64_t i = i0; i < i0 + rows; ++i) {
    const bool* row = mask + i * sh.s;
    int64_t last = sh.s;
    while (last > 0 && !row[last - 1]) --last;
    end = std::max(end, last == 0 ? sh.s : last);
  }
  return end;
}

inline __m256 VisibleLanes(const bool* vis) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vis)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(bytes, _mm256_setzero_si256()));
}

// Unscaled logits [rows, keys] of a query block -> probabilities of the scaled logits, in place;
// the forward writes each row's log-sum-exp, the backward re-derives probabilities from it.
void BlockSoftmax(float* p, int64_t ld, const bool* mask, const AttentionShape& sh, int64_t i0, int64_t rows,
                  int64_t keys, float scale, float* lse_out, const float* lse_in) {
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = p + r * ld;
    const bool* vis = mask + (i0 + r) * sh.s;
    float mx = lse_in ? lse_in[r] : -INFINITY;  // the backward subtracts the saved log-sum-exp
    if (!lse_in) {  // the largest visible scaled logit, 8 at a time (a NaN never becomes the maximum)
      __m256 vmax = _mm256_set1_ps(-INFINITY);
      int64_t j = 0;
      for (; j + 8 <= keys; j += 8) {
        const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(row + j), vscale);
        vmax = _mm256_max_ps(_mm256_blendv_ps(vmax, x, VisibleLanes(vis + j)), vmax);
      }
      mx = HorizontalMax(vmax);
      for (; j < keys; ++j)
        if (vis[j]) mx = std::max(mx, row[j] * scale);
    }
    if (std::isinf(mx)) {  // no visible key (the forward saved +inf for such a row)
      std::fill(row, row + keys, 1.f / sh.s);
      if (lse_out) lse_out[r] = INFINITY;
      continue;
    }
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= keys; j += 8) {
      const __m256 x = _mm256_fmsub_ps(_mm256_loadu_ps(row + j), vscale, vmx);
      const __m256 e = _mm256_and_ps(Exp(_mm256_min_ps(x, _mm256_setzero_ps())), VisibleLanes(vis + j));
      _mm256_storeu_ps(row + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float total = HorizontalSum(vsum);
    for (; j < keys; ++j) total += (row[j] = vis[j] ? std::exp(std::min(row[j] * scale - mx, 0.f)) : 0.f);
    if (lse_out) {
      const __m256 inv = _mm256_set1_ps(1.f / total);
      for (j = 0; j + 8 <= keys; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), inv));
      for (; j < keys; ++j) row[j] *= 1.f / total;
      lse_out[r] = mx + std::log(total);
    }
  }
}

ffi::Error AttentionShapeOf(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::PRED>& mask,
                            AttentionShape* sh) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3 || kd[0] != qd[0] || kd[3] != qd[3] ||
      qd[2] % kd[2] || md[0] != qd[0] || md[1] != qd[1] || md[2] != kd[1])
    return ffi::Error::InvalidArgument("attention: expected q [b, t, heads, d], k/v [b, s, kv, d], mask [b, t, s]");
  *sh = {qd[0], qd[1], qd[2], qd[3], kd[1], kd[2], qd[2] / kd[2]};
  return ffi::Error::Success();
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse, float scale) {
  AttentionShape sh;
  if (auto e = AttentionShapeOf(q, k, mask, &sh); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, sh.b * sh.kv, [=](int64_t task) {
    const int64_t bi = task / sh.kv, h = task % sh.kv, sp = RoundUp(sh.s, kStrip);
    thread_local std::vector<float> kt, vs, probs;
    kt.resize(sp * sh.d), vs.resize(RoundUp(sh.d, kStrip) * sh.s), probs.resize(kQueryBlock * sp);
    const float* kh = kp + bi * sh.s * sh.k_row() + h * sh.d;
    PackStrips(kh, 1, sh.k_row(), sh.d, sh.s, kt.data());                                      // K^T [d, s]
    PackStrips(vp + bi * sh.s * sh.k_row() + h * sh.d, sh.k_row(), 1, sh.s, sh.d, vs.data());  // V [s, d]
    const bool* mb = mp + bi * sh.t * sh.s;
    for (int64_t i0 = 0; i0 < sh.t; i0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, sh.t - i0), keys = KeysNeeded(mb, sh, i0, rows);
      for (int64_t head = h * sh.g; head < (h + 1) * sh.g; ++head) {
        const int64_t at = (bi * sh.t + i0) * sh.q_row() + head * sh.d;
        TileProduct(qp + at, sh.q_row(), 1, kt.data(), sh.d, rows, sh.d, keys, probs.data(), sp, false);
        BlockSoftmax(probs.data(), sp, mb, sh, i0, rows, keys, scale, lp + (bi * sh.heads + head) * sh.t + i0,
                     nullptr);
        TileProduct(probs.data(), sp, 1, vs.data(), sh.s, rows, keys, sh.d, op + at, sh.q_row(), false);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out,
                             ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, float scale) {
  AttentionShape sh;
  if (auto e = AttentionShapeOf(q, k, mask, &sh); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data();
  const float *lp = lse.typed_data(), *gp = dout.typed_data();
  const bool* mp = mask.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor(pool, sh.b * sh.kv, [=](int64_t task) {
    const int64_t bi = task / sh.kv, h = task % sh.kv, sp = RoundUp(sh.s, kStrip), dp = RoundUp(sh.d, kStrip);
    thread_local std::vector<float> kt, vt, ks, probs, dlogits, strips, dk_acc, dv_acc;
    kt.resize(sp * sh.d), vt.resize(sp * sh.d), ks.resize(dp * sh.s), strips.resize(kQueryBlock * dp);
    probs.resize(kQueryBlock * sp), dlogits.resize(kQueryBlock * sp);
    dk_acc.assign(sh.s * sh.d, 0.f), dv_acc.assign(sh.s * sh.d, 0.f);
    const float* kh = kp + bi * sh.s * sh.k_row() + h * sh.d;
    const float* vh = vp + bi * sh.s * sh.k_row() + h * sh.d;
    PackStrips(kh, 1, sh.k_row(), sh.d, sh.s, kt.data());  // K^T [d, s]
    PackStrips(vh, 1, sh.k_row(), sh.d, sh.s, vt.data());  // V^T [d, s]
    PackStrips(kh, sh.k_row(), 1, sh.s, sh.d, ks.data());  // K [s, d]
    const bool* mb = mp + bi * sh.t * sh.s;
    for (int64_t i0 = 0; i0 < sh.t; i0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, sh.t - i0), keys = KeysNeeded(mb, sh, i0, rows);
      for (int64_t head = h * sh.g; head < (h + 1) * sh.g; ++head) {
        const int64_t at = (bi * sh.t + i0) * sh.q_row() + head * sh.d;
        TileProduct(qp + at, sh.q_row(), 1, kt.data(), sh.d, rows, sh.d, keys, probs.data(), sp, false);
        BlockSoftmax(probs.data(), sp, mb, sh, i0, rows, keys, scale, nullptr, lp + (bi * sh.heads + head) * sh.t + i0);
        TileProduct(gp + at, sh.q_row(), 1, vt.data(), sh.d, rows, sh.d, keys, dlogits.data(), sp, false);  // dO V^T
        for (int64_t r = 0; r < rows; ++r) {  // d(scaled logits) = P * (dP - rowsum(dO * O)), times scale
          const float *o_r = op + at + r * sh.q_row(), *g_r = gp + at + r * sh.q_row();
          float delta = 0.f;
          for (int64_t e = 0; e < sh.d; ++e) delta += o_r[e] * g_r[e];
          float *pr = probs.data() + r * sp, *dr = dlogits.data() + r * sp;
          for (int64_t j = 0; j < keys; ++j) dr[j] = scale * pr[j] * (dr[j] - delta);
        }
        TileProduct(dlogits.data(), sp, 1, ks.data(), sh.s, rows, keys, sh.d, dqp + at, sh.q_row(), false);
        PackStrips(qp + at, sh.q_row(), 1, rows, sh.d, strips.data());  // dK += dS^T Q
        TileProduct(dlogits.data(), 1, sp, strips.data(), rows, keys, rows, sh.d, dk_acc.data(), sh.d, true);
        PackStrips(gp + at, sh.q_row(), 1, rows, sh.d, strips.data());  // dV += P^T dO
        TileProduct(probs.data(), 1, sp, strips.data(), rows, keys, rows, sh.d, dv_acc.data(), sh.d, true);
      }
    }
    for (int64_t j = 0; j < sh.s; ++j) {
      std::copy(dk_acc.begin() + j * sh.d, dk_acc.begin() + (j + 1) * sh.d, dkp + (bi * sh.s + j) * sh.k_row() + h * sh.d);
      std::copy(dv_acc.begin() + j * sh.d, dv_acc.begin() + (j + 1) * sh.d, dvp + (bi * sh.s + j) * sh.k_row() + h * sh.d);
    }
  });
  return ffi::Error::Success();
}

// One query per row over the cache: q [b, kv, g, d], k/v [b, s, kv, d], visible [b, s] (nonzero =
// a filled slot the query may see) -> out [b, kv, g, d]; d a multiple of 8. Only visible slots are
// read. A row with no visible slot averages every slot, as softmax over all-masked logits does.

// probs[0, n) <- softmax(logits[0, n)), in place.
void SoftmaxInPlace(float* p, int64_t n) {
  const float mx = *std::max_element(p, p + n);
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(p + t), vmx));
    _mm256_storeu_ps(p + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float total = HorizontalSum(vsum);
  for (; t < n; ++t) total += (p[t] = std::exp(p[t] - mx));
  const __m256 inv = _mm256_set1_ps(1.f / total);
  for (t = 0; t + 8 <= n; t += 8) _mm256_storeu_ps(p + t, _mm256_mul_ps(_mm256_loadu_ps(p + t), inv));
  for (; t < n; ++t) p[t] *= 1.f / total;
}

// Lane t of the result is HorizontalSum(a[t]), added in the same order, so bit-identical to it.
inline __m256 HorizontalSums(const __m256* a) {
  __m256 halves[4];  // [lo + hi of a[2i] | lo + hi of a[2i + 1]]
  for (int i = 0; i < 4; ++i)
    halves[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x20),
                              _mm256_permute2f128_ps(a[2 * i], a[2 * i + 1], 0x31));
  __m256 pairs[2];  // per vector, of its four-lane sum x: [x0 + x2, x1 + x3]
  for (int i = 0; i < 2; ++i)
    pairs[i] = _mm256_add_ps(_mm256_shuffle_ps(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(halves[2 * i], halves[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 sums = _mm256_hadd_ps(pairs[0], pairs[1]);  // lanes hold vectors 0 2 4 6 | 1 3 5 7
  return _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The cache is read front to back, each slot once, with every slot 8 ahead prefetched into L2:
// left to the hardware prefetcher, reading stalled while computing (measured: the kernel ran at
// DRAM time + compute time; a pure read of the same slots took ~2/3 of it).
constexpr int64_t kSlotsAhead = 8;

inline void PrefetchSlot(const float* slot, int64_t slot_floats) {
  for (int64_t l = 0; l < slot_floats; l += 16) _mm_prefetch(reinterpret_cast<const char*>(slot + l), _MM_HINT_T1);
}

// logits[h * ld + i] = scale * q_h . k_{slots[i]} for every query head h. Each slot's per-head partial
// sums wait in `partial` [heads, 8, 8] until 8 slots are reduced together (one horizontal sum per
// head and slot cost more than the products). Near the end the values' first slots are prefetched.
void ScoreKeys(const float* qr, const float* kr, const float* vr, const int64_t* slots, int64_t n, int64_t kv,
               int64_t g, int64_t d, float scale, float* partial, float* logits, int64_t ld) {
  const int64_t slot_floats = kv * d;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ahead = i + kSlotsAhead;
    PrefetchSlot(ahead < n ? kr + slots[ahead] * slot_floats : vr + slots[std::min(ahead - n, n - 1)] * slot_floats,
                 slot_floats);
    const float* kt = kr + slots[i] * slot_floats;
    for (int64_t j = 0; j < kv; ++j)
      for (int64_t h0 = j * g; h0 < (j + 1) * g; h0 += 4) {  // up to 4 query heads per pass over k_j
        const int64_t hn = std::min<int64_t>(4, (j + 1) * g - h0);
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t e = 0; e < d; e += 8) {
          const __m256 k8 = _mm256_loadu_ps(kt + j * d + e);
          for (int64_t h = 0; h < hn; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qr + (h0 + h) * d + e), k8, acc[h]);
        }
        for (int64_t h = 0; h < hn; ++h) _mm256_storeu_ps(partial + ((h0 + h) * 8 + i % 8) * 8, acc[h]);
      }
    if (i % 8 == 7 || i == n - 1) {  // lanes past the last slot repeat it and land in ld's padding
      for (int64_t h = 0; h < kv * g; ++h) {
        __m256 rows[8];
        for (int64_t t = 0; t < 8; ++t) rows[t] = _mm256_loadu_ps(partial + (h * 8 + std::min(t, i % 8)) * 8);
        _mm256_storeu_ps(logits + h * ld + i - i % 8, _mm256_mul_ps(HorizontalSums(rows), _mm256_set1_ps(scale)));
      }
    }
  }
}

// out[h] = sum_i probs[h * ld + i] * v_{slots[i]} for every query head h, added slot after slot; two
// slots per load and store of the running sums.
void SumValues(const float* vr, const int64_t* slots, int64_t n, int64_t kv, int64_t g, int64_t d,
               const float* probs, int64_t ld, float* out) {
  const int64_t slot_floats = kv * d;
  std::fill(out, out + kv * g * d, 0.f);
  for (int64_t i = 0; i < n; i += 2) {
    const bool pair = i + 1 < n;
    const float* v0 = vr + slots[i] * slot_floats;
    const float* v1 = vr + slots[pair ? i + 1 : i] * slot_floats;
    for (int64_t t = i; t < i + 2; ++t) PrefetchSlot(vr + slots[std::min(t + kSlotsAhead, n - 1)] * slot_floats, slot_floats);
    for (int64_t h = 0; h < kv * g; ++h) {
      const __m256 p0 = _mm256_set1_ps(probs[h * ld + i]);
      const __m256 p1 = _mm256_set1_ps(pair ? probs[h * ld + i + 1] : 0.f);
      const int64_t offset = (h / g) * d;
      float* oh = out + h * d;
      for (int64_t e = 0; e < d; e += 8) {
        __m256 o = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + offset + e), _mm256_loadu_ps(oh + e));
        if (pair) o = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1 + offset + e), o);
        _mm256_storeu_ps(oh + e, o);
      }
    }
  }
}

// One row's attention: q [kv, g, d] over its cache rows k/v [s, kv, d], visible [s] -> out [kv, g, d].
void AttendRow(const float* qr, const float* kr, const float* vr, const int32_t* vis, int64_t s, int64_t kv,
               int64_t g, int64_t d, float scale, float* out) {
  thread_local std::vector<int64_t> slots;
  thread_local std::vector<float> probs, partial;
  slots.clear();
  for (int64_t t = 0; t < s; ++t)
    if (vis[t]) slots.push_back(t);
  const bool none_visible = slots.empty();
  if (none_visible)
    for (int64_t t = 0; t < s; ++t) slots.push_back(t);
  const int64_t heads = kv * g, n = slots.size(), ld = RoundUp(n, 8);
  probs.resize(heads * ld);
  partial.resize(heads * 8 * 8);
  if (none_visible) std::fill(probs.begin(), probs.end(), 0.f);  // equal logits: a plain average
  else ScoreKeys(qr, kr, vr, slots.data(), n, kv, g, d, scale, partial.data(), probs.data(), ld);
  for (int64_t h = 0; h < heads; ++h) SoftmaxInPlace(probs.data() + h * ld, n);
  SumValues(vr, slots.data(), n, kv, g, d, probs.data(), ld, out);
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kc,
                           ffi::Buffer<ffi::F32> vc, ffi::Buffer<ffi::S32> visible,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions(), kd = kc.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || kd[0] != qd[0] || kd[2] != qd[1] || kd[3] != qd[3] || qd[3] % 8)
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q [b, kv, g, d], k/v [b, s, kv, d] with d a multiple of 8");
  const int64_t b = qd[0], kv = qd[1], g = qd[2], d = qd[3], s = kd[1];
  const float *qp = q.typed_data(), *kp = kc.typed_data(), *vp = vc.typed_data();
  const int32_t* vis = visible.typed_data();
  float* op = out->typed_data();
  // One row per chunk: its cache slots [kv, d] are contiguous, so K and V stream front to back.
  ParallelFor(pool, b, [=](int64_t row) {
    const int64_t rows = s * kv * d;
    AttendRow(qp + row * kv * g * d, kp + row * rows, vp + row * rows, vis + row * s, s, kv, g, d, scale,
              op + row * kv * g * d);
  });
  return ffi::Error::Success();
}

// x [d] rotated in Hugging Face's rotate-half layout, as transformers computes it (two products, then
// their sum; no fused multiply-add): out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[d/2:], x[:d/2]].
inline void RotateHalf(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  const int64_t half = d / 2;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t e = 0; e < half; e += 8) {
    const __m256 x1 = _mm256_loadu_ps(x + e), x2 = _mm256_loadu_ps(x + half + e);
    _mm256_storeu_ps(out + e, _mm256_add_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(cos + e)),
                                            _mm256_mul_ps(_mm256_xor_ps(x2, sign), _mm256_loadu_ps(sin + e))));
    _mm256_storeu_ps(out + half + e, _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(cos + half + e)),
                                                   _mm256_mul_ps(x1, _mm256_loadu_ps(sin + half + e))));
  }
}

// A decode step's attention from the fused q/k/v projection: qkv [b, kv, g + 2, d] (per KV head: its
// g query heads, then k, then v, before rotary), cos/sin [b, d] at each row's new position, caches
// k/v [b, s, kv, d] updated in place (aliased to the outputs), slot `index` [] for the new k/v,
// visible [b, s] -> out [b, kv, g, d]. Rotating q and k, writing the cache and attending happen in
// one call per layer, where XLA ran three small fusions; d a multiple of 16.
ffi::Error DecodeAttentionStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos,
                               ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> kc, ffi::Buffer<ffi::F32> vc,
                               ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::S32> visible,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> kc_out,
                               ffi::ResultBuffer<ffi::F32> vc_out, float scale) {
  auto xd = qkv.dimensions(), kd = kc.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != xd[0] || kd[2] != xd[1] || kd[3] != xd[3] || xd[2] < 3 ||
      xd[3] % 16)
    return ffi::Error::InvalidArgument(
        "decode_attention_step: expected qkv [b, kv, g + 2, d], k/v [b, s, kv, d] with d a multiple of 16");
  const int64_t b = xd[0], kv = xd[1], g = xd[2] - 2, d = xd[3], s = kd[1];
  const int64_t slot = index.typed_data()[0];
  if (slot < 0 || slot >= s) return ffi::Error::InvalidArgument("decode_attention_step: index outside the cache");
  float *kp = kc_out->typed_data(), *vp = vc_out->typed_data();
  if (kp != kc.typed_data()) std::copy_n(kc.typed_data(), kc.element_count(), kp);  // if XLA did not alias
  if (vp != vc.typed_data()) std::copy_n(vc.typed_data(), vc.element_count(), vp);
  const float *xp = qkv.typed_data(), *cp = cos.typed_data(), *sp = sin.typed_data();
  const int32_t* vis = visible.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, b, [=](int64_t row) {
    thread_local std::vector<float> q;
    q.resize(kv * g * d);
    const int64_t rows = s * kv * d;
    float *kr = kp + row * rows, *vr = vp + row * rows;
    for (int64_t j = 0; j < kv; ++j) {
      const float* x = xp + (row * kv + j) * (g + 2) * d;
      for (int64_t h = 0; h < g; ++h) RotateHalf(x + h * d, cp + row * d, sp + row * d, d, q.data() + (j * g + h) * d);
      RotateHalf(x + g * d, cp + row * d, sp + row * d, d, kr + (slot * kv + j) * d);
      std::copy_n(x + (g + 1) * d, d, vr + (slot * kv + j) * d);
    }
    AttendRow(q.data(), kr, vr, vis + row * s, s, kv, g, d, scale, op + row * kv * g * d);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackDecodeAttentionStep, DecodeAttentionStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
