"""Decode throughput against the hardware floor, and how it scales with batch size.

Measured in one run, on this machine:
  - copy bandwidth: bytes read + written per second copying a 512 MiB fp32 tensor;
  - matmul rate: fp32 FLOP/s of a 2048 x 2048 x 2048 matmul;
  - decode tokens/s of the transformers backend at each batch size (sampling at T=1, EOS
    ignored so every row decodes exactly --tokens tokens, tracing on). Decode time is the
    time of generate(N tokens) minus the best of two generate(1 token), so the prompt's
    prefill is not counted against the per-step floor; the last column is tokens/s with
    prefill included.
The floor of one decode step at batch b is the larger of
  (bytes of weights read + bytes of KV cache read) / bandwidth   and   FLOPs / matmul rate,
with FLOPs = 2 * b * (matmul parameters) + attention (4 * b * layers * context * kv width * group).
The ratio printed is measured tokens/s over the floor's tokens/s (1.0 = at the roofline).

    python benchmarks/decode_roofline.py [--model default] [--batches 1 4 16 64] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from thinklab.config import ModelSpec, SamplingSpec  # noqa: E402
from thinklab.runner import get_backend  # noqa: E402


def copy_bandwidth(n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * n_bytes / best  # read + write


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    backend = get_backend(ModelSpec(name=args.model))
    tok = backend.tokenizer
    eos = backend.eos_ids
    backend.eos_ids = {-1}  # benchmark only: every row decodes exactly --tokens tokens
    c = model_costs(backend.model)
    bw, rate = copy_bandwidth(), matmul_rate()
    print(f"model={args.model} threads={torch.get_num_threads()} tokens/row={args.tokens}")
    print(f"measured ceilings: copy {bw / 1e9:.1f} GB/s (read+write), fp32 matmul {rate / 1e9:.1f} GFLOP/s")
    print(f"{'batch':>6}{'tok/s':>10}{'floor tok/s':>13}{'of roofline':>13}{'bound':>8}{'with prefill':>16}")
    for b in args.batches:
        texts = [tok.apply_chat_template([{"role": "user", "content": f"Count from {i} to {i + 40}."}],
                                         add_generation_prompt=True, tokenize=False) for i in range(b)]
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        backend.max_batch_size = b
        backend.generate(prompts[:1], [0], SamplingSpec(temperature=0), 4, progress=False)  # warm-up
        sampling = SamplingSpec(temperature=1.0)
        # Decode time = (prefill + N tokens) - (prefill + 1 token): the floor is per decode step.
        t_first = min(_timed(lambda: backend.generate(prompts, list(range(b)), sampling, 1, progress=False))
                      for _ in range(2))
        t0 = time.perf_counter()
        outs = backend.generate(prompts, list(range(b)), sampling, args.tokens, progress=False)
        dt = time.perf_counter() - t0
        n = sum(len(o.token_ids) for o in outs)
        decode_tps = (n - b) / max(dt - t_first, 1e-9)
        ctx = sum(map(len, prompts)) / b + args.tokens / 2
        floor_tps = b / step_floor(c, b, int(ctx), bw, rate)
        kv_bytes = 2 * c["layers"] * b * ctx * c["kv_width"] * c["dtype_bytes"]
        bound = "memory" if (c["weight_bytes"] + kv_bytes) / bw > (2 * b * c["matmul_params"]) / rate else "compute"
        print(f"{b:>6}{decode_tps:>10.1f}{floor_tps:>13.1f}{decode_tps / floor_tps:>13.2f}{bound:>8}{n / dt:>16.1f}")
    backend.eos_ids = eos


if __name__ == "__main__":
    main()
