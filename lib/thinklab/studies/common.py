"""What every study shares: running a list of conditions and concatenating their tables."""

from __future__ import annotations

from typing import Sequence

import polars as pl

from thinklab import runner
from thinklab.config import RunSpec


def run_conditions(specs: Sequence[RunSpec], progress: bool = True, **run_options) -> pl.DataFrame:
    """Run (or load) every spec and return one long sample table across them."""
    frames = []
    for i, spec in enumerate(specs):
        if progress:
            print(f"[thinklab] condition {i + 1}/{len(specs)}: run {runner.run_id(spec)} "
                  f"({spec.model.name}, {spec.task}, T={spec.sampling.temperature}, budget={spec.budget.thinking_budget})")
        frames.append(runner.run(spec, progress=progress, **run_options))
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
