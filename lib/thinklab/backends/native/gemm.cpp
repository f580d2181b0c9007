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
//
// bfloat16 (the model's `dtype="bfloat16"` on CPU, where `bf16_supported()`: AVX512_BF16):
// the weight is packed as bf16 pairs, (ceil(N / 48), ceil(K / 2), 48, 2), and each row of x
// is rounded to bf16 once per call; VDPBF16PS multiplies a pair of k's per instruction and
// accumulates in fp32. Half the bytes per weight to stream and twice the products per
// instruction; the numbers are those of a model whose GEMM weights and inputs are bf16
// (lean.py's torch path computes the same thing with fp32 products of rounded values).
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

// The bf16 tile: x holds each row's k pairs as bf16 (one uint32 per pair), w a bf16 panel
// (K2 x 48 x 2); per pair of k, three 64-byte weight loads and 8 broadcasts feed 24 VDPBF16PS.
// A panel streams 192 bytes per pair of k, so the prefetch distances count pairs.
template <int ROWS>
__attribute__((target("avx512f,avx512bf16"))) void tile_bf16(const uint32_t* x, int64_t ldx, const uint16_t* w,
                                                             int64_t K2, const uint16_t* pf, float* t) {
  __m512 acc[ROWS][3];
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < 3; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    const uint16_t* wk = w + k * 2 * NR;
    if (pf) {
      for (int v = 0; v < 3; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + k * 2 * NR + 32 * v), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(pf + (k + FAR) * 2 * NR + 32 * v), _MM_HINT_T1);
      }
    }
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 32),
                   w2 = (__m512bh)_mm512_loadu_si512(wk + 64);
    for (int m = 0; m < ROWS; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * ldx + k]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xb);
    }
  }
  for (int m = 0; m < ROWS; ++m)
    for (int v = 0; v < 3; ++v) _mm512_storeu_ps(t + m * NR + 16 * v, acc[m][v]);
}

// One row tile of either kind, through untyped pointers: x's rows start ldx elements apart,
// the panel has `steps` k steps (k, or pairs of k for bf16).
using TileFn = void (*)(const void*, int64_t, const void*, int64_t, const void*, float*);
template <int ROWS>
void tile_f32_any(const void* x, int64_t ldx, const void* w, int64_t steps, const void* pf, float* t) {
  tile<ROWS>(static_cast<const float*>(x), ldx, static_cast<const float*>(w), steps, static_cast<const float*>(pf), t);
}
template <int ROWS>
void tile_bf16_any(const void* x, int64_t ldx, const void* w, int64_t steps, const void* pf, float* t) {
  tile_bf16<ROWS>(static_cast<const uint32_t*>(x), ldx, static_cast<const uint16_t*>(w), steps,
                  static_cast<const uint16_t*>(pf), t);
}
constexpr TileFn TILES[MR + 1] = {nullptr,         tile_f32_any<1>, tile_f32_any<2>, tile_f32_any<3>, tile_f32_any<4>,
                                  tile_f32_any<5>, tile_f32_any<6>, tile_f32_any<7>, tile_f32_any<8>};
constexpr TileFn TILES_BF16[MR + 1] = {nullptr,          tile_bf16_any<1>, tile_bf16_any<2>,
                                       tile_bf16_any<3>, tile_bf16_any<4>, tile_bf16_any<5>,
                                       tile_bf16_any<6>, tile_bf16_any<7>, tile_bf16_any<8>};

struct Problem {
  const float* x;         // (M, K) row-major: the input, read by the norm's 1 / rms
  const char* xin;        // what the tiles read: x, or its rows as bf16 pairs (M, ldx)
  int64_t ldx;            // elements of xin per row
  size_t xin_bytes;       // bytes per element of xin
  const char* w;          // packed panels
  int64_t steps;          // k steps of a panel (K, or K / 2 rounded up for bf16)
  int64_t panel_bytes;    // bytes of one packed panel
  const TileFn* tiles;    // TILES or TILES_BF16
  const float* bias;      // per packed column (panels x 48), or nullptr
  const float* residual;  // (M, N), added to the output, or nullptr
  const float* row_scale; // (M,), multiplies each row's product (RMSNorm's 1 / rms), or nullptr
  float* y;               // (M, N)
  int64_t M, K, N;
};

// What a row tile prefetches: the first streams its panel from memory and prefetches it
// ahead; later tiles find the panel in cache, so the second prefetches the thread's next
// panel (`next`, or null), keeping the memory busy while it computes (+10% streamed).
inline const char* prefetch_for(int64_t m0, const char* w, const char* next) {
  return m0 == 0 ? w + PREFETCH * NR * sizeof(float) : m0 == MR ? next : nullptr;
}

