"""Tracing overhead: thinklab's traced decode loop against the same decode without tracing.

Three ways to decode the same left-padded batch greedily for exactly --tokens tokens per
row (EOS ignored, so every variant does the same number of steps):

  - plain:  the backend's own forward (the same prefill, KV cache and decode step), argmax,
            nothing else: no entropy, no log-probabilities, no per-step host sync;
  - traced: `backend.generate`, which also computes the full-vocabulary entropy and the
            log-probability of every token, checks stops per row on the host, and
            records everything;
  - transformers: plain `model.generate` on the same model, for reference.

traced / plain is the cost of tracing (target <= 1.05); traced / transformers is what a
user gains or loses against stock generation. Repeats alternate the variants and keep
the best of each (the machine is shared and noisy). Greedy outputs are compared.

    python benchmarks/tracing_overhead.py [--model default] [--batch 16] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from thinklab.config import ModelSpec, SamplingSpec  # noqa: E402
from thinklab.runner import get_backend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    backend = get_backend(ModelSpec(name=args.model))
    tok, model = backend.tokenizer, backend.model
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Explain step by step why {i} + {i * 7} = {i * 8}."}],
                                     add_generation_prompt=True, tokenize=False) for i in range(args.batch)]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), backend.pad_id)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):] = torch.tensor(p)
        mask[r, L - len(p):] = 1
    greedy = SamplingSpec(temperature=0)

    def traced():
        outs = backend.generate(prompts, [0] * len(prompts), greedy, args.tokens, progress=False)
        return sum(len(o.token_ids) for o in outs), [o.token_ids for o in outs]

    def plain():
        B = len(prompts)
        with torch.inference_mode():
            cache, forward = backend.forward.new_decoder(B, L + args.tokens)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = forward(ids, pos, mask, cache)
            att, nxt = mask, pos[:, -1:] + 1
            out = torch.empty((B, args.tokens), dtype=torch.long)
            for step in range(args.tokens):
                tok = logits.argmax(-1)
                out[:, step] = tok
                if step == args.tokens - 1:
                    break
                att = torch.cat([att, att.new_ones((B, 1))], dim=1)
                logits = forward(tok[:, None], nxt, att, cache)
                nxt = nxt + 1
        return B * args.tokens, out.tolist()

    def transformers():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens,
                                 min_new_tokens=args.tokens, do_sample=False, pad_token_id=backend.pad_id)
        return out[:, L:].numel(), out[:, L:].tolist()

    eos = backend.eos_ids
    backend.eos_ids = {-1}  # benchmark only: every row decodes exactly --tokens tokens
    variants = {"plain": plain, "traced": traced, "transformers": transformers}
    for fn in variants.values():
        fn()  # warm-up
    best = {name: float("inf") for name in variants}
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            n_tok, tokens[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    backend.eos_ids = eos
    print(f"model={args.model} batch={args.batch} new_tokens={args.tokens} threads={torch.get_num_threads()} "
          f"forward={backend.info.extra.get('forward')}")
    print(f"{'':<14}{'best s':>10}{'tok/s':>10}")
    for name in variants:
        print(f"{name:<14}{best[name]:>10.3f}{n_tok / best[name]:>10.1f}")
    for other in ("plain", "transformers"):
        same = sum(a == b for a, b in zip(tokens[other], tokens["traced"]))
        print(f"identical greedy outputs, traced vs {other}: {same}/{len(prompts)}")
    print(f"tracing overhead (traced time / plain time): {best['traced'] / best['plain']:.3f}")
    print(f"traced time / transformers generate time: {best['traced'] / best['transformers']:.3f}")


if __name__ == "__main__":
    main()
