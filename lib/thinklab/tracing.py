"""Phases and markers of a generated trace.

A trace has a thinking phase and an answer phase. For reasoning models the boundary is
the end-of-thinking tag (`</think>`); for instruction models that emit none, the answer
phase starts at the first final-answer marker (`\\boxed{`, `Final answer:`, ...), and a
trace without any marker is all thinking. Token counts per phase come from mapping the
boundary's character offset back to a token index. Pure functions; no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

DEFAULT_MARKERS = ("wait", "hmm", "alternatively", "let me check", "but wait", "actually", "let me verify", "double-check")


@dataclass(frozen=True)
class PhaseMarkers:
    think_start: str | None  # None for models without think tags
    think_end: str | None
    answer_markers: tuple[str, ...]

    @property
    def has_think_tags(self) -> bool:
        return self.think_end is not None


def detect_think_tags(tokenizer) -> tuple[str | None, str | None]:
    """("<think>", "</think>") when the tokenizer knows them as tokens or its template uses them."""
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "</think>" in vocab or "</think>" in template:
        return "<think>", "</think>"
    return None, None


def boundary_char(text: str, markers: PhaseMarkers) -> int:
    """Character offset where the answer phase starts (len(text) when it never starts)."""
    if markers.has_think_tags:
        pos = text.find(markers.think_end)
        return len(text) if pos < 0 else pos + len(markers.think_end)
    hits = [p for p in (text.find(m) for m in markers.answer_markers) if p >= 0]
    return min(hits) if hits else len(text)


def split_text(text: str, markers: PhaseMarkers) -> tuple[str, str]:
    """(thinking, answer_text). Think tags themselves belong to neither phase's content."""
    cut = boundary_char(text, markers)
    thinking, answer = text[:cut], text[cut:]
    if markers.has_think_tags:
        thinking = thinking.removesuffix(markers.think_end) if cut < len(text) or text.endswith(markers.think_end) else thinking
        if markers.think_start and thinking.lstrip().startswith(markers.think_start):
            thinking = thinking.lstrip()[len(markers.think_start) :]
    return thinking, answer


def tokens_before_char(tokenizer, token_ids: Sequence[int], char_pos: int) -> int:
    """Largest k such that the first k tokens decode to at most `char_pos` characters."""
    lo, hi = 0, len(token_ids)
    while lo < hi:  # decode length is monotone in k; binary search keeps this O(log n) decodes
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(token_ids[:mid], skip_special_tokens=True)) <= char_pos:
            lo = mid
        else:
            hi = mid - 1
    return lo


def marker_counts(text: str, markers: Sequence[str] = DEFAULT_MARKERS) -> dict[str, int]:
    """Case-insensitive whole-word counts of each marker in `text`."""
    low = text.lower()
    return {m: len(re.findall(r"\b" + re.escape(m.lower()) + r"\b", low)) for m in markers}
