"""Study 3, quantization: what a numeric format does to accuracy, length and entropy.

Conditions: a baseline run (`quantization=None`: fp32 on CPU, bf16 on GPU) and one run
per format, each the baseline spec with only `model.quantization` changed, so sample i of
a problem has the same seed in every condition and the comparison is paired
(`thinklab.analysis.quantization`). Every condition runs through the same forward: the
formats are simulated (weights quantized then dequantized, `thinklab.quantization`), so
a flip is the format's doing and not another kernel's rounding; if any format is a real-
kernel one (`int8-wo:kernel`), every condition, the baseline included, runs through
transformers' modules (`model.forward="transformers"`). Every format is checked against the host before the
first condition generates. Figures read the analysis frames; nothing here regenerates.
"""

from __future__ import annotations

from typing import Sequence

import plotly.express as px
import plotly.graph_objects as go
import polars as pl

from thinklab import quantization, runner
from thinklab.analysis import quantization as ana
from thinklab.config import ModelSpec, RunSpec, SamplingSpec
from thinklab.store import RunStore
from thinklab.studies.common import run_conditions

STUDY = "quantization"
BASELINE = ana.BASELINE


def conditions(
    model: str = "default",
    backend: str = "hf",
    task: str = "rg:basic_arithmetic",
    formats: Sequence[str] = ("int8-wo", "int4-wo"),
    n_problems: int = 8,
    n_samples: int = 1,
    temperature: float = 0.0,
    max_tokens: int = 128,
    seed: int = 0,
) -> list[RunSpec]:
    """The baseline spec first, then one spec per format (only `model.quantization` differs)."""
    forward = "transformers" if backend == "hf" and any(quantization.is_kernel(f) for f in formats) else "auto"
    base = RunSpec(
        model=ModelSpec(name=model, backend=backend, forward=forward),
        task=task,
        n_problems=n_problems,
        task_seed=seed,
        sampling=SamplingSpec(temperature=temperature, n=1 if temperature == 0 else n_samples,
                              max_tokens=max_tokens, seed=seed),
    )
    return [base] + [base.replace(**{"model.quantization": f}) for f in formats]


def check(specs: Sequence[RunSpec], device: str | None = None) -> None:
    """Refuse, before anything generates, any format the host cannot run (names method and reason)."""
    for spec in specs:
        q = spec.model.quantization
        if q is None:
            continue
        if spec.model.backend == "hf":
            from thinklab.backends.hf import pick_device

            quantization.check(q, device or pick_device())
        else:
            quantization.check_vllm_quantization(q, spec.model.kv_cache_dtype)


def run(specs: Sequence[RunSpec], progress: bool = True, **run_options) -> pl.DataFrame:
    """Check every format, then run (or load) every condition; one long sample table."""
    check(specs)
    return ana.with_format(run_conditions(specs, progress=progress, **run_options))


def reports(specs: Sequence[RunSpec], runs_root=None) -> pl.DataFrame:
    """The quantization report each run recorded in run.json, one row per quantized run:
    format, share of linear parameters in low precision (all / decoder blocks), storage
    dtypes, bits per block weight, memory before and after (MB) and their ratio."""
    rows = []
    for spec in specs:
        if spec.model.quantization is None:
            continue
        meta = RunStore(runner.run_dir(spec, runs_root)).read_meta()
        rep = (meta.get("backend") or {}).get("quantization") or {}
        rows.append({
            "format": spec.model.quantization,
            "library": rep.get("library"),
            "share_low_precision": rep.get("share_low_precision"),
            "share_low_precision_blocks": rep.get("share_low_precision_blocks"),
            "storage_dtypes": ", ".join(f"{k}: {v}" for k, v in (rep.get("linear_storage_dtypes") or {}).items()),
            "bits_per_block_weight": rep.get("bits_per_block_weight"),
            "memory_mb_before": _mb(rep.get("memory_bytes_before")),
            "memory_mb_after": _mb(rep.get("memory_bytes_after")),
            "memory_ratio": rep.get("memory_ratio"),
        })
    return pl.DataFrame(rows, schema_overrides={"memory_mb_before": pl.Float64, "memory_mb_after": pl.Float64})


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 1e6, 1)


def _pair(df: pl.DataFrame, fmt: str | None) -> pl.DataFrame:
    """The baseline and one format (all formats when fmt is None)."""
    df = ana.with_format(df) if "format" not in df.columns else df
    return df if fmt is None else df.filter(pl.col("format").is_in([BASELINE, fmt]))


