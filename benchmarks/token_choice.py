"""The token choice (sample + trace) on CPU: torch operations against the native kernel, and what it buys a decode step.

Measured in one run, per model (its real vocabulary):
  - the token choice alone at --rows rows of random logits (T=0.7): torch's path
    (`sampling.choose_tokens` without a kernel: log_softmax, exp, a float64 two-level
    inverse-CDF search, the entropy) and the fused native kernel (native/sampling.cpp: the
    AVX-512F build, or its AVX2 variant on CPUs without AVX-512), ms per step;
  - steady-state decode through the row scheduler at --rows rows of GSM8K prompts, every row
    decoding --tokens tokens (EOS ignored), with the decoder's token choice native, then
    torch: tok/s of the decode phase (prefill excluded), and their ratio.
The entropy error of each path against a float64 computation is printed too. The machine
is shared: run it under `flock /tmp/thinklab-heavy.lock` and read single runs as noisy.

    python benchmarks/token_choice.py [--models qwen2.5-0.5b smollm2-135m] [--rows 32] [--tokens 48]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from study_throughput import steady_state  # noqa: E402  (this directory: the same steady-state decode)

from thinklab.backends.sampling import choose_tokens, sampling_logits  # noqa: E402
from thinklab.config import ModelSpec, RunSpec, SamplingSpec  # noqa: E402


def per_step_ms(fn, repeats: int = 10) -> float:
    for _ in range(3):  # the first calls also allocate and fault in their buffers
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-0.5b", "smollm2-135m"])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()

    from thinklab.backends.hf import HFBackend
    from thinklab.backends.lean import sampling_ops

    ops = sampling_ops()
    if ops is None:
        raise SystemExit("the native token choice is not available on this host (THINKLAB_NATIVE=0, "
                         "THINKLAB_NATIVE_SAMPLING=0, no compiler, or a CPU with neither AVX-512F nor AVX2)")
    print(f"# {platform.node()}: {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, "
          f"{torch.backends.cpu.get_cpu_capability()}; {args.rows} rows, T=0.7")
    results = []
    for name in args.models:
        hf = HFBackend(ModelSpec(name=name), max_batch_size=args.rows)
        decoder = hf.forward.decoder
        V = hf.model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(args.rows, V, generator=g) * 3
        u = torch.rand(args.rows, generator=g, dtype=torch.float64)
        spec = SamplingSpec(temperature=0.7)
        torch_ms = per_step_ms(lambda: choose_tokens(logits, spec, u))
        native_ms = per_step_ms(lambda: choose_tokens(logits, spec, u, ops))
        ref = torch.log_softmax(sampling_logits(logits, spec).double(), -1)
        ref_ent = -(ref.exp() * ref).sum(-1)
        err = {k: float((choose_tokens(logits, spec, u, o)[2].double() - ref_ent).abs().max())
               for k, o in (("torch", None), ("native", ops))}
        hf.generate([[1, 2, 3]], [0], SamplingSpec(temperature=0), 2, progress=False)  # warm-up
        rates = {}
        workload = RunSpec(model=ModelSpec(name=name), task="gsm8k", n_problems=args.rows,
                           sampling=SamplingSpec(temperature=0.7, n=1))
        for label, sampler in (("native", ops), ("torch", None)):
            decoder.sampler = sampler
            rates[label] = steady_state(hf, workload, args.rows, args.tokens)["rate"]
        decoder.sampler = ops
        print(f"{name} (V={V}): token choice {torch_ms:.1f} ms torch, {native_ms:.1f} ms native per step "
              f"({torch_ms / native_ms:.1f}x); entropy error vs float64: torch {err['torch']:.1e}, native "
              f"{err['native']:.1e} nats; decode {rates['torch']:.1f} -> {rates['native']:.1f} tok/s")
        results.append((name, torch_ms, native_ms, rates["torch"], rates["native"]))
        del hf
    print(f"\n{'model':<15}{'choice torch ms':>16}{'native ms':>11}{'decode torch':>14}{'native':>9}{'speed-up':>10}")
    for name, tm, nm, rt, rn in results:
        print(f"{name:<15}{tm:>16.1f}{nm:>11.1f}{rt:>14.1f}{rn:>9.1f}{rn / rt:>9.2f}x")


if __name__ == "__main__":
    main()
