"""Measures that tell an answer from filler: the prompt gap and degeneration diagnostics.

ROUGE-L rewards a prompt-blind model: an answer made of common words ("the", "of", "and") overlaps every
reference about as well as its own, so a student that answers every prompt with the same filler can outscore one
that answers on topic. Two families of measures catch that, and every results table carries them:

- **The prompt gap.** Each answer is also scored against *another* prompt's references, by a fixed derangement of
  the set (`derangement`: prompt i is paired with prompt i + n/2, so neighbouring rows, often of one category, are
  never paired). A model that reads its prompt scores much higher against its own references than against
  another's; for filler the two are the same, and the gap (own minus other's) is near zero.
- **Degeneration diagnostics** of the answers themselves: mean length in tokens and the share that ends with the
  end-of-sequence token (a model that never stops runs to the length limit), distinct bigrams over all answers
  and distinct openings (the same text for every prompt scores low on both), and the share of repeated 4-grams
  inside an answer (loops).

Pure Python: nothing here imports torch or Lightning.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9']+")

OPENING_WORDS = 4  # an answer's opening: its first four words
REPEAT_NGRAM = 4  # loops are counted as 4-grams that occurred earlier in the same answer

DIAGNOSTICS = {
    "tokens": "mean length of an answer in tokens (up to its end-of-sequence token)",
    "eos": "share of answers that end with the end-of-sequence token, % (the rest hit the length limit)",
    "distinct2": "distinct bigrams over all answers / all bigrams, %",
    "repeated4": "share of an answer's 4-grams that occurred earlier in the same answer, %, mean over answers",
    "openings": "distinct first four words over all answers / answers, %",
}
"""Degeneration diagnostics by key, with what each one measures (README and results tables)."""


def derangement(count: int) -> list[int]:
    """A fixed permutation of ``range(count)`` with no fixed point: i -> (i + count // 2) % count.

    Half a set away rather than the next row: sets are often ordered by category, and a neighbour's reference
    on the same topic would hide part of the gap.
    """
    if count < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {count}")
    return [(index + count // 2) % count for index in range(count)]


def other_prompts_references(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each row's references replaced by those of the row `derangement` pairs it with."""
    return [list(references[other]) for other in derangement(len(references))]


def words(text: str) -> list[str]:
    """Lowercased runs of letters, digits and apostrophes: the units of the text diagnostics."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[start : start + n]) for start in range(len(tokens) - n + 1)]


def distinct_ngrams(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over every text / all n-grams of every text, %; 0 when no text has n words."""
    grams = [gram for text in texts for gram in ngrams(words(text), n)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(text: str, n: int = REPEAT_NGRAM) -> float:
    """Share of the text's n-grams that already occurred earlier in it, %; 0 for a text shorter than n words."""
    grams = ngrams(words(text), n)
    if not grams:
        return 0.0
    repeats = len(grams) - len(set(grams))
    return 100.0 * repeats / len(grams)


def distinct_openings(texts: Sequence[str], opening: int = OPENING_WORDS) -> float:
    """Distinct openings (first ``opening`` words) / texts, %: 100 when every answer starts its own way."""
    if not texts:
        raise ValueError("no answers: distinct openings of an empty set are undefined")
    return 100.0 * len({tuple(words(text)[:opening]) for text in texts}) / len(texts)


def diagnostics(
    predictions: Sequence[str], lengths: Sequence[int | None], ended: Sequence[bool | None]
) -> dict[str, float]:
    """The `DIAGNOSTICS` of a set of answers; "tokens" and "eos" only when every answer's length and end are known
    (answers read back from older files have neither)."""
    values = {
        "distinct2": distinct_ngrams(predictions, 2),
        "repeated4": statistics.fmean(repeated_ngram_share(text) for text in predictions),
        "openings": distinct_openings(predictions),
    }
    if lengths and all(length is not None for length in lengths):
        values["tokens"] = statistics.fmean(lengths)
    if ended and all(end is not None for end in ended):
        values["eos"] = 100.0 * statistics.fmean(bool(end) for end in ended)
    return values
