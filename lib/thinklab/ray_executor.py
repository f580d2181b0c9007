"""Sweep sets as Ray tasks: Ray places them, retries a set whose worker died, and reports.

`thinklab.batch` builds one job per set (notebook, parameters, output path) exactly as for
the local executor; here each job becomes a `ray.remote` task with the resources the sweep
file declares (`cpus`, `gpus` per set) and `max_retries` for a worker or node that dies
under it. A set whose notebook fails is not retried (its row says why, as locally); a set
whose retries run out is a failed row, and the other sets go on. The executed notebooks,
figures and index are written where the local executor writes them, so the paths must be
on storage that every node sees (a shared filesystem on a cluster; one machine here).

This module knows nothing about notebooks: it runs a picklable `execute(job) -> row`
function. It imports ray only when called.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

INSTALL_HINT = "pip install 'thinklab[ray]' (on a CPU host: pip install -c constraints-cpu.txt 'thinklab[ray]')"
# Variables a set's worker needs to find the same code, data and models as the driver.
_FORWARDED_ENV = ("PYTHONPATH", "THINKLAB_", "HF_", "TRANSFORMERS_", "VLLM_", "TORCH_EXTENSIONS_DIR")


@dataclass(frozen=True)
class RayOptions:
    """The sweep file's `ray:` block (and `thinklab batch --address`)."""

    address: str | None = None  # ray.init address: "auto", "ray://head:10001", "host:port"; None = start a local Ray
    cpus: float = 1.0  # per set
    gpus: float = 0.0  # per set
    max_retries: int = 2  # reruns of a set whose worker process or node died

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> "RayOptions":
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: `ray` must be a mapping with keys address, cpus, gpus, max_retries; got {raw!r}")
        unknown = sorted(set(raw) - {"address", "cpus", "gpus", "max_retries"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} under `ray`; valid: address, cpus, gpus, max_retries")
        opts = cls(**raw)
        opts.check(where)
        return opts

    def check(self, where: str) -> None:
        if self.address is not None and not isinstance(self.address, str):
            raise ValueError(f"{where}: ray.address={self.address!r} is not valid; use a string such as 'auto' or 'host:6379'")
        for key in ("cpus", "gpus"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{where}: ray.{key}={value!r} is not valid; use a number >= 0 (per set)")
        if self.cpus == 0 and self.gpus == 0:
            raise ValueError(f"{where}: ray.cpus and ray.gpus are both 0; a set needs at least one resource")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"{where}: ray.max_retries={self.max_retries!r} is not valid; use an int >= 0")


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"executor 'ray' needs the ray package ({exc}); {INSTALL_HINT}") from exc
    return ray


def _env_vars() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}


def run_jobs(jobs: list[dict], execute: Callable[[dict], dict], options: RayOptions) -> Iterator[tuple[dict, dict]]:
    """Run `execute(job)` for every job as a Ray task; yield (job, row) as each finishes.

    Connects to `options.address` (or starts a local Ray when None) unless Ray is already
    initialised in this process, and shuts down only what it started.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, runtime_env={"env_vars": _env_vars()}, log_to_driver=False,
                 include_dashboard=False)
    try:
        task = ray.remote(num_cpus=options.cpus, num_gpus=options.gpus, max_retries=options.max_retries,
                          retry_exceptions=False)(execute)
        refs = {}
        for job in jobs:
            # a set's kernel gets as many threads as the cores Ray reserved for it
            threads = max(1, int(options.cpus)) if options.cpus else None
            refs[task.remote({**job, "threads": threads})] = job
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            job = refs[done[0]]
            try:
                row = ray.get(done[0])
            except Exception as exc:  # the worker (or its node) died more often than max_retries allows
                row = {"set": job["set"], "status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                       "figures": [], "started": None, "duration_s": None, "error_cell": None}
            yield job, row
    finally:
        if started:
            ray.shutdown()


__all__ = ["RayOptions", "run_jobs", "INSTALL_HINT"]
