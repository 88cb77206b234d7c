// CPU kernels for the decode step and the float32 train step, called from XLA through its FFI
// (see cpu.py).
//
// A decode step multiplies a few rows (one per sequence) by every weight matrix, and attends one
// query per row over the KV cache. XLA:CPU sends both to Eigen, whose GEMM packs the whole weight
// before using it (a second pass over memory the step is bound by) and whose batched dot runs the
// attention products at a fraction of memory bandwidth. Here each step reads each weight once,
// from 16-column strips packed once per decode loop, into AVX2/FMA register tiles, and attention
// reads only the visible cache slots; both split their work over XLA's intra-op threads.
// Whole sequences (the train step, prompt prefill, scoring) get a packed GEMM (every dense layer
// and its two gradients), a whole-sequence attention, forward and backward, that skips the causal
// triangle and never materialises the masks, transposes and softmax passes XLA builds around its
// batched dots, and a one-pass RMSNorm (forward and backward). Greedy decoding's vocabulary
// projection is bounded by an 8-bit pass (AVX-512 VNNI) so that only the logits that could be the
// largest are computed (GreedyHead).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
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

inline int64_t RoundUp(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The largest of v's lanes, taken in lane order by std::max (so a NaN lane is not propagated).
inline float HorizontalMax(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return *std::max_element(lanes, lanes + 8);
}

// e^x (Cephes' polynomial, as in avx_mathfun): inputs below -87.3 give ~0, above 88.4 ~2.4e38.
inline __m256 Exp(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.3762626647949f));
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

// ---------------------------------------------------------------------------------------------
// y[m, n] = x[m, k] @ w[k, n] with w packed as 16-column strips, wp[n / 16, k, 16] (cpu.py packs it
// once per program, outside the decode loop). Each strip is one contiguous run of memory: streamed
// once from DRAM by the first row tile, then re-read from cache by the others.

constexpr int64_t kStrip = 16;

// One row of a strip: `cols` floats from src, zeros past them.
inline void CopyStripRow(const float* src, int64_t cols, float* dst) {
  if (cols == kStrip) {
    _mm256_storeu_ps(dst, _mm256_loadu_ps(src)), _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(src + 8));
    return;
  }
  std::copy(src, src + cols, dst);
  std::fill(dst + cols, dst + kStrip, 0.f);
}

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

constexpr int64_t kStripsPerChunk = 8;

// wp[n / 16, k, 16] from w[k, n], columns past n zero: the layout PackedMatmul reads. Each task
// packs 8 strips, reading 512 contiguous bytes of each row of w (XLA's transpose ran at ~1.6 GB/s).
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

// ---------------------------------------------------------------------------------------------
// General matmul c[m, n] = op(a) @ op(b), op a transpose or not, for the training step's dense
// layers and their two gradients (x @ w, dy @ w^T, x^T @ dy). BLIS's scheme: both operands are
// packed once per call (a into 6-row panels [m / 6, k, 6], b into 16-column strips [n / 16, k, 16],
// zero-padded), then blocks of c are computed in parallel, each in 256-deep slices of k so that a
// strip's slice (16 KB) stays in L1 while it meets every 6-row panel of the block (L2). With AVX-512,
// pairs of panels meet pairs of strips in 12 x 32 tiles (PanelPairTile), the edges in 6 x 16 ones.

constexpr int64_t kPanel = 6, kDepth = 256, kBlockRows = 96, kBlockCols = 256;

