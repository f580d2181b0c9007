"""Study 1, overthinking: accuracy against how long a model thinks.

Conditions: one run per (task, thinking budget, "Wait" extensions); an uncapped budget
(None) gives the natural lengths. Figures read the frames of
`thinklab.analysis.overthinking`; nothing here generates except `run`.
"""

from __future__ import annotations

from typing import Sequence

import plotly.express as px
import plotly.graph_objects as go
import polars as pl

from thinklab.analysis import overthinking as ana
from thinklab.config import BudgetSpec, ModelSpec, RunSpec, SamplingSpec
from thinklab.studies.common import run_conditions

STUDY = "overthinking"


def conditions(
    model: str = "default",
    backend: str = "hf",
    tasks: Sequence[str] = ("rg:basic_arithmetic",),
    n_problems: int = 8,
    n_samples: int = 4,
    budgets: Sequence[int | None] = (None,),
    extensions: Sequence[int] = (0,),
    temperature: float = 0.8,
    top_p: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
    answer_budget: int = 32,
) -> list[RunSpec]:
    """One RunSpec per (task, budget, extensions); the same problems and seeds in each."""
    specs = []
    for task in tasks:
        for budget in budgets:
            for ext in extensions:
                specs.append(RunSpec(
                    model=ModelSpec(name=model, backend=backend),
                    task=task,
                    n_problems=n_problems,
                    task_seed=seed,
                    sampling=SamplingSpec(temperature=temperature, top_p=top_p, n=n_samples,
                                          max_tokens=max_tokens, seed=seed),
                    budget=BudgetSpec(thinking_budget=budget, wait_extensions=ext, answer_budget=answer_budget),
                ))
    return specs


def run(specs: Sequence[RunSpec], progress: bool = True) -> pl.DataFrame:
    """The sample table of every condition, with per-sample entropy statistics added."""
    return ana.with_trace_stats(run_conditions(specs, progress=progress))


