"""One name per idea across the verbs (issue 33): `-m/--model`, `--max-new-tokens`, `--outtype`, `-c/--ctx-size`,
`-t/--threads`; the old spellings still parse, hidden from --help."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from finemed_cli.cli.main import cli

NEW = {"answer": ["-m, --model", "--max-new-tokens", "--outtype", "-c, --ctx-size", "-t, --threads"],
       "chat": ["-m, --model", "--max-new-tokens", "-c, --ctx-size", "-t, --threads"],
       "serve": ["-m, --model", "--max-new-tokens", "-c, --ctx-size", "-t, --threads"],
       "eval": ["-m, --model", "--max-new-tokens", "-c, --ctx-size", "-t, --threads"],
       "ttt-calibrate": ["-m, --model", "-t, --threads"],
       "synth pairs": ["-m, --model", "--max-new-tokens", "-t, --threads"],
       "synth score": ["-m, --model", "-t, --threads"]}
OLD = ["--max-tokens", "--gguf-type", "--ctx "]


def _command(verb: str):
    command = cli
    for name in verb.split():
        command = command.commands[name]
    return command


def _params(verb: str, args: list[str]) -> dict:
    with _command(verb).make_context(verb, args) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize("verb", sorted(NEW))
def test_help_shows_the_one_name_of_each_idea_and_hides_the_old_ones(verb):
    res = CliRunner().invoke(cli, [*verb.split(), "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    for name in NEW[verb]:
        assert name in res.output, (verb, name)
    for name in OLD:
        assert name not in res.output, (verb, name)


@pytest.mark.parametrize(("verb", "args", "param", "value"), [
    ("answer", ["q.jsonl", "--outtype", "q8_0"], "gguf_type", "q8_0"),
    ("answer", ["q.jsonl", "--gguf-type", "q8_0"], "gguf_type", "q8_0"),
    ("answer", ["q.jsonl", "-c", "2048"], "n_ctx", 2048),
    ("answer", ["q.jsonl", "-m", "org/name"], "model", "org/name"),
    ("chat", ["m.gguf", "--max-new-tokens", "7"], "max_new_tokens", 7),
    ("chat", ["m.gguf", "--max-tokens", "7"], "max_new_tokens", 7),
    ("chat", ["m.gguf", "--ctx", "128"], "n_ctx", 128),
    ("chat", ["m.gguf", "-c", "128"], "n_ctx", 128),
    ("chat", ["-m", "m.gguf"], "model_option", "m.gguf"),
    ("serve", ["m.gguf", "--max-tokens", "9"], "max_tokens", 9),
    ("serve", ["m.gguf", "--max-new-tokens", "9"], "max_tokens", 9),
    ("serve", ["m.gguf", "--ctx", "256"], "n_ctx", 256),
    ("serve", ["m.gguf", "--ctx-size", "256"], "n_ctx", 256),
    ("synth pairs", ["in.jsonl", "-o", "o.jsonl", "--max-tokens", "64"], "complex_max_tokens", 64),
])
def test_new_and_old_spellings_set_the_same_value(verb, args, param, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text("")
    assert _params(verb, args)[param] == value


@pytest.mark.parametrize("verb", ["answer", "chat", "serve"])
def test_threads_set_torch_threads(verb):
    before = torch.get_num_threads()
    try:
        params = _params(verb, ["x", "-t", "1"])
        assert torch.get_num_threads() == 1
        assert params.get("threads", 1) == 1  # chat and serve pass it on to llama.cpp too
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("verb", ["chat", "serve"])
def test_model_is_given_once(verb):
    both = CliRunner().invoke(cli, [verb, "a.gguf", "-m", "b.gguf"])
    assert both.exit_code == 2 and "two models" in both.output
    neither = CliRunner().invoke(cli, [verb])
    assert neither.exit_code == 2 and "Missing argument 'MODEL'" in neither.output


def test_export_help_names_every_architecture_the_exporter_supports():
    from finemed_cli.export.arch import ARCHITECTURES

    res = CliRunner().invoke(cli, ["export", "--help"])
    compact = res.output.replace(" ", "").replace("-", "").replace("\n", "")
    missing = [a for a in ARCHITECTURES if a.removesuffix("ForCausalLM") not in compact]
    assert not missing, missing


def test_eval_split_help_reads_as_written():
    res = CliRunner().invoke(cli, ["eval", "--help"], terminal_width=200)
    assert "Hf:" not in res.output and "hf:org/name" in res.output
