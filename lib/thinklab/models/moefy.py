"""The offline MoE: a MoEfication (Zhang et al., 2022) of a dense llama model, built without training.

Each layer's FFN neurons are split into E equal groups ("experts") by balanced k-means
on their gate weights; a router scores each group by the norm of what it would add to
the layer's output, and only the top-k groups are kept. With k = E it is the dense model.
It saves no compute (the router needs every neuron's activation): it measures what
accuracy costs when each token keeps only k of E neuron groups.

`build(spec, base, out)` writes the model (the registry runs it through `disk.build_once`,
under `data/models/<name>/`); `register()` tells transformers' Auto classes about
its model type, so that `from_pretrained` can load the directory. Which offline MoEs
exist is the registry's business; the routers are found and driven by `router.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from thinklab.models.router import MoEError

if TYPE_CHECKING:  # annotations only; the registry imports this module, not the other way round
    from thinklab.models.registry import OfflineMoE, ResolvedModel

MODEL_TYPE = "thinklab_moefied_llama"


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


def register() -> None:
    """Make `AutoConfig`/`AutoModelForCausalLM` load the offline MoE's model type (idempotent)."""
    AutoConfig.register(MODEL_TYPE, MoefiedLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoefiedLlamaConfig, MoefiedLlamaForCausalLM, exist_ok=True)


class GroupRouter(nn.Module):
    """Scores each neuron group by the norm of its contribution to the FFN output.

    Input: the FFN activations h = act(gate(x)) * up(x), (N, I). Group g's contribution is
    y_g = W_down[:, g] h_g and its squared norm h_gᵀ (W_gᵀ W_g) h_g, so the router keeps one
    Gram matrix per group. Logits are log ‖y_g‖, so softmax(logits) is each group's share of
    the summed contribution norms. Returns (logits (N, E), weights (N, k) = 1, indices (N, k)),
    the signature of transformers' TopKRouter (which is how `router.find_routers` finds it).
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


def build(spec: OfflineMoE, base: ResolvedModel, out: Path, progress: bool = True) -> dict:
    """Write the offline MoE `spec`, built from the dense model `base`, into `out`; return
    its manifest fields (what `disk.build_once` wants from a build)."""
    if progress:
        print(f"[thinklab] building offline MoE {spec.name} from {base.path}, once")
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
