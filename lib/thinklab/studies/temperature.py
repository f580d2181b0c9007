"""Study 2, temperature: which temperatures solve which problems, and what voting buys.

Conditions: one run per (temperature, top_p) over the same problems and base seed, so
sample i of a problem has the same seed at every temperature. Every table is a function
of the sample table (`thinklab.analysis.temperature`), grouped by top_p so that nucleus
settings are never pooled; nothing regenerates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import polars as pl

from thinklab.analysis import overthinking as ot
from thinklab.analysis import temperature as ana
from thinklab.config import RunSpec
from thinklab.plots import placeholder, titled
from thinklab.studies import common
from thinklab.studies.common import grid, positive

__all__ = ["STUDY", "Params", "conditions", "run", "frames", "FIGURES"]

STUDY = "temperature"
_BY = ["top_p"]  # the second axis: kept apart in every table


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The temperature study's parameters: the shared ones, then its knobs."""

    n_samples: int = field(default=8, metadata=positive())
    temperatures: tuple[float, ...] = field(default=(0.0, 0.6, 1.0), metadata=grid(common.TEMPERATURE))
    top_ps: tuple[float, ...] = field(default=(1.0,), metadata=grid(common.TOP_P))
    ks: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata=grid(positive()))


def conditions(params: Params) -> list[RunSpec]:
    """One RunSpec per (temperature, top_p); greedy (T=0) draws one sample per problem."""
    return [params.run_spec(t, top_p) for t in params.temperatures for top_p in params.top_ps]


def run(specs: Sequence[RunSpec], progress: bool = True, runs_root: Path | str | None = None) -> pl.DataFrame:
    """The sample table of every condition, with per-sample entropy statistics added."""
    return ot.with_trace_stats(common.run_conditions(specs, progress=progress, runs_root=runs_root))


# --------------------------------------------------------------------------- frames


def _label(frame: pl.DataFrame, column: str = "temperature") -> pl.DataFrame:
    """Add `T`: the temperature as a short label (stored as float32, printed with 3 decimals at most),
    with top_p where the table holds several."""
    t = pl.col(column).cast(pl.Float64).round(3).cast(pl.Utf8)
    nucleus = pl.format("top_p={}", pl.col("top_p").cast(pl.Float64).round(3))
    several = frame["top_p"].n_unique() > 1
    label = pl.format("{} {}", t, nucleus) if several else t
    return frame.with_columns(T=pl.when(pl.col(column).is_null()).then(pl.lit("pooled")).otherwise(label),
                              nucleus=nucleus)


def _nucleus(frame: pl.DataFrame) -> dict:
    """Plot arguments that keep top_p settings apart, where the table holds several."""
    return {"color": "nucleus"} if frame["top_p"].n_unique() > 1 else {}


def _sampled(df: pl.DataFrame) -> pl.DataFrame:
    """The stochastic conditions: greedy has one sample per problem, and k-curves need n > 1."""
    return df.filter(pl.col("temperature") > 0)


def frames(df: pl.DataFrame, params: Params | None = None) -> dict[str, pl.DataFrame]:
    """Every table behind the figures (same names as `FIGURES`), plus `summary` (n and the
    truncated share per condition)."""
    p = params or Params()
    df = ot.ensure_trace_stats(df)
    sampled = _sampled(df)
    ks = list(p.ks)
    accuracy = ana.accuracy_vs_temperature(df, k=1, by=_BY, n_boot=p.n_boot, seed=p.seed)
    empty = pl.DataFrame()
    return {
        "summary": _label(common.summary(df, ["temperature", *_BY])),
        "pass_at_k": _label(ana.pass_at_k_curve(sampled, ks, by=_BY)) if sampled.height else empty,
        "maj_at_k": _label(ana.maj_at_k_curve(sampled, ks, by=_BY, seed=p.seed)) if sampled.height else empty,
        "solve_matrix": _label(ana.solve_matrix(df, by=_BY)),
        "coverage": _label(ana.coverage(df, by=_BY), "best_condition"),
        "voting": (_label(ana.multi_temperature_voting(sampled, ks, by=_BY, seed=p.seed))
                   .with_columns(series=pl.format("{} {}", "scheme", "T")) if sampled.height else empty),
        "entropy_length": _label(ana.entropy_length_vs_temperature(df, by=_BY)),
        "accuracy_vs_temperature": _label(common.with_truncation(accuracy, df, ["temperature", *_BY])),
    }


# --------------------------------------------------------------------------- figures


def _caption(f: dict[str, pl.DataFrame]) -> str:
    return common.caption(f["summary"])


def _greedy_only(title: str, f: dict[str, pl.DataFrame]) -> go.Figure:
    return placeholder(title, "no temperature above 0: k-curves need several samples per problem", _caption(f))


