"""What every study shares: its parameters, the checks on them, running its conditions,
and the sample counts every table and figure reports.

`StudyParams` holds the parameters all studies take (model, backend, dtype, forward,
task, problems, samples, tokens, seed, bootstrap replicates, where figures go); each
study's `Params` extends it with its own knobs. `check_params` turns raw values (a
notebook's parameters, papermill's injected strings, a YAML sweep) into a checked
`Params` or raises one error naming each bad parameter, its value and what is valid.
`StudyParams.run_spec` is the one place a study's parameters become a `RunSpec`, so the
greedy rule (temperature 0 draws one sample) is applied once for every study.

This module draws nothing, and imports neither torch nor the runner at import time.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl

from thinklab.config import (BACKENDS, DTYPES, ENTROPY_ESTIMATORS, FORWARDS, BudgetSpec, GradingSpec, Mismatch,
                             ModelSpec, RunSpec, SamplingSpec, coerce)

FIGURE_FORMATS = ("html", "png", "svg", "pdf")
TRUNCATED = "length"  # the finish_reason of a sample cut off at max_tokens

# The columns that may tell conditions apart in a study's table, in the order labels name them.
KNOBS = ("model", "task", "quantization", "moe_top_k", "temperature", "top_p", "thinking_budget", "wait_extensions")


# --------------------------------------------------------------------------- parameters


def rule(test: Callable[[Any], bool], valid: str) -> dict:
    """Field metadata for `check_params`: `test(value)` must hold; `valid` says what would."""
    return {"test": test, "valid": valid}


def choice(*options: Any) -> dict:
    return rule(lambda v: v in options, "one of " + ", ".join(map(repr, options)))


def positive() -> dict:
    return rule(lambda v: v >= 1, "a positive int")


def non_empty(valid: str) -> dict:
    return rule(lambda v: len(v) > 0, valid)


def grid(item: dict, allow_empty: bool = False) -> dict:
    """A list parameter: every non-None element passes `item`; non-empty unless `allow_empty`."""
    return rule(lambda v: (allow_empty or len(v) > 0) and all(x is None or item["test"](x) for x in v),
                f"a {'' if allow_empty else 'non-empty '}list, each element {item['valid']}")


@dataclass(frozen=True)
class StudyParams:
    """The parameters every study takes. A study's own `Params` adds its knobs after these."""

    model: str = field(default="default", metadata=non_empty("a model name, hub id or local directory"))
    backend: str = field(default="hf", metadata=choice(*BACKENDS))
    dtype: str = field(default="auto", metadata=choice(*DTYPES))
    forward: str = field(default="auto", metadata=choice(*FORWARDS))
    entropy_top_k: int | None = field(default=None, metadata=rule(lambda v: v >= 1, "a positive int, or None for exact"))
    entropy_estimator: str = field(default="lower", metadata=choice(*ENTROPY_ESTIMATORS))
    lenient_truncated: bool = False
    task: str = field(default="rg:basic_arithmetic", metadata=non_empty("a task name (see `thinklab tasks`)"))
    n_problems: int = field(default=8, metadata=positive())
    n_samples: int = field(default=1, metadata=positive())
    max_tokens: int = field(default=128, metadata=positive())
    seed: int = field(default=0, metadata=rule(lambda v: v >= 0, "an int >= 0"))
    n_boot: int = field(default=1000, metadata=positive())
    figure_formats: tuple[str, ...] = field(default=("html", "png"), metadata=grid(choice(*FIGURE_FORMATS), allow_empty=True))
    # where figures go: figures/<study>/<figure_subdir>/<runs>/ (`thinklab batch` sets both per set)
    figure_subdir: str = ""
    figure_log: str = ""

    def run_spec(
        self,
        temperature: float,
        top_p: float = 1.0,
        *,
        quantization: str | None = None,
        moe_top_k: int | None = None,
        budget: BudgetSpec | None = None,
    ) -> RunSpec:
        """The RunSpec of one condition: these parameters with one setting of the study's knobs."""
        return RunSpec(
            model=ModelSpec(name=self.model, backend=self.backend, dtype=self.dtype, forward=self.forward,
                            quantization=quantization, moe_top_k=moe_top_k,
                            entropy_top_k=self.entropy_top_k, entropy_estimator=self.entropy_estimator),
            task=self.task,
            n_problems=self.n_problems,
            task_seed=self.seed,
            sampling=SamplingSpec(temperature=temperature, top_p=top_p,
                                  n=samples_per_problem(temperature, self.n_samples),
                                  max_tokens=self.max_tokens, seed=self.seed),
            budget=budget or BudgetSpec(),
            grading=GradingSpec(lenient_truncated=self.lenient_truncated),
        )