def _budget_label(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(
        pl.when(pl.col("thinking_budget").is_null()).then(pl.lit("uncapped"))
        .otherwise(pl.col("thinking_budget").cast(pl.Utf8)).alias("budget")
    )


def _error_bars(frame: pl.DataFrame, y: str = "accuracy") -> dict:
    return dict(error_y=(frame["ci_high"] - frame[y]).to_list(), error_y_minus=(frame[y] - frame["ci_low"]).to_list())


def fig_accuracy_vs_budget(df: pl.DataFrame) -> go.Figure:
    frame = _budget_label(ana.accuracy_vs_budget(df, by=["task", "model", "wait_extensions"]))
    frame = frame.with_columns(pl.format("{} · {} · wait×{}", "task", "model", "wait_extensions").alias("condition"))
    fig = px.line(frame, x="mean_thinking_tokens", y="accuracy", color="condition", markers=True,
                  hover_data=["budget", "n", "share_capped"], **_error_bars(frame))
    fig.update_layout(title="Accuracy vs. thinking budget (95% bootstrap CI over problems)",
                      xaxis_title="mean thinking tokens at the budget", yaxis_title="accuracy", yaxis_range=[0, 1])
    return fig


def fig_accuracy_vs_length(df: pl.DataFrame) -> go.Figure:
    frame = ana.accuracy_vs_length(df, by=["task", "model"])
    fig = px.line(frame, x="mean_length", y="accuracy", color="task", markers=True,
                  hover_data=["n", "length_low", "length_high"], **_error_bars(frame))
    fig.update_layout(title="Accuracy vs. natural thinking length (uncapped samples, length buckets)",
                      xaxis_title="thinking tokens (bucket mean)", yaxis_title="accuracy", yaxis_range=[0, 1])
    return fig


def fig_selection(df: pl.DataFrame) -> go.Figure:
    frame = _budget_label(ana.selection_accuracy(df, by=["task", "model", "thinking_budget"]))
    fig = px.bar(frame, x="method", y="accuracy", color="budget", barmode="group", facet_col="task",
                 hover_data=["n_problems"], **_error_bars(frame))
    fig.update_layout(title="Which of n samples to keep: shortest (First Finish), longest, random, majority vote",
                      yaxis_range=[0, 1])
    return fig


def fig_length_correct_vs_incorrect(df: pl.DataFrame) -> go.Figure:
    frame = df.with_columns(pl.when(pl.col("correct")).then(pl.lit("correct")).otherwise(pl.lit("incorrect")).alias("graded"))
    fig = px.box(_budget_label(frame), x="budget", y="n_tokens", color="graded", points="all",
                 hover_data=["problem_id", "sample_idx"])
    fig.update_layout(title="Generated length of correct vs. incorrect samples", yaxis_title="tokens")
    return fig


def fig_phase_entropy(df: pl.DataFrame) -> go.Figure:
    frame = ana.phase_entropy(df, by=["task", "model"]).filter(pl.col("phase") != "all")
    frame = frame.with_columns(pl.when(pl.col("correct")).then(pl.lit("correct")).otherwise(pl.lit("incorrect")).alias("graded"))
    fig = px.bar(frame, x="phase", y="mean_entropy", color="graded", barmode="group", facet_col="task",
                 error_y="std", hover_data=["n"])
    fig.update_layout(title="Mean token entropy by phase (PEAR): thinking vs. answer", yaxis_title="nats")
    return fig


def fig_entropy_along_trace(df: pl.DataFrame) -> go.Figure:
    frame = ana.entropy_along_trace(df, by=["task", "model"])
    frame = frame.with_columns(pl.when(pl.col("correct")).then(pl.lit("correct")).otherwise(pl.lit("incorrect")).alias("graded"))
    fig = px.line(frame, x="position", y="mean_entropy", color="graded", line_dash="task", markers=True)
    fig.update_layout(title="Token entropy along the trace (normalized position)", xaxis_title="position in trace (0 = start, 1 = end)",
                      yaxis_title="mean entropy (nats)")
    return fig


def fig_markers(df: pl.DataFrame, markers: Sequence[str] = ana.DEFAULT_MARKERS) -> go.Figure:
    frame = ana.marker_rates(df, markers, field="text", by=["task", "model"])
    frame = frame.with_columns(pl.when(pl.col("correct")).then(pl.lit("correct")).otherwise(pl.lit("incorrect")).alias("graded"))
    fig = px.bar(frame, x="marker", y="per_1k", color="graded", barmode="group", facet_col="task")
    fig.update_layout(title="Hedging and reflection markers per 1k tokens", yaxis_title="per 1k tokens")
    return fig


def fig_problem_lengths(df: pl.DataFrame) -> go.Figure:
    frame = ana.problem_length_stats(df.filter(pl.col("thinking_budget").is_null()), length="n_tokens", by=["task", "model"])
    frame = frame.sort("mean").with_row_index("rank")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=frame["rank"].to_list(), y=frame["p50"].to_list(), mode="markers", name="median",
                             error_y=dict(type="data", symmetric=False,
                                          array=(frame["p90"] - frame["p50"]).to_list(),
                                          arrayminus=(frame["p50"] - frame["p10"]).to_list()),
                             text=frame["problem_id"].to_list()))
    fig.add_trace(go.Scatter(x=frame["rank"].to_list(), y=frame["mean"].to_list(), mode="lines", name="mean"))
    fig.update_layout(title="Per-problem length over its samples (CASTILLO): median with p10–p90, uncapped runs",
                      xaxis_title="problem (sorted by mean length)", yaxis_title="tokens")
    return fig


FIGURES = {
    "accuracy_vs_budget": fig_accuracy_vs_budget,
    "accuracy_vs_length": fig_accuracy_vs_length,
    "selection": fig_selection,
    "length_correct_vs_incorrect": fig_length_correct_vs_incorrect,
    "phase_entropy": fig_phase_entropy,
    "entropy_along_trace": fig_entropy_along_trace,
    "markers": fig_markers,
    "problem_lengths": fig_problem_lengths,
}
