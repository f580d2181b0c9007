"""Prompts: turn a `Problem` into the exact text given to the model.

The model's own chat template does the formatting (`apply_chat_template(...,
tokenize=False, add_generation_prompt=True)`); this module only decides the messages:
an optional system prompt, optional few-shot turns from the task's own pool, and the
question followed by the task's answer instruction. `enable_thinking` is passed to
templates that read it (Qwen3-style) and ignored by the others. A tokenizer without a
chat template (a base model) gets a plain "Question: ... Answer:" layout.

This module knows nothing about backends or grading; it never tokenizes.
"""

from __future__ import annotations

import warnings
from typing import Any

from thinklab.config import PromptSpec
from thinklab.grading import choice_gold
from thinklab.tasks import Problem, worked_examples

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of the correct option within \\boxed{}."


def answer_instruction(problem: Problem) -> str:
    """The per-task sentence that tells the model how to give its answer."""
    if not problem.task.startswith("rg:") and choice_gold(problem.gold) is not None:
        return CHOICE_INSTRUCTION
    # Every other task (math benchmarks, GSM8K, reasoning-gym, JSONL) is graded from \boxed{} first.
    return MATH_INSTRUCTION


def build_messages(problem: Problem, spec: PromptSpec) -> list[dict[str, str]]:
    """The chat messages for `problem`: system prompt, few-shot turns, then the question."""
    instruction = answer_instruction(problem)
    messages: list[dict[str, str]] = []
    if spec.system_prompt:
        messages.append({"role": "system", "content": spec.system_prompt})
    for question, worked in worked_examples(problem.task, spec.few_shot, exclude=problem.problem_id):
        messages.append({"role": "user", "content": f"{question}\n\n{instruction}"})
        messages.append({"role": "assistant", "content": worked})
    messages.append({"role": "user", "content": f"{problem.question}\n\n{instruction}"})
    return messages


def accepts_thinking_switch(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template reads an `enable_thinking` variable."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and "enable_thinking" in str(template)


def build_prompt(tokenizer: Any, problem: Problem, spec: PromptSpec) -> str:
    """The exact prompt text for `problem` under `spec`, chat template applied."""
    messages = build_messages(problem, spec)
    if not getattr(tokenizer, "chat_template", None):
        return plain_prompt(messages)
    kwargs: dict[str, Any] = {}
    if spec.enable_thinking is not None:
        if accepts_thinking_switch(tokenizer):
            kwargs["enable_thinking"] = spec.enable_thinking
        else:
            warnings.warn(
                "enable_thinking is set but this model's chat template has no thinking switch; ignoring it",
                stacklevel=2,
            )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """A template-free layout for base models: blank-line separated Question/Answer blocks."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append(f"Question: {m['content']}")
        else:
            parts[-1] += f"\nAnswer: {m['content']}"
    return "\n\n".join(parts) + "\nAnswer:"
