"""Toy parameterized notebooks and sweep files for the batch tests (local and Ray executors)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import yaml


def toy_notebook(folder: Path, parameters: str, body: str) -> Path:
    """folder/toy.ipynb: a parameters cell (tagged for papermill) and one body cell."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    path = folder / "toy.ipynb"
    nbformat.write(nb, path)
    return path


def write_sweep(folder: Path, spec: dict, name: str = "toy") -> Path:
    """folder/<name>.yaml holding the sweep `spec`."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
