"""Damaged models and inputs that reach past the argument checks: a truncated checkpoint or adapter, a GGUF whose
chat template raises or runs away, a benchmark CSV that is not UTF-8 or not CSV, a context no machine can hold,
a chat message longer than the context. Each is one `error:` line naming the file (or option) at fault and the
fix, never a traceback; a chat message too long is refused alone and the conversation goes on.

Runs in-process (tests/robustness/conftest.py), so a traceback is an exception that fails the test.
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, make_tiny_llama
from tests.robustness.conftest import run_finemed, snapshot

BAD_TEMPLATES = {
    "raises": "{{ 1/0 }}",
    "syntax": "{% for m in messages %}{{ m['content'] + }}{% endfor %}",
    # 64 MB if rendered whole (the same loops with range(1000) inside write 6.4 GB: the bound stops both alike)
    "runaway": "{% for i in range(100000) %}{% for j in range(10) %}{{ 'x' * 64 }}{% endfor %}{% endfor %}",
}
LONG_MESSAGE = "word " * 3000  # about 3,000 tokens: past the 128-token chat context below


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A 4-layer Llama saved as an HF folder (safetensors, tokenizer, ChatML template; trained context 2048)."""
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(d, safe_serialization=True)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finemed_cli.export.gguf import export_gguf

    return export_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f32").path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_line(run, *names: str) -> str:
    """The run failed with one `error:` line naming each of `names`; returns that line."""
    assert run.code == 2, (run.code, run.stderr)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


# --- 11a: a truncated model.safetensors ------------------------------------------------------------------------

@pytest.mark.parametrize("verb", ["answer", "export"])
def test_a_truncated_checkpoint_is_one_line_naming_it(verb: str, tiny_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_dir, tmp_path / "model")
    _cut_in_half(model / "model.safetensors")
    (tmp_path / "questions.jsonl").write_bytes((EXAMPLES / "questions.jsonl").read_bytes())
    before = snapshot(tmp_path)
    args = {"answer": ["answer", "questions.jsonl", "--no-ttt", "--model", "model", "-o", "answers.jsonl"],
            "export": ["export", "model", "-o", "model.gguf"]}[verb]
    line = _one_line(run_finemed(*args, cwd=tmp_path), "model/model.safetensors")
    assert "truncated or corrupt safetensors file" in line and "re-download or re-export" in line
    assert snapshot(tmp_path) == before


def test_the_memory_plan_reads_a_truncated_header_as_a_model_error(tiny_dir: Path, tmp_path: Path) -> None:
    from finemed_cli.checkpoints.memory import model_shape
    from finemed_cli.errors import ModelError

    model = _copy(tiny_dir, tmp_path / "model")
    assert model_shape(model) is not None
    _cut_in_half(model / "model.safetensors")
    with pytest.raises(ModelError, match="model.safetensors: truncated or corrupt"):
        model_shape(model)


# --- 11b: export-lora on a damaged adapter -----------------------------------------------------------------------

def _adapter(path: Path, config: bytes) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_bytes(config)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{module}.lora_A.weight": torch.zeros(2, 32), f"{module}.lora_B.weight": torch.zeros(32, 2)},
              str(path / "adapter_model.safetensors"))
    return path


GOOD_ADAPTER = b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4}'


@pytest.mark.parametrize(("config", "cut", "names", "says"), [
    (b'{"peft_type": "LORA", "r": 2,', False, "adapter/adapter_config.json", "not a readable JSON object"),
    (b'["not", "an", "object"]', False, "adapter/adapter_config.json", "not a JSON object"),
    (b'{"peft_type": "LORA", "lora_alpha": 4}', False, "adapter/adapter_config.json", "r is None"),
    (GOOD_ADAPTER, True, "adapter/adapter_model.safetensors", "truncated or corrupt safetensors file"),
], ids=["config-not-json", "config-a-list", "config-without-rank", "weights-truncated"])
def test_export_lora_of_a_damaged_adapter_is_one_line(config: bytes, cut: bool, names: str, says: str,
                                                      tiny_dir: Path, tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "adapter", config)
    if cut:
        _cut_in_half(adapter / "adapter_model.safetensors")
    _copy(tiny_dir, tmp_path / "base")
    before = snapshot(tmp_path)
    line = _one_line(run_finemed("export-lora", "adapter", "--base", "base", "-o", "lora.gguf", cwd=tmp_path), names)
    assert says in line
    assert snapshot(tmp_path) == before


