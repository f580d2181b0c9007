// Native kernels for thinklab's lean CPU forward (thinklab/backends/lean.py): the
// decode-step attention, and the module's bindings (gemm.cpp, sampling.cpp).
//
// One call does, for every batch row and kv head of one layer: RoPE on the new key and
// on the `group` queries that share it (features stored as interleaved pairs), writes the
// key and value into the preallocated cache at position n0, and attends each query over
// positions 0..n0 where `keep` is true (softmax in float32, max-subtracted). It replaces
// about ten small torch operations and SDPA's per-head overhead at decode shapes (3
// queries x ~100 keys per head). Built on first use by torch.utils.cpp_extension, with
// OpenMP so that ATen's parallel_for runs on torch's thread pool; parallel over
// (row, kv head).
//
// Keys are cached in blocks of 16 positions, each block transposed: (b, kv heads,
// capacity / 16, head dim, 16). The scores of a block's 16 keys are then one AVX-512 vector
// accumulated over the head dimension (no horizontal sums), and a head's keys are still
// one contiguous stream for the hardware prefetcher. Values stay (b, kv heads, capacity,
// head dim); the weighted sum keeps its outputs in registers across keys. It runs on
// AVX-512F, or, where a CPU has only AVX2 and FMA, in an AVX2 variant of the same steps
// (two 8-float vectors per block, fewer queries per pass); the other native kernels need
// AVX-512F.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "simd_math.h"

static inline void rope_pairs(float* x, const float* cs, const float* sn, int64_t half) {
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    const float a = x[2 * j], b = x[2 * j + 1];
    x[2 * j] = a * cs[j] - b * sn[j];
    x[2 * j + 1] = a * sn[j] + b * cs[j];
  }
}

namespace {

constexpr int MAX_GROUP = 8;  // query heads per kv head handled in one pass; more are chunked

// scores[g][0 : 16] = q_g . key_j for the G queries of q (G x hd) and the 16 keys of one
// block (hd x 16), masked to the block's real keys. The same block of the next unit is
// prefetched meanwhile (nk may be null).
template <int G>
__attribute__((target("avx512f"))) void score_block(const float* q, int64_t hd, const float* kb, __mmask16 mask,
                                                    float* scores, int64_t ld, const float* nk) {
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    if (nk) _mm_prefetch(reinterpret_cast<const char*>(nk + d * 16), _MM_HINT_T0);
    const __m512 k = _mm512_maskz_loadu_ps(mask, kb + d * 16);
    for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * hd + d]), k, acc[g]);
  }
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(scores + g * ld, acc[g]);
}

// out[g][c : c + 16 NV] = sum_j p[g][j] value_j[c : c + 16 NV] for the G queries.
template <int G, int NV>
__attribute__((target("avx512f"))) void value_block(const float* p, int64_t ld, const float* v, int64_t hd,
                                                    int64_t n, int64_t c, float* out, const float* nv) {
  __m512 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < NV; ++u) acc[g][u] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (nv)
      for (int u = 0; u < NV; ++u) _mm_prefetch(reinterpret_cast<const char*>(nv + j * hd + c + 16 * u), _MM_HINT_T0);
    __m512 x[NV];
    for (int u = 0; u < NV; ++u) x[u] = _mm512_loadu_ps(v + j * hd + c + 16 * u);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * ld + j]);
      for (int u = 0; u < NV; ++u) acc[g][u] = _mm512_fmadd_ps(w, x[u], acc[g][u]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < NV; ++u) _mm512_storeu_ps(out + g * hd + c + 16 * u, acc[g][u]);
}

using ScoreFn = void (*)(const float*, int64_t, const float*, __mmask16, float*, int64_t, const float*);
using ValueFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, const float*);
constexpr ScoreFn SCORE[MAX_GROUP + 1] = {nullptr,        score_block<1>, score_block<2>, score_block<3>,
                                          score_block<4>, score_block<5>, score_block<6>, score_block<7>,
                                          score_block<8>};
// Up to 16 accumulators: the value pass takes queries 4 at a time, with 4 vectors (64
// output features) each, or 1 where the head dimension is not a multiple of 64.
constexpr ValueFn VALUE4[5] = {nullptr, value_block<1, 4>, value_block<2, 4>, value_block<3, 4>, value_block<4, 4>};
constexpr ValueFn VALUE1[5] = {nullptr, value_block<1, 1>, value_block<2, 1>, value_block<3, 1>, value_block<4, 1>};

