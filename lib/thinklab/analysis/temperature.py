"""Temperature analyses: pass@k and voting across a temperature grid.

The measurements of "On the Role of Temperature Sampling in Test-Time Scaling" and of
pass@k sampling studies, as functions of a sample table holding one run per
temperature over the same problems and seeds. Every function takes the table and
returns a tidy polars frame; nothing regenerates anything.

`condition` names the axis (default `temperature`; any column works, e.g. `top_p`).
`by=None` groups by every other condition column that varies in the table (see
`thinklab.metrics.condition_columns`); pass `by=()` to pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from thinklab import metrics
from thinklab.analysis.overthinking import ensure_trace_stats

__all__ = [
    "default_ks",
    "pass_at_k_curve",
    "maj_at_k_curve",
    "solve_matrix",
    "coverage",
    "entropy_length_vs_temperature",
    "accuracy_vs_temperature",
    "multi_temperature_voting",
]


def _by(df: pl.DataFrame, by: Sequence[str] | None, condition: str) -> list[str]:
    return metrics.condition_columns(df, exclude=[condition]) if by is None else list(by)


def default_ks(df: pl.DataFrame, by: Sequence[str] = ()) -> list[int]:
    """Powers of two up to the largest number of samples per problem, and that number."""
    n_max = int(df.lazy().group_by([*by, "problem_id"]).len().select(pl.col("len").max()).collect().item() or 1)
    return sorted({*(2**i for i in range(int(np.log2(n_max)) + 1)), n_max})


def pass_at_k_curve(
    df: pl.DataFrame,
    ks: Sequence[int] | None = None,
    *,
    condition: str = "temperature",
    by: Sequence[str] | None = None,
    n_boot: int = 0,
    level: float = 0.95,
    seed: int = 0,
) -> pl.DataFrame:
    """Mean pass@k over problems per value of `condition` and k (log-k curves).

    Only problems with at least k samples count at each k. With n_boot > 0 adds a
    clustered bootstrap interval. Returns `by`..., `condition`, k, pass_at_k,
    n_problems[, ci_low, ci_high].
    """
    keys = [*_by(df, by, condition), condition]
    ks = default_ks(df, keys) if ks is None else ks
    table = metrics.pass_at_k_table(df, ks, keys)
    out = table.group_by([*keys, "k"]).agg(pass_at_k=pl.col("pass_at_k").mean(), n_problems=pl.len())
    if n_boot > 0:
        ci = metrics.bootstrap_ci(table, "pass_at_k", by=[*keys, "k"], n_boot=n_boot, level=level, seed=seed)
        out = out.join(ci.select(*keys, "k", "ci_low", "ci_high"), on=[*keys, "k"], nulls_equal=True)
    return out.sort([*keys, "k"], nulls_last=True)


def maj_at_k_curve(
    df: pl.DataFrame,
    ks: Sequence[int] | None = None,
    *,
    condition: str = "temperature",
    by: Sequence[str] | None = None,
    method: str = "auto",
    n_draws: int = 512,
    seed: int = 0,
) -> pl.DataFrame:
    """Mean maj@k over problems per value of `condition` and k.

    Returns `by`..., `condition`, k, maj_at_k (uniform tie-break), maj_at_k_strict (ties
    count wrong), expected_ties (expected number of problems whose vote a tie-break
    decides), n_problems, method ('exact' or 'monte_carlo').
    """
    keys = [*_by(df, by, condition), condition]
    ks = default_ks(df, keys) if ks is None else ks
    table = metrics.maj_at_k_table(df, ks, keys, method=method, n_draws=n_draws, seed=seed)
    return (
        table.group_by([*keys, "k"])
        .agg(
            maj_at_k=pl.col("maj_at_k").mean(),
            maj_at_k_strict=pl.col("maj_at_k_strict").mean(),
            expected_ties=pl.col("p_tie").sum(),
            n_problems=pl.len(),
            method=pl.col("method").first(),
        )
        .sort([*keys, "k"], nulls_last=True)
    )


def solve_matrix(
    df: pl.DataFrame, *, condition: str = "temperature", by: Sequence[str] | None = None
) -> pl.DataFrame:
    """The problem x temperature solve matrix (long): see `thinklab.metrics.solve_matrix`."""
    return metrics.solve_matrix(df, condition, _by(df, by, condition))


def coverage(df: pl.DataFrame, *, condition: str = "temperature", by: Sequence[str] | None = None) -> pl.DataFrame:
    """Share of problems solved at some temperature vs at the best single one:
    see `thinklab.metrics.coverage`."""
    return metrics.coverage(df, condition, _by(df, by, condition))


def entropy_length_vs_temperature(
    df: pl.DataFrame, *, condition: str = "temperature", by: Sequence[str] | None = None
) -> pl.DataFrame:
    """Distributions of per-sample mean token entropy and of lengths per temperature.

    Returns `by`..., `condition`, variable ('mean_entropy' | 'n_tokens' |
    'n_thinking_tokens'), n, mean, std, p10, p50, p90.
    """
    keys = [*_by(df, by, condition), condition]
    stats = ensure_trace_stats(df)
    variables = ["mean_entropy", "n_tokens", "n_thinking_tokens"]
    long = stats.select(*keys, *[pl.col(v).cast(pl.Float64) for v in variables]).unpivot(
        index=keys, variable_name="variable", value_name="value"
    )
    v = pl.col("value")
    return (
        long.drop_nulls("value")
        .group_by([*keys, "variable"])
        .agg(
            n=pl.len(),
            mean=v.mean(),
            std=v.std(),
            p10=v.quantile(0.1, "linear"),
            p50=v.quantile(0.5, "linear"),
            p90=v.quantile(0.9, "linear"),
        )
        .sort([*keys, "variable"], nulls_last=True)
    )


def accuracy_vs_temperature(
    df: pl.DataFrame,
    k: int = 1,
    *,
    condition: str = "temperature",
    by: Sequence[str] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    maj: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """pass@k and maj@k at a fixed k per temperature, pass@k with a clustered bootstrap interval.

    At k=1 pass@k is plain accuracy. `maj` may pass a precomputed per-problem
    `metrics.maj_at_k_table` that includes k. Returns `by`..., `condition`, k,
    pass_at_k, ci_low, ci_high, maj_at_k, n_problems.
    """
    keys = [*_by(df, by, condition), condition]
    table = metrics.pass_at_k_table(df, [k], keys)
    ci = metrics.bootstrap_ci(table, "pass_at_k", by=keys, n_boot=n_boot, level=level, seed=seed)
    if maj is None:
        maj = metrics.maj_at_k_table(df, [k], keys)
    maj_mean = maj.filter(pl.col("k") == k).group_by(keys).agg(maj_at_k=pl.col("maj_at_k").mean())
    return (
        ci.rename({"estimate": "pass_at_k", "n_clusters": "n_problems"})
        .with_columns(k=pl.lit(k, dtype=pl.Int64))
        .join(maj_mean, on=keys, how="left", nulls_equal=True)
        .select(*keys, "k", "pass_at_k", "ci_low", "ci_high", "maj_at_k", "n_problems")
        .sort(keys, nulls_last=True)
    )


def multi_temperature_voting(
    df: pl.DataFrame,
    ks: Sequence[int] | None = None,
    *,
    condition: str = "temperature",
    by: Sequence[str] | None = None,
    method: str = "auto",
    n_draws: int = 512,
    seed: int = 0,
) -> pl.DataFrame:
    """Voting over samples pooled across temperatures vs the best single temperature, at
    equal total budget k: see `thinklab.metrics.pooled_voting`."""
    by = _by(df, by, condition)
    ks = default_ks(df, [*by, condition]) if ks is None else ks
    return metrics.pooled_voting(df, ks, condition, by, method=method, n_draws=n_draws, seed=seed)
