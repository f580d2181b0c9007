"""Bad input: one clear error that names the bad value and what is valid, and nothing left behind.

One row per case: the input and a fragment of the message it must give. Spec rows build
the spec in process; every other row runs `python -m thinklab.cli` in a subprocess and
also checks that it exits non-zero with exactly one line on stderr (no traceback), and
that it wrote nothing: no run directory under THINKLAB_DATA, no sweep out folder, no
change to a damaged run it refused.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nbformat
import pytest

from thinklab.config import BudgetSpec, ModelSpec, PromptSpec, RunSpec, SamplingSpec, SpecError
from thinklab.store import SCHEMA, RunStore, rows_to_frame

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what a user typed or wrote, as shown in the table
    expect: str  # a fragment of the one message; {tmp} stands for the test's folder
    build: Callable[[], object] | None = None  # spec rows: raises SpecError
    argv: tuple[str, ...] = ()  # CLI rows: arguments after `thinklab`
    files: dict[str, bytes] = field(default_factory=dict)  # written under tmp before the CLI runs
    damage: str | None = None  # run-store rows: how the stored run is damaged before `thinklab regrade`


NOTEBOOK_PARAMETERS = '''max_tokens = 160  # cap on generated tokens
budgets = [16, 48, None]  # thinking budgets; None means uncapped
temperature = 0.8  # sampling temperature
'''

SWEEP_DUP_TOP = b"""notebook: nb.ipynb
sets:
  - name: one
    max_tokens: 8
sets:
  - name: two
"""
SWEEP_DUP_SET = b"""notebook: nb.ipynb
sets:
  - name: one
    max_tokens: 8
    max_tokens: 16
