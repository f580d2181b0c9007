"""Where a decode step's time goes: torch profiler over batched decode, ops grouped by kind.

Decodes --batch rows for --tokens tokens (sampling at T=1, EOS ignored) through the
transformers backend, once to warm up and once under torch.profiler, and prints each
group's share of the profiled CPU time per decode step, then the top operators. Prefill
is profiled too and subtracted using a 1-token run, so the table is per decode step.
The profiler adds a few microseconds to every operator, which inflates the many small
ones; use it to rank, and benchmarks/decode_roofline.py for speeds.

It then times one decode-shaped GEMM of the model (the MLP's up projection, batch rows
x hidden x intermediate) through oneDNN with a prepacked weight and through thinklab's
packed GEMM, with its weight hot in cache and streamed from memory (cycling through
enough copies to overflow the last-level cache), which is what bounds the linear layers
in decode.

    python benchmarks/decode_profile.py [--model default] [--batch 16] [--tokens 32] [--transformers]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from thinklab.config import ModelSpec, SamplingSpec  # noqa: E402
from thinklab.runner import get_backend  # noqa: E402

GROUPS = {  # first match wins
    "GEMM (linear layers, lm_head)": ("linear", "mm", "addmm", "matmul", "bmm"),
    "attention (incl. RoPE and cache write in the native kernel)": ("attention", "softmax"),
    "norm": ("rms_norm", "pow", "mean", "rsqrt"),
    "KV cache (write, cat, select)": ("cat", "copy_", "index", "slice_scatter"),
    "sampling and tracing": ("trace_and_sample", "log_softmax", "cumsum", "searchsorted", "exp", "argmax", "gather",
                             "isin", "topk", "sort"),
}


def group_of(name: str) -> str:
    short = name.split("::")[-1]
    for group, keys in GROUPS.items():
        if any(k in short for k in keys):
            return group
    return "other elementwise and bookkeeping"


class _Recorded:
    """Wraps the lean forward's native kernels (plain pybind functions, invisible to the
    profiler) so each call is recorded as an event named thinklab::<kernel>."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def recorded(*args):
            with torch.profiler.record_function(f"thinklab::{name}"):
                return fn(*args)

        return recorded


def self_times(backend, prompts, tokens: int) -> dict[str, float]:
    sampling = SamplingSpec(temperature=1.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.generate(prompts, list(range(len(prompts))), sampling, tokens, progress=False)
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}  # ms


def gemm_hot_vs_streamed(batch: int, k: int, n: int, cache_bytes: int = 64 << 20) -> None:
    """One decode-shaped GEMM through oneDNN and through thinklab's packed GEMM, its weight
    hot in cache and streamed from memory (cycling through copies that overflow the cache)."""
    import statistics
    import time

    from thinklab.backends.lean import native_ops

    x = torch.randn(batch, k)
    copies = max(2, 2 * cache_bytes // (k * n * 4))
    raw = [torch.randn(n, k) for _ in range(copies)]
    kernels = {"oneDNN, prepacked": ([torch.ops.mkldnn._reorder_linear_weight(w, batch) for w in raw],
                                     lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))}
    native = native_ops()
    if native is not None:
        kernels["thinklab packed GEMM"] = ([native.pack_weight(w) for w in raw],
                                           lambda w: native.packed_linear(x, w, n))
    flops = 2 * batch * k * n

    def median_seconds(fn, ws, calls=300):
        times = []
        for i in range(calls):
            t0 = time.perf_counter()
            fn(ws[i % len(ws)])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"\nGEMM [{batch}, {k}] x [{k}, {n}], {torch.get_num_threads()} threads, {copies} weight copies cycled "
          "when streamed:")
    with torch.inference_mode():
        for name, (ws, fn) in kernels.items():
            median_seconds(fn, ws[:1], 20)
            hot, streamed = median_seconds(fn, ws[:1]), median_seconds(fn, ws)
            print(f"  {name:<22} in cache {hot * 1e6:6.0f} us {flops / hot / 1e9:6.1f} GFLOP/s   streamed "
                  f"{streamed * 1e6:6.0f} us {flops / streamed / 1e9:6.1f} GFLOP/s "
                  f"({k * n * 4 / streamed / 1e9:.1f} GB/s of weights)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--transformers", action="store_true", help="profile transformers' forward (forward='transformers') instead")
    args = ap.parse_args()

    spec = ModelSpec(name=args.model)
    if args.transformers:
        from thinklab.backends.hf import HFBackend

        backend = HFBackend(dataclasses.replace(spec, forward="transformers"))
    else:
        backend = get_backend(spec)
    lean = getattr(backend, "lean", None)
    if lean is not None and lean.native is not None:
        recorded = _Recorded(lean.native)
        lean.native = recorded
        for proj in [lean.lm_head] + [p for L in lean.layers for p in (L.qkv, L.o, L.mlp, L.down)]:
            proj.native = recorded
    tok = backend.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": f"Count from {i} to {i + 40}."}],
                                     add_generation_prompt=True, tokenize=False) for i in range(args.batch)]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    backend.max_batch_size = args.batch
    eos, backend.eos_ids = backend.eos_ids, {-1}  # every row decodes exactly --tokens tokens
    backend.generate(prompts, list(range(args.batch)), SamplingSpec(temperature=1.0), 4, progress=False)  # warm-up
    full = self_times(backend, prompts, args.tokens)
    first = self_times(backend, prompts, 1)  # prefill + one token
    backend.eos_ids = eos
    steps = args.tokens - 1
    per_step = {k: (full[k] - first.get(k, 0.0)) / steps for k in full}
    groups: dict[str, float] = defaultdict(float)
    for name, ms in per_step.items():
        groups[group_of(name)] += ms
    total = sum(groups.values())
    print(f"model={args.model} batch={args.batch} forward={backend.info.extra.get('forward')} "
          f"threads={torch.get_num_threads()}: {total:.1f} ms of profiled CPU time per decode step")
    print(f"{'group':<36}{'ms/step':>9}{'share':>8}")
    for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{group:<36}{ms:>9.2f}{ms / total:>8.0%}")
    print(f"\ntop {args.top} operators (self time per decode step)")
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {name:<52}{ms:>8.2f} ms")
    cfg = backend.model.config
    gemm_hot_vs_streamed(args.batch, cfg.hidden_size, cfg.intermediate_size)


if __name__ == "__main__":
    main()
