"""Model text never runs as code: the scan of reasoning-gym's scorers, the answer grammar,
the worker's audit guard, and the payloads through `grade` and through `thinklab regrade`.

Run as a script (`python tests/test_grading_safety.py`) to print the scorers the scan finds
and the payload result per scorer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

from thinklab import scorer_safety
from thinklab.grading import GRADER_VERSION, Grade, grade
from thinklab.store import SCHEMA, RunStore, rows_to_frame
from thinklab.tasks import load_task

LIB = str(Path(__file__).resolve().parents[1] / "lib")

# Each writes the file named {f} if it runs; the last ones dodge a check on `__import__` alone.
PAYLOADS = {
    "import": "__import__('os').system('touch {f}')",
    "lambda": "(lambda: __import__('os').system('touch {f}'))()",
    "subclasses": "[c for c in ().__class__.__bases__[0].__subclasses__() if c.__name__ == 'Popen'][0](['touch', '{f}'])",
    "attribute": "x.__class__.__init__.__globals__['__builtins__']['open']('{f}', 'w')",
    "open": "open('{f}', 'w')",
    "arithmetic prefix": "1 + __import__('os').system('touch {f}')",
}
WRAPPERS = {"boxed": "\\boxed{{{p}}}", "answer tag": "<answer>{p}</answer>", "answer is": "The answer is {p}"}


@lru_cache(maxsize=1)
def scan() -> dict[str, list[str]]:
    return scorer_safety.scan_reasoning_gym()


def _items(name: str, seeds=(0, 1, 2)) -> list:
    """Problems of generator `name` as thinklab builds them (composite cannot be built from a task name)."""
    if name == "composite":
        return []
    out, seen = [], set()
    for seed in seeds:
        for p in load_task(f"rg:{name}", n=2, seed=seed):
            if p.problem_id not in seen:
                seen.add(p.problem_id)
                out.append(p)
    return out


def _payload_gold(name: str) -> tuple[str, str]:
    """(gold, task) to send a payload to generator `name`'s scorer."""
    if name == "composite":  # a gold naming it by hand: the worker cannot build it from JSON config
        entry = {"question": "q", "answer": "1", "metadata": {"source_dataset": "countdown"}}
        config = {"datasets": [{"name": "countdown", "weight": 1.0, "config": {}}]}
        return json.dumps({"dataset": "composite", "config": config, "entry": entry}), "rg:composite"
    p = _items(name, seeds=(0,))[0]
    return p.gold, p.task


# --------------------------------------------------------------------------- the scan


def test_scan_finds_the_scorers_that_eval_their_answer():
    found = scan()
    print("\nreasoning-gym scorers that reach eval with the answer:")
    for name, where in found.items():
        print(f"  {name}: {'; '.join(where)}")
    assert {"countdown", "puzzle24", "polynomial_multiplication"} <= set(found)
    # number_sorting evals only its own gold (eval(entry["answer"])): following the answer keeps it out
    assert "number_sorting" not in found
    assert all(where for where in found.values())


def test_scan_covers_every_scorer_that_would_run_the_payload():
    """Run the payloads through every registered scorer (no grammar) in a child whose audit
    hook blocks process creation and file writes: each scorer that got that far is in the scan."""
    probe = textwrap.dedent(
        """
        import json, sys
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
        hits, current = set(), [None]
        def hook(event, args):
            writes = event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+")
            if current[0] and (writes or event in ("os.system", "subprocess.Popen", "os.posix_spawn", "os.exec")):
                hits.add(current[0])
                raise PermissionError("blocked by the probe")
        sys.addaudithook(hook)
        payloads = json.loads(sys.argv[1])
        unbuilt = []
        for name in sorted(DATASETS):
            try:
                dataset = reasoning_gym.create_dataset(name, seed=0, size=2)
                entry = dataset[0]
            except Exception:
                unbuilt.append(name)
                continue
            current[0] = name
            for payload in payloads:
                try:
                    dataset.score_answer(payload, entry)
                except Exception:
                    pass
            current[0] = None
        print("\\nPROBE " + json.dumps({"hits": sorted(hits), "unbuilt": unbuilt, "total": len(DATASETS)}))
        """
    )
    payloads = [p.format(f="/nonexistent/thinklab-probe") for p in PAYLOADS.values()]
    res = subprocess.run([sys.executable, "-c", probe, json.dumps(payloads)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": LIB})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.rsplit("\nPROBE ", 1)[1])  # some generators print while they build
    print(f"\nscorers that ran a payload: {out['hits']} (of {out['total']}; not buildable without config: {out['unbuilt']})")
    assert out["hits"], "the probe found no scorer running the payload: it is not testing anything"
    assert set(out["hits"]) <= set(scan()), set(out["hits"]) - set(scan())
    assert set(out["unbuilt"]) <= set(scan()) | {"composite"}


# --------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize("answer", ["6*(98 - 54) - 34 - 66", "-896*x**5 + 2240*x**4", "x^2 + 3/4", "  (1)\n", ".5*2.",
                                    "sqrt(x) + exp(2*x) + C"])
