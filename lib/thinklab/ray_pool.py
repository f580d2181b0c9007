"""One large run fanned out to a pool of Ray actors, each holding a loaded backend.

`run(spec, actors=N)` stores what `thinklab.runner.run(spec)` stores: the same run
directory, the same run.json (chunk size fixed at creation), the same parts. The driver
does what `runner.run_many` does before generating (`runner.open_run`: create run.json or
check its identity, find the chunks without a part) and holds the run's lock throughout.
Each actor loads the backend once; a task hands it some chunk indices, which it serves
with `runner.serve_chunks` (the code a local run uses) and writes as parts, atomically
(`RunStore.write_part`), into the run directory, so that directory must be on storage
every node sees. Actors never write run.json: the driver records the backend's identity
(`resolved`, refusing a resume under another one, and a pool whose actors loaded
different ones), which actor process wrote each part, and marks the run complete once
every part exists. A resumed run, local or on Ray, regenerates only chunks without a part.

Ray places the actors (`cpus`/`gpus` each; `gpus=1` gives one actor per GPU), restarts an
actor whose process or node died (`max_restarts`; it loads its backend again) and retries
the task it held (`max_task_retries`); thinklab only partitions chunks and writes parts.
Imports ray only when called.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import polars as pl

from thinklab.config import RunSpec
from thinklab.ray_executor import _env_vars, _import_ray
from thinklab.store import RunStore, now_iso

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class ChunkServer:
    """A Ray actor: loads the run's backend once, then serves chunks and writes their parts."""

    def __init__(self, spec_dict: dict, rid: str, run_dir: str, chunks: list[list], batch_size: int | None,
                 threads: int | None):
        from thinklab import runner

        if threads:
            import torch

            torch.set_num_threads(threads)  # as many as the cores Ray reserved for this actor
        self.spec = RunSpec.from_dict(spec_dict)
        self.rid, self.store, self.chunks = rid, RunStore(run_dir), chunks
        self.backend = runner.get_backend(self.spec.model, batch_size)

    def where(self) -> dict:
        import ray

        return {"pid": os.getpid(), "host": platform.node(), "node_id": ray.get_runtime_context().get_node_id()}

    def serving_meta(self) -> dict:
        from thinklab import runner

        return {**runner.serving_meta(self.spec, self.backend), "where": self.where()}

    def serve(self, todo: list[int]) -> dict:
        from thinklab import runner

        r = runner._Run(self.spec, self.rid, self.store, self.chunks, list(todo))
        t0 = time.time()
        runner.serve_chunks([r], self.backend, progress=False)
        return {"chunks": list(todo), "seconds": round(time.time() - t0, 2), **self.where()}


