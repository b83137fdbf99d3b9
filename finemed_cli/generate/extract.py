"""The answer extractor: fixed before scoring, unit-tested on response shapes models really produce."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SUMMARY = re.compile(r"#*\s*\**\s*Summari[sz]ation\s*\**\s*:?", re.IGNORECASE)
# A Summarization heading as a line of its own, in either style models are trained with: '## Summarization'
# (finemed's) or '**Summarization**' (FineMedLM-o1's); with or without a colon.
SUMMARY_HEADING = re.compile(r"(?:^|\n)[ \t]*(?:#+[ \t]*|\*\*[ \t]*)Summari[sz]ation\b", re.IGNORECASE)
_EMPHASIS = re.compile(r"\*\*|__")  # markdown bold around a letter or a heading ("**Answer:** C")
# What follows the pronoun "I" ("the answer is I think (B)", "I'm"), never option I ("the answer is I because").
_PRONOUN_VERBS = r"\s(?:think|believe|guess|suppose|feel|am|would|will|can|cannot|must|have|was|need)\b"
# "the answer is", "correct option:", "choice -": what names the answer that follows.
_LEAD = r"(?:answer|option|choice)\s*(?:is|would be|should be|:|-|–|=)\s*:?\s*"
# "answer is X" and its kin. A bare letter must be upper case ("the answer is a TSH…" is not option A) unless it
# ends the line ("answer: c"); "I" before `_PRONOUN_VERBS` or an apostrophe is the pronoun.
# In brackets or \boxed{} either case.
_ANSWER_IS = re.compile(
    r"(?:(?i:" + _LEAD + r"(?:option\s*|choice\s*)?)"
    r"(?:[\(\[]\s*([A-Ja-j])\s*[\)\]]|([A-HJ]|I(?!\s*(?:['’][a-z]|" + _PRONOUN_VERBS + r")))(?![A-Za-z])"
    r"|([a-j])(?=[.)]?[ \t]*(?:\n|$)))"
    r"|\\boxed\{\s*\(?([A-Ja-j])\)?\s*\})"
)
# "the answer is A or B", "(A) or (C)", "B/D": a hedge commits to neither; "B and A is wrong" is a new clause.
_HEDGE = re.compile(r"\s*(?:/|\bor\b|\band\b)\s*(?i:option\s*)?"
                    r"(?:[\(\[]\s*[A-Ja-j]\s*[\)\]]|[A-J](?![A-Za-z]))"
                    r"(?!\s+(?:is|are|was|were|would|could|can|may|might|seems?|looks?|remains?)\b)")
_PAREN_LETTER = re.compile(r"\(([A-J])\)")
_OPTION_LINE = re.compile(r"(?:^|\n)[ \t]*(?:option\s+([A-J])[ \t]*(?:[.):]|\n|$)|([A-J])[.):](?:\s|$))",
                          re.IGNORECASE)
_LONE_LETTER = re.compile(r"\s*(?i:option\s*)?[\(\[]?([A-Ja-j])[\)\]]?[.):]?\s*")


def summary_section(response: str) -> str:
    """The text after the last 'Summarization' heading, or the whole response when there is none."""
    matches = list(_SUMMARY.finditer(response))
    return response[matches[-1].end():].strip() if matches else response.strip()


def extract_choice(response: str, options: dict[str, str]) -> str | None:
    """The option letter a response commits to, or None when it commits to none.

    The Summarization decides when it commits: its last 'the answer is (X)' (not a hedge like 'A or B'), a
    Summarization that is only a letter, a lone '(X)', the option text it opens with or the text of exactly
    one option (or yes/no/maybe for PubMedQA), or one 'X.' option line. Only when it commits to nothing does
    the last 'the answer is (X)' anywhere in the response count.
    """
    response = _EMPHASIS.sub("", response)
    letters = set(options)
    choice = _summary_choice(summary_section(response), options)
    if choice is not None:
        return choice
    found = _answer_is(response, letters)
    return found[-1] if found else None


def _answer_is(text: str, letters: set[str]) -> list[str]:
    found = []
    for m in _ANSWER_IS.finditer(text):
        if _HEDGE.match(text, m.end()):
            continue
        letter = next(g for g in m.groups() if g).upper()
        if letter in letters:
            found.append(letter)
    return found


def _option_texts(summary: str, options: dict[str, str]) -> str | None:
    """The option the Summarization names by its text: the last 'the answer is <text>', else the one it opens
    with ('Yes. There is no…'), else the only one it contains (an option inside a longer one that also
    matches, 'hypothyroidism' in 'subclinical hypothyroidism', does not count)."""
    low = summary.lower()
    texts = {k: v.strip().lower() for k, v in options.items() if len(v.strip()) > 1}
    named = [(m.start(), k) for k, t in texts.items()
             for m in re.finditer(rf"{_LEAD}{re.escape(t)}\b", low)]
    if named:  # "Yes. Wait, the answer is no": the last one named as the answer
        return max(named)[1]
    opening = [k for k, t in texts.items() if re.match(rf"{re.escape(t)}(?:[.,;:!]|$)", low)]
    if opening:
        return max(opening, key=lambda k: len(texts[k]))
    hits = {k for k, t in texts.items() if re.search(rf"\b{re.escape(t)}\b", low)}
    hits = {k for k in hits if not any(j != k and texts[k] in texts[j] for j in hits)}
    return hits.pop() if len(hits) == 1 else None


def _summary_choice(summary: str, options: dict[str, str]) -> str | None:
    letters = set(options)
    found = _answer_is(summary, letters)
    if found:
        return found[-1]
    lone = _LONE_LETTER.fullmatch(summary)
    if lone and lone.group(1).upper() in letters:
        return lone.group(1).upper()
    found = [m.group(1) for m in _PAREN_LETTER.finditer(summary) if m.group(1) in letters]
    if len(set(found)) == 1:
        return found[0]
    if (by_text := _option_texts(summary, options)) is not None:
        return by_text
    found = [(m.group(1) or m.group(2)).upper() for m in _OPTION_LINE.finditer(summary)]
    found = [x for x in found if x in letters]
    if len(set(found)) == 1:
        return found[0]
    return None


# What may sit between a letter and the option text after it, on the same line: "D. Naloxone", "(D) -
# Naloxone", "D: Naloxone".
_AFTER_LETTER = re.compile(r"[ \t]*[.:,)\]\-–—]*[ \t]*")
# What may follow an option's text for it to be the whole phrase ("D. Naloxone." but not "D. Naloxone is…").
_PHRASE_END = ("", ".", ",", ";", ":", ")", "]", "!")


@dataclass(frozen=True)
class Disagreement:
    """A response that names one option by letter and another by text: "the answer is D. Naloxone"."""

    letter: str  # the option the letter names
    text: str  # the option whose text follows it


def _text_named_at(text: str, at: int, texts: dict[str, str]) -> str | None:
    """The option whose text is the phrase at `text[at:]` (after separators, up to the line's end or a
    punctuation mark), the longest when several are."""
    start = _AFTER_LETTER.match(text, at).end()
    rest = " ".join(text[start:].split("\n", 1)[0].split()).lower()
    named = [k for k, t in texts.items() if rest.startswith(t) and rest[len(t):len(t) + 1] in _PHRASE_END]
    return max(named, key=lambda k: len(texts[k])) if named else None


def letter_text_disagreement(response: str, options: dict[str, str]) -> Disagreement | None:
    """Whether the response's answer is a letter followed by another option's text, or None.

    "The correct answer is D. Naloxone." with D N-acetylcysteine and B Naloxone commits to D by letter and to
    B by text: which the model meant is unknown. Of the places where a letter ('the answer is D', a 'D.'
    line) is directly followed by an option's text, the last one involving the extracted answer decides.
    It disagrees only when the text opens with another option's text that is not part of the letter's own
    ("D. Naloxone" for D "Naloxone and flumazenil" abbreviates); a letter followed by no option's text ("D,
    because naloxone…") never disagrees.
    """
    response = _EMPHASIS.sub("", response)
    chosen = extract_choice(response, options)
    if chosen is None:
        return None
    texts = {k: " ".join(v.split()).lower() for k, v in options.items() if len(v.strip()) > 1}
    spots = [(m.end(), next(g for g in m.groups() if g).upper()) for m in _ANSWER_IS.finditer(response)]
    spots += [(m.end(), (m.group(1) or m.group(2)).upper()) for m in _OPTION_LINE.finditer(response)]
    pairs = [(at, said, named) for at, said in sorted(spots) if said in options
             and (named := _text_named_at(response, at, texts)) is not None and chosen in (said, named)]
    if not pairs:
        return None
    _, said, named = pairs[-1]
    if said == named or texts[named] in texts.get(said, ""):
        return None
    return Disagreement(said, named)


def extract_open_answer(response: str) -> str:
    """For open questions: the Summarization text (or the last paragraph when there is no heading)."""
    summary = summary_section(response)
    if summary != response.strip():
        return summary
    paragraphs = [p.strip() for p in response.strip().split("\n\n") if p.strip()]
    return paragraphs[-1] if paragraphs else ""
