"""The answer extractor: fixed before scoring, unit-tested on response shapes models really produce."""

from __future__ import annotations

import re

_SUMMARY = re.compile(r"#*\s*\**\s*Summari[sz]ation\s*\**\s*:?", re.IGNORECASE)
# A bare letter must be upper case ("the answer is a TSH…" is not option A); in brackets either case.
_ANSWER_IS = re.compile(
    r"(?i:answer\s*(?:is|would be|should be|:)\s*:?\s*(?:option\s*)?)"
    r"(?:[\(\[]\s*([A-Ja-j])\s*[\)\]]|([A-J])(?![A-Za-z]))"
)
_PAREN_LETTER = re.compile(r"\(([A-J])\)")
_OPTION_LINE = re.compile(r"(?:^|\n)\s*(?:option\s*)?([A-J])[.):]\s", re.IGNORECASE)


def summary_section(response: str) -> str:
    """The text after the last 'Summarization' heading, or the whole response when there is none."""
    matches = list(_SUMMARY.finditer(response))
    return response[matches[-1].end():].strip() if matches else response.strip()


def extract_choice(response: str, options: dict[str, str]) -> str | None:
    """The option letter a response commits to, or None when it commits to none.

    The Summarization decides when it commits: its last 'the answer is (X)', a lone '(X)', the text of
    exactly one option (or yes/no/maybe for PubMedQA), or one 'X.' option line. Only when it commits to
    nothing does the last 'the answer is (X)' anywhere in the response count.
    """
    letters = set(options)
    summary = summary_section(response)
    choice = _summary_choice(summary, options)
    if choice is not None:
        return choice
    found = _answer_is(response, letters)
    return found[-1] if found else None


def _answer_is(text: str, letters: set[str]) -> list[str]:
    found = [(m.group(1) or m.group(2)).upper() for m in _ANSWER_IS.finditer(text)]
    return [x for x in found if x in letters]


def _summary_choice(summary: str, options: dict[str, str]) -> str | None:
    letters = set(options)
    found = _answer_is(summary, letters)
    if found:
        return found[-1]
    found = [m.group(1) for m in _PAREN_LETTER.finditer(summary) if m.group(1) in letters]
    if len(set(found)) == 1:
        return found[0]
    low = summary.lower()
    hits = {k for k, v in options.items() if len(v) > 1 and re.search(rf"\b{re.escape(v.lower())}\b", low)}
    if len(hits) == 1:
        return hits.pop()
    found = [m.group(1).upper() for m in _OPTION_LINE.finditer(summary) if m.group(1).upper() in letters]
    if len(set(found)) == 1:
        return found[0]
    return None


def extract_open_answer(response: str) -> str:
    """For open questions: the Summarization text (or the last paragraph when there is no heading)."""
    summary = summary_section(response)
    if summary != response.strip():
        return summary
    paragraphs = [p.strip() for p in response.strip().split("\n\n") if p.strip()]
    return paragraphs[-1] if paragraphs else ""
