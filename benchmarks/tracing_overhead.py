"""Tracing overhead: thinklab's traced decode loop vs. plain `model.generate`, same batch.

Both decode greedily from the same left-padded batch, so they produce the same tokens and
run the same number of steps; the ratio of their times is the cost of tracing (full-vocab
entropy and log-probability per token, per-row stop checks). Repeats alternate the two
and keep the best of each, since this machine is shared and noisy.

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
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens, do_sample=False,
                                 pad_token_id=backend.pad_id, eos_token_id=sorted(backend.eos_ids))
        gen = out[:, L:].tolist()
        res = []
        for row in gen:  # cut each row after its first EOS, as the traced loop does
            cut = next((i + 1 for i, t in enumerate(row) if t in backend.eos_ids), len(row))
            res.append(row[:cut])
        return sum(map(len, res)), res

    traced(), plain()  # warm-up
    best = {"traced": float("inf"), "plain": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("traced", traced)):
            t0 = time.perf_counter()
            n_tok, toks = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            if name == "plain":
                plain_toks = toks
            else:
                traced_toks = toks
    same = sum(a == b for a, b in zip(plain_toks, traced_toks))
    print(f"model={args.model} batch={args.batch} new_tokens<={args.tokens} threads={torch.get_num_threads()}")
    print(f"{'':<8}{'best s':>10}{'tok/s':>10}")
    for name in ("plain", "traced"):
        print(f"{name:<8}{best[name]:>10.3f}{n_tok / best[name]:>10.1f}")
    print(f"identical greedy outputs: {same}/{len(prompts)}")
    print(f"tracing overhead (traced time / plain time): {best['traced'] / best['plain']:.3f}")


if __name__ == "__main__":
    main()
