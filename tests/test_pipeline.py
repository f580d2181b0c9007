"""The pipeline on the real embedded model: budgets, extensions, caching, crash-resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from thinklab import runner
from thinklab.config import BudgetSpec, ModelSpec, RunSpec, SamplingSpec
from thinklab.store import REQUIRED, SCHEMA, RunStore, load_run

pytestmark = pytest.mark.slow

TASK = "rg:basic_arithmetic"


def _spec(**budget) -> RunSpec:
    return RunSpec(
        model=ModelSpec(name="default"),
        task=TASK,
        n_problems=4,
        sampling=SamplingSpec(temperature=0.8, n=2, max_tokens=96, seed=3),
        budget=BudgetSpec(**budget),
    )


def test_run_rows_follow_the_contract(fast_backend, tmp_path):
    df = runner.run(_spec(), runs_root=tmp_path, backend=fast_backend, progress=False)
    assert df.height == 8
    assert set(REQUIRED) <= set(df.columns)
    assert dict(df.schema) == SCHEMA
    for row in df.iter_rows(named=True):
        assert row["n_tokens"] == len(row["token_ids"]) == len(row["token_entropy"]) == len(row["token_logprob"])
        assert row["n_thinking_tokens"] + row["n_answer_tokens"] == row["n_tokens"]
        assert row["thinking"] + row["answer_text"] == row["text"]
        assert row["prompt"].startswith("<|im_start|>") and row["prompt"].endswith("assistant\n")
        assert row["finish_reason"] in ("stop", "length")
    meta = RunStore(runner.run_dir(_spec(), tmp_path)).read_meta()
    assert meta["entropy_mode"] == "exact" and "sampled from" in meta["entropy_distribution"]
    assert meta["model"]["fingerprint"] and meta["status"] == "complete"
    assert meta["versions"]["torch"].startswith("2.")


class _NoBackend:
    def __getattr__(self, name):
        raise AssertionError("a cached run must not touch the model")


def test_same_spec_generates_nothing_new(fast_backend, tmp_path):
    first = runner.run(_spec(), runs_root=tmp_path, backend=fast_backend, progress=False)
    again = runner.run(_spec(), runs_root=tmp_path, backend=_NoBackend(), progress=False)
    assert first.equals(again)


def test_thinking_never_exceeds_the_budget(fast_backend, tmp_path):
    budget = 12
    df = runner.run(_spec(thinking_budget=budget, answer_budget=16), runs_root=tmp_path, backend=fast_backend, progress=False)
    assert df["n_thinking_tokens"].max() <= budget
    capped = df.filter(pl.col("finish_reason") == "budget")
    assert capped.height > 0, "a 12-token budget must cap some of SmolLM2's answers"
    assert capped["n_thinking_tokens"].to_list() == [budget] * capped.height
    assert all("Final answer: \\boxed{" in t for t in capped["answer_text"].to_list())
    # forced cue tokens carry NaN traces; sampled ones do not
    row = capped.row(0, named=True)
    ent = row["token_entropy"]
    assert all(v == v for v in ent[:budget]) and any(v != v for v in ent[budget:])


def test_wait_extensions_lengthen_thinking(fast_backend, tmp_path):
    base = runner.run(_spec(), runs_root=tmp_path, backend=fast_backend, progress=False)
    waited = runner.run(_spec(wait_extensions=2), runs_root=tmp_path, backend=fast_backend, progress=False)
    assert waited["wait_extensions"].max() >= 1, "the model never ended its thinking, so nothing was extended"
    assert waited["n_thinking_tokens"].mean() > base["n_thinking_tokens"].mean()
    extended = waited.filter(pl.col("wait_extensions") > 0)
    assert all("Wait" in t for t in extended["thinking"].to_list())


def _cli(root, *extra):
    return [sys.executable, "-m", "thinklab.cli", "generate", "--runs-root", str(root), "--task", TASK,
            "--n-problems", "4", "--n-samples", "2", "--max-tokens", "48", "--temperature", "1.0",
            "--chunk-problems", "1", "--quiet", *extra]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    # Two rows at a time, so the chunks (one problem, two samples) finish one after another and
    # the run can be killed between them; the clean run takes the default batch: a sample is the
    # same bits whatever batch it decoded in.
    two_rows = ("--batch-size", "2")
    proc = subprocess.Popen(_cli(killed_root, *two_rows), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    run_dir = None
    while time.time() < deadline:
        parts = list(killed_root.glob("*/part-*.parquet"))
        if parts:
            run_dir = parts[0].parent
            break
        assert proc.poll() is None, "generation ended before it could be killed"
        time.sleep(0.2)
    assert run_dir is not None, "no part was written in time"
    time.sleep(1.0)  # let it get into the next chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_parts = len(list(run_dir.glob("part-*.parquet")))
    assert 1 <= n_parts < 4, f"the run must be killed mid-way, found {n_parts} parts"

    out = subprocess.run(_cli(killed_root, *two_rows), env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith(run_dir.name)
    subprocess.run(_cli(clean_root), env=env, capture_output=True, check=True)

    resumed = load_run(run_dir)
    clean = load_run(clean_root / run_dir.name)
    assert resumed.height == clean.height == 8
    assert resumed.select(["problem_id", "sample_idx"]).is_unique().all()
    assert resumed.equals(clean)
    assert not list(run_dir.glob(".*tmp*"))
