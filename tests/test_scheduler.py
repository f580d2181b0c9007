"""The row scheduler on the real embedded model: a sample is the same whoever decodes beside it.

A sample's tokens come from its own seeded stream and its own prefill, so they must not
depend on the other rows of the batch, on when it entered, on sharing its prompt's
prefill, or on its follow-up calls continuing in place rather than being prefilled
again. Token ids must be equal; entropies and log-probabilities may differ by float
rounding (attention reductions run over differently placed masked positions), bounded
here by TRACE_ATOL.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from thinklab import runner
from thinklab.backends import scheduler
from thinklab.backends.base import Backend, Request
from thinklab.backends.lean import KVCache
from thinklab.config import BudgetSpec, ModelSpec, RunSpec, SamplingSpec
from thinklab.generation import generate_traces
from thinklab.runner import phase_markers

TRACE_ATOL = 1e-4  # seen: up to ~4e-5 nats between a sample alone and in a batch of 8


def _same_sample(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason
    for x, y in ((a.token_entropy, b.token_entropy), (a.token_logprob, b.token_logprob)):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert (math.isnan(u) and math.isnan(v)) or abs(u - v) <= TRACE_ATOL, (u, v)


class _Batch:
    """Sets the backend's batch size for a block and restores it."""

    def __init__(self, backend, rows: int):
        self.backend, self.rows = backend, rows

    def __enter__(self):
        self.saved, self.backend.max_batch_size = self.backend.max_batch_size, self.rows

    def __exit__(self, *exc):
        self.backend.max_batch_size = self.saved


def _serve(backend, requests):
    """Serve requests; returns their completions in order and the scheduler's numbers."""
    out = [None] * len(requests)
    for i, r in enumerate(requests):
        r.then = (lambda i: lambda c: out.__setitem__(i, c))(i)
    backend.serve(requests)
    return out, backend.last_serve_stats


@pytest.mark.slow
def test_sample_does_not_depend_on_neighbours_or_entry_time(fast_backend, chat_prompts):
    assert fast_backend.lean is not None, "the embedded model must take the scheduled path"
    s = SamplingSpec(temperature=1.0)
    alone = [fast_backend.generate([p], [100 + i], s, 24, progress=False)[0] for i, p in enumerate(chat_prompts)]
    # Two slots, eight samples: the four above are queued behind four others (lower order runs
    # first), so they enter late, into slots other rows left, beside whatever still runs.
    others = [Request(list(chat_prompts[(i + 1) % 4]), 7 + i, s, 8 + 5 * i, order=i) for i in range(4)]
    mine = [Request(list(p), 100 + i, s, 24, order=10 + i) for i, p in enumerate(chat_prompts)]
    with _Batch(fast_backend, 2):
        outs, stats = _serve(fast_backend, others + mine)
    assert stats["rows"] == 2 and stats["requests"] == 8
    assert stats["occupancy"] > 0.9, "slots must be refilled as rows finish"
    for a, b in zip(alone, outs[4:]):
        _same_sample(a, b)


@pytest.mark.slow
def test_samples_sharing_a_prompt_prefill_it_once(fast_backend, chat_prompts):
    s = SamplingSpec(temperature=1.0)
    prompt = chat_prompts[1]
    with _Batch(fast_backend, 3):  # four samples, three slots: the fourth enters later and reuses the prefill
        outs, stats = _serve(fast_backend, [Request(list(prompt), 40 + k, s, 16, order=k) for k in range(4)])
    assert stats["prefills"] == 1 and stats["prefill_tokens"] == len(prompt)
    assert len({tuple(o.token_ids) for o in outs}) > 1, "different seeds must give different samples"
    for k, o in enumerate(outs):
        _same_sample(fast_backend.generate([prompt], [40 + k], s, 16, progress=False)[0], o)


