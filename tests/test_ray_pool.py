"""One run fanned out to a pool of Ray actors (`thinklab.ray_pool`) on a local two-node Ray cluster.

The cluster is two `ray start` processes on this machine (a head and a second node joined
with `--address`, one CPU each), started once for the module and stopped with
`ray stop --force` in the finalizer. Each actor takes one CPU, so the two actors sit on
the two nodes. The rows must equal the same spec run locally, token for token, also when
an actor is SIGKILLed mid-run and Ray restarts it and retries its task.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from thinklab import runner
from thinklab.config import ModelSpec, RunSpec, SamplingSpec
from thinklab.store import RunStore

RAY_MISSING = importlib.util.find_spec("ray") is None
needs_ray = pytest.mark.skipif(RAY_MISSING, reason="ray is not installed (pip install 'thinklab[ray]')")
KEYS = ["problem_id", "sample_idx"]


def _spec(seed: int, n_problems: int) -> RunSpec:
    return RunSpec(model=ModelSpec(name="default"), task="rg:basic_arithmetic", n_problems=n_problems,
                   sampling=SamplingSpec(temperature=1.0, n=2, max_tokens=24, seed=seed))


def _sorted(df):
    return df.sort(KEYS)


@pytest.mark.slow
@pytest.mark.ray
@needs_ray
def test_a_run_on_two_actors_on_two_nodes_equals_the_local_run(ray_cluster, isolated):
    import ray

    from thinklab import ray_pool

    spec = _spec(seed=1, n_problems=6)
    df = ray_pool.run(spec, runs_root=isolated / "ray", actors=2, address=ray_cluster, chunk_problems=1,
                      progress=False)
    assert not ray.is_initialized()  # it disconnects what it connected
    local = runner.run(spec, runs_root=isolated / "local", chunk_problems=1, progress=False)
    assert df.height == local.height == 12
    assert _sorted(df).equals(_sorted(local))

    store = RunStore(runner.run_dir(spec, isolated / "ray"))
    meta = store.read_meta()
    local_meta = RunStore(runner.run_dir(spec, isolated / "local")).read_meta()
    assert meta["status"] == "complete" and meta["chunk_problems"] == 1
    assert meta["resolved"] == local_meta["resolved"] and meta["run_id"] == local_meta["run_id"]
    parts = meta["ray"]["parts"]
    assert sorted(map(int, parts)) == list(range(6)) == sorted(store.done_chunks())
    assert len({p["node_id"] for p in parts.values()}) == 2, parts  # both nodes wrote parts
    assert len({p["pid"] for p in parts.values()}) == 2, parts
    assert not list(store.dir.glob(".*.tmp-*"))
    first_seconds = meta["generate_seconds"]
    assert first_seconds > 0

    # the local runner resumes a Ray run as its own: a removed part is regenerated, equal
    store.part_path(3).unlink()
    again = runner.run(spec, runs_root=isolated / "ray", chunk_problems=1, progress=False)
    assert _sorted(again).equals(_sorted(local))

    # and `thinklab generate --executor ray` resumes it on the cluster: only the missing chunk is served
    store.part_path(4).unlink()
    res = subprocess.run([sys.executable, "-m", "thinklab.cli", "generate", "--model", "default",
                          "--task", "rg:basic_arithmetic", "--n-problems", "6", "--n-samples", "2",
                          "--max-tokens", "24", "--temperature", "1.0", "--seed", "1",
                          "--runs-root", str(isolated / "ray"), "--executor", "ray", "--actors", "2",
                          "--address", ray_cluster, "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.strip() == str(store.dir)
    meta = store.read_meta()
    assert meta["status"] == "complete" and len(meta["ray"]["actors"]) == 1  # one chunk to serve: one actor
    assert meta["ray"]["parts"]["4"]["pid"] == meta["ray"]["actors"][0]["pid"]
    # each sitting's generation time is added to the run's, not put in its place
    assert meta["generate_seconds"] > first_seconds
    assert _sorted(store.load()).equals(_sorted(local))


@pytest.mark.slow
@pytest.mark.ray
@needs_ray
def test_an_actor_killed_mid_run_is_restarted_and_the_run_equals_an_uninterrupted_local_run(ray_cluster, isolated):
    from thinklab import ray_pool

    spec = _spec(seed=2, n_problems=8)
    store = RunStore(runner.run_dir(spec, isolated / "ray"))
    killed: dict = {}
    stop = threading.Event()

    def killer() -> None:
        # once the actors are recorded and at least one part (not all) exists, SIGKILL an actor process
        while not stop.is_set():
            try:
                meta = store.read_meta() if store.meta_path.is_file() else {}
            except Exception:  # noqa: BLE001 - read while the driver replaces it
                meta = {}
            done = len(store.done_chunks()) if store.dir.is_dir() else 0
            actors = meta.get("ray", {}).get("actors")
            if actors and 1 <= done < 8:
                pid = actors[0]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, parts_before=done, pids=[a["pid"] for a in actors])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        df = ray_pool.run(spec, runs_root=isolated / "ray", actors=2, address=ray_cluster, chunk_problems=1,
                          max_restarts=2, max_task_retries=2, progress=False)
    finally:
        stop.set()
        thread.join(5)
    assert killed, "no actor was killed: the run finished before the first part appeared"
    assert 1 <= killed["parts_before"] < 8
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # that process is gone
    meta = store.read_meta()
    assert meta["status"] == "complete" and sorted(store.done_chunks()) == list(range(8))
    writers = {p["pid"] for p in meta["ray"]["parts"].values()}
    assert writers - set(killed["pids"]), f"no part was written by a restarted actor: {meta['ray']['parts']}"
    assert not list(store.dir.glob(".*.tmp-*"))

    local = runner.run(spec, runs_root=isolated / "local", chunk_problems=1, progress=False)
    assert df.height == local.height == 16
    assert _sorted(df).equals(_sorted(local))


def test_bad_pool_settings_are_refused_before_anything_is_written(tmp_path):
    from thinklab import ray_pool

    spec = _spec(seed=1, n_problems=2)
    with pytest.raises(ValueError, match=r"actors=0 is not valid; use an int >= 1"):
        ray_pool.run(spec, runs_root=tmp_path, actors=0)
    with pytest.raises(ValueError, match=r"cpus and gpus are both 0"):
        ray_pool.run(spec, runs_root=tmp_path, cpus=0, gpus=0)
    with pytest.raises(ValueError, match=r"gpus=-1 is not valid"):
        ray_pool.run(spec, runs_root=tmp_path, gpus=-1)
    assert not list(tmp_path.iterdir())
    from thinklab import cli

    code = cli.main(["generate", "--task", "rg:basic_arithmetic", "--n-problems", "2", "--runs-root", str(tmp_path),
                     "--actors", "2"])
    assert code == 2 and not list(tmp_path.iterdir())
