"""Study analyses: pure functions from the sample table to tidy polars frames.

`overthinking` (accuracy vs thinking budget and length, selection rules, entropy by phase
and along the trace, markers, per-problem lengths), `temperature` (pass@k, maj@k, solve
matrix, coverage, multi-temperature voting), `quantization` (each format against its
baseline, paired per sample), `moe` (accuracy, length and entropy per number of active
experts, expert load, router entropy by phase) and `findings` (the seed papers' seven
claims as statistics with intervals and computed verdicts, for `thinklab findings`). The
metrics they share (pass@k, voting, bootstrap) live in `thinklab.metrics`. Plots read
these frames; nothing here draws, generates or writes files, and nothing here imports
torch or plotly.

`all_frames` builds every study frame from one table, for notebooks that want them all
and for `benchmarks/analysis_speed.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import polars as pl

from thinklab.analysis import moe, overthinking, quantization, temperature
from thinklab.analysis.overthinking import DEFAULT_MARKERS, with_trace_stats
from thinklab.metrics import condition_columns

__all__ = ["overthinking", "temperature", "quantization", "moe", "all_frames"]


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
    """Every study frame of `df`, by name: overthinking, temperature, quantization, MoE.

    Per-token statistics are computed once (`with_trace_stats`) and shared. Every frame
    keeps the conditions that vary in `df` apart (its `by` is the varying condition
    columns minus the frame's own axis). Frames that need data the table lacks are left
    out: the level frames without a `level` column, the natural-length frame without
    uncapped samples, and:

    - the quantization frames (`quantization.paired`, `.deltas`, `.flip_matrix`,
      `.accuracy_by_format`, as quantization_paired, quantization_deltas,
      quantization_flip_matrix, accuracy_by_format) unless `quantization` holds both
      null (the baseline) and at least one format. Their per-sample entropy is the
      trace statistics' `mean_entropy` (the same NaN-skipping mean as
      `quantization.with_mean_token_entropy`, computed once);
    - the MoE frames (`moe.metrics_vs_k`, `.expert_load`, `.router_entropy_by_phase`)
      unless `moe_top_k` holds at least two distinct non-null values. They read only
      rows with a moe_top_k. expert_load and router_entropy_by_phase also need the
      routing columns with some non-null value (vLLM runs leave them null), and read
      only the rows that have them.

    `n_boot` and `seed` go to every bootstrap. If `timings` is a dict, it receives the
    seconds each step took.
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

    if "quantization" in df.columns and df["quantization"].null_count() and df["quantization"].drop_nulls().len():
        q, by_q = quantization, but("quantization")
        # only the columns the quantization frames read, with the entropy already computed
        keep = [*by_q, "quantization", *q.PAIR_ON, *(["level"] if "level" in df.columns else []), "correct", "n_tokens"]
        quant = stats.select(*dict.fromkeys(keep), mean_token_entropy=pl.col("mean_entropy"))
        frames["quantization_paired"] = step("quantization_paired", lambda: q.paired(quant, by=by_q))
        frames["quantization_deltas"] = step(
            "quantization_deltas", lambda: q.deltas(quant, by=by_q, n_boot=n_boot, seed=seed)
        )
        frames["quantization_flip_matrix"] = step("quantization_flip_matrix", lambda: q.flip_matrix(quant, by=by_q))
        frames["accuracy_by_format"] = step(
            "accuracy_by_format", lambda: q.accuracy_by_format(quant, by=by_q, n_boot=n_boot, seed=seed)
        )

    if "moe_top_k" in df.columns and df["moe_top_k"].drop_nulls().n_unique() >= 2:
        by_k = but("moe_top_k")
        # only the columns the MoE frames read (filtering the token lists would copy them)
        keep = [*by_k, "moe_top_k", "problem_id", "correct", "n_tokens", "mean_entropy",
                *[c for c in moe.ROUTING_COLUMNS if c in df.columns]]
        moe_rows = stats.select(*dict.fromkeys(keep)).filter(pl.col("moe_top_k").is_not_null())
        frames["metrics_vs_k"] = step(
            "metrics_vs_k", lambda: moe.metrics_vs_k(moe_rows, n_boot=n_boot, seed=seed, by=by_k)
        )
        if all(c in df.columns for c in moe.ROUTING_COLUMNS):
            routed = moe_rows.filter(pl.col("expert_load").is_not_null())
            if routed.height:
                frames["expert_load"] = step("expert_load", lambda: moe.expert_load(routed, by=by_k))
                frames["router_entropy_by_phase"] = step(
                    "router_entropy_by_phase",
                    lambda: moe.router_entropy_by_phase(routed, n_boot=n_boot, seed=seed, by=by_k),
                )
    return frames
