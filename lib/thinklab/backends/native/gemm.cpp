// The lean forward's matrix products (thinklab/backends/lean.py): y = x W^T (+ bias), with
// the residual add or the SwiGLU gate fused into the write-out.
//
// Why not oneDNN: at decode the activations are a few rows (the batch) against a weight
// that is read once per step from memory (the model's weights do not fit in cache), so the
// product runs at the speed the weight streams in. oneDNN's kernels computed these shapes
// at 140-180 GFLOP/s with the weight in cache but 85-110 GFLOP/s streamed
// (benchmarks/decode_profile.py). Here each thread streams a contiguous run of the packed
// weight and prefetches it ahead in software, which keeps it near the in-cache speed.
//
// Layout: the weight (N, K) is packed once into panels of NR = 48 output columns,
// (ceil(N / 48), K, 48), zero-padded past N, so the inner loop reads 192 contiguous bytes
// per k. A tile of MR <= 8 rows x 48 columns keeps its 24 accumulators in AVX-512
// registers: per k, three weight loads and 8 broadcasts feed 24 FMAs. Threads split the
// panels (ATen's OpenMP pool); rows are tiled inside a panel, so a panel is read from
// memory once however many rows there are. For SwiGLU the gate's and the up projection's
// panels alternate, and the output is silu(gate) * up.
//
// The kernels need AVX-512F; `cpu_supported()` says whether this CPU has it, and lean.py
// falls back to oneDNN where it does not.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

#include "simd_math.h"

namespace {

constexpr int64_t NR = 48;  // output columns per panel: three 16-float vectors
constexpr int64_t MR = 8;   // rows per tile
constexpr int64_t PREFETCH = 32;  // k steps ahead (32 x 192 B = 6 KB) that the weight is prefetched into L1
constexpr int64_t FAR = 128;      // and further ahead (24 KB) into L2: +15-25% streamed at 4-16 rows
alignas(64) const float ZEROS[NR] = {};  // the bias of a projection without one

// acc = x[0:rows, :] . panel (K x 48), stored row-major into t (rows x 48). While it runs,
// the 192 bytes at pf + 48 k are prefetched at step k into L1, and those FAR steps further
// into L2 (pf may be null).
template <int ROWS>
__attribute__((target("avx512f"))) void tile(const float* x, int64_t ldx, const float* w, int64_t K, const float* pf,
                                             float* t) {
  __m512 acc[ROWS][3];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < 3; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * NR;
    if (pf) {
      for (int v = 0; v < 3; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + k * NR + 16 * v), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(pf + (k + FAR) * NR + 16 * v), _MM_HINT_T1);
      }
    }
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16), w2 = _mm512_loadu_ps(wk + 32);
    for (int m = 0; m < ROWS; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xb, w2, acc[m][2]);
    }
  }
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < 3; ++v) _mm512_storeu_ps(t + m * NR + 16 * v, acc[m][v]);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*);
constexpr TileFn TILES[MR + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

struct Problem {
  const float* x;         // (M, K) row-major
  const float* w;         // packed panels
  const float* bias;      // per packed column (panels x 48), or nullptr
  const float* residual;  // (M, N), added to the output, or nullptr
  const float* row_scale; // (M,), multiplies each row's product (RMSNorm's 1 / rms), or nullptr
  float* y;               // (M, N)
  int64_t M, K, N;
};

// What a row tile prefetches: the first streams its panel from memory and prefetches it
// ahead; later tiles find the panel in cache, so the second prefetches the thread's next
// panel (`next`, or null), keeping the memory busy while it computes (+10% streamed).
inline const float* prefetch_for(int64_t m0, const float* w, const float* next) {
  return m0 == 0 ? w + PREFETCH * NR : m0 == MR ? next : nullptr;
}

// Output panel p of a plain product: y[:, 48p : 48p + 48] (x row scale, + bias, + residual).
__attribute__((target("avx512f"))) void plain_panel(const Problem& P, int64_t p, bool more) {
  alignas(64) float t[MR * NR];
  const int64_t c0 = p * NR, cols = std::min(NR, P.N - c0);
  const float* wp = P.w + p * P.K * NR;
  for (int64_t m0 = 0; m0 < P.M; m0 += MR) {
    const int64_t rows = std::min(MR, P.M - m0);
    TILES[rows](P.x + m0 * P.K, P.K, wp, P.K, prefetch_for(m0, wp, more ? wp + P.K * NR : nullptr), t);
    // Branch-free loops so that they vectorize: a missing bias reads zeros.
    const float* b = P.bias ? P.bias + c0 : ZEROS;
    for (int64_t m = 0; m < rows; ++m) {
      float* yr = P.y + (m0 + m) * P.N + c0;
      const float* tr = t + m * NR;
      const float s = P.row_scale ? P.row_scale[m0 + m] : 1.f;
      if (P.residual) {
        const float* rr = P.residual + (m0 + m) * P.N + c0;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) yr[c] = tr[c] * s + b[c] + rr[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) yr[c] = tr[c] * s + b[c];
      }
    }
  }
}

