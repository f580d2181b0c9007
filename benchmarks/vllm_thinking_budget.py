"""What vLLM's own thinking budget does on this build: one prompt, with and without a cap.

    python benchmarks/vllm_thinking_budget.py [--budget 8 --tokens 24]

A probe for wiring `SamplingParams(thinking_token_budget=N)` into the vLLM backend (not
done yet, docs/vllm.md): SmolLM2 has no think tags, so the engine gets
`ReasoningConfig(reasoning_start_str="<think>", reasoning_end_str="</think>")` (each a few
ordinary tokens) and the prompt ends in "<think>\\n". Prints each generated token and its
processed log-probability, so one sees where the cap forces the end tag and what the
forced tokens carry.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config.reasoning import ReasoningConfig
    from vllm.inputs import TokensPrompt

    from thinklab import models

    path = models.resolve(args.model).path
    tok = AutoTokenizer.from_pretrained(path)
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              logprobs_mode="processed_logprobs", max_logprobs=1,
              reasoning_config=ReasoningConfig(reasoning_start_str="<think>", reasoning_end_str="</think>"))
    text = tok.apply_chat_template([{"role": "user", "content": "Is 91 prime? Think."}], add_generation_prompt=True,
                                   tokenize=False) + "<think>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for budget in (None, args.budget):
        params = SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=1, thinking_token_budget=budget,
                                logprobs=1, flat_logprobs=True)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0].outputs[0]
        chosen = [out.logprobs.logprobs[s] for s in out.logprobs.start_indices]
        print(f"thinking_token_budget={budget}: finish_reason={out.finish_reason}, text={out.text!r}")
        print("  " + " ".join(f"{tok.decode([t])!r}:{lp:.3f}" for t, lp in zip(out.token_ids, chosen)))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
