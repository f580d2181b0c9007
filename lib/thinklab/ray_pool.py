"""One large run fanned out to a pool of Ray actors, each holding a loaded backend.

`run(spec, actors=N)` stores exactly what `thinklab.runner.run(spec)` stores: the same run
directory, the same `run.json` (chunk size fixed at creation), the same chunks. Each chunk
goes whole to one actor, which generates it with `runner.generate_chunk` (the very code a
local run uses, with the same batch) and writes it as one part, atomically
(`RunStore.write_part`), into the run directory, so that directory must be on storage
every node sees. A resumed run, local or on Ray, regenerates only chunks without a part,
and the sample table equals a local run's token for token.

Ray places the actors (`cpus`/`gpus` each; one per GPU on a GPU node), restarts an actor
whose process or node died (it loads its backend again) and retries the chunk it held;
thinklab only partitions chunks and writes parts. The driver holds the run's lock for the
whole run, as a local run does. This module imports ray only when called.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import polars as pl

from thinklab.config import RunSpec
from thinklab.ray_executor import _env_vars, _import_ray
from thinklab.store import RunStore, now_iso


class ChunkWorker:
    """A Ray actor: loads the spec's backend once, then generates and stores chunks."""

    def __init__(self, spec_dict: dict, run_dir: str):
        from thinklab import runner

        self.spec = RunSpec.from_dict(spec_dict)
        self.store = RunStore(run_dir)
        self.backend = runner.get_backend(self.spec.model)

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        info = self.backend.info
        resolved = getattr(self.backend, "resolved", None)
        return {"backend": {"name": info.backend, **info.extra}, "entropy_mode": info.entropy_mode,
                "entropy_distribution": info.entropy_distribution,
                "model": {"name": self.spec.model.name, "resolved": getattr(resolved, "name", self.spec.model.name),
                          "path": getattr(resolved, "path", None),
                          "fingerprint": getattr(resolved, "fingerprint", None)}}

    def generate(self, chunk: int, problems: list) -> int:
        from thinklab import runner

        frame = runner.generate_chunk(self.spec, self.backend, problems, progress=False)
        self.store.write_part(chunk, frame)
        return chunk


def run(
    spec: RunSpec,
    runs_root: Path | str | None = None,
    actors: int = 2,
    cpus: float = 1.0,  # per actor
    gpus: float = 0.0,  # per actor
    address: str | None = None,  # None: the Ray this process is connected to, else a local one
    chunk_problems: int | None = None,
    max_restarts: int = 2,
    name_prefix: str | None = None,  # actors are named f"{prefix}-{i}" (lets a test find and kill one)
) -> pl.DataFrame:
    """Generate (or load) the run `spec` describes on a pool of Ray actors; return its table."""
    from thinklab import grading, runner, tasks

    if actors < 1:
        raise ValueError(f"actors={actors} is not valid; use a positive int")
    ray = _import_ray()
    store = RunStore(runner.run_dir(spec, runs_root))
    problems = tasks.load_task(spec.task, spec.n_problems, spec.task_seed)
    with store.lock():
        if store.meta_path.is_file():
            meta = store.read_meta()
            if meta["spec"] != json.loads(json.dumps(spec.to_dict())):
                raise RuntimeError(f"{store.dir} holds a different spec than its id says; remove it and rerun")
        else:
            per_chunk = chunk_problems or max(1, 16 // spec.sampling.n)  # as runner.run, so either can resume
            meta = {"run_id": spec.run_id, "spec": spec.to_dict(), "chunk_problems": per_chunk,
                    "n_problems": len(problems), "created": now_iso(), "status": "running"}
            store.write_meta(meta)
        per_chunk = meta["chunk_problems"]
        chunks = [problems[i : i + per_chunk] for i in range(0, len(problems), per_chunk)]
        todo = [k for k in range(len(chunks)) if k not in store.done_chunks()]
        if todo:
            started = not ray.is_initialized()
            if started:
                ray.init(address=address, runtime_env={"env_vars": _env_vars()}, log_to_driver=False,
                         include_dashboard=False)
            try:
                worker = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=max_restarts,
                                    max_task_retries=max_restarts)(ChunkWorker)
                n = min(actors, len(todo))
                pool = [worker.options(**({"name": f"{name_prefix}-{i}"} if name_prefix else {}))
                        .remote(spec.to_dict(), str(store.dir)) for i in range(n)]
                described = ray.get(pool[0].describe.remote())
                store.update_meta(started=meta.get("started") or now_iso(), versions=runner._versions(),
                                  git_commit=runner._git_commit(), **described,
                                  forced_tokens="tokens forced by budget cues or 'Wait' carry NaN entropy and "
                                                "log-probability",
                                  grader_version=grading.GRADER_VERSION, host=platform.node(), argv=sys.argv,
                                  ray={"actors": n, "cpus": cpus, "gpus": gpus})
                t0 = time.time()
                queue = list(todo)
                running = {}
                for actor in pool:  # one chunk in flight per actor; the next goes to whichever finishes
                    if queue:
                        k = queue.pop(0)
                        running[actor.generate.remote(k, chunks[k])] = actor
                while running:
                    done, _ = ray.wait(list(running), num_returns=1)
                    actor = running.pop(done[0])
                    ray.get(done[0])  # a chunk whose actor died more often than max_restarts raises here
                    if queue:
                        k = queue.pop(0)
                        running[actor.generate.remote(k, chunks[k])] = actor
                store.update_meta(finished=now_iso(), status="complete", generate_seconds=round(time.time() - t0, 2))
                for actor in pool:
                    ray.kill(actor)
            finally:
                if started:
                    ray.shutdown()
        elif meta.get("status") != "complete":
            store.update_meta(status="complete", finished=meta.get("finished") or now_iso())
    return store.load()


__all__ = ["run", "ChunkWorker"]
