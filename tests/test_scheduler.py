"""The row scheduler: a sample is the same whoever decodes beside it and whenever it entered.

A sample's tokens come from its own seeded stream, its own prefill, and decode steps whose
arithmetic reads only its own cache columns; so its token ids, entropies and
log-probabilities must be the same bits alone, beside other rows, entering late, or
sharing its prompt's prefill. A follow-up call continued in its row (fed, not prefilled
again) computes its keys by decode steps instead of one prefill: equal to the same call
made afresh up to float rounding, which can change a draw only where it lands among
rare tokens (see `_same_up_to_rounding`).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from thinklab import runner
from thinklab.backends import scheduler
from thinklab.backends.base import Backend, Request
from thinklab.backends.lean import KVCache
from thinklab.config import BudgetSpec, ModelSpec, RunSpec, SamplingSpec
from thinklab.generation import generate_traces
from thinklab.store import RunStore
from thinklab.rows import phase_markers

TRACE_ATOL = 1e-4  # float rounding between a call continued in its row and the same call prefilled
RARE_LOGPROB = -4.0  # a draw this unlikely lands where the CDF is dense with tiny masses


def _identical(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason
    for x, y in ((a.token_entropy, b.token_entropy), (a.token_logprob, b.token_logprob)):
        assert len(x) == len(y) and all((u == v) or (math.isnan(u) and math.isnan(v)) for u, v in zip(x, y))


def _same_up_to_rounding(a, b) -> bool:
    """Equal traces up to float rounding: the same tokens with traces within TRACE_ATOL, or
    the same until a draw where both tokens are rare (a shift of 1e-6 in the cumulative
    mass picks a neighbouring tiny-probability token). Returns whether they are identical."""
    k = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
    n = len(a.token_ids) if k is None else k
    for x, y in ((a.token_entropy, b.token_entropy), (a.token_logprob, b.token_logprob)):
        for u, v in zip(x[:n], y[:n]):
            assert (math.isnan(u) and math.isnan(v)) or abs(u - v) <= TRACE_ATOL, (u, v)
    if k is None:
        assert len(a.token_ids) == len(b.token_ids) and a.finish_reason == b.finish_reason
        return True
    assert a.token_logprob[k] < RARE_LOGPROB and b.token_logprob[k] < RARE_LOGPROB, (
        f"traces part at token {k} on a likely draw ({a.token_logprob[k]:.2f}, {b.token_logprob[k]:.2f})")
    return False


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


# ------------------------------------------------------------------ the real embedded model


@pytest.mark.slow
def _independent_of_neighbours(backend, chat_prompts):
    assert backend.forward.layout == "rows", "the model must take the scheduled path"
    s = SamplingSpec(temperature=1.0)
    alone = [backend.generate([p], [100 + i], s, 24, progress=False)[0] for i, p in enumerate(chat_prompts)]
    # Two slots, eight samples: the four above are queued behind four others (lower order runs
    # first), so they enter late, into slots other rows left, beside whatever still runs.
    others = [Request(list(chat_prompts[(i + 1) % 4]), 7 + i, s, 8 + 5 * i, order=i) for i in range(4)]
    mine = [Request(list(p), 100 + i, s, 24, order=10 + i) for i, p in enumerate(chat_prompts)]
    with _Batch(backend, 2):
        outs, stats = _serve(backend, others + mine)
    assert stats["rows"] == 2 and stats["requests"] == 8
    assert stats["occupancy"] > 0.9, "slots must be refilled as rows finish"
    for a, b in zip(alone, outs[4:]):
        _identical(a, b)


def test_sample_does_not_depend_on_neighbours_or_entry_time(fast_backend, chat_prompts):
    _independent_of_neighbours(fast_backend, chat_prompts)


@pytest.mark.slow
def test_offline_moe_sample_does_not_depend_on_neighbours(chat_prompts):
    """The offline MoE at k=4 of 16 on the lean forward: its router's top-k per position
    must not depend on the other rows either."""
    from thinklab import models
    from thinklab.backends.hf import HFBackend

    backend = HFBackend(ModelSpec(name=models.model_name(models.DEFAULT_OFFLINE), backend="hf", moe_top_k=4))
    try:
        _independent_of_neighbours(backend, chat_prompts)
    finally:
        backend.close()


@pytest.mark.slow
def test_samples_sharing_a_prompt_prefill_it_once(fast_backend, chat_prompts):
    s = SamplingSpec(temperature=1.0)
    prompt = chat_prompts[1]
    with _Batch(fast_backend, 3):  # four samples, three slots: the fourth enters later and reuses the prefill
        outs, stats = _serve(fast_backend, [Request(list(prompt), 40 + k, s, 16, order=k) for k in range(4)])
    assert stats["prefills"] == 1 and stats["prefill_tokens"] == len(prompt)
    assert len({tuple(o.token_ids) for o in outs}) > 1, "different seeds must give different samples"
    for k, o in enumerate(outs):
        _identical(fast_backend.generate([prompt], [40 + k], s, 16, progress=False)[0], o)


class _Rounds(Backend):
    """The hf backend seen through the default `Backend.serve`: every follow-up call is a
    new `generate` call whose prompt (the sample so far) is prefilled afresh."""

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

    @property
    def identity(self):
        return self.inner.identity

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)


@pytest.mark.slow
# SmolLM2 has no think tags: its thinking ends at an answer marker; "." makes that happen
# early, so the samples get their "Wait" extensions and answer calls within a few tokens.
@pytest.mark.parametrize("budget", [BudgetSpec(thinking_budget=10, answer_budget=8),
                                    BudgetSpec(wait_extensions=2, answer_markers=(".",))], ids=["budget", "wait"])
def test_follow_up_calls_continued_in_their_row_equal_fresh_calls(fast_backend, chat_prompts, budget):
    spec = RunSpec(model=ModelSpec(name="default"), sampling=SamplingSpec(temperature=0.8, max_tokens=32), budget=budget)
    markers = phase_markers(spec, fast_backend.tokenizer)
    prompts = [p for p in chat_prompts for _ in range(2)]
    seeds = list(range(500, 500 + len(prompts)))
    scheduled = generate_traces(fast_backend, prompts, seeds, spec.sampling, budget, markers, progress=False)
    stats = fast_backend.last_serve_stats
    with _Batch(fast_backend, 3):  # the scheduled traces do not depend on the batch either
        again = generate_traces(fast_backend, prompts, seeds, spec.sampling, budget, markers, progress=False)
    rounds = generate_traces(_Rounds(fast_backend), prompts, seeds, spec.sampling, budget, markers, progress=False)
    assert stats["continued_in_place"] > 0, "no follow-up call ran in its row"
    assert any(t.forced or t.wait_extensions for t in scheduled), "the budget never acted, so nothing was compared"
    identical = 0
    for a, b, c in zip(scheduled, again, rounds):
        _identical(a, b)
        if _same_up_to_rounding(a, c):
            identical += 1
            assert (a.n_thinking_tokens, a.wait_extensions, a.forced) == (c.n_thinking_tokens, c.wait_extensions, c.forced)
    assert identical >= len(prompts) // 2


@pytest.mark.slow
def test_runs_of_a_study_served_together_equal_each_run_alone(fast_backend, tmp_path):
    base = RunSpec(model=ModelSpec(name="default"), task="rg:basic_arithmetic", n_problems=2,
                   sampling=SamplingSpec(temperature=1.0, n=2, max_tokens=24, seed=1))
    specs = [base, base.replace(**{"sampling.temperature": 0.6, "budget.thinking_budget": 8})]
    together = runner.run_many(specs, runs_root=tmp_path / "together", backend=fast_backend, progress=False)
    for spec, df in zip(specs, together):
        alone = runner.run(spec, runs_root=tmp_path / "alone", backend=fast_backend, progress=False)
        assert df.height == alone.height == 4
        assert df.equals(alone)
    meta = RunStore(runner.run_dir(specs[0], tmp_path / "together")).read_meta()
    assert meta["status"] == "complete" and meta["scheduler"]["runs_served_together"] == 2
    assert meta["backend"]["max_batch_size"] == fast_backend.max_batch_size and meta["backend"]["batch_size_rule"]


@pytest.mark.slow
def test_runs_generated_block_by_block_problem_major_equal_whole_runs(fast_backend, tmp_path):
    # the findings sweep's way: problems 0-1 of both runs, then the rest, served problem by problem
    base = RunSpec(model=ModelSpec(name="default"), task="rg:basic_arithmetic", n_problems=4,
                   sampling=SamplingSpec(temperature=1.0, n=2, max_tokens=16, seed=3))
    specs = [base, base.replace(**{"sampling.temperature": 0.6})]
    root = tmp_path / "blocks"
    first = runner.run_many(specs, runs_root=root, backend=fast_backend, progress=False, order="problems",
                            upto=2, chunk_problems=1)
    for spec, df in zip(specs, first):
        assert df["problem_id"].n_unique() == 2 and df.height == 4
        assert RunStore(runner.run_dir(spec, root)).read_meta()["status"] != "complete"
    again = runner.run_many(specs, runs_root=root, backend=fast_backend, progress=False, order="problems",
                            upto=2, chunk_problems=1)
    assert all(a.equals(b) for a, b in zip(first, again))  # that block is done: nothing new
    rest = runner.run_many(specs, runs_root=root, backend=fast_backend, progress=False, order="problems",
                           chunk_problems=1)
    whole = runner.run_many(specs, runs_root=tmp_path / "whole", backend=fast_backend, progress=False,
                            chunk_problems=1)
    for spec, a, b in zip(specs, rest, whole):
        assert a.height == b.height == 8 and a["problem_id"].n_unique() == 4
        assert a.sort("problem_id", "sample_idx").equals(b.sort("problem_id", "sample_idx"))
        assert RunStore(runner.run_dir(spec, root)).read_meta()["status"] == "complete"
    with pytest.raises(ValueError, match="order='sideways' is not valid"):
        runner.run_many(specs, runs_root=root, backend=fast_backend, progress=False, order="sideways")


def test_a_run_resumed_under_another_commit_records_both(fast_backend, tmp_path, monkeypatch):
    spec = RunSpec(model=ModelSpec(name="default"), task="rg:basic_arithmetic", n_problems=2,
                   sampling=SamplingSpec(temperature=1.0, n=1, max_tokens=8, seed=3))
    for commit, upto in (("aaa111", 1), ("aaa111", 1), ("bbb222", None)):
        monkeypatch.setattr(runner, "_git_commit", lambda commit=commit: commit)
        runner.run_many([spec], runs_root=tmp_path, backend=fast_backend, progress=False, order="problems",
                        upto=upto, chunk_problems=1)
    meta = RunStore(runner.run_dir(spec, tmp_path)).read_meta()
    assert meta["status"] == "complete" and meta["git_commit"] == "bbb222"
    assert meta["git_commits"] == ["aaa111", "bbb222"]  # each commit that wrote parts, once, in order


def _rows(frame):
    return frame.sort("problem_id", "sample_idx").drop("run_id")


def test_a_run_with_more_samples_takes_the_samples_a_smaller_run_holds(fast_backend, tmp_path):
    """Sample s of a problem depends on its seed, the spec and the arithmetic, not on how
    many samples the run has: 4 samples after 2 decode only the 2 new ones, and the run
    equals the same 4 generated from nothing, bit for bit; 2 after 4 decode nothing."""
    small = RunSpec(model=ModelSpec(name="default"), task="rg:basic_arithmetic", n_problems=3,
                    sampling=SamplingSpec(temperature=1.0, n=2, max_tokens=16, seed=7))
    big = small.replace(**{"sampling.n": 4})
    alone = runner.run(big, runs_root=tmp_path / "alone", backend=fast_backend, progress=False)

    runner.run(small, runs_root=tmp_path / "shared", backend=fast_backend, progress=False)
    extended = runner.run(big, runs_root=tmp_path / "shared", backend=fast_backend, progress=False)
    assert _rows(extended).equals(_rows(alone))
    assert set(extended["run_id"]) == {runner.run_id(big)}
    meta = RunStore(runner.run_dir(big, tmp_path / "shared")).read_meta()
    assert meta["reused_samples"] == {runner.run_id(small): 6}
    assert meta["scheduler"]["requests"] == 6  # only samples 2 and 3 of each problem were decoded

    # the other way round: every sample is held, so the backend is not asked for any
    fewer = runner.run(small, runs_root=tmp_path / "alone", backend=fast_backend, progress=False)
    meta = RunStore(runner.run_dir(small, tmp_path / "alone")).read_meta()
    assert meta["reused_samples"] == {runner.run_id(big): 6} and "scheduler" not in meta
    assert meta["status"] == "complete"
    assert _rows(fewer).equals(_rows(alone.filter(alone["sample_idx"] < 2)))


def test_samples_are_not_taken_from_a_run_decoded_under_another_setup(fast_backend, tmp_path):
    small = RunSpec(model=ModelSpec(name="default"), task="rg:basic_arithmetic", n_problems=2,
                    sampling=SamplingSpec(temperature=1.0, n=1, max_tokens=12, seed=9))
    runner.run(small, runs_root=tmp_path, backend=fast_backend, progress=False)
    donor = RunStore(runner.run_dir(small, tmp_path))
    donor.update_meta(resolved={**donor.read_meta()["resolved"], "forward": "transformers"})
    other_temperature = small.replace(**{"sampling.n": 2, "sampling.temperature": 0.5})
    for spec in (small.replace(**{"sampling.n": 2}), other_temperature):
        runner.run(spec, runs_root=tmp_path, backend=fast_backend, progress=False)
        meta = RunStore(runner.run_dir(spec, tmp_path)).read_meta()
        assert "reused_samples" not in meta and meta["scheduler"]["requests"] == 4


def test_generate_seconds_sums_every_sitting_of_a_resumed_run(fast_backend, tmp_path):
    """A run generated in two sittings (a sweep's blocks) records the time of both, each
    from its first token to its last part: not the last sitting's alone."""
    import time

    spec = RunSpec(model=ModelSpec(name="default"), task="rg:basic_arithmetic", n_problems=2,
                   sampling=SamplingSpec(temperature=1.0, n=2, max_tokens=12, seed=5))
    store = RunStore(runner.run_dir(spec, tmp_path))
    recorded, walls = [], []
    for upto in (1, None):
        t0 = time.perf_counter()
        runner.run_many([spec], runs_root=tmp_path, backend=fast_backend, progress=False, order="problems",
                        upto=upto, chunk_problems=1)
        walls.append(time.perf_counter() - t0)
        recorded.append(store.read_meta().get("generate_seconds"))
    first, total = recorded
    assert first is not None and 0 < first <= walls[0] + 0.01  # a block's time is kept before the run completes
    assert store.read_meta()["status"] == "complete"
    assert 0 < total - first <= walls[1] + 0.01  # the second sitting adds its own time to the first's


# ------------------------------------------------------------------ a tiny random llama: the cache's bookkeeping


@pytest.fixture
def tiny_decoder():
    """A lean decoder on a tiny random llama: the scheduler's bookkeeping at unit-test speed.
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
    return a further call. Returns every (request, completion) served, and the numbers."""
    from thinklab.backends.sampling import choose_tokens

    served = []

    def then(r, k):
        def done(c):
            served.append((r, c))
            nxt = follow_up(r, c, k) if follow_up is not None else None
            if nxt is not None:
                nxt.then, nxt.order, nxt.tag = then(nxt, k + 1), r.order, r.tag
            return nxt
        return done

    for r in requests:
        r.then = then(r, 1)
    sched = scheduler.RowScheduler(decoder, lambda x, s, u: choose_tokens(x, s, u, decoder.native), None, {2}, 0,
                                   rows=rows)
    return served, sched.serve(requests).as_dict()


def _chains(n: int):
    """First calls of n chains, and a follow-up rule (up to two follow-ups that drop 0-3 tokens
    and force 1-5) that depends only on the chain and its history, not on when it is asked."""
    s = SamplingSpec(temperature=1.0)
    rng = random.Random(0)
    sizes = [5, 20, 5, 20, 150, 70, 5, 150, 20, 70, 150, 5, 70, 20]  # short first, then long ones beside them
    first = [Request([rng.randrange(3, 128) for _ in range(sizes[i % len(sizes)])], 1000 + i, s, rng.randrange(4, 30),
                     order=i, tag=i) for i in range(n)]

    def follow_up(r, c, k):
        if k > 2 or len(c.token_ids) < 2:
            return None
        g = random.Random(r.tag * 10 + k)
        drop = g.randrange(min(4, len(c.token_ids)))
        forced = [g.randrange(3, 128) for _ in range(g.randrange(1, 6))]
        return Request(r.prompt + c.token_ids[: len(c.token_ids) - drop] + forced, r.seed * 7 + k, s, g.randrange(4, 20))

    return first, follow_up


def test_chains_of_calls_are_the_same_bits_alone_and_in_a_crowd(tiny_decoder, monkeypatch):
    """Prompts of very different lengths entering beside running rows, follow-up calls that
    drop tokens and force others (continued in their row), a cache that has to grow, and a
    batch that shrinks at the end: every call equals the same chain served alone."""
    monkeypatch.setattr(scheduler, "SLACK", 1)
    monkeypatch.setattr(scheduler, "SLACK_SHARE", 0.0)
    first, follow_up = _chains(14)
    crowd, stats = _serve_tiny(tiny_decoder, first, rows=4, follow_up=follow_up)
    assert stats["continued_in_place"] >= 5 and stats["resizes"] >= 2 and stats["occupancy"] > 0.8, stats
    assert len(crowd) == stats["requests"] > len(first)
    for i in range(len(first)):
        chain, _ = _serve_tiny(tiny_decoder, [_chains(14)[0][i]], rows=1, follow_up=follow_up)
        mine = [(r, c) for r, c in crowd if r.tag == i]
        assert [r.prompt for r, _ in chain] == [r.prompt for r, _ in mine]
        for (_, a), (_, b) in zip(chain, mine):
            _identical(a, b)


def test_continued_calls_equal_fresh_calls(tiny_decoder):
    first, follow_up = _chains(8)
    crowd, stats = _serve_tiny(tiny_decoder, first, rows=3, follow_up=follow_up)
    assert stats["continued_in_place"] >= 4
    s = SamplingSpec(temperature=1.0)
    for r, c in crowd:
        ((_, fresh),), _ = _serve_tiny(tiny_decoder, [Request(r.prompt, r.seed, s, r.max_new_tokens)], rows=1)
        _same_up_to_rounding(fresh, c)


@pytest.mark.parametrize("sampling", [SamplingSpec(temperature=1.0), SamplingSpec(temperature=0.7, top_p=0.9),
                                      SamplingSpec(temperature=0)], ids=["T1", "top-p", "greedy"])
def test_token_choice_and_trace_of_a_row_do_not_depend_on_the_batch(sampling):
    """The torch sampler on a full vocabulary, a row alone and among five others, with the
    threads torch would use: the same bits."""
    from thinklab.backends.sampling import choose_tokens

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 49152, generator=g) * 3
    u = None if sampling.temperature == 0 else torch.rand(6, generator=g, dtype=torch.float64)
    together = choose_tokens(logits, sampling, u)
    for r in range(6):
        alone = choose_tokens(logits[r : r + 1].clone(), sampling, None if u is None else u[r : r + 1].clone())
        for a, b in zip(together, alone):
            assert torch.equal(a[r : r + 1], b)


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_decode_rows_of_different_lengths_match_a_plain_forward(native):
    """Rows holding 3, 40 and 130 positions decode one step each, one of them after its last
    position was masked out (dropped, as a "Wait" extension drops a stop string): every
    row's logits equal a plain causal forward over its own kept tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinklab.backends.lean import LeanDecoder

    if native:
        from thinklab.backends.lean import attention_ops

        if attention_ops() is None:
            pytest.skip("the native decode attention does not run on this CPU (it needs AVX-512F, or AVX2 and FMA)")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    dec = LeanDecoder(model, native=native)
    assert dec.native_attention == native
    lengths, hole = [3, 40, 130], (1, 39)  # row 1's last cached position is masked out
    seqs = [torch.randint(3, 128, (n + 1,)).tolist() for n in lengths]  # n cached tokens + the one fed now
    with torch.inference_mode():
        cache = dec.new_cache(3, 256)
        keep = torch.zeros(3, 256, dtype=torch.bool)
        for r, n in enumerate(lengths):
            tmp = dec.new_cache(1, n)
            dec.forward(torch.tensor([seqs[r][:n]]), torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool), tmp)
            for i in range(len(tmp.k)):
                blocks = tmp.k[i].shape[2] if tmp.blocked else n
                cache.k[i][r, :, :blocks] = tmp.k[i][0, :, :blocks]
                cache.v[i][r, :, :n] = tmp.v[i][0, :, :n]
            keep[r, :n] = True
        keep[hole] = False
        cols = torch.tensor(lengths)
        keep[torch.arange(3), cols] = True
        # the row with the hole feeds its last token at position n - 1: one position was dropped
        pos = torch.tensor([n - (r == hole[0]) for r, n in enumerate(lengths)])[:, None]
        ids = torch.tensor([s[-1] for s in seqs])[:, None]
        got = dec.decode_rows(ids, pos, cols, keep, cache)
        for r in range(3):
            kept = [t for j, t in enumerate(seqs[r]) if not (r == hole[0] and j == hole[1])]
            want = model(torch.tensor([kept])).logits[0, -1]
            assert (got[r] - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "flat"])
def test_kv_cache_starts_zeroed_and_resizes(blocked):
    cache = KVCache(layers=1, batch=3, kv_heads=2, capacity=20, head_dim=3, dtype=torch.float32, device="cpu",
                    blocked=blocked)
    assert cache.capacity == 32 and cache.blocked == blocked
    assert torch.count_nonzero(cache.v[0]) == 0 and torch.count_nonzero(cache.k[0]) == 0, "a new cache is zeroed"
    k = torch.arange(3 * 2 * 19 * 3, dtype=torch.float32).view(3, 2, 19, 3)
    cache.write(0, 0, k, -k)
    cache.length = 19
    assert torch.equal(cache.keys(0, 19), k)
    bigger = cache.resized(torch.tensor([2, 0]), 4, 70)
    assert bigger.capacity == 80 and bigger.length == 19 and bigger.blocked == blocked
    assert torch.equal(bigger.keys(0, 19)[:2], k[[2, 0]]) and torch.equal(bigger.v[0][:2, :, :19], -k[[2, 0]])
    assert torch.count_nonzero(bigger.keys(0, 80)[2:]) == 0 and torch.count_nonzero(bigger.v[0][:, :, 19:]) == 0


@pytest.mark.slow
def test_bf16_sample_does_not_depend_on_neighbours(chat_prompts):
    """dtype="bfloat16" on the CPU (bf16 GEMMs, natively where the CPU has AVX512_BF16): a
    sample is still the same bits whatever shares its batch."""
    from thinklab import models
    from thinklab.backends.hf import HFBackend

    backend = HFBackend(ModelSpec(name=models.model_name("default"), backend="hf", dtype="bfloat16"))
    try:
        assert backend.forward.name.endswith("-bf16") and backend.identity["dtype"] == "bfloat16"
        _independent_of_neighbours(backend, chat_prompts)
    finally:
        backend.close()
