"""Study 2, temperature: which temperatures solve which problems, and what voting buys.

Conditions: one run per (temperature, top_p) over the same problems and base seed, so
sample i of a problem has the same seed at every temperature. Every table is a function
of the sample table (`thinklab.analysis.temperature`), grouped by top_p so that nucleus
settings are never pooled; nothing regenerates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from thinklab import plots
from thinklab.analysis import overthinking as ot
from thinklab.analysis import temperature as ana
from thinklab.config import RunSpec
from thinklab.metrics import bootstrap_ci, maj_at_k_table, pass_at_k_table
from thinklab.plots import ci_errors, int_ticks, normal_ci, placeholder, titled, wilson_ci, with_n
from thinklab.studies import common
from thinklab.studies.common import grid, positive

__all__ = ["STUDY", "Params", "conditions", "run", "frames", "FIGURES"]

STUDY = "temperature"
_BY = ["top_p"]  # the second axis: kept apart in every table


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The temperature study's parameters: the shared ones, then its knobs."""

    n_samples: int = field(default=8, metadata=positive())
    temperatures: tuple[float, ...] = field(default=(0.0, 0.6, 1.0), metadata=grid(common.TEMPERATURE))
    top_ps: tuple[float, ...] = field(default=(1.0,), metadata=grid(common.TOP_P))
    ks: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata=grid(positive()))


def conditions(params: Params) -> list[RunSpec]:
    """One RunSpec per (temperature, top_p); greedy (T=0) draws one sample per problem."""
    return [params.run_spec(t, top_p) for t in params.temperatures for top_p in params.top_ps]


def run(specs: Sequence[RunSpec], progress: bool = True, runs_root: Path | str | None = None) -> pl.DataFrame:
    """The sample table of every condition, with per-sample entropy statistics added."""
    return ot.with_trace_stats(common.run_conditions(specs, progress=progress, runs_root=runs_root, study=STUDY))


# --------------------------------------------------------------------------- frames


def _label(frame: pl.DataFrame, column: str = "temperature") -> pl.DataFrame:
    """Add `T`: the temperature as a short label (stored as float32, printed with 3 decimals at most),
    with top_p where the table holds several; the float32 knobs become the float64 values written."""
    frame = common.clean_floats(frame, ["temperature", "top_p", column])
    t = pl.col(column).cast(pl.Float64).round(3).cast(pl.Utf8)
    nucleus = pl.format("top_p={}", pl.col("top_p").cast(pl.Float64).round(3))
    several = frame["top_p"].n_unique() > 1
    label = pl.format("{} {}", t, nucleus) if several else t
    return frame.with_columns(T=pl.when(pl.col(column).is_null()).then(pl.lit("pooled")).otherwise(label),
                              nucleus=nucleus)


def _sampled(df: pl.DataFrame) -> pl.DataFrame:
    """The stochastic conditions: greedy has one sample per problem, and k-curves need n > 1."""
    return df.filter(pl.col("temperature") > 0)


def frames(df: pl.DataFrame, params: Params | None = None) -> dict[str, pl.DataFrame]:
    """Every table behind the figures (same names as `FIGURES`), plus `summary` (n and the
    truncated share per condition)."""
    p = params or Params()
    df = ot.ensure_trace_stats(df)
    sampled = _sampled(df)
    ks = list(p.ks)
    accuracy = ana.accuracy_vs_temperature(df, k=1, by=_BY, n_boot=p.n_boot, seed=p.seed)
    empty = pl.DataFrame()
    return {
        "summary": _label(common.summary(df, ["temperature", *_BY])),
        "pass_at_k": _label(_pass_at_k_ci(sampled, ks, p)) if sampled.height else empty,
        "maj_at_k": _label(_maj_at_k_ci(sampled, ks, p)) if sampled.height else empty,
        "solve_matrix": _label(ana.solve_matrix(df, by=_BY)),
        "coverage": _label(ana.coverage(df, by=_BY), "best_condition"),
        "voting": (_label(_voting_ci(sampled, ks, p))
                   .with_columns(series=pl.format("{} {}", "scheme", "T")) if sampled.height else empty),
        "entropy_length": _label(ana.entropy_length_vs_temperature(df, by=_BY)),
        "accuracy_vs_temperature": _label(common.with_truncation(accuracy, df, ["temperature", *_BY])),
    }


