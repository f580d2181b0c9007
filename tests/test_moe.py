"""MoE top-k and router tracing on the real offline MoE (MoEfied SmolLM2-135M, built once)."""

from __future__ import annotations

import math

import pytest
import torch

from thinklab import models
from thinklab.config import ModelSpec, RunSpec, SamplingSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moe_backend():
    from thinklab.backends.hf import HFBackend

    # built directly, not through runner.get_backend, so the session's dense backend stays loaded
    backend = HFBackend(ModelSpec(name=models.model_name(models.DEFAULT_OFFLINE), backend="hf"))
    yield backend
    backend.close()


def _padded(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), 2, dtype=torch.long)
    att = torch.zeros((len(prompts), T), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = torch.tensor(p)
        att[r, T - len(p):] = 1
    return dict(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp_min(0))


@torch.inference_mode()
def _logits(model, batch):
    return model(**batch).logits


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_offline_moe_is_a_moe_with_its_default_top_k(moe_backend):
    spec = models.OFFLINE[models.DEFAULT_OFFLINE]
    assert models.is_moe(moe_backend.model)
    assert models.num_experts(moe_backend.model) == spec.num_experts
    assert models.get_top_k(moe_backend.model) == spec.top_k
    assert len(models.find_routers(moe_backend.model)) == moe_backend.model.config.num_hidden_layers


def test_k_equal_to_num_experts_reproduces_the_dense_model(moe_backend, fast_backend, chat_prompts):
    batch = _padded(chat_prompts)
    dense = _logits(fast_backend.model, batch)
    with models.top_k_override(moe_backend.model, models.num_experts(moe_backend.model)):
        full = _logits(moe_backend.model, batch)
    mask = batch["attention_mask"].bool()
    # Float rounding only (~1e-6 relative): the two models are separate copies of the weights.
    assert (full[mask] - dense[mask]).abs().max().item() < 1e-5 * dense[mask].abs().max().item()
    # and fewer experts really change the model
    with models.top_k_override(moe_backend.model, 4):
        sparse = _logits(moe_backend.model, batch)
    assert (sparse[mask] - dense[mask]).abs().max().item() > 1.0


@pytest.mark.parametrize("k", [4, 16])
def test_lean_forward_routes_as_the_offline_moe_does(moe_backend, k):
    """The offline MoE decodes on the lean forward (the row scheduler), whose FFN keeps each
    position's top-k neuron groups as MoefiedMLP does: logits as transformers' to rounding."""
    from test_lean import _compare_with_transformers

    assert moe_backend.forward.layout == "rows" and moe_backend.forward.name.startswith("lean")
    with models.top_k_override(moe_backend.model, k):
        worst, scale = _compare_with_transformers(moe_backend.model, [7, 19, 3, 19],
                                                  native=moe_backend.forward.decoder.native_attention)
    assert worst < 1e-3 * scale, f"k={k}: max |lean - transformers| = {worst} (logits up to {scale})"


@pytest.mark.parametrize("k", [1, 5, 16])
def test_traced_generation_uses_exactly_k_experts_and_leaves_the_model_as_found(moe_backend, chat_prompts, k):
    model = moe_backend.model
    batch = _padded(chat_prompts)
    before = _logits(model, batch)
    hooks_before, top_k_before = _hooks(model), models.get_top_k(model)
    n_new = 12
    # transformers' own generate (the backend decodes on the lean forward, which does not call
    # the model's forward; runs take their routing from routing_stats' teacher-forced pass)
    torch.manual_seed(k)
    with models.top_k_override(model, k), models.RouterTrace(model) as trace, torch.inference_mode():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n_new,
                             pad_token_id=moe_backend.pad_id)
    n_layers = model.config.num_hidden_layers
    E = models.num_experts(model)
    # one record per forward pass: the prefill, then one per further token
    assert len(trace.records) == out.shape[1] - batch["input_ids"].shape[1]
    assert trace.records[0].shape == (len(chat_prompts), batch["input_ids"].shape[1])
    n_tokens = 0
    for rec in trace.records:
        B, T = rec.shape
        assert rec.experts.shape == (n_layers, B, T, k)
        assert rec.entropy.shape == (n_layers, B, T)
        chosen = rec.experts.long()
        assert chosen.min() >= 0 and chosen.max() < E
        distinct = torch.zeros((n_layers, B, T, E), dtype=torch.long).scatter_(-1, chosen, 1).sum(-1)
        assert (distinct == k).all(), "some token was routed to a number of distinct experts other than k"
        assert ((rec.entropy >= -1e-5) & (rec.entropy <= math.log(E) + 1e-5)).all()
        n_tokens += B * T
    assert n_tokens > len(chat_prompts) * n_new
    # the model is exactly as found: same outputs, no hooks left, its own top-k back
    after = _logits(model, batch)
    assert torch.equal(before, after)
    assert _hooks(model) == hooks_before
    assert models.get_top_k(model) == top_k_before


