"""Grading: extract the answer from a generation and decide whether it matches the gold.

`grade(text, gold, task, finish_reason=..., lenient_truncated=..., think_start=..., think_end=...)`
is a pure function of its arguments. It knows nothing about models, prompts or files; the
only thing it needs from a task is its name (which says whether the item comes from
reasoning-gym and so carries its own scorer).

What is graded: the answer phase. When the text holds the end-of-thinking tag, only what
follows it; when it opens thinking and never closes it, nothing (an answer seen only while
thinking is not the model's final answer); otherwise the whole text.

Extraction (first that fires wins; `Grade.extractor` records which):
    boxed        the last complete `\\boxed{...}` (or `\\fbox`, `\\framebox`), nested braces
    ####         the last `#### N` (GSM8K worked-solution style)
    answer_is    the last "the (final) answer is ..." / "Final answer: ..." in the text
    choice       a multiple-choice letter, when the gold is a letter ("C", "(C)", "\\text{(C)}")
    last_number  the last number in the text
reasoning-gym items also try `<answer>...</answer>` after `boxed`, and fall back to the
last non-empty line where the gold is not a number (`last_line`). The first four (and
`answer_tag`) are final-answer markers; the others are fallbacks. A sample cut at
`max_tokens` (finish_reason "length") whose answer phase has no final-answer marker is
incorrect with extractor `none_truncated`, unless `lenient_truncated` restores the fallbacks
(lm-eval's flexible-extract).

Equivalence, cheapest first: normalized string equality; exact decimal equality when
both sides are plain numbers; otherwise math-verify (`verify(parse(gold), parse(pred))`)
in a persistent worker *process* with a wall-clock deadline of `VERIFY_TIMEOUT_S`. A
worker that misses its deadline is killed and restarted on the next call, so a runaway
sympy computation can never hang the caller; it works from any thread (no signals).
reasoning-gym items are scored by the generator's own `score_answer` in the same worker,
under the same deadline; only a score of 1.0 counts as correct.

Model text never runs as code. Some reasoning-gym scorers `eval` their answer (directly or
through sympy's `parse_expr`); the worker finds them by reading reasoning-gym's source
(`thinklab.scorer_safety`) and checks their answers against a strict arithmetic grammar
first: an answer outside it is incorrect with extractor `refused_grammar` and never reaches
the scorer. While it serves a request, the worker also refuses, through an audit hook,
to start processes, write files, open sockets or load native libraries.

Before anything symbolic, cheap pre-checks reject predictions that are too long
(`MAX_VERIFY_CHARS`), too deeply nested (`MAX_BRACE_DEPTH`) or that would build a number of
more than `MAX_POWER_DIGITS` digits (`2^{99999999}`; a power of 0, 1 or -1 passes) or a
4+-digit factorial: they grade incorrect without reaching sympy (unless they equal the gold
as strings). Bound per `grade()` call: `VERIFY_TIMEOUT_S` plus, only when the worker is not
already running, its start (the math-verify import; capped at `STARTUP_TIMEOUT_S`).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

GRADER_VERSION = "2"

VERIFY_TIMEOUT_S = 5.0  # wall-clock deadline of one math-verify or reasoning-gym scorer call
STARTUP_TIMEOUT_S = 60.0  # deadline for the worker to import math-verify (and reasoning-gym)
MAX_VERIFY_CHARS = 600  # longer predictions are compared as strings only (longest MATH-500 answer: 53)
MAX_BRACE_DEPTH = 24  # deeper {...} nesting is compared as strings only
MAX_POWER_DIGITS = 10_000  # a literal power whose value would have more digits is not evaluated
WORKER_MEMORY_BYTES = 4 << 30  # address-space cap of the verifier process
RETRY_START_AFTER_S = 30.0  # after a failed start, grade without the verifier for this long


@dataclass(frozen=True)
class Grade:
    pred: str  # the extracted answer ("" when nothing was found)
    correct: bool
    extractor: str  # boxed, ####, answer_is, answer_tag, choice, last_number, last_line, none,
    # none_truncated (cut at max_tokens without a final answer) or refused_grammar (see scorer_safety)
    detail: str = ""  # how equivalence was decided: string, numeric, math-verify, rg-score=..., timeout, ...


THINK_START, THINK_END = "<think>", "</think>"
FINAL_ANSWER_EXTRACTORS = frozenset({"boxed", "answer_tag", "####", "answer_is"})  # the rest are fallbacks


def answer_phase(text: str, think_start: str | None = THINK_START, think_end: str | None = THINK_END) -> str:
    """The part of `text` that is graded: after the end-of-thinking tag; "" when thinking never ends."""
    if think_end:
        pos = text.find(think_end)
        if pos >= 0:
            return text[pos + len(think_end) :]
    if think_start and text.lstrip().startswith(think_start):
        return ""
    return text


# --------------------------------------------------------------------------- extraction

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox|framebox)\s*\{")
_BOX_BARE = re.compile(r"\\boxed\s+([^\s${}]+)")  # `\boxed 5`
_BRACE = re.compile(r"(?<!\\)[{}]")  # `\{` and `\}` are literal braces in LaTeX, not groups
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# One character class after "is" keeps backtracking linear on long runs of blanks. The
# capture is only the marker: the answer is read from its end, so a later marker on the
# same line ("the answer is 5. Wait, no, the answer is 7.") is found, and wins.
_ANSWER_IS = re.compile(r"(?i)(?:final\s+answer|\banswer)\**[ \t]*(?:is|:|=)[\s:*]*(?=\S)")
MAX_PHRASE_CHARS = 1000  # an "answer is ..." capture is cut to this before any further regex
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?")
_CHOICE_GOLD = re.compile(r"^\s*(?:\\text\{\s*)?\(?\s*([A-J])\s*\)?\s*\}?\s*$")
_CHOICE_IN_ANSWER = re.compile(r"^\W*(?:\\text\{\s*)?(?:\\textbf\{\s*)?\(?([A-J])(?:\)|\}|\.|:|\s|$)")
_CHOICE_IN_TEXT = re.compile(r"\(([A-J])\)|\b([A-J])\)")
_MATH_SPAN = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_LEADING_NUMBER = re.compile(r"^(-?[\d,]*\.?\d+(?:/\d+)?)\s*([A-Za-z][A-Za-z \-]*)?$")


def _last_boxed(text: str) -> str | None:
    """Content of the complete \\boxed{...} that closes last; one pass over the braces, O(n)."""
    opens = {m.end() - 1 for m in _BOX_OPEN.finditer(text)}
    if not opens:
        bare = list(_BOX_BARE.finditer(text))
        return bare[-1].group(1) if bare else None
    stack: list[int] = []
    best: tuple[int, int] | None = None
    for m in _BRACE.finditer(text):
        pos = m.start()
        if text[pos] == "{":
            stack.append(pos)
        elif stack:
            start = stack.pop()
            if start in opens:
                best = (start + 1, pos)
    if best is None:
        return None
    return text[best[0] : best[1]].strip()


def _last_answer_tag(text: str) -> str | None:
    """Content of the last <answer>...</answer> (found with rfind: linear however many tags)."""
    end = text.lower().rfind("</answer>")
    if end < 0:
        return None
    start = text.lower().rfind("<answer>", 0, end)
    return text[start + len("<answer>") : end].strip() if start >= 0 else None


def _clean_phrase(s: str) -> str:
    """Trim an "answer is ..." capture down to the answer itself."""
    s = s[:MAX_PHRASE_CHARS].strip()
    spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(s)]
    if spans:
        return spans[0].strip().rstrip(".").strip()
    s = s.strip("*").strip()
    s = re.sub(r"[.。;!]+\s.*$", "", s)  # first sentence only
    s = s.rstrip(".;!。 ").strip("*").strip()
    m = _LEADING_NUMBER.match(s)
    if m and m.group(2):  # "70 minutes" -> "70"
        return m.group(1)
    return s


def _choice_letter(s: str) -> str | None:
    m = _CHOICE_IN_ANSWER.match(s.strip())
    return m.group(1) if m else None


def choice_gold(gold: str) -> str | None:
    """The letter when the gold is a multiple-choice letter ("C", "(C)", "\\text{(C)}"), else None."""
    m = _CHOICE_GOLD.match(gold or "")
    return m.group(1) if m else None


def extract_answer(text: str, choices: bool = False, rg: bool = False, numeric_gold: bool = True) -> tuple[str, str]:
    """(pred, extractor) from a generation; ("", "none") when nothing fires."""
    boxed = _last_boxed(text)
    if boxed is not None and boxed != "":
        if choices and (letter := _choice_letter(boxed)):
            return letter, "boxed"
        return boxed, "boxed"
    if rg:
        tagged = _last_answer_tag(text)
        if tagged:
            return tagged, "answer_tag"
    hashes = _HASHES.findall(text)
    if hashes and hashes[-1].strip():
        return _clean_phrase(hashes[-1]), "####"
    last = deque(_ANSWER_IS.finditer(text), maxlen=1)  # the last marker, in O(1) memory
    if last:
        said = last[0]
        end = text.find("\n", said.end())
        phrase = _clean_phrase(text[said.end() : end if end >= 0 else len(text)][:MAX_PHRASE_CHARS])
        if phrase:
            if choices and (letter := _choice_letter(phrase)):
                return letter, "answer_is"
            return phrase, "answer_is"
    if choices:
        found = _CHOICE_IN_TEXT.findall(text)
        if found:
            return next(g for g in found[-1] if g), "choice"
    if numeric_gold:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1].rstrip(","), "last_number"
    if rg:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if lines:
            return lines[-1], "last_line"
    return "", "none"


# --------------------------------------------------------------------------- equivalence

_STRIP_TOKENS = re.compile(
    r"\\left|\\right|\\displaystyle|\\!|\\,|\\;|\\:|\\ |\^\{?\\circ\}?|\\%|%|\\\$|\$|\\\(|\\\)|\\\[|\\\]|\s+"
)
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)$")
_POWER = re.compile(r"(?:\^|\*\*)\s*\{?\s*\(?\s*([-+]?\d+(?:\.\d+)?)")  # an operator and a literal exponent
_POWER_BASE = re.compile(r"(?:\(\s*([-+]?\d+(?:\.\d+)?)\s*\)|\{\s*([-+]?\d+(?:\.\d+)?)\s*\}|(?<![\w.])([-+]?\d+(?:\.\d+)?))\s*$")
_FACTORIAL = re.compile(r"\d{4,}\s*!")


def _normalize(s: str) -> str:
    s = s.strip()
    s = _TEXT_WRAP.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _STRIP_TOKENS.sub("", s)
    return s.rstrip(".")


def _as_number(s: str) -> Decimal | None:
    if len(s) > 100:
        return None
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER.match(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def _brace_depth(s: str) -> int:
    depth = best = 0
    for ch in s:
        if ch == "{" or ch == "(" or ch == "[":
            depth += 1
            best = max(best, depth)
        elif ch == "}" or ch == ")" or ch == "]":
            depth = max(0, depth - 1)
    return best


def _power_digits(base: str, exponent: str) -> float:
    """Decimal digits of base**exponent (of its denominator for |base| < 1), from logarithms."""
    b, e = abs(float(base)), abs(float(exponent))
    if b == 0.0 or b == 1.0:
        return 0.0
    if math.isinf(b) or math.isinf(e):
        return math.inf
    return e * abs(math.log10(b))


def _huge_number(s: str) -> bool:
    """Whether `s` writes a power or factorial whose value is too large to build.

    A literal base is judged by the digits of the result (`1^{235423523}` and `(-1)^{10^9}`
    are small); any other base (a symbol, a group) by the exponent alone (5+ digits).
    """
    if _FACTORIAL.search(s):
        return True
    for m in _POWER.finditer(s):
        exponent = m.group(1).replace(" ", "")
        window = s[max(0, m.start() - 40) : m.start()]
        base = _POWER_BASE.search(window)
        if base is not None:
            if _power_digits(next(g for g in base.groups() if g is not None), exponent) > MAX_POWER_DIGITS:
                return True
        elif len(exponent.lstrip("+-").split(".")[0]) >= 5:
            return True
    return False


def _too_complex(pred: str) -> str | None:
    if len(pred) > MAX_VERIFY_CHARS:
        return "too-long"
    if _brace_depth(pred) > MAX_BRACE_DEPTH:
        return "too-deep"
    if _huge_number(pred):
        return "huge-number"
    return None


def _equivalent(pred: str, gold: str) -> tuple[bool, str]:
    if not pred.strip():
        return False, "empty"
    p, g = _normalize(pred), _normalize(gold)
    if p == g and p:
        return True, "string"
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return pn == gn, "numeric"
    reason = _too_complex(pred)
    if reason:
        return False, reason
    result = _VERIFIER.call({"op": "verify", "gold": gold, "pred": pred})
    if isinstance(result, str):
        return False, result  # "timeout", "no-verifier", "error: ..."
    return bool(result), "math-verify"


# --------------------------------------------------------------------------- reasoning-gym


def _rg_pred_cleanup(pred: str, gold_answer: str) -> str:
    """Undo LaTeX dressing; write numbers the way reasoning-gym's golds are written."""
    s = _TEXT_WRAP.sub(r"\1", pred).strip()
    if s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    num = _as_number(_normalize(s).replace("\\", ""))
    if num is not None and _as_number(gold_answer) is not None and num == num.to_integral_value():
        return str(int(num)) if len(s) < 100 else s
    return s