// c[R, 16] (+)= a [R, depth] @ b, a 16-column strip [depth, 16]; row r of a, element i at
// a[r * ra + i * ia]: a packed 6-row panel (ra = 1, ia = 6), or rows read in place (a row-major or
// transposed block), so that the attention's d = 64 products need no packing.
#define HJ_SROW(r)                                             \
  if (R > r) {                                                 \
    const __m256 ar = _mm256_broadcast_ss(a##r);               \
    a##r += ia;                                                \
    c##r##0 = _mm256_fmadd_ps(ar, b0, c##r##0);                \
    c##r##1 = _mm256_fmadd_ps(ar, b1, c##r##1);                \
  }
#define HJ_SSTORE(r)                                                              \
  if (R > r) {                                                                    \
    if (accumulate) {                                                             \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(c + r * ldc));             \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(c + r * ldc + 8));         \
    }                                                                             \
    _mm256_storeu_ps(c + r * ldc, c##r##0);                                       \
    _mm256_storeu_ps(c + r * ldc + 8, c##r##1);                                   \
  }

template <int R>
void StridedTile(const float* a, int64_t ra, int64_t ia, const float* b, int64_t depth, float* c, int64_t ldc,
                 bool accumulate) {
  const float *a0 = a, *a1 = a + ra, *a2 = a + 2 * ra, *a3 = a + 3 * ra, *a4 = a + 4 * ra, *a5 = a + 5 * ra;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t i = 0; i < depth; ++i) {
    __m256 b0 = _mm256_loadu_ps(b + i * kStrip), b1 = _mm256_loadu_ps(b + i * kStrip + 8);
    // An empty asm that takes the strip row as register operands: without it GCC folded the two
    // loads into each of the 12 FMAs, 18 loads per 12 FMAs, so the load ports set the pace.
    asm("" : "+x"(b0), "+x"(b1));
    HJ_SROW(0) HJ_SROW(1) HJ_SROW(2) HJ_SROW(3) HJ_SROW(4) HJ_SROW(5)
  }
  HJ_SSTORE(0) HJ_SSTORE(1) HJ_SSTORE(2) HJ_SSTORE(3) HJ_SSTORE(4) HJ_SSTORE(5)
}
#undef HJ_SROW
#undef HJ_SSTORE

// StridedTile compiled on its own. Inlined into TileProduct's row dispatch, GCC re-read the strip
// row for every FMA, or, made to keep it in registers, spilled two accumulators to the stack every
// iteration: the attention products ran at about half the GEMM's speed.
template <int R>
__attribute__((noinline)) void StridedTileApart(const float* a, int64_t ra, int64_t ia, const float* b,
                                                int64_t depth, float* c, int64_t ldc, bool accumulate) {
  StridedTile<R>(a, ra, ia, b, depth, c, ldc, accumulate);
}

#if defined(__AVX512F__)
// c[12, 32] (+)= two consecutive packed 6-row panels [depth, 6] @ two consecutive 16-column strips
// [depth, 16], in 24 AVX-512 accumulators: per step of k, 2 strip loads and 12 broadcasts feed 24
// FMAs (StridedTile's 6 x 16: 8 loads per 12). Each element is the same chain of FMAs as there.
#define HJ_ZROW(n, panel, r)                                   \
  {                                                            \
    const __m512 ar = _mm512_set1_ps(panel[i * kPanel + r]);   \
    c##n##0 = _mm512_fmadd_ps(ar, b0, c##n##0);                \
    c##n##1 = _mm512_fmadd_ps(ar, b1, c##n##1);                \
  }
