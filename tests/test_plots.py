"""The house style and the export of figures (thinklab.plots), on small synthetic tables.

Style: the template is applied to every study figure, correct/incorrect keep one colour
and one legend word across the studies, labels carry no float32 noise, and each item
the paper-figure issue listed (integer k ticks, y ticks on facets, visible zero bars,
no violin fitted to a handful of samples, labelled budget points, a band and n along
the trace, the router-entropy ceiling, best_single visible beside single, the oracle
explained). Export: a sidecar naming the runs, figures of different runs in different
folders, offline HTML, PNG at print scale, SVG and PDF of the right type, and clear
errors for a format that cannot be written. No model is loaded.
"""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys

import plotly.graph_objects as go
import plotly.io as pio
import polars as pl
import pytest
from synthetic import synthetic_samples

from thinklab import plots
from thinklab.config import BudgetSpec
from thinklab.studies import common, moe, overthinking, quantization, temperature
from thinklab.studies.explore import label

STUDIES = [overthinking, temperature, quantization, moe]


@pytest.fixture(scope="module")
def tables():
    return {
        "overthinking": synthetic_samples(4, 3, temperatures=(0.8,), thinking_budgets=(16, 48, None),
                                          mean_thinking_tokens=120, max_tokens=200, seed=11),
        "temperature": synthetic_samples(5, 4, temperatures=(0.0, 0.6, 1.0), mean_thinking_tokens=40,
                                         max_tokens=80, seed=3),
        "quantization": synthetic_samples(5, 2, quantizations=(None, "int8-wo", "int4-wo"), mean_thinking_tokens=40,
                                          max_tokens=80, seed=5),
        "moe": synthetic_samples(4, 2, temperatures=(0.7,), moe_top_ks=(2, 4), num_experts=4, moe_layers=3,
                                 mean_thinking_tokens=30, max_tokens=45, seed=14),
    }


@pytest.fixture(scope="module")
def figures(tables):
    out = {}
    for study in STUDIES:
        frames = study.frames(tables[study.STUDY], study.Params(n_boot=20))
        out[study.STUDY] = {name: draw(frames) for name, draw in study.FIGURES.items()}
    return out


# --------------------------------------------------------------------------- style


def test_every_study_figure_is_in_the_house_template(figures):
    house = pio.templates[plots.TEMPLATE].layout
    for study, figs in figures.items():
        for name, fig in figs.items():
            layout = fig.layout.template.layout
            assert layout.font.family == house.font.family and layout.plot_bgcolor == "white", (study, name)
            assert list(layout.colorway) == plots.COLORWAY, (study, name)


def _outcome_traces(fig: go.Figure) -> dict[str, set[str]]:
    """Legend word ('correct'/'incorrect') -> the colours its traces are drawn in."""
    colors: dict[str, set[str]] = {}
    for trace in fig.data:
        name = (trace.name or "").split(" (n=")[0]
        if name in ("correct", "incorrect", "True", "False", "graded correct", "graded incorrect"):
            color = getattr(trace.marker, "color", None) or getattr(trace.line, "color", None)
            colors.setdefault(name, set()).add(color)
    return colors


def test_correct_and_incorrect_keep_one_colour_and_one_word_in_every_study(figures):
    split = {("overthinking", "length_correct_vs_incorrect"), ("overthinking", "phase_entropy"),
             ("overthinking", "entropy_along_trace"), ("overthinking", "markers"),
             ("quantization", "length"), ("quantization", "entropy")}
    for study, name in split:
        colors = _outcome_traces(figures[study][name])
        assert set(colors) == {"correct", "incorrect"}, (study, name, colors)  # never True/False or "graded ..."
        assert colors["correct"] == {plots.OUTCOME_COLORS["correct"]}, (study, name)
        assert colors["incorrect"] == {plots.OUTCOME_COLORS["incorrect"]}, (study, name)
        assert all("(n=" in t.name for t in figures[study][name].data if t.showlegend is not False), (study, name)


