"""Tasks: turn a task name into a reproducible list of `Problem`s.

One syntax everywhere (notebook parameters, CLI flags, sweep files):

    gsm8k                       GSM8K test
    math500[:level=5][:subject=algebra]
    aime24, aime25, amc23
    rg:NAME[:difficulty=D][:field=value ...]   reasoning-gym generator NAME
    jsonl:PATH[:question=F][:answer=F][:id=F][:solution=F]   (or just PATH.jsonl)

Options are `key=value` segments after the name; the canonical name (`Problem.task`) has
the family in lower case and the options sorted by key. A sample size `n` and a `seed`
pick a reproducible subset; subsets are nested (the first 8 of seed 0 are inside its 16).

Benchmark files are looked up, in order: an explicit `path=` option, `$THINKLAB_BENCHMARKS_DIR`,
then `../shared/data/benchmarks` relative to the project root and to the working directory;
failing those, the Hugging Face hub through `datasets` (when installed and reachable).

This module knows nothing about models, prompts or grading; it never writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
import typing
from typing import Any, Iterable

from thinklab import paths

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# reasoning-gym item i is `create_dataset(name, seed=0, size=RG_POOL_SIZE, **config)[i]`, so the pool
# size is part of every rg problem id's meaning (a few generators precompute `size` items): never change it.
RG_POOL_SIZE = 10_000
RG_MAX_N = RG_POOL_SIZE // 2
RG_DEFAULT_DIFFICULTY = 1


@dataclass(frozen=True)
class Problem:
    problem_id: str  # stable id, e.g. "gsm8k/17", "math500/test/precalculus/807.json", "rg:chain_sum:difficulty=3/42"
    task: str  # canonical task name, e.g. "math500:level=5"
    question: str
    gold: str  # normalized gold answer; for reasoning-gym items the JSON grade() needs
    metadata: tuple[tuple[str, object], ...] = ()  # sorted (key, value) pairs: level, subject, source, ...

    @property
    def meta(self) -> dict[str, object]:
        return dict(self.metadata)


@dataclass(frozen=True)
class _Benchmark:
    file: str  # file name under the benchmarks directory
    hub: tuple[str, tuple[str | None, ...], str]  # (dataset id, configs, split)
    description: str
    options: tuple[str, ...] = ()  # filters this benchmark accepts


BENCHMARKS: dict[str, _Benchmark] = {
    "gsm8k": _Benchmark(
        "gsm8k_test.jsonl", ("openai/gsm8k", ("main",), "test"), "GSM8K test, 1319 grade-school word problems; gold = the number after ####"
    ),
    "math500": _Benchmark(
        "math500.jsonl",
        ("HuggingFaceH4/MATH-500", (None,), "test"),
        "MATH-500 (PRM800K test subset of MATH), 500 problems; filters level=1..5 (or 4,5) and subject=NAME",
        ("level", "subject"),
    ),
    "aime24": _Benchmark("aime24.jsonl", ("Maxwell-Jia/AIME_2024", (None,), "train"), "AIME 2024 I+II, 30 problems, integer answers"),
    "aime25": _Benchmark(
        "aime25.jsonl", ("opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"), "test"), "AIME 2025 I+II, 30 problems, integer answers"
    ),
    "amc23": _Benchmark("amc23.jsonl", ("math-ai/amc23", (None,), "test"), "AMC 2023, 40 problems, numeric answers"),
}

# The reasoning-gym generators we name in docs and `thinklab tasks`; any other registered
# generator works the same way. Max difficulty = the longest level list of its curriculum.
RG_HIGHLIGHTS: dict[str, tuple[int | None, str]] = {
    "basic_arithmetic": (5, "+ - * / with parentheses; difficulty 1 = two 1-digit terms (the spine's default task)"),
    "chain_sum": (11, "chains of + and -; difficulty raises term count and digits"),
    "gsm_symbolic": (None, "GSM8K-style word problems from symbolic templates (one difficulty only)"),
    "countdown": (5, "reach a target with given numbers and + - * /; graded by evaluating the expression"),
    "knights_knaves": (4, "knights always tell the truth, knaves always lie; difficulty raises people and statement depth"),
}


class TaskError(ValueError):
    """A task name, file or option that cannot be loaded."""


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class TaskName:
    family: str  # a BENCHMARKS key, "rg" or "jsonl"
    target: str  # rg generator name or jsonl path ("" for benchmarks)
    options: tuple[tuple[str, str], ...]

    @property
    def canonical(self) -> str:
        head = self.family if not self.target else f"{self.family}:{self.target}"
        return ":".join([head] + [f"{k}={v}" for k, v in self.options])

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)


_OPTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def _split_options(parts: list[str]) -> tuple[list[str], tuple[tuple[str, str], ...]]:
    """Peel trailing key=value segments off `parts`; the rest is the name (or a path)."""
    options: dict[str, str] = {}
    while parts and (m := _OPTION.match(parts[-1].strip())):
        key = m.group(1).lower()
        if key in options:
            raise TaskError(f"option {key!r} is given twice")
        options[key] = m.group(2).strip()
        parts = parts[:-1]
    return parts, tuple(sorted(options.items()))


def valid_names() -> list[str]:
    return [*BENCHMARKS, "rg:NAME[:difficulty=D]", "jsonl:PATH[:question=F][:answer=F]"]


def parse_task_name(name: str) -> TaskName:
    """Parse a task name into family, target and sorted options (raises TaskError)."""
    raw = (name or "").strip()
    if not raw:
        raise TaskError(f"empty task name; valid names: {', '.join(valid_names())}")
    head, _, rest = raw.partition(":")
    family = head.strip().lower()
    if family == "jsonl" or (family not in BENCHMARKS and family != "rg" and ".jsonl" in raw):
        path_and_opts = rest if family == "jsonl" else raw
        allowed = {"question", "answer", "id", "solution"}
        segments = path_and_opts.split(":")
        if len(segments) > 1 and segments[-1].strip().lower() in allowed:  # jsonl:f.jsonl:answer (no value)
            _option_without_value(name, segments[-1], "jsonl:PATH", {k: "FIELD" for k in sorted(allowed)})
        parts, options = _split_options(segments)
        path = ":".join(parts).strip()
        if not path:
            raise TaskError(f"task {name!r}: jsonl needs a path, e.g. jsonl:/data/file.jsonl:question=problem:answer=answer")
        _check_options(name, options, allowed)
        return TaskName("jsonl", path, options)
    parts, options = _split_options(raw.split(":"))
    if family == "rg":
        if len(parts) > 2 and parts[1].strip():  # rg:chain_sum:difficulty, or a segment that is no key=value
            _option_without_value(name, _bare(parts[2:]), f"rg:{parts[1].strip()}", {"difficulty": "D", "FIELD": "VALUE"})
        if len(parts) != 2 or not parts[1].strip():
            raise TaskError(f"task {name!r}: write reasoning-gym tasks as rg:NAME[:difficulty=D], e.g. rg:chain_sum:difficulty=3")
        return TaskName("rg", parts[1].strip().lower(), options)
    if family in BENCHMARKS:
        valid = {o: _OPTION_FORMS.get(o, "VALUE") for o in (*BENCHMARKS[family].options, "path")}
        if len(parts) > 1:  # math500:level, gsm8k:foo
            _option_without_value(name, _bare(parts[1:]), family, valid)
        _check_options(name, options, set(valid))
        for key, value in options:
            if not value:
                raise TaskError(f"task {name!r}: option {key!r} has no value; write {family}:{key}={valid[key]}")
        if family == "math500" and (level := dict(options).get("level")) is not None:
            levels = _parse_levels(name, level)
            options = tuple((k, ",".join(map(str, levels)) if k == "level" else v) for k, v in options)
        return TaskName(family, "", options)
    raise TaskError(f"unknown task {name!r}; valid names: {', '.join(valid_names())}")


def _bare(segments: list[str]) -> str:
    """The first segment that is not key=value (the one that stopped the options)."""
    return next((seg for seg in segments if not _OPTION.match(seg.strip())), segments[0])


_OPTION_FORMS = {"level": "1..5 (or a list like 4,5)", "subject": "NAME", "path": "FILE.jsonl"}


def _option_without_value(name: str, segment: str, head: str, valid: dict[str, str]) -> typing.NoReturn:
    """A segment after the task's name that is not key=value: say which option it looks like and its form."""
    key = segment.strip().lower()
    forms = ", ".join(f"{k}={v}" for k, v in valid.items())
    if key in valid:
        raise TaskError(f"task {name!r}: option {key!r} needs a value: write {head}:{key}={valid[key]}")
    raise TaskError(f"task {name!r}: {segment.strip()!r} is not an option of {head}; options are key=value segments: {forms}")


