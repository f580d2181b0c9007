"""The study notebooks as committed: clean, parameterized, self-documenting."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import papermill as pm
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _parameters_cell(path: Path) -> dict:
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is cells[0], f"{path.name}: the first code cell must be the one tagged 'parameters'"
    return tagged[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_parameter_is_a_commented_literal_papermill_can_list(path):
    source = "".join(_parameters_cell(path)["source"])
    names = []
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, f"{path.name}: only plain assignments"
        ast.literal_eval(node.value)  # typed literals only; derived values belong in the next cell
        names.append(node.targets[0].id)
    lines = {line.split("=")[0].strip(): line for line in source.splitlines() if "=" in line}
    assert all("#" in lines[n] for n in names), f"{path.name}: every parameter has a comment"
    logging.getLogger("papermill").setLevel(logging.ERROR)
    listed = pm.inspect_notebook(str(path))
    assert set(listed) == set(names), f"papermill --help-notebook misses {set(names) - set(listed)}"
    assert all(listed[n]["help"] for n in names)
    untyped = [n for n in names if listed[n]["inferred_type_name"] in (None, "None")]
    assert not untyped, f"{path.name}: papermill --help-notebook shows 'Unknown type' for {untyped}"


# --------------------------------------------------------------------------- the study contract in the notebooks

STUDY_OF = {"01_overthinking.ipynb": "overthinking", "02_temperature.ipynb": "temperature",
            "03_quantization.ipynb": "quantization", "04_moe_sparsity.ipynb": "moe"}


def _study(path: Path):
    import importlib

    return importlib.import_module(f"thinklab.studies.{STUDY_OF[path.name]}")


def _code_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_every_study_has_its_notebook():
    assert sorted(STUDY_OF) == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_is_the_study_params_with_its_defaults(path):
    import dataclasses

    params = _study(path).Params
    source = "".join(_parameters_cell(path)["source"])
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body}
    assert list(values) == [f.name for f in dataclasses.fields(params)], "the parameters cell lists Params' fields in order"
    defaults = params()
    for name, value in values.items():
        expected = getattr(defaults, name)
        assert (tuple(value) if isinstance(value, list) else value) == expected, f"{path.name}: {name}"


def _calls_only(node: ast.AST) -> bool:
    """An expression made of names, attributes, constants, subscripts and calls: no logic."""
    allowed = (ast.Name, ast.Attribute, ast.Constant, ast.Subscript, ast.Call, ast.keyword, ast.Load, ast.Store)
    return all(isinstance(n, allowed) for n in ast.walk(node))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_hold_only_calls_one_figure_loop_and_the_widget(path):
    loops = []
    for source in _code_cells(path)[1:]:
        for node in ast.parse(source).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.For):
                loops.append(node)
                assert ast.unparse(node.iter) == "study.FIGURES.items()", ast.unparse(node)
                assert len(node.body) == 1 and isinstance(node.body[0], ast.Expr), ast.unparse(node)
                assert _calls_only(node.body[0].value), ast.unparse(node)
                assert ast.unparse(node.body[0].value.func) == "plots.show"
                continue
            assert isinstance(node, (ast.Assign, ast.Expr)), f"{path.name}: {ast.unparse(node)}"
            if isinstance(node, ast.Assign):
                assert all(isinstance(t, ast.Name) for t in node.targets), ast.unparse(node)
            assert _calls_only(node.value), f"{path.name}: logic in a notebook: {ast.unparse(node)}"
    assert len(loops) == 1, f"{path.name}: one loop draws and exports every figure"
    sources = "\n".join(_code_cells(path)[1:])
    assert "notebook_params(study.Params, globals())" in sources and "explore(study, df, params)" in sources


@pytest.fixture
def shell():
    """An in-process IPython shell with its history in memory, removed afterwards."""
    import sys

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    hooks = sys.displayhook, sys.excepthook
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    instance = InteractiveShell.instance(config=config)
    try:
        yield instance
    finally:
        InteractiveShell.clear_instance()
        sys.displayhook, sys.excepthook = hooks


def _run_setup(shell, path: Path, parameters: dict):
    """The parameters cell, papermill's injected cell and the cell that checks them, run in
    `shell` as a kernel runs them (the input history included); returns its namespace."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    logging.getLogger("papermill").setLevel(logging.ERROR)
    nb = parameterize_notebook(load_notebook_node(str(path)), parameters)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    shell.reset(new_session=True)
    for source in code[:3]:  # parameters, injected-parameters, the check
        result = shell.run_cell(source, store_history=True)
        if result.error_in_exec is not None:
            raise result.error_in_exec
    return shell.user_ns


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_strings_are_checked_in_the_notebook(shell, path):
    from thinklab.studies.common import ParameterError

    ns = _run_setup(shell, path, {"n_problems": "3", "max_tokens": "1e3", "figure_formats": '["html"]'})
    params = ns["params"]
    assert (params.n_problems, params.max_tokens, params.figure_formats) == (3, 1000, ("html",))
    assert isinstance(params, _study(path).Params)
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) bogus; valid parameters: model, backend"):
        _run_setup(shell, path, {"n_problems": 3, "bogus": 1})
    with pytest.raises(ParameterError, match=r"max_tokens=8.5 is a float, not int"):
        _run_setup(shell, path, {"max_tokens": 8.5})
