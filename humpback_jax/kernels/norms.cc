// RMSNorm of whole sequences, forward and backward in one pass each.
#include "common.h"

namespace {

// RMSNorm of whole sequences (train step, prefill), y = x * r * scale with r = 1 / sqrt(mean(x^2)
// + eps) per row, and its backward in one pass: dx = r * (dy * scale - xn * mean(dy * scale * xn))
// with xn = x * r, and dscale = sum over rows of dy * xn. XLA built the scale gradient as a
// materialised product and a split (reduce-window) column sum (bench/RESULTS.md). Rows go in fixed
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

}  // namespace

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
