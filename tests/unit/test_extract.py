"""The answer extractor on the response shapes models really produce."""

from __future__ import annotations

import pytest

from finemed_cli.generate.extract import (
    Disagreement,
    extract_choice,
    extract_open_answer,
    letter_text_disagreement,
    summary_section,
)

ABCD = {
    "A": "Anti-thyroid peroxidase antibody",
    "B": "TSH receptor-stimulating antibody",
    "C": "Anti-glutamic acid decarboxylase antibody",
    "D": "Anti-thyroglobulin antibody",
}
TOX = {"A": "Naloxone", "B": "N-acetylcysteine", "C": "Fomepizole", "D": "Deferoxamine"}
YNM = {"A": "yes", "B": "no", "C": "maybe"}

CASES = [
    pytest.param(
        "## Thought\nThe patient has hyperthyroidism with exophthalmos and a diffuse goiter, which points to "
        "an autoimmune cause. Let me weigh the antibodies.\n\n## Summarization\nThis is Graves disease, "
        "caused by antibodies that stimulate the TSH receptor, so the answer is (C).",
        ABCD, "C", id="thought-summarization-answer-is-paren",
    ),
    pytest.param("The answer is C", ABCD, "C", id="answer-is-bare-letter"),
    pytest.param("The answer is C.", ABCD, "C", id="answer-is-letter-period"),
    pytest.param("Answer: B", ABCD, "B", id="answer-colon"),
    pytest.param("Final answer: (D)", ABCD, "D", id="final-answer-colon-paren"),
    pytest.param("I think the answer would be [A].", ABCD, "A", id="answer-would-be-bracket"),
    pytest.param("So the answer is option B, the TSH receptor antibody.", ABCD, "B", id="answer-is-option-X"),
    pytest.param("the answer is (c)", ABCD, "C", id="lowercase-letter"),
    pytest.param(
        "Considering all of the above, the correct answer is:\nD. Anti-thyroglobulin antibody",
        ABCD, "D", id="answer-is-colon-newline-option-line",
    ),
    pytest.param(
        "**Thought**: Exophthalmos is specific to Graves disease.\n\n**Summarization**: Graves disease is "
        "driven by TSH receptor-stimulating antibodies (B)",
        ABCD, "B", id="bold-summarization-lone-paren",
    ),
    pytest.param(  # FineMedLM-o1's heading style, the Thought weighing another option first
        "**Thought**\nCould it be (A)? Anti-TPO is raised in Hashimoto thyroiditis, not here.\n\n"
        "**Summarization**\nExophthalmos means Graves disease, so the answer is (B).",
        ABCD, "B", id="bold-headings-on-their-own-lines",
    ),
    pytest.param(
        "**Thought:**\nThe answer is (A) at first sight, but no.\n**Summarization:**\nB",
        ABCD, "B", id="bold-headings-with-colons-letter-only-summary",
    ),
    pytest.param(
        "## Thought\nAt first the answer is (A), since anti-TPO is common. But TPO antibodies do not cause "
        "exophthalmos.\n\n## Summarization\nGraves disease: the answer is (B).",
        ABCD, "B", id="summarization-answer-is-beats-thought-answer-is",
    ),
    pytest.param(
        "## Thought\nOption (A) is tempting and (D) also appears in autoimmune thyroiditis.\n\n"
        "## Summarization\nThe best choice is (B).",
        ABCD, "B", id="summarization-paren-beats-thought-parens",
    ),
    pytest.param(
        "## Thought\nthe answer is (A)... wait.\n## Summarization\nfirst pass: the answer is (C)\n"
        "## Summarization\nOn reflection the answer is (B).",
        ABCD, "B", id="last-summarization-wins",
    ),
    pytest.param(
        "Acetaminophen overdose depletes glutathione, so N-acetylcysteine is the treatment.",
        TOX, "B", id="option-text-only",
    ),
    pytest.param(
        "## Thought\nNaloxone reverses opioids, not this.\n## Summarization\nGive N-acetylcysteine.",
        TOX, "B", id="option-text-in-summary-only",
    ),
    pytest.param(
        "## Thought\nThe trial shows a benefit.\n## Summarization\nYes, tailored telephone counseling "
        "increased mammography use.",
        YNM, "A", id="pubmedqa-yes",
    ),
    pytest.param(
        "## Summarization\nNo. The intervention did not change outcomes.", YNM, "B", id="pubmedqa-no",
    ),
    pytest.param(
        "## Summarization\nMaybe; the evidence is mixed and inconclusive.", YNM, "C", id="pubmedqa-maybe",
    ),
    pytest.param("## Summarization\nThe answer is maybe.", YNM, "C", id="pubmedqa-answer-is-word"),
    pytest.param("## Summarization\nThe answer is (B).", YNM, "B", id="pubmedqa-letter"),
    pytest.param(
        "## Summarization\nTwo options remain:\nC. Fomepizole\nas the antidote for methanol.",
        {"A": "Naloxone", "B": "Flumazenil", "C": "Ethanol or other", "D": "Deferoxamine"}, "C",
        id="lone-option-line",
    ),
    pytest.param("**C**", ABCD, "C", id="bold-letter-alone"),
    pytest.param("Answer: **C**", ABCD, "C", id="answer-colon-bold-letter"),
    pytest.param("The answer is: **C**", ABCD, "C", id="answer-is-colon-bold-letter"),
    pytest.param("**Final Answer:** C", ABCD, "C", id="bold-final-answer-heading"),
    pytest.param("## Summarization\nB", ABCD, "B", id="summarization-only-a-letter"),
    pytest.param("## Summarization\nB.", ABCD, "B", id="summarization-only-letter-period"),
    pytest.param("Summarization: B)", ABCD, "B", id="summarization-only-letter-paren"),
    pytest.param("So the final answer is $\\boxed{C}$.", ABCD, "C", id="boxed-letter"),
    pytest.param("The correct option is C.", ABCD, "C", id="correct-option-is"),
    pytest.param("## Summarization\nOption C", ABCD, "C", id="summarization-option-X"),
    pytest.param("Answer - D", ABCD, "D", id="answer-dash"),
    pytest.param("answer: c", ABCD, "C", id="answer-colon-lowercase-letter-at-end"),
    pytest.param("The answer is C, a receptor antibody.", ABCD, "C", id="answer-is-letter-comma-article"),
    pytest.param("The answer is I think (B)", dict(zip("ABCDEFGHIJ", "0123456789", strict=True)) | ABCD, "B",
                 id="pronoun-I-is-not-option-I"),
    pytest.param("The final answer is I.", dict(zip("ABCDEFGHIJ", "0123456789", strict=True)), "I",
                 id="option-I-at-end"),
    pytest.param(
        "## Summarization\nSubclinical hypothyroidism",
        {"A": "Hypothyroidism", "B": "Subclinical hypothyroidism", "C": "Hyperthyroidism", "D": "Euthyroid"},
        "B", id="option-text-containing-another-option",
    ),
    pytest.param(
        "## Summarization\nYes. There is no difference in mortality between the arms.", YNM, "A",
        id="pubmedqa-opens-with-yes-then-says-no",
    ),
    pytest.param("## Summarization\nMaybe; there is no clear evidence.", YNM, "C", id="pubmedqa-maybe-then-no"),
    pytest.param("The answer is A or B.", ABCD, None, id="hedge-bare-letters"),
    pytest.param("The answer is (A) or (C).", ABCD, None, id="hedge-parens"),
    pytest.param("The answer is B/D", ABCD, None, id="hedge-slash"),
    pytest.param("Answer: I am not sure, maybe B", dict(zip("ABCDEFGHIJ", "0123456789", strict=True)), None,
                 id="pronoun-I-then-hedge"),
    pytest.param("Summarization: The answer is B and A is wrong.", ABCD, "B", id="answer-and-new-clause"),
    pytest.param("The correct answer is A and B is the most common distractor.", ABCD, "A",
                 id="answer-and-distractor-clause"),
    pytest.param("The answer is C and not A.", ABCD, "C", id="answer-and-not"),
    pytest.param("The answer is I because exogenous hormone lowers thyroglobulin.",
                 dict(zip("ABCDEFGHIJ", "0123456789", strict=True)), "I", id="option-I-because"),
    pytest.param("The answer is I'm fairly sure (B).", dict(zip("ABCDEFGHIJ", "0123456789", strict=True)), "B",
                 id="pronoun-I-contraction"),
    pytest.param("## Summarization\nYes. Wait, the final answer is no.", YNM, "B", id="pubmedqa-answer-is-word-wins"),
    pytest.param("## Summarization\nOption A is incorrect; the others need more data.", ABCD, None,
                 id="option-X-is-incorrect-is-not-a-choice"),
    pytest.param("Answer: A. Anti-thyroid peroxidase antibody", ABCD, "A", id="answer-letter-then-text"),
    pytest.param("I am not certain; more information is needed.", ABCD, None, id="no-answer"),
    pytest.param("", ABCD, None, id="empty-response"),
    pytest.param(
        "## Thought\nNone fit well.\n## Summarization\nI cannot determine this.", ABCD, None,
        id="summarization-commits-to-nothing",
    ),
    pytest.param("The answer is (E).", ABCD, None, id="letter-not-among-options-paren"),
    pytest.param("The answer is E", ABCD, None, id="letter-not-among-options-bare"),
    pytest.param(
        "Both (A) and (C) are antibodies seen in autoimmune disease; I cannot decide between them.",
        ABCD, None, id="two-paren-letters-no-answer-is",
    ),
    pytest.param(
        "## Summarization\nNaloxone and N-acetylcysteine are both antidotes.", TOX, None,
        id="two-option-texts",
    ),
]


