"""Run ids cover what changes the rows; a resume under another setup refuses; a bad model,
quantization or token cap is refused before a run directory exists.

| bad input (thinklab generate ...) | message (one line, exit code 2, no run directory) |
|---|---|
| `--model org/name` (hub offline) | model 'org/name' is not available: not an embedded model (...), not a local directory, and as a Hugging Face hub id it cannot be loaded: the hub is off (HF_HUB_OFFLINE=1) and it is not in the local cache |
| `--quantization int3-magic` | quantization='int3-magic' is not a method of the transformers backend; choose one of int8-wo, int4-wo, ... |
| `--max-tokens 1000000000` | max_tokens=1000000000 is more than the context length of smollm2-135m (8192 tokens, from its config); use at most 8192 minus the prompt's length |
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from thinklab import runner, tasks
from thinklab.cli import build_parser, spec_from_args
from thinklab.config import ModelSpec, RunSpec, SamplingSpec

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def _write_jsonl(path: Path, golds: list[str]) -> None:
    path.write_text("".join(json.dumps({"question": f"What is {i} + {g}?", "answer": g}) + "\n"
                            for i, g in enumerate(golds)))


# --------------------------------------------------------------------------- ids, no model


def test_editing_a_jsonl_file_gives_a_new_run_id(tmp_path):
    f = tmp_path / "mine.jsonl"
    _write_jsonl(f, ["1", "2", "3"])
    spec = RunSpec(task=f"jsonl:{f}", n_problems=2)
    first = runner.run_id(spec)
    assert runner.run_id(spec) == first
    chosen = {p.problem_id for p in tasks.load_task(spec.task, 2, 0)}
    index = next(i for i in range(3) if f"mine/{i}" in chosen)
    golds = ["1", "2", "3"]
    golds[index] = "99"
    _write_jsonl(f, golds)  # same size, written at once: only the content says it changed
    assert runner.run_id(spec) != first
    assert "99" in [p.gold for p in tasks.load_task(spec.task, 2, 0)]
    _write_jsonl(f, ["1", "2", "3"])
    assert runner.run_id(spec) == first
    # a line outside the chosen subset is not part of the run's data
    other = next(i for i in range(3) if f"mine/{i}" not in chosen)
    golds = ["1", "2", "3"]
    golds[other] = "77"
    _write_jsonl(f, golds)
    assert runner.run_id(spec) == first


def test_benchmark_file_content_is_in_the_id(tmp_path):
    source = BENCHMARKS / "gsm8k_test.jsonl"
    if not source.is_file():
        pytest.skip(f"{source} not present")
    copy = tmp_path / "gsm8k_test.jsonl"
    shutil.copy(source, copy)
    spec = RunSpec(task=f"gsm8k:path={copy}", n_problems=3)
    before = runner.run_id(spec)
    first = tasks.load_task(spec.task, 3, 0)[0]
    lines = copy.read_text().splitlines(keepends=True)
    line = int(first.problem_id.split("/")[1]) if first.problem_id.split("/")[1].isdigit() else 0
    record = json.loads(lines[line])
    assert record["question"] == first.question
    record["answer"] = record["answer"].rsplit("####", 1)[0] + "#### 123456"
    lines[line] = json.dumps(record) + "\n"
    copy.write_text("".join(lines))
    assert runner.run_id(spec) != before
    assert tasks.load_task(spec.task, 3, 0)[0].gold == "123456"


def test_procedural_tasks_are_named_by_reasoning_gym_version():
    import importlib.metadata

    ident = runner.identity(RunSpec(task="rg:basic_arithmetic", n_problems=2))
    assert ident["task_data"] == {"kind": "procedural", "reasoning_gym": importlib.metadata.version("reasoning-gym")}


def test_aliases_and_task_spellings_share_one_run_id():
    base = RunSpec(model=ModelSpec(name="smollm2-135m"), task="gsm8k", n_problems=2)
    ids = {runner.run_id(base.replace(**{"model.name": name})) for name in ("default", "fast", "smollm2-135m")}
    assert ids == {runner.run_id(base)}
    assert runner.run_id(base.replace(task="GSM8K")) == runner.run_id(base)
    assert runner.run_id(base.replace(**{"model.name": "qwen"})) != runner.run_id(base)
    assert runner.canonical_spec(base.replace(**{"model.name": "default"})).model.name == "smollm2-135m"


@pytest.mark.parametrize("backend, field, value", [
    ("hf", "forward", "lean"), ("hf", "forward", "transformers"), ("hf", "dtype", "float32"),
    ("hf", "quantization", "int8-wo"), ("hf", "quantization", "int8-wo:kernel"),
    ("vllm", "entropy_top_k", 20), ("vllm", "entropy_top_k", 5),
    ("vllm", "entropy_estimator", "uniform"), ("vllm", "enforce_eager", False),
])
def test_every_option_that_changes_numbers_is_in_the_id(backend, field, value):
    base = RunSpec(model=ModelSpec(backend=backend), task="rg:basic_arithmetic", n_problems=2)
    assert runner.run_id(base.replace(**{f"model.{field}": value})) != runner.run_id(base)


def test_exact_vllm_entropy_by_default_without_moving_other_backends_ids():
    """vLLM's default is exact entropy (None); the other backends keep the 20 they always had,
    so a transformers run made before exact vLLM entropy keeps its id."""
    assert ModelSpec(backend="vllm").entropy_top_k is None
    assert ModelSpec().entropy_top_k == ModelSpec(backend="openai").entropy_top_k == 20
    assert ModelSpec(entropy_top_k=None) == ModelSpec(entropy_top_k=20)
    assert RunSpec(task="gsm8k").to_dict()["model"]["entropy_top_k"] == 20


def test_new_fields_are_cli_flags():
    args = build_parser().parse_args(["generate", "--forward", "transformers", "--dtype", "float32",
                                      "--entropy-top-k", "5", "--entropy-estimator", "uniform",
                                      "--enforce-eager", "true", "--quantization", "int4-wo:kernel"])
    m = spec_from_args(args).model
    assert (m.forward, m.dtype, m.entropy_top_k, m.entropy_estimator, m.enforce_eager, m.quantization) == (
        "transformers", "float32", 5, "uniform", True, "int4-wo:kernel")
    vllm = spec_from_args(build_parser().parse_args(["generate", "--backend", "vllm", "--entropy-top-k", "none"])).model
    assert vllm.entropy_top_k is None


@pytest.mark.parametrize("make, needle", [
    (lambda: ModelSpec(forward="fast"), "ModelSpec.forward='fast' is not valid: choose one of 'auto', 'lean', 'transformers'"),
    (lambda: ModelSpec(backend="vllm", forward="lean"), "ModelSpec.forward='lean' is not valid: vLLM runs its own forward"),
    (lambda: ModelSpec(entropy_top_k=0), "entropy_top_k=0"),
    (lambda: ModelSpec(entropy_estimator="mean"), "'lower', 'uniform'"),
])
def test_bad_new_fields_are_named(make, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        make()


def test_resume_check_names_each_difference(tmp_path):
    stored = {"model": "smollm2-135m", "fingerprint": "aaaa", "dtype": "float32", "forward": "lean-native"}
    runner.check_resume(stored, dict(stored), tmp_path)  # the same setup resumes
    runner.check_resume(None, dict(stored), tmp_path)  # a new run has nothing stored yet
    loaded = dict(stored, fingerprint="bbbb", forward="transformers")
    with pytest.raises(runner.RunMismatch) as err:
        runner.check_resume(stored, loaded, tmp_path)
    msg = str(err.value)
    assert "fingerprint: stored 'aaaa', loaded now 'bbbb'" in msg
    assert "forward: stored 'lean-native', loaded now 'transformers'" in msg
    assert "dtype" not in msg and str(tmp_path) in msg
    # a run begun on an AVX2 host before the AVX2 token choice: the error says how to resume it
    begun = dict(stored, forward="lean-onednn-native-attention")
    with pytest.raises(runner.RunMismatch, match="THINKLAB_NATIVE_SAMPLING=0"):
        runner.check_resume(begun, dict(stored, forward="lean-onednn-native-attention-sampling"), tmp_path)


# --------------------------------------------------------------------------- bad input through the CLI


@pytest.mark.parametrize("flag, value, names", [
    ("--model", "org/name", ["'org/name'", "HF_HUB_OFFLINE"]),
    ("--quantization", "int3-magic", ["'int3-magic'", "int8-wo", "int4-wo:kernel"]),
    ("--max-tokens", "1000000000", ["max_tokens=1000000000", "8192"]),
])
def test_bad_input_leaves_no_run_directory(tmp_path, flag, value, names):
    root = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "thinklab.cli", "generate", "--runs-root", str(root), "--task", "rg:basic_arithmetic",
           "--n-problems", "2", "--quiet", flag, value]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("thinklab: error:")]
    assert len(errors) == 1, out.stderr
    for name in names:
        assert name in errors[0], errors[0]
    assert not root.exists() or not any(root.iterdir())


# --------------------------------------------------------------------------- with the real model


class _NoBackend:
    def __getattr__(self, name):
        raise AssertionError("a stored run must not touch the model")


def _tiny(task: str, name: str = "default", **model) -> RunSpec:
    return RunSpec(model=ModelSpec(name=name, **model), task=task, n_problems=2,
                   sampling=SamplingSpec(temperature=0.0, max_tokens=4))


@pytest.mark.slow
def test_an_alias_and_its_model_are_one_run(fast_backend, tmp_path):
    first = runner.run(_tiny("rg:basic_arithmetic", "default"), runs_root=tmp_path, backend=fast_backend, progress=False)
    again = runner.run(_tiny("rg:basic_arithmetic", "smollm2-135m"), runs_root=tmp_path, backend=_NoBackend(),
                       progress=False)
    assert first.equals(again)
    assert set(first["model"]) == {"smollm2-135m"}
    assert [d.name for d in tmp_path.iterdir()] == [first["run_id"][0]]
    meta = json.loads((tmp_path / first["run_id"][0] / "run.json").read_text())
    assert meta["resolved"] == fast_backend.identity
    assert set(meta["resolved"]) == {"model", "fingerprint", "dtype", "forward", "decode_layout"}
    assert meta["resolved"]["dtype"] == "float32" and meta["resolved"]["forward"].startswith("lean-")


@pytest.mark.slow
def test_an_edited_jsonl_file_is_a_new_run_with_the_new_golds(fast_backend, tmp_path):
    f = tmp_path / "mine.jsonl"
    _write_jsonl(f, ["5", "6"])
    runs = tmp_path / "runs"
    old = runner.run(_tiny(f"jsonl:{f}"), runs_root=runs, backend=fast_backend, progress=False)
    _write_jsonl(f, ["50", "60"])
    new = runner.run(_tiny(f"jsonl:{f}"), runs_root=runs, backend=fast_backend, progress=False)
    assert sorted(old["gold"]) == ["5", "6"] and sorted(new["gold"]) == ["50", "60"]
    assert old["run_id"][0] != new["run_id"][0] and len(list(runs.iterdir())) == 2


@pytest.mark.slow
def test_resuming_under_another_forward_dtype_or_weights_refuses(fast_backend, tmp_path):
    spec = _tiny("rg:basic_arithmetic")
    full = runner.run(spec, runs_root=tmp_path, backend=fast_backend, chunk_problems=1, progress=False)
    store = runner.run_dir(spec, tmp_path)
    (store / "part-00001.parquet").unlink()  # as if killed before its second chunk
    meta_path = store / "run.json"
    meta = json.loads(meta_path.read_text())
    honest = dict(meta)
    meta["resolved"] = dict(meta["resolved"], forward="transformers", dtype="bfloat16", fingerprint="0123456789abcdef")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(runner.RunMismatch) as err:
        runner.run(spec, runs_root=tmp_path, backend=fast_backend, progress=False)
    msg = str(err.value)
    for key, value in (("forward", "transformers"), ("dtype", "bfloat16"), ("fingerprint", "0123456789abcdef")):
        assert f"{key}: stored {value!r}, loaded now {fast_backend.identity[key]!r}" in msg
    assert "model:" not in msg
    assert not (store / "part-00001.parquet").exists()
    meta_path.write_text(json.dumps(honest))  # the setup it was generated under: resumes
    assert runner.run(spec, runs_root=tmp_path, backend=fast_backend, progress=False).equals(full)
