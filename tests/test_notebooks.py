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
