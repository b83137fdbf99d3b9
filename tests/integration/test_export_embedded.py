"""Export and llama.cpp on the embedded SmolLM2-135M-Instruct: the real CLI, logits and tokens against
transformers, F32 against F16, and `finemed answer --generator llama.cpp` with TTT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import EXAMPLES
from tests.integration.test_cli import finemed, read

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
pytestmark = pytest.mark.integration

PROMPTS = [
    [{"role": "user", "content": "What hormone does the thyroid gland make?"}],
    [{"role": "system", "content": "You are a careful medical expert."},
     {"role": "user", "content": "A 45-year-old has a fasting glucose of 131 mg/dL twice. Diagnosis?"}],
    [{"role": "user", "content": "List three causes of hypokalemia."}],
]


@pytest.fixture(scope="module")
def embedded():
    from finemed_cli.checkpoints.loading import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def exported(embedded, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for outtype in ("f32", "f16", "q4_k_m"):
        path = d / f"smol-{outtype}.gguf"
        proc = finemed("export", embedded.source, "-o", path, "--outtype", outtype)
        assert f"{outtype}, 272 tensors" in proc.stdout
        out[outtype] = path
    return out


def test_f16_and_q4_k_m_load_and_answer_in_chat(exported) -> None:
    import llama_cpp

    for outtype in ("f16", "q4_k_m"):
        proc = finemed("chat", exported[outtype], "--prompt", "What does insulin do?", "--max-tokens", "24")
        assert len(proc.stdout.split()) >= 5, proc.stdout
        llm = llama_cpp.Llama(str(exported[outtype]), n_ctx=256, verbose=False)
        try:
            out = llm.create_chat_completion(PROMPTS[0], max_tokens=16, temperature=0)
            assert out["choices"][0]["message"]["content"].strip()
        finally:
            llm.close()
    assert exported["q4_k_m"].stat().st_size < 0.45 * exported["f16"].stat().st_size


def _ids(embedded, messages) -> list[int]:
    return list(embedded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))


def test_f32_logits_match_transformers(embedded, exported) -> None:
    import torch

    from finemed_cli.generate.llamacpp import LlamaCppGenerator

    with LlamaCppGenerator(exported["f32"], embedded.tokenizer, None, exact=True, logits_all=True,
                           n_ctx=512) as gen:
        for messages in PROMPTS:
            ids = _ids(embedded, messages)
            with torch.no_grad():
                want = torch.log_softmax(embedded.model(torch.tensor([ids])).logits[0].double(), -1).numpy()
            assert np.abs(gen.logprobs(ids) - want).max() < 1e-3


def test_greedy_32_tokens_identical_for_f32_and_f16(embedded, exported) -> None:
    from finemed_cli.generate.llamacpp import LlamaCppGenerator

    outs = {}
    for outtype in ("f32", "f16"):
        with LlamaCppGenerator(exported[outtype], embedded.tokenizer, None, n_ctx=512) as gen:
            outs[outtype] = [gen.continue_ids(_ids(embedded, m), 32)[0] for m in PROMPTS]
    assert all(len(o) == 32 for o in outs["f32"])
    assert outs["f32"] == outs["f16"]


def test_chat_template_and_tokenizer_match_hf(embedded, exported) -> None:
    from finemed_cli.generate.chat import ChatSession

    session = ChatSession(exported["f16"], n_ctx=512)
    try:
        for messages in PROMPTS:
            assert session.prompt_ids(messages) == _ids(embedded, messages)
        for text in ["TSH 0.01 mIU/L, T4 2.5 ng/dL in 2024; age 45.", "  spaces\n\n\ttabs, ünïcödé — 🙂"]:
            want = embedded.tokenizer(text, add_special_tokens=False)["input_ids"]
            assert session.llm.tokenize(text.encode(), add_bos=False, special=True) == want
    finally:
        session.close()


@pytest.mark.slow  # 31 s: make test keeps llama.cpp decoding under a TTT adapter in serve's per-request TTT tests
def test_answer_with_llama_cpp_generator_and_ttt(tmp_path) -> None:
    index = tmp_path / "corpus.index"
    finemed("index", "build", EXAMPLES / "corpus.jsonl", "-o", index)
    runs = {}
    for generator in ("llama.cpp", "transformers"):
        out = tmp_path / f"{generator}.jsonl"
        finemed("answer", EXAMPLES / "questions.jsonl", "-o", out, "--index", index, "--limit", "2",
                "--max-new-tokens", "24", "--generator", generator, "--no-progress")
        runs[generator] = read(out)
    for a, b in zip(runs["llama.cpp"], runs["transformers"], strict=True):
        assert a["generation"]["backend"] == "llama.cpp" and b["generation"]["backend"] == "transformers"
        assert a["ttt"]["loss_before"] == pytest.approx(b["ttt"]["loss_before"], abs=1e-6)
        assert a["ttt"]["loss_after"] == pytest.approx(b["ttt"]["loss_after"], abs=1e-6)
        assert a["response"] and 0 < a["generation"]["tokens"] <= 24
