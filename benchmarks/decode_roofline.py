"""Decode throughput against the hardware floor, and how it scales with batch size.

Measured in one run, on this machine:
  - copy bandwidth: bytes read + written per second copying a 512 MiB fp32 tensor;
  - matmul rate: fp32 FLOP/s of a 2048 x 2048 x 2048 product, the faster of torch.matmul
    (MKL) and thinklab's own packed GEMM (backends/native/gemm.cpp), which on the AMD
    machine here beats MKL by ~25%: a ceiling our decode kernels can exceed is no ceiling;
  - decode tokens/s of the transformers backend at each batch size (sampling at T=1, EOS
    ignored so every row decodes exactly --tokens tokens, tracing on). Decode time is the
    time of generate(N tokens) minus the best of two generate(1 token), so the prompt's
    prefill is not counted against the per-step floor; the last column is tokens/s with
    prefill included. Ceilings and decode are measured --repeats times, interleaved, and
    the best of each is kept, so a burst of load on this shared machine does not skew one
    side of the ratio. --transformers adds transformers' own forward as a second row.
The floor of one decode step at batch b is the larger of
  (bytes of weights read + bytes of KV cache read) / bandwidth   and   FLOPs / matmul rate,
with FLOPs = 2 * b * (matmul parameters) + attention (4 * b * layers * context * kv width * group).
The ratio printed is measured tokens/s over the floor's tokens/s (1.0 = at the roofline).

    python benchmarks/decode_roofline.py [--model default] [--batches 1 4 16 64] [--tokens 64]
                                         [--repeats 3] [--transformers]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from thinklab.backends import lean  # noqa: E402
from thinklab.config import ModelSpec, SamplingSpec  # noqa: E402
from thinklab.runner import get_backend  # noqa: E402


def copy_bandwidth(n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * n_bytes / best  # read + write


def matmul_rates(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """fp32 FLOP/s of an n^3 product through torch.matmul and, where it runs, thinklab's packed GEMM."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    products = {"torch.matmul": lambda: a @ b}
    native = lean.native_ops()
    if native is not None:
        packed = native.pack_weight(b.t().contiguous())  # packed_linear computes a @ (its weight)^T
        products["thinklab packed GEMM"] = lambda: native.packed_linear(a, packed, n)
    rates = {}
    for name, fn in products.items():
        fn()
        rates[name] = 2 * n**3 / min(_timed(fn) for _ in range(repeats))
    return rates


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_costs(model) -> dict:
    cfg = model.config
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_width = cfg.num_key_value_heads * head_dim
    return dict(matmul_params=matmul_params, weight_bytes=weight_bytes, layers=cfg.num_hidden_layers,
                kv_width=kv_width, group=cfg.num_attention_heads // cfg.num_key_value_heads,
                dtype_bytes=next(model.parameters()).element_size())


def step_floor(c: dict, batch: int, context: int, bandwidth: float, rate: float) -> float:
    kv_bytes = 2 * c["layers"] * batch * context * c["kv_width"] * c["dtype_bytes"]
    flops = 2 * batch * c["matmul_params"] + 4 * batch * c["layers"] * context * c["kv_width"] * c["group"]
    return max((c["weight_bytes"] + kv_bytes) / bandwidth, flops / rate)


def decode_rate(backend, prompts, tokens: int) -> tuple[float, float]:
    """(decode tokens/s, tokens/s with prefill) of one generate call of `tokens` tokens per row."""
    b = len(prompts)
    sampling = SamplingSpec(temperature=1.0)
    # Decode time = (prefill + N tokens) - (prefill + 1 token): the floor is per decode step.
    t_first = min(_timed(lambda: backend.generate(prompts, list(range(b)), sampling, 1, progress=False))
                  for _ in range(2))
    t0 = time.perf_counter()
    outs = backend.generate(prompts, list(range(b)), sampling, tokens, progress=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    return (n - b) / max(dt - t_first, 1e-9), n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3,
                    help="measure ceilings and decode this many times, interleaved; keep the best of each")
    ap.add_argument("--transformers", action="store_true",
                    help="also decode through transformers' own forward (forward='transformers') for comparison")
    args = ap.parse_args()

    spec = ModelSpec(name=args.model)
    backends = {"thinklab": get_backend(spec)}
    if args.transformers:
        from thinklab.backends.hf import HFBackend

        backends["transformers"] = HFBackend(dataclasses.replace(spec, forward="transformers"))
    first = backends["thinklab"]
    tok = first.tokenizer
    c = model_costs(first.model)
    print(f"model={args.model} threads={torch.get_num_threads()} tokens/row={args.tokens} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} repeats={args.repeats}")
    for name, backend in backends.items():
        print(f"  {name}: forward = {backend.info.extra.get('forward')}")
    bw = 0.0
    rates: dict[str, float] = {}
    rows = []
    for b in args.batches:
        texts = [tok.apply_chat_template([{"role": "user", "content": f"Count from {i} to {i + 40}."}],
                                         add_generation_prompt=True, tokenize=False) for i in range(b)]
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        best = {name: (0.0, 0.0) for name in backends}
        for backend in backends.values():
            backend.max_batch_size = b
            backend.eos_ids, backend._saved_eos = {-1}, backend.eos_ids  # every row decodes exactly --tokens
            backend.generate(prompts[:1], [0], SamplingSpec(temperature=0), 4, progress=False)  # warm-up
        for _ in range(args.repeats):
            bw = max(bw, copy_bandwidth())
            rates = {k: max(v, rates.get(k, 0.0)) for k, v in matmul_rates().items()}
            for name, backend in backends.items():
                best[name] = max(best[name], decode_rate(backend, prompts, args.tokens))
        for backend in backends.values():
            backend.eos_ids = backend._saved_eos
        ctx = sum(map(len, prompts)) / b + args.tokens / 2
        rows.append((b, ctx, best))
    rate = max(rates.values())
    print(f"measured ceilings (best of {args.repeats}): copy {bw / 1e9:.1f} GB/s (read+write), fp32 matmul "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()) + f" GFLOP/s; the floor uses {rate / 1e9:.1f}")
    print(f"{'batch':>6}{'forward':>14}{'tok/s':>10}{'floor tok/s':>13}{'of roofline':>13}{'bound':>9}"
          f"{'with prefill':>14}")
    for b, ctx, best in rows:
        floor_tps = b / step_floor(c, b, int(ctx), bw, rate)
        kv_bytes = 2 * c["layers"] * b * ctx * c["kv_width"] * c["dtype_bytes"]
        bound = "memory" if (c["weight_bytes"] + kv_bytes) / bw > (2 * b * c["matmul_params"]) / rate else "compute"
        for name, (decode_tps, total_tps) in best.items():
            print(f"{b:>6}{name:>14}{decode_tps:>10.1f}{floor_tps:>13.1f}{decode_tps / floor_tps:>13.2f}{bound:>9}"
                  f"{total_tps:>14.1f}")


if __name__ == "__main__":
    main()
