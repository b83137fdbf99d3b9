"""Option log-likelihoods (prompt once, options continuing it in the same pass; several questions packed,
the shared prompt start run once) against a plain full forward of prompt + option, on a tiny random model;
and held-out bits per token."""

from __future__ import annotations

import math

import torch

from finemed_cli.data.records import CorpusRecord, QuestionRecord
from finemed_cli.eval.loglik import (
    bits,
    loglik_record,
    option_logliks,
    option_logliks_batch,
    option_scores,
    response_example,
    response_nll,
    shared_prefix,
)
from finemed_cli.modeling.prompts import question_messages, render_chat

Q = QuestionRecord("q1", "Which hormone is low in primary hypothyroidism?",
                   {"A": "Thyroxine", "B": "Thyroid stimulating hormone is raised instead", "C": "Insulin (µU/mL)"}, "A")


def _brute(model, tok, q: QuestionRecord) -> dict[str, float]:
    text = render_chat(tok, question_messages(q), add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    out = {}
    for letter, option in q.options.items():
        whole = tok(text + option, add_special_tokens=False)["input_ids"]
        assert whole[: len(prompt)] == prompt
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
        out[letter] = sum(float(logp[j - 1, whole[j]]) for j in range(len(prompt), len(whole)))
    return out


def test_option_logliks_equal_a_full_forward_per_option(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    got = option_logliks(model, tok, Q)
    want = _brute(model, tok, Q)
    for letter in Q.options:
        assert math.isclose(got[letter].logprob, want[letter], abs_tol=1e-4), letter
        assert got[letter].chars == len(Q.options[letter])  # characters, as lm-eval-harness (µ is 2 bytes)
    rec = loglik_record(Q, got, "no-ttt")
    assert rec["prediction"] == max(want, key=want.get)
    best_norm = max(got, key=lambda k: got[k].logprob / got[k].chars)
    assert rec["prediction_norm"] == best_norm and rec["correct"] == (rec["prediction"] == "A")
    labelled = {k: {"logprob": round(s.logprob, 5), "tokens": s.tokens, "chars": s.chars} for k, s in got.items()}
    assert rec["scores"] == labelled  # each option's numbers named, not an unlabelled array
    old = {k: [v["logprob"], v["tokens"], v["chars"]] for k, v in labelled.items()}  # files before the labels
    assert option_scores({"scores": old}) == option_scores(rec) == labelled


Q2 = QuestionRecord("q2", "A 54-year-old has polyuria and a fasting glucose of 9 mmol/L. Diagnosis?",
                    {"A": "Type 2 diabetes mellitus", "B": "Diabetes insipidus", "C": "Cushing syndrome",
                     "D": "Primary hyperaldosteronism", "E": "Hypercalcaemia"}, "A")
Q3 = QuestionRecord("q3", "Short?", {"A": "Yes", "B": "No"}, "B")


def test_packed_batch_with_shared_prefix_equals_each_question_alone(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    prefix = shared_prefix(model, tok)
    assert prefix is not None and len(prefix.ids) >= 8  # the system prompt
    assert all(tok(render_chat(tok, question_messages(q), add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"][: len(prefix.ids)] == prefix.ids for q in (Q, Q2, Q3))
    batched = option_logliks_batch(model, tok, [Q, Q2, Q3], prefix)
    for q, got in zip((Q, Q2, Q3), batched, strict=True):
        want = _brute(model, tok, q)
        assert list(got) == list(q.options)
        for letter in q.options:
            assert math.isclose(got[letter].logprob, want[letter], abs_tol=1e-4), (q.id, letter)
            assert got[letter].tokens == len(tok(q.options[letter], add_special_tokens=False)["input_ids"])


def test_models_the_packed_pass_is_not_exact_for_are_scored_through_their_own_forward(tiny_model,
                                                                                      monkeypatch) -> None:
    from finemed_cli.eval import loglik

    model, tok = tiny_model.model, tiny_model.tokenizer
    assert loglik.packable(model, 10_000)
    with monkeypatch.context() as m:
        m.setattr(model.config, "sliding_window", 64, raising=False)
        assert loglik.packable(model, 63) and not loglik.packable(model, 64)  # a window the sequences exceed
    monkeypatch.setattr(loglik, "packable", lambda m, longest=0: False)
    assert shared_prefix(model, tok) is None
    for q, got in zip((Q, Q2), option_logliks_batch(model, tok, [Q, Q2]), strict=True):
        want = _brute(model, tok, q)
        for letter in q.options:
            assert math.isclose(got[letter].logprob, want[letter], abs_tol=1e-4), (q.id, letter)


def test_response_bits_per_token(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    r = CorpusRecord("c1", "Name a thyroid hormone.", "The gland makes T4.", "Thyroxine.")
    ex = response_example(tok, r, 512)
    nats, n = response_nll(model, ex)
    with torch.no_grad():
        loss = model(input_ids=ex.input_ids, labels=ex.labels).loss
    assert n == ex.target_tokens and math.isclose(nats / n, float(loss), rel_tol=1e-4)
    assert math.isclose(bits(nats, n), float(loss) / math.log(2), rel_tol=1e-4)


def test_eval_loglik_with_batched_ttt_equals_one_question_at_a_time(tmp_path, tiny_model, hash_embedder) -> None:
    """`finemed eval --mode loglik --batch-size 3`: the questions' LoRA adapters train together and score
    their own questions in one packed pass; the scores equal TTT and scoring one question at a time."""
    import orjson

    from finemed_cli.config.answer import TTTConfig
    from finemed_cli.eval.benchmarks import BenchmarkItem
    from finemed_cli.eval.variants import parse_variants
    from finemed_cli.pipeline.eval_runs import EvalRun, Models, run_loglik
    from finemed_cli.retrieval.index import CorpusIndex, build_index
    from tests.conftest import EXAMPLES

    build_index(EXAMPLES / "corpus.jsonl", tmp_path / "idx", hash_embedder)
    index = CorpusIndex(tmp_path / "idx")

    items = [BenchmarkItem(q, "medqa", None) for q in (Q, Q2, Q3)]
    ttt = TTTConfig(k=1, lr=1e-2)
    variants = parse_variants("ttt", None)
    got = {}
    for size in (1, 3):
        run = EvalRun(tmp_path / f"b{size}", Models("cpu", "float32", loaded={None: tiny_model}), ttt, 0, False,
                      index, hash_embedder, ttt_batch=size)
        files = run_loglik(run, variants, items)
        got[size] = {r["id"]: r for r in map(orjson.loads, files["ttt"].read_bytes().splitlines())}
    assert set(got[3]) == {"q1", "q2", "q3"}
    for qid, one in got[1].items():
        assert one["neighbours"] and one["neighbours"] == got[3][qid]["neighbours"]
        for letter, score in one["scores"].items():
            assert math.isclose(got[3][qid]["scores"][letter]["logprob"], score["logprob"], abs_tol=1e-4), (qid, letter)
    # and TTT moved the scores: the comparison above is not of two unadapted passes
    plain = option_logliks(tiny_model.model, tiny_model.tokenizer, Q)
    assert max(abs(plain[k].logprob - got[1]["q1"]["scores"][k]["logprob"]) for k in Q.options) > 1e-3


def test_auto_dtype_is_bf16_for_loglik_on_a_cpu_with_native_bf16_only(monkeypatch) -> None:
    from pathlib import Path

    from finemed_cli.checkpoints import loading
    from finemed_cli.config.eval import EvalConfig
    from finemed_cli.pipeline.evaluate import eval_dtype

    def dtype(mode: str, asked: str, adapts: bool) -> str:
        return eval_dtype(EvalConfig([], Path("out"), mode=mode, dtype=asked, device="cpu"), adapts)

    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    assert dtype("loglik", "auto", adapts=False) == "bfloat16"
    assert dtype("loglik", "auto", adapts=True) == "auto"  # a TTT comparison stays fp32
    assert dtype("loglik", "float32", adapts=False) == "float32"  # asked for: kept
    assert dtype("generate", "auto", adapts=False) == "auto"
    assert dtype("perplexity", "auto", adapts=False) == "auto"
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    assert dtype("loglik", "auto", adapts=False) == "auto"