// The AVX2 variants. A block's 16 scores are two 8-float vectors, computed whole: the
// positions past n in the last block read finite stale or zero keys and are never used.
template <int G>
__attribute__((target("avx2,fma"))) void score_block_avx2(const float* q, int64_t hd, const float* kb, __mmask16,
                                                          float* scores, int64_t ld, const float* nk) {
  __m256 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    if (nk) _mm_prefetch(reinterpret_cast<const char*>(nk + d * 16), _MM_HINT_T0);
    const __m256 k0 = _mm256_loadu_ps(kb + d * 16), k1 = _mm256_loadu_ps(kb + d * 16 + 8);
    for (int g = 0; g < G; ++g) {
      const __m256 w = _mm256_set1_ps(q[g * hd + d]);
      acc[g][0] = _mm256_fmadd_ps(w, k0, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(w, k1, acc[g][1]);
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_ps(scores + g * ld, acc[g][0]);
    _mm256_storeu_ps(scores + g * ld + 8, acc[g][1]);
  }
}

// out[g][c : c + 8 NV] = sum_j p[g][j] value_j[c : c + 8 NV] for the G queries.
template <int G, int NV>
__attribute__((target("avx2,fma"))) void value_block_avx2(const float* p, int64_t ld, const float* v, int64_t hd,
                                                          int64_t n, int64_t c, float* out, const float* nv) {
  __m256 acc[G][NV];
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < NV; ++u) acc[g][u] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (nv) _mm_prefetch(reinterpret_cast<const char*>(nv + j * hd + c), _MM_HINT_T0);
    __m256 x[NV];
    for (int u = 0; u < NV; ++u) x[u] = _mm256_loadu_ps(v + j * hd + c + 8 * u);
    for (int g = 0; g < G; ++g) {
      const __m256 w = _mm256_set1_ps(p[g * ld + j]);
      for (int u = 0; u < NV; ++u) acc[g][u] = _mm256_fmadd_ps(w, x[u], acc[g][u]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < NV; ++u) _mm256_storeu_ps(out + g * hd + c + 8 * u, acc[g][u]);
}

// 16 ymm registers: scores take 4 queries at a time (8 accumulators), values 4 queries x
// 16 output features.
constexpr int MAX_GROUP_AVX2 = 4;
constexpr ScoreFn SCORE_AVX2[MAX_GROUP_AVX2 + 1] = {nullptr, score_block_avx2<1>, score_block_avx2<2>,
                                                    score_block_avx2<3>, score_block_avx2<4>};
constexpr ValueFn VALUE_AVX2[5] = {nullptr, value_block_avx2<1, 2>, value_block_avx2<2, 2>, value_block_avx2<3, 2>,
                                   value_block_avx2<4, 2>};

// Softmax of each query's scores over n keys, masked keys (keep false) weighted 0; the
// body is compiled once per instruction set through the two wrappers below.
static inline __attribute__((always_inline)) void softmax_body(float* s, int64_t ld, int64_t rows, int64_t n,
                                                               const bool* keep) {
  for (int64_t g = 0; g < rows; ++g) {
    float* r = s + g * ld;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) r[j] = keep[j] ? r[j] : -INFINITY;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, r[j]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {  // masked scores are -inf and come out 0
      r[j] = exp_nonpositive(r[j] - mx);
      total += r[j];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) r[j] *= inv;
  }
}

__attribute__((target("avx512f"))) void softmax_rows(float* s, int64_t ld, int64_t rows, int64_t n, const bool* keep) {
  softmax_body(s, ld, rows, n, keep);
}

__attribute__((target("avx2,fma"))) void softmax_rows_avx2(float* s, int64_t ld, int64_t rows, int64_t n,
                                                           const bool* keep) {
  softmax_body(s, ld, rows, n, keep);
}

using SoftmaxFn = void (*)(float*, int64_t, int64_t, int64_t, const bool*);

// The kernels of one instruction set.
struct Isa {
  const ScoreFn* score;
  int max_group;  // queries per score pass
  const ValueFn* value_wide;  // 4 queries per pass, `wide` output features at a time
  const ValueFn* value_narrow;  // where the head dimension is not a multiple of `wide`
  int64_t wide, narrow;
  SoftmaxFn softmax;
};

const Isa AVX512{SCORE, MAX_GROUP, VALUE4, VALUE1, 64, 16, softmax_rows};
const Isa AVX2{SCORE_AVX2, MAX_GROUP_AVX2, VALUE_AVX2, VALUE_AVX2, 16, 16, softmax_rows_avx2};

