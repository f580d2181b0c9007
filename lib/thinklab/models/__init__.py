"""Models: which names exist, how they become weights on disk, and the knobs on loaded ones.

- `registry`: the named models (embedded, offline MoE, local directories, hub ids);
  `resolve(name)` gives the path and fingerprint of the weights, building them on first use.
- `disk`: the build-once discipline and manifest every materialized model directory follows.
- `gguf`: converting an embedded model's packaged GGUF to safetensors.
- `moefy`: the offline MoE (MoEfication of a dense model) and its transformers classes.
- `router`: mixture-of-experts routers: active experts per token, router tracing.
- `quantization`: weight quantization of a loaded model, and vLLM's quantization names.

The registry's names are imported here; importing `thinklab.models` loads neither torch
nor transformers. The router's names are here too but load torch on first use; quantization
and moefy are imported as submodules (`from thinklab.models import quantization`).
"""

from __future__ import annotations

from thinklab.models.disk import MANIFEST, ModelError, build_once, check_materialized, fingerprint
from thinklab.models.registry import (
    ALIASES,
    DEFAULT_OFFLINE,
    EMBEDDED,
    OFFLINE,
    EmbeddedModel,
    OfflineMoE,
    ResolvedModel,
    canonical_name,
    context_length,
    is_materialized,
    list_models,
    load_config,
    materialize,
    model_dir,
    model_name,
    offline_dir,
    resolve,
)

# Names of router.py, which imports torch: resolved on first access (PEP 562), so that a
# caller that only resolves names never pays for torch.
_ROUTER_NAMES = (
    "ForwardRecord",
    "MoEError",
    "RouterTrace",
    "find_routers",
    "get_top_k",
    "is_moe",
    "num_experts",
    "restore_top_k",
    "routing_stats",
    "set_top_k",
    "top_k_override",
)

__all__ = [
    "ALIASES", "DEFAULT_OFFLINE", "EMBEDDED", "MANIFEST", "OFFLINE", "EmbeddedModel", "ModelError", "OfflineMoE",
    "ResolvedModel", "build_once", "canonical_name", "check_materialized", "context_length", "fingerprint",
    "is_materialized", "list_models", "load_config", "materialize", "model_dir", "model_name", "offline_dir",
    "resolve", *_ROUTER_NAMES,
]


def __getattr__(name: str):
    if name in _ROUTER_NAMES:
        from thinklab.models import router

        return getattr(router, name)
    raise AttributeError(f"module 'thinklab.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ROUTER_NAMES))