def test_hooks_are_removed_after_an_exception(moe_backend, chat_prompts):
    model = moe_backend.model
    hooks_before = _hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with models.RouterTrace(model):
            _logits(model, _padded(chat_prompts[:1]))
            raise RuntimeError("boom")
    assert _hooks(model) == hooks_before


def test_bad_k_and_dense_models_are_refused(moe_backend, fast_backend):
    for bad in (0, 17, -1, 2.0):
        with pytest.raises(models.MoEError, match=r"moe_top_k=.*1\.\.16"):
            models.set_top_k(moe_backend.model, bad)
    assert models.get_top_k(moe_backend.model) == models.OFFLINE[models.DEFAULT_OFFLINE].top_k  # untouched
    with pytest.raises(models.MoEError, match="no mixture-of-experts router"):
        models.set_top_k(fast_backend.model, 2)
    with pytest.raises(models.MoEError, match="no mixture-of-experts router"):
        models.RouterTrace(fast_backend.model)
    with pytest.raises(ValueError, match="moe_top_k=0"):
        ModelSpec(moe_top_k=0)


def test_runner_with_moe_top_k_and_routing_columns(moe_backend, tmp_path):
    """A RunSpec with moe_top_k through the normal runner; routing columns count k experts per sampled token."""
    from thinklab import runner

    k = 6
    spec = RunSpec(model=ModelSpec(name=models.model_name(models.DEFAULT_OFFLINE), moe_top_k=k), task="rg:basic_arithmetic",
                   n_problems=2, sampling=SamplingSpec(temperature=0.0, max_tokens=16))
    previous = models.set_top_k(moe_backend.model, k)  # what HFBackend.__init__ does for spec.model.moe_top_k
    try:
        df = runner.run(spec, runs_root=tmp_path, backend=moe_backend, progress=False)
        routing = df  # the runner stores the routing columns of MoE runs
    finally:
        models.restore_top_k(moe_backend.model, previous)
    assert df["moe_top_k"].to_list() == [k, k]
    n_layers, E = moe_backend.model.config.num_hidden_layers, models.num_experts(moe_backend.model)
    for load, n_tok in zip(routing["expert_load"].to_list(), df["n_tokens"].to_list()):
        assert len(load) == n_layers and all(len(row) == E for row in load)
        assert all(sum(row) == k * n_tok for row in load)
    ent = routing["router_entropy_thinking"].drop_nulls().to_list() + routing["router_entropy_answer"].drop_nulls().to_list()
    assert ent and all(0 <= e <= math.log(E) + 1e-5 for e in ent)


def test_routing_stats_skip_forced_tokens_and_split_phases(moe_backend, chat_prompts):
    model = moe_backend.model
    k = models.get_top_k(model)
    gen = [[28, 29, 30, 31, 32, 33], [40, 41, 42]]
    ent = [[0.1, math.nan, math.nan, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7]]
    stats = models.routing_stats(model, chat_prompts[:2], gen, n_thinking_tokens=[3, 0], token_entropy=ent, pad_id=2)
    assert [sum(stats[i]["expert_load"][0]) for i in range(2)] == [k * 4, k * 3]  # NaN = forced, not counted
    assert not math.isnan(stats[0]["router_entropy_thinking"]) and not math.isnan(stats[0]["router_entropy_answer"])
    assert math.isnan(stats[1]["router_entropy_thinking"])  # empty thinking phase
