"""The transformers backend: a batched decode loop that traces every token.

Why our own loop rather than `model.generate`: tracing needs the exact distribution each
token was drawn from, per-sample random streams that do not depend on batch layout, and
stop strings per row; doing it in the loop keeps O(1) floats per token and never holds
full logits beyond the current step.

Per step, for a batch of B rows and a vocabulary of V:
  logits (B, V) -> temperature, top-k, top-p -> log-probabilities (B, V)
  token  = inverse CDF of exp(logp) at the row's next uniform, drawn from its own
           torch.Generator                                                  (exact sampling)
  entropy = -sum p log p over the processed distribution, logprob = logp[token]
At temperature 0 the token is the argmax and entropy/logprob describe the raw (T=1)
distribution, since the sampled one is a point mass.

This module knows nothing about tasks, prompts' meaning, budgets or storage.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import torch

from thinklab import models
from thinklab.backends import lean
from thinklab.backends.base import Backend, BackendInfo, Completion
from thinklab.config import ModelSpec, SamplingSpec


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 is far slower than fp32 without native support (AVX2 CPUs), so CPUs get fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def process_logits(logits: torch.Tensor, sampling: SamplingSpec) -> torch.Tensor:
    """Log-probabilities of the distribution tokens are drawn from. (B, V) float32 -> (B, V)."""
    return torch.log_softmax(sampling_logits(logits, sampling), dim=-1)


def sampling_logits(logits: torch.Tensor, sampling: SamplingSpec) -> torch.Tensor:
    """The logits whose softmax tokens are drawn from: divided by the temperature (none at
    temperature 0, where the argmax is taken), top-k and top-p masked to -inf."""
    x = logits.float()
    if sampling.temperature == 0:
        return x
    if sampling.temperature != 1:
        x = x / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < x.shape[-1]:
        kth = torch.topk(x, sampling.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if sampling.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= sampling.top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, -math.inf)
    return x


def sample_inverse_cdf(p: torch.Tensor, u: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """One token per row of probabilities p (b, V) from uniforms u (b,) in [0, 1): the first
    token whose cumulative mass exceeds u times the row's total mass.

    Cumulative sums are float64 (a float32 running sum over 150k tokens drifts by ~1e-5,
    which would misweight rare tokens). To keep that cheap the search is two-level: float64
    totals of blocks of `block` tokens locate the block, then a float64 cumulative sum
    inside that one block locates the token. Tokens of zero probability have empty
    intervals and are never drawn."""
    b, V = p.shape
    pad = (-V) % block
    blocks = (torch.nn.functional.pad(p, (0, pad)) if pad else p).view(b, -1, block)
    block_cdf = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # (b, blocks)
    total = block_cdf[:, -1:].contiguous()
    x = u[:, None].to(torch.float64) * total
    # First block whose cumulative mass exceeds x; never past the last block with any mass.
    bi = torch.minimum(torch.searchsorted(block_cdf, x, right=True), torch.searchsorted(block_cdf, total))
    before = torch.where(bi > 0, block_cdf.gather(-1, (bi - 1).clamp_min(0)), torch.zeros_like(x))
    inner = blocks[torch.arange(b, device=p.device), bi.squeeze(-1)].to(torch.float64).cumsum(dim=-1) + before
    ti = torch.searchsorted(inner, x, right=True)
    ti = torch.minimum(ti, torch.searchsorted(inner, inner[:, -1:].contiguous()))  # rounding guard
    return (bi * block + ti).squeeze(-1)


def entropy_from_logp(logp: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy in nats of each row of log-probabilities (p = exp(logp) if already computed);
    masked (-inf) entries count 0."""
    p = logp.exp() if p is None else p
    return -(p * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(dim=-1)


class HFBackend(Backend):
    name = "hf"

    def __init__(self, spec: ModelSpec, device: str | None = None, max_batch_size: int = 16):
        super().__init__(spec)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from thinklab.models import moefy

        moefy.register()  # so that from_pretrained can load an offline MoE's directory
        self.device = torch.device(device) if device else pick_device()
        if spec.quantization:
            from thinklab.models import quantization

            quantization.check(spec.quantization, self.device)  # refuse before loading any weights
        self.resolved = models.resolve(spec.name)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.max_batch_size = max_batch_size
        kw = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        self._tokenizer = AutoTokenizer.from_pretrained(self.resolved.path, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(self.resolved.path, dtype=self.dtype, **kw)
        self.model.to(self.device).eval()
        self.quantization_report: dict = {}
        if spec.quantization:
            from thinklab.models import quantization

            self.model, self.quantization_report = quantization.apply(self.model, spec.quantization, self.device)
        self.lean: lean.LeanDecoder | None = None
        self.packed_linears = 0
        self.forward_name = self._select_forward(spec.forward)
        self._native_top_k: dict | None = None
        if spec.moe_top_k is not None:
            self.set_moe_top_k(spec.moe_top_k)
        self.eos_ids = self._eos_ids()
        self.pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else min(self.eos_ids)

    def _select_forward(self, requested: str) -> str:
        """Set up the forward `requested` ("auto" | "lean" | "transformers"); return the name of
        the one that runs: "lean-native" or "lean-onednn" (backends/lean.py with thinklab's own
        kernels or oneDNN's; "lean-native-sdpa" where the native attention kernel does not fit
        the head size), "transformers-packed" (transformers' modules, float32 CPU linears
        prepacked for oneDNN) or "transformers" (transformers' modules as they are). The names
        differ where the arithmetic does, so run.json can tell runs apart that round differently."""
        if requested == "transformers":
            return "transformers"
        reason = lean.LeanDecoder.unsupported(self.model)
        if reason is None:
            self.lean = lean.LeanDecoder(self.model, batch_hint=self.max_batch_size)
            if self.lean.native is None:
                return "lean-onednn"
            return "lean-native" if self.lean.native_attention else "lean-native-sdpa"
        if requested == "lean":
            raise ValueError(f"forward='lean' cannot run {self.resolved.name}: {reason}; "
                             "use forward='auto' or forward='transformers'")
        if self.device.type == "cpu" and not self.quantization_report.get("form") == "kernel":
            self.packed_linears = lean.pack_linears(self.model, batch_hint=self.max_batch_size)
        return "transformers-packed" if self.packed_linears else "transformers"

    def set_moe_top_k(self, k: int | None) -> None:
        """Route each token to k experts (None: the checkpoint's own number); refuses dense models."""
        from thinklab.models import router

        if k is None:
            if self._native_top_k is not None:
                router.restore_top_k(self.model, self._native_top_k)
                self._native_top_k = None
        else:
            previous = router.set_top_k(self.model, k)
            if self._native_top_k is None:
                self._native_top_k = previous
        self.spec = dataclasses.replace(self.spec, moe_top_k=k)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self._tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        if not ids:
            raise ValueError(f"model {self.resolved.path} declares no EOS token; cannot tell when a sample ends")
        return ids

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def identity(self) -> dict:
        return {"model": self.resolved.name, "fingerprint": self.resolved.fingerprint,
                "dtype": str(self.dtype).removeprefix("torch."), "forward": self.forward_name}

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            backend=self.name,
            entropy_mode="exact",
            entropy_distribution=(
                "the distribution each token was sampled from: softmax(logits / temperature) after top-k and "
                "top-p masking, over the full vocabulary; at temperature 0, the raw softmax(logits)"
            ),
            extra={
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "max_batch_size": self.max_batch_size,
                "forward": self.forward_name,
                "forward_detail": (self.lean.describe() if self.lean is not None else
                                   "transformers' modules" + (f", {self.packed_linears} linears prepacked for oneDNN"
                                                              if self.packed_linears else "")),
                "rng": ("one torch.Generator per sample seeded with its seed draws one float64 uniform per token, "
                        "all up front; the token is the inverse CDF (float64 cumulative sum) of the processed distribution"),
                **({"quantization": self.quantization_report} if self.quantization_report else {}),
            },
        )

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        sampling: SamplingSpec,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        progress: bool = True,
    ) -> list[Completion]:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        from tqdm.auto import tqdm

        results: list[Completion | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=f"generate ({self.name})", unit="sample", disable=not progress)
        for start in range(0, len(prompts), self.max_batch_size):
            idx = list(range(start, min(start + self.max_batch_size, len(prompts))))
            t0 = time.perf_counter()
            batch = self._generate_batch([list(prompts[i]) for i in idx], [seeds[i] for i in idx], sampling, max_new_tokens, stop)
            n_tok = sum(len(c.token_ids) for c in batch)
            for i, c in zip(idx, batch):
                results[i] = c
            bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.1f}")
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]

    def _generate_batch(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: SamplingSpec,
        max_new_tokens: int,
        stop: Sequence[str],
    ) -> list[Completion]:
        dev = self.device
        B = len(prompts)
        L = max(len(p) for p in prompts)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention = torch.zeros((B, L), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding
            input_ids[r, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[r, L - len(p) :] = 1
        input_ids, attention = input_ids.to(dev), attention.to(dev)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        uniforms = None
        if sampling.temperature > 0:
            # Each sample's own stream: one uniform per token, drawn up front, so a sample's
            # tokens do not depend on which other samples share its batch.
            uniforms = torch.stack([
                torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                for s in seeds
            ]).to(dev)

        cache, forward = self._decoder(B, L + max_new_tokens)
        logits = forward(input_ids, positions, attention, cache)
        next_pos = positions[:, -1:] + 1

        tokens = torch.zeros((B, max_new_tokens), dtype=torch.long, device=dev)
        ents = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        lps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        lengths = [0] * B
        finish = ["length"] * B
        stop_hit: list[str | None] = [None] * B
        rows = list(range(B))  # original row of each position in the (shrinking) batch
        rows_t = torch.arange(B, device=dev)
        host_ids: list[list[int]] = [[] for _ in range(B)]
        stop_window = max((len(s) for s in stop), default=0) + 4
        eos = torch.tensor(sorted(self.eos_ids), device=dev)

        native = self.lean.native if self.lean is not None else None
        for step in range(max_new_tokens):
            u = None if uniforms is None else uniforms[rows_t, step]
            if native is not None:  # the same rule fused into one pass per row (native/sampling.cpp)
                tok, lp, ent = native.trace_and_sample(sampling_logits(logits, sampling), u)
            else:
                logp = process_logits(logits, sampling)  # (b, V), b = rows still generating
                p = logp.exp()
                tok = logp.argmax(dim=-1) if u is None else sample_inverse_cdf(p, u)
                ent, lp = entropy_from_logp(logp, p), logp.gather(-1, tok[:, None]).squeeze(-1)
            tokens[rows_t, step] = tok
            ents[rows_t, step] = ent
            lps[rows_t, step] = lp
            is_eos = torch.isin(tok, eos).tolist()  # one host sync per step
            tok_host = tok.tolist()
            keep = []
            for pos, r in enumerate(rows):
                lengths[r] = step + 1
                host_ids[r].append(tok_host[pos])
                if is_eos[pos]:
                    finish[r] = "stop"
                    continue
                if stop:
                    tail = self._tokenizer.decode(host_ids[r][-stop_window:], skip_special_tokens=False)
                    hit = next((s for s in stop if s in tail), None)
                    if hit is not None:
                        finish[r], stop_hit[r] = "stop", hit
                        continue
                keep.append(pos)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(rows):
                # Finished rows leave the batch: the cache, mask and positions shrink with them.
                keep_t = torch.tensor(keep, device=dev)
                cache.batch_select_indices(keep_t)
                attention, next_pos, tok = attention[keep_t], next_pos[keep_t], tok[keep_t]
                rows = [rows[pos] for pos in keep]
                rows_t = torch.tensor(rows, device=dev)
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
            logits = forward(tok[:, None], next_pos, attention, cache)
            next_pos = next_pos + 1

        tokens_h, ents_h, lps_h = tokens.cpu(), ents.cpu(), lps.cpu()
        return [
            Completion(
                token_ids=tokens_h[r, : lengths[r]].tolist(),
                token_entropy=ents_h[r, : lengths[r]].tolist(),
                token_logprob=lps_h[r, : lengths[r]].tolist(),
                finish_reason=finish[r],
                stop_string=stop_hit[r],
            )
            for r in range(B)
        ]

    def _decoder(self, batch: int, capacity: int):
        """A fresh KV cache and the forward that fills it: (ids, positions, mask, cache) -> last logits."""
        if self.lean is not None:
            return self.lean.new_cache(batch, capacity), self.lean.forward
        from transformers import DynamicCache

        def forward(ids, positions, attention, cache):
            out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1, :]

        return DynamicCache(), forward

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
