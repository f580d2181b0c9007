"""The same spec gives the same samples, token for token, across rewrites of the decode path.

tests/pinned_samples.json holds the token ids of a few samples (greedy, sampled, and budget
forcing with its second call) as the code before the row scheduler generated them (commit
a42a98c: fixed batches, left padding). The scheduler gives each sample its own cache slot
and refills the batch; a sample must come out the same. Pins are bits of one forward's
arithmetic: they were taken on the torch path (`lean-onednn`), which every host can run,
so a host whose default is a native kernel runs the comparison on that path.
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
def test_samples_equal_the_pinned_ones(name, fast_backend, tmp_path, monkeypatch):
    pinned_on = PINS["taken_with"]["forward"]
    if fast_backend.forward.name != pinned_on and pinned_on == "lean-onednn":
        # the pins' forward (oneDNN GEMMs, torch attention) runs on every host: use it here too
        from thinklab.backends.forward import LeanForward
        from thinklab.backends.lean import LeanDecoder

        monkeypatch.setattr(fast_backend, "forward", LeanForward(LeanDecoder(fast_backend.model, native=False)))
    if fast_backend.forward.name != pinned_on:
        pytest.skip(f"pins were taken on {pinned_on}; this host runs {fast_backend.forward.name}")
    df = runner.run(SPECS[name], runs_root=tmp_path, backend=fast_backend, progress=False).sort(["problem_id", "sample_idx"])
    got = [{"problem_id": p, "sample_idx": s, "token_ids": t}
           for p, s, t in zip(df["problem_id"], df["sample_idx"], df["token_ids"].to_list())]
    assert got == PINS["runs"][name]
    if name == "budget":
        assert set(df["finish_reason"]) & {"budget"}, "the thinking cap never fired, so the second call went untested"
