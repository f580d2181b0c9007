"""The seed papers' seven findings as statistics with 95% intervals and verdicts.

Each `finding_*` function takes the sample tables of the conditions it compares (as the
runner stores them; several tasks may be stacked, told apart by `problem_id`) and returns
a `Finding`: a primary `Statistic`, the other parts of the claim as further statistics,
the primary statistic per task, and the tables behind the figures.

- (a) the shortest of n samples is right more often than a random one: per problem,
  P(shortest correct) - P(random correct); the claim predicts > 0.
- (b) correct samples are shorter than incorrect ones: mean length of incorrect minus
  correct samples, within problems that have both; > 0.
- (c) thinking-phase entropy is above answer-phase entropy, and correlates with length:
  thinking minus answer mean token entropy, per sample; > 0.
- (d) sampling over several temperatures solves more, and votes better, than the best
  single one: pooled pass@k minus the best single temperature's, equal budget k; > 0.
- (e) int8 costs about nothing, 4-bit costs more, and more on harder levels: accuracy
  4-bit minus baseline, paired per sample; < 0.
- (f) fewer active experts give lower accuracy: accuracy at the smallest top-k minus at
  the full top-k, paired per sample; < 0.
- (g) accuracy peaks at an intermediate thinking budget: accuracy at the best budget
  below the largest minus at the largest; > 0.

Intervals are percentile bootstraps that resample problems (the samples of a problem are
correlated), through `thinklab.metrics`: `bootstrap_ci` for means, `paired_bootstrap` for
paired deltas joined on (problem_id, sample_idx, seed), and `bootstrap_replicates` where
the statistic is a function of several means (a correlation, a difference of two levels'
deltas, where the budget curve peaks). Where the best of m conditions is chosen on the
same data ((d), (g)), its interval is Bonferroni-widened to level 1 - 0.05/m. The verdict
is computed, never written: see `verdict`.

Nothing here reads files, generates or draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as _replace

import numpy as np
import polars as pl

from thinklab import metrics
from thinklab.analysis import moe as moe_analysis
from thinklab.analysis import overthinking
from thinklab.analysis import quantization as quant_analysis

__all__ = [
    "VERDICTS",
    "Statistic",
    "Finding",
    "verdict",
    "finding_a",
    "finding_b",
    "finding_c",
    "finding_d",
    "finding_e",
    "finding_f",
    "finding_g",
    "no_data",
]

VERDICTS = ("holds", "reversed", "not resolved", "no data")
PAIR_ON = ("problem_id", "sample_idx", "seed")
LEVEL = 0.95
# (e) "int8 costs about nothing": holds when the whole interval lies within this band.
INT8_MARGIN = 0.03
# A bootstrap over fewer problems than this says little about its own spread: no verdict but "not resolved".
MIN_PROBLEMS = 10


def verdict(low: float | None, high: float | None, direction: int | None, margin: float | None = None) -> str:
    """The verdict on a claim from its statistic's interval [low, high].

    direction +1 (the claim predicts > 0) or -1 (< 0): "holds" when the interval excludes 0
    on that side, "reversed" when it excludes 0 on the other side, "not resolved" when it
    contains 0. direction 0 (the claim predicts no effect, within +-margin): "holds" when
    the interval lies inside the band, "reversed" when it lies wholly outside it, "not
    resolved" otherwise. None for the interval: "no data". direction None: "" (a statistic
    reported without a claim).
    """
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "no data"
    if direction is None:
        return ""
    if direction == 0:
        if margin is None or margin <= 0:
            raise ValueError(f"margin={margin!r} is not valid for a no-effect claim; use a positive float")
        if -margin < low and high < margin:
            return "holds"
        if high <= -margin or low >= margin:
            return "reversed"
        return "not resolved"
    if direction not in (1, -1):
        raise ValueError(f"direction={direction!r} is not valid; use 1, -1, 0 or None")
    if low > 0:
        return "holds" if direction > 0 else "reversed"
    if high < 0:
        return "holds" if direction < 0 else "reversed"
    return "not resolved"


@dataclass(frozen=True)
class Statistic:
    """One number with its 95% interval, what it was computed from, and its verdict."""

    name: str  # short label, e.g. "P(shortest correct) - P(random correct)"
    definition: str  # exactly what is computed
    direction: int | None  # +1 / -1: the claim predicts > 0 / < 0; 0: no effect within +-margin; None: no claim
    estimate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_problems: int = 0
    n_samples: int = 0
    truncated_share: float | None = None  # finish_reason == "length" among the samples read
    margin: float | None = None
    unit: str = ""
    note: str = ""
    level: float = LEVEL  # the interval's coverage; above 95% where a choice among candidates is corrected for

    @property
    def verdict(self) -> str:
        found = verdict(self.ci_low, self.ci_high, self.direction, self.margin)
        if found in ("holds", "reversed") and self.n_problems < MIN_PROBLEMS:
            return "not resolved"
        return found

    @property
    def remarks(self) -> str:
        """The note, and why a verdict was withheld."""
        few = (f"only {self.n_problems} problems (fewer than {MIN_PROBLEMS}): not resolved whatever the interval"
               if 0 < self.n_problems < MIN_PROBLEMS and self.ci_low is not None and self.direction is not None
               else "")
        return "; ".join(x for x in (self.note, few) if x)


@dataclass
class Finding:
    key: str  # "a".."g"
    claim: str
    source: str  # the paper
    primary: Statistic
    parts: list[Statistic] = field(default_factory=list)  # the claim's other parts, and context
    by_task: dict[str, Statistic] = field(default_factory=dict)  # the primary statistic per task
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)  # what the figures draw
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return self.primary.verdict


CLAIMS = {
    "a": ("the shortest of n samples is right more often than a random one", "First Finish Search"),
    "b": ("correct samples are shorter than incorrect ones", "Think Deep, Think Fast"),
    "c": ("token entropy is higher in the thinking phase than in the answer phase, and correlates with length",
          "PEAR"),
    "d": ("the union over temperatures solves more problems than the best single temperature, and pooled "
          "voting beats single-temperature voting at equal budget",
          "On the Role of Temperature Sampling in Test-Time Scaling"),
    "e": ("int8 costs about nothing, 4-bit costs more, and more on harder levels", "Quantization Hurts Reasoning?"),
    "f": ("fewer active experts give lower accuracy",
          "Optimal Sparsity of Mixture-of-Experts Language Models for Reasoning Tasks"),
    "g": ("the overthinking curve: accuracy against thinking budget peaks before the largest budget",
          "Towards Thinking-Optimal Scaling; s1"),
}


# --------------------------------------------------------------------------- shared pieces


def _empty(df: pl.DataFrame | None) -> bool:
    return df is None or df.height == 0


def _rows(*frames: pl.DataFrame) -> tuple[int, int, float | None]:
    """Problems, samples and the share cut off at max_tokens, over the rows a statistic reads."""
    frames = [f for f in frames if not _empty(f)]
    if not frames:
        return 0, 0, None
    both = pl.concat([f.select("problem_id", "finish_reason") for f in frames])
    return (both["problem_id"].n_unique(), both.height,
            float((both["finish_reason"] == "length").mean()))


def _interval(replicates: np.ndarray) -> tuple[float | None, float | None]:
    finite = replicates[np.isfinite(replicates)]
    if len(finite) == 0:
        return None, None
    alpha = (1 - LEVEL) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return float(low), float(high)


def _number(value) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _mean_statistic(template: Statistic, per_cluster: pl.DataFrame, value: str, n_boot: int, seed: int,
                    *rows: pl.DataFrame) -> Statistic:
    """`template` filled with the mean of `value` and its clustered bootstrap interval (at template.level)."""
    n_problems, n_samples, truncated = _rows(*rows)
    clean = per_cluster.filter(pl.col(value).is_not_null() & pl.col(value).is_not_nan())
    if clean.height == 0:
        return _replace(template, n_problems=n_problems, n_samples=n_samples, truncated_share=truncated,
                        note=template.note or "no problem has the values this statistic needs")
    ci = metrics.bootstrap_ci(clean, value, n_boot=n_boot, level=template.level, seed=seed).row(0, named=True)
    return _replace(template, estimate=ci["estimate"], ci_low=ci["ci_low"], ci_high=ci["ci_high"],
                    n_problems=n_problems, n_samples=n_samples, truncated_share=truncated)


def _paired_statistic(template: Statistic, a: pl.DataFrame, b: pl.DataFrame, n_boot: int, seed: int) -> Statistic:
    """`template` filled with mean(b) - mean(a) of `correct`, paired on (problem, sample, seed)."""
    if _empty(a) or _empty(b):
        return template
    keys = list(PAIR_ON)
    pairs = a.select(keys).join(b.select(keys), on=keys)
    if pairs.height == 0:
        return _replace(template,
                        note="no sample of one condition has a partner (same problem, index, seed) in the other")
    r = metrics.paired_bootstrap(a, b, "correct", on=PAIR_ON, n_boot=n_boot, level=LEVEL, seed=seed).row(0, named=True)
    used_a, used_b = a.join(pairs, on=keys), b.join(pairs, on=keys)
    n_problems, n_samples, truncated = _rows(used_a, used_b)
    return _replace(template, estimate=r["delta"], ci_low=r["ci_low"], ci_high=r["ci_high"],
                    n_problems=n_problems, n_samples=n_samples, truncated_share=truncated)


def _replicate_statistic(template: Statistic, per_cluster: np.ndarray, function: Callable[[np.ndarray], np.ndarray],
                         n_boot: int, seed: int, *rows: pl.DataFrame) -> Statistic:
    """`template` filled with function(column means) on the data and on each bootstrap replicate."""
    n_problems, n_samples, truncated = _rows(*rows)
    filled = _replace(template, n_problems=n_problems, n_samples=n_samples, truncated_share=truncated)
    if len(per_cluster) == 0:
        return filled
    estimate = _number(function(per_cluster.mean(axis=0, keepdims=True))[0])
    replicates = function(metrics.bootstrap_replicates(per_cluster, n_boot=n_boot, seed=seed))
    low, high = _interval(replicates)
    if estimate is None:
        low = high = None
    return _replace(filled, estimate=estimate, ci_low=low, ci_high=high)


def _against_best(template: Statistic, reference: np.ndarray, candidates: np.ndarray, labels: list[str], sign: int,
                  n_boot: int, seed: int, *rows: pl.DataFrame) -> Statistic:
    """`template` filled with sign * (reference - best candidate), paired per problem.

    reference (P,) and candidates (P, m) are per-problem values; the best candidate is the
    one with the highest mean (the first on ties), chosen once on the data. Because it is
    picked from the same data, the interval is Bonferroni-widened over the m candidates
    (level 1 - 0.05 / m): the chance that any candidate's interval misleads stays at 5%.
    """
    m = candidates.shape[1]
    best = int(np.argmax(candidates.mean(axis=0))) if len(candidates) else 0
    per_problem = pl.DataFrame({"problem_id": np.arange(len(reference)).astype(str),
                                "diff": sign * (reference - candidates[:, best]) if len(reference) else []})
    adjusted = _replace(template, level=1 - (1 - LEVEL) / m)
    stat = _mean_statistic(adjusted, per_problem, "diff", n_boot, seed, *rows)
    extra = f"best: {labels[best]}" + (f"; interval at {adjusted.level:.2%}, Bonferroni over {m} candidates"
                                       if m > 1 else "")
    return _replace(stat, note="; ".join(x for x in (stat.note, extra) if x))


def _by_task(frames: list[pl.DataFrame | None], compute: Callable[..., Statistic]) -> dict[str, Statistic]:
    """The statistic recomputed on each task's problems alone (only with more than one task)."""
    present = [f for f in frames if not _empty(f)]
    if not present:
        return {}
    tasks = sorted(set().union(*(f["task"].unique().to_list() for f in present)))
    if len(tasks) < 2:
        return {}
    return {t: compute(*[None if _empty(f) else f.filter(pl.col("task") == t) for f in frames]) for t in tasks}


