"""Quantization: formats really quantize the embedded model, the simulated forms compute
with the format's own values through the baseline's forward, every condition of a study
runs through one forward, refusals come before generating, and the paired analysis
matches hand-computed values.

The model tests use the embedded SmolLM2-135M (real weights) on CPU; they need the
`quant` extra (torchao, optimum-quanto) and are skipped without it.
"""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from thinklab import runner
from thinklab.analysis import quantization as aq
from thinklab.config import ModelSpec, SamplingSpec
from thinklab.models import quantization

MODEL = "smollm2-135m"


# --------------------------------------------------------------------------- names and host checks


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        quantization.check("int3-magic", "cpu")
    for name in ("int8-wo", "int4-wo", "bnb-nf4"):
        assert name in str(err.value)


def test_bitsandbytes_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: bitsandbytes is allowed there")
    for method in ("bnb-8bit:kernel", "bnb-nf4:kernel"):
        with pytest.raises(quantization.QuantizationUnavailable, match=rf"{method}.*CUDA"):
            quantization.check(method, "cpu")


@pytest.mark.parametrize("name", ["int8-dyn", "bnb-8bit", "bnb-nf4"])
def test_formats_without_a_simulated_form_point_to_their_kernel_form(name):
    with pytest.raises(ValueError, match=rf"quantization='{name}' has no simulated form.*'{name}:kernel'"):
        quantization.check(name, "cpu")


def test_names_and_forms():
    assert quantization.parse("int8-wo") == (quantization.METHODS["int8-wo"], False)
    assert quantization.parse("int8-wo:kernel") == (quantization.METHODS["int8-wo"], True)
    assert quantization.is_kernel("int4-wo:kernel") and not quantization.is_kernel("int4-wo")
    assert not quantization.is_kernel(None)
    assert set(quantization.names()) >= {"int8-wo", "int4-wo", "quanto-int8", "quanto-int4", "int8-dyn:kernel",
                                         "bnb-nf4:kernel"}
    assert "int8-dyn" not in quantization.names()


def test_study_refuses_before_generating(monkeypatch):
    """An impossible format among the conditions stops the study before the first run."""
    if torch.cuda.is_available():
        pytest.skip("bitsandbytes can run here")
    from thinklab import runner
    from thinklab.studies import quantization as study

    calls = []
    monkeypatch.setattr(runner, "run", lambda *a, **k: calls.append(a) or pl.DataFrame())
    specs = study.conditions(study.Params(model=MODEL, formats=("int8-wo", "bnb-nf4:kernel"), n_problems=2))
    with pytest.raises(quantization.QuantizationUnavailable, match="bnb-nf4"):
        study.run(specs, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="not a method"):
        study.run(study.conditions(study.Params(model=MODEL, formats=("int2",))), progress=False)
    assert calls == []


# --------------------------------------------------------------------------- the real model

pytest.importorskip("torchao")
pytest.importorskip("optimum.quanto")


@pytest.fixture(scope="module")
def fp32_model():
    from transformers import AutoModelForCausalLM

    from thinklab import models

    path = models.resolve(MODEL).path
    return lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, value_dtype, max_bits, max_ratio",
    [
        # int8 + one fp32 scale (and int8 zero) per output row: just over 8 bits per weight.
        ("int8-wo:kernel", "int8", 8.2, 0.45),
        # 4-bit values in int8 containers + fp32 scale and int8 zero per 32 weights: 9.25 bits.
        ("int4-wo:kernel", "int8", 9.5, 0.47),
        # two 4-bit values per byte + fp32 scale and shift per 128 weights (and padding): 4.625 bits.
        ("quanto-int4:kernel", "uint8", 4.7, 0.35),
    ],
)
def test_linear_weights_stored_in_low_precision(fp32_model, method, value_dtype, max_bits, max_ratio):
    model = fp32_model()
    before = quantization.linear_storage(model)
    assert before["share_low_precision"] == 0 and before["bits_per_block_weight"] == 32
    model, report = quantization.apply(model, method, "cpu")
    # every linear layer of the decoder blocks holds its values in the low-precision type ...
    assert report["share_low_precision_blocks"] == 1.0
    assert report["linear_layers_low_precision"] == report["linear_layers"] - 1  # all but lm_head
    assert report["linear_storage_dtypes"][value_dtype] == report["linear_params_low_precision"]
    # ... as a direct look at one layer confirms
    leaves = list(quantization._leaves(model.model.layers[3].mlp.up_proj.weight))
    assert str(max(leaves, key=lambda t: t.numel()).dtype).removeprefix("torch.") == value_dtype
    assert report["bits_per_block_weight"] <= max_bits
    if method == "int4-wo:kernel":  # 16 levels, not 256
        lo, hi = report["int8_container_value_range"]
        assert -8 <= lo and hi <= 7 and hi - lo >= 14
    # memory of parameters + buffers drops (embeddings and lm_head stay fp32)
    assert report["memory_bytes_after"] <= max_ratio * report["memory_bytes_before"]
    assert report["memory_bytes_after"] == quantization.memory_bytes(model)