#define HJ_ZSTORE(n, r)                                                             \
  {                                                                                 \
    if (accumulate) {                                                               \
      c##n##0 = _mm512_add_ps(c##n##0, _mm512_loadu_ps(c + r * ldc));               \
      c##n##1 = _mm512_add_ps(c##n##1, _mm512_loadu_ps(c + r * ldc + kStrip));      \
    }                                                                               \
    _mm512_storeu_ps(c + r * ldc, c##n##0);                                         \
    _mm512_storeu_ps(c + r * ldc + kStrip, c##n##1);                                \
  }

__attribute__((noinline)) void PanelPairTile(const float* pa, const float* pb, const float* sa, const float* sb,
                                             int64_t depth, float* c, int64_t ldc, bool accumulate) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  __m512 c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
  __m512 c80 = c00, c81 = c00, c90 = c00, c91 = c00, cA0 = c00, cA1 = c00, cB0 = c00, cB1 = c00;
  for (int64_t i = 0; i < depth; ++i) {
    __m512 b0 = _mm512_loadu_ps(sa + i * kStrip), b1 = _mm512_loadu_ps(sb + i * kStrip);
    asm("" : "+v"(b0), "+v"(b1));  // in registers, not folded into every FMA (see StridedTile)
    HJ_ZROW(0, pa, 0) HJ_ZROW(1, pa, 1) HJ_ZROW(2, pa, 2) HJ_ZROW(3, pa, 3) HJ_ZROW(4, pa, 4) HJ_ZROW(5, pa, 5)
    HJ_ZROW(6, pb, 0) HJ_ZROW(7, pb, 1) HJ_ZROW(8, pb, 2) HJ_ZROW(9, pb, 3) HJ_ZROW(A, pb, 4) HJ_ZROW(B, pb, 5)
  }
  HJ_ZSTORE(0, 0) HJ_ZSTORE(1, 1) HJ_ZSTORE(2, 2) HJ_ZSTORE(3, 3) HJ_ZSTORE(4, 4) HJ_ZSTORE(5, 5)
  HJ_ZSTORE(6, 6) HJ_ZSTORE(7, 7) HJ_ZSTORE(8, 8) HJ_ZSTORE(9, 9) HJ_ZSTORE(A, 10) HJ_ZSTORE(B, 11)
}
#undef HJ_ZROW
#undef HJ_ZSTORE
#endif

// Packed operands are stored slice by slice of k (kDepth deep, the last one shorter), so that a
// block's panels (or strips) for one slice are contiguous: slice k0 starts at k0 * units * width,
// unit u of it at u * depth * width.
inline int64_t PackedOffset(int64_t k0, int64_t k, int64_t units, int64_t u, int64_t width) {
  return k0 * units * width + u * std::min(kDepth, k - k0) * width;
}

// r0..r7 <- their transpose: lane j of row i moves to lane i of row j.
inline void Transpose8x8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                         __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20), r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20), r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31), r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31), r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Panel p of op(a) [m, k] (a stored [m, k], or [k, m] when transposed), rows past m zero. A full
// panel of a row-major a goes 8 columns at a time through an 8x8 transpose (the scalar gather made
// packing ~10% of a GEMM); edges take the scalar loop.
void PackPanel(const float* a, bool transposed, int64_t m, int64_t k, int64_t p, float* packed) {
  const int64_t row0 = p * kPanel, rows = std::min(kPanel, m - row0), panels = (m + kPanel - 1) / kPanel;
  for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
    float* dst = packed + PackedOffset(k0, k, panels, p, kPanel);
    const int64_t end = std::min(k, k0 + kDepth);
    int64_t i = k0;
    for (const float* r = a + row0 * k; !transposed && rows == kPanel && i + 8 <= end; i += 8, dst += 8 * kPanel) {
      __m256 c0 = _mm256_loadu_ps(r + i), c1 = _mm256_loadu_ps(r + k + i), c2 = _mm256_loadu_ps(r + 2 * k + i);
      __m256 c3 = _mm256_loadu_ps(r + 3 * k + i), c4 = _mm256_loadu_ps(r + 4 * k + i);
      __m256 c5 = _mm256_loadu_ps(r + 5 * k + i), c6 = _mm256_setzero_ps(), c7 = c6;
      Transpose8x8(c0, c1, c2, c3, c4, c5, c6, c7);
      // Column j's 6 values are lanes 0-5 of cj; each store's lanes 6-7 are overwritten by the next.
      _mm256_storeu_ps(dst, c0), _mm256_storeu_ps(dst + 6, c1), _mm256_storeu_ps(dst + 12, c2);
      _mm256_storeu_ps(dst + 18, c3), _mm256_storeu_ps(dst + 24, c4), _mm256_storeu_ps(dst + 30, c5);
      _mm256_storeu_ps(dst + 36, c6), _mm_storeu_ps(dst + 42, _mm256_castps256_ps128(c7));
      _mm_storel_pi(reinterpret_cast<__m64*>(dst + 46), _mm256_extractf128_ps(c7, 1));
    }
    for (; i < end; ++i, dst += kPanel) {
      for (int64_t r = 0; r < rows; ++r) dst[r] = transposed ? a[i * m + row0 + r] : a[(row0 + r) * k + i];
      for (int64_t r = rows; r < kPanel; ++r) dst[r] = 0.f;
    }
  }
}

