// One decode step's token choice and trace for the transformers backend on CPU
// (thinklab/backends/hf.py), fused: from each row of processed logits x (temperature
// applied, top-k/top-p masked to -inf) it computes the token (inverse CDF of softmax(x)
// at a given uniform, or argmax), the token's log-probability and the entropy of
// softmax(x), reading the row twice and the chosen block a third time. The torch version
// (log_softmax, exp, entropy, a two-level float64 search) took 2-4 ms of a ~45 ms step at
// batch 16 x 49k tokens; this takes ~0.2 ms.
//
// Same rule as hf.sample_inverse_cdf: the token is the first whose cumulative mass
// exceeds u times the total, masses are summed in float64 (per block of `block` tokens,
// then across blocks), and a token of zero probability is never drawn.
//
// It runs on AVX-512F, or on AVX2 with FMA: one row body (trace_row_body), compiled into
// each ISA's function, the float64 block sums written with each ISA's intrinsics. The two
// round alike up to the order of those sums (8 or 4 float64 lanes), so a run records which
// one it ran on (its forward's name).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <tuple>
#include <vector>

#include "simd_math.h"

namespace {

struct RowResult {
  int64_t token;
  float logprob;
  float entropy;
};

// Sum of n floats in float64 (GCC's own vectorization of this reduction is ~10x slower).
__attribute__((target("avx512f"))) double sum_as_double(const float* e, int64_t n) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm256_loadu_ps(e + j)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_loadu_ps(e + j + 8)));
  }
  double s = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  for (; j < n; ++j) s += e[j];
  return s;
}

__attribute__((target("avx2,fma"))) double sum_as_double_avx2(const float* e, int64_t n) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm_loadu_ps(e + j)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm_loadu_ps(e + j + 4)));
  }
  const __m256d s2 = _mm256_add_pd(s0, s1);
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s2), _mm256_extractf128_pd(s2, 1));
  double s = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  for (; j < n; ++j) s += e[j];
  return s;
}

// The row's work, inlined into each ISA's trace_row below so that its loops vectorize for
// that ISA; Sum adds a block's masses in float64.
template <double (*Sum)(const float*, int64_t)>
static inline __attribute__((always_inline)) RowResult trace_row_body(const float* x, int64_t V, const double* u,
                                                                     int64_t block, double* block_mass, float* e) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) m = std::max(m, x[j]);
  // Unnormalized masses e_j = exp(x_j - m): their sum S per block (float64), and
  // sum e_j (x_j - m) for the entropy, log S - sum p_j (x_j - m). Masked tokens (-inf)
  // have e_j = 0.
  const int64_t blocks = (V + block - 1) / block;
  double S = 0.0, A = 0.0;
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t lo = k * block, n = std::min(V, lo + block) - lo;
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t j = 0; j < n; ++j) {
      const float d = x[lo + j] - m;
      e[j] = exp_nonpositive(d);
      a += e[j] > 0.f ? e[j] * d : 0.f;
    }
    block_mass[k] = Sum(e, n);
    S += block_mass[k];
    A += a;
  }
  RowResult r{0, 0.f, static_cast<float>(std::log(S) - A / S)};
  if (u == nullptr) {  // greedy: the first maximum
    while (r.token < V - 1 && x[r.token] != m) ++r.token;
  } else {
    const double target = *u * S;
    double before = 0.0;
    int64_t k = 0, last = 0;  // the block holding the target; never past the last with mass
    for (int64_t i = 0; i < blocks; ++i)
      if (block_mass[i] > 0.0) last = i;
    while (k < last && before + block_mass[k] <= target) before += block_mass[k++];
    const int64_t lo = k * block, hi = std::min(V, lo + block);
    double cum = before;
    int64_t chosen = -1, last_positive = lo;
    for (int64_t j = lo; j < hi; ++j) {
      const float e = exp_nonpositive(x[j] - m);
      if (e <= 0.f) continue;
      last_positive = j;
      cum += e;
      if (cum > target) {
        chosen = j;
        break;
      }
    }
    r.token = chosen >= 0 ? chosen : last_positive;  // rounding left the target past the block's end
  }
  r.logprob = static_cast<float>(static_cast<double>(x[r.token] - m) - std::log(S));
  return r;
}

__attribute__((target("avx512f"))) RowResult trace_row(const float* x, int64_t V, const double* u, int64_t block,
                                                       double* block_mass, float* e) {
  return trace_row_body<sum_as_double>(x, V, u, block, block_mass, e);
}

__attribute__((target("avx2,fma"))) RowResult trace_row_avx2(const float* x, int64_t V, const double* u,
                                                             int64_t block, double* block_mass, float* e) {
  return trace_row_body<sum_as_double_avx2>(x, V, u, block, block_mass, e);
}

}  // namespace

bool sampling_supported() {
  return __builtin_cpu_supports("avx512f") || (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
}

// x: (b, V) float32 processed logits; u: (b,) float64 uniforms in [0, 1), or None for
// argmax. Returns (token int64 (b,), log-probability float32 (b,), entropy float32 (b,)).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> trace_and_sample(torch::Tensor x,
                                                                         c10::optional<torch::Tensor> u,
                                                                         int64_t block) {
  TORCH_CHECK(sampling_supported(), "trace_and_sample needs AVX-512F, or AVX2 and FMA");
  const bool avx512 = __builtin_cpu_supports("avx512f");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "trace_and_sample: x must be (b, V) float32");
  TORCH_CHECK(block > 0, "trace_and_sample: block must be positive, got ", block);
  auto xc = x.contiguous();
  const int64_t b = xc.size(0), V = xc.size(1);
  torch::Tensor uc;
  if (u && u->defined()) {
    uc = u->to(at::kDouble).contiguous();
    TORCH_CHECK(uc.numel() == b, "trace_and_sample: one uniform per row expected, got ", uc.numel(), " for ", b);
  }
  auto tokens = torch::empty({b}, xc.options().dtype(at::kLong));
  auto logprob = torch::empty({b}, xc.options());
  auto entropy = torch::empty({b}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const double* up = uc.defined() ? uc.data_ptr<double>() : nullptr;
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* lp = logprob.data_ptr<float>();
  float* ep = entropy.data_ptr<float>();
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    std::vector<double> mass((V + block - 1) / block);
    std::vector<float> scratch(block);
    for (int64_t i = lo; i < hi; ++i) {
      const RowResult r = avx512 ? trace_row(xp + i * V, V, up ? up + i : nullptr, block, mass.data(), scratch.data())
                                 : trace_row_avx2(xp + i * V, V, up ? up + i : nullptr, block, mass.data(),
                                                  scratch.data());
      tp[i] = r.token;
      lp[i] = r.logprob;
      ep[i] = r.entropy;
    }
  });
  return {tokens, logprob, entropy};
}