def _truncated_without_answer(extractor: str, pred: str, truncated: bool) -> Grade | None:
    """The grade of a sample cut at max_tokens whose answer came only from a fallback."""
    if truncated and extractor not in FINAL_ANSWER_EXTRACTORS:
        fallback = f"; {extractor} would give {pred[:40]!r}" if pred else ""
        return Grade("", False, "none_truncated", f"cut at max_tokens with no final answer{fallback}")
    return None


def _grade_rg(text: str, gold: str, truncated: bool) -> Grade | None:
    """Grade with the generator's scorer; None when `gold` is not the JSON tasks.py writes."""
    try:
        entry = json.loads(gold)["entry"]
        gold_answer = str(entry["answer"])
    except (ValueError, KeyError, TypeError):
        return None
    pred, extractor = extract_answer(text, rg=True, numeric_gold=_as_number(gold_answer.strip()) is not None)
    if (cut := _truncated_without_answer(extractor, pred, truncated)) is not None:
        return cut
    if not pred:
        return Grade("", False, extractor, "empty")
    pred = _rg_pred_cleanup(pred, gold_answer)
    if len(pred) > 4 * len(gold_answer) + MAX_VERIFY_CHARS or _huge_number(pred):
        return Grade(pred, False, extractor, "too-long" if len(pred) > MAX_VERIFY_CHARS else "huge-number")
    reply = _VERIFIER.call({"op": "rg", "gold": gold, "pred": pred})
    if isinstance(reply, str):
        return Grade(pred, False, extractor, reply)
    if "refused" in reply:
        return Grade(pred, False, "refused_grammar", f"{extractor} answer refused before the scorer: {reply['refused']}")
    score = float(reply["score"])
    return Grade(pred, score == 1.0, extractor, f"rg-score={score:g}")


