"""The forwards the transformers backend can run, behind one interface chosen at load.

A `Forward` is how a loaded model turns token ids into next-token logits, how the token is
chosen and traced from them, and how a set of calls is batched:

  - `LeanForward`: CPU float32 llama/qwen2 checkpoints through `lean.LeanDecoder` (thinklab's
    own decode loop, with the native kernels of `native/` where the CPU has AVX-512F, else
    oneDNN GEMMs with the AVX2 variants of the native decode attention and token choice, or
    oneDNN, SDPA and torch operations), served by the row scheduler (`scheduler.RowScheduler`): each sample in
    its own cache slot, refilled as rows finish.
  - `TransformersForward`: transformers' own modules (any architecture, GPUs, MoE routing
    hooks, quantization kernels), float32 CPU linears prepacked for oneDNN where they can be;
    fixed left-padded batches.

`select` picks one from the model and `ModelSpec.forward` ("auto" | "lean" | "transformers").
The forward's `name` and `layout` go into a run's identity: they name where the arithmetic
differs, so runs that round differently are never mixed. The backend asks the forward, and
never looks at which one it holds; the package runs, more slowly, without a compiler or
AVX-512 (the lean forward then runs on oneDNN).
"""

from __future__ import annotations

import torch

from thinklab.backends import lean
from thinklab.backends.sampling import choose_tokens
from thinklab.config import SamplingSpec


class Forward:
    name: str  # what ran, recorded in run.json and the run's identity
    layout: str  # "rows" (one cache slot per sample, the scheduler) or "fixed-batch"

    def describe(self) -> str:
        raise NotImplementedError

    def choose(self, logits: torch.Tensor, sampling: SamplingSpec, u: torch.Tensor | None):
        """(token, logprob, entropy) per row of raw logits; see sampling.choose_tokens."""
        return choose_tokens(logits, sampling, u)

    def new_decoder(self, batch: int, capacity: int):
        """A fresh KV cache for `batch` left-padded rows and the function that fills it:
        (ids, positions, attention mask, cache) -> the last position's logits."""
        raise NotImplementedError

    def scheduler(self, tokenizer, eos_ids: set[int], pad_id: int, rows: int, memory_bytes: int | None):
        """A row scheduler that serves calls on this forward, or None where calls run in fixed batches."""
        return None


class LeanForward(Forward):
    layout = "rows"

    def __init__(self, decoder: lean.LeanDecoder):
        self.decoder = decoder
        if decoder.native is None:
            # oneDNN GEMMs; decode attention and token choice native (their AVX2 variants) or torch's
            native = [part for part, on in (("attention", decoder.native_attention),
                                            ("sampling", decoder.sampler is not None)) if on]
            self.name = "lean-onednn" + ("-native-" + "-".join(native) if native else "")
        else:
            self.name = "lean-native" if decoder.native_attention else "lean-native-sdpa"
        if decoder.bf16:
            self.name += "-bf16"

    def describe(self) -> str:
        return self.decoder.describe()

    def choose(self, logits, sampling, u):
        return choose_tokens(logits, sampling, u, self.decoder.sampler)

    def new_decoder(self, batch, capacity):
        return self.decoder.new_cache(batch, capacity), self.decoder.forward

    def scheduler(self, tokenizer, eos_ids, pad_id, rows, memory_bytes):
        from thinklab.backends.scheduler import RowScheduler

        return RowScheduler(self.decoder, self.choose, tokenizer, eos_ids, pad_id, rows=rows, memory_bytes=memory_bytes)


class TransformersForward(Forward):
    layout = "fixed-batch"

    def __init__(self, model: torch.nn.Module, packed_linears: int = 0):
        self.model, self.packed_linears = model, packed_linears
        self.name = "transformers-packed" if packed_linears else "transformers"

    def describe(self) -> str:
        return "transformers' modules" + (f", {self.packed_linears} linears prepacked for oneDNN"
                                          if self.packed_linears else "")

    def new_decoder(self, batch, capacity):
        from transformers import DynamicCache

        def forward(ids, positions, attention, cache):
            out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1, :]

        return DynamicCache(), forward


def select(model: torch.nn.Module, requested: str, device: torch.device, batch_hint: int,
           model_name: str, kernel_quantization: bool = False) -> Forward:
    """The forward `requested` ("auto": lean where it can run; "lean": lean or an error
    saying why not; "transformers": transformers' modules as they are). `kernel_quantization`:
    the weights are a quantization library's kernels, which must not be repacked.

    A bfloat16 model on the CPU runs lean with bf16 GEMMs (`LeanDecoder`'s `bf16`): its
    parameters are converted to float32 (the same values) for the rest of the forward.
    Where lean cannot run it, it stays bfloat16 in transformers' modules."""
    if requested == "transformers":
        return TransformersForward(model)
    bf16 = device.type == "cpu" and next(model.parameters()).dtype == torch.bfloat16 and not kernel_quantization
    reason = lean.LeanDecoder.unsupported(model.float() if bf16 else model)
    if reason is None:
        return LeanForward(lean.LeanDecoder(model, batch_hint=batch_hint, bf16=bf16))
    if bf16:
        model.to(torch.bfloat16)
    if requested == "lean":
        raise ValueError(f"forward='lean' cannot run {model_name}: {reason}; use forward='auto' or forward='transformers'")
    packed = lean.pack_linears(model, batch_hint=batch_hint) if device.type == "cpu" and not kernel_quantization else 0
    return TransformersForward(model, packed)

