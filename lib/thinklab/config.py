"""Typed specs: the single source of truth for notebook parameters and CLI flags.

Every spec is a frozen dataclass with defaults. A run is fully described by a
`RunSpec`; its id is a content hash of that spec (see `RunSpec.run_id`). This module
knows nothing about models, backends or files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

BACKENDS = ("hf", "vllm", "openai")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


# (spec part, field, default) of fields added after run ids were in use.
_LATER_FIELDS = (("model", "base_url", None),)


@dataclass(frozen=True)
class ModelSpec:
    """Which weights, loaded how."""

    name: str = "default"  # embedded name ("default", "smollm2-135m", "qwen2.5-0.5b"), hub id or local dir
    backend: str = "hf"  # "hf" (transformers), "vllm" (offline engine) or "openai" (a running server)
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on GPU
    quantization: str | None = None  # numeric format, e.g. "int8-wo"; None = baseline
    moe_top_k: int | None = None  # active experts per token; None = the checkpoint's own
    revision: str | None = None  # hub revision
    trust_remote_code: bool = False
    # vLLM engine options that pass straight through (ignored by the hf backend).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # e.g. "ray"
    kv_cache_dtype: str | None = None  # vLLM only, e.g. "fp8"
    # backend="openai" only: the server's base URL, e.g. "http://host:8000/v1" (None = the
    # THINKLAB_OPENAI_BASE_URL environment variable). The API key never goes in a spec.
    base_url: str | None = None

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.base_url is not None:
            if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"base_url={self.base_url!r} is not valid; use an http:// or https:// URL, or None")
            if self.backend != "openai":
                raise ValueError(f"base_url={self.base_url!r} is only used by backend='openai', not backend={self.backend!r}")
        if self.moe_top_k is not None and self.moe_top_k < 1:
            raise ValueError(f"moe_top_k={self.moe_top_k} is not valid; use a positive int or None")


@dataclass(frozen=True)
class SamplingSpec:
    """How each token is drawn. temperature=0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (plain temperature sampling)
    n: int = 1  # samples per problem
    max_tokens: int = 256  # cap on generated tokens per sample (thinking + answer)
    seed: int = 0  # base seed; sample i of problem p gets its own seed derived from it

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is not valid; use 0 (greedy) or a positive float")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is not valid; use a float in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is not valid; use 0 (off) or a positive int")
        if self.n < 1:
            raise ValueError(f"n={self.n} is not valid; use at least 1 sample per problem")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} is not valid; use a positive int")


@dataclass(frozen=True)
class BudgetSpec:
    """Thinking budget and s1-style extensions.

    `think_end` is the string that ends the thinking phase (`</think>` for reasoning
    models). For instruction models without think tags, `think_end` is None: the
    thinking phase is the chain of thought before `answer_markers`, and a capped chain
    is forced to answer with `answer_cue`.
    """

    thinking_budget: int | None = None  # cap on thinking tokens; None = uncapped
    wait_extensions: int = 0  # times the end of thinking is replaced by `wait_string`
    wait_string: str = "Wait"
    think_start: str | None = None  # e.g. "<think>"; None = auto from the model
    think_end: str | None = None  # e.g. "</think>"; None = auto from the model
    answer_cue: str | None = None  # forced text after a capped thinking phase; None = auto
    answer_budget: int = 64  # tokens allowed after a forced answer cue
    answer_markers: tuple[str, ...] = ("\\boxed{", "Final answer:", "final answer is", "The answer is")

    def __post_init__(self) -> None:
        if self.thinking_budget is not None and self.thinking_budget < 1:
            raise ValueError(f"thinking_budget={self.thinking_budget} is not valid; use a positive int or None")
        if self.wait_extensions < 0:
            raise ValueError(f"wait_extensions={self.wait_extensions} is not valid; use 0 or more")
        if self.answer_budget < 1:
            raise ValueError(f"answer_budget={self.answer_budget} is not valid; use a positive int")


@dataclass(frozen=True)
class PromptSpec:
    """How a problem becomes the text given to the model."""

    system_prompt: str | None = None
    enable_thinking: bool | None = None  # passed to chat templates that support it
    few_shot: int = 0  # worked examples from the task's own pool placed before the question


@dataclass(frozen=True)
class GradingSpec:
    """Grading options that change the rows (so they are part of the run id)."""

    # True: a sample cut at max_tokens without a final answer is still graded through the
    # fallbacks (last number, last line, a choice letter), as lm-eval's flexible-extract does.
    # False: it is incorrect (extractor "none_truncated").
    lenient_truncated: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.lenient_truncated, bool):
            raise ValueError(f"lenient_truncated={self.lenient_truncated!r} is not valid; use True or False")


@dataclass(frozen=True)
class RunSpec:
    """One condition: one model, one task subset, one sampling setting, one budget."""

    model: ModelSpec = field(default_factory=ModelSpec)
    task: str = "rg:basic_arithmetic"
    n_problems: int = 8
    task_seed: int = 0  # picks the reproducible subset of problems
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    prompt: PromptSpec = field(default_factory=PromptSpec)
    grading: GradingSpec = field(default_factory=GradingSpec)

    def __post_init__(self) -> None:
        if self.n_problems < 1:
            raise ValueError(f"n_problems={self.n_problems} is not valid; use a positive int")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        # Fields added after runs were stored are left out at their default, so those runs keep their ids.
        for part, key, default in _LATER_FIELDS:
            if d[part].get(key) == default:
                d[part].pop(key)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        budget = dict(d.get("budget", {}))
        if "answer_markers" in budget:
            budget["answer_markers"] = tuple(budget["answer_markers"])
        return cls(
            model=ModelSpec(**d.get("model", {})),
            task=d.get("task", cls.task),
            n_problems=d.get("n_problems", cls.n_problems),
            task_seed=d.get("task_seed", cls.task_seed),
            sampling=SamplingSpec(**d.get("sampling", {})),
            budget=BudgetSpec(**budget),
            prompt=PromptSpec(**d.get("prompt", {})),
            grading=GradingSpec(**d.get("grading", {})),  # absent from specs written before grader 2
        )

    @property
    def run_id(self) -> str:
        """Content hash of the full spec (16 hex digits)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "RunSpec":
        """Copy with top-level fields or dotted sub-fields changed: replace(**{"sampling.temperature": 0.7})."""
        nested: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in changes.items():
            if "." in key:
                part, sub = key.split(".", 1)
                nested.setdefault(part, {})[sub] = value
            else:
                top[key] = value
        for part, subs in nested.items():
            top[part] = dataclasses.replace(getattr(self, part), **subs)
        return dataclasses.replace(self, **top)


def sample_seed(base_seed: int, problem_id: str, sample_idx: int) -> int:
    """The seed of one sample: independent of batch layout and of the other problems."""
    h = hashlib.sha256(f"{base_seed}:{problem_id}:{sample_idx}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
