"""Budget forcing and thinking extensions, built from plain backend calls.

Every backend gets these for free: a capped or extended trace is a few `generate` calls
whose prompts are the original prompt plus what was generated so far (so the prompt's
KV cache / prefix cache is reused).

  thinking stage: generate up to the remaining thinking budget, stopping at the end of
    thinking (`</think>`, or the answer markers for models without think tags).
    - stopped at the end with extensions left: drop the end marker, append "Wait", repeat;
    - ran into the budget: append the forced end + answer cue, go to the answer stage with
      `answer_budget` tokens (finish_reason "budget");
    - stopped at the end with no extensions left: go to the answer stage with what is left
      of `max_tokens`;
    - EOS, or `max_tokens` spent: done.
  answer stage: one more call, no stop strings.

Forced tokens (cues, "Wait") were not sampled: their entropy and log-probability are NaN.
With no budget and no extensions this is exactly one call. This module knows nothing
about tasks, grading or storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from thinklab.backends.base import Backend
from thinklab.config import BudgetSpec, SamplingSpec
from thinklab.tracing import PhaseMarkers

DEFAULT_ANSWER_CUE = "\n\nFinal answer: \\boxed{"


@dataclass
class Trace:
    token_ids: list[int] = field(default_factory=list)
    token_entropy: list[float] = field(default_factory=list)
    token_logprob: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    n_thinking_tokens: int | None = None  # known exactly when the stage machine ended thinking
    wait_extensions: int = 0
    forced: bool = False  # an answer cue was forced after the budget

    def extend_sampled(self, ids, ents, lps) -> None:
        self.token_ids += list(ids)
        self.token_entropy += list(ents)
        self.token_logprob += list(lps)

    def extend_forced(self, ids: Sequence[int]) -> None:
        self.token_ids += list(ids)
        self.token_entropy += [math.nan] * len(ids)
        self.token_logprob += [math.nan] * len(ids)


def call_seed(seed: int, call: int) -> int:
    """A different stream for each call of the same sample, fixed by (seed, call)."""
    return (seed + call * 0x9E3779B97F4A7C15) & ((1 << 63) - 1)


def _drop_stop(tokenizer, ids: list[int], stop: str) -> int:
    """How many trailing tokens to drop so that the decoded text no longer holds `stop`."""
    k = len(ids)
    while k > 0 and stop in tokenizer.decode(ids[max(0, k - 64) : k], skip_special_tokens=False):
        k -= 1
    return len(ids) - k


def generate_traces(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    sampling: SamplingSpec,
    budget: BudgetSpec,
    markers: PhaseMarkers,
    progress: bool = True,
) -> list[Trace]:
    tok = backend.tokenizer
    traces = [Trace() for _ in prompts]
    plain = budget.thinking_budget is None and budget.wait_extensions == 0
    if plain:
        outs = backend.generate(prompts, [call_seed(s, 0) for s in seeds], sampling, sampling.max_tokens, progress=progress)
        for t, o in zip(traces, outs):
            t.extend_sampled(o.token_ids, o.token_entropy, o.token_logprob)
            t.finish_reason = o.finish_reason
        return traces

    end_strings = [markers.think_end] if markers.has_think_tags else list(markers.answer_markers)
    forced_end = (markers.think_end or "") + (budget.answer_cue if budget.answer_cue is not None else DEFAULT_ANSWER_CUE)
    forced_ids = tok(forced_end, add_special_tokens=False)["input_ids"]
    wait_ids = tok(budget.wait_string, add_special_tokens=False)["input_ids"]
    cap = budget.thinking_budget if budget.thinking_budget is not None else sampling.max_tokens

    thinking = list(range(len(prompts)))  # samples still in the thinking stage
    answer_limit: dict[int, int] = {}  # sample -> tokens allowed in its answer stage
    call = 0
    while thinking:
        limits = {i: min(cap - len(traces[i].token_ids), sampling.max_tokens - len(traces[i].token_ids)) for i in thinking}
        # Samples with the same limit go in one call: one batched call per distinct limit.
        next_thinking = []
        for limit in sorted(set(limits.values())):
            group = [i for i in thinking if limits[i] == limit]
            if limit <= 0:
                outs = [None] * len(group)
            else:
                outs = backend.generate(
                    [list(prompts[i]) + traces[i].token_ids for i in group],
                    [call_seed(seeds[i], call) for i in group],
                    sampling, limit, stop=end_strings, progress=progress,
                )
            for i, o in zip(group, outs):
                t = traces[i]
                if o is not None:
                    t.extend_sampled(o.token_ids, o.token_entropy, o.token_logprob)
                if o is not None and o.finish_reason == "stop" and o.stop_string is not None:
                    if t.wait_extensions < budget.wait_extensions and len(t.token_ids) < cap:
                        n_drop = _drop_stop(tok, t.token_ids, o.stop_string)
                        for lst in (t.token_ids, t.token_entropy, t.token_logprob):
                            del lst[len(lst) - n_drop :]
                        t.extend_forced(wait_ids)
                        t.wait_extensions += 1
                        next_thinking.append(i)
                    else:
                        answer_limit[i] = sampling.max_tokens - len(t.token_ids)
                elif o is not None and o.finish_reason == "stop":  # EOS inside thinking
                    t.finish_reason = "stop"
                elif len(t.token_ids) >= cap and budget.thinking_budget is not None:
                    t.n_thinking_tokens = len(t.token_ids)
                    t.extend_forced(forced_ids)
                    t.forced = True
                    t.finish_reason = "budget"
                    answer_limit[i] = budget.answer_budget
                else:
                    t.finish_reason = "length"
        thinking = next_thinking
        call += 1

    answering = [i for i, lim in answer_limit.items() if lim > 0]
    for limit in sorted({answer_limit[i] for i in answering}):
        group = [i for i in answering if answer_limit[i] == limit]
        outs = backend.generate(
            [list(prompts[i]) + traces[i].token_ids for i in group],
            [call_seed(seeds[i], call) for i in group],
            sampling, limit, progress=progress,
        )
        for i, o in zip(group, outs):
            t = traces[i]
            t.extend_sampled(o.token_ids, o.token_entropy, o.token_logprob)
            if not t.forced:
                t.finish_reason = o.finish_reason
    for i, lim in answer_limit.items():
        if lim <= 0 and not traces[i].forced:
            traces[i].finish_reason = "length"
    return traces