def _check_options(name: str, options: Iterable[tuple[str, str]], allowed: set[str]) -> None:
    for key, _ in options:
        if key not in allowed:
            raise TaskError(f"task {name!r}: unknown option {key!r}; valid options: {', '.join(sorted(allowed)) or 'none'}")


def _parse_levels(name: str, value: str) -> list[int]:
    try:
        levels = sorted({int(v) for v in value.split(",")})
    except ValueError:
        raise TaskError(f"task {name!r}: level must be an int 1..5 or a list like 4,5; got {value!r}") from None
    if not all(1 <= v <= 5 for v in levels):
        raise TaskError(f"task {name!r}: level must be within 1..5; got {value!r}")
    return levels


# --------------------------------------------------------------------------- public API


def list_tasks() -> list[tuple[str, str]]:
    """(name pattern, description) for `thinklab tasks`."""
    rows = [(name + "".join(f"[:{o}=...]" for o in b.options), b.description) for name, b in BENCHMARKS.items()]
    for name, (max_difficulty, description) in RG_HIGHLIGHTS.items():
        knob = f"[:difficulty=1..{max_difficulty}]" if max_difficulty else ""
        rows.append((f"rg:{name}{knob}", f"reasoning-gym {name}: {description}"))
    rows.append(
        (
            "rg:NAME[:difficulty=D][:field=value]",
            "any reasoning-gym generator (about 100); difficulty = its curriculum's global level (1 = easiest); "
            "field=value overrides one field of its config",
        )
    )
    rows.append(("jsonl:PATH[:question=F][:answer=F][:id=F]", "your own JSON-lines file; F names the field (defaults: question, answer)"))
    return rows