struct Unit {
  const float* row;  // this batch row of qkv
  const float* cs;
  const float* sn;
  float* kb;  // this (row, kv head)'s keys, cap / 16 blocks of hd x 16
  float* v;   // its values, cap x hd
  const bool* keep;
  float* out;          // group x hd
  const float* nk;     // the next unit's keys and values, prefetched meanwhile (or null)
  const float* nv;
};

// One (row, kv head): rotate and store the new key and value, then attend the group's
// queries. q and scores are scratch of group * hd and group * ld floats.
void attend_unit(const Isa& isa, const Unit& U, int64_t h, int64_t n0, int64_t nh, int64_t nkv, int64_t hd,
                 int64_t group, float scale, float* q, float* scores, int64_t ld) {
  const int64_t n = n0 + 1, half = hd / 2;
  float* knew = q;  // the new key, rotated in the scratch first
  std::copy(U.row + (nh + h) * hd, U.row + (nh + h + 1) * hd, knew);
  rope_pairs(knew, U.cs, U.sn, half);
  float* kslot = U.kb + (n0 / 16) * hd * 16 + n0 % 16;
  for (int64_t d = 0; d < hd; ++d) kslot[d * 16] = knew[d];
  std::copy(U.row + (nh + nkv + h) * hd, U.row + (nh + nkv + h + 1) * hd, U.v + n0 * hd);
  for (int64_t g = 0; g < group; ++g) {
    float* qg = q + g * hd;
    std::copy(U.row + (h * group + g) * hd, U.row + (h * group + g + 1) * hd, qg);
    rope_pairs(qg, U.cs, U.sn, half);
    for (int64_t d = 0; d < hd; ++d) qg[d] *= scale;
  }
  for (int64_t g0 = 0; g0 < group; g0 += isa.max_group) {
    const int64_t gn = std::min<int64_t>(isa.max_group, group - g0);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const __mmask16 mask = n - j0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j0)) - 1);
      const int64_t blk = (j0 / 16) * hd * 16;
      isa.score[gn](q + g0 * hd, hd, U.kb + blk, mask, scores + g0 * ld + j0, ld,
                    g0 == 0 && U.nk ? U.nk + blk : nullptr);
    }
  }
  isa.softmax(scores, ld, group, n, U.keep);
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const int64_t gn = std::min<int64_t>(4, group - g0);
    const bool wide = hd % isa.wide == 0;
    const int64_t step = wide ? isa.wide : isa.narrow;
    for (int64_t c = 0; c < hd; c += step)
      (wide ? isa.value_wide : isa.value_narrow)[gn](scores + g0 * ld, ld, U.v, hd, n, c, U.out + g0 * hd,
                                                     g0 == 0 ? U.nv : nullptr);
  }
}

}  // namespace

