"""Where things live on disk. The one place that knows the project layout.

The project root is `$THINKLAB_HOME` if set, else the nearest parent of the working
directory holding `pyproject.toml` with a `lib/thinklab` folder, else the checkout this
package was imported from. Generated things go under `<root>/data` and `<root>/figures`.
"""

from __future__ import annotations

import os
from pathlib import Path

BENCHMARKS_ENV = "THINKLAB_BENCHMARKS_DIR"  # a folder searched first for benchmark JSONL files


def project_root() -> Path:
    env = os.environ.get("THINKLAB_HOME")
    if env:
        return Path(env).expanduser().resolve()
    for parent in [Path.cwd(), *Path.cwd().parents]:
        if (parent / "pyproject.toml").is_file() and (parent / "lib" / "thinklab").is_dir():
            return parent
    here = Path(__file__).resolve()
    if here.parents[1].name == "lib":
        return here.parents[2]
    return Path.cwd()


def data_dir() -> Path:
    return Path(os.environ.get("THINKLAB_DATA", project_root() / "data"))


def models_dir() -> Path:
    return data_dir() / "models"


def runs_dir() -> Path:
    return data_dir() / "runs"


def figures_dir(study: str | None = None) -> Path:
    root = Path(os.environ.get("THINKLAB_FIGURES", project_root() / "figures"))
    return root / study if study else root


def benchmarks_dirs() -> list[Path]:
    """Candidate folders for the local benchmark JSONL files, in lookup order."""
    out = []
    if os.environ.get(BENCHMARKS_ENV):
        out.append(Path(os.environ[BENCHMARKS_ENV]).expanduser())
    out.append(project_root().parent / "shared" / "data" / "benchmarks")
    out.append(Path.cwd().parent / "shared" / "data" / "benchmarks")
    return out