def load_task(name: str, n: int | None = None, seed: int = 0) -> list[Problem]:
    """A reproducible subset of `n` problems of task `name` picked by `seed` (n=None: all).

    Procedural (rg:) tasks generate `n` items; they need an `n`. Raises TaskError (a
    ValueError) for unknown names, bad options, malformed files or too few items.
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise TaskError(f"n={n!r} is not valid; use a positive int or None (all)")
    parsed = parse_task_name(name)
    if parsed.family == "rg":
        if n is None:
            raise TaskError(f"task {parsed.canonical!r} is procedural: give the number of items n")
        if n > RG_MAX_N:
            raise TaskError(f"task {parsed.canonical!r}: n={n} is more than the {RG_MAX_N} items a procedural task serves")
        return [p for p, _ in _rg_items(parsed, _rg_indices(seed), n)]
    pool = [p for p, _ in _pool(parsed)]
    return _subset(parsed, pool, n, seed)


def worked_examples(task: str, k: int, exclude: str = "") -> list[tuple[str, str]]:
    """`k` (question, worked answer) pairs from the task's own pool, for few-shot prompts.

    The same `k` examples come back for every problem (a fixed shuffle), skipping the
    problem `exclude` itself. Each answer ends with `\\boxed{gold}`.
    """
    if k <= 0:
        return []
    parsed = parse_task_name(task)
    if parsed.family == "rg":
        items = _rg_items(parsed, _rg_indices(seed=-1), k + 1)
    else:
        items = list(_pool(parsed))
        random.Random(12345).shuffle(items)
    out = []
    for problem, solution in items:
        if problem.problem_id == exclude:
            continue
        out.append((problem.question, solution))
        if len(out) == k:
            break
    return out


def content_digest(name: str, problems: list[Problem], few_shot: int = 0) -> dict:
    """What a run id needs to know about the task's data beyond its name, size and seed.

    File-backed tasks (benchmarks, jsonl, hub copies): a sha256 of the loaded subset (ids,
    questions, golds, and the metadata rows keep), plus the worked examples a few-shot
    prompt takes from the pool, so editing the file changes the id. Procedural (rg:) tasks
    are a function of name, seed and the generator's code: the reasoning-gym version.
    """
    parsed = parse_task_name(name)
    if parsed.family == "rg":
        import importlib.metadata

        return {"kind": "procedural", "reasoning_gym": importlib.metadata.version("reasoning-gym")}
    digest = hashlib.sha256()
    for p in problems:
        meta = {k: v for k, v in p.metadata if k not in ("source", "line")}  # where the file lies is not its content
        digest.update(json.dumps([p.problem_id, p.question, p.gold, meta], sort_keys=True, default=str).encode())
        digest.update(b"\n")
    if few_shot > 0:
        for question, solution in worked_examples(name, few_shot + 1):
            digest.update(json.dumps(["few-shot", question, solution]).encode())
            digest.update(b"\n")
    return {"kind": "data", "sha256": digest.hexdigest()[:16], "n": len(problems)}


# --------------------------------------------------------------------------- subsets


def _subset(parsed: TaskName, pool: list[Problem], n: int | None, seed: int) -> list[Problem]:
    if not pool:
        raise TaskError(f"task {parsed.canonical!r} has no items")
    if n is None:
        return pool
    if n > len(pool):
        raise TaskError(f"task {parsed.canonical!r} has {len(pool)} items; asked for n={n}")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in sorted(order[:n])]


def _rg_indices(seed: int) -> Iterable[int]:
    """Distinct item indices in a seeded order; any prefix is a reproducible subset."""
    rng = random.Random(f"thinklab-rg-{seed}")
    seen: set[int] = set()
    while len(seen) < RG_POOL_SIZE:
        i = rng.randrange(RG_POOL_SIZE)
        if i not in seen:
            seen.add(i)
            yield i


# --------------------------------------------------------------------------- benchmark files


def _pool(parsed: TaskName) -> tuple[tuple[Problem, str], ...]:
    """Every (problem, worked solution) of a file-backed task, filters applied, in file order."""
    if parsed.family == "jsonl":
        path = _resolve_user_path(parsed.target)
    elif explicit := parsed.option("path"):
        path = _resolve_user_path(explicit)
    else:
        path = _find_benchmark_file(BENCHMARKS[parsed.family].file)
        if path is None:
            bench = BENCHMARKS[parsed.family]
            return _build_pool(parsed, _from_hub(parsed.family, bench), f"hub:{bench.hub[0]}")
    return _pool_from_file(parsed, str(path), _file_sha256(path))


def _file_sha256(path: Path) -> str:
    """The caches below are keyed by content: an mtime can stay the same across a quick edit."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=32)