def _with_ci(curve: pl.DataFrame, per_problem: pl.DataFrame, value: str, p: Params) -> pl.DataFrame:
    """`curve` (a mean over problems per temperature and k) with a 95% bootstrap interval over problems,
    from the per-problem values it averages."""
    keys = [*_BY, "temperature", "k"]
    ci = bootstrap_ci(per_problem, value, by=keys, n_boot=p.n_boot, seed=p.seed).select(*keys, "ci_low", "ci_high")
    return curve.join(ci, on=keys, how="left", nulls_equal=True, maintain_order="left")


def _pass_at_k_ci(sampled: pl.DataFrame, ks: list[int], p: Params) -> pl.DataFrame:
    """The pass@k curve with its interval (the per-problem unbiased pass@k resampled)."""
    return _with_ci(ana.pass_at_k_curve(sampled, ks, by=_BY),
                    pass_at_k_table(sampled, ks, by=[*_BY, "temperature"]), "pass_at_k", p)


def _maj_at_k_ci(sampled: pl.DataFrame, ks: list[int], p: Params) -> pl.DataFrame:
    """The maj@k curve with its interval (the per-problem expected maj@k resampled)."""
    return _with_ci(ana.maj_at_k_curve(sampled, ks, by=_BY, seed=p.seed),
                    maj_at_k_table(sampled, ks, [*_BY, "temperature"], seed=p.seed), "maj_at_k", p)


def _voting_ci(sampled: pl.DataFrame, ks: list[int], p: Params) -> pl.DataFrame:
    """Pooled vs single-temperature voting with a 95% bootstrap interval over problems on each
    maj@k: the per-problem maj@k that `metrics.pooled_voting` averages (same seeds), resampled."""
    voting = ana.multi_temperature_voting(sampled, ks, by=_BY, seed=p.seed)
    single_keys, pooled_keys = [*_BY, "temperature", "k"], [*_BY, "k"]
    single = bootstrap_ci(maj_at_k_table(sampled, ks, [*_BY, "temperature"], seed=p.seed), "maj_at_k",
                          by=single_keys, n_boot=p.n_boot, seed=p.seed).select(*single_keys, "ci_low", "ci_high")
    pooled = bootstrap_ci(maj_at_k_table(sampled, ks, _BY, seed=p.seed + 1), "maj_at_k",
                          by=pooled_keys, n_boot=p.n_boot, seed=p.seed).select(*pooled_keys, "ci_low", "ci_high")
    is_pooled = pl.col("scheme") == "pooled"
    return pl.concat([
        voting.filter(~is_pooled).join(single, on=single_keys, how="left", nulls_equal=True, maintain_order="left"),
        voting.filter(is_pooled).join(pooled, on=pooled_keys, how="left", nulls_equal=True, maintain_order="left"),
    ], how="diagonal_relaxed").sort([*_BY, "k", "scheme", "temperature"], nulls_last=True)


# --------------------------------------------------------------------------- figures


def _series(frame: pl.DataFrame, column: str = "T") -> pl.DataFrame:
    """`frame` with `series`: the label of `column` and its number of problems, the legend entry."""
    return frame.with_columns(series=pl.format("T={} (n={} problems)", pl.col(column), pl.col("n_problems")))


def _caption(f: dict[str, pl.DataFrame]) -> str:
    return common.caption(f["summary"])


def _greedy_only(title: str, f: dict[str, pl.DataFrame]) -> go.Figure:
    return placeholder(title, "no temperature above 0: k-curves need several samples per problem", _caption(f))


