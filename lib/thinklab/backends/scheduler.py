"""Continuous batching for the lean forward: a batch of rows that is refilled as rows finish.

`RowScheduler.serve(requests)` runs every request (one backend call of one sample: a
token-id prompt, a seed, a sampling spec, a token cap, stop strings) and every follow-up
request their `then` callbacks return, keeping up to `rows` of them decoding at once:

  - Each step decodes one token for every running row. A row that finishes (EOS, a stop
    string, its token cap) hands its completion to its request's callback and frees its
    slot; the next pending request (lowest `order` first) takes the slot at the next step.
  - Admission prefills a pending prompt alone (batch 1, no padding) and copies its keys
    and values into the free slot. Requests with the same prompt (the n samples of a
    problem) share one prefill: it is kept while any pending request still has that
    prompt, so samples admitted at different steps still prefill once.
  - A follow-up request whose prompt extends what its row already holds (budget forcing's
    answer call, a "Wait" extension: the sample's prompt + its tokens so far, minus a
    dropped stop string, plus forced tokens) continues in that row: the positions it no
    longer wants are masked out, and its few new prompt tokens are fed one per step
    before sampling resumes. Nothing is prefilled again.

Layout. Each row owns a slot of the KV cache (lean.KVCache) and fills it from column 0:
its prompt, then one column per step (`LeanDecoder.decode_rows` writes each row's key and
value at its own column). A free slot decodes a pad token that attends only to itself.
When nothing is pending and a quarter of the slots are free, the batch shrinks to its
live rows; the capacity grows when a row (a long chain of follow-ups) needs it.

Why this layout: a row's attention then reads only its own columns, from column 0, so
its arithmetic does not depend on the other rows (how many, how long, when they came):
the GEMMs compute each row independently, the native attention kernel runs each row over
its own columns, and the torch path uses products whose results do not depend on the
window (decode_rows). A sample's tokens, entropies and log-probabilities are then the
same bits whoever decodes beside it and whenever it entered, which matters beyond
neatness: inverse-CDF sampling over a vocabulary of tiny probabilities turns a 1e-6
change in the logits into a different token whenever the draw lands among rare tokens.
(A single shared column count with rows right-aligned to it, as fixed batches use, would
let each row's softmax and value sums run over a different run of masked columns.)

Each sample keeps its own random stream: the uniforms of a request come from a
torch.Generator seeded with its seed, one float64 per token, drawn up front, as in the
fixed-batch loop. A follow-up continued in its row computes its new positions by decode
steps, not by one prefill: its tokens equal those of the same call prefilled afresh up
to float rounding (tests/test_scheduler.py).

This module knows nothing about tasks, budgets or storage: it sees requests and returns
completions.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from thinklab.backends.base import Completion, Request
from thinklab.backends.lean import ATTENTION_CHUNK, LeanDecoder

MAX_FEED = 64  # a follow-up with more new prompt tokens than this is prefilled instead of fed
SLACK, SLACK_SHARE = 64, 0.25  # capacity beyond the longest request: the larger of these positions and share
SHRINK_AT = 0.75  # with nothing pending, the batch shrinks to its live rows once they fill at most this share


def _up(x: int) -> int:
    return -(-x // ATTENTION_CHUNK) * ATTENTION_CHUNK


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Prefill:
    keys: list[torch.Tensor]  # per layer, the temporary cache's key tensor of its one row
    values: list[torch.Tensor]
    logits: torch.Tensor  # (V,) at the prompt's last position
    length: int


@dataclass
class _Row:
    req: Request
    cols: list[int]  # cache column of each position the row holds keys and values for
    seq: list[int]  # what those positions hold: its prompt, then its sampled tokens
    used: int  # columns used, masked ones included: the next column to write
    feed: deque = field(default_factory=deque)  # prompt tokens still to feed before sampling resumes
    last: int | None = None  # the last sampled token, fed at the next step
    uniforms: list[float] | None = None
    token_ids: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    logprob: list[float] = field(default_factory=list)


@dataclass
class SchedulerStats:
    """What one `serve` did, for run.json and benchmarks."""

    rows: int = 0  # slots allocated at the start
    steps: int = 0
    row_steps: int = 0  # sum over steps of rows decoding (not free slots)
    slot_steps: int = 0  # sum over steps of slots in the batch
    sampled_tokens: int = 0
    requests: int = 0
    prefills: int = 0
    prefill_tokens: int = 0
    continued_in_place: int = 0
    resizes: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def occupancy(self) -> float:
        """Share of the batch's slots holding a row (the batch shrinks once nothing is pending)."""
        return self.row_steps / self.slot_steps if self.slot_steps else 0.0

    @property
    def fill(self) -> float:
        """Rows decoding per step over the rows allocated: below 1 in the tail, when nothing
        is pending and the last rows finish (a step costs nearly as much at fewer rows)."""
        return self.row_steps / (self.steps * self.rows) if self.steps and self.rows else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["occupancy"] = round(self.occupancy, 4)
        d["fill"] = round(self.fill, 4)
        for k in ("prefill_seconds", "decode_seconds", "seconds"):
            d[k] = round(d[k], 3)
        return d


