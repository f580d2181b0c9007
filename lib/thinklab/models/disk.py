"""A model directory on disk: built once, finished only when its manifest says so.

Every model thinklab writes under `data/models/<name>/` (an embedded model converted from
its GGUF, an offline MoE derived from a dense model) goes through `build_once`: built in
a temporary sibling, the manifest (`thinklab_model.json`, listing every file's size)
written last, then renamed into place, so a killed build never looks finished.
`check_materialized` tells a finished directory from a partial one. This module knows
nothing about which models exist or how they are built.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from thinklab import paths

MANIFEST = "thinklab_model.json"


class ModelError(RuntimeError):
    """A model that cannot be found, or whose files are missing, partial or corrupt."""


def check_materialized(directory: Path) -> dict:
    """Return the manifest of a finished conversion, or raise ModelError saying what is wrong."""
    manifest_path = directory / MANIFEST
    fix = f"remove {directory} and run `thinklab models --materialize {directory.name}`"
    if not manifest_path.is_file():
        raise ModelError(f"model directory {directory} is incomplete (no {MANIFEST}); {fix}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model manifest {manifest_path} is unreadable ({exc}); {fix}") from exc
    for fname, size in manifest.get("files", {}).items():
        f = directory / fname
        if not f.is_file():
            raise ModelError(f"model file {f} is missing; {fix}")
        if f.stat().st_size != size:
            raise ModelError(f"model file {f} has {f.stat().st_size} bytes, expected {size} (partial or corrupt); {fix}")
    return manifest


def fingerprint(manifest: dict) -> str:
    """What identifies a materialized model's weights (older manifests: the GGUF digest)."""
    return manifest.get("fingerprint") or manifest["gguf_sha256"][:16]


def dir_fingerprint(directory: Path) -> str:
    """What identifies the weights of a model directory thinklab did not build: file names and
    sizes, plus the content of the small JSON files (config, tokenizer settings)."""
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".model", ".txt"}:
            h.update(f"{p.name}:{p.stat().st_size}".encode())
            if p.suffix == ".json" and p.stat().st_size < 1 << 20:
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(name: str, build: Callable[[Path, Path], dict], force: bool = False, progress: bool = True) -> Path:
    """Build `data/models/<name>/` once; return it. Shared by every model we convert or derive.

    Under an exclusive lock: an existing directory is checked (a half-written one raises with
    the fix) and returned; otherwise `build(out, work)` writes the model into `out` (scratch
    space in `work`) and returns the manifest fields. The manifest, with every file's size,
    is written last and the directory renamed into place, so a killed build never looks finished.
    """
    final = paths.models_dir() / name
    with _lock(paths.models_dir() / f".{name}.lock"):
        if not force and final.exists():
            check_materialized(final)
            return final
        t0 = time.time()
        work = paths.models_dir() / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            out = work / "model"
            manifest = {"name": name, **build(out, work)}
            manifest["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
            manifest["seconds"] = round(time.time() - t0, 1)
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.rename(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(f"[thinklab] {name} ready at {final} ({time.time() - t0:.0f} s)")
    return final