@pytest.mark.parametrize(("response", "options", "expected"), CASES)
def test_extract_choice(response: str, options: dict[str, str], expected: str | None) -> None:
    assert extract_choice(response, options) == expected


@pytest.mark.parametrize(("response", "options", "expected"), CASES)
def test_real_response_shapes_do_not_disagree(response: str, options: dict[str, str], expected: str | None) -> None:
    assert letter_text_disagreement(response, options) is None


# N-acetylcysteine is D here, naloxone B: a model recalling another ordering names one by letter, one by text
ANTIDOTES = {"A": "Atropine", "B": "Naloxone", "C": "Flumazenil", "D": "N-acetylcysteine"}


@pytest.mark.parametrize(
    ("response", "options", "expected"),
    [
        pytest.param("The correct answer is D. Naloxone.", ANTIDOTES, Disagreement("D", "B"), id="letter-dot-text"),
        pytest.param("The answer is (D) - naloxone", ANTIDOTES, Disagreement("D", "B"), id="paren-dash-lowercase"),
        pytest.param("**Answer:** **D. Naloxone**", ANTIDOTES, Disagreement("D", "B"), id="bold"),
        pytest.param("## Thought\nOpioid toxicity.\n\n## Summarization\nD. Naloxone", ANTIDOTES,
                     Disagreement("D", "B"), id="option-line-extracted-by-text"),
        pytest.param("Final answer: A. no", YNM, Disagreement("A", "B"), id="yes-no"),
        pytest.param("The correct answer is D. N-acetylcysteine.", ANTIDOTES, None, id="agrees"),
        pytest.param("The answer is D because naloxone does not reverse it.", ANTIDOTES, None, id="reason-not-name"),
        pytest.param("The answer is D.\nNaloxone would not help here.", ANTIDOTES, None, id="next-line-is-prose"),
        pytest.param("The answer is D. Naloxone is for opioids, not this.", ANTIDOTES, None, id="sentence-not-name"),
        pytest.param("The answer is D", ANTIDOTES, None, id="letter-only"),
        pytest.param("The answer is D. Naloxone.", {**ANTIDOTES, "D": "Naloxone and flumazenil"}, None,
                     id="abbreviates-own-text"),
        pytest.param("## Thought\nThe answer is D. Naloxone? No: acetaminophen.\n\n## Summarization\nThe answer is C.",
                     ANTIDOTES, None, id="earlier-slip-not-the-answer"),
        pytest.param("I cannot decide.", ANTIDOTES, None, id="no-answer"),
    ],
)
def test_letter_text_disagreement(response: str, options: dict[str, str], expected: Disagreement | None) -> None:
    assert letter_text_disagreement(response, options) == expected


