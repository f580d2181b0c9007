"""Sample tables with a known answer for each finding of `thinklab.analysis.findings`.

Every builder takes `effect`: +1 builds the finding, -1 its reverse, 0 no effect (the
conditions or the compared groups are then identical, so the statistic is exactly 0).
Rows carry the sample-table schema (`thinklab.store.SCHEMA`) and the seed the runner
would give them, so the same rows can be written into a real run store.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from thinklab.config import sample_seed
from thinklab.store import SCHEMA

TASK = "synthetic:arith"


def row(problem: int, sample: int, *, correct: bool, n_tokens: int = 120, task: str = TASK, pred: str | None = None,
        entropy_thinking: float = 1.0, entropy_answer: float = 0.5, answer_tokens: int = 4, finish: str = "stop",
        level: int | None = None, **condition) -> dict:
    """One sample: the first n_tokens - answer_tokens tokens think at `entropy_thinking`, the rest answer."""
    problem_id = f"{task}/{problem}"
    n_think = n_tokens - answer_tokens
    return {
        "run_id": condition.pop("run_id", "synthetic"),
        "problem_id": problem_id,
        "sample_idx": sample,
        "task": task,
        "model": condition.pop("model", "synthetic-model"),
        "backend": "hf",
        "quantization": condition.pop("quantization", None),
        "moe_top_k": condition.pop("moe_top_k", None),
        "temperature": condition.pop("temperature", 0.7),
        "top_p": 1.0,
        "seed": sample_seed(0, problem_id, sample),
        "thinking_budget": condition.pop("thinking_budget", None),
        "wait_extensions": 0,
        "prompt": f"question {problem}",
        "text": "...",
        "thinking": "...",
        "answer_text": "...",
        "n_tokens": n_tokens,
        "n_thinking_tokens": n_think,
        "n_answer_tokens": answer_tokens,
        "finish_reason": finish,
        "token_entropy": [entropy_thinking] * n_think + [entropy_answer] * answer_tokens,
        "token_logprob": [-0.5] * n_tokens,
        "token_ids": [1] * n_tokens,
        "pred": pred if pred is not None else ("gold" if correct else f"wrong{sample}"),
        "gold": "gold",
        "correct": correct,
        "level": level,
        **condition,
    }


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMA)


def _correct_counts(n_problems: int, n: int, seed: int) -> np.ndarray:
    """How many of each problem's n samples are correct: 1..n-1, so every rule can differ."""
    return np.random.default_rng(seed).integers(1, n, size=n_problems)


def shortest_table(effect: int, n_problems: int = 40, n: int = 4, seed: int = 0) -> pl.DataFrame:
    """(a) +1: the shortest sample is correct; -1: it is wrong; 0: all samples tie in length."""
    rows = []
    for p, c in enumerate(_correct_counts(n_problems, n, seed)):
        # samples ordered by length; effect +1 puts the correct ones first (shortest)
        correct = [i < c for i in range(n)] if effect >= 0 else [i >= n - c for i in range(n)]
        for i in range(n):
            rows.append(row(p, i, correct=correct[i], n_tokens=100 if effect == 0 else 100 + 20 * i))
    return frame(rows)


def length_table(effect: int, n_problems: int = 40, n: int = 4, seed: int = 0) -> pl.DataFrame:
    """(b) +1: incorrect samples are longer; -1: shorter; 0: both have the same lengths."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_problems):
        scale = int(rng.integers(80, 200))
        for i in range(n):
            correct = i % 2 == 0
            if effect == 0:
                length = scale + 30 * (i // 2)  # each length once correct, once incorrect
            else:
                longer = (not correct) if effect > 0 else correct
                length = scale + (60 if longer else 0) + i
            rows.append(row(p, i, correct=correct, n_tokens=length))
    return frame(rows)


def entropy_table(effect: int, n_problems: int = 40, n: int = 4, seed: int = 0) -> pl.DataFrame:
    """(c) +1: thinking entropy above answer entropy and rising with length; -1: the reverse
    (below, and falling); 0: equal in both phases."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_problems):
        for i in range(n):
            length = int(rng.integers(60, 300))
            if effect == 0:
                e_think = e_answer = 1.0
            else:
                trend = 0.5 + length / 300  # grows with length
                e_think, e_answer = (trend + 0.5, 0.3) if effect > 0 else (0.3, 2.5 - trend)
            rows.append(row(p, i, correct=bool(rng.integers(0, 2)), n_tokens=length, entropy_thinking=e_think,
                            entropy_answer=e_answer))
    return frame(rows)


TEMPERATURES = (0.4, 0.7, 1.0)


