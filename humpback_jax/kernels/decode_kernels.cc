// CPU kernels for the decode step, called from XLA through its FFI (see cpu.py).
//
// A decode step multiplies a few rows (one per sequence) by every weight matrix, and attends one
// query per row over the KV cache. XLA:CPU sends both to Eigen, whose GEMM packs the whole weight
// before using it (a second pass over memory the step is bound by) and whose batched dot runs the
// attention products at a fraction of memory bandwidth. Here each step reads each weight once,
// from 16-column strips packed once per decode loop, into AVX2/FMA register tiles, and attention
// reads only the visible cache slots; both split their work over XLA's intra-op threads.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(chunk) for chunk in [0, num_chunks) on the caller and XLA's intra-op pool. Chunks are
// claimed from a shared counter, so the caller finishes the work alone if no pool thread is free.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t num_chunks, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, num_chunks, body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < num_chunks;) {
      body(c);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), num_chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < num_chunks) std::this_thread::yield();
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------------------------------------
// y[m, n] = x[m, k] @ w[k, n] with w packed as 16-column strips, wp[n / 16, k, 16] (cpu.py packs it
// once per program, outside the decode loop). Each strip is one contiguous run of memory: streamed
// once from DRAM by the first row tile, then re-read from cache by the others.

constexpr int64_t kStrip = 16;

// Accumulators are named variables, not an array: GCC spills an array of __m256 to the stack on
// every iteration (12 stores per 12 FMAs), which halved this loop's speed.
#define HJ_ROW(r)                                              \
  if (R > r) {                                                 \
    const __m256 xr = _mm256_broadcast_ss(x + r * k + i);      \
    a##r##0 = _mm256_fmadd_ps(xr, w0, a##r##0);                \
    a##r##1 = _mm256_fmadd_ps(xr, w1, a##r##1);                \
  }
#define HJ_STORE(r)                                            \
  if (R > r) {                                                 \
    _mm256_storeu_ps(y + r * n, a##r##0);                      \
    _mm256_storeu_ps(y + r * n + 8, a##r##1);                  \
  }

// `next` is the strip after this one: its lines are requested into L2 while this one computes
// (standalone, 2 threads, 70 MB of weights: 32 rows at 116-124 GFLOP/s vs 108 without; 8 rows
// stream ~12 GB/s either way, against ~20 GB/s for one row: this host's DRAM is the limit there).
template <int R>
void StripTile(const float* x, int64_t k, const float* strip, const float* next, float* y, int64_t n) {
  static_assert(R >= 1 && R <= 6, "6 rows x 2 vectors = 12 accumulators of 16 registers");
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t i = 0; i < k; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(next + i * kStrip), _MM_HINT_T1);
    const __m256 w0 = _mm256_loadu_ps(strip + i * kStrip), w1 = _mm256_loadu_ps(strip + i * kStrip + 8);
    HJ_ROW(0) HJ_ROW(1) HJ_ROW(2) HJ_ROW(3) HJ_ROW(4) HJ_ROW(5)
  }
  HJ_STORE(0) HJ_STORE(1) HJ_STORE(2) HJ_STORE(3) HJ_STORE(4) HJ_STORE(5)
}
#undef HJ_ROW
#undef HJ_STORE

// All m rows against one strip, in tiles of at most 6 rows (12 accumulators) of near-equal size.
void StripAllRows(int64_t m, const float* x, int64_t k, const float* strip, const float* next, float* y,
                  int64_t n) {
  const int64_t tiles = (m + 5) / 6;
  for (int64_t t = 0, r = 0; t < tiles; ++t) {
    const int64_t rows = (m - r + (tiles - t) - 1) / (tiles - t);
    const float* xr = x + r * k;
    float* yr = y + r * n;
    switch (rows) {
      case 6: StripTile<6>(xr, k, strip, next, yr, n); break;
      case 5: StripTile<5>(xr, k, strip, next, yr, n); break;
      case 4: StripTile<4>(xr, k, strip, next, yr, n); break;
      case 3: StripTile<3>(xr, k, strip, next, yr, n); break;
      case 2: StripTile<2>(xr, k, strip, next, yr, n); break;
      default: StripTile<1>(xr, k, strip, next, yr, n); break;
    }
    r += rows;
  }
}