bool attention_supported() {
  return __builtin_cpu_supports("avx512f") || (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
}

// One decode step of attention for one layer, every row and kv head.
// qkv: (b, (nh + 2 nkv) hd), q/k features pairwise interleaved; cos, sin: (b, hd/2);
// kb: (b, nkv, cap / 16, hd, 16) keys in transposed blocks; vc: (b, nkv, cap, hd);
// keep: (b, >= n0 + 1) bool.
// Writes the new key and value at position n0, or, given `columns` (b,) int64, each
// row's at its own column, attending over that row's columns 0 .. column only (the row
// scheduler's rows each hold their own number of positions; a row's arithmetic then
// depends on its own columns alone, not on the other rows').
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kb,
                               torch::Tensor vc, torch::Tensor keep, int64_t n0, int64_t nh, int64_t nkv,
                               double scale, c10::optional<torch::Tensor> columns) {
  TORCH_CHECK(attention_supported(), "decode_attention needs AVX-512F, or AVX2 and FMA");
  const Isa& isa = __builtin_cpu_supports("avx512f") ? AVX512 : AVX2;
  const int64_t b = qkv.size(0), hd = vc.size(3), cap = vc.size(2), half = hd / 2;
  torch::Tensor cols;
  if (columns && columns->defined()) {
    cols = columns->to(at::kLong).contiguous();
    TORCH_CHECK(cols.numel() == b, "decode_attention: one column per row expected, got ", cols.numel(), " for ", b);
    TORCH_CHECK(b == 0 || cols.min().item<int64_t>() >= 0, "decode_attention: negative column");
    n0 = b ? cols.max().item<int64_t>() : 0;  // the widest row sizes the checks and the scratch
  }
  const int64_t* col_p = cols.defined() ? cols.data_ptr<int64_t>() : nullptr;
  const int64_t n = n0 + 1;
  const int64_t group = nh / nkv, width = qkv.size(1), ld = (n + 15) / 16 * 16;
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && kb.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat,
              "decode_attention takes float32 tensors");
  TORCH_CHECK(keep.scalar_type() == at::kBool, "keep must be bool");
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && keep.is_contiguous() &&
                  kb.is_contiguous() && vc.is_contiguous(),
              "decode_attention takes contiguous tensors");
  TORCH_CHECK(kb.dim() == 5 && kb.size(2) * 16 == cap && kb.size(3) == hd && kb.size(4) == 16 && n <= cap &&
                  keep.size(1) >= n && width == (nh + 2 * nkv) * hd && nh % nkv == 0 && hd % 16 == 0,
              "decode_attention: inconsistent shapes (head dim must be a multiple of 16)");
  auto out = torch::empty({b, nh * hd}, qkv.options());
  const float* qkv_p = qkv.data_ptr<float>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  float* kb_p = kb.data_ptr<float>();
  float* vc_p = vc.data_ptr<float>();
  const bool* keep_p = keep.data_ptr<bool>();
  const int64_t keep_stride = keep.size(1), unit = cap * hd;
  float* out_p = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, b * nkv, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> q(group * hd), scores(group * ld);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t r = u / nkv, h = u % nkv;
      const bool more = u + 1 < hi;
      const Unit U{qkv_p + r * width, cos_p + r * half, sin_p + r * half, kb_p + u * unit, vc_p + u * unit,
                   keep_p + r * keep_stride, out_p + r * nh * hd + h * group * hd,
                   more ? kb_p + (u + 1) * unit : nullptr, more ? vc_p + (u + 1) * unit : nullptr};
      attend_unit(isa, U, h, col_p ? col_p[r] : n0, nh, nkv, hd, group, sc, q.data(), scores.data(), ld);
    }
  });
  return out;
}

// gemm.cpp
bool cpu_supported();
bool bf16_supported();
torch::Tensor pack_weight(torch::Tensor w);
torch::Tensor pack_weight_bf16(torch::Tensor w);
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor w, int64_t n, c10::optional<torch::Tensor> bias,
                            c10::optional<torch::Tensor> residual, bool swiglu, double rms_eps);

// sampling.cpp
bool sampling_supported();
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> trace_and_sample(torch::Tensor x,
                                                                         c10::optional<torch::Tensor> u,
                                                                         int64_t block);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "RoPE + KV-cache write + attention of one decode step of one layer (see the top of this file)",
        pybind11::arg("qkv"), pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("kb"), pybind11::arg("vc"),
        pybind11::arg("keep"), pybind11::arg("n0"), pybind11::arg("nh"), pybind11::arg("nkv"),
        pybind11::arg("scale"), pybind11::arg("columns") = pybind11::none());
  m.def("cpu_supported", &cpu_supported, "whether this CPU runs all of these kernels (AVX-512F)");
  m.def("attention_supported", &attention_supported,
        "whether this CPU runs decode_attention (AVX-512F, or AVX2 and FMA)");
  m.def("sampling_supported", &sampling_supported,
        "whether this CPU runs trace_and_sample (AVX-512F, or AVX2 and FMA)");
  m.def("bf16_supported", &bf16_supported, "whether this CPU runs packed_linear on bf16 weights (AVX512_BF16)");
  m.def("pack_weight", &pack_weight, "(N, K) weight -> packed panels for packed_linear (see gemm.cpp)");
  m.def("pack_weight_bf16", &pack_weight_bf16,
        "(N, K) float32 weight -> bf16 packed panels for packed_linear (see gemm.cpp)");
  m.def("packed_linear", &packed_linear,
        "x W^T (+ bias) (+ residual), or SwiGLU, against packed panels, optionally RMS-normalizing x first",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("residual") = pybind11::none(), pybind11::arg("swiglu") = false,
        pybind11::arg("rms_eps") = -1.0);
  m.def("trace_and_sample", &trace_and_sample,
        "(token, log-probability, entropy) per row of processed logits (see sampling.cpp)", pybind11::arg("x"),
        pybind11::arg("u") = pybind11::none(), pybind11::arg("block") = 1024);
}
