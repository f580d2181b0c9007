"""The explore widget of every study notebook: filter the samples, redraw any figure.

`explore(study, df, params)` shows a figure dropdown and one multi-select per column that
tells the samples apart (task, model, level and each condition column that varies); every
change recomputes `study.frames` on the chosen rows and draws `study.FIGURES[name]` from
them, so nothing regenerates. It opens with no figure chosen: the notebook's figure loop
has just drawn every one, and a second copy of the first figure read as a duplicate.
`filter_options` and `filter_samples` are the pure parts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import polars as pl

from thinklab.metrics import condition_columns

CHOOSE = "(choose a figure)"
NULL_LABELS = {"thinking_budget": "uncapped", "quantization": "baseline", "moe_top_k": "checkpoint's own"}


def filter_options(df: pl.DataFrame) -> dict[str, list[Any]]:
    """Column -> its values (sorted, null last), for each column with more than one value
    among task, model, level and the condition columns."""
    columns = dict.fromkeys(["task", "model", *(["level"] if "level" in df.columns else []), *condition_columns(df)])
    options = {}
    for column in columns:
        values = df[column].unique().sort(nulls_last=True).to_list()
        if len(values) > 1:
            options[column] = values
    return options


def filter_samples(df: pl.DataFrame, choices: Mapping[str, Sequence[Any]]) -> pl.DataFrame:
    """The rows whose value in each chosen column is one of the chosen values (None picks nulls)."""
    keep = pl.lit(True)
    for column, values in choices.items():
        present = [v for v in values if v is not None]
        match = pl.col(column).is_in(present) if present else pl.lit(False)
        if any(v is None for v in values):
            match = match | pl.col(column).is_null()
        keep = keep & match
    return df.filter(keep)


def label(column: str, value: Any) -> str:
    """How a value reads in the widget: floats stored as float32 rounded, nulls named."""
    if value is None:
        return NULL_LABELS.get(column, "none")
    from thinklab.plots import value_label

    return value_label(value)


def explore(study: ModuleType, df: pl.DataFrame, params: Any) -> None:
    """Display the widget: a figure dropdown, a multi-select per filter column, the figure."""
    import ipywidgets as widgets
    from IPython.display import display

    figure = widgets.Dropdown(options=[CHOOSE, *study.FIGURES], value=CHOOSE, description="figure")
    selects = {
        column: widgets.SelectMultiple(options=[(label(column, v), v) for v in values], value=tuple(values),
                                       description=column, rows=min(len(values), 6))
        for column, values in filter_options(df).items()
    }
    out = widgets.Output()

    def redraw(_change=None) -> None:
        with out:
            out.clear_output(wait=True)
            if figure.value == CHOOSE:
                print("choose a figure to redraw it from the chosen samples")
                return
            rows = filter_samples(df, {column: select.value for column, select in selects.items()})
            if rows.height == 0:
                print("no samples for this choice")
                return
            try:
                fig = study.FIGURES[figure.value](study.frames(rows, params))
            except ValueError as exc:  # e.g. the quantization tables without the baseline chosen
                print(f"{figure.value} cannot be drawn for this choice: {exc}")
                return
            fig.show()

    for control in (figure, *selects.values()):
        control.observe(redraw, names="value")
    # Draw before displaying: an Output widget cleared with wait=True after it is displayed
    # leaves nbclient (papermill) waiting forever for the cell to finish.
    redraw()
    display(widgets.VBox([widgets.HBox([figure, *selects.values()]), out]))