@pytest.fixture
def tiny_decoder():
    """A lean decoder on a tiny random llama: the cache geometry at the speed of a unit test.
    One thread: at these sizes a second one only waits (and on a busy machine, for long)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinklab.backends.lean import LeanDecoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    yield LeanDecoder(model)
    torch.set_num_threads(threads)


def _serve_tiny(decoder, requests, rows, follow_up=None):
    """Serve requests on the tiny decoder; follow_up(request, completion, call index) may
    return a further call. Returns every (request, completion) served and the numbers."""
    from thinklab.backends.hf import choose_tokens

    served = []

    def then(r, k):
        def done(c):
            served.append((r, c))
            nxt = follow_up(r, c, k) if follow_up is not None else None
            if nxt is not None:
                nxt.then, nxt.order = then(nxt, k + 1), r.order
            return nxt
        return done

    for r in requests:
        r.then = then(r, 1)
    sched = scheduler.RowScheduler(decoder, lambda x, s, u: choose_tokens(x, s, u, decoder.native), None, {2}, 0,
                                   rows=rows)
    return served, sched.serve(requests).as_dict()


def test_moved_compacted_and_continued_rows_compute_what_fresh_calls_compute(tiny_decoder, monkeypatch):
    """Prompts of random lengths entering beside running rows (rows move right), a cache
    with little room beyond the longest request (compacted every few steps), and follow-up
    calls that drop a few tokens and force others (continued in their row): every call
    served equals the same call served alone, prefilled afresh."""
    import random

    monkeypatch.setattr(scheduler, "SLACK", 16)
    monkeypatch.setattr(scheduler, "SLACK_SHARE", 0.0)
    rng = random.Random(0)
    s = SamplingSpec(temperature=1.0)

    def follow_up(r, c, k):  # up to two follow-ups: drop 0-3 tokens, force 1-5, continue
        if k > 2 or len(c.token_ids) < 2:
            return None
        drop = rng.randrange(min(4, len(c.token_ids)))
        forced = [rng.randrange(3, 128) for _ in range(rng.randrange(1, 6))]
        return Request(r.prompt + c.token_ids[: len(c.token_ids) - drop] + forced, r.seed * 7 + k, s,
                       rng.randrange(4, 20))

    sizes = [5, 20, 5, 20, 150, 70, 5, 150, 20, 70, 150, 5, 70, 20]  # short first: long ones then need room
    first = [Request([rng.randrange(3, 128) for _ in range(n)], 1000 + i, s, rng.randrange(4, 30), order=i)
             for i, n in enumerate(sizes)]
    served, stats = _serve_tiny(tiny_decoder, first, rows=4, follow_up=follow_up)
    assert stats["moves"] >= 2 and stats["continued_in_place"] >= 5 and stats["occupancy"] > 0.8, stats
    assert len(served) == stats["requests"] > len(first)
    for r, c in served:
        (_, alone), = _serve_tiny(tiny_decoder, [Request(r.prompt, r.seed, s, r.max_new_tokens)], rows=1)[0]
        _same_sample(alone, c)


class _Rounds(Backend):
    """The hf backend seen through the default `Backend.serve`: every follow-up call is a
    new `generate` call whose prompt (the sample so far) is prefilled again."""

    name = "rounds"

    def __init__(self, inner):
        super().__init__(inner.spec)
        self.inner = inner

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    @property
    def info(self):
        return self.inner.info

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [BudgetSpec(thinking_budget=10, answer_budget=8), BudgetSpec(wait_extensions=1)],
                         ids=["budget", "wait"])
def test_follow_up_calls_continued_in_their_row_equal_fresh_calls(fast_backend, chat_prompts, budget):
    spec = RunSpec(model=ModelSpec(name="default"), sampling=SamplingSpec(temperature=0.8, max_tokens=32), budget=budget)
    markers = phase_markers(spec, fast_backend.tokenizer)
    prompts = [p for p in chat_prompts for _ in range(2)]
    seeds = list(range(500, 500 + len(prompts)))
    scheduled = generate_traces(fast_backend, prompts, seeds, spec.sampling, budget, markers, progress=False)
    stats = fast_backend.last_serve_stats
    rounds = generate_traces(_Rounds(fast_backend), prompts, seeds, spec.sampling, budget, markers, progress=False)
    assert stats["continued_in_place"] > 0, "no follow-up call ran in its row"
    assert any(t.forced or t.wait_extensions for t in scheduled), "the budget never acted, so nothing was compared"
    for a, b in zip(scheduled, rounds):
        _same_sample(a, b)
        assert (a.n_thinking_tokens, a.wait_extensions, a.forced) == (b.n_thinking_tokens, b.wait_extensions, b.forced)


@pytest.mark.slow
def test_runs_of_a_study_served_together_equal_each_run_alone(fast_backend, tmp_path):
    base = RunSpec(model=ModelSpec(name="default"), task="rg:basic_arithmetic", n_problems=2,
                   sampling=SamplingSpec(temperature=1.0, n=2, max_tokens=24, seed=1))
    specs = [base, base.replace(**{"sampling.temperature": 0.6, "budget.thinking_budget": 8})]
    together = runner.run_many(specs, runs_root=tmp_path / "together", backend=fast_backend, progress=False)
    for spec, df in zip(specs, together):
        alone = runner.run(spec, runs_root=tmp_path / "alone", backend=fast_backend, progress=False)
        assert df.height == alone.height == 4
        assert df["token_ids"].to_list() == alone["token_ids"].to_list()
        assert df.drop("token_entropy", "token_logprob").equals(alone.drop("token_entropy", "token_logprob"))
        for col in ("token_entropy", "token_logprob"):
            a, b = (np.concatenate([np.asarray(x, dtype=np.float64) for x in t[col].to_list()]) for t in (df, alone))
            assert np.array_equal(np.isnan(a), np.isnan(b))
            assert np.nanmax(np.abs(a - b)) <= TRACE_ATOL


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "flat"])
def test_kv_cache_rows_move_and_resize(blocked):
    cache = KVCache(layers=1, batch=3, kv_heads=2, capacity=64, head_dim=3, dtype=torch.float32, device="cpu",
                    blocked=blocked)
    assert torch.count_nonzero(cache.v[0]) == 0 and torch.count_nonzero(cache.k[0]) == 0, "a new cache is zeroed"
    k = torch.arange(2 * 20 * 3, dtype=torch.float32).view(2, 20, 3)
    cache.write_row(0, 1, 5, k, -k)  # row 1, positions 5..24
    cache.length = 25
    assert torch.equal(cache.keys(0, 25)[1, :, 5:], k)
    assert torch.equal(cache.keys(0, 25, start=16)[1], k[:, 11:])
    assert torch.count_nonzero(cache.keys(0, 25)[[0, 2]]) == 0, "other rows untouched"
    cache.move(0, 32, 16)
    assert torch.equal(cache.keys(0, 41)[1, :, 21:41], k) and torch.equal(cache.v[0][1, :, 21:41], -k)
    cache.length = 41
    small = cache.resized(torch.tensor([1]), 1, 48)
    assert small.capacity == 48 and small.length == 41
    assert torch.equal(small.keys(0, 41)[0, :, 21:41], k) and torch.equal(small.v[0][0, :, 21:41], -k)
    with pytest.raises(ValueError, match="multiples of 16"):
        cache.move(0, 20, 16)
