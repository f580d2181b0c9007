"""Shared fixtures: the real embedded fast model, loaded once per session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from thinklab.config import ModelSpec  # noqa: E402


@pytest.fixture(scope="session")
def fast_backend():
    """The transformers backend on the embedded SmolLM2-135M-Instruct (materialized once)."""
    # Loaded outside the runner's cache: a test that runs another model through the runner
    # replaces (and closes) the cached backend, which must not be this shared one.
    from thinklab.backends import load_backend

    backend = load_backend(ModelSpec(name="default", backend="hf"))
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def chat_prompts(fast_backend):
    """Token-id prompts of different lengths (so the batch is left-padded)."""
    tok = fast_backend.tokenizer
    questions = [
        "What is 7 + 5?",
        "Name three colors of the rainbow and explain where rainbows come from.",
        "Is 91 a prime number? Think it through.",
        "Write one sentence about the sea.",
    ]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
