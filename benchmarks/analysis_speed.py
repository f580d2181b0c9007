"""Analysis speed: build every study frame from a synthetic table of 100k samples x ~1k tokens.

    python benchmarks/analysis_speed.py [--problems 250] [--samples 25] [--tokens 980] [--repeat 3]

The table (not timed) is `synthetic_samples` from tests/synthetic.py over a grid that covers
all four studies: 2 temperatures (0.6, 1.0) x 2 thinking budgets (1024, uncapped) x 2
quantizations (baseline, int4-wo) x 2 MoE top-k (4 and 8 of 8 experts, with the routing
columns) = 16 conditions x problems x samples (100,000 samples by default), with
realistic text (~4 characters per token) so the marker scan reads what a real run would
hold. The timed part is `thinklab.analysis.all_frames`: every overthinking, temperature,
quantization and MoE frame, per-token statistics included (`thinklab.analysis` imports
no torch or plotly, so there is no slow import to keep off the clock). Prints each step's
time (best of --repeat runs of the whole set), the total, and the ratio to the 2-second
target. The machine is shared, so it also prints the process CPU time of the best run and
the load average: when other jobs crowd the cores, wall time overstates what the analysis
needs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import polars as pl

from thinklab.analysis import all_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic tables are a test fixture
from synthetic import synthetic_samples  # noqa: E402

TARGET_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=250)
    parser.add_argument("--samples", type=int, default=25, help="samples per problem per condition")
    parser.add_argument("--tokens", type=float, default=980.0,
                        help="mean thinking tokens parameter; with the 1024 budget and answers, ~1k tokens per sample")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    df = synthetic_samples(
        args.problems,
        args.samples,
        temperatures=(0.6, 1.0),
        thinking_budgets=(1024, None),
        quantizations=(None, "int4-wo"),
        moe_top_ks=(4, 8),
        mean_thinking_tokens=args.tokens,
        answer_tokens=(10, 60),
        seed=args.seed,
    )
    built = time.perf_counter() - start
    n_tokens = int(df["n_tokens"].sum())
    text_mb = df["text"].str.len_bytes().sum() / 1e6
    print(f"table: {df.height:,} samples, {n_tokens:,} tokens ({n_tokens / df.height:.0f} per sample), "
          f"{text_mb:.0f} MB of text; built in {built:.1f} s (not timed)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"polars {pl.__version__}, {pl.thread_pool_size()} threads")

    best: dict[str, float] = {}
    totals, cpu = [], []
    for _ in range(args.repeat):
        timings: dict[str, float] = {}
        start, start_cpu = time.perf_counter(), time.process_time()
        frames = all_frames(df, seed=args.seed, timings=timings)
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        for name, seconds in timings.items():
            best[name] = min(seconds, best.get(name, float("inf")))

    width = max(map(len, best))
    print(f"\n{'step':<{width}}  {'best s':>7}  {'rows':>7}")
    for name, seconds in best.items():
        rows = frames[name].height if name in frames else df.height
        print(f"{name:<{width}}  {seconds:7.3f}  {rows:7d}")
    total = min(totals)
    print(f"\n{'total (best of ' + str(args.repeat) + ')':<{width}}  {total:7.3f}")
    print(f"{'all runs':<{width}}  " + ", ".join(f"{t:.3f}" for t in totals))
    print(f"{'cpu s of the best run':<{width}}  {cpu[totals.index(total)]:7.3f}")
    print(f"{'load average (1 min)':<{width}}  {os.getloadavg()[0]:7.2f}")
    print(f"{'total / target (2 s)':<{width}}  {total / TARGET_S:7.2f}")


if __name__ == "__main__":
    main()