def no_data(key: str, missing: list[str]) -> Finding:
    """A finding whose runs are not (all) in the store."""
    claim, source = CLAIMS[key]
    stat = Statistic(name="-", definition="", direction=None, note="runs missing: " + "; ".join(missing))
    return Finding(key, claim, source, stat, notes=[f"missing run: {m}" for m in missing])


def _common_samples(frames: list[pl.DataFrame]) -> list[pl.DataFrame]:
    """Each frame cut to the (problem, sample index, seed) triples every frame holds."""
    keys = list(PAIR_ON)
    common = frames[0].select(keys)
    for f in frames[1:]:
        common = common.join(f.select(keys), on=keys)
    return [f.join(common, on=keys) for f in frames]


# --------------------------------------------------------------------------- (a) shortest of n


def _stat_a(base: pl.DataFrame | None, n_boot: int, seed: int) -> Statistic:
    template = Statistic(
        name="P(shortest correct) - P(random correct)",
        definition=("per problem, the accuracy of the shortest of its n samples (n_tokens; ties averaged) minus "
                    "its mean accuracy (a random sample), averaged over problems; paired per problem"),
        direction=1,
    )
    if _empty(base):
        return template
    per = overthinking.selection_per_problem(base, length="n_tokens", by=[])
    per = per.with_columns(diff=pl.col("shortest") - pl.col("random"))
    return _mean_statistic(template, per, "diff", n_boot, seed, base)