# --------------------------------------------------------------------------- grade


def grade(
    text: str,
    gold: str,
    task: str,
    *,
    finish_reason: str | None = None,
    lenient_truncated: bool = False,
    think_start: str | None = THINK_START,
    think_end: str | None = THINK_END,
) -> Grade:
    """Extract the final answer from the answer phase of `text` and compare it with `gold`.

    `finish_reason` "length" marks a sample cut at max_tokens: without a final-answer
    marker it is incorrect (`none_truncated`) unless `lenient_truncated`.
    """
    text = answer_phase(text or "", think_start, think_end)
    gold = "" if gold is None else str(gold)
    truncated = finish_reason == "length" and not lenient_truncated
    if (task or "").startswith("rg:") and gold.lstrip().startswith("{"):
        graded = _grade_rg(text, gold, truncated)
        if graded is not None:
            return graded
    # Everything else, including an rg: row whose gold is a bare answer, is graded as math.
    letter = choice_gold(gold)
    pred, extractor = extract_answer(text, choices=letter is not None)
    if (cut := _truncated_without_answer(extractor, pred, truncated)) is not None:
        return cut
    if letter is not None:
        picked = _choice_letter(pred) if pred else None
        return Grade(pred, picked == letter, extractor, "choice")
    correct, detail = _equivalent(pred, gold)
    return Grade(pred, correct, extractor, detail)


