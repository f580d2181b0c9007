"""Study 1, overthinking: accuracy against how long a model thinks.

Conditions: one run per (thinking budget, "Wait" extensions) over the same problems and
seeds; an uncapped budget (None) gives the natural lengths. `frames` computes every table
the figures read (from `thinklab.analysis.overthinking`); each `FIGURES` entry draws one
of them and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import polars as pl

from thinklab import plots
from thinklab.analysis import overthinking as ana
from thinklab.config import BudgetSpec, RunSpec
from thinklab.plots import ci_errors, mark_truncation, normal_ci, outcome_args, placeholder, titled
from thinklab.studies import common
from thinklab.studies.common import grid, non_empty, positive

__all__ = ["STUDY", "Params", "conditions", "run", "frames", "FIGURES"]

STUDY = "overthinking"
_BY = ["task", "model"]
_CONDITION = [*_BY, "thinking_budget", "wait_extensions"]


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The overthinking study's parameters: the shared ones, then its knobs."""

    n_samples: int = field(default=4, metadata=positive())
    max_tokens: int = field(default=160, metadata=positive())
    temperature: float = field(default=0.8, metadata=common.TEMPERATURE)
    budgets: tuple[int | None, ...] = field(default=(16, 48, None), metadata=grid(positive()))
    extensions: tuple[int, ...] = field(default=(0,), metadata=grid(common.rule(lambda v: v >= 0, "an int >= 0")))
    answer_budget: int = field(default=24, metadata=positive())
    markers: tuple[str, ...] = field(default=("wait", "hmm", "alternatively", "let me check", "actually", "so"),
                                     metadata=grid(non_empty("a non-empty string")))


def conditions(params: Params) -> list[RunSpec]:
    """One RunSpec per (budget, extensions); the same problems and seeds in each."""
    return [
        params.run_spec(params.temperature,
                        budget=BudgetSpec(thinking_budget=budget, wait_extensions=ext, answer_budget=params.answer_budget))
        for budget in params.budgets
        for ext in params.extensions
    ]


def run(specs: Sequence[RunSpec], progress: bool = True, runs_root: Path | str | None = None) -> pl.DataFrame:
    """The sample table of every condition, with per-sample entropy statistics added."""
    return ana.with_trace_stats(common.run_conditions(specs, progress=progress, runs_root=runs_root, study=STUDY,
                                                      knobs=["thinking_budget"]))


# --------------------------------------------------------------------------- frames


def _budget(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        budget=pl.when(pl.col("thinking_budget").is_null()).then(pl.lit("uncapped"))
        .otherwise(pl.col("thinking_budget").cast(pl.Utf8))
    )


# What each selection method keeps; "oracle" is not a method one could run: an upper bound.
_METHODS = {"shortest": "shortest (First Finish)", "longest": "longest", "random": "random (expected)",
           "majority": "majority vote", "oracle": "oracle (any correct: bound)"}


def _natural(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("thinking_budget").is_null() & (pl.col("wait_extensions").fill_null(0) == 0))


def frames(df: pl.DataFrame, params: Params | None = None) -> dict[str, pl.DataFrame]:
    """Every table behind the figures (same names as `FIGURES`), plus `summary` (n and the
    truncated share per condition) and the tables the notebook shows beside them."""
    p = params or Params()
    df = ana.ensure_trace_stats(df)
    boot = dict(n_boot=p.n_boot, seed=p.seed)
    by_budget = ana.accuracy_vs_budget(df, by=[*_BY, "wait_extensions"], **boot)
    natural = _natural(df)

    def _graded(frame: pl.DataFrame) -> pl.DataFrame:
        return common.with_outcome(common.graded(frame), df)

    return {
        "summary": _budget(common.summary(df, _CONDITION)),
        "accuracy_vs_budget": _budget(common.with_truncation(by_budget, df, _CONDITION)).with_columns(
            condition=pl.format("{} · {} · wait×{}", "task", "model", "wait_extensions")),
        "accuracy_vs_length": ana.accuracy_vs_length(df, by=_BY, **boot) if natural.height else pl.DataFrame(),
        "selection": _budget(ana.selection_accuracy(df, by=[*_BY, "thinking_budget", "wait_extensions"], **boot))
        .with_columns(method_label=pl.col("method").replace_strict(_METHODS, default=pl.col("method"))),
        "length_correct_vs_incorrect": _graded(_budget(df.select(
            *_CONDITION, "problem_id", "sample_idx", "correct", "n_tokens", "finish_reason"))),
        "phase_entropy": _graded(ana.phase_entropy(df, by=_BY).filter(pl.col("phase") != "all")),
        "entropy_along_trace": _graded(ana.entropy_along_trace(df, by=_BY)),
        "markers": _graded(ana.marker_rates(df, p.markers, field="text", by=_BY)),
        "problem_lengths": (ana.problem_length_stats(natural, length="n_tokens", by=_BY).sort("mean")
                            .with_row_index("rank") if natural.height else pl.DataFrame()),
        "length_distribution": ana.length_distribution(df, length="n_tokens", by=[*_BY, "thinking_budget"]),
        "entropy_length_correlation": ana.entropy_length_correlation(df, by=_BY),
    }


