"""N-gram decontamination: normalisation, overlap fractions computed by hand, matched ids, short texts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finemed_cli.eval.contamination import (
    Contamination,
    NgramIndex,
    Overlap,
    find_contaminated,
    hash_gram,
    normalise,
)

REFERENCE = (
    "A 34-year-old woman presents with palpitations, weight loss and heat intolerance; "
    "her thyroid is diffusely enlarged and she has exophthalmos."
)
# 8 distinct words; with n = 4 they give 5 grams.
SHORT_REF = "alpha bravo charlie delta echo foxtrot golf hotel"


def test_normalise() -> None:
    assert normalise("Hyper-Thyroidism, TSH!  (low)") == ["hyperthyroidism", "tsh", "low"]
    assert normalise("ＴＳＨ ﬁbrosis") == ["tsh", "fibrosis"]  # full-width letters and the fi ligature: NFKC
    assert normalise("under_score 5.0 mg/dL") == ["underscore", "50", "mgdl"]
    assert normalise(" \n ") == []


def test_exact_copy_is_fully_contaminated() -> None:
    index = NgramIndex([("ref-1", REFERENCE)])
    assert index.overlap(REFERENCE) == Overlap(1.0, "ref-1")


def test_case_and_punctuation_changes_still_match() -> None:
    index = NgramIndex([("ref-1", REFERENCE)])
    changed = (
        "A 34-YEAR-OLD WOMAN PRESENTS WITH PALPITATIONS WEIGHT LOSS AND HEAT INTOLERANCE -- "
        "HER THYROID IS DIFFUSELY ENLARGED, AND SHE HAS EXOPHTHALMOS!!"
    )
    assert index.overlap(changed) == Overlap(1.0, "ref-1")


def test_unrelated_text_has_no_overlap() -> None:
    index = NgramIndex([("ref-1", REFERENCE)])
    unrelated = "Which antibiotic is first line for uncomplicated cystitis in a non-pregnant adult patient?"
    assert index.overlap(unrelated) == Overlap(0.0, None)


def test_half_overlap_is_exact() -> None:
    # The question copies the reference's first 7 words and adds 4 new ones: 11 tokens, 8 grams of 4.
    # Grams lying wholly in the copied 7 words: 7 - 4 + 1 = 4 of the 8, so exactly 1/2.
    index = NgramIndex([("ref", SHORT_REF)], n=4)
    question = "Alpha bravo charlie delta echo foxtrot golf: india juliett kilo lima?"
    assert len(normalise(question)) == 11
    assert index.overlap(question) == Overlap(0.5, "ref")


def test_half_overlap_at_default_n() -> None:
    # n = 8: copy 15 reference words, add 8 new ones; 23 tokens give 16 grams, 15 - 8 + 1 = 8 shared.
    ref_words = [f"w{i}" for i in range(20)]
    new_words = [f"new{i}" for i in range(8)]
    index = NgramIndex([("ref", " ".join(ref_words))])
    assert index.n == 8 and len(index) == 13
    assert index.overlap(" ".join(ref_words[:15] + new_words)) == Overlap(0.5, "ref")


def test_matched_id_is_the_reference_sharing_most() -> None:
    other = "zulu yankee xray whiskey victor uniform tango sierra"
    index = NgramIndex([("other", other), ("main", SHORT_REF)], n=4)
    question = "zulu yankee xray whiskey victor uniform " + "alpha bravo charlie delta echo foxtrot golf"
    # 13 tokens, 10 grams: 3 wholly in "other", 4 wholly in "main", 3 straddling the join (unmatched).
    result = index.overlap(question)
    assert result == Overlap(7 / 10, "main")


def test_gram_shared_by_two_references_credits_the_first() -> None:
    index = NgramIndex([("first", SHORT_REF), ("second", SHORT_REF)], n=4)
    assert len(index) == 5
    assert index.overlap(SHORT_REF) == Overlap(1.0, "first")


def test_repeated_phrase_counts_once() -> None:
    index = NgramIndex([("ref", SHORT_REF)], n=4)
    # Distinct grams: "alpha bravo charlie delta" (indexed) and 3 others that straddle the repeat.
    assert index.overlap("alpha bravo charlie delta alpha bravo charlie delta") == Overlap(1 / 4, "ref")


def test_short_texts_are_one_gram() -> None:
    index = NgramIndex([("short", "Graves disease?"), ("long", REFERENCE)], n=8)
    assert index.overlap("graves DISEASE") == Overlap(1.0, "short")
    # A short question inside a longer reference does not match: only whole short texts are indexed.
    assert index.overlap("heat intolerance") == Overlap(0.0, None)
    assert index.overlap("Graves") == Overlap(0.0, None)
    assert index.overlap("?!") == Overlap(0.0, None)  # no tokens at all


def test_find_contaminated_filters_by_threshold_in_order() -> None:
    index = NgramIndex([("ref", SHORT_REF)], n=4)
    items = [
        ("q-half", "alpha bravo charlie delta echo foxtrot golf india juliett kilo lima"),
        ("q-clean", "mike november oscar papa quebec romeo"),
        ("q-copy", SHORT_REF.upper()),
    ]
    assert find_contaminated(items, index) == [
        Contamination("q-half", 0.5, "ref"),
        Contamination("q-copy", 1.0, "ref"),
    ]
    assert find_contaminated(items, index, threshold=0.6) == [Contamination("q-copy", 1.0, "ref")]
    with pytest.raises(ValueError, match="threshold"):
        find_contaminated(items, index, threshold=1.5)


def test_n_must_be_positive() -> None:
    with pytest.raises(ValueError, match="n must be at least 1"):
        NgramIndex([], n=0)


def test_hashes_are_stable_across_processes() -> None:
    grams = [tuple(SHORT_REF.split()[i:i + 4]) for i in range(5)]
    code = f"from finemed_cli.eval.contamination import hash_gram; print([hash_gram(g) for g in {grams!r}])"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(run.stdout)
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([hash_gram(g) for g in grams])


def test_shared_medqa_dev_is_flagged_against_the_cots_written_on_it(shared_data) -> None:
    """The shared README says 93 of the 100 MedQA dev questions have Liévin CoTs: the check must find them."""
    from finemed_cli.eval.benchmarks import load_benchmark
    from finemed_cli.eval.contamination import decontaminate, reference_texts

    items = load_benchmark(shared_data / "medqa_dev.jsonl")
    refs = reference_texts([shared_data / "reasoning_vlievin_cot.jsonl"], [])
    kept, info = decontaminate(items, refs, n=8, threshold=0.5, drop=True)
    assert info.flagged == 93 and len(kept) == 7
    assert all(c.matched.endswith(c.id) for c in info.items)
