"""The run catalog on run directories built with RunStore from synthetic rows (no model):
columns equal hand computations, damaged runs are skipped with a note, compare() equals a
hand-computed paired difference, and `thinklab runs` prints the table from a subprocess."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import thinklab
from thinklab.runner import run_id
from thinklab import catalog
from thinklab.config import BudgetSpec, ModelSpec, RunSpec, SamplingSpec

from synthetic_runs import make_row, write_run

ROOT = Path(__file__).resolve().parents[1]


def spec_at(temperature: float, **changes) -> RunSpec:
    return RunSpec(model=ModelSpec(name="default"), n_problems=3,
                   sampling=SamplingSpec(temperature=temperature, n=2, max_tokens=64)).replace(**changes)


@pytest.fixture()
def store_root(tmp_path):
    """Two complete runs (T=0.7 and T=1.0, 3 problems x 2 samples, shared seeds) and a partial one."""
    rng = np.random.default_rng(0)
    tables = {}
    for temperature, study in ((0.7, "temperature"), (1.0, "temperature")):
        spec = spec_at(temperature)
        rows = []
        for p in range(3):
            for s in range(2):
                n = int(rng.integers(5, 30))
                ent = rng.random(4).round(3).tolist()
                rows.append(make_row(run_id(spec), f"rg:basic_arithmetic/{p}", s, correct=bool(rng.random() < 0.5),
                                     n_tokens=n, entropy=ent + [math.nan], seed=1000 * p + s,
                                     finish="length" if n > 20 else "stop", temperature=temperature))
        write_run(tmp_path, spec, rows, study=study)
        tables[temperature] = rows
    partial = spec_at(0.7, **{"budget": BudgetSpec(thinking_budget=16)})
    write_run(tmp_path, partial, [make_row(run_id(partial), "rg:basic_arithmetic/0", s, correct=True, n_tokens=8,
                                           entropy=[0.1]) for s in range(2)],
              status="running", created="2026-11-30T11:00:00+00:00")
    return tmp_path, tables


def test_catalog_values_equal_hand_computations(store_root):
    root, tables = store_root
    frame = thinklab.runs(root)
    assert frame.height == 3
    assert list(frame.columns) == list(catalog.COLUMNS)
    for temperature, rows in tables.items():
        r = frame.filter(pl.col("run_id") == run_id(spec_at(temperature))).row(0, named=True)
        assert r["temperature"] == temperature and r["study"] == "temperature"
        assert r["model"] == "smollm2-135m" and r["task"] == "rg:basic_arithmetic" and r["forward"] == "lean"
        assert r["n_problems"] == 3 and r["n_samples"] == 2 and r["n_rows"] == 6
        assert r["accuracy"] == pytest.approx(sum(x["correct"] for x in rows) / 6)
        assert r["truncated"] == pytest.approx(sum(x["finish_reason"] == "length" for x in rows) / 6)
        assert r["status"] == "complete" and r["thinking_budget"] is None
    partial = frame.row(0, named=True)  # newest first
    assert partial["thinking_budget"] == 16 and partial["status"] == "partial" and partial["n_problems"] == 1
    assert catalog.varying_knobs(frame) == ["temperature", "thinking_budget"]


def test_samples_join_answers_a_cross_run_question(store_root):
    root, tables = store_root
    joined = (thinklab.samples(root).join(thinklab.runs(root).lazy().select("run_id", "status"), on="run_id")
              .filter(pl.col("status") == "complete").group_by("temperature").agg(pl.col("n_tokens").mean()).collect())
    got = {round(t, 3): v for t, v in joined.iter_rows()}
    assert got == {t: pytest.approx(np.mean([r["n_tokens"] for r in rows])) for t, rows in tables.items()}
    assert isinstance(thinklab.samples(root), pl.LazyFrame)
    assert thinklab.samples(root, run_ids=[run_id(spec_at(1.0))]).collect().height == 6


def test_damaged_runs_are_skipped_with_a_note(store_root):
    root, _ = store_root
    (root / "cut").mkdir()
    (root / "cut" / "run.json").write_text('{"run_id": "cut", "spec": {')
    (root / "foreign").mkdir()
    (root / "foreign" / "run.json").write_text("[1, 2]")
    bad_part = write_run(root, spec_at(0.3), [make_row(run_id(spec_at(0.3)), "p/0", 0, correct=True, n_tokens=3,
                                                      entropy=[0.2])])
    (bad_part / "part-00000.parquet").write_bytes(b"PAR1 garbage")
    with pytest.warns(catalog.CatalogWarning) as notes:
        frame = thinklab.runs(root)
    assert frame.height == 3
    text = " ".join(str(n.message) for n in notes)
    assert "cut" in text and "foreign" in text and bad_part.name in text


def test_compare_equals_a_hand_computed_paired_difference(store_root):
    root, tables = store_root
    a, b = run_id(spec_at(0.7)), run_id(spec_at(1.0))
    result = thinklab.compare(a[:6], b, runs_root=root, n_boot=500)
    assert result["metric"].to_list() == ["accuracy", "length", "entropy"]
    pairs = {(r["problem_id"], r["sample_idx"], r["seed"]): r for r in tables[0.7]}
    for metric, value in (("accuracy", lambda r: float(r["correct"])), ("length", lambda r: float(r["n_tokens"])),
                          ("entropy", lambda r: np.nanmean(r["token_entropy"]))):
        deltas = [value(r) - value(pairs[(r["problem_id"], r["sample_idx"], r["seed"])]) for r in tables[1.0]]
        row = result.filter(pl.col("metric") == metric).row(0, named=True)
        assert row["n_pairs"] == 6 and row["n_clusters"] == 3
        assert row["delta"] == pytest.approx(np.mean(deltas), abs=1e-6)
        assert row["mean_a"] == pytest.approx(np.mean([value(r) for r in tables[0.7]]), abs=1e-6)
        assert row["ci_low"] <= row["delta"] <= row["ci_high"]


def test_compare_pairs_only_shared_samples_and_refuses_none(store_root):
    root, tables = store_root
    a = pl.DataFrame(tables[0.7]).with_columns(pl.col("token_entropy").cast(pl.List(pl.Float64)))
    b = pl.DataFrame(tables[1.0]).with_columns(pl.col("token_entropy").cast(pl.List(pl.Float64)))
    one = thinklab.compare(a, b.filter(pl.col("sample_idx") == 0), metrics=["length"], n_boot=100).row(0, named=True)
    assert one["n_pairs"] == 3
    with pytest.raises(ValueError, match="share no sample"):
        thinklab.compare(a, b.with_columns(seed=pl.col("seed") + 1))
    with pytest.raises(ValueError, match="unknown metric"):
        thinklab.compare(a, b, metrics=["speed"])
    with pytest.raises(FileNotFoundError, match="thinklab runs"):
        thinklab.compare("ffffffff", b, runs_root=root)


def test_cli_runs_prints_the_table(store_root):
    root, _ = store_root
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    out = subprocess.run([sys.executable, "-m", "thinklab.cli", "runs", "--runs", str(root)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["id", "study", "model", "task", "temperature", "thinking_budget", "problems", "x",
                                "samples", "accuracy", "truncated", "status", "age"]
    assert len(lines) == 4
    row = next(line for line in lines if line.startswith(run_id(spec_at(1.0)))).split()
    assert row[1:5] == ["temperature", "smollm2-135m", "rg:basic_arithmetic", "1"] and row[6:9] == ["3", "x", "2"]


def test_a_study_names_itself_in_the_runs_it_creates(tmp_path):
    from thinklab import runner, tasks
    from thinklab.store import RunStore

    spec = runner.canonical_spec(spec_at(0.7, task="rg:basic_arithmetic"))
    problems = tasks.load_task(spec.task, spec.n_problems, spec.task_seed)
    ident = runner.identity(spec, problems)
    rid = run_id(spec, problems)
    for study in ("overthinking", "temperature"):  # a run shared later keeps the study that created it
        runner.open_run(spec, problems, ident, rid, RunStore(tmp_path / rid), None, study)
    [row] = catalog.runs(tmp_path).iter_rows(named=True)
    assert (row["run_id"], row["study"], row["status"]) == (rid, "overthinking", "running")
