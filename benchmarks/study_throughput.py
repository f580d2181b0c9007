"""End-to-end generation rate of a study-shaped workload, against steady-state decode and vLLM.

Measured in one run, per model:
  - end to end: `runner.run` of a GSM8K run (the first --problems test problems picked
    by task seed 0, --samples samples each, up to --max-tokens tokens, natural stop
    lengths) on the transformers backend, from the call to the returned table: prefill,
    decoding, the scheduler's refills and tail, grading and part writes (in the
    background) included; model load excluded. Rate = generated tokens / wall seconds.
  - steady-state decode at the same batch size: as many rows as the end-to-end run's
    batch, each a GSM8K prompt of the workload, every row decoding exactly as many tokens
    as the end-to-end samples averaged (EOS ignored, so the batch stays full and contexts
    span what the workload's did); rate = tokens / decode seconds (prefill excluded; the
    token choice and tracing included), as benchmarks/decode_roofline.py measures decode.
  - vLLM (unless --no-vllm): the same run spec with backend="vllm" through `runner.run`,
    timed the same way (engine start excluded and printed), all samples sent at once with
    a step budget that prefills every prompt in one step; its entropy is the top-20
    estimate, while the transformers backend traces the exact entropy.
The printed ratios: end to end / steady state (the share of the machine's decode rate a
study gets) and thinklab / vLLM end to end. The machine is shared: run it under
`flock /tmp/thinklab-heavy.lock`, and read single runs as noisy.

    python benchmarks/study_throughput.py [--models smollm2-135m qwen2.5-0.5b] [--problems 16]
        [--samples 4] [--max-tokens 512] [--batch-size N] [--dtype auto|float32|bfloat16] [--no-vllm]
        [--vllm-compile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch  # noqa: E402

from thinklab import runner, tasks  # noqa: E402
from thinklab.backends.base import Request  # noqa: E402
from thinklab.config import ModelSpec, RunSpec, SamplingSpec  # noqa: E402


@contextlib.contextmanager
def _vllm_whole_steps(tokens: int = 65536):
    """Build vLLM engines with a step budget of `tokens` prompt tokens, so that every prompt
    of the workload is prefilled in one step: vllm-cpu 0.32 fails on seeded requests whose
    prefill spans two steps (VLLMBackend.serve_window), and the comparison should give vLLM
    all the samples at once, as thinklab gets them."""
    import functools

    from thinklab.backends import vllm as vllm_backend

    original = vllm_backend._import_vllm

    def patched():
        vllm, LLM, SamplingParams, TokensPrompt = original()
        return vllm, functools.partial(LLM, max_num_batched_tokens=tokens), SamplingParams, TokensPrompt

    vllm_backend._import_vllm = patched
    try:
        yield
    finally:
        vllm_backend._import_vllm = original


def end_to_end(spec: RunSpec, backend, root: str) -> dict:
    t0 = time.perf_counter()
    df = runner.run(spec, runs_root=root, backend=backend, progress=False)
    wall = time.perf_counter() - t0
    tokens = int(df["n_tokens"].sum())
    return {"wall": wall, "tokens": tokens, "rate": tokens / wall, "mean_tokens": tokens / df.height,
            "truncated": float((df["finish_reason"] == "length").mean()), "accuracy": float(df["correct"].mean()),
            "stats": getattr(backend, "last_serve_stats", None)}


def steady_state(backend, spec: RunSpec, rows: int, tokens: int) -> dict:
    """Decode rate with `rows` rows each decoding exactly `tokens` tokens (EOS ignored)."""
    from thinklab import prompts

    tok = backend.tokenizer
    problems = tasks.load_task(spec.task, max(1, -(-rows // spec.sampling.n)), spec.task_seed)
    ids = [tok(prompts.build_prompt(tok, p, spec.prompt), add_special_tokens=False)["input_ids"] for p in problems]
    sampling = SamplingSpec(temperature=spec.sampling.temperature)
    reqs = [Request(list(ids[i // spec.sampling.n]), i, sampling, tokens, order=i) for i in range(rows)]
    saved_eos, saved_rows = backend.eos_ids, backend.max_batch_size
    backend.eos_ids, backend.max_batch_size = {-1}, rows
    try:
        backend.serve(reqs)
    finally:
        backend.eos_ids, backend.max_batch_size = saved_eos, saved_rows
    st = backend.last_serve_stats
    decoded = st["sampled_tokens"] - rows  # the first token of each row comes from its prefill
    return {"rate": decoded / st["decode_seconds"], "stats": st}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=None, help="rows at once (default: the backend's own choice)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="of both backends (auto: float32 on CPUs; bfloat16: thinklab's bf16 GEMMs, vLLM's bf16)")
    ap.add_argument("--no-vllm", dest="vllm", action="store_false", help="skip the vLLM comparison")
    ap.add_argument("--vllm-compile", action="store_true",
                    help="let vLLM compile its graphs (enforce_eager=False: slower start, faster decode)")
    args = ap.parse_args()

    from thinklab.backends.hf import HFBackend

    print(f"# {platform.node()}: {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}; GSM8K "
          f"{args.problems} problems x {args.samples} samples, max_tokens {args.max_tokens}, "
          f"T={args.temperature}, dtype {args.dtype}")
    results = []
    for name in args.models:
        spec = RunSpec(model=ModelSpec(name=name, dtype=args.dtype), task="gsm8k", n_problems=args.problems,
                       sampling=SamplingSpec(temperature=args.temperature, n=args.samples, max_tokens=args.max_tokens))
        t0 = time.perf_counter()
        hf = HFBackend(spec.model, max_batch_size=args.batch_size)
        print(f"{name}: loaded in {time.perf_counter() - t0:.1f} s; forward {hf.info.extra['forward']}; "
              f"batch {hf.max_batch_size} ({hf.batch_size_rule})")
        hf.generate([[1, 2, 3]], [0], SamplingSpec(temperature=0), 2, progress=False)  # warm-up
        with tempfile.TemporaryDirectory() as root:
            e2e = end_to_end(spec, hf, root)
        st = e2e["stats"] or {}
        print(f"  end to end: {e2e['tokens']} tokens in {e2e['wall']:.1f} s = {e2e['rate']:.1f} tok/s "
              f"(mean {e2e['mean_tokens']:.0f} tokens/sample, truncated {e2e['truncated']:.0%}, accuracy "
              f"{e2e['accuracy']:.2f}); scheduler: {st.get('rows')} rows, occupancy {st.get('occupancy')}, "
              f"fill {st.get('fill')} (rows decoding per step / rows; the tail lowers it), "
              f"{st.get('prefills')} prefills ({st.get('prefill_seconds')} s), decode {st.get('decode_seconds')} s, "
              f"{st.get('continued_in_place')} calls continued in their row, {st.get('resizes')} cache resizes")
        rows = st.get("rows") or hf.max_batch_size
        steady = steady_state(hf, spec, rows, max(16, round(e2e["mean_tokens"])))
        print(f"  steady-state decode at {rows} rows x {steady['stats']['sampled_tokens'] // rows} tokens: "
              f"{steady['rate']:.1f} tok/s; end to end / steady = {e2e['rate'] / steady['rate']:.2f}")
        hf.close()
        del hf
        vl = None
        if args.vllm:
            from thinklab.backends.vllm import VLLMBackend

            vspec = spec.replace(**{"model.backend": "vllm", "model.enforce_eager": not args.vllm_compile})
            t0 = time.perf_counter()
            with _vllm_whole_steps():
                vb = VLLMBackend(vspec.model)
            vb.serve_window = 1 << 30  # every call at once: vLLM's own continuous batching does the rest
            start = time.perf_counter() - t0
            vb.generate([[1, 2, 3]], [0], SamplingSpec(temperature=0), 2, progress=False)  # warm-up
            with tempfile.TemporaryDirectory() as root:
                vl = end_to_end(vspec, vb, root)
            print(f"  vLLM ({vb.entropy_mode} entropy, enforce_eager={vb.enforce_eager}, engine start {start:.0f} s): "
                  f"{vl['tokens']} tokens in {vl['wall']:.1f} s = {vl['rate']:.1f} tok/s (mean {vl['mean_tokens']:.0f} "
                  f"tokens/sample, truncated {vl['truncated']:.0%}); thinklab / vLLM = {e2e['rate'] / vl['rate']:.2f}")
            vb.close()
            del vb
        results.append((name, rows, e2e, steady, vl))

    print(f"\n{'model':<15}{'rows':>6}{'e2e tok/s':>11}{'steady tok/s':>14}{'e2e/steady':>12}{'vLLM tok/s':>12}"
          f"{'thinklab/vLLM':>15}")
    for name, rows, e2e, steady, vl in results:
        v = f"{vl['rate']:>12.1f}{e2e['rate'] / vl['rate']:>15.2f}" if vl else f"{'-':>12}{'-':>15}"
        print(f"{name:<15}{rows:>6}{e2e['rate']:>11.1f}{steady['rate']:>14.1f}{e2e['rate'] / steady['rate']:>12.2f}{v}")


if __name__ == "__main__":
    main()
