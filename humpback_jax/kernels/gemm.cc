// The training step's general matmul (x @ w and its two gradients), BLIS-style packed panels.
#include "strided_tile.h"

namespace {

// General matmul c[m, n] = op(a) @ op(b), op a transpose or not, for the training step's dense
// layers and their two gradients (x @ w, dy @ w^T, x^T @ dy). BLIS's scheme: both operands are
// packed once per call (a into 6-row panels [m / 6, k, 6], b into 16-column strips [n / 16, k, 16],
// zero-padded), then blocks of c are computed in parallel, each in 256-deep slices of k so that a
// strip's slice (16 KB) stays in L1 while it meets every 6-row panel of the block (L2). With AVX-512,
// pairs of panels meet pairs of strips in 12 x 32 tiles (PanelPairTile), the edges in 6 x 16 ones.

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
// packing a visible share of a GEMM); edges take the scalar loop.
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HumpbackGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
