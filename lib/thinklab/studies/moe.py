"""Study 4, MoE sparsity: accuracy, length and entropy as the active experts per token change.

Conditions: one run per top-k over the same problems and seeds (`ModelSpec.moe_top_k`).
The runner stores the routing columns of MoE runs on the hf backend (expert load per
layer, router entropy per phase); the vLLM backend exposes no router, so its rows leave
them null and the routing figures say so. The tables come from `thinklab.analysis.moe`.
Importing this module loads neither torch nor transformers: the offline MoE is built by
the runner on first use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from thinklab import plots
from thinklab.analysis import moe as ana
from thinklab.analysis import overthinking as ot
from thinklab.config import RunSpec
from thinklab.plots import ci_errors, int_ticks, placeholder, titled
from thinklab.studies import common
from thinklab.studies.common import grid, non_empty, positive

__all__ = ["STUDY", "Params", "conditions", "run", "frames", "FIGURES"]

STUDY = "moe"


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The MoE study's parameters: the shared ones, then its knobs."""

    # the offline MoEfied SmolLM2 (`thinklab.models.DEFAULT_OFFLINE`), built under data/models/ on first use
    model: str = field(default="smollm2-135m-moe16", metadata=non_empty("a model name, hub id or local directory"))
    n_problems: int = field(default=12, metadata=positive())
    max_tokens: int = field(default=96, metadata=positive())
    temperature: float = field(default=0.0, metadata=common.TEMPERATURE)
    top_k_values: tuple[int, ...] = field(default=(8, 12, 14, 16), metadata=grid(positive()))


def conditions(params: Params) -> list[RunSpec]:
    """One RunSpec per top-k."""
    return [params.run_spec(params.temperature, moe_top_k=k) for k in params.top_k_values]


def run(specs: Sequence[RunSpec], progress: bool = True, runs_root: Path | str | None = None) -> pl.DataFrame:
    """The sample table of every condition (with the routing columns where traced) and its
    per-sample entropy statistics."""
    return ot.with_trace_stats(common.run_conditions(specs, progress=progress, runs_root=runs_root, study=STUDY, knobs=["moe_top_k"]))


# --------------------------------------------------------------------------- frames


def _routed(df: pl.DataFrame) -> pl.DataFrame:
    """The rows that carry routing columns (none on vLLM or for a dense model)."""
    if not all(c in df.columns for c in ana.ROUTING_COLUMNS):
        return df.clear()
    return df.filter(pl.col("expert_load").is_not_null())


def frames(df: pl.DataFrame, params: Params | None = None) -> dict[str, pl.DataFrame]:
    """Every table behind the figures, plus `summary` (n and the truncated share per top-k):
    `metrics_vs_k` (every metric, the vs-k figures read one each), `expert_load` and
    `router_entropy_by_phase` (empty without routing columns)."""
    p = params or Params()
    df = ot.ensure_trace_stats(df)
    routed = _routed(df)
    vs_k = ana.metrics_vs_k(df, n_boot=p.n_boot, seed=p.seed, by=())
    return {
        "summary": common.summary(df, ["moe_top_k"]),
        "metrics_vs_k": common.with_truncation(vs_k, df, ["moe_top_k"]),
        "expert_load": ana.expert_load(routed, by=()) if routed.height else pl.DataFrame(),
        "router_entropy_by_phase": (ana.router_entropy_by_phase(routed, n_boot=p.n_boot, seed=p.seed, by=())
                                    if routed.height else pl.DataFrame()),
    }


# --------------------------------------------------------------------------- figures


def _caption(f: dict[str, pl.DataFrame]) -> str:
    return common.caption(f["summary"])


def _errors(frame: pl.DataFrame) -> dict:
    return ci_errors(frame, "estimate")