def regrade_table(
    df: Any,
    *,
    lenient_truncated: bool = False,
    think_start: str | None = THINK_START,
    think_end: str | None = THINK_END,
) -> Any:
    """Recompute `pred`, `correct` and `extractor` of a sample table from its `text`, `gold`, `task`.

    The rules are `grade`'s, with each row's `finish_reason` when the table has one; pass
    the run's own options (its spec's `grading.lenient_truncated` and think tags). Returns
    a new polars DataFrame with `grader_version` set to `GRADER_VERSION`; every other
    column is left as it was. Scoring runs in the grading worker, as in `grade`.
    """
    import polars as pl

    missing = [c for c in ("text", "gold", "task") if c not in df.columns]
    if missing:
        raise ValueError(f"regrade_table needs columns text, gold and task; missing {', '.join(missing)}")
    reasons = df["finish_reason"] if "finish_reason" in df.columns else pl.Series([None] * len(df), dtype=pl.String)
    cache: dict[tuple[str, str, str, str | None], Grade] = {}
    graded: list[Grade] = []
    for (text, gold, task), reason in zip(df.select("text", "gold", "task").iter_rows(), reasons):
        key = (text or "", gold or "", task or "", reason)
        if key not in cache:
            cache[key] = grade(key[0], key[1], key[2], finish_reason=reason, lenient_truncated=lenient_truncated,
                               think_start=think_start, think_end=think_end)
        graded.append(cache[key])
    return df.with_columns(
        pl.Series("pred", [g.pred for g in graded], dtype=pl.String),
        pl.Series("correct", [g.correct for g in graded], dtype=pl.Boolean),
        pl.Series("extractor", [g.extractor for g in graded], dtype=pl.String),
        pl.lit(GRADER_VERSION, dtype=pl.String).alias("grader_version"),
    )


