"""Text normalisation shared by decontamination and retrieval (telling copies of a question apart)."""

from __future__ import annotations

import re
import unicodedata

# Everything that is neither a word character nor whitespace, plus "_" (a \w character): the same set
# lm-eval-harness strips (string.punctuation), widened to Unicode punctuation and symbols.
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalise(text: str) -> list[str]:
    """Tokens for matching: NFKC, lower case, punctuation removed, split on whitespace.

    NFKC first, so full-width letters and ligatures compare equal to their plain forms; punctuation is
    deleted rather than replaced by a space, so "hyper-thyroidism" and "hyperthyroidism" match.
    """
    return _PUNCTUATION.sub("", unicodedata.normalize("NFKC", text).lower()).split()
