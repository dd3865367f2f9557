"""Content words and their Jaccard similarity, for statistic C's perturbation trials (spec §11)."""

from __future__ import annotations

import re

# NLTK's English stop-word list (nltk.corpus.stopwords.words("english"), 179 words), fixed here so the
# study needs no corpus download and its figures do not move with a library's list.
STOP_WORDS = frozenset(
    """
    i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he
    him his himself she she's her hers herself it it's its itself they them their theirs themselves what
    which who whom this that that'll these those am is are was were be been being have has had having do
    does did doing a an the and but if or because as until while of at by for with about against between
    into through during before after above below to from up down in out on off over under again further
    then once here there when where why how all any both each few more most other some such no nor not
    only own same so than too very s t can will just don don't should should've now d ll m o re ve y ain
    aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't
    ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't
    won won't wouldn wouldn't
    """.split()  # noqa: SIM905 (one line of words reads better than 179 quoted strings)
)

_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits (Unicode-aware); punctuation splits words


def content_words(text: str) -> set[str]:
    """The lower-cased alphanumeric words of ``text``, minus the stop words."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)
