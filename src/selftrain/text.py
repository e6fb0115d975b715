"""Text checks shared by the stages and the reports: equality up to case and punctuation,
degenerate repetition, and the data stage's verdict on a revision (the dashboard shows it)."""
from __future__ import annotations

import re
from collections import Counter


def normalised(text: str) -> str:
    """Lower case, punctuation and runs of space as one space: two texts equal under it say the same."""
    return re.sub(r"\W+", " ", text.lower()).strip()


def top_trigram_share(text: str) -> float:
    words = text.lower().split()
    grams = list(zip(words, words[1:], words[2:]))
    if len(grams) < 4:
        return 0.0
    return Counter(grams).most_common(1)[0][1] / len(grams)


def verdict(initial: str, final: str, min_words: int, max_top_trigram_share: float) -> str:
    """'kept', or the reason a revision is dropped: empty, degenerate or unchanged."""
    if len(final.split()) < min_words:
        return "empty"
    if top_trigram_share(final) > max_top_trigram_share:
        return "degenerate"
    if normalised(final) == normalised(initial):
        return "unchanged"
    return "kept"
