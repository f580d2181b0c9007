"""The transformers backend: a batched decode loop that traces every token.

Why our own loop rather than `model.generate`: tracing needs the exact distribution each
token was drawn from, per-sample random streams that do not depend on batch layout, and
stop strings per row; doing it in the loop keeps O(1) floats per token and never holds
full logits beyond the current step.

Each token is chosen and traced by `sampling.choose_tokens`: the exact entropy and
log-probability of the distribution it was drawn from, from a per-sample random stream.

The forward (forward.py) is chosen at load. Where it schedules rows (the lean forward,
lean.py), calls are served by the row scheduler (scheduler.py): a batch of up to
`max_batch_size` rows refilled as rows finish, one prefill per distinct prompt, follow-up
calls continued in their row. Otherwise (transformers' own modules: other architectures,
GPUs, kernel-quantized weights) `generate` runs fixed batches of up to `max_batch_size`
rows, each until its longest row ends (rows that finish leave the batch), and `serve`
runs rounds of those.

The batch size, unless given, is chosen at load (`auto_batch_size`): as many rows as fit
half the free memory with `PLANNED_CONTEXT` positions of keys and values each, at most
`MAX_ROWS` for the device. It changes how fast samples come, never what they are.

This module knows nothing about tasks, prompts' meaning, budgets or storage.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Hashable, Iterable, Sequence

import torch

from thinklab import models
from thinklab.backends import forward
from thinklab.backends.base import Backend, BackendInfo, Completion, Request
from thinklab.config import ModelSpec, SamplingSpec


PLANNED_CONTEXT = 2048  # positions per row the automatic batch size plans memory for
# Rows at most. On CPU a decode step turns compute-bound after a few tens of rows (fp32 matmul rate
# over memory bandwidth), so more rows add little speed and lengthen the tail; a GPU's ratio
# is far higher.
MAX_ROWS = {"cpu": 32, "cuda": 256}
KV_MEMORY_SHARE = 0.5  # share of the free memory the KV cache may take


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def kv_bytes_per_position(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one position of one row takes over all layers of a decoder."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def auto_batch_size(bytes_per_position: int, device: torch.device) -> tuple[int, str]:
    """(rows, how they were chosen): as many rows as fit `KV_MEMORY_SHARE` of the free
    memory with `PLANNED_CONTEXT` positions each, at most `MAX_ROWS` for the device."""
    free = free_memory_bytes(device)
    by_memory = int(KV_MEMORY_SHARE * free) // (bytes_per_position * PLANNED_CONTEXT)
    cap = MAX_ROWS.get(device.type, MAX_ROWS["cpu"])
    rows = max(1, min(cap, by_memory))
    return rows, (f"auto: min({cap} for {device.type}, {by_memory} rows of {PLANNED_CONTEXT} positions x "
                  f"{bytes_per_position} B in {KV_MEMORY_SHARE:.0%} of {free / 2**30:.1f} GiB free at load)")


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # CPUs get fp32: bf16 changes the numbers, and without AVX512_BF16 it is no faster.
        # dtype="bfloat16" on a CPU is the option (the lean forward's bf16 GEMMs, README).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class HFBackend(Backend):
    name = "hf"

    def __init__(self, spec: ModelSpec, device: str | None = None, max_batch_size: int | None = None):
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
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} is not valid; use a positive int, or None to choose "
                             "from the free memory")
        kw = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        self._tokenizer = AutoTokenizer.from_pretrained(self.resolved.path, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(self.resolved.path, dtype=self.dtype, **kw)
        self.model.to(self.device).eval()
        self.quantization_report: dict = {}
        if spec.quantization:
            from thinklab.models import quantization

            self.model, self.quantization_report = quantization.apply(self.model, spec.quantization, self.device)
        # a bf16 model on the CPU runs the lean forward, whose KV cache is float32 (forward.select)
        kv_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.kv_bytes_per_position = kv_bytes_per_position(self.model.config, kv_dtype)
        if max_batch_size is None:
            self.max_batch_size, self.batch_size_rule = auto_batch_size(self.kv_bytes_per_position, self.device)
        else:
            self.max_batch_size, self.batch_size_rule = max_batch_size, "set by the caller"
        self.forward = forward.select(self.model, spec.forward, self.device, self.max_batch_size, self.resolved.name,
                                      kernel_quantization=self.quantization_report.get("form") == "kernel")
        self.last_serve_stats: dict | None = None  # the row scheduler's numbers for its last serve
        self._native_top_k: dict | None = None
        if spec.moe_top_k is not None:
            self.set_moe_top_k(spec.moe_top_k)
        self.eos_ids = self._eos_ids()
        self.pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else min(self.eos_ids)

    moe_top_k_settable = True

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

    def routing_columns(self, prompts, traces, n_thinking) -> list[dict] | None:
        from thinklab.models import router

        if not router.is_moe(self.model):
            return None
        stats = router.routing_stats(self.model, prompts, [t.token_ids for t in traces], n_thinking,
                                  token_entropy=[t.token_entropy for t in traces], pad_id=self.pad_id)
        nan_to_none = lambda v: None if v is None or v != v else v  # noqa: E731
        return [{"expert_load": st.get("expert_load"),
                 "router_entropy_thinking": nan_to_none(st.get("router_entropy_thinking")),
                 "router_entropy_answer": nan_to_none(st.get("router_entropy_answer"))} for st in stats]

    @property
    def identity(self) -> dict:
        return {"model": self.resolved.name, "fingerprint": self.resolved.fingerprint,
                "dtype": str(self.dtype).removeprefix("torch."), "forward": self.forward.name,
                # rows in their own cache slots (the scheduler) or fixed left-padded batches: the
                # two round differently, so a run is resumed only under the layout it began with
                "decode_layout": self.forward.layout}

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
                "batch_size_rule": self.batch_size_rule,
                "batching": ("continuous: rows refilled as they finish, one prefill per distinct prompt, follow-up "
                             "calls continued in their row (thinklab.backends.scheduler)" if self.forward.layout == "rows"
                             else "fixed batches, each until its longest row ends"),
                "forward": self.forward.name,
                "forward_detail": self.forward.describe(),
                "rng": ("one torch.Generator per sample seeded with its seed draws one float64 uniform per token, "
                        "all up front; the token is the inverse CDF (float64 cumulative sum) of the processed distribution"),
                **({"quantization": self.quantization_report} if self.quantization_report else {}),
            },
        )

    def scheduler(self):
        """A row scheduler on this backend's forward with its batch size, or None where the
        forward runs fixed batches."""
        return self.forward.scheduler(self._tokenizer, self.eos_ids, self.pad_id, self.max_batch_size,
                                      int(KV_MEMORY_SHARE * free_memory_bytes(self.device)))

    @property
    def serve_window(self) -> int:  # on transformers' forward: one fixed batch per wave
        return self.max_batch_size

    def serve(self, requests: Iterable[Request], on_tokens: Callable[[Hashable, int], None] | None = None,
              progress: bool = False) -> None:
        scheduler = self.scheduler()
        if scheduler is None:
            self.last_serve_stats = None
            return super().serve(requests, on_tokens=on_tokens, progress=progress)
        self.last_serve_stats = scheduler.serve(requests, on_tokens=on_tokens).as_dict()

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
        if self.forward.layout == "rows":  # the scheduler serves them
            def keep(i):
                def then(c: Completion) -> None:
                    results[i] = c
                    bar.update(1)
                return then

            self.serve([Request(list(p), int(s), sampling, max_new_tokens, tuple(stop), then=keep(i), order=i)
                        for i, (p, s) in enumerate(zip(prompts, seeds))])
            bar.close()
            return results  # type: ignore[return-value]
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

        cache, decode = self.forward.new_decoder(B, L + max_new_tokens)
        logits = decode(input_ids, positions, attention, cache)
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

        for step in range(max_new_tokens):
            u = None if uniforms is None else uniforms[rows_t, step]
            tok, lp, ent = self.forward.choose(logits, sampling, u)  # (b,) each, b = rows still generating
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
            logits = decode(tok[:, None], next_pos, attention, cache)
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

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