def test_grammar_admits_arithmetic_over_the_items_names(answer):
    assert scorer_safety.refusal(answer, scorer_safety.allowed_names("-x**2 + C", {"variables": ["x"]})) is None


@pytest.mark.parametrize("answer, needle", [
    ("__import__('os')", "'__import__'"),
    ("x.real", "'.'"),
    ("x[0]", "'['"),
    ("(lambda: 1)()", "'lambda'"),
    ("open", "'open'"),
    ("eval", "'eval'"),
    ("y + 1", "'y'"),
    ("1, 2", "','"),
    ("x = 1", "'='"),
    ("2 ** ３", "'３'"),
    ("self", "'self'"),
])
def test_grammar_refuses_anything_else_and_names_the_token(answer, needle):
    why = scorer_safety.refusal(answer, scorer_safety.allowed_names("-x**2 + C", {"variables": ["x"]}))
    assert why is not None and needle in why, why


def test_allowed_names_drop_builtins_keywords_and_dunders():
    names = scorer_safety.allowed_names("eval + lambda + __class__ + _ + Q + x1", {"variable": "t"}, {"variables": ("u", "v")})
    assert {"_", "Q", "x1", "t", "u", "v"} <= names
    assert not {"eval", "lambda", "__class__"} & names


# --------------------------------------------------------------------------- the worker's guard