def test_no_float32_noise_in_any_label(tables, figures):
    assert tables["temperature"]["temperature"].dtype == pl.Float32
    for name, fig in figures["temperature"].items():
        assert "0.6000000" not in fig.to_json(), name
    frames = temperature.frames(tables["temperature"], temperature.Params(n_boot=20))
    assert "0.6000000" not in str(frames["summary"]) and "0.6000000" not in str(frames["pass_at_k"])
    noisy = float(pl.Series([0.6], dtype=pl.Float32)[0])
    assert noisy != 0.6 and plots.value_label(noisy) == "0.6" and label("temperature", noisy) == "0.6"
    assert plots.value_label(0.25) == "0.25" and plots.value_label(None) == "none"


def test_units_on_axes_not_column_names(figures):
    for study, figs in figures.items():
        for name, fig in figs.items():
            titles = [a.title.text for a in (fig.layout.xaxis, fig.layout.yaxis) if a.title.text]
            for raw in ("pass_at_k", "n_tokens", "mean", "estimate", "per_1k", "mean_entropy", "value"):
                assert raw not in titles, (study, name, titles)
    assert figures["temperature"]["pass_at_k"].layout.yaxis.title.text == "pass@k"
    entropy_length = figures["temperature"]["entropy_length"]  # no shared "mean" axis for nats and tokens
    y_titles = {entropy_length.layout[k].title.text for k in entropy_length.layout if k.startswith("yaxis")}
    assert {"mean token entropy (nats)", "generated tokens"} <= y_titles


def test_k_ticks_are_integers(figures):
    for study, name in (("temperature", "pass_at_k"), ("temperature", "maj_at_k"), ("temperature", "voting"),
                        ("moe", "accuracy_vs_k"), ("moe", "router_entropy_by_phase")):
        axis = figures[study][name].layout.xaxis
        assert axis.tickmode == "array" and all(float(v).is_integer() for v in axis.tickvals), (study, name)
        assert list(axis.ticktext) == [str(int(v)) for v in axis.tickvals]


def test_estimates_carry_error_bars(figures):
    for study, name in (("temperature", "pass_at_k"), ("temperature", "maj_at_k"), ("temperature", "accuracy_vs_temperature"),
                        ("overthinking", "accuracy_vs_budget"), ("overthinking", "selection"),
                        ("overthinking", "phase_entropy"), ("quantization", "accuracy"), ("moe", "accuracy_vs_k"),
                        ("temperature", "entropy_length"), ("temperature", "coverage"), ("overthinking", "markers"),
                        ("temperature", "voting")):
        fig = figures[study][name]
        assert any(t.error_y and t.error_y.array is not None for t in fig.data), (study, name)


def test_truncated_samples_are_marked_in_the_truncated_colour(tables, figures):
    for study, name in (("overthinking", "length_correct_vs_incorrect"), ("quantization", "length")):
        table = tables[study]
        cut = table.filter(pl.col("finish_reason") == "length")
        assert cut.height, study  # the synthetic tables do cut some samples
        fig = figures[study][name]
        (line,) = [s for s in fig.layout.shapes if s.y0 == s.y1]
        assert line.line.color == plots.OUTCOME_COLORS["truncated"] and line.y0 == cut["n_tokens"].max()
        assert any(f"truncated at max_tokens (n={cut.height})" == a.text for a in fig.layout.annotations), study


