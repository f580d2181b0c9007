"""One script for a CUDA host: does thinklab's GPU path work, and how fast is it?

    python benchmarks/gpu_check.py [--model default --prompts 8 --tokens 64] [--only NAME ...]

Checks, each printed as `PASS|FAIL|SKIP  name  tok/s  detail`:
  hf-bf16            transformers backend on CUDA in bfloat16: contract (equal column
                     lengths, finite entropies, logprobs <= 0), greedy tokens vs float32
  vllm-exact         vLLM on CUDA with exact in-engine entropy (the default), float32: the
                     entropies equal the transformers backend's teacher-forced exact entropy
                     within 5e-3 nats, and vLLM draws the same tokens as with top-20
  hf-bnb-nf4         transformers backend with bitsandbytes NF4 kernels (bnb-nf4:kernel)
  hf-bnb-8bit        transformers backend with bitsandbytes LLM.int8() (bnb-8bit:kernel)
  vllm-fp8           vLLM with quantization="fp8" (exact entropy)
  hf-moe-top-k       the offline MoE (smollm2-135m-moe16) with moe_top_k=4 through the
                     runner: every sampled token routed to exactly 4 experts in every layer
  vllm-moe-top-k     a random tiny Qwen3-MoE (8 experts, top-2) in vLLM with moe_top_k=4
                     (hf_overrides): the engine serves it and, where vLLM can return routed
                     experts (Model Runner V2), each position lists 4 distinct experts

Without a CUDA device every check prints SKIP with the reason and the script exits 0.
With one, it exits 1 if any check failed. Sized to finish well under 10 minutes on one GPU
(small model, eager engines, a few hundred tokens per check).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = ["What is 17 + 25? Explain.", "Name three primary colors.", "Write two sentences about the sea.",
             "Is 91 a prime number? Think it through.", "What is 9 times 7? Show the working.",
             "Give three synonyms for 'happy'.", "What is the capital of France?", "What is 100 minus 37?"]


class Skip(Exception):
    """A check that cannot run here, with the reason."""


def _prompts(tokenizer, n: int) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                           add_generation_prompt=True, tokenize=False) for i in range(n)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _timed_generate(backend, prompts, sampling, tokens):
    import torch

    seeds = list(range(len(prompts)))
    backend.generate(prompts[:1], seeds[:1], sampling, 4, progress=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = backend.generate(prompts, seeds, sampling, tokens, progress=False)
    torch.cuda.synchronize()
    n = sum(len(c.token_ids) for c in out)
    return out, n / (time.perf_counter() - t0)


def _check_contract(out) -> None:
    import math

    for c in out:
        if not (len(c.token_ids) == len(c.token_entropy) == len(c.token_logprob) > 0):
            raise AssertionError("columns of unequal length or empty")
        if not all(math.isfinite(h) and h >= 0 for h in c.token_entropy):
            raise AssertionError("an entropy is negative or not finite")
        if not all(lp <= 1e-4 for lp in c.token_logprob):
            raise AssertionError("a log-probability is above 0")


def _teacher_forced_entropy(model, prompt, token_ids, sampling):
    import torch

    from thinklab.backends.entropy import exact_entropy
    from thinklab.backends.sampling import process_logits

    ids = torch.tensor([list(prompt) + list(token_ids)], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return exact_entropy(process_logits(logits, sampling).double().cpu().numpy())


def check_hf_bf16(args, state):
    from thinklab.backends import load_backend
    from thinklab.config import ModelSpec, SamplingSpec

    greedy = SamplingSpec(temperature=0)
    bf16 = load_backend(ModelSpec(name=args.model, backend="hf", dtype="bfloat16"))
    try:
        prompts = _prompts(bf16.tokenizer, args.prompts)
        out, rate = _timed_generate(bf16, prompts, greedy, args.tokens)
        _check_contract(out)
    finally:
        bf16.close()
    fp32 = state.setdefault("hf_fp32", load_backend(ModelSpec(name=args.model, backend="hf", dtype="float32")))
    ref = fp32.generate(prompts, list(range(len(prompts))), greedy, 16, progress=False)
    same_start = sum(a.token_ids[:4] == b.token_ids[:4] for a, b in zip(out, ref))
    if same_start < len(prompts) // 2:
        raise AssertionError(f"only {same_start}/{len(prompts)} bf16 greedy answers begin as the float32 ones do")
    return rate, f"{len(prompts)} prompts; first 4 greedy tokens as in float32 on {same_start}/{len(prompts)}"


def check_vllm_exact(args, state):
    import numpy as np

    from thinklab.backends import load_backend
    from thinklab.backends.vllm import VLLMBackend
    from thinklab.config import ModelSpec, SamplingSpec

    sampling = SamplingSpec(temperature=0.8)
    exact = VLLMBackend(ModelSpec(name=args.model, backend="vllm", dtype="float32", enforce_eager=True),
                        gpu_memory_utilization=0.3)
    try:
        if exact.info.entropy_mode != "exact":
            raise AssertionError(f"entropy_mode is {exact.info.entropy_mode!r}, not 'exact'")
        prompts = _prompts(exact.tokenizer, args.prompts)
        out, rate = _timed_generate(exact, prompts, sampling, args.tokens)
        _check_contract(out)
    finally:
        exact.close()
    top = VLLMBackend(ModelSpec(name=args.model, backend="vllm", dtype="float32", enforce_eager=True, entropy_top_k=20),
                      gpu_memory_utilization=0.3)
    try:
        top_out, top_rate = _timed_generate(top, prompts, sampling, args.tokens)
    finally:
        top.close()
    same = sum(a.token_ids == b.token_ids for a, b in zip(out, top_out))
    fp32 = state.setdefault("hf_fp32", load_backend(ModelSpec(name=args.model, backend="hf", dtype="float32")))
    err = max(float(np.abs(np.asarray(c.token_entropy) - _teacher_forced_entropy(fp32.model, p, c.token_ids, sampling)).max())
              for p, c in zip(prompts, out))
    if err > 5e-3:
        raise AssertionError(f"exact entropy differs from the transformers backend's by up to {err:.2e} nats")
    return rate, (f"max |H_vllm - H_hf| {err:.1e} nats; same tokens as top-20 on {same}/{len(prompts)}; "
                  f"top-20 {top_rate:.0f} tok/s (exact/top-20 time {top_rate / rate:.2f}x)")


def _check_hf_quantized(method):
    def check(args, state):
        import importlib.util

        from thinklab.backends import load_backend
        from thinklab.config import ModelSpec, SamplingSpec

        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes is not installed (pip install 'thinklab[gpu]')")
        backend = load_backend(ModelSpec(name=args.model, backend="hf", quantization=method))
        try:
            out, rate = _timed_generate(backend, _prompts(backend.tokenizer, args.prompts), SamplingSpec(temperature=0.7),
                                        args.tokens)
            _check_contract(out)
        finally:
            backend.close()
        return rate, f"{method}, {sum(len(c.token_ids) for c in out)} tokens"
    return check


def check_vllm_fp8(args, state):
    from thinklab.backends.vllm import VLLMBackend
    from thinklab.config import ModelSpec, SamplingSpec

    backend = VLLMBackend(ModelSpec(name=args.model, backend="vllm", quantization="fp8", enforce_eager=True),
                          gpu_memory_utilization=0.3)
    try:
        out, rate = _timed_generate(backend, _prompts(backend.tokenizer, args.prompts), SamplingSpec(temperature=0.7),
                                    args.tokens)
        _check_contract(out)
        mode = backend.info.entropy_mode
    finally:
        backend.close()
    return rate, f"quantization='fp8', entropy {mode}"


def check_hf_moe_top_k(args, state):
    import tempfile as tf

    from thinklab import runner
    from thinklab.config import ModelSpec, RunSpec, SamplingSpec

    k = 4
    spec = RunSpec(model=ModelSpec(name="smollm2-135m-moe16", backend="hf", moe_top_k=k), task="rg:basic_arithmetic",
                   n_problems=4, sampling=SamplingSpec(temperature=0.7, n=2, max_tokens=args.tokens))
    with tf.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        table = runner.run(spec, runs_root=root, progress=False)
        seconds = time.perf_counter() - t0
    n_tokens = int(table["n_tokens"].sum()) if "n_tokens" in table.columns else sum(len(t) for t in table["token_ids"])
    for load, ents in zip(table["expert_load"].to_list(), table["token_entropy"].to_list()):
        sampled = sum(1 for h in ents if h == h)  # forced tokens (NaN) are not counted
        if any(sum(layer) != k * sampled for layer in load):
            raise AssertionError(f"a layer's expert load is not {k} x {sampled} sampled tokens")
    return n_tokens / seconds, f"moe_top_k={k}: every layer routes each sampled token to {k} experts (incl. model load)"


def check_vllm_moe_top_k(args, state):
    import torch
    import vllm
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from thinklab import models

    k = 4
    with tempfile.TemporaryDirectory() as d:
        tok = AutoTokenizer.from_pretrained(models.resolve(args.model).path)
        cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
                             tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        kwargs = dict(model=d, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=1024,
                      hf_overrides={"num_experts_per_tok": k}, enable_prefix_caching=True)
        try:
            llm = vllm.LLM(enable_return_routed_experts=True, **kwargs)
            routed_note = ""
        except Exception as exc:  # routed experts need Model Runner V2; serve the override without them
            llm = vllm.LLM(**kwargs)
            routed_note = f"routed experts unavailable ({str(exc).strip().splitlines()[0][:120]}); "
        try:
            prompts = [vllm.inputs.TokensPrompt(prompt_token_ids=list(range(10, 40)))] * args.prompts
            params = vllm.SamplingParams(max_tokens=args.tokens, temperature=0.8, ignore_eos=True, seed=0)
            llm.generate(prompts[:1], params, use_tqdm=False)
            t0 = time.perf_counter()
            out = llm.generate(prompts, params, use_tqdm=False)
            rate = sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t0)
            routed = out[0].outputs[0].routed_experts
            if routed is not None:
                if routed.shape[-1] != k or any(len(set(r)) != k for r in routed.reshape(-1, k).tolist()):
                    raise AssertionError(f"routed experts have shape {routed.shape}, not {k} distinct per position")
                routed_note = f"routed experts {tuple(routed.shape)}, {k} distinct per position; "
        finally:
            llm.llm_engine.engine_core.shutdown()
    return rate, f"{routed_note}moe_top_k={k} through hf_overrides on a random tiny Qwen3-MoE"


CHECKS = {
    "hf-bf16": check_hf_bf16,
    "vllm-exact": check_vllm_exact,
    "hf-bnb-nf4": _check_hf_quantized("bnb-nf4:kernel"),
    "hf-bnb-8bit": _check_hf_quantized("bnb-8bit:kernel"),
    "vllm-fp8": check_vllm_fp8,
    "hf-moe-top-k": check_hf_moe_top_k,
    "vllm-moe-top-k": check_vllm_moe_top_k,
}
VLLM_CHECKS = {"vllm-exact", "vllm-fp8", "vllm-moe-top-k"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="embedded model name, hub id or local dir")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run only these checks")
    args = ap.parse_args(argv)
    names = args.only or list(CHECKS)

    import torch

    no_cuda = None if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"
    if no_cuda is None:
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    state: dict = {}
    failed = 0
    started = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            if no_cuda:
                raise Skip(no_cuda)
            if name in VLLM_CHECKS:
                import importlib.util

                if importlib.util.find_spec("vllm") is None:
                    raise Skip("vllm is not installed (pip install 'thinklab[gpu]')")
            rate, detail = CHECKS[name](args, state)
            line = f"PASS  {name:<15} {rate:9.1f} tok/s  {detail}"
        except Skip as why:
            line = f"SKIP  {name:<15} {'-':>9}        {why}"
        except Exception as exc:
            failed += 1
            line = f"FAIL  {name:<15} {'-':>9}        {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            traceback.print_exc(file=sys.stderr)
        print(f"{line}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    for backend in state.values():
        backend.close()
    print(f"{len(names) - failed}/{len(names)} checks did not fail, in {time.perf_counter() - started:.0f} s"
          + (f"; all skipped: {no_cuda}" if no_cuda else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
