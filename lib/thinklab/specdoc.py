"""Help text for spec fields, read from the comments next to them in `thinklab.config`.

The spec dataclasses document each field with a trailing comment (or a comment block
right above it); this module turns those comments into the help of the CLI flags derived
from the fields, so a flag's help cannot drift from the spec it sets. Source only; no
imports of models or data.
"""

from __future__ import annotations

import functools
import inspect
import io
import re
import tokenize

_FIELD = re.compile(r"^    (\w+)\s*:")


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} for the fields of dataclass `cls` that have one."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line number -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    out: dict[str, str] = {}
    for number, line in enumerate(source.splitlines(), start=1):
        match = _FIELD.match(line)
        if not match:
            continue
        if number in comments:
            out[match.group(1)] = comments[number]
            continue
        above, k = [], number - 1
        while k in comments and k not in code_lines:  # a comment block directly above the field
            above.insert(0, comments[k])
            k -= 1
        if above:
            out[match.group(1)] = " ".join(above)
    return out


def field_help(cls: type, name: str, default) -> str:
    """'<the field's comment> (default: <default>)'; argparse-safe (percent signs escaped)."""
    text = field_comments(cls).get(name) or name.replace("_", " ")
    shown = "none" if default is None else "|".join(default) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})".replace("%", "%%")
