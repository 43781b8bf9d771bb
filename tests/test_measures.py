"""The measures that catch a prompt-blind model (distillens.measures) and their place in the results tables:
each checked against a count done by hand here, or against rouge_score directly."""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer

from distillens import measures
from distillens.records import GenerationRecord
from distillens.results import metric_values, results_markdown, score_records, summarize_runs

REFERENCES = [
    ["Mars is known as the Red Planet."],
    ["Offer festivals, walking tours and local food markets."],
    ["Play car games such as I spy, and bring audiobooks."],
    ["Water boils at 100 degrees Celsius at sea level."],
]
FILLER = "the world of the world and the other of the world"


def _rouge(prediction: str, reference: str) -> float:
    return (
        100
        * rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        .score(reference, prediction)["rougeL"]
        .fmeasure
    )


@pytest.mark.parametrize("count", [2, 3, 4, 7, 64])
def test_derangement_is_a_permutation_without_fixed_points(count):
    pairs = measures.derangement(count)
    assert sorted(pairs) == list(range(count))
    assert all(other != index for index, other in enumerate(pairs))


def test_derangement_pairs_rows_half_a_set_apart_and_needs_two():
    assert measures.derangement(4) == [2, 3, 0, 1]
    assert measures.derangement(5) == [2, 3, 4, 0, 1]
    with pytest.raises(ValueError, match="at least 2"):
        measures.derangement(1)


def test_text_diagnostics_by_hand():
    texts = ["a b a b a b", "c d e"]
    # bigrams: (a,b) (b,a) (a,b) (b,a) (a,b) | (c,d) (d,e): 4 distinct of 7
    assert measures.distinct_ngrams(texts, 2) == pytest.approx(100 * 4 / 7)
    # 4-grams of "a b a b a b": abab baba abab: the third repeats the first
    assert measures.repeated_ngram_share("a b a b a b", 4) == pytest.approx(100 / 3)
    assert measures.repeated_ngram_share("c d e", 4) == 0.0  # shorter than one 4-gram
    assert measures.distinct_openings(["It is red.", "it is red!", "Mars is red"], 2) == pytest.approx(
        200 / 3
    )
    assert measures.distinct_ngrams(["one"], 2) == 0.0


def test_diagnostics_lengths_and_ends_only_when_known():
    values = measures.diagnostics(["a b c", "a b d"], [3, 64], [True, False])
    assert values["tokens"] == 33.5 and values["eos"] == 50.0
    assert values["openings"] == 100.0 and values["distinct2"] == pytest.approx(75.0)  # ab bc ab bd
    unknown = measures.diagnostics(["a b c", "a b d"], [3, None], [None, None])
    assert "tokens" not in unknown and "eos" not in unknown


def _records(predictions, lengths=None, ended=None):
    lengths = lengths or [None] * len(predictions)
    ended = ended or [None] * len(predictions)
    return [
        GenerationRecord(i, f"q{i}", tuple(REFERENCES[i]), p, n, e)
        for i, (p, n, e) in enumerate(zip(predictions, lengths, ended, strict=True))
    ]


def test_prompt_gap_against_rouge_score_tells_answers_from_filler():
    """Echoing each prompt's reference: a large gap; the same filler for every prompt: own and other's equal."""
    answers = [refs[0] for refs in REFERENCES]
    scores = score_records(_records(answers), ["rougeL"])
    other = [REFERENCES[j][0] for j in measures.derangement(4)]
    expected_other = np.mean([_rouge(a, o) for a, o in zip(answers, other, strict=True)])
    assert scores["rougeL"] == pytest.approx(100.0)
    assert scores["rougeL_other"] == pytest.approx(expected_other)
    assert scores["rougeL_gap"] == pytest.approx(100.0 - expected_other)

    filler = score_records(_records([FILLER] * 4), ["rougeL"])
    own = np.mean([_rouge(FILLER, refs[0]) for refs in REFERENCES])
    assert filler["rougeL"] == pytest.approx(own) and own > 0  # filler does score: "the", "of"
    assert filler["rougeL_gap"] == pytest.approx(
        0.0, abs=1e-9
    )  # the same answer against a permutation of references
    assert filler["openings"] == 25.0  # one opening for four answers


def test_summarized_results_keep_per_prompt_scores_and_tabulate_gaps_and_diagnostics():
    runs = {"set": {10: _records([r[0] for r in REFERENCES], [5, 9, 9, 64], [True, True, True, False])}}
    results = summarize_runs(runs, ["rougeL"])
    per_example = results["sets"]["set"]["per_example"]["10"]
    assert per_example["rougeL"] == pytest.approx([100.0] * 4)
    assert len(per_example["rougeL_other"]) == 4
    assert results["measures"][:3] == ["rougeL", "rougeL_other", "rougeL_gap"]
    assert results["sets"]["set"]["mean"]["eos"] == 75.0 and results["sets"]["set"]["mean"]["tokens"] == 21.75
    table = results_markdown(results)
    assert "| prompt gap | rougeL own | rougeL other's | rougeL gap |" in table
    gap = results["sets"]["set"]["mean"]["rougeL_gap"]
    assert f"| set | 100.00 | {100 - gap:.2f} | {gap:.2f} |" in table
    assert "| set | 21.8 | 75.0 |" in table  # diagnostics: tokens, eos first
    names = metric_values(results)
    assert {"test/set/rougeL_gap", "test/set/eos", "test/set/distinct2"} <= set(names)


def test_a_single_answer_has_no_prompt_gap():
    scores = score_records(_records(["Mars"]), ["rougeL"])
    assert "rougeL_other" not in scores and "rougeL_gap" not in scores and scores["rougeL"] > 0
