"""`thinklab batch --executor ray`: sweep sets as Ray tasks on a local two-node Ray cluster.

The cluster is two `ray start` processes on this machine (a head and a second node joined
with `--address`, one CPU each), started once for the module and stopped with
`ray stop --force` in the finalizer. The notebook is a toy (no model): a set draws a line,
raises, or kills its own Ray worker once to check that Ray reruns it.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinklab import batch
from toy_notebooks import toy_notebook, write_sweep

RAY_MISSING = importlib.util.find_spec("ray") is None
needs_ray = pytest.mark.skipif(RAY_MISSING, reason="ray is not installed (pip install 'thinklab[ray]')")

PARAMETERS = '''task = "ok"  # "ok" draws a line; "die-once" kills its Ray worker on the first try; anything else raises
n_points = 3  # points on the line
figure_subdir = ""  # set by thinklab batch
figure_log = ""  # set by thinklab batch
marker = ""  # file that "die-once" creates before killing its worker
'''
BODY = '''import os, signal, time
import plotly.graph_objects as go
from thinklab import plots
if task == "die-once" and not os.path.exists(marker):
    open(marker, "w").close()
    os.kill(os.getppid(), signal.SIGKILL)  # the kernel's parent is the Ray worker that runs this set
    time.sleep(60)
if task not in ("ok", "die-once"):
    raise ValueError(f"unknown task {task!r}")
time.sleep(2)  # long enough that two sets placed on two nodes overlap in time
plots.export(go.Figure(go.Scatter(y=list(range(n_points)))), "line", "toy", formats=["html"],
             subdir=figure_subdir, log=figure_log or None)
'''


def _notebook(folder: Path) -> Path:
    return toy_notebook(folder, PARAMETERS, BODY)


def test_sweep_file_executor_keys_are_checked(tmp_path):
    _notebook(tmp_path)
    base = {"notebook": "toy.ipynb", "sets": [{"name": "a"}]}
    with pytest.raises(ValueError, match="executor='slurm' is not valid; choose one of local, ray"):
        batch.load_sweep(write_sweep(tmp_path, {**base, "executor": "slurm"}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gpu'\] under `ray`"):
        batch.load_sweep(write_sweep(tmp_path, {**base, "executor": "ray", "ray": {"gpu": 1}}))
    with pytest.raises(ValueError, match="ray.cpus=-1 is not valid"):
        batch.load_sweep(write_sweep(tmp_path, {**base, "executor": "ray", "ray": {"cpus": -1}}))
    sweep = batch.load_sweep(write_sweep(tmp_path, {**base, "executor": "ray", "ray": {"cpus": 2, "gpus": 1, "max_retries": 0}}))
    assert sweep.executor == "ray" and (sweep.ray.cpus, sweep.ray.gpus, sweep.ray.max_retries) == (2, 1, 0)
    assert batch.load_sweep(write_sweep(tmp_path, base)).executor == "local"


@pytest.mark.slow
@pytest.mark.ray
@needs_ray
def test_two_node_cluster_runs_sets_in_parallel_isolates_failures_and_reruns_a_dead_worker(ray_cluster, isolated):
    import ray

    _notebook(isolated)
    marker = isolated / "died-once"
    path = write_sweep(isolated, {
        "notebook": "toy.ipynb", "executor": "ray", "ray": {"cpus": 1, "max_retries": 2},
        "sets": [{"name": "a", "n_points": 4}, {"name": "b", "n_points": 5}, {"name": "broken", "task": "nope"},
                 {"name": "phoenix", "task": "die-once", "marker": str(marker)}],
    })
    index = batch.run_sweep(path, address=ray_cluster)
    assert not ray.is_initialized()  # the executor disconnects what it connected
    rows = {r["set"]: r for r in index.iter_rows(named=True)}
    assert {k: rows[k]["status"] for k in rows} == {"a": "ok", "b": "ok", "broken": "failed", "phoenix": "ok"}
    assert "ValueError: unknown task 'nope'" in rows["broken"]["error"]
    assert marker.exists()  # phoenix's first worker died; Ray ran it again and it finished
    out = isolated / "out" / "toy"
    for name in ("a", "b", "broken", "phoenix"):
        assert Path(rows[name]["notebook"]) == out / f"{name}.ipynb" and (out / f"{name}.ipynb").is_file()
    for name in ("a", "b", "phoenix"):
        assert rows[name]["figures"] and all(Path(f).is_file() for f in rows[name]["figures"])
        assert f"toy/{name}/" in rows[name]["figures"][0]
    assert (out / "index.parquet").is_file() and (out / "index.md").is_file()

    # one CPU per node and one CPU per set: two sets running at once means two nodes were used
    spans = sorted((dt.datetime.fromisoformat(r["started"]), r["duration_s"]) for r in rows.values() if r["started"])
    assert any(b < a + dt.timedelta(seconds=d) for (a, d), (b, _) in zip(spans, spans[1:]))

    again = batch.run_sweep(path, address=ray_cluster)  # ok sets are skipped, the broken one reruns
    assert {r["set"]: r["action"] for r in again.iter_rows(named=True)} == {
        "a": "skipped", "b": "skipped", "broken": "ran", "phoenix": "skipped"}


@pytest.mark.slow
@pytest.mark.ray
@needs_ray
def test_cli_batch_executor_ray(ray_cluster, isolated):
    _notebook(isolated)
    path = write_sweep(isolated, {"notebook": "toy.ipynb", "sets": [{"name": "one"}]}, name="cli")
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "thinklab.cli", "batch", str(path), "--executor", "ray",
                          "--address", ray_cluster], capture_output=True, text=True, timeout=300,
                         env={**os.environ})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "as Ray tasks" in res.stdout and (isolated / "out" / "cli" / "one.ipynb").is_file()
    assert time.time() - t0 < 300
