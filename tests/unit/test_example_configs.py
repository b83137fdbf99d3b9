"""The example train configs stay valid as the config grows: every key known, every value in range; the only
problem allowed is data a user brings (the 8B and paper configs name files that are theirs to make)."""

from __future__ import annotations

import pytest

from finemed_cli.config.train import load_train_config
from finemed_cli.errors import ConfigError
from tests.conftest import EXAMPLES


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("train-*.yaml")))
def test_example_train_config_is_valid_but_for_missing_data(name) -> None:
    try:
        load_train_config(EXAMPLES / name)
    except ConfigError as e:
        problems = str(e).splitlines()[1:]
        assert problems and all("does not exist (paths are relative to the config file)" in p for p in problems), e


def test_the_paper_config_has_the_reference_settings() -> None:
    import yaml

    cfg = yaml.safe_load((EXAMPLES / "train-paper.yaml").read_text())
    sft, dpo = cfg["stages"][:3], cfg["stages"][3]
    assert cfg["model"]["method"] == "full" and [s.get("subdepartment") for s in sft] == [None, None, "Endocrinology"]
    assert all((s["lr"], s["epochs"], s["batch_size"] * s["grad_accum"]) == (5e-6, 2, 16) for s in sft)
    assert (dpo["kind"], dpo["lr"], dpo["epochs"], dpo["batch_size"] * dpo["grad_accum"]) == ("dpo", 1e-7, 1, 16)


def test_example_corpus_departments_are_the_taxonomy_the_filters_use() -> None:
    """The README's department filters name the synth taxonomy's departments: the example corpus uses them too."""
    import orjson

    from finemed_cli.synth.taxonomy import DEPARTMENTS

    for line in (EXAMPLES / "corpus.jsonl").read_bytes().splitlines():
        rec = orjson.loads(line)
        assert rec["department"] in DEPARTMENTS, rec["id"]
        assert rec.get("subdepartment") in (None, *DEPARTMENTS[rec["department"]][1]), rec["id"]