def _greedy(spec: ModelSpec, prompts: list[list[int]], n_tokens: int):
    from thinklab.backends.hf import HFBackend

    backend = HFBackend(spec, device="cpu")
    try:
        out = backend.generate(prompts, [0] * len(prompts), SamplingSpec(temperature=0.0), n_tokens, progress=False)
        return [c.token_ids for c in out], backend.info
    finally:
        backend.close()


@pytest.mark.slow
def test_greedy_int8_tracks_fp32_and_int4_runs_in_the_backend():
    """Through the HF backend (torch.inference_mode): int8 greedy output stays close to fp32.

    int8 per-channel rounding moves logits by a small fraction of their spread, so greedy
    decoding departs from fp32 only at a near-tie, after which the continuations differ
    entirely. Measured on SmolLM2 with these four prompts (batched, 24 tokens): two
    identical throughout, two identical for their first 9 tokens. We require every prompt
    to agree on its first 6 tokens and at least two to agree on all 24; a broken int8 path
    (wrong scales, transposed or unquantized-garbage weights) diverges at the first token.
    The 4-bit quanto path must run inside inference_mode and record its report.
    """
    from transformers import AutoTokenizer

    from thinklab import models

    tok = AutoTokenizer.from_pretrained(models.resolve(MODEL).path)
    texts = ["The capital of France is", "Question: what is 17 * 23? Answer step by step.\n",
             "def fibonacci(n):", "Water boils at a temperature of"]
    prompts = [tok(t)["input_ids"] for t in texts]
    n = 24
    ref, info_ref = _greedy(ModelSpec(name=MODEL), prompts, n)
    int8, info_int8 = _greedy(ModelSpec(name=MODEL, quantization="int8-wo"), prompts, n)
    assert "quantization" not in info_ref.extra
    assert info_int8.extra["quantization"]["method"] == "int8-wo"
    prefix = [next((i for i, (a, b) in enumerate(zip(r, q)) if a != b), min(len(r), len(q))) for r, q in zip(ref, int8)]
    assert min(prefix) >= 6, prefix
    assert sum(p >= n for p in prefix) >= 2, prefix

    int4, info_int4 = _greedy(ModelSpec(name=MODEL, quantization="quanto-int4:kernel"), prompts[:1], 8)
    assert len(int4[0]) == 8
    assert info_int4.extra["quantization"]["linear_storage_dtypes"].get("uint8")
    assert info_int4.extra["forward"] == "transformers"