def test_export_lora_of_a_whole_adapter_still_works(tiny_dir: Path, tmp_path: Path) -> None:
    _adapter(tmp_path / "adapter", GOOD_ADAPTER)
    run = run_finemed("export-lora", tmp_path / "adapter", "--base", tiny_dir, "-o", tmp_path / "lora.gguf")
    assert run.code == 0, run.stderr
    assert (tmp_path / "lora.gguf").stat().st_size > 0


# --- 11c: a GGUF whose chat template raises or runs away ---------------------------------------------------------

@pytest.fixture(scope="module")
def bad_ggufs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model exported once per broken template (written as the folder's chat_template.jinja)."""
    from finemed_cli.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("bad-templates")
    made = {}
    for name, template in BAD_TEMPLATES.items():
        d = _copy(tiny_dir, root / name)
        (d / "chat_template.jinja").write_text(template)
        made[name] = export_gguf(d, root / f"{name}.gguf", "f32").path
    return made


@pytest.mark.parametrize("kind", sorted(BAD_TEMPLATES))
def test_chat_with_a_broken_template_is_one_line_naming_the_gguf(kind: str, bad_ggufs: dict[str, Path]) -> None:
    line = _one_line(run_finemed("chat", bad_ggufs[kind], "-p", "hello", "--max-tokens", "2"),
                     str(bad_ggufs[kind]))
    assert "chat template is broken" in line and "tokenizer.chat_template" in line


def test_answer_with_a_broken_template_gguf_names_the_gguf(bad_ggufs: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`answer --model X.gguf` renders through a tokenizer materialised from the GGUF: still the GGUF named."""
    monkeypatch.setenv("FINEMED_HOME", str(tmp_path / "home"))
    gguf = shutil.copy(bad_ggufs["raises"], tmp_path / "raises.gguf")
    line = _one_line(run_finemed("answer", EXAMPLES / "questions.jsonl", "--no-ttt", "--model", gguf,
                                 "--generator", "llama.cpp", "-o", tmp_path / "answers.jsonl"), str(gguf))
    assert "chat template is broken (ZeroDivisionError" in line
    assert not (tmp_path / "answers.jsonl").exists()


@pytest.mark.parametrize(("template", "says"), [
    ("{{ 'x' * 10**8 }}", "a repetition would exceed"),  # refused before the 100 MB string is built
    ("{{ 7 ** 10000000 }}", "a power would exceed"),  # Jinja reads 7 ** 10 ** 7 as (7 ** 10) ** 7
    ("{% for i in range(100000) %}{% for j in range(20) %}{% endfor %}{% endfor %}", "range() items"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
])
def test_a_template_that_runs_away_is_refused_with_a_bound(template: str, says: str) -> None:
    from finemed_cli.errors import ModelError
    from finemed_cli.modeling.template import render_template

    with pytest.raises(ModelError, match="chat template is broken") as caught:
        render_template(template, [{"role": "user", "content": "hi"}], True, origin="m.gguf")
    assert str(caught.value).startswith("m.gguf: ") and says in str(caught.value)


def test_the_bound_grows_with_the_conversation_and_leaves_real_templates_alone(tiny_tokenizer) -> None:
    from finemed_cli.modeling.template import TEMPLATE_ALLOWANCE_CHARS, render_template

    long = "x" * (3 * TEMPLATE_ALLOWANCE_CHARS)  # a long conversation is not a runaway template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long}]
    assert render_template(tiny_tokenizer.chat_template, messages, True) == tiny_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)


# --- 11d: a benchmark CSV that is not UTF-8 or not CSV -------------------------------------------------------------

@pytest.mark.parametrize(("body", "at", "says"), [
    (b"question,A,B,C,D,answer\nWhat is 1+1?,1,2,3,4,B\nCaf\xe9 au lait?,a,b,c,d,A\n", ":3:", "not valid UTF-8"),
    (b"question,A,B,C,D,answer\nQ1,a,b,c,d,A\n\"" + b"x" * 140_000 + b"\",a,b,c,d,A\n", ":3:",
     "field larger than field limit"),
    (b"question,A,B,C,D,answer\nQ1,a,b,c,d,A\n\"an open quote,a,b,c,d,A\n" + b"more text\n" * 20_000, ":3:",
     "a quote left open"),
], ids=["latin1", "field-over-128kb", "open-quote"])
def test_eval_of_a_bad_mmlu_csv_names_the_file_and_line(body: bytes, at: str, says: str, tmp_path: Path) -> None:
    (tmp_path / "anatomy_test.csv").write_bytes(body)
    before = snapshot(tmp_path)
    run = run_finemed("eval", "anatomy_test.csv", "--mode", "loglik", "--compare", "no-ttt", "-o", "report",
                      cwd=tmp_path)
    assert says in _one_line(run, f"anatomy_test.csv{at}")
    assert snapshot(tmp_path) == before


# --- 11e: a context past what the model was trained on -------------------------------------------------------------

def test_chat_refuses_a_context_past_the_trained_one_naming_ctx(tiny_gguf: Path) -> None:
    line = _one_line(run_finemed("chat", tiny_gguf, "--ctx", "100000000", "-p", "hi"), "--ctx-size 100000000")
    assert "trained on a context of 2,048 tokens" in line and "pass --ctx-size 2048 or less" in line
    assert "cannot load it" not in line  # the GGUF is fine


def test_a_context_llama_cpp_cannot_allocate_names_the_context(tiny_gguf: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every verb opens GGUFs through `open_gguf`: llama.cpp's failure to make the context blames the context,
    with the model's maximum, not the file. (Simulated: a real attempt allocates lazily and can take all the
    memory first, as 2e9 tokens on the tiny model did.)"""
    import llama_cpp

    from finemed_cli.errors import ModelError
    from finemed_cli.generate.llamacpp import open_gguf

    def fails(*args: object, **kwargs: object) -> None:
        raise ValueError("Failed to create llama_context")

    monkeypatch.setattr(llama_cpp, "Llama", fails)
    with pytest.raises(ModelError, match=r"cannot allocate a context of 1,000,000 tokens .*--ctx.*at most 2,048"):
        open_gguf(tiny_gguf, n_ctx=1_000_000)


def test_chat_without_ctx_opens_at_most_the_trained_context(tiny_gguf: Path) -> None:
    from finemed_cli.generate.chat import ChatSession

    with ChatSession(tiny_gguf) as session:
        assert session.context_length == 2048  # 4096 by default, but this model was trained on 2048


# --- 14: a chat message longer than the context ----------------------------------------------------------------

def test_a_message_too_long_is_refused_alone_and_the_conversation_kept(tiny_gguf: Path) -> None:
    from finemed_cli.generate.chat import ChatSession, MessageTooLong

    with ChatSession(tiny_gguf, n_ctx=128, max_tokens=4) as session:
        list(session.reply("hello"))
        kept = [dict(m) for m in session.history]
        with pytest.raises(MessageTooLong, match=r"message too long: [\d,]+ tokens, and \d+ fit"):
            list(session.reply(LONG_MESSAGE))
        assert session.history == kept
        list(session.reply("and again"))
        assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
        assert session.history[:2] == kept


def test_chat_says_a_message_is_too_long_and_goes_on(tiny_gguf: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINEMED_HOME", str(tmp_path / "home"))  # the line history is written there
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hello\n{LONG_MESSAGE}\nand again\n/exit\n"))
    run = run_finemed("chat", tiny_gguf, "--ctx", "128", "--max-tokens", "4", "--threads", "1")
    assert run.code == 0, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "message too long" in errors[0] and "fit" in errors[0], run.stderr
    assert "conversation so far is kept" in errors[0]
    assert run.stdout.count("you> ") == 4  # hello, the long one, and again, /exit: the session went on
