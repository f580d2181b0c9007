"""Seeded synthetic sample tables, for tests and benchmarks of the analysis layer.

`synthetic_samples` writes a table with the sample-table contract's columns and dtypes
(plus the metadata columns `level` and `subject`) without any model. The numbers follow
the shapes the studies look for, so every figure has something to show:

- accuracy falls with difficulty `level` and away from a sweet-spot temperature;
- incorrect samples think longer, hedge more ("Wait,", "Hmm,") and have higher token
  entropy that rises along the trace; the answer phase has lower entropy than thinking;
- a thinking budget truncates long traces: it loses some correct answers and, since the
  longest traces are the wrong ones, rescues a few (an overthinking optimum);
- wrong answers concentrate on a few distractors per problem (votes tie sometimes), and
  spread out as the temperature rises.

It knows nothing about real models, tokenizers or graders: the text is assembled from a
sentence pool and `correct` is decided first, then made consistent with `pred`.
Every random draw comes from one `np.random.Generator(seed)`, so a table is a pure
function of its arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import polars as pl

__all__ = ["synthetic_samples", "SENTENCES", "MARKER_SENTENCES"]

SENTENCES = (
    "First I need to find the total of the given values.",
    "So the sum of the first two terms is the starting point.",
    "Then multiply the result by the number of groups.",
    "The remainder after division tells us the last digit.",
    "Let us write the equation in terms of the unknown.",
    "Subtracting both sides gives a simpler expression.",
    "This means the product must be divisible by three.",
    "Now substitute the value back into the original equation.",
    "The answer should be a positive integer under one thousand.",
    "We can factor the quadratic into two linear terms.",
    "Each step adds the same amount to the running total.",
    "So far the partial result looks consistent with the question.",
    "The ratio of the two quantities stays constant here.",
    "Counting the cases one by one avoids double counting.",
    "The constraint rules out the negative solution.",
    "Adding the remaining terms completes the computation.",
)
MARKER_SENTENCES = (
    "Wait, that does not match the earlier step.",
    "Hmm, maybe I made an arithmetic mistake.",
    "Alternatively, we could count the complement instead.",
    "Let me check the last multiplication again.",
    "But wait, the problem asks for the remainder.",
    "Actually, the second term should be doubled.",
    "Let me double-check this with a smaller case.",
)

_SUBJECTS = ("algebra", "geometry", "number_theory", "counting", "prealgebra")


def _list_column(flat: np.ndarray, lengths: np.ndarray, dtype: pl.DataType) -> pl.Series:
    """A list Series from flat values and per-row lengths, without a Python loop over rows."""
    width = max(int(lengths.max()) if len(lengths) else 0, 1)
    padded = np.zeros((len(lengths), width), dtype=flat.dtype)  # (rows, max_len)
    padded[np.arange(width) < lengths[:, None]] = flat
    frame = pl.DataFrame({"v": pl.Series(padded), "n": lengths})
    return frame.select(pl.col("v").arr.to_list().list.head(pl.col("n")).cast(pl.List(dtype))).to_series()


def _run_id(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def synthetic_samples(
    n_problems: int = 20,
    n_samples: int = 4,
    *,
    temperatures: Sequence[float] = (0.7,),
    thinking_budgets: Sequence[int | None] = (None,),
    mean_thinking_tokens: float = 300.0,
    answer_tokens: tuple[int, int] = (8, 60),
    max_tokens: int | None = None,
    n_levels: int | None = 5,
    level_null_share: float = 0.0,
    n_distractors: int = 5,
    with_text: bool = True,
    vocab_size: int = 32_000,
    model: str = "synthetic-model",
    task: str = "synthetic-math",
    seed: int = 0,
    chunk_rows: int = 8192,
) -> pl.DataFrame:
    """A sample table of len(temperatures) * len(thinking_budgets) * n_problems * n_samples rows.

    Rows are ordered by (temperature, thinking_budget, problem, sample); each
    (temperature, budget) pair is one run with its own `run_id`, over the same problems
    and seeds. `n_levels=None` leaves `level` null everywhere; `level_null_share` nulls a
    share of problems. `max_tokens` caps thinking + answer (finish_reason `length`).
    `with_text=False` leaves the text columns empty (faster for huge tables).
    """
    rng = np.random.default_rng(seed)
    temps = np.asarray(temperatures, dtype=np.float64)
    budgets = np.array([-1 if b is None else int(b) for b in thinking_budgets], dtype=np.int64)
    n_cond = len(temps) * len(budgets)
    n_rows = n_cond * n_problems * n_samples

    # Problems: difficulty from level plus an idiosyncratic part; a gold answer and distractors.
    if n_levels is None:
        level = np.full(n_problems, -1)
    else:
        level = rng.integers(1, n_levels + 1, n_problems)
        level[rng.random(n_problems) < level_null_share] = -1
    level_centred = np.where(level > 0, level - ((n_levels or 1) + 1) / 2, 0.0)
    difficulty = 0.7 * level_centred + 0.9 * rng.standard_normal(n_problems)
    gold = rng.integers(2, 999, n_problems)
    # distractor j of problem p is gold + offset; offsets distinct and nonzero.
    offsets = rng.permutation(np.arange(1, 40))[:n_distractors] * rng.choice([-1, 1], n_distractors)
    subject = rng.integers(0, len(_SUBJECTS), n_problems)

    cond = np.repeat(np.arange(n_cond), n_problems * n_samples)
    temp_row = temps[cond // len(budgets)]
    budget_row = budgets[cond % len(budgets)]
    prob = np.tile(np.repeat(np.arange(n_problems), n_samples), n_cond)
    sample_idx = np.tile(np.arange(n_samples), n_cond * n_problems)

    # Natural (uncapped) outcome: a sweet spot near T=0.7, worse far from it.
    logit = 0.9 - difficulty[prob] - 1.6 * (temp_row - 0.7) ** 2 - 1.2 * np.clip(temp_row - 1.0, 0, None)
    correct = rng.random(n_rows) < 1 / (1 + np.exp(-logit))
    sigma = 0.5
    log_len = (
        np.log(mean_thinking_tokens) - sigma**2 / 2 - 0.2
        + 0.12 * level_centred[prob] + 0.4 * ~correct + 0.15 * (temp_row - 0.7)
        + sigma * rng.standard_normal(n_rows)
    )
    natural = np.clip(np.exp(log_len), 4, 8 * mean_thinking_tokens).astype(np.int64)

    # Budget forcing: truncation loses some correct traces and rescues a few wrong (overlong) ones.
    capped = (budget_row > 0) & (natural > budget_row)
    n_thinking = np.where(capped, budget_row, natural)
    keep = rng.random(n_rows) < np.sqrt(n_thinking / natural)
    rescue = rng.random(n_rows) < 0.12
    correct = np.where(capped, np.where(correct, keep, rescue), correct)
    n_answer = rng.integers(answer_tokens[0], answer_tokens[1] + 1, n_rows)
    finish = np.where(capped, "budget", "stop").astype(object)
    length_cut = np.zeros(n_rows, dtype=bool)
    if max_tokens is not None:
        length_cut = n_thinking + n_answer > max_tokens
        n_thinking = np.minimum(n_thinking, max_tokens)
        n_answer = np.where(length_cut, max_tokens - n_thinking, n_answer)
        finish[length_cut] = "length"
        correct &= ~length_cut
    n_tokens = n_thinking + n_answer

    # Answers: wrong ones follow a Zipf law over distractors that flattens with temperature;
    # some are unique one-offs, some unextracted (null).
    zipf = 1.6 / np.maximum(temp_row, 0.05)
    ranks = np.arange(1, n_distractors + 1)
    weights = ranks[None, :] ** -zipf[:, None]
    cdf = np.cumsum(weights / weights.sum(1, keepdims=True), axis=1)
    pick = np.minimum((rng.random(n_rows)[:, None] > cdf).sum(1), n_distractors - 1)
    wrong = gold[prob] + offsets[pick]
    one_off = rng.random(n_rows) < 0.15 * temp_row
    wrong = np.where(one_off, gold[prob] + 1000 + rng.integers(0, 10**6, n_rows), wrong)
    abstain = (~correct & (rng.random(n_rows) < 0.08)) | length_cut
    pred_num = np.where(correct, gold[prob], wrong)
    pred = np.where(abstain, None, pred_num.astype(str).astype(object))
    gold_str = gold.astype(str).astype(object)[prob]

    # Per-token traces, built in chunks so memory stays bounded by chunk_rows * max_len.
    base = (0.35 + 0.35 * temp_row) * np.where(correct, 1.0, 1.3) * np.exp(0.2 * rng.standard_normal(n_rows))
    entropy_parts, logprob_parts, id_parts = [], [], []
    for lo in range(0, n_rows, chunk_rows):
        hi = min(lo + chunk_rows, n_rows)
        lengths, n_think = n_tokens[lo:hi], n_thinking[lo:hi]
        total = int(lengths.sum())
        starts = np.cumsum(lengths) - lengths
        row = np.repeat(np.arange(hi - lo), lengths)  # (total,)
        position = np.arange(total) - starts[row]
        in_thinking = position < n_think[row]
        x = position / np.maximum(n_think[row], 1)  # normalized position in the thinking phase
        slope = np.where(correct[lo:hi], -0.2, 0.3)[row]
        shape = np.where(in_thinking, 1.0 + slope * (x - 0.5), 0.35)
        entropy = (base[lo:hi][row] * shape * rng.standard_exponential(total)).astype(np.float32)
        logprob = (-entropy * rng.uniform(0.2, 1.0, total) - 0.01).astype(np.float32)
        ids = rng.integers(0, vocab_size, total, dtype=np.int32)
        entropy_parts.append(_list_column(entropy, lengths, pl.Float32))
        logprob_parts.append(_list_column(logprob, lengths, pl.Float32))
        id_parts.append(_list_column(ids, lengths, pl.Int32))

    # Text: sentences of ~12 tokens; wrong traces hedge twice as often.
    if with_text:
        plain = np.array(SENTENCES, dtype=object)
        hedges = np.array(MARKER_SENTENCES, dtype=object)
        n_sent = np.maximum(n_thinking // 12, 1)
        sent_row = np.repeat(np.arange(n_rows), n_sent)
        is_marker = rng.random(len(sent_row)) < np.where(correct, 0.05, 0.11)[sent_row]
        sentence = np.where(
            is_marker,
            hedges[rng.integers(0, len(hedges), len(sent_row))],
            plain[rng.integers(0, len(plain), len(sent_row))],
        )
        bounds = np.concatenate([[0], np.cumsum(n_sent)])
        thinking = [" ".join(sentence[bounds[i] : bounds[i + 1]]) for i in range(n_rows)]
    else:
        thinking = [""] * n_rows

    run_ids = np.array([_run_id(model, task, float(temps[c // len(budgets)]), int(budgets[c % len(budgets)]))
                        for c in range(n_cond)], dtype=object)
    frame = pl.DataFrame(
        {
            "run_id": run_ids[cond],
            "problem_id": np.char.add("p", np.char.zfill(prob.astype(str), 5)).astype(object),
            "sample_idx": sample_idx,
            "task": np.full(n_rows, task, dtype=object),
            "model": np.full(n_rows, model, dtype=object),
            "backend": np.full(n_rows, "synthetic", dtype=object),
            "quantization": pl.Series([None] * n_rows, dtype=pl.Utf8),
            "moe_top_k": pl.Series([None] * n_rows, dtype=pl.Int64),
            "temperature": temp_row.astype(np.float32),
            "top_p": np.ones(n_rows, dtype=np.float32),
            "seed": seed * 1_000_003 + prob * 10_007 + sample_idx,
            "thinking_budget": pl.Series(np.where(budget_row > 0, budget_row, 0)).set(
                pl.Series(budget_row <= 0), None
            ),
            "wait_extensions": np.zeros(n_rows, dtype=np.int64),
            "prompt": np.char.add("Solve problem ", prob.astype(str)).astype(object),
            "thinking": pl.Series(thinking, dtype=pl.Utf8),
            "n_tokens": n_tokens,
            "n_thinking_tokens": n_thinking,
            "n_answer_tokens": n_answer,
            "finish_reason": finish,
            "token_entropy": pl.concat(entropy_parts),
            "token_logprob": pl.concat(logprob_parts),
            "token_ids": pl.concat(id_parts),
            "pred": pl.Series(pred, dtype=pl.Utf8),
            "gold": gold_str,
            "correct": correct,
            "level": pl.Series(level[prob]).set(pl.Series(level[prob] <= 0), None),
            "subject": np.array(_SUBJECTS, dtype=object)[subject[prob]],
        },
        strict=False,
    )
    answer = pl.when(pl.col("pred").is_null()).then(pl.lit("I could not finish.")).otherwise(
        pl.concat_str(pl.lit("The answer is \\boxed{"), pl.col("pred"), pl.lit("}."))
    )
    frame = frame.with_columns(answer_text=answer).with_columns(
        text=pl.concat_str(pl.lit("<think>\n"), pl.col("thinking"), pl.lit("\n</think>\n\n"), pl.col("answer_text"))
    )
    order = [
        "run_id", "problem_id", "sample_idx", "task", "model", "backend", "quantization", "moe_top_k",
        "temperature", "top_p", "seed", "thinking_budget", "wait_extensions", "prompt", "text", "thinking",
        "answer_text", "n_tokens", "n_thinking_tokens", "n_answer_tokens", "finish_reason", "token_entropy",
        "token_logprob", "token_ids", "pred", "gold", "correct", "level", "subject",
    ]
    return frame.select(order).with_columns(
        pl.col("sample_idx", "seed", "thinking_budget", "wait_extensions", "n_tokens", "n_thinking_tokens",
               "n_answer_tokens", "level").cast(pl.Int64),
        pl.col("finish_reason").cast(pl.Utf8),
    )