# --------------------------------------------------------------------------- figures


def _error_bars(frame: pl.DataFrame, y: str = "accuracy") -> dict:
    return ci_errors(frame, y)


def _accuracy_vs_budget(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame, title = f["accuracy_vs_budget"], "Accuracy vs. thinking budget (95% bootstrap CI over problems)"
    frame = frame.sort("condition", "mean_thinking_tokens").with_columns(
        point=pl.when(pl.col("thinking_budget").is_null()).then(pl.lit("uncapped"))
        .otherwise(pl.format("budget {}", "budget")),
        condition=pl.format("{} (n={} per budget)", "condition", pl.col("n").max().over("condition")))
    fig = px.line(frame, x="mean_thinking_tokens", y="accuracy", color="condition", markers=True, text="point",
                  template=plots.TEMPLATE, labels=plots.LABELS,
                  hover_data=["budget", "n", "n_problems", "share_capped", "truncated_share"], **_error_bars(frame))
    fig.update_traces(textposition="top center", marker_size=9, cliponaxis=False)
    fig.update_layout(xaxis_title="mean thinking tokens used (tokens)", yaxis_title="accuracy",
                      yaxis_range=[0, 1.05], legend_title="", legend=dict(orientation="h", y=-0.2))
    return titled(fig, title, common.caption(f["summary"]))


def _no_natural_lengths(f: dict[str, pl.DataFrame]) -> str:
    """Why the natural-length tables are empty."""
    if _natural(f["summary"]).height:
        return "the uncapped samples all have one thinking length: nothing to bucket"
    return "no uncapped samples without extensions: add None to budgets and 0 to extensions"


def _accuracy_vs_length(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame, title = f["accuracy_vs_length"], "Accuracy vs. natural thinking length (uncapped samples, length buckets)"
    if frame.is_empty():
        return placeholder(title, _no_natural_lengths(f), common.caption(f["summary"]))
    frame = frame.with_columns(task=pl.format("{} (n={})", "task", pl.col("n").sum().over("task")))
    fig = px.line(frame, x="mean_length", y="accuracy", color="task", markers=True, template=plots.TEMPLATE, labels=plots.LABELS,
                  hover_data=["n", "length_low", "length_high"], **_error_bars(frame))
    fig.update_layout(xaxis_title="thinking tokens (bucket mean)", yaxis_title="accuracy", yaxis_range=[0, 1.05])
    return titled(fig, title, common.caption(f["summary"]))


def _selection(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["selection"].with_columns(
        budget=pl.format("{} (n={} problems)", "budget", pl.col("n_problems").max().over("budget")),
        shown=pl.col("accuracy").map_elements(lambda v: f"{v:.2f}", return_dtype=pl.Utf8))
    fig = px.bar(frame, x="method_label", y="accuracy", color="budget", barmode="group", facet_col="task",
                 text="shown", template=plots.TEMPLATE, labels={**plots.LABELS, "method_label": "which sample is kept"},
                 category_orders={"method_label": [_METHODS[m] for m in _METHODS if m in set(frame["method"])]},
                 hover_data=["n_problems", "wait_extensions"], **_error_bars(frame))
    fig.update_traces(textposition="outside", cliponaxis=False)  # a 0 still shows as "0.00"
    fig.update_yaxes(range=[0, 1.12])
    fig.update_layout(legend_title="thinking budget")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    return titled(fig, "Which of n samples to keep (the oracle is an upper bound: correct if any sample is)",
                  common.caption(f["summary"]))


def _length_correct_vs_incorrect(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["length_correct_vs_incorrect"]
    fig = px.box(frame, x="budget", y="n_tokens", points="all", template=plots.TEMPLATE, labels=plots.LABELS,
                 hover_data=["problem_id", "sample_idx", "finish_reason"], **outcome_args(frame))
    fig.update_layout(yaxis_title="generated tokens", xaxis_title="thinking budget (tokens)", legend_title="",
                      yaxis_rangemode="tozero")
    mark_truncation(fig, frame)
    return titled(fig, "Generated length of correct vs. incorrect samples", common.caption(f["summary"]))


def _phase_entropy(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["phase_entropy"]
    frame = frame.with_columns(ci=normal_ci(frame["std"], frame["n"]),
                               shown=pl.col("mean_entropy").map_elements(lambda v: f"{v:.2f}", return_dtype=pl.Utf8))
    fig = px.bar(frame, x="phase", y="mean_entropy", barmode="group", facet_col="task", error_y="ci", text="shown",
                 hover_data=["n", "std"], template=plots.TEMPLATE, labels=plots.LABELS, **outcome_args(frame))
    fig.update_traces(textposition="outside", cliponaxis=False)
    fig.update_yaxes(title_text="mean token entropy (nats)", col=1, rangemode="tozero")
    fig.update_layout(legend_title="")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    return titled(fig, "Mean token entropy by phase (PEAR): thinking vs. answer (95% CI over samples)",
                  common.caption(f["summary"]))


def _entropy_along_trace(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["entropy_along_trace"]
    frame = frame.with_columns(ci=normal_ci(frame["std"], frame["n_samples"]))
    fig = go.Figure()
    tasks = frame["task"].unique(maintain_order=True).to_list()
    for (task, outcome), group in frame.sort("task", "outcome", "position").group_by(["task", "outcome"],
                                                                                      maintain_order=True):
        color = plots.OUTCOME_COLORS[outcome.split(" (n=")[0]]
        name = outcome if len(tasks) == 1 else f"{task}: {outcome}"
        x, y, ci = group["position"].to_list(), group["mean_entropy"].to_list(), group["ci"].to_list()
        band_y = [m + c for m, c in zip(y, ci)] + [m - c for m, c in zip(y[::-1], ci[::-1])]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=band_y, fill="toself", fillcolor=color, opacity=0.18,
                                 line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=name))
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, legendgroup=name,
                                 line=dict(color=color, dash="solid" if tasks.index(task) == 0 else "dash"),
                                 customdata=group["n_samples"].to_list(),
                                 hovertemplate="position %{x:.2f}<br>%{y:.3f} nats<br>n=%{customdata}<extra></extra>"))
    fig.update_layout(template=plots.TEMPLATE, xaxis_title="position in trace (0 = start, 1 = end)",
                      yaxis_title="mean token entropy (nats)", legend_title="")
    return titled(fig, "Token entropy along the trace: mean with 95% CI band over samples",
                  common.caption(f["summary"]))


def _markers(f: dict[str, pl.DataFrame]) -> go.Figure:
    # 95% interval of a Poisson rate: 1.96 sqrt(count) per n_tokens, in occurrences per 1k tokens
    frame = f["markers"].with_columns(
        shown=pl.col("per_1k").map_elements(lambda v: f"{v:.1f}", return_dtype=pl.Utf8),
        ci=(1.96 * pl.col("count").cast(pl.Float64).sqrt() / pl.col("n_tokens").cast(pl.Float64) * 1000).fill_nan(0.0))
    fig = px.bar(frame, x="marker", y="per_1k", barmode="group", facet_col="task", text="shown", template=plots.TEMPLATE,
                 labels=plots.LABELS, hover_data=["count", "n_samples", "share_with"], error_y="ci",
                 **outcome_args(frame))
    fig.update_traces(textposition="outside", cliponaxis=False)  # a zero rate still shows as "0.0"
    fig.update_yaxes(title_text="occurrences per 1k tokens", col=1, rangemode="tozero")
    fig.update_layout(legend_title="")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    return titled(fig, "Hedging and reflection markers per 1k tokens (95% Poisson CI)", common.caption(f["summary"]))


def _problem_lengths(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["problem_lengths"]
    title = "Per-problem length over its samples (CASTILLO): median with p10–p90, uncapped runs"
    if frame.is_empty():
        return placeholder(title, _no_natural_lengths(f), common.caption(f["summary"]))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=frame["rank"].to_list(), y=frame["p50"].to_list(), mode="markers",
                             name=f"median, p10–p90 (n={frame.height} problems)",
                             error_y=dict(type="data", symmetric=False,
                                          array=(frame["p90"] - frame["p50"]).to_list(),
                                          arrayminus=(frame["p50"] - frame["p10"]).to_list()),
                             text=frame["problem_id"].to_list()))
    fig.add_trace(go.Scatter(x=frame["rank"].to_list(), y=frame["mean"].to_list(), mode="lines", name="mean"))
    fig.update_layout(template=plots.TEMPLATE, xaxis_title="problem (sorted by mean length)", yaxis_title="generated tokens")
    return titled(fig, title, common.caption(f["summary"]))


FIGURES = {
    "accuracy_vs_budget": _accuracy_vs_budget,
    "accuracy_vs_length": _accuracy_vs_length,
    "selection": _selection,
    "length_correct_vs_incorrect": _length_correct_vs_incorrect,
    "phase_entropy": _phase_entropy,
    "entropy_along_trace": _entropy_along_trace,
    "markers": _markers,
    "problem_lengths": _problem_lengths,
}
