"""What every study shares: running a list of conditions and concatenating their tables."""

from __future__ import annotations

from typing import Sequence

import polars as pl

from thinklab import runner
from thinklab.config import RunSpec


def run_conditions(specs: Sequence[RunSpec], progress: bool = True, **run_options) -> pl.DataFrame:
    """Run (or load) every spec and return one long sample table across them; the runs on
    one model are generated together (`runner.run_many`)."""
    if progress:
        for i, spec in enumerate(specs):
            print(f"[thinklab] condition {i + 1}/{len(specs)}: run {spec.run_id} "
                  f"({spec.model.name}, {spec.task}, T={spec.sampling.temperature}, budget={spec.budget.thinking_budget})")
    frames = runner.run_many(specs, progress=progress, **run_options)
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
