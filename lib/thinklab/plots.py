"""The house style of every figure, and their export: HTML, PNG, SVG, PDF, each with a sidecar.

Style: `TEMPLATE` ("thinklab", registered with plotly on import) sets the fonts, a white
background, light grids and the colour cycle; `OUTCOME_COLORS` gives correct, incorrect
and truncated samples the same colours in every study, under the same legend words
(`OUTCOMES`); `LABELS` names every axis with its unit (tokens, nats, accuracy).
`style(fig)` applies the template to a figure; `titled` and `placeholder` call it, so a
study figure built through them is in the house style. `value_label` prints a stored
float32 knob (0.6000000238418579) as it was written (0.6); `with_n` adds the count to
a legend entry or panel title.

Export: `export(fig, name, study, runs=..., params=...)` writes figures/<study>/[<subdir>/]
<runs>/<name>.<ext>, where <runs> is a short hash of the run ids behind the figure, so
the figures of different runs never overwrite each other, and a sidecar <name>.json
naming the run ids, the study parameters and the files. HTML embeds plotly.js (it opens
offline); PNG is drawn at `scale=3` (2700 x 1650 px for the default 900 x 550, about 300
dpi at 9 in); SVG and PDF are vector. Static images need a Chromium that kaleido can
drive (Debian: `apt-get install chromium`; elsewhere `plotly_get_chrome`): where none is
found, the HTML is written and `FigureExportError` names the format that could not be
and what to install. `subdir` and `log` (a file listing every file written, one per line,
which `thinklab batch` reads for its index) are explicit arguments, or study parameters
(`figure_subdir`, `figure_log`) that `show` reads from `params`.

`show` exports and displays a figure (the one call a notebook's figure loop makes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from thinklab import paths

# --------------------------------------------------------------------------- house style

TEMPLATE = "thinklab"

# Okabe-Ito: distinguishable with the common colour-vision deficiencies and in greyscale print.
OUTCOME_COLORS = {"correct": "#009E73", "incorrect": "#D55E00", "truncated": "#7F7F7F"}
OUTCOMES = ("correct", "incorrect")  # the legend words of every correct/incorrect split
COLORWAY = ["#0072B2", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#F0E442", "#009E73", "#D55E00"]

LABELS = {
    "accuracy": "accuracy",
    "estimate": "estimate",
    "pass_at_k": "pass@k",
    "maj_at_k": "maj@k",
    "k": "k (samples per problem)",
    "temperature": "temperature",
    "n_tokens": "generated tokens",
    "n_thinking_tokens": "thinking tokens",
    "mean_thinking_tokens": "mean thinking tokens",
    "mean_entropy": "mean token entropy (nats)",
    "mean_token_entropy": "mean token entropy (nats)",
    "router_entropy": "router entropy (nats)",
    "per_1k": "occurrences per 1k tokens",
    "moe_top_k": "active experts per token (top-k)",
    "format": "format",
    "budget": "thinking budget (tokens)",
    "graded": "outcome",
    "outcome": "outcome",
    "phase": "phase",
    "method": "selection method",
    "marker": "marker",
    "level": "difficulty level",
    "delta": "change vs. baseline",
    "problem_id": "problem",
    "finish_reason": "finish reason",
    "n": "n",
    "n_problems": "problems",
    "n_samples": "samples",
    "truncated_share": "truncated share",
}

pio.templates[TEMPLATE] = go.layout.Template(
    layout=dict(
        font=dict(family="Helvetica, Arial, sans-serif", size=14, color="#222222"),
        title=dict(font=dict(size=17), x=0.015, xanchor="left"),
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=COLORWAY,
        xaxis=dict(showgrid=True, gridcolor="#E5E5E5", zeroline=False, linecolor="#444444", showline=True,
                   ticks="outside", automargin=True, title=dict(standoff=8)),
        yaxis=dict(showgrid=True, gridcolor="#E5E5E5", zeroline=False, linecolor="#444444", showline=True,
                   ticks="outside", automargin=True, title=dict(standoff=8)),
        legend=dict(bgcolor="rgba(255,255,255,0.8)", borderwidth=0, font=dict(size=13)),
        hoverlabel=dict(font=dict(size=13)),
        colorscale=dict(sequential="Viridis"),
    )
)


def style(fig: go.Figure) -> go.Figure:
    """`fig` in the house style: the template, and y tick labels on every facet panel."""
    fig.update_layout(template=TEMPLATE)
    fig.update_yaxes(showticklabels=True)
    return fig


def value_label(value: Any) -> str:
    """How a stored value reads in a label: a float32 knob as written (0.6, not 0.6000000238418579)."""
    if value is None:
        return "none"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{float(f'{value:.6g}'):g}"  # float32 carries about 7 significant digits
    return str(value)


def with_n(label: str, n: int) -> str:
    """A legend entry or panel title with its count: 'correct (n=5)'."""
    return f"{label} (n={n})"


def outcome_colors(names: Iterable[str] = ()) -> dict[str, str]:
    """The outcome palette extended to names that carry a count ('correct (n=5)' -> correct's colour)."""
    colors = dict(OUTCOME_COLORS)
    for name in names:
        base = str(name).split(" (n=")[0]
        if base in OUTCOME_COLORS:
            colors[str(name)] = OUTCOME_COLORS[base]
    return colors


def outcome_args(frame, column: str = "outcome") -> dict:
    """px arguments colouring `frame[column]` (correct/incorrect, with or without counts) by the outcome palette,
    correct first."""
    names = [str(v) for v in frame[column].unique().to_list() if v is not None]
    order = sorted(names, key=lambda v: (not v.startswith("correct"), v))
    return {"color": column, "color_discrete_map": outcome_colors(names), "category_orders": {column: order}}


def titled(fig, title: str, caption: str | None = None):
    """`fig` in the house style, with `title` and, on a smaller second line, `caption` (the counts behind it)."""
    text = title if not caption else f"{title}<br><sup>{caption}</sup>"
    return style(fig).update_layout(title=dict(text=text), margin=dict(t=95 if caption else 60))


def placeholder(title: str, message: str, caption: str | None = None):
    """An empty figure that says why there is nothing to draw."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=15))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    titled(fig, title, caption)
    return fig.update_yaxes(showticklabels=False)


# --------------------------------------------------------------------------- export

FORMATS = ("html", "png", "svg", "pdf")
STATIC = ("png", "svg", "pdf")

_KALEIDO_STARTED = False
_STATIC_DISABLED_REASON: str | None = None


class FigureExportError(RuntimeError):
    """A figure format could not be written here (names the format, the reason and the fix)."""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "figure"


def _browser_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _start_kaleido() -> bool:
    """Start kaleido's persistent browser once; False (with a reason recorded) if impossible."""
    global _KALEIDO_STARTED, _STATIC_DISABLED_REASON
    if _KALEIDO_STARTED:
        return True
    if _STATIC_DISABLED_REASON:
        return False
    try:
        import kaleido
    except ImportError:
        _STATIC_DISABLED_REASON = "kaleido is not installed (pip install kaleido)"
        return False
    if _browser_path() is None:
        _STATIC_DISABLED_REASON = (
            "no Chromium found: install it (Debian/Ubuntu: apt-get install chromium; or run `plotly_get_chrome`)")
        return False
    try:
        kaleido.start_sync_server(silence_warnings=True)
    except Exception as exc:  # kaleido raises several types when the browser cannot start
        _STATIC_DISABLED_REASON = f"kaleido could not start Chromium ({exc})"
        return False
    _KALEIDO_STARTED = True
    return True


def static_export_status() -> str:
    """'ok' if PNG/SVG/PDF export works here, else why not and what to install."""
    return "ok" if _start_kaleido() else str(_STATIC_DISABLED_REASON)


def run_ids(runs: Any) -> list[str]:
    """The sorted distinct run ids of `runs`: a sample table (its `run_id` column), a Series or ids."""
    if runs is None:
        return []
    if isinstance(runs, str):
        return [runs]
    columns = getattr(runs, "columns", None)
    if columns is not None:
        if "run_id" not in columns:
            raise ValueError(f"the table given as runs has no run_id column (columns: {', '.join(columns)})")
        runs = runs["run_id"]
    return sorted({str(r) for r in runs if r is not None})


def runs_key(ids: Iterable[str]) -> str:
    """The folder name of a set of run ids: 10 hex digits of a hash of the sorted ids."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:10]


def figure_dir(study: str, ids: Iterable[str] = (), subdir: str = "") -> Path:
    """figures/<study>/[<subdir>/][<runs_key(ids)>/]: where the figures of these runs go."""
    ids = list(ids)
    target = paths.figures_dir(study) / subdir if subdir else paths.figures_dir(study)
    return target / runs_key(ids) if ids else target


def _params_dict(params: Any) -> dict | None:
    if params is None:
        return None
    if dataclasses.is_dataclass(params):
        values = dataclasses.asdict(params)
    elif isinstance(params, Mapping):
        values = dict(params)
    else:
        raise TypeError(f"params must be a dataclass or a mapping, not {type(params).__name__}")
    # where the figures went is not a parameter behind them
    return {k: v for k, v in values.items() if k not in ("figure_subdir", "figure_log")}


def export(
    fig,
    name: str,
    study: str,
    formats: Iterable[str] = ("html", "png"),
    *,
    runs: Any = None,
    params: Any = None,
    subdir: str = "",
    log: Path | str | None = None,
    out_dir: Path | str | None = None,
    embed_plotlyjs: bool = True,
    width: int = 900,
    height: int = 550,
    scale: float = 3,
) -> list[Path]:
    """Write `fig` as <dir>/<name>.<fmt> for each format, and the sidecar <dir>/<name>.json.

    <dir> is `out_dir` if given, else `figure_dir(study, run_ids(runs), subdir)`. `runs` is
    the sample table behind the figure (or its run ids); `params` the study parameters.
    `embed_plotlyjs=False` writes a small HTML that loads plotly.js from the CDN (blank
    offline). Appends the files written (figures and sidecar) to `log` if given; returns
    them. Raises ValueError for an unknown format and FigureExportError, after writing the
    others, for a static format this host cannot draw.
    """
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"figure format(s) {', '.join(map(repr, bad))} not valid; choose from {', '.join(FORMATS)}")
    ids = run_ids(runs)
    target = Path(out_dir) if out_dir else figure_dir(study, ids, subdir)
    target.mkdir(parents=True, exist_ok=True)
    base = _slug(name)
    written: list[Path] = []
    failed: list[str] = []
    for fmt in formats:
        path = target / f"{base}.{fmt}"
        if fmt == "html":
            fig.write_html(path, include_plotlyjs=True if embed_plotlyjs else "cdn")
        else:
            if not _start_kaleido():
                failed.append(fmt)
                continue
            with warnings.catch_warnings():  # plotly warns that kaleido's server ignores per-call options
                warnings.simplefilter("ignore", UserWarning)
                fig.write_image(path, format=fmt, width=width, height=height, scale=scale if fmt == "png" else 1)
        written.append(path)
    if written:
        sidecar = target / f"{base}.json"
        sidecar.write_text(json.dumps({
            "figure": name, "study": study, "run_ids": ids, "params": _params_dict(params),
            "files": [p.name for p in written], "width": width, "height": height, "png_scale": scale,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }, indent=2, default=str) + "\n", encoding="utf-8")
        written.append(sidecar)
    if log and written:
        with open(log, "a", encoding="utf-8") as fh:
            fh.writelines(f"{p.resolve()}\n" for p in written)
    if failed:
        raise FigureExportError(
            f"{name}: cannot write {', '.join(f.upper() for f in failed)}: {_STATIC_DISABLED_REASON}; "
            f"the other formats were written to {target}. Leave {', '.join(failed)} out of figure_formats "
            f"to skip them.")
    return written


def show(
    fig,
    name: str,
    study: str,
    runs: Any = None,
    params: Any = None,
    formats: Iterable[str] | None = None,
    subdir: str | None = None,
    log: Path | str | None = None,
) -> list[Path]:
    """Export `fig` (see `export`) and display it; return the files written.

    `formats`, `subdir` and `log` default to the study parameters `figure_formats`,
    `figure_subdir` and `figure_log` of `params` (html and png, none, none without them).
    """
    formats = formats if formats is not None else getattr(params, "figure_formats", ("html", "png"))
    subdir = subdir if subdir is not None else getattr(params, "figure_subdir", "")
    log = log if log is not None else (getattr(params, "figure_log", "") or None)
    written = export(fig, name, study, formats=formats, runs=runs, params=params, subdir=subdir, log=log)
    fig.show()
    return written


# --------------------------------------------------------------------------- helpers the studies draw with


def int_ticks(fig: go.Figure, values: Iterable[Any], axis: str = "x") -> go.Figure:
    """Ticks at exactly `values` (ints such as k or top-k), never fractional ones between them."""
    ticks = sorted({int(v) for v in values if v is not None})
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    return update(tickmode="array", tickvals=ticks, ticktext=[str(t) for t in ticks])


def ci_errors(frame, y: str, low: str = "ci_low", high: str = "ci_high", axis: str = "y") -> dict:
    """px arguments drawing `frame[low]`..`frame[high]` around `frame[y]` as error bars."""
    return {f"error_{axis}": (frame[high] - frame[y]).to_list(), f"error_{axis}_minus": (frame[y] - frame[low]).to_list()}


def normal_ci(std, n):
    """Half-width of a 95% normal-approximation interval of a mean: 1.96 std / sqrt(n) (0 for n < 2)."""
    import polars as pl

    return (1.96 * std / n.cast(pl.Float64).sqrt()).fill_null(0.0).fill_nan(0.0)


def mark_truncation(fig: go.Figure, frame, y: str = "n_tokens") -> go.Figure:
    """A dashed line, in the truncated colour, at the length of the samples cut at max_tokens
    (finish_reason 'length'), with their count; nothing when none was cut."""
    import polars as pl

    if "finish_reason" not in frame.columns or y not in frame.columns:
        return fig
    cut = frame.filter(pl.col("finish_reason") == "length")
    if cut.is_empty():
        return fig
    fig.add_hline(y=float(cut[y].max()), line_dash="dash", line_color=OUTCOME_COLORS["truncated"],
                  annotation_text=f"truncated at max_tokens (n={cut.height})", annotation_position="top left",
                  annotation_font_color=OUTCOME_COLORS["truncated"])
    return fig


def wilson_ci(share: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a share observed in n trials ((0, 0) for n = 0)."""
    if n <= 0:
        return (0.0, 0.0)
    z = 1.96
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))