def test_worker_guard_refuses_processes_and_writes_while_armed(tmp_path):
    target = tmp_path / "made"
    code = textwrap.dedent(
        f"""
        import os, subprocess
        from thinklab.grading import _install_guard
        armed = _install_guard()
        armed[0] = True
        for attempt in (lambda: os.system("touch {target}"), lambda: open("{target}", "w"),
                        lambda: subprocess.run(["touch", "{target}"]), lambda: os.mkdir("{target}")):
            try:
                attempt()
                print("ran")
            except PermissionError as exc:
                print("refused", exc)
        print(len(open(os.devnull).read()))  # reading stays allowed
        armed[0] = False
        open("{target}.after", "w").close()  # disarmed: the worker itself may write again
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": LIB})
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("refused") == 4 and "ran" not in res.stdout.replace("refused", ""), res.stdout
    assert not target.exists() and (tmp_path / "made.after").exists()


# --------------------------------------------------------------------------- payloads


def _payload_grades(tmp_path: Path) -> list[tuple[str, str, str, Grade, Path]]:
    out = []
    for name in scan():
        gold, task = _payload_gold(name)
        for kind, payload in PAYLOADS.items():
            for wrap_name, wrap in WRAPPERS.items():
                target = tmp_path / f"{name}-{kind}-{wrap_name}".replace(" ", "_")
                text = wrap.format(p=payload.format(f=target))
                out.append((name, kind, wrap_name, grade(text, gold, task), target))
    return out


def test_payloads_through_grade_create_nothing(tmp_path):
    results = _payload_grades(tmp_path)
    print("\npayload through grade(), per scorer: extractor / detail")
    for name in scan():
        mine = [r for r in results if r[0] == name]
        details = sorted({f"{r[3].extractor}: {r[3].detail.split(':')[0]}" for r in mine})
        print(f"  {name}: {len(mine)} payloads, {sum(r[4].exists() for r in mine)} files created; {details}")
    for name, kind, wrap_name, g, target in results:
        assert not target.exists(), (name, kind, wrap_name, g)
        assert not g.correct, (name, kind, wrap_name, g)
        if name != "composite" and wrap_name == "boxed":
            assert g.extractor == "refused_grammar", (name, kind, g)


def test_payload_through_math_verify_creates_nothing(tmp_path):
    for kind, payload in PAYLOADS.items():
        target = tmp_path / kind.replace(" ", "_")
        for wrap in WRAPPERS.values():
            g = grade(wrap.format(p=payload.format(f=target)), "4", "math500")
            assert not g.correct and not target.exists(), (kind, g)


@pytest.mark.parametrize("name", ["countdown", "puzzle24", "polynomial_multiplication", "simple_integration",
                                  "intermediate_integration", "string_insertion", "spiral_matrix", "binary_matrix",
                                  "n_queens"])
def test_gold_answers_of_guarded_scorers_still_score_one(name):
    if name not in scan():
        pytest.skip(f"{name} is not flagged by this reasoning-gym release")
    items = _items(name)
    assert len(items) >= 4
    for p in items:
        answer = json.loads(p.gold)["entry"]["answer"]
        g = grade(f"So the result is\n\\boxed{{{answer}}}", p.gold, p.task)
        assert g.correct and g.detail == "rg-score=1" and g.extractor == "boxed", (p.problem_id, answer, g)


def test_every_flagged_scorer_is_covered_by_the_gold_test():
    covered = {"countdown", "puzzle24", "polynomial_multiplication", "simple_integration", "intermediate_integration",
               "string_insertion", "spiral_matrix", "binary_matrix", "n_queens"}
    # composite forwards to another scorer and cannot be built from a task name, so it has no gold of its own
    assert set(scan()) - {"composite"} <= covered, set(scan()) - covered


def _row(i: int, **kw) -> dict:
    base = {k: None for k in SCHEMA}
    base.update(run_id="r", problem_id=f"p{i}", sample_idx=0, task="t", model="m", backend="hf", temperature=1.0,
                top_p=1.0, seed=i, wait_extensions=0, prompt="q", text="a", thinking="", answer_text="a", n_tokens=1,
                n_thinking_tokens=0, n_answer_tokens=1, finish_reason="stop", token_entropy=[math.nan],
                token_logprob=[-0.1], token_ids=[7], pred="stale", gold="a", correct=True, extractor="stale")
    base.update(kw)
    return base


def test_payloads_through_thinklab_regrade_create_nothing(tmp_path):
    store = RunStore(tmp_path / "run")
    store.write_meta({"spec": {}, "status": "complete"})
    rows, targets, expect = [], [], []
    for name in scan():
        gold, task = _payload_gold(name)
        for kind, payload in PAYLOADS.items():
            target = tmp_path / f"regrade-{name}-{kind}".replace(" ", "_")
            targets.append(target)
            rows.append(_row(len(rows), task=task, gold=gold, text="\\boxed{" + payload.format(f=target) + "}"))
            expect.append((name, "refused" if name != "composite" else "incorrect"))
        if name != "composite":
            p = _items(name, seeds=(0,))[0]
            answer = json.loads(p.gold)["entry"]["answer"]
            rows.append(_row(len(rows), task=p.task, gold=p.gold, text=f"\\boxed{{{answer}}}", correct=False))
            expect.append((name, "correct"))
    store.write_part(0, rows_to_frame(rows))
    res = subprocess.run([sys.executable, "-m", "thinklab.cli", "regrade", str(store.dir)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": LIB})
    assert res.returncode == 0, res.stderr[-2000:]
    print("\n" + res.stdout.strip())
    assert not [t for t in targets if t.exists()]
    df = store.load()
    for (name, want), row in zip(expect, df.iter_rows(named=True)):
        if want == "correct":
            assert row["correct"] and row["extractor"] == "boxed", (name, row["pred"])
        else:
            assert not row["correct"], (name, row["pred"])
            if want == "refused":
                assert row["extractor"] == "refused_grammar", (name, row["pred"], row["extractor"])
    assert set(df["grader_version"].to_list()) == {GRADER_VERSION}


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, LIB)
    for name, where in scan().items():
        print(f"{name}: {'; '.join(where)}")
    with tempfile.TemporaryDirectory() as tmp:
        results = _payload_grades(Path(tmp))
        for name in scan():
            mine = [r for r in results if r[0] == name]
            print(f"{name}: {len(mine)} payloads, {sum(r[4].exists() for r in mine)} files created, "
                  f"{sum(r[3].correct for r in mine)} graded correct; extractors {sorted({r[3].extractor for r in mine})}")
