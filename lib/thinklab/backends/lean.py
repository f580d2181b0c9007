"""A lean forward pass for llama-family checkpoints on CPU, used by the transformers backend.

transformers' modules are written for every case at once: per layer a decode step runs
about fifty small tensor operations (separate q/k/v projections, `repeat_kv` copies of the
keys and values, a cache that grows by `torch.cat`, an RMSNorm spelled as six operations),
and at batch 16 those cost as much as the matrix products themselves (profile in
BENCHMARKS.md). This module runs the same weights with the same arithmetic in fewer,
larger operations:

  - every projection is one GEMM against a weight packed once at load; q/k/v are one GEMM
    against their concatenation. With the native kernels (native/*.cpp, C++ built on
    first use, AVX-512) the GEMMs are thinklab's own (native/gemm.cpp: streams the weight
    with prefetching, ~1.4x oneDNN at decode shapes); otherwise oneDNN's;
  - residual adds, SiLU, the gate-times-up product and RMSNorm run inside the GEMMs
    (RMSNorm's weight folded into the packed weight, 1 / rms applied in the write-out;
    oneDNN post-ops on the fallback path) instead of as separate passes;
  - RoPE is one complex multiplication over queries and keys together (their head
    features are stored pairwise interleaved, which leaves attention scores unchanged);
  - keys and values are written into a preallocated cache (no `cat`); grouped-query
    heads are folded into the query length, so nothing is copied per head;
  - at decode, RoPE, the cache write and attention of a layer are one call into a C++
    kernel (native/decode_attention.cpp); without the native kernels (no compiler, no
    AVX-512, THINKLAB_NATIVE=0) the same steps run as torch operations and SDPA;
  - `decode_rows` decodes rows that each hold their own number of positions (the row
    scheduler's, scheduler.py), each row's arithmetic reading only its own positions;
  - with `bf16` (a model loaded as bfloat16 on the CPU, forward.select) every GEMM takes
    bf16 weights and inputs and sums in float32 (native/gemm.cpp's VDPBF16PS kernel where
    the CPU has AVX512_BF16, oneDNN float32 GEMMs on the rounded values elsewhere), the
    rest of the forward staying float32.

It reads the weights of a loaded transformers model and keeps its own packed copies
(memory: about the size of the linear weights), and it uses the model's own rotary
embedding module, so RoPE variants follow the checkpoint. It supports `llama` and `qwen2`
configurations (SmolLM2, Llama, Qwen2/2.5) and thinklab's offline MoE (a MoEfied llama:
each position's FFN keeps the neuron groups its router picks) in float32 without
quantization, sliding windows or trained MoE blocks; `LeanDecoder.unsupported(model)` says why a model is not eligible, and
the backend then uses the transformers forward. Logits agree with the transformers
forward to float rounding (tests/test_lean.py).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "qwen2", "thinklab_moefied_llama")
SUPPORTED_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MoefiedLlamaForCausalLM")
ATTENTION_CHUNK = 128  # columns per chunk of the torch path's row-wise decode attention (decode_rows)
NATIVE_DIR = Path(__file__).parent / "native"
NATIVE_SOURCES = [NATIVE_DIR / "decode_attention.cpp", NATIVE_DIR / "gemm.cpp", NATIVE_DIR / "sampling.cpp"]
_native = None  # the loaded extension, or False once it proved unavailable
_warned_gemm = False


def build_native():
    """Build (once; then cached by torch.utils.cpp_extension under TORCH_EXTENSIONS_DIR) and
    load the native kernels (native/*.cpp: decode attention, packed GEMMs, the fused token
    choice and trace of hf.py). Raises if they cannot be built. They compile on any x86-64
    machine with a C++ compiler; the GEMM and sampling kernels run only where `cpu_supported()`
    (AVX-512F), decode attention also where `attention_supported()` (AVX2 and FMA).

    They are compiled with OpenMP so that ATen's `parallel_for` in them runs on torch's own
    OpenMP pool (the process loads one libgomp: torch's); without it `parallel_for` is
    inlined serial and the kernels would use one core."""
    from torch.utils.cpp_extension import _get_build_directory, load

    if not any(Path(_get_build_directory("thinklab_native", False)).glob("thinklab_native*.so")):
        print("thinklab: building the native CPU kernels (once; about a minute)", file=sys.stderr)
    return load(name="thinklab_native", sources=[str(s) for s in NATIVE_SOURCES],
                extra_include_paths=[str(NATIVE_DIR)], extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)


def _extension():
    """The built native extension, or None where it cannot be built or used here (no
    compiler, THINKLAB_NATIVE=0, a CPU with neither AVX-512F nor AVX2 and FMA); the first
    failure is warned about once."""
    global _native
    if _native is None:
        if os.environ.get("THINKLAB_NATIVE", "1") == "0":
            _native = False
        else:
            try:
                capability = torch.backends.cpu.get_cpu_capability()
                if "AVX512" not in capability and "AVX2" not in capability:
                    # checked before building: nothing could run here, so a minute of compiling would be lost
                    raise RuntimeError(f"this CPU has neither AVX-512F nor AVX2 (torch reports {capability})")
                _native = build_native()
                if not _native.attention_supported():
                    raise RuntimeError("this CPU has neither AVX-512F nor AVX2 with FMA")
            except Exception as exc:  # no compiler or headers, or an older CPU: the torch path still works
                warnings.warn(f"thinklab: native CPU kernels unavailable, using oneDNN and SDPA ({exc})",
                              stacklevel=3)
                _native = False
    return _native or None


def native_ops():
    """All the native kernels (GEMMs, token choice, decode attention), or None where they
    cannot all run: besides `_extension`'s reasons, a CPU without AVX-512F. Then the lean
    forward uses oneDNN and F.rms_norm (and a warning says why); its decode attention and
    token choice may still be native, in their AVX2 variants (`attention_ops`, `sampling_ops`)."""
    ext = _extension()
    if ext is not None and not ext.cpu_supported():
        global _warned_gemm
        if not _warned_gemm:
            warnings.warn("thinklab: the native GEMM kernels need AVX-512F, which this CPU lacks "
                          f"(torch reports {torch.backends.cpu.get_cpu_capability()}); using oneDNN for those, "
                          "and the AVX2 variants of the native decode attention and token choice", stacklevel=2)
            _warned_gemm = True
        return None
    return ext


def sampling_ops():
    """The native token choice (native/sampling.cpp: AVX-512F, or its AVX2 variant), or None
    (then torch operations; also with THINKLAB_NATIVE_SAMPLING=0, which resumes a run begun
    on an AVX2 host before the kernel had its AVX2 variant); see `_extension`."""
    if os.environ.get("THINKLAB_NATIVE_SAMPLING", "1") == "0":
        return None
    ext = _extension()
    return ext if ext is not None and ext.sampling_supported() else None


def attention_ops():
    """The native decode attention (AVX-512F, or its AVX2 variant), or None (then SDPA and
    torch operations); see `_extension`."""
    return _extension()


def _pack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, post: str = "none") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post, [], "")


def _linear_add(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """other + x @ W.T (+ bias), the sum taken inside the GEMM."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, "add")


def _linear_mul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """other * (x @ W.T (+ bias)), the product taken inside the GEMM."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, "mul")


def _bias(module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


def _cat_bias(modules, device) -> torch.Tensor | None:
    if all(m.bias is None for m in modules):
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, device=device)
                      for m in modules]).contiguous()


def pack_linears(model: torch.nn.Module, batch_hint: int = 16) -> int:
    """Run every plain fp32 `nn.Linear` of a CPU model through oneDNN with a prepacked weight:
    the fallback for CPU models the lean forward does not implement.

    At decode shapes (a few rows against a large weight) the default path repacks the weight
    on every call, which prepacking avoids (the gain is measured by benchmarks/decode_roofline.py
    and kept in BENCHMARKS.md). Each module stays an
    `nn.Linear` (hooks still fire, `weight` is untouched and still used by tied embeddings);
    only its `forward` changes. Results differ from `F.linear` by float rounding (~1e-6
    relative). The packed copy costs as much memory as the weights. Returns how many
    modules were packed.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or type(w.data) is not torch.Tensor:
            continue  # quantized tensor subclasses and other dtypes keep their own kernels
        packed, bias = _pack(w, batch_hint), _bias(module)

        def forward(x: torch.Tensor, _packed=packed, _bias=bias) -> torch.Tensor:
            return _linear(x, _packed, _bias)

        module.forward = forward
        n += 1
    return n


_PANEL = 48  # output columns per packed panel in native/gemm.cpp


def _panel_bias(bias: torch.Tensor, panels: int) -> torch.Tensor:
    """A bias laid out like the packed weight's columns: zero past the real outputs."""
    out = bias.new_zeros(panels * _PANEL)
    out[: bias.numel()] = bias.detach()
    return out


@dataclass
class RMSNorm:
    weight: torch.Tensor
    eps: float


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest bfloat16 (ties to even), kept in float32."""
    return x.to(torch.bfloat16).to(x.dtype)


class Projection:
    """One linear layer's weight (or several stacked: q, k, v), packed once for the GEMM that
    runs it: the native kernel (native/gemm.cpp) where the native kernels are available
    (`native_ops()`), oneDNN otherwise. `proj(x)` is x W^T + b, or RMSNorm(x) W^T + b if
    the projection was given the norm that precedes it; `proj(x, residual)` adds the
    residual inside the GEMM's write-out.

    The native GEMM folds the norm's weight into the packed weight and applies each row's
    1 / rms in its write-out, so the normalized activations are never written.

    `bf16`: the weight (the norm's weight folded in) and each input row are rounded to
    bfloat16 and the products summed in float32: natively by VDPBF16PS (AVX512_BF16), on
    the oneDNN path by fp32 GEMMs on the rounded values, 1 / rms applied to the rounded row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, native, batch_hint: int,
                 norm: RMSNorm | None = None, bf16: bool = False):
        self.n = weight.shape[0]
        self.native, self.norm, self.bf16 = native, norm, bf16
        self.rms_eps = -1.0 if norm is None else norm.eps  # the native GEMM's flag: negative, no norm
        if native is None and not bf16:  # oneDNN applies the norm to x, unfolded
            self.w, self.bias = _pack(weight, batch_hint), bias
            return
        folded = weight.detach() if norm is None else weight.detach() * norm.weight.detach()
        if native is not None:
            self.w = (native.pack_weight_bf16 if bf16 else native.pack_weight)(folded.contiguous())
            self.bias = None if bias is None else _panel_bias(bias, self.w.shape[0])
        else:
            self.w, self.bias = _pack(round_bf16(folded), batch_hint), bias

    def bias_zeros(self) -> torch.Tensor:
        """A zero bias in the packed columns' layout (native path)."""
        return torch.zeros(self.w.shape[0] * _PANEL, dtype=torch.float32, device=self.w.device)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM's input on the oneDNN path."""
        if self.bf16:
            h = round_bf16(x)
            return h if self.norm is None else h * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm.eps)
        return x if self.norm is None else F.rms_norm(x, (x.shape[-1],), self.norm.weight, self.norm.eps)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.native is not None:
            return self.native.packed_linear(x, self.w, self.n, self.bias, residual, False, self.rms_eps)
        if residual is None:
            return _linear(self.normed(x), self.w, self.bias)
        return _linear_add(self.normed(x), self.w, self.bias, residual)


class SwiGLU(Projection):
    """silu(x W_gate^T + b_gate) * (x W_up^T + b_up) (x normalized first if given a norm):
    one native GEMM over the gate's and the up projection's panels interleaved, or two
    oneDNN GEMMs with SiLU and the product as post-ops."""

    def __init__(self, gate: torch.nn.Linear, up: torch.nn.Linear, native, batch_hint: int,
                 norm: RMSNorm | None = None, bf16: bool = False):
        self.native, self.norm, self.bf16 = native, norm, bf16
        self.rms_eps = -1.0 if norm is None else norm.eps
        self.gate, self.up = (Projection(m.weight, _bias(m), native, batch_hint, norm, bf16) for m in (gate, up))
        if native is not None:  # panels gate 0, up 0, gate 1, up 1, ...
            self.n = self.gate.n
            self.w = torch.stack([self.gate.w, self.up.w], 1).flatten(0, 1).contiguous()
            self.bias = None
            if self.gate.bias is not None or self.up.bias is not None:
                b = [p.bias if p.bias is not None else p.bias_zeros() for p in (self.gate, self.up)]
                self.bias = torch.stack([t.view(-1, _PANEL) for t in b], 1).flatten().contiguous()
            del self.gate, self.up  # their panels now live in self.w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.packed_linear(x, self.w, self.n, self.bias, None, True, self.rms_eps)
        h = self.normed(x)
        return _linear_mul(h, self.up.w, self.up.bias, _linear(h, self.gate.w, self.gate.bias, "swish"))


@dataclass
class _Layer:
    qkv: Projection  # with the input RMSNorm
    o: Projection
    mlp: SwiGLU  # with the post-attention RMSNorm
    down: Projection
    router: torch.nn.Module | None = None  # the offline MoE's group router (thinklab.models.moefy), read live

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN's residual update of x; in an offline MoE each position keeps only the
        neuron groups its router picks (top-k of them), as `moefy.MoefiedMLP` does."""
        h, r = self.mlp(x), self.router
        if r is not None and r.top_k < r.num_experts:
            flat = h.reshape(-1, h.shape[-1])
            keep = torch.zeros((flat.shape[0], r.num_experts), dtype=torch.bool, device=h.device)
            keep.scatter_(1, r(flat)[2], True)
            h = (flat * keep[:, r.expert_of].to(flat.dtype)).view_as(h)
        return self.down(h, x)


class KVCache:
    """Preallocated keys and values per layer, (batch, kv heads, capacity, head dim) for
    values. Keys are laid out for the attention that reads them: for the native kernel in
    blocks of 16 positions, each block transposed, (batch, kv heads, capacity / 16, head
    dim, 16), so that it scores a block's 16 keys as one vector and still reads a head's
    keys as one contiguous stream; for SDPA like the values (`blocked=False`), so that a
    window of them is a view rather than a copy. The capacity is rounded up to a multiple
    of 16.

    Every row holds the same number of positions (`length`); which of them belong to a
    row is said by the attention mask, not by the cache (left padding, or the row
    scheduler's slots). The tensors start zeroed and every position a row does not own
    holds either zeros or keys and values some row computed, never uninitialized memory:
    attention weighs masked positions by exactly 0, and 0 times a stale finite value is 0,
    where 0 times an uninitialized NaN would not be.
    """

    BLOCK = 16

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device,
                 blocked: bool = True):
        blocks = -(-capacity // self.BLOCK)
        self.blocked = blocked
        self.capacity = blocks * self.BLOCK
        kshape = (batch, kv_heads, blocks, head_dim, self.BLOCK) if blocked else (batch, kv_heads, self.capacity, head_dim)
        self.k = [torch.zeros(kshape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros((batch, kv_heads, self.capacity, head_dim), dtype=dtype, device=device)
                  for _ in range(layers)]
        self.length = 0

    @property
    def batch(self) -> int:
        return self.v[0].shape[0]

    def write(self, layer: int, n0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values (batch, kv heads, T, head dim) at positions n0 .. n0 + T."""
        if self.blocked and n0 % self.BLOCK == 0 and k.shape[2] > 1:
            # whole blocks from n0 on (a prefill): one strided copy; the zeros that pad the last
            # block land on positions not written yet
            T, B = k.shape[2], self.BLOCK
            nb = -(-T // B)
            padded = F.pad(k, (0, 0, 0, nb * B - T)) if T % B else k
            self.k[layer][:, :, n0 // B : n0 // B + nb] = padded.unflatten(2, (nb, B)).transpose(-1, -2)
        elif self.blocked:
            pos = torch.arange(n0, n0 + k.shape[2], device=k.device)
            # two index tensors around a slice: the indexed (position) dimension comes first
            self.k[layer][:, :, pos // self.BLOCK, :, pos % self.BLOCK] = k.permute(2, 0, 1, 3)
        else:
            self.k[layer][:, :, n0 : n0 + k.shape[2]] = k
        self.v[layer][:, :, n0 : n0 + k.shape[2]] = v

    def keys(self, layer: int, n: int) -> torch.Tensor:
        """The first n keys of a layer as (batch, kv heads, n, head dim): a view, or a copy
        of the blocks that hold them in the blocked layout."""
        if not self.blocked:
            return self.k[layer][:, :, :n]
        k = self.k[layer][:, :, : -(-n // self.BLOCK)]  # only the blocks that hold them
        return k.transpose(-1, -2).reshape(k.shape[0], k.shape[1], -1, k.shape[3])[:, :, :n]

    def resized(self, rows: torch.Tensor | None, batch: int, capacity: int) -> "KVCache":
        """A new cache of `batch` rows and `capacity` positions holding the first `length`
        positions of `rows` (default: all rows) in its first rows; zeros elsewhere."""
        rows = torch.arange(self.batch, device=self.v[0].device) if rows is None else rows
        v0 = self.v[0]
        new = KVCache(len(self.k), batch, v0.shape[1], capacity, v0.shape[3], v0.dtype, v0.device, self.blocked)
        if new.capacity < self.length:
            raise ValueError(f"resized: {self.length} positions do not fit a capacity of {capacity}")
        n, m = self.length, len(rows)
        nk = -(-n // self.BLOCK) if self.blocked else n
        for i in range(len(self.k)):
            new.k[i][:m, :, :nk] = self.k[i][rows, :, :nk]
            new.v[i][:m, :, :n] = self.v[i][rows, :, :n]
        new.length = n
        return new

    def batch_select_indices(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch); the same call as
        transformers' DynamicCache, so the decode loop treats both caches alike."""
        new = self.resized(rows, len(rows), self.capacity)
        self.k, self.v = new.k, new.v


class LeanDecoder:
    @staticmethod
    def unsupported(model) -> str | None:
        """Why this model cannot use the lean forward, or None if it can."""
        cfg = model.config
        if cfg.model_type not in SUPPORTED_TYPES:
            return f"model_type {cfg.model_type!r} (lean forward supports {', '.join(SUPPORTED_TYPES)})"
        if type(model).__name__ not in SUPPORTED_CLASSES:
            return f"model class {type(model).__name__}"
        if not torch.backends.mkldnn.is_available():
            return "oneDNN is not available in this torch build"
        p = next(model.parameters())
        if p.device.type != "cpu" or p.dtype != torch.float32:
            return f"{p.dtype} on {p.device.type} (lean forward is for float32 on CPU)"
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"hidden_act {cfg.hidden_act!r}"
        if getattr(cfg, "use_sliding_window", False):
            return "sliding-window attention"
        if getattr(cfg, "quantization_config", None) is not None:
            return "quantized weights"
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and type(m.weight.data) is not torch.Tensor:
                return f"weights of type {type(m.weight.data).__name__}"
        if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            return "pretraining_tp > 1"
        if getattr(cfg, "partial_rotary_factor", 1.0) not in (None, 1.0):
            return "partial rotary embeddings"
        return None

    def __init__(self, model, batch_hint: int = 16, native: bool = True, bf16: bool = False):
        """`bf16`: the GEMMs take bfloat16 weights and inputs and sum in float32 (see
        `Projection`); everything else (embeddings, residual stream, norms' statistics,
        attention, the KV cache, the token choice) stays float32. The model's parameters
        must be float32 (holding bf16 values, when loaded as bf16 and converted)."""
        reason = self.unsupported(model)
        if reason:
            raise ValueError(f"lean forward cannot run this model: {reason}")
        self.bf16 = bf16
        cfg = model.config
        inner = model.model
        self.device = next(model.parameters()).device
        self.dtype = torch.float32
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.embed = inner.embed_tokens.weight.detach()
        self.rotary = inner.rotary_emb
        self.native = gemm = native_ops() if native else None
        if bf16 and gemm is not None and not gemm.bf16_supported():
            warnings.warn("thinklab: this CPU lacks AVX512_BF16, so bfloat16 GEMMs run as oneDNN float32 GEMMs on "
                          "bf16-rounded values: bf16's numbers, no faster than float32", stacklevel=2)
            self.native = gemm = None
        # the token choice: with the other native kernels (AVX-512F), or alone in its AVX2 variant
        self.sampler = gemm if gemm is not None else (sampling_ops() if native else None)
        # the native attention kernel works in 16-feature vectors of each head; on AVX2 CPUs
        # it runs without the other native kernels
        self.attention = attention_ops() if native and self.head_dim % 16 == 0 else None
        self.native_attention = self.attention is not None
        self.lm_head = Projection(model.lm_head.weight, _bias(model.lm_head), gemm, batch_hint,
                                  RMSNorm(inner.norm.weight, self.eps), bf16)
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            qkv_bias = _cat_bias(qkv, self.device)
            self.layers.append(_Layer(
                qkv=Projection(self._interleave_qk(torch.cat([x.weight for x in qkv])),
                               None if qkv_bias is None else self._interleave_qk(qkv_bias), gemm, batch_hint,
                               RMSNorm(layer.input_layernorm.weight, self.eps), bf16),
                o=Projection(a.o_proj.weight, _bias(a.o_proj), gemm, batch_hint, bf16=bf16),
                mlp=SwiGLU(m.gate_proj, m.up_proj, gemm, batch_hint,
                           RMSNorm(layer.post_attention_layernorm.weight, self.eps), bf16),
                down=Projection(m.down_proj.weight, _bias(m.down_proj), gemm, batch_hint, bf16=bf16),
                router=getattr(m, "gate", None),  # set_moe_top_k changes its top_k in place
            ))

    def describe(self) -> str:
        """Which kernels run this forward, as recorded in a run's backend info."""
        gemm = "native packed GEMMs" if self.native is not None else "oneDNN prepacked GEMMs"
        if self.bf16:
            gemm += " on bfloat16 weights and inputs (float32 sums)"
        attention = "native decode attention" if self.native_attention else "SDPA"
        choice = "native token choice" if self.sampler is not None else "torch token choice"
        return f"lean (thinklab.backends.lean, {gemm}, {attention}, {choice})"

    def _interleave_qk(self, w: torch.Tensor) -> torch.Tensor:
        """Reorder each query and key head's output features from (first half, second half)
        to interleaved pairs (0, hd/2, 1, hd/2 + 1, ...). RoPE rotates feature j with feature
        j + hd/2; adjacent, each pair is one complex number and RoPE is one complex product.
        Queries and keys are permuted alike, so their dot products (attention) are unchanged;
        values are not touched."""
        hd, nq = self.head_dim, self.n_heads + self.n_kv
        order = torch.arange(hd).view(2, hd // 2).t().reshape(-1)  # 0, hd/2, 1, hd/2+1, ...
        qk = w[: nq * hd].reshape(nq, hd, *w.shape[1:])[:, order].reshape(nq * hd, *w.shape[1:])
        return torch.cat([qk, w[nq * hd :]]).contiguous()

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache in the key layout this forward's attention reads."""
        return KVCache(len(self.layers), batch, self.n_kv, capacity, self.head_dim, self.dtype, self.device,
                       blocked=self.native_attention)

    def kv_bytes_per_position(self) -> int:
        """Bytes of keys and values one position of one row holds, over all layers."""
        return 2 * len(self.layers) * self.n_kv * self.head_dim * torch.finfo(self.dtype).bits // 8

    def decode_rows(self, input_ids: torch.Tensor, position_ids: torch.Tensor, columns: torch.Tensor,
                    attention: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step of rows that each hold their own number of positions (the row
        scheduler's rows, thinklab.backends.scheduler): row r's new key and value go to its
        cache column columns[r], and it attends over its columns 0 .. columns[r] where
        `attention` (b, >= max column + 1, bool) is true. Logits of each row, (b, vocab).

        A row's arithmetic reads only its own columns, in an order fixed by them, so a row
        computes the same bits whatever the other rows hold: the native kernel runs each
        row over its own columns; the torch path reads a window of ATTENTION_CHUNK-column
        chunks that covers the widest row, scores keys against queries as (keys x queries)
        products, takes the softmax over the window (masked columns weigh 0) and sums the
        values chunk by chunk, each step a product of a fixed shape, whose results were
        seen not to depend on the window's width or the batch (tests/test_scheduler.py).

        input_ids, position_ids: (b, 1); columns: (b,) int64.
        """
        b = input_ids.shape[0]
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        group, half = nh // nkv, hd // 2
        widest = int(columns.max()) + 1
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(x, position_ids)  # (b, 1, hd)
        if self.native_attention:
            if widest > cache.capacity or attention.shape[1] < widest:
                raise ValueError(f"decode_rows: column {widest - 1} is outside the cache or the mask")
            cos1, sin1 = cos[:, 0, :half].contiguous(), sin[:, 0, :half].contiguous()
            keep1 = attention[:, :widest].contiguous()
        else:
            W = -(-widest // ATTENTION_CHUNK) * ATTENTION_CHUNK
            if W > cache.capacity or attention.shape[1] < W:
                raise ValueError(f"decode_rows: a window of {W} columns does not fit the cache or the mask "
                                 f"(capacity {cache.capacity}; give both a multiple of {ATTENTION_CHUNK})")
            masked = ~attention[:, None, None, :W]  # (b, 1, 1, W)
            rot = torch.complex(cos[..., :half], sin[..., :half])[:, :, None]  # (b, 1, 1, hd/2)
            rows = torch.arange(b, device=x.device)
            chunks = W // ATTENTION_CHUNK
        for i, L in enumerate(self.layers):
            qkv = L.qkv(x)  # (b, 1, (nh + 2 nkv) hd)
            kc, vc = cache.k[i], cache.v[i]
            if self.native_attention:
                out = self.attention.decode_attention(qkv.view(b, -1), cos1, sin1, kc, vc, keep1, 0, nh, nkv,
                                                   self.scale, columns)
            else:
                qk = qkv[..., : (nh + nkv) * hd].reshape(b, 1, nh + nkv, hd // 2, 2)
                qk = torch.view_as_real(torch.view_as_complex(qk) * rot).view(b, nh + nkv, hd)
                kc[rows, :, columns] = qk[:, nh:]
                vc[rows, :, columns] = qkv[:, 0, (nh + nkv) * hd :].view(b, nkv, hd)
                q = qk[:, :nh].reshape(b, nkv, group, hd).contiguous()  # its strides pick the product's kernel
                s = torch.matmul(kc[:, :, :W], q.transpose(-1, -2)).transpose(-1, -2).contiguous()  # (b, nkv, group, W)
                p = torch.softmax(s.mul_(self.scale).masked_fill_(masked, -math.inf), dim=-1)
                part = torch.matmul(p.view(b, nkv, group, chunks, ATTENTION_CHUNK).transpose(2, 3),
                                    vc[:, :, :W].view(b, nkv, chunks, ATTENTION_CHUNK, hd))  # (b, nkv, chunks, group, hd)
                out = part[:, :, 0]
                for c in range(1, chunks):
                    out = out + part[:, :, c]
            x = L.o(out.reshape(b, 1, nh * hd), x)
            x = L.ffn(x)
        cache.length = max(cache.length, widest)
        return self.lm_head(x[:, -1].contiguous())

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """Logits of the last position of each row, (b, vocab).

        input_ids, position_ids: (b, T), the T new positions of every row.
        attention: (b, cache.length + T), 1 for real tokens, 0 for left padding.
        """
        b, T = input_ids.shape
        n0, n = cache.length, cache.length + T
        if n > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {n} were asked for")
        if cache.blocked != self.native_attention:
            raise ValueError("this cache's key layout is not the one this forward reads; build it with new_cache")
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        group = nh // nkv
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(x, position_ids)  # (b, T, hd), the two halves equal
        half = self.head_dim // 2
        keep = attention[:, None, None, :n].bool()  # (b, 1, 1, n)
        if T > 1:  # prefill: causal as well; a padding query sees itself so no row is all -inf
            causal = torch.ones(T, n, dtype=torch.bool, device=x.device).tril(n0)
            eye = torch.zeros(T, n, dtype=torch.bool, device=x.device)
            eye[torch.arange(T), n0 + torch.arange(T)] = True
            keep = (keep & causal) | eye
        native = self.attention if T == 1 and self.native_attention else None
        if native is not None:
            cos1, sin1 = cos[:, 0, :half].contiguous(), sin[:, 0, :half].contiguous()
            keep1 = keep.view(b, n).contiguous()
        else:
            rot = torch.complex(cos[..., :half], sin[..., :half])[:, :, None]  # (b, T, 1, hd/2)
        for i, L in enumerate(self.layers):
            qkv = L.qkv(x)
            kc, vc = cache.k[i], cache.v[i]
            if native is not None:
                # RoPE, the cache write and attention for every row and kv head in one call.
                out = native.decode_attention(qkv.view(b, -1), cos1, sin1, kc, vc, keep1, n0, nh, nkv, self.scale)
                out = out.view(b, 1, nh * hd)
            else:
                # RoPE on queries and keys at once: they are adjacent heads of the fused projection.
                qk = qkv[..., : (nh + nkv) * hd].reshape(b, T, nh + nkv, hd // 2, 2)
                qk = torch.view_as_real(torch.view_as_complex(qk) * rot).view(b, T, nh + nkv, hd)
                q = qk[:, :, :nh].transpose(1, 2)
                cache.write(i, n0, qk[:, :, nh:].transpose(1, 2),
                            qkv[..., (nh + nkv) * hd :].view(b, T, nkv, hd).transpose(1, 2))
                keys = cache.keys(i, n)
                if T == 1:
                    # Grouped-query decode: the `group` query heads sharing a kv head become its queries.
                    out = F.scaled_dot_product_attention(q.reshape(b, nkv, group, hd), keys, vc[:, :, :n],
                                                         attn_mask=keep, scale=self.scale)
                    out = out.reshape(b, 1, nh * hd)
                else:
                    out = F.scaled_dot_product_attention(q, keys, vc[:, :, :n], attn_mask=keep,
                                                         scale=self.scale, enable_gqa=True)
                    out = out.transpose(1, 2).reshape(b, T, nh * hd)
            # RMSNorms (folded into qkv and mlp), residual adds and the SwiGLU gating run inside the GEMMs.
            x = L.o(out, x)
            x = L.ffn(x)
        cache.length = n
        return self.lm_head(x[:, -1].contiguous())