def run(
    spec: RunSpec,
    runs_root: Path | str | None = None,
    actors: int = 2,
    address: str | None = None,
    cpus: float = 1.0,
    gpus: float = 0.0,
    chunk_problems: int | None = None,
    batch_size: int | None = None,
    chunks_per_task: int = 1,
    max_restarts: int = 2,
    max_task_retries: int = 2,
    progress: bool = True,
) -> pl.DataFrame:
    """Generate (or load) the run `spec` describes on `actors` Ray actors; return its sample table.

    `address`: the Ray cluster (`auto`, `host:6379`, `ray://head:10001`); None starts a
    local Ray, unless this process is already connected to one (then that one is used and
    left connected). `cpus`/`gpus`: per actor. `chunks_per_task`: chunks an actor serves
    in one call (more fills a large batch better; a task whose actor died is served again
    whole). Each actor has up to two tasks queued so that it never waits for the driver.
    """
    from thinklab import paths, runner, tasks

    for name, value, low in (("actors", actors, 1), ("chunks_per_task", chunks_per_task, 1),
                             ("max_restarts", max_restarts, 0), ("max_task_retries", max_task_retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} is not valid; use an int >= {low}")
    for name, value in (("cpus", cpus), ("gpus", gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}={value!r} is not valid; use a number >= 0 (per actor)")
    if cpus == 0 and gpus == 0:
        raise ValueError("cpus and gpus are both 0; an actor needs at least one resource")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} is not valid; use a positive int, or None for the backend's own")
    ray = _import_ray()
    spec = runner.canonical_spec(spec)
    problems = tasks.load_task(spec.task, spec.n_problems, spec.task_seed)
    ident = runner.identity(spec, problems)
    rid = runner._hash(ident)
    store = RunStore(Path(runs_root or paths.runs_dir()) / rid)
    if runner._todo(store, len(problems), chunk_problems, spec.sampling.n):
        runner.check_spec(spec)  # nothing is written for a spec that cannot run
    with store.lock():
        meta, chunks, todo = runner.open_run(spec, problems, ident, rid, store, chunk_problems)
        if todo:
            _generate(ray, spec, rid, store, meta, chunks, todo, actors, address, cpus, gpus, batch_size,
                      chunks_per_task, max_restarts, max_task_retries, progress)
        elif meta.get("status") != "complete":
            store.update_meta(status="complete", finished=meta.get("finished") or now_iso())
    return store.load()


def _generate(ray, spec, rid, store, meta, chunks, todo, actors, address, cpus, gpus, batch_size,
              chunks_per_task, max_restarts, max_task_retries, progress) -> None:
    from thinklab import runner

    threads = max(1, int(cpus)) if cpus >= 1 else 1
    env = {**_env_vars(), **{k: str(threads) for k in _THREAD_VARS}}
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, runtime_env={"env_vars": _env_vars()}, log_to_driver=False, include_dashboard=False)
    pool = []
    try:
        tasks_ = [todo[i : i + chunks_per_task] for i in range(0, len(todo), chunks_per_task)]
        cls = ray.remote(ChunkServer).options(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts,
                                              max_task_retries=max_task_retries, runtime_env={"env_vars": env})
        pool = [cls.remote(spec.to_dict(), rid, str(store.dir), chunks, batch_size, threads)
                for _ in range(min(actors, len(tasks_)))]
        setups = ray.get([a.serving_meta.remote() for a in pool])
        first = setups[0]
        for other in setups[1:]:
            if other["resolved"] != first["resolved"]:
                raise runner.RunMismatch(
                    f"the actors of run {rid} loaded different setups ({first['where']['host']}: {first['resolved']}; "
                    f"{other['where']['host']}: {other['resolved']}); give every node the same weights, dtype and backend")
        runner.check_resume(meta.get("resolved"), first["resolved"], store.dir)
        served = {k: v for k, v in first.items() if k != "where"}
        kept = {k: v for k, v in meta.get("ray", {}).get("parts", {}).items() if int(k) not in todo}  # a resume
        ray_info = {"actors": [s["where"] for s in setups], "cpus": cpus, "gpus": gpus,
                    "chunks_per_task": chunks_per_task, "parts": kept}
        # host and argv are the driver's; where each actor ran is under ray.actors
        store.update_meta(**{**served, "started": meta.get("started") or now_iso(), "host": platform.node(),
                             "argv": sys.argv, "ray": ray_info})
        counted = time.time()
        bar = _bar(len(todo), rid, progress)
        queue = list(tasks_)
        running = {}

        def submit(actor) -> None:
            if queue:
                running[actor.serve.remote(queue.pop(0))] = actor

        for _ in range(2):
            for actor in pool:
                submit(actor)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # the actor died more often than max_restarts/max_task_retries allow
                raise RuntimeError(f"run {rid}: a Ray actor failed ({type(exc).__name__}: {str(exc)[:500]}); the parts "
                                   f"written so far are kept, and running the same spec again serves only the "
                                   f"chunks still missing") from exc
            for k in result["chunks"]:
                ray_info["parts"][str(k)] = {key: result[key] for key in ("pid", "host", "node_id")}
            now = time.time()  # generate_seconds sums every sitting's time, up to its last part (as runner's)
            store.add_seconds("generate_seconds", now - counted)
            counted = now
            bar.update(len(result["chunks"]))
            submit(actor)
        bar.close()
        missing = [k for k in range(len(chunks)) if k not in store.done_chunks()]
        if missing:
            raise RuntimeError(f"run {rid}: every task returned but chunks {missing} have no part in {store.dir}; "
                               f"is the run directory on storage that every node sees at the same path?")
        # temporary files of a writer killed mid-part (its retry wrote the part whole); no task is running now
        for stale in store.dir.glob(".part-*.tmp-*"):
            stale.unlink(missing_ok=True)
        store.update_meta(finished=now_iso(), status="complete", ray=ray_info)
    finally:
        for actor in pool:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


def _bar(total: int, rid: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"run {rid} (chunks, Ray)", disable=not enabled, unit="chunk")


__all__ = ["run", "ChunkServer"]
