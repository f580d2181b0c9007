"""The run catalog: every stored run as one row, all their samples as one lazy table.

`runs()` reads each `data/runs/*/run.json` and summarizes its parts (problems x samples,
accuracy, truncated share); `samples()` scans every part lazily, so a question across
studies is a join of the two on `run_id`; `compare(a, b)` gives the paired differences
of two runs on the samples they share (same problem, sample index and seed) with the
clustered bootstrap of `thinklab.metrics.paired_bootstrap`. A run whose run.json or
parts cannot be read is skipped with a warning naming the file, never raised. This
module reads the store; it never generates or changes a run.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path
from typing import Sequence

import polars as pl

from thinklab import paths
from thinklab.store import RUN_JSON

# The catalog's columns, in display order; knob columns are the spec values studies vary.
KNOBS = ("temperature", "quantization", "moe_top_k", "thinking_budget", "wait_extensions", "forward")
COLUMNS = {
    "run_id": pl.Utf8,
    "study": pl.Utf8,
    "model": pl.Utf8,
    "task": pl.Utf8,
    "temperature": pl.Float64,
    "quantization": pl.Utf8,
    "moe_top_k": pl.Int64,
    "thinking_budget": pl.Int64,
    "wait_extensions": pl.Int64,
    "forward": pl.Utf8,
    "backend": pl.Utf8,
    "max_tokens": pl.Int64,
    "n_problems": pl.Int64,  # problems with at least one stored sample
    "n_samples": pl.Int64,  # samples per problem the spec asks for
    "n_rows": pl.Int64,  # stored samples
    "accuracy": pl.Float64,
    "truncated": pl.Float64,  # share of samples cut at max_tokens (finish_reason "length")
    "status": pl.Utf8,  # run.json's status; "partial" when fewer samples are stored than the spec asks for
    "created": pl.Datetime("us", "UTC"),
    "path": pl.Utf8,
}
# Metrics compare() reports: name -> expression giving one number per sample.
COMPARE_METRICS = {
    "accuracy": pl.col("correct").cast(pl.Float64),
    "length": pl.col("n_tokens").cast(pl.Float64),
    # forced tokens carry NaN entropy: they were not sampled, so they do not count
    "entropy": pl.col("token_entropy").list.eval(pl.element().filter(pl.element().is_not_nan())).list.mean(),
}


class CatalogWarning(UserWarning):
    """A run directory the catalog skipped (damaged or unreadable run.json or parts)."""


def _note(message: str) -> None:
    warnings.warn(message, CatalogWarning, stacklevel=3)


def _root(runs_root: Path | str | None) -> Path:
    return Path(runs_root) if runs_root is not None else paths.runs_dir()


def _read_meta(run_dir: Path) -> dict | None:
    path = run_dir / RUN_JSON
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        _note(f"skipped {run_dir}: {path} is unreadable ({' '.join(str(exc).split())[:120]})")
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
        _note(f"skipped {run_dir}: {path} is not a thinklab run record (no spec object)")
        return None
    return meta


def _study(meta: dict) -> str | None:
    """The study a run belongs to when run.json says so, or the `thinklab` subcommand that made it."""
    if meta.get("study"):
        return str(meta["study"])
    argv = meta.get("argv") or []
    if len(argv) > 1 and str(argv[0]).endswith(("cli.py", "thinklab")) and argv[1] in ("findings", "generate"):
        return str(argv[1])
    return None


def _short(name: str | None) -> str | None:
    """A model directory (the offline MoE's spec name is one) by its folder name; ids as they are."""
    return Path(name).name if name and name.startswith("/") else name


def _forward(model: dict, backend: dict) -> str | None:
    """The decoder forward: the spec's when it names one, else the first word of what the backend recorded."""
    if model.get("forward") not in (None, "auto"):
        return model["forward"]
    recorded = str(backend.get("forward") or "").split()
    return recorded[0] if recorded else model.get("forward")


def _created(meta: dict) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(meta.get("created"))).astimezone(dt.timezone.utc)
    except ValueError:
        return None


