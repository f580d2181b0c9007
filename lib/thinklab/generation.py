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
With no budget and no extensions this is exactly one call.

Each sample runs this as its own stage machine: every call is a `Request` whose callback
returns the next one, so a backend that schedules rows (the transformers backend) runs a
sample's next call as soon as its last one ends, while others decode; the default
`Backend.serve` runs the calls of all samples in rounds. The k-th call of a sample draws
from `call_seed(seed, k)`. This module knows nothing about tasks, grading or storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

from thinklab.backends.base import Backend, Completion, Request
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


class _Sample:
    """One sample's stage machine: each method that ends a stage returns the sample's next
    backend call (a `Request` whose `then` continues the machine) or None when it is done."""

    def __init__(self, index: int, prompt: Sequence[int], seed: int, sampling: SamplingSpec, budget: BudgetSpec,
                 plan: "_Plan", on_done: Callable[[int, Trace], None], order: int, tag: Hashable):
        self.index, self.prompt, self.seed, self.sampling, self.budget = index, list(prompt), seed, sampling, budget
        self.plan, self.on_done, self.order, self.tag = plan, on_done, order, tag
        self.trace = Trace()
        self.calls = 0

    def _call(self, limit: int, stop: Sequence[str], then: Callable) -> Request:
        req = Request(self.prompt + self.trace.token_ids, call_seed(self.seed, self.calls), self.sampling, limit,
                      tuple(stop), then=then, order=self.order, tag=self.tag)
        self.calls += 1
        return req

    def _done(self) -> None:
        self.on_done(self.index, self.trace)
        return None

    def start(self) -> Request:
        if self.plan.plain:
            return self._call(self.sampling.max_tokens, (), self._after_plain)
        return self._think()

    def _after_plain(self, o: Completion) -> None:
        self.trace.extend_sampled(o.token_ids, o.token_entropy, o.token_logprob)
        self.trace.finish_reason = o.finish_reason
        return self._done()

    def _think(self) -> Request | None:
        t, cap = self.trace, self.plan.cap
        limit = min(cap - len(t.token_ids), self.sampling.max_tokens - len(t.token_ids))
        if limit <= 0:
            return self._after_think(None)
        return self._call(limit, self.plan.end_strings, self._after_think)

    def _after_think(self, o: Completion | None) -> Request | None:
        t, budget, cap = self.trace, self.budget, self.plan.cap
        if o is not None:
            t.extend_sampled(o.token_ids, o.token_entropy, o.token_logprob)
        if o is not None and o.finish_reason == "stop" and o.stop_string is not None:
            if t.wait_extensions < budget.wait_extensions and len(t.token_ids) < cap:
                n_drop = _drop_stop(self.plan.tokenizer, t.token_ids, o.stop_string)
                for lst in (t.token_ids, t.token_entropy, t.token_logprob):
                    del lst[len(lst) - n_drop :]
                t.extend_forced(self.plan.wait_ids)
                t.wait_extensions += 1
                return self._think()
            return self._answer(self.sampling.max_tokens - len(t.token_ids))
        if o is not None and o.finish_reason == "stop":  # EOS inside thinking
            t.finish_reason = "stop"
        elif len(t.token_ids) >= cap and budget.thinking_budget is not None:
            t.n_thinking_tokens = len(t.token_ids)
            t.extend_forced(self.plan.forced_ids)
            t.forced = True
            t.finish_reason = "budget"
            return self._answer(budget.answer_budget)
        else:
            t.finish_reason = "length"
        return self._done()

    def _answer(self, limit: int) -> Request | None:
        if limit <= 0:
            if not self.trace.forced:
                self.trace.finish_reason = "length"
            return self._done()
        return self._call(limit, (), self._after_answer)

    def _after_answer(self, o: Completion) -> None:
        self.trace.extend_sampled(o.token_ids, o.token_entropy, o.token_logprob)
        if not self.trace.forced:
            self.trace.finish_reason = o.finish_reason
        return self._done()


@dataclass(frozen=True)
class _Plan:
    """What every sample of one condition shares."""

    tokenizer: object
    plain: bool
    end_strings: tuple[str, ...] = ()
    forced_ids: tuple[int, ...] = ()
    wait_ids: tuple[int, ...] = ()
    cap: int = 0


def _plan(tokenizer, sampling: SamplingSpec, budget: BudgetSpec, markers: PhaseMarkers) -> _Plan:
    if budget.thinking_budget is None and budget.wait_extensions == 0:
        return _Plan(tokenizer, plain=True)
    end_strings = (markers.think_end,) if markers.has_think_tags else tuple(markers.answer_markers)
    forced_end = (markers.think_end or "") + (budget.answer_cue if budget.answer_cue is not None else DEFAULT_ANSWER_CUE)
    return _Plan(
        tokenizer, plain=False, end_strings=end_strings,
        forced_ids=tuple(tokenizer(forced_end, add_special_tokens=False)["input_ids"]),
        wait_ids=tuple(tokenizer(budget.wait_string, add_special_tokens=False)["input_ids"]),
        cap=budget.thinking_budget if budget.thinking_budget is not None else sampling.max_tokens,
    )


def trace_requests(
    tokenizer,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    sampling: SamplingSpec,
    budget: BudgetSpec,
    markers: PhaseMarkers,
    on_done: Callable[[int, Trace], None],
    order: Sequence[int] | None = None,
    tag: Hashable = None,
) -> list[Request]:
    """The first backend call of each sample; pass them to `Backend.serve`. Follow-up calls
    come from their callbacks, and `on_done(i, trace)` is called once sample i is complete.

    The k-th call of a sample (k = 0, 1, ...) draws from `call_seed(seed, k)`, so a sample's
    tokens depend on its own seed and history only, not on the other samples of the call."""
    plan = _plan(tokenizer, sampling, budget, markers)
    order = list(order) if order is not None else list(range(len(prompts)))
    return [_Sample(i, p, s, sampling, budget, plan, on_done, o, tag).start()
            for i, (p, s, o) in enumerate(zip(prompts, seeds, order))]


def generate_traces(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    sampling: SamplingSpec,
    budget: BudgetSpec,
    markers: PhaseMarkers,
    progress: bool = True,
) -> list[Trace]:
    """The traces of these samples, in order (see the module docstring for the stages)."""
    traces: list[Trace | None] = [None] * len(prompts)

    def done(i: int, trace: Trace) -> None:
        traces[i] = trace

    backend.serve(trace_requests(backend.tokenizer, prompts, seeds, sampling, budget, markers, done), progress=progress)
    return traces  # type: ignore[return-value]