@pytest.mark.slow
@pytest.mark.parametrize("method, levels_per_row", [("int8-wo", 256), ("int4-wo", 16 * 576 // 32), ("quanto-int4", None)])
def test_simulated_weights_are_the_formats_own_values(fp32_model, method, levels_per_row):
    """A simulated format holds, in float32 plain linears, exactly the values its kernel form
    stores (the library's own dequantization), and records the quantized model's memory."""
    kernel_model, kernel_report = quantization.apply(fp32_model(), method + ":kernel", "cpu")
    sim_model, sim_report = quantization.apply(fp32_model(), method, "cpu")
    layer = "model.layers.3.mlp.up_proj"
    sim_w = sim_model.get_submodule(layer).weight
    assert type(sim_model.get_submodule(layer)) is torch.nn.Linear and type(sim_w.data) is torch.Tensor
    assert sim_w.dtype == torch.float32
    assert torch.equal(sim_w, kernel_model.get_submodule(layer).weight.dequantize())
    original = fp32_model().get_submodule(layer).weight
    assert not torch.equal(sim_w, original)
    if levels_per_row is not None:  # a row holds at most 2^bits values per scale group
        assert max(len(torch.unique(row)) for row in sim_w) <= levels_per_row
    assert sim_report["form"] == "simulated" and kernel_report["form"] == "kernel"
    assert sim_report["linear_layers_dequantized"] == sim_report["linear_layers"] - 1  # all but lm_head
    assert sim_report["memory_bytes_after"] == kernel_report["memory_bytes_after"]
    assert sim_report["memory_bytes_running"] == quantization.memory_bytes(sim_model)
    assert quantization.linear_storage(sim_model)["share_low_precision"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("formats", [("int8-wo", "int4-wo"), ("int8-wo:kernel",)])
def test_every_condition_of_a_study_runs_through_one_forward(tmp_path, formats):
    """run.json's forward is the same for the baseline and every format of a study: the
    lean forward for simulated formats on CPU, transformers' modules when a kernel form is in."""
    from thinklab.store import RunStore
    from thinklab.studies import quantization as study

    specs = study.conditions(study.Params(model=MODEL, task="rg:basic_arithmetic", formats=formats, n_problems=2, max_tokens=6))
    df = study.run(specs, progress=False, runs_root=tmp_path)
    assert df["format"].n_unique() == len(formats) + 1
    recorded = {}
    for spec in specs:
        meta = RunStore(runner.run_dir(spec, tmp_path)).read_meta()
        assert meta["backend"]["forward"] == meta["resolved"]["forward"]
        recorded[spec.model.quantization] = meta["resolved"]["forward"]
    assert len(set(recorded.values())) == 1, recorded
    expected = "transformers" if any(quantization.is_kernel(f) for f in formats) else "lean-"
    assert recorded[None].startswith(expected), recorded


# --------------------------------------------------------------------------- analysis, by hand

NAN = math.nan
BASE = {("p0", 0): (True, 10, [1.0, 1.0]), ("p0", 1): (True, 20, [2.0, NAN]), ("p1", 0): (False, 30, [0.5]),
        ("p1", 1): (True, 40, [1.0, 3.0]), ("p2", 0): (False, 50, [2.0]), ("p2", 1): (False, 60, [4.0])}
QUANT = {("p0", 0): (False, 12, [2.0, 2.0]), ("p0", 1): (True, 20, [4.0, NAN]), ("p1", 0): (True, 36, [0.5]),
         ("p1", 1): (True, 40, [1.0, 1.0]), ("p2", 0): (False, 50, [2.0]), ("p2", 1): (False, 66, [NAN, 5.0]),
         ("p3", 0): (True, 5, [0.1])}  # no baseline partner: must be dropped
LEVEL = {"p0": 1, "p1": 1, "p2": None, "p3": 2}


@pytest.fixture()
def table() -> pl.DataFrame:
    rows = []
    for fmt, cells in ((None, BASE), ("int8-wo", QUANT)):
        for (pid, s), (correct, n_tokens, entropy) in cells.items():
            rows.append(dict(problem_id=pid, sample_idx=s, seed=1000 + 10 * int(pid[1]) + s, quantization=fmt,
                             correct=correct, n_tokens=n_tokens, n_thinking_tokens=0, finish_reason="stop",
                             token_entropy=entropy, level=LEVEL[pid], model="m", task="t", temperature=0.0))
    return pl.DataFrame(rows, schema_overrides={"token_entropy": pl.List(pl.Float32), "quantization": pl.Utf8})


def test_paired_deltas_match_hand_computed(table):
    d = aq.deltas(table, by=(), n_boot=500)
    row = {r["metric"]: r for r in d.iter_rows(named=True)}
    assert row["accuracy"]["n_pairs"] == 6 and row["accuracy"]["n_problems"] == 3  # p3 unpaired
    assert row["accuracy"]["baseline"] == pytest.approx(3 / 6)
    assert row["accuracy"]["delta"] == pytest.approx(0.0)
    # lengths: +2, 0, +6, 0, 0, +6 over 6 pairs
    assert row["length"]["delta"] == pytest.approx(14 / 6)
    assert row["length"]["ci_low"] > 0  # every problem's length change is >= 0 and one is > 0
    # nan-aware entropy means: baseline 1, 2, .5, 2, 2, 4; quantized 2, 4, .5, 1, 2, 5
    assert row["entropy"]["baseline"] == pytest.approx(11.5 / 6)
    assert row["entropy"]["delta"] == pytest.approx(3.0 / 6)
    assert row["accuracy"]["right_to_wrong"] == 1 and row["accuracy"]["wrong_to_right"] == 1
    for r in row.values():
        assert r["ci_low"] <= r["delta"] <= r["ci_high"]


def test_per_level_and_flip_matrix(table):
    d = aq.deltas(table, by=(), per_level=True, n_boot=200).filter(pl.col("metric") == "length")
    by_level = {r["level"]: r for r in d.iter_rows(named=True)}
    assert set(by_level) == {1, None}
    assert by_level[1]["delta"] == pytest.approx(8 / 4) and by_level[None]["delta"] == pytest.approx(6 / 2)
    fm = aq.flip_matrix(table, by=())
    cells = {(r["baseline"], r["quantized"]): r["n"] for r in fm.iter_rows(named=True)}
    assert cells == {("right", "right"): 2, ("right", "wrong"): 1, ("wrong", "right"): 1, ("wrong", "wrong"): 2}
    acc = aq.accuracy_by_format(table, by=(), n_boot=200)
    assert acc["format"].to_list() == ["baseline", "int8-wo"]
    assert acc["accuracy"].to_list() == pytest.approx([3 / 6, 4 / 7])


def test_pairing_needs_the_same_seed(table):
    """A quantized sample drawn with another seed is not the baseline's pair."""
    shifted = table.with_columns(
        seed=pl.when(pl.col("quantization").is_not_null() & (pl.col("problem_id") == "p0"))
        .then(pl.col("seed") + 1).otherwise(pl.col("seed"))
    )
    assert aq.paired(shifted, by=()).height == 4
    with pytest.raises(ValueError, match="baseline"):
        aq.deltas(table.filter(pl.col("quantization").is_not_null()), by=())


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_names_checked_against_installed_vllm():
    pytest.importorskip("vllm")
    assert quantization.check_vllm_quantization("fp8", "fp8") == {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    with pytest.raises(ValueError, match="transformers-backend"):
        quantization.check_vllm_quantization("int8-wo")
    with pytest.raises(ValueError, match="not a vLLM method"):
        quantization.check_vllm_quantization("int3-magic")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        quantization.check_vllm_quantization(None, "fp9")
