"""Sweeps: run one notebook once per parameter set through papermill, and index what ran.

A sweep file (YAML) names a `notebook`, shared `parameters`, and either `sets` (a list of
parameter dicts, each with an optional `name`) or `grid` (a dict of lists whose cartesian
product gives the sets, named from their values). Every parameter name is checked against
the notebook's `parameters` cell before anything runs. Each set runs in its own process
(up to `workers` at once), with the notebook's folder as working directory, and leaves
an executed notebook `<out>/<sweep>/<set>.ipynb` that is never edited afterwards. The
index (`index.parquet` and a readable `index.md` beside the notebooks) records each
set's parameters, their hash, status, duration, error and the figures it exported.

Every parameter value is also checked against the type of the notebook's own default
(an int parameter refuses YAML's `1e3`, which YAML 1.1 reads as a string; a list parameter
refuses a string), and the sweep file itself must be valid YAML without duplicate keys.

Re-running a sweep skips every set that already succeeded with the same parameter hash
and whose executed notebook still exists, and retries the rest; `force=True` reruns all.

Killing a sweep kills its work: the pool workers and their Jupyter kernels die with the
batch process (a Linux parent-death signal, see `thinklab.lifeline`). A running sweep
holds an exclusive lock on its out folder, so a second `thinklab batch` of it is refused,
and its workers hold a shared lock that a rerun waits on, so it never races an orphan.
An executed notebook is written under a temporary name and renamed when its execution
ends; the temporary files of a killed sweep are removed by the next run.

Optional keys: `name` (default: the file's stem), `out_dir` (default: `out/` beside the
sweep file), `separate_figures` (default true: each set's figures go to
figures/<study>/<sweep>/<set>/ so sets never overwrite each other; false writes
straight to figures/<study>/), `timeout` (seconds per cell, default none), `kernel`
(default: the notebook's own kernelspec), `executor` (`local`, the default, or `ray`: each
set a Ray task, see `thinklab.ray_executor`) and `ray` (its `address`, `cpus` and `gpus`
per set, `max_retries`).

Figures reach the index through two notebook parameters, passed like any other: where a
notebook's parameters cell declares `figure_subdir` and `figure_log` (the study notebooks
do), each set gets `figure_subdir=<sweep>/<set>` (with `separate_figures`) and
`figure_log=<out>/.<set>.figures`, a file its figure exports append to; a set that gives
either itself keeps its own. They are not part of the set's parameter hash.

This module knows nothing about studies: it sees a notebook, its parameters cell and
files. Generation caching is the notebook's business (runs are content-addressed).
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from thinklab import lifeline, paths

INDEX_SCHEMA = {
    "set": pl.String,
    "status": pl.String,  # ok | failed | pending
    "action": pl.String,  # what the latest invocation did: ran | skipped | pending
    "runs": pl.Int64,  # how many times this set has been executed, over all invocations
    "param_hash": pl.String,
    "parameters": pl.String,  # JSON of the set's full parameters (shared + own)
    "started": pl.String,  # ISO time of the execution this row describes
    "duration_s": pl.Float64,
    "error": pl.String,  # "ExceptionName: message" for failures
    "error_cell": pl.Int64,  # index of the failing cell in the executed notebook
    "figures": pl.List(pl.String),
    "notebook": pl.String,  # the executed notebook
}

_SWEEP_KEYS = {"name", "notebook", "parameters", "sets", "grid", "out_dir", "separate_figures", "timeout", "kernel",
               "executor", "ray"}
EXECUTORS = ("local", "ray")
LOCK = ".sweep.lock"  # held exclusively by the live `thinklab batch` of this out folder
WORKERS_LOCK = ".workers.lock"  # held shared by each of its workers while it runs a set
ORPHAN_WAIT_S = 15.0


@dataclass(frozen=True)
class ParameterSet:
    name: str
    parameters: dict[str, Any]
    param_hash: str


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    notebook: Path
    out_dir: Path  # <out>/<sweep>
    sets: tuple[ParameterSet, ...]
    separate_figures: bool = True
    timeout: float | None = None
    kernel: str | None = None
    known_parameters: dict[str, str] = field(default_factory=dict)  # name -> default (source text)
    executor: str = "local"
    ray: Any = None  # thinklab.ray_executor.RayOptions when executor is "ray"


# ---------------------------------------------------------------- parameters cell


def notebook_parameters(notebook: Path | str) -> dict[str, str]:
    """Names assigned in the notebook's `parameters` cell -> their default as source text.

    Parsed with `ast` rather than `papermill.inspect_notebook`, whose line parser drops
    parameters whose comment holds parentheses or quotes. A version-4 notebook is read as
    plain JSON: importing nbformat (and its schema validator) takes seconds, and every
    sweep file is checked before anything runs.
    """
    try:
        nb = json.loads(Path(notebook).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{notebook} is not a notebook (not valid JSON: {exc})") from None
    if not isinstance(nb, dict) or nb.get("nbformat") != 4 or not isinstance(nb.get("cells"), list):
        import nbformat

        nb = nbformat.read(str(notebook), as_version=4)
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code" and "parameters" in (cell.get("metadata") or {}).get("tags", []):
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else source
            out: dict[str, str] = {}
            try:
                body = ast.parse(source).body
            except SyntaxError as exc:
                raise ValueError(f"{notebook}: its parameters cell is not valid Python (line {exc.lineno}: {exc.msg})") from None
            for node in body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
                value = getattr(node, "value", None)
                for target in targets:
                    if isinstance(target, ast.Name):
                        out[target.id] = ast.get_source_segment(source, value) if value is not None else ""
            return out
    raise ValueError(f"{notebook} has no cell tagged 'parameters'; papermill cannot parameterize it")


def param_hash(notebook: Path, parameters: dict[str, Any]) -> str:
    blob = json.dumps({"notebook": notebook.name, "parameters": parameters}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- sweep files


def _slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = "+".join(_slug(v) for v in value)
    elif value is None:
        text = "none"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.=+_-]+", "-", text).strip("-") or "x"


def _set_name(values: dict[str, Any]) -> str:
    name = "__".join(f"{k}={_slug(v)}" for k, v in values.items()) or "default"
    return name if len(name) <= 120 else name[:103] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _resolve_notebook(text: str, sweep_path: Path) -> Path:
    candidate = Path(text).expanduser()
    options = [candidate] if candidate.is_absolute() else [
        sweep_path.parent / candidate, paths.project_root() / candidate, paths.project_root() / "notebooks" / candidate]
    for option in options:
        if option.is_file():
            return option.resolve()
    raise FileNotFoundError(f"sweep {sweep_path}: notebook {text!r} not found (looked at {', '.join(map(str, options))})")


def _raw_sets(spec: dict, where: Path) -> list[tuple[str | None, dict[str, Any]]]:
    if ("sets" in spec) == ("grid" in spec):
        raise ValueError(f"sweep {where}: give exactly one of `sets` (a list of parameter dicts) or `grid` (a dict of lists)")
    if "grid" in spec:
        grid = spec["grid"]
        if not isinstance(grid, dict) or not grid:
            raise ValueError(f"sweep {where}: `grid` must be a non-empty mapping of parameter -> list of values")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep {where}: grid entry {key!r} must be a non-empty list (wrap a list value in another list)")
        keys = list(grid)
        return [(None, dict(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))]
    sets = spec["sets"]
    if not isinstance(sets, list) or not sets:
        raise ValueError(f"sweep {where}: `sets` must be a non-empty list of parameter dicts")
    out = []
    for i, item in enumerate(sets):
        if not isinstance(item, (dict, type(None))):
            raise ValueError(f"sweep {where}: set #{i} is not a mapping")
        item = dict(item or {})
        name = item.pop("name", None)
        out.append((str(name) if name is not None else None, item))
    return out


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    PyYAML keeps the last of two equal keys silently, so a repeated `sets:` would drop
    every set written under the first one.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first.line + 1}); give each key once",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_sweep_file(path: Path) -> Any:
    """The YAML document of a sweep file; ValueError naming the file, line and column when it is not valid."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep file {path} not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"sweep {path}: not valid UTF-8 (byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        raise ValueError(f"sweep {where}: {what}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"sweep {path}: not valid YAML ({' '.join(str(exc).split())})") from None


def _kind(value: Any) -> str:
    """The type a notebook default declares, in words: 'int', 'float', 'list of int or None'."""
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        inner = sorted({_kind(v) for v in value}, key=lambda k: (k == "None", k))
        return f"list of {' or '.join(inner)}" if inner else "list"
    return type(value).__name__


def _fits(value: Any, default: Any) -> bool:
    """Whether `value` has the type of the notebook default `default` (None: anything)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return False
        if not default:
            return True
        return all(any(_fits_item(v, d) for d in default) for v in value)
    return isinstance(value, type(default))


def _fits_item(value: Any, default: Any) -> bool:
    return value is None if default is None else _fits(value, default)


def _check_types(path: Path, where: str, parameters: dict[str, Any], declared: dict[str, str], notebook: Path) -> None:
    for name, value in parameters.items():
        try:
            default = ast.literal_eval(declared[name])
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue  # not a literal default: nothing to compare with
        if _fits(value, default):
            continue
        hint = ""
        if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            hint = (f"; YAML reads {value!r} as a string: write a plain number"
                    + (" such as 1000 (not 1e3)" if re.fullmatch(r"[+-]?\d+[eE][+-]?\d+", value.strip()) else ""))
        elif isinstance(value, str) and isinstance(default, (list, tuple)):
            hint = "; write a YAML list, e.g. [8, 16], not a quoted string"
        elif isinstance(value, float) and not math.isfinite(value):
            hint = "; NaN and infinity are not valid"
        what = f"is {_article(type(value).__name__)}"
        if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
            bad = next(v for v in value if not any(_fits_item(v, d) for d in default))
            what = f"holds {bad!r}, {_article(type(bad).__name__)}"
        raise ValueError(f"sweep {path}: parameter {name}={value!r} in {where} {what}, but {notebook.name} "
                         f"declares `{name} = {declared[name]}` ({_article(_kind(default))}){hint}")


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"


_TOP_TYPES = {"name": (str, int), "notebook": (str,), "parameters": (dict, type(None)), "out_dir": (str,),
              "separate_figures": (bool,), "timeout": (int, float, type(None)), "kernel": (str, type(None))}


def load_sweep(path: Path | str, out_dir: Path | str | None = None) -> Sweep:
    """Read and validate a sweep file; raises ValueError before anything runs."""
    path = Path(path).resolve()
    spec = read_sweep_file(path)
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise ValueError(f"sweep {path}: expected a mapping at the top level")
    unknown_keys = set(spec) - _SWEEP_KEYS
    if unknown_keys:
        raise ValueError(f"sweep {path}: unknown key(s) {sorted(unknown_keys)}; valid keys: {sorted(_SWEEP_KEYS)}")
    if "notebook" not in spec:
        raise ValueError(f"sweep {path}: `notebook` is required")
    for key, kinds in _TOP_TYPES.items():
        if key in spec and (not isinstance(spec[key], kinds) or (bool not in kinds and isinstance(spec[key], bool))):
            valid = " or ".join("a mapping" if k is dict else "null" if k is type(None) else f"a {k.__name__}" for k in kinds)
            raise ValueError(f"sweep {path}: `{key}` is {spec[key]!r}; it must be {valid}")
    if spec.get("timeout") is not None and not spec["timeout"] > 0:
        raise ValueError(f"sweep {path}: `timeout` is {spec['timeout']!r}; give seconds per cell (> 0) or leave it out")
    notebook = _resolve_notebook(str(spec["notebook"]), path)
    known = notebook_parameters(notebook)
    shared = dict(spec.get("parameters") or {})
    name = str(spec.get("name") or path.stem)
    if _slug(name) != name:
        raise ValueError(f"sweep {path}: name {name!r} must be a plain file name (letters, digits, . = + _ -)")

    sets, seen = [], set()
    for set_name, own in _raw_sets(spec, path):
        set_name = set_name or _set_name(own)
        if _slug(set_name) != set_name:
            raise ValueError(f"sweep {path}: set name {set_name!r} must be a plain file name (letters, digits, . = + _ -)")
        if set_name in seen:
            raise ValueError(f"sweep {path}: two sets are named {set_name!r}")
        seen.add(set_name)
        parameters = {**shared, **own}
        unknown = sorted(set(parameters) - set(known))
        if unknown:
            where = "shared parameters" if set(unknown) <= set(shared) - set(own) else f"set {set_name!r}"
            raise ValueError(f"sweep {path}: unknown parameter(s) {', '.join(unknown)} in {where}; "
                             f"{notebook.name} accepts: {', '.join(known)}")
        _check_types(path, "shared parameters", {k: v for k, v in shared.items() if k not in own}, known, notebook)
        _check_types(path, f"set {set_name!r}", own, known, notebook)
        sets.append(ParameterSet(set_name, parameters, param_hash(notebook, parameters)))

    base = Path(out_dir) if out_dir else Path(spec.get("out_dir") or "out")
    if not base.is_absolute():
        base = path.parent / base
    timeout = spec.get("timeout")
    executor = spec.get("executor", "local")
    if executor not in EXECUTORS:
        raise ValueError(f"sweep {path}: executor={executor!r} is not valid; choose one of {', '.join(EXECUTORS)}")
    from thinklab.ray_executor import RayOptions

    ray_options = RayOptions.from_dict(spec.get("ray"), f"sweep {path}")
    return Sweep(name=name, path=path, notebook=notebook, out_dir=(base / name).resolve(), sets=tuple(sets),
                 separate_figures=bool(spec.get("separate_figures", True)),
                 timeout=float(timeout) if timeout is not None else None, kernel=spec.get("kernel"),
                 known_parameters=known, executor=executor, ray=ray_options)


# ---------------------------------------------------------------- execution (one process per set)


_held_locks: list = []  # a worker's shared lock on its sweep's out folder, held until the process ends


def _worker_init(batch_pid: int, workers_lock: str) -> None:
    """Runs first in each pool worker: die with the batch process, and mark the out folder busy."""
    lifeline.die_with_parent(batch_pid)
    handle = open(workers_lock, "a")
    fcntl.flock(handle, fcntl.LOCK_SH)
    _held_locks.append(handle)


def _tied_kernel_manager():
    """A Jupyter kernel manager whose kernels are killed when the worker that started them dies.

    jupyter_client starts each kernel in a session of its own, out of reach of signals to
    the worker's process group; the kernel command is wrapped so that it arms a
    parent-death signal before it becomes the kernel.
    """
    from jupyter_client.manager import AsyncKernelManager

    class TiedKernelManager(AsyncKernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            return lifeline.tied_command(super().format_kernel_cmd(extra_arguments))

    return TiedKernelManager


def _execute(job: dict) -> dict:
    """Run one set through papermill; never raises (a failure is a row with its error)."""
    import logging

    import papermill as pm

    # names were checked against the parameters cell already; papermill's own line parser
    # misreads comments holding parentheses or quotes and would warn about known names
    logging.getLogger("papermill").setLevel(logging.ERROR)
    figure_log = Path(job["figure_log"])
    figure_log.unlink(missing_ok=True)
    if job.get("threads"):
        # several kernels at once: split the cores between them rather than oversubscribe
        os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    status, error, error_cell = "ok", None, None
    output = Path(job["output"])
    # papermill rewrites the notebook after every cell: a temporary name until the end, so the
    # executed notebook is only ever a whole record of one execution
    partial = output.with_name(f".{output.stem}.tmp-{os.getpid()}.ipynb")
    try:
        pm.execute_notebook(job["notebook"], str(partial), parameters={**job.get("figure_parameters", {}),
                                                                       **job["parameters"]}, cwd=job["cwd"],
                            kernel_name=job["kernel"], execution_timeout=job["timeout"],
                            progress_bar=False, log_output=False, report_mode=False,
                            kernel_manager_class=_tied_kernel_manager())
    except pm.PapermillExecutionError as exc:
        status, error, error_cell = "failed", f"{exc.ename}: {exc.evalue}", int(exc.cell_index)
    except BaseException as exc:  # kernel death, timeouts, bad output path: still one row, never a crash
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    if partial.exists():
        os.replace(partial, output)
    else:  # nothing executed: an older notebook under this name would describe another execution
        output.unlink(missing_ok=True)
    figures: list[str] = []
    if figure_log.exists():
        figures = list(dict.fromkeys(line for line in figure_log.read_text().splitlines() if line))
        figure_log.unlink()
    return {"set": job["set"], "status": status, "started": started.isoformat(timespec="seconds"),
            "duration_s": round(time.perf_counter() - t0, 2), "error": error, "error_cell": error_cell,
            "figures": figures}


def _figure_parameters(sweep: Sweep, ps: ParameterSet) -> dict[str, str]:
    """The figure routing a set's notebook receives, for the names its parameters cell declares."""
    routing = {"figure_subdir": f"{sweep.name}/{ps.name}" if sweep.separate_figures else "",
               "figure_log": str(sweep.out_dir / f".{ps.name}.figures")}
    return {k: v for k, v in routing.items() if k in sweep.known_parameters}


def _read_index(out_dir: Path) -> dict[str, dict]:
    index = out_dir / "index.parquet"
    if not index.exists():
        return {}
    try:
        return {row["set"]: row for row in pl.read_parquet(index).to_dicts()}
    except Exception:  # a half-written or foreign index is not worth failing a sweep over
        return {}


def _frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame([{k: row.get(k) for k in INDEX_SCHEMA} for row in rows], schema=INDEX_SCHEMA)


def _md_cell(text: Any, limit: int = 160) -> str:
    text = "" if text is None else str(text)
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def write_index(sweep: Sweep, rows: list[dict]) -> pl.DataFrame:
    """Write index.parquet and index.md (atomically, so a crash leaves the previous one)."""
    frame = _frame(rows)
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep.out_dir / f".index.parquet.tmp-{os.getpid()}"
    frame.write_parquet(tmp)
    tmp.replace(sweep.out_dir / "index.parquet")

    shared_keys = set.intersection(*(set(s.parameters) for s in sweep.sets)) if sweep.sets else set()
    varying = [k for k in sweep.known_parameters
               if k not in shared_keys or len({json.dumps(s.parameters.get(k), default=str) for s in sweep.sets}) > 1]
    lines = [f"# Sweep `{sweep.name}`", "",
             f"Notebook `{sweep.notebook.name}`, sweep file `{sweep.path.name}`, "
             f"written {datetime.now(timezone.utc).isoformat(timespec='seconds')}. "
             f"{sum(r['status'] == 'ok' for r in rows)} ok, {sum(r['status'] == 'failed' for r in rows)} failed, "
             f"{sum(r['status'] == 'pending' for r in rows)} pending.", "",
             "| set | status | this run | runs | duration (s) | figures | parameters that vary | error |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        params = json.loads(row["parameters"])
        shown = {k: params[k] for k in varying if k in params}
        duration = "" if row.get("duration_s") is None else f"{row['duration_s']:.1f}"
        lines.append(f"| {_md_cell(row['set'])} | {row['status']} | {row['action']} | {row.get('runs') or 0} | {duration} "
                     f"| {len(row.get('figures') or [])} | {_md_cell(json.dumps(shown, default=str))} | {_md_cell(row.get('error'))} |")
    shared = {k: v for k, v in (sweep.sets[0].parameters.items() if sweep.sets else []) if k not in varying}
    if shared:
        lines += ["", f"Shared parameters: `{json.dumps(shared, default=str)}`"]
    tmp_md = sweep.out_dir / f".index.md.tmp-{os.getpid()}"
    tmp_md.write_text("\n".join(lines) + "\n")
    tmp_md.replace(sweep.out_dir / "index.md")
    return frame


def _log(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def _own_out_dir(out_dir: Path):
    """Hold the sweep's out folder: refuse a second live batch, wait out dying workers, clear their leftovers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RuntimeError(f"{out_dir} is in use by a running `thinklab batch` ({holder}); "
                               f"wait for it to finish or stop it, then rerun") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        with open(out_dir / WORKERS_LOCK, "a") as workers:
            # workers of a killed batch hold this shared; they die with it, but never race one that has not yet
            deadline = time.monotonic() + ORPHAN_WAIT_S
            while True:
                try:
                    fcntl.flock(workers, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"workers of an earlier `thinklab batch` still run in {out_dir} "
                                           f"(`fuser {out_dir / WORKERS_LOCK}` names them); stop them, then rerun") from None
                    time.sleep(0.2)
            fcntl.flock(workers, fcntl.LOCK_UN)
        for stale in [*out_dir.glob(".*.tmp-*"), *out_dir.glob(".*.figures")]:
            stale.unlink(missing_ok=True)  # a killed execution's partial notebook, index or figure log
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_sweep(path: Path | str, workers: int = 1, force: bool = False, out_dir: Path | str | None = None,
              executor: str | None = None, address: str | None = None) -> pl.DataFrame:
    """Run every set of the sweep file that needs running; return the index (one row per set).

    `executor` and `address` override the sweep file's `executor` and `ray.address`."""
    sweep = load_sweep(path, out_dir=out_dir)  # all validation happens here, before any kernel starts
    if executor is not None and executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not valid; choose one of {', '.join(EXECUTORS)}")
    with _own_out_dir(sweep.out_dir):
        return _run_sets(sweep, workers, force, executor or sweep.executor, address)


def _run_sets(sweep: Sweep, workers: int, force: bool, executor: str = "local", address: str | None = None) -> pl.DataFrame:
    previous = _read_index(sweep.out_dir)
    rows: dict[str, dict] = {}
    todo: list[ParameterSet] = []
    for ps in sweep.sets:
        output = sweep.out_dir / f"{ps.name}.ipynb"
        old = previous.get(ps.name)
        base = {"set": ps.name, "param_hash": ps.param_hash, "notebook": str(output),
                "parameters": json.dumps(ps.parameters, sort_keys=True, default=str),
                "runs": (old or {}).get("runs") or 0}
        if (not force and old and old["status"] == "ok" and old["param_hash"] == ps.param_hash and output.exists()):
            rows[ps.name] = {**old, **base, "action": "skipped"}
        else:
            rows[ps.name] = {**base, "status": "pending", "action": "pending", "figures": []}
            todo.append(ps)

    n_skip = len(sweep.sets) - len(todo)
    _log(f"[batch] sweep {sweep.name}: {len(sweep.sets)} sets of {sweep.notebook.name}, {len(todo)} to run"
         + (f", {n_skip} already ok (skipped)" if n_skip else "") + f", {max(1, workers)} worker(s); out: {sweep.out_dir}")
    for ps in sweep.sets:
        if rows[ps.name]["action"] == "skipped":
            _log(f"[batch]   skip {ps.name} (ok with the same parameters)")
    write_index(sweep, [rows[ps.name] for ps in sweep.sets])

    jobs = [{
        "set": ps.name, "notebook": str(sweep.notebook), "output": str(sweep.out_dir / f"{ps.name}.ipynb"),
        "parameters": ps.parameters, "cwd": str(sweep.notebook.parent), "kernel": sweep.kernel,
        "timeout": sweep.timeout, "figure_log": str(sweep.out_dir / f".{ps.name}.figures"),
        "figure_parameters": _figure_parameters(sweep, ps),
        "threads": max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None,
    } for ps in todo]
    def record(job: dict, result: dict, done: int) -> None:
        row = rows[job["set"]]
        row.update(result, action="ran", runs=(row.get("runs") or 0) + 1)
        tail = f"{len(row['figures'])} figure files" if row["status"] == "ok" else _md_cell(row["error"], 200)
        _log(f"[batch] {done}/{len(jobs)} {job['set']}: {row['status']} in {row['duration_s'] or 0:.1f} s; {tail}")
        write_index(sweep, [rows[ps.name] for ps in sweep.sets])

    if jobs and executor == "ray":
        import dataclasses

        from thinklab import ray_executor

        options = dataclasses.replace(sweep.ray, address=address) if address else sweep.ray
        _log(f"[batch]   {len(jobs)} sets as Ray tasks ({options.cpus} CPU, {options.gpus} GPU each) on "
             f"{options.address or 'a local Ray'}")
        for done, (job, result) in enumerate(ray_executor.run_jobs(jobs, _execute, options), start=1):
            record(job, result, done)
    elif jobs:
        # spawn: a fresh interpreter per set, so its environment and kernel are its own
        context = multiprocessing.get_context("spawn")
        done = 0
        pool_options = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
        with cf.ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=context,
                                    initializer=_worker_init,
                                    initargs=(os.getpid(), str(sweep.out_dir / WORKERS_LOCK)),
                                    **pool_options) as pool:
            futures = {}
            for job in jobs:
                futures[pool.submit(_execute, job)] = job
                _log(f"[batch]   queue {job['set']}")
            try:
                for future in cf.as_completed(futures):
                    job = futures[future]
                    try:
                        result = future.result()
                    except Exception as exc:  # the worker process itself died
                        result = {"set": job["set"], "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                  "figures": [], "started": None, "duration_s": None, "error_cell": None}
                    done += 1
                    record(job, result, done)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    frame = write_index(sweep, [rows[ps.name] for ps in sweep.sets])
    n_ok = frame.filter(pl.col("status") == "ok").height
    _log(f"[batch] sweep {sweep.name}: {n_ok}/{frame.height} ok; index: {sweep.out_dir / 'index.md'}")
    return frame


def describe(path: Path | str) -> str:
    """The sets a sweep file expands to, one line each (validates without running anything)."""
    sweep = load_sweep(path)
    lines = [f"{sweep.name}: {len(sweep.sets)} sets of {sweep.notebook.name} -> {sweep.out_dir}"]
    lines += [f"  {ps.name}: {json.dumps(ps.parameters, default=str)}" for ps in sweep.sets]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m thinklab.batch SWEEP...: validate and list the sets
    for arg in sys.argv[1:]:
        print(describe(arg))
