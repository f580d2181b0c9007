"""MoE sparsity analyses: accuracy, length, entropy and routing as the active experts per token change.

The frames of study 4 (`thinklab.studies.moe`) as functions of a sample table with one
run per `moe_top_k`. The routing
columns (`ROUTING_COLUMNS`: `expert_load`, List(List(Int)) of tokens per layer and
expert, and the mean router entropy per phase) are stored by hf runs of MoE models;
vLLM runs and dense rows leave them null.

The frame functions group by `moe_top_k` plus the `by` columns, which lead the output.
As in every analysis module, `by=None` (the default) groups by every condition column
that varies in the table except `moe_top_k` (see `thinklab.metrics.condition_columns`),
so conditions are never pooled silently; pass `by=()` to pool.

This module imports only polars, numpy, `thinklab.metrics` and `thinklab.store`: no torch, no plotting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from thinklab.metrics import bootstrap_ci, condition_columns
from thinklab.store import ROUTING_COLUMNS

__all__ = [
    "ROUTING_COLUMNS",
    "METRICS",
    "num_experts",
    "metrics_vs_k",
    "expert_load",
    "expert_load_array",
    "router_entropy_by_phase",
]

METRICS = {
    "correct": "accuracy",
    "n_tokens": "generated tokens",
    "mean_entropy": "mean token entropy (nats)",
    "router_entropy_thinking": "router entropy, thinking (nats)",
    "router_entropy_answer": "router entropy, answer (nats)",
}


def _keys(df: pl.DataFrame, by: Sequence[str] | None, *axis: str) -> list[str]:
    """`by` (None: the varying condition columns but moe_top_k) then the frame's own axis columns, each once."""
    if by is None:
        by = condition_columns(df, exclude=["moe_top_k"])
    return list(dict.fromkeys([*by, *axis]))


def num_experts(df: pl.DataFrame) -> int | None:
    """Experts per layer: the length of the first layer of the first non-null `expert_load` (None without one)."""
    if "expert_load" not in df.columns or df.height == 0:
        return None
    first = df["expert_load"].drop_nulls()
    return len(first[0][0]) if len(first) else None


def metrics_vs_k(
    df: pl.DataFrame, n_boot: int = 1000, seed: int = 0, *, by: Sequence[str] | None = None
) -> pl.DataFrame:
    """Per `by`..., top-k and metric (see METRICS): mean with a 95% bootstrap interval over problems.

    Columns: `by`..., moe_top_k, variable, estimate, ci_low, ci_high, n, n_clusters, metric
    (METRICS' label), active_fraction (moe_top_k / the group's `num_experts`; null without
    routing columns). Sorted by `by` (nulls last), variable, moe_top_k.
    """
    by = [c for c in _keys(df, by) if c != "moe_top_k"]
    values = [m for m in METRICS if m in df.columns]
    frame = df.with_columns(pl.col("correct").cast(pl.Float64), pl.col("n_tokens").cast(pl.Float64))
    out = bootstrap_ci(frame, values, by=[*by, "moe_top_k"], n_boot=n_boot, seed=seed)
    if len(values) == 1:
        out = out.with_columns(variable=pl.lit(values[0]))
    no_experts = pl.lit(None, pl.Float64)
    if not by:
        E = num_experts(df)
        fraction = (pl.col("moe_top_k") / E) if E else no_experts
    elif "expert_load" in df.columns:
        # each group's own num_experts (conditions in `by` may be different models)
        first = pl.col("expert_load").drop_nulls().first().list.first().list.len()
        experts = df.group_by(by).agg(_experts=first)
        out = out.join(experts, on=by, how="left", nulls_equal=True, maintain_order="left")
        fraction = pl.when(pl.col("_experts") > 0).then(pl.col("moe_top_k") / pl.col("_experts")).otherwise(no_experts)
    else:
        fraction = no_experts
    out = out.with_columns(
        metric=pl.col("variable").replace_strict(METRICS, default=pl.col("variable")),
        active_fraction=fraction,
    ).drop("_experts", strict=False)
    return out.sort([*by, "variable", "moe_top_k"], nulls_last=[True] * len(by) + [False, False])


def _shape(load: list | None) -> str:
    """A row's expert_load shape in words: 'L x E', or the experts of each layer when they differ."""
    if load is None:
        return "null"
    lengths = [None if layer is None else len(layer) for layer in load]
    if len(set(lengths)) == 1 and lengths[0] is not None:
        return f"{len(load)} x {lengths[0]}"
    return f"{len(load)} layers of {lengths} experts"