def samples_per_problem(temperature: float, n_samples: int) -> int:
    """Greedy decoding (temperature 0) draws one sample per problem: n of them would all be equal."""
    return 1 if temperature == 0 else n_samples


TEMPERATURE = rule(lambda v: math.isfinite(v) and v >= 0, "a finite float >= 0 (0 is greedy)")
TOP_P = rule(lambda v: 0 < v <= 1, "a float in (0, 1]")


# --------------------------------------------------------------------------- checking raw values


class ParameterError(ValueError):
    """One or more study parameters are of the wrong type or out of range."""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    return str(tp)


def _accepts_str(tp: Any) -> bool:
    unions = (typing.Union, types.UnionType)
    return tp is str or (typing.get_origin(tp) in unions and str in typing.get_args(tp))


def _literal(text: str) -> Any:
    """A string papermill or YAML left unparsed, read as a Python literal (never evaluated as code)."""
    return ast.literal_eval(text.strip())


def check_params(cls: type[StudyParams], values: Mapping[str, Any], injected: Iterable[str] = ()) -> StudyParams:
    """`cls` built from `values` (name -> raw value; missing names keep their defaults).

    Each value is checked against its field's type and rule. A string given for a
    non-string parameter (papermill's `-p budgets '[8]'`, YAML's `1e3`) is read with
    `ast.literal_eval`, which accepts literals only. Names in `injected` that are not
    parameters of `cls` are errors too. Raises ParameterError listing every bad
    parameter with its value and what would be valid.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    problems = []
    unknown = sorted(set(injected) - set(fields))
    if unknown:
        problems.append(f"unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(fields)}")
    checked = {}
    for name, raw in values.items():
        if name not in fields:
            continue
        tp, check = hints[name], fields[name].metadata
        valid = check["valid"] if check else _type_name(tp)
        value = raw
        if isinstance(raw, str) and not _accepts_str(tp):
            try:
                value = _literal(raw)
            except (ValueError, SyntaxError):
                problems.append(f"{name}={raw!r} is a string that is not a Python literal; valid: {valid}")
                continue
        try:
            value = coerce(tp, value, whole_float_as_int=True, finite=False)
        except Mismatch:
            problems.append(f"{name}={raw!r} is a {type(value).__name__}, not {_type_name(tp)}; valid: {valid}")
            continue
        if check and value is not None and not check["test"](value):
            problems.append(f"{name}={raw!r} is not valid; valid: {valid}")
            continue
        checked[name] = value
    if problems:
        raise ParameterError("bad study parameter(s):\n  " + "\n  ".join(problems))
    return cls(**checked)


PAPERMILL_HEADER = "# Parameters"  # the first line of the cell papermill injects after the parameters cell


def injected_names(history: Sequence[str]) -> list[str]:
    """Names assigned in the cells papermill injected, found in a kernel's input history (`In`)."""
    names: list[str] = []
    for source in history:
        if isinstance(source, str) and source.lstrip().startswith(PAPERMILL_HEADER):
            for node in ast.parse(source).body:
                if isinstance(node, ast.Assign):
                    names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return list(dict.fromkeys(names))


def notebook_params(cls: type[StudyParams], namespace: Mapping[str, Any]) -> StudyParams:
    """The checked parameters of a study notebook, from its namespace (`globals()`).

    Reads each parameter `cls` defines; an unknown name papermill injected (found in the
    kernel's input history) is an error, not papermill's warning.
    """
    values = {name: namespace[name] for name in (f.name for f in dataclasses.fields(cls)) if name in namespace}
    return check_params(cls, values, injected_names(namespace.get("In") or ()))


# --------------------------------------------------------------------------- running


def varying_knobs(specs: Sequence[RunSpec]) -> list[str]:
    """The knobs that differ between `specs`, by their sample-table column names."""
    values = {knob: {_knob(spec, knob) for spec in specs} for knob in KNOBS}
    return [knob for knob in KNOBS if len(values[knob]) > 1]