def temperature_table(effect: int, n_problems: int = 90, n: int = 4, seed: int = 0) -> pl.DataFrame:
    """(d) +1: each problem is solved at one temperature only (a different one per problem);
    -1: one temperature solves every problem and the others agree on one wrong answer;
    0: every temperature gives the same unanimous answers."""
    rng = np.random.default_rng(seed)
    solved = rng.integers(0, 2, size=n_problems).astype(bool)
    rows = []
    for p in range(n_problems):
        for t_index, t in enumerate(TEMPERATURES):
            for i in range(n):
                if effect > 0:
                    good = p % len(TEMPERATURES) == t_index
                    pred = "gold" if good else f"wrong{t_index}{i}"
                elif effect < 0:
                    good = t_index == 0
                    pred = "gold" if good else "wrong"
                else:
                    good = bool(solved[p])
                    pred = "gold" if good else "wrong"
                rows.append(row(p, i, correct=good, pred=pred, temperature=t))
    return frame(rows)


def _flip(rows: list[dict], share_by_level: dict, to_correct: bool, rng: np.random.Generator) -> list[dict]:
    """Copies of `rows` where a share (by level) of the samples that are not yet `to_correct` flip."""
    out = []
    for r in rows:
        r = dict(r)
        if r["correct"] != to_correct and rng.random() < share_by_level.get(r["level"], 0.0):
            r["correct"] = to_correct
            r["pred"] = "gold" if to_correct else "flipped"
        out.append(r)
    return out


def quantization_tables(effect: int, n_problems: int = 60, n: int = 4, seed: int = 0):
    """(e) base, int8 and 4-bit tables. int8 always equals the baseline. +1: 4-bit turns
    right answers wrong, more often on harder levels; -1: it turns wrong answers right, more
    often on harder levels; 0: 4-bit equals the baseline."""
    rng = np.random.default_rng(seed)
    base = [row(p, i, correct=bool(rng.random() < 0.6), level=1 + p % 3) for p in range(n_problems) for i in range(n)]
    int8 = [{**r, "quantization": "int8-wo"} for r in base]
    shares = {1: 0.05, 2: 0.4, 3: 0.8}
    if effect == 0:
        four = [dict(r) for r in base]
    else:
        four = _flip(base, shares, to_correct=effect < 0, rng=rng)
    four = [{**r, "quantization": "int4-wo"} for r in four]
    return frame(base), frame(int8), frame(four)


def moe_tables(effect: int, n_problems: int = 50, n: int = 4, seed: int = 0) -> dict[int, pl.DataFrame]:
    """(f) one table per top-k (4, 8, 16). +1: fewer experts turn right answers wrong; -1: wrong
    answers right; 0: every k gives the same answers."""
    rng = np.random.default_rng(seed)
    full = [row(p, i, correct=bool(rng.random() < 0.5), moe_top_k=16) for p in range(n_problems) for i in range(n)]
    tables = {16: full}
    for k, share in ((8, 0.3), (4, 0.7)):
        flipped = [dict(r) for r in full] if effect == 0 else _flip(full, {None: share}, effect < 0, rng)
        tables[k] = [{**r, "moe_top_k": k} for r in flipped]
    return {k: frame(rows) for k, rows in tables.items()}


def budget_tables(effect: int, n_problems: int = 50, n: int = 4, seed: int = 0) -> dict:
    """(g) one table per thinking budget (64, 128, None = uncapped; the uncapped run holds
    2n samples, as the findings plan's base run does). +1: accuracy peaks at 128 and falls
    uncapped; -1: it rises with the budget; 0: every budget gives the same answers."""
    rng = np.random.default_rng(seed)
    uncapped = [row(p, i, correct=bool(rng.random() < 0.5)) for p in range(n_problems) for i in range(2 * n)]
    shared = [r for r in uncapped if r["sample_idx"] < n]
    if effect == 0:
        b128, b64 = [dict(r) for r in shared], [dict(r) for r in shared]
    elif effect > 0:
        b128 = _flip(shared, {None: 0.5}, to_correct=True, rng=rng)
        b64 = _flip(shared, {None: 0.2}, to_correct=False, rng=rng)
    else:
        b128 = _flip(shared, {None: 0.3}, to_correct=False, rng=rng)
        b64 = _flip(shared, {None: 0.6}, to_correct=False, rng=rng)
    tables = {None: uncapped, 128: b128, 64: b64}
    out = {}
    for budget, rows in tables.items():
        out[budget] = frame([{**r, "thinking_budget": budget,
                              "finish_reason": "budget" if budget is not None and r["sample_idx"] % 2 else "stop"}
                             for r in rows])
    return out


def random_table(problem_ids: list[int], n: int, rng: np.random.Generator, task: str = TASK,
                 **condition) -> pl.DataFrame:
    """Plausible rows without any built-in effect, for the report test."""
    rows = []
    for p in problem_ids:
        for i in range(n):
            length = int(rng.integers(40, 200))
            rows.append(row(p, i, correct=bool(rng.random() < 0.5), n_tokens=length, task=task,
                            pred=str(int(rng.integers(0, 3))), entropy_thinking=float(rng.uniform(0.5, 2)),
                            entropy_answer=float(rng.uniform(0.1, 1)),
                            finish="length" if length > 190 else "stop", level=1 + p % 3, **condition))
    return frame(rows)