"""
SWEEP_SYNTAX = b"""notebook: nb.ipynb
sets:
  - name: one
    budgets: [8, 16
"""

TABLE = [
    # ---- specs (notebooks and the library build these)
    Case("spec-temperature-str", 'SamplingSpec(temperature="0.7")',
         "SamplingSpec.temperature='0.7' is not valid: expected a finite float, got str (write the number without quotes: 0.7)",
         build=lambda: SamplingSpec(temperature="0.7")),
    Case("spec-n_problems-str", 'RunSpec(n_problems="2")',
         "RunSpec.n_problems='2' is not valid: expected an int, got str", build=lambda: RunSpec(n_problems="2")),
    Case("spec-max_tokens-float", "SamplingSpec(max_tokens=8.5)",
         "SamplingSpec.max_tokens=8.5 is not valid: expected an int, got float", build=lambda: SamplingSpec(max_tokens=8.5)),
    Case("spec-bool-for-int", "RunSpec(n_problems=True)",
         "RunSpec.n_problems=True is not valid: expected an int, got bool", build=lambda: RunSpec(n_problems=True)),
    Case("spec-temperature-nan", "SamplingSpec(temperature=math.nan)",
         "SamplingSpec.temperature=nan is not valid: expected a finite float; NaN and infinity are never valid",
         build=lambda: SamplingSpec(temperature=math.nan)),
    Case("spec-top_p-inf", "SamplingSpec(top_p=math.inf)", "SamplingSpec.top_p=inf is not valid",
         build=lambda: SamplingSpec(top_p=math.inf)),
    Case("spec-thinking_budget-float", "BudgetSpec(thinking_budget=16.0)",
         "BudgetSpec.thinking_budget=16.0 is not valid: expected an int or None, got float",
         build=lambda: BudgetSpec(thinking_budget=16.0)),
    Case("spec-bool-field-str", 'ModelSpec(trust_remote_code="yes")',
         "ModelSpec.trust_remote_code='yes' is not valid: expected a bool, got str",
         build=lambda: ModelSpec(trust_remote_code="yes")),
    Case("spec-tuple-field-str", 'BudgetSpec(answer_markers="Answer:")',
         "BudgetSpec.answer_markers='Answer:' is not valid: expected a tuple of str, got str",
         build=lambda: BudgetSpec(answer_markers="Answer:")),
    Case("spec-few_shot-negative", "PromptSpec(few_shot=-1)", "PromptSpec.few_shot=-1 is not valid: use 0 or more",
         build=lambda: PromptSpec(few_shot=-1)),
    Case("spec-unknown-field", 'RunSpec.from_dict({"sampling": {"temp": 0.7}})',
         "SamplingSpec.temp=0.7 is not valid: no such field; its fields are temperature, top_p",
         build=lambda: RunSpec.from_dict({"sampling": {"temp": 0.7}})),
    Case("spec-replace-unknown", 'RunSpec().replace(**{"sampling.temp": 0.7})',
         "SamplingSpec.temp=0.7 is not valid: no such field", build=lambda: RunSpec().replace(**{"sampling.temp": 0.7})),
    # ---- thinklab generate flags
    Case("cli-temperature-nan", "thinklab generate --temperature nan",
         "--temperature nan: SamplingSpec.temperature=nan is not valid: expected a finite float; NaN and infinity are never valid",
         argv=("generate", "--temperature", "nan")),
    Case("cli-temperature-inf", "thinklab generate --temperature inf",
         "--temperature inf: SamplingSpec.temperature=inf is not valid", argv=("generate", "--temperature", "inf")),
    Case("cli-temperature-negative", "thinklab generate --temperature -1",
         "SamplingSpec.temperature=-1.0 is not valid: use 0 (greedy) or a positive float",
         argv=("generate", "--temperature=-1")),
    Case("cli-max-tokens-float", "thinklab generate --max-tokens 8.5",
         "argument --max-tokens: '8.5' is not an int", argv=("generate", "--max-tokens", "8.5")),
    Case("cli-top-p-zero", "thinklab generate --top-p 0", "SamplingSpec.top_p=0.0 is not valid: use a float in (0, 1]",
         argv=("generate", "--top-p", "0")),
    Case("cli-n-samples-zero", "thinklab generate --n-samples 0", "SamplingSpec.n=0 is not valid: use at least 1 sample",
         argv=("generate", "--n-samples", "0")),
    Case("cli-backend", "thinklab generate --backend onnx", "ModelSpec.backend='onnx' is not valid: choose one of 'hf', 'vllm'",
         argv=("generate", "--backend", "onnx")),
    Case("cli-bool-flag", "thinklab generate --lenient-truncated maybe",
         "argument --lenient-truncated: 'maybe' is not a boolean (true/false)", argv=("generate", "--lenient-truncated", "maybe")),
    Case("cli-switch-value", "thinklab generate --trust-remote-code true",
         "unrecognized arguments: true", argv=("generate", "--trust-remote-code", "true")),
    Case("cli-chunk-problems", "thinklab generate --chunk-problems 0", "argument --chunk-problems: '0' is not a positive int",
         argv=("generate", "--chunk-problems", "0")),
    # ---- task names and task files
    Case("task-option-without-value", "thinklab generate --task math500:level",
         "task 'math500:level': option 'level' needs a value: write math500:level=1..5 (or a list like 4,5)",
         argv=("generate", "--task", "math500:level")),
    Case("task-option-empty", "thinklab generate --task math500:level=",
         "task 'math500:level=': option 'level' has no value", argv=("generate", "--task", "math500:level=")),
    Case("task-not-an-option", "thinklab generate --task gsm8k:hard",
         "task 'gsm8k:hard': 'hard' is not an option of gsm8k; options are key=value segments: path=FILE.jsonl",
         argv=("generate", "--task", "gsm8k:hard")),
    Case("task-rg-option-without-value", "thinklab generate --task rg:chain_sum:difficulty",
         "option 'difficulty' needs a value: write rg:chain_sum:difficulty=D", argv=("generate", "--task", "rg:chain_sum:difficulty")),
    Case("jsonl-answer-null", 'a .jsonl line {"question": "2+2?", "answer": null}',
         "{tmp}/golds.jsonl:2: field 'answer' is null; every line needs its gold answer there as a string or number",
         argv=("generate", "--task", "{tmp}/golds.jsonl", "--n-problems", "2"),
         files={"golds.jsonl": b'{"question": "1+1?", "answer": 2}\n{"question": "2+2?", "answer": null}\n'}),
    Case("jsonl-answer-empty", 'a .jsonl line {"question": "2+2?", "answer": ""}',
         "{tmp}/golds.jsonl:1: field 'answer' is \"\"", argv=("generate", "--task", "{tmp}/golds.jsonl", "--n-problems", "1"),
         files={"golds.jsonl": b'{"question": "2+2?", "answer": ""}\n'}),
    Case("jsonl-answer-missing", 'a .jsonl line {"question": "2+2?"}',
         "{tmp}/golds.jsonl:1: missing field 'answer' (fields: question)",
         argv=("generate", "--task", "{tmp}/golds.jsonl", "--n-problems", "1"), files={"golds.jsonl": b'{"question": "2+2?"}\n'}),
    Case("jsonl-not-utf8", "a .jsonl file with a Latin-1 byte on line 2",
         "{tmp}/golds.jsonl:2: not valid UTF-8 (byte 0xe9 at column 18); save the file as UTF-8",
         argv=("generate", "--task", "{tmp}/golds.jsonl", "--n-problems", "1"),
         files={"golds.jsonl": b'{"question": "1+1?", "answer": 2}\n{"question": "caf\xe9?", "answer": 1}\n'}),
    Case("jsonl-not-json", "a .jsonl line that is not JSON", "{tmp}/golds.jsonl:1: not valid JSON",
         argv=("generate", "--task", "{tmp}/golds.jsonl", "--n-problems", "1"), files={"golds.jsonl": b'{"question": 1+1}\n'}),
    # ---- stored runs (`thinklab regrade` reads them through the run store, as analysis does)
    Case("run-part-truncated", "a part file cut short", "{tmp}/run/part-00001.parquet is damaged (",
         argv=("regrade", "{tmp}/run"), damage="truncate-part"),
    Case("run-part-emptied", "a part file emptied",
         "{tmp}/run/part-00001.parquet is empty (a write that never finished); delete {tmp}/run/part-00001.parquet and "
         "run the same spec again to regenerate that chunk", argv=("regrade", "{tmp}/run"), damage="empty-part"),
    Case("run-part-foreign", "a part copied in from another run",
         "{tmp}/run/part-00001.parquet holds rows of run 0123456789abcdef, not of this run (run0000000000001): "
         "it was copied in from another run", argv=("regrade", "{tmp}/run"), damage="foreign-part"),
    Case("run-part-schema", "a parquet file of another schema named as a part",
         "{tmp}/run/part-00001.parquet does not have the sample-table schema (missing columns",
         argv=("regrade", "{tmp}/run"), damage="schema-part"),
    Case("run-json-damaged", "run.json cut short", "{tmp}/run/run.json is damaged (",
         argv=("regrade", "{tmp}/run"), damage="truncate-meta"),
    Case("run-json-empty", "run.json emptied",
         "{tmp}/run/run.json is empty; remove the run directory {tmp}/run and run the same spec again",
         argv=("regrade", "{tmp}/run"), damage="empty-meta"),
    Case("run-missing", "thinklab regrade on a folder that is not a run", "{tmp}/nowhere is not a run directory (no run.json)",
         argv=("regrade", "{tmp}/nowhere")),
    # ---- sweep files (`thinklab batch`)
    Case("sweep-duplicate-top-key", "a sweep file with `sets:` twice",
         "sweep {tmp}/sweep.yaml:5:1: duplicate key 'sets' (first given on line 2); give each key once",
         argv=("batch", "{tmp}/sweep.yaml"), files={"sweep.yaml": SWEEP_DUP_TOP}),
    Case("sweep-duplicate-set-key", "a set with `max_tokens:` twice",
         "sweep {tmp}/sweep.yaml:5:5: duplicate key 'max_tokens' (first given on line 4)",
         argv=("batch", "{tmp}/sweep.yaml"), files={"sweep.yaml": SWEEP_DUP_SET}),
    Case("sweep-yaml-syntax", "a sweep file with an unclosed [", "sweep {tmp}/sweep.yaml:5:1: while parsing a flow sequence",
         argv=("batch", "{tmp}/sweep.yaml"), files={"sweep.yaml": SWEEP_SYNTAX}),
    Case("sweep-unknown-parameter", "a set with max_token: 8 (typo)",
         "unknown parameter(s) max_token in set 'one'; nb.ipynb accepts: max_tokens, budgets, temperature",
         argv=("batch", "{tmp}/sweep.yaml"),
         files={"sweep.yaml": b"notebook: nb.ipynb\nsets:\n  - name: one\n    max_token: 8\n"}),
    Case("sweep-int-as-1e3", "max_tokens: 1e3 (YAML 1.1 reads a string)",
         "parameter max_tokens='1e3' in shared parameters is a str, but nb.ipynb declares `max_tokens = 160` (an int); "
         "YAML reads '1e3' as a string: write a plain number such as 1000 (not 1e3)",
         argv=("batch", "{tmp}/sweep.yaml"),
         files={"sweep.yaml": b"notebook: nb.ipynb\nparameters:\n  max_tokens: 1e3\nsets:\n  - name: one\n"}),
    Case("sweep-list-as-string", "budgets: '[8]'",
         "parameter budgets='[8]' in set 'one' is a str, but nb.ipynb declares `budgets = [16, 48, None]` "
         "(a list of int or None); write a YAML list", argv=("batch", "{tmp}/sweep.yaml"),
         files={"sweep.yaml": b"notebook: nb.ipynb\nsets:\n  - name: one\n    budgets: '[8]'\n"}),
    Case("sweep-list-item", "budgets: [8, '16']", "parameter budgets=[8, '16'] in set 'one' holds '16', a str",
         argv=("batch", "{tmp}/sweep.yaml"), files={"sweep.yaml": b"notebook: nb.ipynb\nsets:\n  - name: one\n    budgets: [8, '16']\n"}),
    Case("sweep-missing", "thinklab batch on a file that does not exist", "sweep file {tmp}/nothing.yaml not found",
         argv=("batch", "{tmp}/nothing.yaml")),
]


def _row(i: int, run_id: str) -> dict:
    base = {k: None for k in SCHEMA}
    base.update(run_id=run_id, problem_id=f"p{i}", sample_idx=0, task="t", model="m", backend="hf", temperature=1.0,
                top_p=1.0, seed=i, wait_extensions=0, prompt="q", text="so \\boxed{4}", thinking="", answer_text="a",
                n_tokens=1, n_thinking_tokens=0, n_answer_tokens=1, finish_reason="stop", token_entropy=[0.5],
                token_logprob=[-0.1], token_ids=[7], pred="4", gold="4", correct=True)
    return base


def _damaged_run(folder: Path, damage: str) -> Path:
    import polars as pl

    run_id = "run0000000000001"
    store = RunStore(folder / "run")
    store.write_meta({"run_id": run_id, "spec": RunSpec().to_dict(), "status": "complete"})
    store.write_part(0, rows_to_frame([_row(0, run_id)]))
    part = store.write_part(1, rows_to_frame([_row(1, run_id)]))
    if damage == "truncate-part":
        part.write_bytes(part.read_bytes()[:200])
    elif damage == "empty-part":
        part.write_bytes(b"")
    elif damage == "foreign-part":
        rows_to_frame([_row(1, "0123456789abcdef")]).write_parquet(part)
    elif damage == "schema-part":
        pl.DataFrame({"run_id": [run_id], "score": [0.5]}).write_parquet(part)
    elif damage == "truncate-meta":
        store.meta_path.write_bytes(store.meta_path.read_bytes()[:40])
    elif damage == "empty-meta":
        store.meta_path.write_bytes(b"")
    return store.dir


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("case", [c for c in TABLE if c.build], ids=lambda c: c.id)
def test_spec_refuses_with_one_clear_message(case):
    with pytest.raises(SpecError) as info:
        case.build()
    assert case.expect in str(info.value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("case", [c for c in TABLE if not c.build], ids=lambda c: c.id)
def test_cli_refuses_with_one_line_and_writes_nothing(case, tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(NOTEBOOK_PARAMETERS)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    for name, data in case.files.items():
        (tmp_path / name).write_bytes(data)
    if case.damage:
        _damaged_run(tmp_path, case.damage)
    data = tmp_path / "data"
    before = _snapshot(tmp_path)
    env = {**os.environ, "THINKLAB_DATA": str(data), "THINKLAB_FIGURES": str(tmp_path / "figures"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "lib"), os.environ.get("PYTHONPATH")]))}
    env.pop("THINKLAB_DEBUG", None)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    res = subprocess.run([sys.executable, "-m", "thinklab.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("thinklab: error: ")
    assert case.expect.replace("{tmp}", str(tmp_path)) in res.stderr, res.stderr
    assert not data.exists()  # no run directory, no model copy, nothing under THINKLAB_DATA
    assert not (tmp_path / "out").exists() and not (tmp_path / "figures").exists()
    assert _snapshot(tmp_path) == before  # and every file it refused is as it was


def test_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "THINKLAB_DATA": str(tmp_path), "THINKLAB_DEBUG": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "lib"), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "thinklab.cli", "generate", "--temperature", "nan"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr and "SpecError" in res.stderr


def test_specs_accept_ints_for_floats_and_share_one_run_id():
    assert SamplingSpec(temperature=0) == SamplingSpec(temperature=0.0)
    from thinklab.runner import run_id

    assert run_id(RunSpec(sampling=SamplingSpec(temperature=1))) == run_id(RunSpec(sampling=SamplingSpec(temperature=1.0)))
    assert isinstance(SamplingSpec(temperature=1).temperature, float)
    spec = RunSpec(budget=BudgetSpec(thinking_budget=16))
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # lists come back as tuples


def test_every_annotated_field_is_checked():
    """A spec or field added later is covered: every field of every spec refuses a value of a foreign type."""
    import dataclasses

    from thinklab import config

    specs = [obj for obj in vars(config).values() if isinstance(obj, type) and dataclasses.is_dataclass(obj)]
    assert {ModelSpec, SamplingSpec, BudgetSpec, PromptSpec, RunSpec} <= set(specs)
    for cls in specs:
        for f in dataclasses.fields(cls):
            with pytest.raises(SpecError, match=rf"{cls.__name__}\.{f.name}="):
                cls(**{f.name: object()})


def test_the_lock_holder_removes_a_killed_writers_temporary_files(tmp_path):
    store = RunStore(tmp_path / "run")
    store.write_meta({"run_id": "r", "spec": {}})
    part = store.write_part(0, rows_to_frame([_row(0, "r")]))
    leftovers = [store.dir / ".part-00001.parquet.tmp-4242", store.dir / ".run.json.tmp-4242"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    with store.lock():
        assert not any(p.exists() for p in leftovers)
    assert part.is_file() and store.meta_path.is_file() and store.load().height == 1