def _pool_from_file(parsed: TaskName, path: str, content_sha256: str) -> tuple[tuple[Problem, str], ...]:
    return _build_pool(parsed, _read_jsonl(path, content_sha256), path)


def _build_pool(parsed: TaskName, records: tuple[dict, ...], source: str) -> tuple[tuple[Problem, str], ...]:
    if parsed.family == "jsonl":
        return tuple(_from_jsonl(parsed, Path(source), records))
    problems = [_benchmark_problem(parsed, i, r, source) for i, r in enumerate(records)]
    return tuple(p for p in problems if _keep(parsed, p[0]))


def _find_benchmark_file(file: str) -> Path | None:
    for d in paths.benchmarks_dirs():
        if (d / file).is_file():
            return (d / file).resolve()
    return None


def _resolve_user_path(path: str) -> Path:
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise TaskError(f"file not found: {path} (looked at {', '.join(str(c) for c in candidates)})")


@lru_cache(maxsize=32)
def _read_jsonl(path: str, content_sha256: str) -> tuple[dict, ...]:
    """All records of a JSON-lines file, or TaskError naming the file and line (nothing partial)."""
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise TaskError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                f"save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            record["__line__"] = lineno
            records.append(record)
    if not records:
        raise TaskError(f"{path}: no records")
    return tuple(records)