def _knob(spec: RunSpec, knob: str) -> Any:
    return {
        "model": spec.model.name, "task": spec.task, "quantization": spec.model.quantization,
        "moe_top_k": spec.model.moe_top_k, "temperature": spec.sampling.temperature, "top_p": spec.sampling.top_p,
        "thinking_budget": spec.budget.thinking_budget, "wait_extensions": spec.budget.wait_extensions,
    }[knob]


# How a condition header names each knob, and what a knob left unset (None) means.
KNOB_NAMES = {"quantization": "format", "moe_top_k": "top-k", "thinking_budget": "thinking budget",
              "wait_extensions": "Wait extensions"}
KNOB_NULLS = {"quantization": "baseline", "moe_top_k": "checkpoint's own", "thinking_budget": "uncapped"}


def condition_header(spec: RunSpec, knobs: Sequence[str]) -> str:
    """'format=int8-wo, temperature=0.6': the value of each knob in `knobs` for `spec`."""
    from thinklab.plots import value_label

    def value(knob: str) -> str:
        v = _knob(spec, knob)
        return KNOB_NULLS.get(knob, "none") if v is None else value_label(v)

    return ", ".join(f"{KNOB_NAMES.get(k, k)}={value(k)}" for k in knobs)


def run_conditions(specs: Sequence[RunSpec], progress: bool = True, runs_root: Path | str | None = None,
                   knobs: Sequence[str] = (), study: str | None = None, **run_options) -> pl.DataFrame:
    """Run (or load) every spec and return one long sample table across them. Each condition's
    header names `knobs` (the study's own) and every other knob that varies between `specs`.
    The runs on one model are generated together (`runner.run_many`), so the batch stays full
    across them; `run_options` (batch_size, chunk_problems) go to it."""
    from thinklab import runner

    if progress:
        named = list(dict.fromkeys([*knobs, *varying_knobs(specs)])) or ["model"]
        for i, spec in enumerate(specs):
            print(f"[thinklab] condition {i + 1}/{len(specs)}: {condition_header(spec, named)} "
                  f"({runner.run_dir(spec, runs_root)})")
    frames = runner.run_many(specs, runs_root=runs_root, progress=progress, study=study, **run_options)
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def run_records(specs: Sequence[RunSpec], runs_root: Path | str | None = None) -> pl.DataFrame:
    """What each condition's run recorded (through the run store): run_id, the knobs that
    vary, status, the forward that ran, entropy mode, generation seconds and, for a
    quantized run, its report (share of linear weights in low precision, bits per block
    weight, memory before and after in MB). One row per spec; null where not recorded."""
    from thinklab import runner
    from thinklab.store import RunStore

    knobs = varying_knobs(specs)
    rows = []
    for spec in specs:
        store = RunStore(runner.run_dir(spec, runs_root))  # the run's id names its directory
        meta = store.read_meta() if store.meta_path.is_file() else {}
        backend = meta.get("backend") or {}
        report = backend.get("quantization") or {}
        rows.append({
            "run_id": store.dir.name,
            **{k: str(_knob(spec, k)) for k in knobs},
            "status": meta.get("status", "not run"),
            "forward": backend.get("forward"),
            "entropy_mode": meta.get("entropy_mode"),
            "generate_seconds": meta.get("generate_seconds"),
            "share_low_precision_blocks": report.get("share_low_precision_blocks"),
            "bits_per_block_weight": report.get("bits_per_block_weight"),
            "memory_mb_before": _mb(report.get("memory_bytes_before")),
            "memory_mb_after": _mb(report.get("memory_bytes_after")),
        })
    schema = {"forward": pl.Utf8, "entropy_mode": pl.Utf8, "generate_seconds": pl.Float64,
              "share_low_precision_blocks": pl.Float64, "bits_per_block_weight": pl.Float64,
              "memory_mb_before": pl.Float64, "memory_mb_after": pl.Float64}
    return pl.DataFrame(rows, schema_overrides=schema)


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 1e6, 1)


# --------------------------------------------------------------------------- counts every table shows


