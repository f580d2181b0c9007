"""The study contract (thinklab.studies): one shape for the four studies, parameters checked
once, and every table behind a figure against a hand computation on a small synthetic table.

The hand computations loop over plain Python rows (`df.to_dicts()`), independent of the
polars group-bys they check. Bootstrap intervals are left to tests/test_metrics.py; here
the point estimates, counts and labels are checked. No model is loaded.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from synthetic import synthetic_samples

from thinklab.config import BudgetSpec, ModelSpec, RunSpec, SamplingSpec
from thinklab.studies import common, moe, overthinking, quantization, temperature
from thinklab.studies.common import ParameterError, check_params, injected_names
from thinklab.studies.explore import filter_options, filter_samples

ROOT = Path(__file__).resolve().parents[1]
STUDIES = [overthinking, temperature, quantization, moe]
CONTRACT = {"STUDY", "Params", "conditions", "run", "frames", "FIGURES"}


def _public(module) -> set[str]:
    """Names a module defines for others: not private, not imported from elsewhere."""
    return {
        name for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value)
        and getattr(value, "__module__", module.__name__) == module.__name__
    }


def _groups(rows: list[dict], keys: list[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        out[tuple(row[k] for k in keys)].append(row)
    return dict(out)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _rows(table: pl.DataFrame) -> list[dict]:
    """The rows of `table` with its float32 knobs as written (0.6, not 0.6000000238418579), as the frames hold them."""
    return [dict(r, temperature=round(r["temperature"], 6), top_p=round(r["top_p"], 6)) for r in table.to_dicts()]


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


# --------------------------------------------------------------------------- the contract


def test_the_four_studies_expose_exactly_the_same_names():
    for study in STUDIES:
        assert _public(study) == CONTRACT, f"{study.__name__}: {_public(study) ^ CONTRACT}"
        assert set(study.__all__) == CONTRACT
        assert issubclass(study.Params, common.StudyParams)
        for name, draw in study.FIGURES.items():
            assert list(inspect.signature(draw).parameters) == ["f"], f"{study.STUDY}.{name} takes more than frames"
        assert list(inspect.signature(study.conditions).parameters) == ["params"]
    assert len({study.STUDY for study in STUDIES}) == 4


def test_importing_the_studies_loads_neither_torch_nor_transformers():
    code = ("import sys, thinklab.studies.moe, thinklab.studies.quantization, thinklab.studies.explore; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_moe_default_model_is_the_offline_moe():
    from thinklab import models

    assert moe.Params().model == models.DEFAULT_OFFLINE


# --------------------------------------------------------------------------- conditions


def _spec(model="default", task="rg:basic_arithmetic", n_problems=8, temperature=0.0, top_p=1.0, n=1,
          max_tokens=128, quantization=None, moe_top_k=None, budget=None) -> RunSpec:
    """A RunSpec written out field by field, as the studies built them before the contract."""
    return RunSpec(model=ModelSpec(name=model, backend="hf", quantization=quantization, moe_top_k=moe_top_k),
                   task=task, n_problems=n_problems, task_seed=0,
                   sampling=SamplingSpec(temperature=temperature, top_p=top_p, n=n, max_tokens=max_tokens, seed=0),
                   budget=budget or BudgetSpec())


def test_default_conditions_are_the_specs_the_notebooks_ran_before():
    assert overthinking.conditions(overthinking.Params()) == [
        _spec(temperature=0.8, n=4, max_tokens=160,
              budget=BudgetSpec(thinking_budget=b, wait_extensions=0, answer_budget=24)) for b in (16, 48, None)]
    assert temperature.conditions(temperature.Params()) == [
        _spec(temperature=t, n=1 if t == 0 else 8) for t in (0.0, 0.6, 1.0)]
    assert quantization.conditions(quantization.Params()) == [
        _spec(n_problems=24, quantization=q) for q in (None, "int8-wo", "int4-wo")]
    assert moe.conditions(moe.Params()) == [
        _spec(model="smollm2-135m-moe16", n_problems=12, max_tokens=96, moe_top_k=k) for k in (8, 12, 14, 16)]


def test_every_parameter_reaches_the_spec():
    params = temperature.Params(model="qwen", backend="hf", dtype="float32", forward="transformers", task="gsm8k",
                                n_problems=3, n_samples=5, max_tokens=64, seed=7, temperatures=(0.5,), top_ps=(0.9,))
    (spec,) = temperature.conditions(params)
    assert (spec.model.name, spec.model.backend, spec.model.dtype, spec.model.forward) == (
        "qwen", "hf", "float32", "transformers")
    assert (spec.task, spec.n_problems, spec.task_seed) == ("gsm8k", 3, 7)
    assert (spec.sampling.temperature, spec.sampling.top_p, spec.sampling.n, spec.sampling.max_tokens,
            spec.sampling.seed) == (0.5, 0.9, 5, 64, 7)


@pytest.mark.parametrize("study", STUDIES, ids=lambda s: s.STUDY)
def test_greedy_draws_one_sample_in_every_study(study):
    knob = {"temperature": {"temperatures": (0.0, 0.7)}}.get(study.STUDY, {"temperature": 0.0})
    specs = study.conditions(study.Params(n_samples=5, **knob))
    assert {s.sampling.n for s in specs if s.sampling.temperature == 0} == {1}
    assert {s.sampling.n for s in specs if s.sampling.temperature > 0} <= {5}


# --------------------------------------------------------------------------- parameters


GOOD = [  # raw value -> checked value (papermill -p strings, YAML, JSON)
    ("budgets", "[8]", (8,)),
    ("budgets", [16, None], (16, None)),
    ("max_tokens", "1e3", 1000),  # YAML 1.1 reads 1e3 as a string
    ("max_tokens", 1e3, 1000),
    ("n_problems", "2", 2),
    ("temperature", "0.7", 0.7),
    ("temperature", 1, 1.0),
    ("markers", ["wait"], ("wait",)),
    ("figure_formats", [], ()),
    ("model", "123", "123"),  # a string parameter stays a string
]

BAD = [  # raw value -> the message names the parameter, the value and what is valid
    ("max_tokens", 8.5, "max_tokens=8.5 is a float, not int; valid: a positive int"),
    ("max_tokens", "1e3.5", "max_tokens='1e3.5' is a string that is not a Python literal; valid: a positive int"),
    ("max_tokens", 0, "max_tokens=0 is not valid; valid: a positive int"),
    ("n_samples", True, "n_samples=True is a bool, not int; valid: a positive int"),
    ("temperature", float("nan"), "temperature=nan is not valid; valid: a finite float >= 0 (0 is greedy)"),
    ("temperature", float("inf"), "temperature=inf is not valid; valid: a finite float >= 0"),
    ("temperature", "nan", "temperature='nan' is a string that is not a Python literal"),
    ("budgets", "[8", "budgets='[8' is a string that is not a Python literal; valid: a non-empty list"),
    ("budgets", [], "budgets=[] is not valid; valid: a non-empty list, each element a positive int"),
    ("budgets", [0], "budgets=[0] is not valid; valid: a non-empty list, each element a positive int"),
    ("budgets", 8, "budgets=8 is a int, not a list of int or None"),
    ("backend", "tpu", "backend='tpu' is not valid; valid: one of 'hf', 'vllm'"),
    ("dtype", "int8", "dtype='int8' is not valid; valid: one of 'auto', 'float32', 'bfloat16', 'float16'"),
    ("forward", "fast", "forward='fast' is not valid; valid: one of 'auto', 'lean', 'transformers'"),
    ("figure_formats", ["gif"], "figure_formats=['gif'] is not valid; valid: a list, each element one of 'html'"),
    ("model", "", "model='' is not valid; valid: a model name, hub id or local directory"),
    ("seed", -1, "seed=-1 is not valid; valid: an int >= 0"),
]


@pytest.mark.parametrize("name, raw, expected", GOOD, ids=[f"{n}={r!r}" for n, r, _ in GOOD])
def test_parameters_are_coerced_from_literals(name, raw, expected):
    value = getattr(check_params(overthinking.Params, {name: raw}), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("name, raw, message", BAD, ids=[f"{n}={r!r}" for n, r, _ in BAD])
def test_bad_parameters_are_refused_with_one_clear_message(name, raw, message):
    with pytest.raises(ParameterError) as err:
        check_params(overthinking.Params, {name: raw})
    assert message in str(err.value)


def test_a_string_is_never_run_as_code(tmp_path):
    target = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(target)!r}).touch()"
    with pytest.raises(ParameterError, match="not a Python literal"):
        check_params(overthinking.Params, {"budgets": payload})
    assert not target.exists()


def test_every_bad_parameter_and_unknown_name_in_one_error():
    with pytest.raises(ParameterError) as err:
        check_params(temperature.Params, {"ks": "[1, 2", "backend": "x", "n_problems": 2}, injected=["bogus", "ks"])
    text = str(err.value)
    assert "unknown parameter(s) bogus; valid parameters: model, backend" in text
    assert "ks='[1, 2'" in text and "backend='x'" in text and "n_problems" not in text.split("valid parameters")[0]


def test_papermill_injected_names_are_read_from_the_input_history():
    history = ["", "model = 'default'  # a comment", '# Parameters\nn_problems = 2\nbogus = "x"\n', "params = 1"]
    assert injected_names(history) == ["n_problems", "bogus"]


# --------------------------------------------------------------------------- overthinking frames


@pytest.fixture(scope="module")
def overthinking_table():
    return synthetic_samples(4, 3, temperatures=(0.8,), thinking_budgets=(16, None), mean_thinking_tokens=120,
                             max_tokens=200, seed=11)


@pytest.fixture(scope="module")
def overthinking_frames(overthinking_table):
    return overthinking.frames(overthinking_table, overthinking.Params(n_boot=20, markers=("wait", "hmm")))


def _summary_by_hand(rows: list[dict], keys: list[str]) -> dict[tuple, dict]:
    out = {}
    for key, group in _groups(rows, keys).items():
        per_problem = _groups(group, ["problem_id"])
        out[key] = {"n_problems": len(per_problem), "samples_per_problem": max(map(len, per_problem.values())),
                    "n": len(group), "accuracy": _mean(r["correct"] for r in group),
                    "truncated_share": _mean(r["finish_reason"] == "length" for r in group),
                    "mean_tokens": _mean(r["n_tokens"] for r in group)}
    return out


def _check_summary(frame: pl.DataFrame, rows: list[dict], keys: list[str]) -> None:
    expected = _summary_by_hand(rows, keys)
    assert frame.height == len(expected)
    for row in frame.iter_rows(named=True):
        want = expected[tuple(row[k] for k in keys)]
        assert {k: row[k] for k in want} == pytest.approx(want)


def test_overthinking_summary_and_accuracy_vs_budget(overthinking_table, overthinking_frames):
    rows = overthinking_table.to_dicts()
    keys = ["task", "model", "thinking_budget", "wait_extensions"]
    _check_summary(overthinking_frames["summary"], rows, keys)
    assert 0 < overthinking_frames["summary"]["truncated_share"].max()  # the table has truncated samples
    frame = overthinking_frames["accuracy_vs_budget"]
    expected = _groups(rows, ["wait_extensions", "thinking_budget"])
    assert frame.height == len(expected)
    for row in frame.iter_rows(named=True):
        group = expected[(row["wait_extensions"], row["thinking_budget"])]
        assert row["accuracy"] == pytest.approx(_mean(r["correct"] for r in group))
        assert row["n"] == len(group) and row["n_problems"] == 4
        assert row["mean_thinking_tokens"] == pytest.approx(_mean(r["n_thinking_tokens"] for r in group))
        assert row["share_capped"] == pytest.approx(_mean(r["finish_reason"] == "budget" for r in group))
        assert row["truncated_share"] == pytest.approx(_mean(r["finish_reason"] == "length" for r in group))
        assert row["budget"] == ("uncapped" if row["thinking_budget"] is None else str(row["thinking_budget"]))


def test_overthinking_accuracy_vs_length(overthinking_table, overthinking_frames):
    natural = [r for r in overthinking_table.to_dicts() if r["thinking_budget"] is None]
    lengths = np.array([r["n_thinking_tokens"] for r in natural], dtype=float)
    cuts = np.unique(np.quantile(lengths, np.linspace(0, 1, 9)))
    buckets = defaultdict(list)
    for r in natural:
        b = min(max(int(np.searchsorted(cuts, r["n_thinking_tokens"], side="right")) - 1, 0), len(cuts) - 2)
        buckets[b].append(r)
    frame = overthinking_frames["accuracy_vs_length"]
    assert frame["bucket"].to_list() == sorted(buckets)
    for row in frame.iter_rows(named=True):
        group = buckets[row["bucket"]]
        assert row["n"] == len(group)
        assert row["accuracy"] == pytest.approx(_mean(r["correct"] for r in group))
        assert row["mean_length"] == pytest.approx(_mean(r["n_thinking_tokens"] for r in group))
        assert (row["length_low"], row["length_high"]) == (cuts[row["bucket"]], cuts[row["bucket"] + 1])


def _vote(samples: list[dict]) -> float:
    """Expected accuracy of the majority answer, ties broken uniformly; empty preds abstain."""
    counts: dict[str, int] = defaultdict(int)
    right: dict[str, bool] = defaultdict(bool)
    for s in samples:
        if s["pred"]:
            counts[s["pred"]] += 1
            right[s["pred"]] |= bool(s["correct"])
    if not counts:
        return 0.0
    top = [p for p, c in counts.items() if c == max(counts.values())]
    return sum(right[p] for p in top) / len(top)


def test_overthinking_selection(overthinking_table, overthinking_frames):
    rows = overthinking_table.to_dicts()
    expected = defaultdict(list)
    for (budget, _problem), group in _groups(rows, ["thinking_budget", "problem_id"]).items():
        shortest = min(r["n_tokens"] for r in group)
        longest = max(r["n_tokens"] for r in group)
        expected[(budget, "shortest")].append(_mean(r["correct"] for r in group if r["n_tokens"] == shortest))
        expected[(budget, "longest")].append(_mean(r["correct"] for r in group if r["n_tokens"] == longest))
        expected[(budget, "random")].append(_mean(r["correct"] for r in group))
        expected[(budget, "majority")].append(_vote(group))
        expected[(budget, "oracle")].append(float(any(r["correct"] for r in group)))
    frame = overthinking_frames["selection"]
    assert frame.height == len(expected) == 10
    for row in frame.iter_rows(named=True):
        assert row["accuracy"] == pytest.approx(_mean(expected[(row["thinking_budget"], row["method"])]))
        assert row["n_problems"] == 4


def test_overthinking_per_sample_lengths(overthinking_table, overthinking_frames):
    frame = overthinking_frames["length_correct_vs_incorrect"]
    got = sorted((r["problem_id"], r["sample_idx"], r["budget"], r["graded"], r["n_tokens"]) for r in frame.to_dicts())
    want = sorted((r["problem_id"], r["sample_idx"], "uncapped" if r["thinking_budget"] is None else str(r["thinking_budget"]),
                   "correct" if r["correct"] else "incorrect", r["n_tokens"]) for r in overthinking_table.to_dicts())
    assert got == want


def _phase_means(row: dict) -> dict[str, float | None]:
    entropy, n_think = row["token_entropy"], row["n_thinking_tokens"]
    parts = {"thinking": entropy[:n_think], "answer": entropy[n_think:], "all": entropy}
    return {phase: (_mean(_finite(values)) if _finite(values) else None) for phase, values in parts.items()}


def test_overthinking_phase_entropy(overthinking_table, overthinking_frames):
    expected = defaultdict(list)
    for row in overthinking_table.to_dicts():
        for phase, value in _phase_means(row).items():
            if value is not None and phase != "all":
                expected[(row["correct"], phase)].append(value)
    frame = overthinking_frames["phase_entropy"]
    assert frame.height == len(expected)
    for row in frame.iter_rows(named=True):
        values = expected[(row["correct"], row["phase"])]
        assert row["n"] == len(values)
        assert row["mean_entropy"] == pytest.approx(_mean(values), rel=1e-5)
        if len(values) > 1:
            assert row["std"] == pytest.approx(float(np.std(values, ddof=1)), rel=1e-4)
        assert row["graded"] == ("correct" if row["correct"] else "incorrect")


def test_overthinking_entropy_along_trace(overthinking_table, overthinking_frames):
    slices = defaultdict(list)
    for row in overthinking_table.to_dicts():
        entropy, n = row["token_entropy"], len(row["token_entropy"])
        for j in range(20):
            values = _finite(entropy[i] for i in range(n) if i * 20 // n == j)
            if values:
                slices[(row["correct"], j)].append(_mean(values))
    frame = overthinking_frames["entropy_along_trace"]
    assert frame.height == len(slices)
    for row in frame.iter_rows(named=True):
        values = slices[(row["correct"], row["bin"])]
        assert row["n_samples"] == len(values)
        assert row["mean_entropy"] == pytest.approx(_mean(values), rel=1e-5)
        assert row["position"] == pytest.approx((row["bin"] + 0.5) / 20)


def test_overthinking_markers(overthinking_table, overthinking_frames):
    frame = overthinking_frames["markers"]
    assert set(frame["marker"]) == {"wait", "hmm"}
    for row in frame.iter_rows(named=True):
        group = [r for r in overthinking_table.to_dicts() if r["correct"] == row["correct"]]
        counts = [len(re.findall(rf"(?i)\b{row['marker']}\b", r["text"])) for r in group]
        tokens = sum(r["n_tokens"] for r in group)
        assert (row["count"], row["n_samples"], row["n_tokens"]) == (sum(counts), len(group), tokens)
        assert row["per_1k"] == pytest.approx(1000 * sum(counts) / tokens)
        assert row["share_with"] == pytest.approx(_mean(c > 0 for c in counts))
    assert frame["count"].sum() > 0


def test_overthinking_problem_lengths(overthinking_table, overthinking_frames):
    natural = [r for r in overthinking_table.to_dicts() if r["thinking_budget"] is None]
    frame = overthinking_frames["problem_lengths"]
    assert frame["rank"].to_list() == list(range(4))
    assert frame["mean"].to_list() == sorted(frame["mean"].to_list())
    for row in frame.iter_rows(named=True):
        lengths = [r["n_tokens"] for r in natural if r["problem_id"] == row["problem_id"]]
        assert row["n"] == len(lengths) and row["mean"] == pytest.approx(_mean(lengths))
        assert [row["p10"], row["p50"], row["p90"]] == pytest.approx(list(np.quantile(lengths, [0.1, 0.5, 0.9])))


def test_overthinking_without_uncapped_runs_draws_a_placeholder(overthinking_table):
    capped = overthinking_table.filter(pl.col("thinking_budget").is_not_null())
    f = overthinking.frames(capped, overthinking.Params(n_boot=20))
    assert f["accuracy_vs_length"].is_empty() and f["problem_lengths"].is_empty()
    for name in ("accuracy_vs_length", "problem_lengths"):
        assert "no uncapped samples" in overthinking.FIGURES[name](f).layout.annotations[0].text
    one_length = overthinking_table.with_columns(n_thinking_tokens=pl.lit(5, pl.Int64))
    f = overthinking.frames(one_length, overthinking.Params(n_boot=20))
    assert f["accuracy_vs_length"].is_empty() and not f["problem_lengths"].is_empty()
    assert "all have one thinking length" in overthinking.FIGURES["accuracy_vs_length"](f).layout.annotations[0].text


# --------------------------------------------------------------------------- temperature frames


@pytest.fixture(scope="module")
def temperature_table():
    df = synthetic_samples(3, 4, temperatures=(0.0, 0.6, 1.0), mean_thinking_tokens=30, max_tokens=45,
                           n_distractors=2, seed=12)
    return df.filter((pl.col("temperature") > 0) | (pl.col("sample_idx") == 0))  # greedy: one sample


@pytest.fixture(scope="module")
def temperature_frames(temperature_table):
    return temperature.frames(temperature_table, temperature.Params(n_samples=4, ks=(1, 2, 4), n_boot=20))


def _pass_at_k(n: int, c: int, k: int) -> float:
    return 1 - math.comb(n - c, k) / math.comb(n, k)


def _maj_at_k(samples: list[dict], k: int) -> float:
    return _mean(_vote(list(subset)) for subset in itertools.combinations(samples, k))


def test_temperature_summary(temperature_table, temperature_frames):
    assert temperature_table["temperature"].dtype == pl.Float32  # stored as float32: 0.6 is 0.6000000238418579
    rows = _rows(temperature_table)
    _check_summary(temperature_frames["summary"], rows, ["temperature", "top_p"])
    assert temperature_frames["summary"]["samples_per_problem"].to_list() == [1, 4, 4]
    assert set(temperature_frames["summary"]["T"]) == {"0.0", "0.6", "1.0"}  # float32 0.6 printed short
    # the summary holds the values as written: no float32 noise when printed or put in a label
    assert temperature_frames["summary"]["temperature"].to_list() == [0.0, 0.6, 1.0]
    assert "0.6000000" not in str(temperature_frames["summary"])


def test_temperature_pass_and_maj_at_k(temperature_table, temperature_frames):
    by_cell = _groups([r for r in _rows(temperature_table) if r["temperature"] > 0], ["temperature", "problem_id"])
    for name, metric in (("pass_at_k", "pass_at_k"), ("maj_at_k", "maj_at_k")):
        frame = temperature_frames[name]
        assert set(zip(frame["T"], frame["k"])) == {(t, k) for t in ("0.6", "1.0") for k in (1, 2, 4)}
        for row in frame.iter_rows(named=True):
            cells = [g for (t, _), g in by_cell.items() if t == row["temperature"]]
            if metric == "pass_at_k":
                want = _mean(_pass_at_k(len(g), sum(r["correct"] for r in g), row["k"]) for g in cells)
            else:
                want = _mean(_maj_at_k(g, row["k"]) for g in cells)
            assert row[metric] == pytest.approx(want), (name, row)
            assert row["n_problems"] == 3


def test_temperature_solve_matrix_and_coverage(temperature_table, temperature_frames):
    cells = _groups(_rows(temperature_table), ["problem_id", "temperature"])
    frame = temperature_frames["solve_matrix"]
    assert frame.height == len(cells) == 9
    for row in frame.iter_rows(named=True):
        group = cells[(row["problem_id"], row["temperature"])]
        assert row["solve_rate"] == pytest.approx(_mean(r["correct"] for r in group))
    solved = {key: any(r["correct"] for r in group) for key, group in cells.items()}
    problems = sorted({p for p, _ in solved})
    per_t = {t: _mean(solved[(p, t)] for p in problems) for _, t in solved}
    (row,) = temperature_frames["coverage"].to_dicts()
    assert row["union"] == pytest.approx(_mean(any(solved[(p, t)] for t in per_t) for p in problems))
    assert row["best_single"] == pytest.approx(max(per_t.values()))
    assert per_t[row["best_condition"]] == pytest.approx(row["best_single"])


def test_temperature_voting(temperature_table, temperature_frames):
    rows = [r for r in _rows(temperature_table) if r["temperature"] > 0]
    frame = temperature_frames["voting"]
    pooled = frame.filter(pl.col("scheme") == "pooled")
    single = frame.filter(pl.col("scheme") == "single")
    for row in pooled.iter_rows(named=True):
        cells = _groups(rows, ["problem_id"]).values()
        assert row["maj_at_k"] == pytest.approx(_mean(_maj_at_k(g, row["k"]) for g in cells))
        assert row["series"] == "pooled pooled"
    for row in single.iter_rows(named=True):
        cells = [g for (t, _), g in _groups(rows, ["temperature", "problem_id"]).items() if t == row["temperature"]]
        assert row["maj_at_k"] == pytest.approx(_mean(_maj_at_k(g, row["k"]) for g in cells))
    best = frame.filter(pl.col("scheme") == "best_single")
    for row in best.iter_rows(named=True):
        assert row["maj_at_k"] == pytest.approx(single.filter(pl.col("k") == row["k"])["maj_at_k"].max())
    for row in frame.iter_rows(named=True):  # every point carries its interval over problems, around it
        assert row["ci_low"] - 1e-9 <= row["maj_at_k"] <= row["ci_high"] + 1e-9, row


def test_temperature_entropy_length_and_accuracy(temperature_table, temperature_frames):
    rows = _rows(temperature_table)
    by_t = _groups(rows, ["temperature"])
    frame = temperature_frames["entropy_length"]
    assert frame.height == 9
    for row in frame.iter_rows(named=True):
        group = by_t[(row["temperature"],)]
        values = ([_phase_means(r)["all"] for r in group] if row["variable"] == "mean_entropy"
                  else [r[row["variable"]] for r in group])
        assert row["n"] == len(values) and row["mean"] == pytest.approx(_mean(values), rel=1e-5)
    accuracy = temperature_frames["accuracy_vs_temperature"]
    for row in accuracy.iter_rows(named=True):
        group = by_t[(row["temperature"],)]
        assert row["pass_at_k"] == pytest.approx(_mean(r["correct"] for r in group))
        assert row["truncated_share"] == pytest.approx(_mean(r["finish_reason"] == "length" for r in group))


def test_temperature_greedy_only_draws_placeholders(temperature_table):
    f = temperature.frames(temperature_table.filter(pl.col("temperature") == 0), temperature.Params(n_boot=20))
    for name in ("pass_at_k", "maj_at_k", "voting"):
        assert f[name].is_empty()
        assert "no temperature above 0" in temperature.FIGURES[name](f).layout.annotations[0].text


# --------------------------------------------------------------------------- quantization frames


@pytest.fixture(scope="module")
def quantization_table():
    return synthetic_samples(5, 2, temperatures=(0.7,), quantizations=(None, "int8-wo", "int4-wo"),
                             mean_thinking_tokens=30, max_tokens=45, n_levels=2, seed=13)


@pytest.fixture(scope="module")
def quantization_frames(quantization_table):
    return quantization.frames(quantization_table, quantization.Params(n_boot=20))


def _format(row: dict) -> str:
    return row["quantization"] or "baseline"


def test_quantization_summary_and_accuracy(quantization_table, quantization_frames):
    rows = [dict(r, format=_format(r)) for r in quantization_table.to_dicts()]
    _check_summary(quantization_frames["summary"], rows, ["format"])
    assert quantization_frames["summary"]["format"].to_list() == ["baseline", "int4-wo", "int8-wo"]
    for row in quantization_frames["accuracy"].iter_rows(named=True):
        group = [r for r in rows if r["format"] == row["format"]]
        assert row["accuracy"] == pytest.approx(_mean(r["correct"] for r in group))
        assert (row["n"], row["n_problems"]) == (10, 5)
        assert row["truncated_share"] == pytest.approx(_mean(r["finish_reason"] == "length" for r in group))


def test_quantization_paired_deltas_and_flips(quantization_table, quantization_frames):
    rows = quantization_table.to_dicts()
    base = {(r["problem_id"], r["sample_idx"]): r for r in rows if r["quantization"] is None}
    values = {"accuracy": lambda r: float(r["correct"]), "length": lambda r: r["n_tokens"],
              "entropy": lambda r: _phase_means(r)["all"]}
    deltas = quantization_frames["deltas"]
    assert deltas.height == 6
    flips = quantization_frames["flips"]
    for fmt in ("int8-wo", "int4-wo"):
        pairs = [(base[(r["problem_id"], r["sample_idx"])], r) for r in rows if r["quantization"] == fmt]
        for metric, value in values.items():
            (row,) = deltas.filter((pl.col("format") == fmt) & (pl.col("metric") == metric)).to_dicts()
            assert row["n_pairs"] == len(pairs) == 10
            assert row["baseline"] == pytest.approx(_mean(value(b) for b, _ in pairs), rel=1e-5)
            assert row["quantized"] == pytest.approx(_mean(value(q) for _, q in pairs), rel=1e-5)
            assert row["delta"] == pytest.approx(_mean(value(q) - value(b) for b, q in pairs), rel=1e-5, abs=1e-9)
            assert row["right_to_wrong"] == sum(b["correct"] and not q["correct"] for b, q in pairs)
            assert row["wrong_to_right"] == sum(q["correct"] and not b["correct"] for b, q in pairs)
        for cell in flips.filter(pl.col("format") == fmt).iter_rows(named=True):
            want = sum((b["correct"] == (cell["baseline"] == "right")) and (q["correct"] == (cell["quantized"] == "right"))
                       for b, q in pairs)
            assert cell["n"] == want and cell["share"] == pytest.approx(want / 10)


def test_quantization_per_sample_and_levels(quantization_table, quantization_frames):
    rows = quantization_table.to_dicts()
    for name in ("length", "entropy"):
        frame = quantization_frames[name]
        got = sorted((r["format"], r["problem_id"], r["sample_idx"], r["n_tokens"]) for r in frame.to_dicts())
        assert got == sorted((_format(r), r["problem_id"], r["sample_idx"], r["n_tokens"]) for r in rows)
        entropy = {(r["format"], r["problem_id"], r["sample_idx"]): r["mean_token_entropy"] for r in frame.to_dicts()}
        for r in rows:
            assert entropy[(_format(r), r["problem_id"], r["sample_idx"])] == pytest.approx(_phase_means(r)["all"], rel=1e-5)
    levels = _groups([dict(r, format=_format(r)) for r in rows], ["format", "level"])
    frame = quantization_frames["by_level"]
    assert frame.height == len(levels) and frame["level"].dtype == pl.Utf8
    for row in frame.iter_rows(named=True):
        group = levels[(row["format"], int(row["level"]))]
        assert row["accuracy"] == pytest.approx(_mean(r["correct"] for r in group)) and row["n"] == len(group)


def test_quantization_without_levels_draws_a_placeholder():
    df = synthetic_samples(3, 1, quantizations=(None, "int8-wo"), mean_thinking_tokens=20, n_levels=None, seed=3)
    f = quantization.frames(df, quantization.Params(n_boot=20))
    assert f["by_level"].is_empty()
    assert "no difficulty levels" in quantization.FIGURES["by_level"](f).layout.annotations[0].text


# --------------------------------------------------------------------------- MoE frames


@pytest.fixture(scope="module")
def moe_table():
    return synthetic_samples(4, 2, temperatures=(0.7,), moe_top_ks=(2, 4), num_experts=4, moe_layers=3,
                             mean_thinking_tokens=30, max_tokens=45, seed=14)


@pytest.fixture(scope="module")
def moe_frames(moe_table):
    return moe.frames(moe_table, moe.Params(n_boot=20))


def test_moe_summary_and_metrics_vs_k(moe_table, moe_frames):
    rows = moe_table.to_dicts()
    _check_summary(moe_frames["summary"], rows, ["moe_top_k"])
    frame = moe_frames["metrics_vs_k"]
    values = {"correct": lambda r: float(r["correct"]), "n_tokens": lambda r: r["n_tokens"],
              "mean_entropy": lambda r: _phase_means(r)["all"],
              "router_entropy_thinking": lambda r: r["router_entropy_thinking"],
              "router_entropy_answer": lambda r: r["router_entropy_answer"]}
    assert set(frame["variable"]) == set(values)
    for row in frame.iter_rows(named=True):
        group = [r for r in rows if r["moe_top_k"] == row["moe_top_k"]]
        present = [v for v in map(values[row["variable"]], group) if v is not None and not math.isnan(v)]
        assert row["n"] == len(present) and row["estimate"] == pytest.approx(_mean(present), rel=1e-5)
        assert row["active_fraction"] == pytest.approx(row["moe_top_k"] / 4)
        assert row["truncated_share"] == pytest.approx(_mean(r["finish_reason"] == "length" for r in group))


def test_moe_expert_load_and_router_entropy(moe_table, moe_frames):
    rows = moe_table.to_dicts()
    load = moe_frames["expert_load"]
    assert load.height == 2 * 3 * 4
    for row in load.iter_rows(named=True):
        group = [r for r in rows if r["moe_top_k"] == row["moe_top_k"]]
        tokens = sum(r["expert_load"][row["layer"]][row["expert"]] for r in group)
        layer = sum(sum(r["expert_load"][row["layer"]]) for r in group)
        assert row["tokens"] == tokens and row["share"] == pytest.approx(tokens / layer)
    phases = moe_frames["router_entropy_by_phase"]
    for row in phases.iter_rows(named=True):
        values = [r[f"router_entropy_{row['phase']}"] for r in rows if r["moe_top_k"] == row["moe_top_k"]]
        values = [v for v in values if v is not None]
        assert row["n"] == len(values) and row["estimate"] == pytest.approx(_mean(values), rel=1e-5)


def test_moe_without_routing_draws_placeholders(moe_table):
    f = moe.frames(moe_table.drop("expert_load", "router_entropy_thinking", "router_entropy_answer"),
                   moe.Params(n_boot=20))
    assert f["expert_load"].is_empty() and f["router_entropy_by_phase"].is_empty()
    for name in ("expert_load", "router_entropy_by_phase"):
        assert "no routing traced" in moe.FIGURES[name](f).layout.annotations[0].text


# --------------------------------------------------------------------------- figures and explore


@pytest.mark.parametrize("study, table", [(overthinking, "overthinking_table"), (temperature, "temperature_table"),
                                          (quantization, "quantization_table"), (moe, "moe_table")],
                         ids=lambda x: getattr(x, "STUDY", x))
def test_every_figure_shows_n_and_the_truncated_share(study, table, request):
    frames = study.frames(request.getfixturevalue(table), study.Params(n_boot=20))
    line = common.caption(frames["summary"])
    assert re.search(r"n = \d+ problems × [\d–]+ samples? × \d+ conditions = \d+; truncated at max_tokens: \d+%", line)
    for name, draw in study.FIGURES.items():
        fig = draw(frames)
        assert line in fig.layout.title.text, name
        json.loads(fig.to_json())  # serializable: nothing but data in it


def test_caption_counts():
    frame = pl.DataFrame({"n_problems": [3, 3], "samples_per_problem": [1, 4], "n": [3, 12],
                          "truncated_share": [0.0, 0.5]})
    assert common.caption(frame) == ("n = 3 problems × 1–4 samples × 2 conditions = 15; "
                                     "truncated at max_tokens: 40% (0%–50% per condition)")


def test_explore_filters(quantization_table):
    options = filter_options(quantization_table)
    assert options == {"level": [1, 2], "quantization": ["int4-wo", "int8-wo", None]}
    rows = filter_samples(quantization_table, {"quantization": [None, "int8-wo"], "level": [2]})
    assert set(rows["quantization"].to_list()) == {None, "int8-wo"} and set(rows["level"]) == {2}
    assert rows.height == quantization_table.filter(
        pl.col("quantization").is_null() | (pl.col("quantization") == "int8-wo")).filter(pl.col("level") == 2).height
    assert filter_samples(quantization_table, {"level": []}).height == 0


def test_run_records_read_what_each_run_recorded(tmp_path):
    from thinklab import runner
    from thinklab.store import RunStore

    base, quantized = _spec(), _spec(quantization="int8-wo")
    report = {"share_low_precision_blocks": 1.0, "bits_per_block_weight": 8.1,
              "memory_bytes_before": 540_000_000, "memory_bytes_after": 200_000_000}
    RunStore(runner.run_dir(quantized, tmp_path)).write_meta(
        {"spec": quantized.to_dict(), "status": "complete", "entropy_mode": "exact", "generate_seconds": 12.5,
         "backend": {"name": "hf", "forward": "transformers", "quantization": report}})
    records = common.run_records([base, quantized], runs_root=tmp_path)
    assert records["run_id"].to_list() == [runner.run_dir(s, tmp_path).name for s in (base, quantized)]
    assert records["quantization"].to_list() == ["None", "int8-wo"]  # the knob that varies
    first, second = records.to_dicts()
    assert first["status"] == "not run" and first["forward"] is None and first["memory_mb_after"] is None
    assert (second["status"], second["forward"], second["entropy_mode"], second["generate_seconds"]) == (
        "complete", "transformers", "exact", 12.5)
    assert (second["bits_per_block_weight"], second["memory_mb_before"], second["memory_mb_after"]) == (8.1, 540.0, 200.0)
