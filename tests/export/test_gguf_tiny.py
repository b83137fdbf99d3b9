"""GGUF export on tiny random models: the file read back, logits against transformers through llama.cpp,
LoRA adapters applied and swapped on one loaded model, tokenizer and chat template carried over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finemed_cli.errors import ExportError
from finemed_cli.export.arch import ARCHITECTURES, arch_of
from finemed_cli.export.gguf import export_gguf, read_config
from finemed_cli.export.lora_gguf import LoraWeights, export_lora_gguf
from finemed_cli.export.vocab import detect_pre_tokenizer
from finemed_cli.generate.llamacpp import LlamaCppGenerator
from finemed_cli.gguf.tokens import PRE_TOKENIZERS
from tests.export.conftest import (
    PROMPTS,
    hf_logprobs,
    load_hf,
    make_tiny_llama3_rope,
    make_tiny_qwen2,
    random_adapter,
    save_model,
)

TOL = 1e-3  # absolute, on normalised log-probabilities (the bar)


def _reader_fields(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("outtype,weight_type", [("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"),
                                                 ("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_roundtrip_every_tensor_and_tokenizer_key(tiny_untied_dir, tiny_tokenizer, tmp_path, outtype,
                                                  weight_type) -> None:
    out = export_gguf(tiny_untied_dir, tmp_path / "m.gguf", outtype).path
    fields, tensors = _reader_fields(out)
    config = read_config(tiny_untied_dir)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config["num_hidden_layers"] == 4
    assert fields["llama.embedding_length"] == 32 and fields["llama.feed_forward_length"] == 64
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(4):
        expected |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                      "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == expected
    assert tensors["blk.0.attn_k.weight"] == (weight_type, [32, 16])  # GGUF order: (in, out)
    assert tensors["blk.0.ffn_down.weight"] == (weight_type, [64, 32])
    assert tensors["blk.0.attn_norm.weight"] == ("F32", [32])  # 1-D stays F32
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tiny_tokenizer.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"]
    assert all(tokens[i] == t for t, i in vocab.items())
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads((tiny_untied_dir / "tokenizer.json").read_text())
                                                       ["model"]["merges"])
    assert fields["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id
    assert fields["tokenizer.chat_template"] == tiny_tokenizer.chat_template


def test_tied_embeddings_write_no_output_tensor(tiny_llama_dir, tmp_path) -> None:
    _, tensors = _reader_fields(export_gguf(tiny_llama_dir, tmp_path / "m.gguf", "f16").path)
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


def _parity(model_dir: Path, tokenizer, tmp_path: Path) -> float:
    model = load_hf(model_dir)
    out = export_gguf(model_dir, tmp_path / "m-f32.gguf", "f32").path
    worst = 0.0
    with LlamaCppGenerator(out, tokenizer, None, exact=True, logits_all=True, n_ctx=256) as gen:
        for text in PROMPTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            worst = max(worst, float(np.abs(gen.logprobs(ids) - hf_logprobs(model, ids)).max()))
    return worst


def test_llama_logits_match_transformers(tiny_untied_dir, tiny_tokenizer, tmp_path) -> None:
    assert _parity(tiny_untied_dir, tiny_tokenizer, tmp_path) < TOL


def test_qwen2_logits_match_transformers(tiny_tokenizer, tmp_path) -> None:
    d = save_model(make_tiny_qwen2(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "qwen2")
    fields, tensors = _reader_fields(export_gguf(d, tmp_path / "q.gguf", "f32").path)
    assert fields["general.architecture"] == "qwen2" and "blk.0.attn_q.bias" in tensors
    assert _parity(d, tiny_tokenizer, tmp_path) < TOL


def test_llama3_rope_scaling_is_exported_as_rope_freqs(tiny_tokenizer, tmp_path) -> None:
    d = save_model(make_tiny_llama3_rope(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "l3")
    _, tensors = _reader_fields(export_gguf(d, tmp_path / "r.gguf", "f32").path)
    assert tensors["rope_freqs.weight"] == ("F32", [16])
    assert _parity(d, tiny_tokenizer, tmp_path) < TOL


def test_adapter_logits_match_transformers_and_clear_exactly(tiny_untied_dir, tiny_tokenizer, tmp_path) -> None:
    model = load_hf(tiny_untied_dir)
    base = export_gguf(tiny_untied_dir, tmp_path / "m-f32.gguf", "f32").path
    ids = tiny_tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    with LlamaCppGenerator(base, tiny_tokenizer, read_config(tiny_untied_dir), exact=True, logits_all=True,
                           n_ctx=256) as gen:
        before = gen.logprobs(ids)
        adapter = random_adapter(model, seed=5)
        try:
            want = hf_logprobs(model, ids)
            assert np.abs(want - before).max() > 0.05  # the adapter matters
            with gen.adapter_applied(adapter):
                got = gen.logprobs(ids)
        finally:
            adapter.detach()
        assert np.abs(got - want).max() < TOL
        assert np.array_equal(gen.logprobs(ids), before)  # cleared: the base exactly as before


def test_ten_adapters_swapped_on_one_model_equal_ten_merged_models(tiny_untied_dir, tiny_tokenizer,
                                                                   tmp_path) -> None:
    from finemed_cli.generate.llamacpp import open_gguf

    model = load_hf(tiny_untied_dir)
    config = read_config(tiny_untied_dir)
    base = export_gguf(tiny_untied_dir, tmp_path / "base.gguf", "f32").path
    prompt = tiny_tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    swapped, merged = [], []
    with LlamaCppGenerator(base, tiny_tokenizer, config, exact=True, n_ctx=256) as gen:
        for i in range(10):
            adapter = random_adapter(model, seed=100 + i)
            lora = LoraWeights.from_adapter(adapter)
            adapter.detach()
            with gen.adapter_applied(lora):
                swapped.append(gen.continue_ids(prompt, 16)[0])
            path = export_gguf(tiny_untied_dir, tmp_path / f"merged{i}.gguf", "f32", lora=lora).path
            llm = open_gguf(path, n_ctx=256, exact=True)
            try:
                tokens = []
                for t in llm.generate(prompt, temp=0.0, reset=True):
                    tokens.append(t)
                    if len(tokens) == 16:
                        break
                merged.append(tokens)
            finally:
                llm.close()
    assert len({tuple(s) for s in swapped}) > 1  # different adapters, different answers
    for s, m in zip(swapped, merged, strict=True):
        assert s[: len(m)] == m[: len(s)]


def test_peft_adapter_directory_exports_and_matches(tiny_untied_dir, tiny_tokenizer, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    from finemed_cli.cli.main import cli

    model = load_hf(tiny_untied_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = tiny_tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    want = hf_logprobs(peft_model, ids)

    from click.testing import CliRunner

    runner = CliRunner()
    res = runner.invoke(cli, ["export-lora", str(tmp_path / "adapter"), "--base", str(tiny_untied_dir),
                              "-o", str(tmp_path / "lora.gguf"), "--outtype", "f32"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["export", str(tiny_untied_dir), "-o", str(tmp_path / "base.gguf"), "--outtype", "f32"])
    assert res.exit_code == 0, res.output
    with LlamaCppGenerator(tmp_path / "base.gguf", tiny_tokenizer, None, exact=True, logits_all=True,
                           n_ctx=256) as gen, gen.adapter_applied(tmp_path / "lora.gguf"):
        got = gen.logprobs(ids)
    assert np.abs(got - want).max() < TOL
    # The same adapter merged at export time.
    merged = export_gguf(tiny_untied_dir, tmp_path / "merged.gguf", "f32", lora=tmp_path / "adapter").path
    with LlamaCppGenerator(merged, tiny_tokenizer, None, exact=True, logits_all=True, n_ctx=256) as gen:
        assert np.abs(gen.logprobs(ids) - want).max() < TOL


def test_chat_template_renders_the_hf_prompt_tokens(tiny_untied_dir, tiny_tokenizer, tmp_path) -> None:
    from finemed_cli.generate.chat import ChatSession

    out = export_gguf(tiny_untied_dir, tmp_path / "m.gguf", "f16").path
    messages = [{"role": "system", "content": "You are a careful medical expert."},
                {"role": "user", "content": "Is 125 mg/dL of glucose high? The answer is (B)."},
                {"role": "assistant", "content": "## Thought\nfasting?"},
                {"role": "user", "content": "Yes, fasting."}]
    want = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
    session = ChatSession(out, n_ctx=256)
    try:
        assert session.prompt_ids(messages) == list(want)
    finally:
        session.close()


def _bpe_tokenizer(pre_tokenizer: dict):
    """A byte-level BPE trained in-process with the given HF pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = Tokenizer.from_str(json.dumps({
        "version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []},
        "pre_tokenizer": pre_tokenizer})).pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    corpus = ["In 2024, 1234 patients took 500 mg; TSH was 0.45 mIU/L.", "don't we'll THEY'RE  spaces\n\nnew lines",
              "Hyperthyroidism: T4 12.5 ng/dL, age 45."] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_llama_cpp_tokenizes_like_hf_for_each_pre_tokenizer(pre, tmp_path) -> None:
    from finemed_cli.generate.llamacpp import open_gguf

    tok = _bpe_tokenizer(PRE_TOKENIZERS[pre])
    d = save_model(make_tiny_llama_for(tok), tok, tmp_path / pre)
    fields, _ = _reader_fields(export_gguf(d, tmp_path / "m.gguf", "f16").path)
    assert fields["tokenizer.ggml.pre"] == pre
    llm = open_gguf(tmp_path / "m.gguf", n_ctx=128)
    try:
        for text in ["In 1999, 123456 units; 7.5 mg.", "  two  spaces\n\n\ttab's they'll", "ünïcödé 中文 🙂 <|im_end|>"]:
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    finally:
        llm.close()


