"""Study 3, quantization: what a numeric format does to accuracy, length and entropy.

Conditions: a baseline run (`quantization=None`: fp32 on CPU, bf16 on GPU) and one run
per format, each the baseline spec with only `model.quantization` changed, so sample i of
a problem has the same seed in every condition and the comparison is paired
(`thinklab.analysis.quantization`). Every condition runs through the same forward: the
formats are simulated (weights quantized then dequantized, `thinklab.models.quantization`), so
a flip is the format's doing and not another kernel's rounding; if any format is a real-
kernel one (`int8-wo:kernel`), every condition, the baseline included, runs through
transformers' modules (`model.forward="transformers"`). Every format is checked against
the host before the first condition generates. What each run recorded about its format
(share of weights in low precision, memory, the forward) comes from
`thinklab.studies.common.run_records`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from thinklab import plots
from thinklab.analysis import overthinking as ot
from thinklab.analysis import quantization as ana
from thinklab.config import RunSpec
from thinklab.plots import ci_errors, mark_truncation, outcome_args, placeholder, titled
from thinklab.studies import common
from thinklab.studies.common import grid, non_empty, positive

__all__ = ["STUDY", "Params", "conditions", "run", "frames", "FIGURES"]

STUDY = "quantization"


@dataclass(frozen=True)
class Params(common.StudyParams):
    """The quantization study's parameters: the shared ones, then its knobs."""

    n_problems: int = field(default=24, metadata=positive())
    n_boot: int = field(default=2000, metadata=positive())
    temperature: float = field(default=0.0, metadata=common.TEMPERATURE)
    formats: tuple[str, ...] = field(default=("int8-wo", "int4-wo"),
                                     metadata=grid(non_empty("a method name (see docs/quantization.md)")))


def conditions(params: Params) -> list[RunSpec]:
    """The baseline spec first, then one spec per format (only `model.quantization` differs)."""
    from thinklab.models import quantization

    # One forward for every condition: real-kernel formats only run on transformers' modules.
    if params.backend == "hf" and any(quantization.is_kernel(f) for f in params.formats):
        params = dataclasses.replace(params, forward="transformers")
    return [params.run_spec(params.temperature, quantization=q) for q in (None, *params.formats)]


def _check(specs: Sequence[RunSpec]) -> None:
    """Refuse, before anything generates, any format the host cannot run (names method and reason)."""
    from thinklab.models import quantization

    for spec in specs:
        q = spec.model.quantization
        if q is None:
            continue
        if spec.model.backend == "hf":
            from thinklab.backends.hf import pick_device

            quantization.check(q, pick_device())
        else:
            quantization.check_vllm_quantization(q, spec.model.kv_cache_dtype)


def run(specs: Sequence[RunSpec], progress: bool = True, runs_root: Path | str | None = None) -> pl.DataFrame:
    """Check every format, then run (or load) every condition; one long sample table with
    per-sample entropy statistics and `format` (the method, or 'baseline')."""
    _check(specs)
    return ana.with_format(ot.with_trace_stats(common.run_conditions(specs, progress=progress, runs_root=runs_root, study=STUDY,
                                                                         knobs=["quantization"])))


# --------------------------------------------------------------------------- frames


def frames(df: pl.DataFrame, params: Params | None = None) -> dict[str, pl.DataFrame]:
    """Every table behind the figures (same names as `FIGURES`), plus `summary` (n and the
    truncated share per format) and the per-level deltas."""
    p = params or Params()
    df = ana.with_format(df) if "format" not in df.columns else df
    if "mean_token_entropy" not in df.columns and "mean_entropy" in df.columns:
        df = df.with_columns(mean_token_entropy=pl.col("mean_entropy"))  # the same NaN-skipping mean
    boot = dict(by=(), n_boot=p.n_boot, seed=p.seed)
    accuracy = ana.accuracy_by_format(df, **boot)
    by_level = ana.accuracy_by_format(df, per_level=True, **boot).drop_nulls("level")
    samples = common.with_outcome(ana.per_sample(df), df)
    return {
        "summary": _ordered(common.summary(df, ["format"])),
        "accuracy": common.with_truncation(accuracy, df, ["format"]),
        "deltas": ana.deltas(df, **boot),
        "length": samples,
        "entropy": samples,
        "flips": ana.flip_matrix(df, by=()),
        "by_level": by_level.with_columns(pl.col("level").cast(pl.Utf8)),
        "deltas_by_level": ana.deltas(df, per_level=True, **boot),
    }


def _ordered(frame: pl.DataFrame) -> pl.DataFrame:
    """Baseline first, then the formats by name."""
    return frame.sort(pl.col("format") != ana.BASELINE, "format")


def _order(frame: pl.DataFrame) -> dict:
    formats = frame["format"].unique().to_list()
    return {"format": [ana.BASELINE] + sorted(f for f in formats if f != ana.BASELINE)}


# --------------------------------------------------------------------------- figures


def _caption(f: dict[str, pl.DataFrame]) -> str:
    return common.caption(f["summary"])


