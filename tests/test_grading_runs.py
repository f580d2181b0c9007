"""Grading inside real runs: the runner passes each sample's finish reason and the run's
grading options to `grade`, and `thinklab regrade` applies the same rules to the stored rows."""

from __future__ import annotations

import pytest

from thinklab import grading, runner
from thinklab.cli import main
from thinklab.config import GradingSpec, ModelSpec, RunSpec, SamplingSpec
from thinklab.store import RunStore

pytestmark = pytest.mark.slow


def _spec(lenient: bool) -> RunSpec:
    return RunSpec(
        model=ModelSpec(name="default"),
        task="rg:basic_arithmetic",
        n_problems=4,
        sampling=SamplingSpec(temperature=0.8, n=2, max_tokens=16, seed=1),  # short: most samples are cut
        grading=GradingSpec(lenient_truncated=lenient),
    )


def test_truncated_samples_follow_the_runs_grading_option_and_regrade_agrees(fast_backend, tmp_path):
    strict = runner.run(_spec(False), runs_root=tmp_path, backend=fast_backend, progress=False)
    lenient = runner.run(_spec(True), runs_root=tmp_path, backend=fast_backend, progress=False)
    assert runner.run_id(_spec(False)) != runner.run_id(_spec(True))
    assert strict["text"].to_list() == lenient["text"].to_list()  # same seeds: only the grading differs
    cut = strict["finish_reason"] == "length"
    assert cut.sum() >= 4, strict["finish_reason"].to_list()
    fallback = ~strict["extractor"].is_in(list(grading.FINAL_ANSWER_EXTRACTORS))
    for row in strict.filter(cut & fallback).iter_rows(named=True):
        assert row["extractor"] == "none_truncated" and row["pred"] == "" and not row["correct"], row["text"]
    relaxed = lenient.filter(cut & fallback)
    assert relaxed.height and relaxed["extractor"].is_in(["last_number", "last_line", "none"]).all()
    assert (relaxed["pred"] != "").any()
    for row in strict.iter_rows(named=True):  # each row is what grade() says for its text and finish reason
        g = grading.grade(row["text"], row["gold"], row["task"], finish_reason=row["finish_reason"])
        assert (g.pred, g.correct, g.extractor) == (row["pred"], row["correct"], row["extractor"])
    for spec, before in ((_spec(False), strict), (_spec(True), lenient)):
        assert main(["regrade", str(runner.run_dir(spec, tmp_path))]) == 0
        after = RunStore(runner.run_dir(spec, tmp_path)).load()
        cols = ["problem_id", "sample_idx", "pred", "correct", "extractor"]
        assert after.select(cols).equals(before.select(cols)), spec.grading
        assert after["grader_version"].unique().to_list() == [grading.GRADER_VERSION]