def test_wilson_interval():
    low, high = plots.wilson_ci(0.5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert plots.wilson_ci(1.0, 4)[1] == 1.0 and plots.wilson_ci(0.0, 0) == (0.0, 0.0)


def test_k_curves_carry_intervals_around_their_estimates(tables):
    frames = temperature.frames(tables["temperature"], temperature.Params(n_boot=50))
    for name in ("pass_at_k", "maj_at_k"):
        frame = frames[name]
        assert frame["ci_low"].null_count() == 0, name
        assert ((frame["ci_low"] <= frame[name] + 1e-9) & (frame[name] <= frame["ci_high"] + 1e-9)).all(), name
        assert (frame["ci_high"] > frame["ci_low"]).any(), name  # not degenerate everywhere


def test_facet_panels_show_their_y_ticks():
    df = synthetic_samples(3, 2, temperatures=(0.8,), thinking_budgets=(16, None), mean_thinking_tokens=40,
                           max_tokens=80, seed=2)
    two_tasks = pl.concat([df, df.with_columns(task=pl.lit("other-task"), run_id=pl.lit("r2"))])
    frames = overthinking.frames(two_tasks, overthinking.Params(n_boot=20))
    for name in ("phase_entropy", "markers", "selection"):
        fig = overthinking.FIGURES[name](frames)
        axes = [fig.layout[k] for k in fig.layout if k.startswith("yaxis")]
        assert len(axes) == 2 and all(a.showticklabels for a in axes), name


def test_zero_height_bars_are_labelled(figures):
    fig = figures["overthinking"]["markers"]
    zero = [(t.name, text) for t in fig.data for y, text in zip(t.y, t.text) if y == 0]
    assert zero and all(text == "0.0" for _, text in zero)  # the synthetic correct samples never say "actually"
    assert all(t.textposition == "outside" and t.cliponaxis is False for t in fig.data)


def test_small_groups_get_boxes_not_violins_and_violins_stop_at_the_data(tables):
    small = quantization.frames(tables["quantization"], quantization.Params(n_boot=20))
    assert {t.type for t in quantization.FIGURES["length"](small).data} == {"box"}
    big = synthetic_samples(8, 6, quantizations=(None, "int8-wo"), mean_thinking_tokens=40, max_tokens=80, seed=5)
    fig = quantization.FIGURES["length"](quantization.frames(big, quantization.Params(n_boot=20)))
    assert {t.type for t in fig.data} == {"violin"} and {t.spanmode for t in fig.data} == {"hard"}


def test_budget_points_are_labelled_with_their_budgets(figures):
    (trace,) = figures["overthinking"]["accuracy_vs_budget"].data
    assert set(trace.text) == {"budget 16", "budget 48", "uncapped"}


def test_entropy_along_trace_has_a_band_and_n(figures, tables):
    fig = figures["overthinking"]["entropy_along_trace"]
    bands = [t for t in fig.data if t.fill == "toself"]
    lines = [t for t in fig.data if t.fill != "toself"]
    assert len(bands) == len(lines) == 2
    n_correct = int(tables["overthinking"]["correct"].sum())
    assert {t.name for t in lines} == {f"correct (n={n_correct})",
                                       f"incorrect (n={tables['overthinking'].height - n_correct})"}


def test_router_entropy_shows_its_ceiling(figures):
    fig = figures["moe"]["router_entropy_by_phase"]
    (line,) = [s for s in fig.layout.shapes if s.y0 == s.y1]
    assert line.y0 == pytest.approx(math.log(4))
    low, high = fig.layout.yaxis.range
    assert low < min(min(t.y) for t in fig.data) and high > math.log(4)


def test_best_single_is_visible_beside_single(figures):
    fig = figures["temperature"]["voting"]
    best = [t for t in fig.data if t.name.startswith("best single")]
    single = {t.name.split(" (n=")[0]: t for t in fig.data if t.name.startswith("T=")}
    assert best
    for trace in best:
        twin = single[trace.name.split("(T=")[1].split(")")[0].join(["T=", ""])]
        assert trace.line.dash == "dash" and trace.marker.symbol == "circle-open"
        assert all(b > s for b, s in zip(trace.x, twin.x))  # nudged right of the curve it equals


def test_oracle_is_explained(figures):
    fig = figures["overthinking"]["selection"]
    assert any("oracle (any correct: bound)" in list(t.x) for t in fig.data)
    assert "upper bound" in fig.layout.title.text


def test_condition_headers_name_the_knob_that_varies():
    specs = quantization.conditions(quantization.Params(formats=("int8-wo",)))
    assert [common.condition_header(s, ["quantization"]) for s in specs] == ["format=baseline", "format=int8-wo"]
    (spec,) = moe.conditions(moe.Params(top_k_values=(8,)))
    assert common.condition_header(spec, ["moe_top_k"]) == "top-k=8"
    spec = overthinking.Params().run_spec(0.6, budget=BudgetSpec(thinking_budget=None))
    assert common.condition_header(spec, ["thinking_budget", "temperature"]) == "thinking budget=uncapped, temperature=0.6"


# --------------------------------------------------------------------------- export


def _table(run_ids: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"run_id": run_ids, "correct": [True] * len(run_ids)})


