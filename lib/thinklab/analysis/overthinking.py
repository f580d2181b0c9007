"""Overthinking analyses: accuracy against thinking length, and what the trace looks like.

The measurements behind "Towards Thinking-Optimal Scaling", s1's budget forcing, First
Finish Search, PEAR and CASTILLO, as functions of the sample table. Each function takes
the table and returns a tidy polars frame; none generates, loads or plots anything.

`by` selects the extra grouping columns of every function. `by=None` (the default)
groups by every condition column that varies in the table (see
`thinklab.metrics.condition_columns`), except the axis the function is about, so
samples of different conditions are never pooled silently; pass `by=()` to pool.

Per-token work (entropy by phase and along the trace) never loops over samples in
Python: the list column is read once as a flat numpy array and summed segment by
segment with `np.add.reduceat`. `with_trace_stats` does that once and adds the per-sample
results as columns, which the entropy functions reuse when present.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import polars as pl

from thinklab.metrics import bootstrap_ci, condition_columns, majority_vote
from thinklab.tracing import DEFAULT_MARKERS

__all__ = [
    "DEFAULT_MARKERS",
    "TRACE_STAT_COLUMNS",
    "with_trace_stats",
    "ensure_trace_stats",
    "accuracy_vs_budget",
    "accuracy_vs_length",
    "accuracy_by_level",
    "best_budget_per_level",
    "SELECTION_METHODS",
    "selection_per_problem",
    "selection_accuracy",
    "length_distribution",
    "length_histogram",
    "phase_entropy",
    "entropy_length_correlation",
    "entropy_along_trace",
    "marker_rates",
    "problem_length_stats",
]

SELECTION_METHODS = ("shortest", "longest", "random", "majority", "oracle")
TRACE_STAT_COLUMNS = ("mean_entropy", "mean_entropy_thinking", "mean_entropy_answer", "entropy_profile")


def _profile_column(phase: str) -> str:
    return "entropy_profile" if phase == "all" else f"entropy_profile_{phase}"


def _by(df: pl.DataFrame, by: Sequence[str] | None, axis: Sequence[str] = ()) -> list[str]:
    return condition_columns(df, exclude=axis) if by is None else list(by)


# --------------------------------------------------------------------------- per-token statistics


def _segment_sums(flat: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Sums of flat[bounds[i]:bounds[i+1]] for each i (bounds nondecreasing, last = len(flat))."""
    out = np.zeros(len(bounds) - 1, dtype=np.float64)
    if len(flat) == 0 or len(out) == 0:
        return out
    starts = bounds[:-1]
    usable = starts < len(flat)  # trailing empty segments start at len(flat), outside reduceat's range
    sums = np.add.reduceat(flat, starts[usable]).astype(np.float64)  # each runs to the next start
    out[usable] = sums
    out[np.diff(bounds) == 0] = 0.0  # reduceat returns flat[start] for empty segments
    return out


