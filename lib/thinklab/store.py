"""The run store: one directory per run, parquet parts, resumable, crash-safe.

  data/runs/<run_id>/run.json           spec, versions, commit, model, entropy mode, times
  data/runs/<run_id>/part-00000.parquet one part per chunk of problems, written whole

A part is written to a temporary name, fsynced and renamed, so a part file either holds
a finished chunk or does not exist; a run killed at any point (SIGKILL included) resumes
by regenerating only the chunks without a part, and the next holder of the run's lock
removes the killed writer's temporary files. A part or run.json damaged afterwards (cut
short, emptied, copied in from another run) is refused with a RunStoreError naming the
file and the fix, never read as if it were whole. This module knows the sample-table
schema and files, nothing about models or generation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from pathlib import Path

import polars as pl

# The sample-table contract (shared/DESIGN.md), plus per-task metadata and grading details.
SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.Utf8,
    "problem_id": pl.Utf8,
    "sample_idx": pl.Int64,
    "task": pl.Utf8,
    "model": pl.Utf8,
    "backend": pl.Utf8,
    "quantization": pl.Utf8,
    "moe_top_k": pl.Int64,
    "temperature": pl.Float32,
    "top_p": pl.Float32,
    "seed": pl.Int64,
    "thinking_budget": pl.Int64,
    "wait_extensions": pl.Int64,
    "prompt": pl.Utf8,
    "text": pl.Utf8,
    "thinking": pl.Utf8,
    "answer_text": pl.Utf8,
    "n_tokens": pl.Int64,
    "n_thinking_tokens": pl.Int64,
    "n_answer_tokens": pl.Int64,
    "finish_reason": pl.Utf8,
    "token_entropy": pl.List(pl.Float32),
    "token_logprob": pl.List(pl.Float32),
    "token_ids": pl.List(pl.Int32),
    "pred": pl.Utf8,
    "gold": pl.Utf8,
    "correct": pl.Boolean,
    # beyond the contract
    "level": pl.Int64,
    "subject": pl.Utf8,
    "extractor": pl.Utf8,
    "grader_version": pl.Utf8,
    # mixture-of-experts runs only (null otherwise): per layer, tokens routed to each expert
    "expert_load": pl.List(pl.List(pl.Int32)),
    "router_entropy_thinking": pl.Float32,
    "router_entropy_answer": pl.Float32,
}
REQUIRED = tuple(list(SCHEMA)[: list(SCHEMA).index("correct") + 1])
ROUTING_COLUMNS = ("expert_load", "router_entropy_thinking", "router_entropy_answer")  # the MoE-only columns
RUN_JSON = "run.json"


class RunStoreError(ValueError):
    """A run directory whose files are damaged or do not belong to it."""


def rows_to_frame(rows: list[dict]) -> pl.DataFrame:
    extra = [k for k in (rows[0] if rows else {}) if k not in SCHEMA]
    if extra:
        raise ValueError(f"columns outside the sample-table schema: {extra}")
    return pl.DataFrame(rows, schema=SCHEMA)


class RunStore:
    def __init__(self, run_dir: Path | str):
        self.dir = Path(run_dir)

    # -- metadata -------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.dir / RUN_JSON

    def read_meta(self) -> dict:
        if not self.meta_path.is_file():
            raise FileNotFoundError(f"{self.dir} is not a run directory (no {RUN_JSON})")
        fix = (f"remove the run directory {self.dir} and run the same spec again "
               f"(`thinklab generate` or the notebook) to regenerate it")
        try:
            meta = json.loads(self.meta_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            why = "is empty" if not self.meta_path.stat().st_size else f"is damaged ({_reason(exc)})"
            raise RunStoreError(f"{self.meta_path} {why}; {fix}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
            raise RunStoreError(f"{self.meta_path} is not a thinklab run record (no spec object); {fix}")
        return meta

    def write_meta(self, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.meta_path, json.dumps(meta, indent=2, default=str).encode())

    def update_meta(self, **fields) -> dict:
        meta = self.read_meta()
        meta.update(fields)
        self.write_meta(meta)
        return meta

    def add_seconds(self, field: str, seconds: float) -> dict:
        """Add `seconds` to run.json's `field` (a duration summed over sittings)."""
        meta = self.read_meta()
        meta[field] = round(float(meta.get(field) or 0.0) + seconds, 2)
        self.write_meta(meta)
        return meta

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock so that two processes never generate the same run at once.

        Whoever holds it is the only writer, so temporary files found on taking it were
        left by a killed writer and are removed.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                for stale in self.dir.glob(".*.tmp-*"):
                    stale.unlink(missing_ok=True)
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- parts ----------------------------------------------------------------
    def part_path(self, chunk: int) -> Path:
        return self.dir / f"part-{chunk:05d}.parquet"

    def done_chunks(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.parquet")}

    def write_part(self, chunk: int, frame: pl.DataFrame) -> Path:
        target = self.part_path(chunk)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        frame.write_parquet(tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(self.dir)
        return target

    def replace_parts(self, frame: pl.DataFrame) -> None:
        """Rewrite every part with updated rows (same chunks), e.g. after regrading."""
        for chunk in sorted(self.done_chunks()):
            ids = self._read_part(self.part_path(chunk)).select("problem_id", "sample_idx")
            self.write_part(chunk, ids.join(frame, on=["problem_id", "sample_idx"], how="left").select(frame.columns))

    def load(self) -> pl.DataFrame:
        """Every part of the run, checked to be whole and to belong to this run."""
        parts = sorted(self.dir.glob("part-*.parquet"))
        if not parts:
            return pl.DataFrame(schema=SCHEMA)
        run_id = self._run_id()
        frames = []
        for path in parts:
            frame = self._read_part(path)
            ids = frame["run_id"].unique().to_list()
            expected = run_id or (frames[0]["run_id"][0] if frames and frames[0].height else None)
            if len(ids) > 1 or (expected is not None and ids and ids[0] != expected):
                raise RunStoreError(f"{path} holds rows of run {', '.join(map(str, ids))}, not of this run ({expected}): "
                                    f"it was copied in from another run; move it out (or delete it to regenerate the chunk)")
            frames.append(frame)
        return pl.concat(frames, how="diagonal_relaxed")

    def _run_id(self) -> str | None:
        """The run's id from run.json (None when the directory has none, e.g. parts only)."""
        if not self.meta_path.is_file():
            return None
        return self.read_meta().get("run_id")

    def _read_part(self, path: Path) -> pl.DataFrame:
        fix = f"delete {path} and run the same spec again to regenerate that chunk"
        if path.stat().st_size == 0:
            raise RunStoreError(f"{path} is empty (a write that never finished); {fix}")
        try:
            frame = pl.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - polars raises several kinds for a cut or garbled file
            raise RunStoreError(f"{path} is damaged ({_reason(exc)}); {fix}") from None
        missing = [c for c in REQUIRED if c not in frame.columns]
        foreign = [c for c in frame.columns if c not in SCHEMA]
        retyped = [f"{c} is {frame.schema[c]}, not {SCHEMA[c]}" for c in frame.columns if c in SCHEMA and frame.schema[c] != SCHEMA[c]]
        if missing or foreign or retyped:
            what = "; ".join(filter(None, [missing and f"missing columns {_few(missing)}",
                                           foreign and f"unknown columns {_few(foreign)}", _few(retyped)]))
            raise RunStoreError(f"{path} does not have the sample-table schema ({what}): it is not a part of this run; "
                                f"move it out (or delete it to regenerate the chunk)")
        return frame


def load_run(path: Path | str) -> pl.DataFrame:
    """The sample table of a stored run, in problem then sample order."""
    return RunStore(path).load()


def _few(items: list[str], k: int = 4) -> str:
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:117] + "..."


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
