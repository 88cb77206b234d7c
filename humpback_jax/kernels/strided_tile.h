// The 6 x 16 multiply-add tile that the GEMM's edges and the whole-sequence attention's
// products share.
#pragma once

#include "common.h"

namespace {

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

}  // namespace