def _pass_at_k(f: dict[str, pl.DataFrame]) -> go.Figure:
    title = "pass@k per temperature (unbiased estimator)"
    if f["pass_at_k"].is_empty():
        return _greedy_only(title, f)
    frame = _series(f["pass_at_k"])
    fig = px.line(frame, x="k", y="pass_at_k", color="series", markers=True, log_x=True, template=plots.TEMPLATE,
                  hover_data=["n_problems"], labels=plots.LABELS, **ci_errors(frame, "pass_at_k"))
    fig.update_layout(legend_title="", yaxis_title="pass@k", yaxis_range=[0, 1.02])
    int_ticks(fig, frame["k"])
    return titled(fig, f"{title}, 95% bootstrap CI over problems", _caption(f))


def _maj_at_k(f: dict[str, pl.DataFrame]) -> go.Figure:
    title = "maj@k per temperature (ties broken uniformly at random; 95% bootstrap CI over problems)"
    if f["maj_at_k"].is_empty():
        return _greedy_only(title, f)
    frame = _series(f["maj_at_k"])
    fig = px.line(frame, x="k", y="maj_at_k", color="series", markers=True, log_x=True, template=plots.TEMPLATE,
                  hover_data=["maj_at_k_strict", "expected_ties", "n_problems"], labels=plots.LABELS,
                  **ci_errors(frame, "maj_at_k"))
    fig.update_layout(legend_title="", yaxis_title="maj@k", yaxis_range=[0, 1.02])
    int_ticks(fig, frame["k"])
    return titled(fig, title, _caption(f))


