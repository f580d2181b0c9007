"""The offline MoE's decode rate on the lean forward against transformers' modules, measured in one run.

    python benchmarks/moe_forward.py [--top-k 4] [--problems 8] [--samples 4] [--tokens 96] [--rounds 2]

Workload: the first --problems problems of rg:basic_arithmetic (the findings sweep's MoE
task) x --samples samples, up to --tokens new tokens at T=0.7, through two HFBackends on
`smollm2-135m-moe16` at --top-k: `forward="auto"` (the lean forward and its row scheduler)
and `forward="transformers"` (transformers' modules, prepacked linears, fixed batches).
Rounds alternate lean, transformers, lean, ... so both see the same machine load; the best
round of each counts. Prints generated tokens/s of each, the ratio, and whether the two
produced the same samples (they need not: the two forwards round differently, and at k < 16
a rounding difference can flip a near-tie in the router).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from thinklab import models, prompts, tasks  # noqa: E402
from thinklab.config import ModelSpec, PromptSpec, SamplingSpec, sample_seed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from thinklab.backends.hf import HFBackend

    name = models.model_name(models.DEFAULT_OFFLINE)
    backends = {f: HFBackend(ModelSpec(name=name, backend="hf", moe_top_k=args.top_k, forward=f))
                for f in ("auto", "transformers")}
    tok = backends["auto"].tokenizer
    problems = tasks.load_task("rg:basic_arithmetic", args.problems, 0)
    ids = [tok(prompts.build_prompt(tok, p, PromptSpec()), add_special_tokens=False)["input_ids"] for p in problems]
    batch = [list(ids[i // args.samples]) for i in range(len(ids) * args.samples)]
    seeds = [sample_seed(0, f"p{i // args.samples}", i % args.samples) for i in range(len(batch))]
    sampling = SamplingSpec(temperature=0.7)
    best: dict[str, float] = {}
    outs: dict[str, list] = {}
    for _ in range(args.rounds):
        for f, backend in backends.items():
            t0 = time.perf_counter()
            done = backend.generate(batch, seeds, sampling, args.tokens, progress=False)
            rate = sum(len(c.token_ids) for c in done) / (time.perf_counter() - t0)
            best[f] = max(best.get(f, 0.0), rate)
            outs[f] = [c.token_ids for c in done]
    lean, hf = backends["auto"], backends["transformers"]
    same = sum(a == b for a, b in zip(outs["auto"], outs["transformers"]))
    print(f"{name} at top-k {args.top_k}: {len(batch)} samples x up to {args.tokens} tokens, best of {args.rounds}")
    print(f"  {lean.forward.name} ({lean.forward.layout}): {best['auto']:.1f} tok/s")
    print(f"  {hf.forward.name} ({hf.forward.layout}, batch {hf.max_batch_size}): {best['transformers']:.1f} tok/s")
    print(f"  lean / transformers = {best['auto'] / best['transformers']:.2f}; "
          f"identical samples {same}/{len(batch)}")
    for backend in backends.values():
        backend.close()


if __name__ == "__main__":
    main()