// Strip s of op(b) [k, n] (b stored [k, n], or [n, k] when transposed), columns past n zero. Full
// strips copy 16 floats per row, or transpose 8x8 blocks when b is stored [n, k].
void PackStrip(const float* b, bool transposed, int64_t k, int64_t n, int64_t s, float* packed) {
  const int64_t col0 = s * kStrip, cols = std::min(kStrip, n - col0), strips = (n + kStrip - 1) / kStrip;
  for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
    float* dst = packed + PackedOffset(k0, k, strips, s, kStrip);
    const int64_t depth = std::min(kDepth, k - k0);
    if (!transposed) {
      for (int64_t i = 0; i < depth; ++i) CopyStripRow(b + (k0 + i) * n + col0, cols, dst + i * kStrip);
      continue;
    }
    int64_t i = 0;
    for (; cols == kStrip && i + 8 <= depth; i += 8)
      for (int64_t half = 0; half < kStrip; half += 8) {
        const float* src = b + (col0 + half) * k + k0 + i;
        __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + k), r2 = _mm256_loadu_ps(src + 2 * k);
        __m256 r3 = _mm256_loadu_ps(src + 3 * k), r4 = _mm256_loadu_ps(src + 4 * k), r5 = _mm256_loadu_ps(src + 5 * k);
        __m256 r6 = _mm256_loadu_ps(src + 6 * k), r7 = _mm256_loadu_ps(src + 7 * k);
        Transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7);
        float* out = dst + i * kStrip + half;
        _mm256_storeu_ps(out, r0), _mm256_storeu_ps(out + kStrip, r1), _mm256_storeu_ps(out + 2 * kStrip, r2);
        _mm256_storeu_ps(out + 3 * kStrip, r3), _mm256_storeu_ps(out + 4 * kStrip, r4);
        _mm256_storeu_ps(out + 5 * kStrip, r5), _mm256_storeu_ps(out + 6 * kStrip, r6);
        _mm256_storeu_ps(out + 7 * kStrip, r7);
      }
    for (; i < depth; ++i)
      for (int64_t j = 0; j < kStrip; ++j) dst[i * kStrip + j] = j < cols ? b[(col0 + j) * k + k0 + i] : 0.f;
  }
}

ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("gemm: expected 2-D a, b and c");
  const int64_t m = transpose_a ? ad[1] : ad[0], k = transpose_a ? ad[0] : ad[1];
  const int64_t n = transpose_b ? bd[0] : bd[1];
  if ((transpose_b ? bd[1] : bd[0]) != k || cd[0] != m || cd[1] != n)
    return ffi::Error::InvalidArgument("gemm: op(a) [m, k] @ op(b) [k, n] -> c [m, n] shapes disagree");
  const int64_t panels = (m + kPanel - 1) / kPanel, strips = (n + kStrip - 1) / kStrip;
  thread_local std::vector<float> packed;
  packed.resize((panels * kPanel + strips * kStrip) * k);
  float* const ap = packed.data();
  float* const bp = ap + panels * kPanel * k;
  const float *av = a.typed_data(), *bv = b.typed_data();
  float* const cv = c->typed_data();
  ParallelFor(pool, panels + strips, [=](int64_t i) {
    if (i < panels) PackPanel(av, transpose_a, m, k, i, ap);
    else PackStrip(bv, transpose_b, k, n, i - panels, bp);
  });
  const int64_t panels_per_block = kBlockRows / kPanel, strips_per_block = kBlockCols / kStrip;
  const int64_t block_rows = (panels + panels_per_block - 1) / panels_per_block;
  const int64_t block_cols = (strips + strips_per_block - 1) / strips_per_block;
  ParallelFor(pool, block_rows * block_cols, [=](int64_t blk) {
    const int64_t p0 = (blk / block_cols) * panels_per_block, p1 = std::min(panels, p0 + panels_per_block);
    const int64_t s0 = (blk % block_cols) * strips_per_block, s1 = std::min(strips, s0 + strips_per_block);
    alignas(32) float edge[kPanel * kStrip];
    for (int64_t k0 = 0; k0 < k; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, k - k0);
      const bool accumulate = k0 > 0;
      const auto strip_of = [&](int64_t s) { return bp + PackedOffset(k0, k, strips, s, kStrip); };
      const auto panel_of = [&](int64_t p) { return ap + PackedOffset(k0, k, panels, p, kPanel); };
      for (int64_t s = s0; s < s1;) {
        int64_t p = p0, width = 1;  // panels below p are done for strips s .. s + width - 1
#if defined(__AVX512F__)
        if (s + 1 < s1 && (s + 2) * kStrip <= n) {  // two full strips: 12 x 32 tiles of full panels
          width = 2;
          for (; p + 1 < p1 && (p + 2) * kPanel <= m; p += 2)
            PanelPairTile(panel_of(p), panel_of(p + 1), strip_of(s), strip_of(s + 1), depth, cv + p * kPanel * n + s * kStrip,
                          n, accumulate);
        }
#endif
        for (int64_t t = s; t < s + width; ++t) {
          const int64_t col0 = t * kStrip, cols = std::min(kStrip, n - col0);
          for (int64_t q = p; q < p1; ++q) {
            const int64_t row0 = q * kPanel, rows = std::min(kPanel, m - row0);
            float* ct = cv + row0 * n + col0;
            if (rows == kPanel && cols == kStrip) {
              StridedTile<kPanel>(panel_of(q), 1, kPanel, strip_of(t), depth, ct, n, accumulate);
              continue;
            }
            StridedTile<kPanel>(panel_of(q), 1, kPanel, strip_of(t), depth, edge, kStrip, false);
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t j = 0; j < cols; ++j)
                ct[r * n + j] = accumulate ? ct[r * n + j] + edge[r * kStrip + j] : edge[r * kStrip + j];
          }
        }
        s += width;
      }
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// RMSNorm of whole sequences (train step, prefill), y = x * r * scale with r = 1 / sqrt(mean(x^2)
// + eps) per row, and its backward in one pass: dx = r * (dy * scale - xn * mean(dy * scale * xn))
// with xn = x * r, and dscale = sum over rows of dy * xn. XLA built the scale gradient as a
// materialised product and a split (reduce-window) column sum, ~5 ms per norm. Rows go in fixed
// chunks whose dscale partial sums are added in chunk order, so the result does not depend on
// thread timing.

constexpr int64_t kNormRowsPerChunk = 64;

inline float RowDot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  float total = HorizontalSum(acc);
  for (; j < d; ++j) total += a[j] * b[j];
  return total;
}

