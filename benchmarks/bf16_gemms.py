"""bfloat16 GEMMs on the CPU (`dtype="bfloat16"`): what they buy and what they change.

Measured in one run, per model, float32 against bfloat16 (the lean forward both times):
  - steady-state decode through the row scheduler at --rows rows of GSM8K prompts, every
    row decoding --tokens tokens (EOS ignored): tok/s of the decode phase, and the ratio;
  - greedy answers to the first --problems GSM8K test problems (task seed 0, up to
    --max-tokens tokens): the share of samples whose token ids are identical, the first
    position where the others differ, and the accuracy of each;
  - the distribution itself, teacher-forced on the float32 greedy outputs (prompt and
    completion, one prefill per sample at each dtype): per generated position, the KL
    divergence KL(float32 || bfloat16) of the next-token distributions, the difference of
    their entropies, and how often their argmax differs.
The machine is shared: run it under `flock /tmp/thinklab-heavy.lock` and read single runs
as noisy; the ratios are measured in one run.

    python benchmarks/bf16_gemms.py [--models qwen2.5-0.5b] [--rows 32] [--tokens 64]
        [--problems 32] [--max-tokens 384]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from study_throughput import steady_state  # noqa: E402  (this directory: the same steady-state decode)

from thinklab import grading, prompts, tasks  # noqa: E402
from thinklab.config import ModelSpec, RunSpec, SamplingSpec  # noqa: E402


def greedy(backend, problems, prompt_ids, max_tokens):
    traces = backend.generate(prompt_ids, list(range(len(prompt_ids))), SamplingSpec(temperature=0), max_tokens,
                              progress=False)
    tok = backend.tokenizer
    correct = [grading.grade(tok.decode(t.token_ids, skip_special_tokens=True), p.gold, p.task,
                             finish_reason=t.finish_reason).correct
               for p, t in zip(problems, traces)]
    return [list(t.token_ids) for t in traces], correct


def teacher_forced(b32, b16, prompts, completions):
    """Both models fed the same prompts and completions (left-padded, one batch, position by
    position in lockstep); per real completion position, KL(fp32 || bf16) of the next-token
    distributions, the entropy difference bf16 - fp32, and whether the argmax differs."""
    B, L = len(prompts), max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    ids = torch.zeros((B, L), dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):] = torch.tensor(p)
        att[r, L - len(p):] = 1
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    decoders = [b.forward.decoder for b in (b32, b16)]
    caches = [d.new_cache(B, L + C + 1) for d in decoders]
    kl, dent, flips = [], [], 0
    with torch.inference_mode():
        step = [d.forward(ids, pos, att, c) for d, c in zip(decoders, caches)]
        nxt = pos[:, -1:] + 1
        for j in range(C):
            p, q = (torch.log_softmax(x.double(), -1) for x in step)
            live = torch.tensor([j < len(c) for c in completions])
            p, q = p[live], q[live]
            kl.extend((p.exp() * (p - q)).sum(-1).tolist())
            dent.extend(((q.exp() * q).sum(-1) - (p.exp() * p).sum(-1)).neg().tolist())
            flips += int((p.argmax(-1) != q.argmax(-1)).sum())
            if j + 1 == C:
                break
            tok = torch.tensor([[c[j] if j < len(c) else 0] for c in completions])
            att = torch.cat([att, att.new_ones((B, 1))], 1)
            step = [d.forward(tok, nxt, att, c) for d, c in zip(decoders, caches)]
            nxt = nxt + 1
    return kl, dent, flips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-0.5b"])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=384)
    args = ap.parse_args()

    from thinklab.backends.hf import HFBackend

    print(f"# {platform.node()}: {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}; "
          f"decode {args.rows} rows x {args.tokens} tokens; greedy GSM8K {args.problems} problems, "
          f"max_tokens {args.max_tokens}")
    for name in args.models:
        problems = tasks.load_task("gsm8k", args.problems, 0)
        res = {}
        for dtype in ("float32", "bfloat16"):
            spec = RunSpec(model=ModelSpec(name=name, dtype=dtype), task="gsm8k", n_problems=args.problems,
                           sampling=SamplingSpec(temperature=0.7, n=4, max_tokens=args.max_tokens))
            hf = HFBackend(spec.model)
            tok = hf.tokenizer
            prompt_ids = [tok(prompts.build_prompt(tok, p, spec.prompt), add_special_tokens=False)["input_ids"]
                          for p in problems]
            hf.generate([[1, 2, 3]], [0], SamplingSpec(temperature=0), 2, progress=False)  # warm-up
            rate = steady_state(hf, spec, args.rows, args.tokens)["rate"]
            ids, correct = greedy(hf, problems, prompt_ids, args.max_tokens)
            res[dtype] = dict(rate=rate, ids=ids, correct=correct, forward=hf.forward.name, backend=hf,
                              prompts=prompt_ids)
            print(f"{name} {dtype}: forward {hf.forward.name}; steady decode {rate:.1f} tok/s; greedy accuracy "
                  f"{sum(correct) / len(correct):.3f}", flush=True)
        f32, b16 = res["float32"], res["bfloat16"]
        same = [a == b for a, b in zip(f32["ids"], b16["ids"])]
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(f32["ids"], b16["ids"]) if a != b]
        kept = [(p, c) for p, c in zip(f32["prompts"], f32["ids"]) if c]
        kl, dent, flips = teacher_forced(f32["backend"], b16["backend"], [p for p, _ in kept], [c for _, c in kept])
        n = len(kl)
        both = [(a, b) for a, b in zip(f32["correct"], b16["correct"])]
        print(f"  bf16 / fp32 steady decode = {b16['rate'] / f32['rate']:.2f}")
        print(f"  greedy: {sum(same)}/{len(same)} samples token-identical; the others first differ at token "
              f"{statistics.median(first) if first else '-'} (median); accuracy fp32 {sum(f32['correct'])}/{len(same)}, "
              f"bf16 {sum(b16['correct'])}/{len(same)}; both right {sum(a and b for a, b in both)}, only fp32 "
              f"{sum(a and not b for a, b in both)}, only bf16 {sum(b and not a for a, b in both)}")
        print(f"  teacher-forced over {n} positions: KL(fp32 || bf16) mean {statistics.mean(kl):.2e} nats, "
              f"p99 {sorted(kl)[int(0.99 * (len(kl) - 1))]:.2e}; entropy bf16 - fp32 mean {statistics.mean(dent):+.2e}, "
              f"mean |.| {statistics.mean(abs(x) for x in dent):.2e} nats; argmax differs at {flips / n:.2%}")
        for r in res.values():
            r["backend"].close()


if __name__ == "__main__":
    main()
