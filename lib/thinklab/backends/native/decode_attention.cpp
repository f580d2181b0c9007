// Native kernels for thinklab's lean CPU forward (thinklab/backends/lean.py): the
// decode-step attention and RMSNorm.
//
// One call does, for every batch row and kv head of one layer: RoPE on the new key and
// on the `group` queries that share it (features stored as interleaved pairs), writes the
// key and value into the preallocated cache at position n0, and attends each query over
// positions 0..n0 where `keep` is true (softmax in float32, max-subtracted). It replaces
// about ten small torch operations and SDPA's per-head overhead at decode shapes (3
// queries x ~100 keys per head). Built on first use by torch.utils.cpp_extension;
// parallel over (row, kv head) through ATen's thread pool. Hot loops are compiled for
// AVX-512, AVX2 and a generic target and picked at run time (GCC target_clones).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "simd_math.h"

static inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

static inline void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

static inline void rope_pairs(float* x, const float* cs, const float* sn, int64_t half) {
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    const float a = x[2 * j], b = x[2 * j + 1];
    x[2 * j] = a * cs[j] - b * sn[j];
    x[2 * j + 1] = a * sn[j] + b * cs[j];
  }
}

// One (row, kv head): rotate and store the new key and value, then attend the group's
// queries. q and scores are scratch of group * hd and group * n floats.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void attend_unit(const float* row, const float* cs, const float* sn, float* kcache, float* vcache,
                        const bool* keep, float* out, float* q, float* scores, int64_t h, int64_t n0,
                        int64_t nh, int64_t nkv, int64_t hd, int64_t group, float scale,
                        const float* next_k, const float* next_v) {
  const int64_t n = n0 + 1, half = hd / 2;
  float* knew = kcache + n0 * hd;
  std::copy(row + (nh + h) * hd, row + (nh + h + 1) * hd, knew);
  rope_pairs(knew, cs, sn, half);
  std::copy(row + (nh + nkv + h) * hd, row + (nh + nkv + h + 1) * hd, vcache + n0 * hd);
  for (int64_t g = 0; g < group; ++g) {
    std::copy(row + (h * group + g) * hd, row + (h * group + g + 1) * hd, q + g * hd);
    rope_pairs(q + g * hd, cs, sn, half);
  }
  // scores, key-major so each cached key is read once for all queries of the group
  for (int64_t j = 0; j < n; ++j) {
    const float* k = kcache + j * hd;
    if (next_k != nullptr)  // the next unit's keys and values come from memory meanwhile
      for (int64_t c = 0; c < hd; c += 16) {
        __builtin_prefetch(next_k + j * hd + c);
        __builtin_prefetch(next_v + j * hd + c);
      }
    for (int64_t g = 0; g < group; ++g)
      scores[g * n + j] = keep[j] ? dot(q + g * hd, k, hd) * scale : -INFINITY;
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * n;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {  // masked scores are -inf and come out 0
      s[j] = exp_nonpositive(s[j] - mx);
      total += s[j];
    }
    const float inv = 1.f / total;
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
    std::fill(out + g * hd, out + (g + 1) * hd, 0.f);
  }
  // weighted values, key-major as well
  for (int64_t j = 0; j < n; ++j) {
    if (!keep[j]) continue;
    const float* v = vcache + j * hd;
    for (int64_t g = 0; g < group; ++g) axpy(out + g * hd, scores[g * n + j], v, hd);
  }
}

// One decode step of attention for one layer, every row and kv head.
// qkv: (b, (nh + 2 nkv) hd), q/k features pairwise interleaved; cos, sin: (b, hd/2);
// kc, vc: (b, nkv, cap, hd); keep: (b, >= n0 + 1) bool. Writes k, v at n0.
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc,
                               torch::Tensor vc, torch::Tensor keep, int64_t n0, int64_t nh, int64_t nkv,
                               double scale) {
  const int64_t b = qkv.size(0), hd = kc.size(3), cap = kc.size(2), n = n0 + 1, half = hd / 2;
  const int64_t group = nh / nkv, width = qkv.size(1);
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat,
              "decode_attention takes float32 tensors");
  TORCH_CHECK(keep.scalar_type() == at::kBool, "keep must be bool");
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && keep.is_contiguous() &&
                  kc.is_contiguous() && vc.is_contiguous(),
              "decode_attention takes contiguous tensors");
  TORCH_CHECK(n <= cap && keep.size(1) >= n && width == (nh + 2 * nkv) * hd && nh % nkv == 0 && hd % 2 == 0,
              "decode_attention: inconsistent shapes");
  auto out = torch::empty({b, nh * hd}, qkv.options());
  const float* qkv_p = qkv.data_ptr<float>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  float* kc_p = kc.data_ptr<float>();
  float* vc_p = vc.data_ptr<float>();
  const bool* keep_p = keep.data_ptr<bool>();
  const int64_t keep_stride = keep.size(1);
  float* out_p = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, b * nkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> q(group * hd), scores(group * n);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t r = u / nkv, h = u % nkv;
      const bool more = u + 1 < hi;
      attend_unit(qkv_p + r * width, cos_p + r * half, sin_p + r * half, kc_p + (r * nkv + h) * cap * hd,
                  vc_p + (r * nkv + h) * cap * hd, keep_p + r * keep_stride, out_p + r * nh * hd + h * group * hd,
                  q.data(), scores.data(), h, n0, nh, nkv, hd, group, sc,
                  more ? kc_p + (u + 1) * cap * hd : nullptr, more ? vc_p + (u + 1) * cap * hd : nullptr);
    }
  });
  return out;
}

// RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * w, in float32. One pass
// per row instead of the six tensor operations F.rms_norm decomposes into on CPU.
__attribute__((target_clones("avx512f", "avx2", "default")))
static void rms_rows(const float* x, const float* w, float* y, int64_t rows, int64_t H, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * H;
    float* yr = y + r * H;
    const float inv = 1.f / std::sqrt(dot(xr, xr, H) / static_cast<float>(H) + eps);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) yr[i] = xr[i] * inv * w[i];
  }
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm takes float32 tensors");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 1 && x.size(-1) == w.size(0),
              "rms_norm: x (..., H) and w (H,) contiguous");
  auto y = torch::empty_like(x);
  const int64_t H = w.size(0), rows = x.numel() / H;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) { rms_rows(xp + lo * H, wp, yp + lo * H, hi - lo, H, e); });
  return y;
}

// gemm.cpp
bool gemm_supported();
torch::Tensor pack_weight(torch::Tensor w);
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor w, int64_t n, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, bool swiglu);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension, float32");
  m.def("decode_attention", &decode_attention,
        "RoPE + KV-cache write + attention of one decode step of one layer (see the top of this file)");
  m.def("gemm_supported", &gemm_supported, "whether this CPU runs packed_linear (AVX-512F)");
  m.def("pack_weight", &pack_weight, "(N, K) weight -> packed panels for packed_linear (see gemm.cpp)");
  m.def("packed_linear", &packed_linear, "x W^T (+ bias) (+ residual), or SwiGLU, against packed panels",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("residual") = pybind11::none(), pybind11::arg("swiglu") = false);
}
