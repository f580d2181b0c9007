"""`thinklab batch`: sweep files, the parameter check, failing sets, skip-and-retry, the index.

The mechanism tests run a toy notebook (no model, a few seconds a set); one test runs the
real overthinking notebook at tiny sizes with one set given a task that does not exist.
Every test writes under tmp_path: THINKLAB_DATA / THINKLAB_FIGURES point there.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from thinklab import batch
from toy_notebooks import toy_notebook, write_sweep

ROOT = Path(__file__).resolve().parents[1]
TOY_PARAMETERS = '''task = "ok"  # "ok" draws a line; anything else raises (a comment with (parens) and "quotes")
n_points = 3  # points on the line
figure_subdir = ""  # set by thinklab batch
figure_log = ""  # set by thinklab batch
'''
TOY_BODY = '''import plotly.graph_objects as go
from thinklab import plots
if task != "ok":
    raise ValueError(f"unknown task {task!r}")
plots.export(go.Figure(go.Scatter(y=list(range(n_points)))), "line", "toy", formats=["html"],
             subdir=figure_subdir, log=figure_log or None)
'''


def _toy_notebook(folder: Path) -> Path:
    return toy_notebook(folder, TOY_PARAMETERS, TOY_BODY)


def overthinking_figures():
    from thinklab.studies import overthinking

    return overthinking.FIGURES


def test_notebook_parameters_parsed_with_comments_papermill_drops(tmp_path):
    names = batch.notebook_parameters(_toy_notebook(tmp_path))
    assert list(names) == ["task", "n_points", "figure_subdir", "figure_log"] and names["n_points"] == "3"
    # every shipped notebook's parameters are found, whatever its comments hold
    assert {"model", "task", "budgets", "temperature"} <= set(batch.notebook_parameters(ROOT / "notebooks/01_overthinking.ipynb"))


def test_unknown_parameter_rejected_before_anything_runs(tmp_path):
    _toy_notebook(tmp_path)
    sweep = write_sweep(tmp_path, {"notebook": "toy.ipynb", "parameters": {"n_points": 2},
                              "sets": [{"name": "a"}, {"name": "typo", "n_pionts": 4}]})
    with pytest.raises(ValueError) as info:
        batch.run_sweep(sweep)
    message = str(info.value)
    assert "n_pionts" in message and "'typo'" in message and "accepts: task, n_points" in message
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written

    from thinklab import cli

    assert cli.main(["batch", str(sweep)]) == 2  # the CLI reports it as a usage error


def test_grid_expands_to_named_sets_with_stable_hashes(tmp_path):
    _toy_notebook(tmp_path)
    path = write_sweep(tmp_path, {"notebook": "toy.ipynb", "parameters": {"n_points": 2},
                             "grid": {"task": ["ok", "rg:chain_sum"], "n_points": [1, 5]}})
    sweep = batch.load_sweep(path)
    assert [s.name for s in sweep.sets] == ["task=ok__n_points=1", "task=ok__n_points=5",
                                           "task=rg-chain_sum__n_points=1", "task=rg-chain_sum__n_points=5"]
    assert sweep.sets[2].parameters == {"n_points": 1, "task": "rg:chain_sum"}
    assert len({s.param_hash for s in sweep.sets}) == 4
    assert [s.param_hash for s in batch.load_sweep(path).sets] == [s.param_hash for s in sweep.sets]
    assert sweep.out_dir == (tmp_path / "out" / "toy").resolve()

    with pytest.raises(ValueError, match="exactly one of"):
        batch.load_sweep(write_sweep(tmp_path, {"notebook": "toy.ipynb", "sets": [{}], "grid": {"task": ["ok"]}}, "both"))
    with pytest.raises(ValueError, match="two sets are named"):
        batch.load_sweep(write_sweep(tmp_path, {"notebook": "toy.ipynb", "sets": [{"name": "a"}, {"name": "a"}]}, "dup"))


@pytest.mark.parametrize("sweep_file", sorted((ROOT / "papermill_runs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_are_valid(sweep_file):
    sweep = batch.load_sweep(sweep_file)  # the notebook exists and knows every parameter name
    assert sweep.sets
    assert sweep.out_dir.parent == (ROOT / "papermill_runs" / "out").resolve()


def test_demo_sweep_is_the_overthinking_notebook_on_the_05b_model_and_gsm8k():
    sweep = batch.load_sweep(ROOT / "papermill_runs" / "demo.yaml")
    assert sweep.notebook.name == "01_overthinking.ipynb"
    [demo] = sweep.sets
    assert (demo.parameters["model"], demo.parameters["task"]) == ("qwen2.5-0.5b", "gsm8k")
    assert None in demo.parameters["budgets"] and len(demo.parameters["budgets"]) >= 2  # capped against uncapped
    assert not sweep.separate_figures  # figures land in figures/overthinking/ as `make demo` promises


@pytest.mark.slow
def test_failing_set_does_not_stop_others_and_rerun_retries_only_it(isolated, capsys):
    _toy_notebook(isolated)
    sweep = write_sweep(isolated, {"notebook": "toy.ipynb", "parameters": {"n_points": 2},
                              "sets": [{"name": "a"}, {"name": "broken", "task": "nope"}, {"name": "c", "n_points": 4}]})
    first = batch.run_sweep(sweep, workers=2)
    out = isolated / "out" / "toy"
    status = dict(zip(first["set"], first["status"]))
    assert status == {"a": "ok", "broken": "failed", "c": "ok"}
    broken = first.filter(pl.col("set") == "broken").row(0, named=True)
    assert broken["error"] == "ValueError: unknown task 'nope'" and broken["error_cell"] is not None
    assert all(first["runs"] == 1) and all(first["action"] == "ran")
    for row in first.iter_rows(named=True):
        assert Path(row["notebook"]).is_file()  # the executed notebook is kept, failed or not
        assert row["duration_s"] > 0
    a = first.filter(pl.col("set") == "a").row(0, named=True)
    # each set's figures are its own, under figures/<study>/<sweep>/<set>/, passed in as notebook parameters
    folder = (isolated / "figures" / "toy" / "toy" / "a").resolve()
    assert a["figures"] == [str(folder / "line.html"), str(folder / "line.json")]
    assert json.loads((folder / "line.json").read_text())["files"] == ["line.html"]
    assert json.loads(a["parameters"]) == {"n_points": 2}
    index_md = (out / "index.md").read_text()
    assert "| broken | failed |" in index_md and "ValueError: unknown task 'nope'" in index_md
    assert pl.read_parquet(out / "index.parquet").equals(first)
    assert "broken: failed" in capsys.readouterr().out  # progress per set

    mtimes = {name: (out / f"{name}.ipynb").stat().st_mtime_ns for name in status}
    second = batch.run_sweep(sweep, workers=2)
    assert dict(zip(second["set"], second["action"])) == {"a": "skipped", "broken": "ran", "c": "skipped"}
    assert dict(zip(second["set"], second["runs"])) == {"a": 1, "broken": 2, "c": 1}
    assert dict(zip(second["set"], second["status"])) == status
    assert (out / "a.ipynb").stat().st_mtime_ns == mtimes["a"]
    assert (out / "broken.ipynb").stat().st_mtime_ns > mtimes["broken"]
    assert second.filter(pl.col("set") == "a")["figures"].to_list() == [a["figures"]]  # kept from the first run

    # changed parameters rerun that set; force reruns everything
    sweep.write_text(sweep.read_text().replace("n_points: 4", "n_points: 5"))
    third = batch.run_sweep(sweep, workers=2)
    assert dict(zip(third["set"], third["action"])) == {"a": "skipped", "broken": "ran", "c": "ran"}
    forced = batch.run_sweep(sweep, workers=3, force=True)
    assert all(forced["action"] == "ran") and forced["runs"].to_list() == [2, 4, 3]


@pytest.mark.slow
def test_overthinking_sweep_with_a_bad_task(isolated):
    """The real study notebook at tiny sizes: the bad set fails inside the notebook, the good one completes."""
    sweep = write_sweep(isolated, {
        "notebook": str(ROOT / "notebooks" / "01_overthinking.ipynb"),
        "parameters": {"n_problems": 1, "n_samples": 1, "budgets": [8, None], "max_tokens": 16, "answer_budget": 8,
                       "figure_formats": ["html"]},
        "sets": [{"name": "tiny"}, {"name": "bad_task", "task": "rg:no_such_task"}],
    }, "overthinking_tiny")
    first = batch.run_sweep(sweep, workers=2)
    rows = {row["set"]: row for row in first.iter_rows(named=True)}
    assert rows["tiny"]["status"] == "ok", rows["tiny"]["error"]
    assert rows["bad_task"]["status"] == "failed"
    assert rows["bad_task"]["error"].startswith("TaskError: unknown reasoning-gym task 'no_such_task'")
    figures = [Path(f) for f in rows["tiny"]["figures"]]
    assert figures and all(f.is_file() and f.suffix in (".html", ".json") for f in figures)
    assert all((isolated / "figures" / "overthinking" / "overthinking_tiny" / "tiny") in f.parents for f in figures)
    # each figure's sidecar names the runs behind it (the set's conditions) and its parameters
    sidecars = [json.loads(f.read_text()) for f in figures if f.suffix == ".json"]
    assert len(sidecars) == len(overthinking_figures()) and all(len(s["run_ids"]) == 2 for s in sidecars)
    assert {s["params"]["budgets"] == [8, None] for s in sidecars} == {True}
    assert "figure_log" not in sidecars[0]["params"]

    second = batch.run_sweep(sweep, workers=2)
    assert dict(zip(second["set"], second["action"])) == {"tiny": "skipped", "bad_task": "ran"}
    assert dict(zip(second["set"], second["runs"])) == {"tiny": 1, "bad_task": 2}