constexpr int64_t kStripsPerChunk = 8;

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1] || wd[2] != kStrip || yd.size() != 2 ||
      yd[0] != xd[0] || yd[1] != wd[0] * kStrip)
    return ffi::Error::InvalidArgument("packed_matmul: expected x [m, k], wp [n / 16, k, 16], y [m, n]");
  const int64_t m = xd[0], k = xd[1], strips = wd[0], n = strips * kStrip;
  const float *xp = x.typed_data(), *wpp = wp.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, (strips + kStripsPerChunk - 1) / kStripsPerChunk, [=](int64_t c) {
    const int64_t end = std::min(strips, (c + 1) * kStripsPerChunk);
    for (int64_t s = c * kStripsPerChunk; s < end; ++s) {
      const float* strip = wpp + s * k * kStrip;
      StripAllRows(m, xp, k, strip, s + 1 < end ? strip + k * kStrip : strip, yp + s * kStrip, n);
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// One query per row over the cache: q [b, kv, g, d], k/v [b, s, kv, d], visible [b, s] (nonzero =
// a filled slot the query may see) -> out [b, kv, g, d]; d a multiple of 8. Only visible slots are
// read. A row with no visible slot averages every slot, as softmax over all-masked logits does.

// e^x for x <= 0 (Cephes' polynomial, as in avx_mathfun): inputs below -87.3 give ~0.
inline __m256 ExpNonPositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

// probs[0, n) <- softmax(logits[0, n)), in place.
void SoftmaxInPlace(float* p, int64_t n) {
  const float mx = *std::max_element(p, p + n);
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(p + t), vmx));
    _mm256_storeu_ps(p + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float total = HorizontalSum(vsum);
  for (; t < n; ++t) total += (p[t] = std::exp(p[t] - mx));
  const __m256 inv = _mm256_set1_ps(1.f / total);
  for (t = 0; t + 8 <= n; t += 8) _mm256_storeu_ps(p + t, _mm256_mul_ps(_mm256_loadu_ps(p + t), inv));
  for (; t < n; ++t) p[t] *= 1.f / total;
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
  const int64_t heads = kv * g, slot_floats = kv * d;
  // One row per chunk: its cache slots [kv, d] are contiguous, so K and V stream front to back.
  ParallelFor(pool, b, [=](int64_t row) {
    thread_local std::vector<int64_t> slots;
    thread_local std::vector<float> probs;
    slots.clear();
    for (int64_t t = 0; t < s; ++t)
      if (vis[row * s + t]) slots.push_back(t);
    const bool none_visible = slots.empty();
    if (none_visible)
      for (int64_t t = 0; t < s; ++t) slots.push_back(t);
    const int64_t n = slots.size();
    probs.resize(heads * n);
    const float* qr = qp + row * heads * d;  // [kv, g, d]: query head h = kv_head * g + j
    const float* kr = kp + row * s * slot_floats;
    const float* vr = vp + row * s * slot_floats;
    if (none_visible) std::fill(probs.begin(), probs.end(), 0.f);  // equal logits: a plain average
    for (int64_t i = 0; i < n && !none_visible; ++i) {
      const float* kt = kr + slots[i] * slot_floats;
      for (int64_t h = 0; h < heads; ++h) {
        const float* qh = qr + h * d;
        const float* kh = kt + (h / g) * d;
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(kh));
        for (int64_t e = 8; e < d; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + e), _mm256_loadu_ps(kh + e), acc);
        probs[h * n + i] = HorizontalSum(acc) * scale;
      }
    }
    for (int64_t h = 0; h < heads; ++h) SoftmaxInPlace(probs.data() + h * n, n);
    float* orow = op + row * heads * d;
    std::fill(orow, orow + heads * d, 0.f);
    for (int64_t i = 0; i < n; ++i) {
      const float* vt = vr + slots[i] * slot_floats;
      for (int64_t h = 0; h < heads; ++h) {
        const __m256 p = _mm256_set1_ps(probs[h * n + i]);
        const float* vh = vt + (h / g) * d;
        float* oh = orow + h * d;
        for (int64_t e = 0; e < d; e += 8)
          _mm256_storeu_ps(oh + e, _mm256_fmadd_ps(p, _mm256_loadu_ps(vh + e), _mm256_loadu_ps(oh + e)));
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
