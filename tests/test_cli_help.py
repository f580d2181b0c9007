"""The CLI's help and flags (no model): every spec field has a help text from its comment in
config.py, `--trust-remote-code` is a switch, and `thinklab models` lists the offline MoE."""

from __future__ import annotations

import dataclasses

import pytest

from thinklab import cli, models
from thinklab.config import BudgetSpec, GradingSpec, ModelSpec, PromptSpec, SamplingSpec
from thinklab.specdoc import field_comments, field_help

SPECS = (ModelSpec, SamplingSpec, BudgetSpec, PromptSpec, GradingSpec)


@pytest.mark.parametrize("cls", SPECS, ids=lambda c: c.__name__)
def test_every_spec_field_has_a_help_text(cls):
    comments = field_comments(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a comment in config.py: {missing}"


def test_help_texts_come_from_the_comments():
    assert field_comments(SamplingSpec)["max_tokens"] == "cap on generated tokens per sample (thinking + answer)"
    # a comment block above a field is joined
    assert field_comments(GradingSpec)["lenient_truncated"].startswith("True: a sample cut at max_tokens")
    assert field_help(BudgetSpec, "thinking_budget", None) == "cap on thinking tokens; None = uncapped (default: none)"
    text = cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "model.name (default" not in text and "sampling.temperature" not in text
    assert "0 = greedy; higher flattens the distribution (default: 1.0)" in " ".join(text.split())


def test_trust_remote_code_is_a_switch():
    parser = cli.build_parser()
    assert cli.spec_from_args(parser.parse_args(["generate"])).model.trust_remote_code is False
    assert cli.spec_from_args(parser.parse_args(["generate", "--trust-remote-code"])).model.trust_remote_code is True
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--trust-remote-code", "true"])


def test_models_lists_the_offline_moe(capsys):
    names = [r["name"] for r in models.list_models()]
    assert names[:2] == ["smollm2-135m", "qwen2.5-0.5b"] and "smollm2-135m-moe16" in names
    assert cli.main(["models"]) == 0
    assert any(line.startswith("smollm2-135m-moe16 ") for line in capsys.readouterr().out.splitlines())
