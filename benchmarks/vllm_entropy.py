"""Cost and accuracy of vLLM's exact in-engine entropy against its top-20 estimate, in one run.

    python benchmarks/vllm_entropy.py [--prompts 8 --samples 2 --tokens 64 --rounds 3]

Two vLLM engines on the same model in one process: `entropy_top_k=None` (exact, the
entropy sampler of thinklab.backends.vllm_entropy) and `entropy_top_k=20`. Workload: P
chat prompts x S samples (one seed each) x up to T new tokens at --temperature/--top-p.
Rounds alternate exact, top-20, exact, top-20 so both see the same machine load; prints
each round's seconds, the summed time ratio exact/top-20 and the median per-round ratio.

Checks printed after the timing:
  - both engines drew the same tokens from the same seeds (the entropy sampler must not
    change sampling);
  - the exact engine's token_entropy against the transformers backend's exact entropy of
    the same tokens, teacher-forced under the same processed distribution (temperature,
    top-p): max and mean absolute error in nats; and the top-20 estimate's error, for scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
import torch

from thinklab.config import ModelSpec, SamplingSpec, sample_seed

QUESTIONS = [
    "What is 17 + 25? Explain.",
    "Name three primary colors and say why they are called primary.",
    "Write two sentences about the sea.",
    "What is the capital of France, and what river runs through it?",
    "If I have 3 apples and eat one, how many are left? Think step by step.",
    "Give three synonyms for 'happy'.",
    "What is 9 times 7? Show the working.",
    "Explain in one sentence what a noun is.",
]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                             add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def teacher_forced_entropy(model, prompt, token_ids, sampling) -> tuple[np.ndarray, np.ndarray]:
    """The exact entropy at each position, and the distance of top_p from the nearest
    cumulative mass of the tempered distribution (where a 1e-5 difference in logits can
    move one token across the top-p cut)."""
    from thinklab.backends.entropy import exact_entropy
    from thinklab.backends.sampling import process_logits

    ids = torch.tensor([list(prompt) + list(token_ids)], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    entropy = exact_entropy(process_logits(logits, sampling).double().cpu().numpy())
    tempered = torch.softmax(logits.double() / max(sampling.temperature, 1e-9), dim=-1)
    mass_before = torch.sort(tempered, dim=-1, descending=True).values.cumsum(dim=-1)
    margin = (mass_before - sampling.top_p).abs().min(dim=-1).values.cpu().numpy()
    return entropy, margin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    args = ap.parse_args()

    from thinklab.backends.vllm import VLLMBackend

    engines = {
        "exact": VLLMBackend(ModelSpec(name=args.model, backend="vllm", entropy_top_k=None), kv_cache_space_gib=1),
        "top-20": VLLMBackend(ModelSpec(name=args.model, backend="vllm", entropy_top_k=20), kv_cache_space_gib=1),
    }
    tok = engines["exact"].tokenizer
    base = chat_prompts(tok, args.prompts)
    prompts = [p for p in base for _ in range(args.samples)]
    seeds = [sample_seed(0, str(i), j) for i in range(args.prompts) for j in range(args.samples)]
    sampling = SamplingSpec(temperature=args.temperature, top_p=args.top_p)
    for backend in engines.values():  # warm-up: first-call allocations, prefix cache of the prompts
        backend.generate(prompts[:2], seeds[:2], sampling, 4, progress=False)

    seconds: dict[str, list[float]] = {k: [] for k in engines}
    outputs = {}
    for r in range(args.rounds):
        for name, backend in engines.items():
            t0 = time.perf_counter()
            outputs[name] = backend.generate(prompts, seeds, sampling, args.tokens, progress=False)
            seconds[name].append(time.perf_counter() - t0)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()), flush=True)
    n_tokens = {k: sum(len(c.token_ids) for c in v) for k, v in outputs.items()}
    for name in engines:
        print(f"{name}: {n_tokens[name]} tokens/round, best {n_tokens[name] / min(seconds[name]):.1f} tok/s, "
              f"total {sum(seconds[name]):.2f} s over {args.rounds} rounds")
    total_ratio = sum(seconds["exact"]) / sum(seconds["top-20"])
    median_ratio = statistics.median(a / b for a, b in zip(seconds["exact"], seconds["top-20"]))
    print(f"time ratio exact / top-20: {total_ratio:.3f} (summed), {median_ratio:.3f} (median of rounds)")

    same = sum(a.token_ids == b.token_ids for a, b in zip(outputs["exact"], outputs["top-20"]))
    print(f"same tokens from the same seeds: {same}/{len(prompts)} samples")
    for backend in engines.values():
        backend.close()

    from thinklab.backends import load_backend

    hf = load_backend(ModelSpec(name=args.model, backend="hf"))
    err_exact, err_top20, margins = [], [], []
    for prompt, ex, tk in zip(prompts, outputs["exact"], outputs["top-20"]):
        reference, margin = teacher_forced_entropy(hf.model, prompt, ex.token_ids, sampling)
        err_exact.append(np.abs(np.asarray(ex.token_entropy) - reference))
        margins.append(margin)
        if tk.token_ids == ex.token_ids:
            err_top20.append(np.asarray(tk.token_entropy) - reference)
    e = np.concatenate(err_exact)
    print(f"exact vs transformers teacher-forced, {e.size} tokens: max abs {e.max():.2e}, mean abs {e.mean():.2e} nats")
    m = np.concatenate(margins)
    off = e > 1e-3
    if sampling.top_p < 1:
        print(f"  tokens off by > 1e-3: {int(off.sum())}, of which {int((off & (m < 1e-4)).sum())} have a cumulative mass "
              f"within 1e-4 of top_p (a token on the cut); the other {e.size - int(off.sum())}: max abs "
              f"{e[~off].max():.2e}")
    if err_top20:
        t = np.concatenate(err_top20)
        print(f"top-20 (lower) vs the same, {t.size} tokens: mean {t.mean():+.4f}, max abs {np.abs(t).max():.4f} nats")
    hf.close()


if __name__ == "__main__":
    main()
