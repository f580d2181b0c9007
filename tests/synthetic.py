"""Seeded synthetic sample tables: a test fixture for the analysis layer and its benchmark.

`synthetic_samples` writes a table with the sample-table contract's columns and dtypes
(plus the metadata columns `level` and `subject`) without any model. The numbers follow
the shapes the studies look for, so every figure has something to show:

- accuracy falls with difficulty `level` and away from a sweet-spot temperature;
- incorrect samples think longer, hedge more ("Wait,", "Hmm,") and have higher token
  entropy that rises along the trace; the answer phase has lower entropy than thinking;
- a thinking budget truncates long traces: it loses some correct answers and, since the
  longest traces are the wrong ones, rescues a few (an overthinking optimum);
- wrong answers concentrate on a few distractors per problem (votes tie sometimes), and
  spread out as the temperature rises;
- a quantization format lowers accuracy by its bit width (8-bit slightly, 4-bit more) and
  makes traces a little longer and less certain;
- fewer active experts per token (`moe_top_k` below `num_experts`) lower accuracy and
  lengthen traces a little. MoE rows carry the routing columns the hf runner stores
  (`expert_load`, `router_entropy_thinking`, `router_entropy_answer`): every sampled
  token picks `moe_top_k` distinct experts per layer, with a per-layer imbalance, and the
  router is less certain while thinking than while answering.

It knows nothing about real models, tokenizers or graders: the text is assembled from a
sentence pool and `correct` is decided first, then made consistent with `pred`.
Every random draw comes from one `np.random.Generator(seed)`, so a table is a pure
function of its arguments. The quantization and MoE axes draw nothing of their own except
the routing columns, drawn last: with both axes left at `(None,)` a table is the same as
one built without them.
"""

from __future__ import annotations

import hashlib
import re
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
# Accuracy-logit penalty of a quantization format, by bits per weight value.
_QUANT_PENALTY = {16: 0.0, 8: 0.08, 6: 0.2, 5: 0.3, 4: 0.45, 3: 0.9, 2: 1.8}
_NAMED_BITS = {"awq": 4, "gptq": 4}  # formats whose name carries no bit width


def _quant_penalty(fmt: str | None) -> float:
    """The accuracy-logit penalty of a format name: bits from the name ('int8-wo' -> 8, 'bnb-nf4' -> 4)."""
    if fmt is None:
        return 0.0
    if not isinstance(fmt, str):
        raise ValueError(f"quantizations holds {fmt!r}; each must be a format name (str) or None for the baseline")
    digits = re.findall(r"\d+", fmt)
    bits = _NAMED_BITS.get(fmt.lower(), int(digits[0]) if digits else None)
    if bits not in _QUANT_PENALTY:
        raise ValueError(
            f"quantization format {fmt!r}: cannot tell its bit width; use a name with one of "
            f"{sorted(_QUANT_PENALTY)} bits in it (e.g. 'int8-wo', 'int4-wo', 'bnb-nf4') "
            f"or one of {sorted(_NAMED_BITS)}"
        )
    return _QUANT_PENALTY[bits]


def _inclusion_probabilities(popularity: np.ndarray, k: int) -> np.ndarray:
    """Per expert, the probability that a token picks it among its k distinct experts:
    k * popularity, capped at 1 with the excess spread over the others (sums to k)."""
    capped = np.zeros(len(popularity), dtype=bool)
    while True:
        pi = np.ones(len(popularity))
        free = ~capped
        if free.any():
            pi[free] = (k - capped.sum()) * popularity[free] / popularity[free].sum()
        over = free & (pi > 1)
        if not over.any():
            return np.minimum(pi, 1.0)
        capped |= over


