"""`finemed eval --compare` variants with TTT settings of their own: parsed, run as separate variants with
their own results files, recorded settings and results, and written out in full in the report."""

from __future__ import annotations

import orjson
import pytest

from finemed_cli.config.answer import TTTConfig
from finemed_cli.errors import ConfigError
from finemed_cli.eval.variants import parse_variants
from tests.unit.test_eval_loglik import Q2, Q3, Q


def test_spellings_and_their_settings() -> None:
    v = parse_variants("no-ttt, ttt, ttt(steps=4,lr=1e-3), ttt(k=3,layers=all,loss_on=reasoning,targets=q_proj+v_proj)"
                       "@runs/x/final", "base-model")
    assert [x.name for x in v] == ["no-ttt", "ttt", "ttt(steps=4,lr=1e-3)",
                                   "ttt(k=3,layers=all,loss_on=reasoning,targets=q_proj+v_proj)@runs/x/final"]
    assert [x.model for x in v] == ["base-model", "base-model", "base-model", "runs/x/final"]
    c = v[3].ttt_config(TTTConfig())
    assert (c.k, c.layers, c.loss_on, c.targets) == (3, 0, "reasoning", ("q_proj", "v_proj"))
    assert c.resolved_layers(30) == 30
    full = v[2].describe(TTTConfig())
    assert full["steps"] == 4 and full["lr"] == 1e-3 and full["rank"] == 8 and full["layers"] == "a quarter"


@pytest.mark.parametrize(("spec", "why"), [
    ("ttt(steps=x)", "is not a number"), ("ttt(foo=1)", "is not a TTT setting"),
    ("no-ttt(steps=2)", "takes no TTT settings"), ("ttt(steps=4", "unbalanced"), ("ttt(steps=0)", "at least 1"),
    ("ttt(steps=2),ttt(steps=2)", "named twice"), ("ttt(loss_on=answer)", "not one of response, reasoning"),
])
def test_bad_variants_are_named(spec, why) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_variants(spec, None)


def test_two_settings_are_two_variants_with_their_own_settings_and_results(tmp_path, tiny_model,
                                                                          hash_embedder) -> None:
    from finemed_cli.eval.benchmarks import BenchmarkItem
    from finemed_cli.pipeline.eval_runs import EvalRun, Models, run_loglik
    from finemed_cli.retrieval.index import CorpusIndex, build_index
    from tests.conftest import EXAMPLES

    build_index(EXAMPLES / "corpus.jsonl", tmp_path / "idx", hash_embedder)
    index = CorpusIndex(tmp_path / "idx")
    items = [BenchmarkItem(q, "medqa", None) for q in (Q, Q2, Q3)]
    variants = parse_variants("no-ttt,ttt(steps=1,lr=1e-2),ttt(steps=3,lr=1e-2,loss_on=reasoning)", None)
    run = EvalRun(tmp_path / "out", Models("cpu", "float32", loaded={None: tiny_model}), TTTConfig(), 0, False,
                  index, hash_embedder)
    files = run_loglik(run, variants, items)
    assert len(set(files.values())) == 3
    settings = {name: orjson.loads(path.with_name(path.stem + ".settings.json").read_bytes())
                for name, path in files.items()}
    one, three = settings["ttt(steps=1,lr=1e-2)"]["ttt"], settings["ttt(steps=3,lr=1e-2,loss_on=reasoning)"]["ttt"]
    assert (one["steps"], three["steps"], one["lr"], three["loss_on"]) == (1, 3, 1e-2, "reasoning")
    assert one["loss_on"] == "response" and one["layers"] == three["layers"] == "a quarter"
    scores = {name: {r["id"]: r["scores"] for r in map(orjson.loads, path.read_bytes().splitlines())}
              for name, path in files.items()}
    a, b = scores["ttt(steps=1,lr=1e-2)"], scores["ttt(steps=3,lr=1e-2,loss_on=reasoning)"]
    assert a.keys() == b.keys() == {"q1", "q2", "q3"} and a != b and a != scores["no-ttt"]
