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
    dropped stop string, plus forced tokens) continues in that row: positions it no longer
    wants are masked out, and the few new prompt tokens are fed one per step before
    sampling resumes. Nothing is prefilled again.

Layout. All rows share one KV cache (lean.KVCache) and one length n: each step writes
every row's new key and value at column n. A row owns the columns its mask row marks
(its prompt, right-aligned to n when admitted, then one column per step); position ids
are per row, so where a row sits in its slot does not change what it computes. When n
reaches the capacity, the cache is compacted (every row moved left by the oldest live
row's start, in whole 16-position blocks); when a prompt is longer than n, rows move
right to make room. The SDPA path reads only the window from the oldest live row's start;
the native kernel reads from column 0 (masked positions weigh 0), so there compaction is
also done eagerly, whenever the dead prefix is as long as the live window. Free slots
decode a pad token that attends only to itself; when nothing is pending and a quarter of
the slots are free, the batch shrinks to the live rows.

What makes a sample what it is does not depend on its neighbours: its uniforms come from
its own torch.Generator seeded with its request's seed (one float64 per token, drawn up
front, as in the fixed-batch loop), its prompt is prefilled alone, and a decode row's
arithmetic does not read other rows (masked positions contribute exact zeros). Where the
attention's reductions run over a different number or alignment of masked positions,
results can differ by float rounding (the native kernel's softmax sum, SDPA's tiling);
tests/test_scheduler.py checks token ids are equal and entropies agree to 1e-5.

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
from thinklab.backends.lean import KVCache, LeanDecoder

BLOCK = KVCache.BLOCK
MAX_FEED = 64  # a follow-up whose new prompt tokens are more than this is prefilled instead of fed
SLACK, SLACK_SHARE = 64, 0.25  # capacity beyond the longest request: the larger of these positions and share
SHRINK_AT = 0.75  # with nothing pending, the batch shrinks to its live rows once they fill at most this share


