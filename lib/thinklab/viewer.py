"""The trace viewer: one sample as self-contained HTML, and a notebook widget to browse runs.

`sample_html(row, tokenizer)` renders the prompt, the generated text token by token on a
background coloured by the token's entropy (hover: the token, its entropy and
log-probability), the thinking/answer boundary (`n_thinking_tokens`), forced tokens
(budget cues: NaN entropy) and "Wait" insertions, the gold and the prediction in readable
form, and correct / truncated badges. Model text is untrusted: every piece of it is
HTML-escaped, the page has no script and loads nothing. `show()` writes such a page for a
stored run (what `thinklab show` does); `widget()` browses runs in JupyterLab.
The tokenizer is loaded offline from the run's model directory; no weights are loaded.
"""

from __future__ import annotations

import functools
import html
import json
import math
from pathlib import Path
from typing import Sequence

import polars as pl

# entropy (nats) at which the colour saturates: a fixed scale, so samples compare by eye
ENTROPY_SCALE = 4.0

_CSS = """
.tl-view{font-family:system-ui,-apple-system,Segoe UI,sans-serif;color:#222;max-width:70em}
.tl-head{display:flex;flex-wrap:wrap;gap:.5em;align-items:center;margin-bottom:.6em}
.tl-badge{padding:.1em .6em;border-radius:1em;font-size:.85em;font-weight:600;color:#fff}
.tl-ok{background:#1a7f37}.tl-bad{background:#b42318}.tl-trunc{background:#9a6700}.tl-info{background:#57606a}
.tl-kv{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;margin:.5em 0 .8em}
.tl-kv dt{font-weight:600;color:#57606a}.tl-kv dd{margin:0;font-family:ui-monospace,monospace;white-space:pre-wrap}
.tl-text{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;line-height:1.7;
 white-space:pre-wrap;word-break:break-word;border:1px solid #d0d7de;border-radius:6px;padding:.7em}
.tl-tok{border-radius:2px}.tl-tok:hover{outline:1px solid #24292f}
.tl-forced{outline:1px dashed #0969da;background:#ddf4ff!important;color:#0550ae}
.tl-wait{outline:2px solid #8250df;background:#fbefff!important;color:#6639ba;font-weight:600}
.tl-boundary{display:inline-block;margin:0 .2em;padding:0 .4em;font-family:system-ui,sans-serif;font-size:11px;
 color:#fff;background:#0969da;border-radius:3px;vertical-align:middle}
.tl-prompt{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px;background:#f6f8fa;padding:.6em;
 border-radius:6px}
.tl-legend{display:flex;gap:.8em;align-items:center;font-size:12px;color:#57606a;margin:.4em 0}
.tl-ramp{width:12em;height:.8em;border:1px solid #d0d7de;background:linear-gradient(to right,%s)}
"""


def entropy_colour(entropy: float) -> str:
    """Background of a token: white at 0 nats to red at `ENTROPY_SCALE` nats and beyond."""
    x = min(max(entropy / ENTROPY_SCALE, 0.0), 1.0)
    # white -> yellow -> red, light enough that black text stays readable
    if x < 0.5:
        r, g, b = 255, 255, round(255 - 2 * x * 155)
    else:
        r, g, b = 255, round(255 - (x - 0.5) * 2 * 145), 100
    return f"rgb({r},{g},{b})"


