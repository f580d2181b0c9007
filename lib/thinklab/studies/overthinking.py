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

from thinklab.analysis import overthinking as ana
from thinklab.config import BudgetSpec, RunSpec
from thinklab.plots import placeholder, titled
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
    return ana.with_trace_stats(common.run_conditions(specs, progress=progress, runs_root=runs_root))


# --------------------------------------------------------------------------- frames


def _budget(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        budget=pl.when(pl.col("thinking_budget").is_null()).then(pl.lit("uncapped"))
        .otherwise(pl.col("thinking_budget").cast(pl.Utf8))
    )


def _graded(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(graded=pl.when(pl.col("correct")).then(pl.lit("correct")).otherwise(pl.lit("incorrect")))


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
    return {
        "summary": _budget(common.summary(df, _CONDITION)),
        "accuracy_vs_budget": _budget(common.with_truncation(by_budget, df, _CONDITION)).with_columns(
            condition=pl.format("{} · {} · wait×{}", "task", "model", "wait_extensions")),
        "accuracy_vs_length": ana.accuracy_vs_length(df, by=_BY, **boot) if natural.height else pl.DataFrame(),
        "selection": _budget(ana.selection_accuracy(df, by=[*_BY, "thinking_budget", "wait_extensions"], **boot)),
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
    return dict(error_y=(frame["ci_high"] - frame[y]).to_list(), error_y_minus=(frame[y] - frame["ci_low"]).to_list())


def _accuracy_vs_budget(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame, title = f["accuracy_vs_budget"], "Accuracy vs. thinking budget (95% bootstrap CI over problems)"
    fig = px.line(frame, x="mean_thinking_tokens", y="accuracy", color="condition", markers=True, text="budget",
                  hover_data=["budget", "n", "n_problems", "share_capped", "truncated_share"], **_error_bars(frame))
    fig.update_traces(textposition="top center")
    fig.update_layout(xaxis_title="mean thinking tokens at the budget", yaxis_title="accuracy", yaxis_range=[0, 1])
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
    fig = px.line(frame, x="mean_length", y="accuracy", color="task", markers=True,
                  hover_data=["n", "length_low", "length_high"], **_error_bars(frame))
    fig.update_layout(xaxis_title="thinking tokens (bucket mean)", yaxis_title="accuracy", yaxis_range=[0, 1])
    return titled(fig, title, common.caption(f["summary"]))


def _selection(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["selection"]
    fig = px.bar(frame, x="method", y="accuracy", color="budget", barmode="group", facet_col="task",
                 hover_data=["n_problems", "wait_extensions"], **_error_bars(frame))
    fig.update_layout(yaxis_range=[0, 1])
    return titled(fig, "Which of n samples to keep: shortest (First Finish), longest, random, majority vote, "
                       "oracle (any correct)", common.caption(f["summary"]))


def _length_correct_vs_incorrect(f: dict[str, pl.DataFrame]) -> go.Figure:
    fig = px.box(f["length_correct_vs_incorrect"], x="budget", y="n_tokens", color="graded", points="all",
                 hover_data=["problem_id", "sample_idx", "finish_reason"])
    fig.update_layout(yaxis_title="tokens")
    return titled(fig, "Generated length of correct vs. incorrect samples", common.caption(f["summary"]))


def _phase_entropy(f: dict[str, pl.DataFrame]) -> go.Figure:
    fig = px.bar(f["phase_entropy"], x="phase", y="mean_entropy", color="graded", barmode="group", facet_col="task",
                 error_y="std", hover_data=["n"])
    fig.update_layout(yaxis_title="nats")
    return titled(fig, "Mean token entropy by phase (PEAR): thinking vs. answer", common.caption(f["summary"]))


def _entropy_along_trace(f: dict[str, pl.DataFrame]) -> go.Figure:
    fig = px.line(f["entropy_along_trace"], x="position", y="mean_entropy", color="graded", line_dash="task",
                  markers=True, hover_data=["n_samples"])
    fig.update_layout(xaxis_title="position in trace (0 = start, 1 = end)", yaxis_title="mean entropy (nats)")
    return titled(fig, "Token entropy along the trace (normalized position)", common.caption(f["summary"]))


def _markers(f: dict[str, pl.DataFrame]) -> go.Figure:
    fig = px.bar(f["markers"], x="marker", y="per_1k", color="graded", barmode="group", facet_col="task",
                 hover_data=["count", "n_samples", "share_with"])
    fig.update_layout(yaxis_title="per 1k tokens")
    return titled(fig, "Hedging and reflection markers per 1k tokens", common.caption(f["summary"]))


def _problem_lengths(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["problem_lengths"]
    title = "Per-problem length over its samples (CASTILLO): median with p10–p90, uncapped runs"
    if frame.is_empty():
        return placeholder(title, _no_natural_lengths(f), common.caption(f["summary"]))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=frame["rank"].to_list(), y=frame["p50"].to_list(), mode="markers", name="median",
                             error_y=dict(type="data", symmetric=False,
                                          array=(frame["p90"] - frame["p50"]).to_list(),
                                          arrayminus=(frame["p50"] - frame["p10"]).to_list()),
                             text=frame["problem_id"].to_list()))
    fig.add_trace(go.Scatter(x=frame["rank"].to_list(), y=frame["mean"].to_list(), mode="lines", name="mean"))
    fig.update_layout(xaxis_title="problem (sorted by mean length)", yaxis_title="tokens")
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
