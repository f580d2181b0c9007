"""Quantization analyses: each quantized run against its baseline, paired per sample.

The measurements of "Quantization Hurts Reasoning?" as functions of a sample table that
holds a baseline run (`quantization` null) and one run per format over the same problems
and seeds. A quantized run is the baseline spec with one field changed, so samples pair
on (problem_id, sample_idx, seed) plus whatever other condition columns vary (model,
task, temperature, ...): the same problem drawn with the same random stream.

Every function returns a tidy polars frame; nothing generates or draws. Entropy per
sample is the mean over its tokens with NaN skipped: tokens forced by budget cues or
"Wait" carry NaN entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from thinklab import metrics

__all__ = [
    "BASELINE",
    "with_format",
    "with_mean_token_entropy",
    "paired",
    "deltas",
    "flip_matrix",
    "accuracy_by_format",
    "per_sample",
]

BASELINE = "baseline"  # the label of rows whose quantization is null
PAIR_ON = ("problem_id", "sample_idx", "seed")
DELTA_VALUES = {"accuracy": "correct", "length": "n_tokens", "entropy": "mean_token_entropy"}


def with_format(df: pl.DataFrame) -> pl.DataFrame:
    """Add `format`: the quantization method, or BASELINE where it is null."""
    return df.with_columns(format=pl.col("quantization").cast(pl.Utf8).fill_null(BASELINE))


def with_mean_token_entropy(df: pl.DataFrame) -> pl.DataFrame:
    """Add `mean_token_entropy` (f64): the mean of each sample's token entropies, NaN skipped
    (null when no token has one)."""
    if "mean_token_entropy" in df.columns:
        return df
    return df.with_columns(
        mean_token_entropy=pl.col("token_entropy")
        .list.eval(pl.element().cast(pl.Float64).filter(pl.element().is_not_nan()))
        .list.mean()
    )


def _prepare(df: pl.DataFrame) -> pl.DataFrame:
    out = with_mean_token_entropy(with_format(df))
    if "level" not in out.columns:
        out = out.with_columns(level=pl.lit(None, dtype=pl.Int64))
    return out


def _by(df: pl.DataFrame, by: Sequence[str] | None) -> list[str]:
    return metrics.condition_columns(df, exclude=["quantization"]) if by is None else list(by)


def _formats(df: pl.DataFrame) -> list[str]:
    return sorted(f for f in df["format"].unique().to_list() if f != BASELINE)


def _split(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    base = df.filter(pl.col("format") == BASELINE)
    if base.height == 0:
        raise ValueError("the table holds no baseline rows (quantization null); run the baseline condition too")
    return base, df.filter(pl.col("format") != BASELINE)


def paired(df: pl.DataFrame, *, by: Sequence[str] | None = None) -> pl.DataFrame:
    """One row per (format, pair): the baseline's and the format's correct, n_tokens and
    mean_token_entropy side by side, the problem's level, and the flip
    ('right→wrong', 'wrong→right', 'both right', 'both wrong').

    Samples without a partner in the baseline are dropped. Returns `by`..., format,
    problem_id, sample_idx, seed, level, correct_base, correct_quant, n_tokens_base,
    n_tokens_quant, entropy_base, entropy_quant, flip.
    """
    d = _prepare(df)
    by = _by(d, by)
    base, quant = _split(d)
    on = [*by, *PAIR_ON]
    cols = ["correct", "n_tokens", "mean_token_entropy"]
    left = base.select(*on, "level", *[pl.col(c).alias(f"{c}_base") for c in cols])
    right = quant.select(*on, "format", *[pl.col(c).alias(f"{c}_quant") for c in cols])
    out = right.join(left, on=on, nulls_equal=True).rename(
        {"mean_token_entropy_base": "entropy_base", "mean_token_entropy_quant": "entropy_quant"}
    )
    cb, cq = pl.col("correct_base"), pl.col("correct_quant")
    flip = (
        pl.when(cb & ~cq).then(pl.lit("right→wrong"))
        .when(~cb & cq).then(pl.lit("wrong→right"))
        .when(cb & cq).then(pl.lit("both right"))
        .otherwise(pl.lit("both wrong"))
    )
    return out.with_columns(flip=flip).select(
        *by, "format", *PAIR_ON, "level", "correct_base", "correct_quant", "n_tokens_base", "n_tokens_quant",
        "entropy_base", "entropy_quant", "flip",
    ).sort([*by, "format", *PAIR_ON])


def deltas(
    df: pl.DataFrame,
    *,
    by: Sequence[str] | None = None,
    per_level: bool = False,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> pl.DataFrame:
    """Paired deltas (format minus baseline) of accuracy, length (n_tokens) and mean token
    entropy, each with a clustered paired bootstrap interval (problems resampled), plus the
    flip counts. With per_level=True, one row per difficulty level too (null level = no level).

    Returns `by`..., format, [level,] metric ('accuracy' | 'length' | 'entropy'), n_pairs,
    n_problems, baseline, quantized, delta, ci_low, ci_high, p_value, right_to_wrong,
    wrong_to_right (flip counts repeat on each metric row of a group).
    """
    d = _prepare(df)
    by = _by(d, by)
    base, quant = _split(d)
    group = [*by, *(["level"] if per_level else [])]
    frames = []
    for fmt in _formats(d):
        q = quant.filter(pl.col("format") == fmt)
        for metric, column in DELTA_VALUES.items():
            r = metrics.paired_bootstrap(
                base, q, column, on=[*by, *PAIR_ON], by=group, n_boot=n_boot, level=level, seed=seed
            )
            frames.append(r.with_columns(format=pl.lit(fmt), metric=pl.lit(metric)))
    if not frames:
        raise ValueError("the table holds no quantized rows; add at least one format")
    out = pl.concat(frames, how="vertical_relaxed").rename(
        {"mean_a": "baseline", "mean_b": "quantized", "n_clusters": "n_problems"}
    )
    flips = (
        paired(df, by=by)
        .group_by(["format", *group])
        .agg(
            right_to_wrong=(pl.col("flip") == "right→wrong").sum(),
            wrong_to_right=(pl.col("flip") == "wrong→right").sum(),
        )
    )
    out = out.join(flips, on=["format", *group], how="left", nulls_equal=True)
    return out.select(
        *by, "format", *(["level"] if per_level else []), "metric", "n_pairs", "n_problems", "baseline", "quantized",
        "delta", "ci_low", "ci_high", "p_value", "right_to_wrong", "wrong_to_right",
    ).sort([*by, "format", *(["level"] if per_level else []), "metric"], nulls_last=True)


def flip_matrix(df: pl.DataFrame, *, by: Sequence[str] | None = None) -> pl.DataFrame:
    """The 2x2 baseline-vs-format outcome matrix of every format, long.

    Returns `by`..., format, baseline ('right' | 'wrong'), quantized ('right' | 'wrong'),
    n, share (of that format's pairs). All four cells are present, zeros included.
    """
    p = paired(df, by=by)
    by = [c for c in p.columns if c not in ("format", *PAIR_ON, "level", "correct_base", "correct_quant",
                                            "n_tokens_base", "n_tokens_quant", "entropy_base", "entropy_quant", "flip")]
    outcome = {True: "right", False: "wrong"}
    counts = p.group_by([*by, "format", "correct_base", "correct_quant"]).len()
    cells = p.select(*by, "format").unique().join(
        pl.DataFrame({"correct_base": [True, True, False, False], "correct_quant": [True, False, True, False]}),
        how="cross",
    )
    out = cells.join(counts, on=[*by, "format", "correct_base", "correct_quant"], how="left", nulls_equal=True)
    out = out.with_columns(n=pl.col("len").fill_null(0).cast(pl.Int64)).with_columns(
        share=pl.col("n") / pl.col("n").sum().over([*by, "format"]),
        baseline=pl.col("correct_base").replace_strict(outcome, return_dtype=pl.Utf8),
        quantized=pl.col("correct_quant").replace_strict(outcome, return_dtype=pl.Utf8),
    )
    return out.select(*by, "format", "baseline", "quantized", "n", "share").sort(
        [*by, "format", "baseline", "quantized"]
    )


def accuracy_by_format(
    df: pl.DataFrame, *, by: Sequence[str] | None = None, per_level: bool = False, n_boot: int = 2000,
    level: float = 0.95, seed: int = 0,
) -> pl.DataFrame:
    """Accuracy of every format (baseline included) with a clustered bootstrap interval.

    Returns `by`..., format, [level,] accuracy, ci_low, ci_high, n, n_problems.
    """
    d = _prepare(df)
    keys = [*_by(d, by), "format", *(["level"] if per_level else [])]
    ci = metrics.bootstrap_ci(d, "correct", by=keys, n_boot=n_boot, level=level, seed=seed)
    order = {BASELINE: 0}
    return (
        ci.rename({"estimate": "accuracy", "n_clusters": "n_problems"})
        .with_columns(_baseline_first=pl.col("format").replace_strict(order, default=1, return_dtype=pl.Int8))
        .sort(["_baseline_first", *keys], nulls_last=True)
        .drop("_baseline_first")
    )


def per_sample(df: pl.DataFrame) -> pl.DataFrame:
    """The per-sample columns the distribution figures read: format, problem_id,
    sample_idx, level, correct, n_tokens, n_thinking_tokens, finish_reason, mean_token_entropy."""
    d = _prepare(df)
    extra = [c for c in metrics.condition_columns(d, exclude=["quantization"]) if c in d.columns]
    return d.select(*extra, "format", "problem_id", "sample_idx", "level", "correct", "n_tokens",
                    "n_thinking_tokens", "finish_reason", "mean_token_entropy")