def token_pieces(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """The text each token adds, decoded one by one.

    A character split across tokens (byte-level BPE) decodes to U+FFFD alone; such a run
    is decoded together and its text given to its first token, the rest get "".
    """
    ids = [int(i) for i in token_ids]
    pieces, i = [], 0
    while i < len(ids):
        piece = tokenizer.decode([ids[i]], skip_special_tokens=False)
        j = i + 1
        while "\ufffd" in piece and j < len(ids) and j - i < 4:
            j += 1
            piece = tokenizer.decode(ids[i:j], skip_special_tokens=False)
        if "\ufffd" in piece:  # not a split character after all: keep the single token's text
            j = i + 1
            piece = tokenizer.decode([ids[i]], skip_special_tokens=False)
        pieces += [piece] + [""] * (j - i - 1)
        i = j
    return pieces


def readable_gold(gold: str | None) -> str:
    """The answer inside a reasoning-gym gold (a JSON blob), other golds as they are."""
    if gold is None:
        return ""
    if gold.startswith("{"):
        try:
            blob = json.loads(gold)
        except ValueError:
            return gold
        entry = blob.get("entry") if isinstance(blob, dict) else None
        if isinstance(entry, dict) and "answer" in entry:
            return str(entry["answer"])
        if isinstance(blob, dict) and "answer" in blob:
            return str(blob["answer"])
    return gold


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _forced_kinds(pieces: list[str], entropy: list, wait_string: str) -> list[str | None]:
    """Per token: None (sampled), "wait" (a forced "Wait" insertion) or "forced" (another forced cue)."""
    kinds: list[str | None] = [None] * len(pieces)
    i = 0
    while i < len(pieces):
        if not _nan(entropy[i]):
            i += 1
            continue
        j = i
        while j < len(pieces) and _nan(entropy[j]):
            j += 1
        span = "".join(pieces[i:j])
        kind = "wait" if wait_string and wait_string.strip() and wait_string.strip() in span else "forced"
        kinds[i:j] = [kind] * (j - i)
        i = j
    return kinds


def sample_html(row: dict, tokenizer, *, wait_string: str = "Wait", title: str | None = None,
                full_page: bool = True) -> str:
    """One sample (a row of the sample table, as a dict) as HTML; escaped, no script, nothing loaded."""
    e = html.escape
    ids = list(row.get("token_ids") or [])
    entropy = list(row.get("token_entropy") or [])
    logprob = list(row.get("token_logprob") or [])
    entropy += [math.nan] * (len(ids) - len(entropy))
    logprob += [math.nan] * (len(ids) - len(logprob))
    pieces = token_pieces(tokenizer, ids) if ids else []
    kinds = _forced_kinds(pieces, entropy, wait_string)
    n_think = row.get("n_thinking_tokens")
    boundary = n_think if n_think is not None and 0 < n_think < len(ids) else None

    spans = []
    for k, (piece, ent, lp, kind) in enumerate(zip(pieces, entropy, logprob, kinds)):
        if k == boundary:
            spans.append('<span class="tl-boundary" title="end of thinking: the answer phase starts here">'
                         "answer &#9656;</span>")
        if not piece:
            continue
        if kind is None:
            tip = f"token {piece!r}\nentropy {ent:.3f} nats\nlog-probability {lp:.3f}"
            spans.append(f'<span class="tl-tok" style="background:{entropy_colour(ent)}" '
                         f'title="{e(tip, quote=True)}">{e(piece)}</span>')
        else:
            what = "forced 'Wait' insertion" if kind == "wait" else "forced token (budget cue)"
            tip = f"token {piece!r}\n{what}: not sampled, no entropy"
            spans.append(f'<span class="tl-tok tl-{kind}" title="{e(tip, quote=True)}">{e(piece)}</span>')

    correct, finish = row.get("correct"), row.get("finish_reason")
    badges = [
        '<span class="tl-badge tl-ok">correct</span>' if correct else '<span class="tl-badge tl-bad">incorrect</span>',
    ]
    if finish == "length":
        badges.append('<span class="tl-badge tl-trunc">truncated at max_tokens</span>')
    elif finish == "budget":
        badges.append('<span class="tl-badge tl-info">thinking budget forced</span>')
    n_forced = sum(k is not None for k in kinds)
    sampled = [x for x in entropy if not _nan(x)]
    facts = {
        "run": row.get("run_id"),
        "problem": f"{row.get('problem_id')}  sample {row.get('sample_idx')}",
        "model": f"{row.get('model')}  T={_fmt(row.get('temperature'))}  task {row.get('task')}",
        "gold": readable_gold(row.get("gold")),
        "prediction": row.get("pred") if row.get("pred") is not None else "(none extracted)",
        "extractor": row.get("extractor"),
        "tokens": (f"{len(ids)} ({row.get('n_thinking_tokens')} thinking, {row.get('n_answer_tokens')} answer, "
                   f"{n_forced} forced); finish {finish}"),
        "mean entropy": f"{sum(sampled) / len(sampled):.3f} nats over sampled tokens" if sampled else "-",
    }
    body = (
        f'<div class="tl-view"><div class="tl-head"><strong>{e(title or "trace")}</strong>{"".join(badges)}</div>'
        '<dl class="tl-kv">'
        + "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in facts.items() if v is not None)
        + "</dl>"
        f'<details><summary>prompt</summary><div class="tl-prompt">{e(row.get("prompt") or "")}</div></details>'
        f'<div class="tl-legend">entropy 0 <span class="tl-ramp"></span> &ge;{ENTROPY_SCALE:g} nats'
        ' <span class="tl-tok tl-forced">forced</span> <span class="tl-tok tl-wait">Wait</span>'
        ' <span class="tl-boundary">answer &#9656;</span> hover a token for its numbers</div>'
        f'<div class="tl-text">{"".join(spans)}</div></div>'
    )
    ramp = ",".join(entropy_colour(ENTROPY_SCALE * i / 4) for i in range(5))
    style = f"<style>{_CSS % ramp}</style>"
    if not full_page:
        return style + body
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{e(title or "thinklab trace")}</title>'
            f'{style}</head><body style="margin:1.2em">{body}</body></html>')


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def run_tokenizer(run_dir: Path | str):
    """The tokenizer of a stored run's model, loaded offline (no weights)."""
    from thinklab import models
    from thinklab.store import RunStore

    meta = RunStore(run_dir).read_meta()
    recorded = (meta.get("model") or {}).get("path") if isinstance(meta.get("model"), dict) else None
    if recorded and Path(recorded).is_dir():
        return _tokenizer_at(recorded)
    name = (meta.get("spec") or {}).get("model", {}).get("name", "default")
    resolved = models.resolve(name, materialize_missing=False)
    if not Path(resolved.path).is_dir():
        raise FileNotFoundError(f"the tokenizer of run {meta.get('run_id')} needs model {name!r} on disk "
                                f"({resolved.path}); materialize it with `thinklab models --materialize {name}`")
    return _tokenizer_at(resolved.path)


