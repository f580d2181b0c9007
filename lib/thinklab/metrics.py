"""Metrics over the sample table: pass@k, majority voting, coverage, bootstrap intervals.

Everything here is a pure function of a polars sample table (one row per sample, the
columns of the sample-table contract) or of plain numpy arrays; nothing generates,
loads a model or touches files. Randomness (bootstrap, Monte Carlo) comes only from a
`np.random.Generator` built from the `seed` argument.

Conventions shared by the functions below:

- A *cell* is the set of samples one estimate is made from: the rows sharing the `by`
  columns and `problem_id`. Its size is `n`; `n_correct` of them are `correct`.
- pass@k is the unbiased estimator of Chen et al. (2021): the probability that a uniformly
  random size-k subset of the n samples holds at least one correct sample.
- maj@k is the expected accuracy of a majority vote over a uniformly random size-k subset.
  Votes are the distinct non-null `pred` strings; a null (unextracted) `pred` abstains.
  *Tie policy*: when several answers share the top count, the vote picks one of them
  uniformly at random, so a problem whose correct answer ties with one wrong answer
  counts 1/2. Alongside that expectation we report `maj_at_k_strict` (ties count as
  wrong) and `p_tie`, the probability that the correct answer is tied for the top, so
  that their sum over problems is the expected number of problems a tie-break decides.
  (If a grader marks two distinct pred strings of one problem correct, each is its own
  candidate and `p_tie` counts each tied correct candidate.)
- Bootstrap intervals resample *problems* with replacement (a clustered bootstrap: the
  samples of one problem are correlated), percentile method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

__all__ = [
    "CONDITION_COLUMNS",
    "condition_columns",
    "pass_at_k",
    "VoteGroups",
    "vote_groups",
    "maj_at_k_exact",
    "maj_at_k_monte_carlo",
    "maj_at_k_arrays",
    "problem_counts",
    "pass_at_k_table",
    "maj_at_k_table",
    "majority_vote",
    "pooled_voting",
    "solve_matrix",
    "coverage",
    "bootstrap_ci",
    "bootstrap_replicates",
    "paired_bootstrap",
]

_LN2 = float(np.log(2.0))
# Above this many samples per cell the exact maj@k falls back to Monte Carlo: its binomial
# weights are scaled by 2**-n, which must stay clear of float64 underflow.
EXACT_MAX_N = 1000
# The exact maj@k runs when its estimated work (array elements touched) is below this, so
# that one cell's estimate stays interactive (its time: BENCHMARKS.md); the exact value
# beats Monte Carlo at equal time well beyond that.
EXACT_MAX_WORK = 2e9


# The spec knobs a study varies; rows that differ in any of them are different conditions.
CONDITION_COLUMNS = (
    "model", "task", "backend", "quantization", "moe_top_k", "temperature", "top_p", "thinking_budget",
    "wait_extensions",
)


def condition_columns(df: pl.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    """The condition columns that take more than one value in `df`, minus `exclude`.

    The analysis functions group by these when their `by` is None, so that samples from
    different conditions are never pooled silently.
    """
    present = [c for c in CONDITION_COLUMNS if c in df.columns and c not in exclude]
    if not present or df.height == 0:
        return []
    counts = df.select(pl.col(c).n_unique() for c in present).row(0)
    return [c for c, count in zip(present, counts) if count > 1]


# --------------------------------------------------------------------------- pass@k


def pass_at_k(n_samples, n_correct, k) -> np.ndarray:
    """Unbiased pass@k, vectorised over problems (Chen et al. 2021).

    pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{j<k} (n-c-j) / (n-j), evaluated as that
    running product of factors in [0, 1]: no binomial coefficient is ever formed, so it
    is stable for n in the thousands. `k` may be an int (returns shape (P,)) or a
    sequence (returns (P, len(k))). Entries with k > n are NaN.
    """
    n = np.atleast_1d(np.asarray(n_samples, dtype=np.int64))
    c = np.atleast_1d(np.asarray(n_correct, dtype=np.int64))
    ks = np.atleast_1d(np.asarray(k, dtype=np.int64))
    if n.shape != c.shape:
        raise ValueError(f"n_samples and n_correct must have the same shape, got {n.shape} and {c.shape}")
    if (ks < 1).any():
        raise ValueError(f"k must be >= 1, got {ks.min()}")
    if ((c < 0) | (c > n)).any():
        raise ValueError("n_correct must lie in [0, n_samples]")
    kmax = int(ks.max())
    out = np.empty((n.size, ks.size))
    block = max(1, 4_000_000 // kmax)  # bound the (problems, kmax) working array
    j = np.arange(kmax)
    for lo in range(0, n.size, block):
        nb, cb = n[lo : lo + block, None].astype(np.float64), c[lo : lo + block, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.clip((nb - cb - j) / (nb - j), 0.0, 1.0)  # (P, kmax)
        q = np.cumprod(factor, axis=1)  # q[:, k-1] = P(no correct sample among k)
        out[lo : lo + block] = 1.0 - q[:, ks - 1]
    out[ks[None, :] > n[:, None]] = np.nan
    return out[:, 0] if np.ndim(k) == 0 else out


# --------------------------------------------------------------------------- voting


@dataclass(frozen=True)
class VoteGroups:
    """The votes of each cell as padded arrays.

    sizes:   (cells, G) int, votes per distinct answer, largest first, 0-padded.
    correct: (cells, G) bool, whether that answer is graded correct.
    n:       (cells,) int, samples in the cell, abstentions (null pred) included.
    keys:    polars frame with one row per cell (the `by` columns and problem_id).
    """

    sizes: np.ndarray
    correct: np.ndarray
    n: np.ndarray
    keys: pl.DataFrame


def vote_groups(df: pl.DataFrame, by: Sequence[str] = ()) -> VoteGroups:
    """Group each cell's samples by `pred` (null and empty strings abstain)."""
    cell = [*by, "problem_id"]
    votes = df.select(
        *cell,
        pl.when(pl.col("pred").str.len_bytes() > 0).then(pl.col("pred")).alias("pred"),
        pl.col("correct").fill_null(False),
    )
    keys = votes.group_by(cell, maintain_order=True).agg(n=pl.len())
    keys = keys.with_columns(cell_idx=pl.int_range(pl.len(), dtype=pl.Int64))
    groups = (
        votes.drop_nulls("pred")
        .group_by([*cell, "pred"])
        .agg(size=pl.len(), correct=pl.col("correct").any())
        .join(keys.select(*cell, "cell_idx"), on=cell, nulls_equal=True)
        .sort(["cell_idx", "size", "correct"], descending=[False, True, True])
        .with_columns(slot=pl.int_range(pl.len(), dtype=pl.Int64).over("cell_idx"))
    )
    n_cells = keys.height
    width = int(groups["slot"].max() + 1) if groups.height else 1
    sizes = np.zeros((n_cells, width), dtype=np.int64)
    correct = np.zeros((n_cells, width), dtype=bool)
    rows, slots = groups["cell_idx"].to_numpy(), groups["slot"].to_numpy()
    sizes[rows, slots] = groups["size"].to_numpy()
    correct[rows, slots] = groups["correct"].to_numpy()
    return VoteGroups(sizes, correct, keys["n"].to_numpy().astype(np.int64), keys.select(cell))


