"""Study 4, MoE sparsity: accuracy, length and entropy as the active experts per token change.

Conditions: one run per top-k over the same problems and seeds (`ModelSpec.moe_top_k`).
The runner stores the routing columns of MoE runs on the hf backend (expert load per
layer, router entropy per phase; see `thinklab.moe.routing_stats`); the vLLM backend
exposes no router, so its rows leave them null.

The frames (`metrics_vs_k`, `expert_load`, `router_entropy_by_phase`, `num_experts`,
`METRICS`) live in `thinklab.analysis.moe`, which needs no torch, and are re-exported
here; figures only read frames.
"""

from __future__ import annotations

from typing import Sequence

import plotly.express as px
import plotly.graph_objects as go
import polars as pl

from thinklab import moe
from thinklab.analysis import overthinking as ot
from thinklab.analysis.moe import (
    METRICS,
    ROUTING_COLUMNS,
    expert_load,
    metrics_vs_k,
    num_experts,
    router_entropy_by_phase,
)
from thinklab.config import ModelSpec, RunSpec, SamplingSpec
from thinklab.studies.common import run_conditions

STUDY = "moe"

__all__ = [
    "STUDY", "ROUTING_COLUMNS", "METRICS", "conditions", "run",
    "num_experts", "metrics_vs_k", "expert_load", "router_entropy_by_phase",
    "fig_metric_vs_k", "fig_expert_load", "fig_router_entropy_by_phase",
]


def conditions(
    model: str = moe.DEFAULT_OFFLINE,
    backend: str = "hf",
    task: str = "rg:basic_arithmetic",
    top_k_values: Sequence[int] = (4, 8, 12, 16),
    n_problems: int = 16,
    n_samples: int = 1,
    temperature: float = 0.0,
    max_tokens: int = 128,
    seed: int = 0,
) -> list[RunSpec]:
    """One RunSpec per top-k (an offline MoE name is built on first use by `models.resolve`)."""
    name = model
    n = 1 if temperature == 0 else n_samples  # greedy samples would all be equal
    return [
        RunSpec(
            model=ModelSpec(name=name, backend=backend, moe_top_k=int(k)),
            task=task,
            n_problems=n_problems,
            task_seed=seed,
            sampling=SamplingSpec(temperature=temperature, n=n, max_tokens=max_tokens, seed=seed),
        )
        for k in top_k_values
    ]


def run(specs: Sequence[RunSpec], progress: bool = True, **run_options) -> pl.DataFrame:
    """The sample table of every condition (the runner stores the routing columns), with trace statistics."""
    return ot.with_trace_stats(run_conditions(specs, progress=progress, **run_options))


# --------------------------------------------------------------------------- figures


def _errors(frame: pl.DataFrame) -> dict:
    return dict(error_y=(frame["ci_high"] - frame["estimate"]).to_list(),
                error_y_minus=(frame["estimate"] - frame["ci_low"]).to_list())


def fig_metric_vs_k(frame: pl.DataFrame, metric: str = "correct") -> go.Figure:
    """One metric of `metrics_vs_k` against the number of active experts."""
    sub = frame.filter(pl.col("variable") == metric).sort("moe_top_k")
    fig = px.line(sub, x="moe_top_k", y="estimate", markers=True, hover_data=["active_fraction", "n", "n_clusters"],
                  **_errors(sub))
    label = METRICS.get(metric, metric)
    fig.update_layout(title=f"{label} vs. active experts per token (95% bootstrap CI over problems)",
                      xaxis_title="active experts per token (top-k)", yaxis_title=label)
    if metric == "correct":
        fig.update_yaxes(range=[-0.02, 1.02])
    return fig


def fig_expert_load(load: pl.DataFrame, k: int) -> go.Figure:
    """Heatmap layer × expert of each expert's share of the routed tokens at top-k = k."""
    sub = load.filter(pl.col("moe_top_k") == k)
    wide = sub.pivot(on="expert", index="layer", values="share").sort("layer")
    experts = [c for c in wide.columns if c != "layer"]
    fig = go.Figure(go.Heatmap(z=wide.select(experts).to_numpy(), x=[int(e) for e in experts], y=wide["layer"].to_list(),
                               colorscale="Viridis", colorbar=dict(title="share")))
    fig.update_layout(title=f"Expert load per layer at top-k = {k} (uniform = {1 / max(len(experts), 1):.3f})",
                      xaxis_title="expert", yaxis_title="layer", height=max(450, 16 * wide.height))
    return fig


def fig_router_entropy_by_phase(frame: pl.DataFrame) -> go.Figure:
    frame = frame.sort("phase", "moe_top_k")
    fig = px.line(frame, x="moe_top_k", y="estimate", color="phase", markers=True, **_errors(frame))
    fig.update_layout(title="Router entropy by phase vs. active experts (95% bootstrap CI over problems)",
                      xaxis_title="active experts per token (top-k)", yaxis_title="router entropy (nats)")
    return fig
