"""Which reasoning-gym scorers would run a model's answer as code, and the grammar that stops them.

Some reasoning-gym generators score an answer by handing it to Python's `eval` or to
sympy's `parse_expr` / `sympify` (which call `eval`): `\\boxed{__import__('os').system(...)}`
would run. This module finds those scorers by reading the installed package's source
(`scan_dataset`, `scan_reasoning_gym`), so a new release cannot add one unnoticed, and
checks an answer against a strict grammar before such a scorer sees it (`refusal`).

The scan follows the answer: starting at `score_answer`'s answer parameter, it marks every
name assigned from an expression that mentions a marked name, follows calls into
reasoning-gym's own functions with the marked arguments, and reports each call of a risky
function (`RISKY_CALLS`, or anything from sympy, which sympifies strings) that receives a
marked value, and each `score_answer` it cannot resolve (dynamic dispatch). A scorer that
only evaluates its own gold (number_sorting's `eval(entry["answer"])`) is not reported.

The grammar admits ASCII numbers, `+ - * / ^ **`, parentheses, whitespace, and only the
names the item itself uses (identifiers of its gold answer and the variable names of its
metadata and config) plus a few elementary functions; never a keyword, a builtin, a
dunder, a dot, a quote, a bracket or a comma. With those tokens alone an expression can
do arithmetic and nothing else. This module imports reasoning-gym only inside the scan.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import keyword
import re
import textwrap
from typing import Any, Callable, Iterable

RISKY_CALLS = frozenset({"eval", "exec", "compile", "parse_expr", "sympify", "S", "__import__", "import_module", "lambdify"})
# sympy functions an answer may use where the gold does not (sqrt(u) for u**(1/2)); harmless on arithmetic
ELEMENTARY_FUNCTIONS = frozenset(
    {"sqrt", "exp", "log", "ln", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan",
     "sinh", "cosh", "tanh", "pi", "E"}
)
# (names starting with "_" are refused by `_usable`, except "_" itself: n_queens boards are made of it)
_FORBIDDEN_NAMES = frozenset(n for n in dir(builtins) if not n.startswith("_")) | frozenset(keyword.kwlist) | (frozenset(keyword.softkwlist) - {"_"}) | {"self", "cls"}
_TOKEN = re.compile(r"[ \t\r\n]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+|\*\*|[-+*/^()]|[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_MUTATORS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "appendleft", "put", "push"})
MAX_NAME_CHARS = 64  # longer identifiers are not taken from a gold answer


# --------------------------------------------------------------------------- the grammar


def _usable(name: str) -> bool:
    return (len(name) <= MAX_NAME_CHARS and name not in _FORBIDDEN_NAMES
            and not (name.startswith("_") and name != "_"))


def allowed_names(gold_answer: str, metadata: dict | None = None, config: dict | None = None) -> frozenset[str]:
    """Names an answer to this item may use: its gold's identifiers, its variables, elementary functions."""
    names = set(_IDENT.findall(gold_answer or "")) | set(ELEMENTARY_FUNCTIONS)
    for source in (metadata or {}, config or {}):
        for key in ("variable", "variables", "var", "vars"):
            value = source.get(key)
            for item in ([value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []):
                if isinstance(item, str) and _IDENT.fullmatch(item):
                    names.add(item)
    return frozenset(n for n in names if _usable(n))


def refusal(answer: str, names: Iterable[str]) -> str | None:
    """None when `answer` is inside the grammar, else why not (names the first offending token)."""
    allowed = frozenset(names)
    pos = 0
    while pos < len(answer):
        m = _TOKEN.match(answer, pos)
        if m is None:
            return f"character {answer[pos]!r} at {pos} is outside the answer grammar"
        token = m.group()
        if (token[0].isalpha() or token[0] == "_") and token not in allowed:
            return f"name {token[:40]!r} at {pos} is not one this item allows ({', '.join(sorted(allowed - ELEMENTARY_FUNCTIONS)) or 'none'})"
        pos = m.end()
    return None


# --------------------------------------------------------------------------- the scan


def _dotted(node: ast.AST) -> str | None:
    """'a.b.c' for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _mentions(node: ast.AST, tainted: set[str]) -> bool:
    for sub in ast.walk(node):
        key = _dotted(sub) if isinstance(sub, (ast.Name, ast.Attribute)) else None
        if key is not None:
            parts = key.split(".")
            if any(".".join(parts[:i]) in tainted for i in range(1, len(parts) + 1)):
                return True
    return False


def _target_names(target: ast.AST) -> list[str]:
    out = []
    for sub in ast.walk(target):
        if isinstance(sub, (ast.Name, ast.Attribute)) and (key := _dotted(sub)) is not None:
            out.append(key)
        elif isinstance(sub, ast.Subscript) and (key := _dotted(sub.value)) is not None:
            out.append(key)  # d[k] = answer taints d
    return out


def _propagate(tree: ast.AST, tainted: set[str]) -> set[str]:
    """Names assigned (directly or through containers) from expressions that mention a tainted name."""
    tainted = set(tainted)
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            pairs: list[tuple[list[ast.AST], ast.AST]] = []
            if isinstance(node, ast.Assign):
                pairs.append((node.targets, node.value))
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                pairs.append(([node.target], node.value))
            elif isinstance(node, ast.NamedExpr):
                pairs.append(([node.target], node.value))
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                pairs.append(([node.target], node.iter))
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                pairs.append(([node.optional_vars], node.context_expr))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS
                  and any(_mentions(a, tainted) for a in [*node.args, *(k.value for k in node.keywords)])):
                # lst.append(answer), d.update(...): the receiver now holds the answer
                if (key := _dotted(node.func.value)) is not None:
                    pairs.append(([ast.Name(id=key)], node))
            for targets, value in pairs:
                if _mentions(value, tainted):
                    for target in targets:
                        for name in _target_names(target) if not isinstance(target, ast.Name) else [target.id]:
                            if name not in tainted:
                                tainted.add(name)
                                changed = True
    return tainted


def _resolve(expr: ast.AST, func: Callable, owner: type | None) -> tuple[Any, bool] | None:
    """(object, called_on_instance) that `expr` names inside `func`, or None when unknown."""
    key = _dotted(expr)
    if key is None:
        if (isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Call)
                and isinstance(expr.value.func, ast.Name) and expr.value.func.id == "super" and owner is not None):
            for base in owner.__mro__[1:]:
                if expr.attr in vars(base):
                    return _unwrap_member(vars(base)[expr.attr]), True
        return None
    head, *rest = key.split(".")
    if head in ("self", "cls") and owner is not None:
        if not rest:
            return None
        obj: Any = owner
        on_instance = True
    else:
        scope = dict(vars(builtins))
        scope.update(getattr(func, "__globals__", {}))
        for name, cell in zip(func.__code__.co_freevars, func.__closure__ or ()):
            try:
                scope[name] = cell.cell_contents
            except ValueError:  # an empty cell
                pass
        if head not in scope:
            return None
        obj, on_instance = scope[head], False
    for attr in rest:
        if isinstance(obj, type):
            member = next((vars(k)[attr] for k in obj.__mro__ if attr in vars(k)), None)
            if member is None:
                return None
            obj = _unwrap_member(member)
        else:
            try:
                obj = inspect.getattr_static(obj, attr)
            except AttributeError:
                return None
            obj = _unwrap_member(obj)
            on_instance = False
    return obj, on_instance


def _unwrap_member(member: Any) -> Any:
    if isinstance(member, (staticmethod, classmethod)):
        return member.__func__
    if isinstance(member, property):
        return member.fget
    return member


def _in_package(obj: Any, package: str) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == package or module.startswith(package + ".")


def _tainted_params(call: ast.Call, callee: Callable, tainted: set[str], bound: bool) -> set[str] | None:
    """The callee's parameters that receive a tainted argument (None: all of them)."""
    try:
        params = list(inspect.signature(callee).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = params[1:] if bound and params and params[0].name in ("self", "cls") else params
    out: set[str] = set()
    for i, arg in enumerate(call.args):
        if isinstance(arg, ast.Starred) and _mentions(arg, tainted):
            return None
        if _mentions(arg, tainted):
            if i < len(positional) and positional[i].kind in (positional[i].POSITIONAL_ONLY, positional[i].POSITIONAL_OR_KEYWORD):
                out.add(positional[i].name)
            else:
                star = next((p for p in positional if p.kind == p.VAR_POSITIONAL), None)
                if star is None:
                    return None
                out.add(star.name)
    for kw in call.keywords:
        if _mentions(kw.value, tainted):
            if kw.arg is None:
                return None
            names = {p.name for p in params}
            if kw.arg in names:
                out.add(kw.arg)
            else:
                star = next((p for p in params if p.kind == p.VAR_KEYWORD), None)
                if star is None:
                    return None
                out.add(star.name)
    return out


class _Scan:
    def __init__(self, dataset_cls: type, package: str = "reasoning_gym"):
        self.cls = dataset_cls
        self.package = package
        self.findings: list[str] = []
        self.seen: set[tuple[Any, frozenset[str] | None]] = set()

    def function(self, func: Callable, tainted_params: set[str] | None, owner: type | None) -> None:
        func = inspect.unwrap(func)
        key = (getattr(func, "__code__", func), frozenset(tainted_params) if tainted_params is not None else None)
        if key in self.seen or not hasattr(func, "__code__"):
            return
        self.seen.add(key)
        try:
            source = textwrap.dedent(inspect.getsource(func))
            tree = ast.parse(source)
        except (OSError, TypeError, SyntaxError):
            self.findings.append(f"{func.__qualname__}: source not readable, treated as risky")
            return
        where = f"{func.__module__}.{func.__qualname__}"
        first = func.__code__.co_firstlineno
        params = set(func.__code__.co_varnames[: func.__code__.co_argcount + func.__code__.co_kwonlyargcount])
        if func.__code__.co_flags & inspect.CO_VARARGS or func.__code__.co_flags & inspect.CO_VARKEYWORDS:
            params |= set(func.__code__.co_varnames[func.__code__.co_argcount + func.__code__.co_kwonlyargcount:][:2])
        tainted = _propagate(tree, params if tainted_params is None else set(tainted_params))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            args = [*node.args, *(k.value for k in node.keywords)]
            if not any(_mentions(a, tainted) for a in args):
                continue
            line = first + node.lineno - 1
            # the called name, and functions passed by name (map(eval, parts)); nested calls get their own visit
            refs = [node.func, *(a for a in args if isinstance(a, (ast.Name, ast.Attribute)))]
            names = {r.id if isinstance(r, ast.Name) else r.attr for r in refs if isinstance(r, (ast.Name, ast.Attribute))}
            risky = sorted(names & RISKY_CALLS)
            if risky:
                self.findings.append(f"{where} line {line}: {', '.join(risky)} on the answer")
                continue
            resolved = _resolve(node.func, func, owner)
            if resolved is None:
                if isinstance(node.func, ast.Attribute) and node.func.attr == "score_answer":
                    self.findings.append(f"{where} line {line}: score_answer of an object the scan cannot resolve")
                continue
            callee, bound = resolved
            if _in_package(callee, "sympy") or _in_package(type(callee), "sympy"):
                self.findings.append(f"{where} line {line}: sympy {getattr(callee, '__name__', callee)!s} on the answer")
            elif _in_package(callee, self.package) and callable(callee):
                if isinstance(callee, type):
                    for method in ("__init__", "__call__", "__new__"):
                        if method in vars(callee):
                            self.function(_unwrap_member(vars(callee)[method]), None, callee)
                    continue
                callee_owner = owner if bound else None
                self.function(callee, _tainted_params(node, callee, tainted, bound), callee_owner)


def scan_dataset(dataset_cls: type) -> list[str]:
    """Where the answer given to `dataset_cls.score_answer` reaches a risky call ([] when nowhere)."""
    member = next((vars(k)["score_answer"] for k in dataset_cls.__mro__ if "score_answer" in vars(k)), None)
    if member is None:
        return []
    scorer = _unwrap_member(member)
    params = [p for p in inspect.signature(scorer).parameters if p not in ("self", "cls")]
    scan = _Scan(dataset_cls)
    scan.function(scorer, {params[0]} if params else None, dataset_cls)
    return scan.findings


def scan_reasoning_gym() -> dict[str, list[str]]:
    """{dataset name: findings} for every registered reasoning-gym dataset whose scorer is at risk."""
    from reasoning_gym.factory import DATASETS

    return {name: found for name in sorted(DATASETS) if (found := scan_dataset(DATASETS[name][0]))}
