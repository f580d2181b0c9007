"""Study 2, temperature: which temperatures solve which problems, and what voting buys.

Conditions: one run per temperature (optionally × top_p) over the same problems and base
seed, so sample i of a problem has the same seed at every temperature. Every metric is a
function of the sample table (`thinklab.analysis.temperature`); nothing regenerates.
"""

from __future__ import annotations

from typing import Sequence

import plotly.express as px
import plotly.graph_objects as go
import polars as pl

from thinklab.analysis import overthinking as ot
from thinklab.analysis import temperature as ana
from thinklab.config import ModelSpec, RunSpec, SamplingSpec
from thinklab.studies.common import run_conditions

STUDY = "temperature"


def conditions(
    model: str = "default",
    backend: str = "hf",
    task: str = "rg:basic_arithmetic",
    temperatures: Sequence[float] = (0.0, 0.6, 1.0),
    top_ps: Sequence[float] = (1.0,),
    n_problems: int = 8,
    n_samples: int = 8,
    max_tokens: int = 128,
    seed: int = 0,
) -> list[RunSpec]:
    """One RunSpec per (temperature, top_p). Greedy (T=0) draws one sample: all n would be equal."""
    specs = []
    for temperature in temperatures:
        for top_p in top_ps:
            specs.append(RunSpec(
                model=ModelSpec(name=model, backend=backend),
                task=task,
                n_problems=n_problems,
                task_seed=seed,
                sampling=SamplingSpec(temperature=temperature, top_p=top_p, n=1 if temperature == 0 else n_samples,
                                      max_tokens=max_tokens, seed=seed),
            ))
    return specs


def run(specs: Sequence[RunSpec], progress: bool = True) -> pl.DataFrame:
    return ot.with_trace_stats(run_conditions(specs, progress=progress))


def sampled(df: pl.DataFrame) -> pl.DataFrame:
    """The stochastic conditions (greedy has one sample per problem; k-curves need n > 1)."""
    return df.filter(pl.col("temperature") > 0)


def _label(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col("temperature").round(3).cast(pl.Utf8).alias("T"))


def fig_pass_at_k(df: pl.DataFrame, ks: Sequence[int] | None = None) -> go.Figure:
    frame = _label(ana.pass_at_k_curve(sampled(df), ks, by=()))
    fig = px.line(frame, x="k", y="pass_at_k", color="T", markers=True, log_x=True)
    fig.update_layout(title="pass@k per temperature (unbiased estimator)", legend_title="temperature",
                      yaxis_title="pass@k", yaxis_range=[0, 1])
    return fig


def fig_maj_at_k(df: pl.DataFrame, ks: Sequence[int] | None = None) -> go.Figure:
    frame = _label(ana.maj_at_k_curve(sampled(df), ks, by=()))
    fig = px.line(frame, x="k", y="maj_at_k", color="T", markers=True, log_x=True,
                  hover_data=["maj_at_k_strict", "expected_ties"])
    fig.update_layout(title="maj@k per temperature (ties broken uniformly at random)", legend_title="temperature",
                      yaxis_title="maj@k", yaxis_range=[0, 1])
    return fig


def fig_solve_matrix(df: pl.DataFrame) -> go.Figure:
    frame = ana.solve_matrix(df, by=())
    wide = frame.pivot(on="temperature", index="problem_id", values="solve_rate").sort("problem_id")
    temps = [c for c in wide.columns if c != "problem_id"]
    fig = go.Figure(go.Heatmap(z=wide.select(temps).to_numpy(), x=temps, y=wide["problem_id"].to_list(),
                               colorscale="Viridis", zmin=0, zmax=1, colorbar=dict(title="solve rate")))
    fig.update_layout(title="Solve rate per problem × temperature", xaxis_title="temperature", yaxis_title="problem",
                      height=max(400, 18 * wide.height))
    return fig


def fig_coverage(df: pl.DataFrame) -> go.Figure:
    frame = ana.coverage(df, by=())
    row = frame.row(0, named=True)
    fig = go.Figure(go.Bar(x=["best single temperature", "some temperature (union)"],
                           y=[row["best_single"], row["union"]],
                           text=[f"{row['best_single']:.2f} (T={row['best_condition']})", f"{row['union']:.2f}"]))
    fig.update_layout(title=f"Share of {row['n_problems']} problems solved (pass@n): union vs. best single temperature",
                      yaxis_range=[0, 1], yaxis_title="share of problems solved")
    return fig


def fig_voting(df: pl.DataFrame, ks: Sequence[int] | None = None) -> go.Figure:
    frame = ana.multi_temperature_voting(sampled(df), ks, by=())
    frame = frame.with_columns(pl.format("{} {}", "scheme", pl.col("temperature").cast(pl.Utf8).fill_null("")).alias("series"))
    fig = px.line(frame, x="k", y="maj_at_k", color="series", markers=True, log_x=True)
    fig.update_layout(title="Majority vote at equal total budget: pooled temperatures vs. single ones",
                      yaxis_title="maj@k", yaxis_range=[0, 1])
    return fig


def fig_entropy_length(df: pl.DataFrame) -> go.Figure:
    frame = ana.entropy_length_vs_temperature(df, by=())
    fig = px.line(frame, x="temperature", y="mean", facet_col="variable", markers=True,
                  error_y="std", hover_data=["p10", "p50", "p90", "n"])
    fig.update_yaxes(matches=None)
    fig.update_layout(title="Token entropy and length vs. temperature (mean ± std over samples)")
    return fig


def fig_accuracy_vs_temperature(df: pl.DataFrame, k: int = 1) -> go.Figure:
    frame = ana.accuracy_vs_temperature(df, k=k, by=())
    fig = px.line(frame, x="temperature", y="pass_at_k", markers=True,
                  error_y=(frame["ci_high"] - frame["pass_at_k"]).to_list(),
                  error_y_minus=(frame["pass_at_k"] - frame["ci_low"]).to_list())
    fig.update_layout(title=f"pass@{k} vs. temperature (95% bootstrap CI over problems)", yaxis_range=[0, 1])
    return fig


FIGURES = {
    "pass_at_k": fig_pass_at_k,
    "maj_at_k": fig_maj_at_k,
    "solve_matrix": fig_solve_matrix,
    "coverage": fig_coverage,
    "voting": fig_voting,
    "entropy_length": fig_entropy_length,
    "accuracy_vs_temperature": fig_accuracy_vs_temperature,
}
