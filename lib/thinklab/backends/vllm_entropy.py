"""Exact token entropy inside vLLM's V1 sampler, two floats per generated token.

vLLM returns log-probabilities, not entropies, and the full-vocabulary route
(`logprobs=-1`) copies V floats per token into Python objects. Instead, `install` gives
the V1 model runner an `EntropySampler`; the engine is built with
`worker_extension_cls=WORKER_EXTENSION` and `LLM.collective_rpc("install_entropy_sampler")`
runs it in every worker process (by name, so nothing is pickled across processes): vLLM's own `Sampler`, unchanged in how it samples, which also takes
the (B, V) log-probabilities vLLM already computed for the distribution each token is
drawn from (`logprobs_mode="processed_logprobs"`: after temperature, top-k and top-p; the
raw softmax at temperature 0) and reduces each row to its entropy.

The entropy travels back in the one log-probability slot a request with `logprobs=1`
has besides the chosen token's own: per position vLLM returns [chosen, top-1], and the
top-1 value is replaced by the entropy (its token id and rank are left as vLLM set them,
so detokenizing still works). So with this sampler installed, requests must ask for
`logprobs=1` and read position slot 1 as the entropy; `ENTROPY_SLOT_LOGPROBS` says so.
The engine is thinklab's own (one per `ModelSpec`), so no other caller sees the slot.

This module imports vllm at import time: only the vLLM backend imports it, lazily.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.sampler import Sampler

ENTROPY_SLOT_LOGPROBS = 1  # SamplingParams.logprobs for every request of an entropy engine
WORKER_EXTENSION = "thinklab.backends.vllm_entropy.EntropyWorkerExtension"  # vLLM's worker_extension_cls


def row_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of log-probabilities (B, V) -> (B,) float32; masked
    tokens (-inf) count 0. Products in float32, the sum over V in float64."""
    p = logprobs.exp()
    plogp = torch.where(p > 0, p * logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))
    return (-plogp.sum(dim=-1, dtype=torch.float64)).clamp_min(0).to(torch.float32) + 0.0  # no -0.0


class EntropySampler(Sampler):
    """vLLM's V1 `Sampler`, which also writes each row's entropy into its top-1 log-probability slot."""

    _entropy: torch.Tensor | None = None

    def sample(self, logits, sampling_metadata, logprobs_mode_override=None):
        sampled, processed_logprobs = super().sample(logits, sampling_metadata, logprobs_mode_override)
        self._entropy = None if processed_logprobs is None else row_entropy(processed_logprobs)
        return sampled, processed_logprobs

    def forward(self, logits, sampling_metadata, predict_bonus_token=False, logprobs_mode_override=None):
        self._entropy = None
        out = super().forward(logits, sampling_metadata, predict_bonus_token, logprobs_mode_override)
        lt = out.logprobs_tensors
        if self._entropy is not None and lt is not None and lt.logprobs.dim() == 2:
            if lt.logprobs.shape[1] != ENTROPY_SLOT_LOGPROBS + 1:
                raise RuntimeError(
                    f"the entropy sampler needs every request to ask for logprobs={ENTROPY_SLOT_LOGPROBS}; "
                    f"this step returned {lt.logprobs.shape[1] - 1} per position"
                )
            lt.logprobs[:, ENTROPY_SLOT_LOGPROBS] = self._entropy.to(lt.logprobs.device)
        self._entropy = None
        return out


def install(worker) -> str:
    """Give this worker's model runner an `EntropySampler` (for `LLM.collective_rpc`);
    returns the runner's class name. Refuses a runner without vLLM's V1 sampler (Model
    Runner V2 samples elsewhere) and speculative decoding (its rejection sampler keeps
    the old sampler)."""
    runner = worker.model_runner
    sampler = getattr(runner, "sampler", None)
    if not isinstance(sampler, Sampler):
        raise RuntimeError(
            f"exact entropy needs vLLM's V1 model runner, whose sampler is vllm.v1.sample.sampler.Sampler; "
            f"{type(runner).__name__} has {type(sampler).__name__}. Set VLLM_USE_V2_MODEL_RUNNER=0, or use "
            "ModelSpec(entropy_top_k=20)"
        )
    if getattr(runner, "speculative_config", None) is not None:
        raise RuntimeError("exact entropy does not support speculative decoding; use ModelSpec(entropy_top_k=20)")
    if sampler.logprobs_mode != "processed_logprobs":
        raise RuntimeError(f"exact entropy needs logprobs_mode='processed_logprobs', not {sampler.logprobs_mode!r}")
    if not isinstance(sampler, EntropySampler):
        runner.sampler = EntropySampler(logprobs_mode=sampler.logprobs_mode, use_fp64_gumbel=sampler.use_fp64_gumbel)
    return type(runner).__name__


class EntropyWorkerExtension:
    """Mixed into vLLM's worker class by `worker_extension_cls`; adds the one RPC method."""

    def install_entropy_sampler(self) -> str:
        return install(self)


__all__ = ["ENTROPY_SLOT_LOGPROBS", "WORKER_EXTENSION", "EntropySampler", "EntropyWorkerExtension", "install",
           "row_entropy"]