inline const void* rows_of(const Problem& P, int64_t m0) { return P.xin + m0 * P.ldx * P.xin_bytes; }

// Output panel p of a plain product: y[:, 48p : 48p + 48] (x row scale, + bias, + residual).
__attribute__((target("avx512f"))) void plain_panel(const Problem& P, int64_t p, bool more) {
  alignas(64) float t[MR * NR];
  const int64_t c0 = p * NR, cols = std::min(NR, P.N - c0);
  const char* wp = P.w + p * P.panel_bytes;
  for (int64_t m0 = 0; m0 < P.M; m0 += MR) {
    const int64_t rows = std::min(MR, P.M - m0);
    P.tiles[rows](rows_of(P, m0), P.ldx, wp, P.steps, prefetch_for(m0, wp, more ? wp + P.panel_bytes : nullptr), t);
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
  const char* wg = P.w + 2 * p * P.panel_bytes;
  const char* wu = wg + P.panel_bytes;
  const float* bg = P.bias ? P.bias + 2 * p * NR : ZEROS;
  const float* bu = P.bias ? bg + NR : ZEROS;
  for (int64_t m0 = 0; m0 < P.M; m0 += MR) {
    const int64_t rows = std::min(MR, P.M - m0);
    const void* xr = rows_of(P, m0);
    P.tiles[rows](xr, P.ldx, wg, P.steps, prefetch_for(m0, wg, more ? wg + 2 * P.panel_bytes : nullptr), g);
    P.tiles[rows](xr, P.ldx, wu, P.steps, prefetch_for(m0, wu, more ? wu + 2 * P.panel_bytes : nullptr), u);
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

bool bf16_supported() { return cpu_supported() && __builtin_cpu_supports("avx512bf16"); }

// (N, K) -> (ceil(N / 48), K, 48), zero past N.
torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_weight takes a float32 (N, K) weight");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + NR - 1) / NR;
  auto padded = torch::zeros({panels * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({panels, NR, K}).transpose(1, 2).contiguous();
}

// (N, K) float32 -> (ceil(N / 48), ceil(K / 2), 48, 2) bfloat16 (rounded to nearest even),
// zero past N and K.
torch::Tensor pack_weight_bf16(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_weight_bf16 takes a float32 (N, K) weight");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + NR - 1) / NR, K2 = (K + 1) / 2;
  auto padded = torch::zeros({panels * NR, 2 * K2}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  return padded.view({panels, NR, K2, 2}).permute({0, 2, 1, 3}).contiguous().to(at::kBFloat16);
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
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!bf16 || bf16_supported(), "packed_linear: a bfloat16 weight needs AVX512_BF16");
  TORCH_CHECK(x.scalar_type() == at::kFloat && (bf16 || w.scalar_type() == at::kFloat),
              "packed_linear takes a float32 input and a float32 or bfloat16 packed weight");
  TORCH_CHECK(w.is_contiguous() && w.size(2) == NR && (bf16 ? w.dim() == 4 && w.size(3) == 2 : w.dim() == 3),
              "packed_linear: w must come from pack_weight or pack_weight_bf16");
  const int64_t K = x.size(-1), units = swiglu ? w.size(0) / 2 : w.size(0);
  TORCH_CHECK(w.size(1) == (bf16 ? (K + 1) / 2 : K), "packed_linear: x has ", K, " features, the weight ",
              bf16 ? 2 * w.size(1) : w.size(1));
  TORCH_CHECK(n > 0 && n <= units * NR && (!swiglu || w.size(0) % 2 == 0), "packed_linear: ", n,
              " output columns do not fit the packed weight");
  auto xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  auto y = torch::empty(shape, x.options());
  const int64_t M = xc.numel() / K;
  Problem P{xc.data_ptr<float>(), reinterpret_cast<const char*>(xc.data_ptr<float>()), K, sizeof(float),
            static_cast<const char*>(w.data_ptr()), K, K * NR * static_cast<int64_t>(sizeof(float)), TILES,
            nullptr, nullptr, nullptr, y.data_ptr<float>(), M, K, n};
  torch::Tensor xq;  // bf16: each row rounded once, padded to an even K, read as k pairs
  if (bf16) {
    const int64_t K2 = w.size(1);
    xq = torch::zeros({M, 2 * K2}, xc.options().dtype(at::kBFloat16));
    xq.narrow(1, 0, K).copy_(xc.view({M, K}));
    P.xin = static_cast<const char*>(xq.data_ptr());
    P.ldx = K2;
    P.xin_bytes = sizeof(uint32_t);
    P.steps = K2;
    P.panel_bytes = K2 * 2 * NR * static_cast<int64_t>(sizeof(uint16_t));
    P.tiles = TILES_BF16;
  }
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
