"""The in-context variants (`icl`, `ttt+icl`): the retrieved neighbours shown in the prompt as worked examples,
in every eval mode and in `finemed answer --icl`, scored exactly as a prompt written out by hand would be."""

from __future__ import annotations

import math

import orjson
import pytest
import torch

from finemed_cli.config.answer import AnswerConfig, GenerationConfig, TTTConfig
from finemed_cli.data.jsonl import read_records
from finemed_cli.data.records import CorpusRecord
from finemed_cli.errors import ConfigError
from finemed_cli.eval.variants import parse_variants
from finemed_cli.modeling.prompts import question_messages, render_chat
from tests.conftest import EXAMPLES
from tests.unit.test_eval_loglik import Q2, Q3, Q


def _read(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture()
def corpus() -> list[CorpusRecord]:
    return read_records(EXAMPLES / "corpus.jsonl", CorpusRecord.from_json)


@pytest.fixture()
def index(tmp_path, hash_embedder):
    from finemed_cli.retrieval.index import CorpusIndex, build_index

    build_index(EXAMPLES / "corpus.jsonl", tmp_path / "idx", hash_embedder)
    return CorpusIndex(tmp_path / "idx")


def test_the_in_context_kinds_and_their_settings() -> None:
    v = {x.name: x for x in parse_variants("no-ttt,icl,icl(k=2),ttt+icl,paper+icl,ttt", None)}
    assert [(x.ttt, x.icl) for x in v.values()] == [("off", False), ("off", True), ("off", True), ("lora", True),
                                                   ("paper", True), ("lora", False)]
    assert [x.retrieves for x in v.values()] == [False, True, True, True, True, True]
    assert v["icl(k=2)"].describe(TTTConfig()) == {"model": None, "ttt": "off", "icl": {"k": 2, "pick": "top"}}
    both = v["ttt+icl"].describe(TTTConfig(k=3))
    assert both["icl"] == {"k": 3, "pick": "top"} and both["steps"] == TTTConfig().resolved_steps()
    with pytest.raises(ConfigError, match="trains nothing"):
        parse_variants("icl(steps=2)", None)


def test_examples_are_earlier_turns_before_the_question(corpus) -> None:
    msgs = question_messages(Q, "SYS", corpus[:2])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"].startswith(corpus[0].question.strip())
    assert msgs[2]["content"].startswith("## Thought\n") and "## Summarization" in msgs[2]["content"]
    assert msgs[-1]["content"].startswith(Q.question) and "Options:\nA. Thyroxine" in msgs[-1]["content"]


def test_option_scores_in_context_equal_a_full_forward_of_the_written_out_prompt(tiny_model, corpus) -> None:
    """The packed pass with the shared system prefix stays exact with worked examples in the prompt."""
    from finemed_cli.eval.loglik import option_logliks_batch, shared_prefix

    model, tok = tiny_model.model, tiny_model.tokenizer
    shown = [[corpus[0]], [], [corpus[1], corpus[2]]]
    got = option_logliks_batch(model, tok, [Q, Q2, Q3], shared_prefix(model, tok), None, examples=shown)
    for q, ex, scores in zip((Q, Q2, Q3), shown, got, strict=True):
        text = render_chat(tok, question_messages(q, examples=ex), add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        for letter, option in q.options.items():
            whole = tok(text + option, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
            want = sum(float(logp[j - 1, whole[j]]) for j in range(len(prompt), len(whole)))
            assert math.isclose(scores[letter].logprob, want, abs_tol=1e-4), (q.id, letter)
    plain = option_logliks_batch(model, tok, [Q])[0]
    assert max(abs(plain[k].logprob - got[0][k].logprob) for k in Q.options) > 1e-3  # the example mattered


def test_eval_loglik_runs_icl_and_ttt_icl_beside_ttt_and_no_ttt(tmp_path, tiny_model, hash_embedder, index,
                                                                 corpus) -> None:
    from finemed_cli.eval.benchmarks import BenchmarkItem
    from finemed_cli.eval.loglik import option_logliks_batch
    from finemed_cli.pipeline.eval_runs import EvalRun, Models, run_loglik

    items = [BenchmarkItem(q, "medqa", None) for q in (Q, Q2, Q3)]
    variants = parse_variants("no-ttt,icl,ttt,ttt+icl", None)
    ttt = TTTConfig(k=1, steps=2, lr=1e-2)
    run = EvalRun(tmp_path / "out", Models("cpu", "float32", loaded={None: tiny_model}), ttt, 0, False, index,
                  hash_embedder)
    files = run_loglik(run, variants, items)
    recs = {name: {r["id"]: r for r in _read(path)} for name, path in files.items()}
    by_id = {r.id: r for r in corpus}
    for qid, q in (("q1", Q), ("q2", Q2), ("q3", Q3)):
        icl, both = recs["icl"][qid], recs["ttt+icl"][qid]
        assert icl["icl"] == icl["neighbours"] == recs["ttt"][qid]["neighbours"] == both["icl"] and len(icl["icl"]) == 1
        assert "icl" not in recs["no-ttt"][qid] and "icl" not in recs["ttt"][qid]
        want = option_logliks_batch(tiny_model.model, tiny_model.tokenizer, [q],
                                    examples=[[by_id[i] for i in icl["icl"]]])[0]
        for letter, score in icl["scores"].items():  # exactly the question with its neighbour shown
            assert math.isclose(score["logprob"], want[letter].logprob, abs_tol=1e-4), (qid, letter)
        assert len({str(recs[v][qid]["scores"]) for v in recs}) == 4  # four different variants
    settings = {name: orjson.loads(path.with_name(path.stem + ".settings.json").read_bytes())
                for name, path in files.items()}
    assert settings["icl"]["ttt"] == "off" and settings["icl"]["icl"]["k"] == 1
    assert settings["ttt+icl"]["ttt"]["mode"] == "lora" and settings["ttt+icl"]["icl"]["index"]
    assert "icl" not in settings["ttt"] and "icl" not in settings["no-ttt"]


def test_eval_perplexity_in_context_scores_the_record_after_its_neighbours(tmp_path, tiny_model, hash_embedder,
                                                                            index, corpus) -> None:
    from finemed_cli.eval.loglik import response_example, response_nll
    from finemed_cli.pipeline.eval_runs import EvalRun, Models, run_perplexity

    run = EvalRun(tmp_path / "out", Models("cpu", "float32", loaded={None: tiny_model}), TTTConfig(k=1), 0, False,
                  index, hash_embedder)
    files = run_perplexity(run, parse_variants("no-ttt,icl", None), corpus[:3], 8192)
    plain, icl = ({r["id"]: r for r in _read(files[v])} for v in ("no-ttt", "icl"))
    by_id = {r.id: r for r in corpus}
    for r in corpus[:3]:
        rec = icl[r.id]
        assert rec["icl"] and r.id not in rec["icl"]  # never the record itself
        ex = response_example(tiny_model.tokenizer, r, 8192, context=[by_id[i] for i in rec["icl"]])
        nats, tokens = response_nll(tiny_model.model, ex)
        assert tokens == rec["tokens"] == plain[r.id]["tokens"] and math.isclose(nats, rec["nats"], abs_tol=1e-3)
        assert not math.isclose(rec["nats"], plain[r.id]["nats"], abs_tol=1e-3)


def test_answer_icl_shows_the_neighbours_without_training(tmp_path, tiny_model, hash_embedder, index) -> None:
    from finemed_cli.pipeline.answer import run_answer

    def run(name: str, **kw):
        config = AnswerConfig(questions=EXAMPLES / "questions.jsonl", output=tmp_path / f"{name}.jsonl",
                              index=index.path, generation=GenerationConfig(max_new_tokens=4), limit=2, **kw)
        run_answer(config, progress=False, embedder=hash_embedder, loaded=tiny_model)
        return _read(tmp_path / f"{name}.jsonl")

    saved = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    recs = run("icl", ttt=TTTConfig(mode="off", k=1), icl=True)
    assert all(r["icl"] == [n["id"] for n in r["neighbours"]] and len(r["icl"]) == 1 for r in recs)
    assert all(r["ttt"]["mode"] == "off" and "error" not in r for r in recs)
    # two neighbours do not fit the tiny model's 2,048 tokens: recorded as not answered, saying what to do
    too_long = run("icl2", ttt=TTTConfig(mode="off", k=2), icl=True)
    assert all("--icl: use a smaller k" in r["error"] and r["prediction"] is None for r in too_long)
    assert all(torch.equal(v, saved[k]) for k, v in tiny_model.model.state_dict().items())
    with pytest.raises(ConfigError, match="--icl shows retrieved examples"):
        AnswerConfig(questions=EXAMPLES / "questions.jsonl", output=tmp_path / "x.jsonl", icl=True,
                     ttt=TTTConfig(mode="off")).validate()
