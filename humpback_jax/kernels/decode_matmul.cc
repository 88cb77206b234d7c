// Decode-step matmuls: a few rows (one per sequence) times every weight, each weight read once from
// 16-column strips packed once per decode loop (PackWeightStrips), with a SwiGLU epilogue variant.
#include "common.h"

namespace {

// y[m, n] = x[m, k] @ w[k, n] with w packed as 16-column strips, wp[n / 16, k, 16] (cpu.py packs it
// once per program, outside the decode loop). Each strip is one contiguous run of memory: streamed
// once from DRAM by the first row tile, then re-read from cache by the others.

// The epilogue of a strip's tile: plain stores of its 16 columns, or, for a strip of interleaved
// (gate, up) column pairs, silu(gate) * up of its 8 pairs (the first `pairs` of them stored).
struct StoreColumns {
  static constexpr int64_t kWidth = kStrip;  // output columns per strip
  static void Store(__m256 c0, __m256 c1, float* y, int64_t) {  // y has all 16 columns of every strip
    _mm256_storeu_ps(y, c0);
    _mm256_storeu_ps(y + 8, c1);
  }
};

struct StoreSwiglu {
  static constexpr int64_t kWidth = kStrip / 2;
  // silu(g) * u = g / (1 + e^-g) * u: the formula of PyTorch's CPU silu, then the product.
  static void Store(__m256 c0, __m256 c1, float* y, int64_t pairs) {
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    const __m256 gate = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(c0, c1, 0x88), order);
    const __m256 up = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(c0, c1, 0xDD), order);
    const __m256 one = _mm256_set1_ps(1.f);
    const __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(one, Exp(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
    const __m256 h = _mm256_mul_ps(silu, up);
    if (pairs == kWidth) return _mm256_storeu_ps(y, h);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, h);
    std::copy(lanes, lanes + pairs, y);
  }
};

// Accumulators are named variables, not an array: GCC spills an array of __m256 to the stack on
// every iteration (12 stores per 12 FMAs), which halved this loop's speed.
#define HJ_ROW(r)                                              \
  if (R > r) {                                                 \
    const __m256 xr = _mm256_broadcast_ss(x + r * k + i);      \
    a##r##0 = _mm256_fmadd_ps(xr, w0, a##r##0);                \
    a##r##1 = _mm256_fmadd_ps(xr, w1, a##r##1);                \
  }
#define HJ_STORE(r) \
  if (R > r) Out::Store(a##r##0, a##r##1, y + r * ldy, width);

// While its tile computes, each of the `tiles` row tiles of a strip requests its share of the next
// strip into L2 (`ahead`: its first byte, advanced `stride` bytes per step of k), so that the
// strip's DRAM traffic is spread over the whole strip's compute rather than burst in the first tile.
// Rows of y are `ldy` apart; `width` of the strip's Out::kWidth output columns are stored.
template <int R, typename Out>
void StripTile(const float* x, int64_t k, const float* strip, const char* ahead, int64_t stride, float* y,
               int64_t ldy, int64_t width) {
  static_assert(R >= 1 && R <= 6, "6 rows x 2 vectors = 12 accumulators of 16 registers");
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t i = 0; i < k; ++i) {
    _mm_prefetch(ahead + i * stride, _MM_HINT_T1);
    __m256 w0 = _mm256_loadu_ps(strip + i * kStrip), w1 = _mm256_loadu_ps(strip + i * kStrip + 8);
    asm("" : "+x"(w0), "+x"(w1));  // keep the strip row in registers (see StridedTile)
    HJ_ROW(0) HJ_ROW(1) HJ_ROW(2) HJ_ROW(3) HJ_ROW(4) HJ_ROW(5)
  }
  HJ_STORE(0) HJ_STORE(1) HJ_STORE(2) HJ_STORE(3) HJ_STORE(4) HJ_STORE(5)
}
#undef HJ_ROW
#undef HJ_STORE

// All m rows against one strip, in tiles of at most 6 rows (12 accumulators) of near-equal size.
template <typename Out>
void StripAllRows(int64_t m, const float* x, int64_t k, const float* strip, const float* next, float* y,
                  int64_t ldy, int64_t width) {
  const int64_t tiles = (m + 5) / 6;
  const int64_t stride = (64 + tiles - 1) / tiles;  // bytes of `next` per step of k, per tile
  for (int64_t t = 0, r = 0; t < tiles; ++t) {
    const int64_t rows = (m - r + (tiles - t) - 1) / (tiles - t);
    const float* xr = x + r * k;
    float* yr = y + r * ldy;
    const char* ahead = reinterpret_cast<const char*>(next) + t * k * stride;
    switch (rows) {
      case 6: StripTile<6, Out>(xr, k, strip, ahead, stride, yr, ldy, width); break;
      case 5: StripTile<5, Out>(xr, k, strip, ahead, stride, yr, ldy, width); break;
      case 4: StripTile<4, Out>(xr, k, strip, ahead, stride, yr, ldy, width); break;
      case 3: StripTile<3, Out>(xr, k, strip, ahead, stride, yr, ldy, width); break;
      case 2: StripTile<2, Out>(xr, k, strip, ahead, stride, yr, ldy, width); break;
      default: StripTile<1, Out>(xr, k, strip, ahead, stride, yr, ldy, width); break;
    }
    r += rows;
  }
}

