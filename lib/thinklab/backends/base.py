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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from thinklab.config import ModelSpec, SamplingSpec


@dataclass
class Completion:
    token_ids: list[int]
    token_entropy: list[float]
    token_logprob: list[float]
    finish_reason: str  # "stop" | "length"
    stop_string: str | None = None


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

    def close(self) -> None:
        """Release the model (GPU memory, engine processes)."""