def make_tiny_llama_for(tok):
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(len(tok), layers=1)


def test_detect_pre_tokenizer_and_unknown_ones() -> None:
    for name, pre in PRE_TOKENIZERS.items():
        assert detect_pre_tokenizer({"pre_tokenizer": pre}) == name
    with pytest.raises(ExportError, match="--pre-tokenizer"):
        detect_pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})


def test_unsupported_architecture_names_the_supported_ones(tmp_path) -> None:
    with pytest.raises(ExportError) as info:
        arch_of({"architectures": ["GPTNeoXForCausalLM"]})
    for name in ARCHITECTURES:
        assert name in str(info.value)
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(ExportError, match="LlamaForCausalLM"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_lora_gguf_keys(tiny_untied_dir, tmp_path) -> None:
    model = load_hf(tiny_untied_dir)
    adapter = random_adapter(model, seed=1, first_layer=3)
    path = export_lora_gguf(adapter, read_config(tiny_untied_dir), tmp_path / "a.gguf", "f16")
    adapter.detach()
    fields, tensors = _reader_fields(path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    assert tensors["blk.3.attn_q.weight.lora_a"] == ("F16", [32, 4])
    assert tensors["blk.3.attn_q.weight.lora_b"] == ("F16", [4, 32])
    assert not any(name.startswith("blk.0.") for name in tensors)


def test_sentencepiece_tokenizer_exports_as_llama_vocab(tmp_path) -> None:
    spm = pytest.importorskip("sentencepiece")
    from finemed_cli.generate.llamacpp import open_gguf
    from tests.conftest import make_tiny_llama

    corpus = ["In 2024, 1234 patients took 500 mg; TSH was 0.45 mIU/L.", "don't we'll THEY'RE  spaces",
              "Hyperthyroidism: T4 12.5 ng/dL, age 45.", "The patient has hypothyroidism; the answer is (B)."]
    (tmp_path / "corpus.txt").write_text("\n".join(corpus * 50))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    d = tmp_path / "spm-llama"
    make_tiny_llama(400, layers=1).save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>", "add_bos_token": True}))
    fields, _ = _reader_fields(export_gguf(d, tmp_path / "m.gguf", "f16").path)
    assert fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.scores"]) == 400
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.add_bos_token"] is True
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    from gguf import GGUFReader

    from finemed_cli.gguf.tokenizer import hf_tokenizer_from_gguf

    rebuilt = hf_tokenizer_from_gguf(GGUFReader(str(tmp_path / "m.gguf")))  # as `--model m.gguf` makes it
    llm = open_gguf(tmp_path / "m.gguf", n_ctx=128)
    try:
        for text in ["Hello 123 world", "TSH was 0.45 mIU/L in 2024.", "ünïcödé bytes 🙂", "  two  spaces\n\nx",
                     "don't we'll THEY'RE", "Hyperthyroidism: T4 12.5 ng/dL"]:
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
            if "  " not in text:  # sentencepiece's own normaliser collapses runs of spaces; llama.cpp does not
                assert ids == sp.encode(text), text
            assert rebuilt(text, add_special_tokens=False)["input_ids"] == ids, text
            assert rebuilt(text)["input_ids"] == [1, *ids]  # add_bos_token
            assert rebuilt.decode(ids) == text
    finally:
        llm.close()
    # and back: the rebuilt tokenizer.json alone (no tokenizer.model) exports to the same llama.cpp tokens
    again = tmp_path / "from-gguf"
    make_tiny_llama(400, layers=1).save_pretrained(again, safe_serialization=True)
    rebuilt.save_pretrained(again)
    fields2, _ = _reader_fields(export_gguf(again, tmp_path / "again.gguf", "f16").path)
    assert fields2["tokenizer.ggml.model"] == "llama" and fields2["tokenizer.ggml.tokens"] == fields[
        "tokenizer.ggml.tokens"]
    first, second = open_gguf(tmp_path / "m.gguf", n_ctx=128), open_gguf(tmp_path / "again.gguf", n_ctx=128)
    try:
        for text in ["Hello 123 world", "TSH was 0.45 mIU/L in 2024.", "ünïcödé bytes 🙂", "  two  spaces\n\nx",
                     "Hyperthyroidism: T4 12.5 ng/dL, age 45. don't"]:
            assert first.tokenize(text.encode(), add_bos=True, special=False) == \
                second.tokenize(text.encode(), add_bos=True, special=False), text
    finally:
        first.close()
        second.close()


def test_seeded_sampling_is_reproducible(tiny_untied_dir, tiny_tokenizer, tmp_path) -> None:
    base = export_gguf(tiny_untied_dir, tmp_path / "m.gguf", "f16").path
    prompt = tiny_tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    with LlamaCppGenerator(base, tiny_tokenizer, None, n_ctx=256) as gen:
        runs = {seed: [gen.continue_ids(prompt, 24, temperature=1.5, seed=seed)[0] for _ in range(2)]
                for seed in (1, 2)}
    assert runs[1][0] == runs[1][1] and runs[2][0] == runs[2][1]
    assert runs[1][0] != runs[2][0]


def test_chat_cli_commands(tiny_untied_dir, tmp_path) -> None:
    from click.testing import CliRunner

    from finemed_cli.cli.main import cli

    base = export_gguf(tiny_untied_dir, tmp_path / "m.gguf", "f16").path
    res = CliRunner().invoke(cli, ["chat", str(base), "--max-tokens", "5"],
                             input="hello\n/system Be brief.\nand again\n/nonsense\n/reset\n/exit\n")
    assert res.exit_code == 0, res.output
    assert "system prompt set" in res.output and "conversation reset" in res.output and "/reset forgets" in res.output
    res = CliRunner().invoke(cli, ["chat", str(base), "--prompt", "hello", "--max-tokens", "5"])
    assert res.exit_code == 0 and res.output.strip()
    res = CliRunner().invoke(cli, ["chat", str(tmp_path / "missing.gguf")])
    assert res.exit_code != 0


def test_llama_cpp_stops_on_the_same_end_of_turn_token_as_transformers(tiny_tokenizer, tmp_path) -> None:
    """eot ≠ eos (ChatML turns end with <|im_end|>, eos is <|endoftext|>): the GGUF declares both, and
    llama.cpp's end-of-generation set holds what transformers' generator stops on."""
    from transformers import PreTrainedTokenizerFast

    from finemed_cli.modeling.prompts import end_of_generation_ids
    from tests.conftest import make_tiny_llama

    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.chat_template = tiny_tokenizer.chat_template
    model = make_tiny_llama(len(tok))
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    d = save_model(model, tok, tmp_path / "eot")
    out = export_gguf(d, tmp_path / "eot.gguf", "f32").path
    fields, _ = _reader_fields(out)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.eot_token_id"] == eot
    with LlamaCppGenerator(out, tok, None, n_ctx=64) as gen:
        assert {t for t in range(len(tok)) if gen.is_eog(t)} >= set(end_of_generation_ids(tok, model)) == {
            tok.eos_token_id, eot}


def test_ctrl_c_stops_a_reply_and_keeps_the_session(tiny_untied_dir, tmp_path, monkeypatch) -> None:
    """Ctrl-C during a reply: the reply stops, what was said stays in the history paired with its question,
    and the next line is answered; Ctrl-C at the prompt only starts a fresh line."""
    from click.testing import CliRunner

    from finemed_cli.cli.main import cli
    from finemed_cli.generate.chat import ChatSession

    base = export_gguf(tiny_untied_dir, tmp_path / "m.gguf", "f16").path
    session = ChatSession(base, max_tokens=8, n_ctx=256)
    try:
        replies = session.reply("hello")
        next(replies)
        replies.close()  # what the CLI does when Ctrl-C stops the reader
        assert [m["role"] for m in session.history] == ["user", "assistant"]
        assert list(session.reply("and again"))  # the session goes on
        assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    finally:
        session.close()

    original = ChatSession.reply
    seen = []

    def interrupted(self, text):
        seen.append(text)
        if text == "stop me":
            yield "partial"
            raise KeyboardInterrupt
        yield from original(self, text)

    monkeypatch.setattr(ChatSession, "reply", interrupted)
    monkeypatch.setenv("FINEMED_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(cli, ["chat", str(base), "--max-tokens", "4", "--threads", "1"],
                             input="stop me\nnext question\n/exit\n")
    assert res.exit_code == 0, res.output
    assert "(reply stopped)" in res.output and seen == ["stop me", "next question"]
