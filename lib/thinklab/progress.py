"""Progress of a study: one bar per run and one for the whole study.

Each bar counts finished samples and shows the tokens generated so far, their rate, and
an estimate of the time left: the tokens still to come (the samples left times the mean
length of the finished ones, or times `max_tokens` before any has finished) over the
rate so far. tqdm's own estimate counts samples, which all finish late in a
continuously batched run, so it is replaced by this one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable, Sequence

REFRESH_S = 0.5


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


@dataclass
class _Count:
    samples: int  # to generate
    max_tokens: int
    done: int = 0
    tokens: int = 0
    done_tokens: int = 0  # tokens of the finished samples
    first: float | None = None  # when the first tokens came
    first_tokens: int = 0  # how many came then: the rate counts from there, not from before them

    def postfix(self, now: float) -> str:
        if self.first is None or self.tokens == 0:
            return "waiting for the first tokens"
        elapsed = now - self.first
        if elapsed < 1.0 or self.tokens == self.first_tokens:
            return f"{self.tokens} tok, measuring tok/s"
        rate = (self.tokens - self.first_tokens) / elapsed
        per_sample = self.done_tokens / self.done if self.done else self.max_tokens
        left = max(self.samples * per_sample - self.tokens, 0.0) if self.done < self.samples else 0.0
        return f"{self.tokens} tok, {rate:.0f} tok/s, ETA ~{_clock(left / rate) if rate > 0 else '?'}"


@dataclass
class StudyProgress:
    """runs: (label, samples to generate, max tokens per sample) per run, keyed by tag."""

    runs: dict[Hashable, tuple[str, int, int]]
    enabled: bool = True
    bars: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    last_refresh: float = 0.0

    def __post_init__(self) -> None:
        from tqdm.auto import tqdm

        fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} samples [{elapsed}, {postfix}]"
        keys: Sequence[Hashable] = list(self.runs)
        if len(keys) > 1:
            total = sum(n for _, n, _ in self.runs.values())
            self.counts[None] = _Count(total, max(m for _, _, m in self.runs.values()))
            self.bars[None] = tqdm(total=total, desc=f"study ({len(keys)} runs)", bar_format=fmt,
                                   disable=not self.enabled, position=0)
        for i, key in enumerate(keys):
            label, n, m = self.runs[key]
            self.counts[key] = _Count(n, m)
            self.bars[key] = tqdm(total=n, desc=label, bar_format=fmt, disable=not self.enabled,
                                  position=i + (len(keys) > 1), leave=True)
        self._refresh(force=True)

    def _targets(self, tag: Hashable):
        return [tag, None] if None in self.counts and tag is not None else [tag]

    def tokens(self, tag: Hashable, n: int) -> None:
        now = time.perf_counter()
        for key in self._targets(tag):
            c = self.counts[key]
            c.tokens += n
            if c.first is None:
                c.first, c.first_tokens = now, c.tokens
        self._refresh()

    def sample_done(self, tag: Hashable, n_tokens: int) -> None:
        for key in self._targets(tag):
            c = self.counts[key]
            c.done += 1
            c.done_tokens += n_tokens
            self.bars[key].update(1)
        self._refresh()

    def _refresh(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last_refresh < REFRESH_S):
            return
        self.last_refresh = now
        for key, bar in self.bars.items():
            bar.set_postfix_str(self.counts[key].postfix(now), refresh=True)

    def close(self) -> None:
        self._refresh(force=True)
        for bar in self.bars.values():
            bar.close()