def _fig() -> go.Figure:
    return plots.titled(go.Figure(go.Scatter(x=[1, 2, 3], y=[0.2, 0.5, 0.4])), "a test", "n = 3")


@pytest.fixture
def figure_root(tmp_path, monkeypatch):
    monkeypatch.setenv("THINKLAB_FIGURES", str(tmp_path / "figures"))
    return tmp_path / "figures"


def test_sidecar_names_the_runs_and_parameters(figure_root, tmp_path):
    params = temperature.Params(temperatures=(0.6,), figure_log=str(tmp_path / "log"))
    written = plots.export(_fig(), "pass_at_k", "temperature", formats=["html"], runs=_table(["b", "a", "b"]),
                           params=params, log=tmp_path / "log")
    html, sidecar = written
    assert html.parent == figure_root / "temperature" / plots.runs_key(["a", "b"])
    assert sidecar == html.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    assert meta["run_ids"] == ["a", "b"] and meta["study"] == "temperature" and meta["files"] == ["pass_at_k.html"]
    assert meta["params"]["temperatures"] == [0.6] and "figure_log" not in meta["params"]
    assert (tmp_path / "log").read_text().splitlines() == [str(html.resolve()), str(sidecar.resolve())]


def test_figures_of_different_runs_land_in_different_files(figure_root):
    first = plots.export(_fig(), "accuracy", "quantization", formats=["html"], runs=_table(["r1", "r2"]))
    second = plots.export(_fig(), "accuracy", "quantization", formats=["html"], runs=_table(["r1", "r3"]))
    assert first[0] != second[0] and first[0].is_file() and second[0].is_file()
    assert json.loads(first[1].read_text())["run_ids"] == ["r1", "r2"]
    assert json.loads(second[1].read_text())["run_ids"] == ["r1", "r3"]
    same = plots.export(_fig(), "accuracy", "quantization", formats=["html"], runs=["r2", "r1"])
    assert same[0] == first[0]  # the same runs, in any order: the same folder
    sub = plots.export(_fig(), "accuracy", "quantization", formats=["html"], runs=["r1", "r2"], subdir="sweep/set")
    assert sub[0] == figure_root / "quantization" / "sweep" / "set" / plots.runs_key(["r1", "r2"]) / "accuracy.html"


def test_html_opens_offline(figure_root):
    (html, _) = plots.export(_fig(), "offline", "toy", formats=["html"], runs=["r"])
    text = html.read_text()
    cdn_script = re.compile(r"<script[^>]*\bsrc=[\"']https?://cdn\.plot\.ly")
    assert not cdn_script.search(text) and "plotly.js v" in text and len(text) > 3_000_000  # plotly.js is inside
    (small, _) = plots.export(_fig(), "online", "toy", formats=["html"], runs=["r"], embed_plotlyjs=False)
    assert cdn_script.search(small.read_text())  # the opt-out really is the CDN page


def test_a_table_without_run_ids_is_refused(figure_root):
    with pytest.raises(ValueError, match="no run_id column"):
        plots.export(_fig(), "x", "toy", formats=["html"], runs=pl.DataFrame({"correct": [True]}))
    with pytest.raises(ValueError, match="'gif' not valid; choose from html, png, svg, pdf"):
        plots.export(_fig(), "x", "toy", formats=["gif"])


