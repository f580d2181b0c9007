// Scalar math written so that loops over it vectorize (shared by the native kernels).
#pragma once
#include <cstdint>

// exp(x) for x <= 0 to ~2 ulp, written so loops of it vectorize (std::exp does not without
// -ffast-math, whose finite-math assumption the -inf masking here cannot have).
// Inputs below -87 (including -inf) give 0.
static inline float exp_nonpositive(float x) {
  const float clamped = x < -87.f ? -87.f : x;
  const float t = clamped * 1.44269504088896341f;  // x / ln 2
  // round to nearest by adding and subtracting 1.5 * 2^23 (exact for |t| < 2^22); floorf would
  // keep GCC from vectorizing the loop
  const float fn = (t + 12582912.f) - 12582912.f;
  const float r = (clamped - fn * 0.693359375f) + fn * 2.12194440e-4f;  // x - n ln 2, two-part ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;  // 2^n
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return x < -87.f ? 0.f : p * scale;
}

// silu(x) = x * sigmoid(x), with sigmoid from exp(-|x|) so that exp never overflows.
static inline float silu(float x) {
  const float e = exp_nonpositive(x < 0.f ? x : -x);
  return x * (x < 0.f ? e / (1.f + e) : 1.f / (1.f + e));
}