def _solve_matrix(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["solve_matrix"].sort("temperature", "top_p")
    frame = frame.with_columns(T=pl.format("T={} (n={})", "T", pl.col("n").max().over("T")))  # samples per cell
    order = list(dict.fromkeys(frame["T"].to_list()))
    wide = frame.pivot(on="T", index="problem_id", values="solve_rate").sort("problem_id")
    fig = go.Figure(go.Heatmap(z=wide.select(order).to_numpy(), x=order, y=wide["problem_id"].to_list(),
                               colorscale="Viridis", zmin=0, zmax=1,
                               colorbar=dict(title="solve rate<br>(share of<br>samples correct)")))
    fig.update_layout(xaxis_title="temperature (samples per problem)", yaxis_title="problem",
                      height=max(400, 18 * wide.height))
    return titled(fig, "Solve rate per problem × temperature", _caption(f))


def _coverage(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["coverage"]
    fig = go.Figure()
    for row in frame.iter_rows(named=True):
        suffix = f" (top_p={row['top_p']:.3g})" if frame.height > 1 else ""
        (best_low, best_high), (union_low, union_high) = (wilson_ci(row[c], row["n_problems"])
                                                          for c in ("best_single", "union"))
        fig.add_trace(go.Bar(x=["best single temperature", "some temperature (union)"],
                             y=[row["best_single"], row["union"]], name=with_n(f"top_p={row['top_p']:.3g}", row["n_problems"]),
                             error_y=dict(type="data", symmetric=False,
                                          array=[best_high - row["best_single"], union_high - row["union"]],
                                          arrayminus=[row["best_single"] - best_low, row["union"] - union_low]),
                             text=[f"{row['best_single']:.2f} (T={row['T']}){suffix}", f"{row['union']:.2f}"],
                             textposition="outside", cliponaxis=False))
    fig.update_layout(yaxis_range=[0, 1.05], yaxis_title="share of problems solved", showlegend=frame.height > 1,
                      legend_title="nucleus (problems)")
    return titled(fig, "Share of problems solved (pass@n): union vs. best single temperature (95% Wilson CI)",
                  _caption(f))


def _voting(f: dict[str, pl.DataFrame]) -> go.Figure:
    title = "Majority vote at equal total budget: pooled temperatures vs. single ones (95% bootstrap CI over problems)"
    if f["voting"].is_empty():
        return _greedy_only(title, f)
    shown = (pl.when(pl.col("scheme") == "pooled").then(pl.lit("all temperatures pooled"))
             .when(pl.col("scheme") == "best_single").then(pl.format("best single (T={})", "T"))
             .otherwise(pl.format("T={}", "T")))
    frame = f["voting"].with_columns(series=pl.format("{} (n={})", shown, "n_problems"))
    # the best single temperature equals one of the single curves: dashed, open markers, nudged right
    frame = frame.with_columns(k_shown=pl.when(pl.col("scheme") == "best_single").then(pl.col("k") * 1.04)
                               .otherwise(pl.col("k")))
    fig = px.line(frame, x="k_shown", y="maj_at_k", color="series", line_dash="scheme", symbol="scheme",
                  markers=True, log_x=True, template=plots.TEMPLATE, hover_data=["k", "pass_at_k", "n_problems"],
                  **ci_errors(frame, "maj_at_k"),
                  labels=plots.LABELS, symbol_map={"best_single": "circle-open", "single": "circle", "pooled": "diamond"},
                  line_dash_map={"best_single": "dash", "single": "solid", "pooled": "dot"})
    fig.update_traces(marker_size=10, selector=dict(marker_symbol="circle-open"))
    fig.for_each_trace(lambda t: t.update(name=t.name.split(", ")[0]))  # px appends the dash/symbol value
    fig.update_layout(xaxis_title=plots.LABELS["k"], yaxis_title="maj@k", yaxis_range=[0, 1.02], legend_title="")
    int_ticks(fig, frame["k"])
    return titled(fig, title, _caption(f))


def _entropy_length(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["entropy_length"]
    frame = frame.with_columns(ci=normal_ci(frame["std"], frame["n"]))
    variables = [v for v in ("mean_entropy", "n_tokens") if v in frame["variable"].to_list()]
    variables += [v for v in frame["variable"].unique(maintain_order=True).to_list() if v not in variables]
    units = {"mean_entropy": "mean token entropy (nats)", "n_tokens": "generated tokens",
             "n_thinking_tokens": "thinking tokens"}
    fig = make_subplots(rows=1, cols=max(len(variables), 1), horizontal_spacing=0.12,
                        subplot_titles=[units.get(v, v).split(" (")[0] for v in variables])
    groups = frame.partition_by("nucleus", maintain_order=True) if frame.height else []
    for col, variable in enumerate(variables, start=1):
        for g, group in enumerate(groups):
            sub = group.filter(pl.col("variable") == variable).sort("temperature")
            name = f"{sub['nucleus'][0]} (n={int(sub['n'].max())} samples per T)" if sub.height else ""
            fig.add_trace(go.Scatter(x=sub["temperature"].to_list(), y=sub["mean"].to_list(), mode="lines+markers",
                                     name=name, legendgroup=name, showlegend=col == 1,
                                     line=dict(color=plots.COLORWAY[g % len(plots.COLORWAY)]),
                                     error_y=dict(type="data", array=sub["ci"].to_list()),
                                     customdata=sub.select("n", "p50").to_numpy(),
                                     hovertemplate="T=%{x}<br>mean=%{y:.3g}<br>n=%{customdata[0]}<br>"
                                                   "median=%{customdata[1]:.3g}<extra></extra>"),
                          row=1, col=col)
        fig.update_yaxes(title_text=units.get(variable, variable), row=1, col=col)
        fig.update_xaxes(title_text="temperature", row=1, col=col)
    return titled(fig, "Token entropy and length vs. temperature (mean, 95% CI over samples)", _caption(f))


def _accuracy_vs_temperature(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["accuracy_vs_temperature"]
    frame = frame.with_columns(nucleus=pl.format("{} (n={} problems)", "nucleus", pl.col("n_problems").max().over("nucleus")))
    fig = px.line(frame, x="temperature", y="pass_at_k", markers=True, hover_data=["n_problems", "truncated_share"],
                  color="nucleus", template=plots.TEMPLATE, labels=plots.LABELS, **ci_errors(frame, "pass_at_k"))
    fig.update_layout(yaxis_range=[0, 1.02], yaxis_title="pass@1 (accuracy)", legend_title="",
                      showlegend=True)
    return titled(fig, "pass@1 vs. temperature (95% bootstrap CI over problems)", _caption(f))


FIGURES = {
    "pass_at_k": _pass_at_k,
    "maj_at_k": _maj_at_k,
    "solve_matrix": _solve_matrix,
    "coverage": _coverage,
    "voting": _voting,
    "entropy_length": _entropy_length,
    "accuracy_vs_temperature": _accuracy_vs_temperature,
}