# --------------------------------------------------------------------------- verifier process


class _Verifier:
    """One persistent child process running math-verify and reasoning-gym scorers.

    Requests and replies are JSON lines over pipes; the parent waits with `select`, so a
    deadline holds from any thread. A child that misses it is killed (and restarted by
    the next call). Calls are serialized by a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._rg_loaded = False
        self._failed_at: float | None = None
        self._owner_pid = os.getpid()

    def _forget_if_forked(self) -> None:
        """A forked child must not share its parent's worker pipes: it starts its own."""
        if os.getpid() != self._owner_pid:
            self._lock = threading.Lock()
            self._proc, self._buffer, self._rg_loaded, self._failed_at = None, b"", False, None
            self._owner_pid = os.getpid()

    def _start(self) -> bool:
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_START_AFTER_S:
            return False
        env = dict(os.environ)
        env["THINKLAB_VERIFIER_SYS_PATH"] = json.dumps([p for p in sys.path if p])
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        code = (
            "import json, os, runpy, sys; "
            "sys.path[:] = json.loads(os.environ['THINKLAB_VERIFIER_SYS_PATH']); "
            f"runpy.run_path({os.path.abspath(__file__)!r}, run_name='__thinklab_verifier__')"
        )
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        except OSError:
            self._proc = None
            self._failed_at = time.monotonic()
            return False
        self._buffer = b""
        self._rg_loaded = False
        ready = self._read(STARTUP_TIMEOUT_S)
        if not isinstance(ready, dict) or not ready.get("ready"):
            self._kill()
            self._failed_at = time.monotonic()
            return False
        self._failed_at = None
        return True

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass

    def _read(self, timeout: float) -> Any:
        """The next JSON line from the child, "timeout", or "dead"."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return "dead"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            return "dead"

    def _send(self, request: dict, timeout: float) -> Any:
        try:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
        except (OSError, ValueError):
            return "dead"
        return self._read(timeout)

    def call(self, request: dict) -> Any:
        """The worker's answer (bool or float), or a reason string: timeout, no-verifier, error: ..."""
        self._forget_if_forked()
        with self._lock:
            for _attempt in range(2):  # a worker found dead before the call gets one restart
                if self._proc is None or self._proc.poll() is not None:
                    self._kill()
                    if not self._start():
                        return "no-verifier"
                if request["op"] == "rg" and not self._rg_loaded:
                    loaded = self._send({"op": "load_rg"}, STARTUP_TIMEOUT_S)
                    if not isinstance(loaded, dict) or "r" not in loaded:
                        self._kill()
                        return "no-verifier" if isinstance(loaded, str) else f"error: {loaded.get('e')}"
                    self._rg_loaded = True
                reply = self._send(request, VERIFY_TIMEOUT_S)
                if reply == "dead":
                    self._kill()
                    continue
                if reply == "timeout":
                    self._kill()
                    return "timeout"
                if "e" in reply:
                    return f"error: {reply['e']}"
                return reply["r"]
            return "error: verifier died"

    def close(self) -> None:
        """Stop the worker (also run at interpreter exit); the next call starts a new one."""
        if os.getpid() != self._owner_pid:
            return
        locked = self._lock.acquire(timeout=1.0)
        try:
            self._kill()
        finally:
            if locked:
                self._lock.release()


