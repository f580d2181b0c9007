"""Overhead of the Ray executor against the local one, for the same sweep, in one run.

    python benchmarks/ray_overhead.py [--sets 2] [--cpus 2] [--sleep 5] [--repeat 1]

The sweep is a toy notebook (no model: it imports thinklab, sleeps `--sleep` seconds and
exports one HTML figure) with `--sets` sets. Each route runs it with `--cpus` sets at once
and `--force`, into its own temporary folder:
  local:        `batch.run_sweep(..., workers=cpus)`: one spawned process per set;
  ray (warm):   `executor="ray"` on a Ray started beforehand (`ray.init(num_cpus=cpus)`),
                so the time is placing, running and gathering the sets;
  ray (cold):   `executor="ray"` starting and stopping its own local Ray (all cores), as
                `thinklab batch --executor ray` without `--address` does.
Prints each route's wall time (best of --repeat) and the ratios to the local route.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import nbformat
import yaml

PARAMETERS = 'n_points = 3  # points on the line\nseconds = 5.0  # time the set takes\n'
BODY = '''import time
import plotly.graph_objects as go
from thinklab import plots
time.sleep(seconds)
plots.export(go.Figure(go.Scatter(y=list(range(n_points)))), "line", "toy", formats=["html"])
'''


def _sweep(folder: Path, sets: int, seconds: float) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(BODY)]
    nbformat.write(nb, folder / "toy.ipynb")
    path = folder / "toy.yaml"
    spec = {"notebook": "toy.ipynb", "parameters": {"seconds": seconds},
            "sets": [{"name": f"s{i}", "n_points": 3 + i} for i in range(sets)]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _timed(fn) -> float:
    t0 = time.perf_counter()
    index = fn()
    elapsed = time.perf_counter() - t0
    bad = index.filter(index["status"] != "ok")
    if bad.height:
        raise RuntimeError(f"a set failed: {bad.select('set', 'error').rows()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="sets at once (local workers, Ray CPUs)")
    parser.add_argument("--sleep", type=float, default=5.0, help="seconds each set spends in its notebook")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    import ray

    from thinklab import batch

    with tempfile.TemporaryDirectory(prefix="ray_overhead_") as tmp:
        tmp = Path(tmp)
        os.environ["THINKLAB_FIGURES"] = str(tmp / "figures")
        os.environ["THINKLAB_DATA"] = str(tmp / "data")
        path = _sweep(tmp, args.sets, args.sleep)
        times: dict[str, list[float]] = {"local": [], "ray (warm)": [], "ray (cold)": []}
        for _ in range(args.repeat):
            times["local"].append(_timed(lambda: batch.run_sweep(path, workers=args.cpus, force=True,
                                                                 out_dir=tmp / "local")))
            t0 = time.perf_counter()
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            start = time.perf_counter() - t0
            times["ray (warm)"].append(_timed(lambda: batch.run_sweep(path, force=True, out_dir=tmp / "ray",
                                                                      executor="ray")))
            ray.shutdown()
            # no Ray running: the executor starts a local one (sized to this machine's cores) and stops it
            times["ray (cold)"].append(_timed(lambda: batch.run_sweep(path, force=True, out_dir=tmp / "ray-cold",
                                                                      executor="ray")))
        best = {k: min(v) for k, v in times.items()}
        print(f"host {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
              f"{args.sets} sets x {args.sleep:g} s, {args.cpus} at once; best of {args.repeat}")
        print(f"ray.init (local, {args.cpus} CPUs): {start:.1f} s")
        for name, value in best.items():
            print(f"{name:11s} {value:7.1f} s   ratio to local {value / best['local']:.2f}")


if __name__ == "__main__":
    main()