def _parts(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("part-*.parquet"))


def _part_stats(run_dir: Path) -> dict | None:
    """n_problems, n_rows, accuracy and truncated share of a run's parts (None: a part is damaged)."""
    files = _parts(run_dir)
    if not files:
        return {"n_problems": 0, "n_rows": 0, "accuracy": None, "truncated": None}
    try:
        frame = pl.concat([pl.read_parquet(f, columns=["problem_id", "correct", "finish_reason"]) for f in files])
    except Exception as exc:  # noqa: BLE001 - polars raises several kinds for a cut or garbled file
        _note(f"skipped {run_dir}: a part is unreadable ({' '.join(str(exc).split())[:120]})")
        return None
    return frame.select(
        n_problems=pl.col("problem_id").n_unique(),
        n_rows=pl.len(),
        accuracy=pl.col("correct").cast(pl.Float64).mean(),
        truncated=(pl.col("finish_reason") == "length").cast(pl.Float64).mean(),
    ).row(0, named=True)


def _row(run_dir: Path, meta: dict, stats: dict) -> dict:
    spec = meta["spec"]
    model, sampling, budget = spec.get("model") or {}, spec.get("sampling") or {}, spec.get("budget") or {}
    backend = meta.get("backend") if isinstance(meta.get("backend"), dict) else {}
    resolved = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    n_samples = sampling.get("n", 1)
    status = meta.get("status") or "unknown"
    expected = (meta.get("n_problems") or spec.get("n_problems") or 0) * n_samples
    if status != "complete" and stats["n_rows"] < expected:
        status = "partial" if stats["n_rows"] else status
    return {
        "run_id": meta.get("run_id") or run_dir.name,
        "study": _study(meta),
        "model": _short(resolved.get("resolved") or model.get("name")),
        "task": spec.get("task"),
        "temperature": sampling.get("temperature"),
        "quantization": model.get("quantization"),
        "moe_top_k": model.get("moe_top_k"),
        "thinking_budget": budget.get("thinking_budget"),
        "wait_extensions": budget.get("wait_extensions"),
        "forward": _forward(model, backend),
        "backend": model.get("backend"),
        "max_tokens": sampling.get("max_tokens"),
        "n_samples": n_samples,
        **stats,
        "status": status,
        "created": _created(meta),
        "path": str(run_dir),
    }


def runs(runs_root: Path | str | None = None) -> pl.DataFrame:
    """One row per stored run (columns: `COLUMNS`), newest first.

    Join with `samples()` on `run_id` for questions across runs:
    `thinklab.samples().join(thinklab.runs().lazy(), on="run_id").filter(...)`.
    """
    rows = []
    root = _root(runs_root)
    for run_dir in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        if not (run_dir / RUN_JSON).exists():
            continue
        meta = _read_meta(run_dir)
        stats = _part_stats(run_dir) if meta is not None else None
        if meta is not None and stats is not None:
            rows.append(_row(run_dir, meta, stats))
    frame = pl.DataFrame(rows, schema=COLUMNS)
    return frame.sort("created", descending=True, nulls_last=True)


def samples(runs_root: Path | str | None = None, run_ids: Sequence[str] | None = None) -> pl.LazyFrame:
    """Every stored sample of the catalog's runs (or of `run_ids`), as one lazy table."""
    catalog = runs(runs_root)
    if run_ids is not None:
        catalog = catalog.filter(pl.col("run_id").is_in(list(run_ids)))
    scans = [pl.scan_parquet(f) for d in catalog["path"] for f in _parts(Path(d))]
    if not scans:
        from thinklab.store import SCHEMA

        return pl.LazyFrame(schema=SCHEMA)
    # older parts can lack later columns: diagonal concat fills them with nulls
    return pl.concat(scans, how="diagonal_relaxed")


