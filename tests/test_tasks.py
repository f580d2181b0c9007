"""Tasks and prompts: real benchmark files read in place, reasoning-gym generators, task names."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest

from thinklab import paths, tasks
from thinklab.config import PromptSpec
from thinklab.prompts import CHOICE_INSTRUCTION, MATH_INSTRUCTION, build_prompt, plain_prompt
from thinklab.tasks import Problem, list_tasks, load_task, parse_task_name, worked_examples

SIZES = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "amc23": 40}


@pytest.fixture(scope="module", autouse=True)
def _need_benchmarks():
    if tasks._find_benchmark_file("math500.jsonl") is None:
        pytest.skip("benchmark files not found (set THINKLAB_BENCHMARKS_DIR)")


# --------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("name", sorted(SIZES))
def test_benchmarks_load_whole_with_unique_ids_and_golds(name):
    problems = load_task(name)
    assert len(problems) == SIZES[name]
    assert len({p.problem_id for p in problems}) == len(problems)
    assert all(p.problem_id.startswith(f"{name}/") and p.task == name for p in problems)
    assert all(p.question.strip() and p.gold.strip() for p in problems)
    assert all(p.meta["source"] == name for p in problems)
    hash(problems[0])  # frozen and hashable


def test_gold_normalization():
    gsm = {p.problem_id: p.gold for p in load_task("gsm8k")}
    assert gsm["gsm8k/0"] == "18"
    assert all("," not in g and "####" not in g for g in gsm.values())
    amc = load_task("amc23")
    assert amc[0].gold == "27" and all(not g.gold.endswith(".0") for g in amc)
    aime = {p.problem_id: p.gold for p in load_task("aime24")}
    assert "25" in aime.values() and not any(g.startswith("0") for g in aime.values())


def test_math500_keeps_level_subject_and_filters():
    everything = load_task("math500")
    first = everything[0]
    assert first.problem_id == "math500/test/precalculus/807.json"
    assert first.meta == {"level": 2, "source": "math500", "subject": "Precalculus"}
    assert first.gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    level5 = load_task("math500:level=5")
    assert len(level5) == sum(p.meta["level"] == 5 for p in everything) == 134
    assert {p.task for p in level5} == {"math500:level=5"}
    algebra = load_task("MATH500 : subject=algebra : level=4,5")
    assert algebra and all(p.meta["subject"] == "Algebra" and p.meta["level"] in (4, 5) for p in algebra)
    assert algebra[0].task == "math500:level=4,5:subject=algebra"
    assert load_task("math500:subject=counting_&_probability")[0].meta["subject"] == "Counting & Probability"


def test_subsets_are_reproducible_nested_and_seeded():
    a = load_task("gsm8k", n=8, seed=0)
    assert a == load_task("gsm8k", n=8, seed=0)
    assert {p.problem_id for p in a} <= {p.problem_id for p in load_task("gsm8k", n=32, seed=0)}
    assert a != load_task("gsm8k", n=8, seed=1)
    ids = [int(p.problem_id.split("/")[1]) for p in a]
    assert ids == sorted(ids)
    with pytest.raises(ValueError, match="30 items"):
        load_task("aime25", n=31)
    with pytest.raises(ValueError, match="n="):
        load_task("gsm8k", n=0)


# --------------------------------------------------------------------------- names and errors


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="gsm8k, math500, aime24, aime25, amc23, rg:NAME"):
        load_task("gsm9k")
    with pytest.raises(ValueError, match="unknown option 'leve'"):
        load_task("math500:leve=5")
    with pytest.raises(ValueError, match="level must be within 1..5"):
        load_task("math500:level=6")
    with pytest.raises(ValueError, match="valid names: .*basic_arithmetic"):
        load_task("rg:no_such_generator", n=2)


def test_canonical_names():
    assert parse_task_name(" GSM8K ").canonical == "gsm8k"
    assert parse_task_name("rg:Chain_Sum:difficulty=3").canonical == "rg:chain_sum:difficulty=3"
    assert parse_task_name("jsonl:/d/f.jsonl:question=problem:answer=ans").canonical == "jsonl:/d/f.jsonl:answer=ans:question=problem"
    assert parse_task_name("data/my.jsonl").canonical == "jsonl:data/my.jsonl"
    with pytest.raises(ValueError, match="given twice"):
        parse_task_name("math500:level=5:level=4")


def test_list_tasks_names_every_family_and_true_difficulty_ranges():
    rows = dict(list_tasks())
    for name in SIZES:
        assert any(pattern.startswith(name) for pattern in rows)
    from reasoning_gym.factory import CURRICULA

    for name, (top, _) in tasks.RG_HIGHLIGHTS.items():
        expected = max(len(a.levels) for a in CURRICULA[name]().attributes.values()) if name in CURRICULA else None
        assert top == expected, name
        assert any(pattern.startswith(f"rg:{name}") for pattern in rows)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_with_declared_fields(tmp_path):
    f = _write(tmp_path / "mine.jsonl", [json.dumps({"problem": f"What is {i}+1?", "ans": i + 1, "key": f"k{i}"}) for i in range(5)])
    problems = load_task(f"jsonl:{f}:question=problem:answer=ans:id=key")
    assert [p.problem_id for p in problems] == [f"mine/k{i}" for i in range(5)]
    assert problems[2].gold == "3" and problems[2].question == "What is 2+1?"
    assert load_task(f"{f}:question=problem:answer=ans", n=2, seed=3) == load_task(f"jsonl:{f}:question=problem:answer=ans", n=2, seed=3)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = _write(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "answer": "1"}), "", '{"question": "q2", "answer": ', "{}"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_task(f"jsonl:{f}")
    g = _write(tmp_path / "missing.jsonl", [json.dumps({"question": "q", "answer": "1"}), json.dumps({"question": "q"})])
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: missing field 'answer'"):
        load_task(f"jsonl:{g}")
    h = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object"):
        load_task(f"jsonl:{h}")
    with pytest.raises(ValueError, match="file not found"):
        load_task(f"jsonl:{tmp_path / 'nope.jsonl'}")


def test_lookup_order_env_dir_first(tmp_path, monkeypatch):
    _write(tmp_path / "aime25.jsonl", [json.dumps({"problem": "Local copy?", "answer": "7"})])
    monkeypatch.setenv("THINKLAB_BENCHMARKS_DIR", str(tmp_path))
    problems = load_task("aime25")
    assert [(p.question, p.gold) for p in problems] == [("Local copy?", "7")]
    explicit = _write(tmp_path / "other.jsonl", [json.dumps({"problem": "Explicit?", "answer": "8"})])
    assert load_task(f"aime25:path={explicit}")[0].question == "Explicit?"


def test_hub_fallback_is_real_and_explains_a_missing_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "benchmarks_dirs", lambda: [tmp_path])
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="pip install datasets"):
        load_task("aime24")
    calls = []

    def load_dataset(dataset_id, config, split):
        calls.append((dataset_id, config, split))
        return [{"ID": "2024-I-1", "Problem": "Hub question?", "Solution": "...", "Answer": 204}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    problems = load_task("aime24")
    assert calls == [("Maxwell-Jia/AIME_2024", None, "train")]
    assert [(p.problem_id, p.question, p.gold) for p in problems] == [("aime24/2024-I-1", "Hub question?", "204")]


# --------------------------------------------------------------------------- reasoning-gym


@pytest.mark.parametrize(
    "name", ["rg:basic_arithmetic", "rg:chain_sum:difficulty=3", "rg:gsm_symbolic", "rg:countdown:difficulty=2", "rg:knights_knaves:difficulty=3"]
)
def test_reasoning_gym_tasks_generate_reproducibly(name):
    a = load_task(name, n=4, seed=0)
    assert len(a) == 4 and a == load_task(name, n=4, seed=0)
    assert a != load_task(name, n=4, seed=1)
    assert {p.problem_id for p in a} <= {p.problem_id for p in load_task(name, n=8, seed=0)}
    canonical = parse_task_name(name).canonical
    for p in a:
        assert p.task == canonical and p.problem_id.startswith(canonical + "/")
        gold = json.loads(p.gold)
        assert gold["dataset"] == canonical.split(":")[1] and "answer" in gold["entry"]
        assert p.meta["source"] == "reasoning-gym"


def test_default_basic_arithmetic_is_small():
    for p in load_task("rg:basic_arithmetic", n=20, seed=0):
        meta = json.loads(p.gold)["entry"]["metadata"]
        assert meta["num_terms"] == 2 and meta["num_digits"] == 1, p.question
        assert len(p.question) < 40


def test_difficulty_maps_to_the_generator_config():
    easy = json.loads(load_task("rg:chain_sum:difficulty=1", n=1)[0].gold)["config"]
    hard = json.loads(load_task("rg:chain_sum:difficulty=6", n=1)[0].gold)["config"]
    assert easy == {"max_digits": 1, "max_terms": 2}
    assert hard["max_terms"] == 7 and hard["max_digits"] == 6
    knights = json.loads(load_task("rg:knights_knaves:difficulty=4", n=1)[0].gold)["config"]
    assert knights["n_people"] == 5
    override = load_task("rg:basic_arithmetic:max_terms=3:allow_negation=false", n=2)[0]
    assert json.loads(override.gold)["config"] == {"allow_negation": False, "max_digits": 1, "max_terms": 3}
    with pytest.raises(ValueError, match="within 1..5"):
        load_task("rg:basic_arithmetic:difficulty=9", n=1)
    with pytest.raises(ValueError, match="no option 'colour'"):
        load_task("rg:basic_arithmetic:colour=red", n=1)
    with pytest.raises(ValueError, match="config check failed"):
        load_task("rg:gsm_symbolic:difficulty=2", n=1)  # reasoning-gym supports only its difficulty 1.0
    with pytest.raises(ValueError, match="no difficulty levels"):
        load_task("rg:list_functions:difficulty=2", n=1)
    with pytest.raises(ValueError, match="procedural"):
        load_task("rg:chain_sum")


# --------------------------------------------------------------------------- prompts

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
THINKING = CHATML.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}",
)


def _tokenizer(template):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = template
    return tok


def test_prompt_uses_the_chat_template_and_the_boxed_instruction():
    problem = load_task("gsm8k", n=1)[0]
    text = build_prompt(_tokenizer(CHATML), problem, PromptSpec())
    assert text == f"<|im_start|>user\n{problem.question}\n\n{MATH_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_system_and_thinking_switch():
    problem = load_task("math500", n=1)[0]
    on = build_prompt(_tokenizer(THINKING), problem, PromptSpec(system_prompt="Be brief.", enable_thinking=True))
    off = build_prompt(_tokenizer(THINKING), problem, PromptSpec(enable_thinking=False))
    assert on.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "<think>" not in on
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = build_prompt(_tokenizer(CHATML), problem, PromptSpec(enable_thinking=False))
    assert "<think>" not in plain and any("thinking switch" in str(w.message) for w in caught)


def test_prompt_few_shot_turns_come_from_the_task_pool():
    problem = load_task("gsm8k", n=1, seed=5)[0]
    text = build_prompt(_tokenizer(CHATML), problem, PromptSpec(few_shot=2))
    assert text.count("<|im_start|>user") == 3 and text.count("<|im_start|>assistant") == 3
    assert text.count("\\boxed{") == 2 + 3  # two worked answers + three instructions
    assert "<<" not in text  # GSM8K calculator annotations removed
    examples = worked_examples("gsm8k", 2, exclude=problem.problem_id)
    assert all(problem.question != q for q, _ in examples)
    rg = load_task("rg:basic_arithmetic", n=1)[0]
    assert build_prompt(_tokenizer(CHATML), rg, PromptSpec(few_shot=1)).count("<|im_start|>user") == 2


def test_prompt_without_a_chat_template_and_multiple_choice():
    problem = Problem("x/1", "jsonl:x.jsonl", "Pick one: (A) 1 (B) 2", "B")
    text = build_prompt(_tokenizer(None), problem, PromptSpec(system_prompt="Sys"))
    assert text == f"Sys\n\nQuestion: Pick one: (A) 1 (B) 2\n\n{CHOICE_INSTRUCTION}\nAnswer:"
    assert plain_prompt([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]) == (
        "Question: q\nAnswer: a\n\nQuestion: q2\nAnswer:"
    )
