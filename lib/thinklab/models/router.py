"""Mixture-of-experts routers: how many experts each token uses, and what the routers did.

1. `set_top_k(model, k)` / `restore_top_k(model, previous)` / `top_k_override(model, k)`:
   the number of experts each token is routed to. In transformers 5.19 every supported
   block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) reads it from its router module,
   `layers[i].mlp.gate.top_k`, copied from `config.num_experts_per_tok` at build time
   (changing the config afterwards does nothing). vLLM takes it at engine start:
   `LLM(..., hf_overrides={"num_experts_per_tok": k})`.
2. `RouterTrace(model)`: a context manager that hooks every router and records, per
   forward pass and layer, the experts each token was sent to and the entropy of the
   router's distribution; on exit the hooks are gone and the model is as it was.
   `routing_stats` turns a sample's tokens into the sample-table columns (`expert_load`
   per layer, mean router entropy in the thinking and answer phases).

Routers are found by shape, not by class, so the offline MoE's routers (`moefy.py`) and
transformers' own are driven the same way. This module knows nothing about tasks,
prompts, storage or which models exist.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

# --------------------------------------------------------------------------- routers


class MoEError(ValueError):
    """A model without routers, or a top-k outside what the model allows."""


_LAYER = re.compile(r"layers\.(\d+)\.")


def _is_router(module: nn.Module) -> bool:
    # transformers' TopKRouter classes (Mixtral, Qwen2/3-MoE, OLMoE, ...) and ours all carry
    # int `top_k` and `num_experts` and return (router_logits, weights, indices).
    return (
        type(module).__name__.endswith("Router")
        and isinstance(getattr(module, "top_k", None), int)
        and isinstance(getattr(module, "num_experts", None), int)
    )


def find_routers(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer index, module name, router) for every router of `model`, in layer order."""
    found = []
    for name, module in model.named_modules():
        if _is_router(module):
            m = _LAYER.search(name + ".")
            found.append((int(m.group(1)) if m else len(found), name, module))
    return sorted(found, key=lambda t: t[0])


def is_moe(model: nn.Module | None) -> bool:
    return model is not None and bool(find_routers(model))


def num_experts(model: nn.Module) -> int:
    routers = _routers_or_raise(model)
    counts = {r.num_experts for _, _, r in routers}
    if len(counts) != 1:
        raise MoEError(f"routers disagree on the number of experts: {sorted(counts)}")
    return counts.pop()


def get_top_k(model: nn.Module) -> int:
    ks = {r.top_k for _, _, r in _routers_or_raise(model)}
    if len(ks) != 1:
        raise MoEError(f"routers disagree on top_k: {sorted(ks)}")
    return ks.pop()


