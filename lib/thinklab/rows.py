"""What a row of the sample table holds, and how a chunk's traces become rows.

The runner cuts a run's problems into chunks; `Chunk.build` lays out a chunk's samples
(prompt text and token ids per problem, one (problem, sample) pair and seed per sample),
the backend fills `Chunk.traces`, and `Chunk.frame` grades them and assembles the rows of
the contract (`thinklab.store.SCHEMA`). Grading needs no model, so the runner calls
`frame` from a background thread while the model keeps decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from thinklab.config import RunSpec, sample_seed
from thinklab.store import rows_to_frame
from thinklab.tracing import PhaseMarkers, boundary_char, detect_think_tags, split_text, tokens_before_char


def phase_markers(spec: RunSpec, tokenizer) -> PhaseMarkers:
    """The strings that split a sample into thinking and answer: the spec's own, else the
    think tags the tokenizer declares, and the spec's answer markers."""
    start, end = detect_think_tags(tokenizer)
    return PhaseMarkers(
        think_start=spec.budget.think_start or start,
        think_end=spec.budget.think_end or end,
        answer_markers=spec.budget.answer_markers,
    )


def _level(meta: dict) -> int | None:
    level = meta.get("level")
    if isinstance(level, (int, float)) or (isinstance(level, str) and level.isdigit()):
        return int(level)
    return None


@dataclass
class Chunk:
    """The samples of one chunk of problems: the prompts they share, their seeds, their traces."""

    spec: RunSpec
    run_id: str
    markers: PhaseMarkers
    problems: list
    prompt_texts: list[str]  # per problem
    prompt_ids: list[list[int]]  # per problem
    flat: list[tuple[int, int]]  # (problem index, sample index) per sample
    seeds: list[int]  # per sample
    traces: list = field(default_factory=list)  # per sample, filled by the caller

    @classmethod
    def build(cls, spec: RunSpec, run_id: str, tokenizer, markers: PhaseMarkers, problems: list) -> "Chunk":
        from thinklab import prompts

        texts = [prompts.build_prompt(tokenizer, p, spec.prompt) for p in problems]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        flat = [(pi, s) for pi in range(len(problems)) for s in range(spec.sampling.n)]
        seeds = [sample_seed(spec.sampling.seed, problems[pi].problem_id, s) for pi, s in flat]
        return cls(spec, run_id, markers, problems, texts, ids, flat, seeds, [None] * len(flat))

    def sample_prompts(self) -> list[list[int]]:
        """The prompt token ids of each sample."""
        return [self.prompt_ids[pi] for pi, _ in self.flat]

    def thinking_tokens(self, tokenizer) -> list[int]:
        """Tokens before the answer phase of each sample: where budget forcing cut the
        thinking, else where the decoded text crosses its phase boundary."""
        out = []
        for tr in self.traces:
            if tr.n_thinking_tokens is not None:
                out.append(tr.n_thinking_tokens)
            else:
                text = tokenizer.decode(tr.token_ids, skip_special_tokens=True)
                out.append(tokens_before_char(tokenizer, tr.token_ids, boundary_char(text, self.markers)))
        return out

    def frame(self, tokenizer, routing: list[dict] | None = None) -> pl.DataFrame:
        """Grade the traces and return the chunk's rows; `routing` adds the MoE columns per sample."""
        from thinklab import grading

        spec, markers = self.spec, self.markers
        n_thinks = self.thinking_tokens(tokenizer)
        out = []
        for j, ((pi, s), seed, tr) in enumerate(zip(self.flat, self.seeds, self.traces)):
            p = self.problems[pi]
            text, n_think = tokenizer.decode(tr.token_ids, skip_special_tokens=True), n_thinks[j]
            thinking, answer = split_text(text, markers)
            g = grading.grade(text, p.gold, p.task, finish_reason=tr.finish_reason,
                              lenient_truncated=spec.grading.lenient_truncated,
                              think_start=markers.think_start or grading.THINK_START,
                              think_end=markers.think_end or grading.THINK_END)
            out.append({
                "run_id": self.run_id,
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
                "prompt": self.prompt_texts[pi],
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
                "level": _level(p.meta),
                "subject": p.meta.get("subject"),
                "extractor": g.extractor,
                "grader_version": grading.GRADER_VERSION,
                **(routing[j] if routing else {}),
            })
        return rows_to_frame(out)
