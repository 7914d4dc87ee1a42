"""Answer scores: exact match and token F1 as in SQuAD, and ROUGE-L (LCS F-measure on tokens).

All three compare normalized text: lowercase, punctuation and the articles a/an/the removed,
whitespace collapsed. Two empty answers agree (score 1); an empty answer against a non-empty
one scores 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalization."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
    return normalize(text).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _f_measure(overlap: int, predicted: int, expected: int) -> float:
    if predicted == 0 or expected == 0:
        return float(predicted == expected)  # both empty: agree; one empty: nothing in common
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / expected
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall, counting repeated tokens (bag of words)."""
    predicted, expected = _tokens(prediction), _tokens(reference)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    return _f_measure(overlap, len(predicted), len(expected))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: precision and recall of the longest common token subsequence (in order, gaps allowed)."""
    predicted, expected = _tokens(prediction), _tokens(reference)
    return _f_measure(lcs_length(predicted, expected), len(predicted), len(expected))
