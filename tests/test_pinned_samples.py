"""The same spec gives the same samples, token for token, across rewrites of the decode path.

tests/pinned_samples.json holds the token ids of a few samples (greedy, sampled, and budget
forcing with its second call) as the code before the row scheduler generated them (commit
a42a98c: fixed batches, left padding). The scheduler gives each sample its own cache slot
and refills the batch; a sample must come out the same. Pins are bits of one forward's
arithmetic, so a host that runs another forward (the native kernels) skips the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thinklab import runner
from thinklab.config import BudgetSpec, ModelSpec, RunSpec, SamplingSpec

PINS = json.loads((Path(__file__).parent / "pinned_samples.json").read_text())

SPECS = {
    "greedy": RunSpec(model=ModelSpec(name="default"), task="gsm8k", n_problems=3,
                      sampling=SamplingSpec(temperature=0.0, n=1, max_tokens=48)),
    "sampled": RunSpec(model=ModelSpec(name="default"), task="gsm8k", n_problems=3,
                       sampling=SamplingSpec(temperature=0.8, n=2, max_tokens=48, seed=3)),
    "budget": RunSpec(model=ModelSpec(name="default"), task="rg:basic_arithmetic", n_problems=3,
                      sampling=SamplingSpec(temperature=0.7, n=2, max_tokens=48, seed=1),
                      budget=BudgetSpec(thinking_budget=12, answer_budget=8)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SPECS))
def test_samples_equal_the_pinned_ones(name, fast_backend, tmp_path):
    if fast_backend.forward.name != PINS["taken_with"]["forward"]:
        pytest.skip(f"pins were taken on {PINS['taken_with']['forward']}; this host runs {fast_backend.forward.name}")
    df = runner.run(SPECS[name], runs_root=tmp_path, backend=fast_backend, progress=False).sort(["problem_id", "sample_idx"])
    got = [{"problem_id": p, "sample_idx": s, "token_ids": t}
           for p, s, t in zip(df["problem_id"], df["sample_idx"], df["token_ids"].to_list())]
    assert got == PINS["runs"][name]
    if name == "budget":
        assert set(df["finish_reason"]) & {"budget"}, "the thinking cap never fired, so the second call went untested"