def test_a_static_format_that_cannot_be_drawn_names_itself(figure_root, monkeypatch):
    monkeypatch.setattr(plots, "_start_kaleido", lambda: False)
    monkeypatch.setattr(plots, "_STATIC_DISABLED_REASON", "no Chromium found: install it")
    with pytest.raises(plots.FigureExportError, match=r"x: cannot write PDF: no Chromium found.*figure_formats"):
        plots.export(_fig(), "x", "toy", formats=["html", "pdf"], runs=["r"])
    assert (figure_root / "toy" / plots.runs_key(["r"]) / "x.html").is_file()  # the rest is written


@pytest.mark.skipif(plots.static_export_status() != "ok", reason=f"no static export here: {plots.static_export_status()}")
def test_png_svg_pdf_are_files_of_their_type(figure_root):
    written = plots.export(_fig(), "static", "toy", formats=["png", "svg", "pdf"], runs=["r"])
    png, svg, pdf, sidecar = written
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png.read_bytes()[16:24]) == (2700, 1650)  # 900 x 550 at scale 3: ~300 dpi at 9 in
    assert b"<svg" in svg.read_bytes()[:500] and svg.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert json.loads(sidecar.read_text())["files"] == ["static.png", "static.svg", "static.pdf"]


def test_show_reads_formats_and_routing_from_the_study_parameters(figure_root, tmp_path, monkeypatch):
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: None)
    params = overthinking.Params(figure_formats=("html",), figure_subdir="mine", figure_log=str(tmp_path / "log"))
    written = plots.show(_fig(), "f", "overthinking", runs=["r"], params=params)
    assert [p.name for p in written] == ["f.html", "f.json"]
    assert written[0].parent == figure_root / "overthinking" / "mine" / plots.runs_key(["r"])
    assert len((tmp_path / "log").read_text().splitlines()) == 2


# --------------------------------------------------------------------------- quiet import


def test_importing_thinklab_silences_torchao_and_pytree_noise():
    """Without thinklab, `import torchao.quantization` prints "Failed to load ..._C_*.so" lines and a
    torch/utils/_pytree.py warning on a CPU host; after `import thinklab`, nothing."""
    pytest.importorskip("torchao")
    out = subprocess.run([sys.executable, "-c", "import thinklab, torchao.quantization"], capture_output=True,
                         text=True, check=True)
    assert "Failed to load" not in out.stderr and "_pytree" not in out.stderr, out.stderr[-2000:]


# --------------------------------------------------------------------------- explore


def test_explore_opens_without_a_second_copy_of_the_first_figure(tables, monkeypatch):
    """The figure loop has just drawn every figure: the widget draws one only when asked."""
    import IPython.display

    from thinklab.studies import explore

    shown, displayed = [], []
    monkeypatch.setattr(go.Figure, "show", lambda self, *a, **k: shown.append(self))
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **k: displayed.extend(objs))
    explore.explore(moe, tables["moe"], moe.Params(n_boot=20))
    assert shown == []
    (box,) = displayed
    dropdown = box.children[0].children[0]
    assert dropdown.value == explore.CHOOSE and list(dropdown.options)[1:] == list(moe.FIGURES)
    dropdown.value = "accuracy_vs_k"
    assert len(shown) == 1 and "Accuracy" in shown[0].layout.title.text
    (top_k,) = [w for w in box.children[0].children[1:] if w.description == "moe_top_k"]
    assert [label for label, _ in top_k.options] == ["2", "4"]

    displayed.clear()
    explore.explore(temperature, tables["temperature"], temperature.Params(n_boot=20))
    (select,) = [w for w in displayed[0].children[0].children[1:] if w.description == "temperature"]
    assert [label for label, _ in select.options] == ["0", "0.6", "1"]  # the multi-select without float32 noise