def summary(df: pl.DataFrame, by: Sequence[str]) -> pl.DataFrame:
    """One row per condition: `by`..., n_problems, samples_per_problem (the most any problem
    has), n (samples), accuracy, truncated_share (finish_reason 'length': cut at max_tokens),
    mean_tokens."""
    by = list(by)
    keys = by or ["_all"]
    rows = df if by else df.with_columns(_all=pl.lit(0))
    per_problem = rows.group_by([*keys, "problem_id"]).agg(samples=pl.len())
    most = per_problem.group_by(keys).agg(n_problems=pl.len(), samples_per_problem=pl.col("samples").max())
    counts = rows.group_by(keys).agg(
        n=pl.len(),
        accuracy=pl.col("correct").cast(pl.Float64).mean(),
        truncated_share=(pl.col("finish_reason") == TRUNCATED).mean(),
        mean_tokens=pl.col("n_tokens").cast(pl.Float64).mean(),
    )
    return clean_floats(
        counts.join(most, on=keys, nulls_equal=True)
        .sort(keys, nulls_last=True)
        .select(*by, "n_problems", "samples_per_problem", "n", "accuracy", "truncated_share", "mean_tokens"),
        by,
    )


def clean_floats(frame: pl.DataFrame, columns: Sequence[str] | None = None) -> pl.DataFrame:
    """`frame` with its float32 knob columns (temperature, top_p) as the float64 values they were
    written as: 0.6, not 0.6000000238418579 (rounded to 6 decimals, below float32's noise)."""
    columns = [c for c in dict.fromkeys(columns if columns is not None else ("temperature", "top_p"))
               if c in frame.columns and frame[c].dtype == pl.Float32]
    if not columns:
        return frame
    return frame.with_columns(pl.col(c).cast(pl.Float64).round(6) for c in columns)


def graded(frame: pl.DataFrame, column: str = "correct") -> pl.DataFrame:
    """`frame` with `graded`: "correct" or "incorrect", the legend words of every study."""
    return frame.with_columns(
        graded=pl.when(pl.col(column).cast(pl.Boolean)).then(pl.lit("correct")).otherwise(pl.lit("incorrect")))


def with_outcome(frame: pl.DataFrame, df: pl.DataFrame) -> pl.DataFrame:
    """`frame` (with a boolean `correct`) with `outcome`: 'correct (n=N)' or 'incorrect (n=N)', N the
    samples of `df` with that outcome, the legend entries of every correct/incorrect split."""
    counts = (df.group_by(pl.col("correct").cast(pl.Boolean)).agg(_n=pl.len())
              .with_columns(outcome=pl.format("{} (n={})", pl.when(pl.col("correct")).then(pl.lit("correct"))
                                              .otherwise(pl.lit("incorrect")), "_n")).drop("_n"))
    return (frame.with_columns(pl.col("correct").cast(pl.Boolean))
            .join(counts, on="correct", how="left", nulls_equal=True, maintain_order="left"))


def with_truncation(frame: pl.DataFrame, df: pl.DataFrame, keys: Sequence[str]) -> pl.DataFrame:
    """`frame` with `truncated_share` (finish_reason 'length') of its group in `df` joined on `keys`."""
    keys = list(keys)
    share = df.group_by(keys).agg(truncated_share=(pl.col("finish_reason") == TRUNCATED).mean())
    return frame.join(share, on=keys, how="left", nulls_equal=True, maintain_order="left")


def caption(summary_frame: pl.DataFrame) -> str:
    """A figure's count line from `summary`: problems x samples, conditions, the truncated share."""
    if summary_frame.is_empty():
        return "n = 0 samples"
    problems = summary_frame["n_problems"].max()
    low_n, high_n = summary_frame["samples_per_problem"].min(), summary_frame["samples_per_problem"].max()
    samples = f"{low_n} sample{'s' if high_n > 1 else ''}" if low_n == high_n else f"{low_n}–{high_n} samples"
    n_conditions = summary_frame.height
    total = int(summary_frame["n"].sum())
    truncated = (summary_frame["truncated_share"] * summary_frame["n"]).sum() / max(total, 1)
    low, high = summary_frame["truncated_share"].min(), summary_frame["truncated_share"].max()
    spread = f" ({low:.0%}–{high:.0%} per condition)" if n_conditions > 1 and high > low else ""
    conditions = f" × {n_conditions} conditions" if n_conditions > 1 else ""
    return (f"n = {problems} problem{'s' if problems != 1 else ''} × {samples}{conditions} = {total}; "
            f"truncated at max_tokens: {truncated:.0%}{spread}")