def expert_load_array(load: pl.Series) -> np.ndarray:
    """A List(List(int)) expert_load column without nulls as an array (rows, layers, experts).

    Null counts inside a layer count as 0. Raises ValueError, naming the shapes, unless
    every row holds the same number of layers and every layer the same number of experts.
    """
    rows = load.len()
    if rows == 0:
        return np.zeros((0, 0, 0), dtype=np.int64)
    if load.null_count():
        raise ValueError(f"expert_load: {load.null_count()} null rows (drop them first)")

    def mismatch(bad: np.ndarray) -> ValueError:
        bad_rows = np.flatnonzero(bad)
        first = int(bad_rows[0])
        return ValueError(
            f"expert_load: every row must hold the same layers x experts, but row 0 is {_shape(load[0].to_list())}"
            f" and row {first} is {_shape(load[first].to_list())} ({len(bad_rows)} of {rows} rows differ from row 0)"
        )

    layers = load.list.len().to_numpy()
    L = int(layers[0])
    if (layers != L).any():
        raise mismatch(layers != L)
    if L == 0:
        return np.zeros((rows, 0, 0), dtype=np.int64)
    per_layer = load.explode()  # rows * L layer lists, row-major (no row is empty, so no null is added)
    experts = per_layer.list.len().fill_null(-1).to_numpy().reshape(rows, L)
    E = int(experts[0, 0])
    bad = (experts != E).any(axis=1)
    if E < 0 or bad.any():
        raise mismatch(bad if bad.any() else np.ones(rows, dtype=bool))
    if E == 0:
        return np.zeros((rows, L, 0), dtype=np.int64)
    flat = per_layer.explode()  # rows * L * E counts
    if flat.null_count():
        flat = flat.fill_null(0)
    return flat.to_numpy().reshape(rows, L, E)


def expert_load(df: pl.DataFrame, *, by: Sequence[str] | None = None) -> pl.DataFrame:
    """Long frame: `by`..., moe_top_k, layer, expert, tokens, share (of the layer's routed tokens in the group).

    One row per group (`by` and moe_top_k), layer and expert, sorted that way (`by` nulls
    last, moe_top_k nulls first); tokens (Int64) is the sum over the group's rows, share
    its part of the layer's total (NaN when the layer routed nothing). Rows with a null
    expert_load are left out; the others must all hold the same layers x experts (see
    `expert_load_array`).
    """
    keys = _keys(df, by, "moe_top_k")
    rows = df.select(*keys, "expert_load").filter(pl.col("expert_load").is_not_null())
    load = expert_load_array(rows["expert_load"])  # (rows, L, E)
    n, L, E = load.shape
    # the groups in output order, each with its rows; reduceat sums each group's run of rows
    groups = (
        rows.select(keys)
        .with_row_index("_row")
        .group_by(keys)
        .agg("_row")
        .sort(keys, nulls_last=[True] * (len(keys) - 1) + [False])
    )
    order = groups["_row"].explode().to_numpy()
    sizes = groups["_row"].list.len().to_numpy().astype(np.int64)
    flat = load.reshape(n, L * E)
    if not np.array_equal(order, np.arange(n)):
        flat = flat[order]
    if n:
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        tokens = np.add.reduceat(flat, starts, axis=0, dtype=np.int64).reshape(len(sizes), L, E)
    else:
        tokens = np.zeros((0, L, E), dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = tokens / tokens.sum(axis=2, keepdims=True)
    G = groups.height
    return groups.select(pl.col(keys).gather(np.repeat(np.arange(G), L * E))).with_columns(
        layer=pl.Series(np.tile(np.repeat(np.arange(L, dtype=np.int64), E), G)),
        expert=pl.Series(np.tile(np.arange(E, dtype=np.int64), G * L)),
        tokens=pl.Series(tokens.ravel(), dtype=pl.Int64),
        share=pl.Series(share.ravel(), dtype=pl.Float64),
    )


def router_entropy_by_phase(
    df: pl.DataFrame, n_boot: int = 1000, seed: int = 0, *, by: Sequence[str] | None = None
) -> pl.DataFrame:
    """Per `by`..., top-k and phase (thinking, answer): mean router entropy with a 95% bootstrap
    interval over problems. Columns: `by`..., moe_top_k, phase, estimate, ci_low, ci_high, n, n_clusters."""
    keys = _keys(df, by, "moe_top_k")
    index = _keys(df, keys, "problem_id")
    long = df.select(*index, thinking="router_entropy_thinking", answer="router_entropy_answer").unpivot(
        index=index, variable_name="phase", value_name="router_entropy"
    )
    return bootstrap_ci(long, "router_entropy", by=[*keys, "phase"], n_boot=n_boot, seed=seed)
