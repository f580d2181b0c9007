"""The trace viewer on synthetic rows tokenized by the embedded SmolLM2 tokenizer (no weights
loaded): model text is escaped (a `<script>` token stays text), forced tokens and "Wait"
insertions are marked, the thinking/answer boundary sits before token n_thinking_tokens,
the tokens' text adds up to the trace, golds are readable; `thinklab show` writes the page
from a subprocess; the widget filters samples. A light browser test loads the page in
headless Chromium and checks the coloured tokens and their hover titles."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest

from thinklab.runner import run_id
from thinklab import viewer
from thinklab.config import ModelSpec, RunSpec, SamplingSpec

from synthetic_runs import make_row, write_run

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def tokenizer_path():
    from thinklab import models

    return models.resolve("default").path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)


def traced_row(tokenizer, run_id="r0", problem="rg:basic_arithmetic/7", sample=0, correct=False, finish="budget"):
    """Thinking with a hostile token text, a forced 'Wait', more thinking, a forced answer cue, an answer."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    parts = [("Let me think <script>alert(1)</script> about 2+2 é.", False), ("\nWait", True),
             (", it is 4.", False), ("\n\nFinal answer: \\boxed{", True), ("4}", False)]
    ids, ent, lp = [], [], []
    n_think = 0
    for k, (text, forced) in enumerate(parts):
        t = enc(text)
        ids += t
        ent += [math.nan] * len(t) if forced else [0.25 * (i % 17) for i in range(len(t))]
        lp += [math.nan] * len(t) if forced else [-0.1 * (i % 5) for i in range(len(t))]
        if k == 2:
            n_think = len(ids)
    gold = json.dumps({"dataset": "basic_arithmetic", "config": {}, "entry": {"answer": "4", "question": "2+2?"}})
    return make_row(run_id, problem, sample, correct=correct, n_tokens=len(ids), entropy=ent, finish=finish,
                    token_ids=ids, token_logprob=lp, n_thinking_tokens=n_think, n_answer_tokens=len(ids) - n_think,
                    gold=gold, pred="4" if correct else "the answer is five", prompt="<|im_start|>user\n2+2?<b>")


class Spans(HTMLParser):
    """Collects the token spans (class, title, text) and the order of boundary markers among them."""

    def __init__(self):
        super().__init__()
        self.tokens, self.events, self._open, self.tags = [], [], None, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        cls = attrs.get("class") or ""
        if tag == "span" and "tl-tok" in cls.split() and self._in_text:
            self._open = {"class": cls, "title": attrs.get("title"), "style": attrs.get("style"), "text": ""}
        if tag == "span" and cls == "tl-boundary" and self._in_text:
            self.events.append(("boundary", len(self.tokens)))
        if tag == "div" and cls == "tl-text":
            self._in_text = True

    _in_text = False

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.tokens.append(self._open)
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data


def test_html_escapes_marks_forced_and_boundary(tokenizer):
    row = traced_row(tokenizer)
    page = viewer.sample_html(row, tokenizer)
    assert "<script" not in page.lower() and "&lt;" in page
    assert "<b>" not in page and "&lt;b&gt;" in page  # the prompt is escaped too
    parsed = Spans()
    parsed.feed(page)
    assert "script" not in parsed.tags  # the hostile text stays text: its tokens are spans
    assert "<script>alert(1)</script>" in "".join(t["text"] for t in parsed.tokens)
    # the tokens' texts, unescaped by the parser, add up to the decoded trace
    assert "".join(t["text"] for t in parsed.tokens) == tokenizer.decode(row["token_ids"])
    forced = [t for t in parsed.tokens if "tl-forced" in t["class"]]
    waits = [t for t in parsed.tokens if "tl-wait" in t["class"]]
    n_nan = sum(math.isnan(x) for x in row["token_entropy"])
    assert "".join(t["text"] for t in waits).strip() == "Wait"
    assert "".join(t["text"] for t in forced) == "\n\nFinal answer: \\boxed{"
    assert len(forced) + len(waits) == n_nan
    assert all("no entropy" in t["title"] for t in forced + waits)
    sampled = [t for t in parsed.tokens if t not in forced and t not in waits]
    assert all(t["style"].startswith("background:rgb(") and "entropy" in t["title"] for t in sampled)
    first = sampled[0]["title"]
    assert f"entropy {row['token_entropy'][0]:.3f} nats" in first and "log-probability" in first
    # the boundary marker comes right before token n_thinking_tokens (all pieces here are non-empty)
    assert parsed.events == [("boundary", row["n_thinking_tokens"])]
    assert "<dt>gold</dt><dd>4</dd>" in page and "the answer is five" in page
    assert "incorrect" in page and "thinking budget forced" in page


