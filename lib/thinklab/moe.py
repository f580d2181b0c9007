"""Mixture-of-experts knobs: active experts per token, router tracing, and an offline MoE.

Three things live here:

1. `set_top_k(model, k)` / `top_k_override(model, k)`: the number of experts each token
   is routed to. In transformers 5.19 every supported block (Mixtral, Qwen2-MoE,
   Qwen3-MoE, OLMoE) reads it from its router module, `layers[i].mlp.gate.top_k`, copied
   from `config.num_experts_per_tok` at build time (changing the config afterwards does
   nothing). vLLM takes it at engine start: `LLM(..., hf_overrides={"num_experts_per_tok": k})`.
2. `RouterTrace(model)`: a context manager that hooks every router and records, per
   forward pass and layer, the experts each token was sent to and the entropy of the
   router's distribution; on exit the hooks are gone and the model is as it was.
   `routing_stats` turns a sample's tokens into the sample-table columns (`expert_load`
   per layer, mean router entropy in the thinking and answer phases).
3. The offline MoE: a MoEfication (Zhang et al., 2022) of the embedded dense SmolLM2-135M.
   Each layer's FFN neurons are split into E equal groups ("experts") by balanced k-means
   on their gate weights; a router scores each group by the norm of what it would add to
   the layer's output, and only the top-k groups are kept. It is built once from the
   dense weights under `data/models/<name>/` (no training, no download) and loads as a
   regular transformers model class registered here. With k = E it is the dense model.
   It saves no compute (the router needs every neuron's activation): it measures what
   accuracy costs when each token keeps only k of E neuron groups.

This module knows nothing about tasks, prompts or storage.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from thinklab import paths

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
            "use an MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, or the offline "
            f"{DEFAULT_OFFLINE!r}) or leave moe_top_k=None"
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


def _restore_top_k(model: nn.Module, previous: dict[str, int]) -> None:
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
        _restore_top_k(model, previous)


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
    per router); all of them are removed on exit, even after an exception.
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


ROUTING_SCHEMA = {
    "expert_load": "list[list[i32]]: per layer, how many sampled tokens each expert received",
    "router_entropy_thinking": "f32: mean router entropy (nats) over layers and sampled thinking tokens",
    "router_entropy_answer": "f32: mean router entropy (nats) over layers and sampled answer tokens",
}


def routing_frame(model: nn.Module, tokenizer, df, batch_size: int = 8):
    """The routing columns of a sample table, keyed by (run_id, problem_id, sample_idx)."""
    import polars as pl

    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in df["prompt"].to_list()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stats = routing_stats(
        model, prompts, df["token_ids"].to_list(), df["n_thinking_tokens"].to_list(),
        token_entropy=df["token_entropy"].to_list(), pad_id=pad, batch_size=batch_size,
    )
    return pl.DataFrame(
        {
            "run_id": df["run_id"],
            "problem_id": df["problem_id"],
            "sample_idx": df["sample_idx"],
            "expert_load": [s["expert_load"] for s in stats],
            "router_entropy_thinking": [s["router_entropy_thinking"] for s in stats],
            "router_entropy_answer": [s["router_entropy_answer"] for s in stats],
        },
        schema_overrides={
            "expert_load": pl.List(pl.List(pl.Int32)),
            "router_entropy_thinking": pl.Float32,
            "router_entropy_answer": pl.Float32,
        },
    ).with_columns(pl.col("router_entropy_thinking", "router_entropy_answer").fill_nan(None))


# --------------------------------------------------------------------------- the offline MoE (MoEfication)

MODEL_TYPE = "thinklab_moefied_llama"


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    global MoefiedLlamaConfig, MoefiedLlamaForCausalLM

    class MoefiedLlamaConfig(LlamaConfig):
        model_type = MODEL_TYPE

        def __init__(self, num_experts: int = 16, num_experts_per_tok: int = 12, moefied_from: str = "",
                     grouping: str = "balanced-kmeans", router: str = "contribution-norm", **kwargs):
            self.num_experts = num_experts
            self.num_experts_per_tok = num_experts_per_tok
            self.moefied_from = moefied_from
            self.grouping = grouping
            self.router = router
            super().__init__(**kwargs)

    class MoefiedLlamaForCausalLM(LlamaForCausalLM):
        config_class = MoefiedLlamaConfig

        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                layer.mlp = MoefiedMLP(config)
            self.post_init()

    AutoConfig.register(MODEL_TYPE, MoefiedLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoefiedLlamaConfig, MoefiedLlamaForCausalLM, exist_ok=True)


class GroupRouter(nn.Module):
    """Scores each neuron group by the norm of its contribution to the FFN output.

    Input: the FFN activations h = act(gate(x)) * up(x), (N, I). Group g's contribution is
    y_g = W_down[:, g] h_g and its squared norm h_gᵀ (W_gᵀ W_g) h_g, so the router keeps one
    Gram matrix per group. Logits are log ‖y_g‖, so softmax(logits) is each group's share of
    the summed contribution norms. Returns (logits (N, E), weights (N, k) = 1, indices (N, k)),
    the signature of transformers' TopKRouter.
    """

    def __init__(self, intermediate_size: int, num_experts: int, top_k: int):
        super().__init__()
        if intermediate_size % num_experts:
            raise MoEError(f"num_experts={num_experts} must divide the FFN width {intermediate_size}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.group_size = intermediate_size // num_experts
        d = self.group_size
        # expert_of[j]: the group of neuron j; perm lists neurons group by group
        self.register_buffer("expert_of", torch.zeros(intermediate_size, dtype=torch.long))
        self.register_buffer("perm", torch.arange(intermediate_size))
        self.register_buffer("gram", torch.zeros(num_experts, d, d))

    def forward(self, h: torch.Tensor):
        N = h.shape[0]
        hg = h[:, self.perm].view(N, self.num_experts, self.group_size).transpose(0, 1)  # (E, N, d)
        sq = (torch.bmm(hg, self.gram) * hg).sum(-1).transpose(0, 1)  # (N, E)
        logits = 0.5 * torch.log(sq.clamp_min(1e-30))
        indices = torch.topk(logits, self.top_k, dim=-1).indices  # (N, k)
        return logits, torch.ones(indices.shape, dtype=h.dtype, device=h.device), indices


class MoefiedMLP(nn.Module):
    """A llama MLP whose neurons form `num_experts` groups; each token keeps its top-k groups.

    Same parameter names as LlamaMLP (gate_proj, up_proj, down_proj) plus the router `gate`.
    At top_k = num_experts no mask is applied: the output is the dense MLP's, bit for bit.
    """

    def __init__(self, config):
        super().__init__()
        from transformers.activations import ACT2FN

        H, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(H, I, bias=config.mlp_bias)
        self.up_proj = nn.Linear(H, I, bias=config.mlp_bias)
        self.down_proj = nn.Linear(I, H, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate = GroupRouter(I, config.num_experts, config.num_experts_per_tok)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (B, T, I)
        flat = h.reshape(-1, h.shape[-1])
        _, _, indices = self.gate(flat)
        if self.gate.top_k < self.gate.num_experts:
            keep = torch.zeros((flat.shape[0], self.gate.num_experts), dtype=torch.bool, device=h.device)
            keep.scatter_(1, indices, True)
            flat = flat * keep[:, self.gate.expert_of].to(flat.dtype)  # zero the dropped groups' neurons
        return self.down_proj(flat.view_as(h))


_register()


def balanced_kmeans(x: torch.Tensor, n_groups: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Group of each row of `x` (n, dim), n_groups groups of exactly n // n_groups rows.

    Spherical k-means whose assignment step fills groups greedily, most confident rows first.
    """
    n = x.shape[0]
    cap = n // n_groups
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centroids = xn[torch.randperm(n, generator=g)[:n_groups]]
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = (xn @ centroids.T).numpy()  # (n, groups)
        ranked = np.argsort(-sim, axis=1)
        counts = np.zeros(n_groups, dtype=np.int64)
        new = np.empty(n, dtype=np.int64)
        for row in np.argsort(-sim.max(axis=1), kind="stable"):
            for c in ranked[row]:
                if counts[c] < cap:
                    new[row] = c
                    counts[c] += 1
                    break
        new_t = torch.from_numpy(new)
        if torch.equal(new_t, assign):
            break
        assign = new_t
        centroids = torch.nn.functional.normalize(
            torch.zeros(n_groups, x.shape[1], dtype=torch.float64).index_add_(0, assign, xn), dim=-1
        )
    return assign