// wp[n / 16, k, 16] from w[k, n], columns past n zero: the layout PackedMatmul reads. Each task
// packs 8 strips, reading 512 contiguous bytes of each row of w (XLA's transpose was slow: bench/RESULTS.md).
ffi::Error PackWeightStrips(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> wp) {
  auto wd = w.dimensions(), pd = wp->dimensions();
  if (wd.size() != 2 || pd.size() != 3 || pd[0] != (wd[1] + kStrip - 1) / kStrip || pd[1] != wd[0] ||
      pd[2] != kStrip)
    return ffi::Error::InvalidArgument("pack_weight_strips: expected w [k, n] -> wp [ceil(n / 16), k, 16]");
  const int64_t k = wd[0], n = wd[1], strips = pd[0];
  const float* src = w.typed_data();
  float* dst = wp->typed_data();
  ParallelFor(pool, (strips + kStripsPerChunk - 1) / kStripsPerChunk, [=](int64_t c) {
    const int64_t end = std::min(strips, (c + 1) * kStripsPerChunk);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t s = c * kStripsPerChunk; s < end; ++s) {
        const int64_t cols = std::min(kStrip, n - s * kStrip);
        CopyStripRow(src + i * n + s * kStrip, cols, dst + (s * k + i) * kStrip);
      }
  });
  return ffi::Error::Success();
}

// y [m, cols] from x [m, k] @ wp, each strip's output through Out (cols: the valid output columns).
template <typename Out>
void StripMatmul(ffi::ThreadPool& pool, int64_t m, int64_t k, int64_t strips, const float* xp, const float* wpp,
                 float* yp, int64_t cols) {
  // ~8 strips per task, in a number of near-equal tasks that the threads divide evenly (36 strips
  // in chunks of 8 left one thread 20 strips and the other 16).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = RoundUp((strips + kStripsPerChunk - 1) / kStripsPerChunk, threads);
  ParallelFor(pool, chunks, [=](int64_t c) {
    const int64_t end = (c + 1) * strips / chunks;
    for (int64_t s = c * strips / chunks; s < end; ++s) {
      const float* strip = wpp + s * k * kStrip;
      const int64_t width = std::min(Out::kWidth, cols - s * Out::kWidth);
      StripAllRows<Out>(m, xp, k, strip, s + 1 < end ? strip + k * kStrip : strip, yp + s * Out::kWidth, cols,
                        width);
    }
  });
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = wp.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1] || wd[2] != kStrip || yd.size() != 2 ||
      yd[0] != xd[0] || yd[1] != wd[0] * kStrip)
    return ffi::Error::InvalidArgument("packed_matmul: expected x [m, k], wp [n / 16, k, 16], y [m, n]");
  StripMatmul<StoreColumns>(pool, xd[0], xd[1], wd[0], x.typed_data(), wp.typed_data(), y->typed_data(), yd[1]);
  return ffi::Error::Success();
}

// h [m, f] = silu(x @ gate) * (x @ up), from wp packing w [k, 2f] whose columns interleave gate and
// up (column 2j is gate's j, 2j + 1 up's j): SwiGLU in the matmul's epilogue, so the decode step
// writes and reads back no [m, 2f] product and runs no separate activation pass.
ffi::Error PackedSwigluMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                              ffi::ResultBuffer<ffi::F32> h) {
  auto xd = x.dimensions(), wd = wp.dimensions(), hd = h->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1] || wd[2] != kStrip || hd.size() != 2 ||
      hd[0] != xd[0] || (2 * hd[1] + kStrip - 1) / kStrip != wd[0])
    return ffi::Error::InvalidArgument(
        "packed_swiglu_matmul: expected x [m, k], wp [ceil(2f / 16), k, 16], h [m, f]");
  StripMatmul<StoreSwiglu>(pool, xd[0], xd[1], wd[0], x.typed_data(), wp.typed_data(), h->typed_data(), hd[1]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackPackedSwigluMatmul, PackedSwigluMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackPackWeightStrips, PackWeightStrips,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