def test_token_pieces_keep_split_characters_whole(tokenizer):
    ids = tokenizer("naïve 🙂 ok", add_special_tokens=False)["input_ids"]
    pieces = viewer.token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_readable_gold():
    assert viewer.readable_gold(json.dumps({"entry": {"answer": "-2"}})) == "-2"
    assert viewer.readable_gold("1600") == "1600"
    assert viewer.readable_gold("{not json") == "{not json"


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory, tokenizer, tokenizer_path):
    root = tmp_path_factory.mktemp("runs")
    spec = RunSpec(model=ModelSpec(name="default"), n_problems=2, sampling=SamplingSpec(n=2))
    rows = [traced_row(tokenizer, run_id(spec), f"rg:basic_arithmetic/{p}", s, correct=(p == 1),
                       finish="length" if s == 1 else "stop") for p in range(2) for s in range(2)]
    write_run(root, spec, rows, model_path=tokenizer_path)
    return root, run_id(spec), rows


def test_cli_show_writes_a_self_contained_page(viewer_run, tmp_path):
    root, run_id, rows = viewer_run
    out = tmp_path / "view.html"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    done = subprocess.run([sys.executable, "-m", "thinklab.cli", "show", run_id[:8], "--runs", str(root),
                           "--problem", "rg:basic_arithmetic/1", "--sample", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert "rg:basic_arithmetic/1 · sample 1" in page and "truncated at max_tokens" in page and "correct" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    bad = subprocess.run([sys.executable, "-m", "thinklab.cli", "show", run_id, "--runs", str(root),
                          "--problem", "gsm8k/1"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "no problem 'gsm8k/1'" in bad.stderr


def test_widget_filters_and_renders(viewer_run):
    root, run_id, rows = viewer_run
    box = viewer.widget(root)
    run_box, filter_box, sample_box, view = box.children
    assert run_box.value.endswith(run_id)
    assert len(sample_box.options) == len(rows)
    for name, keep in (("correct", lambda r: r["correct"]), ("incorrect", lambda r: not r["correct"]),
                       ("truncated", lambda r: r["finish_reason"] == "length")):
        filter_box.value = name
        assert [v for _, v in sample_box.options] == [(r["problem_id"], r["sample_idx"]) for r in rows if keep(r)]
        pid, idx = sample_box.value
        assert f"{pid} · sample {idx}" in view.value and "<script" not in view.value.lower()


@pytest.mark.browser
def test_page_renders_in_chromium(viewer_run, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    root, run_id, _ = viewer_run
    out = tmp_path / "view.html"
    viewer.show(run_id, out=out, runs_root=root)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(out.as_uri())
        tokens = page.locator(".tl-text .tl-tok")
        assert tokens.count() > 10
        coloured = page.eval_on_selector_all(
            ".tl-text .tl-tok:not(.tl-forced):not(.tl-wait)",
            "els => els.map(e => getComputedStyle(e).backgroundColor)")
        assert len(set(coloured)) > 3 and all(c.startswith("rgb(") for c in coloured)
        titles = page.eval_on_selector_all(".tl-text .tl-tok", "els => els.map(e => e.title)")
        assert all(titles) and any("entropy" in t and "log-probability" in t for t in titles)
        assert page.locator(".tl-boundary").count() == 2  # the legend's and the trace's
        assert page.locator(".tl-text .tl-wait").count() >= 1
        assert "<script>alert(1)</script>" in page.inner_text(".tl-text") and not dialogs
        browser.close()
