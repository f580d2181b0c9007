"""Traced generation on the real embedded model: the traces are the model's own numbers."""

from __future__ import annotations

import math

import pytest
import torch

from thinklab.config import SamplingSpec

pytestmark = pytest.mark.slow


def _teacher_forced(model, prompt, generated, temperature, top_p=1.0):
    """Entropy and log-prob of each generated token from one plain forward pass (no padding,
    no cache), with temperature and nucleus masking written out independently here."""
    ids = torch.tensor([list(prompt) + list(generated)])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    x = logits / (temperature if temperature > 0 else 1.0)
    if top_p < 1.0:
        keep = torch.zeros_like(x, dtype=torch.bool)
        for r in range(x.shape[0]):  # slow and obvious on purpose
            probs = torch.softmax(x[r], -1)
            order = torch.argsort(probs, descending=True)
            total = 0.0
            for j in order.tolist():
                keep[r, j] = True
                total += probs[j].item()
                if total >= top_p:
                    break
        x = x.masked_fill(~keep, -math.inf)
    logp = torch.log_softmax(x, -1)
    p = logp.exp()
    ent = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)
    chosen = logp.gather(-1, torch.tensor(generated)[:, None]).squeeze(-1)
    return ent, chosen


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_traced_entropy_and_logprob_equal_teacher_forced(fast_backend, chat_prompts, temperature, top_p):
    sampling = SamplingSpec(temperature=temperature, top_p=top_p)
    outs = fast_backend.generate(chat_prompts, seeds=[11, 12, 13, 14], sampling=sampling, max_new_tokens=32, progress=False)
    assert len({len(p) for p in chat_prompts}) > 1, "prompts must differ in length so the batch is padded"
    worst = 0.0
    for prompt, out in zip(chat_prompts, outs):
        assert len(out.token_ids) == len(out.token_entropy) == len(out.token_logprob) > 0
        ent, lp = _teacher_forced(fast_backend.model, prompt, out.token_ids, temperature, top_p)
        worst = max(worst, (ent - torch.tensor(out.token_entropy, dtype=torch.float64)).abs().max().item())
        worst = max(worst, (lp - torch.tensor(out.token_logprob, dtype=torch.float64)).abs().max().item())
    assert worst < 1e-3, f"max abs difference {worst}"


def test_sampling_is_stochastic_but_seeded(fast_backend, chat_prompts):
    s = SamplingSpec(temperature=1.0)
    a = fast_backend.generate(chat_prompts[:2], seeds=[1, 2], sampling=s, max_new_tokens=16, progress=False)
    b = fast_backend.generate(chat_prompts[:2], seeds=[1, 2], sampling=s, max_new_tokens=16, progress=False)
    c = fast_backend.generate(chat_prompts[:2], seeds=[3, 4], sampling=s, max_new_tokens=16, progress=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_sample_alone_reproduces_its_batched_self(fast_backend, chat_prompts):
    """Per-sample generators: a prompt run alone gives the tokens it got inside a padded batch
    (up to rare float differences from the other batch shape; we require 3 of 4)."""
    s = SamplingSpec(temperature=1.0)
    batched = fast_backend.generate(chat_prompts, seeds=[5, 6, 7, 8], sampling=s, max_new_tokens=24, progress=False)
    same = 0
    for i, prompt in enumerate(chat_prompts):
        alone = fast_backend.generate([prompt], seeds=[5 + i], sampling=s, max_new_tokens=24, progress=False)[0]
        same += alone.token_ids == batched[i].token_ids
    assert same >= 3, f"only {same}/4 samples reproduced alone"


def test_greedy_records_raw_distribution(fast_backend, chat_prompts):
    out = fast_backend.generate(chat_prompts[:1], seeds=[0], sampling=SamplingSpec(temperature=0), max_new_tokens=12, progress=False)[0]
    ent, lp = _teacher_forced(fast_backend.model, chat_prompts[0], out.token_ids, 0)
    assert torch.allclose(ent, torch.tensor(out.token_entropy, dtype=torch.float64), atol=1e-3)
    assert all(v <= 1e-6 for v in out.token_logprob)


def test_stop_string_ends_a_row_and_is_reported(fast_backend, chat_prompts):
    s = SamplingSpec(temperature=0)
    free = fast_backend.generate(chat_prompts[1:2], seeds=[0], sampling=s, max_new_tokens=40, progress=False)[0]
    text = fast_backend.tokenizer.decode(free.token_ids)
    word = text.split()[3]  # a word the greedy continuation certainly produces
    stopped = fast_backend.generate(chat_prompts[1:2], seeds=[0], sampling=s, max_new_tokens=40, stop=[word], progress=False)[0]
    assert stopped.finish_reason == "stop" and stopped.stop_string == word
    assert len(stopped.token_ids) < len(free.token_ids)
    assert word in fast_backend.tokenizer.decode(stopped.token_ids)
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