@dataclass(frozen=True)
class OfflineMoE:
    name: str
    base: str  # embedded dense model it is built from
    num_experts: int
    top_k: int  # the checkpoint's own top-k (what moe_top_k=None means)
    seed: int = 0
    description: str = ""


OFFLINE: dict[str, OfflineMoE] = {
    m.name: m
    for m in (
        OfflineMoE(
            name="smollm2-135m-moe16",
            base="smollm2-135m",
            num_experts=16,
            top_k=12,
            description=(
                "MoEfication of SmolLM2-135M-Instruct: each of 30 FFNs split into 16 groups of 96 neurons "
                "(balanced k-means on gate weights), routed by contribution norm; no training; k=16 is the dense model"
            ),
        ),
    )
}
DEFAULT_OFFLINE = "smollm2-135m-moe16"


def moefy(dense, num_experts: int, top_k: int, seed: int = 0, base_name: str = ""):
    """A MoefiedLlamaForCausalLM with the dense llama model's weights and new routers."""
    cfg_dict = dense.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map", "dtype", "torch_dtype"):
        cfg_dict.pop(key, None)
    config = MoefiedLlamaConfig(num_experts=num_experts, num_experts_per_tok=top_k, moefied_from=base_name, **cfg_dict)
    config.architectures = ["MoefiedLlamaForCausalLM"]
    torch.manual_seed(seed)  # the random init is overwritten below; seeded so the build is reproducible anyway
    moe_model = MoefiedLlamaForCausalLM(config)
    state = {k: v for k, v in dense.state_dict().items()}
    d = config.intermediate_size // num_experts
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        groups = balanced_kmeans(mlp.gate_proj.weight.detach(), num_experts, seed=seed + i)
        perm = torch.argsort(groups, stable=True)
        w = mlp.down_proj.weight.detach().double()[:, perm].view(-1, num_experts, d).permute(1, 0, 2)  # (E, H, d)
        prefix = f"model.layers.{i}.mlp.gate."
        state[prefix + "expert_of"] = groups
        state[prefix + "perm"] = perm
        state[prefix + "gram"] = (w.transpose(1, 2) @ w).float()  # (E, d, d)
    result = moe_model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise MoEError(f"MoEfication did not map the dense weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        moe_model.tie_weights()
    return moe_model.eval()


def offline_dir(name: str = DEFAULT_OFFLINE) -> Path:
    return paths.models_dir() / name


def materialize(name: str = DEFAULT_OFFLINE, force: bool = False, progress: bool = True) -> Path:
    """Build the offline MoE `name` once from its dense base; return its directory.

    Same discipline as the embedded models (`thinklab.models.build_once`): built in a
    temporary sibling, manifest written last, renamed into place.
    """
    from thinklab import models

    if name not in OFFLINE:
        raise MoEError(f"{name!r} is not an offline MoE; offline: {', '.join(OFFLINE)}")
    spec = OFFLINE[name]

    def build(out: Path, work: Path) -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = models.resolve(spec.base)
        if progress:
            print(f"[thinklab] building offline MoE {name} from {base.path}, once")
        dense = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        moe_model = moefy(dense, spec.num_experts, spec.top_k, spec.seed, base_name=spec.base)
        moe_model.save_pretrained(out)
        AutoTokenizer.from_pretrained(base.path).save_pretrained(out)
        return {
            "description": spec.description,
            "built_from": {"name": base.name, "fingerprint": base.fingerprint},
            "num_experts": spec.num_experts,
            "default_top_k": spec.top_k,
            "seed": spec.seed,
            # the base's weights plus the recipe identify this model
            "fingerprint": f"{base.fingerprint}-moe{spec.num_experts}-s{spec.seed}",
        }

    return models.build_once(name, build, force=force, progress=progress)


def model_name(name: str) -> str:
    """What to put in `ModelSpec.name`: an offline MoE's directory (built if missing), else `name`."""
    if name in OFFLINE:
        return str(materialize(name))
    return name
