"""Typed specs: the single source of truth for notebook parameters and CLI flags.

Every spec is a frozen dataclass with defaults. A run is described by a `RunSpec`: every
option that changes the numbers a run stores is a field here, so notebooks, CLI flags
(derived from these fields) and sweep files can set it, and the run id covers it. The
id itself (`thinklab.runner.run_id`) also hashes the task data's content and the
canonical model name, which need files. Every spec checks its fields against their
annotations when it is built (`check_fields`), so a wrong type or a non-finite number is
refused with the spec, the field, the value and what is valid, before anything loads.
This module knows nothing about models, backends or files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

BACKENDS = ("hf", "vllm", "openai")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The decoder forward of the hf backend: "lean" = thinklab's CPU forward (backends/lean.py),
# "transformers" = transformers' own modules, "auto" = lean where it can run, else transformers.
FORWARDS = ("auto", "lean", "transformers")
ENTROPY_ESTIMATORS = ("lower", "uniform")


class SpecError(TypeError, ValueError):
    """A spec field given a value of the wrong type or out of range.

    Both a TypeError and a ValueError, so callers catching either keep working.
    `spec`, `field` and `value` say what was refused.
    """

    def __init__(self, spec: str, field_name: str, value: Any, why: str):
        self.spec, self.field, self.value, self.why = spec, field_name, value, why
        super().__init__(f"{spec}.{field_name}={_show(value)} is not valid: {why}")

    def __reduce__(self):  # crosses process boundaries (pool workers) intact
        return type(self), (self.spec, self.field, self.value, self.why)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- annotation-driven checks


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    """An annotation in words: 'an int', 'a float or None', 'a tuple of str'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"a tuple of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}" if args else "a tuple"
    if tp is type(None):
        return "None"
    if tp is Any:
        return "anything"
    if tp is float:
        return "a finite float"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} (or a dict of its fields)"
    name = getattr(tp, "__name__", str(tp))
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


class Mismatch(TypeError):
    """A value that the annotation it was checked against does not admit."""


