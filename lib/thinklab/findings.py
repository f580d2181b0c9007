"""The findings sweep and its report: `thinklab findings [--generate]`.

A `FindingsPlan` names every run the seven findings need (see
`thinklab.analysis.findings` for the findings and their statistics). Conditions share
runs wherever their specs coincide:

- the *base* run of each task (the plan's temperature, `temperature_samples` samples,
  uncapped) serves (a), (b) and (c), is the temperature grid's point at that temperature
  for (d), the uncapped point of the budget curve (g), and the baseline of (e);
- the budget, quantization and MoE runs draw `n_samples` samples; since a sample's seed
  depends only on (seed, problem, sample index), their samples pair with the base run's
  first `n_samples`, and the comparisons join on (problem, sample index, seed).

`generate(plan)` runs every spec through `thinklab.runner.run`, which stores each run
under its content-addressed directory and resumes a killed run where it stopped, so the
sweep can be carried across sittings by running the same command again. `write_report`
reads the stored runs whose specs the plan names (only complete ones), computes the
findings, exports one figure per finding and writes FINDINGS.md. The report is generated,
never edited by hand.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from thinklab import paths
from thinklab.analysis import findings as F
from thinklab.config import BudgetSpec, ModelSpec, RunSpec, SamplingSpec
from thinklab.models import OFFLINE
from thinklab.store import RunStore


def _run_id(spec: RunSpec) -> str:
    from thinklab import runner

    return runner.run_id(spec)


__all__ = ["FindingsPlan", "PRESETS", "plan_from_options", "generate", "compute", "write_report"]

FINDING_KEYS = tuple("abcdefg")


@dataclass(frozen=True)
class FindingsPlan:
    """Every knob of the findings sweep; the defaults are the scale issue 18 asks for."""

    model: str = "qwen2.5-0.5b"  # the model of (a)-(e) and (g)
    tasks: tuple[str, ...] = ("gsm8k", "math500:level=1,2,3")  # where its accuracy is not near zero
    n_problems: int = 200  # per task (and per MoE task)
    n_samples: int = 4  # per problem in the budget, quantization and MoE runs
    temperature_samples: int = 8  # per problem in the base run and the temperature grid
    temperature: float = 0.7  # the base run's temperature, shared by every condition but (d)'s grid
    temperatures: tuple[float, ...] = (0.4, 0.7, 1.0)  # (d)
    budgets: tuple[int | None, ...] = (64, 128, 256, 512, None)  # (g), thinking tokens; None = uncapped (the base run)
    max_tokens: int = 768  # cap on the generated tokens of every sample but the MoE runs
    moe_max_tokens: int = 256  # (f)'s cap: the dense SmolLM2 answers basic arithmetic well within it, while
    # the low-k models rarely stop at all and would decode every sample to the cap
    answer_budget: int = 64  # tokens allowed after a forced answer cue
    int8_format: str = "int8-wo"  # (e), see docs/quantization.md
    four_bit_format: str = "int4-wo"  # (e)
    moe_model: str = "smollm2-135m-moe16"  # (f): the offline MoEfied SmolLM2 (no MoE weights ship offline)
    moe_tasks: tuple[str, ...] = ("rg:basic_arithmetic",)  # (f): where the dense SmolLM2 is not near zero
    top_k_values: tuple[int, ...] = (4, 8, 12, 16)  # (f), active experts per token; the largest is the reference
    backend: str = "hf"
    dtype: str = "auto"  # of every run's model: "auto" is float32 on CPUs; "bfloat16" runs the CPU's bf16 GEMMs
    seed: int = 0  # picks the problems and every sample's seed

    def __post_init__(self) -> None:
        for name in ("tasks", "temperatures", "budgets", "moe_tasks", "top_k_values"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name}={value!r} is not valid; give a list of values")
            object.__setattr__(self, name, tuple(value))
        if not self.tasks:
            raise ValueError("tasks=() is not valid; give at least one task")
        if self.n_samples < 2:
            raise ValueError(f"n_samples={self.n_samples} is not valid; (a) needs at least 2 samples per problem")
        if self.temperature_samples < self.n_samples:
            raise ValueError(f"temperature_samples={self.temperature_samples} is not valid; it must be at least "
                             f"n_samples={self.n_samples} (the base run serves both)")
        if self.temperature <= 0 or any(t <= 0 for t in self.temperatures):
            raise ValueError(f"temperature={self.temperature}, temperatures={self.temperatures} are not valid; "
                             "sampled findings need temperatures above 0")
        if len(set(self.temperatures) | {self.temperature}) < 2:
            raise ValueError(f"temperatures={self.temperatures} is not valid; (d) needs at least two temperatures")
        if len(set(self.budgets)) < 2 or any(b is not None and b < 1 for b in self.budgets):
            raise ValueError(f"budgets={self.budgets} is not valid; give at least two budgets, positive ints or None")
        if self.max_tokens < 1 or self.moe_max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}, moe_max_tokens={self.moe_max_tokens} are not valid; "
                             "give positive numbers of tokens")
        if self.int8_format == self.four_bit_format:
            raise ValueError(f"int8_format and four_bit_format are both {self.int8_format!r}; give two formats")
        from thinklab.config import DTYPES

        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
        if len(set(self.top_k_values)) < 2 or any(k < 1 for k in self.top_k_values):
            raise ValueError(f"top_k_values={self.top_k_values} is not valid; give at least two positive ints")

    def replace(self, **changes) -> "FindingsPlan":
        return dataclasses.replace(self, **changes)

    # -- the conditions ------------------------------------------------------------------
    def _spec(self, task: str, *, model: str | None = None, temperature: float | None = None, n: int | None = None,
              budget: int | None = None, quantization: str | None = None, moe_top_k: int | None = None,
              max_tokens: int | None = None) -> RunSpec:
        return RunSpec(
            model=ModelSpec(name=model or self.model, backend=self.backend, quantization=quantization,
                            moe_top_k=moe_top_k, dtype=self.dtype),
            task=task,
            n_problems=self.n_problems,
            task_seed=self.seed,
            sampling=SamplingSpec(temperature=self.temperature if temperature is None else temperature,
                                  n=n or self.n_samples, max_tokens=max_tokens or self.max_tokens, seed=self.seed),
            budget=BudgetSpec(thinking_budget=budget, answer_budget=self.answer_budget),
        )

    def base(self, task: str) -> RunSpec:
        return self._spec(task, n=self.temperature_samples)

    def temperature_runs(self, task: str) -> dict[float, RunSpec]:
        grid = sorted(set(self.temperatures) | {self.temperature})
        return {t: self._spec(task, temperature=t, n=self.temperature_samples) for t in grid}

    def budget_runs(self, task: str) -> dict[int | None, RunSpec]:
        return {b: self.base(task) if b is None else self._spec(task, budget=b) for b in self.budgets}

    def quantization_runs(self, task: str) -> dict[str | None, RunSpec]:
        return {None: self.base(task), self.int8_format: self._spec(task, quantization=self.int8_format),
                self.four_bit_format: self._spec(task, quantization=self.four_bit_format)}

    def moe_runs(self, task: str) -> dict[int, RunSpec]:
        return {k: self._spec(task, model=self.moe_model, moe_top_k=k, max_tokens=self.moe_max_tokens)
                for k in sorted(set(self.top_k_values))}

    def finding_runs(self, key: str) -> tuple[tuple[str, ...], Callable[[str], dict]]:
        """(its tasks, task -> {condition: spec}): the runs finding `key` reads."""
        if key in ("a", "b", "c"):
            return self.tasks, lambda task: {None: self.base(task)}
        by_key = {"d": (self.tasks, self.temperature_runs), "e": (self.tasks, self.quantization_runs),
                  "f": (self.moe_tasks, self.moe_runs), "g": (self.tasks, self.budget_runs)}
        if key not in by_key:
            raise ValueError(f"finding {key!r} is not valid; choose among {', '.join(FINDING_KEYS)}")
        return by_key[key]

    def summary(self, only: Sequence[str] | None = None) -> str:
        """How many runs and samples the plan (or the runs of the findings `only`) asks for."""
        specs = self.specs(only)
        samples = sum(s.n_problems * s.sampling.n for s in specs)
        caps = "/".join(str(c) for c in sorted({s.sampling.max_tokens for s in specs}))
        return f"{len(specs)} runs, {samples} samples at up to {caps} tokens each"

    def specs(self, only: Sequence[str] | None = None) -> list[RunSpec]:
        """Every run, each once, the dense model's first (one model load), the base runs leading;
        with `only` (finding keys), just the runs those findings read."""
        if only is not None:
            wanted = set()
            for key in only:
                tasks, runs_of = self.finding_runs(key)
                wanted.update(spec for task in tasks for spec in runs_of(task).values())
            return [spec for spec in self.specs() if spec in wanted]
        ordered: dict[RunSpec, RunSpec] = {}
        for task in self.tasks:
            ordered.setdefault(self.base(task), self.base(task))
        for task in self.tasks:
            for group in (self.quantization_runs(task), self.budget_runs(task), self.temperature_runs(task)):
                for spec in group.values():
                    ordered.setdefault(spec, spec)
        for task in self.moe_tasks:
            for spec in self.moe_runs(task).values():
                ordered.setdefault(spec, spec)
        return list(ordered.values())


PRESETS = {
    "full": FindingsPlan(),
    # a few minutes on 2 CPU cores: proves the pipeline end to end, resolves nothing
    "smoke": FindingsPlan(model="default", tasks=("rg:basic_arithmetic",), n_problems=6, n_samples=2,
                          temperature_samples=4, temperatures=(0.7, 1.0), budgets=(16, 32, None), max_tokens=96, moe_max_tokens=96,
                          answer_budget=16, top_k_values=(8, 16)),
}


def plan_from_options(preset: str = "full", **changes) -> FindingsPlan:
    """A preset (`full`, the issue's scale; `smoke`, tiny) with some fields changed."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not valid; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset].replace(**{k: v for k, v in changes.items() if v is not None})


# --------------------------------------------------------------------------- generating


def _describe(spec: RunSpec) -> str:
    knobs = [spec.model.name, spec.task, f"T={spec.sampling.temperature:g}", f"n={spec.sampling.n}"]
    if spec.budget.thinking_budget is not None:
        knobs.append(f"budget={spec.budget.thinking_budget}")
    if spec.model.quantization:
        knobs.append(spec.model.quantization)
    if spec.model.moe_top_k is not None:
        knobs.append(f"top-k={spec.model.moe_top_k}")
    return ", ".join(knobs)


def _check_formats(plan: FindingsPlan) -> None:
    """Refuse a quantization format this host cannot run before hours of other runs."""
    if plan.backend != "hf":
        return
    import torch

    from thinklab.models import quantization

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for fmt in (plan.int8_format, plan.four_bit_format):
        quantization.check(fmt, device)


def generate(plan: FindingsPlan, runs_root: Path | str | None = None, progress: bool = True,
             block: int | None = 20, only: Sequence[str] | None = None) -> list[Path]:
    """Run (or resume, or load) every run of the plan (with `only`, the runs of those
    findings: a sitting too short for the whole sweep can finish some findings first);
    return their directories.

    The sweep goes `block` problems at a time: every run generates its first block, then
    every run its second, and so on, so that a sweep stopped (or reported on) before the end
    holds the same problems under every condition, and its interim report compares them
    paired. Within a block the runs on one model go to its backend together
    (`runner.run_many`), so its batch stays full across them. `block=None`, or runs on a
    single model: each model's runs in one pass, problem by problem."""
    from thinklab import runner

    specs = plan.specs(only)
    if any(spec.model.quantization for spec in specs):
        _check_formats(plan)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block={block!r} is not valid; give a positive number of problems, or None")
    if progress:
        print(f"[findings] {plan.summary(only)}; a killed sweep resumes where it stopped", file=sys.stderr)
    for i, spec in enumerate(specs):
        if progress:
            print(f"[findings] run {i + 1}/{len(specs)} {_run_id(spec)}: {_describe(spec)}", file=sys.stderr)
    by_model: dict = {}
    for spec in specs:
        by_model.setdefault(dataclasses.replace(spec.model, moe_top_k=None), []).append(spec)
    _log_sitting(Path(runs_root) if runs_root else paths.runs_dir())
    largest = max(s.n_problems for s in specs)
    # Blocks alternate between models. Runs on one model need none: problem-major order alone
    # keeps them on the same problems, and each block's end would drain the batch for nothing.
    whole = block is None or len(by_model) == 1
    ends = [largest] if whole else list(range(block, largest, block)) + [largest]
    for end in ends:
        if progress and not whole:
            print(f"[findings] problems up to {end} of {largest}", file=sys.stderr)
        for group in by_model.values():
            runner.run_many(group, runs_root=runs_root, progress=progress, study="findings", order="problems",
                            upto=end)
    return [runner.run_dir(spec, runs_root) for spec in specs]


SITTINGS = "findings-sittings.jsonl"


def _log_sitting(root: Path) -> None:
    """Note when this sitting of the sweep started; the report's wall time is, per sitting,
    from its start to the last part written before the next sitting (a killed sitting
    writes no end)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / SITTINGS, "a", encoding="utf-8") as f:
        f.write(json.dumps({"started": time.time(), "pid": os.getpid()}) + "\n")


def sweep_seconds(root: Path, parts: list[Path]) -> tuple[float, int]:
    """(seconds, sittings): the sweep's generation wall time from its sittings' starts and its
    parts' write times. Time a sitting spent paused counts; a sitting that wrote none of
    these parts (another plan's sweep in the same store) is not counted."""
    try:
        starts = sorted(json.loads(line)["started"] for line in (root / SITTINGS).read_text().splitlines()
                        if line.strip())
    except (OSError, ValueError, KeyError):
        return 0.0, 0
    written = sorted(p.stat().st_mtime for p in parts if p.is_file())
    total, counted = 0.0, 0
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else math.inf
        inside = [t for t in written if start <= t < end]
        if inside:
            total += inside[-1] - start
            counted += 1
    return total, counted


# --------------------------------------------------------------------------- reading the store


@dataclass
class StoredRun:
    spec: RunSpec
    directory: Path
    meta: dict | None
    frame: pl.DataFrame | None  # the rows of its written parts; None if it has none
    problem: str = ""  # why it cannot be used, or why it is interim
    complete: bool = False

    @property
    def usable(self) -> bool:
        return self.frame is not None and self.frame.height > 0


class Store:
    """The plan's runs as the store holds them, each read once."""

    def __init__(self, runs_root: Path | str | None = None):
        self.root = Path(runs_root) if runs_root else paths.runs_dir()
        self.runs: dict[str, StoredRun] = {}

    def get(self, spec: RunSpec) -> StoredRun:
        from thinklab import runner

        key = _run_id(spec)
        if key in self.runs:
            return self.runs[key]
        directory = runner.run_dir(spec, self.root)
        run = StoredRun(spec, directory, None, None)
        store = RunStore(directory)
        if not store.meta_path.is_file():
            run.problem = "not generated"
        else:
            try:
                run.meta = store.read_meta()
            except (OSError, ValueError) as exc:
                run.meta = {}
                run.problem = f"unreadable run.json ({exc})"
            if run.problem:
                pass
            elif run.meta.get("run_id") != key:
                run.problem = f"its run.json names another run ({run.meta.get('run_id')})"
            else:
                run.frame = store.load()
                run.complete = run.meta.get("status") == "complete"
                if not run.complete:
                    have = run.frame["problem_id"].n_unique() if run.frame.height else 0
                    run.problem = f"incomplete ({have} of {spec.n_problems} problems written)"
        self.runs[key] = run
        return run

    def frames(self, specs: dict, label: str) -> tuple[dict, list[str], str]:
        """The frames of `specs` (knob -> spec) if all have rows, else ({}, what is missing, "").

        While a sweep is under way its runs hold only their first problems: every frame is
        then cut to the problems that all of them hold, so that paired comparisons stay
        paired, and the third value says so ("" when every run is complete)."""
        runs = {knob: self.get(spec) for knob, spec in specs.items()}
        missing = [f"{label}, {_describe(r.spec)}: {r.problem} ({_run_id(r.spec)})"
                   for r in runs.values() if not r.usable]
        if missing:
            return {}, missing, ""
        frames = {knob: r.frame for knob, r in runs.items()}
        if all(r.complete for r in runs.values()):
            return frames, [], ""
        common = set.intersection(*(set(f["problem_id"].to_list()) for f in frames.values()))
        if not common:
            return {}, [f"{label}: its runs hold no problem in common yet"], ""
        frames = {knob: f.filter(pl.col("problem_id").is_in(sorted(common))) for knob, f in frames.items()}
        total = max(r.spec.n_problems for r in runs.values())
        return frames, [], (f"interim: {label} uses the {len(common)} of {total} problems that all its runs "
                            "hold so far (the sweep is not finished)")


def _stack(frames: list[pl.DataFrame]) -> pl.DataFrame | None:
    frames = [f for f in frames if f is not None and f.height]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def compute(plan: FindingsPlan, runs_root: Path | str | None = None, *, n_boot: int = 2000,
            seed: int = 0) -> tuple[dict[str, F.Finding], Store]:
    """Every finding from the stored runs the plan names. A task whose runs for a finding are
    not all complete is left out of that finding (and listed); with none left, "no data"."""
    store = Store(runs_root)
    results: dict[str, F.Finding] = {}

    def per_task(tasks, runs_of, label):
        """(frames per task, what is missing, interim notes) of the runs `runs_of(task)`."""
        found, missing, notes = {}, [], []
        for task in tasks:
            frames, gaps, note = store.frames(runs_of(task), f"{label} for {task}")
            missing += gaps
            if frames:
                found[task] = frames
                notes += [note] if note else []
        return found, missing, notes

    def finish(key, runs, build):
        found, missing, notes = runs
        if not found:
            results[key] = F.no_data(key, missing)
            return
        results[key] = build(found)
        results[key].notes += notes
        results[key].notes += [f"missing run, its task left out: {m}" for m in missing]

    base = per_task(*plan.finding_runs("a"), "base run")
    for key, build in (("a", F.finding_a), ("b", F.finding_b), ("c", F.finding_c)):
        finish(key, base, lambda found, build=build: build(
            _stack([r[None] for r in found.values()]), n_boot=n_boot, seed=seed))

    temps = per_task(*plan.finding_runs("d"), "temperature run")
    finish("d", temps, lambda found: F.finding_d(
        _stack([f for runs in found.values() for f in runs.values()]), n_boot=n_boot, seed=seed))

    quant = per_task(*plan.finding_runs("e"), "quantization run")
    finish("e", quant, lambda found: F.finding_e(
        _stack([r[None] for r in found.values()]), _stack([r[plan.int8_format] for r in found.values()]),
        _stack([r[plan.four_bit_format] for r in found.values()]), n_boot=n_boot, seed=seed))

    moe = per_task(*plan.finding_runs("f"), "MoE run")
    finish("f", moe, lambda found: F.finding_f(
        {k: _stack([r[k] for r in found.values()]) for k in sorted(set(plan.top_k_values))}, n_boot=n_boot, seed=seed))

    budgets = per_task(*plan.finding_runs("g"), "budget run")
    finish("g", budgets, lambda found: F.finding_g(
        {b: _stack([r[b] for r in found.values()]) for b in plan.budgets}, n_boot=n_boot, seed=seed))
    return {k: results[k] for k in FINDING_KEYS}, store


# --------------------------------------------------------------------------- figures


def _error_bars(frame: pl.DataFrame, y: str) -> dict:
    return dict(error_y=(frame["ci_high"] - frame[y]).to_list(), error_y_minus=(frame[y] - frame["ci_low"]).to_list())


FIGURE_TITLES = {
    "a": "accuracy of the sample kept, by rule",
    "b": "length of correct and incorrect samples",
    "c": "mean token entropy by phase",
    "d": "pass@k and maj@k, single temperatures and pooled",
    "e": "accuracy delta vs baseline by level",
    "f": "accuracy vs active experts",
    "g": "accuracy vs thinking budget",
}


def _figure(finding: F.Finding):
    """One plotly figure per finding from its tables (None when it has none)."""
    import plotly.express as px

    t = finding.tables
    title = f"({finding.key}) {FIGURE_TITLES[finding.key]} ({finding.source})"
    if finding.key == "a" and "selection" in t:
        frame = t["selection"]
        fig = px.bar(frame, x="method", y="accuracy", **_error_bars(frame, "accuracy"))
        fig.update_layout(yaxis_title="accuracy (95% CI over problems)")
    elif finding.key == "b" and "lengths" in t:
        frame = t["lengths"].with_columns(
            graded=pl.when(pl.col("correct")).then(pl.lit("correct")).otherwise(pl.lit("incorrect")))
        fig = px.box(frame, x="task", y="n_tokens", color="graded", points="outliers")
        fig.update_layout(yaxis_title="generated tokens")
    elif finding.key == "c" and "phase_entropy" in t:
        frame = t["phase_entropy"].filter(pl.col("phase") != "all").with_columns(
            graded=pl.when(pl.col("correct")).then(pl.lit("correct")).otherwise(pl.lit("incorrect")))
        fig = px.bar(frame, x="phase", y="mean_entropy", color="graded", barmode="group", error_y="std",
                     hover_data=["n"])
        fig.update_layout(yaxis_title="mean token entropy (nats, ± std over samples)")
    elif finding.key == "d" and "pooled_voting" in t:
        frame = t["pooled_voting"].with_columns(
            condition=pl.when(pl.col("scheme") == "single")
            .then(pl.format("T={}", pl.col("temperature").round(2)))
            .otherwise(pl.col("scheme")))
        long = frame.unpivot(index=["condition", "k"], on=["pass_at_k", "maj_at_k"], variable_name="metric")
        fig = px.bar(long, x="condition", y="value", color="metric", barmode="group")
        fig.update_layout(yaxis_title=f"mean over problems at k = {frame['k'].max()}")
    elif finding.key == "e" and "deltas_by_level" in t:
        frame = t["deltas_by_level"].with_columns(
            level=pl.col("level").cast(pl.Utf8).fill_null("none"))
        fig = px.bar(frame, x="level", y="delta", color="format", barmode="group", **_error_bars(frame, "delta"))
        fig.update_layout(yaxis_title="accuracy delta vs baseline (paired, 95% CI)", xaxis_title="difficulty level")
    elif finding.key == "f" and "accuracy_vs_k" in t:
        frame = t["accuracy_vs_k"].sort("moe_top_k")
        fig = px.line(frame, x="moe_top_k", y="estimate", markers=True, **_error_bars(frame, "estimate"))
        fig.update_layout(xaxis_title="active experts per token (top-k)", yaxis_title="accuracy (95% CI)")
    elif finding.key == "g" and "accuracy_vs_budget" in t:
        frame = t["accuracy_vs_budget"].with_columns(
            budget=pl.col("thinking_budget").cast(pl.Utf8).fill_null("uncapped"))
        fig = px.line(frame, x="budget", y="accuracy", markers=True, hover_data=["mean_thinking_tokens"],
                      **_error_bars(frame, "accuracy"))
        fig.update_layout(xaxis_title="thinking budget (tokens)", yaxis_title="accuracy (95% CI)")
    else:
        return None
    fig.update_layout(title=dict(text=title, font=dict(size=15)))
    return fig


def _export_figures(findings: dict[str, F.Finding], figures_dir: Path) -> tuple[dict[str, list[Path]], str]:
    from thinklab import plots

    status = plots.static_export_status()
    formats = ("png", "html") if status == "ok" else ("html",)
    out = {}
    for key, finding in findings.items():
        fig = _figure(finding)
        out[key] = [] if fig is None else plots.export(fig, f"finding_{key}", "findings", formats=formats,
                                                       out_dir=figures_dir)
    return out, status


# --------------------------------------------------------------------------- the report


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    digits = 1 if unit == "tokens" else 3
    return f"{value:+.{digits}f}"


def _ci(stat: F.Statistic) -> str:
    if stat.ci_low is None:
        return "-"
    return f"[{_fmt(stat.ci_low, stat.unit)}, {_fmt(stat.ci_high, stat.unit)}]"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _stat_row(stat: F.Statistic, label: str | None = None) -> str:
    return "| " + " | ".join(_cell(c) for c in (
        label or stat.name,
        _fmt(stat.estimate, stat.unit) + (f" {stat.unit}" if stat.unit and stat.estimate is not None else ""),
        _ci(stat), str(stat.n_problems), str(stat.n_samples), _share(stat.truncated_share),
        stat.verdict or "(context)", stat.remarks)) + " |"


STAT_HEADER = ("| statistic | estimate | 95% CI | problems | samples | truncated | verdict | note |\n"
               "|---|---|---|---|---|---|---|---|")


def _markdown_table(frame: pl.DataFrame) -> str:
    drop = [c for c in frame.columns if frame.schema[c].is_nested()]
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   tbl_rows=-1, tbl_cols=-1, float_precision=3, fmt_str_lengths=60, tbl_width_chars=1000):
        return str(frame.drop(drop))


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m {seconds % 60:02d}s"


def _model_description(name: str) -> str:
    """What its build manifest says a derived model is (the offline MoE says it plainly), else its name."""
    from thinklab import models

    try:
        manifest = json.loads((paths.models_dir() / name / models.MANIFEST).read_text())
    except (OSError, ValueError):
        return f"`{name}`"
    description = manifest.get("description")
    return f"`{name}` ({description})" if description else f"`{name}`"


def render(plan: FindingsPlan, findings: dict[str, F.Finding], store: Store, figures: dict[str, list[Path]],
           figure_status: str, out: Path, command: str) -> str:
    """FINDINGS.md as text."""
    used = [r for r in store.runs.values() if r.usable]
    interim = [r for r in used if not r.complete]
    seconds, sittings = sweep_seconds(store.root, [p for r in used for p in r.directory.glob("part-*.parquet")])
    commits = sorted({str(c) for r in used for c in ((r.meta or {}).get("git_commits")
                                                     or [(r.meta or {}).get("git_commit")]) if c})
    forwards = sorted({str(((r.meta or {}).get("resolved") or {}).get("forward")) for r in used
                       if ((r.meta or {}).get("resolved") or {}).get("forward")})
    frames = [r.frame for r in used]
    n_samples = sum(f.height for f in frames)
    truncated = (sum(int((f["finish_reason"] == "length").sum()) for f in frames) / n_samples) if n_samples else None
    grid = sorted(set(plan.temperatures) | {plan.temperature})
    censored = [f"({key}) {_share(f.primary.truncated_share)}" for key, f in findings.items()
                if f.primary.truncated_share is not None and f.primary.truncated_share >= 0.10]
    lines = [
        "# Findings: the seed papers' claims, measured",
        "",
        f"Generated by `{command}` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from the stored runs; "
        "do not edit by hand: rerun the command to regenerate it.",
        "",
        *([f"> **Interim report: the sweep is not finished.** {len(interim)} of its runs hold only their first "
           "problems; each comparison below uses the problems that all of its runs hold (the notes under each "
           "finding say how many), so intervals are wider than the full sweep's will be. Continue the sweep with "
           f"`{_generate_command(command)}` (it resumes, and writes this report again).", ""] if interim else []),
        f"- **Model**: `{plan.model}` for (a)-(e) and (g); for (f) {_model_description(plan.moe_model)}"
        + (": not a trained MoE and no compute saved; it measures what accuracy costs when each token keeps only "
           "k of the dense model's neuron groups." if plan.moe_model in OFFLINE else "."),
        f"- **Precision**: dtype `{plan.dtype}`"
        + (" (float32 on CPUs)" if plan.dtype == "auto" else "")
        + (" (on CPUs: GEMM weights and inputs rounded to bf16, sums and all else in float32)"
           if plan.dtype == "bfloat16" else "")
        + f"; forward {', '.join(f'`{x}`' for x in forwards) or '-'}.",
        f"- **Tasks**: {', '.join(f'`{t}`' for t in plan.tasks)} ({plan.n_problems} problems each); "
        f"(f) on {', '.join(f'`{t}`' for t in plan.moe_tasks)}.",
        f"- **Sampling**: temperature {plan.temperature:g} (grid {', '.join(f'{t:g}' for t in grid)} for (d)), "
        f"{plan.temperature_samples} samples per problem in the base and temperature runs, {plan.n_samples} in the "
        f"budget, quantization and MoE runs; max_tokens {plan.max_tokens} ({plan.moe_max_tokens} for (f)); "
        f"thinking budgets "
        f"{', '.join(_budget(b) for b in plan.budgets)}; formats {plan.int8_format}, {plan.four_bit_format}; "
        f"top-k {', '.join(map(str, sorted(set(plan.top_k_values))))}; backend {plan.backend}; seed {plan.seed}.",
        f"- **Runs**: {len(used) - len(interim)} of {len(store.runs)} complete"
        + (f", {len(interim)} under way" if interim else "") + f", {n_samples} samples, "
        f"{_share(truncated)} cut off at their cap.",
        *([f"- **More than 10% of the samples were cut off at their cap** in {', '.join(censored)}: their "
           "lengths and answers are censored (raise --max-tokens, or --moe-max-tokens for (f); in (f) the "
           "cap is also where a damaged model that never stops ends)."] if censored else []),
        f"- **Wall time of the sweep**: {_duration(seconds)} of generation over {sittings} sitting(s) (per "
        f"sitting, from `thinklab findings --generate` starting to its last part written, time paused "
        f"included)."
        if sittings else
        f"- **Wall time of the runs** (sum of `generate_seconds` in their run.json; runs generated together "
        f"overlap): {_duration(sum(float((r.meta or {}).get('generate_seconds') or 0) for r in used))}.",
        f"- **Commit** that generated the runs: {', '.join(f'`{c}`' for c in commits) or '-'}; "
        f"of this report: `{_report_commit()}`.",
        "- **Intervals**: 95% percentile bootstrap over problems, paired where the comparison is paired (where the "
        "best of m temperatures or budgets is chosen on the same data, Bonferroni-widened to 1 - 0.05/m); "
        "**verdict** computed by code: *holds* (interval excludes 0 in the claim's direction), *reversed* "
        "(excludes 0 the other way), *not resolved* (contains 0, or fewer than 10 problems), *no data* (runs missing).",
        "",
        "| | finding | source | statistic | estimate | 95% CI | problems | samples | truncated | verdict "
        "| other parts | figure |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, f in findings.items():
        s = f.primary
        others = "; ".join(f"{p.name}: {p.verdict}" for p in f.parts if p.direction is not None)
        fig = ", ".join(f"[{p.suffix[1:]}]({_relative(p, out.parent)})" for p in figures.get(key, []))
        lines.append("| " + " | ".join(_cell(c) for c in (
            key, f.claim, f.source, s.name, _fmt(s.estimate, s.unit), _ci(s), str(s.n_problems), str(s.n_samples),
            _share(s.truncated_share), f"**{s.verdict}**", others or "-", fig or "-")) + " |")
    if figure_status != "ok":
        lines += ["", f"Figures are HTML only: {figure_status}."]
    for key, f in findings.items():
        lines += ["", f"## ({key}) {f.claim}", "", f"Source: {f.source}.", ""]
        s = f.primary
        if s.definition:
            lines += [f"**Statistic**: {s.name}: {s.definition}. The claim predicts it is "
                      f"{_direction(s)}.", ""]
        lines += [STAT_HEADER, _stat_row(s)]
        for part in f.parts:
            lines.append(_stat_row(part))
        if f.parts:
            lines += [""] + [f"- *{p.name}*: {p.definition}." for p in f.parts if p.definition]
        if f.by_task:
            lines += ["", "Per task (the primary statistic):", "", STAT_HEADER]
            lines += [_stat_row(stat, f"{task}") for task, stat in f.by_task.items()]
        for name, table in f.tables.items():
            if name in ("lengths", "entropy_length"):
                continue  # per-sample tables feed the figures only
            lines += ["", f"`{name}`:", "", _markdown_table(table)]
        if figures.get(key):
            lines += ["", "Figure: " + ", ".join(f"[{_relative(p, out.parent)}]({_relative(p, out.parent)})"
                                                 for p in figures[key])]
        if f.notes:
            lines += [""] + [f"- {n}" for n in f.notes]
    lines += ["", "## Runs", "",
              "| run | spec | problems | samples | truncated | generate_seconds | forward | commit | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in store.runs.values():
        meta = r.meta or {}
        frame = r.frame
        lines.append("| " + " | ".join(_cell(str(c)) for c in (
            f"`{_run_id(r.spec)}`", _describe(r.spec),
            frame["problem_id"].n_unique() if frame is not None else "-",
            frame.height if frame is not None else "-",
            _share(float((frame["finish_reason"] == "length").mean())) if frame is not None and frame.height else "-",
            meta.get("generate_seconds", "-"), (meta.get("backend") or {}).get("forward", "-"),
            meta.get("git_commit", "-"),
            "complete" if r.complete else r.problem)) + " |")
    return "\n".join(lines) + "\n"


def _generate_command(command: str) -> str:
    """The command that continues the sweep this report's command reads (the same plan flags)."""
    words = [w for w in command.split() if w != "--generate"]
    cut = next((i + 1 for i, w in enumerate(words) if w == "findings"), len(words))
    return " ".join(words[:cut] + ["--generate"] + words[cut:])


def _report_commit() -> str:
    try:
        from thinklab.runner import _git_commit
    except ImportError:
        return "-"
    return _git_commit() or "-"


def _budget(b) -> str:
    return "uncapped" if b is None else str(b)


def _direction(stat: F.Statistic) -> str:
    if stat.direction == 0:
        return f"within ±{stat.margin:g} of 0"
    return "above 0" if stat.direction == 1 else "below 0"


def write_report(plan: FindingsPlan, runs_root: Path | str | None = None, out: Path | str | None = None,
                 figures_dir: Path | str | None = None, *, n_boot: int = 2000, seed: int = 0,
                 command: str = "thinklab findings") -> Path:
    """Compute every finding from the stored runs, export the figures, write the report; return its path."""
    out = Path(out) if out else paths.project_root() / "FINDINGS.md"
    figures_dir = Path(figures_dir) if figures_dir else paths.figures_dir("findings")
    findings, store = compute(plan, runs_root, n_boot=n_boot, seed=seed)
    figures, status = _export_figures(findings, figures_dir)
    text = render(plan, findings, store, figures, status, out, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