ffi::Error RmsNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                          ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> inv_rms, float eps) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || scale.dimensions().size() != 1 || scale.dimensions()[0] != xd[1])
    return ffi::Error::InvalidArgument("rms_norm: expected x [rows, d] and scale [d]");
  const int64_t rows = xd[0], d = xd[1];
  const float *xp = x.typed_data(), *sp = scale.typed_data();
  float *yp = y->typed_data(), *rp = inv_rms->typed_data();
  ParallelFor(pool, (rows + kNormRowsPerChunk - 1) / kNormRowsPerChunk, [=](int64_t c) {
    for (int64_t i = c * kNormRowsPerChunk; i < std::min(rows, (c + 1) * kNormRowsPerChunk); ++i) {
      const float* xi = xp + i * d;
      const float r = 1.f / std::sqrt(RowDot(xi, xi, d) / d + eps);
      rp[i] = r;
      for (int64_t j = 0; j < d; ++j) yp[i * d + j] = sp[j] * (xi[j] * r);
    }
  });
  return ffi::Error::Success();
}

ffi::Error RmsNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> inv_rms, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale) {
  auto xd = x.dimensions();
  auto gd = dy.dimensions();
  if (xd.size() != 2 || gd.size() != 2 || gd[0] != xd[0] || gd[1] != xd[1] || scale.dimensions().size() != 1 ||
      scale.dimensions()[0] != xd[1])
    return ffi::Error::InvalidArgument("rms_norm_backward: expected x, dy [rows, d] and scale [d]");
  const int64_t rows = xd[0], d = xd[1], chunks = (rows + kNormRowsPerChunk - 1) / kNormRowsPerChunk;
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *rp = inv_rms.typed_data(), *gp = dy.typed_data();
  float *dxp = dx->typed_data(), *dsp = dscale->typed_data();
  std::vector<float> partial(chunks * d, 0.f);
  float* pp = partial.data();
  ParallelFor(pool, chunks, [=](int64_t c) {
    thread_local std::vector<float> xn, g;
    xn.resize(d);
    g.resize(d);
    float* part = pp + c * d;
    for (int64_t i = c * kNormRowsPerChunk; i < std::min(rows, (c + 1) * kNormRowsPerChunk); ++i) {
      const float *xi = xp + i * d, *dyi = gp + i * d;
      const float r = rp[i];
      for (int64_t j = 0; j < d; ++j) {
        xn[j] = xi[j] * r;
        g[j] = dyi[j] * sp[j];
        part[j] += dyi[j] * xn[j];
      }
      const float mean = RowDot(g.data(), xn.data(), d) / d;
      for (int64_t j = 0; j < d; ++j) dxp[i * d + j] = r * (g[j] - xn[j] * mean);
    }
  });
  for (int64_t j = 0; j < d; ++j) dsp[j] = 0.f;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < d; ++j) dsp[j] += pp[c * d + j];
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
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

// ---------------------------------------------------------------------------------------------
// Greedy decoding's argmax over the vocabulary: x [rows, n] -> out [rows], the first index of each
// row's maximum, a NaN counting as the maximum (as XLA's argmax); one vectorised pass for the
// maximum, one to find it (XLA's variadic reduce took ~1.2 ms for 32 x 49,152).
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
// measured 30 ms against 10 ms for SmolLM2's head at batch 32), so cpu.py never calls these (it asks
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackRmsNormForward, RmsNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackRmsNormBackward, RmsNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
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