class RowScheduler:
    """Serves requests on a lean decoder with up to `rows` rows decoding at once.

    choose(logits (b, V), sampling, uniforms (b,) float64 or None) -> (tokens, logprobs,
    entropies) is the backend's token choice and trace; memory_bytes bounds the KV cache
    (rows x capacity x bytes per position): fewer rows are used when it would not fit.
    """

    def __init__(self, decoder: LeanDecoder, choose: Callable, tokenizer, eos_ids: set[int], pad_id: int,
                 rows: int, memory_bytes: int | None = None):
        if rows < 1:
            raise ValueError(f"rows={rows} is not valid; use a positive number of rows")
        self.decoder, self.choose, self.tokenizer = decoder, choose, tokenizer
        self.eos_ids, self.pad_id, self.max_rows = set(eos_ids), pad_id, rows
        self.memory_bytes = memory_bytes
        self.device = decoder.device
        self.stats = SchedulerStats()

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def serve(self, requests: Iterable[Request], on_tokens: Callable | None = None) -> SchedulerStats:
        """Run every request and follow-up to completion; `on_tokens(tag, n)` is told of
        each step's sampled tokens per request tag."""
        t_start = time.perf_counter()
        self.stats = SchedulerStats()
        self.on_tokens = on_tokens
        self.queue: list = []
        self.seq_no = itertools.count()
        self.pending_prompts: Counter = Counter()
        self.prefills: dict[tuple, _Prefill] = {}
        for r in requests:
            self._push(r)
        if not self.queue:
            return self.stats
        span = max(len(r.prompt) + r.max_new_tokens for _, _, r in self.queue)
        capacity = _up(span + max(SLACK, int(span * SLACK_SHARE)))  # room for follow-ups before growing
        self.stats.rows = rows = self._rows_that_fit(min(self.max_rows, len(self.queue)), capacity)
        self.cache = self.decoder.new_cache(rows, capacity)
        self.keep = torch.zeros((rows, self.cache.capacity), dtype=torch.bool, device=self.device)
        self.slots: list[_Row | None] = [None] * rows
        try:
            while self.queue or any(self.slots):
                self._admit()
                if any(self.slots):
                    self._step()
        finally:
            self.stats.seconds = time.perf_counter() - t_start
            del self.cache, self.keep, self.slots, self.prefills
        return self.stats

    # ------------------------------------------------------------------ queue and memory

    def _push(self, r: Request) -> None:
        if not r.prompt:
            raise ValueError("scheduler: a request has an empty prompt; a prompt needs at least one token")
        if r.max_new_tokens < 1:
            raise ValueError(f"scheduler: max_new_tokens={r.max_new_tokens} is not valid; use a positive int")
        heapq.heappush(self.queue, (r.order, next(self.seq_no), r))
        self.pending_prompts[tuple(r.prompt)] += 1
        self.stats.requests += 1

    def _rows_that_fit(self, rows: int, capacity: int) -> int:
        if self.memory_bytes is None:
            return rows
        per_row = capacity * self.decoder.kv_bytes_per_position()
        return max(1, min(rows, self.memory_bytes // per_row))

    def _live(self) -> list[tuple[int, _Row]]:
        return [(i, r) for i, r in enumerate(self.slots) if r is not None]

    def _resize(self, rows: list[int] | None, batch: int, capacity: int) -> None:
        """Reallocate the cache (and mask) with `batch` slots holding `rows` first (default:
        all, in place), and `capacity` columns."""
        rows_t = None if rows is None else torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache = self.cache.resized(rows_t, batch, capacity)
        keep = torch.zeros((batch, self.cache.capacity), dtype=torch.bool, device=self.device)
        old = self.keep if rows_t is None else self.keep[rows_t]
        keep[: old.shape[0], : min(old.shape[1], keep.shape[1])] = old[:, : keep.shape[1]]
        self.keep = keep
        if rows is not None:
            self.slots = [self.slots[i] for i in rows] + [None] * (batch - len(rows))
        self.stats.resizes += 1

    def _ensure_capacity(self, columns: int) -> None:
        """Room for `columns` columns in every slot (grows the cache by half at least)."""
        if columns <= self.cache.capacity:
            return
        capacity = _up(max(columns, self.cache.capacity + self.cache.capacity // 2))
        if self._rows_that_fit(len(self.slots), capacity) < len(self._live()):
            raise MemoryError(f"scheduler: {len(self._live())} rows of {capacity} positions do not fit the memory "
                              f"budget of {self.memory_bytes} bytes")
        self._resize(None, len(self.slots), capacity)

    # ------------------------------------------------------------------ admission

    def _prefill(self, prompt: list[int]) -> _Prefill:
        key = tuple(prompt)
        hit = self.prefills.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        P = len(prompt)
        tmp = self.decoder.new_cache(1, P)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        pos = torch.arange(P, device=self.device)[None]
        logits = self.decoder.forward(ids, pos, torch.ones((1, P), dtype=torch.bool, device=self.device), tmp)
        pf = _Prefill([k[0] for k in tmp.k], [v[0] for v in tmp.v], logits[0], P)
        self.prefills[key] = pf
        self.stats.prefills += 1
        self.stats.prefill_tokens += P
        self.stats.prefill_seconds += time.perf_counter() - t0
        return pf

    def _place(self, slot: int, pf: _Prefill) -> None:
        """Copy a prefill's keys and values into columns 0 .. P of a slot (whole key blocks:
        both caches start at column 0)."""
        nk = pf.keys[0].shape[1] if self.cache.blocked else pf.length
        for i, (k, v) in enumerate(zip(pf.keys, pf.values)):
            self.cache.k[i][slot, :, :nk] = k[:, :nk]
            self.cache.v[i][slot, :, : pf.length] = v[:, : pf.length]
        self.keep[slot] = False
        self.keep[slot, : pf.length] = True
        self.cache.length = max(self.cache.length, pf.length)  # what a resize copies

    def _admit(self) -> None:
        if not self.queue:
            live = self._live()
            if live and len(live) <= SHRINK_AT * len(self.slots):
                self.cache.length = max(r.used for _, r in live)
                self._resize([i for i, _ in live], len(live), self.cache.capacity)
            return
        free = [i for i, r in enumerate(self.slots) if r is None]
        if not free:
            return
        taken = [heapq.heappop(self.queue)[2] for _ in range(min(len(free), len(self.queue)))]
        self._ensure_capacity(_up(max(len(r.prompt) for r in taken) + 1))
        prefills = []
        for r in taken:
            prefills.append(self._prefill(r.prompt))
            key = tuple(r.prompt)
            self.pending_prompts[key] -= 1
            if self.pending_prompts[key] == 0:
                del self.pending_prompts[key], self.prefills[key]  # `prefills` above keeps it for this admission
        rows = []
        for slot, r, pf in zip(free, taken, prefills):
            self._place(slot, pf)
            row = _Row(req=r, cols=list(range(pf.length)), seq=list(r.prompt), used=pf.length,
                       uniforms=self._uniforms(r))
            self.slots[slot] = row
            rows.append((slot, row))
        self._sample(rows, torch.stack([pf.logits for pf in prefills]))

    @staticmethod
    def _uniforms(r: Request) -> list[float] | None:
        if r.sampling.temperature == 0:
            return None
        g = torch.Generator().manual_seed(int(r.seed))
        return torch.rand(r.max_new_tokens, generator=g, dtype=torch.float64).tolist()

    # ------------------------------------------------------------------ decoding

    def _step(self) -> None:
        live = self._live()
        self._ensure_capacity(_up(max(r.used for _, r in live) + 1))
        t0 = time.perf_counter()
        B = len(self.slots)
        ids, pos, cols = [self.pad_id] * B, [0] * B, [0] * B
        sampling_rows = []
        for i, row in live:
            ids[i] = row.feed.popleft() if row.feed else row.last
            pos[i], cols[i] = len(row.cols), row.used
            row.cols.append(row.used)
            row.used += 1
            if not row.feed:
                sampling_rows.append((i, row))
        for i, row in enumerate(self.slots):
            if row is None:  # a free slot decodes a pad token at column 0 that attends only to itself
                self.keep[i] = False
        cols_t = torch.tensor(cols, dtype=torch.long, device=self.device)
        self.keep[torch.arange(B, device=self.device), cols_t] = True
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)[:, None]
        pos_t = torch.tensor(pos, dtype=torch.long, device=self.device)[:, None]
        logits = self.decoder.decode_rows(ids_t, pos_t, cols_t, self.keep, self.cache)
        self.stats.steps += 1
        self.stats.row_steps += len(live)
        self.stats.slot_steps += B
        if len(sampling_rows) == B:  # a full batch: no copy of the logits
            self._sample(sampling_rows, logits)
        elif sampling_rows:
            idx = torch.tensor([i for i, _ in sampling_rows], device=self.device)
            self._sample(sampling_rows, logits[idx])
        self.stats.decode_seconds += time.perf_counter() - t0

    def _sample(self, rows: list[tuple[int, _Row]], logits: torch.Tensor) -> None:
        """Choose and trace the next token of each row from its logits (one row of `logits` each)."""
        by_sampling: dict = {}
        for j, (_, row) in enumerate(rows):
            by_sampling.setdefault(row.req.sampling, []).append(j)
        chosen: list = [None] * len(rows)
        for sampling, js in by_sampling.items():
            x = logits if len(js) == len(rows) else logits[torch.tensor(js, device=logits.device)]
            u = None
            if sampling.temperature > 0:
                u = torch.tensor([rows[j][1].uniforms[len(rows[j][1].token_ids)] for j in js], dtype=torch.float64,
                                 device=logits.device)
            tok, lp, ent = self.choose(x, sampling, u)
            for j, t, l, e in zip(js, tok.tolist(), lp.tolist(), ent.tolist()):
                chosen[j] = (t, l, e)
        counts: Counter = Counter()
        for (slot, row), (t, l, e) in zip(rows, chosen):
            counts[row.req.tag] += 1
            self._emit(slot, row, t, l, e)
        self.stats.sampled_tokens += len(rows)
        if self.on_tokens is not None:
            for tag, k in counts.items():
                self.on_tokens(tag, k)

    def _emit(self, slot: int, row: _Row, tok: int, lp: float, ent: float) -> None:
        row.token_ids.append(tok)
        row.entropy.append(ent)
        row.logprob.append(lp)
        row.seq.append(tok)
        row.last = tok
        req = row.req
        if tok in self.eos_ids:
            return self._finish(slot, row, "stop", None)
        if req.stop:
            window = max(len(s) for s in req.stop) + 4
            tail = self.tokenizer.decode(row.token_ids[-window:], skip_special_tokens=False)
            hit = next((s for s in req.stop if s in tail), None)
            if hit is not None:
                return self._finish(slot, row, "stop", hit)
        if len(row.token_ids) >= req.max_new_tokens:
            return self._finish(slot, row, "length", None)

    def _finish(self, slot: int, row: _Row, reason: str, stop_string: str | None) -> None:
        done = Completion(token_ids=row.token_ids, token_entropy=row.entropy, token_logprob=row.logprob,
                          finish_reason=reason, stop_string=stop_string)
        follow = row.req.then(done) if row.req.then is not None else None
        if follow is not None and self._continue(slot, row, follow):
            return
        self.slots[slot] = None
        self.keep[slot] = False
        if follow is not None:
            self._push(follow)

    def _continue(self, slot: int, row: _Row, req: Request) -> bool:
        """Run follow-up `req` in the row that just finished, if its prompt extends what the
        row holds by at most MAX_FEED tokens; masks the positions it does not keep."""
        if not req.prompt or req.max_new_tokens < 1:
            return False
        held = len(row.cols)  # the last sampled token (row.seq[-1]) has no keys and values yet
        kept = min(_common_prefix(req.prompt, row.seq), held)
        if kept == 0 or not 0 < len(req.prompt) - kept <= MAX_FEED:
            return False
        for c in row.cols[kept:]:
            self.keep[slot, c] = False
        del row.cols[kept:]
        row.req, row.seq, row.feed, row.last = req, list(req.prompt), deque(req.prompt[kept:]), None
        row.uniforms = self._uniforms(req)
        row.token_ids, row.entropy, row.logprob = [], [], []
        self.stats.requests += 1
        self.stats.continued_in_place += 1
        return True
