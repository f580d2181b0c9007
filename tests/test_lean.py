"""The lean CPU forward computes what transformers computes, and the sampler draws from the
distribution it is given."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from thinklab.backends.sampling import sample_inverse_cdf
from thinklab.backends.lean import LeanDecoder


def _padded_batch(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), 0, dtype=torch.long)
    att = torch.zeros((len(lengths), L), dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, L - n :] = torch.randint(3, vocab, (n,), generator=g)
        att[r, L - n :] = 1
    return ids, att


def _compare_with_transformers(model, lengths, steps=6, native=True):
    """Prefill a left-padded batch, then decode greedily; lean and transformers logits side by side."""
    from transformers import DynamicCache

    if native:
        _attention_or_skip()
    lean = LeanDecoder(model, native=native)
    assert lean.native_attention == native  # the native decode attention: AVX-512F or AVX2
    assert (lean.native is not None) == (native and _cpu_has_avx512f())  # the GEMMs: AVX-512F only
    ids, att = _padded_batch(lengths, model.config.vocab_size)
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    worst, scale = 0.0, 0.0
    with torch.inference_mode():
        cache = lean.new_cache(len(lengths), ids.shape[1] + steps)
        mine = lean.forward(ids, pos, att, cache)
        hf_cache = DynamicCache()
        ref = model(input_ids=ids, attention_mask=att, position_ids=pos, past_key_values=hf_cache,
                    use_cache=True).logits[:, -1]
        nxt = pos[:, -1:] + 1
        for _ in range(steps):
            assert torch.isfinite(mine).all()
            worst = max(worst, (mine - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            assert torch.equal(mine.argmax(-1), ref.argmax(-1))
            tok = ref.argmax(-1)[:, None]
            att = torch.cat([att, att.new_ones((len(lengths), 1))], 1)
            mine = lean.forward(tok, nxt, att, cache)
            ref = model(input_ids=tok, attention_mask=att, position_ids=nxt, past_key_values=hf_cache,
                        use_cache=True).logits[:, -1]
            nxt = nxt + 1
    return worst, scale


@pytest.mark.slow
def test_lean_matches_transformers_on_the_embedded_model(fast_backend):
    assert fast_backend.forward.layout == "rows", "the embedded llama-architecture model should take the lean path"
    assert fast_backend.info.extra["forward"].startswith("lean")
    # the path this machine runs: native kernels where the CPU has AVX-512F; oneDNN GEMMs and the
    # native attention's AVX2 variant on AVX2 CPUs
    worst, scale = _compare_with_transformers(fast_backend.model, [7, 19, 3, 19],
                                              native=fast_backend.forward.decoder.native_attention)
    assert worst < 1e-3 * scale, f"max |lean - transformers| = {worst} (logits up to {scale})"


def _cpu_has_avx512f() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return "avx512f" in flags


def _native_or_skip():
    """The native kernels; skips where this CPU cannot run them (they need AVX-512F; the
    torch path, tested beside them, is what runs there)."""
    from thinklab.backends.lean import native_ops

    ops = native_ops()
    if ops is None and not _cpu_has_avx512f():
        pytest.skip("the native kernels need AVX-512F, which this CPU lacks")
    assert ops is not None, "the native kernels did not load on a CPU that can run them"
    return ops


def _cpu_has_avx2_fma() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return "avx2" in flags and "fma" in flags


def _attention_or_skip():
    """The native decode attention; skips where this CPU cannot run it (it needs AVX-512F,
    or AVX2 and FMA)."""
    from thinklab.backends.lean import attention_ops

    ops = attention_ops()
    if ops is None and not (_cpu_has_avx512f() or _cpu_has_avx2_fma()):
        pytest.skip("the native decode attention needs AVX-512F or AVX2 with FMA, which this CPU lacks")
    assert ops is not None, "the native decode attention did not load on a CPU that can run it"
    return ops


def test_native_kernels_build_here():
    """The C++ kernels must build on the machines we test on, and be used wherever the CPU can
    run them: a silent fallback would hide either."""
    from thinklab.backends.lean import build_native, native_ops

    ext = build_native()
    assert ext.cpu_supported() == _cpu_has_avx512f() or not Path("/proc/cpuinfo").exists()
    assert (native_ops() is not None) == ext.cpu_supported()
    from thinklab.backends.lean import attention_ops

    assert ext.attention_supported() == (_cpu_has_avx512f() or _cpu_has_avx2_fma()) or not Path("/proc/cpuinfo").exists()
    assert (attention_ops() is not None) == ext.attention_supported()
    from thinklab.backends.lean import sampling_ops

    assert ext.sampling_supported() == ext.attention_supported()  # the token choice has its AVX2 variant too
    assert (sampling_ops() is not None) == ext.sampling_supported()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_native_kernels_run_on_torchs_openmp_pool():
    """Compiled with OpenMP (without it ATen's inlined parallel_for compiles serial and every
    kernel runs on one core) and bound to the libgomp torch already loaded, not a second
    runtime with its own threads."""
    from thinklab.backends.lean import build_native

    ops = build_native()
    assert b"GOMP_parallel" in Path(ops.__file__).read_bytes(), "the extension was built without OpenMP"
    if ops.sampling_supported():
        ops.trace_and_sample(torch.randn(4, 64))  # a parallel region has run
    # The extension asks for libgomp.so.1 by soname; the one mapped under that name must be
    # torch's. (Wheels such as sentencepiece vendor renamed copies, libgomp-<hash>.so, that
    # only they use.)
    mapped = {Path(line.split()[-1]) for line in Path("/proc/self/maps").read_text().splitlines()
              if "libgomp" in line}
    by_soname = [p for p in mapped if p.name == "libgomp.so.1"]
    assert by_soname == [Path(torch.__file__).parent / "lib" / "libgomp.so.1"], f"OpenMP runtimes loaded: {mapped}"


@pytest.mark.parametrize("native", [True, False], ids=["native-kernel", "sdpa"])
def test_lean_matches_transformers_on_a_qwen2_with_biases_and_gqa(native):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                      tie_word_embeddings=False, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # the case fused biases must handle
    for layer in model.model.layers:  # random non-zero biases so a dropped bias would show
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            lin.bias.data.normal_(0, 0.5)
    worst, scale = _compare_with_transformers(model, [5, 11, 1], native=native)
    assert worst < 1e-4 * max(scale, 1.0), f"max |lean - transformers| = {worst}"


def test_lean_refuses_what_it_does_not_implement():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, hidden_act="gelu")
    model = LlamaForCausalLM(cfg).eval()
    assert "hidden_act" in LeanDecoder.unsupported(model)
    with pytest.raises(ValueError, match="hidden_act"):
        LeanDecoder(model)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).to(torch.bfloat16)
    assert "bfloat16" in LeanDecoder.unsupported(model)


def test_kv_cache_writes_reads_and_selects_rows():
    from thinklab.backends.lean import KVCache

    cache = KVCache(layers=2, batch=4, kv_heads=2, capacity=20, head_dim=3, dtype=torch.float32, device="cpu")
    assert cache.capacity == 32  # whole blocks of 16 positions
    # key entry = 1000 * row + 100 * layer + 10 * kv head + position + feature / 10; values negated
    rows, heads, feats = torch.arange(4.0), torch.arange(2.0), torch.arange(3.0)

    def entries(layer, positions):
        return (1000 * rows[:, None, None, None] + 100 * layer + 10 * heads[None, :, None, None]
                + positions[None, None, :, None] + feats / 10)

    for i in range(2):  # a prefill of 13 positions, then a 5-position chunk that crosses a block boundary
        cache.write(i, 0, entries(i, torch.arange(13.0)), -entries(i, torch.arange(13.0)))
        cache.write(i, 13, entries(i, torch.arange(13.0, 18.0)), -entries(i, torch.arange(13.0, 18.0)))
    cache.length = 18
    assert torch.equal(cache.keys(1, 18), entries(1, torch.arange(18.0)))
    cache.batch_select_indices(torch.tensor([3, 1]))
    assert cache.k[1].shape[0] == 2 and cache.v[0].shape[0] == 2
    kept = entries(1, torch.arange(18.0))[[3, 1]]
    assert torch.equal(cache.keys(1, 18), kept)
    assert torch.equal(cache.v[1][:, :, :18], -kept)


def _torch_sampler(p, u, block=1024):
    return sample_inverse_cdf(p, u, block=block)


def _sampling_or_skip():
    """The native token choice; skips where this CPU cannot run it (it needs AVX-512F, or
    AVX2 and FMA)."""
    from thinklab.backends.lean import sampling_ops

    ops = sampling_ops()
    if ops is None and not (_cpu_has_avx512f() or _cpu_has_avx2_fma()):
        pytest.skip("the native token choice needs AVX-512F or AVX2 with FMA, which this CPU lacks")
    assert ops is not None, "the native token choice did not load on a CPU that can run it"
    return ops


def _native_sampler(p, u, block=1024):
    return _sampling_or_skip().trace_and_sample(p.log(), u, block)[0]  # log 0 = -inf: a masked token


SAMPLERS = pytest.mark.parametrize("sample", [_torch_sampler, _native_sampler], ids=["torch", "native"])


@SAMPLERS
def test_inverse_cdf_sampler_matches_the_distribution(sample):
    """Chi-square goodness of fit over 200k draws from a known distribution with zero-mass tokens,
    with blocks small enough that the two-level search crosses many block boundaries."""
    g = torch.Generator().manual_seed(1234)
    V = 37
    logits = torch.randn(1, V, generator=g) * 2
    logits[0, ::5] = -math.inf
    p = torch.softmax(logits, -1)
    N = 200_000
    u = torch.rand(N, generator=g, dtype=torch.float64)
    toks = sample(p.expand(N, V).contiguous(), u, block=8)
    counts = torch.bincount(toks, minlength=V).double()
    assert counts[::5].sum() == 0, "a token with zero probability was drawn"
    expected = N * p[0].double()
    nz = expected > 0
    chi2 = (((counts - expected) ** 2)[nz] / expected[nz]).sum().item()
    dof = int(nz.sum()) - 1
    # 99.9th percentile of chi-square with dof degrees of freedom (Wilson-Hilferty)
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, f"chi2 {chi2:.1f} over {dof} dof exceeds {limit:.1f}"


@SAMPLERS
def test_inverse_cdf_sampler_edges(sample):
    p = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]])
    lo = sample(p, torch.tensor([0.0], dtype=torch.float64), block=4)
    hi = sample(p, torch.tensor([1.0 - 2**-53], dtype=torch.float64), block=4)
    mid = sample(p, torch.tensor([0.2499], dtype=torch.float64), block=4)
    after = sample(p, torch.tensor([0.2501], dtype=torch.float64), block=4)
    assert (lo.item(), mid.item(), after.item(), hi.item()) == (1, 1, 3, 3)
    # a point mass (what temperature near 0 looks like) always yields its token, whatever u
    point = torch.zeros(3, 5000)
    point[:, 4321] = 1.0
    assert sample(point, torch.tensor([0.0, 0.5, 1.0 - 2**-53], dtype=torch.float64)).tolist() == [4321] * 3


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
                                      dict(temperature=0.6, top_k=20)], ids=["greedy", "t1", "top-p", "top-k"])
def test_native_trace_and_sample_matches_the_torch_path(sampling):
    """The fused kernel the decode loop uses on CPU gives the torch path's tokens, log-probabilities
    and entropies (sampling.process_logits, sample_inverse_cdf, entropy_from_logp)."""
    from thinklab.backends.sampling import entropy_from_logp, process_logits, sampling_logits
    from thinklab.config import SamplingSpec

    spec = SamplingSpec(**sampling)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 5000, generator=g) * 2
    u = torch.rand(64, generator=g, dtype=torch.float64)
    logp = process_logits(logits, spec)
    p = logp.exp()
    tok = logp.argmax(-1) if spec.temperature == 0 else sample_inverse_cdf(p, u)
    n_tok, n_lp, n_ent = _sampling_or_skip().trace_and_sample(sampling_logits(logits, spec),
                                                             None if spec.temperature == 0 else u)
    assert torch.equal(n_tok, tok)
    assert torch.allclose(n_lp, logp.gather(-1, tok[:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(n_ent, entropy_from_logp(logp, p), atol=1e-5)
    assert n_ent.mean() > 0.5  # the distributions are far from point masses, so the comparison means something


def test_native_token_choice_traces_a_large_vocabulary_to_float64_accuracy():
    """Over qwen2.5's 151,936 tokens at a high entropy, the fused kernel's entropy and
    log-probability stay within 1e-5 nats of a float64 computation (its masses are summed in
    float64 per block; torch's float32 log_softmax and sum drift by about 1e-4 there), and
    its rows do not depend on the batch they come in."""
    from thinklab.backends.sampling import sampling_logits
    from thinklab.config import SamplingSpec

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 151_936, generator=g) * 3
    u = torch.rand(6, generator=g, dtype=torch.float64)
    x = sampling_logits(logits, SamplingSpec(temperature=0.7))
    ops = _sampling_or_skip()
    tok, lp, ent = ops.trace_and_sample(x, u)
    ref_logp = torch.log_softmax(x.double(), -1)
    ref_ent = -(ref_logp.exp() * ref_logp).sum(-1)
    assert ref_ent.min() > 3.0  # spread over many tokens, where float32 sums drift
    assert (ent.double() - ref_ent).abs().max() < 1e-5
    assert (lp.double() - ref_logp.gather(-1, tok[:, None]).squeeze(-1)).abs().max() < 1e-5
    alone = [ops.trace_and_sample(x[i : i + 1], u[i : i + 1]) for i in range(6)]
    assert torch.equal(torch.cat([a[0] for a in alone]), tok)
    assert torch.equal(torch.cat([a[2] for a in alone]), ent) and torch.equal(torch.cat([a[1] for a in alone]), lp)


@pytest.mark.slow
def test_first_token_frequencies_follow_the_model(fast_backend):
    """End to end through generate: the first token of 480 seeded samples at T=1 is drawn from
    the model's softmax (chi-square over the likely tokens plus the rest), so seeding, the
    per-sample uniforms and the inverse CDF fit together without an off-by-one."""
    from thinklab.config import SamplingSpec

    tok = fast_backend.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Name any animal."}], add_generation_prompt=True,
                                   tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        p = torch.softmax(fast_backend.model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    N = 480
    outs = fast_backend.generate([prompt] * N, list(range(N)), SamplingSpec(temperature=1.0), 1, progress=False)
    drawn = torch.tensor([o.token_ids[0] for o in outs])
    likely = [t for t in torch.argsort(p, descending=True)[:20].tolist() if N * p[t] >= 5]
    assert len(likely) >= 3, "the prompt should leave several likely first tokens"
    observed = [int((drawn == t).sum()) for t in likely]
    expected = [N * p[t].item() for t in likely]
    observed.append(N - sum(observed))
    expected.append(N - sum(expected))
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    dof = len(observed) - 1
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # 99.9th percentile
    assert chi2 < limit, f"chi2 {chi2:.1f} over {dof} dof exceeds {limit:.1f}: {list(zip(observed, expected))}"


@pytest.mark.parametrize("n0,T", [(0, 37), (0, 32), (16, 5), (3, 20), (0, 1), (32, 17)])
def test_blocked_cache_writes_a_prefill_as_position_by_position(n0, T):
    """A prefill's keys go into the blocked layout as whole blocks; the result must equal
    writing them one position at a time, and read back as the keys written."""
    from thinklab.backends.lean import KVCache

    a = KVCache(2, 3, 2, 128, 8, torch.float32, "cpu", blocked=True)
    b = KVCache(2, 3, 2, 128, 8, torch.float32, "cpu", blocked=True)
    k, v = torch.randn(3, 2, T, 8), torch.randn(3, 2, T, 8)
    a.write(1, n0, k, v)
    for t in range(T):
        b.write(1, n0 + t, k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert torch.equal(a.k[1], b.k[1]) and torch.equal(a.v[1], b.v[1])
    assert torch.equal(a.keys(1, n0 + T)[:, :, n0:], k)


def _cpu_has_avx512_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return "avx512f" in flags and "avx512_bf16" in flags


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize("path", ["native", "onednn"])
@pytest.mark.parametrize("M,K,N", [(1, 96, 50), (5, 97, 100), (9, 64, 144), (17, 33, 48)])
def test_bf16_projections_compute_products_of_rounded_values(path, M, K, N):
    """A bf16 projection is x W^T with x's rows and W (the norm's weight folded in) rounded
    to bfloat16 and the products summed in float32: natively (VDPBF16PS) and on the oneDNN
    path alike, odd K and partial tiles and panels included."""
    from thinklab.backends.lean import Projection, RMSNorm, SwiGLU, native_ops

    if path == "native":
        native = _native_or_skip()
        if not native.bf16_supported():
            assert not _cpu_has_avx512_bf16(), "AVX512_BF16 is here but the bf16 GEMM is not used"
            pytest.skip("the native bf16 GEMM needs AVX512_BF16, which this CPU lacks")
    else:
        native = None
    g = torch.Generator().manual_seed(M * K + N)
    x, res = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    w, b = torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    gamma = 1 + 0.3 * torch.randn(K, generator=g)
    rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    rx = _round_bf16(x)
    tol = 1e-5 * K**0.5

    plain = Projection(w, b, native, 16, bf16=True)
    torch.testing.assert_close(plain(x, res), rx @ _round_bf16(w).T + b + res, atol=tol, rtol=1e-5)
    normed = Projection(w, None, native, 16, RMSNorm(gamma, 1e-6), bf16=True)
    torch.testing.assert_close(normed(x), (rx @ _round_bf16(w * gamma).T) * rms, atol=tol, rtol=1e-5)
    # the rounding is real: the fp32 product differs by far more than the tolerance
    assert (plain(x, res) - (x @ w.T + b + res)).abs().max() > 50 * tol

    gate, up = torch.nn.Linear(K, N, bias=False), torch.nn.Linear(K, N, bias=False)
    gate.weight.data, up.weight.data = w, torch.randn(N, K, generator=g) / K**0.5
    swiglu = SwiGLU(gate, up, native, 16, RMSNorm(gamma, 1e-6), bf16=True)
    want = (torch.nn.functional.silu(rx @ _round_bf16(gate.weight * gamma).T * rms)
            * (rx @ _round_bf16(up.weight * gamma).T * rms))
    torch.testing.assert_close(swiglu(x), want, atol=tol, rtol=1e-5)


def test_lean_bf16_native_and_onednn_paths_agree_on_a_qwen2():
    """The whole forward in bf16 (a Qwen2 with biases and GQA): the native path and the
    oneDNN path compute the same model to float32 rounding, and that model is not the
    float32 one (the weights and GEMM inputs were rounded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    native = _native_or_skip()
    if not native.bf16_supported():
        pytest.skip("the native bf16 GEMM needs AVX512_BF16, which this CPU lacks")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                      tie_word_embeddings=False, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval().to(torch.bfloat16).float()  # bf16 values held in float32
    ids, att = _padded_batch([5, 11, 1], cfg.vocab_size)
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    out = {}
    for name, kw in {"native": dict(bf16=True), "onednn": dict(bf16=True, native=False),
                     "fp32": dict()}.items():
        lean = LeanDecoder(model, **kw)
        with torch.inference_mode():
            out[name] = lean.forward(ids, pos, att, lean.new_cache(3, ids.shape[1] + 1))
    scale = out["fp32"].abs().max().item()
    assert (out["native"] - out["onednn"]).abs().max().item() < 1e-4 * scale
    assert (out["native"] - out["fp32"]).abs().max().item() > 1e-3 * scale