// Output panel p of SwiGLU: packed panels 2p (gate) and 2p + 1 (up) give
// y[:, 48p : 48p + 48] = silu(s x gate^T + b_gate) * (s x up^T + b_up), s the row scale.
__attribute__((target("avx512f"))) void swiglu_panel(const Problem& P, int64_t p, bool more) {
  alignas(64) float g[MR * NR], u[MR * NR];
  const int64_t c0 = p * NR, cols = std::min(NR, P.N - c0);
  const float* wg = P.w + 2 * p * P.K * NR;
  const float* wu = wg + P.K * NR;
  const float* bg = P.bias ? P.bias + 2 * p * NR : ZEROS;
  const float* bu = P.bias ? bg + NR : ZEROS;
  for (int64_t m0 = 0; m0 < P.M; m0 += MR) {
    const int64_t rows = std::min(MR, P.M - m0);
    TILES[rows](P.x + m0 * P.K, P.K, wg, P.K, prefetch_for(m0, wg, more ? wg + 2 * P.K * NR : nullptr), g);
    TILES[rows](P.x + m0 * P.K, P.K, wu, P.K, prefetch_for(m0, wu, more ? wu + 2 * P.K * NR : nullptr), u);
    for (int64_t m = 0; m < rows; ++m) {
      float* yr = P.y + (m0 + m) * P.N + c0;
      const float* gr = g + m * NR;
      const float* ur = u + m * NR;
      const float s = P.row_scale ? P.row_scale[m0 + m] : 1.f;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) yr[c] = silu(gr[c] * s + bg[c]) * (ur[c] * s + bu[c]);
    }
  }
}

}  // namespace

__attribute__((target("avx512f"))) float inverse_rms(const float* x, int64_t K, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < K; ++k) ss += x[k] * x[k];
  return 1.f / std::sqrt(ss / static_cast<float>(K) + eps);
}

bool cpu_supported() { return __builtin_cpu_supports("avx512f"); }

// (N, K) -> (ceil(N / 48), K, 48), zero past N.
torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_weight takes a float32 (N, K) weight");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + NR - 1) / NR;
  auto padded = torch::zeros({panels * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({panels, NR, K}).transpose(1, 2).contiguous();
}

// x (..., K) against packed panels; `n` output columns (n <= 48 x panels, or half of that for
// SwiGLU); bias laid out like the packed columns; residual (..., n) or None.
//
// With rms_eps >= 0 the input is RMS-normalized first: RMSNorm(x) W^T = (x W'^T) / rms(x)
// where W' = W diag(norm weight), so a weight packed with the norm weight folded in needs
// only each row's 1 / sqrt(mean(x^2) + eps), applied in the write-out.
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor w, int64_t n, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, bool swiglu, double rms_eps) {
  TORCH_CHECK(cpu_supported(), "packed_linear needs AVX-512F");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "packed_linear takes float32 tensors");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == NR && w.is_contiguous(), "packed_linear: w must come from pack_weight");
  const int64_t K = x.size(-1), units = swiglu ? w.size(0) / 2 : w.size(0);
  TORCH_CHECK(w.size(1) == K, "packed_linear: x has ", K, " features, the weight ", w.size(1));
  TORCH_CHECK(n > 0 && n <= units * NR && (!swiglu || w.size(0) % 2 == 0), "packed_linear: ", n,
              " output columns do not fit the packed weight");
  auto xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  auto y = torch::empty(shape, x.options());
  Problem P{xc.data_ptr<float>(), w.data_ptr<float>(), nullptr, nullptr, nullptr, y.data_ptr<float>(),
            xc.numel() / K, K, n};
  torch::Tensor b, r;
  if (bias && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == w.size(0) * NR, "packed_linear: bias must have ",
                w.size(0) * NR, " entries (one per packed column)");
    P.bias = b.data_ptr<float>();
  }
  if (residual && residual->defined()) {
    r = residual->contiguous();
    TORCH_CHECK(!swiglu && r.scalar_type() == at::kFloat && r.numel() == y.numel(),
                "packed_linear: residual must match the output");
    P.residual = r.data_ptr<float>();
  }
  if (P.M == 0) return y;
  std::vector<float> scale;
  if (rms_eps >= 0) {
    scale.resize(P.M);
    for (int64_t m = 0; m < P.M; ++m) scale[m] = inverse_rms(P.x + m * K, K, static_cast<float>(rms_eps));
    P.row_scale = scale.data();
  }
  at::parallel_for(0, units, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) swiglu ? swiglu_panel(P, p, p + 1 < hi) : plain_panel(P, p, p + 1 < hi);
  });
  return y;
}
