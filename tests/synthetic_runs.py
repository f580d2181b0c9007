"""Run directories for tests, built with RunStore from synthetic rows (no model)."""

from __future__ import annotations

from pathlib import Path

from thinklab.runner import run_id
from thinklab.config import RunSpec
from thinklab.store import RunStore, rows_to_frame


def make_row(run_id: str, problem: str, sample: int, *, correct: bool, n_tokens: int, entropy: list[float],
             finish: str = "stop", seed: int | None = None, temperature: float = 0.7, **extra) -> dict:
    row = {
        "run_id": run_id, "problem_id": problem, "sample_idx": sample, "task": "rg:basic_arithmetic",
        "model": "smollm2-135m", "backend": "hf", "quantization": None, "moe_top_k": None,
        "temperature": temperature, "top_p": 1.0, "seed": seed if seed is not None else hash((problem, sample)) % 10**9,
        "thinking_budget": None, "wait_extensions": 0, "prompt": f"Question {problem}?", "text": "x" * n_tokens,
        "thinking": "", "answer_text": "", "n_tokens": n_tokens, "n_thinking_tokens": n_tokens,
        "n_answer_tokens": 0, "finish_reason": finish, "token_entropy": entropy,
        "token_logprob": [-0.5] * len(entropy), "token_ids": [28] * len(entropy), "pred": "1", "gold": "1",
        "correct": correct, "level": None, "subject": None, "extractor": "boxed", "grader_version": "2",
        "expert_load": None, "router_entropy_thinking": None, "router_entropy_answer": None,
    }
    row.update(extra)
    return row


def write_run(root: Path, spec: RunSpec, rows: list[dict], *, study: str | None = None, status: str = "complete",
              created: str = "2026-11-30T10:00:00+00:00", chunk: int = 2, model_path: str | None = None) -> Path:
    store = RunStore(root / run_id(spec))
    meta = {"run_id": run_id(spec), "spec": spec.to_dict(), "n_problems": spec.n_problems, "created": created,
            "status": status, "model": {"name": spec.model.name, "resolved": "smollm2-135m", "path": model_path},
            "backend": {"name": "hf", "forward": "lean (thinklab.backends.lean, native)"}}
    if study:
        meta["study"] = study
    store.write_meta(meta)
    problems = list(dict.fromkeys(r["problem_id"] for r in rows))
    for k in range(0, len(problems), chunk):
        part = [r for r in rows if r["problem_id"] in problems[k : k + chunk]]
        store.write_part(k // chunk, rows_to_frame(part))
    return store.dir