def _up(x: int) -> int:
    return -(-x // BLOCK) * BLOCK


def _down(x: int) -> int:
    return x // BLOCK * BLOCK


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Prefill:
    keys: list[torch.Tensor]  # per layer (kv heads, P, head dim)
    values: list[torch.Tensor]
    logits: torch.Tensor  # (V,) at the prompt's last position


@dataclass
class _Row:
    req: Request
    cols: list[int]  # virtual cache column of each position the row holds keys and values for
    seq: list[int]  # what the row's positions hold: its prompt, then its sampled tokens
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
    moves: int = 0
    resizes: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def occupancy(self) -> float:
        return self.row_steps / self.slot_steps if self.slot_steps else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["occupancy"] = round(self.occupancy, 4)
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
        capacity = _up(span + max(SLACK, int(span * SLACK_SHARE)))  # room to run between compactions
        self.stats.rows = rows = self._rows_that_fit(min(self.max_rows, len(self.queue)), capacity)
        self.cache = self.decoder.new_cache(rows, capacity)
        self.keep = torch.zeros((rows, self.cache.capacity), dtype=torch.bool, device=self.device)
        self.slots: list[_Row | None] = [None] * rows
        self.shifted = 0  # virtual column = cache column + shifted
        self.headroom = 0  # the longest prompt admitted so far: compaction keeps n at least this
        while self.queue or any(self.slots):
            self._admit()
            if any(self.slots):
                self._step()
            elif self.queue:
                raise RuntimeError("scheduler: requests are pending but none could be admitted")
        self.stats.seconds = time.perf_counter() - t_start
        del self.cache, self.keep, self.slots, self.prefills
        return self.stats

    # ------------------------------------------------------------------ queue

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

    # ------------------------------------------------------------------ cache geometry

    @property
    def n(self) -> int:
        return self.cache.length

    def _live(self) -> list[tuple[int, _Row]]:
        return [(i, r) for i, r in enumerate(self.slots) if r is not None]

    def _oldest_start(self) -> int:
        """Cache column of the first position any live row holds (n when none do)."""
        starts = [r.cols[0] - self.shifted for _, r in self._live() if r.cols]
        return min(starts) if starts else self.n

    def _move(self, delta: int) -> None:
        """Move every row's columns by delta (a multiple of 16) and the length with them."""
        lo, end = _down(self._oldest_start()), _up(self.n)
        if end + delta > self.cache.capacity:
            self._resize(None, len(self.slots), _up(end + delta + BLOCK))
        self.cache.move(lo, end, delta)
        moved = self.keep[:, lo:end].clone()
        self.keep[:, min(lo, lo + delta) : max(end, end + delta)] = False
        self.keep[:, lo + delta : end + delta] = moved
        self.cache.length += delta
        self.shifted -= delta
        self.stats.moves += 1

    def _resize(self, rows: list[int] | None, batch: int, capacity: int) -> None:
        """Reallocate the cache (and mask) with `batch` slots holding `rows` first, and `capacity`."""
        rows_t = None if rows is None else torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache = self.cache.resized(rows_t, batch, capacity)
        keep = torch.zeros((batch, self.cache.capacity), dtype=torch.bool, device=self.device)
        old = self.keep if rows_t is None else self.keep[rows_t]
        keep[: old.shape[0], : min(old.shape[1], keep.shape[1])] = old[:, : keep.shape[1]]
        self.keep = keep
        if rows is not None:
            self.slots = [self.slots[i] for i in rows] + [None] * (batch - len(rows))
        self.stats.resizes += 1

    def _make_room(self, prompt_len: int) -> None:
        """Make n >= prompt_len so that a prompt can be placed right-aligned at n."""
        if not self._live():
            self.keep.zero_()
            self.shifted += self.n  # columns restart; virtual columns of finished rows no longer matter
            self.cache.length = _up(prompt_len)
        elif self.n < prompt_len:
            self._move(_up(prompt_len - self.n))
        if self.n + 1 > self.cache.capacity:
            self._resize(None, len(self.slots), _up(self.n + 1 + BLOCK))

    def _compact(self) -> None:
        """Before a step: room for column n, and (native attention) no long dead prefix."""
        n, oldest = self.n, self._oldest_start()
        dead = _down(oldest)
        full = n + 1 > self.cache.capacity
        eager = self.decoder.native_attention and dead >= max(4 * BLOCK, n - oldest)
        if not (full or eager):
            return
        shift = min(dead, _down(max(n - self.headroom, 0))) if not full else dead
        if shift > 0:
            self._move(-shift)
        if self.n + 1 > self.cache.capacity:
            grow = max(self.cache.capacity // 2, 4 * BLOCK)
            rows = self._rows_that_fit(len(self.slots), self.cache.capacity + grow)
            if rows < len(self._live()):
                raise MemoryError(f"scheduler: {len(self._live())} rows of {self.cache.capacity + grow} positions "
                                  f"do not fit the memory budget of {self.memory_bytes} bytes")
            self._resize(None, len(self.slots), self.cache.capacity + grow)

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
        pf = _Prefill([tmp.keys(i, P)[0].clone() for i in range(len(tmp.k))],
                      [tmp.v[i][0, :, :P].clone() for i in range(len(tmp.v))], logits[0])
        self.prefills[key] = pf
        self.stats.prefills += 1
        self.stats.prefill_tokens += P
        self.stats.prefill_seconds += time.perf_counter() - t0
        return pf

    def _admit(self) -> None:
        free = [i for i, r in enumerate(self.slots) if r is None]
        if not self.queue:
            live = self._live()
            if live and len(live) <= SHRINK_AT * len(self.slots):
                self._resize([i for i, _ in live], len(live), self.cache.capacity)
            return
        if not free:
            return
        taken = [heapq.heappop(self.queue)[2] for _ in range(min(len(free), len(self.queue)))]
        prefills = []
        for r in taken:
            prefills.append(self._prefill(r.prompt))
            key = tuple(r.prompt)
            self.pending_prompts[key] -= 1
            if self.pending_prompts[key] == 0:
                del self.pending_prompts[key], self.prefills[key]  # the local `prefills` keeps it for now
        longest = max(len(r.prompt) for r in taken)
        self.headroom = max(self.headroom, longest)
        self._make_room(longest)
        n = self.n
        rows = []
        for slot, r, pf in zip(free, taken, prefills):
            P = len(r.prompt)
            for i, (k, v) in enumerate(zip(pf.keys, pf.values)):
                self.cache.write_row(i, slot, n - P, k, v)
            self.keep[slot] = False
            self.keep[slot, n - P : n] = True
            row = _Row(req=r, cols=list(range(n - P + self.shifted, n + self.shifted)), seq=list(r.prompt),
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
        self._compact()
        t0 = time.perf_counter()
        B, n = len(self.slots), self.n
        ids = [self.pad_id] * B
        pos = [0] * B
        sampling_rows = []
        live = 0
        for i, row in self._live():
            live += 1
            ids[i] = row.feed.popleft() if row.feed else row.last
            pos[i] = len(row.cols)
            row.cols.append(n + self.shifted)
            if not row.feed:
                sampling_rows.append((i, row))
        self.keep[:, n] = True  # every slot sees its new column; a free slot sees only that
        window = _down(self._oldest_start()) if not self.decoder.native_attention else 0
        window = min(window, _down(n))
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)[:, None]
        pos_t = torch.tensor(pos, dtype=torch.long, device=self.device)[:, None]
        logits = self.decoder.forward(ids_t, pos_t, self.keep[:, : n + 1], self.cache, window)
        self.stats.steps += 1
        self.stats.row_steps += live
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
            self.keep[slot, c - self.shifted] = False
        del row.cols[kept:]
        row.req, row.seq, row.feed, row.last = req, list(req.prompt), deque(req.prompt[kept:]), None
        row.uniforms = self._uniforms(req)
        row.token_ids, row.entropy, row.logprob = [], [], []
        self.stats.requests += 1
        self.stats.continued_in_place += 1
        return True
