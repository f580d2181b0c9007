"""thinklab.analysis and the synthetic sample tables (tests/synthetic.py): study frames against hand-computed values."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from thinklab import metrics
from thinklab.analysis import all_frames
from thinklab.analysis import overthinking as ot
from thinklab.analysis import temperature as tt
from synthetic import synthetic_samples
from thinklab.tracing import marker_counts


def sample(problem: str, correct: bool, think: list[float], answer: list[float] | None = None, **kw) -> dict:
    answer = [0.1] if answer is None else answer
    pred = kw.pop("pred", "gold" if correct else "wrong")
    row = {
        "problem_id": problem, "sample_idx": 0, "seed": 0, "model": "m", "task": "t", "temperature": 1.0,
        "thinking_budget": None, "wait_extensions": 0, "finish_reason": "stop", "thinking": "", "level": None,
        "token_entropy": [*think, *answer], "n_thinking_tokens": len(think), "n_answer_tokens": len(answer),
        "n_tokens": len(think) + len(answer), "pred": pred, "gold": "gold", "correct": correct,
    }
    row.update(kw)
    row["text"] = row["thinking"]
    return row


def frame(rows: list[dict]) -> pl.DataFrame:
    for i, r in enumerate(rows):
        r.setdefault("sample_idx", i)
    return pl.DataFrame(rows, schema_overrides={
        "temperature": pl.Float32, "thinking_budget": pl.Int64, "level": pl.Int64, "pred": pl.Utf8,
        "token_entropy": pl.List(pl.Float32),
    })


@pytest.fixture(scope="module")
def synth() -> pl.DataFrame:
    return synthetic_samples(24, 6, temperatures=(0.5, 1.0), thinking_budgets=(64, None), mean_thinking_tokens=120,
                             max_tokens=400, seed=7)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_table_honours_the_contract(synth):
    from thinklab.store import SCHEMA

    for name, dtype in synth.schema.items():
        assert name in SCHEMA and SCHEMA[name] == dtype, name
    assert synth.height == 2 * 2 * 24 * 6
    lengths = synth.select(pl.col("token_entropy", "token_logprob", "token_ids").list.len())
    for col in lengths.columns:
        assert (lengths[col] == synth["n_tokens"]).all()
    assert (synth["n_tokens"] == synth["n_thinking_tokens"] + synth["n_answer_tokens"]).all()
    assert (synth["correct"] == (synth["pred"] == synth["gold"]).fill_null(False)).all()
    capped = synth.filter(pl.col("finish_reason") == "budget")
    assert capped.height and (capped["n_thinking_tokens"] == capped["thinking_budget"]).all()
    assert (synth.filter(pl.col("thinking_budget").is_not_null())["n_thinking_tokens"] <= 64).all()
    assert (synth["n_tokens"] <= 400).all()
    assert synth["level"].is_between(1, 5).all()
    assert synth.select(pl.col("token_logprob").list.max().max()).item() <= 0
    runs = synth.group_by("temperature", "thinking_budget").agg(pl.col("run_id").n_unique())
    assert runs["run_id"].to_list() == [1] * 4


def test_synthetic_is_seeded(synth):
    again = synthetic_samples(24, 6, temperatures=(0.5, 1.0), thinking_budgets=(64, None), mean_thinking_tokens=120,
                              max_tokens=400, seed=7)
    assert again.equals(synth)
    other = synthetic_samples(24, 6, temperatures=(0.5, 1.0), thinking_budgets=(64, None),
                              mean_thinking_tokens=120, max_tokens=400, seed=8)
    assert not other["correct"].equals(synth["correct"])


def test_synthetic_shapes_the_studies_look_for():
    df = synthetic_samples(150, 8, temperatures=(0.7,), mean_thinking_tokens=200, seed=1)
    wrong, right = df.filter(~pl.col("correct")), df.filter(pl.col("correct"))
    assert wrong["n_thinking_tokens"].mean() > right["n_thinking_tokens"].mean()
    stats = ot.with_trace_stats(df)
    assert stats["mean_entropy_answer"].mean() < stats["mean_entropy_thinking"].mean()
    by_outcome = stats.group_by("correct").agg(pl.col("mean_entropy").mean()).sort("correct")
    assert by_outcome["mean_entropy"][0] > by_outcome["mean_entropy"][1]  # wrong samples are less certain


# --------------------------------------------------------------------------- per-token statistics


def test_trace_stats_match_a_per_sample_loop():
    rng = np.random.default_rng(0)
    lengths = [0, 1, 3, 19, 20, 21, 57, 200]
    rows = []
    for i, n in enumerate(lengths * 2):
        n_think = int(rng.integers(0, n + 1)) if i % 3 else n
        values = rng.random(n).astype(np.float32).tolist()
        rows.append(sample(f"p{i}", bool(i % 2), values[:n_think], values[n_think:]))
    parts = [frame(rows[:7]), frame(rows[7:])]
    df = pl.concat(parts, rechunk=False)  # several chunks, as a concatenated store gives
    assert df["token_entropy"].n_chunks() == 2
    n_bins = 5
    stats = ot.with_trace_stats(df, n_bins=n_bins)
    thinking = ot.with_trace_stats(df, n_bins=n_bins, phase="thinking")
    for i, r in enumerate(df.iter_rows(named=True)):
        tokens = np.asarray(r["token_entropy"], dtype=np.float64)
        k = r["n_thinking_tokens"]
        got = stats.row(i, named=True)
        assert got["mean_entropy"] == (pytest.approx(tokens.mean()) if len(tokens) else None)
        assert got["mean_entropy_thinking"] == (pytest.approx(tokens[:k].mean()) if k else None)
        assert got["mean_entropy_answer"] == (pytest.approx(tokens[k:].mean()) if len(tokens) > k else None)
        thinking_profile = thinking.row(i, named=True)["entropy_profile_thinking"]
        for span, profile in ((tokens, got["entropy_profile"]), (tokens[:k], thinking_profile)):
            slots = (np.arange(len(span)) * n_bins) // max(len(span), 1)
            for b in range(n_bins):
                inside = span[slots == b]
                if len(inside):
                    assert profile[b] == pytest.approx(inside.mean(), rel=1e-5)
                else:
                    assert np.isnan(profile[b])


def test_phase_entropy_and_along_trace_hand_values():
    df = frame([
        sample("a", True, [1.0, 1.0, 3.0, 3.0], [0.5]),
        sample("b", True, [2.0, 2.0], [0.1, 0.3]),
        sample("c", False, [4.0, 4.0, 4.0, 2.0], []),
    ])
    phase = ot.phase_entropy(df, by=())
    get = lambda ok, ph: phase.filter((pl.col("correct") == ok) & (pl.col("phase") == ph))
    assert get(True, "thinking")["mean_entropy"].item() == pytest.approx((2.0 + 2.0) / 2)
    assert get(True, "answer")["mean_entropy"].item() == pytest.approx((0.5 + 0.2) / 2)
    assert get(False, "answer").height == 0  # no answer tokens: left out, not zero
    assert get(False, "thinking")["mean_entropy"].item() == pytest.approx(3.5)
    trace = ot.entropy_along_trace(df, n_bins=2, by=())
    thinking = ot.entropy_along_trace(df, n_bins=2, by=(), phase="thinking").filter(pl.col("correct"))
    assert thinking["mean_entropy"].to_list() == pytest.approx([1.5, 2.5])  # a: [1,1 | 3,3], b: [2 | 2]
    cached = ot.with_trace_stats(df, n_bins=2)
    assert ot.entropy_along_trace(cached, n_bins=2, by=()).equals(trace)
    right = trace.filter(pl.col("correct")).sort("bin")
    # a: [1,1,3 | 3,0.5] -> 5/3, 1.75 ; b: [2,2 | 0.1,0.3] -> 2, 0.2
    assert right["mean_entropy"].to_list() == pytest.approx([(5 / 3 + 2) / 2, (1.75 + 0.2) / 2])
    assert right["position"].to_list() == [0.25, 0.75]
    assert right["n_samples"].to_list() == [2, 2]
    wrong = trace.filter(~pl.col("correct")).sort("bin")
    assert wrong["mean_entropy"].to_list() == pytest.approx([4.0, 3.0])


def test_entropy_length_correlation():
    rows = [sample(f"p{i}", i % 2 == 0, [float(i)] * (i + 1), []) for i in range(8)]
    out = ot.entropy_length_correlation(frame(rows), by=())
    whole = out.filter(pl.col("subset") == "all")
    assert whole["pearson"].item() == pytest.approx(1.0)
    assert whole["spearman"].item() == pytest.approx(1.0)
    assert whole["n"].item() == 8
    assert sorted(out["subset"].to_list()) == ["all", "correct", "incorrect"]


# --------------------------------------------------------------------------- accuracy curves


def test_accuracy_vs_budget_hand_values():
    rows = []
    for p in range(4):
        rows += [sample(f"p{p}", p < 3, [1.0] * 8, thinking_budget=8, finish_reason="budget"),
                 sample(f"p{p}", p < 1, [1.0] * 20)]
    out = ot.accuracy_vs_budget(frame(rows), n_boot=500)
    assert out["thinking_budget"].to_list() == [8, None]  # uncapped last
    assert out["accuracy"].to_list() == pytest.approx([0.75, 0.25])
    assert out["share_capped"].to_list() == [1.0, 0.0]
    assert out["mean_thinking_tokens"].to_list() == [8.0, 20.0]
    assert out["n_problems"].to_list() == [4, 4]
    assert (out["ci_low"] <= out["accuracy"]).all() and (out["accuracy"] <= out["ci_high"]).all()


def test_accuracy_vs_length_uses_only_natural_samples():
    rows = [sample(f"p{i}", i < 3, [1.0] * n) for i, n in enumerate([10, 12, 14, 30, 32, 34])]
    rows.append(sample("capped", False, [1.0] * 5, thinking_budget=5))
    rows.append(sample("waited", True, [1.0] * 5, wait_extensions=1))
    out = ot.accuracy_vs_length(frame(rows), edges=[0, 20, 40], n_boot=200, by=())
    assert out["bucket"].to_list() == [0, 1]
    assert out["accuracy"].to_list() == [1.0, 0.0]
    assert out["n"].to_list() == [3, 3]
    assert out["mean_length"].to_list() == [12.0, 32.0]
    quantile = ot.accuracy_vs_length(frame(rows), n_buckets=2, n_boot=200, by=())
    assert quantile["n"].sum() == 6


def test_accuracy_by_level_and_best_budget():
    rows = []
    acc = {(1, 256): 0.75, (1, 1024): 0.75, (1, None): 0.5, (2, 256): 0.25, (2, 1024): 0.5, (2, None): 0.75}
    for (level, budget), share in acc.items():
        for p in range(4):
            rows.append(sample(f"L{level}p{p}", p < share * 4, [1.0], thinking_budget=budget, level=level))
    df = frame(rows)
    by_level = ot.accuracy_by_level(df, n_boot=200)
    assert by_level.height == 6
    assert by_level.filter((pl.col("level") == 2) & pl.col("thinking_budget").is_null())["accuracy"].item() == 0.75
    best = ot.best_budget_per_level(df, n_boot=200).sort("level")
    assert best["best_budget"].to_list() == [256, None]  # level 1: tie 256/1024 -> smaller budget
    assert best["accuracy"].to_list() == [0.75, 0.75]
    assert best["uncapped_accuracy"].to_list() == [0.5, 0.75]
    assert best["n_budgets"].to_list() == [3, 3]


def test_selection_accuracy_rules():
    rows = [
        # p1: shortest right, longest wrong; vote: A twice vs B -> right
        sample("p1", True, [1.0] * 5, pred="A"), sample("p1", True, [1.0] * 9, pred="A"),
        sample("p1", False, [1.0] * 30, pred="B"),
        # p2: two shortest tie (one right), longest right; vote: A vs B tie -> 1/2
        sample("p2", True, [1.0] * 4, pred="A"), sample("p2", False, [1.0] * 4, pred="B"),
        sample("p2", False, [1.0] * 6, pred=None), sample("p2", True, [1.0] * 8, pred="C"),
    ]
    out = ot.selection_accuracy(frame(rows), by=(), n_boot=200)
    acc = dict(zip(out["method"], out["accuracy"]))
    assert acc["shortest"] == pytest.approx((1 + 0.5) / 2)
    assert acc["longest"] == pytest.approx((0 + 1) / 2)
    assert acc["random"] == pytest.approx((2 / 3 + 2 / 4) / 2)
    # p2 votes A, B, C once each (None abstains): A and C correct -> 2/3
    assert acc["majority"] == pytest.approx((1 + 2 / 3) / 2)
    assert acc["oracle"] == 1.0
    assert set(out["n_problems"]) == {2}


def test_length_distribution_histogram_and_problem_stats():
    rows = [sample("p", True, [1.0] * n) for n in (10, 20, 30)] + [
        sample("p", False, [1.0] * 40, finish_reason="length"), sample("q", False, [1.0] * 50, finish_reason="budget")]
    df = frame(rows)
    dist = ot.length_distribution(df, by=()).sort("correct")
    assert dist["n"].to_list() == [2, 3]
    assert dist["mean"].to_list() == [45.0, 20.0]
    assert dist["p50"].to_list() == [45.0, 20.0]
    hist = ot.length_histogram(df, n_bins=4, by=())
    assert hist["count"].sum() == 5
    assert hist.group_by("correct").agg(pl.col("share").sum())["share"].to_list() == pytest.approx([1.0, 1.0])
    stats = ot.problem_length_stats(df, by=()).sort("problem_id")
    p = stats.row(0, named=True)
    assert (p["n"], p["mean"], p["min"], p["max"]) == (4, 25.0, 10, 40)
    assert p["std"] == pytest.approx(np.std([10, 20, 30, 40], ddof=1))
    assert p["p50"] == 25.0 and p["share_capped"] == 0.25 and p["accuracy"] == 0.75
    assert stats.row(1, named=True)["share_capped"] == 1.0


def test_marker_rates_match_tracing_counts():
    texts = ["Wait, wait. Hmm, let me check. But wait", "Alternatively we awaited nothing", "hmm HMM hmmm"]
    rows = [sample(f"p{i}", i == 1, [1.0] * 100, thinking=t) for i, t in enumerate(texts)]
    df = frame(rows)
    markers = ("wait", "hmm", "let me check", "but wait", "alternatively")
    out = ot.marker_rates(df, markers, by=())
    for ok in (True, False):
        want = {m: 0 for m in markers}
        for t, r in zip(texts, rows):
            if r["correct"] == ok:
                for m, c in marker_counts(t, markers).items():
                    want[m] += c
        got = out.filter(pl.col("correct") == ok)
        assert dict(zip(got["marker"], got["count"])) == want
    wrong = out.filter(~pl.col("correct"))
    assert dict(zip(wrong["marker"], wrong["per_1k"]))["wait"] == pytest.approx(1000 * 3 / 200)
    assert dict(zip(wrong["marker"], wrong["share_with"]))["hmm"] == 1.0


# --------------------------------------------------------------------------- temperature


def temperature_table() -> pl.DataFrame:
    rows = []
    # (problem, temperature) -> correct flags of 4 samples, preds follow
    plan = {("p1", 0.5): [1, 1, 0, 0], ("p1", 1.0): [1, 0, 0, 0], ("p2", 0.5): [0, 0, 0, 0],
            ("p2", 1.0): [0, 0, 0, 1], ("p3", 0.5): [1, 1, 1, 1], ("p3", 1.0): [1, 1, 0, 1]}
    for (pid, temp), flags in plan.items():
        for i, ok in enumerate(flags):
            ent = [temp] * (10 + 10 * int(temp))
            rows.append(sample(pid, bool(ok), ent, [], pred="gold" if ok else f"w{i % 2}", temperature=temp,
                               sample_idx=i, seed=i))
    return frame(rows)


def test_pass_at_k_curve_and_accuracy_vs_temperature():
    df = temperature_table()
    curve = tt.pass_at_k_curve(df, n_boot=200)
    assert sorted(set(curve["k"])) == [1, 2, 4]
    at = lambda t, k: curve.filter((pl.col("temperature") == t) & (pl.col("k") == k))["pass_at_k"].item()
    assert at(0.5, 1) == pytest.approx((0.5 + 0 + 1) / 3)
    assert at(0.5, 2) == pytest.approx(((1 - 1 / 6) + 0 + 1) / 3)
    assert at(1.0, 2) == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert at(1.0, 4) == 1.0 * 2 / 3 + 1 / 3
    acc = tt.accuracy_vs_temperature(df, n_boot=200).sort("temperature")
    assert acc["pass_at_k"].to_list() == pytest.approx([1.5 / 3, (0.25 + 0.25 + 0.75) / 3])
    assert acc["maj_at_k"].to_list() == pytest.approx(acc["pass_at_k"].to_list())  # maj@1 = pass@1 without abstentions


def test_maj_at_k_curve_counts_ties():
    df = temperature_table()
    curve = tt.maj_at_k_curve(df, [4])
    row = curve.filter(pl.col("temperature") == 0.5)
    # p1 at 0.5: gold x2, w0 x1, w1 x1 -> right; p2: w0/w1 2-2 tie, no gold -> 0; p3: right
    assert row["maj_at_k"].item() == pytest.approx(2 / 3)
    assert row["expected_ties"].item() == 0.0
    hot = curve.filter(pl.col("temperature") == 1.0)
    # p1 at 1.0: gold, w1, w0, w1 -> w1 wins; p2: w0, w1, w0, gold -> w0; p3: right
    assert hot["maj_at_k"].item() == pytest.approx(1 / 3)


def test_coverage_matrix_and_pooled_voting_frames():
    df = temperature_table()
    cov = tt.coverage(df)
    # 0.5 solves p1 and p3; 1.0 solves all three (p2 once), so the union adds nothing
    assert (cov["union"].item(), cov["best_single"].item(), cov["gain"].item()) == (1.0, 1.0, 0.0)
    assert cov["best_condition"].item() == 1.0
    assert tt.solve_matrix(df).height == 6
    voting = tt.multi_temperature_voting(df, [1, 4])
    assert set(voting["scheme"]) == {"single", "best_single", "pooled"}
    pooled1 = voting.filter((pl.col("scheme") == "pooled") & (pl.col("k") == 1))
    assert pooled1["pass_at_k"].item() == pytest.approx(df["correct"].mean())


def test_entropy_length_vs_temperature():
    out = tt.entropy_length_vs_temperature(temperature_table())
    ent = out.filter(pl.col("variable") == "mean_entropy").sort("temperature")
    assert ent["mean"].to_list() == pytest.approx([0.5, 1.0])
    length = out.filter(pl.col("variable") == "n_tokens").sort("temperature")
    assert length["mean"].to_list() == [10.0, 20.0]
    assert length["n"].to_list() == [12, 12]


# --------------------------------------------------------------------------- all frames


def test_all_frames_on_a_synthetic_table(synth):
    timings: dict[str, float] = {}
    frames = all_frames(synth, n_boot=200, timings=timings)
    expected = {
        "accuracy_vs_budget", "accuracy_vs_length", "accuracy_by_level", "best_budget_per_level",
        "selection_accuracy", "length_distribution", "length_histogram", "problem_length_stats", "phase_entropy",
        "entropy_length_correlation", "entropy_along_trace", "marker_rates", "pass_at_k_curve", "maj_at_k_curve",
        "solve_matrix", "coverage", "entropy_length_vs_temperature", "accuracy_vs_temperature",
        "multi_temperature_voting",
    }
    assert set(frames) == expected
    assert set(timings) == expected | {"trace_stats"}
    for name, f in frames.items():
        assert f.height > 0, name
    # the default `by` keeps conditions apart: one accuracy per (temperature, budget)
    assert frames["accuracy_vs_budget"].height == 4
    keys = ["thinking_budget", "temperature"]
    pass1 = frames["pass_at_k_curve"].filter(pl.col("k") == 1).join(
        frames["accuracy_vs_temperature"], on=keys, nulls_equal=True, suffix="_fixed_k"
    )
    assert pass1.height == 4
    assert pass1["pass_at_k"].to_list() == pytest.approx(pass1["pass_at_k_fixed_k"].to_list())
    # pass@1 at each condition equals that condition's accuracy
    acc = synth.group_by("temperature", "thinking_budget").agg(pl.col("correct").mean())
    joined = frames["accuracy_vs_budget"].join(acc, on=["temperature", "thinking_budget"], nulls_equal=True)
    assert joined["accuracy"].to_list() == pytest.approx(joined["correct"].to_list())
    maj = frames["maj_at_k_curve"]
    assert (maj["maj_at_k_strict"] <= maj["maj_at_k"] + 1e-12).all()
    per_problem = metrics.pass_at_k_table(synth, [6], ["temperature", "thinking_budget"])
    assert per_problem["pass_at_k"].is_in([0.0, 1.0]).all()  # k = n: solved or not


def test_trace_stats_leave_forced_nan_tokens_out():
    """Forced tokens (budget cue, "Wait") carry NaN entropy; means are over sampled tokens only."""
    from thinklab.analysis.overthinking import with_trace_stats

    nan = float("nan")
    df = pl.DataFrame({
        "token_entropy": [[1.0, 3.0, nan, nan, 2.0, 4.0], [nan, nan]],
        "n_thinking_tokens": [2, 1],
    }, schema={"token_entropy": pl.List(pl.Float32), "n_thinking_tokens": pl.Int64})
    out = with_trace_stats(df, n_bins=3)
    assert out["mean_entropy"].to_list()[0] == pytest.approx(2.5)
    assert out["mean_entropy_thinking"].to_list()[0] == pytest.approx(2.0)
    assert out["mean_entropy_answer"].to_list()[0] == pytest.approx(3.0)
    assert out["mean_entropy"].to_list()[1] is None
    profile = out["entropy_profile"].to_list()[0]
    assert profile[0] == pytest.approx(2.0) and profile[1] != profile[1] and profile[2] == pytest.approx(3.0)


# --------------------------------------------------------------------------- quantization and MoE axes

QUANT_FRAMES = {"quantization_paired", "quantization_deltas", "quantization_flip_matrix", "accuracy_by_format"}
MOE_FRAMES = {"metrics_vs_k", "expert_load", "router_entropy_by_phase"}


@pytest.fixture(scope="module")
def four_axes() -> pl.DataFrame:
    return synthetic_samples(10, 3, temperatures=(0.6, 1.0), thinking_budgets=(64, None),
                             quantizations=(None, "int4-wo"), moe_top_ks=(4, 8), mean_thinking_tokens=80, seed=3)


@pytest.fixture(scope="module")
def four_axes_frames(four_axes) -> tuple[dict[str, pl.DataFrame], dict[str, float]]:
    timings: dict[str, float] = {}
    return all_frames(four_axes, n_boot=100, seed=1, timings=timings), timings


def test_synthetic_quantization_and_moe_axes(four_axes):
    from thinklab.store import SCHEMA

    df = four_axes
    assert df.height == 16 * 10 * 3
    for name, dtype in df.schema.items():
        assert SCHEMA[name] == dtype, name
    assert df["run_id"].n_unique() == 16
    keys = ["temperature", "thinking_budget", "moe_top_k", "problem_id", "sample_idx", "seed"]
    base, quant = df.filter(pl.col("quantization").is_null()), df.filter(pl.col("quantization") == "int4-wo")
    assert base.height == quant.height == df.height // 2
    assert quant.join(base, on=keys, nulls_equal=True).height == quant.height  # every quantized row has its baseline
    # each sampled token goes to moe_top_k distinct experts in every layer
    load = np.array(df["expert_load"].to_list())  # (rows, layers, experts)
    assert load.shape == (df.height, 8, 8)
    k, n = df["moe_top_k"].to_numpy(), df["n_tokens"].to_numpy()
    assert (load.sum(2) == (k * n)[:, None]).all()
    assert (load.max(2) <= n[:, None]).all()
    assert (load[k == 8] == n[k == 8, None, None]).all()  # k = E: every expert sees every token
    thinking, answer = df["router_entropy_thinking"], df["router_entropy_answer"]
    assert (thinking.drop_nulls() <= np.log(8) + 1e-6).all() and thinking.mean() > answer.mean()

    # no MoE axis: the routing columns are absent; a null moe_top_k leaves them null
    assert "expert_load" not in synthetic_samples(4, 2, quantizations=(None, "int8-wo")).columns
    mixed = synthetic_samples(4, 2, moe_top_ks=(None, 2), num_experts=4, moe_layers=3)
    dense = mixed.filter(pl.col("moe_top_k").is_null())
    assert dense.height == 8 and dense["expert_load"].null_count() == 8
    assert dense["router_entropy_thinking"].null_count() == 8
    assert len(mixed.filter(pl.col("moe_top_k") == 2)["expert_load"][0]) == 3

    # the axes move accuracy the way the studies look for
    big = synthetic_samples(200, 4, quantizations=(None, "int4-wo"), moe_top_ks=(4, 8), mean_thinking_tokens=40,
                            with_text=False, seed=5)
    acc = big.group_by("quantization", "moe_top_k").agg(pl.col("correct").mean())
    acc = {(q, k): a for q, k, a in acc.iter_rows()}
    assert acc[("int4-wo", 8)] < acc[(None, 8)] and acc[(None, 4)] < acc[(None, 8)]

    for bad, message in [({"quantizations": (None, "fancy")}, "'fancy'"), ({"moe_top_ks": (4, 9)}, r"\[9\]"),
                         ({"quantizations": (None, None)}, "repeats")]:
        with pytest.raises(ValueError, match=message):
            synthetic_samples(2, 1, **bad)


def test_all_frames_quantization_and_moe(four_axes, four_axes_frames):
    df = four_axes
    frames, timings = four_axes_frames
    assert QUANT_FRAMES | MOE_FRAMES <= set(frames)
    assert QUANT_FRAMES | MOE_FRAMES <= set(timings)
    for name in QUANT_FRAMES | MOE_FRAMES:
        assert frames[name].height > 0, name

    # quantization: other conditions kept apart; deltas against a hand-paired computation
    group = {"moe_top_k": 4, "temperature": 0.6, "thinking_budget": None}
    keys = ["problem_id", "sample_idx", "seed"]
    sub = df.filter(pl.col("moe_top_k") == 4, pl.col("temperature") == 0.6, pl.col("thinking_budget").is_null())
    pairs = sub.filter(pl.col("quantization") == "int4-wo").join(
        sub.filter(pl.col("quantization").is_null()), on=keys, suffix="_base"
    )
    assert pairs.height == 30
    hand_accuracy = (pairs["correct"].cast(pl.Int8) - pairs["correct_base"].cast(pl.Int8)).mean()
    hand_length = (pairs["n_tokens"] - pairs["n_tokens_base"]).mean()
    deltas = frames["quantization_deltas"]
    assert deltas.height == 8 * 3  # (moe_top_k, temperature, budget) x metric
    row = deltas.filter(
        pl.col("moe_top_k") == 4, pl.col("temperature") == 0.6, pl.col("thinking_budget").is_null(),
        pl.col("format") == "int4-wo",
    )
    by_metric = {r["metric"]: r for r in row.iter_rows(named=True)}
    assert by_metric["accuracy"]["delta"] == pytest.approx(hand_accuracy)
    assert by_metric["length"]["delta"] == pytest.approx(hand_length)
    assert by_metric["accuracy"]["n_pairs"] == 30
    right_to_wrong = int((pairs["correct_base"] & ~pairs["correct"]).sum())
    assert by_metric["accuracy"]["right_to_wrong"] == right_to_wrong
    flips = frames["quantization_flip_matrix"].filter(
        pl.col("moe_top_k") == 4, pl.col("temperature") == 0.6, pl.col("thinking_budget").is_null()
    )
    assert flips["n"].sum() == 30 and flips["share"].sum() == pytest.approx(1.0)
    assert flips.filter(pl.col("baseline") == "right", pl.col("quantized") == "wrong")["n"].item() == right_to_wrong
    assert frames["quantization_paired"].height == df.height // 2
    by_format = frames["accuracy_by_format"]
    assert by_format.height == 16 and set(by_format["format"]) == {"baseline", "int4-wo"}
    assert set(group) <= set(by_format.columns)

    # MoE: one row per k per metric in every other condition; expert shares sum to 1 per layer
    from thinklab.analysis.moe import METRICS

    others = ["quantization", "temperature", "thinking_budget"]
    vs_k = frames["metrics_vs_k"]
    assert vs_k.height == 8 * 2 * len(METRICS)
    per_metric = vs_k.group_by(*others, "variable").agg(pl.col("moe_top_k").sort())
    assert per_metric.height == 8 * len(METRICS)
    assert all(ks == [4, 8] for ks in per_metric["moe_top_k"].to_list())
    accuracy = vs_k.filter(pl.col("variable") == "correct").join(
        df.group_by(*others, "moe_top_k").agg(pl.col("correct").mean().alias("hand")),
        on=[*others, "moe_top_k"], nulls_equal=True,
    )
    assert accuracy["estimate"].to_list() == pytest.approx(accuracy["hand"].to_list())

    load = frames["expert_load"]
    assert load.height == 8 * 2 * 8 * 8  # conditions x k x layers x experts
    shares = load.group_by(*others, "moe_top_k", "layer").agg(pl.col("share").sum(), pl.col("tokens").sum())
    assert shares["share"].to_list() == pytest.approx([1.0] * shares.height)
    routed = df.group_by(*others, "moe_top_k").agg(slots=pl.col("n_tokens").sum() * pl.col("moe_top_k").first())
    routed = shares.join(routed, on=[*others, "moe_top_k"], nulls_equal=True)
    assert (routed["tokens"] == routed["slots"]).all()  # every layer routes k slots per token

    phases = frames["router_entropy_by_phase"]
    assert phases.height == 8 * 2 * 2
    one = phases.filter(pl.col("quantization") == "int4-wo", pl.col("temperature") == 1.0,
                        pl.col("thinking_budget") == 64, pl.col("moe_top_k") == 8, pl.col("phase") == "thinking")
    hand = df.filter(pl.col("quantization") == "int4-wo", pl.col("temperature") == 1.0,
                     pl.col("thinking_budget") == 64, pl.col("moe_top_k") == 8)["router_entropy_thinking"].mean()
    assert one["estimate"].item() == pytest.approx(hand, rel=1e-5)


def test_all_frames_leaves_out_studies_the_table_lacks(synth):
    assert not (QUANT_FRAMES | MOE_FRAMES) & set(all_frames(synth, n_boot=20))
    quant_only = synthetic_samples(6, 2, quantizations=(None, "int8-wo"), mean_thinking_tokens=40, seed=2)
    frames = all_frames(quant_only, n_boot=20)
    assert QUANT_FRAMES <= set(frames) and not MOE_FRAMES & set(frames)
    assert frames["quantization_deltas"]["format"].unique().to_list() == ["int8-wo"]
    no_baseline = synthetic_samples(6, 2, quantizations=("int8-wo", "int4-wo"), moe_top_ks=(4,),
                                    mean_thinking_tokens=40, seed=2)
    assert not (QUANT_FRAMES | MOE_FRAMES) & set(all_frames(no_baseline, n_boot=20))


def _expert_load_reference(df: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """expert_load by summing the nested lists row by row, in plain Python."""
    totals: dict[tuple, np.ndarray] = {}
    for row in df.iter_rows(named=True):
        if row["expert_load"] is None:
            continue
        key = tuple(row[c] for c in [*by, "moe_top_k"])
        load = np.array(row["expert_load"], dtype=np.int64)
        totals[key] = totals[key] + load if key in totals else load
    rows = []
    for key, load in totals.items():
        for layer, counts in enumerate(load.tolist()):
            for expert, tokens in enumerate(counts):
                rows.append((*key, layer, expert, tokens, tokens / sum(counts)))
    return pl.DataFrame(rows, schema=[*by, "moe_top_k", "layer", "expert", "tokens", "share"], orient="row")


def test_expert_load_against_a_plain_python_sum():
    from thinklab.analysis import moe

    df = synthetic_samples(6, 3, temperatures=(0.6, 1.0), moe_top_ks=(None, 2, 4), num_experts=4, moe_layers=3,
                           mean_thinking_tokens=30, with_text=False, seed=4)
    df = df.sample(fraction=1.0, shuffle=True, seed=1)  # groups not in contiguous runs
    assert df["expert_load"].null_count() == df.height // 3  # the dense rows
    for by in ([], ["temperature"]):
        keys = [*by, "moe_top_k", "layer", "expert"]
        fast = moe.expert_load(df, by=by)
        assert fast.columns == [*keys, "tokens", "share"]
        assert fast.height == (len(by) + 1) * 2 * 3 * 4  # (temperatures) x k x layers x experts
        assert fast.equals(fast.sort(keys))
        reference = _expert_load_reference(df, by).sort(keys)
        counts = [*keys, "tokens"]
        assert fast.select(counts).equals(reference.select(counts).cast({c: fast.schema[c] for c in counts}))
        assert fast["share"].to_list() == pytest.approx(reference["share"].to_list())
    # the load array itself, row by row
    routed = df.filter(pl.col("expert_load").is_not_null())
    assert (moe.expert_load_array(routed["expert_load"]) == np.array(routed["expert_load"].to_list())).all()


def test_expert_load_rejects_rows_of_another_shape():
    from thinklab.analysis import moe

    def table(*loads):
        return pl.DataFrame({"moe_top_k": [2] * len(loads), "expert_load": list(loads)},
                            schema_overrides={"expert_load": pl.List(pl.List(pl.Int32))})

    same = table([[1, 2, 3], [3, 2, 1]], None, [[0, 1, 2], [2, 1, 0]])  # null rows are left out
    assert moe.expert_load(same)["tokens"].to_list() == [1, 3, 5, 5, 3, 1]
    with pytest.raises(ValueError, match=r"row 0 is 2 x 3 and row 1 is 2 x 4"):
        moe.expert_load(table([[1, 2, 3], [3, 2, 1]], [[1, 2, 3, 4], [1, 2, 3, 4]]))
    with pytest.raises(ValueError, match=r"row 0 is 2 x 3 and row 2 is 3 x 3 \(1 of 3 rows"):
        moe.expert_load(table([[1, 2, 3], [3, 2, 1]], [[1, 2, 3], [3, 2, 1]], [[1, 2, 3]] * 3))
    with pytest.raises(ValueError, match=r"row 1 is 2 layers of \[3, 2\] experts"):
        moe.expert_load(table([[1, 2, 3], [3, 2, 1]], [[1, 2, 3], [3, 2]]))


def test_analysis_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, thinklab.analysis, thinklab.analysis.moe; "
            "print(sorted(m for m in ('torch', 'transformers', 'torchao', 'plotly') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
