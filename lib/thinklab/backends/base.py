"""The one interface every generation backend implements.

A backend turns token-id prompts into traced continuations. It knows nothing about
tasks, grading, budgets or the run store: budget forcing is built on top of it from
plain `generate` calls (see `thinklab.generation`), so every backend gets it for free.

Contract of `generate` (each backend's tests check it):
- one `Completion` per prompt, in order; each prompt is one sample with its own seed;
- `token_ids`, `token_entropy`, `token_logprob` have equal length (the generated tokens,
  including a matched stop string's tokens and the EOS token if one was produced);
- `token_entropy[i]` is the entropy (nats) of the distribution token i was drawn from,
  `token_logprob[i]` the log-probability of token i under it. Which distribution that
  is (after temperature/top-k/top-p, or the raw one at temperature 0) is the backend's
  `entropy_mode`, recorded in run.json;
- `finish_reason` is "stop" (EOS or a stop string) or "length" (`max_new_tokens` hit);
  `stop_string` names the stop string that ended it, if any.

`serve` is the same contract for a stream of calls: each `Request` is one call of one
sample, and its `then` callback may return the sample's next call (budget forcing's
answer call, a "Wait" extension). The default runs them in rounds of `generate` calls;
a backend that can admit calls while others decode (the transformers backend's
scheduler) overrides it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Optional, Sequence

from thinklab.config import ModelSpec, SamplingSpec


@dataclass
class Completion:
    token_ids: list[int]
    token_entropy: list[float]
    token_logprob: list[float]
    finish_reason: str  # "stop" | "length"
    stop_string: str | None = None


@dataclass(eq=False)
class Request:
    """One backend call of one sample, for `Backend.serve`."""

    prompt: list[int]
    seed: int
    sampling: SamplingSpec
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    # Called with the completion; returns the sample's next call, or None when it is done.
    then: Optional[Callable[[Completion], Optional["Request"]]] = None
    order: int = 0  # lower runs first where a backend has to choose (earlier chunks finish first)
    tag: Hashable = None  # passed back to `serve`'s on_tokens (e.g. which run the sample belongs to)


@dataclass
class BackendInfo:
    """What run.json records about how tokens were generated and traced."""

    backend: str
    entropy_mode: str  # e.g. "exact" or "top-20"
    entropy_distribution: str  # which distribution the entropy and logprob describe
    extra: dict = field(default_factory=dict)


class Backend(ABC):
    """Load once per model spec; call `generate` once per condition."""

    name: str = "base"

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    @property
    @abstractmethod
    def tokenizer(self):
        """The Hugging Face tokenizer of the loaded model (chat template included)."""

    @property
    @abstractmethod
    def info(self) -> BackendInfo: ...

    @property
    @abstractmethod
    def identity(self) -> dict:
        """What a run id cannot cover but decides the numbers, as resolved at load: `model`
        (canonical name), `fingerprint` (of the weights), `dtype` and `forward` (which code
        computes the logits). run.json keeps it, and a resume under a different one refuses."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        sampling: SamplingSpec,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        progress: bool = True,
    ) -> list[Completion]:
        """Continue each token-id prompt once, with its own seed.

        `sampling.n` and `sampling.max_tokens` are ignored here: the caller expands
        samples into prompts and passes the token cap explicitly.
        """

    serve_window: int = 256  # calls the default `serve` sends to `generate` at most at once

    def serve(self, requests: Iterable[Request], on_tokens: Callable[[Hashable, int], None] | None = None,
              progress: bool = False) -> None:
        """Run every request and every follow-up its `then` returns; `on_tokens(tag, n)` is
        told how many tokens each request generated.

        This default runs waves of at most `serve_window` pending calls, lowest `order`
        first (follow-ups keep their sample's order, so they go in the next wave): the
        calls of a wave with the same sampling spec, token cap and stop strings go in one
        `generate` call. Callbacks run as each wave ends, so early samples finish early.
        """
        pending = sorted(requests, key=lambda r: r.order)
        while pending:
            wave, pending = pending[: self.serve_window], pending[self.serve_window :]
            groups: dict[tuple, list[Request]] = {}
            for r in wave:
                groups.setdefault((r.sampling, r.max_new_tokens, tuple(r.stop)), []).append(r)
            follow_ups = []
            for (sampling, max_new_tokens, stop), group in groups.items():
                outs = self.generate([r.prompt for r in group], [r.seed for r in group], sampling, max_new_tokens,
                                     stop=stop, progress=progress)
                for r, out in zip(group, outs):
                    if on_tokens is not None:
                        on_tokens(r.tag, len(out.token_ids))
                    follow = r.then(out) if r.then is not None else None
                    if follow is not None:
                        follow_ups.append(follow)
            pending = sorted(follow_ups + pending, key=lambda r: r.order)

    # What the scheduler did in the last `serve` (rows, occupancy, prefills, ...), for
    # run.json; None where the backend has no scheduler of its own.
    last_serve_stats: dict | None = None

    # Whether `set_moe_top_k` can change the number of experts each token is routed to
    # without reloading the weights.
    moe_top_k_settable: bool = False

    def set_moe_top_k(self, k: int | None) -> None:
        """Route each token to k experts (None: the checkpoint's own number)."""
        raise NotImplementedError(f"the {self.name} backend cannot change the number of active experts of a loaded "
                                  "model; load it with ModelSpec(moe_top_k=k) instead")

    def routing_columns(self, prompts: Sequence[Sequence[int]], traces: Sequence, n_thinking: Sequence[int]) -> list[dict] | None:
        """The router columns of the sample table (`expert_load`, `router_entropy_thinking`,
        `router_entropy_answer`) for each sample (its prompt ids, its trace, its thinking
        tokens), or None where the backend records no routing (dense models, servers)."""
        return None

    def close(self) -> None:
        """Release the model (GPU memory, engine processes)."""
