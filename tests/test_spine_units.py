"""Specs, model resolution errors, the run store's files and the CLI (no generation)."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from thinklab import models
from thinklab.cli import build_parser, spec_from_args
from thinklab.config import BudgetSpec, ModelSpec, RunSpec, SamplingSpec, sample_seed
from thinklab.generation import call_seed
from thinklab.store import SCHEMA, RunStore, rows_to_frame
from thinklab.tracing import PhaseMarkers, boundary_char, split_text


def test_run_id_is_a_content_hash():
    from thinklab.runner import run_id

    a, b = RunSpec(), RunSpec()
    assert run_id(a) == run_id(b) and len(run_id(a)) == 16
    assert run_id(a.replace(**{"sampling.temperature": 0.5})) != run_id(a)
    assert RunSpec.from_dict(json.loads(json.dumps(a.to_dict()))) == a


@pytest.mark.parametrize("make,needle", [
    (lambda: SamplingSpec(temperature=-1), "temperature=-1"),
    (lambda: SamplingSpec(top_p=0), "top_p=0"),
    (lambda: ModelSpec(backend="onnx"), "'hf', 'vllm'"),
    (lambda: BudgetSpec(thinking_budget=0), "thinking_budget=0"),
    (lambda: RunSpec(n_problems=0), "n_problems=0"),
])
def test_bad_spec_values_are_named(make, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        make()


def test_sample_seeds_are_independent_of_layout():
    assert sample_seed(0, "p1", 0) == sample_seed(0, "p1", 0)
    assert len({sample_seed(0, "p1", i) for i in range(100)}) == 100
    assert sample_seed(0, "p1", 0) != sample_seed(1, "p1", 0)
    assert call_seed(5, 0) != call_seed(5, 1) and call_seed(5, 0) == 5


def test_cli_flags_mirror_spec_fields():
    args = build_parser().parse_args(["generate", "--model", "qwen", "--temperature", "0.6", "--n-samples", "3",
                                      "--thinking-budget", "128", "--top-p", "0.95", "--quantization", "none",
                                      "--task", "gsm8k", "--n-problems", "5", "--seed", "9", "--max-tokens", "300"])
    spec = spec_from_args(args)
    assert spec.model.name == "qwen" and spec.sampling.temperature == 0.6 and spec.sampling.n == 3
    assert spec.budget.thinking_budget == 128 and spec.model.quantization is None
    assert spec.task == "gsm8k" and spec.n_problems == 5 and spec.sampling.seed == 9 and spec.sampling.max_tokens == 300


def test_unknown_model_lists_valid_names():
    with pytest.raises(models.ModelError, match="smollm2-135m"):
        models.resolve("no-such-model")


def test_materialize_builds_only_the_named_models():
    with pytest.raises(models.ModelError) as err:
        models.materialize("no-such-model")
    for valid in (*models.EMBEDDED, *models.OFFLINE):
        assert valid in str(err.value)


def test_partial_model_dir_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("THINKLAB_DATA", str(tmp_path))
    half = tmp_path / "models" / "smollm2-135m"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    with pytest.raises(models.ModelError, match=r"incomplete.*thinklab models --materialize"):
        models.resolve("default", materialize_missing=False)
    with pytest.raises(models.ModelError, match=str(half)):
        models.materialize("default")  # never mistaken for a finished conversion


def test_truncated_weights_are_detected(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 100)
    (d / models.MANIFEST).write_text(json.dumps({"files": {"model.safetensors": 200}}))
    with pytest.raises(models.ModelError, match="100 bytes, expected 200"):
        models.check_materialized(d)


def test_phase_split_for_instruction_and_reasoning_models():
    plain = PhaseMarkers(None, None, ("\\boxed{", "Final answer:"))
    text = "2 and 3 make 5. Final answer: \\boxed{5}"
    think, answer = split_text(text, plain)
    assert answer == "Final answer: \\boxed{5}" and think + answer == text
    assert boundary_char("no marker here", plain) == len("no marker here")
    tags = PhaseMarkers("<think>", "</think>", ("\\boxed{",))
    think, answer = split_text("<think>hmm, 5</think>The answer is \\boxed{5}", tags)
    assert think == "hmm, 5" and answer == "The answer is \\boxed{5}"


def _row(i: int, **kw) -> dict:
    base = {k: None for k in SCHEMA}
    base.update(run_id="r", problem_id=f"p{i}", sample_idx=0, task="t", model="m", backend="hf", temperature=1.0,
                top_p=1.0, seed=i, wait_extensions=0, prompt="q", text="a", thinking="", answer_text="a", n_tokens=1,
                n_thinking_tokens=0, n_answer_tokens=1, finish_reason="stop", token_entropy=[math.nan],
                token_logprob=[-0.1], token_ids=[7], pred="a", gold="a", correct=True)
    base.update(kw)
    return base


def test_store_parts_are_atomic_and_resumable(tmp_path):
    store = RunStore(tmp_path / "run")
    store.write_meta({"spec": {}})
    store.write_part(0, rows_to_frame([_row(0)]))
    (store.dir / ".part-00001.parquet.tmp-123").write_bytes(b"half a file")  # a killed writer's leftover
    assert store.done_chunks() == {0}
    store.write_part(1, rows_to_frame([_row(1)]))
    df = store.load()
    assert df["problem_id"].to_list() == ["p0", "p1"]
    assert df.schema["token_entropy"] == pl.List(pl.Float32)
    with pytest.raises(ValueError, match="outside the sample-table schema"):
        rows_to_frame([{**_row(2), "surprise": 1}])


def test_regrade_rewrites_parts_in_place(tmp_path):
    store = RunStore(tmp_path / "run")
    store.write_meta({"spec": {}})
    store.write_part(0, rows_to_frame([_row(0, text="so \\boxed{4}", gold="4", pred="x", correct=False)]))
    from thinklab.cli import main

    assert main(["regrade", str(store.dir)]) == 0
    df = store.load()
    assert df["correct"].to_list() == [True] and df["pred"].to_list() == ["4"]
    assert store.read_meta()["grader_version"]


def test_progress_rate_counts_from_the_first_tokens_on():
    """A sample whose tokens all arrive in one report must not show a rate over ~0 seconds."""
    from thinklab.progress import StudyProgress

    bars = StudyProgress({"r": ("run r", 10, 256)}, enabled=False)
    c = bars.counts["r"]
    assert c.postfix(0.0) == "waiting for the first tokens"
    bars.tokens("r", 256)  # the first report: a whole sample at once
    assert c.postfix(c.first + 0.5) == "256 tok, measuring tok/s"
    bars.tokens("r", 400)
    bars.sample_done("r", 256)
    bars.sample_done("r", 256)
    assert c.postfix(c.first + 2.0).startswith("656 tok, 200 tok/s, ETA ~")  # 400 / 2 s, not 656 / 2 s
    bars.close()
