"""Study analyses: pure functions from the sample table to tidy polars frames.

`overthinking` (accuracy vs thinking budget and length, selection rules, entropy by phase
and along the trace, markers, per-problem lengths) and `temperature` (pass@k, maj@k,
solve matrix, coverage, multi-temperature voting). The metrics they share (pass@k,
voting, bootstrap) live in `thinklab.metrics`. Plots read these frames; nothing here
draws, generates or writes files.

`all_frames` builds every study frame from one table, for notebooks that want them all
and for `benchmarks/analysis_speed.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import polars as pl

from thinklab.analysis import overthinking, temperature
from thinklab.analysis.overthinking import DEFAULT_MARKERS, with_trace_stats
from thinklab.metrics import condition_columns

__all__ = ["overthinking", "temperature", "all_frames"]


def all_frames(
    df: pl.DataFrame,
    *,
    ks: Sequence[int] | None = None,
    n_bins: int = 20,
    markers: Sequence[str] = DEFAULT_MARKERS,
    n_boot: int = 1000,
    seed: int = 0,
    timings: dict[str, float] | None = None,
) -> dict[str, pl.DataFrame]:
    """Every overthinking and temperature frame of `df`, by name.

    Per-token statistics are computed once (`with_trace_stats`) and shared. Frames that
    need data the table lacks are left out: the level frames without a `level` column,
    the natural-length frame without uncapped samples. If `timings` is a dict, it
    receives the seconds each step took.
    """
    frames: dict[str, pl.DataFrame] = {}

    def step(name: str, build: Callable[[], pl.DataFrame]) -> pl.DataFrame:
        start = time.perf_counter()
        frame = build()
        if timings is not None:
            timings[name] = time.perf_counter() - start
        return frame

    stats = step("trace_stats", lambda: with_trace_stats(df, n_bins=n_bins))
    conditions = condition_columns(df)  # once, instead of once per frame

    def but(*axis: str) -> list[str]:
        return [c for c in conditions if c not in axis]

    o, t = overthinking, temperature
    frames["accuracy_vs_budget"] = step(
        "accuracy_vs_budget", lambda: o.accuracy_vs_budget(df, by=but("thinking_budget"), n_boot=n_boot, seed=seed)
    )
    if df["thinking_budget"].null_count():
        frames["accuracy_vs_length"] = step(
            "accuracy_vs_length",
            lambda: o.accuracy_vs_length(df, by=but("thinking_budget", "wait_extensions"), n_boot=n_boot, seed=seed),
        )
    if "level" in df.columns:
        by_level = step("accuracy_by_level", lambda: o.accuracy_by_level(df, by=but(), n_boot=n_boot, seed=seed))
        frames["accuracy_by_level"] = by_level
        if "thinking_budget" in conditions:
            frames["best_budget_per_level"] = step(
                "best_budget_per_level",
                lambda: o.best_budget_per_level(df, by=but("thinking_budget"), by_level=by_level),
            )
    frames["selection_accuracy"] = step(
        "selection_accuracy", lambda: o.selection_accuracy(df, by=but(), n_boot=n_boot, seed=seed)
    )
    frames["length_distribution"] = step("length_distribution", lambda: o.length_distribution(df, by=but()))
    frames["length_histogram"] = step("length_histogram", lambda: o.length_histogram(df, by=but()))
    frames["problem_length_stats"] = step("problem_length_stats", lambda: o.problem_length_stats(df, by=but()))
    frames["phase_entropy"] = step("phase_entropy", lambda: o.phase_entropy(stats, by=but()))
    frames["entropy_length_correlation"] = step(
        "entropy_length_correlation", lambda: o.entropy_length_correlation(stats, by=but())
    )
    frames["entropy_along_trace"] = step(
        "entropy_along_trace", lambda: o.entropy_along_trace(stats, n_bins=n_bins, by=but())
    )
    frames["marker_rates"] = step("marker_rates", lambda: o.marker_rates(df, markers, by=but()))

    axis = "temperature"
    frames["pass_at_k_curve"] = step("pass_at_k_curve", lambda: t.pass_at_k_curve(df, ks, by=but(axis)))
    frames["maj_at_k_curve"] = step("maj_at_k_curve", lambda: t.maj_at_k_curve(df, ks, by=but(axis), seed=seed))
    frames["solve_matrix"] = step("solve_matrix", lambda: t.solve_matrix(df, by=but(axis)))
    frames["coverage"] = step("coverage", lambda: t.coverage(df, by=but(axis)))
    frames["entropy_length_vs_temperature"] = step(
        "entropy_length_vs_temperature", lambda: t.entropy_length_vs_temperature(stats, by=but(axis))
    )
    frames["accuracy_vs_temperature"] = step(
        "accuracy_vs_temperature", lambda: t.accuracy_vs_temperature(df, by=but(axis), n_boot=n_boot, seed=seed)
    )
    frames["multi_temperature_voting"] = step(
        "multi_temperature_voting", lambda: t.multi_temperature_voting(df, ks, by=but(axis), seed=seed)
    )
    return frames