def with_trace_stats(df: pl.DataFrame, n_bins: int = 20, phase: str = "all") -> pl.DataFrame:
    """Add per-sample token-entropy statistics as columns.

    mean_entropy, mean_entropy_thinking, mean_entropy_answer (f64; null where the phase
    has no tokens), and the profile (Array[f32, n_bins]): the mean entropy in each of
    n_bins equal slices of the normalized position axis, over the whole trace
    (`phase="all"`, column entropy_profile) or the thinking phase only
    (`phase="thinking"`, column entropy_profile_thinking); NaN where a slice is empty
    (traces shorter than n_bins). Token i of a trace of n tokens falls in slice
    floor(i * n_bins / n). The first n_thinking_tokens entries are the thinking phase.
    """
    if phase not in ("all", "thinking"):
        raise ValueError(f"phase={phase!r} is not valid; choose 'all' or 'thinking'")
    entropy = df["token_entropy"]
    lengths = entropy.list.len().fill_null(0).to_numpy().astype(np.int64)
    n_think = np.clip(df["n_thinking_tokens"].fill_null(0).to_numpy().astype(np.int64), 0, lengths)
    n_answer = lengths - n_think
    span = lengths if phase == "all" else n_think
    j = np.arange(n_bins + 1)
    edges = (j[None, :] * span[:, None] + n_bins - 1) // n_bins  # (samples, n_bins + 1): ceil(j n / B)
    phase_sums = np.zeros((len(lengths), 2))
    phase_counts = np.zeros((len(lengths), 2))
    slice_sums = np.zeros((len(lengths), n_bins))
    slice_counts = np.zeros((len(lengths), n_bins))
    row = 0
    # chunk by chunk, so each chunk's values are a zero-copy view (no rechunk of the whole column)
    for chunk in entropy.get_chunks():
        rows = slice(row, row + len(chunk))
        row += len(chunk)
        flat = chunk.explode(empty_as_null=False, keep_nulls=False).to_numpy()  # (tokens in chunk,)
        if flat.dtype not in (np.float32, np.float64):
            flat = flat.astype(np.float64)
        # Forced tokens (budget cues, "Wait") carry NaN: they were not sampled, so they are
        # left out of every mean (sums over finite values, divided by their count).
        finite = np.isfinite(flat)
        has_nan = not finite.all()
        if has_nan:
            flat = np.where(finite, flat, 0.0)
        size = lengths[rows]
        starts = np.cumsum(size) - size
        bounds = np.append(np.stack([starts, starts + n_think[rows]], axis=1).reshape(-1), len(flat))
        phase_sums[rows] = _segment_sums(flat, bounds).reshape(-1, 2)
        phase_counts[rows] = (_segment_sums(finite.astype(np.float64), bounds).reshape(-1, 2) if has_nan
                              else np.stack([n_think[rows], n_answer[rows]], axis=1))
        bounds = np.append((starts[:, None] + edges[rows]).reshape(-1), len(flat))
        slice_sums[rows] = _segment_sums(flat, bounds).reshape(-1, n_bins + 1)[:, :n_bins]
        slice_counts[rows] = (_segment_sums(finite.astype(np.float64), bounds).reshape(-1, n_bins + 1)[:, :n_bins]
                              if has_nan else np.diff(edges[rows], axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_all = phase_sums.sum(1) / phase_counts.sum(1)
        mean_think = phase_sums[:, 0] / phase_counts[:, 0]
        mean_answer = phase_sums[:, 1] / phase_counts[:, 1]
        profile = (slice_sums / slice_counts).astype(np.float32)  # (samples, n_bins)

    def nullable(values: np.ndarray, present: np.ndarray) -> pl.Series:
        return pl.Series(np.where(present, values, 0.0)).set(pl.Series(~present), None)

    profile_series = pl.Series(profile.reshape(len(lengths), n_bins), dtype=pl.Array(pl.Float32, n_bins))
    return df.with_columns(
        mean_entropy=nullable(mean_all, phase_counts.sum(1) > 0),
        mean_entropy_thinking=nullable(mean_think, phase_counts[:, 0] > 0),
        mean_entropy_answer=nullable(mean_answer, phase_counts[:, 1] > 0),
        **{_profile_column(phase): profile_series},
    )


def ensure_trace_stats(df: pl.DataFrame, n_bins: int | None = None, phase: str = "all") -> pl.DataFrame:
    """`df` itself if it already carries the `with_trace_stats` columns, else `with_trace_stats(df)`."""
    if all(c in df.columns for c in TRACE_STAT_COLUMNS) and (
        n_bins is None or df.schema["entropy_profile"].shape == (n_bins,)
    ):
        return df
    return with_trace_stats(df, n_bins=n_bins or 20, phase=phase)


# --------------------------------------------------------------------------- accuracy curves


def accuracy_vs_budget(
    df: pl.DataFrame, *, by: Sequence[str] | None = None, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> pl.DataFrame:
    """Accuracy per thinking budget with a clustered bootstrap interval.

    Returns `by`..., thinking_budget (null = uncapped, sorted last), accuracy, ci_low,
    ci_high, n, n_problems, mean_thinking_tokens, share_capped (finish_reason 'budget').
    """
    by = _by(df, by, ["thinking_budget"])
    keys = [*by, "thinking_budget"]
    ci = bootstrap_ci(df, "correct", by=keys, n_boot=n_boot, level=level, seed=seed)
    extra = df.lazy().group_by(keys).agg(
        mean_thinking_tokens=pl.col("n_thinking_tokens").mean(),
        share_capped=(pl.col("finish_reason") == "budget").mean(),
    ).collect()
    return (
        ci.rename({"estimate": "accuracy", "n_clusters": "n_problems"})
        .join(extra, on=keys, nulls_equal=True)
        .select(*keys, "accuracy", "ci_low", "ci_high", "n", "n_problems", "mean_thinking_tokens", "share_capped")
        .sort(keys, nulls_last=True)
    )


def accuracy_vs_length(
    df: pl.DataFrame,
    *,
    n_buckets: int = 8,
    edges: Sequence[float] | None = None,
    length: str = "n_thinking_tokens",
    natural_only: bool = True,
    by: Sequence[str] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> pl.DataFrame:
    """Accuracy per bucket of natural (unforced) length.

    With `natural_only`, only samples without a thinking budget and without "Wait"
    extensions count. Buckets are quantiles of `length` over those samples (or the given
    `edges`; bucket b holds edges[b] <= length < edges[b+1], the last one closed).
    Returns `by`..., bucket, length_low, length_high, accuracy, ci_low, ci_high, n,
    n_problems, mean_length.
    """
    by = _by(df, by, ["thinking_budget", "wait_extensions"])
    rows = df.select(*by, "problem_id", "correct", "thinking_budget", "wait_extensions", length)
    if natural_only:
        rows = rows.filter(pl.col("thinking_budget").is_null() & (pl.col("wait_extensions").fill_null(0) == 0))
    values = rows[length].to_numpy().astype(np.float64)
    if len(values) == 0:
        raise ValueError("no samples to bucket (natural_only keeps only uncapped samples without extensions)")
    cuts = np.unique(np.quantile(values, np.linspace(0, 1, n_buckets + 1))) if edges is None else np.asarray(edges)
    bucket = np.clip(np.searchsorted(cuts, values, side="right") - 1, 0, len(cuts) - 2)
    rows = rows.with_columns(bucket=pl.Series(bucket, dtype=pl.Int64))
    if edges is not None:
        rows = rows.filter(pl.col(length).is_between(cuts[0], cuts[-1]))
    keys = [*by, "bucket"]
    ci = bootstrap_ci(rows, "correct", by=keys, n_boot=n_boot, level=level, seed=seed)
    extra = rows.group_by(keys).agg(mean_length=pl.col(length).mean())
    bounds = pl.DataFrame({"bucket": np.arange(len(cuts) - 1), "length_low": cuts[:-1], "length_high": cuts[1:]})
    return (
        ci.rename({"estimate": "accuracy", "n_clusters": "n_problems"})
        .join(extra, on=keys, nulls_equal=True)
        .join(bounds, on="bucket")
        .select(*keys, "length_low", "length_high", "accuracy", "ci_low", "ci_high", "n", "n_problems", "mean_length")
        .sort(keys, nulls_last=True)
    )


def accuracy_by_level(
    df: pl.DataFrame, *, by: Sequence[str] | None = None, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> pl.DataFrame:
    """Accuracy per difficulty `level` and condition (thinking budget included by default).

    Returns `by`..., level (null where the task has none), accuracy, ci_low, ci_high, n, n_problems.
    """
    if "level" not in df.columns:
        raise ValueError("the table has no `level` column")
    keys = [*_by(df, by), "level"]
    ci = bootstrap_ci(df, "correct", by=keys, n_boot=n_boot, level=level, seed=seed)
    return ci.rename({"estimate": "accuracy", "n_clusters": "n_problems"}).sort(keys, nulls_last=True)


def best_budget_per_level(
    df: pl.DataFrame,
    *,
    by: Sequence[str] | None = None,
    by_level: pl.DataFrame | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pl.DataFrame:
    """The thinking budget that maximizes accuracy at each level.

    Ties go to the smaller budget (uncapped counts as the largest). `by_level` may pass a
    precomputed `accuracy_by_level` frame. Returns `by`..., level, best_budget, accuracy,
    ci_low, ci_high, uncapped_accuracy (null if no uncapped run), n_budgets.
    """
    by = _by(df, by, ["thinking_budget"])
    if by_level is None:
        by_level = accuracy_by_level(df, by=[*by, "thinking_budget"], n_boot=n_boot, seed=seed)
    keys = [*by, "level"]
    ranked = by_level.with_columns(
        _order=pl.col("thinking_budget").fill_null(np.iinfo(np.int64).max)
    ).sort(["accuracy", "_order"], descending=[True, False])
    best = ranked.group_by(keys, maintain_order=True).agg(
        best_budget=pl.col("thinking_budget").first(),
        accuracy=pl.col("accuracy").first(),
        ci_low=pl.col("ci_low").first(),
        ci_high=pl.col("ci_high").first(),
        uncapped_accuracy=pl.col("accuracy").filter(pl.col("thinking_budget").is_null()).first(),
        n_budgets=pl.len(),
    )
    return best.sort(keys, nulls_last=True)


# --------------------------------------------------------------------------- n samples per problem


def selection_per_problem(
    df: pl.DataFrame, *, length: str = "n_tokens", by: Sequence[str] | None = None
) -> pl.DataFrame:
    """Per problem (and `by` group), the expected accuracy of each way to keep one of its n
    samples: shortest, longest, random, majority, oracle.

    Every rule is an expectation, never one draw: shortest/longest average `correct` over
    the samples tied at the extreme length, random is the problem's mean accuracy, the
    vote breaks ties uniformly (`thinklab.metrics.majority_vote`), oracle is 1 when any
    sample is correct (pass@n). Returns `by`..., problem_id, n, shortest, longest, random,
    majority, oracle (floats).
    """
    by = _by(df, by)
    cell = [*by, "problem_id"]
    per_problem = df.lazy().group_by(cell).agg(
        n=pl.len(),
        shortest=pl.col("correct").filter(pl.col(length) == pl.col(length).min()).mean(),
        longest=pl.col("correct").filter(pl.col(length) == pl.col(length).max()).mean(),
        random=pl.col("correct").mean(),
        oracle=pl.col("correct").any().cast(pl.Float64),
    ).collect()
    vote = majority_vote(df, by).select(*cell, majority=pl.col("maj"))
    return (
        per_problem.join(vote, on=cell, nulls_equal=True)
        .select(*cell, "n", *SELECTION_METHODS)
        .sort(cell, nulls_last=True)
    )


def selection_accuracy(
    df: pl.DataFrame,
    *,
    length: str = "n_tokens",
    by: Sequence[str] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> pl.DataFrame:
    """With n samples per problem: accuracy of picking the shortest, the longest, a random
    one, the majority vote, and the oracle (any correct; pass@n), each per problem as in
    `selection_per_problem`, then averaged over problems with a clustered bootstrap interval.

    Returns `by`..., method, accuracy, ci_low, ci_high, n_problems.
    """
    by = _by(df, by)
    per_problem = selection_per_problem(df, length=length, by=by)
    ci = bootstrap_ci(per_problem, list(SELECTION_METHODS), by=by, n_boot=n_boot, level=level, seed=seed)
    return (
        ci.rename({"variable": "method", "estimate": "accuracy", "n_clusters": "n_problems"})
        .select(*by, "method", "accuracy", "ci_low", "ci_high", "n_problems")
        .sort([*by, "method"], nulls_last=True)
    )


_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def length_distribution(
    df: pl.DataFrame, *, length: str = "n_thinking_tokens", by: Sequence[str] | None = None
) -> pl.DataFrame:
    """Length of correct vs incorrect samples: `by`..., correct, n, mean, std, min, p10,
    p25, p50, p75, p90, max."""
    keys = [*_by(df, by), "correct"]
    col = pl.col(length)
    return (
        df.lazy()
        .group_by(keys)
        .agg(
            n=pl.len(),
            mean=col.mean(),
            std=col.std(),
            min=col.min(),
            **{f"p{int(q * 100)}": col.quantile(q, "linear") for q in _QUANTILES},
            max=col.max(),
        )
        .sort(keys, nulls_last=True)
        .collect()
    )


def length_histogram(
    df: pl.DataFrame, *, length: str = "n_thinking_tokens", n_bins: int = 30, by: Sequence[str] | None = None
) -> pl.DataFrame:
    """Histogram of length, correct vs incorrect, on bins shared by all groups.

    Returns `by`..., correct, bin, bin_low, bin_high, count, share (of the group's samples).
    """
    keys = [*_by(df, by), "correct"]
    values = df[length].to_numpy().astype(np.float64)
    edges = np.linspace(values.min(), values.max(), n_bins + 1) if len(values) else np.arange(n_bins + 1.0)
    if edges[-1] == edges[0]:
        edges = edges[0] + np.arange(n_bins + 1.0)
    bins = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n_bins - 1)
    counts = (
        df.select(keys).with_columns(bin=pl.Series(bins, dtype=pl.Int64)).group_by([*keys, "bin"]).agg(count=pl.len())
    )
    bounds = pl.DataFrame({"bin": np.arange(n_bins), "bin_low": edges[:-1], "bin_high": edges[1:]})
    return (
        counts.join(bounds, on="bin")
        .with_columns(share=pl.col("count") / pl.col("count").sum().over(keys))
        .select(*keys, "bin", "bin_low", "bin_high", "count", "share")
        .sort([*keys, "bin"], nulls_last=True)
    )


def problem_length_stats(
    df: pl.DataFrame, *, length: str = "n_thinking_tokens", by: Sequence[str] | None = None
) -> pl.DataFrame:
    """Per-problem length distribution over its n samples (CASTILLO).

    Returns `by`..., problem_id, n, mean, std, p10, p50, p90, min, max, share_capped
    (finish_reason 'length' or 'budget': the sample hit a cap), accuracy.
    """
    keys = [*_by(df, by), "problem_id"]
    col = pl.col(length)
    return (
        df.lazy()
        .group_by(keys)
        .agg(
            n=pl.len(),
            mean=col.mean(),
            std=col.std(),
            p10=col.quantile(0.1, "linear"),
            p50=col.quantile(0.5, "linear"),
            p90=col.quantile(0.9, "linear"),
            min=col.min(),
            max=col.max(),
            share_capped=pl.col("finish_reason").is_in(["length", "budget"]).mean(),
            accuracy=pl.col("correct").mean(),
        )
        .sort(keys, nulls_last=True)
        .collect()
    )


# --------------------------------------------------------------------------- entropy


def phase_entropy(df: pl.DataFrame, *, by: Sequence[str] | None = None) -> pl.DataFrame:
    """Mean token entropy in the thinking vs the answer phase (PEAR), correct vs incorrect.

    Each sample's phase mean counts once (samples without tokens in a phase are left out
    of it). Returns `by`..., correct, phase ('thinking' | 'answer' | 'all'), mean_entropy,
    std, n.
    """
    by = _by(df, by)
    stats = ensure_trace_stats(df)
    keys = [*by, "correct"]
    long = stats.select(
        *keys, thinking="mean_entropy_thinking", answer="mean_entropy_answer", all="mean_entropy"
    ).unpivot(index=keys, variable_name="phase", value_name="entropy")
    return (
        long.drop_nulls("entropy")
        .group_by([*keys, "phase"])
        .agg(mean_entropy=pl.col("entropy").mean(), std=pl.col("entropy").std(), n=pl.len())
        .sort([*keys, "phase"], nulls_last=True)
    )


def entropy_length_correlation(
    df: pl.DataFrame, *, length: str = "n_tokens", by: Sequence[str] | None = None
) -> pl.DataFrame:
    """Correlation of a sample's mean token entropy with its length.

    Returns `by`..., subset ('all' | 'correct' | 'incorrect'), n, pearson, spearman.
    """
    by = _by(df, by)
    stats = ensure_trace_stats(df).select(*by, "correct", "mean_entropy", pl.col(length).cast(pl.Float64))
    stats = stats.drop_nulls("mean_entropy")
    agg = dict(
        n=pl.len(),
        pearson=pl.corr("mean_entropy", length),
        spearman=pl.corr("mean_entropy", length, method="spearman"),
    )
    group = by or [pl.lit(0).alias("_all")]
    whole = stats.group_by(group).agg(**agg).with_columns(subset=pl.lit("all"))
    split = (
        stats.group_by([*group, "correct"])
        .agg(**agg)
        .with_columns(subset=pl.when(pl.col("correct")).then(pl.lit("correct")).otherwise(pl.lit("incorrect")))
        .drop("correct")
    )
    columns = [*by, "subset", "n", "pearson", "spearman"]
    return pl.concat([whole.select(columns), split.select(columns)]).sort([*by, "subset"], nulls_last=True)


def entropy_along_trace(
    df: pl.DataFrame, *, n_bins: int = 20, phase: str = "all", by: Sequence[str] | None = None
) -> pl.DataFrame:
    """Mean token entropy along the normalized position axis, correct vs incorrect.

    Each sample's slice means (see `with_trace_stats`) count once per slice; empty slices
    are left out. Returns `by`..., correct, bin, position (slice centre in [0, 1]),
    mean_entropy, n_samples, std (of the samples' slice means; null for one sample).
    """
    by = _by(df, by)
    keys = [*by, "correct"]
    column = _profile_column(phase)
    if column in df.columns and df.schema[column].shape == (n_bins,):
        stats = df
    else:
        stats = with_trace_stats(df, n_bins=n_bins, phase=phase)
    profile = stats[column].to_numpy()  # (samples, n_bins)
    group = stats.select(keys).with_columns(_g=pl.struct(keys).rank("dense") - 1)
    codes = group["_g"].to_numpy().astype(np.int64)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    present = ~np.isnan(profile)
    flat_index = (codes[:, None] * n_bins + np.arange(n_bins)[None, :])[present]
    sums = np.bincount(flat_index, weights=profile[present].astype(np.float64), minlength=n_groups * n_bins)
    squares = np.bincount(flat_index, weights=profile[present].astype(np.float64) ** 2, minlength=n_groups * n_bins)
    counts = np.bincount(flat_index, minlength=n_groups * n_bins)
    firsts = group.group_by("_g").agg(pl.all().first()).sort("_g")
    with np.errstate(divide="ignore", invalid="ignore"):
        means = sums / counts
        variance = np.where(counts > 1, (squares - counts * means**2) / (counts - 1), np.nan)
    out = firsts.select(pl.all().gather(np.repeat(np.arange(n_groups), n_bins))).with_columns(
        bin=pl.Series(np.tile(np.arange(n_bins), n_groups), dtype=pl.Int64),
        mean_entropy=pl.Series(means),
        n_samples=pl.Series(counts, dtype=pl.Int64),
        std=pl.Series(np.sqrt(np.clip(variance, 0, None)), nan_to_null=True),
    )
    return (
        out.with_columns(position=(pl.col("bin") + 0.5) / n_bins)
        .filter(pl.col("n_samples") > 0)
        .select(*keys, "bin", "position", "mean_entropy", "n_samples", "std")
        .sort([*keys, "bin"], nulls_last=True)
    )


# --------------------------------------------------------------------------- markers


def marker_rates(
    df: pl.DataFrame,
    markers: Sequence[str] = DEFAULT_MARKERS,
    *,
    field: str = "thinking",
    by: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Hedging/reflection markers per 1k tokens, correct vs incorrect.

    Counts are case-insensitive whole-word matches of each marker in `field` ('thinking'
    or 'text'), each marker counted on its own (as `thinklab.tracing.marker_counts`
    does, so "but wait" also counts as "wait"). The rate is pooled: 1000 * total count /
    total tokens of that field (n_thinking_tokens for 'thinking', n_tokens for 'text').
    Returns `by`..., correct, marker, count, n_samples, n_tokens, per_1k, share_with
    (share of samples with at least one).
    """
    if field not in ("thinking", "text"):
        raise ValueError(f"field={field!r} is not valid; choose 'thinking' or 'text'")
    keys = [*_by(df, by), "correct"]
    tokens = "n_thinking_tokens" if field == "thinking" else "n_tokens"
    names = [f"_m{i}" for i in range(len(markers))]
    counted = df.select(
        *keys,
        pl.col(tokens).alias("_tokens"),
        *[
            pl.col(field).fill_null("").str.count_matches(r"(?i)\b" + re.escape(m) + r"\b").alias(name)
            for m, name in zip(markers, names)
        ],
    )
    agg = counted.group_by(keys).agg(
        n_samples=pl.len(),
        n_tokens=pl.col("_tokens").sum(),
        *[pl.col(name).sum().alias(f"count{name}") for name in names],
        *[(pl.col(name) > 0).mean().alias(f"share{name}") for name in names],
    )
    long = pl.concat(
        [
            agg.select(
                *keys, "n_samples", "n_tokens", marker=pl.lit(m), count=pl.col(f"count{name}"),
                share_with=pl.col(f"share{name}"),
            )
            for m, name in zip(markers, names)
        ]
    )
    return (
        long.with_columns(per_1k=1000 * pl.col("count") / pl.col("n_tokens"))
        .select(*keys, "marker", "count", "n_samples", "n_tokens", "per_1k", "share_with")
        .sort([*keys, "marker"], nulls_last=True)
    )