def test_answer_is_followed_by_article_a_is_not_option_a() -> None:
    response = "## Summarization\nThe answer is a TSH receptor-stimulating antibody (B)."
    assert extract_choice(response, ABCD) == "B"


def test_summarization_lone_paren_beats_answer_is_in_thought() -> None:
    response = (
        "## Thought\nAnti-TPO antibodies are most common, so the answer is A. But wait: anti-TPO does not "
        "cause exophthalmos, so reconsider.\n\n## Summarization\nGraves disease, from TSH "
        "receptor-stimulating antibodies (B)."
    )
    assert extract_choice(response, ABCD) == "B"


# --------------------------------------------------------------------------- summary_section


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("## Thought\nreasoning\n\n## Summarization\nthe answer is (B).\n", "the answer is (B)."),
        ("**Thought**: x\n**Summarization**: Graves disease.", "Graves disease."),
        ("Thought: x\nSummarization: done", "done"),
        ("## Summarisation\nBritish spelling", "British spelling"),
        ("## SUMMARIZATION\nupper", "upper"),
        ("## Summarization\nfirst\n## Summarization\n second ", "second"),
        ("  no heading at all \n", "no heading at all"),
        ("", ""),
    ],
    ids=["markdown", "bold-colon", "plain-colon", "british", "upper", "last-heading", "none", "empty"],
)
def test_summary_section(response: str, expected: str) -> None:
    assert summary_section(response) == expected


# --------------------------------------------------------------------------- extract_open_answer


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            "## Thought\nParacetamol overdose depletes glutathione.\n\n## Summarization\n"
            "Give N-acetylcysteine as soon as possible.",
            "Give N-acetylcysteine as soon as possible.",
        ),
        (
            "Paracetamol overdose depletes glutathione.\n\nThe liver is at risk.\n\n"
            "Give N-acetylcysteine.\n",
            "Give N-acetylcysteine.",
        ),
        ("One paragraph only.", "One paragraph only."),
        ("", ""),
        ("   \n\n  ", ""),
    ],
    ids=["summarization", "last-paragraph", "single-paragraph", "empty", "whitespace"],
)
def test_extract_open_answer(response: str, expected: str) -> None:
    assert extract_open_answer(response) == expected