_VERIFIER = _Verifier()
atexit.register(_VERIFIER.close)


# Audit events the worker refuses while it serves a request: nothing it does to grade
# needs a process, a socket, a native library or a change to the file system.
_GUARDED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "os.remove", "os.rmdir",
    "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink", "os.truncate", "os.utime",
    "os.putenv", "os.unsetenv", "os.chdir", "shutil.rmtree", "shutil.copyfile", "shutil.move",
    "webbrowser.open", "urllib.Request",
})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install_guard() -> list[bool]:
    """Add an audit hook refusing `_GUARDED_EVENTS` and writes while `armed[0]`; returns `armed`.

    A second wall behind the answer grammar: an answer that still reached Python's `eval`
    could compute, but not act. Refusals raise PermissionError (an OSError, which the
    import system already tolerates when it cannot write a bytecode cache).
    """
    armed = [False]

    def hook(event: str, args: tuple) -> None:
        if not armed[0]:
            return
        if event == "open":
            mode, flags = (args[1], args[2]) if len(args) >= 3 else (None, 0)
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if not writes:
                return
        elif event not in _GUARDED_EVENTS:
            return
        raise PermissionError(f"the grading worker refuses {event} while grading")

    sys.addaudithook(hook)
    return armed


def _worker_main() -> None:  # runs in the child process only
    import logging
    import runpy

    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    # Replies go to a private copy of stdout; anything a library prints goes to stderr.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(reply_fd, "wb", buffering=0)
    logging.disable(logging.CRITICAL)

    from math_verify import parse, verify

    # the sibling file, not `thinklab.scorer_safety`: the worker needs no package on its path
    safety = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "scorer_safety.py"))
    armed = _install_guard()

    @lru_cache(maxsize=4096)
    def parsed(expr: str) -> Any:
        return parse("\\boxed{" + expr + "}", parsing_timeout=None)

    datasets: dict[str, Any] = {}
    risky: dict[str, list[str]] = {}

    def rg_score(gold: str, pred: str) -> dict:
        import dataclasses

        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        spec = json.loads(gold)
        name, entry = spec["dataset"], spec["entry"]
        key = json.dumps([name, spec.get("config", {})], sort_keys=True)
        if key not in datasets:
            datasets[key] = reasoning_gym.create_dataset(name, **spec.get("config", {}))
        if name not in risky:
            risky[name] = safety["scan_dataset"](DATASETS[name][0])
        if risky[name]:
            config = datasets[key].config
            names = safety["allowed_names"](str(entry["answer"]), entry.get("metadata"),
                                            dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {})
            why = safety["refusal"](pred, names)
            if why is not None:
                return {"refused": why}
        armed[0] = True
        try:
            return {"score": float(datasets[key].score_answer(pred, entry))}
        finally:
            armed[0] = False

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj).encode() + b"\n")

    reply({"ready": 1})
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            op = request["op"]
            if op == "verify":
                armed[0] = True
                try:
                    gold, pred = parsed(request["gold"]), parsed(request["pred"])
                    result: Any = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
                finally:
                    armed[0] = False
            elif op == "rg":
                result = rg_score(request["gold"], request["pred"])
            elif op == "load_rg":
                import reasoning_gym  # noqa: F401

                result = True
            else:
                raise ValueError(f"unknown op {op!r}")
            reply({"r": result})
        except Exception as exc:  # noqa: BLE001 - any failure is an answer for the parent
            reply({"e": f"{type(exc).__name__}: {str(exc)[:200]}"})


if __name__ == "__thinklab_verifier__":
    _worker_main()
