"""The findings report: verdicts on tables with known answers, and the report from a real run store.

No model: the tables come from `findings_tables` (built to show each finding, its
reverse, or no effect), and the store test writes them with `thinklab.store.RunStore`
where the runner would have.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

import findings_tables as T
from thinklab import cli, runner
from thinklab.analysis import findings as F
from thinklab.findings import FindingsPlan, PRESETS, compute, plan_from_options, write_report
from thinklab.store import RunStore

N_BOOT = 400
EXPECTED = {1: "holds", -1: "reversed", 0: "not resolved"}
EFFECTS = sorted(EXPECTED, reverse=True)


def _findings(effect: int) -> dict[str, F.Finding]:
    base, int8, four = T.quantization_tables(effect)
    return {
        "a": F.finding_a(T.shortest_table(effect), n_boot=N_BOOT),
        "b": F.finding_b(T.length_table(effect), n_boot=N_BOOT),
        "c": F.finding_c(T.entropy_table(effect), n_boot=N_BOOT),
        "d": F.finding_d(T.temperature_table(effect), n_boot=N_BOOT),
        "e": F.finding_e(base, int8, four, n_boot=N_BOOT),
        "f": F.finding_f(T.moe_tables(effect), n_boot=N_BOOT),
        "g": F.finding_g(T.budget_tables(effect), n_boot=N_BOOT),
    }


@pytest.fixture(scope="module", params=EFFECTS, ids=lambda e: {1: "finding", -1: "reverse", 0: "no-effect"}[e])
def built(request):
    return request.param, _findings(request.param)


@pytest.mark.parametrize("key", list("abcdefg"))
def test_primary_verdict(built, key):
    effect, findings = built
    stat = findings[key].primary
    assert stat.verdict == EXPECTED[effect], (key, stat)
    assert stat.n_problems > 0 and stat.n_samples > 0
    assert stat.ci_low - 1e-9 <= stat.estimate <= stat.ci_high + 1e-9
    if effect == 0:
        assert stat.estimate == pytest.approx(0.0, abs=1e-12)


def test_primary_values_are_the_built_effects():
    a = F.finding_a(T.shortest_table(1), n_boot=N_BOOT).primary
    # the shortest sample is always right; a random one is right c/n of the time
    counts = T._correct_counts(40, 4, 0)
    assert a.estimate == pytest.approx(np.mean(1 - counts / 4))
    b = F.finding_b(T.length_table(1), n_boot=N_BOOT).primary
    assert b.estimate == pytest.approx(60.0, abs=1.0) and b.unit == "tokens"
    c = F.finding_c(T.entropy_table(0), n_boot=N_BOOT).primary
    assert c.estimate == 0.0
    d = F.finding_d(T.temperature_table(1), n_boot=N_BOOT)
    # pooled pass@4 from 12 samples of which 4 are right, against 1/3 solved at any one temperature
    assert d.primary.estimate == pytest.approx((1 - 70 / 495) - 1 / 3)
    assert "k = 4" in d.primary.note


def test_other_parts_follow_the_built_tables():
    for effect in (1, -1):
        findings = _findings(effect)
        corr = findings["c"].parts[0]
        assert corr.verdict == EXPECTED[effect], corr
        voting = findings["d"].parts[0]
        assert voting.verdict == EXPECTED[effect], voting
        int8, four_vs_int8, level = findings["e"].parts
        assert int8.verdict == "holds" and int8.estimate == 0.0  # int8 equals the baseline in every table
        assert four_vs_int8.verdict == EXPECTED[effect]
        assert level.verdict == EXPECTED[effect], level  # harder levels flip more, in the built direction
        assert "level 3 vs level 1" in level.note
    union = _findings(1)["d"].parts[1]
    assert union.direction is None and union.verdict == ""  # context only: cannot be negative
    assert union.estimate == pytest.approx(1 - 1 / 3)


def test_peak_budget_and_its_interval():
    g = F.finding_g(T.budget_tables(1), n_boot=N_BOOT).primary
    assert "peaks at budget 128" in g.note
    # the uncapped run has 8 samples, the capped ones 4: only the 4 shared samples count
    assert g.n_samples == 3 * 50 * 4
    rising = F.finding_g(T.budget_tables(-1), n_boot=N_BOOT).primary
    assert "peaks at budget uncapped" in rising.note


def test_verdict_rule():
    assert F.verdict(0.1, 0.3, 1) == "holds"
    assert F.verdict(0.1, 0.3, -1) == "reversed"
    assert F.verdict(-0.3, -0.1, -1) == "holds"
    assert F.verdict(-0.3, 0.1, 1) == "not resolved"
    assert F.verdict(0.0, 0.0, 1) == "not resolved"
    assert F.verdict(None, None, 1) == "no data"
    assert F.verdict(float("nan"), 0.2, 1) == "no data"
    assert F.verdict(-0.01, 0.02, 0, margin=0.03) == "holds"
    assert F.verdict(-0.09, -0.05, 0, margin=0.03) == "reversed"
    assert F.verdict(-0.05, 0.01, 0, margin=0.03) == "not resolved"
    with pytest.raises(ValueError, match="margin"):
        F.verdict(-0.1, 0.1, 0)
    with pytest.raises(ValueError, match="direction=2"):
        F.verdict(-0.1, 0.1, 2)


def test_too_few_problems_resolve_nothing():
    few = F.finding_a(T.shortest_table(1, n_problems=F.MIN_PROBLEMS - 1), n_boot=N_BOOT).primary
    assert few.ci_low > 0 and few.verdict == "not resolved" and "fewer than" in few.remarks
    enough = F.finding_a(T.shortest_table(1, n_problems=F.MIN_PROBLEMS), n_boot=N_BOOT).primary
    assert enough.verdict == "holds" and "fewer than" not in enough.remarks


def test_by_task_breakdown():
    a1 = T.shortest_table(1)
    a2 = T.shortest_table(-1).with_columns(task=np.array(["other"] * T.shortest_table(-1).height),
                                           problem_id="other/" + T.shortest_table(-1)["problem_id"])
    found = F.finding_a(a1.vstack(a2), n_boot=N_BOOT)
    assert found.by_task[T.TASK].verdict == "holds"
    assert found.by_task["other"].verdict == "reversed"
    assert found.primary.n_problems == 80


# --------------------------------------------------------------------------- the plan


def test_plan_shares_runs_and_refuses_bad_values():
    plan = FindingsPlan()
    task = plan.tasks[0]
    base = plan.base(task)
    assert plan.temperature_runs(task)[plan.temperature] == base  # the grid's point at the base temperature
    assert plan.budget_runs(task)[None] == base  # the uncapped budget
    assert plan.quantization_runs(task)[None] == base  # the baseline
    from thinklab.runner import run_id

    ids = [run_id(s) for s in plan.specs()]
    assert len(ids) == len(set(ids))
    per_task = 1 + 2 + (len(plan.budgets) - 1) + (len(set(plan.temperatures)) - 1)
    assert len(ids) == per_task * len(plan.tasks) + len(plan.top_k_values) * len(plan.moe_tasks)
    assert all(s.n_problems >= 200 for s in plan.specs())
    moe = set(plan.moe_runs(plan.moe_tasks[0]).values())
    assert all(s.sampling.max_tokens == (plan.moe_max_tokens if s in moe else plan.max_tokens) >= 256
               for s in plan.specs()) and plan.max_tokens >= 512
    assert base.sampling.n == 8 and plan.budget_runs(task)[64].sampling.n == 4
    with pytest.raises(ValueError, match="temperature_samples=2"):
        FindingsPlan(temperature_samples=2)
    with pytest.raises(ValueError, match="moe_max_tokens=0"):
        FindingsPlan(moe_max_tokens=0)
    with pytest.raises(ValueError, match="budgets=\\(64,\\)"):
        FindingsPlan(budgets=(64,))
    with pytest.raises(ValueError, match="tasks='gsm8k'"):
        FindingsPlan(tasks="gsm8k")
    with pytest.raises(ValueError, match="preset='huge'"):
        plan_from_options("huge")
    # the plan's dtype reaches every run (and so every run id); a bad one is named
    bf16 = FindingsPlan(dtype="bfloat16")
    assert {s.model.dtype for s in bf16.specs()} == {"bfloat16"}
    assert not {run_id(s) for s in bf16.specs()} & set(ids)
    with pytest.raises(ValueError, match="dtype='bf16'.*bfloat16"):
        FindingsPlan(dtype="bf16")


def test_only_some_findings_generate_just_their_runs():
    plan = FindingsPlan()
    task, moe_task = plan.tasks[0], plan.moe_tasks[0]
    assert plan.specs(only=["a", "b", "c"]) == [plan.base(t) for t in plan.tasks]
    with_f = plan.specs(only=["a", "f"])
    assert with_f == [plan.base(t) for t in plan.tasks] + list(plan.moe_runs(moe_task).values())
    # (g) reads the budget runs, whose uncapped point is the base run: it comes once, first
    g = plan.specs(only=["g"])
    assert g[0] == plan.base(task) and set(g) == {s for t in plan.tasks for s in plan.budget_runs(t).values()}
    assert set(plan.specs(only=list("abcdefg"))) == set(plan.specs())
    assert plan.summary(only=["f"]).startswith(f"{len(plan.top_k_values)} runs, ")
    with pytest.raises(ValueError, match="finding 'h' is not valid"):
        plan.specs(only=["h"])


# --------------------------------------------------------------------------- the report from a store


def _write(spec, frame, root, status="complete", seconds=2.5):
    store = RunStore(runner.run_dir(spec, root))
    store.write_meta({"run_id": runner.run_id(spec), "spec": spec.to_dict(), "status": status,
                      "generate_seconds": seconds, "git_commit": "0123abc"})
    if status == "complete":
        store.write_part(0, frame.with_columns(run_id=frame["run_id"].str.replace(".*", runner.run_id(spec))))


def _fill_store(plan: FindingsPlan, root, skip=()):
    """Every run of the plan, as synthetic rows, where the runner would store it."""
    rng = np.random.default_rng(0)
    problems = list(range(plan.n_problems))
    for spec in plan.specs():
        if runner.run_id(spec) in skip:
            continue
        frame = T.random_table(problems, spec.sampling.n, rng, task=spec.task, model=spec.model.name,
                               temperature=spec.sampling.temperature, thinking_budget=spec.budget.thinking_budget,
                               quantization=spec.model.quantization, moe_top_k=spec.model.moe_top_k)
        _write(spec, frame, root)


SUMMARY = re.compile(r"^\| ([a-g]) \| (.*)$", re.M)


def _summary_rows(text: str) -> dict[str, list[str]]:
    return {m.group(1): [c.strip() for c in m.group(2).split(" | ")] for m in SUMMARY.finditer(text)}


def test_report_from_a_run_store(tmp_path):
    plan = PRESETS["smoke"].replace(n_problems=12)
    _fill_store(plan, tmp_path / "runs")
    out = write_report(plan, tmp_path / "runs", tmp_path / "FINDINGS.md", tmp_path / "figures", n_boot=200,
                       command="thinklab findings --preset smoke")
    text = out.read_text()
    rows = _summary_rows(text)
    assert sorted(rows) == list("abcdefg")
    for key, cells in rows.items():
        verdict = cells[8].strip("*")
        assert verdict in ("holds", "reversed", "not resolved"), (key, cells)
        assert re.fullmatch(r"\[[-+]\d+\.\d+, [-+]\d+\.\d+\]", cells[4]), (key, cells[4])  # the 95% CI
        assert int(cells[5]) > 0 and int(cells[6]) > 0
    n_runs = len(plan.specs())
    assert f"{n_runs} of {n_runs} complete" in text
    seconds = int(2.5 * n_runs)
    assert f"0h {seconds // 60:02d}m {seconds % 60:02d}s" in text  # the sum of generate_seconds
    assert "`0123abc`" in text and "Generated by `thinklab findings --preset smoke`" in text
    assert "dtype `auto` (float32 on CPUs)" in text
    for key in "abcdefg":
        assert (tmp_path / "figures" / f"finding_{key}.html").is_file()
        assert f"## ({key})" in text


def test_report_with_missing_runs(tmp_path):
    plan = PRESETS["smoke"].replace(n_problems=6)
    four_bit = plan.quantization_runs(plan.tasks[0])[plan.four_bit_format]
    _fill_store(plan, tmp_path / "runs", skip={runner.run_id(four_bit)})
    _write(four_bit, None, tmp_path / "runs", status="running")
    findings, store = compute(plan, tmp_path / "runs", n_boot=100)
    assert findings["e"].verdict == "no data"
    assert "incomplete" in findings["e"].primary.note and runner.run_id(four_bit) in findings["e"].primary.note
    assert all(findings[k].verdict != "no data" for k in "abcdfg")

    empty = write_report(plan, tmp_path / "nothing", tmp_path / "EMPTY.md", tmp_path / "fig2", n_boot=100)
    rows = _summary_rows(empty.read_text())
    assert sorted(rows) == list("abcdefg")
    assert all(cells[8] == "**no data**" for cells in rows.values())


def test_cli_writes_the_report(tmp_path, capsys):
    plan = PRESETS["smoke"].replace(n_problems=5, budgets=(8, None))
    _fill_store(plan, tmp_path / "runs")
    out = tmp_path / "F.md"
    code = cli.main(["findings", "--preset", "smoke", "--n-problems", "5", "--budgets", "8", "none",
                     "--runs", str(tmp_path / "runs"), "--out", str(out), "--figures", str(tmp_path / "figs"),
                     "--n-boot", "100"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    assert len(_summary_rows(text)) == 7 and "**no data**" not in text
    assert "thinklab findings --preset smoke --n-problems 5 --budgets 8 none" in text

    code = cli.main(["findings", "--preset", "smoke", "--temperature-samples", "1", "--runs", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "bad.md")])
    assert code == 2 and "temperature_samples=1" in capsys.readouterr().err
    assert not (tmp_path / "bad.md").exists()


def _write_partial(spec, frame, root, problems):
    """A run under way: its run.json says running and its one part holds `problems` only."""
    store = RunStore(runner.run_dir(spec, root))
    store.write_meta({"run_id": runner.run_id(spec), "spec": spec.to_dict(), "status": "running",
                      "git_commit": "0123abc"})
    part = frame.filter(frame["problem_id"].is_in([f"{spec.task}/{p}" for p in problems]))
    store.write_part(0, part.with_columns(run_id=part["run_id"].str.replace(".*", runner.run_id(spec))))


def test_interim_report_pairs_the_problems_all_runs_hold(tmp_path):
    plan = PRESETS["smoke"].replace(n_problems=12)
    task = plan.tasks[0]
    four_bit = plan.quantization_runs(task)[plan.four_bit_format]
    budget = plan.budget_runs(task)[plan.budgets[0]]
    _fill_store(plan, tmp_path / "runs", skip={runner.run_id(four_bit), runner.run_id(budget)})
    rng = np.random.default_rng(1)
    for spec, held in ((four_bit, list(range(7))), (budget, list(range(3, 12)))):
        frame = T.random_table(list(range(12)), spec.sampling.n, rng, task=spec.task, model=spec.model.name,
                               temperature=spec.sampling.temperature, quantization=spec.model.quantization,
                               thinking_budget=spec.budget.thinking_budget)
        _write_partial(spec, frame, tmp_path / "runs", held)
    findings, _ = compute(plan, tmp_path / "runs", n_boot=100)
    # (e): the 4-bit run holds problems 0-6, so the paired comparison uses those 7 only
    assert findings["e"].primary.n_problems == 7
    assert any("interim" in n and "7 of 12" in n for n in findings["e"].notes)
    # (g): the first budget holds 3-11: 9 in common with the other (complete) budget runs
    assert findings["g"].primary.n_problems == 9
    assert any("9 of 12" in n for n in findings["g"].notes)
    # findings whose runs are all complete are not marked interim
    assert findings["a"].primary.n_problems == 12 and not any("interim" in n for n in findings["a"].notes)

    text = write_report(plan, tmp_path / "runs", tmp_path / "F.md", tmp_path / "figs", n_boot=100).read_text()
    assert "Interim report: the sweep is not finished" in text
    assert "Continue the sweep with `thinklab findings --generate` (it resumes" in text
    from thinklab.findings import _generate_command

    assert _generate_command("thinklab findings --tasks gsm8k --budgets 128 none") == \
        "thinklab findings --generate --tasks gsm8k --budgets 128 none"
    n_runs = len(plan.specs())
    assert f"{n_runs - 2} of {n_runs} complete, 2 under way" in text
    assert "incomplete (7 of 12 problems written)" in text


def test_sweep_wall_time_counts_each_sitting_to_its_last_part(tmp_path):
    import json
    import os

    from thinklab.findings import SITTINGS, sweep_seconds

    parts = []
    for i, when in enumerate((1000, 1400, 5000, 5300, 5350)):  # two sittings: at 900 and at 4900
        path = tmp_path / f"part-{i:05d}.parquet"
        path.write_bytes(b"")
        os.utime(path, (when, when))
        parts.append(path)
    (tmp_path / SITTINGS).write_text("".join(json.dumps({"started": t}) + "\n" for t in (900, 4900)))
    assert sweep_seconds(tmp_path, parts) == (pytest.approx(500 + 450), 2)
    # a sitting of another plan's sweep (it wrote none of these parts) counts neither time nor sitting
    (tmp_path / SITTINGS).write_text("".join(json.dumps({"started": t}) + "\n" for t in (100, 900, 4900)))
    assert sweep_seconds(tmp_path, parts) == (pytest.approx(500 + 450), 2)
    assert sweep_seconds(tmp_path / "none", parts) == (0.0, 0)


def test_generate_only_some_findings_with_a_real_model(isolated, capsys):
    """`findings --generate --only a` on SmolLM2: the base run alone is generated, complete;
    the report fills (a)-(c) from it and says *no data* for the rest; a second sitting
    generates nothing new."""
    runs, out = isolated / "runs", isolated / "F.md"
    argv = ["findings", "--generate", "--only", "a", "--preset", "smoke", "--n-problems", "3", "--quiet",
            "--runs", str(runs), "--out", str(out), "--figures", str(isolated / "figs"), "--n-boot", "100"]
    assert cli.main(argv) == 0
    plan = PRESETS["smoke"].replace(n_problems=3)
    base = plan.base(plan.tasks[0])
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [runner.run_id(base)]
    store = RunStore(runner.run_dir(base, runs))
    assert store.read_meta()["status"] == "complete"
    frame = store.load()
    assert frame.height == 3 * base.sampling.n and frame["problem_id"].n_unique() == 3
    rows = _summary_rows(out.read_text())
    no_data = {k for k, cells in rows.items() if cells[8] == "**no data**"}
    assert set("defg") <= no_data and "a" not in no_data  # (b) needs a problem with both outcomes
    assert rows["a"][5] == "3" and rows["a"][6] == str(frame.height)  # problems, samples

    parts = {p: p.stat().st_mtime_ns for p in store.dir.glob("part-*.parquet")}
    assert parts and cli.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in store.dir.glob("part-*.parquet")} == parts
    assert len((runs / "findings-sittings.jsonl").read_text().splitlines()) == 2


def test_report_names_the_findings_whose_samples_hit_the_cap(tmp_path):
    plan = PRESETS["smoke"].replace(n_problems=12)
    root = tmp_path / "runs"
    _fill_store(plan, root)
    clean = write_report(plan, root, tmp_path / "clean.md", tmp_path / "figs", n_boot=100).read_text()
    assert "More than 10%" not in clean  # random_table truncates about 7%
    rng = np.random.default_rng(2)
    for spec in plan.moe_runs(plan.moe_tasks[0]).values():  # (f)'s runs, every sample at the cap
        frame = T.random_table(list(range(12)), spec.sampling.n, rng, task=spec.task, model=spec.model.name,
                               moe_top_k=spec.model.moe_top_k)
        _write(spec, frame.with_columns(finish_reason=pl.lit("length")), root)
    text = write_report(plan, root, tmp_path / "F.md", tmp_path / "figs", n_boot=100).read_text()
    assert "More than 10% of the samples were cut off at their cap** in (f) 100.0%:" in text
    assert _summary_rows(text)["f"][7] == "100.0%"