def finding_a(base: pl.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> Finding:
    """(a) First Finish Search: is the shortest of n samples right more often than a random one?

    `base`: one condition with n >= 2 samples per problem (several tasks may be stacked).
    """
    primary = _stat_a(base, n_boot, seed)
    longest = _mean_statistic(
        Statistic(name="P(longest correct) - P(random correct)",
                  definition="as the primary statistic, for the longest sample (context: the other end)",
                  direction=None),
        overthinking.selection_per_problem(base, length="n_tokens", by=[]).with_columns(
            diff=pl.col("longest") - pl.col("random")),
        "diff", n_boot, seed, base,
    )
    return Finding(
        "a", *CLAIMS["a"], primary, parts=[longest],
        by_task=_by_task([base], lambda b: _stat_a(b, n_boot, seed)),
        tables={"selection": overthinking.selection_accuracy(base, length="n_tokens", by=[], n_boot=n_boot, seed=seed)},
    )


# --------------------------------------------------------------------------- (b) length of correct vs incorrect


def _length_gap(base: pl.DataFrame) -> pl.DataFrame:
    correct = pl.col("correct").fill_null(False)
    return (
        base.group_by("problem_id")
        .agg(length_incorrect=pl.col("n_tokens").filter(~correct).mean(),
             length_correct=pl.col("n_tokens").filter(correct).mean())
        .drop_nulls()
        .with_columns(diff=pl.col("length_incorrect") - pl.col("length_correct"))
    )


def _stat_b(base: pl.DataFrame | None, n_boot: int, seed: int, *, drop_truncated: bool = False) -> Statistic:
    template = Statistic(
        name="length(incorrect) - length(correct)" + (", truncated samples left out" if drop_truncated else ""),
        definition=("per problem that has both correct and incorrect samples, the mean n_tokens of its incorrect "
                    "samples minus that of its correct ones, averaged over those problems"
                    + ("; samples cut off at max_tokens are left out first" if drop_truncated else "")),
        direction=1,
        unit="tokens",
    )
    if _empty(base):
        return template
    rows = base.filter(pl.col("finish_reason") != "length") if drop_truncated else base
    gap = _length_gap(rows)
    used = rows.join(gap.select("problem_id"), on="problem_id")
    return _mean_statistic(template, gap, "diff", n_boot, seed, used)


def finding_b(base: pl.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> Finding:
    """(b) Think Deep, Think Fast: are correct samples shorter than incorrect ones (within a problem)?"""
    primary = _stat_b(base, n_boot, seed)
    parts = [_stat_b(base, n_boot, seed, drop_truncated=True)]
    return Finding(
        "b", *CLAIMS["b"], primary, parts=parts,
        by_task=_by_task([base], lambda b: _stat_b(b, n_boot, seed)),
        tables={"lengths": base.select("task", "problem_id", "n_tokens", "correct", "finish_reason")},
    )


# --------------------------------------------------------------------------- (c) entropy by phase


def _stat_c(stats: pl.DataFrame | None, n_boot: int, seed: int) -> Statistic:
    template = Statistic(
        name="entropy(thinking) - entropy(answer)",
        definition=("per sample with tokens in both phases, its mean token entropy in the thinking phase minus that "
                    "in the answer phase (forced tokens left out), averaged over samples; problems resampled"),
        direction=1,
        unit="nats",
    )
    if _empty(stats):
        return template
    rows = stats.filter(pl.col("mean_entropy_thinking").is_not_null() & pl.col("mean_entropy_answer").is_not_null())
    per_sample = rows.select("problem_id", diff=pl.col("mean_entropy_thinking") - pl.col("mean_entropy_answer"))
    return _mean_statistic(template, per_sample, "diff", n_boot, seed, rows)


def _pearson(means: np.ndarray) -> np.ndarray:
    """Pearson correlation from the means of x, y, x^2, y^2, xy (columns 0-4)."""
    x, y, xx, yy, xy = (means[:, i] for i in range(5))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (xy - x * y) / np.sqrt((xx - x * x) * (yy - y * y))


def _stat_c_correlation(stats: pl.DataFrame, n_boot: int, seed: int) -> Statistic:
    template = Statistic(
        name="Spearman corr(mean entropy, length)",
        definition=("rank correlation, over samples, of a sample's mean token entropy with its n_tokens; the ranks are "
                    "taken once (average ranks for ties) and each replicate recomputes the correlation of the "
                    "resampled problems' samples"),
        direction=1,
    )
    rows = stats.filter(pl.col("mean_entropy").is_not_null() & pl.col("mean_entropy").is_not_nan())
    if rows.height == 0:
        return template
    ranked = rows.select(
        "problem_id",
        x=pl.col("mean_entropy").rank("average").cast(pl.Float64),
        y=pl.col("n_tokens").rank("average").cast(pl.Float64),
    )
    per_problem = ranked.group_by("problem_id").agg(
        pl.col("x").sum(), pl.col("y").sum(), xx=(pl.col("x") ** 2).sum(), yy=(pl.col("y") ** 2).sum(),
        xy=(pl.col("x") * pl.col("y")).sum(), count=pl.len(),
    ).sort("problem_id")  # group_by's order varies from call to call, and the replicates index these rows
    sums = per_problem.select("x", "y", "xx", "yy", "xy", "count").to_numpy().astype(np.float64)

    def correlation(means: np.ndarray) -> np.ndarray:
        return _pearson(means[:, :5] / means[:, 5:6])

    return _replicate_statistic(template, sums, correlation, n_boot, seed, rows)


def finding_c(base: pl.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> Finding:
    """(c) PEAR: is token entropy higher while thinking than while answering, and does it grow with length?

    For models without think tags the thinking phase is the chain of thought before the
    first final-answer marker (`thinklab.tracing`); samples without one have no answer
    phase and are left out of the phase comparison.
    """
    stats = overthinking.ensure_trace_stats(base)
    return Finding(
        "c", *CLAIMS["c"], _stat_c(stats, n_boot, seed), parts=[_stat_c_correlation(stats, n_boot, seed)],
        by_task=_by_task([stats], lambda s: _stat_c(s, n_boot, seed)),
        tables={"phase_entropy": overthinking.phase_entropy(stats, by=[]),
                "entropy_length": stats.select("task", "problem_id", "mean_entropy", "n_tokens", "correct")},
    )


# --------------------------------------------------------------------------- (d) temperatures


def _temperature_matrix(temps: pl.DataFrame) -> tuple[np.ndarray, list[float], int, pl.DataFrame]:
    """Per problem present at every temperature: pass@k, maj@k and solved at each temperature,
    then pass@k and maj@k of the pool, at k = the samples per problem and temperature.

    Returns (matrix (problems, 3 T + 2), temperatures, k, the rows used).
    """
    values = sorted(temps["temperature"].unique().to_list())
    per_cell = temps.group_by("problem_id", "temperature").len()
    complete = per_cell.group_by("problem_id").agg(n_t=pl.len(), k=pl.col("len").min()).filter(
        pl.col("n_t") == len(values))
    rows = temps.join(complete.select("problem_id"), on="problem_id")
    if rows.height == 0:
        return np.zeros((0, 3 * len(values) + 2)), values, 0, rows
    k = int(complete["k"].min())
    single_pass = metrics.pass_at_k_table(rows, [k], ["temperature"])
    single_maj = metrics.maj_at_k_table(rows, [k], ["temperature"])
    solved = metrics.solve_matrix(rows, "temperature")
    pool_pass = metrics.pass_at_k_table(rows, [k]).select("problem_id", pool_pass="pass_at_k")
    pool_maj = metrics.maj_at_k_table(rows, [k]).select("problem_id", pool_maj="maj_at_k")

    def wide(frame: pl.DataFrame, value: str, prefix: str) -> pl.DataFrame:
        return frame.with_columns(pl.col("temperature").rank("dense").cast(pl.Int64).alias("t")).pivot(
            on="t", index="problem_id", values=value).rename(lambda c: c if c == "problem_id" else f"{prefix}{c}")

    cols = [f"{p}{i + 1}" for p in ("pass", "maj", "solved") for i in range(len(values))]
    matrix = (
        wide(single_pass, "pass_at_k", "pass")
        .join(wide(single_maj, "maj_at_k", "maj"), on="problem_id")
        .join(wide(solved.with_columns(pl.col("solved").cast(pl.Float64)), "solved", "solved"), on="problem_id")
        .join(pool_pass, on="problem_id")
        .join(pool_maj, on="problem_id")
        .sort("problem_id")
        .select(*cols, "pool_pass", "pool_maj")
    )
    return matrix.to_numpy().astype(np.float64), values, k, rows


def _stat_d(temps: pl.DataFrame | None, n_boot: int, seed: int, part: str = "coverage") -> Statistic:
    templates = {
        "coverage": Statistic(
            name="pooled pass@k - best single-temperature pass@k",
            definition=("coverage at equal budget: per problem, pass@k (unbiased) of k samples drawn from all "
                        "temperatures' samples pooled, minus pass@k at the single temperature with the highest mean "
                        "pass@k; k = samples per problem and temperature; paired per problem"),
            direction=1),
        "voting": Statistic(
            name="pooled maj@k - best single-temperature maj@k",
            definition=("voting at equal budget: per problem, the expected majority vote (ties broken uniformly) over "
                        "k samples drawn from the pool of all temperatures, minus maj@k at the temperature with the "
                        "highest mean maj@k; same k; paired per problem"),
            direction=1),
        "union": Statistic(
            name="union coverage - best single-temperature coverage",
            definition=("share of problems solved by some sample at some temperature minus the share solved at the "
                        "best single temperature, all samples used; context only: the union holds T times the "
                        "samples, so this cannot be negative"),
            direction=None),
    }
    template = templates[part]
    if _empty(temps) or temps["temperature"].n_unique() < 2:
        return template
    matrix, values, k, rows = _temperature_matrix(temps)
    m = len(values)
    first = {"coverage": 0, "voting": m, "union": 2 * m}[part]
    candidates = matrix[:, first : first + m]
    if part == "union":
        reference = candidates.max(axis=1)  # solved at some temperature
    else:
        reference = matrix[:, 3 * m + (part == "voting")]
    labels = [f"T={t:g}" for t in values]
    stat = _against_best(template, reference, candidates, labels, 1, n_boot, seed, rows)
    return _replace(stat, note=f"k = {k}; " + stat.note)


def finding_d(temps: pl.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> Finding:
    """(d) Temperature sampling: does a pool over temperatures beat the best single temperature?

    `temps`: one run per temperature over the same problems and seeds, with the same n
    (stacked; the `temperature` column tells them apart).
    """
    primary = _stat_d(temps, n_boot, seed, "coverage")
    parts = [_stat_d(temps, n_boot, seed, "voting"), _stat_d(temps, n_boot, seed, "union")]
    tables = {}
    if not _empty(temps) and temps["temperature"].n_unique() >= 2:
        k = int(temps.group_by("problem_id", "temperature").len()["len"].min())
        tables["pooled_voting"] = metrics.pooled_voting(temps, [k], "temperature")
    return Finding("d", *CLAIMS["d"], primary, parts=parts,
                   by_task=_by_task([temps], lambda t: _stat_d(t, n_boot, seed)), tables=tables)


# --------------------------------------------------------------------------- (e) quantization


def _level_gap(base: pl.DataFrame, quant: pl.DataFrame, n_boot: int, seed: int) -> Statistic:
    template = Statistic(
        name="delta(4-bit) at the hardest level - at the easiest",
        definition=("the paired accuracy delta 4-bit - baseline among problems of the highest difficulty level "
                    "present minus the same among problems of the lowest; problems resampled"),
        direction=-1,
    )
    keys = list(PAIR_ON)
    pairs = (
        base.select(*keys, "level", correct_base=pl.col("correct").cast(pl.Float64))
        .join(quant.select(*keys, correct_quant=pl.col("correct").cast(pl.Float64)), on=keys)
        .filter(pl.col("level").is_not_null())
    )
    levels = sorted(pairs["level"].unique().to_list())
    if len(levels) < 2:
        return _replace(template, note="the tasks carry fewer than two difficulty levels")
    hard, easy = levels[-1], levels[0]
    d = pl.col("correct_quant") - pl.col("correct_base")
    per_problem = pairs.group_by("problem_id").agg(
        sum_hard=d.filter(pl.col("level") == hard).sum(), n_hard=(pl.col("level") == hard).sum(),
        sum_easy=d.filter(pl.col("level") == easy).sum(), n_easy=(pl.col("level") == easy).sum(),
    ).sort("problem_id")  # a fixed row order: the replicates index these rows
    matrix = per_problem.select("sum_hard", "n_hard", "sum_easy", "n_easy").to_numpy().astype(np.float64)

    def gap(means: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return means[:, 0] / means[:, 1] - means[:, 2] / means[:, 3]

    used = pairs.filter(pl.col("level").is_in([hard, easy])).select("problem_id")
    rows = [f.join(used.unique(), on="problem_id").join(pairs.select(keys), on=keys) for f in (base, quant)]
    stat = _replicate_statistic(template, matrix, gap, n_boot, seed, *rows)
    return _replace(stat, note=f"level {hard} vs level {easy}")


def _stat_e(base, quant4, n_boot: int, seed: int) -> Statistic:
    template = Statistic(
        name="accuracy(4-bit) - accuracy(baseline)",
        definition=("mean correct of the 4-bit run minus the baseline's, over samples paired on (problem, sample "
                    "index, seed), the same random stream in both; problems resampled jointly"),
        direction=-1,
    )
    return _paired_statistic(template, base, quant4, n_boot, seed)


def finding_e(base: pl.DataFrame, int8: pl.DataFrame | None, four_bit: pl.DataFrame | None, *,
              n_boot: int = 2000, seed: int = 0, margin: float = INT8_MARGIN) -> Finding:
    """(e) Quantization Hurts Reasoning?: what int8 and 4-bit weights cost, paired per sample.

    `base` is the unquantized run; `int8` and `four_bit` the same spec with only the
    quantization changed (either may be None when missing).
    """
    primary = _stat_e(base, four_bit, n_boot, seed)
    int8_stat = _paired_statistic(
        Statistic(name="accuracy(int8) - accuracy(baseline)",
                  definition=(f"as the primary statistic, for int8; the claim is no effect: holds when the whole "
                              f"interval lies within +-{margin:g}, reversed when it lies wholly outside"),
                  direction=0, margin=margin),
        base, int8, n_boot, seed)
    more = _paired_statistic(
        Statistic(name="accuracy(4-bit) - accuracy(int8)",
                  definition="paired on (problem, sample index, seed) between the two quantized runs",
                  direction=-1),
        int8, four_bit, n_boot, seed)
    level = (_level_gap(base, four_bit, n_boot, seed) if not (_empty(base) or _empty(four_bit)) else
             Statistic(name="delta(4-bit) at the hardest level - at the easiest", definition="", direction=-1))
    tables = {}
    present = [f for f in (base, int8, four_bit) if not _empty(f)]
    if len(present) >= 2:
        stacked = pl.concat(present, how="diagonal_relaxed")
        deltas = quant_analysis.deltas(stacked, by=[], per_level=True, n_boot=n_boot, seed=seed)
        tables["deltas_by_level"] = deltas.filter(pl.col("metric") == "accuracy").drop("metric")
    return Finding("e", *CLAIMS["e"], primary, parts=[int8_stat, more, level],
                   by_task=_by_task([base, four_bit], lambda b, q: _stat_e(b, q, n_boot, seed)), tables=tables)


# --------------------------------------------------------------------------- (f) active experts


def _stat_f(full: pl.DataFrame | None, fewest: pl.DataFrame | None, n_boot: int, seed: int, k_min=None,
            k_full=None) -> Statistic:
    template = Statistic(
        name="accuracy(fewest experts) - accuracy(all experts)",
        definition=("mean correct at the smallest top-k minus at the largest (all experts), over samples paired on "
                    "(problem, sample index, seed); problems resampled jointly"),
        direction=-1,
        note="" if k_min is None else f"top-k {k_min} vs {k_full}",
    )
    return _paired_statistic(template, full, fewest, n_boot, seed)


def finding_f(by_k: dict[int, pl.DataFrame], *, n_boot: int = 2000, seed: int = 0) -> Finding:
    """(f) MoE sparsity: does routing each token to fewer experts lower accuracy?

    `by_k`: the run at each top-k (the same spec otherwise). The largest k is the reference.
    """
    ks = sorted(k for k, f in by_k.items() if not _empty(f))
    if len(ks) < 2:
        return Finding("f", *CLAIMS["f"], _stat_f(None, None, n_boot, seed))
    full, fewest = by_k[ks[-1]], by_k[ks[0]]
    primary = _stat_f(full, fewest, n_boot, seed, ks[0], ks[-1])
    stacked = pl.concat([by_k[k] for k in ks], how="diagonal_relaxed")
    curve = moe_analysis.metrics_vs_k(stacked.with_columns(pl.col("moe_top_k").cast(pl.Int64)), n_boot=n_boot,
                                      seed=seed)
    return Finding("f", *CLAIMS["f"], primary,
                   by_task=_by_task([full, fewest], lambda a, b: _stat_f(a, b, n_boot, seed, ks[0], ks[-1])),
                   tables={"accuracy_vs_k": curve.filter(pl.col("variable") == "correct")})


# --------------------------------------------------------------------------- (g) thinking budget


def _budget_order(budgets) -> list:
    """Budgets ascending, uncapped (None) last: it is the largest."""
    return sorted(budgets, key=lambda b: (b is None, b or 0))


def _budget_matrix(by_budget: dict) -> tuple[np.ndarray, list, list[pl.DataFrame]]:
    """Per problem, accuracy at each budget over the samples every budget holds: (problems, B)."""
    order = _budget_order([b for b, f in by_budget.items() if not _empty(f)])
    if len(order) < 2:
        return np.zeros((0, len(order))), order, []
    frames = _common_samples([by_budget[b] for b in order])
    accuracy = [f.group_by("problem_id").agg(pl.col("correct").fill_null(False).mean().alias(f"b{i}"))
                for i, f in enumerate(frames)]
    joined = accuracy[0]
    for a in accuracy[1:]:
        joined = joined.join(a, on="problem_id")
    return joined.sort("problem_id").drop("problem_id").to_numpy().astype(np.float64), order, frames


def _budget_label(budget) -> str:
    return "uncapped" if budget is None else str(budget)


def _stat_g(by_budget: dict, n_boot: int, seed: int) -> Statistic:
    template = Statistic(
        name="best accuracy below the largest budget - accuracy at the largest",
        definition=("per problem, accuracy at each thinking budget over the samples every budget holds (same problem, "
                    "index, seed); the statistic is the accuracy at the best budget below the largest (uncapped "
                    "counts as largest; the best has the highest mean accuracy, the smaller on ties) minus the "
                    "accuracy at the largest, paired per problem"),
        direction=1,
    )
    matrix, order, frames = _budget_matrix(by_budget)
    if len(order) < 2:
        return template
    labels = [_budget_label(b) for b in order]
    stat = _against_best(template, matrix[:, -1], matrix[:, :-1], labels[:-1], -1, n_boot, seed, *frames)
    if len(matrix) == 0:
        return stat
    # where the whole curve peaks, and how firmly: the peak of each bootstrap replicate
    replicates = metrics.bootstrap_replicates(matrix, n_boot=n_boot, seed=seed)
    peak = labels[int(np.argmax(matrix.mean(axis=0)))]  # np.argmax takes the first: ties go to the smaller budget
    argmax = np.argmax(replicates, axis=1)
    low_i, high_i = (int(np.quantile(argmax, q, method="inverted_cdf")) for q in ((1 - LEVEL) / 2, (1 + LEVEL) / 2))
    shares = ", ".join(f"{label}: {np.mean(argmax == i):.0%}" for i, label in enumerate(labels))
    return _replace(stat, note=(f"{stat.note}; accuracy peaks at budget {peak}, 95% interval of the peak over "
                                f"replicates [{labels[low_i]}, {labels[high_i]}] (replicates peaking at each budget: "
                                f"{shares})"))


def finding_g(by_budget: dict, *, n_boot: int = 2000, seed: int = 0) -> Finding:
    """(g) Overthinking: where does accuracy peak as the thinking budget grows?

    `by_budget`: the run at each thinking budget (None = uncapped), the same spec
    otherwise; runs with more samples are cut to the samples all budgets share.
    """
    primary = _stat_g(by_budget, n_boot, seed)
    tables = {}
    _, order, frames = _budget_matrix(by_budget)
    if frames:
        stacked = pl.concat(frames, how="diagonal_relaxed")
        tables["accuracy_vs_budget"] = overthinking.accuracy_vs_budget(stacked, by=[], n_boot=n_boot, seed=seed)

    def per_task(*frames_t):
        return _stat_g(dict(zip(order, frames_t)), n_boot, seed)

    by_task = _by_task(frames, per_task) if frames else {}
    return Finding("g", *CLAIMS["g"], primary, by_task=by_task, tables=tables)