def _pick(df: pl.DataFrame, problem: str | None, sample: int | None, run: str) -> dict:
    rows = df
    if problem is not None:
        rows = rows.filter(pl.col("problem_id") == problem)
        if rows.is_empty():
            few = ", ".join(df["problem_id"].unique(maintain_order=True).head(5).to_list())
            raise ValueError(f"run {run} has no problem {problem!r}; its problems include {few}")
    if sample is not None:
        picked = rows.filter(pl.col("sample_idx") == sample)
        if picked.is_empty():
            raise ValueError(f"run {run} has no sample {sample} of that problem; sample indices are "
                             f"{sorted(rows['sample_idx'].unique().to_list())}")
        rows = picked
    return rows.row(0, named=True)


def show(run: str | Path, problem: str | None = None, sample: int | None = None, *, out: Path | str | None = None,
         runs_root: Path | str | None = None) -> str:
    """The HTML page of one sample of a stored run (the first one by default); written to `out` if given."""
    from thinklab.catalog import resolve_run
    from thinklab.store import RunStore

    run_dir = resolve_run(run, runs_root)
    store = RunStore(run_dir)
    df = store.load()
    if df.is_empty():
        raise ValueError(f"run {run_dir.name} has no stored samples yet")
    row = _pick(df, problem, sample, run_dir.name)
    wait = ((store.read_meta().get("spec") or {}).get("budget") or {}).get("wait_string") or "Wait"
    page = sample_html(row, run_tokenizer(run_dir), wait_string=wait,
                       title=f"{row['problem_id']} · sample {row['sample_idx']}")
    if out is not None:
        Path(out).write_text(page, encoding="utf-8")
    return page


FILTERS = {
    "all": None,
    "correct": pl.col("correct"),
    "incorrect": ~pl.col("correct"),
    "truncated": pl.col("finish_reason") == "length",
}


def widget(runs_root: Path | str | None = None):
    """A browser for stored runs: choose a run, filter correct / incorrect / truncated, pick a sample."""
    import ipywidgets as w

    from thinklab.catalog import runs
    from thinklab.store import RunStore

    catalog = runs(runs_root)
    options = [(f"{r['run_id']}  {r['model']}  {r['task']}  T={_fmt(r['temperature'])}  "
                f"acc {_fmt(r['accuracy'])}", r["path"]) for r in catalog.iter_rows(named=True) if r["n_rows"]]
    run_box = w.Dropdown(options=options, description="run", layout=w.Layout(width="46em"))
    filter_box = w.ToggleButtons(options=list(FILTERS), description="show")
    sample_box = w.Dropdown(options=[], description="sample", layout=w.Layout(width="46em"))
    view = w.HTML(value="" if options else "<em>no stored runs yet: run a notebook or `thinklab generate`</em>")
    state: dict = {}

    def load_run(_=None):
        if run_box.value is None:
            return
        state["df"] = RunStore(run_box.value).load()
        state["tok"] = run_tokenizer(run_box.value)
        refilter()

    def refilter(_=None):
        df = state.get("df")
        if df is None:
            return
        cond = FILTERS[filter_box.value]
        rows = df if cond is None else df.filter(cond)
        sample_box.options = [
            (f"{r['problem_id']} #{r['sample_idx']}  {'correct' if r['correct'] else 'incorrect'}  "
             f"{r['n_tokens']} tokens  {r['finish_reason']}", (r["problem_id"], r["sample_idx"]))
            for r in rows.select("problem_id", "sample_idx", "correct", "n_tokens", "finish_reason").iter_rows(named=True)
        ]
        if not sample_box.options:
            view.value = f"<em>no {html.escape(filter_box.value)} samples in this run</em>"
            return
        sample_box.value = sample_box.options[0][1]  # new options leave no value selected
        render()

    def render(_=None):
        if sample_box.value is None or "df" not in state:
            return
        pid, idx = sample_box.value
        row = state["df"].filter((pl.col("problem_id") == pid) & (pl.col("sample_idx") == idx)).row(0, named=True)
        view.value = sample_html(row, state["tok"], title=f"{pid} · sample {idx}", full_page=False)

    run_box.observe(load_run, names="value")
    filter_box.observe(refilter, names="value")
    sample_box.observe(render, names="value")
    load_run()
    return w.VBox([run_box, filter_box, sample_box, view])