def _log_factorials(n_max: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n_max + 1, dtype=np.float64)))])


def _half_binomial(lf: np.ndarray, m: np.ndarray, x: np.ndarray) -> np.ndarray:
    """C(m, x) / 2**m, zero outside 0 <= x <= m (broadcasting)."""
    m, x = np.broadcast_arrays(np.asarray(m), np.asarray(x))
    ok = (x >= 0) & (x <= m)
    ms, xs = np.where(ok, m, 0), np.where(ok, x, 0)
    return np.where(ok, np.exp(lf[ms] - lf[xs] - lf[ms - xs] - ms * _LN2), 0.0)


def _exact_plan(sizes: np.ndarray, correct: np.ndarray, n: np.ndarray, ks: np.ndarray):
    """Rows (cell, correct answer g), the other answers' sizes, and the estimated work."""
    cell, slot = np.nonzero(correct & (sizes > 0))
    m_g = sizes[cell, slot]
    others = sizes[cell].copy()
    others[np.arange(len(cell)), slot] = 0
    others = -np.sort(-others, axis=1)  # largest first
    kmax = int(min(ks.max(), n.max())) if len(n) else 0
    work = 0.0
    for t in range(1, min(kmax, int(m_g.max()) if len(m_g) else 0) + 1):
        live = m_g >= t
        n_big = int((others[live] >= t).sum(1).max()) if live.any() else 0
        length = kmax - t + 1
        work += live.sum() * (n_big // 2 + 3) * length * (1 + n_big * min(t, length))
    return cell, m_g, others, kmax, work


def maj_at_k_exact(sizes, correct, n, ks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact maj@k over all size-k subsets, vectorised over cells.

    Arguments as in `VoteGroups` (sizes, correct: (cells, G); n: (cells,)) and a sequence
    of k. Returns three (cells, len(ks)) arrays: the expected accuracy under a uniform
    tie-break, the accuracy with ties counted wrong, and the probability that the correct
    answer ties for the top. NaN where k > n.

    How: a size-k subset draws x_i votes for answer i with probability
    prod_i C(m_i, x_i) / C(n, k). The correct answer g wins with x_g = t when every other
    answer has x_i <= t, and then shares the win with the r others that also have t,
    scoring 1/(r+1) = integral_0^1 w^r dw. For each t the polynomial
    prod_i (sum_{x<t} C(m_i,x) z^x + w C(m_i,t) z^t) over answers with m_i >= t is built
    once for all k (evaluated at Gauss-Legendre nodes in w, which integrate it exactly,
    and at w=0 and w=1); answers with m_i < t and abstentions cannot reach t and pool
    into one binomial factor C(n_free, .) by Vandermonde's identity. Binomials are
    scaled by 2**-m, so nothing overflows for n <= EXACT_MAX_N.
    """
    sizes, correct = np.asarray(sizes, dtype=np.int64), np.asarray(correct, dtype=bool)
    n, ks = np.asarray(n, dtype=np.int64), np.atleast_1d(np.asarray(ks, dtype=np.int64))
    if len(n) and n.max() > EXACT_MAX_N:
        raise ValueError(f"exact maj@k supports n <= {EXACT_MAX_N}; use maj_at_k_monte_carlo")
    cell, m_g, others, kmax, _ = _exact_plan(sizes, correct, n, ks)
    n_max = int(n.max()) if len(n) else 1
    # half[m, x] = C(m, x) / 2**m for every m <= n_max, x <= kmax (0 where x > m)
    lf = _log_factorials(n_max)
    half = _half_binomial(lf, np.arange(n_max + 1)[:, None], np.arange(min(int(ks.max()), n_max) + 1)[None, :])
    acc = np.zeros((len(cell), len(ks), 3))  # (rows, k, [integral, w=0, w=1])
    n_row = n[cell]
    for t in range(1, min(kmax, int(m_g.max()) if len(m_g) else 0) + 1):
        live = np.nonzero(m_g >= t)[0]
        # order rows by how many other answers can reach t, so the rows that still have a
        # j-th such answer are always a prefix (a view, not a copy)
        n_big_row = (others[live] >= t).sum(1)
        order = np.argsort(-n_big_row, kind="stable")
        live, n_big_row = live[order], n_big_row[order]
        oth, nr = others[live], n_row[live]
        n_big = int(n_big_row[0])
        length = kmax - t + 1
        nodes, weights = np.polynomial.legendre.leggauss(n_big // 2 + 1)
        w = np.concatenate([(nodes + 1) / 2, [0.0, 1.0]])  # (W,)
        w_int = np.concatenate([weights / 2, [0.0, 0.0]])
        poly = np.zeros((len(live), len(w), length))  # (rows, W, degree)
        poly[:, :, 0] = 1.0
        x = np.arange(min(t, length))
        for j in range(n_big):
            c = int((n_big_row > j).sum())
            m = oth[:c, j]  # >= t
            below = half[m[:, None], x[None, :]]  # (c, x): the answer stays below t
            top = half[m, t]  # (c,): it ties at t
            head_rows = poly[:c]
            new = head_rows * below[:, None, 0:1]
            for s in range(1, len(x)):
                new[:, :, s:] += below[:, None, s : s + 1] * head_rows[:, :, : length - s]
            if t < length:
                new[:, :, t:] += (top[:, None] * w[None, :])[:, :, None] * head_rows[:, :, : length - t]
            poly[:c] = new
        big = oth >= t
        n_free = nr - m_g[live] - np.where(big, oth, 0).sum(1)
        head = half[m_g[live], t]  # (rows,)
        for ki, k in enumerate(ks):
            if k < t or k > kmax:
                continue
            s = np.arange(k - t + 1)
            free = half[n_free[:, None], (k - t - s)[None, :]]  # (rows, s)
            val = np.einsum("rws,rs->rw", poly[:, :, : k - t + 1], free) * head[:, None]
            acc[live, ki, 0] += val @ w_int
            acc[live, ki, 1] += val[:, -2]
            acc[live, ki, 2] += val[:, -1]
    # normalise by C(n, k) / 2**n and sum the rows of each cell
    denom = half[n_row[:, None], np.minimum(ks, half.shape[1] - 1)[None, :]]  # k > n is masked below
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = acc / denom[:, :, None]
    out = np.zeros((len(n), len(ks), 3))
    np.add.at(out, cell, np.nan_to_num(acc))
    out[ks[None, :] > n[:, None]] = np.nan
    expected, strict, lenient = out[..., 0], out[..., 1], out[..., 2]
    return np.clip(expected, 0, 1), np.clip(strict, 0, 1), np.clip(lenient - strict, 0, None)


def maj_at_k_monte_carlo(sizes, correct, n, ks, *, n_draws: int = 512, rng: np.random.Generator | None = None):
    """Monte Carlo maj@k: the same three (cells, len(ks)) arrays as `maj_at_k_exact`.

    Each draw is a uniformly random permutation of a cell's samples; its first k entries
    are a uniform size-k subset for every k at once, so one permutation serves the whole
    k grid. Within a draw the three quantities are exact (tie-break as an expectation), so
    the estimate is unbiased with standard error <= 0.5 / sqrt(n_draws) per cell.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    sizes, correct = np.asarray(sizes, dtype=np.int64), np.asarray(correct, dtype=bool)
    n, ks = np.asarray(n, dtype=np.int64), np.atleast_1d(np.asarray(ks, dtype=np.int64))
    out = np.full((len(n), len(ks), 3), np.nan)
    for n_cell in np.unique(n):
        cells = np.nonzero(n == n_cell)[0]
        k_idx = np.nonzero(ks <= n_cell)[0]
        if len(k_idx) == 0:
            continue
        # each cell as a sequence of answer codes (slot numbers), abstentions last as -1
        cell_sizes = sizes[cells]  # (cells, G)
        codes = np.full((len(cells), n_cell), -1, dtype=np.int64)
        filled = np.arange(n_cell)[None, :] < cell_sizes.sum(1)[:, None]
        codes[filled] = np.repeat(np.tile(np.arange(sizes.shape[1]), len(cells)), cell_sizes.ravel())
        corr_cells = correct[cells]
        k_run = int(ks[k_idx].max())  # only the first k_run entries of each permutation matter
        batch = max(1, 2_000_000 // (len(cells) * n_cell))  # draws per pass, bounding memory
        total = np.zeros((len(cells), len(k_idx), 3))
        done = 0
        while done < n_draws:
            b = min(batch, n_draws - done)
            seq_rows = np.repeat(np.arange(len(cells)), b)
            keys = rng.random((len(seq_rows), n_cell))
            if k_run < n_cell:
                first = np.argpartition(keys, k_run - 1, axis=1)[:, :k_run]
                perm = np.take_along_axis(first, np.argsort(np.take_along_axis(keys, first, axis=1), axis=1), axis=1)
            else:
                perm = np.argsort(keys, axis=1)
            seq = np.take_along_axis(codes[seq_rows], perm, axis=1)  # (cells * b, k_run) codes in draw order
            stats = _prefix_vote_stats(seq, corr_cells[seq_rows], ks[k_idx])  # (cells * b, len(k_idx), 3)
            total += stats.reshape(len(cells), b, len(k_idx), 3).sum(1)
            done += b
        out[np.ix_(cells, k_idx)] = total / n_draws
    return out[..., 0], out[..., 1], out[..., 2]


def _prefix_vote_stats(seq: np.ndarray, corr: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """For each row (a sequence of answer codes, -1 = abstain) and each prefix length k:
    [expected accuracy under a uniform tie-break, strict accuracy, correct-tied-at-top]."""
    rows, n = seq.shape
    pos = np.arange(n)
    # occurrence index: how many times this position's answer has appeared so far
    order = np.argsort(seq, axis=1, kind="stable")
    sorted_codes = np.take_along_axis(seq, order, axis=1)
    new_run = np.ones_like(sorted_codes, dtype=bool)
    new_run[:, 1:] = sorted_codes[:, 1:] != sorted_codes[:, :-1]
    run_start = np.maximum.accumulate(np.where(new_run, pos, 0), axis=1)
    occ = np.empty_like(seq)
    np.put_along_axis(occ, order, pos - run_start + 1, axis=1)
    occ[seq < 0] = 0
    top = np.maximum.accumulate(occ, axis=1)  # the leading count after each prefix
    prev_top = np.concatenate([np.zeros((rows, 1), dtype=top.dtype), top[:, :-1]], axis=1)
    # position where the leading count was first reached: answers at the top reached it there or later
    first = np.maximum.accumulate(np.where(occ > prev_top, pos, -1), axis=1)
    reach = (occ == top) & (occ > 0)
    is_correct = np.take_along_axis(corr, np.maximum(seq, 0), axis=1) & (seq >= 0)
    reach_cum = np.cumsum(reach, axis=1)
    reach_correct_cum = np.cumsum(reach & is_correct, axis=1)
    i = ks - 1
    f = first[:, i]
    prior = np.maximum(f - 1, 0)
    n_top = reach_cum[:, i] - np.where(f > 0, np.take_along_axis(reach_cum, prior, axis=1), 0)
    n_top_correct = reach_correct_cum[:, i] - np.where(f > 0, np.take_along_axis(reach_correct_cum, prior, axis=1), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(n_top > 0, n_top_correct / np.maximum(n_top, 1), 0.0)
    strict = (n_top == 1) & (n_top_correct == 1)
    tied = (n_top > 1) & (n_top_correct >= 1)
    return np.stack([expected, strict, tied * n_top_correct], axis=-1).astype(np.float64)


def _full_vote(sizes: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vote over every sample of each cell (k = n): expected, strict, tie."""
    top = sizes.max(1, initial=0)
    at_top = (sizes == top[:, None]) & (sizes > 0)
    n_top, n_top_correct = at_top.sum(1), (at_top & correct).sum(1)
    expected = np.where(n_top > 0, n_top_correct / np.maximum(n_top, 1), 0.0)
    return expected, ((n_top == 1) & (n_top_correct == 1)).astype(float), (n_top > 1) * n_top_correct * 1.0


def maj_at_k_arrays(groups: VoteGroups, ks, *, method: str = "auto", n_draws: int = 512, seed: int = 0):
    """maj@k of every cell: (expected, strict, p_tie, method) with arrays of shape (cells, len(ks)).

    method: "exact", "monte_carlo", or "auto" (exact when n <= EXACT_MAX_N and its
    estimated work is below EXACT_MAX_WORK, Monte Carlo otherwise). Cells with the same
    votes are computed once, and k = n is counted directly.
    """
    ks = np.atleast_1d(np.asarray(ks, dtype=np.int64))
    if method not in ("auto", "exact", "monte_carlo"):
        raise ValueError(f"method={method!r} is not valid; choose 'auto', 'exact' or 'monte_carlo'")
    key = np.concatenate([groups.n[:, None], groups.sizes, groups.correct.astype(np.int64)], axis=1)
    if len(key) == 0:
        empty = np.zeros((0, len(ks)))
        return empty, empty, empty, "exact"
    unique, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    width = groups.sizes.shape[1]
    n, sizes, correct = unique[:, 0], unique[:, 1 : 1 + width], unique[:, 1 + width :].astype(bool)
    # the ks that leave something out somewhere; k = 1 and k = n are counted directly
    partial = np.unique(ks[(ks[None, :] < n[:, None]).any(0) & (ks > 1)])
    if method == "auto":
        feasible = n.max() <= EXACT_MAX_N and (
            len(partial) == 0 or _exact_plan(sizes, correct, n, partial)[-1] <= EXACT_MAX_WORK
        )
        method = "exact" if feasible else "monte_carlo"
    result = np.full((3, len(n), len(ks)), np.nan)
    if len(partial):
        if method == "exact":
            part = maj_at_k_exact(sizes, correct, n, partial)
        else:
            rng = np.random.default_rng(seed)
            part = maj_at_k_monte_carlo(sizes, correct, n, partial, n_draws=n_draws, rng=rng)
        wanted = np.isin(ks, partial)
        result[:, :, wanted] = np.stack(part)[:, :, np.searchsorted(partial, ks[wanted])]
    one = ks == 1  # one vote: right iff the drawn sample is right
    if one.any():
        share = ((sizes * correct).sum(1) / np.maximum(n, 1))[:, None]
        result[0][:, one] = share
        result[1][:, one] = share
        result[2][:, one] = 0.0
    full = ks[None, :] == n[:, None]  # (cells, ks)
    if full.any():
        whole = np.stack(_full_vote(sizes, correct))  # (3, cells)
        rows, cols = np.nonzero(full)
        result[:, rows, cols] = whole[:, rows]
    result[:, ks[None, :] > n[:, None]] = np.nan
    return result[0][inverse], result[1][inverse], result[2][inverse], method


# --------------------------------------------------------------------------- frames


def _long(keys: pl.DataFrame, ks: np.ndarray, columns: dict[str, np.ndarray]) -> pl.DataFrame:
    """Cells x ks arrays to a long frame with one row per (cell, k)."""
    cells = keys.height
    frame = keys.select(pl.all().gather(np.repeat(np.arange(cells), len(ks))))
    return frame.with_columns(
        k=pl.Series(np.tile(ks, cells), dtype=pl.Int64),
        **{name: pl.Series(np.asarray(v).reshape(-1)) for name, v in columns.items()},
    )


def problem_counts(df: pl.DataFrame, by: Sequence[str] = ()) -> pl.DataFrame:
    """One row per cell: the `by` columns, problem_id, n (samples) and n_correct."""
    return (
        df.lazy()
        .group_by([*by, "problem_id"], maintain_order=True)
        .agg(n=pl.len(), n_correct=pl.col("correct").fill_null(False).sum())
        .collect()
    )


def pass_at_k_table(df: pl.DataFrame, ks: Sequence[int], by: Sequence[str] = ()) -> pl.DataFrame:
    """Per-problem pass@k: `by`..., problem_id, k, n, n_correct, pass_at_k (rows with k > n dropped)."""
    counts = problem_counts(df, by)
    ks_arr = np.asarray(sorted(set(int(k) for k in ks)), dtype=np.int64)
    values = pass_at_k(counts["n"].to_numpy(), counts["n_correct"].to_numpy(), ks_arr)
    frame = _long(counts, ks_arr, {"pass_at_k": values})
    return frame.drop_nulls("pass_at_k").filter(pl.col("pass_at_k").is_not_nan())


def maj_at_k_table(
    df: pl.DataFrame,
    ks: Sequence[int],
    by: Sequence[str] = (),
    *,
    method: str = "auto",
    n_draws: int = 512,
    seed: int = 0,
) -> pl.DataFrame:
    """Per-problem maj@k: `by`..., problem_id, k, n, maj_at_k, maj_at_k_strict, p_tie, method.

    Rows with k > n are dropped. See the module docstring for the tie policy.
    """
    groups = vote_groups(df, by)
    ks_arr = np.asarray(sorted(set(int(k) for k in ks)), dtype=np.int64)
    expected, strict, tie, used = maj_at_k_arrays(groups, ks_arr, method=method, n_draws=n_draws, seed=seed)
    keys = groups.keys.with_columns(n=pl.Series(groups.n, dtype=pl.Int64))
    frame = _long(keys, ks_arr, {"maj_at_k": expected, "maj_at_k_strict": strict, "p_tie": tie})
    return frame.filter(pl.col("k") <= pl.col("n")).with_columns(method=pl.lit(used))


def majority_vote(df: pl.DataFrame, by: Sequence[str] = ()) -> pl.DataFrame:
    """The vote over all n samples of each cell (maj@n), computed directly.

    Returns `by`..., problem_id, n, n_top (answers tied at the top), maj (expected
    accuracy under a uniform tie-break), maj_strict, tie (the correct answer ties for the top).
    """
    cell = [*by, "problem_id"]
    base = df.select(*cell, pl.when(pl.col("pred").str.len_bytes() > 0).then(pl.col("pred")).alias("pred"),
                     pl.col("correct").fill_null(False))
    n = base.group_by(cell).agg(n=pl.len())
    votes = base.drop_nulls("pred").group_by([*cell, "pred"]).agg(size=pl.len(), correct=pl.col("correct").any())
    top = votes.filter(pl.col("size") == pl.col("size").max().over(cell))
    summary = top.group_by(cell).agg(n_top=pl.len(), n_top_correct=pl.col("correct").sum())
    out = n.join(summary, on=cell, how="left", nulls_equal=True).with_columns(
        pl.col("n_top", "n_top_correct").fill_null(0)
    )
    return out.select(
        *cell,
        "n",
        "n_top",
        maj=pl.when(pl.col("n_top") > 0).then(pl.col("n_top_correct") / pl.col("n_top")).otherwise(0.0),
        maj_strict=((pl.col("n_top") == 1) & (pl.col("n_top_correct") == 1)).cast(pl.Float64),
        tie=((pl.col("n_top") > 1) & (pl.col("n_top_correct") > 0)),
    ).sort(cell, nulls_last=True)


def pooled_voting(
    df: pl.DataFrame,
    ks: Sequence[int],
    condition: str = "temperature",
    by: Sequence[str] = (),
    *,
    method: str = "auto",
    n_draws: int = 512,
    seed: int = 0,
) -> pl.DataFrame:
    """Voting with samples pooled across the values of `condition`, at equal total budget.

    For each k, compares (mean over problems of) maj@k and pass@k at each single value of
    `condition`, at the best single value (chosen per k by maj@k, as an oracle would),
    and over the pool of all values' samples, from which the k samples are drawn uniformly
    (each value contributes k / n_values samples in expectation). Returns `by`..., k,
    scheme ('single' | 'best_single' | 'pooled'), `condition` (null for 'pooled'),
    maj_at_k, pass_at_k, n_problems. Problems must be present at every value.
    """
    single_maj = maj_at_k_table(df, ks, [*by, condition], method=method, n_draws=n_draws, seed=seed)
    single_pass = pass_at_k_table(df, ks, [*by, condition])
    single = (
        single_maj.join(single_pass, on=[*by, condition, "problem_id", "k"], nulls_equal=True)
        .group_by([*by, condition, "k"])
        .agg(pl.col("maj_at_k").mean(), pl.col("pass_at_k").mean(), n_problems=pl.len())
        .with_columns(scheme=pl.lit("single"))
    )
    pool_maj = maj_at_k_table(df, ks, by, method=method, n_draws=n_draws, seed=seed + 1)
    pool_pass = pass_at_k_table(df, ks, by)
    pooled = (
        pool_maj.join(pool_pass, on=[*by, "problem_id", "k"], nulls_equal=True)
        .group_by([*by, "k"])
        .agg(pl.col("maj_at_k").mean(), pl.col("pass_at_k").mean(), n_problems=pl.len())
        .with_columns(scheme=pl.lit("pooled"), **{condition: pl.lit(None, dtype=df.schema[condition])})
    )
    # only budgets every single value can afford are compared
    max_k = single.group_by([*by, "k"]).agg(n_values=pl.len())
    n_values = df.select(pl.col(condition).n_unique()).item()
    affordable = max_k.filter(pl.col("n_values") == n_values).select(*by, "k")
    single = single.join(affordable, on=[*by, "k"], nulls_equal=True)
    pooled = pooled.join(affordable, on=[*by, "k"], nulls_equal=True)
    best = (
        single.sort("maj_at_k", descending=True)
        .group_by([*by, "k"], maintain_order=True)
        .first()
        .with_columns(scheme=pl.lit("best_single"))
    )
    columns = [*by, "k", "scheme", condition, "maj_at_k", "pass_at_k", "n_problems"]
    return pl.concat([f.select(columns) for f in (single, best, pooled)]).sort([*by, "k", "scheme", condition])


# --------------------------------------------------------------------------- coverage


def solve_matrix(df: pl.DataFrame, condition: str = "temperature", by: Sequence[str] = ()) -> pl.DataFrame:
    """The per-problem x condition solve matrix, long: `by`..., problem_id, `condition`,
    n, n_correct, solve_rate, solved (at least one correct sample)."""
    return (
        problem_counts(df, [*by, condition])
        .with_columns(solve_rate=pl.col("n_correct") / pl.col("n"), solved=pl.col("n_correct") > 0)
        .select(*by, "problem_id", condition, "n", "n_correct", "solve_rate", "solved")
        .sort([*by, "problem_id", condition])
    )


def coverage(df: pl.DataFrame, condition: str = "temperature", by: Sequence[str] = ()) -> pl.DataFrame:
    """Share of problems solved at some value of `condition` (the union) vs at the best
    single value: `by`..., n_problems, union, best_single, best_condition, gain (union - best)."""
    matrix = solve_matrix(df, condition, by)
    union = matrix.group_by([*by, "problem_id"]).agg(pl.col("solved").any()).group_by(by or pl.lit(0)).agg(
        n_problems=pl.len(), union=pl.col("solved").mean()
    )
    per_value = matrix.group_by([*by, condition]).agg(best_single=pl.col("solved").mean())
    best = (
        per_value.sort(["best_single", condition], descending=[True, False])
        .group_by(by or pl.lit(0), maintain_order=True)
        .first()
        .rename({condition: "best_condition"})
    )
    if by:
        out = union.join(best, on=list(by), nulls_equal=True)
    else:
        out = union.drop("literal").with_columns(best.drop("literal"))
    return out.with_columns(gain=pl.col("union") - pl.col("best_single")).select(
        *by, "n_problems", "union", "best_single", "best_condition", "gain"
    )


# --------------------------------------------------------------------------- bootstrap


def _cluster_bootstrap(
    sums: np.ndarray, counts: np.ndarray, starts: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Ratio-of-sums statistic for each group, recomputed over n_boot resamples of its clusters.

    sums: (clusters, V) per-cluster totals of V variables; counts: (clusters,) rows per
    cluster; groups are contiguous runs of clusters starting at `starts`. All variables
    share the resamples. Returns (n_boot, groups, V).
    """
    n_clusters = len(sums)
    sizes = np.diff(np.append(starts, n_clusters))
    out = np.empty((n_boot, len(starts), sums.shape[1]))
    if n_clusters == 0:
        return out
    group_of = np.repeat(np.arange(len(starts)), sizes)
    base, width = starts[group_of], sizes[group_of].astype(np.float64)
    chunk = max(1, 4_000_000 // n_clusters)  # replicates per pass, bounding memory
    for lo in range(0, n_boot, chunk):
        b = min(chunk, n_boot - lo)
        # each position of a group draws one of that group's clusters
        pick = base + (rng.random((b, n_clusters)) * width).astype(np.int64)  # (b, clusters)
        den = np.add.reduceat(counts[pick], starts, axis=1)  # (b, groups)
        for v in range(sums.shape[1]):
            num = np.add.reduceat(sums[:, v][pick], starts, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[lo : lo + b, :, v] = num / den
    return out


def bootstrap_replicates(per_cluster: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Column means of `per_cluster` (clusters, V) over n_boot resamples of its rows: (n_boot, V).

    Each replicate draws the clusters with replacement (the same draw for every column),
    as `bootstrap_ci` does. For statistics that are functions of several means at once,
    where a ratio of sums is not enough: a maximum over conditions, a correlation from
    its moments, a difference of two ratios (give each ratio's sums and counts as columns).
    """
    values = np.asarray(per_cluster, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"per_cluster must be a non-empty (clusters, V) array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    return _cluster_bootstrap(values, np.ones(len(values)), np.zeros(1, dtype=np.int64), n_boot, rng)[:, 0, :]


def bootstrap_ci(
    df: pl.DataFrame,
    value: str | Sequence[str],
    *,
    by: Sequence[str] = (),
    cluster: str = "problem_id",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> pl.DataFrame:
    """Mean of `value` per group with a clustered percentile bootstrap interval.

    `df` may hold samples (several rows per cluster) or one row per cluster; the estimate
    is the mean over rows, and each replicate resamples the clusters of each group with
    replacement (so problems with more samples weigh more, as in the estimate). Nulls and
    NaNs are dropped. Returns `by`..., [variable,] estimate, ci_low, ci_high, n, n_clusters;
    with several `value` columns, one row per (group, variable).
    """
    values = [value] if isinstance(value, str) else list(value)
    rng = np.random.default_rng(seed)
    frame = df.select(*by, cluster, *[pl.col(v).cast(pl.Float64) for v in values])
    valid = [pl.col(v).is_not_null() & pl.col(v).is_not_nan() for v in values]
    complete = frame.select(pl.all_horizontal(valid).all()).item() if frame.height else True
    # variables with the same rows share one set of resamples; otherwise each gets its own
    batches = [values] if complete else [[v] for v in values]
    alpha = (1 - level) / 2
    rows = []
    for batch in batches:
        clean = frame.select(*by, cluster, *batch).filter(
            pl.all_horizontal(pl.col(v).is_not_null() & pl.col(v).is_not_nan() for v in batch)
        )
        per_cluster = (
            clean.group_by([*by, cluster])
            .agg(*[pl.col(v).sum() for v in batch], _count=pl.len())
            .sort([*by, cluster], nulls_last=True)
        )
        groups = per_cluster.group_by(by or pl.lit(0), maintain_order=True).agg(
            n=pl.col("_count").sum(), n_clusters=pl.len(), *[pl.col(v).sum() / pl.col("_count").sum() for v in batch]
        )
        if by:
            groups = groups.sort(list(by), nulls_last=True)  # the order of the groups' runs in per_cluster
        else:
            groups = groups.drop("literal")
        sizes = groups["n_clusters"].to_numpy()
        starts = np.concatenate([[0], np.cumsum(sizes)])[: len(sizes)].astype(np.int64)  # empty when no groups
        totals = per_cluster.select(batch).to_numpy().astype(np.float64)  # (clusters, V)
        counts = per_cluster["_count"].to_numpy().astype(np.float64)
        boot = _cluster_bootstrap(totals, counts, starts, n_boot, rng)  # (n_boot, groups, V)
        if len(starts):
            low, high = np.quantile(boot, [alpha, 1 - alpha], axis=0)  # (groups, V)
        else:
            low = high = np.zeros((0, len(batch)))
        for i, v in enumerate(batch):
            rows.append(
                groups.select(*by, "n", "n_clusters", estimate=pl.col(v)).with_columns(
                    variable=pl.lit(v), ci_low=pl.Series(low[:, i]), ci_high=pl.Series(high[:, i])
                )
            )
    columns = [*by, *(["variable"] if len(values) > 1 else []), "estimate", "ci_low", "ci_high", "n", "n_clusters"]
    # a group whose values are all null has no clusters and so no estimate: leave it out
    return pl.concat([r.select(columns) for r in rows]).filter(pl.col("n_clusters") > 0)


def paired_bootstrap(
    a: pl.DataFrame,
    b: pl.DataFrame,
    value: str = "correct",
    *,
    on: Sequence[str] = ("problem_id", "sample_idx", "seed"),
    by: Sequence[str] = (),
    cluster: str = "problem_id",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> pl.DataFrame:
    """The paired difference mean(b) - mean(a) of `value` with a clustered bootstrap interval.

    Rows of `a` and `b` are joined on `on` (pairs: same problem, sample index and seed) and
    problems are resampled jointly, so what the two conditions share cancels. `by` columns
    are taken from `a`. Returns `by`..., n_pairs, n_clusters, mean_a, mean_b, delta,
    ci_low, ci_high, p_value (two-sided bootstrap: twice the smaller share of replicates
    on either side of zero).
    """
    keys = list(dict.fromkeys([*on, cluster]))
    left = a.select(*dict.fromkeys([*keys, *by]), pl.col(value).cast(pl.Float64).alias("value_a"))
    right = b.select(*keys, pl.col(value).cast(pl.Float64).alias("value_b"))
    pairs = left.join(right, on=keys, nulls_equal=True).drop_nulls(["value_a", "value_b"])
    per_cluster = (
        pairs.group_by([*by, cluster])
        .agg(sum_a=pl.col("value_a").sum(), sum_b=pl.col("value_b").sum(), count=pl.len())
        .sort([*by, cluster], nulls_last=True)
    )
    groups = per_cluster.group_by(by or pl.lit(0), maintain_order=True).agg(
        n_pairs=pl.col("count").sum(),
        n_clusters=pl.len(),
        mean_a=pl.col("sum_a").sum() / pl.col("count").sum(),
        mean_b=pl.col("sum_b").sum() / pl.col("count").sum(),
    )
    if by:
        groups = groups.sort(list(by), nulls_last=True)
    else:
        groups = groups.drop("literal")
    sizes = groups["n_clusters"].to_numpy()
    starts = np.concatenate([[0], np.cumsum(sizes)])[: len(sizes)].astype(np.int64)  # empty when no groups
    diff = (per_cluster["sum_b"] - per_cluster["sum_a"]).to_numpy()[:, None]
    count = per_cluster["count"].to_numpy().astype(np.float64)
    boot = _cluster_bootstrap(diff, count, starts, n_boot, np.random.default_rng(seed))[..., 0]
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha], axis=0)
    p_value = np.minimum(1.0, 2 * np.minimum((boot <= 0).mean(0), (boot >= 0).mean(0)))
    return groups.with_columns(
        delta=pl.col("mean_b") - pl.col("mean_a"),
        ci_low=pl.Series(low),
        ci_high=pl.Series(high),
        p_value=pl.Series(p_value),
    ).select(*by, "n_pairs", "n_clusters", "mean_a", "mean_b", "delta", "ci_low", "ci_high", "p_value")
