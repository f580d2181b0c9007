"""Throughput of the transformers and vLLM backends on one workload, measured in one run.

    python benchmarks/backends.py [--prompts 8 --samples 2 --tokens 48] [--no-accuracy] [--exact-check]

Workload: P chat prompts x S samples each (one seed per sample) x up to T new tokens at
temperature --temperature, through HFBackend and VLLMBackend built from the same
ModelSpec. Rounds alternate hf, vllm, hf, vllm so both see the same machine load and the
in-process vLLM engine's thread binding; the best round of each counts. Prints tokens/s and
the vllm/hf ratio.

Then (unless --no-accuracy) the cross-backend checks docs/vllm.md reports:
  - greedy (temperature 0) on the P prompts through both backends: identical column
    shapes, the token-for-token agreement rate, and for each disagreement the HF top-2
    log-probability gap at the first differing position (a near-tie flips on fp32
    rounding differences between the two engines' kernels);
  - the vLLM-sampled tokens teacher-forced through the HF model: error of vLLM's
    token_logprob, and of the top-K entropy estimates (K = 5, 20; both estimators of
    thinklab.backends.vllm.topk_entropy) against the exact full-vocabulary entropy.
--exact-check builds a second vLLM engine in exact-entropy mode on a small workload and
compares its entropies with the teacher-forced exact ones (its tok/s is on 4 samples only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
import torch

from thinklab.config import ModelSpec, SamplingSpec, sample_seed

QUESTIONS = [
    "What is 17 + 25?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "If I have 3 apples and eat one, how many are left?",
    "Give a synonym for 'happy'.",
    "What is 9 times 7?",
    "Explain in one sentence what a noun is.",
    "List two animals that can fly.",
    "What day comes after Monday?",
    "Translate 'thank you' into Spanish.",
    "What is 100 minus 37?",
    "Name a planet in our solar system.",
    "What is the opposite of 'cold'?",
    "How many legs does a spider have?",
    "Write a short greeting for a friend.",
]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (variant {i // len(QUESTIONS)})")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def timed(backend, prompts, seeds, sampling, tokens):
    t0 = time.perf_counter()
    comps = backend.generate(prompts, seeds, sampling, tokens, progress=False)
    dt = time.perf_counter() - t0
    n = sum(len(c.token_ids) for c in comps)
    return comps, n, dt


@torch.inference_mode()
def teacher_force(model, prompt: list[int], generated: list[int], sampling: SamplingSpec) -> torch.Tensor:
    """Processed log-probabilities (as the hf backend defines them) at each generated position. -> (T, V)."""
    from thinklab.backends.sampling import process_logits

    ids = torch.tensor([prompt + generated], dtype=torch.long, device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(generated) - 1].float()  # (T, V)
    return process_logits(logits, sampling)


def greedy_agreement(hf, vb, prompts, tokens) -> dict:
    greedy = SamplingSpec(temperature=0)
    seeds = list(range(len(prompts)))
    h = hf.generate(prompts, seeds, greedy, tokens, progress=False)
    v = vb.generate(prompts, seeds, greedy, tokens, progress=False)
    same = 0
    notes = []
    for i, (a, b) in enumerate(zip(h, v)):
        for c in (a, b):  # identical columns: three per-token lists of one length
            assert len(c.token_ids) == len(c.token_entropy) == len(c.token_logprob), "column lengths differ"
        if a.token_ids == b.token_ids and a.finish_reason == b.finish_reason:
            same += 1
            continue
        pos = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), min(len(a.token_ids), len(b.token_ids)))
        logp = teacher_force(hf.model, prompts[i], a.token_ids[: pos + 1], greedy)[pos] if pos < len(a.token_ids) else None
        gap = None
        if logp is not None:
            top2 = torch.topk(logp, 2).values
            gap = float(top2[0] - top2[1])
        notes.append(f"prompt {i}: first difference at token {pos} (hf {len(a.token_ids)} tokens, vllm {len(b.token_ids)}); "
                     f"hf top-2 logprob gap there {gap if gap is None else round(gap, 5)}")
    lp_err = []
    ent_err = []
    for a, b in zip(h, v):  # on the common prefix the two traces describe the same distributions
        k = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), min(len(a.token_ids), len(b.token_ids)))
        lp_err += list(np.abs(np.subtract(a.token_logprob[:k], b.token_logprob[:k])))
        ent_err += list(np.subtract(b.token_entropy[:k], a.token_entropy[:k]))
    return {
        "agree": same,
        "n": len(prompts),
        "notes": notes,
        "logprob_max_abs_err": float(np.max(lp_err)) if lp_err else float("nan"),
        "entropy_mean_err": float(np.mean(ent_err)) if ent_err else float("nan"),
        "entropy_max_abs_err": float(np.max(np.abs(ent_err))) if ent_err else float("nan"),
    }


def entropy_errors(hf, prompts, comps, sampling) -> dict:
    """Top-K estimates vs exact entropy on the vLLM-sampled tokens, teacher-forced through HF."""
    from thinklab.backends.vllm import exact_entropy, topk_entropy

    V = hf.model.config.vocab_size
    exact, reported, lp_err = [], [], []
    est = {(k, e): [] for k in (5, 20) for e in ("lower", "uniform")}
    for prompt, c in zip(prompts, comps):
        if not c.token_ids:
            continue
        logp = teacher_force(hf.model, prompt, c.token_ids, sampling)  # (T, V)
        full = logp.double().cpu().numpy()
        exact.append(exact_entropy(full))
        reported.append(np.asarray(c.token_entropy))
        chosen = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1).cpu().numpy()
        lp_err.append(np.abs(chosen - np.asarray(c.token_logprob)))
        top = -np.sort(-full, axis=1)
        for (k, e), acc in est.items():
            acc.append(topk_entropy(top[:, :k], V, e))
    exact = np.concatenate(exact)
    out = {"tokens": int(exact.size), "exact_mean": float(exact.mean()), "logprob_max_abs_err": float(np.concatenate(lp_err).max())}
    rep = np.concatenate(reported)
    out["vllm_reported_vs_exact"] = (float(np.mean(rep - exact)), float(np.max(np.abs(rep - exact))))
    for (k, e), acc in est.items():
        d = np.concatenate(acc) - exact
        out[f"top-{k} {e}"] = (float(np.mean(d)), float(np.mean(np.abs(d))), float(np.max(np.abs(d))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--entropy-k", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="skip the greedy agreement and entropy-estimate error")
    ap.add_argument("--exact-check", action="store_true", help="also run a second engine in exact-entropy mode")
    args = ap.parse_args(argv)

    from thinklab.backends.hf import HFBackend
    from thinklab.backends.vllm import VLLMBackend

    t0 = time.perf_counter()
    hf = HFBackend(ModelSpec(name=args.model, backend="hf", dtype="float32"))
    t_hf_load = time.perf_counter() - t0
    base = chat_prompts(hf.tokenizer, args.prompts)
    prompts = [p for p in base for _ in range(args.samples)]
    seeds = [sample_seed(0, f"p{i}", s) for i in range(args.prompts) for s in range(args.samples)]
    sampling = SamplingSpec(temperature=args.temperature)
    print(f"# workload: {args.model}, {args.prompts} prompts x {args.samples} samples x <= {args.tokens} tokens, "
          f"temperature {args.temperature}; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    timed(hf, prompts[:2], seeds[:2], sampling, 4)  # warm-up
    t0 = time.perf_counter()
    vb = VLLMBackend(ModelSpec(name=args.model, backend="vllm", dtype="float32", entropy_top_k=args.entropy_k))
    t_v_load = time.perf_counter() - t0
    print(f"# load: hf {t_hf_load:.1f} s, vllm engine {t_v_load:.1f} s (enforce_eager={vb.enforce_eager}); entropy {vb.entropy_mode}")
    timed(vb, prompts[:2], seeds[:2], sampling, 4)

    best = {"hf": 0.0, "vllm": 0.0}
    comps_v = None
    for r in range(args.rounds):
        for name, b in (("hf", hf), ("vllm", vb)):
            comps, n, dt = timed(b, prompts, seeds, sampling, args.tokens)
            if name == "vllm":
                comps_v = comps
            best[name] = max(best[name], n / dt)
            print(f"round {r} {name:5s} {n:5d} tokens in {dt:7.1f} s = {n / dt:7.1f} tok/s")
    print(f"throughput hf {best['hf']:.1f} tok/s, vllm {best['vllm']:.1f} tok/s, vllm/hf = {best['vllm'] / best['hf']:.2f}x")

    if args.accuracy:
        g = greedy_agreement(hf, vb, base, args.tokens)
        print(f"greedy agreement: {g['agree']}/{g['n']} prompts token for token identical "
              f"({100 * g['agree'] / g['n']:.0f}%); on common prefixes |logprob diff| max {g['logprob_max_abs_err']:.2e}, "
              f"entropy (top-{args.entropy_k} est. - exact) mean {g['entropy_mean_err']:.4f} max |.| {g['entropy_max_abs_err']:.4f} nats")
        for note in g["notes"]:
            print("  " + note)
        e = entropy_errors(hf, prompts, comps_v, sampling)
        print(f"teacher-forced vLLM samples: {e['tokens']} tokens, exact entropy mean {e['exact_mean']:.3f} nats, "
              f"token_logprob max |err| {e['logprob_max_abs_err']:.2e}")
        print(f"  vLLM reported ({vb.entropy_mode}, {vb.entropy_estimator}) - exact: mean {e['vllm_reported_vs_exact'][0]:+.4f}, "
              f"max |.| {e['vllm_reported_vs_exact'][1]:.4f} nats")
        for key in ("top-5 lower", "top-5 uniform", "top-20 lower", "top-20 uniform"):
            m, mae, mx = e[key]
            print(f"  {key:15s} estimate - exact: mean {m:+.4f}, mean |.| {mae:.4f}, max |.| {mx:.4f} nats")

    if args.exact_check:
        vb.close()
        from thinklab.backends.vllm import exact_entropy

        small_p, small_s = prompts[: min(4, len(prompts))], seeds[: min(4, len(prompts))]
        t0 = time.perf_counter()
        vx = VLLMBackend(ModelSpec(name=args.model, backend="vllm", dtype="float32", entropy_top_k=None))
        print(f"# exact-mode engine {time.perf_counter() - t0:.1f} s")
        comps, n, dt = timed(vx, small_p, small_s, sampling, 32)
        errs = []
        for p, c in zip(small_p, comps):
            full = teacher_force(hf.model, p, c.token_ids, sampling).double().cpu().numpy()
            errs.append(np.abs(exact_entropy(full) - np.asarray(c.token_entropy)))
        print(f"exact mode: {n} tokens at {n / dt:.1f} tok/s; entropy vs teacher-forced exact max |err| "
              f"{np.concatenate(errs).max():.2e} nats")
        vx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