def coerce(tp: Any, value: Any, *, whole_float_as_int: bool = False, finite: bool = True) -> Any:
    """`value` as annotation `tp` wants it (int -> float, list -> tuple, dict -> spec), or Mismatch.

    The one type check behind specs (`check_fields`) and study parameters
    (`studies.common.check_params`). Study parameters come from YAML and papermill, so they
    pass `whole_float_as_int=True` (YAML reads `1e3` as a float) and `finite=False` (their
    own rules say why NaN or infinity is not valid)."""

    def inner(tp: Any, value: Any) -> Any:
        return coerce(tp, value, whole_float_as_int=whole_float_as_int, finite=finite)

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return inner(arg, value)
            except Mismatch:
                continue
        raise Mismatch
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch
    if tp is int:  # numpy integers too (values computed from arrays), never bools
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value if type(value) is int else int(value)
        if whole_float_as_int and isinstance(value, float) and value.is_integer():
            return int(value)
        raise Mismatch
    if tp is float:
        # an int is a float here (0 means greedy); stored as float so that equal specs share one run id
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and (not finite or math.isfinite(value)):
            return value if type(value) is float else float(value)
        raise Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise Mismatch
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise Mismatch
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if args and len(items) != len(value):
            raise Mismatch
        return tuple(inner(t, v) for t, v in zip(items, value)) if args else tuple(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            check_fields(value)  # again, for a spec whose own __post_init__ does not
            return value
        if isinstance(value, dict):
            return from_mapping(tp, value)
        raise Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise Mismatch
    return value  # an annotation this check does not know: leave it to the spec's own checks


def check_fields(spec: Any) -> None:
    """Check every field of dataclass `spec` against its annotation, normalizing in place.

    Called first in every spec's `__post_init__`, so a field added later is covered
    without writing a check for it. Raises SpecError naming the spec, the field, the
    value and the annotation in words.
    """
    cls = type(spec)
    hints = _hints(cls)
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        tp = hints[f.name]
        try:
            fixed = coerce(tp, value)
        except Mismatch:
            why = f"expected {_describe(tp)}, got {type(value).__name__}"
            if isinstance(value, float) and not math.isfinite(value):
                why = f"expected {_describe(tp)}; NaN and infinity are never valid"
            elif isinstance(value, str) and tp is not str and _looks_numeric(value):
                why += f" (write the number without quotes: {value.strip()})"
            raise SpecError(cls.__name__, f.name, value, why) from None
        if fixed is not value:
            object.__setattr__(spec, f.name, fixed)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def from_mapping(cls: type, values: dict) -> Any:
    """Build spec `cls` from a dict (JSON, YAML), refusing unknown keys by name."""
    if not isinstance(values, dict):
        raise SpecError(cls.__name__, "*", values, f"expected a dict of {cls.__name__} fields")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise SpecError(cls.__name__, str(unknown[0]), values[unknown[0]],
                        f"no such field; its fields are {', '.join(names)}")
    return cls(**values)


def _invalid(spec: Any, name: str, why: str) -> SpecError:
    return SpecError(type(spec).__name__, name, getattr(spec, name), why)


def _check_choice(spec: Any, name: str, valid: tuple) -> None:
    if getattr(spec, name) not in valid:
        raise _invalid(spec, name, f"choose one of {', '.join(map(repr, valid))}")


# (spec part, field, default) of fields added after run ids were in use.


@dataclass(frozen=True)
class ModelSpec:
    """Which weights, loaded how."""

    name: str = "default"  # embedded name ("default", "smollm2-135m", "qwen2.5-0.5b"), hub id or local dir
    backend: str = "hf"  # "hf" (transformers), "vllm" (offline engine) or "openai" (a running server)
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on GPU
    # numeric format; None = baseline. hf backend: "int8-wo" etc. are simulated (weights quantized then
    # dequantized, same forward as the baseline), "int8-wo:kernel" etc. run the format's own kernels
    # (see thinklab.models.quantization); vLLM: its engine's method names, e.g. "fp8".
    quantization: str | None = None
    moe_top_k: int | None = None  # active experts per token; None = the checkpoint's own
    revision: str | None = None  # hub revision
    trust_remote_code: bool = False  # run Python code shipped with a hub model (its own architecture)
    # vLLM engine options that pass straight through (ignored by the hf backend).
    tensor_parallel_size: int = 1  # vLLM: GPUs each layer's weights are split over
    pipeline_parallel_size: int = 1  # vLLM: GPUs the layers are spread over in stages
    distributed_executor_backend: str | None = None  # e.g. "ray"
    kv_cache_dtype: str | None = None  # vLLM only, e.g. "fp8"
    # Options that change the stored numbers (so they are spec fields and part of the run id).
    forward: str = "auto"  # hf backend: "auto" | "lean" | "transformers"; vLLM: "auto" only
    # vLLM: None = exact entropy, computed in the engine; K = estimated from the top-K log-probabilities.
    # Other backends ignore it and hold it at 20 (hf is always exact, a server gives only top-K),
    # the default it had before exact vLLM entropy, so their run ids did not change.
    entropy_top_k: int | None = None
    entropy_estimator: str = "lower"  # vLLM only, top-K mode: tail term "lower" (bound) or "uniform"
    enforce_eager: bool | None = None  # vLLM only: no torch.compile/CUDA graphs; None = True on CPU
    # backend="openai" only: the server's base URL, e.g. "http://host:8000/v1" (None = the
    # THINKLAB_OPENAI_BASE_URL environment variable). The API key never goes in a spec.
    base_url: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.name.strip():
            raise _invalid(self, "name", "use an embedded model name (see `thinklab models`), a hub id or a local dir")
        _check_choice(self, "backend", BACKENDS)
        _check_choice(self, "dtype", DTYPES)
        if self.base_url is not None:
            if not self.base_url.startswith(("http://", "https://")):
                raise _invalid(self, "base_url", "use an http:// or https:// URL (e.g. 'http://127.0.0.1:8000/v1'), or None")
            if self.backend != "openai":
                raise _invalid(self, "base_url", f"it is only used by backend='openai', not backend={self.backend!r}")
        if self.moe_top_k is not None and self.moe_top_k < 1:
            raise _invalid(self, "moe_top_k", "use a positive int or None")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise _invalid(self, name, "use a positive int")
        _check_choice(self, "forward", FORWARDS)
        if self.backend == "vllm" and self.forward != "auto":
            raise _invalid(self, "forward", "vLLM runs its own forward; use forward='auto' with backend='vllm'")
        if self.entropy_top_k is None and self.backend != "vllm":
            object.__setattr__(self, "entropy_top_k", 20)
        if self.entropy_top_k is not None and self.entropy_top_k < 1:
            raise _invalid(self, "entropy_top_k", "use a positive int, or None for exact full-vocabulary entropy")
        _check_choice(self, "entropy_estimator", ENTROPY_ESTIMATORS)


@dataclass(frozen=True)
class SamplingSpec:
    """How each token is drawn. temperature=0 means greedy."""

    temperature: float = 1.0  # 0 = greedy; higher flattens the distribution
    top_p: float = 1.0  # nucleus sampling: keep the smallest token set with this much probability; 1 = off
    top_k: int = 0  # 0 = off (plain temperature sampling)
    n: int = 1  # samples per problem
    max_tokens: int = 256  # cap on generated tokens per sample (thinking + answer)
    seed: int = 0  # base seed; sample i of problem p gets its own seed derived from it

    def __post_init__(self) -> None:
        check_fields(self)
        if self.temperature < 0:
            raise _invalid(self, "temperature", "use 0 (greedy) or a positive float")
        if not 0 < self.top_p <= 1:
            raise _invalid(self, "top_p", "use a float in (0, 1]")
        if self.top_k < 0:
            raise _invalid(self, "top_k", "use 0 (off) or a positive int")
        if self.n < 1:
            raise _invalid(self, "n", "use at least 1 sample per problem")
        if self.max_tokens < 1:
            raise _invalid(self, "max_tokens", "use a positive int")


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
    wait_string: str = "Wait"  # what replaces the end of thinking on each extension
    think_start: str | None = None  # e.g. "<think>"; None = auto from the model
    think_end: str | None = None  # e.g. "</think>"; None = auto from the model
    answer_cue: str | None = None  # forced text after a capped thinking phase; None = auto
    answer_budget: int = 64  # tokens allowed after a forced answer cue
    # strings whose first occurrence starts the answer phase of a model without think tags
    answer_markers: tuple[str, ...] = ("\\boxed{", "Final answer:", "final answer is", "The answer is")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.thinking_budget is not None and self.thinking_budget < 1:
            raise _invalid(self, "thinking_budget", "use a positive int or None (uncapped)")
        if self.wait_extensions < 0:
            raise _invalid(self, "wait_extensions", "use 0 or more")
        if self.answer_budget < 1:
            raise _invalid(self, "answer_budget", "use a positive int")


@dataclass(frozen=True)
class PromptSpec:
    """How a problem becomes the text given to the model."""

    system_prompt: str | None = None  # None = the chat template's own default
    enable_thinking: bool | None = None  # passed to chat templates that support it
    few_shot: int = 0  # worked examples from the task's own pool placed before the question

    def __post_init__(self) -> None:
        check_fields(self)
        if self.few_shot < 0:
            raise _invalid(self, "few_shot", "use 0 or more worked examples")


@dataclass(frozen=True)
class GradingSpec:
    """Grading options that change the rows (so they are part of the run id)."""

    # True: a sample cut at max_tokens without a final answer is still graded through the
    # fallbacks (last number, last line, a choice letter), as lm-eval's flexible-extract does.
    # False: it is incorrect (extractor "none_truncated").
    lenient_truncated: bool = False

    def __post_init__(self) -> None:
        check_fields(self)


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
        check_fields(self)
        if not self.task.strip():
            raise _invalid(self, "task", "name a task, e.g. gsm8k or rg:chain_sum (see `thinklab tasks`)")
        if self.n_problems < 1:
            raise _invalid(self, "n_problems", "use a positive int")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        """The spec of `to_dict()` (or a JSON/YAML copy of it): nested dicts become specs, lists tuples."""
        return from_mapping(cls, d)

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
            sub = getattr(self, part, None)
            if not dataclasses.is_dataclass(sub):
                raise SpecError(type(self).__name__, part, sub, f"{part!r} has no sub-fields to set")
            top[part] = dataclasses.replace(sub, **_known(sub, subs))
        return dataclasses.replace(self, **_known(self, top))


def _known(spec: Any, changes: dict[str, Any]) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(spec)]
    for key, value in changes.items():
        if key not in names:
            raise SpecError(type(spec).__name__, key, value, f"no such field; its fields are {', '.join(names)}")
    return changes


def sample_seed(base_seed: int, problem_id: str, sample_idx: int) -> int:
    """The seed of one sample: independent of batch layout and of the other problems."""
    h = hashlib.sha256(f"{base_seed}:{problem_id}:{sample_idx}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