def _accuracy(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["accuracy"]
    frame = _ordered(frame).with_columns(format=pl.format("{}<br>(n={})", "format", "n"),
                                         shown=pl.col("accuracy").map_elements(lambda v: f"{v:.2f}", return_dtype=pl.Utf8))
    fig = px.bar(frame, x="format", y="accuracy", text="shown", hover_data=["n", "n_problems", "truncated_share"],
                 template=plots.TEMPLATE, labels=plots.LABELS, **ci_errors(frame, "accuracy"))
    fig.update_traces(textposition="outside", cliponaxis=False, marker_color="#0072B2")  # a 0 still reads "0.00"
    fig.update_layout(yaxis_range=[0, 1.1], yaxis_title="accuracy", xaxis_title="format (samples)")
    return titled(fig, "Accuracy by format (95% bootstrap CI over problems)", _caption(f))


def _deltas(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["deltas"].with_columns(format=pl.format("{} (n={} pairs)", "format", pl.col("n_pairs").max().over("format")))
    fig = px.scatter(frame, x="delta", y="format", facet_col="metric", template=plots.TEMPLATE, labels=plots.LABELS,
                     hover_data=["n_pairs", "baseline", "quantized", "p_value", "right_to_wrong", "wrong_to_right"],
                     **ci_errors(frame, "delta", axis="x"))
    fig.update_traces(marker_size=10, marker_color="#0072B2")
    fig.update_xaxes(matches=None, zeroline=True, zerolinewidth=2, zerolinecolor="#888888", title_text="")
    units = {"accuracy": "accuracy (Δ share correct)", "length": "length (Δ tokens)", "entropy": "entropy (Δ nats)"}
    fig.for_each_annotation(lambda a: a.update(text=units.get(a.text.split("=")[-1], a.text.split("=")[-1])))
    titled(fig, "Paired change vs. baseline (format − baseline, 95% paired bootstrap CI)", _caption(f))
    return fig.update_yaxes(showticklabels=False).update_yaxes(showticklabels=True, col=1)  # one shared format axis


def _length(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["length"]
    fig = _distribution(frame, "n_tokens", ["problem_id", "finish_reason"])
    fig.update_layout(yaxis_title="generated tokens", yaxis_rangemode="tozero")
    mark_truncation(fig, frame)
    return titled(fig, "Generated length by format (tokens; split by correctness)", _caption(f))


def _entropy(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["entropy"]
    fig = _distribution(frame, "mean_token_entropy", ["problem_id", "n_tokens"])
    fig.update_layout(yaxis_title="mean token entropy (nats)", yaxis_rangemode="tozero")
    return titled(fig, "Mean token entropy per sample by format (nats)", _caption(f))


_SMALL_N = 8  # fewer samples than this in a group: a box and its points, not a fitted violin


def _distribution(frame: pl.DataFrame, y: str, hover: list[str]) -> go.Figure:
    """Per format, correct vs. incorrect: violins (span cut at the data) where every group has
    _SMALL_N samples or more, else boxes with every point (a violin fitted to 2 samples invents a shape)."""
    args = dict(x="format", y=y, points="all", hover_data=hover, template=plots.TEMPLATE, labels=plots.LABELS,
                **outcome_args(frame))
    args["category_orders"] = {**args["category_orders"], **_order(frame)}
    smallest = frame.group_by("format", "outcome").len()["len"].min() if frame.height else 0
    if smallest is not None and smallest >= _SMALL_N:
        fig = px.violin(frame, box=True, **args)
        fig.update_traces(spanmode="hard")
    else:
        fig = px.box(frame, **args)
    return fig.update_layout(legend_title="")


def _flips(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame = f["flips"]
    formats = sorted(frame["format"].unique().to_list())
    labels = ["right", "wrong"]
    fig = make_subplots(rows=1, cols=max(len(formats), 1), subplot_titles=formats, horizontal_spacing=0.12)
    for col, fmt in enumerate(formats, start=1):
        cells = frame.filter(pl.col("format") == fmt)
        z = [[cells.filter((pl.col("baseline") == b) & (pl.col("quantized") == q))["n"].item() for q in labels]
             for b in labels]
        total = sum(map(sum, z)) or 1
        text = [[f"{v}<br>({v / total:.0%})" for v in row] for row in z]
        fig.add_trace(go.Heatmap(z=z, x=[f"{fmt}: {q}" for q in labels], y=[f"baseline: {b}" for b in labels],
                                 text=text, texttemplate="%{text}", colorscale="Blues", showscale=False), row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    return titled(fig, "Outcome flips, baseline vs. each format (paired samples)", _caption(f))


def _by_level(f: dict[str, pl.DataFrame]) -> go.Figure:
    frame, title = f["by_level"], "Accuracy by difficulty level and format (95% bootstrap CI)"
    if frame.is_empty():
        return placeholder(title, "the task has no difficulty levels", _caption(f))
    frame = frame.with_columns(shown=pl.col("accuracy").map_elements(lambda v: f"{v:.2f}", return_dtype=pl.Utf8),
                               format=pl.format("{} (n={})", "format", pl.col("n").sum().over("format")))
    order = {f: i for i, f in enumerate(_order(frame.with_columns(format=pl.col("format").str.split(" (n=").list.first()))["format"])}
    shown_order = sorted(frame["format"].unique().to_list(), key=lambda f: order.get(f.split(" (n=")[0], len(order)))
    fig = px.bar(frame, x="level", y="accuracy", color="format", barmode="group", category_orders={"format": shown_order},
                 hover_data=["n", "n_problems"], text="shown", template=plots.TEMPLATE, labels=plots.LABELS,
                 **ci_errors(frame, "accuracy"))
    fig.update_traces(textposition="outside", cliponaxis=False)  # a 0 still reads "0.00"
    fig.update_layout(yaxis_range=[0, 1.1], yaxis_title="accuracy", xaxis_title="difficulty level")
    return titled(fig, title, _caption(f))


FIGURES = {
    "accuracy": _accuracy,
    "deltas": _deltas,
    "length": _length,
    "entropy": _entropy,
    "flips": _flips,
    "by_level": _by_level,
}