def _order(df: pl.DataFrame) -> list[str]:
    return [BASELINE] + sorted(f for f in df["format"].unique().to_list() if f != BASELINE)


def fig_accuracy(df: pl.DataFrame, n_boot: int = 2000, seed: int = 0) -> go.Figure:
    frame = ana.accuracy_by_format(df, by=(), n_boot=n_boot, seed=seed)
    fig = px.bar(frame, x="format", y="accuracy", text_auto=".2f", hover_data=["n", "n_problems"],
                 error_y=(frame["ci_high"] - frame["accuracy"]).to_list(),
                 error_y_minus=(frame["accuracy"] - frame["ci_low"]).to_list())
    n = frame["n_problems"].max()
    fig.update_layout(title=f"Accuracy by format (95% bootstrap CI over {n} problems)", yaxis_range=[0, 1],
                      yaxis_title="accuracy")
    return fig


def fig_deltas(df: pl.DataFrame, n_boot: int = 2000, seed: int = 0) -> go.Figure:
    frame = ana.deltas(df, by=(), n_boot=n_boot, seed=seed)
    fig = px.scatter(frame, x="delta", y="format", facet_col="metric", hover_data=["n_pairs", "baseline", "quantized",
                     "p_value", "right_to_wrong", "wrong_to_right"],
                     error_x=(frame["ci_high"] - frame["delta"]).to_list(),
                     error_x_minus=(frame["delta"] - frame["ci_low"]).to_list())
    fig.update_xaxes(matches=None, zeroline=True, zerolinewidth=2, zerolinecolor="grey")
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    fig.update_layout(title="Paired change vs. baseline (format − baseline, 95% paired bootstrap CI)")
    return fig


def fig_length(df: pl.DataFrame, fmt: str | None = None) -> go.Figure:
    frame = ana.per_sample(_pair(df, fmt))
    fig = px.violin(frame, x="format", y="n_tokens", color="correct", box=True, points="all",
                    category_orders={"format": _order(frame)}, hover_data=["problem_id", "finish_reason"])
    fig.update_layout(title="Generated length by format (tokens; split by correctness)", yaxis_title="tokens")
    return fig


def fig_entropy(df: pl.DataFrame, fmt: str | None = None) -> go.Figure:
    frame = ana.per_sample(_pair(df, fmt))
    fig = px.violin(frame, x="format", y="mean_token_entropy", color="correct", box=True, points="all",
                    category_orders={"format": _order(frame)}, hover_data=["problem_id", "n_tokens"])
    fig.update_layout(title="Mean token entropy per sample by format (nats)", yaxis_title="mean entropy (nats)")
    return fig


def fig_flips(df: pl.DataFrame, fmt: str) -> go.Figure:
    frame = ana.flip_matrix(_pair(df, fmt), by=()).filter(pl.col("format") == fmt)
    labels = ["right", "wrong"]
    z = [[frame.filter((pl.col("baseline") == b) & (pl.col("quantized") == q))["n"].item() for q in labels]
         for b in labels]
    total = sum(map(sum, z)) or 1
    text = [[f"{v}<br>({v / total:.0%})" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=[f"{fmt}: {q}" for q in labels], y=[f"baseline: {b}" for b in labels],
                               text=text, texttemplate="%{text}", colorscale="Blues", showscale=False))
    fig.update_layout(title=f"Outcome flips, baseline vs. {fmt} ({total} paired samples)",
                      yaxis_autorange="reversed", xaxis_side="top")
    return fig


def fig_by_level(df: pl.DataFrame, fmt: str | None = None, n_boot: int = 2000, seed: int = 0) -> go.Figure:
    frame = ana.accuracy_by_format(_pair(df, fmt), by=(), per_level=True, n_boot=n_boot, seed=seed)
    frame = frame.with_columns(pl.col("level").cast(pl.Utf8).fill_null("none"))
    fig = px.bar(frame, x="level", y="accuracy", color="format", barmode="group",
                 error_y=(frame["ci_high"] - frame["accuracy"]).to_list(),
                 error_y_minus=(frame["accuracy"] - frame["ci_low"]).to_list(),
                 category_orders={"format": _order(_pair(df, fmt))})
    fig.update_layout(title="Accuracy by difficulty level and format (95% bootstrap CI)", yaxis_range=[0, 1])
    return fig


FIGURES = {
    "accuracy": fig_accuracy,
    "deltas": fig_deltas,
    "length": fig_length,
    "entropy": fig_entropy,
    "flips": fig_flips,
    "by_level": fig_by_level,
}