def _field(record: dict, *names: str) -> Any:
    """The first of `names` present in `record`, matched case-insensitively (hub copies vary)."""
    lower = {k.lower(): k for k in record}
    for name in names:
        if name.lower() in lower:
            return record[lower[name.lower()]]
    return None


def _require(record: dict, where: str, *names: str) -> Any:
    value = _field(record, *names)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise TaskError(f"{where}: missing field {names[0]!r}")
    return value


def normalize_gold(value: Any) -> str:
    """A gold answer as a string: floats that are integers lose their .0, GSM8K golds their commas."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)
    s = str(value).strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _gsm8k_parts(answer: str, where: str) -> tuple[str, str]:
    """(gold, worked solution ending in \\boxed{gold}) from a GSM8K answer field."""
    if "####" not in answer:
        raise TaskError(f"{where}: GSM8K answer has no '#### N' line")
    steps, _, final = answer.rpartition("####")
    gold = normalize_gold(final.strip())
    steps = re.sub(r"<<[^<>]*>>", "", steps).strip()
    return gold, f"{steps}\nThe final answer is $\\boxed{{{gold}}}$."


def _boxed_only(gold: str) -> str:
    return f"The final answer is $\\boxed{{{gold}}}$."


def _benchmark_problem(parsed: TaskName, index: int, r: dict, source: str) -> tuple[Problem, str]:
    family = parsed.family
    where = f"{source}:{r.get('__line__', index + 1)}"
    meta: dict[str, object] = {"source": family}
    if family == "gsm8k":
        question = _require(r, where, "question")
        gold, solution = _gsm8k_parts(str(_require(r, where, "answer")), where)
        pid = f"gsm8k/{_field(r, 'idx') if _field(r, 'idx') is not None else index}"
    elif family == "math500":
        question = _require(r, where, "problem")
        gold = normalize_gold(_require(r, where, "answer"))
        solution = str(_field(r, "solution") or _boxed_only(gold))
        pid = f"math500/{_field(r, 'unique_id') or index}"
        meta["level"] = int(_require(r, where, "level"))
        meta["subject"] = str(_require(r, where, "subject"))
    else:  # aime24, aime25, amc23: answers only (the AIME 2024 solutions are AoPS pages, too long for few-shot)
        question = _require(r, where, "problem", "question")
        gold = normalize_gold(_require(r, where, "answer"))
        if re.fullmatch(r"\d+", gold):
            gold = str(int(gold))  # AIME "025" -> "25"
        solution = _boxed_only(gold)
        ident = _field(r, "id")
        pid = f"{family}/{ident if ident is not None else index}"
    return Problem(pid, parsed.canonical, str(question), gold, tuple(sorted(meta.items()))), solution


def _subject_key(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _keep(parsed: TaskName, p: Problem) -> bool:
    if (level := parsed.option("level")) is not None and p.meta.get("level") not in {int(v) for v in level.split(",")}:
        return False
    if (subject := parsed.option("subject")) is not None and _subject_key(str(p.meta.get("subject", ""))) != _subject_key(subject):
        return False
    return True


def _from_jsonl(parsed: TaskName, path: Path, records: tuple[dict, ...]) -> list[tuple[Problem, str]]:
    qf, af = parsed.option("question", "question"), parsed.option("answer", "answer")
    idf, sf = parsed.option("id"), parsed.option("solution")
    out, seen = [], set()
    for index, r in enumerate(records):
        where = f"{path}:{r['__line__']}"
        if qf not in r or af not in r:
            missing = qf if qf not in r else af
            raise TaskError(f"{where}: missing field {missing!r} (fields: {', '.join(k for k in r if k != '__line__')})")
        for key, what in ((qf, "question"), (af, "gold answer")):
            value = r[key]
            if value is None or (isinstance(value, str) and not value.strip()) or isinstance(value, (dict, list)):
                shown = "null" if value is None else json.dumps(value)[:40]
                raise TaskError(f"{where}: field {key!r} is {shown}; every line needs its {what} there as a string or number")
        answer = r[af]
        if isinstance(answer, str) and "####" in answer:
            gold, solution = _gsm8k_parts(answer, where)
        else:
            gold = normalize_gold(answer)
            solution = _boxed_only(gold)
        if sf and r.get(sf):
            solution = str(r[sf])
        if not gold:
            raise TaskError(f"{where}: empty answer in field {af!r}")
        ident = r.get(idf) if idf else index
        if idf and ident is None:
            raise TaskError(f"{where}: missing field {idf!r}")
        pid = f"{path.stem}/{ident}"
        if pid in seen:
            raise TaskError(f"{where}: duplicate id {ident!r}")
        seen.add(pid)
        meta = (("line", r["__line__"]), ("source", str(path)))
        out.append((Problem(pid, parsed.canonical, str(r[qf]), gold, meta), solution))
    return out


def _from_hub(family: str, bench: _Benchmark) -> tuple[dict, ...]:
    dataset_id, configs, split = bench.hub
    looked = ", ".join(str(d / bench.file) for d in paths.benchmarks_dirs())
    try:
        import datasets
    except ImportError:
        raise TaskError(
            f"{family}: no local file (looked at {looked}) and the `datasets` package is not installed; "
            f"set ${paths.BENCHMARKS_ENV} to a folder holding {bench.file}, or `pip install datasets` to load {dataset_id} from the hub"
        ) from None
    records: list[dict] = []
    try:
        for config in configs:
            for row in datasets.load_dataset(dataset_id, config, split=split):
                records.append(dict(row, __line__=len(records) + 1))
    except Exception as exc:  # noqa: BLE001 - network, auth and format errors all mean "not available"
        raise TaskError(f"{family}: no local file (looked at {looked}) and the hub copy {dataset_id} failed to load: {exc}") from exc
    return tuple(records)


# --------------------------------------------------------------------------- reasoning-gym


def _rg_value(text: str, default: Any) -> Any:
    """Parse an option value to the type of the config field's default."""
    low = text.lower()
    if isinstance(default, bool) or low in ("true", "false"):
        if low not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return low in ("true", "1")
    if isinstance(default, (list, tuple)):
        return type(default)(v.strip() for v in text.split(",") if v.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@lru_cache(maxsize=64)
def _rg_dataset(parsed: TaskName) -> tuple[Any, dict]:
    """(dataset, JSON-able config overrides) of a reasoning-gym task name."""
    try:
        import reasoning_gym
        from reasoning_gym.coaching.base_curriculum import DefaultCurriculumContext
        from reasoning_gym.factory import CURRICULA, DATASETS
    except ImportError:
        raise TaskError("rg: tasks need the reasoning-gym package: pip install reasoning-gym") from None
    name = parsed.target
    if name not in DATASETS:
        raise TaskError(f"unknown reasoning-gym task {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    config_cls = DATASETS[name][1]
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    options = dict(parsed.options)
    difficulty_text = options.pop("difficulty", None)
    config: dict[str, Any] = {}
    if difficulty_text is not None or name in CURRICULA:
        try:
            difficulty = int(difficulty_text) if difficulty_text is not None else RG_DEFAULT_DIFFICULTY
        except ValueError:
            raise TaskError(f"task {parsed.canonical!r}: difficulty must be an int, got {difficulty_text!r}") from None
        if name in CURRICULA:
            curriculum = CURRICULA[name]()
            top = max(len(a.levels) for a in curriculum.attributes.values())
            if not 1 <= difficulty <= top:
                raise TaskError(f"task {parsed.canonical!r}: difficulty must be within 1..{top} for {name}")
            curriculum.set_global_level(difficulty - 1)
            # reasoning-gym's own mapping of a level to a config (ranges from the easiest level up)
            generated = curriculum.generate_configuration({}, DefaultCurriculumContext())
            config = {k: getattr(generated, k) for k in fields if k not in ("seed", "size")}
            config = {k: v for k, v in config.items() if v != _field_default(fields[k])}
        elif "difficulty" in fields:
            config["difficulty"] = float(difficulty)
        elif difficulty != RG_DEFAULT_DIFFICULTY:
            raise TaskError(f"task {parsed.canonical!r}: {name} has no difficulty levels; drop the difficulty option")
    for key, text in options.items():
        if key not in fields or key in ("seed", "size"):
            valid = ", ".join(k for k in fields if k not in ("seed", "size"))
            raise TaskError(f"task {parsed.canonical!r}: {name} has no option {key!r}; valid: difficulty, {valid}")
        try:
            config[key] = _rg_value(text, _field_default(fields[key]))
        except ValueError as exc:
            raise TaskError(f"task {parsed.canonical!r}: option {key}: {exc}") from None
    try:
        dataset = reasoning_gym.create_dataset(name, **config, seed=0, size=RG_POOL_SIZE)
    except (AssertionError, TypeError, ValueError) as exc:
        why = str(exc) or "the generator's own config check failed"
        raise TaskError(f"task {parsed.canonical!r}: invalid reasoning-gym config {config}: {why}") from None
    return dataset, json.loads(json.dumps(config, default=_jsonable))


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy array
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def _rg_items(parsed: TaskName, indices: Iterable[int], n: int) -> list[tuple[Problem, str]]:
    dataset, config = _rg_dataset(parsed)
    meta_base = {"source": "reasoning-gym", "dataset": parsed.target, "difficulty": int(parsed.option("difficulty", "1"))}
    chosen: list[tuple[int, dict]] = []
    failures = 0
    for index in indices:
        if len(chosen) == n:
            break
        try:
            entry = dataset[index]
        except Exception:  # noqa: BLE001 - some generators give up on some indices; skip those
            failures += 1
            if failures > 10 * n + 100:
                raise TaskError(f"task {parsed.canonical!r}: the generator fails on most items; try a lower difficulty") from None
            continue
        chosen.append((index, entry))
    if len(chosen) < n:
        raise TaskError(f"task {parsed.canonical!r}: the generator gave only {len(chosen)} items of the {n} asked")
    chosen.sort(key=lambda ie: ie[0])
    out = []
    for index, entry in chosen:
        gold = json.dumps(
            {"dataset": parsed.target, "config": config, "entry": {k: entry[k] for k in ("question", "answer", "metadata") if k in entry}},
            default=_jsonable,
            sort_keys=True,
        )
        meta = dict(meta_base, index=index)
        problem = Problem(f"{parsed.canonical}/{index}", parsed.canonical, str(entry["question"]), gold, tuple(sorted(meta.items())))
        out.append((problem, _boxed_only(str(entry["answer"]))))
    return out