def _metric_vs_k(metric: str):
    """The figure of one metric of `metrics_vs_k` against the number of active experts."""
    label = ana.METRICS[metric]

    def draw(f: dict[str, pl.DataFrame]) -> go.Figure:
        sub = f["metrics_vs_k"].filter(pl.col("variable") == metric).sort("moe_top_k")
        title = f"{label[0].upper()}{label[1:]} vs. active experts per token (95% bootstrap CI over problems)"
        if sub.is_empty():
            return placeholder(title, f"the table has no {metric} column", _caption(f))
        sub = sub.with_columns(shown=pl.format("n={}", "n"))
        fig = px.line(sub, x="moe_top_k", y="estimate", markers=True, text="shown", template=plots.TEMPLATE, labels=plots.LABELS,
                      hover_data=["active_fraction", "n", "n_clusters", "truncated_share"], **_errors(sub))
        fig.update_traces(textposition="bottom right", cliponaxis=False, marker_size=9)
        fig.update_layout(xaxis_title="active experts per token (top-k)", yaxis_title=label)
        int_ticks(fig, sub["moe_top_k"])
        if metric == "correct":
            fig.update_yaxes(range=[-0.02, 1.05])
        return titled(fig, title, _caption(f))

    draw.__doc__ = f"{label} against top-k, from frames['metrics_vs_k']."
    return draw


def _no_routing(title: str, f: dict[str, pl.DataFrame]) -> go.Figure:
    return placeholder(title, "no routing traced (vLLM backend or a dense model)", _caption(f))


def _expert_load(f: dict[str, pl.DataFrame]) -> go.Figure:
    load, title = f["expert_load"], "Expert load per layer: each expert's share of the layer's routed tokens"
    if load.is_empty():
        return _no_routing(title, f)
    ks = sorted(load["moe_top_k"].unique().to_list())
    fig = make_subplots(rows=1, cols=len(ks), subplot_titles=[f"top-k = {k}" for k in ks], shared_yaxes=True,
                        horizontal_spacing=0.02)
    experts = load["expert"].n_unique()
    for col, k in enumerate(ks, start=1):
        wide = load.filter(pl.col("moe_top_k") == k).pivot(on="expert", index="layer", values="share").sort("layer")
        columns = [c for c in wide.columns if c != "layer"]
        fig.add_trace(go.Heatmap(z=wide.select(columns).to_numpy(), x=[int(e) for e in columns],
                                 y=wide["layer"].to_list(), coloraxis="coloraxis"), row=1, col=col)
    fig.update_layout(coloraxis=dict(colorscale="Viridis", colorbar=dict(title="share of<br>routed tokens")),
                      height=max(450, 16 * load["layer"].n_unique()), yaxis_title="layer")
    fig.update_xaxes(title_text="expert")
    return titled(fig, f"{title} (uniform = {1 / max(experts, 1):.3f})", _caption(f))


def _router_entropy_by_phase(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame, title = f["router_entropy_by_phase"], "Router entropy by phase vs. active experts (95% bootstrap CI)"
    if frame.is_empty():
        return _no_routing(title, f)
    frame = frame.sort("phase", "moe_top_k").with_columns(
        phase=pl.format("{} (n={})", "phase", pl.col("n").max().over("phase")))
    fig = px.line(frame, x="moe_top_k", y="estimate", color="phase", markers=True, hover_data=["n", "n_clusters"],
                  template=plots.TEMPLATE, labels=plots.LABELS, **_errors(frame))
    fig.update_layout(xaxis_title="active experts per token (top-k)", yaxis_title="router entropy (nats)",
                      legend_title="phase (samples per top-k)")
    int_ticks(fig, frame["moe_top_k"])
    experts = f["expert_load"]["expert"].n_unique() if not f["expert_load"].is_empty() else 0
    if experts:
        # the ceiling in view (a uniform router over all experts), so the gap to it can be read
        ceiling = math.log(experts)
        low = min(frame["ci_low"].min(), frame["estimate"].min())
        margin = 0.1 * max(ceiling - low, 0.01)
        fig.add_hline(y=ceiling, line_dash="dot", line_color="#444444",
                      annotation_text=f"ceiling ln {experts} = {ceiling:.2f} nats (uniform router)",
                      annotation_position="bottom right")
        fig.update_yaxes(range=[low - margin, max(ceiling, frame["ci_high"].max()) + margin])
    return titled(fig, title, _caption(f))


FIGURES = {
    "accuracy_vs_k": _metric_vs_k("correct"),
    "length_vs_k": _metric_vs_k("n_tokens"),
    "entropy_vs_k": _metric_vs_k("mean_entropy"),
    "expert_load": _expert_load,
    "router_entropy_by_phase": _router_entropy_by_phase,
}