def resolve_run(run: str | Path, runs_root: Path | str | None = None) -> Path:
    """A run directory from a path, a run id, or a unique prefix of one."""
    path = Path(run).expanduser()
    if (path / RUN_JSON).is_file():
        return path
    root = _root(runs_root)
    matches = sorted(p for p in root.glob(f"{run}*") if (p / RUN_JSON).is_file()) if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FileNotFoundError(f"no run {str(run)!r}: not a run directory and no run id in {root} starts with it "
                                f"(`thinklab runs` lists them)")
    raise ValueError(f"run {str(run)!r} is ambiguous in {root}: {', '.join(p.name for p in matches[:6])}; "
                     "give more digits of the id")


def _table(run: str | Path | pl.DataFrame, runs_root) -> pl.DataFrame:
    if isinstance(run, pl.DataFrame):
        return run
    from thinklab.store import load_run

    return load_run(resolve_run(run, runs_root))


def compare(
    a: str | Path | pl.DataFrame,
    b: str | Path | pl.DataFrame,
    *,
    runs_root: Path | str | None = None,
    metrics: Sequence[str] = tuple(COMPARE_METRICS),
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> pl.DataFrame:
    """Paired deltas b - a of accuracy, length (tokens) and mean token entropy (nats).

    `a` and `b` are run ids (or unique prefixes), run directories or sample tables. Pairs
    are samples with the same (problem_id, sample_idx, seed); intervals come from
    resampling problems (`metrics.paired_bootstrap`). One row per metric: metric,
    n_pairs, n_clusters, mean_a, mean_b, delta, ci_low, ci_high, p_value.
    """
    from thinklab.metrics import paired_bootstrap

    unknown = [m for m in metrics if m not in COMPARE_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(COMPARE_METRICS)}")
    left, right = _table(a, runs_root), _table(b, runs_root)
    keys = ["problem_id", "sample_idx", "seed"]
    shared = left.select(keys).join(right.select(keys), on=keys).height
    if not shared:
        raise ValueError("the two runs share no sample (same problem_id, sample_idx and seed); compare runs of the "
                         "same task subset and base seed")
    out = []
    for name in metrics:
        expr = COMPARE_METRICS[name].alias("value")
        result = paired_bootstrap(left.with_columns(expr), right.with_columns(expr), "value",
                                  n_boot=n_boot, level=level, seed=seed)
        out.append(result.with_columns(metric=pl.lit(name)))
    return pl.concat(out).select("metric", pl.exclude("metric"))


def varying_knobs(catalog: pl.DataFrame) -> list[str]:
    """The knob columns that take more than one value across the catalog's rows."""
    return [k for k in KNOBS if catalog[k].n_unique() > 1]


def _age(created: dt.datetime | None, now: dt.datetime) -> str:
    if created is None:
        return "?"
    seconds = max(0, int((now - created).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_table(catalog: pl.DataFrame, now: dt.datetime | None = None) -> str:
    """The catalog as a plain-text table: fixed columns plus the knobs that vary."""
    now = now or dt.datetime.now(dt.timezone.utc)
    knobs = varying_knobs(catalog)
    header = ["id", "study", "model", "task", *knobs, "problems x samples", "accuracy", "truncated", "status", "age"]

    def cell(value, column):
        if value is None:
            return "-"
        if column == "temperature":
            return f"{value:g}"
        return str(value)

    lines = []
    for r in catalog.iter_rows(named=True):
        lines.append([
            r["run_id"], cell(r["study"], "study"), cell(r["model"], "model"), cell(r["task"], "task"),
            *[cell(r[k], k) for k in knobs],
            f"{r['n_problems']} x {r['n_samples']}",
            "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
            "-" if r["truncated"] is None else f"{r['truncated']:.0%}",
            r["status"], _age(r["created"], now),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), *(fmt(line) for line in lines)])
