"""thinklab.metrics: pass@k, maj@k, coverage and bootstrap against hand and brute-force values."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinklab import metrics


def table(rows: list[dict]) -> pl.DataFrame:
    """A minimal sample table: problem_id, sample_idx, seed, temperature, pred, correct (+ extras)."""
    base = {"sample_idx": 0, "seed": 0, "temperature": 1.0, "thinking_budget": None}
    full = [{**base, **r} for r in rows]
    return pl.DataFrame(full, schema_overrides={"temperature": pl.Float32, "thinking_budget": pl.Int64,
                                                "pred": pl.Utf8, "correct": pl.Boolean})


def votes_table(problems: dict[str, list[tuple[str | None, bool]]], **extra) -> pl.DataFrame:
    rows = []
    for pid, samples in problems.items():
        for i, (pred, ok) in enumerate(samples):
            rows.append({"problem_id": pid, "sample_idx": i, "seed": i, "pred": pred, "correct": ok, **extra})
    return table(rows)


# --------------------------------------------------------------------------- pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    hits = sum(1 for sub in itertools.combinations(range(n), k) if any(i < c for i in sub))
    return hits / math.comb(n, k)


def test_pass_at_k_hand_values():
    # n=5, c=2: 1 - C(3,k)/C(5,k)
    got = metrics.pass_at_k([5], [2], [1, 2, 3, 4, 5])[0]
    assert got == pytest.approx([2 / 5, 1 - 3 / 10, 1 - 1 / 10, 1.0, 1.0], abs=1e-15)
    assert metrics.pass_at_k(10, 0, 3)[0] == 0.0
    assert metrics.pass_at_k(10, 10, 1)[0] == 1.0
    assert metrics.pass_at_k(4, 1, 2)[0] == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6


def test_pass_at_k_shapes_and_k_beyond_n():
    scalar = metrics.pass_at_k([10, 3], [1, 1], 5)
    assert scalar.shape == (2,)
    assert scalar[0] == pytest.approx(0.5)
    assert np.isnan(scalar[1])
    grid = metrics.pass_at_k([10, 3], [1, 1], [1, 5])
    assert grid.shape == (2, 2)
    with pytest.raises(ValueError):
        metrics.pass_at_k([3], [4], 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k([3], [1], 0)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 11).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_pass_at_k_properties_and_brute_force(nc):
    n, c = nc
    ks = np.arange(1, n + 1)
    values = metrics.pass_at_k([n], [c], ks)[0]
    assert ((values >= 0) & (values <= 1)).all()
    assert (np.diff(values) >= -1e-15).all()  # monotone in k
    for k, v in zip(ks, values):
        assert v == pytest.approx(brute_pass_at_k(n, c, int(k)), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 80).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_exact_rational(nck):
    n, c, k = nck
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert metrics.pass_at_k([n], [c], k)[0] == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_stable_for_n_5000():
    n = 5000
    c = np.array([0, 1, 2, 7, 50, 500, 2500, 4999, 5000])
    ks = [1, 2, 10, 100, 1000, 4000, 5000]
    got = metrics.pass_at_k(np.full(len(c), n), c, ks)
    assert np.isfinite(got).all()
    assert (np.diff(got, axis=1) >= -1e-12).all()
    for i, ci in enumerate(c):
        for j, k in enumerate(ks):
            exact = float(1 - Fraction(math.comb(n - int(ci), k), math.comb(n, k)))
            assert got[i, j] == pytest.approx(exact, rel=1e-10, abs=1e-13), (ci, k)
    # c=1 is the textbook case: pass@k = k/n
    assert got[1] == pytest.approx(np.array(ks) / n, rel=1e-10)


# --------------------------------------------------------------------------- maj@k


def brute_maj(codes: list[int], correct: dict[int, bool], k: int) -> tuple[float, float, float]:
    """Expected, strict and tie over every size-k subset; code -1 abstains."""
    expected = strict = tie = 0.0
    subsets = list(itertools.combinations(range(len(codes)), k))
    for sub in subsets:
        counts: dict[int, int] = {}
        for i in sub:
            if codes[i] >= 0:
                counts[codes[i]] = counts.get(codes[i], 0) + 1
        if not counts:
            continue
        top_count = max(counts.values())
        top = [g for g, v in counts.items() if v == top_count]
        n_correct = sum(correct[g] for g in top)
        expected += n_correct / len(top)
        strict += len(top) == 1 and n_correct == 1
        tie += n_correct * (len(top) > 1)
    return expected / len(subsets), strict / len(subsets), tie / len(subsets)


vote_configs = st.lists(st.integers(1, 4), min_size=1, max_size=4).flatmap(
    lambda sizes: st.tuples(
        st.just(sorted(sizes, reverse=True)),
        st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)),
        st.integers(0, 2),  # abstentions
    )
).filter(lambda cfg: sum(cfg[0]) + cfg[2] <= 9)


@settings(max_examples=80, deadline=None)
@given(vote_configs)
def test_maj_at_k_exact_matches_brute_force(cfg):
    sizes, correct, abstain = cfg
    n = sum(sizes) + abstain
    codes = [g for g, m in enumerate(sizes) for _ in range(m)] + [-1] * abstain
    ks = np.arange(1, n + 1)
    expected, strict, tie = metrics.maj_at_k_exact(np.array([sizes]), np.array([correct]), np.array([n]), ks)
    for j, k in enumerate(ks):
        want = brute_maj(codes, dict(enumerate(correct)), int(k))
        assert (expected[0, j], strict[0, j], tie[0, j]) == pytest.approx(want, abs=1e-12)


def test_maj_at_k_hand_values_with_ties_and_abstention():
    # preds A A B None, A correct. k=2: {AA}=1, {AB}x2 tie=1/2, {A-}x2=1, {B-}=0 -> 4/6.
    df = votes_table({"p": [("A", True), ("A", True), ("B", False), (None, False)]})
    out = metrics.maj_at_k_table(df, [1, 2, 4]).sort("k")
    assert out["maj_at_k"].to_list() == pytest.approx([0.5, 4 / 6, 1.0])
    assert out["maj_at_k_strict"].to_list() == pytest.approx([0.5, 3 / 6, 1.0])
    assert out["p_tie"].to_list() == pytest.approx([0.0, 2 / 6, 0.0])
    assert out["method"].unique().to_list() == ["exact"]


def test_maj_at_k_full_vote_tie_counts_half():
    df = votes_table({"p": [("A", True), ("B", False)], "q": [("C", True), ("C", True), ("D", False)]})
    vote = metrics.majority_vote(df).sort("problem_id")
    assert vote["maj"].to_list() == [0.5, 1.0]
    assert vote["maj_strict"].to_list() == [0.0, 1.0]
    assert vote["tie"].to_list() == [True, False]
    table_k = metrics.maj_at_k_table(df, [2, 3]).sort("problem_id", "k")
    assert table_k.filter(pl.col("problem_id") == "p")["maj_at_k"].to_list() == [0.5]  # k=3 > n dropped
    q = table_k.filter(pl.col("problem_id") == "q").sort("k")
    # q, k=2: {CC}=1, {CD}x2 tie -> (1 + 0.5 + 0.5)/3
    assert q["maj_at_k"].to_list() == pytest.approx([2 / 3, 1.0])


def test_maj_at_k_monte_carlo_agrees_with_exact():
    sizes = np.array([[4, 4, 2, 1, 0], [3, 3, 3, 0, 0], [6, 2, 1, 1, 1]])
    correct = np.array([[True, False, False, False, False], [False, True, True, False, False],
                        [False, True, False, False, False]])
    n = np.array([12, 10, 11])
    ks = np.array([1, 2, 3, 5, 8, 10])
    exact = metrics.maj_at_k_exact(sizes, correct, n, ks)
    mc = metrics.maj_at_k_monte_carlo(sizes, correct, n, ks, n_draws=4000, rng=np.random.default_rng(1))
    for e, m in zip(exact, mc):
        np.testing.assert_allclose(m, e, atol=0.04)
    again = metrics.maj_at_k_monte_carlo(sizes, correct, n, ks, n_draws=4000, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(mc[0], again[0])  # seeded


def test_maj_at_k_auto_falls_back_to_monte_carlo(monkeypatch):
    df = votes_table({"p": [("A", True)] * 5 + [("B", False)] * 4})
    exact = metrics.maj_at_k_table(df, [3, 5])
    monkeypatch.setattr(metrics, "EXACT_MAX_WORK", 0.0)
    mc = metrics.maj_at_k_table(df, [3, 5], n_draws=3000)
    assert mc["method"].unique().to_list() == ["monte_carlo"]
    assert mc["maj_at_k"].to_list() == pytest.approx(exact["maj_at_k"].to_list(), abs=0.04)


def test_maj_at_k_large_n_stays_finite():
    sizes = np.array([[400, 350, 200, 50]])
    correct = np.array([[True, False, False, False]])
    expected, strict, tie = metrics.maj_at_k_exact(sizes, correct, np.array([1000]), [1, 11, 101, 999])
    assert np.isfinite(expected).all() and np.isfinite(strict).all()
    assert expected[0, 0] == pytest.approx(0.4)
    assert (np.diff(expected[0]) > 0).all()  # the plurality answer wins more with more votes


# --------------------------------------------------------------------------- pooling and coverage


def test_pooled_voting_at_equal_budget():
    rows = [
        {"problem_id": "p", "sample_idx": 0, "temperature": 0.5, "pred": "A", "correct": True},
        {"problem_id": "p", "sample_idx": 1, "temperature": 0.5, "pred": "A", "correct": True},
        {"problem_id": "p", "sample_idx": 0, "temperature": 1.0, "pred": "B", "correct": False},
        {"problem_id": "p", "sample_idx": 1, "temperature": 1.0, "pred": "C", "correct": False},
    ]
    out = metrics.pooled_voting(table(rows), [1, 2], "temperature")
    get = lambda scheme, k, col: out.filter((pl.col("scheme") == scheme) & (pl.col("k") == k))[col].to_list()
    assert get("pooled", 1, "maj_at_k") == pytest.approx([0.5])
    # pooled k=2 over {A,A,B,C}: {AA}=1, {AB},{AB},{AC},{AC} ties=1/2 each, {BC}=0 -> 3/6
    assert get("pooled", 2, "maj_at_k") == pytest.approx([0.5])
    assert get("pooled", 2, "pass_at_k") == pytest.approx([1 - 1 / 6])
    assert get("best_single", 2, "maj_at_k") == pytest.approx([1.0])
    assert get("best_single", 2, "temperature") == [0.5]
    assert sorted(get("single", 1, "maj_at_k")) == pytest.approx([0.0, 1.0])


def test_solve_matrix_and_coverage():
    rows = []
    solved = {("p1", 0.5): [1, 0], ("p1", 1.0): [0, 0], ("p2", 0.5): [0, 0], ("p2", 1.0): [0, 1],
              ("p3", 0.5): [0, 0], ("p3", 1.0): [0, 0], ("p4", 0.5): [1, 1], ("p4", 1.0): [1, 0]}
    for (pid, temp), marks in solved.items():
        for i, ok in enumerate(marks):
            rows.append({"problem_id": pid, "sample_idx": i, "temperature": temp, "pred": str(ok), "correct": bool(ok)})
    df = table(rows)
    matrix = metrics.solve_matrix(df)
    assert matrix.height == 8
    assert matrix.filter((pl.col("problem_id") == "p4") & (pl.col("temperature") == 0.5))["solve_rate"].item() == 1.0
    cov = metrics.coverage(df)
    assert cov["n_problems"].item() == 4
    assert cov["union"].item() == pytest.approx(3 / 4)
    assert cov["best_single"].item() == pytest.approx(2 / 4)
    assert cov["best_condition"].item() == 0.5  # tie between 0.5 and 1.0 goes to the smaller value
    assert cov["gain"].item() == pytest.approx(1 / 4)


def test_condition_columns_lists_only_varying_knobs():
    df = table([{"problem_id": "p", "temperature": t, "pred": "A", "correct": True} for t in (0.5, 1.0)])
    assert metrics.condition_columns(df) == ["temperature"]
    assert metrics.condition_columns(df, exclude=["temperature"]) == []


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_resamples_problems_not_samples():
    # two problems, 50 samples each, all right vs all wrong: a problem-level resample gives
    # means in {0, 1/2, 1}, so the 95% interval is [0, 1]; a sample-level one would be ~[0.4, 0.6].
    rows = [{"problem_id": pid, "sample_idx": i, "pred": "x", "correct": pid == "a"} for pid in "ab" for i in range(50)]
    ci = metrics.bootstrap_ci(table(rows), "correct", n_boot=4000, seed=3)
    assert ci["estimate"].item() == 0.5
    assert ci["ci_low"].item() == 0.0 and ci["ci_high"].item() == 1.0
    assert ci["n"].item() == 100 and ci["n_clusters"].item() == 2


def test_bootstrap_groups_seed_and_constant_values():
    rows = [{"problem_id": f"p{i}", "temperature": t, "pred": "x", "correct": (i % 3 == 0) if t == 0.5 else True}
            for i in range(30) for t in (0.5, 1.0)]
    df = table(rows)
    a = metrics.bootstrap_ci(df, "correct", by=["temperature"], seed=1)
    b = metrics.bootstrap_ci(df, "correct", by=["temperature"], seed=1)
    assert a.equals(b)
    low = a.filter(pl.col("temperature") == 0.5)
    assert low["estimate"].item() == pytest.approx(10 / 30)
    assert low["ci_low"].item() < 10 / 30 < low["ci_high"].item()
    high = a.filter(pl.col("temperature") == 1.0)
    assert (high["ci_low"].item(), high["ci_high"].item()) == (1.0, 1.0)


def test_paired_bootstrap_joins_on_problem_sample_seed():
    rng = np.random.default_rng(0)
    rows_a, rows_b = [], []
    for p in range(40):
        for i in range(4):
            ok = bool(rng.random() < 0.5)
            key = {"problem_id": f"p{p}", "sample_idx": i, "seed": 100 * p + i, "pred": "x"}
            rows_a.append({**key, "correct": ok})
            rows_b.append({**key, "correct": ok or (p < 10)})  # b fixes problems p0..p9
    a, b = table(rows_a), table(rows_b).sample(fraction=1.0, shuffle=True, seed=1)
    out = metrics.paired_bootstrap(a, b, n_boot=2000, seed=0)
    fixed = sum(1 for ra, rb in zip(rows_a, rows_b) if rb["correct"] and not ra["correct"])
    assert out["n_pairs"].item() == 160 and out["n_clusters"].item() == 40
    assert out["delta"].item() == pytest.approx(fixed / 160)
    assert 0 < out["ci_low"].item() <= out["delta"].item() <= out["ci_high"].item()
    same = metrics.paired_bootstrap(a, a, n_boot=200)
    assert same["delta"].item() == 0.0 and same["ci_low"].item() == 0.0 and same["ci_high"].item() == 0.0


def test_maj_at_k_arrays_shortcuts_agree_with_the_exact_sum():
    # k = 1 and k = n are counted directly, the rest by the exact sum; ks need not be sorted
    sizes = np.array([[3, 2, 1, 0], [2, 2, 2, 1], [5, 0, 0, 0], [3, 3, 0, 0]])
    correct = np.array([[False, True, False, False], [True, False, True, False], [True, False, False, False],
                        [True, False, False, False]])
    n = np.array([7, 8, 5, 6])
    ks = np.array([5, 1, 3, 8, 2, 6])
    groups = metrics.VoteGroups(sizes, correct, n, pl.DataFrame())
    *fast, method = metrics.maj_at_k_arrays(groups, ks)
    assert method == "exact"
    for got, want in zip(fast, metrics.maj_at_k_exact(sizes, correct, n, ks)):
        np.testing.assert_allclose(got, want, atol=1e-12)
    assert fast[0][3, list(ks).index(6)] == 0.5 and fast[2][3, list(ks).index(6)] == 1.0  # 3-3 tie at k = n


def test_bootstrap_ci_of_an_all_null_metric_is_empty():
    """A metric with no values at all (e.g. an answer phase no sample reached) gives no rows, not an error."""
    df = pl.DataFrame({"problem_id": ["a", "b"], "v": [None, None]}, schema={"problem_id": pl.Utf8, "v": pl.Float64})
    out = metrics.bootstrap_ci(df, "v", n_boot=50)
    assert out.height == 0
