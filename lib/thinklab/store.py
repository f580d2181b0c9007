"""The run store: one directory per run, parquet parts, resumable, crash-safe.

  data/runs/<run_id>/run.json           spec, versions, commit, model, entropy mode, times
  data/runs/<run_id>/part-00000.parquet one part per chunk of problems, written whole

A part is written to a temporary name, fsynced and renamed, so a part file either holds
a finished chunk or does not exist; a run killed at any point (SIGKILL included) resumes
by regenerating only the chunks without a part. This module knows the sample-table
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
        return json.loads(self.meta_path.read_text())

    def write_meta(self, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.meta_path, json.dumps(meta, indent=2, default=str).encode())

    def update_meta(self, **fields) -> dict:
        meta = self.read_meta()
        meta.update(fields)
        self.write_meta(meta)
        return meta

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock so that two processes never generate the same run at once."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
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
            ids = pl.read_parquet(self.part_path(chunk), columns=["problem_id", "sample_idx"])
            self.write_part(chunk, ids.join(frame, on=["problem_id", "sample_idx"], how="left").select(frame.columns))

    def load(self) -> pl.DataFrame:
        parts = sorted(self.dir.glob("part-*.parquet"))
        if not parts:
            return pl.DataFrame(schema=SCHEMA)
        return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed")


def load_run(path: Path | str) -> pl.DataFrame:
    """The sample table of a stored run, in problem then sample order."""
    return RunStore(path).load()


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
