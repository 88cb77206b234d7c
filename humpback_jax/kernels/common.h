// Helpers every kernel file shares: XLA's intra-op thread pool, AVX2 reductions, a vector exp,
// and the width of a packed weight strip. Included into each kernel file's anonymous namespace
// (every translation unit gets its own inline copies).
#pragma once

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

// Columns per packed strip of a weight or operand (cpu.py: STRIP).
constexpr int64_t kStrip = 16;
// Strips per task when a weight is packed or scanned strip by strip.
constexpr int64_t kStripsPerChunk = 8;

// One row of a strip: `cols` floats from src, zeros past them.
inline void CopyStripRow(const float* src, int64_t cols, float* dst) {
  if (cols == kStrip) {
    _mm256_storeu_ps(dst, _mm256_loadu_ps(src)), _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(src + 8));
    return;
  }
  std::copy(src, src + cols, dst);
  std::fill(dst + cols, dst + kStrip, 0.f);
}

}  // namespace