def _routers_or_raise(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    routers = find_routers(model)
    if not routers:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise MoEError(
            f"model of type {arch!r} has no mixture-of-experts router, so moe_top_k cannot apply; "
            "use an MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, or an offline MoE that "
            "`thinklab models` lists) or leave moe_top_k=None"
        )
    return routers


def set_top_k(model: nn.Module, k: int) -> dict[str, int]:
    """Route every token to `k` experts in every layer; return the previous top-k by module name.

    Sets the routers' `top_k` (what the blocks read), the blocks' own `top_k` where they
    keep a copy (Mixtral), and `config.num_experts_per_tok` so that the model describes itself.
    """
    routers = _routers_or_raise(model)
    n_exp = num_experts(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_exp:
        raise MoEError(f"moe_top_k={k!r} is not valid for this model; use an int in 1..{n_exp} (its number of experts)")
    previous: dict[str, int] = {}
    modules = dict(model.named_modules())
    for _, name, router in routers:
        previous[name] = router.top_k
        router.top_k = k
        parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
        if parent is not None and isinstance(getattr(parent, "top_k", None), int):
            previous[name.rsplit(".", 1)[0]] = parent.top_k
            parent.top_k = k
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "num_experts_per_tok"):
        previous["config.num_experts_per_tok"] = cfg.num_experts_per_tok
        cfg.num_experts_per_tok = k
    return previous


def restore_top_k(model: nn.Module, previous: dict[str, int]) -> None:
    """Undo `set_top_k`: put back the values it returned."""
    modules = dict(model.named_modules())
    for name, value in previous.items():
        if name == "config.num_experts_per_tok":
            model.config.num_experts_per_tok = value
        else:
            modules[name].top_k = value


@contextlib.contextmanager
def top_k_override(model: nn.Module, k: int) -> Iterator[nn.Module]:
    """`set_top_k` for the duration of a block; the previous values come back on exit."""
    previous = set_top_k(model, k)
    try:
        yield model
    finally:
        restore_top_k(model, previous)


# --------------------------------------------------------------------------- tracing


@dataclass
class ForwardRecord:
    """Routing of one model forward pass over a (B, T) batch."""

    shape: tuple[int, int]  # (B, T) of the input
    experts: torch.Tensor  # (L, B, T, k) int16: experts chosen per layer and token
    entropy: torch.Tensor  # (L, B, T) float32: entropy (nats) of softmax(router_logits)


class RouterTrace:
    """Record routing during any forward or generate call made inside the `with` block.

    >>> with RouterTrace(model) as trace:
    ...     model(ids)
    >>> trace.records[0].experts.shape   # (layers, B, T, k)

    Only forward hooks are added (one pre-hook on the model for the batch shape, one hook
    per router); all of them are removed on exit, even after an exception. It traces the
    transformers model's own forward (`model(...)`, `model.generate`); the hf backend's lean
    forward decodes without it, and runs take their routing columns from `routing_stats`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.routers = _routers_or_raise(model)
        self.layers = [layer for layer, _, _ in self.routers]
        self.num_experts = num_experts(model)
        self.records: list[ForwardRecord] = []
        self._handles: list = []
        self._shape: tuple[int, int] | None = None
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> "RouterTrace":
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._on_model_end, always_call=True))
        for pos, (_, _, router) in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._router_hook(pos)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_model_start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self._shape = (int(ids.shape[0]), int(ids.shape[1]))
        self._pending = {}

    def _router_hook(self, pos: int):
        def hook(module, args, output):
            logits, _, indices = output  # (N, E), (N, k), (N, k)
            logp = torch.log_softmax(logits.detach().float(), dim=-1)
            ent = -(logp.exp() * logp).sum(-1)  # (N,)
            self._pending[pos] = (indices.detach().to("cpu", torch.int16), ent.to("cpu"))

        return hook

    def _on_model_end(self, module, args, output):
        if self._shape is None or len(self._pending) != len(self.routers):
            self._shape, self._pending = None, {}
            return
        B, T = self._shape
        experts = torch.stack([self._pending[p][0].view(B, T, -1) for p in range(len(self.routers))])
        entropy = torch.stack([self._pending[p][1].view(B, T) for p in range(len(self.routers))])
        self.records.append(ForwardRecord((B, T), experts, entropy))
        self._shape, self._pending = None, {}


# --------------------------------------------------------------------------- per-sample routing stats


def _is_generated(token_entropy: Sequence[float] | None, n: int) -> np.ndarray:
    """Tokens the model sampled (forced cue/'Wait' tokens carry NaN entropy)."""
    if token_entropy is None:
        return np.ones(n, dtype=bool)
    return ~np.isnan(np.asarray(token_entropy, dtype=np.float64))


@torch.inference_mode()
def routing_stats(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    token_ids: Sequence[Sequence[int]],
    n_thinking_tokens: Sequence[int],
    token_entropy: Sequence[Sequence[float]] | None = None,
    pad_id: int = 0,
    batch_size: int = 8,
) -> list[dict]:
    """Per sample: `expert_load` (L lists of E counts), `router_entropy_thinking`, `router_entropy_answer`.

    The routing of generated token i is that of the forward pass that produced it (the
    position before it), recomputed by one teacher-forced forward over prompt + generation
    (the same tokens the sampler saw; equal to the decode-time routing up to float
    rounding). Only sampled tokens count: forced tokens (NaN entropy) are left out.
    Entropies are means over layers and tokens of the phase, NaN for an empty phase.
    """
    n = len(prompt_ids)
    out: list[dict] = [{} for _ in range(n)]
    device = next(model.parameters()).device
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]) + len(token_ids[i]))
    E = num_experts(model)
    for start in range(0, n, batch_size):
        idx = [i for i in order[start : start + batch_size] if len(token_ids[i]) > 0]
        for i in order[start : start + batch_size]:
            if len(token_ids[i]) == 0:
                L = len(find_routers(model))
                out[i] = {"expert_load": [[0] * E for _ in range(L)],
                          "router_entropy_thinking": math.nan, "router_entropy_answer": math.nan}
        if not idx:
            continue
        # feed prompt + all generated tokens but the last: position P-1+j produced token j
        seqs = [list(prompt_ids[i]) + list(token_ids[i][:-1]) for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), T), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, T - len(s) :] = torch.tensor(s)
            att[r, T - len(s) :] = 1
        pos = (att.cumsum(-1) - 1).clamp_min(0)
        with RouterTrace(model) as trace:
            model(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device),
                  use_cache=False, logits_to_keep=1)
        rec = trace.records[-1]
        for r, i in enumerate(idx):
            n_tok = len(token_ids[i])
            first = T - len(seqs[r]) + len(prompt_ids[i]) - 1
            experts = rec.experts[:, r, first : first + n_tok].long()  # (L, n_tok, k)
            ent = rec.entropy[:, r, first : first + n_tok].double()  # (L, n_tok)
            keep = torch.from_numpy(_is_generated(token_entropy[i] if token_entropy else None, n_tok))
            load = torch.zeros((experts.shape[0], E), dtype=torch.long)
            sel = experts[:, keep].reshape(experts.shape[0], -1)
            load.scatter_add_(1, sel, torch.ones_like(sel))
            cut = min(max(int(n_thinking_tokens[i]), 0), n_tok)
            phase = torch.arange(n_tok) < cut

            def mean(mask: torch.Tensor) -> float:
                m = mask & keep
                return float(ent[:, m].mean()) if bool(m.any()) else math.nan

            out[i] = {"expert_load": load.tolist(), "router_entropy_thinking": mean(phase),
                      "router_entropy_answer": mean(~phase)}
    return out