def _expert_counts(rng: np.random.Generator, n_tokens: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """(rows, E) expert counts when each of a row's n_tokens picks distinct experts with
    inclusion probabilities pi (sum k, each <= 1) by systematic sampling: one uniform u
    per token takes expert e when u + j lies in [C[e], C[e+1]) for an integer j, with C the
    cumulative pi. The fractional cut points split [0, 1) into pieces that each take a
    fixed set of exactly k experts, so a row's counts are a multinomial over the pieces:
    every layer of every row routes exactly k * n_tokens token slots, at most n_tokens to
    one expert."""
    cum = np.concatenate([[0.0], np.cumsum(pi)])  # (E + 1,)
    cuts = np.unique(np.concatenate([[0.0, 1.0], np.mod(cum[1:-1], 1.0)]))
    width = np.diff(cuts)
    cuts, width = cuts[:-1][width > 1e-12], width[width > 1e-12]
    mid = cuts + width / 2  # (pieces,)
    members = np.ceil(cum[None, 1:] - mid[:, None]) - np.ceil(cum[None, :-1] - mid[:, None])  # (pieces, E), 0/1
    pieces = rng.multinomial(n_tokens, width / width.sum())  # (rows, pieces)
    return (pieces @ members.astype(np.int64)).astype(np.int32)


def _routing_columns(
    rng: np.random.Generator,
    k_row: np.ndarray,
    n_tokens: np.ndarray,
    n_thinking: np.ndarray,
    n_answer: np.ndarray,
    correct: np.ndarray,
    num_experts: int,
    moe_layers: int,
) -> dict[str, pl.Series]:
    """The routing columns (store.SCHEMA dtypes) for rows with k_row > 0; null where k_row <= 0."""
    n_rows = len(k_row)
    moe = k_row > 0
    popularity = rng.dirichlet(np.full(num_experts, 4.0), moe_layers)  # (L, E): the router's imbalance per layer
    load = np.zeros((n_rows, moe_layers, num_experts), dtype=np.int32)  # (rows, L, E)
    for k in np.unique(k_row[moe]):
        rows = np.flatnonzero(k_row == k)
        for layer in range(moe_layers):
            pi = _inclusion_probabilities(popularity[layer], int(k))
            load[rows, layer] = _expert_counts(rng, n_tokens[rows], pi)
    # Mean router entropy per phase, as a share of its maximum ln(E): higher while thinking,
    # on wrong samples, and with fewer active experts.
    noise = rng.standard_normal((2, int(moe.sum())))
    gap = 1 - k_row[moe] / num_experts
    lift = 0.04 * ~correct[moe] + 0.03 * gap
    share = np.clip(np.stack([0.78 + lift + 0.03 * noise[0], 0.66 + lift + 0.03 * noise[1]]), 0.0, 1.0)
    entropy = np.zeros((2, n_rows), dtype=np.float32)
    entropy[:, moe] = share * np.log(num_experts)
    missing = np.stack([~moe | (n_thinking == 0), ~moe | (n_answer == 0)])  # an empty phase has no mean
    return {
        "expert_load": pl.Series(load).cast(pl.List(pl.List(pl.Int32))).set(pl.Series(~moe), None),
        "router_entropy_thinking": pl.Series(entropy[0]).set(pl.Series(missing[0]), None),
        "router_entropy_answer": pl.Series(entropy[1]).set(pl.Series(missing[1]), None),
    }


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
    quantizations: Sequence[str | None] = (None,),
    moe_top_ks: Sequence[int | None] = (None,),
    num_experts: int = 8,
    moe_layers: int = 8,
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
    """A sample table of one run per condition, n_problems * n_samples rows each.

    The conditions are the product temperatures x thinking_budgets x quantizations x
    moe_top_ks; rows are ordered by (temperature, thinking_budget, quantization,
    moe_top_k, problem, sample). Each condition is one run with its own `run_id`, over the
    same problems and seeds, so a quantized row pairs with its baseline row (quantization
    None) on (problem_id, sample_idx, seed) and the other condition columns. A
    quantization is a format name whose bit width the name tells ('int8-wo', 'int4-wo',
    'bnb-nf4', ...); a moe_top_k lies in 1..num_experts. When some moe_top_k is not None
    the table gains the routing columns `expert_load` (moe_layers lists of num_experts
    token counts), `router_entropy_thinking` and `router_entropy_answer`, null on rows
    whose moe_top_k is None. `n_levels=None` leaves `level` null everywhere; `level_null_share` nulls a
    share of problems. `max_tokens` caps thinking + answer (finish_reason `length`).
    `with_text=False` leaves the text columns empty (faster for huge tables).
    """
    axes = {"temperatures": temperatures, "thinking_budgets": thinking_budgets, "quantizations": quantizations,
            "moe_top_ks": moe_top_ks}
    for name, values in axes.items():
        if len(values) == 0:
            raise ValueError(f"{name} is empty; give at least one value (None where the axis allows it)")
        if len(set(values)) < len(values):
            raise ValueError(f"{name}={tuple(values)!r} repeats a value; each condition must be distinct")
    if num_experts < 1 or moe_layers < 1:
        raise ValueError(f"num_experts={num_experts} and moe_layers={moe_layers} must both be >= 1")
    bad_k = [k for k in moe_top_ks if k is not None and not 1 <= k <= num_experts]
    if bad_k:
        raise ValueError(f"moe_top_ks {bad_k} lie outside 1..num_experts={num_experts}")
    rng = np.random.default_rng(seed)
    temps = np.asarray(temperatures, dtype=np.float64)
    budgets = np.array([-1 if b is None else int(b) for b in thinking_budgets], dtype=np.int64)
    formats = np.array(list(quantizations), dtype=object)
    quant_penalty = np.array([_quant_penalty(q) for q in quantizations])
    top_ks = np.array([-1 if k is None else int(k) for k in moe_top_ks], dtype=np.int64)
    grid = (len(temps), len(budgets), len(formats), len(top_ks))
    n_cond = int(np.prod(grid))
    n_rows = n_cond * n_problems * n_samples
    t_of, b_of, q_of, k_of = np.unravel_index(np.arange(n_cond), grid)  # each condition's index on each axis

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
    temp_row = temps[t_of[cond]]
    budget_row = budgets[b_of[cond]]
    quant_row = quant_penalty[q_of[cond]]
    k_row = top_ks[k_of[cond]]
    moe_gap = np.where(k_row > 0, 1 - k_row / num_experts, 0.0)  # share of experts switched off
    prob = np.tile(np.repeat(np.arange(n_problems), n_samples), n_cond)
    sample_idx = np.tile(np.arange(n_samples), n_cond * n_problems)

    # Natural (uncapped) outcome: a sweet spot near T=0.7, worse far from it.
    logit = 0.9 - difficulty[prob] - 1.6 * (temp_row - 0.7) ** 2 - 1.2 * np.clip(temp_row - 1.0, 0, None)
    logit = logit - quant_row - 2.0 * moe_gap**2  # exactly unchanged (minus 0.0) without those axes
    correct = rng.random(n_rows) < 1 / (1 + np.exp(-logit))
    sigma = 0.5
    log_len = (
        np.log(mean_thinking_tokens) - sigma**2 / 2 - 0.2
        + 0.12 * level_centred[prob] + 0.4 * ~correct + 0.15 * (temp_row - 0.7)
        + sigma * rng.standard_normal(n_rows)
    )
    log_len = log_len + 0.15 * quant_row + 0.2 * moe_gap
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
    base = base * (1 + 0.1 * quant_row + 0.15 * moe_gap)
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

    # the (temperature, budget) runs keep the ids they had before the quantization and MoE axes
    run_ids = np.array([
        _run_id(model, task, float(temps[t_of[c]]), int(budgets[b_of[c]]),
                *(() if formats[q_of[c]] is None and top_ks[k_of[c]] < 0 else (formats[q_of[c]], int(top_ks[k_of[c]]))))
        for c in range(n_cond)
    ], dtype=object)
    frame = pl.DataFrame(
        {
            "run_id": run_ids[cond],
            "problem_id": np.char.add("p", np.char.zfill(prob.astype(str), 5)).astype(object),
            "sample_idx": sample_idx,
            "task": np.full(n_rows, task, dtype=object),
            "model": np.full(n_rows, model, dtype=object),
            "backend": np.full(n_rows, "synthetic", dtype=object),
            "quantization": pl.Series(list(quantizations), dtype=pl.Utf8).gather(q_of[cond]),
            "moe_top_k": pl.Series(np.where(k_row > 0, k_row, 0)).set(pl.Series(k_row <= 0), None),
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
            "pred": pl.Series(pred.tolist(), dtype=pl.Utf8),  # a list: polars cannot cast an object array led by None
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
    if (top_ks > 0).any():  # drawn last, so that the columns above do not depend on them
        frame = frame.with_columns(**_routing_columns(
            rng, k_row, n_tokens, n_thinking, n_answer, correct, num_experts, moe_layers
        ))
        order += ["expert_load", "router_entropy_thinking", "router_entropy_answer"]
    return frame.select(order).with_columns(
        pl.col("sample_idx", "seed", "thinking_budget", "wait_extensions", "n_tokens", "n_thinking_tokens",
               "n_answer_tokens", "level", "moe_top_k").cast(pl.Int64),
        pl.col("finish_reason").cast(pl.Utf8),
    )