def _pass_at_k(f: dict[str, pl.DataFrame]) -> go.Figure:
    title = "pass@k per temperature (unbiased estimator)"
    if f["pass_at_k"].is_empty():
        return _greedy_only(title, f)
    fig = px.line(f["pass_at_k"], x="k", y="pass_at_k", color="T", markers=True, log_x=True,
                  hover_data=["n_problems"])
    fig.update_layout(legend_title="temperature", yaxis_title="pass@k", yaxis_range=[0, 1])
    fig.update_xaxes(tickvals=sorted(set(f["pass_at_k"]["k"].to_list())))
    return titled(fig, title, _caption(f))


def _maj_at_k(f: dict[str, pl.DataFrame]) -> go.Figure:
    title = "maj@k per temperature (ties broken uniformly at random)"
    if f["maj_at_k"].is_empty():
        return _greedy_only(title, f)
    fig = px.line(f["maj_at_k"], x="k", y="maj_at_k", color="T", markers=True, log_x=True,
                  hover_data=["maj_at_k_strict", "expected_ties", "n_problems"])
    fig.update_layout(legend_title="temperature", yaxis_title="maj@k", yaxis_range=[0, 1])
    fig.update_xaxes(tickvals=sorted(set(f["maj_at_k"]["k"].to_list())))
    return titled(fig, title, _caption(f))


def _solve_matrix(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["solve_matrix"].sort("temperature", "top_p")
    order = list(dict.fromkeys(frame["T"].to_list()))
    wide = frame.pivot(on="T", index="problem_id", values="solve_rate").sort("problem_id")
    fig = go.Figure(go.Heatmap(z=wide.select(order).to_numpy(), x=order, y=wide["problem_id"].to_list(),
                               colorscale="Viridis", zmin=0, zmax=1, colorbar=dict(title="solve rate")))
    fig.update_layout(xaxis_title="temperature", yaxis_title="problem", height=max(400, 18 * wide.height))
    return titled(fig, "Solve rate per problem × temperature", _caption(f))


def _coverage(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["coverage"]
    fig = go.Figure()
    for row in frame.iter_rows(named=True):
        suffix = f" (top_p={row['top_p']:.3g})" if frame.height > 1 else ""
        fig.add_trace(go.Bar(x=["best single temperature", "some temperature (union)"],
                             y=[row["best_single"], row["union"]], name=f"top_p={row['top_p']:.3g}",
                             text=[f"{row['best_single']:.2f} (T={row['T']}){suffix}", f"{row['union']:.2f}"]))
    fig.update_layout(yaxis_range=[0, 1], yaxis_title="share of problems solved", showlegend=frame.height > 1)
    return titled(fig, "Share of problems solved (pass@n): union vs. best single temperature", _caption(f))


def _voting(f: dict[str, pl.DataFrame]) -> go.Figure:
    title = "Majority vote at equal total budget: pooled temperatures vs. single ones"
    if f["voting"].is_empty():
        return _greedy_only(title, f)
    fig = px.line(f["voting"], x="k", y="maj_at_k", color="series", markers=True, log_x=True,
                  hover_data=["pass_at_k", "n_problems"])
    fig.update_layout(yaxis_title="maj@k", yaxis_range=[0, 1])
    fig.update_xaxes(tickvals=sorted(set(f["voting"]["k"].to_list())))
    return titled(fig, title, _caption(f))


def _entropy_length(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["entropy_length"]
    fig = px.line(frame, x="temperature", y="mean", facet_col="variable", markers=True,
                  error_y="std", hover_data=["p10", "p50", "p90", "n"], **_nucleus(frame))
    fig.update_yaxes(matches=None, showticklabels=True)
    return titled(fig, "Token entropy and length vs. temperature (mean ± std over samples)", _caption(f))


def _accuracy_vs_temperature(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["accuracy_vs_temperature"]
    fig = px.line(frame, x="temperature", y="pass_at_k", markers=True, hover_data=["n_problems", "truncated_share"],
                  **_nucleus(frame),
                  error_y=(frame["ci_high"] - frame["pass_at_k"]).to_list(),
                  error_y_minus=(frame["pass_at_k"] - frame["ci_low"]).to_list())
    fig.update_layout(yaxis_range=[0, 1], yaxis_title="pass@1")
    return titled(fig, "pass@1 vs. temperature (95% bootstrap CI over problems)", _caption(f))


FIGURES = {
    "pass_at_k": _pass_at_k,
    "maj_at_k": _maj_at_k,
    "solve_matrix": _solve_matrix,
    "coverage": _coverage,
    "voting": _voting,
    "entropy_length": _entropy_length,
    "accuracy_vs_temperature": _accuracy_vs_temperature,
}
